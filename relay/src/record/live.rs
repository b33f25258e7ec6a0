//! The recorder's IO shell: one writer thread per recording, fed by a bounded queue
//! that the media path fills without ever waiting.
//!
//! - [`Recordings`] (one per node) decides whether a session is recorded (enabled, and
//!   its portal has a review key) and starts its writer.
//! - [`RecordingHandle`] is what the session's tasks hold: [`RecordingHandle::record`]
//!   for chat, roster, input, file and gap records, [`RecordingHandle::video`] for the
//!   customer's video track, [`RecordingHandle::end`] when the session ends.
//! - The writer thread owns the sans-IO [`Recorder`] and the encrypted
//!   [`RecordingFileWriter`]; every file operation happens there.
//!
//! # The queue and what happens when it is full
//!
//! The queue holds `recording.queue_items` items (a video RTP packet is one item: a
//! few header fields and a clone of the payload's `Bytes`, no copy, no allocation).
//! Video may fill three quarters of it. When a video packet finds its share full, the
//! recording drops to **keyframes only**: the track's [`VideoTap`] passes only the
//! packets of keyframes until the queue is at most half full at a keyframe, then
//! records every frame again (both moments are gap records in the file, and every
//! frame left out counts in `relay_recording_frames_dropped_total{reason="queue_full"}`).
//! Other records are small and rare and use the whole queue, including the quarter
//! kept free of video; only a writer stuck for that long drops them (counted in
//! `relay_recording_records_dropped_total`, logged once).
//!
//! A write error (a full disk) is counted and logged; the writer finishes the file as
//! far as it can (what reached the disk stays readable up to its last complete chunk)
//! and stops; the session goes on unrecorded.

use std::collections::{BTreeMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError, sync_channel};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use age::x25519;
use bytes::Bytes;
use relay_codec::keyframe::VideoCodec;
use relay_codec::recording::{ChunkSettings, GapKind, GapRecord, Record};

use super::file::{RecordingFileWriter, SyncPolicy, recording_path};
use super::recorder::{Input, Recorder, RecordingInfo, RtpVideo};
use crate::config::Config;
use crate::metrics::Metrics;

/// How often a writer closes an idle chunk and reports its queue.
const WRITER_TICK: Duration = Duration::from_millis(250);

/// The node's recording settings, from `[recording]`.
#[derive(Debug, Clone)]
pub struct RecordingSettings {
    /// Record at all.
    pub enabled: bool,
    /// Where recordings go.
    pub dir: PathBuf,
    /// Items per recording queue.
    pub queue_items: usize,
    /// Review keys by portal.
    pub review_keys: BTreeMap<String, x25519::Recipient>,
    /// When the writer fsyncs.
    pub sync: SyncPolicy,
    /// Chunk bounds.
    pub chunks: ChunkSettings,
}

impl RecordingSettings {
    /// From a validated configuration (review keys that do not parse are left out;
    /// validation refuses them).
    pub fn from_config(config: &Config) -> RecordingSettings {
        let r = &config.recording;
        RecordingSettings {
            enabled: r.enabled,
            dir: config.recording_dir(),
            queue_items: r.queue_items,
            review_keys: r
                .review_keys
                .iter()
                .filter_map(|(portal, key)| {
                    super::keys::parse_recipient(key)
                        .ok()
                        .map(|k| (portal.clone(), k))
                })
                .collect(),
            sync: SyncPolicy::default(),
            chunks: ChunkSettings::default(),
        }
    }
}

/// The node's recorder: starts one writer per recorded session.
pub struct Recordings {
    settings: RecordingSettings,
    metrics: Arc<Metrics>,
    /// Portals already warned about (no review key), so that the log says it once.
    warned: Mutex<HashSet<String>>,
    /// Writer threads running (each decrements it when it ends, however it ends).
    writers: Arc<AtomicUsize>,
}

