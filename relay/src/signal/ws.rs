//! The WebSockets: one per participant (`/v1/sessions/{id}/ws`) and the agent console
//! (`/v1/agent/ws`).
//!
//! Each connection has a bounded outbound queue filled by the actor and a writer task
//! that empties it; the reader parses each text frame with the size limit and hands
//! valid messages to the core. Bad input gets an `error` message and nothing else: the
//! socket and the session stay up.

use std::sync::Arc;
use std::sync::atomic::{AtomicU16, Ordering};
use std::time::Instant;

use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Path, Query, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use futures_util::{SinkExt, StreamExt};
use relay_codec::wire::{self, ErrorCode, ServerMsg};
use serde::Deserialize;
use tokio::sync::{Notify, mpsc};
use tracing::Instrument;

use super::AppState;
use super::actor::{ActorGone, CONN_QUEUE, ConnHandle, Outbound};
use super::http::{ApiError, bearer};
use crate::auth::AuthError;
use crate::identity::AgentIdentity;
use crate::session::{ConnId, Node, SessionId};

/// `?token=` of a WebSocket upgrade.
#[derive(Debug, Deserialize)]
pub struct TokenQuery {
    token: Option<String>,
}

/// The close code of a connection whose frame was over [`frame_ceiling`] (RFC 6455
/// "Message Too Big").
const MESSAGE_TOO_BIG: u16 = 1009;

/// The close code of every other close by the relay.
const NORMAL_CLOSURE: u16 = 1000;

/// Whether a WebSocket read failed because the frame or message was over the size limit.
fn is_too_big(error: axum::Error) -> bool {
    matches!(
        error.into_inner().downcast_ref::<tungstenite::Error>(),
        Some(tungstenite::Error::Capacity(_))
    )
}

/// How long a closing handshake may wait on a client that does not read.
const WRITE_GRACE: std::time::Duration = std::time::Duration::from_secs(1);

#[derive(Clone, Copy)]
enum Kind {
    Session,
    Console,
}

impl Kind {
    fn label(self) -> &'static str {
        match self {
            Kind::Session => "session",
            Kind::Console => "console",
        }
    }
}

/// Frames above this are cut off by the WebSocket layer itself (the connection closes
/// with [`MESSAGE_TOO_BIG`] and the frame is counted as `message_too_large`); frames
/// between the configured limit and this get a polite `message_too_large` error and the
/// socket stays up.
fn frame_ceiling(limit: usize) -> usize {
    (limit * 4).max(64 * 1024)
}

/// `GET /v1/sessions/{id}/ws?token=…`: a participant's session WebSocket.
pub async fn session(
    State(state): State<AppState>,
    Path(sid): Path<String>,
    Query(q): Query<TokenQuery>,
    ws: WebSocketUpgrade,
) -> Response {
    let Some(token) = q.token.filter(|t| !t.is_empty()) else {
        return ApiError::new(
            ErrorCode::Unauthorized,
            "`?token=<participant_token>` is required",
        )
        .into_response();
    };
    let limit = state.config.limits.max_message_bytes;
    ws.max_message_size(frame_ceiling(limit))
        .on_upgrade(move |socket| async move {
            let sid = SessionId::from_wire(&sid);
            let registered = register(&state, move |node, now, conn| {
                node.connect(now, &sid, &token, conn)
            })
            .await;
            match registered {
                Ok(Ok(channel)) => pump(state, Kind::Session, socket, channel).await,
                Ok(Err(e)) => refuse(socket, e.code(), &e.to_string()).await,
                Err(_) => refuse(socket, ErrorCode::Internal, "the node is shutting down").await,
            }
        })
}

/// `GET /v1/agent/ws`: an agent's console, authenticated by its JWT.
pub async fn console(
    State(state): State<AppState>,
    headers: HeaderMap,
    Query(q): Query<TokenQuery>,
    ws: WebSocketUpgrade,
) -> Response {
    let token = bearer(&headers).map(str::to_owned).or(q.token);
    let agent: AgentIdentity = match token
        .ok_or(AuthError::Missing)
        .and_then(|t| state.verifier.verify(&t))
    {
        Ok(a) => a,
        Err(e) => return ApiError::from(e).into_response(),
    };
    let limit = state.config.limits.max_message_bytes;
    ws.max_message_size(frame_ceiling(limit))
        .on_upgrade(move |socket| async move {
            let registered = register(&state, move |node, now, conn| {
                node.console_opened(now, conn, &agent);
                Ok::<(), ()>(())
            })
            .await;
            if let Ok(Ok(channel)) = registered {
                pump(state, Kind::Console, socket, channel).await;
            }
        })
}

/// A registered connection: its id, its outbound queue and its kill switch.
struct Channel {
    conn: ConnId,
    tx: mpsc::Sender<Outbound>,
    rx: mpsc::Receiver<Outbound>,
    kill: Arc<Notify>,
}

/// Gives a new connection an id and a queue, and lets the core accept it with `open`
/// (in the same actor step, so nothing the core sends in reply is lost).
async fn register<E: Send + 'static>(
    state: &AppState,
    open: impl FnOnce(&mut Node, Instant, ConnId) -> Result<(), E> + Send + 'static,
) -> Result<Result<Channel, E>, ActorGone> {
    let conn = ConnId(state.next_conn.fetch_add(1, Ordering::Relaxed));
    let (tx, rx) = mpsc::channel(CONN_QUEUE);
    let kill = Arc::new(Notify::new());
    let handle = ConnHandle {
        tx: tx.clone(),
        kill: kill.clone(),
    };
    let accepted = state
        .actor
        .with_core(move |core| {
            core.conns.insert(conn, handle);
            let r = open(&mut core.node, Instant::now(), conn);
            if r.is_err() {
                core.conns.remove(&conn);
            }
            r
        })
        .await?;
    Ok(accepted.map(|()| Channel { conn, tx, rx, kill }))
}

