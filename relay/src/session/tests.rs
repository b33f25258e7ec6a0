//! Simulated-time tests of the session core: hours of session life in microseconds.
//!
//! The [`Sim`] harness owns a [`Node`], a virtual clock and every connection's inbox;
//! `advance` jumps the clock from one `poll_timeout` to the next, as the shell would.
#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, Instant, SystemTime};

use rand::SeedableRng;
use relay_codec::wire::{
    Audience, ClientEnvelope, ClientMsg, CreateSessionRequest, EndReason, ErrorCode, InviteRequest,
    InviteTarget, LeaveReason, Permission, Role, ServerMsg, UpdateParticipantRequest, Visibility,
    WithdrawReason,
};

use super::*;
use crate::identity::AgentIdentity;
use crate::text::{Field, TextRule};
use crate::throttle::ThrottleSettings;

fn settings() -> Settings {
    Settings {
        key_ttl: Duration::from_secs(4 * 3600),
        invitation_ttl: Duration::from_secs(300),
        customer_grace: Duration::from_secs(600),
        agent_grace: Duration::from_secs(120),
        max_duration: Duration::from_secs(12 * 3600),
        max_sessions_per_agent: 8,
        max_monitored_sessions: 32,
        chat_history: 200,
        cross_portal_invitations: false,
        throttle: ThrottleSettings::default(),
        rate_limits: crate::rate_limit::RateLimits::default(),
    }
}

fn agent(id: &str, portals: &[&str]) -> AgentIdentity {
    AgentIdentity {
        agent_id: id.into(),
        name: format!("Agent {id}"),
        portals: portals.iter().map(|p| p.to_string()).collect(),
        monitor: false,
    }
}

fn supervisor(id: &str, portals: &[&str]) -> AgentIdentity {
    AgentIdentity {
        monitor: true,
        ..agent(id, portals)
    }
}

fn addr(last: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(198, 51, 100, last))
}

fn create_req() -> CreateSessionRequest {
    CreateSessionRequest {
        portal: "support".into(),
        visibility: Visibility::Visible,
    }
}

fn invite_agent(id: &str, visibility: Visibility, permission: Permission) -> InviteRequest {
    InviteRequest {
        target: InviteTarget::Agent(id.into()),
        visibility,
        permission,
        comment: Some("printer driver".into()),
    }
}

/// A node, a virtual clock and the inbox of every connection.
struct Sim {
    node: Node,
    now: Instant,
    start: Instant,
    next_conn: u64,
    inbox: HashMap<ConnId, Vec<ServerMsg>>,
    closed: Vec<ConnId>,
    stats: Vec<Stat>,
    media: Vec<MediaEvent>,
    /// What the core told the recording (kept apart from `media`).
    records: Vec<RecordEntry>,
    /// Chat delivered on `chat` data channels, by participant.
    on_channel: Vec<(ParticipantId, ServerMsg)>,
    /// Each participant's latest resume token (from its last `welcome`).
    resume: HashMap<String, String>,
}

impl Sim {
    fn new(settings: Settings) -> Self {
        let start = Instant::now();
        let clock = WallClock {
            instant: start,
            system: SystemTime::UNIX_EPOCH + Duration::from_secs(1_795_000_000),
        };
        let rng: Random = Box::new(rand::rngs::StdRng::seed_from_u64(7));
        Sim {
            node: Node::new(settings, clock, rng),
            now: start,
            start,
            next_conn: 1,
            inbox: HashMap::new(),
            closed: Vec::new(),
            stats: Vec::new(),
            media: Vec::new(),
            records: Vec::new(),
            on_channel: Vec::new(),
            resume: HashMap::new(),
        }
    }

    fn drain(&mut self) {
        while let Some(out) = self.node.poll_output() {
            match out {
                Output::Send { conn, msg } => {
                    assert!(
                        !self.closed.contains(&conn),
                        "sent to closed {conn:?}: {msg:?}"
                    );
                    if let ServerMsg::Welcome {
                        you,
                        resume_token: Some(t),
                        ..
                    } = &msg
                    {
                        self.resume.insert(you.participant_id.clone(), t.clone());
                    }
                    self.inbox.entry(conn).or_default().push(msg)
                }
                Output::Close { conn } => self.closed.push(conn),
                Output::Stat(s) => self.stats.push(s),
                Output::Media(MediaEvent::Record { entry, .. }) => self.records.push(entry),
                Output::Media(m) => self.media.push(m),
                Output::ChatOnChannel {
                    participant, msg, ..
                } => self.on_channel.push((participant, msg)),
            }
        }
    }

    /// Moves the clock to `t` (relative to the start), running every timer on the way.
    fn advance_to(&mut self, t: Duration) {
        let target = self.start + t;
        while let Some(due) = self.node.poll_timeout() {
            if due > target {
                break;
            }
            self.now = self.now.max(due);
            self.node.handle_timeout(self.now);
            self.drain();
        }
        self.now = target;
        self.node.handle_timeout(self.now);
        self.drain();
    }

    fn conn(&mut self) -> ConnId {
        self.next_conn += 1;
        ConnId(self.next_conn)
    }

    /// Connects participant `c` as its own client would: with its participant token the
    /// first time, with the resume token of its last `welcome` after that.
    fn connect(&mut self, c: &Credentials) -> ConnId {
        let token = self.token_of(c);
        self.connect_with(c, &token).unwrap()
    }

    /// The token `c`'s next connection needs.
    fn token_of(&self, c: &Credentials) -> String {
        self.resume
            .get(c.participant_id.as_str())
            .cloned()
            .unwrap_or_else(|| c.token.reveal().to_owned())
    }

    fn connect_with(&mut self, c: &Credentials, token: &str) -> Result<ConnId, SessionError> {
        let conn = self.conn();
        let r = self.node.connect(self.now, &c.session_id, token, conn);
        self.drain();
        r.map(|()| conn)
    }

    fn console(&mut self, who: &AgentIdentity) -> ConnId {
        let conn = self.conn();
        self.node.console_opened(self.now, conn, who);
        self.drain();
        conn
    }

    fn send(&mut self, conn: ConnId, msg: ClientMsg) {
        self.node
            .message(self.now, conn, ClientEnvelope { id: Some(1), msg });
        self.drain();
    }

    fn create(&mut self, host: &AgentIdentity) -> SessionCreated {
        let r = self.node.create_session(self.now, host, &create_req());
        self.drain();
        r.unwrap()
    }

    fn join(&mut self, key: &str) -> Result<Credentials, SessionError> {
        self.join_from(addr(1), key)
    }

    fn join_from(&mut self, from: IpAddr, key: &str) -> Result<Credentials, SessionError> {
        let r = self.node.join(
            self.now,
            from,
            "Carol Customer",
            &JoinCredential::Key(key.into()),
            Proof::None,
        );
        self.drain();
        r
    }

    fn invite_and_accept(
        &mut self,
        host: &AgentIdentity,
        sid: &SessionId,
        who: &AgentIdentity,
        visibility: Visibility,
        permission: Permission,
    ) -> Result<Credentials, SessionError> {
        let inv = self.node.invite(
            self.now,
            host,
            sid,
            &invite_agent(&who.agent_id, visibility, permission),
        )?;
        self.drain();
        let r = self
            .node
            .accept_invitation(self.now, who, &inv.invitation_id);
        self.drain();
        r
    }

    fn take(&mut self, conn: ConnId) -> Vec<ServerMsg> {
        self.inbox.remove(&conn).unwrap_or_default()
    }

    fn ended_with(&mut self, conn: ConnId) -> Option<EndReason> {
        self.take(conn).into_iter().find_map(|m| match m {
            ServerMsg::SessionEnded { reason } => Some(reason),
            _ => None,
        })
    }
}

/// A session with a connected host and customer.
fn session_with_customer(
    sim: &mut Sim,
    host: &AgentIdentity,
) -> (SessionCreated, ConnId, Credentials, ConnId) {
    let created = sim.create(host);
    let host_conn = sim.connect(&created.host);
    let customer = sim.join(created.support_key.reveal()).unwrap();
    let customer_conn = sim.connect(&customer);
    (created, host_conn, customer, customer_conn)
}

#[test]
fn support_key_is_nine_digits_and_link_is_independent() {
    let mut sim = Sim::new(settings());
    let alice = agent("alice", &["support"]);
    let created = sim.create(&alice);
    let key = created.support_key.reveal();
    assert_eq!(key.len(), 9);
    assert!(key.bytes().all(|b| b.is_ascii_digit()));
    assert_eq!(created.link.reveal().len(), 32, "128-bit link token");
    assert!(!created.link.reveal().contains(key));
    assert_eq!(
        created.expires_at,
        sim.start + Duration::from_secs(4 * 3600)
    );
}

#[test]
fn unused_key_expires_at_four_hours_and_ends_the_session() {
    let mut s = settings();
    s.key_ttl = Duration::from_secs(9 * 3600); // configured too long: clamped to 4 h
    let mut sim = Sim::new(s);
    let alice = agent("alice", &["support"]);
    let early = sim.create(&alice);
    let late = sim.create(&alice);
    let host_conn = sim.connect(&late.host);
    let keep_alive = sim.connect(&early.host);

    sim.advance_to(Duration::from_secs(4 * 3600) - Duration::from_secs(1));
    assert!(
        sim.join(early.support_key.reveal()).is_ok(),
        "valid one second before"
    );
    sim.take(keep_alive);

    sim.advance_to(Duration::from_secs(4 * 3600));
    assert_eq!(sim.ended_with(host_conn), Some(EndReason::KeyExpired));
    assert!(sim.closed.contains(&host_conn));
    // An expired key gets the answer of a key that never was (a guesser learns
    // nothing); the link, which no one guesses, may say it expired.
    assert_eq!(
        sim.join(late.support_key.reveal()).unwrap_err(),
        SessionError::WrongKey
    );
    let by_link = sim.node.join(
        sim.now,
        addr(2),
        "Carol",
        &JoinCredential::Link(late.link.reveal().into()),
        Proof::None,
    );
    assert_eq!(by_link.unwrap_err(), SessionError::KeyExpired);
    // The session that was joined in time lives on.
    assert_eq!(sim.node.census().sessions, 1);
    assert!(
        sim.stats
            .contains(&Stat::SessionEnded(EndReason::KeyExpired))
    );
}

#[test]
fn a_key_admits_one_customer_and_the_link_works_like_the_key() {
    let mut sim = Sim::new(settings());
    let alice = agent("alice", &["support"]);
    let a = sim.create(&alice);
    let spaced = format!(
        "{} {}-{}",
        &a.support_key.reveal()[..3],
        &a.support_key.reveal()[3..6],
        &a.support_key.reveal()[6..]
    );
    assert!(sim.join(&spaced).is_ok());
    // A used key answers like an unknown one.
    assert_eq!(
        sim.join(a.support_key.reveal()).unwrap_err(),
        SessionError::WrongKey
    );
    let b = sim.create(&alice);
    let r = sim.node.join(
        sim.now,
        addr(1),
        "Dan",
        &JoinCredential::Link(b.link.reveal().into()),
        Proof::None,
    );
    assert_eq!(r.unwrap().session_id, b.host.session_id);
    assert_eq!(
        sim.join(b.support_key.reveal()).unwrap_err(),
        SessionError::WrongKey,
        "link and key share the one admission"
    );
    // The link itself may say it was used.
    let again = sim.node.join(
        sim.now,
        addr(1),
        "Dan",
        &JoinCredential::Link(b.link.reveal().into()),
        Proof::None,
    );
    assert_eq!(again.unwrap_err(), SessionError::KeyUsed);
}

