//! The cluster's decisions, without IO: where a new session goes, where a request for
//! a session this node does not hold is sent, which nodes are dead, and the URLs of
//! redirects. Plain functions over the records read from the directory, so that every
//! rule is tested in microseconds (see the tests below); the Redis shell only fetches
//! the records and carries the answers out.

use relay_codec::wire::SessionSummary;
use serde::{Deserialize, Serialize};

/// A node as it registers itself in the directory, every heartbeat.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeRecord {
    /// Its `cluster.node_id`.
    pub id: String,
    /// Where clients reach it (`public_url`, or its bound address).
    pub url: String,
    /// `cluster.capacity`: sessions it is sized for.
    pub capacity: u32,
    /// Live sessions at the heartbeat.
    pub sessions: u32,
    /// Whether it drains (SIGTERM): it takes no new sessions.
    pub draining: bool,
    /// When the heartbeat was written, in milliseconds since the Unix epoch.
    pub heartbeat_ms: u64,
}

impl NodeRecord {
    /// Sessions held over sessions it is sized for.
    pub fn load(&self) -> f64 {
        f64::from(self.sessions) / f64::from(self.capacity.max(1))
    }

    /// Whether a new session may be placed on it without looking elsewhere.
    pub fn takes_sessions(&self, load_threshold: f64) -> bool {
        !self.draining && self.load() < load_threshold
    }
}

/// One live session as the directory records it (also what `relay cluster status` and
/// the cluster-wide supervisor listing show).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SessionRecord {
    /// The session id.
    pub session_id: String,
    /// The node that holds it.
    pub node: String,
    /// That node's URL.
    pub url: String,
    /// SHA-256 (hex) of its support key.
    pub key: String,
    /// SHA-256 (hex) of its support-link token.
    pub link: String,
    /// Its open invitations.
    pub invitations: Vec<String>,
    /// What a supervisor's listing shows of it.
    pub summary: SessionSummary,
}

/// Where a new session goes.
#[derive(Debug, Clone, PartialEq)]
pub enum Placement {
    /// On this node.
    Here,
    /// On that node: the agent is redirected there.
    There(NodeRecord),
}

/// Places a session an agent asked this node (`me`, with its current load) for.
///
/// The node the agent reached takes it unless it is draining or at its load threshold;
/// then the least-loaded other node that is not draining does, preferring nodes under
/// their threshold, or this node if no other is less loaded. A request that was already
/// redirected once (`redirected`) is never sent on again, so stale views cannot bounce
/// an agent around: the node takes it or refuses it (`draining`).
pub fn place(
    me: &NodeRecord,
    others: &[NodeRecord],
    threshold: f64,
    redirected: bool,
) -> Placement {
    if redirected || me.takes_sessions(threshold) {
        return Placement::Here;
    }
    let best = others
        .iter()
        .filter(|n| n.id != me.id && !n.draining)
        .min_by(|a, b| {
            (!a.takes_sessions(threshold), a.load(), &a.id)
                .partial_cmp(&(!b.takes_sessions(threshold), b.load(), &b.id))
                .unwrap_or(std::cmp::Ordering::Equal)
        });
    match best {
        Some(n) if n.takes_sessions(threshold) || me.draining || n.load() < me.load() => {
            Placement::There(n.clone())
        }
        _ => Placement::Here,
    }
}

/// What the directory says of a session (or its key, link or invitation) that this node
/// was asked about.
#[derive(Debug, Clone, PartialEq)]
pub enum Lookup {
    /// Held by that node.
    Owner {
        /// Its id.
        node: String,
        /// Its URL.
        url: String,
    },
    /// Its node died; the session is gone.
    Lost,
    /// The directory knows nothing of it.
    Unknown,
}

/// Where a request goes.
#[derive(Debug, Clone, PartialEq)]
pub enum Route {
    /// This node answers (it holds the session, or nobody does and it says so).
    Local,
    /// The node at this URL holds it.
    Redirect(String),
    /// Its node is gone: answer `session_lost`.
    Lost,
}

/// Routes a request for something this node does not hold. `owner_alive` says whether
/// the owner's node record still exists (a session record can outlive its node by up
/// to one TTL, and must not send clients to a dead node meanwhile).
pub fn route(me: &str, lookup: &Lookup, owner_alive: bool) -> Route {
    match lookup {
        Lookup::Owner { node, .. } if node == me => Route::Local,
        Lookup::Owner { url, .. } if owner_alive => Route::Redirect(url.clone()),
        Lookup::Owner { .. } | Lookup::Lost => Route::Lost,
        Lookup::Unknown => Route::Local,
    }
}

