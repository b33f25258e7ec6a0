//! The GOP cache of one published video track: the current keyframe and every packet
//! since, so that a joining or recovering subscriber can be started at once from the
//! cache instead of waiting for the publisher's next keyframe (screen encoders may send
//! one only every few minutes). Sans-IO, like the rest of the fan-out: every input
//! carries `now`, and the packets are the shell's own type `P` (a reference-counted
//! packet: the cache clones handles, never payloads).
//!
//! Issue 17 builds the cache first as this core, with its rules tested here; the media
//! engine's `MediaSession` wires it into the fan-out (**not wired yet**: today a new
//! subscriber still waits for a requested keyframe).
//!
//! # Rules
//!
//! - The cache opens at the first packet of a keyframe ([`PacketInfo::keyframe_start`])
//!   and drops what it held before: it only ever holds one group of pictures, from its
//!   keyframe's first packet to the newest packet, in arrival order.
//! - It is bounded in bytes ([`GopCacheSettings::max_bytes`]). A packet that would take
//!   it over the bound empties it, and it stays empty until the next keyframe: half a
//!   group of pictures is of no use to a decoder.
//! - Audio is not cached (it needs no keyframe).
//! - [`GopCache::start`] hands a new subscriber the whole cached group in order; the
//!   next live packet continues it, so the subscriber sees one continuous stream (its
//!   sequence numbers are the publisher's, without a hole, from a keyframe on). A miss
//!   (empty, or emptied by the bound) means: wait for a keyframe and request one. A group
//!   older than [`GopCacheSettings::max_age`] still starts the subscriber, but asks for a
//!   fresh keyframe too ([`Start::refresh`]), so the group does not grow stale forever.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use super::{MediaKind, PacketInfo};

/// Bounds of the cache; from `[media]` in the configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GopCacheSettings {
    /// Most payload bytes held (default 4 MiB per session).
    pub max_bytes: usize,
    /// A group older than this (since its keyframe) still starts a subscriber but asks
    /// for a new keyframe.
    pub max_age: Duration,
}

impl Default for GopCacheSettings {
    fn default() -> Self {
        GopCacheSettings {
            max_bytes: 4 * 1024 * 1024,
            max_age: Duration::from_secs(30),
        }
    }
}

/// One cached packet: the shell's handle, its RTP sequence number and size.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cached<P> {
    /// The shell's packet (a cheap clone).
    pub packet: P,
    /// Its RTP sequence number.
    pub seq: u16,
    /// Its payload size, counted against the bound.
    pub bytes: usize,
}

/// What [`GopCache::push`] did with a packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pushed {
    /// A keyframe began: the cache now holds this packet alone.
    Opened,
    /// Added to the open group.
    Cached,
    /// Not cached: audio, or no keyframe seen since the cache was emptied.
    Ignored,
    /// It would have taken the cache over its bound: the cache is empty until the next
    /// keyframe.
    Overflowed,
}

/// Why a subscriber cannot be started from the cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Miss {
    /// No keyframe since the publisher started (or changed).
    Empty,
    /// The open group outgrew the bound.
    Overflowed,
}

/// A start from the cache.
#[derive(Debug)]
pub struct Start<'a, P> {
    /// The group, keyframe first, in arrival order.
    pub packets: &'a VecDeque<Cached<P>>,
    /// The group is older than `max_age`: request a new keyframe as well.
    pub refresh: bool,
}

/// The cache of one video track.
#[derive(Debug)]
pub struct GopCache<P> {
    settings: GopCacheSettings,
    group: VecDeque<Cached<P>>,
    bytes: usize,
    /// When the group's keyframe arrived; `None` while nothing usable is held.
    opened_at: Option<Instant>,
    overflowed: bool,
}

impl<P: Clone> GopCache<P> {
    /// An empty cache with these bounds.
    pub fn new(settings: GopCacheSettings) -> Self {
        GopCache {
            settings,
            group: VecDeque::new(),
            bytes: 0,
            opened_at: None,
            overflowed: false,
        }
    }