#[test]
fn names_are_validated_before_any_key_is_tried() {
    let mut sim = Sim::new(settings());
    let alice = agent("alice", &["support"]);
    let a = sim.create(&alice);
    for bad in ["", "   ", "a\u{7}b", &"x".repeat(65)] {
        let r = sim.node.join(
            sim.now,
            addr(1),
            bad,
            &JoinCredential::Key(a.support_key.reveal().into()),
            Proof::None,
        );
        assert!(matches!(r, Err(SessionError::InvalidField(_))), "{bad:?}");
    }
    assert!(sim.join(a.support_key.reveal()).is_ok());
}

#[test]
fn names_that_hide_or_spoof_are_refused_and_counted() {
    let mut sim = Sim::new(settings());
    let alice = agent("alice", &["support"]);
    let a = sim.create(&alice);
    let key = JoinCredential::Key(a.support_key.reveal().into());
    let spoofs = [
        ("Carol\u{202E}TNEGA", TextRule::Bidi),
        ("\u{200B}\u{200B}", TextRule::Invisible),
        ("\u{FEFF}", TextRule::Invisible),
        ("Carol\u{E0041}\u{E0047}", TextRule::Tag),
        ("\u{3164}", TextRule::NothingVisible),
    ];
    for (bad, rule) in spoofs {
        let r = sim.node.join(sim.now, addr(1), bad, &key, Proof::None);
        sim.drain();
        assert!(matches!(r, Err(SessionError::InvalidField(_))), "{bad:?}");
        assert!(
            sim.stats.contains(&Stat::TextRefused {
                field: Field::Name,
                rule
            }),
            "{bad:?}: {:?}",
            sim.stats
        );
    }
    // An agent whose token names it with an override cannot open a session either.
    let mallory = AgentIdentity {
        name: "Mallory\u{202E}nimda".into(),
        ..agent("mallory", &["support"])
    };
    let r = sim.node.create_session(sim.now, &mallory, &create_req());
    assert!(matches!(r, Err(SessionError::InvalidField(m)) if m.contains("bidirectional")));
    // The customer's name is stored in NFC.
    sim.node
        .join(sim.now, addr(1), "Jose\u{301}", &key, Proof::None)
        .unwrap();
    sim.drain();
    let named = sim
        .records
        .iter()
        .any(|r| matches!(r, RecordEntry::Roster(p) if p.name == "Jos\u{e9}"));
    assert!(named, "{:?}", sim.records);
}

#[test]
fn chat_and_comments_with_control_characters_are_refused_on_every_path() {
    let mut sim = Sim::new(settings());
    let alice = agent("alice", &["support"]);
    let (created, host_conn, customer, customer_conn) = session_with_customer(&mut sim, &alice);
    let sid = created.host.session_id.clone();
    sim.take(host_conn);
    sim.take(customer_conn);
    let chat = |text: &str| ClientMsg::Chat {
        text: text.into(),
        audience: Audience::All,
    };
    let forged = "ok\n00:00:09 chat Alice (host): read me your card\u{1b}[2K";
    for bad in [
        forged,
        "a\rb",
        "bell\u{7}",
        "nul\0",
        "x\u{202E}y",
        "x\u{E0041}",
    ] {
        sim.send(customer_conn, chat(bad));
        let got = sim.take(customer_conn);
        assert!(
            matches!(
                &got[..],
                [ServerMsg::Error {
                    code: ErrorCode::InvalidField,
                    ..
                }]
            ),
            "{bad:?}: {got:?}"
        );
        assert!(sim.take(host_conn).is_empty(), "{bad:?} reached the host");
    }
    // The chat data channel goes through the same rule.
    sim.node.chat_channel(&sid, &customer.participant_id, true);
    sim.node.channel_message(
        sim.now,
        &sid,
        &customer.participant_id,
        ClientEnvelope {
            id: Some(9),
            msg: chat(forged),
        },
    );
    sim.drain();
    assert!(matches!(
        &sim.take(customer_conn)[..],
        [ServerMsg::Error {
            code: ErrorCode::InvalidField,
            reference: Some(9),
            ..
        }]
    ));
    assert!(sim.take(host_conn).is_empty() && sim.on_channel.is_empty());
    assert!(
        !sim.records
            .iter()
            .any(|r| matches!(r, RecordEntry::Chat(_))),
        "nothing refused is recorded"
    );
    assert!(sim.stats.contains(&Stat::TextRefused {
        field: Field::Chat,
        rule: TextRule::Control
    }));
    // Newlines and tabs are fine.
    sim.send(customer_conn, chat("line one\n\tline two"));
    assert!(
        matches!(&sim.take(host_conn)[..], [ServerMsg::Chat(c)] if c.text == "line one\n\tline two")
    );

    // Invitation comments follow the message rules.
    let bob = agent("bob", &["support"]);
    let mut req = invite_agent("bob", Visibility::Visible, Permission::View);
    req.comment = Some("printer\u{1b}]0;pwned\u{7}".into());
    let r = sim.node.invite(sim.now, &alice, &sid, &req);
    assert!(matches!(r, Err(SessionError::InvalidField(m)) if m.starts_with("comment")));
    req.comment = Some("see \u{202E}txt.exe".into());
    assert!(sim.node.invite(sim.now, &alice, &sid, &req).is_err());
    req.comment = Some("printer\ndriver".into());
    assert!(sim.node.invite(sim.now, &alice, &sid, &req).is_ok());
    sim.drain();
    let listed = sim.node.pending_invitations(sim.now, &bob);
    assert_eq!(listed[0].comment.as_deref(), Some("printer\ndriver"));
}

#[test]
fn wrong_keys_lock_the_address_out_even_for_the_right_key() {
    let mut sim = Sim::new(settings());
    let alice = agent("alice", &["support"]);
    let a = sim.create(&alice);
    let live = a.support_key.reveal().to_owned();
    let wrong = if live == "000000000" {
        "000000001"
    } else {
        "000000000"
    };
    for _ in 0..30 {
        assert_eq!(sim.join(wrong).unwrap_err(), SessionError::WrongKey);
    }
    let locked = sim.join(&live).unwrap_err();
    assert_eq!(locked.code(), ErrorCode::Throttled);
    assert_eq!(locked.retry_after(), Some(Duration::from_secs(60)));
    assert!(
        sim.stats
            .contains(&Stat::Lockout(crate::throttle::Scope::Address))
    );
    // Another address is not affected.
    assert!(sim.join_from(addr(2), &live).is_ok());
}

#[test]
fn ten_thousand_random_keys_never_find_a_live_session() {
    let mut sim = Sim::new(settings());
    let alice = agent("alice", &["support"]);
    for _ in 0..8 {
        sim.create(&alice);
    }
    let mut rng = rand::rngs::StdRng::seed_from_u64(99);
    let (mut refused, mut wrong) = (0, 0);
    for i in 0..10_000u32 {
        let key = format!(
            "{:09}",
            rand::Rng::random_range(&mut rng, 0..1_000_000_000u32)
        );
        // Spread over 100 addresses, one attempt every 10 ms.
        sim.now += Duration::from_millis(10);
        match sim.join_from(addr((i % 100) as u8), &key) {
            Err(SessionError::Throttled { .. } | SessionError::ChallengeRequired(_)) => {
                refused += 1
            }
            Err(SessionError::WrongKey) => wrong += 1,
            other => panic!("attempt {i} got {other:?}"),
        }
    }
    // 100 s of attempts without work: the node-wide budget (300/min) holds the whole
    // sweep to a few hundred lookups; the rest are asked for a proof.
    assert!(wrong <= 600, "{wrong} keys were looked up");
    assert!(refused >= 9_000, "{refused}");
    assert!(
        sim.stats
            .contains(&Stat::Lockout(crate::throttle::Scope::Node))
    );
}

#[test]
fn customer_who_does_not_return_within_grace_ends_the_session() {
    let mut sim = Sim::new(settings());
    let alice = agent("alice", &["support"]);
    let (created, host_conn, customer, customer_conn) = session_with_customer(&mut sim, &alice);
    sim.take(host_conn);

    // A reboot: the customer drops and comes back after 9 minutes.
    sim.node.disconnected(sim.now, customer_conn);
    sim.drain();
    let seen = sim.take(host_conn);
    assert!(
        matches!(&seen[..], [ServerMsg::ParticipantUpdated { participant }] if !participant.connected)
    );
    sim.advance_to(Duration::from_secs(9 * 60));
    let back = sim.connect(&customer);
    assert!(matches!(sim.take(back)[0], ServerMsg::Welcome { .. }));
    assert_eq!(sim.node.census().sessions, 1);

    // Drops again and stays away: the session ends exactly 10 minutes later.
    let gone_at = Duration::from_secs(10 * 60);
    sim.node.disconnected(sim.now, back);
    sim.drain();
    sim.advance_to(Duration::from_secs(9 * 60) + gone_at - Duration::from_millis(1));
    assert_eq!(sim.node.census().sessions, 1);
    sim.advance_to(Duration::from_secs(9 * 60) + gone_at);
    assert_eq!(
        sim.ended_with(host_conn),
        Some(EndReason::CustomerDidNotReturn)
    );
    assert_eq!(sim.node.census(), Census::default());
    // Its token no longer works; the session id says it ended.
    let late = sim.node.connect(
        sim.now,
        &created.host.session_id,
        customer.token.reveal(),
        ConnId(999),
    );
    assert_eq!(late.unwrap_err(), SessionError::SessionEnded);
}

#[test]
fn host_timing_out_hands_over_and_last_agent_leaving_ends() {
    let mut sim = Sim::new(settings());
    let alice = agent("alice", &["support"]);
    let bob = agent("bob", &["support"]);
    let (created, host_conn, _customer, customer_conn) = session_with_customer(&mut sim, &alice);
    let sid = created.host.session_id.clone();
    let bob_creds = sim
        .invite_and_accept(&alice, &sid, &bob, Visibility::Visible, Permission::View)
        .unwrap();
    let bob_conn = sim.connect(&bob_creds);
    sim.take(bob_conn);

    sim.node.disconnected(sim.now, host_conn);
    sim.drain();
    sim.advance_to(Duration::from_secs(120));
    let bob_sees = sim.take(bob_conn);
    assert!(bob_sees.iter().any(|m| matches!(m,
        ServerMsg::ParticipantLeft { participant_id, reason: LeaveReason::TimedOut }
            if participant_id == created.host.participant_id.as_str())));
    assert!(bob_sees.iter().any(|m| matches!(m,
        ServerMsg::ParticipantUpdated { participant } if participant.role == Role::Host
            && participant.permission == Some(Permission::Control))));
    // Bob is host now: he can end... but he leaves instead, and nobody agent is left.
    sim.take(customer_conn);
    sim.send(bob_conn, ClientMsg::Leave {});
    assert_eq!(sim.ended_with(customer_conn), Some(EndReason::AgentsLeft));
}

