//! Input events on the relay's path: every event from an agent is decoded (to check it
//! and its sender's permission) and re-encoded with the relay's sequence number.
//!
//! `cargo bench -p relay-codec --bench input`

// criterion_group!/criterion_main! generate undocumented items.
#![allow(missing_docs)]

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use relay_codec::input::{InputEvent, InputKind, decode, encode};

fn input(c: &mut Criterion) {
    let event = InputEvent {
        seq: 42,
        kind: InputKind::MouseMove { x: 1000, y: 2000 },
    };
    let mut buf = Vec::with_capacity(64);
    encode(&event, &mut buf).expect("a mouse move encodes");
    let bytes = buf.clone();
    c.bench_function("input/decode_mouse_move", |b| {
        b.iter(|| decode(black_box(&bytes)))
    });
    c.bench_function("input/encode_mouse_move", |b| {
        b.iter(|| {
            buf.clear();
            encode(black_box(&event), &mut buf)
        })
    });
}

criterion_group!(benches, input);
criterion_main!(benches);
