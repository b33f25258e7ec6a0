//! The `chat` and `files` data channels a customer and an agent open next to `input`
//! (`docs/protocol.md`, "Chat and file transfer on data channels").
//!
//! - [`ChatChannel`]: sends `chat` messages as the WebSocket would (JSON text) and keeps
//!   the [`ChatMessage`]s the relay delivers on the channel.
//! - [`FileTransfers`]: both sides of file transfer with `relay_codec::files`: offering
//!   a file held in memory (chunks of 16 KiB within the relay's 256 KiB window, then
//!   `Complete` with its SHA-256), and receiving: offers wait for [`FileTransfers::accept`]
//!   or [`FileTransfers::decline`] unless auto-accepted; chunks are checked for order and
//!   credited every 64 KiB; a completed file is kept if its size and SHA-256 match.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use relay_codec::files::{self, CancelReason, FileMsg, MAX_CHUNK_BYTES, TransferId};
use relay_codec::wire::{Audience, ChatMessage, ClientMsg, ServerMsg};
use sha2::{Digest, Sha256};
use tokio::sync::watch;
use webrtc::data_channel::DataChannel;

use super::ClientError;
use super::peer::{DataChannelMessage, lock, record_data_channel};

/// Label of the data channel that carries chat.
pub const CHAT_LABEL: &str = "chat";
/// Label of the data channel that carries file transfers.
pub const FILES_LABEL: &str = "files";
/// Bytes a sender may send beyond its receivers' credit: the relay's window.
pub const FILE_WINDOW: u64 = 256 * 1024;
/// A receiver credits the sender every this many bytes (and at the end).
pub const CREDIT_EVERY: u64 = 64 * 1024;

/// SHA-256 of a file, as `Complete` carries it.
pub fn file_sha256(data: &[u8]) -> [u8; 32] {
    Sha256::digest(data).into()
}

/// Waits until `ready` holds for the watched value, within `timeout`.
async fn wait_until<T>(
    rx: &mut watch::Receiver<T>,
    timeout: Duration,
    what: &'static str,
    ready: impl FnMut(&T) -> bool,
) -> Result<(), ClientError> {
    match tokio::time::timeout(timeout, rx.wait_for(ready)).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(_)) => Err(ClientError::Protocol(format!(
            "{what}: the client went away"
        ))),
        Err(_) => Err(ClientError::Timeout(what)),
    }
}

/// The client's `chat` data channel.
pub struct ChatChannel {
    dc: Arc<dyn DataChannel>,
    open: watch::Receiver<bool>,
    received: watch::Sender<Vec<ChatMessage>>,
}

impl std::fmt::Debug for ChatChannel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatChannel")
            .field("open", &*self.open.borrow())
            .field("received", &self.received.borrow().len())
            .finish()
    }
}

impl ChatChannel {
    /// Wraps a channel the client created; the returned future reads it until it
    /// closes, recording every message in `log`.
    pub(crate) fn new(
        dc: Arc<dyn DataChannel>,
        log: Arc<Mutex<Vec<DataChannelMessage>>>,
    ) -> (Arc<ChatChannel>, impl Future<Output = ()> + Send + 'static) {
        let (open_tx, open) = watch::channel(false);
        let (received, _) = watch::channel(Vec::new());
        let chat = Arc::new(ChatChannel {
            dc: Arc::clone(&dc),
            open,
            received,
        });
        let reader = {
            let chat = Arc::clone(&chat);
            record_data_channel(dc, log, Some(open_tx), move |message| {
                chat.on_message(&message);
                std::future::ready(())
            })
        };
        (chat, reader)
    }

    /// Waits until the channel is open.
    pub async fn wait_open(&self, timeout: Duration) -> Result<(), ClientError> {
        wait_until(
            &mut self.open.clone(),
            timeout,
            "the chat data channel",
            |o| *o,
        )
        .await
    }

    fn on_message(&self, m: &DataChannelMessage) {
        if let Ok(ServerMsg::Chat(c)) = serde_json::from_slice::<ServerMsg>(&m.data) {
            self.received.send_modify(|v| v.push(c));
        }
    }