impl Recordings {
    /// A recorder with these settings.
    pub fn new(settings: RecordingSettings, metrics: Arc<Metrics>) -> Recordings {
        Recordings {
            settings,
            metrics,
            warned: Mutex::new(HashSet::new()),
            writers: Arc::new(AtomicUsize::new(0)),
        }
    }

    /// Writer threads still running: a relay shutting down waits for them, so that
    /// each recording gets its footer.
    pub fn writers(&self) -> usize {
        self.writers.load(Ordering::Acquire)
    }

    /// Starts recording a session of `portal`, or says why not (`None`: recording is
    /// off, or the portal has no review key: warned once per portal, counted).
    pub fn start(&self, session_id: &str, portal: &str) -> Option<RecordingHandle> {
        if !self.settings.enabled {
            return None;
        }
        let Some(recipient) = self.settings.review_keys.get(portal).cloned() else {
            self.metrics
                .recordings_skipped_total
                .with_label_values(&["no_review_key"])
                .inc();
            let mut warned = self.warned.lock().unwrap_or_else(|e| e.into_inner());
            if warned.insert(portal.to_owned()) {
                tracing::warn!(
                    portal,
                    "portal has no review key in [recording.review_keys]: its sessions are \
                     not recorded"
                );
            }
            return None;
        };
        let capacity = self.settings.queue_items;
        let (tx, rx) = sync_channel(capacity);
        let shared = Arc::new(QueueState::new(capacity));
        let start = Instant::now();
        let start_unix_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        let info = RecordingInfo {
            session_id: session_id.to_owned(),
            portal: portal.to_owned(),
            start_unix_ms,
        };
        let writer = Writer {
            path: recording_path(&self.settings.dir, portal, start_unix_ms, session_id),
            info,
            start,
            recipient,
            sync: self.settings.sync,
            chunks: self.settings.chunks,
            metrics: self.metrics.clone(),
            shared: shared.clone(),
        };
        let span = tracing::info_span!("recording", session = %session_id);
        let running = WriterRunning::new(&self.writers);
        let spawned = std::thread::Builder::new()
            .name("relay-recorder".into())
            .spawn(move || {
                let _running = running;
                span.in_scope(|| writer.run(rx))
            });
        if let Err(e) = spawned {
            tracing::error!(error = %e, "cannot start a recording writer thread");
            self.metrics.recording_write_errors_total.inc();
            return None;
        }
        Some(RecordingHandle {
            tx,
            shared,
            metrics: self.metrics.clone(),
        })
    }
}

/// Counts a writer thread as running until dropped (when the thread ends, even by a
/// panic, or when it could not be spawned).
struct WriterRunning(Arc<AtomicUsize>);

impl WriterRunning {
    fn new(writers: &Arc<AtomicUsize>) -> Self {
        writers.fetch_add(1, Ordering::AcqRel);
        WriterRunning(Arc::clone(writers))
    }
}

