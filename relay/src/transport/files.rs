//! The `files` data channel: the IO around the session's [`Transfers`] core.
//!
//! Each participant's channel has a reader, which decodes every message
//! ([`relay_codec::files`]) and hands it to the core under the session's short `files`
//! lock, and a writer, which empties the participant's bounded queue into the channel.
//! The core's outputs are queued in order while the lock is held, so a receiver sees
//! an offer, its chunks and its completion in order, whoever caused them.
//!
//! Memory: a `Chunk`'s data is the one `Bytes` the reader received; every receiver's
//! queue holds a clone (a reference count). The writer encodes each message into the
//! `BytesMut` the `webrtc` crate's `send` takes: one copy of the data per receiver,
//! which the crate then hands to SCTP. The crate's send never waits, so what bounds the
//! bytes in flight is the core's window (at most about 256 KiB per receiver of each
//! transfer beyond its last credit), not the queue.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use bytes::BytesMut;
use relay_codec::files::{self, FileMsg};
use relay_codec::recording::{FileDirection, FileOutcome, FileTransferRecord, Record};
use relay_codec::wire::ErrorCode;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use webrtc::data_channel::{DataChannel, DataChannelEvent};

use super::session::{Shared, lock};
use crate::rate_limit::MessageClass;
use crate::session::ParticipantId;
use crate::transfer::{Outcome, TransferEvent, TransferOutput, TransferStat, Transfers};

/// The label of the file-transfer data channel.
pub(super) const FILES_LABEL: &str = "files";

/// Messages queued for one participant's `files` channel. The window keeps a
/// well-behaved session far below it (a 256 KiB window is 16 chunks per transfer);
/// a participant whose queue overflows anyway loses its `files` channel (its transfers
/// are cancelled), counted in `relay_messages_rejected_total{code="files_queue_full"}`.
const FILES_QUEUE: usize = 1024;

/// The session's transfer core and the participants' `files` queues, under one lock.
pub(super) struct FilePlane {
    core: Transfers,
    sinks: HashMap<ParticipantId, mpsc::Sender<FileMsg>>,
}

impl FilePlane {
    pub(super) fn new(core: Transfers) -> FilePlane {
        FilePlane {
            core,
            sinks: HashMap::new(),
        }
    }
}

/// Runs `f` on the session's transfers, then queues the core's messages and counts its
/// statistics.
pub(super) fn with_files<R>(shared: &Shared, f: impl FnOnce(&mut Transfers) -> R) -> R {
    let mut plane = lock(&shared.files);
    let r = f(&mut plane.core);
    let m = &shared.inner.metrics;
    let FilePlane { core, sinks } = &mut *plane;
    while let Some(out) = core.poll_output() {
        match out {
            TransferOutput::Send { to, msg } => {
                let Some(sink) = sinks.get(&to) else {
                    continue;
                };
                if sink.try_send(msg).is_err() {
                    tracing::warn!(participant = %to.as_str(), "files queue full; channel dropped");
                    m.messages_rejected_total
                        .with_label_values(&["files_queue_full"])
                        .inc();
                    // Dropping the sender ends the writer, which closes the channel.
                    sinks.remove(&to);
                    m.data_channels_open.with_label_values(&[FILES_LABEL]).dec();
                    core.channel_closed(Instant::now(), &to);
                }
            }
            TransferOutput::Stat(TransferStat::Forwarded(n)) => {
                m.file_bytes_forwarded_total.inc_by(n)
            }
            TransferOutput::Stat(TransferStat::Outcome(o)) => {
                m.file_transfers_total
                    .with_label_values(&[o.as_str()])
                    .inc();
                if o == Outcome::RateLimited {
                    m.rate_limited(MessageClass::FileOffer);
                }
            }
            TransferOutput::Event(e) => {
                shared.record(Instant::now(), Record::FileTransfer(file_record(e)))
            }
        }
    }
    r
}

