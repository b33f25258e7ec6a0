//! One bench session on Janus: a VideoRoom room of its own (one publisher, the source's
//! codec, no periodic keyframe requests, no bitrate cap worth the name), the bench
//! customer's frames published into it and K subscribers to that feed, in one Janus
//! session; and the scoring of what the subscribers got, as `run` scores agents.

use std::time::{Duration, Instant};

use serde_json::{Value, json};

use super::api::{JanusError, JanusSession};
use super::peer::{JanusPublisher, JanusSubscriber};
use super::process::LocalJanus;
use crate::client::{ClientError, FrameSource, VideoCodec};
use crate::run::RunError;
use crate::run::measure::{self, SentIndex};
use crate::run::session::{CONNECT_WAIT, Totals};

/// The plugin.
const VIDEOROOM: &str = "janus.plugin.videoroom";
/// The rooms' bitrate cap for the publisher (REMB), bits per second: far above any
/// bench load, so it never applies.
const ROOM_BITRATE: u64 = 100_000_000;
/// How long a subscriber's `join` is retried while Janus does not list the feed yet.
const FEED_WAIT: Duration = Duration::from_secs(5);

/// A subscriber of a room.
pub struct RoomSubscriber {
    /// Its plugin handle (for the Admin API's counters).
    pub handle: u64,
    /// When it started joining.
    pub joined_at: Instant,
    /// When its peer connection was up.
    pub connected_at: Instant,
    /// The peer.
    pub peer: JanusSubscriber,
}

/// A bench session running on Janus.
pub struct Room {
    /// The Janus session all its handles belong to.
    pub session: JanusSession,
    /// The publisher.
    pub publisher: JanusPublisher,
    /// The subscribers.
    pub subscribers: Vec<RoomSubscriber>,
}

/// The VideoRoom's name of a codec (`videocodec` of a room).
fn janus_codec(codec: VideoCodec) -> &'static str {
    match codec {
        VideoCodec::Vp8 => "vp8",
        VideoCodec::Vp9 => "vp9",
        VideoCodec::H264 => "h264",
        VideoCodec::Av1 => "av1",
    }
}

impl Room {
    /// Sets up bench session `n` on `janus`: a session, the room, the publisher
    /// (connected), then `subscribers` subscribers (connected).
    pub async fn open(
        http: &reqwest::Client,
        janus: &LocalJanus,
        n: u32,
        source: FrameSource,
        fps: f64,
        subscribers: u32,
    ) -> Result<Room, RunError> {
        let bind = janus.ice_address();
        let refused = |what: String| move |e: JanusError| RunError::Setup(format!("{what}: {e}"));
        let client = |what: String| move |e: ClientError| RunError::Setup(format!("{what}: {e}"));
        let session = JanusSession::create(http, janus.api_url())
            .await
            .map_err(refused(format!("room {n}: Janus session")))?;
        let handle = session
            .attach(VIDEOROOM)
            .await
            .map_err(refused(format!("room {n}: attaching the publisher")))?;
        let room = u64::from(n) + 1;
        session
            .message(
                handle,
                json!({
                    "request": "create",
                    "room": room,
                    "description": format!("relay-bench {n}"),
                    "publishers": 1,
                    "videocodec": janus_codec(source.codec()),
                    "bitrate": ROOM_BITRATE,
                    "fir_freq": 0,
                    "is_private": true,
                    "permanent": false,
                }),
                None,
            )
            .await
            .map_err(refused(format!("room {n}: creating the room")))?;

        let (publisher, offer) = JanusPublisher::offer(bind, source, fps)
            .await
            .map_err(client(format!("room {n}: the publisher's offer")))?;
        let joined = session
            .message(
                handle,
                json!({
                    "request": "joinandconfigure",
                    "ptype": "publisher",
                    "room": room,
                    "display": format!("Bench Customer {n}"),
                }),
                Some(offer),
            )
            .await
            .map_err(refused(format!("room {n}: publishing")))?;
        let (Some(feed), Some(answer)) = (joined.data["id"].as_u64(), joined.sdp("answer")) else {
            return Err(RunError::Setup(format!(
                "room {n}: Janus's answer to joinandconfigure has no id or no SDP answer: {:?}",
                joined
            )));
        };
        publisher
            .apply_answer(answer)
            .await
            .map_err(client(format!("room {n}: applying Janus's answer")))?;
        publisher
            .wait_connected(CONNECT_WAIT)
            .await
            .map_err(client(format!("room {n}: the publisher's peer connection")))?;

        let subscribe = (0..subscribers).map(|j| {
            let session = &session;
            async move {
                let joined_at = Instant::now();
                let handle = session
                    .attach(VIDEOROOM)
                    .await
                    .map_err(refused(format!("room {n}: attaching subscriber {j}")))?;
                let attached = join_as_subscriber(session, handle, room, feed)
                    .await
                    .map_err(refused(format!("room {n}: subscriber {j} joins")))?;
                let Some(offer) = attached.sdp("offer") else {
                    return Err(RunError::Setup(format!(
                        "room {n}: Janus's answer to subscriber {j}'s join has no offer: {attached:?}"
                    )));
                };
                let (peer, answer) = JanusSubscriber::answer(bind, offer)
                    .await
                    .map_err(client(format!("room {n}: subscriber {j}'s answer")))?;
                session
                    .message(handle, json!({"request": "start"}), Some(answer))
                    .await
                    .map_err(refused(format!("room {n}: subscriber {j} starts")))?;
                peer.wait_connected(CONNECT_WAIT)
                    .await
                    .map_err(client(format!("room {n}: subscriber {j}'s peer connection")))?;
                Ok::<_, RunError>(RoomSubscriber {
                    handle,
                    joined_at,
                    connected_at: Instant::now(),
                    peer,
                })
            }
        });
        let subscribers = futures_util::future::try_join_all(subscribe).await?;
        Ok(Room {
            session,
            publisher,
            subscribers,
        })
    }