    /// Offers one packet of the publisher, in arrival order.
    pub fn push(
        &mut self,
        now: Instant,
        info: &PacketInfo,
        seq: u16,
        bytes: usize,
        packet: P,
    ) -> Pushed {
        if info.kind == MediaKind::Audio {
            return Pushed::Ignored;
        }
        let opened = info.keyframe_start;
        if opened {
            self.clear();
            self.opened_at = Some(now);
        } else if self.opened_at.is_none() {
            return Pushed::Ignored;
        }
        if self.bytes + bytes > self.settings.max_bytes {
            self.clear();
            self.overflowed = true;
            return Pushed::Overflowed;
        }
        self.bytes += bytes;
        self.group.push_back(Cached { packet, seq, bytes });
        if opened {
            Pushed::Opened
        } else {
            Pushed::Cached
        }
    }

    /// The group a new (or recovering) subscriber starts from, or why there is none.
    pub fn start(&self, now: Instant) -> Result<Start<'_, P>, Miss> {
        match self.opened_at {
            Some(at) => Ok(Start {
                packets: &self.group,
                refresh: now.saturating_duration_since(at) > self.settings.max_age,
            }),
            None if self.overflowed => Err(Miss::Overflowed),
            None => Err(Miss::Empty),
        }
    }

    /// The publisher stopped or changed (another encoder, another codec): what is held
    /// belongs to a stream that will not continue.
    pub fn reset(&mut self) {
        self.clear();
        self.overflowed = false;
    }

    /// Payload bytes held now (for the `relay_gop_cache_bytes` gauge).
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Packets held now.
    pub fn len(&self) -> usize {
        self.group.len()
    }

    /// Whether nothing is held.
    pub fn is_empty(&self) -> bool {
        self.group.is_empty()
    }

    fn clear(&mut self) {
        self.group.clear();
        self.bytes = 0;
        self.opened_at = None;
        self.overflowed = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn video(keyframe_start: bool, frame_end: bool) -> PacketInfo {
        PacketInfo {
            kind: MediaKind::Video,
            keyframe_start,
            frame_end,
        }
    }

    /// A packet of a stream: which frame it belongs to, its place in it.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    struct Pkt {
        frame: u32,
        last_of_frame: bool,
        seq: u16,
    }

    /// Feeds `frames` frames of `per_frame` packets each (every `gop`-th frame a
    /// keyframe) into `cache`, starting at sequence number `seq`; returns what was sent.
    fn feed(
        cache: &mut GopCache<Pkt>,
        now: &mut Instant,
        frames: std::ops::Range<u32>,
        per_frame: u16,
        gop: u32,
        seq: &mut u16,
    ) -> Vec<Pkt> {
        let mut sent = Vec::new();
        for frame in frames {
            for i in 0..per_frame {
                let last = i + 1 == per_frame;
                let info = video(frame % gop == 0 && i == 0, last);
                let p = Pkt {
                    frame,
                    last_of_frame: last,
                    seq: *seq,
                };
                cache.push(*now, &info, *seq, 1000, p);
                sent.push(p);
                *seq = seq.wrapping_add(1);
            }
            *now += Duration::from_millis(66);
        }
        sent
    }

    /// A subscriber started from the cache at any moment gets whole frames in order
    /// from a keyframe on, and the live packets after it continue without a hole, so its
    /// decoder sees one stream that decodes from its first frame.
    #[test]
    fn a_subscriber_started_from_the_cache_sees_one_continuous_stream_from_a_keyframe() {
        let mut cache = GopCache::new(GopCacheSettings::default());
        let mut now = Instant::now();
        let mut seq = 65_500; // wraps around during the test
        feed(&mut cache, &mut now, 0..23, 3, 10, &mut seq);
        let start = cache.start(now).expect("a keyframe was cached");
        assert!(!start.refresh);
        let mut got: Vec<Pkt> = start.packets.iter().map(|c| c.packet).collect();
        // The group of the keyframe at frame 20, whole: frames 20, 21, 22.
        assert_eq!(got.first().map(|p| p.frame), Some(20));
        assert_eq!(got.len(), 9);
        let live = feed(&mut cache, &mut now, 23..26, 3, 10, &mut seq);
        got.extend(live);
        for pair in got.windows(2) {
            assert_eq!(pair[1].seq, pair[0].seq.wrapping_add(1), "{pair:?}");
            assert!(
                pair[1].frame == pair[0].frame || pair[0].last_of_frame,
                "{pair:?}"
            );
        }
        // Mid-frame too: the cache ends where the live stream goes on.
        let info = video(false, false);
        let p = Pkt {
            frame: 26,
            last_of_frame: false,
            seq,
        };
        cache.push(now, &info, seq, 1000, p);
        let start = cache.start(now).expect("cached");
        assert_eq!(start.packets.back().map(|c| c.seq), Some(seq));
        assert_eq!(start.packets.front().map(|c| c.packet.frame), Some(20));
    }

    #[test]
    fn each_keyframe_replaces_the_group_and_audio_and_packets_before_a_keyframe_are_not_kept() {
        let mut cache = GopCache::new(GopCacheSettings::default());
        let now = Instant::now();
        let audio = PacketInfo {
            kind: MediaKind::Audio,
            keyframe_start: false,
            frame_end: true,
        };
        assert_eq!(cache.push(now, &audio, 1, 100, 1u8), Pushed::Ignored);
        assert_eq!(
            cache.push(now, &video(false, true), 2, 100, 2),
            Pushed::Ignored
        );
        assert_eq!(cache.start(now).unwrap_err(), Miss::Empty);
        assert_eq!(
            cache.push(now, &video(true, false), 3, 100, 3),
            Pushed::Opened
        );
        assert_eq!(
            cache.push(now, &video(false, true), 4, 100, 4),
            Pushed::Cached
        );
        assert_eq!(
            cache.push(now, &video(true, true), 5, 100, 5),
            Pushed::Opened
        );
        assert_eq!(cache.len(), 1);
        assert_eq!(cache.bytes(), 100);
        cache.reset();
        assert!(cache.is_empty());
        assert_eq!(cache.start(now).unwrap_err(), Miss::Empty);
    }

    #[test]
    fn a_group_over_the_bound_is_dropped_until_the_next_keyframe() {
        let mut cache = GopCache::new(GopCacheSettings {
            max_bytes: 10_000,
            max_age: Duration::from_secs(30),
        });
        let now = Instant::now();
        assert_eq!(
            cache.push(now, &video(true, false), 0, 4000, 0u16),
            Pushed::Opened
        );
        assert_eq!(
            cache.push(now, &video(false, false), 1, 4000, 1),
            Pushed::Cached
        );
        assert_eq!(cache.bytes(), 8000);
        // 12,000 bytes would be over: everything goes, and nothing more is cached...
        assert_eq!(
            cache.push(now, &video(false, true), 2, 4000, 2),
            Pushed::Overflowed
        );
        assert_eq!(cache.bytes(), 0);
        assert_eq!(
            cache.push(now, &video(false, true), 3, 10, 3),
            Pushed::Ignored
        );
        assert_eq!(cache.start(now).unwrap_err(), Miss::Overflowed);
        // ...until the next keyframe.
        assert_eq!(
            cache.push(now, &video(true, true), 4, 4000, 4),
            Pushed::Opened
        );
        assert_eq!(cache.start(now).map(|s| s.packets.len()).ok(), Some(1));
        // A keyframe larger than the whole bound is never cached.
        assert_eq!(
            cache.push(now, &video(true, true), 5, 20_000, 5),
            Pushed::Overflowed
        );
        assert!(cache.bytes() <= 10_000);
    }

    #[test]
    fn an_old_group_still_starts_a_subscriber_but_asks_for_a_new_keyframe() {
        let settings = GopCacheSettings {
            max_bytes: 1 << 20,
            max_age: Duration::from_secs(30),
        };
        let mut cache = GopCache::new(settings);
        let t0 = Instant::now();
        cache.push(t0, &video(true, true), 0, 100, 0u8);
        let fresh = cache.start(t0 + Duration::from_secs(30)).expect("cached");
        assert!(!fresh.refresh);
        let old = cache.start(t0 + Duration::from_secs(31)).expect("cached");
        assert!(old.refresh);
        assert_eq!(old.packets.len(), 1);
    }
}
