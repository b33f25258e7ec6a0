//! The `chat` data channel: the session's chat, as on the WebSocket, over a
//! participant's peer connection.
//!
//! The channel carries the same JSON as the WebSocket's chat: `{"type":"chat",…}`
//! ([`ClientMsg::Chat`](relay_codec::wire::ClientMsg::Chat)) from the client,
//! [`ServerMsg::Chat`] to it. This module only moves bytes; every rule (who may chat,
//! who sees what, masking, notes) stays in the session core:
//!
//! - inbound, each text message is parsed with the WebSocket's parser and size limit
//!   (`limits.max_message_bytes`) and handed to
//!   [`Node::channel_message`](crate::session::Node::channel_message); bad input is
//!   counted (`relay_messages_rejected_total{code}`) and answered with `error` on the
//!   participant's WebSocket, and nothing else happens;
//! - outbound, the core addresses chat for a participant with an open channel to the
//!   channel ([`Output::ChatOnChannel`](crate::session::Output::ChatOnChannel)); the actor
//!   queues it here through [`MediaPlane::send_chat`](super::MediaPlane::send_chat), and
//!   the writer sends it. Whatever cannot go on the channel (queue full, channel gone)
//!   goes to the WebSocket instead, so each message arrives exactly once.

use std::sync::Arc;
use std::time::Instant;

use relay_codec::wire::{self, ErrorCode, ServerMsg};
use tokio::sync::mpsc;
use webrtc::data_channel::{DataChannel, DataChannelEvent};

use super::session::Shared;
use crate::session::ParticipantId;

/// The label of the chat data channel.
pub(super) const CHAT_LABEL: &str = "chat";

/// Chat messages queued for one channel before the rest fall back to the WebSocket
/// (as many as a WebSocket's queue holds).
const CHAT_QUEUE: usize = crate::signal::actor::CONN_QUEUE;

/// Takes a participant's new `chat` channel into use: chat for it goes there from now
/// on. Returns the reader; the writer ends by itself once the channel is released.
pub(super) async fn open(
    shared: Arc<Shared>,
    pid: ParticipantId,
    channel: Arc<dyn DataChannel>,
) -> tokio::task::JoinHandle<()> {
    let (tx, rx) = mpsc::channel(CHAT_QUEUE);
    // A newer channel replaces an older one; the older one's writer drains and ends.
    let replaced = shared
        .inner
        .chat
        .insert((shared.id.clone(), pid.clone()), tx.clone())
        .is_some();
    tokio::spawn(write(shared.clone(), pid.clone(), channel.clone(), rx));
    if let Some(actor) = shared.inner.actor.get() {
        let (sid, p) = (shared.id.clone(), pid.clone());
        let _ = actor
            .call(move |node, _| node.chat_channel(&sid, &p, true))
            .await;
    }
    if !replaced {
        shared.open_channels(CHAT_LABEL).inc();
    }
    tokio::spawn(read(shared, pid, channel, tx))
}

/// Stops using a participant's `chat` channel (if `tx` is still its writer's, or for
/// any channel when `tx` is `None`): chat goes back to its WebSocket.
pub(super) async fn release(
    shared: &Shared,
    pid: &ParticipantId,
    tx: Option<&mpsc::Sender<ServerMsg>>,
) {
    let key = (shared.id.clone(), pid.clone());
    let removed = shared
        .inner
        .chat
        .remove_if(&key, |_, current| {
            tx.is_none_or(|t| t.same_channel(current))
        })
        .is_some();
    if !removed {
        return;
    }
    shared.open_channels(CHAT_LABEL).dec();
    if let Some(actor) = shared.inner.actor.get() {
        let (sid, p) = (shared.id.clone(), pid.clone());
        let _ = actor
            .call(move |node, _| node.chat_channel(&sid, &p, false))
            .await;
    }
}

/// Reads a participant's chat messages until the channel closes, then releases it.
async fn read(
    shared: Arc<Shared>,
    pid: ParticipantId,
    channel: Arc<dyn DataChannel>,
    tx: mpsc::Sender<ServerMsg>,
) {
    let limit = shared.inner.settings.max_message_bytes;
    let metrics = shared.inner.metrics.clone();
    while let Some(event) = channel.poll().await {
        let DataChannelEvent::OnMessage(msg) = event else {
            continue;
        };
        let parsed = if msg.is_string {
            wire::parse_client_msg(&msg.data, limit).map_err(|e| (e.code(), e.to_string()))
        } else {
            Err((
                ErrorCode::BadRequest,
                "the chat data channel carries JSON text messages".to_owned(),
            ))
        };
        match parsed {
            Ok(envelope) => {
                metrics
                    .chat_data_channel_total
                    .with_label_values(&["received"])
                    .inc();
                let Some(actor) = shared.inner.actor.get() else {
                    continue;
                };
                let (sid, p) = (shared.id.clone(), pid.clone());
                let _ = actor
                    .call(move |node, _| node.channel_message(Instant::now(), &sid, &p, envelope))
                    .await;
            }
            Err((code, message)) => {
                metrics
                    .messages_rejected_total
                    .with_label_values(&[code.as_str()])
                    .inc();
                let reference = (msg.data.len() <= limit)
                    .then(|| wire::peek_id(&msg.data))
                    .flatten();
                shared
                    .tell(
                        &pid,
                        ServerMsg::Error {
                            code,
                            message,
                            reference,
                        },
                    )
                    .await;
            }
        }
    }
    release(&shared, &pid, Some(&tx)).await;
}

/// Sends what the actor queued, in order, until the channel is released; whatever the
/// channel does not take goes to the WebSocket.
async fn write(
    shared: Arc<Shared>,
    pid: ParticipantId,
    channel: Arc<dyn DataChannel>,
    mut rx: mpsc::Receiver<ServerMsg>,
) {
    let metrics = shared.inner.metrics.clone();
    let mut usable = true;
    while let Some(msg) = rx.recv().await {
        if usable {
            let sent = match serde_json::to_string(&msg) {
                Ok(text) => channel.send_text(&text).await.is_ok(),
                Err(e) => {
                    tracing::error!(error = %e, "cannot serialise a chat message");
                    continue;
                }
            };
            if sent {
                metrics
                    .chat_data_channel_total
                    .with_label_values(&["delivered"])
                    .inc();
                continue;
            }
            usable = false;
        }
        metrics
            .chat_data_channel_total
            .with_label_values(&["fallback_websocket"])
            .inc();
        shared.tell(&pid, msg).await;
    }
}
