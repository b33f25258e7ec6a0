//! The bench's side of the `udp-ceiling` target: a publisher per session that cuts the
//! frame source into RTP exactly as a customer's video track does and sends it to the
//! forwarder, and receivers that reassemble it exactly as an agent does. Both are plain
//! tokio UDP sockets on 127.0.0.1; their records have the shapes of the WebRTC
//! clients' ([`SentFrame`], [`ReceivedFrame`]), so `run`'s scoring applies unchanged.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rtc::rtp;
use rtc::rtp::packetizer::Packetizer as _;
use rtc::shared::marshal::{Marshal as _, Unmarshal as _};
use tokio::net::UdpSocket;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::fanout::{OK, PUBLISHER_HELLO, RECEIVER_HELLO};
use super::forwarder::SOCKET_BUFFER;
use crate::client::{
    Assembler, ClientCodec as _, FrameSource, ReceivedFrame, SentFrame, VIDEO_CLOCK_RATE,
    VideoCodec, frame_digest, lock, rtp_packetizer,
};
use crate::run::RunError;
use crate::run::session::CONNECT_WAIT;

/// How long a hello waits for its `OK` before it is sent again.
const HELLO_RETRY: Duration = Duration::from_millis(200);

/// A loopback UDP socket with the forwarder's buffer size (the kernel caps it).
async fn socket() -> Result<UdpSocket, RunError> {
    let io = |what: &str| {
        let what = what.to_owned();
        move |e: std::io::Error| RunError::Setup(format!("udp-ceiling: {what}: {e}"))
    };
    let socket = UdpSocket::bind(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 0))
        .await
        .map_err(io("binding a socket"))?;
    rustix::net::sockopt::set_socket_recv_buffer_size(&socket, SOCKET_BUFFER)
        .map_err(|e| io("socket buffer")(e.into()))?;
    Ok(socket)
}

fn is_rtp(datagram: &[u8]) -> bool {
    datagram.first().is_some_and(|b| b >> 6 == 2)
}

/// One session's publisher: it registers, then sends a frame every `1 / fps` until
/// dropped.
pub(super) struct Publisher {
    sent: Arc<Mutex<Vec<SentFrame>>>,
    task: JoinHandle<()>,
}

impl Publisher {
    /// Registers as the publisher of `session` and starts publishing `source`.
    pub(super) async fn start(
        forwarder: SocketAddrV4,
        session: &str,
        mut source: FrameSource,
        fps: f64,
    ) -> Result<Publisher, RunError> {
        let socket = socket().await?;
        let hello = format!("{PUBLISHER_HELLO}{session}").into_bytes();
        let deadline = Instant::now() + CONNECT_WAIT;
        let mut buf = [0u8; 64];
        loop {
            if Instant::now() > deadline {
                return Err(RunError::Setup(format!(
                    "udp-ceiling: the forwarder did not answer publisher {session}"
                )));
            }
            let _ = socket.send_to(&hello, forwarder).await;
            if let Ok(Ok((len, from))) =
                tokio::time::timeout(HELLO_RETRY, socket.recv_from(&mut buf)).await
                && from == SocketAddr::V4(forwarder)
                && &buf[..len] == OK
            {
                break;
            }
        }
        let codec = source.codec();
        let mut packetizer = rtp_packetizer(codec, rand::random(), Instant::now())
            .map_err(|e| RunError::Setup(format!("udp-ceiling: packetizer: {e}")))?;
        let sent = Arc::new(Mutex::new(Vec::new()));
        let records = Arc::clone(&sent);
        let task = tokio::spawn(async move {
            let interval = Duration::from_secs_f64(1.0 / fps);
            // The track's sample duration, in RTP clock ticks (as `write_sample` does).
            let samples = (interval.as_secs_f64() * f64::from(VIDEO_CLOCK_RATE)) as u32;
            let mut ticker = tokio::time::interval(interval);
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut wire = [0u8; 1500];
            for index in 0u64.. {
                ticker.tick().await;
                let frame = source.next_frame();
                let sent_at = Instant::now();
                // Recorded before sending, as the customer does.
                lock(&records).push(SentFrame {
                    index,
                    source_index: frame.index,
                    digest: frame_digest(codec, &frame.data),
                    is_keyframe: frame.is_keyframe,
                    requested: false,
                    size: frame.data.len(),
                    sent_at,
                });
                let Ok(packets) = packetizer.packetize(sent_at, &frame.data, samples) else {
                    tracing::warn!("udp-ceiling: a frame could not be packetized");
                    continue;
                };
                for packet in packets {
                    let Ok(len) = packet.marshal_to(&mut wire) else {
                        continue;
                    };
                    let _ = socket.send_to(&wire[..len], forwarder).await;
                }
            }
        });
        Ok(Publisher { sent, task })
    }

