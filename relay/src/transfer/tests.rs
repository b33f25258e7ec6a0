//! Tests of the file-transfer core with plain calls and a simulated clock.
//!
//! The [`Sim`] harness owns a [`Transfers`] with a session's members (customer, host, a
//! masked control agent, a view-only agent, a supervisor), all with open `files`
//! channels, and collects what each participant is sent.
#![allow(clippy::unwrap_used)]

use std::collections::{HashMap, VecDeque};

use proptest::prelude::*;

use super::*;

fn pid(s: &str) -> ParticipantId {
    ParticipantId::from_wire(s)
}

/// The customer, the host, a masked agent with control, a view-only agent, a supervisor.
const C: &str = "p_customer";
const H: &str = "p_host";
const M: &str = "p_masked";
const V: &str = "p_viewer";
const S: &str = "p_supervisor";

const SHA: [u8; 32] = [7; 32];

struct Sim {
    core: Transfers,
    base: Instant,
    now: Instant,
    /// What each participant was sent, in order.
    got: HashMap<String, Vec<FileMsg>>,
    outcomes: Vec<Outcome>,
    /// What the recording would keep.
    events: Vec<TransferEvent>,
    forwarded: u64,
}

impl Sim {
    fn new() -> Sim {
        Sim::with(TransferSettings {
            max_file_bytes: 10 * 1024 * 1024,
            ..TransferSettings::default()
        })
    }

    fn with(settings: TransferSettings) -> Sim {
        let base = Instant::now();
        let mut core = Transfers::new(settings);
        for (p, role, permission) in [
            (C, Role::Customer, Permission::View),
            (H, Role::Host, Permission::Control),
            (M, Role::Agent, Permission::Control),
            (V, Role::Agent, Permission::View),
            (S, Role::Supervisor, Permission::View),
        ] {
            core.set_member(base, &pid(p), role, permission);
            core.channel_opened(&pid(p));
        }
        let mut sim = Sim {
            core,
            base,
            now: base,
            got: HashMap::new(),
            outcomes: Vec::new(),
            events: Vec::new(),
            forwarded: 0,
        };
        sim.drain();
        sim
    }

    fn drain(&mut self) {
        while let Some(out) = self.core.poll_output() {
            match out {
                TransferOutput::Send { to, msg } => self
                    .got
                    .entry(to.as_str().to_owned())
                    .or_default()
                    .push(msg),
                TransferOutput::Stat(TransferStat::Outcome(o)) => self.outcomes.push(o),
                TransferOutput::Stat(TransferStat::Forwarded(n)) => self.forwarded += n,
                TransferOutput::Event(e) => self.events.push(e),
            }
        }
    }

    fn from(&mut self, who: &str, msg: FileMsg) {
        self.core.handle(self.now, &pid(who), msg);
        self.drain();
    }

    /// What `who` was sent since the last call.
    fn take(&mut self, who: &str) -> Vec<FileMsg> {
        self.got.remove(who).unwrap_or_default()
    }

    fn advance(&mut self, by: Duration) {
        self.now += by;
        if self.core.poll_timeout().is_some_and(|t| t <= self.now) {
            self.core.handle_timeout(self.now);
        }
        self.drain();
    }

    fn offer(&mut self, who: &str, id: u32, size: u64) {
        self.from(
            who,
            FileMsg::Offer {
                id: TransferId(id),
                size,
                name: "report.pdf".into(),
                mime: Some("application/pdf".into()),
            },
        );
    }

    fn chunk(&mut self, who: &str, id: u32, offset: u64, len: usize) {
        self.from(
            who,
            FileMsg::Chunk {
                id: TransferId(id),
                offset,
                data: Bytes::from(vec![0xa5; len]),
            },
        );
    }

    /// The id `who` was offered a transfer under (its last `Offer`).
    fn offered_id(&mut self, who: &str) -> TransferId {
        let msgs = self.take(who);
        match msgs.last() {
            Some(FileMsg::Offer { id, .. }) => *id,
            other => panic!("{who} got no offer: {other:?}"),
        }
    }

    /// A transfer from agent `who` to the customer, accepted, with the customer's id.
    fn agent_to_customer(&mut self, who: &str, id: u32, size: u64) -> TransferId {
        self.offer(who, id, size);
        let cid = self.offered_id(C);
        self.from(C, FileMsg::Accept { id: cid });
        assert_eq!(self.take(who), [FileMsg::Accept { id: TransferId(id) }]);
        cid
    }
}