impl Drop for WriterRunning {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// What the senders and the writer share about one queue.
struct QueueState {
    /// Items in the queue (counted before a send, uncounted if it fails).
    queued: AtomicUsize,
    /// Video is admitted while fewer than this many items are queued.
    video_limit: usize,
    /// Keyframes-only ends at a keyframe when at most this many items are queued.
    resume_at: usize,
    /// The session ended: the writer drains the queue and finishes the file.
    ending: AtomicBool,
    /// The writer's recorder waits for a keyframe (before the first one, or after a
    /// lost packet): the tap asks the publisher for one.
    keyframe_wanted: AtomicBool,
    warned_full: AtomicBool,
    warned_degrade: AtomicBool,
}

impl QueueState {
    /// An empty queue of `capacity` items: video may fill three quarters of it and
    /// comes back to every frame once it is at most half full.
    fn new(capacity: usize) -> Self {
        QueueState {
            queued: AtomicUsize::new(0),
            video_limit: capacity - capacity / 4,
            resume_at: capacity / 2,
            ending: AtomicBool::new(false),
            keyframe_wanted: AtomicBool::new(false),
            warned_full: AtomicBool::new(false),
            warned_degrade: AtomicBool::new(false),
        }
    }
}

enum Item {
    At(Instant, Input),
    End,
}

/// A session's way into its recording. Cheap to clone; never blocks.
#[derive(Clone)]
pub struct RecordingHandle {
    tx: SyncSender<Item>,
    shared: Arc<QueueState>,
    metrics: Arc<Metrics>,
}

impl std::fmt::Debug for RecordingHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RecordingHandle")
            .field("queued", &self.shared.queued.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl RecordingHandle {
    /// Records `record` (chat, roster, input, file transfer, gap) as of `at`. Uses the
    /// whole queue; if even that is full, the record is dropped and counted.
    pub fn record(&self, at: Instant, record: Record) {
        if !self.send(Item::At(at, Input::Record(record))) {
            self.metrics.recording_records_dropped_total.inc();
            if !self.shared.warned_full.swap(true, Ordering::Relaxed) {
                tracing::warn!("recording queue full: records dropped");
            }
        }
    }

    /// The tap for one video track of the customer (its own keyframes-only state).
    pub fn video(&self, codec: VideoCodec) -> VideoTap {
        VideoTap {
            handle: self.clone(),
            codec,
            keyframes_only: false,
            keyframe_timestamp: None,
            asked_keyframe: false,
            dropped: 0,
            last_dropped: None,
            dropped_counter: self
                .metrics
                .recording_frames_dropped_total
                .with_label_values(&["queue_full"]),
        }
    }

    /// The session ended: the writer records what is queued, writes the footer and
    /// stops.
    pub fn end(&self) {
        self.shared.ending.store(true, Ordering::Release);
        // Wakes the writer; if the queue is full it sees `ending` within a tick.
        let _ = self.tx.try_send(Item::End);
    }

    fn send(&self, item: Item) -> bool {
        self.shared.queued.fetch_add(1, Ordering::Relaxed);
        match self.tx.try_send(item) {
            Ok(()) => true,
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                self.shared.queued.fetch_sub(1, Ordering::Relaxed);
                false
            }
        }
    }

    /// Whether the recording is ending or its writer is gone (the writer sets `ending`
    /// on its way out, after a write error too): the hot path stops offering video.
    fn closed(&self) -> bool {
        self.shared.ending.load(Ordering::Relaxed)
    }
}

/// The hot path's tap on one video track: hands each RTP packet to the writer, or
/// leaves it out while the recording keeps keyframes only.
pub struct VideoTap {
    handle: RecordingHandle,
    codec: VideoCodec,
    keyframes_only: bool,
    /// The RTP timestamp of the keyframe being passed in keyframes-only mode.
    keyframe_timestamp: Option<u32>,
    /// In keyframes-only mode, the writer caught up and a keyframe was asked for.
    asked_keyframe: bool,
    /// Frames left out since keyframes-only began.
    dropped: u32,
    last_dropped: Option<u32>,
    dropped_counter: prometheus::IntCounter,
}

impl VideoTap {
    /// One RTP packet of the track. `keyframe_start`: its payload starts a keyframe.
    /// Never blocks; allocates nothing (the payload is a reference-counted clone).
    ///
    /// Returns whether the recording needs a keyframe (its writer caught up after
    /// keyframes-only, or waits for one after a loss): the caller asks the publisher,
    /// through the fan-out's coalesced keyframe requests, rather than waiting for the
    /// encoder's next one (screen encoders may send one only every few minutes).
    #[must_use]
    pub fn packet(
        &mut self,
        at: Instant,
        header: &rtc::rtp::header::Header,
        payload: &Bytes,
        keyframe_start: bool,
    ) -> bool {
        if self.handle.closed() {
            return false;
        }
        let shared = &self.handle.shared;
        let queued = shared.queued.load(Ordering::Relaxed);
        let mut wants_keyframe = shared.keyframe_wanted.load(Ordering::Relaxed)
            && shared.keyframe_wanted.swap(false, Ordering::Relaxed);
        if self.keyframes_only && !self.asked_keyframe && queued <= shared.resume_at {
            self.asked_keyframe = true;
            wants_keyframe = true;
        }
        self.offer(at, header, payload, keyframe_start, queued);
        wants_keyframe
    }