    /// Whether every subscriber has the last frame sent at or before `window_end`.
    pub fn drained(&self, window_end: Instant) -> bool {
        let sent = self.publisher.sent_frames();
        let Some(last) = sent.iter().rev().find(|s| s.sent_at <= window_end) else {
            return true;
        };
        self.subscribers.iter().all(|s| {
            s.peer
                .frames()
                .iter()
                .any(|f| f.digest == last.digest && f.received_at >= last.sent_at)
        })
    }

    /// Adds this room's frames, latency, first frame and connect times to `t`.
    pub fn score(&self, window_start: Instant, window_end: Instant, t: &mut Totals) {
        let sent = self.publisher.sent_frames();
        let index = SentIndex::new(&sent);
        t.frames.sent += sent
            .iter()
            .filter(|s| s.sent_at >= window_start && s.sent_at <= window_end)
            .count() as u64;
        for s in &self.subscribers {
            let frames = s.peer.frames();
            let r = measure::score_agent(&index, &frames, s.joined_at, window_end, &mut t.latency);
            r.add_to(&mut t.frames);
            measure::record(
                &mut t.connect,
                s.connected_at.saturating_duration_since(s.joined_at),
            );
            if let Some(d) = r.first_frame {
                measure::record(&mut t.first_frame, d);
            }
        }
    }

    /// Frames received so far by all subscribers.
    pub fn frames_received(&self) -> usize {
        self.subscribers
            .iter()
            .map(|s| s.peer.frames_received())
            .sum()
    }

    /// RTP packets the subscribers' applications read so far.
    pub fn rtp_packets_received(&self) -> u64 {
        self.subscribers
            .iter()
            .map(|s| s.peer.receive_stats().rtp_packets)
            .sum()
    }

    /// Closes every peer and ends the Janus session.
    pub async fn close(self) {
        // The hang-ups that follow are expected: nobody needs to hear of them.
        self.session.stop_events();
        for s in self.subscribers {
            s.peer.close().await;
        }
        self.publisher.close().await;
        if let Err(e) = self.session.destroy().await {
            tracing::debug!(error = %e, "janus: destroying a session");
        }
    }
}

/// `join` as a subscriber to `feed`, retried for [`FEED_WAIT`] while the VideoRoom does
/// not know the feed yet (its publisher's connection is up on our side a moment before
/// Janus marks it started).
async fn join_as_subscriber(
    session: &JanusSession,
    handle: u64,
    room: u64,
    feed: u64,
) -> Result<super::api::PluginEvent, JanusError> {
    let body: Value = json!({
        "request": "join",
        "ptype": "subscriber",
        "room": room,
        "streams": [{"feed": feed}],
    });
    let deadline = Instant::now() + FEED_WAIT;
    loop {
        match session.message(handle, body.clone(), None).await {
            Err(JanusError::Plugin { .. }) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            other => return other,
        }
    }
}
