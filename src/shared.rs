//! State shared across threads.
//!
//! [`Process`] lives as long as the process: per-shard counters, the scrape
//! and shutdown flags, the metric-name registry, and the current
//! configuration *generation*. A [`Shared`] is one generation: the config,
//! router and replicas. SIGHUP builds a new generation and publishes it with an
//! epoch bump; each shard adopts it on its next request while requests already
//! running finish on the generation they started with. Breaker words of
//! replicas whose settings did not change are carried into the new generation,
//! so their state survives a reload.
//!
//! Everything read on the request path is read-mostly: atomics written on rare
//! events (breaker transitions, probe results, reloads) or by their own shard.

use crate::config::{self, Bucket, Config, Replica};
use crate::metrics::ShardMetrics;
use crate::router::Router;
use crate::upstream::snapshot::SharedBreaker;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

pub use crate::clock::now_ms;

/// Probe verdicts stored in [`ReplicaShared::probe`].
pub const PROBE_UNKNOWN: u8 = 0;
pub const PROBE_OK: u8 = 1;
pub const PROBE_FAILED: u8 = 2;

/// One replica, addressed by its id within a generation (index into `Shared::replicas`).
pub struct ReplicaShared {
    pub bucket: usize,
    pub config: Replica,
    /// TLS client for `https://` endpoints.
    pub tls: Option<monoio_rustls::TlsConnector>,
    /// Shared across generations while the replica's settings are unchanged.
    pub breaker: Arc<SharedBreaker>,
    pub probe: Arc<AtomicU8>,
    /// Stable id of `(bucket name, replica name)` for metrics.
    pub metric_id: usize,
    /// When (ms since epoch) this replica last gave any core a non-5xx
    /// answer, to about a second: written at most once a second per core.
    /// Tells a request that fails everywhere from a replica that does.
    pub last_answer_ms: AtomicU64,
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

/// Stable metric ids for bucket and replica names, across reloads. Only grows.
#[derive(Default)]
pub struct Registry {
    pub buckets: Vec<String>,
    pub replicas: Vec<(String, String)>,
}

impl Registry {
    fn bucket_id(&mut self, name: &str) -> usize {
        match self.buckets.iter().position(|b| b == name) {
            Some(i) => i,
            None => {
                self.buckets.push(name.to_string());
                self.buckets.len() - 1
            }
        }
    }
    fn replica_id(&mut self, bucket: &str, replica: &str) -> usize {
        match self
            .replicas
            .iter()
            .position(|(b, r)| b == bucket && r == replica)
        {
            Some(i) => i,
            None => {
                self.replicas
                    .push((bucket.to_string(), replica.to_string()));
                self.replicas.len() - 1
            }
        }
    }
}

pub struct Process {
    pub config_path: String,
    pub shards: Vec<ShardShared>,
    pub scrape_generation: AtomicU64,
    pub shutdown: AtomicBool,
    /// Bumped each time a new generation is installed.
    pub epoch: AtomicU64,
    pub reloads_ok: AtomicU64,
    pub reloads_failed: AtomicU64,
    pub registry: Mutex<Registry>,
    current: Mutex<Option<Arc<Shared>>>,
}

/// One configuration generation.
pub struct Shared {
    pub process: Arc<Process>,
    pub config: Config,
    pub router: Router,
    pub replicas: Vec<ReplicaShared>,
    /// `bucket_replicas[b]` = ids of bucket `b`'s replicas, in config order.
    pub bucket_replicas: Vec<Vec<usize>>,
    /// Stable metric id of each bucket.
    pub bucket_metric: Vec<usize>,
}

impl Process {
    /// Builds the process state and its first generation.
    pub fn start(config: Config, config_path: &str) -> Result<Arc<Process>, String> {
        let process = Arc::new(Process {
            config_path: config_path.to_string(),
            shards: (0..config.server.workers)
                .map(|_| ShardShared::default())
                .collect(),
            scrape_generation: AtomicU64::new(0),
            shutdown: AtomicBool::new(false),
            epoch: AtomicU64::new(0),
            reloads_ok: AtomicU64::new(0),
            reloads_failed: AtomicU64::new(0),
            registry: Mutex::new(Registry::default()),
            current: Mutex::new(None),
        });
        let first = Shared::build(config, process.clone(), None)?;
        process.install(first);
        Ok(process)
    }