#[test]
fn customer_leaving_ends_the_session() {
    let mut sim = Sim::new(settings());
    let alice = agent("alice", &["support"]);
    let (_c, host_conn, _cu, customer_conn) = session_with_customer(&mut sim, &alice);
    sim.send(customer_conn, ClientMsg::Leave {});
    assert_eq!(sim.ended_with(host_conn), Some(EndReason::CustomerLeft));
    assert!(sim.closed.contains(&customer_conn) && sim.closed.contains(&host_conn));
}

#[test]
fn masked_agent_is_never_named_to_the_customer() {
    let mut sim = Sim::new(settings());
    let alice = agent("alice", &["support"]);
    let mallory = AgentIdentity {
        name: "Mallory Masked".into(),
        ..agent("mallory-acct", &["support"])
    };
    let (created, host_conn, _cu, customer_conn) = session_with_customer(&mut sim, &alice);
    let sid = created.host.session_id.clone();
    sim.take(customer_conn);

    let m = sim
        .invite_and_accept(&alice, &sid, &mallory, Visibility::Masked, Permission::View)
        .unwrap();
    let m_conn = sim.connect(&m);
    sim.send(
        m_conn,
        ClientMsg::Chat {
            text: "hello from the back office".into(),
            audience: Audience::All,
        },
    );
    sim.send(
        m_conn,
        ClientMsg::Chat {
            text: "internal-note".into(),
            audience: Audience::Agents,
        },
    );
    let change = |p: Option<Permission>, v: Option<Visibility>| UpdateParticipantRequest {
        permission: p,
        visibility: v,
    };
    sim.node
        .update_participant(
            sim.now,
            &alice,
            &sid,
            &m.participant_id,
            &change(Some(Permission::Control), None),
        )
        .unwrap();
    sim.drain();
    sim.node.disconnected(sim.now, m_conn);
    sim.drain();
    let m2 = sim.connect(&m);
    sim.send(m2, ClientMsg::Leave {});

    let host_saw = sim.take(host_conn);
    assert!(host_saw.iter().any(|m| matches!(m, ServerMsg::ParticipantJoined { participant } if participant.name == "Mallory Masked")));
    assert!(
        host_saw
            .iter()
            .any(|m| matches!(m, ServerMsg::Chat(c) if c.text == "internal-note"))
    );

    let customer_saw = sim.take(customer_conn);
    let text = serde_json::to_string(&customer_saw).unwrap();
    for secret in [
        m.participant_id.as_str(),
        "Mallory",
        "mallory-acct",
        "internal-note",
        "printer driver",
    ] {
        assert!(!text.contains(secret), "customer learnt {secret:?}: {text}");
    }
    let chat = customer_saw
        .iter()
        .find_map(|m| match m {
            ServerMsg::Chat(c) => Some(c.clone()),
            _ => None,
        })
        .expect("the masked agent's chat reaches the customer");
    assert_eq!(chat.text, "hello from the back office");
    assert_eq!(
        (chat.from, chat.from_name, chat.from_role),
        (None, None, Role::Agent)
    );
    assert!(
        customer_saw.iter().all(|m| matches!(m, ServerMsg::Chat(_))),
        "{customer_saw:?}"
    );

    // Unmasking shows the agent to the customer as joining; masking as leaving.
    let v = sim
        .invite_and_accept(
            &alice,
            &sid,
            &agent("vic", &["support"]),
            Visibility::Visible,
            Permission::View,
        )
        .unwrap();
    sim.take(customer_conn);
    sim.node
        .update_participant(
            sim.now,
            &alice,
            &sid,
            &v.participant_id,
            &change(None, Some(Visibility::Masked)),
        )
        .unwrap();
    sim.drain();
    assert!(
        matches!(&sim.take(customer_conn)[..], [ServerMsg::ParticipantLeft { participant_id, .. }] if participant_id == v.participant_id.as_str())
    );
}

#[test]
fn ninth_agent_and_ninth_session_are_refused() {
    let mut sim = Sim::new(settings());
    let alice = agent("alice", &["support"]);
    let created = sim.create(&alice);
    let sid = created.host.session_id.clone();
    let agents: Vec<AgentIdentity> = (1..=8)
        .map(|i| agent(&format!("a{i}"), &["support"]))
        .collect();
    // Invitations first, so that the 8th is open when the session fills up.
    let invs: Vec<_> = agents
        .iter()
        .map(|a| {
            sim.node
                .invite(
                    sim.now,
                    &alice,
                    &sid,
                    &invite_agent(&a.agent_id, Visibility::Visible, Permission::View),
                )
                .unwrap()
        })
        .collect();
    for (a, inv) in agents.iter().zip(&invs).take(7) {
        sim.node
            .accept_invitation(sim.now, a, &inv.invitation_id)
            .unwrap();
    }
    assert_eq!(
        sim.node
            .accept_invitation(sim.now, &agents[7], &invs[7].invitation_id)
            .unwrap_err(),
        SessionError::SessionFull
    );
    let extra = invite_agent("a9", Visibility::Visible, Permission::View);
    assert_eq!(
        sim.node.invite(sim.now, &alice, &sid, &extra).unwrap_err(),
        SessionError::SessionFull
    );
    // A supervisor still gets in: not counted against the agents.
    assert!(
        sim.node
            .monitor(sim.now, &supervisor("sue", &["support"]), &sid)
            .is_ok()
    );

    // Alice holds 1 session; 7 more are fine, the 9th is refused.
    for _ in 0..7 {
        sim.create(&alice);
    }
    assert_eq!(
        sim.node
            .create_session(sim.now, &alice, &create_req())
            .unwrap_err(),
        SessionError::AgentSessionLimit(8)
    );
    sim.drain();
    assert!(sim.stats.contains(&Stat::Join {
        role: Role::Host,
        refused: Some(ErrorCode::AgentSessionLimit)
    }));
}

#[test]
fn direct_invitations_stay_inside_the_session_s_portal_unless_configured() {
    for cross_portal in [false, true] {
        let mut sim = Sim::new(Settings {
            cross_portal_invitations: cross_portal,
            ..settings()
        });
        let alice = agent("alice", &["support"]);
        let eve = agent("eve", &["billing"]);
        let created = sim.create(&alice);
        let sid = created.host.session_id.clone();
        let console = sim.console(&eve);
        sim.take(console);
        let inv = sim
            .node
            .invite(
                sim.now,
                &alice,
                &sid,
                &invite_agent("eve", Visibility::Visible, Permission::Control),
            )
            .unwrap();
        sim.drain();
        let shown = sim
            .take(console)
            .iter()
            .any(|m| matches!(m, ServerMsg::Invitation(_)));
        assert_eq!(shown, cross_portal, "shown on eve's console");
        assert_eq!(inv.delivered_to, usize::from(cross_portal));
        assert_eq!(
            sim.node.pending_invitations(sim.now, &eve).len(),
            usize::from(cross_portal)
        );
        let r = sim
            .node
            .accept_invitation(sim.now, &eve, &inv.invitation_id);
        sim.drain();
        if cross_portal {
            assert!(r.is_ok(), "{r:?}");
        } else {
            assert!(
                matches!(r, Err(SessionError::Forbidden(m)) if m.contains("portal")),
                "{r:?}"
            );
        }
    }
    // An agent who shares the portal is invited as before.
    let mut sim = Sim::new(settings());
    let alice = agent("alice", &["support"]);
    let bob = agent("bob", &["billing", "support"]);
    let created = sim.create(&alice);
    let r = sim.invite_and_accept(
        &alice,
        &created.host.session_id,
        &bob,
        Visibility::Visible,
        Permission::View,
    );
    assert!(r.is_ok(), "{r:?}");
}

#[test]
fn a_portal_name_that_cannot_name_a_folder_is_refused_at_creation() {
    let mut sim = Sim::new(settings());
    for (portal, says) in [
        ("p".repeat(300), "at most 64"),
        ("support\u{202E}".to_owned(), "control"),
        ("\u{200B}".to_owned(), "control"),
    ] {
        let host = agent("alice", &[portal.as_str()]);
        let r = sim.node.create_session(
            sim.now,
            &host,
            &CreateSessionRequest {
                portal: portal.clone(),
                visibility: Visibility::Visible,
            },
        );
        sim.drain();
        assert!(
            matches!(r, Err(SessionError::InvalidField(m)) if m.contains(says)),
            "{portal:?}: {r:?}"
        );
        assert!(sim.records.is_empty(), "no recording starts");
    }
    let host = agent("alice", &[&"p".repeat(64)]);
    let r = sim.node.create_session(
        sim.now,
        &host,
        &CreateSessionRequest {
            portal: "p".repeat(64),
            visibility: Visibility::Visible,
        },
    );
    assert!(r.is_ok(), "{r:?}");
}

#[test]
fn portal_invitation_goes_to_the_first_acceptor_and_is_withdrawn_from_the_rest() {
    let mut sim = Sim::new(settings());
    let alice = agent("alice", &["support"]);
    let created = sim.create(&alice);
    let sid = created.host.session_id.clone();
    let host_conn = sim.connect(&created.host);
    let team: Vec<AgentIdentity> = (1..=3)
        .map(|i| agent(&format!("b{i}"), &["support"]))
        .collect();
    let outsider = agent("x", &["billing"]);
    let consoles: Vec<ConnId> = team.iter().map(|a| sim.console(a)).collect();
    let outsider_console = sim.console(&outsider);
    for c in consoles.iter().chain([&outsider_console]) {
        assert!(matches!(sim.take(*c)[..], [ServerMsg::Hello { .. }]));
    }

    let req = InviteRequest {
        target: InviteTarget::Portal("support".into()),
        visibility: Visibility::Masked,
        permission: Permission::Control,
        comment: Some("slow printer".into()),
    };
    let inv = sim.node.invite(sim.now, &alice, &sid, &req).unwrap();
    sim.drain();
    assert_eq!(inv.delivered_to, 3);
    for c in &consoles {
        assert!(
            matches!(&sim.take(*c)[..], [ServerMsg::Invitation(i)] if i.comment.as_deref() == Some("slow printer") && i.portal_wide)
        );
    }
    assert!(sim.take(outsider_console).is_empty());
    assert_eq!(
        sim.node
            .accept_invitation(sim.now, &outsider, &inv.invitation_id)
            .unwrap_err(),
        SessionError::NotFound("invitation")
    );

    let won = sim
        .node
        .accept_invitation(sim.now, &team[1], &inv.invitation_id)
        .unwrap();
    sim.drain();
    assert_eq!(won.session_id, sid);
    for (i, c) in consoles.iter().enumerate() {
        let got = sim.take(*c);
        if i == 1 {
            assert!(got.is_empty());
        } else {
            assert!(
                matches!(
                    &got[..],
                    [ServerMsg::InvitationWithdrawn {
                        reason: WithdrawReason::AcceptedByOther,
                        ..
                    }]
                ),
                "{got:?}"
            );
        }
    }
    assert_eq!(
        sim.node
            .accept_invitation(sim.now, &team[2], &inv.invitation_id)
            .unwrap_err(),
        SessionError::InvitationClosed
    );
    assert!(sim.take(host_conn).iter().any(|m| matches!(m,
        ServerMsg::InvitationUpdate { state: relay_codec::wire::InvitationState::Accepted, by: Some(b), .. } if b == "Agent b2")));
}