/// The events as (sender, receiver, outcome) of short names.
fn event_summary(events: &[TransferEvent]) -> Vec<(&str, Option<&str>, Option<Outcome>)> {
    events
        .iter()
        .map(|e| {
            (
                e.sender.as_str(),
                e.receiver.as_ref().map(|r| r.as_str()),
                e.outcome,
            )
        })
        .collect()
}

#[test]
fn every_offer_and_every_receivers_end_is_logged_with_the_file_for_the_recording() {
    let mut sim = Sim::new();
    sim.offer(C, 1, 1000);
    let (h, m, v) = (sim.offered_id(H), sim.offered_id(M), sim.offered_id(V));
    sim.from(V, FileMsg::Decline { id: v });
    sim.from(H, FileMsg::Accept { id: h });
    sim.from(M, FileMsg::Accept { id: m });
    sim.chunk(C, 1, 0, 1000);
    sim.core.remove_member(sim.now, &pid(M));
    sim.drain();
    sim.from(
        C,
        FileMsg::Complete {
            id: TransferId(1),
            sha256: SHA,
        },
    );
    // A view-only agent's offer is refused before anyone gets it.
    sim.offer(V, 9, 10);
    use Outcome::*;
    assert_eq!(
        event_summary(&sim.events),
        [
            (C, Some(H), None),
            (C, Some(M), None),
            (C, Some(V), None),
            (C, Some(V), Some(Declined)),
            (C, Some(M), Some(Cancelled)),
            (C, Some(H), Some(Completed)),
            (V, None, Some(RefusedForbidden)),
        ]
    );
    let customer_file = FileInfo {
        name: "report.pdf".into(),
        size: 1000,
        to_customer: false,
    };
    assert!(sim.events[..6].iter().all(|e| e.file == customer_file));
    assert!(sim.events[6].file.to_customer && sim.events[6].file.size == 10);
    // Every counted end of a known file is logged, and nothing else.
    let logged: Vec<Outcome> = sim.events.iter().filter_map(|e| e.outcome).collect();
    assert_eq!(logged, sim.outcomes);
}

fn cancel_msg(id: TransferId, reason: CancelReason) -> FileMsg {
    FileMsg::Cancel { id, reason }
}

#[test]
fn a_customer_offer_reaches_every_agent_but_no_supervisor_and_starts_once_all_answered() {
    let mut sim = Sim::new();
    sim.offer(C, 1, 1000);
    let (h, m, v) = (sim.offered_id(H), sim.offered_id(M), sim.offered_id(V));
    assert!(sim.take(S).is_empty(), "supervisors get no files");
    assert!(sim.take(C).is_empty());
    for id in [h, m, v] {
        assert!(id.is_relay_chosen());
    }
    sim.from(H, FileMsg::Accept { id: h });
    sim.from(V, FileMsg::Decline { id: v });
    assert!(
        sim.take(C).is_empty(),
        "the masked agent has not answered yet"
    );
    sim.from(M, FileMsg::Accept { id: m });
    assert_eq!(sim.take(C), [FileMsg::Accept { id: TransferId(1) }]);
    assert_eq!(sim.outcomes, [Outcome::Declined]);

    // The chunk goes to the two who accepted, as one shared buffer.
    sim.chunk(C, 1, 0, 1000);
    let (to_h, to_m) = (sim.take(H), sim.take(M));
    assert!(sim.take(V).is_empty());
    let (
        [
            FileMsg::Chunk {
                id: ih, data: dh, ..
            },
        ],
        [
            FileMsg::Chunk {
                id: im, data: dm, ..
            },
        ],
    ) = (&to_h[..], &to_m[..])
    else {
        panic!("{to_h:?} {to_m:?}");
    };
    assert_eq!((*ih, *im), (h, m));
    assert_eq!(dh.as_ptr(), dm.as_ptr(), "one buffer for every receiver");
    assert_eq!(sim.forwarded, 2000);

    sim.from(
        C,
        FileMsg::Complete {
            id: TransferId(1),
            sha256: SHA,
        },
    );
    assert_eq!(sim.take(H), [FileMsg::Complete { id: h, sha256: SHA }]);
    assert_eq!(sim.take(M), [FileMsg::Complete { id: m, sha256: SHA }]);
    assert_eq!(
        sim.outcomes,
        [Outcome::Declined, Outcome::Completed, Outcome::Completed]
    );
    assert_eq!(sim.core.open_transfers(), 0);
}