    /// The current generation.
    pub fn current(&self) -> Arc<Shared> {
        match self.current.lock() {
            Ok(g) => g.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
        .expect("a generation is installed at start")
    }

    fn install(&self, gen: Shared) {
        let gen = Arc::new(gen);
        match self.current.lock() {
            Ok(mut g) => *g = Some(gen),
            Err(poisoned) => *poisoned.into_inner() = Some(gen),
        }
        self.epoch.fetch_add(1, Ordering::AcqRel);
    }

    /// Re-reads the config file and installs it; on any problem the running
    /// generation stays and the problems are returned.
    pub fn reload(self: &Arc<Self>) -> Result<Arc<Shared>, Vec<String>> {
        let result = self.try_reload();
        match &result {
            Ok(_) => self.reloads_ok.fetch_add(1, Ordering::Relaxed),
            Err(_) => self.reloads_failed.fetch_add(1, Ordering::Relaxed),
        };
        result
    }

    fn try_reload(self: &Arc<Self>) -> Result<Arc<Shared>, Vec<String>> {
        let config = config::load(&self.config_path)?;
        let old = self.current();
        let mut errs = Vec::new();
        let (a, b) = (&old.config.server, &config.server);
        if a.address != b.address
            || a.workers != b.workers
            || a.tls != b.tls
            || a.max_connections != b.max_connections
        {
            errs.push("server.address, server.workers, server.tls and server.max_connections cannot change on reload; restart instead".into());
        }
        if old.config.metrics.enabled != config.metrics.enabled
            || old.config.metrics.address != config.metrics.address
        {
            errs.push("metrics cannot change on reload; restart instead".into());
        }
        if !errs.is_empty() {
            return Err(errs);
        }
        let new = Shared::build(config, self.clone(), Some(&old)).map_err(|e| vec![e])?;
        self.install(new);
        Ok(self.current())
    }

    pub fn in_flight(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.in_flight.load(Ordering::Relaxed))
            .sum()
    }
}

impl Shared {
    /// Builds a generation; replicas unchanged since `previous` keep their
    /// breaker state. Fails only when a TLS client cannot be set up.
    fn build(
        config: Config,
        process: Arc<Process>,
        previous: Option<&Shared>,
    ) -> Result<Shared, String> {
        let router = Router::new(config.buckets.iter().map(|b| b.path_prefix.as_str()));
        let mut replicas = Vec::new();
        let mut bucket_replicas = Vec::new();
        let mut bucket_metric = Vec::new();
        let mut registry = match process.registry.lock() {
            Ok(r) => r,
            Err(poisoned) => poisoned.into_inner(),
        };
        let mut carried: HashMap<(&str, &str), &ReplicaShared> = HashMap::new();
        if let Some(prev) = previous {
            for r in &prev.replicas {
                carried.insert(
                    (prev.bucket(r.bucket).name.as_str(), r.config.name.as_str()),
                    r,
                );
            }
        }
        for (bi, b) in config.buckets.iter().enumerate() {
            bucket_metric.push(registry.bucket_id(&b.name));
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
                // Same bucket, same replica name, same settings, same breaker
                // settings: the breaker (and probe verdict) carry over.
                let same = carried
                    .get(&(b.name.as_str(), r.name.as_str()))
                    .filter(|old| {
                        old.config == *r
                            && previous.is_some_and(|p| p.bucket(old.bucket).breaker == b.breaker)
                    });
                let (breaker, probe) = match same {
                    Some(old) => (old.breaker.clone(), old.probe.clone()),
                    None => (
                        Arc::new(SharedBreaker::new()),
                        Arc::new(AtomicU8::new(PROBE_UNKNOWN)),
                    ),
                };
                replicas.push(ReplicaShared {
                    bucket: bi,
                    tls,
                    config: r.clone(),
                    breaker,
                    probe,
                    metric_id: registry.replica_id(&b.name, &r.name),
                    last_answer_ms: AtomicU64::new(0),
                });
            }
            bucket_replicas.push(ids);
        }
        drop(registry);
        Ok(Shared {
            process,
            config,
            router,
            replicas,
            bucket_replicas,
            bucket_metric,
        })
    }

    pub fn bucket(&self, idx: usize) -> &Bucket {
        &self.config.buckets[idx]
    }
}
