//! Wire codec: encode, validated zero-copy access, and full decode of the two hottest
//! frames — a `Publish` request and a `Deliver` — with 128-byte payloads.
//!
//! ```text
//! cargo bench -p herald-bench --bench codec
//! cargo bench -p herald-bench --bench codec -- 'codec/access'   # one group
//! ```
//!
//! Groups (criterion's time per element is the time per frame):
//! * `codec/encode/*` — `encode_frame_into` into a reused buffer (what the writers do).
//! * `codec/access/*` — `access_body`: bytecheck validation and zero-copy access to an
//!   aligned body (reads the payload length so nothing is optimized away).
//! * `codec/decode/*` — `decode_body`: copy to an aligned buffer, validate, deserialize
//!   into an owned `Frame` (what `FrameDecoder` does per frame).
//! * `codec/stream/deliver_x64` — `FrameDecoder` over 64 back-to-back `Deliver`
//!   frames, as a client reads a coalesced write; throughput is per frame.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use herald_client::wire::{
    access_body, decode_body, encode_frame, encode_frame_into, ArchivedFrame, ArchivedRequest,
    Frame, FrameDecoder, IdempotencyKey, Message, Principal, Request, DEFAULT_FRAME_BYTES_MAX,
    FRAME_HEADER_LEN,
};
use rkyv::util::AlignedVec;

const PAYLOAD_BYTES: usize = 128;
const STREAM_FRAMES: usize = 64;

fn publish_frame() -> Frame {
    Frame::Request {
        id: 123_456,
        body: Request::Publish {
            conv: 42,
            key: IdempotencyKey::Producer {
                producer_id: 0x0123_4567_89ab_cdef,
                producer_seq: 1_000_000,
            },
            payload: vec![b'x'; PAYLOAD_BYTES],
        },
    }
}

fn deliver_frame() -> Frame {
    Frame::Deliver(Message {
        conv: 42,
        seq: 1_000_000,
        sender: Principal::Service("billing".into()),
        timestamp_ms: 1_700_000_000_000,
        payload: vec![b'x'; PAYLOAD_BYTES],
    })
}

/// The body (without the length header) of `frame`, in an aligned buffer.
fn aligned_body(frame: &Frame) -> AlignedVec {
    let encoded = encode_frame(frame, DEFAULT_FRAME_BYTES_MAX).unwrap();
    let mut body = AlignedVec::new();
    body.extend_from_slice(&encoded[FRAME_HEADER_LEN..]);
    body
}

/// The payload length as seen through the archive (touches the validated data).
fn archived_payload_len(frame: &ArchivedFrame) -> usize {
    match frame {
        ArchivedFrame::Request {
            body: ArchivedRequest::Publish { payload, .. },
            ..
        } => payload.len(),
        ArchivedFrame::Deliver(m) => m.payload.len(),
        _ => 0,
    }
}

fn codec(c: &mut Criterion) {
    let frames = [("publish", publish_frame()), ("deliver", deliver_frame())];

    let mut group = c.benchmark_group("codec/encode");
    group.throughput(Throughput::Elements(1));
    for (name, frame) in &frames {
        let mut out = Vec::with_capacity(1024);
        group.bench_function(*name, |b| {
            b.iter(|| {
                out.clear();
                encode_frame_into(black_box(frame), DEFAULT_FRAME_BYTES_MAX, &mut out).unwrap();
                black_box(out.len())
            })
        });
    }
    group.finish();

    let mut group = c.benchmark_group("codec/access");
    group.throughput(Throughput::Elements(1));
    for (name, frame) in &frames {
        let body = aligned_body(frame);
        group.bench_function(*name, |b| {
            b.iter(|| {
                let archived = access_body(black_box(&body), 0).unwrap();
                black_box(archived_payload_len(archived))
            })
        });
    }
    group.finish();

    let mut group = c.benchmark_group("codec/decode");
    group.throughput(Throughput::Elements(1));
    for (name, frame) in &frames {
        let encoded = encode_frame(frame, DEFAULT_FRAME_BYTES_MAX).unwrap();
        let body = &encoded[FRAME_HEADER_LEN..];
        group.bench_function(*name, |b| {
            b.iter(|| black_box(decode_body(black_box(body), 0).unwrap()))
        });
    }
    group.finish();

    let mut group = c.benchmark_group("codec/stream");
    group.throughput(Throughput::Elements(STREAM_FRAMES as u64));
    let mut stream = Vec::new();
    for _ in 0..STREAM_FRAMES {
        encode_frame_into(&deliver_frame(), DEFAULT_FRAME_BYTES_MAX, &mut stream).unwrap();
    }
    group.bench_function("deliver_x64", |b| {
        b.iter(|| {
            let mut decoder = FrameDecoder::new(DEFAULT_FRAME_BYTES_MAX);
            decoder.extend(black_box(&stream));
            let mut n = 0;
            while let Some(frame) = decoder.next_frame().unwrap() {
                black_box(&frame);
                n += 1;
            }
            assert_eq!(n, STREAM_FRAMES);
        })
    });
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .sample_size(20)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    targets = codec
}
criterion_main!(benches);