    fn offer(
        &mut self,
        at: Instant,
        header: &rtc::rtp::header::Header,
        payload: &Bytes,
        keyframe_start: bool,
        queued: usize,
    ) {
        if keyframe_start {
            if self.keyframes_only && queued <= self.handle.shared.resume_at {
                self.keyframes_only = false;
                let dropped = std::mem::take(&mut self.dropped);
                self.handle.record(
                    at,
                    Record::Gap(GapRecord {
                        kind: GapKind::FullRate,
                        dropped,
                    }),
                );
                tracing::info!(dropped, "recording every frame again");
            }
            self.keyframe_timestamp = Some(header.timestamp);
        }
        let passes = if self.keyframes_only {
            self.keyframe_timestamp == Some(header.timestamp)
        } else {
            queued < self.handle.shared.video_limit
        };
        let sent = passes
            && self.handle.send(Item::At(
                at,
                Input::Video(RtpVideo {
                    codec: self.codec,
                    sequence_number: header.sequence_number,
                    timestamp: header.timestamp,
                    marker: header.marker,
                    payload: payload.clone(),
                }),
            ));
        if sent {
            return;
        }
        if !self.keyframes_only {
            self.keyframes_only = true;
            self.keyframe_timestamp = None;
            self.asked_keyframe = false;
            self.handle.record(
                at,
                Record::Gap(GapRecord {
                    kind: GapKind::KeyframesOnly,
                    dropped: 0,
                }),
            );
            if !self
                .handle
                .shared
                .warned_degrade
                .swap(true, Ordering::Relaxed)
            {
                tracing::warn!(
                    queued,
                    "recording falls behind: keyframes only until it catches up"
                );
            } else {
                tracing::debug!(queued, "recording falls behind again: keyframes only");
            }
        }
        if self.last_dropped != Some(header.timestamp) {
            self.last_dropped = Some(header.timestamp);
            self.dropped = self.dropped.saturating_add(1);
            self.dropped_counter.inc();
        }
    }
}

/// The writer thread of one recording.
struct Writer {
    path: PathBuf,
    info: RecordingInfo,
    start: Instant,
    recipient: x25519::Recipient,
    sync: SyncPolicy,
    chunks: ChunkSettings,
    metrics: Arc<Metrics>,
    shared: Arc<QueueState>,
}

/// What the writer has reported to the metrics so far.
#[derive(Default)]
struct Reported {
    queue: i64,
    raw: u64,
    compressed: u64,
    awaiting_keyframe: u64,
    incomplete: u64,
    refused: u64,
}

impl Writer {
    fn run(self, rx: Receiver<Item>) {
        let (mut recorder, header) = match Recorder::new(&self.info, self.start, self.chunks) {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(error = %e, "cannot start the recording");
                return self.give_up();
            }
        };
        let mut file = match RecordingFileWriter::create(
            &self.path,
            &self.recipient,
            &header,
            self.sync,
        ) {
            Ok(f) => f,
            Err(e) => {
                tracing::error!(error = %e, "cannot create the recording; the session is not recorded");
                self.metrics.recording_write_errors_total.inc();
                return self.give_up();
            }
        };
        self.metrics.recordings_active.inc();
        tracing::info!(path = %self.path.display(), "recording");
        let mut reported = Reported::default();
        let mut failed = false;
        loop {
            let item = match rx.recv_timeout(WRITER_TICK) {
                Ok(item) => Some(item),
                Err(RecvTimeoutError::Timeout) => None,
                Err(RecvTimeoutError::Disconnected) => break,
            };
            let mut end = false;
            match item {
                Some(Item::At(at, input)) => {
                    self.shared.queued.fetch_sub(1, Ordering::Relaxed);
                    recorder.handle(at, input);
                }
                Some(Item::End) => end = true,
                None => {}
            }
            if end || self.shared.ending.load(Ordering::Acquire) {
                // Record what is still queued, then finish.
                while let Ok(item) = rx.try_recv() {
                    if let Item::At(at, input) = item {
                        self.shared.queued.fetch_sub(1, Ordering::Relaxed);
                        recorder.handle(at, input);
                    }
                }
                break;
            }
            recorder.handle_timeout(Instant::now());
            if let Err(e) = append(&mut recorder, &mut file) {
                tracing::error!(error = %e, "recording write failed; the session goes on unrecorded");
                self.metrics.recording_write_errors_total.inc();
                failed = true;
                break;
            }
            self.report(&mut recorder, &mut reported);
        }
        // Nothing more is taken: senders see the queue closed from here on.
        self.shared.ending.store(true, Ordering::Release);
        drop(rx);
        if !failed && let Err(e) = append(&mut recorder, &mut file) {
            tracing::error!(error = %e, "recording write failed");
            self.metrics.recording_write_errors_total.inc();
            failed = true;
        }
        self.report(&mut recorder, &mut reported);
        let counters = *recorder.counters();
        let footer = recorder.finish();
        let compressed_tail = footer.len() as u64;
        match file.finish(&footer) {
            Ok(len) => {
                self.metrics
                    .recording_bytes_total
                    .with_label_values(&["compressed"])
                    .inc_by(compressed_tail);
                tracing::info!(
                    bytes = len,
                    frames = counters.frames_recorded,
                    records = counters.records,
                    complete = !failed,
                    "recording finished"
                );
            }
            Err(e) => {
                if !failed {
                    self.metrics.recording_write_errors_total.inc();
                }
                tracing::error!(error = %e, "recording could not be finished; it reads up to its last complete chunk");
            }
        }
        self.metrics.recording_queue_depth.sub(reported.queue);
        self.metrics.recordings_active.dec();
    }

