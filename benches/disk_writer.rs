//! The disk tier's writer (issue #23): entries stored per second by its one
//! thread, one entry at a time against several in flight, on the file
//! system the bench runs on (`TMPDIR`; ext4 here). Each sample offers
//! 2,000 entries of 16 KiB as fast as the queue takes them (an offer the
//! full queue refuses is retried) and waits until all are indexed.
//!
//! `cargo bench --bench disk_writer`; the figures and the choice are in
//! loadtest/results/performance.md.

use criterion::{criterion_group, criterion_main, Criterion};
use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant, UNIX_EPOCH};
use yatagarasu::cache::disk::DiskStore;
use yatagarasu::cache::store::Object;

const ENTRIES: usize = 2000;
const BODY: usize = 16 * 1024;

fn object() -> Arc<Object> {
    Arc::new(Object {
        stored_at: UNIX_EPOCH + Duration::from_secs(1_800_000_000),
        fresh_for: Duration::from_secs(600),
        etag: "\"v1\"".into(),
        last_modified: None,
        headers: "Content-Type: application/octet-stream\r\n".into(),
        body: bytes::Bytes::from(vec![7u8; BODY]).into(),
        total: BODY as u64,
        touched_ms: Default::default(),
    })
}

/// Time to store `ENTRIES` entries with `in_flight` writes at once.
fn drain(in_flight: usize) -> Duration {
    let dir = tempfile::tempdir().expect("temporary directory");
    let path = dir.path().to_str().expect("utf-8 path").to_string();
    let origins = HashMap::from([("b".to_string(), "o".to_string())]);
    let (store, rx, opened) = DiskStore::open(&path, 1 << 40, &origins);
    opened.expect("disk store");
    let store = Arc::new(store);
    let writer = store.clone();
    let thread = std::thread::spawn(move || {
        let mut rt = monoio::RuntimeBuilder::<monoio::FusionDriver>::new()
            .build()
            .expect("runtime");
        rt.block_on(writer.run_writer_with(rx, || 0, in_flight));
    });
    let o = object();
    let start = Instant::now();
    for i in 0..ENTRIES {
        loop {
            let before = store.writes_dropped.load(Ordering::Relaxed);
            store.offer(format!("b\0k{i}\0\0o"), o.clone(), 0);
            if store.writes_dropped.load(Ordering::Relaxed) == before {
                break;
            }
            std::thread::sleep(Duration::from_micros(50));
        }
    }
    while store.items() < ENTRIES {
        std::thread::sleep(Duration::from_micros(200));
    }
    // The writer thread holds the store, and with it the queue's sender:
    // it waits on the queue until the bench process ends.
    drop(thread);
    start.elapsed()
}

fn writer(c: &mut Criterion) {
    let mut g = c.benchmark_group("disk_writer");
    g.sample_size(10);
    for in_flight in [1usize, 4, 16] {
        g.bench_function(format!("{ENTRIES}x16KiB/in_flight_{in_flight}"), |b| {
            b.iter_custom(|iters| (0..iters).map(|_| drain(in_flight)).sum())
        });
    }
    g.finish();
}

criterion_group!(benches, writer);
criterion_main!(benches);