    /// Sends a `chat` message on the channel (not the WebSocket).
    pub async fn send(&self, text: &str, audience: Audience) -> Result<(), ClientError> {
        let msg = ClientMsg::Chat {
            text: text.to_owned(),
            audience,
        };
        let json = serde_json::to_string(&msg).map_err(|e| ClientError::Protocol(e.to_string()))?;
        self.send_raw(&json).await
    }

    /// Sends a text message as it is (malformed or oversized input included).
    pub async fn send_raw(&self, text: &str) -> Result<(), ClientError> {
        self.dc.send_text(text).await?;
        Ok(())
    }

    /// The chat messages the relay delivered on this channel, in order.
    pub fn messages(&self) -> Vec<ChatMessage> {
        self.received.borrow().clone()
    }

    /// Waits until at least `n` chat messages arrived on the channel.
    pub async fn wait_messages(&self, n: usize, timeout: Duration) -> Result<(), ClientError> {
        let mut rx = self.received.subscribe();
        wait_until(&mut rx, timeout, "chat on the data channel", |v| {
            v.len() >= n
        })
        .await
    }
}

/// An offer of a file to this client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileOffer {
    /// The id the relay gave the transfer for this client.
    pub id: TransferId,
    /// The file's name, as the sender gave it.
    pub name: String,
    /// Its size in bytes.
    pub size: u64,
    /// Its MIME type, if the sender gave one.
    pub mime: Option<String>,
    /// When the offer arrived.
    pub received_at: Instant,
}

/// A file received whole: every byte in order, its size and SHA-256 as announced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReceivedFile {
    /// The offer it answered.
    pub offer: FileOffer,
    /// The file.
    pub data: Bytes,
    /// Its SHA-256 (checked against the sender's `Complete`).
    pub sha256: [u8; 32],
    /// When `Complete` arrived.
    pub completed_at: Instant,
}

/// Where a transfer to this client stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IncomingState {
    /// Offered; waiting for [`FileTransfers::accept`] or [`FileTransfers::decline`].
    Offered,
    /// Accepted; bytes received so far.
    Receiving(u64),
    /// Declined by this client.
    Declined,
    /// Received whole (see [`FileTransfers::received`]).
    Completed,
    /// Cancelled by the relay or by this client.
    Cancelled(CancelReason),
    /// Broken: out-of-order bytes, wrong size or wrong SHA-256 (why).
    Corrupt(String),
}

/// Where a transfer from this client stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OutgoingState {
    /// Offered; waiting for the receivers' answers.
    Offered,
    /// Accepted; bytes sent so far and the relay's last credit.
    Sending {
        /// Bytes sent.
        sent: u64,
        /// Bytes every receiver has consumed.
        credited: u64,
    },
    /// Every byte and `Complete` were sent.
    Sent,
    /// Every receiver declined.
    Declined,
    /// Cancelled (by the relay, a receiver leaving, or this client).
    Cancelled(CancelReason),
}

impl OutgoingState {
    /// Whether nothing more will happen to the transfer.
    pub fn is_final(&self) -> bool {
        matches!(
            self,
            OutgoingState::Sent | OutgoingState::Declined | OutgoingState::Cancelled(_)
        )
    }
}

#[derive(Debug)]
struct Incoming {
    offer: FileOffer,
    state: IncomingState,
    buf: BytesMut,
    credited: u64,
}

#[derive(Debug, Default)]
struct Records {
    incoming: BTreeMap<TransferId, Incoming>,
    outgoing: BTreeMap<TransferId, OutgoingState>,
    offers: Vec<FileOffer>,
    received: Vec<ReceivedFile>,
}

/// The client's `files` data channel: files it offers and files offered to it.
pub struct FileTransfers {
    dc: Arc<dyn DataChannel>,
    open: watch::Receiver<bool>,
    auto_accept: bool,
    next_id: AtomicU32,
    records: Mutex<Records>,
    /// Bumped on every change, to wake waiters.
    changed: watch::Sender<u64>,
}