    /// Counts what the recorder did since the last report.
    fn report(&self, recorder: &mut Recorder, r: &mut Reported) {
        let queue = self.shared.queued.load(Ordering::Relaxed) as i64;
        self.metrics.recording_queue_depth.add(queue - r.queue);
        r.queue = queue;
        let c = *recorder.counters();
        let m = &self.metrics;
        let bytes = |stage: &str, now: u64, before: &mut u64| {
            m.recording_bytes_total
                .with_label_values(&[stage])
                .inc_by(now.saturating_sub(*before));
            *before = now;
        };
        bytes("raw", c.raw_bytes, &mut r.raw);
        bytes("compressed", recorder.bytes_written(), &mut r.compressed);
        if c.frames_awaiting_keyframe > r.awaiting_keyframe || c.frames_incomplete > r.incomplete {
            self.shared.keyframe_wanted.store(true, Ordering::Relaxed);
        }
        for (reason, now, before) in [
            (
                "awaiting_keyframe",
                c.frames_awaiting_keyframe,
                &mut r.awaiting_keyframe,
            ),
            ("incomplete", c.frames_incomplete, &mut r.incomplete),
        ] {
            if now > *before {
                m.recording_frames_dropped_total
                    .with_label_values(&[reason])
                    .inc_by(now - *before);
                *before = now;
            }
        }
        if c.refused > r.refused {
            m.recording_records_dropped_total
                .inc_by(c.refused - r.refused);
            r.refused = c.refused;
            if let Some(e) = recorder.take_refusal() {
                tracing::warn!(error = %e, "a record was refused by the container");
            }
        }
    }

    fn give_up(&self) {
        self.shared.ending.store(true, Ordering::Release);
    }
}