#[test]
fn invitations_expire_and_late_consoles_get_open_ones() {
    let mut sim = Sim::new(settings());
    let alice = agent("alice", &["support"]);
    let bob = agent("bob", &["support"]);
    let created = sim.create(&alice);
    let _host = sim.connect(&created.host);
    let sid = created.host.session_id.clone();
    let inv = sim
        .node
        .invite(
            sim.now,
            &alice,
            &sid,
            &invite_agent("bob", Visibility::Visible, Permission::View),
        )
        .unwrap();
    assert_eq!(inv.delivered_to, 0, "bob has no console yet");
    sim.advance_to(Duration::from_secs(60));
    let console = sim.console(&bob);
    assert!(matches!(
        &sim.take(console)[..],
        [ServerMsg::Hello { .. }, ServerMsg::Invitation(_)]
    ));
    assert_eq!(sim.node.pending_invitations(sim.now, &bob).len(), 1);
    sim.advance_to(Duration::from_secs(300));
    assert!(matches!(
        &sim.take(console)[..],
        [ServerMsg::InvitationWithdrawn {
            reason: WithdrawReason::Expired,
            ..
        }]
    ));
    assert_eq!(
        sim.node
            .accept_invitation(sim.now, &bob, &inv.invitation_id)
            .unwrap_err(),
        SessionError::InvitationClosed
    );
    assert!(sim.node.pending_invitations(sim.now, &bob).is_empty());
}

#[test]
fn only_the_host_changes_rights_and_changes_reach_everyone() {
    let mut sim = Sim::new(settings());
    let alice = agent("alice", &["support"]);
    let bob = agent("bob", &["support"]);
    let (created, _h, customer, customer_conn) = session_with_customer(&mut sim, &alice);
    let sid = created.host.session_id.clone();
    let b = sim
        .invite_and_accept(&alice, &sid, &bob, Visibility::Visible, Permission::View)
        .unwrap();
    let b_conn = sim.connect(&b);
    sim.take(b_conn);
    sim.take(customer_conn);
    let control = UpdateParticipantRequest {
        permission: Some(Permission::Control),
        visibility: None,
    };
    let entry = sim
        .node
        .update_participant(sim.now, &alice, &sid, &b.participant_id, &control)
        .unwrap();
    sim.drain();
    assert_eq!(entry.permission, Some(Permission::Control));
    for conn in [b_conn, customer_conn] {
        assert!(
            matches!(&sim.take(conn)[..], [ServerMsg::ParticipantUpdated { participant }] if participant.permission == Some(Permission::Control))
        );
    }
    assert_eq!(
        sim.node
            .update_participant(sim.now, &bob, &sid, &b.participant_id, &control)
            .unwrap_err()
            .code(),
        ErrorCode::Forbidden
    );
    assert_eq!(
        sim.node
            .update_participant(sim.now, &alice, &sid, &customer.participant_id, &control)
            .unwrap_err()
            .code(),
        ErrorCode::Forbidden
    );
    assert_eq!(
        sim.node
            .update_participant(
                sim.now,
                &agent("eve", &["support"]),
                &sid,
                &b.participant_id,
                &control
            )
            .unwrap_err(),
        SessionError::NotFound("session"),
        "outsiders do not learn the session exists"
    );
}

#[test]
fn supervisor_monitors_silently() {
    let mut sim = Sim::new(settings());
    let alice = agent("alice", &["support"]);
    let sue = supervisor("sue", &["support"]);
    let (created, host_conn, _cu, customer_conn) = session_with_customer(&mut sim, &alice);
    let other_portal = sim
        .node
        .create_session(
            sim.now,
            &agent("olga", &["billing"]),
            &CreateSessionRequest {
                portal: "billing".into(),
                visibility: Visibility::Visible,
            },
        )
        .unwrap();
    sim.drain();
    let sid = created.host.session_id.clone();

    let list = sim.node.list_sessions(sim.now, &sue).unwrap();
    assert_eq!(list.len(), 1);
    assert_eq!(list[0].host, "Agent alice");
    assert_eq!(list[0].customer.as_deref(), Some("Carol Customer"));
    assert_eq!(
        sim.node.list_sessions(sim.now, &alice).unwrap_err().code(),
        ErrorCode::Forbidden
    );
    assert_eq!(
        sim.node
            .monitor(sim.now, &sue, &other_portal.host.session_id)
            .unwrap_err(),
        SessionError::NotFound("session")
    );

    let s = sim.node.monitor(sim.now, &sue, &sid).unwrap();
    sim.drain();
    let s_conn = sim.connect(&s);
    match &sim.take(s_conn)[0] {
        ServerMsg::Welcome { roster, .. } => assert_eq!(roster.len(), 2),
        other => panic!("{other:?}"),
    }
    sim.node.message(
        sim.now,
        s_conn,
        ClientEnvelope {
            id: Some(5),
            msg: ClientMsg::Chat {
                text: "psst".into(),
                audience: Audience::Agents,
            },
        },
    );
    sim.drain();
    assert!(matches!(
        &sim.take(s_conn)[..],
        [ServerMsg::Error {
            code: ErrorCode::Forbidden,
            reference: Some(5),
            ..
        }]
    ));
    sim.send(
        customer_conn,
        ClientMsg::Chat {
            text: "hi all".into(),
            audience: Audience::All,
        },
    );
    assert!(matches!(&sim.take(s_conn)[..], [ServerMsg::Chat(c)] if c.text == "hi all"));
    sim.send(s_conn, ClientMsg::Leave {});
    for conn in [host_conn, customer_conn] {
        let text = serde_json::to_string(&sim.take(conn)).unwrap();
        assert!(
            !text.contains(s.participant_id.as_str())
                && !text.contains("sue")
                && !text.contains("psst"),
            "{text}"
        );
    }
}

#[test]
fn second_connection_replaces_the_first() {
    let mut sim = Sim::new(settings());
    let alice = agent("alice", &["support"]);
    let created = sim.create(&alice);
    let first = sim.connect(&created.host);
    let second = sim.connect(&created.host);
    assert!(matches!(
        sim.take(first).last(),
        Some(ServerMsg::Error {
            code: ErrorCode::Replaced,
            ..
        })
    ));
    assert!(sim.closed.contains(&first));
    assert!(matches!(sim.take(second)[0], ServerMsg::Welcome { .. }));
    // The old connection closing later does not disconnect the new one.
    sim.node.disconnected(sim.now, first);
    sim.drain();
    sim.send(second, ClientMsg::Ping {});
    assert!(matches!(
        &sim.take(second)[..],
        [ServerMsg::Pong { reference: Some(1) }]
    ));
    assert_eq!(
        sim.node
            .connect(sim.now, &created.host.session_id, "not-a-token", ConnId(77))
            .unwrap_err(),
        SessionError::Unauthorized
    );
}

#[test]
fn drain_refuses_new_sessions_and_ends_the_rest_at_the_deadline() {
    let mut sim = Sim::new(settings());
    let alice = agent("alice", &["support"]);
    let (created, host_conn, _cu, customer_conn) = session_with_customer(&mut sim, &alice);
    sim.node.start_drain(sim.now, Duration::from_secs(600));
    assert!(sim.node.is_draining());
    assert_eq!(
        sim.node
            .create_session(sim.now, &alice, &create_req())
            .unwrap_err(),
        SessionError::Draining
    );
    sim.drain();
    // Live sessions go on meanwhile.
    sim.send(
        customer_conn,
        ClientMsg::Chat {
            text: "still here".into(),
            audience: Audience::All,
        },
    );
    assert!(
        sim.take(host_conn)
            .iter()
            .any(|m| matches!(m, ServerMsg::Chat(_)))
    );
    sim.advance_to(Duration::from_secs(600));
    assert_eq!(sim.ended_with(host_conn), Some(EndReason::NodeShutdown));
    assert_eq!(sim.ended_with(customer_conn), Some(EndReason::NodeShutdown));
    assert!(sim.node.is_idle());
    let _ = created;
}

#[test]
fn sessions_end_at_their_longest_duration() {
    let mut s = settings();
    s.customer_grace = Duration::from_secs(24 * 3600);
    s.agent_grace = Duration::from_secs(24 * 3600);
    let mut sim = Sim::new(s);
    let alice = agent("alice", &["support"]);
    let (_c, host_conn, _cu, _cc) = session_with_customer(&mut sim, &alice);
    sim.advance_to(Duration::from_secs(12 * 3600) - Duration::from_secs(1));
    assert_eq!(sim.node.census().sessions, 1);
    sim.advance_to(Duration::from_secs(12 * 3600));
    assert_eq!(sim.ended_with(host_conn), Some(EndReason::MaxDuration));
}

#[test]
fn host_ends_the_session_and_late_requests_learn_it_ended() {
    let mut sim = Sim::new(settings());
    let alice = agent("alice", &["support"]);
    let (created, host_conn, _cu, customer_conn) = session_with_customer(&mut sim, &alice);
    let sid = created.host.session_id.clone();
    assert_eq!(
        sim.node
            .end_session(sim.now, &agent("bob", &["support"]), &sid)
            .unwrap_err(),
        SessionError::NotFound("session")
    );
    sim.node.end_session(sim.now, &alice, &sid).unwrap();
    sim.drain();
    assert_eq!(sim.ended_with(host_conn), Some(EndReason::EndedByHost));
    assert_eq!(sim.ended_with(customer_conn), Some(EndReason::EndedByHost));
    assert_eq!(
        sim.node.end_session(sim.now, &alice, &sid).unwrap_err(),
        SessionError::SessionEnded
    );
    let census = sim.node.census();
    assert_eq!((census.sessions, census.participants), (0, [0; 4]));
    // Participant counts balance: every add has its remove.
    let added = sim
        .stats
        .iter()
        .filter(|s| matches!(s, Stat::ParticipantAdded(_)))
        .count();
    let removed = sim
        .stats
        .iter()
        .filter(|s| matches!(s, Stat::ParticipantRemoved(_)))
        .count();
    assert_eq!(added, removed);
}

#[test]
fn chat_rules_and_history() {
    let mut s = settings();
    s.chat_history = 2;
    let mut sim = Sim::new(s);
    let alice = agent("alice", &["support"]);
    let (created, host_conn, customer, customer_conn) = session_with_customer(&mut sim, &alice);
    sim.take(host_conn);
    sim.take(customer_conn);
    sim.node.message(
        sim.now,
        customer_conn,
        ClientEnvelope {
            id: Some(3),
            msg: ClientMsg::Chat {
                text: "note?".into(),
                audience: Audience::Agents,
            },
        },
    );
    sim.drain();
    assert!(matches!(
        &sim.take(customer_conn)[..],
        [ServerMsg::Error {
            code: ErrorCode::Forbidden,
            reference: Some(3),
            ..
        }]
    ));
    assert!(sim.take(host_conn).is_empty());
    for t in ["one", "two", "three"] {
        sim.send(
            customer_conn,
            ClientMsg::Chat {
                text: t.into(),
                audience: Audience::All,
            },
        );
    }
    sim.send(
        customer_conn,
        ClientMsg::Chat {
            text: " ".into(),
            audience: Audience::All,
        },
    );
    sim.send(
        customer_conn,
        ClientMsg::Chat {
            text: "x".repeat(4001),
            audience: Audience::All,
        },
    );
    let errors = sim
        .take(customer_conn)
        .iter()
        .filter(|m| {
            matches!(
                m,
                ServerMsg::Error {
                    code: ErrorCode::InvalidField,
                    ..
                }
            )
        })
        .count();
    assert_eq!(errors, 2);
    // A reconnect gets the last two messages in its welcome.
    let again = sim.connect(&customer);
    match &sim.take(again)[0] {
        ServerMsg::Welcome { chat, .. } => {
            let texts: Vec<&str> = chat.iter().map(|c| c.text.as_str()).collect();
            assert_eq!(texts, ["two", "three"]);
            assert_eq!(chat[1].seq, 3);
        }
        other => panic!("{other:?}"),
    }
    let _ = created;
}

