//! `relay cluster status`: the nodes of the cluster and their sessions, read from Redis
//! directly with the node's configuration file (no node needs to be running here).

use anyhow::{Context, anyhow};

use super::config::redact_url;
use super::directory::Directory;
use super::placement::{NodeRecord, SessionRecord};
use super::unix_ms;
use crate::config::Config;

/// Reads the directory `config` names and formats it.
pub async fn report(config: &Config) -> anyhow::Result<String> {
    let url =
        config.cluster.redis.as_deref().ok_or_else(|| {
            anyhow!("this configuration has no [cluster] redis: the node runs alone")
        })?;
    let dir = Directory::connect(url)
        .await
        .with_context(|| format!("cannot reach Redis at {}", redact_url(url)))?;
    let (members, live) = dir.nodes().await.context("reading the node set")?;
    let sessions = dir
        .sessions_of(&members)
        .await
        .context("reading the nodes' sessions")?;
    Ok(format_status(unix_ms(), &members, &live, &sessions))
}

/// The report: one line per registered node (live, draining or dead), then one per
/// session of the live nodes. Support keys, tokens and names are not shown.
pub fn format_status(
    now_ms: u64,
    members: &[String],
    live: &[NodeRecord],
    sessions: &[SessionRecord],
) -> String {
    let mut out = String::new();
    let dead = members
        .iter()
        .filter(|m| !live.iter().any(|n| &n.id == *m))
        .count();
    let draining = live.iter().filter(|n| n.draining).count();
    out.push_str(&format!(
        "nodes: {} live ({} draining), {} dead\n",
        live.len(),
        draining,
        dead
    ));
    out.push_str(&format!(
        "{:<20} {:<9} {:>12} {:>6} {:>10}  {}\n",
        "NODE", "STATE", "SESSIONS", "LOAD", "HEARTBEAT", "URL"
    ));
    let mut ids: Vec<&str> = members.iter().map(String::as_str).collect();
    for n in live {
        if !ids.contains(&n.id.as_str()) {
            ids.push(&n.id);
        }
    }
    ids.sort_unstable();
    for id in ids {
        match live.iter().find(|n| n.id == id) {
            Some(n) => out.push_str(&format!(
                "{:<20} {:<9} {:>12} {:>5.0}% {:>9.1}s  {}\n",
                n.id,
                if n.draining { "draining" } else { "live" },
                format!("{}/{}", n.sessions, n.capacity),
                n.load() * 100.0,
                now_ms.saturating_sub(n.heartbeat_ms) as f64 / 1000.0,
                n.url
            )),
            None => out.push_str(&format!(
                "{:<20} {:<9} {:>12} {:>6} {:>10}  -\n",
                id, "dead", "-", "-", "-"
            )),
        }
    }
    let shown: Vec<&SessionRecord> = sessions
        .iter()
        .filter(|s| live.iter().any(|n| n.id == s.node))
        .collect();
    out.push_str(&format!("sessions: {}\n", shown.len()));
    if !shown.is_empty() {
        out.push_str(&format!(
            "{:<36} {:<20} {:<16} {:>6} {:<9} {:>8}\n",
            "SESSION", "NODE", "PORTAL", "AGENTS", "CUSTOMER", "AGE"
        ));
    }
    for s in shown {
        out.push_str(&format!(
            "{:<36} {:<20} {:<16} {:>6} {:<9} {:>7}s\n",
            s.session_id,
            s.node,
            s.summary.portal,
            s.summary.agents,
            if s.summary.customer.is_some() {
                "joined"
            } else {
                "waiting"
            },
            s.summary.age_s
        ));
    }
    out.trim_end().to_owned()
}

#[cfg(test)]
mod tests {
    use relay_codec::wire::SessionSummary;

    use super::*;

    #[test]
    fn lists_live_draining_and_dead_nodes_and_only_live_sessions() {
        let node = |id: &str, sessions, draining| NodeRecord {
            id: id.into(),
            url: format!("https://{id}.example"),
            capacity: 200,
            sessions,
            draining,
            heartbeat_ms: 9_000,
        };
        let session = |sid: &str, node: &str, customer: Option<&str>| SessionRecord {
            session_id: sid.into(),
            node: node.into(),
            url: format!("https://{node}.example"),
            key: "k".into(),
            link: "l".into(),
            invitations: vec![],
            summary: SessionSummary {
                session_id: sid.into(),
                portal: "support".into(),
                host: "Alice".into(),
                customer: customer.map(str::to_owned),
                agents: 2,
                age_s: 75,
                node_url: None,
            },
        };
        let text = format_status(
            10_000,
            &["a".into(), "b".into(), "c".into()],
            &[node("a", 1, false), node("b", 0, true)],
            &[
                session("s_live", "a", Some("Carol")),
                session("s_gone", "c", None),
            ],
        );
        assert!(
            text.starts_with("nodes: 2 live (1 draining), 1 dead"),
            "{text}"
        );
        let line = |prefix: &str| {
            text.lines()
                .find(|l| l.starts_with(prefix))
                .unwrap_or_else(|| panic!("no line {prefix:?} in\n{text}"))
                .to_owned()
        };
        assert!(
            line("a ").contains("live") && line("a ").contains("1/200"),
            "{text}"
        );
        assert!(line("a ").contains("1.0s") && line("a ").contains("https://a.example"));
        assert!(line("b ").contains("draining"), "{text}");
        assert!(line("c ").contains("dead"), "{text}");
        assert!(text.contains("sessions: 1"), "{text}");
        assert!(line("s_live").contains("joined") && line("s_live").contains("75s"));
        assert!(
            !text.contains("s_gone"),
            "a dead node's session is not listed"
        );
        assert!(!text.contains("Carol"), "no customer names");
    }
}
