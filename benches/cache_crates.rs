//! quick_cache against moka for the memory tier, same workload, same bound:
//!
//! - `hit/*`: a lookup that hits (an `Arc` clone), the cost every cache hit
//!   pays on the request path;
//! - `churn/*`: insert of a new 16 KiB object into a full cache (eviction
//!   included), the cost of a fill;
//! - `hit_ratio`: printed once: hits of a Zipf-like hot set of 200 objects
//!   while a scan of 20 000 one-time objects passes through a cache that holds
//!   about 1 000 of them (scan resistance: the hot set should survive).
//!
//! `cargo bench --bench cache_crates`; results and the choice in the README.

use criterion::{black_box, criterion_group, criterion_main, Criterion};
use std::sync::Arc;

const OBJ: usize = 16 * 1024;
const BOUND: u64 = 1000 * OBJ as u64;

type Val = Arc<Vec<u8>>;

#[derive(Clone)]
struct Bytes;
impl quick_cache::Weighter<u64, Val> for Bytes {
    fn weight(&self, _k: &u64, v: &Val) -> u64 {
        v.len() as u64
    }
}

fn quick() -> quick_cache::sync::Cache<u64, Val, Bytes> {
    quick_cache::sync::Cache::with_weighter(1000, BOUND, Bytes)
}

fn moka() -> moka::sync::Cache<u64, Val> {
    moka::sync::Cache::builder()
        .max_capacity(BOUND)
        .weigher(|_k: &u64, v: &Val| v.len() as u32)
        .build()
}

/// Hot-set hits while a one-time scan passes: (hot lookups, hits).
fn hit_ratio(get: &dyn Fn(u64) -> bool, insert: &dyn Fn(u64)) -> f64 {
    let (mut lookups, mut hits) = (0u64, 0u64);
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    for i in 0..20_000u64 {
        // Two hot requests (skewed towards low ids) per scanned object.
        for _ in 0..2 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let hot = (x % 200) * (x % 200) / 200;
            lookups += 1;
            if get(hot) {
                hits += 1;
            } else {
                insert(hot);
            }
        }
        let scan = 1_000_000 + i;
        if !get(scan) {
            insert(scan);
        }
    }
    hits as f64 / lookups as f64
}

fn crates(c: &mut Criterion) {
    let value: Val = Arc::new(vec![1u8; OBJ]);
    let q = quick();
    let m = moka();
    for k in 0..900u64 {
        q.insert(k, value.clone());
        m.insert(k, value.clone());
    }
    m.run_pending_tasks();
    c.bench_function("hit/quick_cache", |b| {
        let mut k = 0;
        b.iter(|| {
            k = (k + 1) % 900;
            black_box(q.get(&k))
        })
    });
    c.bench_function("hit/moka", |b| {
        let mut k = 0;
        b.iter(|| {
            k = (k + 1) % 900;
            black_box(m.get(&k))
        })
    });
    c.bench_function("churn/quick_cache", |b| {
        let mut k = 10_000u64;
        b.iter(|| {
            k += 1;
            q.insert(k, value.clone())
        })
    });
    c.bench_function("churn/moka", |b| {
        let mut k = 10_000u64;
        b.iter(|| {
            k += 1;
            m.insert(k, value.clone())
        })
    });
    let q = quick();
    let m = moka();
    let v = value.clone();
    let rq = hit_ratio(&|k| q.get(&k).is_some(), &|k| q.insert(k, v.clone()));
    let v = value.clone();
    let rm = hit_ratio(&|k| m.get(&k).is_some(), &|k| {
        m.insert(k, v.clone());
        m.run_pending_tasks();
    });
    println!("hit_ratio under a scan: quick_cache {rq:.3}, moka {rm:.3}");
}

criterion_group!(benches, crates);
criterion_main!(benches);