#[test]
fn when_every_receiver_declines_the_sender_hears_decline() {
    let mut sim = Sim::new();
    sim.offer(C, 9, 10);
    for who in [H, M, V] {
        let id = sim.offered_id(who);
        sim.from(who, FileMsg::Decline { id });
    }
    assert_eq!(sim.take(C), [FileMsg::Decline { id: TransferId(9) }]);
    assert_eq!(sim.core.open_transfers(), 0);
}

#[test]
fn offers_to_the_customer_name_no_agent_and_ids_are_the_customers_own() {
    let mut sim = Sim::new();
    // The masked agent and the host both number their transfer 1.
    sim.offer(M, 1, 10);
    sim.offer(H, 1, 20);
    let got = sim.take(C);
    assert_eq!(
        got,
        [
            FileMsg::Offer {
                id: TransferId(TransferId::RELAY_BIT | 1),
                size: 10,
                name: "report.pdf".into(),
                mime: Some("application/pdf".into()),
            },
            FileMsg::Offer {
                id: TransferId(TransferId::RELAY_BIT | 2),
                size: 20,
                name: "report.pdf".into(),
                mime: Some("application/pdf".into()),
            },
        ],
        "the customer's ids count its own offers, whoever sends"
    );
    for who in [H, M, V, S] {
        assert!(
            sim.take(who).is_empty(),
            "{who} hears of an offer to the customer"
        );
    }
}

#[test]
fn a_view_only_agent_or_a_supervisor_cannot_send_to_the_customer() {
    let mut sim = Sim::new();
    sim.offer(V, 3, 10);
    sim.offer(S, 4, 10);
    assert_eq!(
        sim.take(V),
        [cancel_msg(TransferId(3), CancelReason::Forbidden)]
    );
    assert_eq!(
        sim.take(S),
        [cancel_msg(TransferId(4), CancelReason::Forbidden)]
    );
    assert!(sim.take(C).is_empty(), "nothing reaches the customer");
    assert_eq!(
        sim.outcomes,
        [Outcome::RefusedForbidden, Outcome::RefusedForbidden]
    );
}

#[test]
fn losing_control_cancels_the_agents_transfers_to_the_customer() {
    let mut sim = Sim::new();
    let cid = sim.agent_to_customer(M, 1, 100_000);
    sim.chunk(M, 1, 0, 1000);
    sim.take(C);
    sim.core
        .set_member(sim.now, &pid(M), Role::Agent, Permission::View);
    sim.drain();
    assert_eq!(
        sim.take(M),
        [cancel_msg(TransferId(1), CancelReason::Forbidden)]
    );
    assert_eq!(sim.take(C), [cancel_msg(cid, CancelReason::Forbidden)]);
    assert_eq!(sim.outcomes, [Outcome::RefusedForbidden]);
}

#[test]
fn an_offer_whose_name_spoofs_or_hides_is_refused_before_anyone_sees_it() {
    let mut sim = Sim::with(TransferSettings::default());
    let names = [
        "invoice\u{202E}fdp.exe",
        "a\nb.txt",
        "\u{200B}\u{200B}",
        "x\u{E0041}.txt",
        "\u{1b}[2J.txt",
    ];
    for (i, name) in names.into_iter().enumerate() {
        let id = i as u32 + 1;
        sim.from(
            H,
            FileMsg::Offer {
                id: TransferId(id),
                size: 10,
                name: name.into(),
                mime: None,
            },
        );
        assert_eq!(
            sim.take(H),
            [cancel_msg(TransferId(id), CancelReason::BadName)],
            "{name:?}"
        );
        assert!(sim.take(C).is_empty(), "{name:?} reached the customer");
    }
    sim.from(
        H,
        FileMsg::Offer {
            id: TransferId(8),
            size: 10,
            name: "fine.txt".into(),
            mime: Some("text/plain\u{1b}[2J".into()),
        },
    );
    assert_eq!(
        sim.take(H),
        [cancel_msg(TransferId(8), CancelReason::BadName)]
    );
    assert_eq!(sim.outcomes, [Outcome::RefusedBadName; 6]);
    sim.offer(H, 9, 10);
    assert!(matches!(sim.take(C)[..], [FileMsg::Offer { .. }]));
}

