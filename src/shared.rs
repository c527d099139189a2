//! Process-wide state shared by shards, the health prober and the metrics
//! endpoint. Everything here is read-mostly: atomics written on rare events
//! (breaker transitions, probe results) or by their owning shard only.

use crate::config::{Bucket, Config, Replica};
use crate::metrics::ShardMetrics;
use crate::router::Router;
use crate::upstream::snapshot::SharedBreaker;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::Mutex;

pub use crate::clock::now_ms;

/// Probe verdicts stored in [`ReplicaShared::probe`].
pub const PROBE_UNKNOWN: u8 = 0;
pub const PROBE_OK: u8 = 1;
pub const PROBE_FAILED: u8 = 2;

/// One replica, addressed by its global id (index into `Shared::replicas`).
pub struct ReplicaShared {
    pub bucket: usize,
    pub config: Replica,
    /// TLS client for `https://` endpoints.
    pub tls: Option<monoio_rustls::TlsConnector>,
    pub breaker: SharedBreaker,
    pub probe: AtomicU8,
}

/// What one shard exposes to other threads.
#[derive(Default)]
pub struct ShardShared {
    /// Requests being served now (for the shutdown drain).
    pub in_flight: AtomicUsize,
    /// Client connections open now.
    pub open_connections: AtomicI64,
    /// Highest scrape generation this shard has published for.
    pub published: AtomicU64,
    /// The shard's metrics as of `published`.
    pub metrics: Mutex<Option<ShardMetrics>>,
    /// Set once the shard stopped accepting after a shutdown request.
    pub stopped_accepting: AtomicBool,
}

pub struct Shared {
    pub config: Config,
    pub router: Router,
    pub replicas: Vec<ReplicaShared>,
    /// `bucket_replicas[b]` = global ids of bucket `b`'s replicas, in config order.
    pub bucket_replicas: Vec<Vec<usize>>,
    pub shards: Vec<ShardShared>,
    pub scrape_generation: AtomicU64,
    pub shutdown: AtomicBool,
}

impl Shared {
    /// Builds the shared state; fails only when a TLS client cannot be set up.
    pub fn new(config: Config) -> Result<Shared, String> {
        let router = Router::new(config.buckets.iter().map(|b| b.path_prefix.as_str()));
        let mut replicas = Vec::new();
        let mut bucket_replicas = Vec::new();
        for (bi, b) in config.buckets.iter().enumerate() {
            let mut ids = Vec::new();
            for r in &b.replicas {
                ids.push(replicas.len());
                let tls = if r.endpoint.tls {
                    let c = crate::upstream::tls::connector(r)
                        .map_err(|e| format!("bucket {:?} replica {:?}: {e}", b.name, r.name))?;
                    Some(c)
                } else {
                    None
                };
                replicas.push(ReplicaShared {
                    bucket: bi,
                    tls,
                    config: r.clone(),
                    breaker: SharedBreaker::new(),
                    probe: AtomicU8::new(PROBE_UNKNOWN),
                });
            }
            bucket_replicas.push(ids);
        }
        let shards = (0..config.server.workers)
            .map(|_| ShardShared::default())
            .collect();
        Ok(Shared {
            config,
            router,
            replicas,
            bucket_replicas,
            shards,
            scrape_generation: AtomicU64::new(0),
            shutdown: AtomicBool::new(false),
        })
    }

    pub fn bucket(&self, idx: usize) -> &Bucket {
        &self.config.buckets[idx]
    }

    pub fn in_flight(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.in_flight.load(Ordering::Relaxed))
            .sum()
    }
}