/// Sends one error and closes: for connections the core refused.
async fn refuse(mut socket: WebSocket, code: ErrorCode, message: &str) {
    let msg = ServerMsg::Error {
        code,
        message: message.to_owned(),
        reference: None,
    };
    if let Ok(text) = serde_json::to_string(&msg) {
        let _ = socket.send(Message::Text(text.into())).await;
    }
    let _ = socket
        .send(Message::Close(Some(CloseFrame {
            code: 4000 + status_hint(code),
            reason: code.as_str().into(),
        })))
        .await;
}

/// A short numeric hint in the close code (4401 unauthorized, 4410 gone, …).
fn status_hint(code: ErrorCode) -> u16 {
    super::http::status_of(code).as_u16()
}

fn error_text(code: ErrorCode, message: String, reference: Option<u64>) -> String {
    serde_json::to_string(&ServerMsg::Error {
        code,
        message,
        reference,
    })
    .unwrap_or_default()
}

/// Runs a registered connection until either side closes it.
async fn pump(state: AppState, kind: Kind, socket: WebSocket, channel: Channel) {
    let span = tracing::info_span!("ws", kind = kind.label(), conn = channel.conn.0);
    pump_in(state, kind, socket, channel).instrument(span).await
}

async fn pump_in(state: AppState, kind: Kind, socket: WebSocket, channel: Channel) {
    let Channel {
        conn,
        tx,
        mut rx,
        kill,
    } = channel;
    tracing::debug!("connected");
    let gauge = state
        .metrics
        .ws_connections_active
        .with_label_values(&[kind.label()]);
    gauge.inc();
    let (mut sink, mut stream) = socket.split();
    // The code the writer closes with: normal, unless the reader saw an oversized frame.
    let close_code = Arc::new(AtomicU16::new(NORMAL_CLOSURE));
    let writer_close_code = close_code.clone();
    let mut writer = tokio::spawn(async move {
        let write = async {
            while let Some(Outbound::Text(text)) = rx.recv().await {
                if sink.send(Message::Text(text.into())).await.is_err() {
                    return;
                }
            }
            // `Close` from the core, or every sender gone: close politely, but do not
            // wait long on a client that does not read.
            let code = writer_close_code.load(Ordering::SeqCst);
            let reason = if code == MESSAGE_TOO_BIG {
                "message too big"
            } else {
                ""
            };
            let close = sink.send(Message::Close(Some(CloseFrame {
                code,
                reason: reason.into(),
            })));
            let _ = tokio::time::timeout(WRITE_GRACE, close).await;
        };
        // A client that stopped reading is cut at once, even mid-send: dropping the
        // socket closes the TCP connection.
        tokio::select! {
            _ = write => {},
            _ = kill.notified() => {},
        }
    });

    let limit = state.config.limits.max_message_bytes;
    let mut writer_done = false;
    loop {
        let frame = tokio::select! {
            frame = stream.next() => frame,
            _ = &mut writer => {
                writer_done = true;
                break;
            }
        };
        let bytes = match frame {
            Some(Ok(Message::Text(text))) => text,
            Some(Ok(Message::Binary(_))) => {
                reject(
                    &state,
                    &tx,
                    ErrorCode::BadRequest,
                    "only JSON text messages are accepted".into(),
                    None,
                );
                continue;
            }
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
            Some(Err(e)) => {
                if is_too_big(e) {
                    state
                        .metrics
                        .messages_rejected_total
                        .with_label_values(&[ErrorCode::MessageTooLarge.as_str()])
                        .inc();
                    close_code.store(MESSAGE_TOO_BIG, Ordering::SeqCst);
                }
                break;
            }
            Some(Ok(Message::Close(_))) | None => break,
        };
        match wire::parse_client_msg(bytes.as_bytes(), limit) {
            Ok(envelope) => {
                let sent = state
                    .actor
                    .call(move |node, now| node.message(now, conn, envelope))
                    .await;
                if sent.is_err() {
                    break;
                }
            }
            Err(e) => {
                let reference = if bytes.len() <= limit {
                    wire::peek_id(bytes.as_bytes())
                } else {
                    None
                };
                reject(&state, &tx, e.code(), e.to_string(), reference);
            }
        }
    }

    let _ = state
        .actor
        .with_core(move |core| {
            core.conns.remove(&conn);
            let now = Instant::now();
            match kind {
                Kind::Session => core.node.disconnected(now, conn),
                Kind::Console => core.node.console_closed(now, conn),
            }
        })
        .await;
    drop(tx);
    if !writer_done {
        let _ = tokio::time::timeout(std::time::Duration::from_secs(5), writer).await;
    }
    gauge.dec();
}

/// Answers bad input on this connection only; counted, the session is untouched.
fn reject(
    state: &AppState,
    tx: &mpsc::Sender<Outbound>,
    code: ErrorCode,
    message: String,
    reference: Option<u64>,
) {
    state
        .metrics
        .messages_rejected_total
        .with_label_values(&[code.as_str()])
        .inc();
    let _ = tx.try_send(Outbound::Text(error_text(code, message, reference)));
}