#[test]
fn an_offer_above_the_size_limit_is_refused_and_one_at_it_is_not() {
    let mut sim = Sim::with(TransferSettings {
        max_file_bytes: 1000,
        ..TransferSettings::default()
    });
    sim.offer(H, 1, 1001);
    assert_eq!(
        sim.take(H),
        [cancel_msg(TransferId(1), CancelReason::TooLarge)]
    );
    assert!(sim.take(C).is_empty());
    assert_eq!(sim.outcomes, [Outcome::RefusedTooLarge]);
    sim.offer(H, 2, 1000);
    assert!(matches!(
        sim.take(C)[..],
        [FileMsg::Offer { size: 1000, .. }]
    ));
}

#[test]
fn the_window_bounds_what_the_sender_may_run_ahead_of_the_slowest_receiver() {
    let mut sim = Sim::new();
    sim.offer(C, 1, 1 << 20);
    let (h, m, v) = (sim.offered_id(H), sim.offered_id(M), sim.offered_id(V));
    for (who, id) in [(H, h), (M, m), (V, v)] {
        sim.from(who, FileMsg::Accept { id });
    }
    sim.take(C);
    // 16 chunks of 16 KiB fill the 256 KiB window.
    for i in 0..16u64 {
        sim.chunk(C, 1, i * 16384, 16384);
    }
    assert!(sim.take(C).is_empty());
    // Two receivers credit half the window, one a quarter: the sender hears a quarter.
    sim.from(
        H,
        FileMsg::Credit {
            id: h,
            consumed: 131072,
        },
    );
    sim.from(
        M,
        FileMsg::Credit {
            id: m,
            consumed: 131072,
        },
    );
    assert!(
        sim.take(C).is_empty(),
        "the view-only agent has credited nothing yet"
    );
    sim.from(
        V,
        FileMsg::Credit {
            id: v,
            consumed: 65536,
        },
    );
    assert_eq!(
        sim.take(C),
        [FileMsg::Credit {
            id: TransferId(1),
            consumed: 65536
        }]
    );
    // Now 64 KiB more fit, and not a byte beyond.
    for i in 16..20u64 {
        sim.chunk(C, 1, i * 16384, 16384);
    }
    assert!(sim.take(C).is_empty());
    sim.take(H);
    sim.chunk(C, 1, 20 * 16384, 1);
    let c = cancel_msg(TransferId(1), CancelReason::WindowExceeded);
    assert_eq!(sim.take(C), [c]);
    assert_eq!(sim.take(H), [cancel_msg(h, CancelReason::WindowExceeded)]);
    assert_eq!(
        sim.outcomes,
        [
            Outcome::ProtocolError,
            Outcome::ProtocolError,
            Outcome::ProtocolError
        ]
    );
    assert_eq!(sim.forwarded, 3 * 20 * 16384);
}

#[test]
fn tiny_chunks_cannot_pile_up_inside_the_window() {
    let mut sim = Sim::new();
    sim.agent_to_customer(H, 1, 1 << 20);
    for i in 0..64 {
        sim.chunk(H, 1, i, 1);
    }
    assert!(sim.take(H).is_empty());
    sim.chunk(H, 1, 64, 1);
    assert_eq!(
        sim.take(H),
        [cancel_msg(TransferId(1), CancelReason::WindowExceeded)]
    );
}

#[test]
fn credits_are_clamped_to_what_was_sent_and_never_go_back() {
    let mut sim = Sim::new();
    let cid = sim.agent_to_customer(H, 1, 1 << 20);
    sim.chunk(H, 1, 0, 1000);
    sim.from(
        C,
        FileMsg::Credit {
            id: cid,
            consumed: 1 << 20,
        },
    );
    assert_eq!(
        sim.take(H),
        [FileMsg::Credit {
            id: TransferId(1),
            consumed: 1000
        }],
        "a receiver cannot credit bytes it never got"
    );
    sim.from(
        C,
        FileMsg::Credit {
            id: cid,
            consumed: 10,
        },
    );
    assert!(sim.take(H).is_empty());
}