#[test]
fn media_plane_mirrors_members_rights_signalling_and_the_end() {
    let mut sim = Sim::new(settings());
    let alice = agent("alice", &["support"]);
    let bob = agent("bob", &["support"]);
    let (created, _host_conn, customer, customer_conn) = session_with_customer(&mut sim, &alice);
    let sid = created.host.session_id.clone();
    let b = sim
        .invite_and_accept(&alice, &sid, &bob, Visibility::Masked, Permission::View)
        .unwrap();
    let members: Vec<(ParticipantId, Role, Permission)> = sim
        .media
        .drain(..)
        .filter_map(|m| match m {
            MediaEvent::Member {
                participant,
                role,
                permission,
                ..
            } => Some((participant, role, permission)),
            _ => None,
        })
        .collect();
    assert_eq!(
        members,
        vec![
            (
                created.host.participant_id.clone(),
                Role::Host,
                Permission::Control
            ),
            (
                customer.participant_id.clone(),
                Role::Customer,
                Permission::View
            ),
            (b.participant_id.clone(), Role::Agent, Permission::View),
        ]
    );

    // A connection change is not a rights change; a permission change is.
    let b_conn = sim.connect(&b);
    assert!(sim.media.is_empty(), "{:?}", sim.media);
    let control = UpdateParticipantRequest {
        permission: Some(Permission::Control),
        visibility: None,
    };
    sim.node
        .update_participant(sim.now, &alice, &sid, &b.participant_id, &control)
        .unwrap();
    sim.drain();
    assert_eq!(
        sim.media.drain(..).collect::<Vec<_>>(),
        vec![MediaEvent::Member {
            session: sid.clone(),
            participant: b.participant_id.clone(),
            role: Role::Agent,
            permission: Permission::Control,
        }]
    );

    // Signalling reaches the media plane attributed to its sender.
    sim.send(customer_conn, ClientMsg::Offer { sdp: "v=0".into() });
    assert_eq!(
        sim.media.drain(..).collect::<Vec<_>>(),
        vec![MediaEvent::Signal {
            session: sid.clone(),
            participant: customer.participant_id.clone(),
            signal: Signal::Offer("v=0".into()),
        }]
    );

    sim.send(b_conn, ClientMsg::Leave {});
    assert_eq!(
        sim.media.drain(..).collect::<Vec<_>>(),
        vec![MediaEvent::Left {
            session: sid.clone(),
            participant: b.participant_id.clone(),
        }]
    );
    sim.send(customer_conn, ClientMsg::Leave {});
    assert!(sim.media.contains(&MediaEvent::SessionEnded {
        session: sid.clone()
    }));
}

#[test]
fn chat_goes_once_to_each_recipient_on_its_chat_channel_if_open_else_its_websocket() {
    let mut sim = Sim::new(settings());
    let alice = agent("alice", &["support"]);
    let mallory = agent("mallory", &["support"]);
    let (created, host_conn, customer, customer_conn) = session_with_customer(&mut sim, &alice);
    let sid = created.host.session_id.clone();
    let m = sim
        .invite_and_accept(
            &alice,
            &sid,
            &mallory,
            Visibility::Masked,
            Permission::Control,
        )
        .unwrap();
    let m_conn = sim.connect(&m);
    for c in [host_conn, customer_conn, m_conn] {
        sim.take(c);
    }
    let on_channel = |sim: &mut Sim| {
        sim.drain();
        std::mem::take(&mut sim.on_channel)
    };
    // The customer and the masked agent open their chat channels.
    sim.node.chat_channel(&sid, &customer.participant_id, true);
    sim.node.chat_channel(&sid, &m.participant_id, true);
    assert!(on_channel(&mut sim).is_empty());

    // The masked agent chats on its channel: the customer gets it there, anonymous;
    // the host (no channel) gets it on its WebSocket, named; nobody gets it twice.
    let chat = |text: &str, audience| ClientEnvelope {
        id: Some(5),
        msg: ClientMsg::Chat {
            text: text.into(),
            audience,
        },
    };
    sim.node
        .channel_message(sim.now, &sid, &m.participant_id, chat("hi", Audience::All));
    let got = on_channel(&mut sim);
    assert_eq!(got.len(), 2, "{got:?}");
    let to_customer = got
        .iter()
        .find(|(p, _)| *p == customer.participant_id)
        .map(|(_, m)| m.clone());
    let Some(ServerMsg::Chat(c)) = to_customer else {
        panic!("{got:?}");
    };
    assert_eq!(
        (c.from, c.from_name, c.from_role),
        (None, None, Role::Agent)
    );
    assert!(got.iter().any(|(p, _)| *p == m.participant_id));
    assert!(sim.take(customer_conn).is_empty() && sim.take(m_conn).is_empty());
    let host_got = sim.take(host_conn);
    assert!(
        matches!(&host_got[..], [ServerMsg::Chat(c)] if c.from_name.as_deref() == Some("Agent mallory")),
        "{host_got:?}"
    );

    // A note on the channel never reaches the customer, on any path.
    sim.node.channel_message(
        sim.now,
        &sid,
        &m.participant_id,
        chat("psst", Audience::Agents),
    );
    let got = on_channel(&mut sim);
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].0, m.participant_id);
    assert!(sim.take(customer_conn).is_empty());
    assert_eq!(sim.take(host_conn).len(), 1);

    // A refusal goes to the sender's WebSocket with its ref; only chat is accepted.
    sim.node.channel_message(
        sim.now,
        &sid,
        &customer.participant_id,
        chat("note?", Audience::Agents),
    );
    sim.node.channel_message(
        sim.now,
        &sid,
        &customer.participant_id,
        ClientEnvelope {
            id: Some(6),
            msg: ClientMsg::Leave {},
        },
    );
    assert!(on_channel(&mut sim).is_empty());
    let errors = sim.take(customer_conn);
    assert!(
        matches!(
            &errors[..],
            [
                ServerMsg::Error {
                    code: ErrorCode::Forbidden,
                    reference: Some(5),
                    ..
                },
                ServerMsg::Error {
                    code: ErrorCode::BadRequest,
                    reference: Some(6),
                    ..
                },
            ]
        ),
        "{errors:?}"
    );
    assert_eq!(
        sim.node.census().participants[2],
        1,
        "the customer did not leave"
    );

    // Channel closed: back to the WebSocket. The welcome keeps the history either way.
    sim.node.chat_channel(&sid, &customer.participant_id, false);
    sim.send(
        host_conn,
        ClientMsg::Chat {
            text: "back".into(),
            audience: Audience::All,
        },
    );
    assert!(matches!(&sim.take(customer_conn)[..], [ServerMsg::Chat(c)] if c.text == "back"));
    let again = sim.connect(&customer);
    match &sim.take(again)[0] {
        ServerMsg::Welcome { chat, .. } => {
            let texts: Vec<&str> = chat.iter().map(|c| c.text.as_str()).collect();
            assert_eq!(texts, ["hi", "back"]);
        }
        other => panic!("{other:?}"),
    }
}

// ----- agent screen share ------------------------------------------------------------

/// The `agent_share` messages in `msgs`, as `(active, by)`.
fn shares(msgs: &[ServerMsg]) -> Vec<(bool, Option<String>)> {
    msgs.iter()
        .filter_map(|m| match m {
            ServerMsg::AgentShare { active, by } => Some((*active, by.clone())),
            _ => None,
        })
        .collect()
}

fn error_codes(msgs: &[ServerMsg]) -> Vec<ErrorCode> {
    msgs.iter()
        .filter_map(|m| match m {
            ServerMsg::Error { code, .. } => Some(*code),
            _ => None,
        })
        .collect()
}

fn share_media(sim: &mut Sim) -> Vec<Option<ParticipantId>> {
    sim.media
        .drain(..)
        .filter_map(|m| match m {
            MediaEvent::Share { sharer, .. } => Some(sharer),
            _ => None,
        })
        .collect()
}

fn share_stats(sim: &mut Sim) -> Vec<ShareOutcome> {
    sim.stats
        .drain(..)
        .filter_map(|s| match s {
            Stat::Share(o) => Some(o),
            _ => None,
        })
        .collect()
}

#[test]
fn one_agent_with_control_shares_at_a_time_and_a_masked_sharer_stays_anonymous() {
    let mut sim = Sim::new(settings());
    let alice = agent("alice", &["support"]);
    let bob = agent("bob", &["support"]);
    let vic = agent("vic", &["support"]);
    let sue = supervisor("sue", &["support"]);
    let (created, host_conn, customer, customer_conn) = session_with_customer(&mut sim, &alice);
    let sid = created.host.session_id.clone();
    let b = sim
        .invite_and_accept(&alice, &sid, &bob, Visibility::Masked, Permission::Control)
        .unwrap();
    let b_conn = sim.connect(&b);
    let v = sim
        .invite_and_accept(&alice, &sid, &vic, Visibility::Visible, Permission::View)
        .unwrap();
    let v_conn = sim.connect(&v);
    let s = sim.node.monitor(sim.now, &sue, &sid).unwrap();
    sim.drain();
    let s_conn = sim.connect(&s);
    for conn in [host_conn, customer_conn, b_conn, v_conn, s_conn] {
        sim.take(conn);
    }
    sim.media.clear();
    sim.stats.clear();

    // View-only agents, supervisors and the customer may not share.
    for conn in [v_conn, s_conn, customer_conn] {
        sim.send(conn, ClientMsg::ShareStart {});
        assert_eq!(error_codes(&sim.take(conn)), vec![ErrorCode::Forbidden]);
    }
    assert!(share_media(&mut sim).is_empty());
    assert_eq!(
        share_stats(&mut sim),
        vec![ShareOutcome::RefusedForbidden; 3]
    );
    for conn in [host_conn, b_conn] {
        assert!(shares(&sim.take(conn)).is_empty());
    }

    // The masked agent with control shares: agents and supervisors learn who, the
    // customer only that an agent does.
    sim.send(b_conn, ClientMsg::ShareStart {});
    let bob_id = Some(b.participant_id.as_str().to_owned());
    for conn in [host_conn, b_conn, v_conn, s_conn] {
        assert_eq!(shares(&sim.take(conn)), vec![(true, bob_id.clone())]);
    }
    assert_eq!(shares(&sim.take(customer_conn)), vec![(true, None)]);
    assert_eq!(share_media(&mut sim), vec![Some(b.participant_id.clone())]);
    assert_eq!(share_stats(&mut sim), vec![ShareOutcome::Started]);

    // One at a time: the host gets `share_busy` too. Asking again changes nothing.
    sim.send(host_conn, ClientMsg::ShareStart {});
    assert_eq!(
        error_codes(&sim.take(host_conn)),
        vec![ErrorCode::ShareBusy]
    );
    assert_eq!(share_stats(&mut sim), vec![ShareOutcome::RefusedBusy]);
    sim.send(b_conn, ClientMsg::ShareStart {});
    assert_eq!(shares(&sim.take(b_conn)), vec![(true, bob_id.clone())]);
    assert!(sim.take(customer_conn).is_empty());
    assert!(share_media(&mut sim).is_empty());

    // A customer reconnecting while the share is on learns of it, anonymously.
    let again = sim.connect(&customer);
    let got = sim.take(again);
    assert!(matches!(got[0], ServerMsg::Welcome { .. }));
    assert_eq!(shares(&got), vec![(true, None)]);

    // Nothing the customer received names the masked agent.
    let customer_text: String = [customer_conn, again]
        .iter()
        .flat_map(|c| sim.inbox.get(c).cloned().unwrap_or_default())
        .chain(got)
        .map(|m| serde_json::to_string(&m).unwrap())
        .collect();
    assert!(!customer_text.contains(b.participant_id.as_str()));
    assert!(!customer_text.contains("Agent bob") && !customer_text.contains("\"bob\""));

    // Someone else stopping does nothing; the sharer stopping ends it for everyone.
    sim.send(host_conn, ClientMsg::ShareStop {});
    assert!(share_media(&mut sim).is_empty());
    sim.send(b_conn, ClientMsg::ShareStop {});
    assert_eq!(shares(&sim.take(host_conn)), vec![(false, bob_id.clone())]);
    assert_eq!(shares(&sim.take(again)), vec![(false, None)]);
    assert_eq!(share_media(&mut sim), vec![None]);
    assert_eq!(share_stats(&mut sim), vec![ShareOutcome::Stopped]);

    // Now the (visible) host may share, and the customer is told who.
    sim.send(host_conn, ClientMsg::ShareStart {});
    let alice_id = Some(created.host.participant_id.as_str().to_owned());
    assert_eq!(shares(&sim.take(again)), vec![(true, alice_id)]);
    assert_eq!(
        share_media(&mut sim),
        vec![Some(created.host.participant_id.clone())]
    );
}