    /// The frames sent so far.
    pub(super) fn sent(&self) -> Vec<SentFrame> {
        lock(&self.sent).clone()
    }
}

impl Drop for Publisher {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[derive(Default)]
struct Records {
    frames: Vec<ReceivedFrame>,
    /// RTP packets that did not parse or carried another payload type.
    rejected: u64,
}

/// One receiver (an agent's place): it registers with the forwarder and reassembles
/// every frame of its session until dropped.
pub(super) struct Receiver {
    /// When it sent its first hello.
    pub(super) joined_at: Instant,
    connected: watch::Receiver<Option<Instant>>,
    records: Arc<Mutex<Records>>,
    task: JoinHandle<()>,
}

impl Receiver {
    /// Starts receiving `session`'s `codec` frames; the hello is repeated until the
    /// forwarder answers (see [`Receiver::wait_connected`]).
    pub(super) async fn start(
        forwarder: SocketAddrV4,
        session: &str,
        codec: VideoCodec,
    ) -> Result<Receiver, RunError> {
        let socket = socket().await?;
        let hello = format!("{RECEIVER_HELLO}{session}").into_bytes();
        let records = Arc::new(Mutex::new(Records::default()));
        let (connected_tx, connected) = watch::channel(None);
        let joined_at = Instant::now();
        let task = tokio::spawn(receive(
            socket,
            forwarder,
            hello,
            codec,
            connected_tx,
            Arc::clone(&records),
        ));
        Ok(Receiver {
            joined_at,
            connected,
            records,
            task,
        })
    }

    /// Waits until the forwarder has registered it; returns when that was.
    pub(super) async fn wait_connected(&self) -> Result<Instant, RunError> {
        let mut connected = self.connected.clone();
        match tokio::time::timeout(CONNECT_WAIT, connected.wait_for(Option::is_some)).await {
            Ok(Ok(at)) => Ok(at.unwrap_or(self.joined_at)),
            _ => Err(RunError::Setup(
                "udp-ceiling: the forwarder did not register a receiver".into(),
            )),
        }
    }

    /// When the forwarder answered its hello.
    pub(super) fn connected_at(&self) -> Option<Instant> {
        *self.connected.borrow()
    }

    /// The frames reassembled so far.
    pub(super) fn frames(&self) -> Vec<ReceivedFrame> {
        lock(&self.records).frames.clone()
    }

    /// How many frames it reassembled so far.
    pub(super) fn frames_received(&self) -> usize {
        lock(&self.records).frames.len()
    }

    /// Whether it has the frame `digest` sent at `sent_at`.
    pub(super) fn has(&self, digest: &[u8; 32], sent_at: Instant) -> bool {
        lock(&self.records)
            .frames
            .iter()
            .any(|f| &f.digest == digest && f.received_at >= sent_at)
    }

    /// Packets that were not RTP of its codec.
    pub(super) fn rejected(&self) -> u64 {
        lock(&self.records).rejected
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn receive(
    socket: UdpSocket,
    forwarder: SocketAddrV4,
    hello: Vec<u8>,
    codec: VideoCodec,
    connected: watch::Sender<Option<Instant>>,
    records: Arc<Mutex<Records>>,
) {
    let payload_type = codec.rtp_codec_parameters().payload_type;
    let mut assembler = Assembler::new(payload_type, codec);
    let mut frames = Vec::new();
    let mut buf = vec![0u8; 2048];
    let mut registered = false;
    let _ = socket.send_to(&hello, forwarder).await;
    loop {
        let got = if registered {
            socket.recv_from(&mut buf).await
        } else {
            match tokio::time::timeout(HELLO_RETRY, socket.recv_from(&mut buf)).await {
                Ok(got) => got,
                Err(_) => {
                    let _ = socket.send_to(&hello, forwarder).await;
                    continue;
                }
            }
        };
        let Ok((len, from)) = got else {
            return;
        };
        if from != SocketAddr::V4(forwarder) {
            continue;
        }
        let now = Instant::now();
        let datagram = &buf[..len];
        let rtp = is_rtp(datagram);
        // RTP before the `OK` means the `OK` was lost: registered all the same.
        if !registered && (rtp || datagram == OK) {
            registered = true;
            connected.send_replace(Some(now));
        }
        if !rtp {
            continue;
        }
        match rtp::Packet::unmarshal(&mut &*datagram) {
            Ok(packet) if packet.header.payload_type == payload_type => {
                assembler.push(now, packet, &mut frames);
                if !frames.is_empty() {
                    lock(&records).frames.append(&mut frames);
                }
            }
            _ => lock(&records).rejected += 1,
        }
    }
}
