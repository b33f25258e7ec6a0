//! The relay's own share of the hot path, in isolation: one RTP packet of the customer's
//! screen routed by the fan-out core and queued for 8 agents (a clone of the header and
//! of the shared `Bytes` payload into each agent's bounded tokio queue), then taken out
//! again as the agents' writer tasks would. Everything the `webrtc` crate does around it
//! (SRTP, interceptors, sockets) is not here; `relay-bench run` measures the whole.
//!
//! `cargo bench -p relay --bench fanout`

// criterion_group!/criterion_main! generate undocumented items.
#![allow(missing_docs)]

use std::hint::black_box;
use std::time::Instant;

use bytes::Bytes;
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use relay::fanout::{Delivery, Fanout, FanoutSettings, MediaKind, PacketInfo, SubscriberId};
use rtc::rtp;
use tokio::sync::mpsc;

fn packet(payload: Bytes, marker: bool) -> rtp::Packet {
    rtp::Packet {
        header: rtp::header::Header {
            version: 2,
            payload_type: 96,
            sequence_number: 1,
            timestamp: 90_000,
            ssrc: 0x1234_5678,
            marker,
            ..Default::default()
        },
        payload,
    }
}

fn fan_out(c: &mut Criterion) {
    let mut group = c.benchmark_group("fan_out_one_packet");
    for agents in [1u64, 8] {
        let now = Instant::now();
        let mut fanout = Fanout::new(FanoutSettings::default());
        fanout.set_publisher(now, true);
        let mut queues = Vec::new();
        for id in 0..agents {
            fanout.add_subscriber(now, SubscriberId(id));
            queues.push(mpsc::channel::<rtp::Packet>(512));
        }
        // Start every subscriber with a keyframe, then route delta-frame packets.
        let key = PacketInfo {
            kind: MediaKind::Video,
            keyframe_start: true,
            frame_end: true,
        };
        fanout.route(now, &key, |_| Delivery::Queued);
        let info = PacketInfo {
            kind: MediaKind::Video,
            keyframe_start: false,
            frame_end: true,
        };
        let pkt = packet(Bytes::from(vec![0x90u8; 1100]), true);
        group.throughput(Throughput::Elements(agents));
        group.bench_with_input(BenchmarkId::from_parameter(agents), &agents, |b, _| {
            b.iter(|| {
                fanout.route(now, &info, |id| {
                    match queues[id.0 as usize].0.try_send(pkt.clone()) {
                        Ok(()) => Delivery::Queued,
                        Err(_) => Delivery::Full,
                    }
                });
                for (_, rx) in &mut queues {
                    black_box(rx.try_recv().ok());
                }
            })
        });
    }
    group.finish();
}

fn keyframe_detection(c: &mut Criterion) {
    use relay_codec::keyframe::{VideoCodec, is_keyframe_start};
    // A VP8 keyframe start (S=1, PID=0, P=0) and an H.264 FU-A start of an IDR.
    let vp8 = [0x10u8, 0x00, 0x9d, 0x01, 0x2a, 0x80, 0x02];
    let h264 = [0x7cu8, 0x85, 0x88, 0x84, 0x00];
    c.bench_function("is_keyframe_start/vp8", |b| {
        b.iter(|| is_keyframe_start(VideoCodec::Vp8, black_box(&vp8)))
    });
    c.bench_function("is_keyframe_start/h264_fu_a", |b| {
        b.iter(|| is_keyframe_start(VideoCodec::H264, black_box(&h264)))
    });
}

criterion_group!(benches, fan_out, keyframe_detection);
criterion_main!(benches);