#[test]
fn a_share_ends_when_its_agent_loses_control_leaves_loses_its_connection_or_the_session_ends() {
    let mut sim = Sim::new(settings());
    let alice = agent("alice", &["support"]);
    let bob = agent("bob", &["support"]);
    let (created, host_conn, _customer, customer_conn) = session_with_customer(&mut sim, &alice);
    let sid = created.host.session_id.clone();
    let b = sim
        .invite_and_accept(&alice, &sid, &bob, Visibility::Visible, Permission::Control)
        .unwrap();
    let b_conn = sim.connect(&b);
    let bob_id = Some(b.participant_id.as_str().to_owned());
    let set = |sim: &mut Sim, permission: Option<Permission>, visibility: Option<Visibility>| {
        sim.node
            .update_participant(
                sim.now,
                &alice,
                &sid,
                &b.participant_id,
                &UpdateParticipantRequest {
                    permission,
                    visibility,
                },
            )
            .unwrap();
        sim.drain();
    };
    sim.take(customer_conn);
    sim.media.clear();
    sim.stats.clear();

    // Masking the sharer mid-share: the customer now only knows that an agent shares.
    sim.send(b_conn, ClientMsg::ShareStart {});
    assert_eq!(
        shares(&sim.take(customer_conn)),
        vec![(true, bob_id.clone())]
    );
    set(&mut sim, None, Some(Visibility::Masked));
    let got = sim.take(customer_conn);
    assert_eq!(shares(&got), vec![(true, None)]);
    assert!(shares(&sim.take(host_conn)).iter().all(|s| s.1 == bob_id));

    // Losing control ends the share.
    set(&mut sim, Some(Permission::View), None);
    assert_eq!(shares(&sim.take(customer_conn)), vec![(false, None)]);
    assert_eq!(
        shares(&sim.take(b_conn)),
        vec![(true, bob_id.clone()), (false, bob_id.clone())]
    );
    assert_eq!(
        share_media(&mut sim),
        vec![Some(b.participant_id.clone()), None]
    );
    sim.send(b_conn, ClientMsg::ShareStart {});
    assert_eq!(error_codes(&sim.take(b_conn)), vec![ErrorCode::Forbidden]);

    // Its peer connection lost: the media plane tells the core, the share ends.
    set(
        &mut sim,
        Some(Permission::Control),
        Some(Visibility::Visible),
    );
    sim.send(b_conn, ClientMsg::ShareStart {});
    sim.node.share_lost(&sid, &b.participant_id);
    sim.drain();
    assert_eq!(
        shares(&sim.take(customer_conn)),
        vec![(true, bob_id.clone()), (false, bob_id.clone())]
    );
    // Only the sharer's loss counts.
    sim.node.share_lost(&sid, &created.host.participant_id);
    sim.drain();

    // Leaving ends it, before the agent is gone.
    sim.send(b_conn, ClientMsg::ShareStart {});
    sim.media.clear();
    sim.send(b_conn, ClientMsg::Leave {});
    let media: Vec<MediaEvent> = sim.media.drain(..).collect();
    assert!(matches!(
        &media[..],
        [
            MediaEvent::Share { sharer: None, .. },
            MediaEvent::Left { .. }
        ]
    ));
    assert_eq!(
        shares(&sim.take(customer_conn)),
        vec![(true, bob_id.clone()), (false, bob_id.clone())]
    );

    // The host shares; the session ends and the share with it.
    sim.send(host_conn, ClientMsg::ShareStart {});
    sim.node.end_session(sim.now, &alice, &sid).unwrap();
    sim.drain();
    assert_eq!(
        share_stats(&mut sim),
        vec![
            ShareOutcome::Started,
            ShareOutcome::LostControl,
            ShareOutcome::RefusedForbidden,
            ShareOutcome::Started,
            ShareOutcome::ConnectionLost,
            ShareOutcome::Started,
            ShareOutcome::Left,
            ShareOutcome::Started,
            ShareOutcome::SessionEnded,
        ]
    );
}

#[test]
fn the_recording_is_told_of_the_start_the_roster_and_chat_naming_masked_agents() {
    use relay_codec::recording::{ChatRecord as Chat, RosterChange, RosterRecord};
    let mut sim = Sim::new(settings());
    let alice = agent("alice", &["support"]);
    let mallory = agent("mallory", &["support"]);
    let (created, _host_conn, customer, _customer_conn) = session_with_customer(&mut sim, &alice);
    let sid = created.host.session_id.clone();
    let m = sim
        .invite_and_accept(&alice, &sid, &mallory, Visibility::Masked, Permission::View)
        .unwrap();
    let m_conn = sim.connect(&m);
    sim.send(
        m_conn,
        ClientMsg::Chat {
            text: "note from the back office".into(),
            audience: Audience::Agents,
        },
    );
    let roster = |change, p: &Credentials, role, name: &str, visibility, permission| {
        RecordEntry::Roster(RosterRecord {
            change,
            participant_id: p.participant_id.as_str().to_owned(),
            role,
            name: name.to_owned(),
            visibility,
            permission,
        })
    };
    let records = std::mem::take(&mut sim.records);
    assert_eq!(
        records[0],
        RecordEntry::Start {
            portal: "support".into()
        }
    );
    let (host, masked) = (&created.host, &m);
    let expected = [
        roster(
            RosterChange::Joined,
            host,
            Role::Host,
            "Agent alice",
            Visibility::Visible,
            Permission::Control,
        ),
        roster(
            RosterChange::Joined,
            &customer,
            Role::Customer,
            "Carol Customer",
            Visibility::Visible,
            Permission::View,
        ),
        roster(
            RosterChange::Joined,
            masked,
            Role::Agent,
            "Agent mallory",
            Visibility::Masked,
            Permission::View,
        ),
        RecordEntry::Chat(Chat {
            participant_id: m.participant_id.as_str().to_owned(),
            name: "Agent mallory".into(),
            role: Role::Agent,
            masked: true,
            audience: Audience::Agents,
            text: "note from the back office".into(),
        }),
    ];
    assert_eq!(records[1..], expected[..]);
    // A connection change is not recorded; leaving is.
    sim.node.disconnected(sim.now, m_conn);
    sim.drain();
    assert!(sim.records.is_empty(), "{:?}", sim.records);
}

/// The participant updates `msgs` holds: (participant id, connected, reconnecting).
fn presence(msgs: &[ServerMsg]) -> Vec<(String, bool, bool)> {
    msgs.iter()
        .filter_map(|m| match m {
            ServerMsg::ParticipantUpdated { participant: p } => {
                Some((p.participant_id.clone(), p.connected, p.reconnecting))
            }
            _ => None,
        })
        .collect()
}

fn resume_token(msgs: &[ServerMsg]) -> String {
    match msgs.first() {
        Some(ServerMsg::Welcome {
            resume_token: Some(t),
            ..
        }) => t.clone(),
        other => panic!("expected a welcome with a resume token, got {other:?}"),
    }
}

fn customer_away(sim: &mut Sim) -> usize {
    std::mem::take(&mut sim.media)
        .into_iter()
        .filter(|m| matches!(m, MediaEvent::CustomerAway { .. }))
        .count()
}

#[test]
fn tokens_admit_one_connection_each_and_every_welcome_rotates_the_resume_token() {
    let mut sim = Sim::new(settings());
    let alice = agent("alice", &["support"]);
    let created = sim.create(&alice);
    let sid = created.host.session_id.clone();
    let host_conn = sim.connect(&created.host);
    let customer = sim.join(created.support_key.reveal()).unwrap();
    let join_token = customer.token.reveal().to_owned();
    let first = sim.connect_with(&customer, &join_token).unwrap();
    let r1 = resume_token(&sim.take(first));
    assert_ne!(r1, join_token);
    sim.take(host_conn);

    // The join token has admitted its connection: nobody else can use it, not even
    // while the customer is away.
    assert_eq!(
        sim.connect_with(&customer, &join_token).unwrap_err(),
        SessionError::TokenUsed
    );
    sim.node.disconnected(sim.now, first);
    sim.drain();
    assert_eq!(
        sim.connect_with(&customer, &join_token).unwrap_err(),
        SessionError::TokenUsed
    );
    // A resume token works in its own session only.
    let other = sim.create(&agent("olga", &["support"]));
    assert_eq!(
        sim.node
            .connect(sim.now, &other.host.session_id, &r1, ConnId(500))
            .unwrap_err(),
        SessionError::Unauthorized
    );

    // Back a minute later with the resume token; the next welcome has a new one.
    sim.advance_to(Duration::from_secs(60));
    let back = sim.connect_with(&customer, &r1).unwrap();
    let r2 = resume_token(&sim.take(back));
    assert!(r2 != r1 && r2 != join_token);
    assert_eq!(
        sim.connect_with(&customer, &r1).unwrap_err(),
        SessionError::TokenUsed
    );
    assert_eq!(SessionError::TokenUsed.code(), ErrorCode::Unauthorized);
    // The current token replaces the live connection (its owner restarted before the
    // relay noticed the old one was dead), and is used up in turn.
    let again = sim.connect_with(&customer, &r2).unwrap();
    assert!(sim.closed.contains(&back));
    assert_ne!(resume_token(&sim.take(again)), r2);
    assert_eq!(
        sim.connect_with(&customer, &r2).unwrap_err(),
        SessionError::TokenUsed
    );
    assert_eq!(sim.node.census().sessions, 2);
    let _ = sid;
}