/// Members of the node set whose records have expired: dead nodes, whose sessions are to
/// be swept from the directory. This node is never among them (its own record may be
/// missing only because Redis just restarted).
pub fn dead_nodes<'a>(me: &str, members: &'a [String], live: &[NodeRecord]) -> Vec<&'a str> {
    members
        .iter()
        .map(String::as_str)
        .filter(|m| *m != me && !live.iter().any(|n| n.id == *m))
        .collect()
}

/// The URL to repeat a request at: the owner's base URL and the same path and query.
pub fn location(owner_url: &str, path_and_query: &str) -> String {
    format!("{}{path_and_query}", owner_url.trim_end_matches('/'))
}

/// As [`location`], for a WebSocket (`wss://` for `https://`, `ws://` for `http://`).
pub fn ws_location(owner_url: &str, path_and_query: &str) -> String {
    let url = location(owner_url, path_and_query);
    if let Some(rest) = url.strip_prefix("https://") {
        format!("wss://{rest}")
    } else if let Some(rest) = url.strip_prefix("http://") {
        format!("ws://{rest}")
    } else {
        url
    }
}

/// The query flag a placement redirect adds, so that the next node does not pass the
/// agent on again.
pub const REDIRECTED_FLAG: &str = "redirected=1";

/// Whether a query string carries [`REDIRECTED_FLAG`].
pub fn was_redirected(query: Option<&str>) -> bool {
    query.is_some_and(|q| q.split('&').any(|p| p == REDIRECTED_FLAG))
}

/// `path` with `query` and [`REDIRECTED_FLAG`] appended.
pub fn with_redirected_flag(path: &str, query: Option<&str>) -> String {
    match query.filter(|q| !q.is_empty()) {
        Some(q) if was_redirected(Some(q)) => format!("{path}?{q}"),
        Some(q) => format!("{path}?{q}&{REDIRECTED_FLAG}"),
        None => format!("{path}?{REDIRECTED_FLAG}"),
    }
}