impl std::fmt::Debug for FileTransfers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FileTransfers")
            .field("open", &*self.open.borrow())
            .field("auto_accept", &self.auto_accept)
            .finish_non_exhaustive()
    }
}

impl FileTransfers {
    /// Wraps a channel the client created; the returned future reads it until it
    /// closes, recording every message in `log`.
    pub(crate) fn new(
        dc: Arc<dyn DataChannel>,
        log: Arc<Mutex<Vec<DataChannelMessage>>>,
        auto_accept: bool,
    ) -> (
        Arc<FileTransfers>,
        impl Future<Output = ()> + Send + 'static,
    ) {
        let (open_tx, open) = watch::channel(false);
        let (changed, _) = watch::channel(0);
        let files = Arc::new(FileTransfers {
            dc: Arc::clone(&dc),
            open,
            auto_accept,
            next_id: AtomicU32::new(1),
            records: Mutex::new(Records::default()),
            changed,
        });
        let reader = {
            let files = Arc::clone(&files);
            record_data_channel(dc, log, Some(open_tx), move |message| {
                let files = Arc::clone(&files);
                async move { files.on_message(&message).await }
            })
        };
        (files, reader)
    }

    /// Waits until the channel is open.
    pub async fn wait_open(&self, timeout: Duration) -> Result<(), ClientError> {
        wait_until(
            &mut self.open.clone(),
            timeout,
            "the files data channel",
            |o| *o,
        )
        .await
    }

    /// Offers `data` as a file named `name` and sends it in the background once the
    /// receivers accept. Returns the transfer's id (see [`FileTransfers::outgoing`]).
    pub async fn offer(
        self: &Arc<Self>,
        name: &str,
        data: impl Into<Bytes>,
        mime: Option<&str>,
    ) -> Result<TransferId, ClientError> {
        let data: Bytes = data.into();
        let id = TransferId(self.next_id.fetch_add(1, Ordering::Relaxed) & !TransferId::RELAY_BIT);
        lock(&self.records)
            .outgoing
            .insert(id, OutgoingState::Offered);
        self.send(&FileMsg::Offer {
            id,
            size: data.len() as u64,
            name: name.to_owned(),
            mime: mime.map(str::to_owned),
        })
        .await?;
        let me = Arc::clone(self);
        tokio::spawn(async move {
            if let Err(e) = me.send_file(id, data).await {
                tracing::warn!(error = %e, "client: sending a file failed");
            }
        });
        Ok(id)
    }

    /// Sends a raw message as it is (for protocol tests).
    pub async fn send_msg(&self, msg: &FileMsg) -> Result<(), ClientError> {
        self.send(msg).await
    }

    /// Accepts an offer.
    pub async fn accept(&self, id: TransferId) -> Result<(), ClientError> {
        self.answer(id, true).await
    }

    /// Declines an offer.
    pub async fn decline(&self, id: TransferId) -> Result<(), ClientError> {
        self.answer(id, false).await
    }

    /// Cancels a transfer this client sends or receives.
    pub async fn cancel(&self, id: TransferId) -> Result<(), ClientError> {
        self.update(|r| {
            if let Some(i) = r.incoming.get_mut(&id) {
                i.state = IncomingState::Cancelled(CancelReason::Cancelled);
            }
            if let Some(o) = r.outgoing.get_mut(&id) {
                *o = OutgoingState::Cancelled(CancelReason::Cancelled);
            }
        });
        self.send(&FileMsg::Cancel {
            id,
            reason: CancelReason::Cancelled,
        })
        .await
    }

    /// Every offer made to this client, in order.
    pub fn offers(&self) -> Vec<FileOffer> {
        lock(&self.records).offers.clone()
    }

    /// Where an incoming transfer stands.
    pub fn incoming(&self, id: TransferId) -> Option<IncomingState> {
        lock(&self.records)
            .incoming
            .get(&id)
            .map(|i| i.state.clone())
    }

    /// Where an outgoing transfer stands.
    pub fn outgoing(&self, id: TransferId) -> Option<OutgoingState> {
        lock(&self.records).outgoing.get(&id).cloned()
    }