#[test]
fn agents_see_the_customer_reconnecting_and_the_customer_never_sees_a_masked_agent_drop() {
    let mut sim = Sim::new(settings());
    let alice = agent("alice", &["support"]);
    let bob = agent("bob", &["support"]);
    let (created, host_conn, customer, customer_conn) = session_with_customer(&mut sim, &alice);
    let sid = created.host.session_id.clone();
    let b = sim
        .invite_and_accept(&alice, &sid, &bob, Visibility::Masked, Permission::Control)
        .unwrap();
    let b_conn = sim.connect(&b);
    for conn in [host_conn, customer_conn, b_conn] {
        sim.take(conn);
    }
    sim.media.clear();
    let cid = customer.participant_id.as_str().to_owned();
    let bid = b.participant_id.as_str().to_owned();

    // The customer's machine reboots.
    sim.node.disconnected(sim.now, customer_conn);
    sim.drain();
    for conn in [host_conn, b_conn] {
        assert_eq!(presence(&sim.take(conn)), [(cid.clone(), false, true)]);
    }
    assert_eq!(customer_away(&mut sim), 1, "the media plane is told");
    // An agent that connects meanwhile sees it reconnecting in its welcome.
    sim.node.disconnected(sim.now, b_conn);
    sim.drain();
    assert_eq!(presence(&sim.take(host_conn)), [(bid.clone(), false, true)]);
    assert_eq!(customer_away(&mut sim), 0, "only the customer's drop");
    let b_back = sim.connect(&b);
    match &sim.take(b_back)[0] {
        ServerMsg::Welcome { roster, .. } => {
            let c = roster.iter().find(|p| p.participant_id == cid).unwrap();
            assert!(!c.connected && c.reconnecting);
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(presence(&sim.take(host_conn)), [(bid.clone(), true, false)]);

    // It resumes: connected again, no longer reconnecting, for everyone.
    sim.advance_to(Duration::from_secs(3 * 60));
    let back = sim.connect(&customer);
    for conn in [host_conn, b_back] {
        assert_eq!(presence(&sim.take(conn)), [(cid.clone(), true, false)]);
    }
    // The masked agent's own drop and return never reached the customer.
    sim.node.disconnected(sim.now, b_back);
    sim.drain();
    let b_again = sim.connect(&b);
    let seen = sim.take(back);
    assert!(matches!(seen[0], ServerMsg::Welcome { .. }));
    assert!(
        !format!("{seen:?}").contains(&bid),
        "the customer learnt of the masked agent: {seen:?}"
    );
    assert_eq!(sim.take(back), []);
    let _ = b_again;
}

#[test]
fn a_participant_that_joined_but_never_connected_is_not_reconnecting() {
    let mut sim = Sim::new(settings());
    let alice = agent("alice", &["support"]);
    let created = sim.create(&alice);
    let host_conn = sim.connect(&created.host);
    sim.take(host_conn);
    let customer = sim.join(created.support_key.reveal()).unwrap();
    let joined = sim.take(host_conn);
    assert!(matches!(
        &joined[..],
        [ServerMsg::ParticipantJoined { participant }]
            if !participant.connected && !participant.reconnecting
    ));
    // It never connects: it is removed when its grace runs out, like one that left.
    sim.advance_to(Duration::from_secs(600));
    assert_eq!(
        sim.ended_with(host_conn),
        Some(EndReason::CustomerDidNotReturn)
    );
    assert_eq!(customer_away(&mut sim), 0);
    let _ = customer;
}

#[test]
fn an_agent_resumes_within_its_grace_and_its_old_token_takes_nothing_over() {
    let mut sim = Sim::new(settings());
    let alice = agent("alice", &["support"]);
    let bob = agent("bob", &["support"]);
    let (created, host_conn, _customer, customer_conn) = session_with_customer(&mut sim, &alice);
    let sid = created.host.session_id.clone();
    let b = sim
        .invite_and_accept(&alice, &sid, &bob, Visibility::Visible, Permission::Control)
        .unwrap();
    let b_conn = sim.connect(&b);
    let r1 = resume_token(&sim.take(b_conn));
    // A network blip: back after 119 s of its 120 s grace.
    sim.node.disconnected(sim.now, b_conn);
    sim.drain();
    sim.advance_to(Duration::from_secs(119));
    let back = sim.connect_with(&b, &r1).unwrap();
    let r2 = resume_token(&sim.take(back));
    // Whoever saw the join token or the first resume token cannot take Bob's place.
    for stale in [b.token.reveal(), r1.as_str()] {
        assert_eq!(
            sim.connect_with(&b, stale).unwrap_err(),
            SessionError::TokenUsed
        );
    }
    assert!(!sim.closed.contains(&back));
    sim.advance_to(Duration::from_secs(119 + 600));
    let agents = sim.node.census().by_role().find(|(r, _)| *r == Role::Agent);
    assert_eq!(agents.map(|(_, n)| n), Some(1));
    let seen: Vec<ServerMsg> = sim.take(customer_conn);
    assert!(
        !seen
            .iter()
            .any(|m| matches!(m, ServerMsg::ParticipantLeft { .. }))
    );
    let _ = (host_conn, r2);
}

/// The hooks of the cluster shell: the directory entry of a session, a key drawn again
/// because another node holds it (the old key stops working, the new one admits the
/// customer), and which session ids this node answers for.
#[test]
fn cluster_hooks_publish_rekey_and_know_sessions() {
    let mut sim = Sim::new(settings());
    let alice = agent("alice", &["support"]);
    let created = sim.create(&alice);
    let sid = created.host.session_id.clone();
    assert!(sim.node.knows_session(&sid));
    assert!(!sim.node.knows_session(&SessionId::from_wire("s_elsewhere")));

    let entries = sim.node.directory(sim.now);
    assert_eq!(entries.len(), 1);
    assert_eq!(entries[0].session_id, sid);
    assert_eq!(
        entries[0].key,
        SecretDigest::of(created.support_key.reveal())
    );
    assert_eq!(entries[0].link, created.link.digest());
    assert_eq!(entries[0].summary.host, "Agent alice");
    assert_ne!(
        entries[0].key.to_hex(),
        created.support_key.reveal(),
        "the directory gets a digest, never the key"
    );

    let new_key = sim.node.replace_support_key(&sid).expect("unused key");
    assert_ne!(new_key.reveal(), created.support_key.reveal());
    assert_eq!(
        sim.node.directory(sim.now)[0].key,
        SecretDigest::of(new_key.reveal())
    );
    assert!(matches!(
        sim.join(created.support_key.reveal()),
        Err(SessionError::WrongKey)
    ));
    sim.join(new_key.reveal())
        .expect("the new key admits the customer");
    assert!(
        sim.node.replace_support_key(&sid).is_none(),
        "a used key is never replaced"
    );
    assert!(matches!(
        sim.node.key_lookup_allowed(sim.now, addr(1), None),
        Some(Proof::None)
    ));

    sim.node
        .end_session(sim.now, &alice, &sid)
        .expect("host ends");
    sim.drain();
    assert!(sim.node.directory(sim.now).is_empty());
    assert!(
        sim.node.knows_session(&sid),
        "an ended session is still answered here (session_ended), not routed"
    );
}

/// Joins with `key` from `from`, solving the challenge the node asks for (if it asks).
fn join_solving(sim: &mut Sim, from: IpAddr, key: &str) -> Result<Credentials, SessionError> {
    match sim.join_from(from, key) {
        Err(SessionError::ChallengeRequired(c)) => {
            let proof = c.solve();
            let r = sim.node.join(
                sim.now,
                from,
                "Carol Customer",
                &JoinCredential::Key(key.into()),
                Proof::Solution(proof),
            );
            sim.drain();
            r
        }
        other => other,
    }
}

/// The node budget of [`cheap_challenges`].
const NODE_BUDGET: u32 = 20;

fn spend_the_node_budget(sim: &mut Sim, live: &[&str]) {
    let budget = NODE_BUDGET;
    let mut wrong = random_wrong_keys(budget as usize, live).into_iter();
    // From many addresses, each within its own budget.
    for i in 0..budget {
        let key = wrong.next().expect("enough keys");
        let from = IpAddr::V4(Ipv4Addr::new(198, 51, (i / 200) as u8, (i % 200) as u8));
        assert_eq!(
            sim.join_from(from, &key).unwrap_err(),
            SessionError::WrongKey
        );
    }
}

fn random_wrong_keys(n: usize, live: &[&str]) -> Vec<String> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let mut keys = Vec::new();
    while keys.len() < n {
        let k = format!(
            "{:09}",
            rand::Rng::random_range(&mut rng, 0..1_000_000_000u32)
        );
        if !live.contains(&k.as_str()) {
            keys.push(k);
        }
    }
    keys
}

fn cheap_challenges() -> Settings {
    let mut s = settings();
    s.throttle.challenge_bits = 8;
    s.throttle.challenge_max_bits = 10;
    s.throttle.per_address_failures = 3;
    s.throttle.node_failures = NODE_BUDGET;
    s
}

#[test]
fn a_spent_key_budget_asks_for_work_and_lets_the_right_key_in_with_it() {
    let mut sim = Sim::new(cheap_challenges());
    let alice = agent("alice", &["support"]);
    let live = sim.create(&alice);
    let key = live.support_key.reveal().to_owned();
    spend_the_node_budget(&mut sim, &[&key]);
    assert!(
        sim.stats
            .contains(&Stat::Lockout(crate::throttle::Scope::Node)),
        "spending the node budget is counted as a node lock-out"
    );
    // A customer never seen before, with the right key: asked for work, not refused.
    let fresh = IpAddr::V4(Ipv4Addr::new(203, 0, 113, 9));
    let challenge = match sim.join_from(fresh, &key) {
        Err(SessionError::ChallengeRequired(c)) => c,
        other => panic!("expected a challenge, got {other:?}"),
    };
    assert_eq!(challenge.bits, 8);
    assert!(
        sim.stats
            .contains(&Stat::KeyAttempt(KeyOutcome::Challenged))
    );
    // A wrong nonce is no proof: another challenge comes back, the key is not looked up.
    let wrong_nonce = (0u64..)
        .map(|n| n.to_string())
        .find(|n| !relay_codec::challenge::solves(&challenge.challenge, n, challenge.bits))
        .expect("a failing nonce");
    let unsolved = sim.node.join(
        sim.now,
        fresh,
        "Carol",
        &JoinCredential::Key(key.clone()),
        Proof::Solution(relay_codec::wire::KeyProof {
            challenge: challenge.challenge.clone(),
            nonce: wrong_nonce,
        }),
    );
    assert!(matches!(unsolved, Err(SessionError::ChallengeRequired(_))));
    // Solved, it gets in.
    let proof = challenge.solve();
    let joined = sim.node.join(
        sim.now,
        fresh,
        "Carol",
        &JoinCredential::Key(key.clone()),
        Proof::Solution(proof.clone()),
    );
    assert!(joined.is_ok(), "{joined:?}");
    // The same proof does not buy a second attempt.
    let other = sim.create(&alice);
    let replay = sim.node.join(
        sim.now,
        fresh,
        "Mallory",
        &JoinCredential::Key(other.support_key.reveal().into()),
        Proof::Solution(proof),
    );
    assert!(matches!(replay, Err(SessionError::ChallengeRequired(_))));
    assert!(join_solving(&mut sim, fresh, other.support_key.reveal()).is_ok());
    // The window passes: no work needed any more.
    sim.now += Duration::from_secs(61);
    let third = sim.create(&alice);
    assert!(sim.join_from(fresh, third.support_key.reveal()).is_ok());
}

#[test]
fn support_links_are_never_held_by_the_key_budgets() {
    let mut sim = Sim::new(cheap_challenges());
    let alice = agent("alice", &["support"]);
    let live = sim.create(&alice);
    spend_the_node_budget(&mut sim, &[live.support_key.reveal()]);
    let fresh = IpAddr::V4(Ipv4Addr::new(203, 0, 113, 10));
    let r = sim.node.join(
        sim.now,
        fresh,
        "Carol",
        &JoinCredential::Link(live.link.reveal().into()),
        Proof::None,
    );
    assert!(
        r.is_ok(),
        "a correct link while the key budget is spent: {r:?}"
    );
    // Unknown links have their own per-address budget (3 in these settings), which
    // does not touch the key budget of that address.
    let prober = IpAddr::V4(Ipv4Addr::new(203, 0, 113, 11));
    for _ in 0..3 {
        let r = sim.node.join(
            sim.now,
            prober,
            "X",
            &JoinCredential::Link("nope".into()),
            Proof::None,
        );
        assert_eq!(r.unwrap_err(), SessionError::WrongKey);
    }
    let r = sim.node.join(
        sim.now,
        prober,
        "X",
        &JoinCredential::Link("nope".into()),
        Proof::None,
    );
    assert_eq!(r.unwrap_err().code(), ErrorCode::Throttled);
    let other = sim.create(&alice);
    assert!(join_solving(&mut sim, prober, other.support_key.reveal()).is_ok());
}

// ----- message budgets -----------------------------------------------------------------

fn chat_msg(text: &str) -> ClientMsg {
    ClientMsg::Chat {
        text: text.into(),
        audience: Audience::All,
    }
}

fn candidate_msg(n: usize) -> ClientMsg {
    ClientMsg::Candidate(relay_codec::wire::IceCandidate {
        candidate: format!("candidate:{n} 1 udp 1 127.0.0.1 {n} typ host"),
        sdp_mid: Some("0".into()),
        sdp_mline_index: Some(0),
    })
}

fn chats(msgs: &[ServerMsg]) -> usize {
    msgs.iter()
        .filter(|m| matches!(m, ServerMsg::Chat { .. }))
        .count()
}

fn rate_limited(sim: &Sim, class: crate::rate_limit::MessageClass) -> usize {
    sim.stats
        .iter()
        .filter(|s| **s == Stat::RateLimited(class))
        .count()
}

fn signals(sim: &mut Sim) -> usize {
    std::mem::take(&mut sim.media)
        .iter()
        .filter(|m| matches!(m, MediaEvent::Signal { .. }))
        .count()
}

#[test]
fn a_chat_flood_is_cut_at_its_budget_and_answered_once_a_second() {
    use crate::rate_limit::{MessageClass, RateLimit};
    let mut s = settings();
    s.rate_limits.chat = RateLimit::new(5, 20);
    let mut sim = Sim::new(s);
    let alice = agent("alice", &["support"]);
    let (_, host_conn, _, customer_conn) = session_with_customer(&mut sim, &alice);
    sim.take(host_conn);
    sim.take(customer_conn);

    // 1,000 messages at once: the burst reaches the host, the rest is dropped.
    for i in 0..1000 {
        sim.send(customer_conn, chat_msg(&format!("flood {i}")));
    }
    assert_eq!(chats(&sim.take(host_conn)), 20);
    let answers = sim.take(customer_conn);
    assert_eq!(chats(&answers), 20, "the customer sees its own 20 echoed");
    assert_eq!(
        error_codes(&answers),
        [ErrorCode::RateLimited],
        "one answer, not 980"
    );
    assert_eq!(rate_limited(&sim, MessageClass::Chat), 980);
    // The history holds the 20, not the flood.
    assert_eq!(
        sim.records
            .iter()
            .filter(|r| matches!(r, RecordEntry::Chat(_)))
            .count(),
        20
    );

    // Half a second later: 2 tokens are back, and the refusals stay silent until a
    // second has passed since the last answer.
    sim.advance_to(sim.now - sim.start + Duration::from_millis(400));
    for _ in 0..10 {
        sim.send(customer_conn, chat_msg("again"));
    }
    assert_eq!(chats(&sim.take(host_conn)), 2);
    assert!(error_codes(&sim.take(customer_conn)).is_empty());
    sim.advance_to(sim.now - sim.start + Duration::from_millis(600));
    for _ in 0..10 {
        sim.send(customer_conn, chat_msg("and again"));
    }
    assert_eq!(chats(&sim.take(host_conn)), 3);
    assert_eq!(
        error_codes(&sim.take(customer_conn)),
        [ErrorCode::RateLimited]
    );
}

#[test]
fn budgets_are_per_class_and_per_participant_and_chat_channels_share_the_chat_one() {
    use crate::rate_limit::{MessageClass, RateLimit};
    let mut s = settings();
    s.rate_limits.chat = RateLimit::new(1, 3);
    s.rate_limits.candidate = RateLimit::new(1, 5);
    s.rate_limits.ping = RateLimit::new(1, 2);
    s.rate_limits.share = RateLimit::new(1, 2);
    s.rate_limits.offer = RateLimit::new(1, 2);
    let mut sim = Sim::new(s);
    let alice = agent("alice", &["support"]);
    let bob = agent("bob", &["support"]);
    let (created, host_conn, customer, customer_conn) = session_with_customer(&mut sim, &alice);
    let sid = created.host.session_id.clone();
    let b = sim
        .invite_and_accept(&alice, &sid, &bob, Visibility::Visible, Permission::Control)
        .unwrap();
    let bob_conn = sim.connect(&b);
    for c in [host_conn, customer_conn, bob_conn] {
        sim.take(c);
    }
    sim.media.clear();

    // The customer spends its chat budget: two on its WebSocket, one on its channel,
    // and the fourth (on the channel) is refused.
    sim.send(customer_conn, chat_msg("one"));
    sim.send(customer_conn, chat_msg("two"));
    let on_channel = |text: &str| ClientEnvelope {
        id: Some(9),
        msg: chat_msg(text),
    };
    sim.node
        .channel_message(sim.now, &sid, &customer.participant_id, on_channel("three"));
    sim.node
        .channel_message(sim.now, &sid, &customer.participant_id, on_channel("four"));
    sim.drain();
    assert_eq!(chats(&sim.take(host_conn)), 3);
    let refusals: Vec<_> = sim
        .take(customer_conn)
        .into_iter()
        .filter_map(|m| match m {
            ServerMsg::Error {
                code, reference, ..
            } => Some((code, reference)),
            _ => None,
        })
        .collect();
    assert_eq!(refusals, [(ErrorCode::RateLimited, Some(9))]);

    // Its other classes are untouched: candidates still pass…
    for n in 0..5 {
        sim.send(customer_conn, candidate_msg(n));
    }
    assert_eq!(signals(&mut sim), 5);
    sim.send(customer_conn, candidate_msg(5));
    assert_eq!(signals(&mut sim), 0, "the sixth candidate is over budget");
    // …and so do pings, until their own budget is spent.
    sim.send(customer_conn, ClientMsg::Ping {});
    sim.send(customer_conn, ClientMsg::Ping {});
    sim.send(customer_conn, ClientMsg::Ping {});
    let pongs = sim
        .take(customer_conn)
        .iter()
        .filter(|m| matches!(m, ServerMsg::Pong { .. }))
        .count();
    assert_eq!(pongs, 2);

    // The host's and Bob's budgets are their own: both still chat, signal and share.
    sim.send(host_conn, chat_msg("host here"));
    sim.send(bob_conn, chat_msg("bob here"));
    assert_eq!(chats(&sim.take(customer_conn)), 2);
    for n in 0..5 {
        sim.send(bob_conn, candidate_msg(n));
    }
    assert_eq!(signals(&mut sim), 5);
    sim.send(bob_conn, ClientMsg::ShareStart {});
    sim.send(bob_conn, ClientMsg::ShareStop {});
    sim.send(bob_conn, ClientMsg::ShareStart {});
    let bob_saw = sim.take(bob_conn);
    assert_eq!(error_codes(&bob_saw), [ErrorCode::RateLimited]);
    assert_eq!(
        shares(&bob_saw).iter().map(|(a, _)| *a).collect::<Vec<_>>(),
        [true, false],
        "the third share message is over budget"
    );
    assert_eq!(
        share_media(&mut sim),
        [Some(b.participant_id.clone()), None]
    );
    assert_eq!(rate_limited(&sim, MessageClass::Share), 1);
    // Offers of Bob pass while the customer's are counted apart.
    sim.send(bob_conn, ClientMsg::Offer { sdp: "v=0".into() });
    assert_eq!(signals(&mut sim), 1);

    // `leave` is never refused, whatever was spent.
    sim.send(customer_conn, ClientMsg::Leave {});
    assert_eq!(sim.ended_with(host_conn), Some(EndReason::CustomerLeft));
    assert_eq!(rate_limited(&sim, MessageClass::Chat), 1);
    assert_eq!(rate_limited(&sim, MessageClass::Candidate), 1);
    assert_eq!(rate_limited(&sim, MessageClass::Ping), 1);
}

#[test]
fn a_consoles_pings_have_a_budget_and_a_reconnection_does_not_refill_a_participants() {
    use crate::rate_limit::{MessageClass, RateLimit};
    let mut s = settings();
    s.rate_limits.ping = RateLimit::new(1, 3);
    s.rate_limits.chat = RateLimit::new(1, 3);
    let mut sim = Sim::new(s);
    let alice = agent("alice", &["support"]);
    let console = sim.console(&alice);
    sim.take(console);
    for _ in 0..10 {
        sim.send(console, ClientMsg::Ping {});
    }
    let got = sim.take(console);
    assert_eq!(
        got.iter()
            .filter(|m| matches!(m, ServerMsg::Pong { .. }))
            .count(),
        3
    );
    assert_eq!(error_codes(&got), [ErrorCode::RateLimited]);
    assert_eq!(rate_limited(&sim, MessageClass::Ping), 7);

    let (_, host_conn, customer, customer_conn) = session_with_customer(&mut sim, &alice);
    for _ in 0..3 {
        sim.send(customer_conn, chat_msg("hello"));
    }
    // The customer reconnects (with its resume token) and floods again: still spent.
    let again = sim.connect(&customer);
    sim.take(host_conn);
    sim.send(again, chat_msg("after a reconnect"));
    assert_eq!(chats(&sim.take(host_conn)), 0);
    assert_eq!(error_codes(&sim.take(again)), [ErrorCode::RateLimited]);
    sim.advance_to(sim.now - sim.start + Duration::from_secs(1));
    sim.send(again, chat_msg("a second later"));
    assert_eq!(chats(&sim.take(host_conn)), 1);
}