#[test]
fn chunks_out_of_order_past_the_size_before_accept_or_for_unknown_ids_are_refused() {
    let mut sim = Sim::new();
    // Before the customer accepted.
    sim.offer(H, 1, 100);
    let cid = sim.offered_id(C);
    sim.chunk(H, 1, 0, 10);
    assert_eq!(
        sim.take(H),
        [cancel_msg(TransferId(1), CancelReason::ProtocolError)]
    );
    assert_eq!(sim.take(C), [cancel_msg(cid, CancelReason::ProtocolError)]);

    // Out of order.
    let cid = sim.agent_to_customer(H, 2, 100);
    sim.chunk(H, 2, 0, 10);
    sim.chunk(H, 2, 20, 10);
    assert_eq!(
        sim.take(H),
        [cancel_msg(TransferId(2), CancelReason::OutOfOrder)]
    );
    assert_eq!(
        sim.take(C).last(),
        Some(&cancel_msg(cid, CancelReason::OutOfOrder))
    );

    // Past the offered size.
    let cid = sim.agent_to_customer(H, 3, 100);
    sim.chunk(H, 3, 0, 101);
    assert_eq!(
        sim.take(H),
        [cancel_msg(TransferId(3), CancelReason::PastSize)]
    );
    assert_eq!(sim.take(C), [cancel_msg(cid, CancelReason::PastSize)]);

    // Unknown, or in the relay's id range.
    sim.chunk(H, 77, 0, 10);
    assert_eq!(
        sim.take(H),
        [cancel_msg(TransferId(77), CancelReason::UnknownTransfer)]
    );
    sim.chunk(H, TransferId::RELAY_BIT | 1, 0, 10);
    assert!(sim.take(H).is_empty() && sim.take(C).is_empty());
    assert_eq!(sim.outcomes.len(), 5);
    assert!(sim.outcomes.iter().all(|o| *o == Outcome::ProtocolError));
}

#[test]
fn completion_checks_the_byte_count() {
    let mut sim = Sim::new();
    let cid = sim.agent_to_customer(M, 1, 100);
    sim.chunk(M, 1, 0, 99);
    sim.take(C);
    let complete = FileMsg::Complete {
        id: TransferId(1),
        sha256: SHA,
    };
    sim.from(M, complete.clone());
    assert_eq!(
        sim.take(M),
        [cancel_msg(TransferId(1), CancelReason::Incomplete)]
    );
    assert_eq!(sim.take(C), [cancel_msg(cid, CancelReason::Incomplete)]);

    let cid = sim.agent_to_customer(M, 2, 100);
    sim.chunk(M, 2, 0, 60);
    sim.chunk(M, 2, 60, 40);
    sim.take(C);
    sim.from(
        M,
        FileMsg::Complete {
            id: TransferId(2),
            sha256: SHA,
        },
    );
    assert_eq!(
        sim.take(C),
        [FileMsg::Complete {
            id: cid,
            sha256: SHA
        }]
    );
    assert_eq!(sim.outcomes, [Outcome::ProtocolError, Outcome::Completed]);
    // An empty file completes without a chunk.
    let cid = sim.agent_to_customer(M, 3, 0);
    sim.from(
        M,
        FileMsg::Complete {
            id: TransferId(3),
            sha256: SHA,
        },
    );
    assert_eq!(
        sim.take(C),
        [FileMsg::Complete {
            id: cid,
            sha256: SHA
        }]
    );
}

#[test]
fn a_receiver_that_leaves_cancels_its_part_and_the_last_one_the_transfer() {
    let mut sim = Sim::new();
    sim.offer(C, 1, 1 << 20);
    let (h, m, v) = (sim.offered_id(H), sim.offered_id(M), sim.offered_id(V));
    for (who, id) in [(H, h), (M, m), (V, v)] {
        sim.from(who, FileMsg::Accept { id });
    }
    sim.take(C);
    sim.chunk(C, 1, 0, 16384);
    sim.from(
        H,
        FileMsg::Credit {
            id: h,
            consumed: 16384,
        },
    );
    sim.from(
        M,
        FileMsg::Credit {
            id: m,
            consumed: 16384,
        },
    );
    assert!(sim.take(C).is_empty());
    // The slowest receiver leaves: the credit moves on to the others' minimum.
    sim.core.remove_member(sim.now, &pid(V));
    sim.drain();
    assert_eq!(
        sim.take(C),
        [FileMsg::Credit {
            id: TransferId(1),
            consumed: 16384
        }]
    );
    // The others still get chunks.
    sim.chunk(C, 1, 16384, 100);
    assert_eq!(sim.take(H).len(), 2);
    assert_eq!(sim.take(M).len(), 2);
    // A receiver cancels its own part; then the last one closes its channel.
    sim.from(H, cancel_msg(h, CancelReason::Cancelled));
    assert!(sim.take(C).is_empty());
    sim.core.channel_closed(sim.now, &pid(M));
    sim.drain();
    assert_eq!(
        sim.take(C),
        [cancel_msg(TransferId(1), CancelReason::ReceiverLeft)]
    );
    assert_eq!(sim.outcomes, [Outcome::Cancelled; 3]);
    assert_eq!(sim.core.open_transfers(), 0);
}