    /// Files received whole, in order of completion.
    pub fn received(&self) -> Vec<ReceivedFile> {
        lock(&self.records).received.clone()
    }

    /// Waits until at least `n` offers arrived.
    pub async fn wait_offers(&self, n: usize, timeout: Duration) -> Result<(), ClientError> {
        self.wait(timeout, "file offers", |r| r.offers.len() >= n)
            .await
    }

    /// Waits until at least `n` files were received whole.
    pub async fn wait_received(&self, n: usize, timeout: Duration) -> Result<(), ClientError> {
        self.wait(timeout, "received files", |r| r.received.len() >= n)
            .await
    }

    /// Waits until an outgoing transfer reaches a final state, and returns it.
    pub async fn wait_outgoing(
        &self,
        id: TransferId,
        timeout: Duration,
    ) -> Result<OutgoingState, ClientError> {
        self.wait(timeout, "the end of a file transfer", |r| {
            r.outgoing.get(&id).is_none_or(OutgoingState::is_final)
        })
        .await?;
        self.outgoing(id)
            .ok_or_else(|| ClientError::Protocol(format!("no outgoing transfer {id}")))
    }

    async fn wait(
        &self,
        timeout: Duration,
        what: &'static str,
        mut ready: impl FnMut(&Records) -> bool,
    ) -> Result<(), ClientError> {
        let mut rx = self.changed.subscribe();
        wait_until(&mut rx, timeout, what, |_| ready(&lock(&self.records))).await
    }

    fn update<R>(&self, f: impl FnOnce(&mut Records) -> R) -> R {
        let r = f(&mut lock(&self.records));
        self.changed.send_modify(|n| *n += 1);
        r
    }

    async fn send(&self, msg: &FileMsg) -> Result<(), ClientError> {
        let bytes =
            files::encode_to_bytes(msg).map_err(|e| ClientError::Protocol(e.to_string()))?;
        self.dc.send(bytes).await?;
        Ok(())
    }

    async fn answer(&self, id: TransferId, accept: bool) -> Result<(), ClientError> {
        let known = self.update(|r| match r.incoming.get_mut(&id) {
            Some(i) if i.state == IncomingState::Offered => {
                i.state = if accept {
                    IncomingState::Receiving(0)
                } else {
                    IncomingState::Declined
                };
                true
            }
            _ => false,
        });
        if !known {
            return Err(ClientError::Protocol(format!("no open offer {id}")));
        }
        let msg = if accept {
            FileMsg::Accept { id }
        } else {
            FileMsg::Decline { id }
        };
        self.send(&msg).await
    }

    /// Waits for the answers, then sends the chunks within the window and `Complete`.
    async fn send_file(&self, id: TransferId, data: Bytes) -> Result<(), ClientError> {
        let size = data.len() as u64;
        let mut rx = self.changed.subscribe();
        let mut sent = 0u64;
        loop {
            let state = self.outgoing(id);
            let credited = match state {
                Some(OutgoingState::Sending { credited, .. }) => credited,
                Some(OutgoingState::Offered) => {
                    let _ = rx.changed().await;
                    continue;
                }
                _ => return Ok(()),
            };
            if sent == size {
                break;
            }
            let end = (sent + MAX_CHUNK_BYTES as u64).min(size);
            if end > credited + FILE_WINDOW {
                if rx.changed().await.is_err() {
                    return Ok(());
                }
                continue;
            }
            // Usize conversions are exact: both bounds are at most `data.len()`.
            let chunk = data.slice(sent as usize..end as usize);
            self.send(&FileMsg::Chunk {
                id,
                offset: sent,
                data: chunk,
            })
            .await?;
            sent = end;
            self.update(|r| {
                if let Some(OutgoingState::Sending { sent: s, .. }) = r.outgoing.get_mut(&id) {
                    *s = sent;
                }
            });
        }
        let sha256 = file_sha256(&data);
        self.send(&FileMsg::Complete { id, sha256 }).await?;
        self.update(|r| {
            if let Some(o) = r.outgoing.get_mut(&id) {
                if !o.is_final() {
                    *o = OutgoingState::Sent;
                }
            }
        });
        Ok(())
    }

