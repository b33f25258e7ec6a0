//! A session's event queue: what its media task processes, in the order it was sent.
//!
//! One unbounded channel carries every event, so the task sees them exactly in the
//! order the session core produced them (a `Member` downgrade before the `Offer` that
//! followed it, a `Left` after the candidates that preceded it). Only signalling
//! ([`MediaEvent::Signal`]: offers and candidates, which clients send and may flood)
//! is admitted against a bound: while `bound` signals wait, further ones are refused
//! (the caller drops and counts them). Everything else (members, departures, shares,
//! customer away, session end, recording entries, the peer connections' own events) is
//! always queued: those are the authority of the session core and are bounded by the
//! roster, the peer connections and the chat budget, not by what a client sends.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::sync::mpsc;

use super::session::Event;
use crate::session::MediaEvent;

/// Why an event was not queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refused {
    /// A signal, while `bound` signals already wait.
    SignalsFull,
    /// The session's task has ended.
    Closed,
}

/// The sending side; cheap to clone.
#[derive(Debug, Clone)]
pub(crate) struct EventSender {
    tx: mpsc::UnboundedSender<Event>,
    /// Signals queued and not yet taken by the task.
    signals: Arc<AtomicUsize>,
    bound: usize,
}

/// The task's side.
#[derive(Debug)]
pub(crate) struct EventReceiver {
    rx: mpsc::UnboundedReceiver<Event>,
    signals: Arc<AtomicUsize>,
}

/// A queue that holds at most `bound` signals at a time, and any number of other events.
pub(crate) fn channel(bound: usize) -> (EventSender, EventReceiver) {
    let (tx, rx) = mpsc::unbounded_channel();
    let signals = Arc::new(AtomicUsize::new(0));
    (
        EventSender {
            tx,
            signals: signals.clone(),
            bound,
        },
        EventReceiver { rx, signals },
    )
}

fn is_signal(event: &Event) -> bool {
    matches!(event, Event::Control(MediaEvent::Signal { .. }))
}

impl EventSender {
    /// Queues `event` without blocking: a signal only while fewer than the bound wait,
    /// anything else always (while the task runs).
    pub(crate) fn send(&self, event: Event) -> Result<(), Refused> {
        let signal = is_signal(&event);
        if signal && self.signals.fetch_add(1, Ordering::AcqRel) >= self.bound {
            self.signals.fetch_sub(1, Ordering::AcqRel);
            return Err(Refused::SignalsFull);
        }
        self.tx.send(event).map_err(|_| {
            if signal {
                self.signals.fetch_sub(1, Ordering::AcqRel);
            }
            Refused::Closed
        })
    }

    /// A sender that does not keep the task alive (for its peer connections' events).
    pub(crate) fn downgrade(&self) -> mpsc::WeakUnboundedSender<Event> {
        self.tx.downgrade()
    }
}

impl EventReceiver {
    /// The next event, in order; `None` once every sender is gone and the queue is empty.
    pub(crate) async fn recv(&mut self) -> Option<Event> {
        let event = self.rx.recv().await?;
        if is_signal(&event) {
            self.signals.fetch_sub(1, Ordering::AcqRel);
        }
        Some(event)
    }

    /// The next event if one is queued (tests).
    #[cfg(test)]
    fn try_recv(&mut self) -> Option<Event> {
        let event = self.rx.try_recv().ok()?;
        if is_signal(&event) {
            self.signals.fetch_sub(1, Ordering::AcqRel);
        }
        Some(event)
    }
}

#[cfg(test)]
mod tests {
    use relay_codec::wire::{IceCandidate, Permission, Role};

    use super::*;
    use crate::session::{ParticipantId, SessionId, Signal};

    fn sid() -> SessionId {
        SessionId::from_wire("s_1")
    }

    fn candidate(pid: &ParticipantId, n: usize) -> Event {
        Event::Control(MediaEvent::Signal {
            session: sid(),
            participant: pid.clone(),
            signal: Signal::Candidate(IceCandidate {
                candidate: format!("candidate:{n} 1 udp 1 127.0.0.1 {n} typ host"),
                sdp_mid: Some("0".into()),
                sdp_mline_index: Some(0),
            }),
        })
    }

    fn member(pid: &ParticipantId, permission: Permission) -> Event {
        Event::Control(MediaEvent::Member {
            session: sid(),
            participant: pid.clone(),
            role: Role::Agent,
            permission,
        })
    }

    #[test]
    fn a_downgrade_after_a_signal_flood_is_queued_in_order_and_the_flood_is_cut() {
        let (tx, mut rx) = channel(16);
        let agent = ParticipantId::from_wire("p_agent");
        tx.send(member(&agent, Permission::Control)).unwrap();
        let refused = (0..10_000)
            .filter(|n| tx.send(candidate(&agent, *n)) == Err(Refused::SignalsFull))
            .count();
        assert_eq!(refused, 10_000 - 16, "signals beyond the bound are refused");
        // The queue is full of signals, and still the downgrade (and a departure, a
        // share change, the session's end) get in.
        tx.send(member(&agent, Permission::View)).unwrap();
        tx.send(Event::Control(MediaEvent::Share {
            session: sid(),
            sharer: None,
        }))
        .unwrap();
        tx.send(Event::Control(MediaEvent::Left {
            session: sid(),
            participant: agent.clone(),
        }))
        .unwrap();
        let got: Vec<Event> = std::iter::from_fn(|| rx.try_recv()).collect();
        assert_eq!(got.len(), 1 + 16 + 3);
        assert!(matches!(
            &got[0],
            Event::Control(MediaEvent::Member {
                permission: Permission::Control,
                ..
            })
        ));
        assert!(got[1..17].iter().all(is_signal));
        assert!(matches!(
            &got[17],
            Event::Control(MediaEvent::Member {
                permission: Permission::View,
                ..
            })
        ));
        assert!(matches!(&got[18], Event::Control(MediaEvent::Share { .. })));
        assert!(matches!(&got[19], Event::Control(MediaEvent::Left { .. })));
    }

    #[test]
    fn signals_are_admitted_again_once_the_task_took_some() {
        let (tx, mut rx) = channel(2);
        let p = ParticipantId::from_wire("p_1");
        assert!(tx.send(candidate(&p, 1)).is_ok());
        assert!(tx.send(candidate(&p, 2)).is_ok());
        assert_eq!(tx.send(candidate(&p, 3)), Err(Refused::SignalsFull));
        assert!(rx.try_recv().is_some());
        assert!(tx.send(candidate(&p, 4)).is_ok());
        assert_eq!(tx.send(candidate(&p, 5)), Err(Refused::SignalsFull));
    }

    #[test]
    fn a_closed_queue_refuses_and_keeps_no_count() {
        let (tx, rx) = channel(1);
        drop(rx);
        let p = ParticipantId::from_wire("p_1");
        assert_eq!(tx.send(candidate(&p, 1)), Err(Refused::Closed));
        assert_eq!(tx.signals.load(Ordering::Acquire), 0);
    }
}