#[test]
fn a_sender_that_leaves_cancels_the_transfer_for_everyone() {
    let mut sim = Sim::new();
    sim.offer(C, 1, 1000);
    let (h, m, v) = (sim.offered_id(H), sim.offered_id(M), sim.offered_id(V));
    sim.from(H, FileMsg::Accept { id: h });
    sim.core.remove_member(sim.now, &pid(C));
    sim.drain();
    assert_eq!(sim.take(H), [cancel_msg(h, CancelReason::SenderLeft)]);
    assert_eq!(sim.take(M), [cancel_msg(m, CancelReason::SenderLeft)]);
    assert_eq!(sim.take(V), [cancel_msg(v, CancelReason::SenderLeft)]);
    assert_eq!(sim.outcomes, [Outcome::Cancelled; 3]);
    assert_eq!(sim.core.open_transfers(), 0);
    // Late answers about it change nothing.
    sim.from(M, FileMsg::Accept { id: m });
    assert!(sim.got.is_empty());
}

#[test]
fn receivers_that_do_not_answer_in_time_are_given_up() {
    let mut sim = Sim::new();
    let timeout = sim.core.settings().answer_timeout;
    sim.offer(C, 1, 1000);
    let (h, m, v) = (sim.offered_id(H), sim.offered_id(M), sim.offered_id(V));
    sim.from(H, FileMsg::Accept { id: h });
    assert_eq!(sim.core.poll_timeout(), Some(sim.base + timeout));
    sim.advance(timeout - Duration::from_millis(1));
    assert!(sim.take(C).is_empty() && sim.take(M).is_empty());
    sim.advance(Duration::from_millis(1));
    assert_eq!(sim.take(M), [cancel_msg(m, CancelReason::Timeout)]);
    assert_eq!(sim.take(V), [cancel_msg(v, CancelReason::Timeout)]);
    assert_eq!(sim.take(C), [FileMsg::Accept { id: TransferId(1) }]);
    assert_eq!(
        sim.core.poll_timeout(),
        None,
        "started transfers have no deadline"
    );

    // Nobody answers at all: the sender hears `timeout`.
    sim.offer(H, 5, 10);
    let cid = sim.offered_id(C);
    sim.advance(timeout);
    assert_eq!(sim.take(C), [cancel_msg(cid, CancelReason::Timeout)]);
    assert_eq!(
        sim.take(H),
        [cancel_msg(TransferId(5), CancelReason::Timeout)]
    );
}

#[test]
fn nobody_to_receive_ids_in_use_and_too_many_transfers_are_refused() {
    let mut sim = Sim::new();
    sim.core.channel_closed(sim.now, &pid(C));
    sim.drain();
    sim.offer(H, 1, 10);
    assert_eq!(
        sim.take(H),
        [cancel_msg(TransferId(1), CancelReason::NoReceivers)]
    );
    assert_eq!(sim.outcomes, [Outcome::NoReceivers]);
    sim.core.channel_opened(&pid(C));

    // A live id offered again voids both.
    sim.offer(H, 2, 10);
    let cid = sim.offered_id(C);
    sim.offer(H, 2, 10);
    assert_eq!(
        sim.take(H),
        [cancel_msg(TransferId(2), CancelReason::ProtocolError)]
    );
    assert_eq!(sim.take(C), [cancel_msg(cid, CancelReason::ProtocolError)]);

    for id in 10..14 {
        sim.offer(H, id, 10);
    }
    assert!(sim.take(H).is_empty());
    sim.offer(H, 14, 10);
    assert_eq!(
        sim.take(H),
        [cancel_msg(TransferId(14), CancelReason::ProtocolError)]
    );

    // Answers must name the relay's ids: one in the client's range is dropped, counted.
    let before = sim.outcomes.len();
    sim.from(C, FileMsg::Accept { id: TransferId(10) });
    assert!(sim.take(H).is_empty());
    assert_eq!(sim.outcomes.len(), before + 1);
}