    async fn on_message(&self, m: &DataChannelMessage) {
        if m.is_string {
            return;
        }
        let Ok(msg) = files::decode(&m.data) else {
            tracing::warn!("client: undecodable files message");
            return;
        };
        let mut reply = None;
        let id = msg.id();
        self.update(|r| match msg {
            FileMsg::Offer {
                id,
                size,
                name,
                mime,
            } => {
                let offer = FileOffer {
                    id,
                    name,
                    size,
                    mime,
                    received_at: m.received_at,
                };
                r.offers.push(offer.clone());
                let state = if self.auto_accept {
                    reply = Some(FileMsg::Accept { id });
                    IncomingState::Receiving(0)
                } else {
                    IncomingState::Offered
                };
                r.incoming.insert(
                    id,
                    Incoming {
                        offer,
                        state,
                        buf: BytesMut::new(),
                        credited: 0,
                    },
                );
            }
            FileMsg::Chunk { offset, data, .. } => {
                let Some(i) = r.incoming.get_mut(&id) else {
                    return;
                };
                if !matches!(i.state, IncomingState::Receiving(_)) {
                    return;
                }
                if offset != i.buf.len() as u64 || offset + data.len() as u64 > i.offer.size {
                    i.state = IncomingState::Corrupt(format!(
                        "chunk at {offset} after {} bytes",
                        i.buf.len()
                    ));
                    reply = Some(FileMsg::Cancel {
                        id,
                        reason: CancelReason::Cancelled,
                    });
                    return;
                }
                i.buf.extend_from_slice(&data);
                let have = i.buf.len() as u64;
                i.state = IncomingState::Receiving(have);
                if have - i.credited >= CREDIT_EVERY || have == i.offer.size {
                    i.credited = have;
                    reply = Some(FileMsg::Credit { id, consumed: have });
                }
            }
            FileMsg::Complete { sha256, .. } => {
                let Some(i) = r.incoming.get_mut(&id) else {
                    return;
                };
                if !matches!(i.state, IncomingState::Receiving(_)) {
                    return;
                }
                let data = std::mem::take(&mut i.buf).freeze();
                let actual = file_sha256(&data);
                if data.len() as u64 != i.offer.size || actual != sha256 {
                    i.state = IncomingState::Corrupt(format!(
                        "{} of {} bytes, SHA-256 {}",
                        data.len(),
                        i.offer.size,
                        if actual == sha256 {
                            "matches"
                        } else {
                            "differs"
                        }
                    ));
                    return;
                }
                i.state = IncomingState::Completed;
                let offer = i.offer.clone();
                r.received.push(ReceivedFile {
                    offer,
                    data,
                    sha256,
                    completed_at: m.received_at,
                });
            }
            FileMsg::Cancel { reason, .. } => {
                if id.is_relay_chosen() {
                    if let Some(i) = r.incoming.get_mut(&id) {
                        i.state = IncomingState::Cancelled(reason);
                        i.buf = BytesMut::new();
                    }
                } else if let Some(o) = r.outgoing.get_mut(&id) {
                    *o = OutgoingState::Cancelled(reason);
                }
            }
            FileMsg::Accept { .. } => {
                if let Some(o) = r.outgoing.get_mut(&id) {
                    if *o == OutgoingState::Offered {
                        *o = OutgoingState::Sending {
                            sent: 0,
                            credited: 0,
                        };
                    }
                }
            }
            FileMsg::Decline { .. } => {
                if let Some(o) = r.outgoing.get_mut(&id) {
                    *o = OutgoingState::Declined;
                }
            }
            FileMsg::Credit { consumed, .. } => {
                if let Some(OutgoingState::Sending { credited, .. }) = r.outgoing.get_mut(&id) {
                    *credited = (*credited).max(consumed);
                }
            }
        });
        if let Some(reply) = reply {
            if let Err(e) = self.send(&reply).await {
                tracing::warn!(error = %e, "client: files reply not sent");
            }
        }
    }
}