fn append(
    recorder: &mut Recorder,
    file: &mut RecordingFileWriter,
) -> Result<(), super::file::RecordingFileError> {
    while let Some(chunk) = recorder.poll_output() {
        file.append_chunk(&chunk)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use relay_codec::recording::{FooterStatus, Recording};
    use rtc::rtp::header::Header;

    fn handle(capacity: usize) -> (RecordingHandle, Receiver<Item>) {
        let (tx, rx) = sync_channel(capacity);
        let shared = Arc::new(QueueState::new(capacity));
        let metrics = Arc::new(Metrics::new());
        (
            RecordingHandle {
                tx,
                shared,
                metrics,
            },
            rx,
        )
    }

    fn header(seq: u16, timestamp: u32) -> Header {
        Header {
            sequence_number: seq,
            timestamp,
            ..Default::default()
        }
    }

    /// What the queue holds: `v<ts>` per video packet, `g<kind>` per gap, `r` per other.
    fn drain(rx: &Receiver<Item>, h: &RecordingHandle) -> Vec<String> {
        let mut out = Vec::new();
        while let Ok(item) = rx.try_recv() {
            h.shared.queued.fetch_sub(1, Ordering::Relaxed);
            out.push(match item {
                Item::At(_, Input::Video(v)) => format!("v{}", v.timestamp),
                Item::At(_, Input::Record(Record::Gap(g))) => format!("g{:?}", g.kind),
                Item::At(_, Input::Record(_)) => "r".to_owned(),
                Item::End => "end".to_owned(),
            });
        }
        out
    }

    #[test]
    fn a_full_queue_keeps_keyframes_only_until_it_drains_and_never_blocks() {
        let (h, rx) = handle(8);
        let mut tap = h.video(VideoCodec::Vp8);
        let now = Instant::now();
        let payload = Bytes::from_static(b"x");
        // Video may take 6 of 8 slots: one packet per frame, frames 0..=6. A full
        // queue asks for no keyframe: the writer could not take it.
        for ts in 0..7u32 {
            let ask = tap.packet(now, &header(ts as u16, ts), &payload, ts == 0);
            assert!(!ask, "frame {ts}");
        }
        // Frame 6 found video's share full: keyframes only, marked in the file; the gap
        // record took one of the slots kept free for records.
        assert!(tap.keyframes_only);
        let chat = Record::Gap(GapRecord {
            kind: GapKind::CustomerReturned,
            dropped: 0,
        });
        h.record(now, chat.clone());
        assert_eq!(h.shared.queued.load(Ordering::Relaxed), 8);
        // A full queue: the record is dropped and counted, nothing waits.
        h.record(now, chat.clone());
        assert_eq!(h.metrics.recording_records_dropped_total.get(), 1);
        assert_eq!(
            drain(&rx, &h),
            [
                "v0",
                "v1",
                "v2",
                "v3",
                "v4",
                "v5",
                "gKeyframesOnly",
                "gCustomerReturned"
            ]
        );
        // Drained: still keyframes only until a keyframe. A delta frame is left out, and
        // the publisher is asked for a keyframe (once)...
        assert!(tap.packet(now, &header(7, 7), &payload, false));
        // ...a keyframe resumes every frame (two packets of it), and the next delta passes.
        assert!(!tap.packet(now, &header(8, 8), &payload, true));
        assert!(!tap.packet(now, &header(9, 8), &payload, false));
        assert!(!tap.packet(now, &header(10, 9), &payload, false));
        assert_eq!(drain(&rx, &h), ["gFullRate", "v8", "v8", "v9"]);
        assert_eq!(
            h.metrics
                .recording_frames_dropped_total
                .with_label_values(&["queue_full"])
                .get(),
            2,
            "frames 6 and 7"
        );
    }

    #[test]
    fn keyframes_pass_while_the_queue_stays_full_and_delta_frames_do_not() {
        let (h, rx) = handle(8);
        let mut tap = h.video(VideoCodec::Vp8);
        let now = Instant::now();
        let payload = Bytes::from_static(b"x");
        for ts in 0..7u32 {
            let _ = tap.packet(now, &header(ts as u16, ts), &payload, false);
        }
        let _ = drain(&rx, &h);
        // Refill to above half with records, then a keyframe and a delta frame.
        for _ in 0..5 {
            h.record(
                now,
                Record::Gap(GapRecord {
                    kind: GapKind::Other(9),
                    dropped: 0,
                }),
            );
        }
        // Above half full: no keyframe is asked for yet.
        assert!(!tap.packet(now, &header(20, 20), &payload, true));
        assert!(!tap.packet(now, &header(21, 21), &payload, false));
        let got = drain(&rx, &h);
        assert_eq!(got[5..], ["v20"], "{got:?}");
        assert!(tap.keyframes_only);
    }

    #[test]
    fn a_writer_waiting_for_a_keyframe_has_the_tap_ask_for_one_once() {
        let (h, _rx) = handle(64);
        let mut tap = h.video(VideoCodec::Vp8);
        let now = Instant::now();
        let payload = Bytes::from_static(b"x");
        assert!(!tap.packet(now, &header(1, 1), &payload, false));
        // The writer's recorder lost a packet and waits for a keyframe.
        h.shared.keyframe_wanted.store(true, Ordering::Relaxed);
        assert!(tap.packet(now, &header(2, 2), &payload, false));
        assert!(!tap.packet(now, &header(3, 3), &payload, false));
    }

    #[test]
    fn a_recording_is_written_encrypted_and_finished_when_the_session_ends() {
        let dir = tempfile::tempdir().unwrap();
        let identity = x25519::Identity::generate();
        let settings = RecordingSettings {
            enabled: true,
            dir: dir.path().to_owned(),
            queue_items: 256,
            review_keys: [("support".to_owned(), identity.to_public())].into(),
            sync: SyncPolicy::OnFinish,
            chunks: ChunkSettings::default(),
        };
        let metrics = Arc::new(Metrics::new());
        let recordings = Recordings::new(settings, metrics.clone());
        assert!(recordings.start("s-2", "sales").is_none(), "no review key");
        assert!(recordings.start("s-3", "sales").is_none());
        assert_eq!(
            metrics
                .recordings_skipped_total
                .with_label_values(&["no_review_key"])
                .get(),
            2
        );
        let h = recordings.start("s-1", "support").expect("recorded");
        h.record(
            Instant::now(),
            Record::Gap(GapRecord {
                kind: GapKind::CustomerReturned,
                dropped: 0,
            }),
        );
        h.end();
        let deadline = Instant::now() + Duration::from_secs(10);
        let file = loop {
            let found: Vec<PathBuf> = walk(dir.path());
            if let [path] = &found[..]
                && metrics.recordings_active.get() == 0
                && metrics
                    .recording_bytes_total
                    .with_label_values(&["compressed"])
                    .get()
                    > 0
            {
                break path.clone();
            }
            assert!(Instant::now() < deadline, "not finished: {found:?}");
            std::thread::sleep(Duration::from_millis(20));
        };
        assert!(file.to_string_lossy().contains("/support/"), "{file:?}");
        let plain = super::super::file::open_recording(&file, &identity).unwrap();
        let recording = Recording::parse(&plain.container).unwrap();
        assert_eq!(recording.footer(), FooterStatus::Valid);
        assert_eq!(recording.verify().counts.gaps, 1);
        assert_eq!(recording.header().session_id, "s-1");
    }

    fn walk(dir: &std::path::Path) -> Vec<PathBuf> {
        let mut out = Vec::new();
        for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            let path = entry.path();
            if path.is_dir() {
                out.extend(walk(&path));
            } else {
                out.push(path);
            }
        }
        out
    }
}
