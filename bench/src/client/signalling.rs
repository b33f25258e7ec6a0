//! The session WebSocket: `relay_codec::wire` messages over tokio-tungstenite and rustls.
//!
//! [`Signalling::connect`] opens the socket and starts two tasks: a writer fed by a
//! bounded queue ([`SignallingSender`], cheap to clone, so a peer connection's callbacks
//! can trickle candidates), and a reader that appends every text frame, raw, to the
//! [`Transcript`] before parsing it. The transcript is what tests assert on ("the
//! customer never saw X"), so it records frames that do not parse as well.

use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use relay_codec::wire::{ChatMessage, ClientMsg, RosterEntry, ServerMsg};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::{Connector, connect_async_tls_with_config};

use super::ClientError;

/// How long [`Signalling::connect`] waits for the TCP, TLS and WebSocket handshakes.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Most `redirect` messages [`Signalling::welcome`] follows before it gives up (a
/// cluster redirects once; more means a loop).
const MAX_REDIRECTS: usize = 3;
/// Outgoing messages queued before [`SignallingSender::send`] waits.
const OUTGOING_QUEUE: usize = 256;
/// Parsed incoming messages queued before the reader stops reading the socket.
const INCOMING_QUEUE: usize = 1024;

fn ring_provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A rustls client configuration that accepts **any** server certificate (signatures
/// are still checked, so the handshake itself is real). For benchmarks against a relay
/// on loopback with its self-signed certificate; never for anything else.
pub fn insecure_tls() -> Arc<rustls::ClientConfig> {
    let provider = ring_provider();
    let verifier = Arc::new(AcceptAnyCertificate(
        provider.signature_verification_algorithms,
    ));
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("ring supports the default protocol versions")
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    Arc::new(config)
}

/// A rustls client configuration trusting exactly the certificates of a PEM file (the
/// relay writes its self-signed one to `<data-dir>/tls/cert.pem`).
pub fn tls_trusting_pem_file(
    path: impl AsRef<Path>,
) -> Result<Arc<rustls::ClientConfig>, ClientError> {
    let path = path.as_ref();
    let pem =
        std::fs::read(path).map_err(|e| ClientError::Tls(format!("{}: {e}", path.display())))?;
    tls_trusting_pem(&pem)
}

/// As [`tls_trusting_pem_file`], from PEM bytes.
pub fn tls_trusting_pem(pem: &[u8]) -> Result<Arc<rustls::ClientConfig>, ClientError> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(pem) {
        let cert = cert.map_err(|e| ClientError::Tls(format!("bad PEM certificate: {e}")))?;
        roots
            .add(cert)
            .map_err(|e| ClientError::Tls(format!("certificate not usable as a root: {e}")))?;
    }
    if roots.is_empty() {
        return Err(ClientError::Tls("the PEM holds no certificate".into()));
    }
    let config = rustls::ClientConfig::builder_with_provider(ring_provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| ClientError::Tls(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

#[derive(Debug)]
struct AcceptAnyCertificate(WebPkiSupportedAlgorithms);

impl ServerCertVerifier for AcceptAnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::resume_url;

    #[test]
    fn resume_url_replaces_only_the_token() {
        assert_eq!(
            resume_url("wss://h:1/v1/sessions/s_1/ws?token=old", "new"),
            "wss://h:1/v1/sessions/s_1/ws?token=new"
        );
        assert_eq!(
            resume_url("ws://h/v1/sessions/s_1/ws?x=1&token=old&y=2", "n"),
            "ws://h/v1/sessions/s_1/ws?x=1&y=2&token=n"
        );
        assert_eq!(resume_url("ws://h/ws", "n"), "ws://h/ws?token=n");
    }
}

/// Every text frame a [`Signalling`] received, raw, oldest first. Cloning shares it.
#[derive(Debug, Clone, Default)]
pub struct Transcript(Arc<Mutex<Vec<String>>>);

impl Transcript {
    fn lock(&self) -> MutexGuard<'_, Vec<String>> {
        // A panic while pushing a String leaves a valid Vec behind.
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn push(&self, text: String) {
        self.lock().push(text);
    }

    /// The raw text frames.
    pub fn texts(&self) -> Vec<String> {
        self.lock().clone()
    }

    /// The frames that parse as [`ServerMsg`] (others are left out).
    pub fn messages(&self) -> Vec<ServerMsg> {
        self.lock()
            .iter()
            .filter_map(|t| serde_json::from_str(t).ok())
            .collect()
    }

    /// How many frames were received.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether nothing was received.
    pub fn is_empty(&self) -> bool {
        self.lock().is_empty()
    }

    /// Whether any received frame contains `needle` (for leak checks: a name, an id).
    pub fn contains(&self, needle: &str) -> bool {
        self.lock().iter().any(|t| t.contains(needle))
    }
}

/// The sending half of a [`Signalling`]; clones share the socket.
#[derive(Debug, Clone)]
pub struct SignallingSender {
    tx: mpsc::Sender<Message>,
}

impl SignallingSender {
    /// Sends `msg` (waits while the outgoing queue is full).
    pub async fn send(&self, msg: &ClientMsg) -> Result<(), ClientError> {
        self.send_raw(encode(msg, None)?).await
    }

    /// Sends `msg` with a correlation `id`, which the relay echoes as `ref`.
    pub async fn send_with_id(&self, msg: &ClientMsg, id: u64) -> Result<(), ClientError> {
        self.send_raw(encode(msg, Some(id))?).await
    }

    /// Sends a text frame as it is (malformed input included).
    pub async fn send_raw(&self, text: String) -> Result<(), ClientError> {
        self.tx
            .send(Message::text(text))
            .await
            .map_err(|_| ClientError::SignallingClosed)
    }

    /// Sends `msg` without waiting; fails if the queue is full or the socket is gone.
    /// For callbacks that run on a peer connection's driver and must not block it.
    pub fn try_send(&self, msg: &ClientMsg) -> Result<(), ClientError> {
        self.tx
            .try_send(Message::text(encode(msg, None)?))
            .map_err(|e| match e {
                mpsc::error::TrySendError::Full(_) => ClientError::SignallingBacklog,
                mpsc::error::TrySendError::Closed(_) => ClientError::SignallingClosed,
            })
    }

    /// Sends a close frame; the writer stops after it.
    pub async fn close(&self) -> Result<(), ClientError> {
        self.tx
            .send(Message::Close(None))
            .await
            .map_err(|_| ClientError::SignallingClosed)
    }
}

fn encode(msg: &ClientMsg, id: Option<u64>) -> Result<String, ClientError> {
    let mut value = serde_json::to_value(msg).map_err(|e| ClientError::Protocol(e.to_string()))?;
    if let (Some(id), Some(obj)) = (id, value.as_object_mut()) {
        obj.insert("id".into(), id.into());
    }
    Ok(value.to_string())
}

/// The relay's first message on a session WebSocket.
#[derive(Debug, Clone, PartialEq)]
pub struct Welcome {
    /// The session.
    pub session_id: String,
    /// This participant.
    pub you: RosterEntry,
    /// Everyone else this participant may see.
    pub roster: Vec<RosterEntry>,
    /// Recent chat this participant may see.
    pub chat: Vec<ChatMessage>,
    /// The single-use token of this participant's next connection (a secret).
    pub resume_token: Option<String>,
    /// The session WebSocket URL with that token: what a restarted client connects to
    /// in order to resume (see [`resume_url`]).
    pub resume_url: Option<String>,
}

/// `ws_url` with its `token` query parameter set to `token`: the URL that resumes a
/// participant with the resume token of its last `welcome`. Each token admits one
/// connection; the new connection's `welcome` carries the next one.
pub fn resume_url(ws_url: &str, token: &str) -> String {
    let (base, query) = ws_url.split_once('?').unwrap_or((ws_url, ""));
    let mut params: Vec<String> = query
        .split('&')
        .filter(|p| !p.is_empty() && !p.starts_with("token="))
        .map(str::to_owned)
        .collect();
    params.push(format!("token={token}"));
    format!("{base}?{}", params.join("&"))
}

/// How the relay closed the socket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CloseInfo {
    /// The close code (`4000 + HTTP status` for refusals, 1009 for oversized frames).
    pub code: u16,
    /// The close reason.
    pub reason: String,
}

/// A session WebSocket to the relay.
#[derive(Debug)]
pub struct Signalling {
    url: String,
    tls: Arc<rustls::ClientConfig>,
    sender: SignallingSender,
    incoming: mpsc::Receiver<ServerMsg>,
    transcript: Transcript,
    close: Arc<Mutex<Option<CloseInfo>>>,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for Signalling {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

impl Signalling {
    /// Connects to a session WebSocket URL (`wss://…/v1/sessions/{id}/ws?token=…`, or
    /// `ws://` for a relay without TLS), within [`CONNECT_TIMEOUT`].
    pub async fn connect(url: &str, tls: Arc<rustls::ClientConfig>) -> Result<Self, ClientError> {
        let connect =
            connect_async_tls_with_config(url, None, true, Some(Connector::Rustls(tls.clone())));
        let (stream, _response) = tokio::time::timeout(CONNECT_TIMEOUT, connect)
            .await
            .map_err(|_| ClientError::Timeout("the WebSocket handshake"))?
            .map_err(|e| ClientError::WebSocket(e.to_string()))?;
        let (mut sink, mut stream) = stream.split();

        let (out_tx, mut out_rx) = mpsc::channel::<Message>(OUTGOING_QUEUE);
        let writer = tokio::spawn(async move {
            while let Some(msg) = out_rx.recv().await {
                let is_close = matches!(msg, Message::Close(_));
                if let Err(e) = sink.send(msg).await {
                    tracing::debug!(error = %e, "signalling: send failed");
                    break;
                }
                if is_close {
                    break;
                }
            }
        });

        let transcript = Transcript::default();
        let close = Arc::new(Mutex::new(None));
        let (in_tx, in_rx) = mpsc::channel(INCOMING_QUEUE);
        let reader = {
            let transcript = transcript.clone();
            let close = Arc::clone(&close);
            tokio::spawn(async move {
                while let Some(frame) = stream.next().await {
                    let text = match frame {
                        Ok(Message::Text(text)) => text.as_str().to_owned(),
                        Ok(Message::Binary(bytes)) => {
                            // The relay never sends binary frames; keep it for the record.
                            transcript.push(String::from_utf8_lossy(&bytes).into_owned());
                            continue;
                        }
                        Ok(Message::Close(frame)) => {
                            let info = frame.map(|CloseFrame { code, reason }| CloseInfo {
                                code: code.into(),
                                reason: reason.as_str().to_owned(),
                            });
                            *close.lock().unwrap_or_else(|e| e.into_inner()) = info;
                            break;
                        }
                        Ok(_) => continue,
                        Err(e) => {
                            tracing::debug!(error = %e, "signalling: receive failed");
                            break;
                        }
                    };
                    transcript.push(text.clone());
                    match serde_json::from_str::<ServerMsg>(&text) {
                        Ok(msg) => {
                            if in_tx.send(msg).await.is_err() {
                                break;
                            }
                        }
                        Err(e) => tracing::warn!(error = %e, "signalling: unparsable message"),
                    }
                }
            })
        };

        Ok(Signalling {
            url: url.to_owned(),
            tls,
            sender: SignallingSender { tx: out_tx },
            incoming: in_rx,
            transcript,
            close,
            tasks: vec![writer, reader],
        })
    }

    /// A sender sharing this socket.
    pub fn sender(&self) -> SignallingSender {
        self.sender.clone()
    }

    /// The record of every text frame received (shared: it keeps growing).
    pub fn transcript(&self) -> Transcript {
        self.transcript.clone()
    }

    /// How the relay closed the socket, once it did with a close frame.
    pub fn close_info(&self) -> Option<CloseInfo> {
        self.close.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Sends `msg`.
    pub async fn send(&self, msg: &ClientMsg) -> Result<(), ClientError> {
        self.sender.send(msg).await
    }

    /// The next parsed message; `None` once the socket is closed and drained.
    pub async fn recv(&mut self) -> Option<ServerMsg> {
        self.incoming.recv().await
    }

    /// The next parsed message within `timeout`.
    pub async fn recv_timeout(&mut self, timeout: Duration) -> Result<ServerMsg, ClientError> {
        match tokio::time::timeout(timeout, self.incoming.recv()).await {
            Err(_) => Err(ClientError::Timeout("a signalling message")),
            Ok(Some(msg)) => Ok(msg),
            Ok(None) => Err(self.closed_error()),
        }
    }

    /// The URL this socket is connected to (after any redirect).
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Waits for the first message and requires it to be `welcome`; an `error` instead
    /// (refused token, session over, `session_lost`) becomes [`ClientError::Refused`].
    /// A `redirect` (the session lives on another node of a cluster) is followed: the
    /// socket is replaced by one to the given URL, at most [`MAX_REDIRECTS`] times, so
    /// the welcome's resume URL points at the node that holds the session.
    pub async fn welcome(&mut self, timeout: Duration) -> Result<Welcome, ClientError> {
        let mut redirects = 0;
        let first = loop {
            match self.recv_timeout(timeout).await? {
                ServerMsg::Redirect { url } if redirects < MAX_REDIRECTS => {
                    redirects += 1;
                    tracing::debug!(%url, "signalling: redirected to another relay node");
                    *self = Signalling::connect(&url, self.tls.clone()).await?;
                }
                ServerMsg::Redirect { url } => {
                    return Err(ClientError::Protocol(format!(
                        "more than {MAX_REDIRECTS} redirects (last to {url})"
                    )));
                }
                msg => break msg,
            }
        };
        match first {
            ServerMsg::Welcome {
                session_id,
                you,
                roster,
                chat,
                resume_token,
            } => Ok(Welcome {
                session_id,
                you,
                roster,
                chat,
                resume_url: resume_token.as_deref().map(|t| resume_url(&self.url, t)),
                resume_token,
            }),
            ServerMsg::Error { code, message, .. } => Err(ClientError::Refused { code, message }),
            other => Err(ClientError::Protocol(format!(
                "expected welcome first, got {other:?}"
            ))),
        }
    }

    /// Splits into the sender, the incoming messages, the transcript and the close
    /// record; the socket's tasks live as long as the returned [`SignallingTasks`].
    pub(crate) fn into_parts(
        mut self,
    ) -> (
        SignallingSender,
        mpsc::Receiver<ServerMsg>,
        Transcript,
        SignallingTasks,
    ) {
        let tasks = SignallingTasks(std::mem::take(&mut self.tasks));
        let (_, dummy) = mpsc::channel(1);
        let incoming = std::mem::replace(&mut self.incoming, dummy);
        (
            self.sender.clone(),
            incoming,
            self.transcript.clone(),
            tasks,
        )
    }

    fn closed_error(&self) -> ClientError {
        match self.close_info() {
            Some(info) => ClientError::ClosedByRelay {
                code: info.code,
                reason: info.reason,
            },
            None => ClientError::SignallingClosed,
        }
    }
}

/// The reader and writer tasks of a socket; aborted on drop.
#[derive(Debug)]
pub(crate) struct SignallingTasks(Vec<JoinHandle<()>>);

impl Drop for SignallingTasks {
    fn drop(&mut self) {
        for task in &self.0 {
            task.abort();
        }
    }
}