#[test]
fn messages_on_a_channel_the_core_does_not_know_as_open_are_ignored() {
    let mut sim = Sim::new();
    sim.core.channel_closed(sim.now, &pid(H));
    sim.drain();
    sim.offer(H, 1, 10);
    assert!(sim.got.is_empty() && sim.outcomes.is_empty());
}

proptest! {
    /// Whatever a sender and its receivers do, the bytes forwarded beyond the slowest
    /// receiver's credit never exceed the window; a chunk is refused exactly when it
    /// would go beyond it (in bytes or in chunks).
    #[test]
    fn forwarded_bytes_stay_within_the_window(
        ops in proptest::collection::vec((0..4usize, 1..40_000usize), 1..300)
    ) {
        let mut sim = Sim::new();
        sim.offer(C, 1, 4 << 20);
        let ids: Vec<(&str, TransferId)> =
            [H, M, V].into_iter().map(|w| (w, sim.offered_id(w))).collect();
        for (who, id) in &ids {
            sim.from(who, FileMsg::Accept { id: *id });
        }
        sim.take(C);
        let mut sent = 0u64;
        let mut consumed = [0u64; 3];
        let mut ends: VecDeque<u64> = VecDeque::new();
        for (op, n) in ops {
            let floor = *consumed.iter().min().unwrap();
            while ends.front().is_some_and(|e| *e <= floor) {
                ends.pop_front();
            }
            if op == 0 {
                let len = n.min(relay_codec::files::MAX_CHUNK_BYTES) as u64;
                let fits = sent + len <= floor + DEFAULT_WINDOW && ends.len() < 64;
                sim.chunk(C, 1, sent, len as usize);
                let refused = sim.take(C).contains(&cancel_msg(TransferId(1), CancelReason::WindowExceeded));
                prop_assert_eq!(refused, !fits);
                if refused {
                    break;
                }
                sent += len;
                ends.push_back(sent);
            } else {
                let (who, id) = ids[op - 1];
                consumed[op - 1] = (consumed[op - 1] + n as u64).min(sent);
                sim.from(who, FileMsg::Credit { id, consumed: consumed[op - 1] });
            }
            let floor = *consumed.iter().min().unwrap();
            prop_assert!(sent - floor <= DEFAULT_WINDOW, "{} sent, {} credited", sent, floor);
        }
        prop_assert_eq!(sim.forwarded, 3 * sent);
    }
}

#[test]
fn an_offer_flood_is_refused_at_its_budget_and_reaches_no_receiver() {
    let mut sim = Sim::with(TransferSettings {
        offer_rate: RateLimit::new(1, 3),
        ..TransferSettings::default()
    });
    // The customer offers and cancels as fast as it can: three offers reach the
    // agents, the rest are refused with `rate_limited` and reach nobody.
    for id in 1..=100 {
        sim.offer(C, id, 10);
        sim.from(
            C,
            FileMsg::Cancel {
                id: TransferId(id),
                reason: CancelReason::Cancelled,
            },
        );
    }
    let host_offers = sim
        .take(H)
        .iter()
        .filter(|m| matches!(m, FileMsg::Offer { .. }))
        .count();
    assert_eq!(host_offers, 3);
    let refused: Vec<FileMsg> = sim
        .take(C)
        .into_iter()
        .filter(|m| {
            matches!(
                m,
                FileMsg::Cancel {
                    reason: CancelReason::RateLimited,
                    ..
                }
            )
        })
        .collect();
    assert_eq!(refused.len(), 97);
    assert_eq!(
        refused[0],
        cancel_msg(TransferId(4), CancelReason::RateLimited)
    );
    assert_eq!(
        sim.outcomes
            .iter()
            .filter(|o| **o == Outcome::RateLimited)
            .count(),
        97
    );
    // Nothing of the refused offers is in the recording.
    assert_eq!(
        sim.events.iter().filter(|e| e.outcome.is_none()).count(),
        3 * 3,
        "3 offers to 3 agents (host, masked, viewer)"
    );
    // The host's budget is its own; the customer's comes back with time.
    sim.offer(H, 500, 10);
    assert!(matches!(sim.take(C).last(), Some(FileMsg::Offer { .. })));
    sim.advance(Duration::from_secs(1));
    sim.offer(C, 200, 10);
    assert!(matches!(sim.take(H).last(), Some(FileMsg::Offer { .. })));
}