/// What a request is about, as far as routing goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target<'a> {
    /// `POST /v1/sessions`: a new session, placed by [`place`].
    Create,
    /// `POST /v1/join`: routed by the key or link in its body.
    Join,
    /// Anything under `/v1/sessions/{id}`; `ws` for its session WebSocket.
    Session {
        /// The session id.
        id: &'a str,
        /// Whether it is the WebSocket upgrade.
        ws: bool,
        /// Whether it creates an invitation (the directory learns of it at once).
        invites: bool,
    },
    /// `POST /v1/invitations/{id}/accept` or `/decline`.
    Invitation(&'a str),
    /// `GET /s/{link}`: the customer's support-URL page.
    Link(&'a str),
    /// Anything else: always answered here.
    Other,
}

/// Classifies a request by method and path.
pub fn classify<'a>(method: &str, path: &'a str) -> Target<'a> {
    let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    match (method, parts.as_slice()) {
        ("POST", ["v1", "sessions"]) => Target::Create,
        ("POST", ["v1", "join"]) => Target::Join,
        (_, ["v1", "sessions", id, rest @ ..]) if !id.is_empty() => Target::Session {
            id,
            ws: method == "GET" && rest == ["ws"],
            invites: method == "POST" && rest == ["invitations"],
        },
        ("POST", ["v1", "invitations", id, "accept" | "decline"]) => Target::Invitation(id),
        ("GET", ["s", link]) if !link.is_empty() => Target::Link(link),
        _ => Target::Other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(id: &str, sessions: u32, capacity: u32, draining: bool) -> NodeRecord {
        NodeRecord {
            id: id.into(),
            url: format!("https://{id}.example:8443"),
            capacity,
            sessions,
            draining,
            heartbeat_ms: 0,
        }
    }

    fn placed_on(p: Placement) -> String {
        match p {
            Placement::Here => "here".into(),
            Placement::There(n) => n.id,
        }
    }

    #[test]
    fn the_node_reached_takes_the_session_while_under_its_threshold() {
        let me = node("a", 79, 100, false);
        let others = [node("b", 0, 100, false)];
        assert_eq!(placed_on(place(&me, &others, 0.8, false)), "here");
    }

    #[test]
    fn a_loaded_node_sends_the_agent_to_the_least_loaded_one() {
        let me = node("a", 80, 100, false);
        let others = [
            node("b", 50, 100, false),
            node("c", 10, 100, false),
            node("d", 0, 100, true),
        ];
        assert_eq!(placed_on(place(&me, &others, 0.8, false)), "c");
        // Load is relative to capacity: 30 of 300 is less than 10 of 100.
        let others = [node("b", 30, 300, false), node("c", 10, 100, false)];
        assert_eq!(placed_on(place(&me, &others, 0.8, false)), "b");
    }

    #[test]
    fn a_draining_node_takes_no_new_session_if_anyone_else_can() {
        let me = node("a", 0, 100, true);
        assert_eq!(
            placed_on(place(&me, &[node("b", 95, 100, false)], 0.8, false)),
            "b",
            "even a loaded node beats a draining one"
        );
        assert_eq!(
            placed_on(place(&me, &[node("b", 0, 100, true)], 0.8, false)),
            "here",
            "nobody else: the node refuses it itself (draining)"
        );
    }

    #[test]
    fn when_every_node_is_loaded_the_least_loaded_takes_it() {
        let me = node("a", 90, 100, false);
        assert_eq!(
            placed_on(place(&me, &[node("b", 85, 100, false)], 0.8, false)),
            "b"
        );
        assert_eq!(
            placed_on(place(&me, &[node("b", 95, 100, false)], 0.8, false)),
            "here"
        );
    }

    #[test]
    fn a_redirected_request_is_never_sent_on() {
        let me = node("a", 100, 100, true);
        assert_eq!(
            placed_on(place(&me, &[node("b", 0, 100, false)], 0.8, true)),
            "here"
        );
    }

    #[test]
    fn this_node_in_the_view_is_not_a_candidate() {
        let me = node("a", 90, 100, false);
        let stale_self = node("a", 0, 100, false);
        assert_eq!(placed_on(place(&me, &[stale_self], 0.8, false)), "here");
    }

    #[test]
    fn routes_follow_the_owner_while_it_lives() {
        let owner = Lookup::Owner {
            node: "a".into(),
            url: "https://a.example".into(),
        };
        assert_eq!(route("a", &owner, true), Route::Local);
        assert_eq!(
            route("b", &owner, true),
            Route::Redirect("https://a.example".into())
        );
        assert_eq!(route("b", &owner, false), Route::Lost, "owner died");
        assert_eq!(route("b", &Lookup::Lost, true), Route::Lost);
        assert_eq!(
            route("b", &Lookup::Unknown, true),
            Route::Local,
            "answered here as on a lone node"
        );
    }

    #[test]
    fn dead_nodes_are_members_without_a_record_but_never_this_one() {
        let members = vec!["a".to_owned(), "b".to_owned(), "c".to_owned()];
        let live = [node("b", 0, 1, false)];
        assert_eq!(dead_nodes("a", &members, &live), vec!["c"]);
        assert!(dead_nodes("a", &[], &live).is_empty());
    }

    #[test]
    fn locations_keep_path_and_query_and_switch_the_scheme_for_websockets() {
        assert_eq!(
            location("https://a.example:8443/", "/v1/join"),
            "https://a.example:8443/v1/join"
        );
        assert_eq!(
            ws_location("https://a.example", "/v1/sessions/s_1/ws?token=t"),
            "wss://a.example/v1/sessions/s_1/ws?token=t"
        );
        assert_eq!(
            ws_location("http://127.0.0.1:9", "/x"),
            "ws://127.0.0.1:9/x"
        );
        assert_eq!(
            with_redirected_flag("/v1/sessions", None),
            "/v1/sessions?redirected=1"
        );
        assert_eq!(
            with_redirected_flag("/v1/sessions", Some("a=b")),
            "/v1/sessions?a=b&redirected=1"
        );
        assert_eq!(
            with_redirected_flag("/v1/sessions", Some("redirected=1")),
            "/v1/sessions?redirected=1"
        );
        assert!(was_redirected(Some("x=1&redirected=1")));
        assert!(!was_redirected(Some("redirected=10")));
        assert!(!was_redirected(None));
    }

    #[test]
    fn requests_are_classified_by_method_and_path() {
        assert_eq!(classify("POST", "/v1/sessions"), Target::Create);
        assert_eq!(classify("GET", "/v1/sessions"), Target::Other);
        assert_eq!(classify("POST", "/v1/join"), Target::Join);
        assert_eq!(
            classify("GET", "/v1/sessions/s_1/ws"),
            Target::Session {
                id: "s_1",
                ws: true,
                invites: false
            }
        );
        assert_eq!(
            classify("POST", "/v1/sessions/s_1/invitations"),
            Target::Session {
                id: "s_1",
                ws: false,
                invites: true
            }
        );
        assert_eq!(
            classify("DELETE", "/v1/sessions/s_1"),
            Target::Session {
                id: "s_1",
                ws: false,
                invites: false
            }
        );
        assert_eq!(
            classify("POST", "/v1/invitations/i_9/accept"),
            Target::Invitation("i_9")
        );
        assert_eq!(classify("GET", "/v1/invitations"), Target::Other);
        assert_eq!(classify("GET", "/s/abc"), Target::Link("abc"));
        assert_eq!(classify("GET", "/agent"), Target::Other);
        assert_eq!(classify("GET", "/v1/monitor/sessions"), Target::Other);
    }
}