/// What the recording keeps of a transfer event: the agent's side of it (the sender
/// of a file to the customer, the receiver of one from the customer), the file's name
/// and size, and the outcome (refusals and failures are `Cancelled`).
fn file_record(e: TransferEvent) -> FileTransferRecord {
    let (direction, agent) = if e.file.to_customer {
        (FileDirection::ToCustomer, e.sender)
    } else {
        (FileDirection::FromCustomer, e.receiver.unwrap_or(e.sender))
    };
    let outcome = match e.outcome {
        None => FileOutcome::Offered,
        Some(Outcome::Completed) => FileOutcome::Completed,
        Some(Outcome::Declined) => FileOutcome::Declined,
        Some(
            Outcome::Cancelled
            | Outcome::RefusedForbidden
            | Outcome::RefusedTooLarge
            | Outcome::RefusedBadName
            | Outcome::NoReceivers
            | Outcome::ProtocolError
            | Outcome::RateLimited,
        ) => FileOutcome::Cancelled,
    };
    FileTransferRecord {
        participant_id: agent.as_str().to_owned(),
        direction,
        outcome,
        size: e.file.size,
        name: e.file.name,
    }
}

/// Takes a participant's new `files` channel into use. Returns its reader and writer.
pub(super) fn open(
    shared: &Arc<Shared>,
    pid: &ParticipantId,
    channel: Arc<dyn DataChannel>,
) -> [JoinHandle<()>; 2] {
    let (tx, rx) = mpsc::channel(FILES_QUEUE);
    // A newer channel replaces an older one, whose writer then ends.
    let replaced = lock(&shared.files)
        .sinks
        .insert(pid.clone(), tx.clone())
        .is_some();
    with_files(shared, |core| core.channel_opened(pid));
    if !replaced {
        shared.open_channels(FILES_LABEL).inc();
    }
    [
        tokio::spawn(write(rx, channel.clone())),
        tokio::spawn(read(shared.clone(), pid.clone(), channel, tx)),
    ]
}

/// Stops using a participant's `files` channel (if `tx` is still its queue, or any
/// when `None`): its transfers are cancelled.
pub(super) fn release(shared: &Shared, pid: &ParticipantId, tx: Option<&mpsc::Sender<FileMsg>>) {
    let ours = {
        let mut plane = lock(&shared.files);
        let ours = plane
            .sinks
            .get(pid)
            .is_some_and(|s| tx.is_none_or(|t| t.same_channel(s)));
        if ours {
            plane.sinks.remove(pid);
        }
        ours
    };
    if ours {
        shared.open_channels(FILES_LABEL).dec();
        with_files(shared, |core| core.channel_closed(Instant::now(), pid));
    }
}

/// Decodes a participant's messages until its channel closes, then releases it.
async fn read(
    shared: Arc<Shared>,
    pid: ParticipantId,
    channel: Arc<dyn DataChannel>,
    tx: mpsc::Sender<FileMsg>,
) {
    while let Some(event) = channel.poll().await {
        let DataChannelEvent::OnMessage(msg) = event else {
            continue;
        };
        let decoded = if msg.is_string {
            None
        } else {
            files::decode(&msg.data.freeze()).ok()
        };
        match decoded {
            Some(m) => with_files(&shared, |core| core.handle(Instant::now(), &pid, m)),
            None => {
                tracing::debug!(participant = %pid.as_str(), "malformed files message dropped");
                shared
                    .inner
                    .metrics
                    .messages_rejected_total
                    .with_label_values(&[ErrorCode::BadRequest.as_str()])
                    .inc();
            }
        }
    }
    release(&shared, &pid, Some(&tx));
}

/// Encodes and sends what the core queued for one participant, in order; closes the
/// channel when its queue is dropped (the participant left, or overflowed).
async fn write(mut rx: mpsc::Receiver<FileMsg>, channel: Arc<dyn DataChannel>) {
    while let Some(msg) = rx.recv().await {
        let mut buf = BytesMut::with_capacity(msg.encoded_len());
        if let Err(e) = files::encode(&msg, &mut buf) {
            // The core only forwards what decoded, so this is a bug, not bad input.
            tracing::error!(error = %e, kind = msg.kind(), "cannot encode a files message");
            continue;
        }
        if channel.send(buf).await.is_err() {
            break;
        }
    }
    let _ = channel.close().await;
}
