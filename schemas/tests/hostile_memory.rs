//! Decoding hostile bytes stays within 64 MiB of memory and never panics:
//! absurd length prefixes, huge block counts and thousands of random
//! mutations of a valid payload, under a counting allocator.
#![allow(clippy::unwrap_used)] // test helpers: a panic is the failure report

use std::alloc::System;
use std::sync::Arc;

use cap::Cap;
use keel_schemas::events::OrderPlaced;
use keel_schemas::{AvroCodec, CodecOptions, LocalRegistry, SubjectNameStrategy, testdata};
use rand::{Rng, SeedableRng};

#[global_allocator]
static ALLOCATOR: Cap<System> = Cap::new(System, usize::MAX);

const LIMIT: usize = 64 * 1024 * 1024;

#[tokio::test]
async fn hostile_payloads_stay_under_64_mib() {
    let codec = AvroCodec::new(
        Arc::new(LocalRegistry::new()),
        CodecOptions {
            strategy: SubjectNameStrategy::TopicName,
            auto_register: true,
        },
    );
    let good = codec
        .encode("orders", &testdata::order_placed())
        .await
        .unwrap();
    codec.decode::<OrderPlaced>(&good).await.unwrap();
    let baseline = ALLOCATOR.allocated();
    // Past this the allocator refuses, and the process aborts: the test
    // fails loudly rather than passing on a machine with memory to spare.
    ALLOCATOR.set_limit(baseline + LIMIT).unwrap();

    let mut rng = rand::rngs::StdRng::seed_from_u64(0x6b65656c);
    let mut errors = 0;
    for round in 0..20_000 {
        let mut bytes = good.clone();
        match round % 4 {
            0 => {
                // flip a few bytes after the header
                for _ in 0..rng.random_range(1..4) {
                    let i = rng.random_range(5..bytes.len());
                    bytes[i] = rng.random();
                }
            }
            1 => {
                // a huge varint at a random position
                let i = rng.random_range(5..bytes.len());
                bytes.truncate(i);
                bytes.extend_from_slice(&[0xfe, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f]);
            }
            2 => {
                // random tail
                let i = rng.random_range(5..bytes.len());
                bytes.truncate(i);
                let extra: usize = rng.random_range(0..64);
                bytes.extend((0..extra).map(|_| rng.random::<u8>()));
            }
            _ => {
                // truncation
                bytes.truncate(rng.random_range(0..bytes.len()));
            }
        }
        if codec.decode::<OrderPlaced>(&bytes).await.is_err() {
            errors += 1;
        }
    }
    let peak = ALLOCATOR.max_allocated().saturating_sub(baseline);
    assert!(
        errors > 10_000,
        "mutations should mostly fail to decode ({errors})"
    );
    assert!(peak < LIMIT, "peak {peak} bytes above baseline");
}
