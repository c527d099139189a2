//! State shared across threads.
//!
//! [`Process`] lives as long as the process: per-worker counters, the scrape
//! and shutdown flags, the metric-name registry, and the current
//! configuration *generation*. A [`Generation`] is one generation: the config,
//! router and replicas. SIGHUP builds a new generation and publishes it with an
//! epoch bump; each worker adopts it on its next request while requests already
//! running finish on the generation they started with. Breaker words of
//! replicas whose settings did not change are carried into the new generation,
//! so their state survives a reload.
//!
//! Everything read on the request path is read-mostly: atomics written on rare
//! events (breaker transitions, probe results, reloads) or by their own worker.

use crate::cache::store::MemoryStore;
use crate::config::{self, Bucket, Config, Replica};
use crate::metrics::CoreMetrics;
use crate::router::Router;
use crate::upstream::snapshot::SharedBreaker;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

pub use crate::clock::now_ms;

/// Probe verdicts stored in [`ReplicaState::probe`].
pub const PROBE_UNKNOWN: u8 = 0;
/// The last probe passed.
pub const PROBE_OK: u8 = 1;
/// The last probe failed.
pub const PROBE_FAILED: u8 = 2;

/// One replica as one configuration generation sees it (owned by the
/// [`Generation`], read by every thread): its settings, TLS client, published
/// breaker and probe verdict. Addressed by its id within the generation
/// (index into `Generation::replicas`).
pub struct ReplicaState {
    /// Index of its bucket in the generation.
    pub bucket: usize,
    /// Its resolved settings.
    pub config: Replica,
    /// TLS client for `https://` endpoints.
    pub tls: Option<crate::tls::TlsConnector>,
    /// Carried across generations while the replica's settings are unchanged.
    pub breaker: Arc<SharedBreaker>,
    /// The prober's last verdict (`PROBE_*`).
    pub probe: Arc<AtomicU8>,
    /// Stable id of `(bucket name, replica name)` for metrics.
    pub metric_id: usize,
    /// Its signing keys, as the credentials thread publishes them.
    pub credentials: Arc<crate::credentials::KeyCell>,
    /// When (ms since epoch) this replica last gave any core a non-5xx
    /// answer, to about a second: written at most once a second per core.
    /// Tells a request that fails everywhere from a replica that does.
    pub last_answer_ms: AtomicU64,
}

/// What one worker thread publishes to the others (process-wide, one per
/// worker): in-flight and open counts, scraped metrics, shutdown progress.
#[derive(Default)]
pub struct CoreStatus {
    /// Requests being served now (for the shutdown drain).
    pub in_flight: AtomicUsize,
    /// Client connections open now.
    pub open_connections: AtomicI64,
    /// Of those, idle ones in the lot (no task), as of the last sweep.
    pub lot_connections: AtomicUsize,
    /// Highest scrape generation this worker has published for.
    pub published: AtomicU64,
    /// The worker's metrics as of `published`.
    pub metrics: Mutex<Option<CoreMetrics>>,
    /// Set once the worker stopped accepting after a shutdown request.
    pub stopped_accepting: AtomicBool,
    /// Set once the worker's accept loop runs (readiness for systemd).
    pub accepting: AtomicBool,
    /// When (ms, process clock) the worker last ticked: the watchdog's
    /// evidence that it is not stuck.
    pub last_tick_ms: AtomicU64,
}

/// Stable metric ids for bucket and replica names, across reloads. Only grows.
#[derive(Default)]
pub struct Registry {
    /// Bucket names, by metric id.
    pub buckets: Vec<String>,
    /// `(bucket, replica)` names, by metric id.
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

/// Process-wide state, alive from start to exit: per-worker status, the
/// scrape and shutdown flags, the metric-name registry and the current
/// configuration [`Generation`].
pub struct Process {
    /// The config file, re-read on SIGHUP.
    pub config_path: String,
    /// One status per worker thread.
    pub workers: Vec<CoreStatus>,
    /// Bumped by each scrape; workers publish when they see it.
    pub scrape_generation: AtomicU64,
    /// Set by SIGTERM/SIGINT.
    pub shutdown: AtomicBool,
    /// The configuration generation serving new requests; its version is
    /// bumped each time one is installed.
    pub generation: crate::published::Published<Option<Arc<Generation>>>,
    /// Reloads applied.
    pub reloads_ok: AtomicU64,
    /// Reloads rejected.
    pub reloads_failed: AtomicU64,
    /// Stable metric ids of bucket and replica names.
    pub registry: Mutex<Registry>,
    /// The memory cache tier, when `cache.enabled` (kept across reloads).
    pub cache: Option<MemoryStore>,
    /// The disk cache tier, when `cache.disk.enabled` too.
    pub disk: Option<Arc<crate::cache::disk::DiskStore>>,
    /// The Redis tier, when `cache.redis` is on (with the memory tier).
    pub redis: Option<Arc<crate::cache::redis::RedisTier>>,
    /// The Redis tier's write queue, until its thread takes it.
    pub redis_queue: Mutex<Option<std::sync::mpsc::Receiver<crate::cache::redis::RedisWrite>>>,
    /// The disk tier's write queue, until its thread takes it.
    pub disk_queue: Mutex<Option<flume::Receiver<crate::cache::disk::DiskWrite>>>,
    /// Cache fills under way, for collapsed forwarding.
    pub fills: crate::cache::collapse::Fills,
    /// Keys fetched from `jwt.jwks_url` (empty without one).
    pub jwks: Arc<crate::access::jwks::Jwks>,
    /// Signing credentials of every replica, by source.
    pub credentials: Arc<crate::credentials::Hub>,
    /// When each key last had a stale copy served, for one WARN a minute per
    /// key across workers. Locked only while serving stale (an outage).
    pub stale_warned: Mutex<HashMap<String, std::time::Instant>>,
    /// Cache pre-warming tasks (the admin API's).
    pub prewarm: crate::prewarm::Tasks,
    /// The audit log, when `audit_log` is enabled.
    pub audit: Option<Arc<crate::audit::Audit>>,
    /// The span exporter, when `observability.tracing` is enabled.
    pub traces: Option<Arc<crate::trace::export::Exporter>>,
    /// Image transform counts (over every generation's pool).
    pub image_stats: Arc<crate::images::Stats>,
}

/// One configuration generation (immutable, shared by every thread through
/// an `Arc`): the config, router and replicas. A reload builds the next one.
pub struct Generation {
    /// The process this generation belongs to.
    pub process: Arc<Process>,
    /// The resolved configuration.
    pub config: Config,
    /// Path prefix -> bucket.
    pub router: Router,
    /// Every replica of every bucket, by replica id.
    pub replicas: Vec<ReplicaState>,
    /// `bucket_replicas[b]` = ids of bucket `b`'s replicas, in config order.
    pub bucket_replicas: Vec<Vec<usize>>,
    /// Stable metric id of each bucket.
    pub bucket_metric: Vec<usize>,
    /// The image transform pool (`config.image_pool`): carried over from
    /// the previous generation when its size is unchanged.
    pub images: Option<Arc<crate::images::Pool>>,
}

impl Process {
    /// Builds the process state and its first generation.
    pub fn start(config: Config, config_path: &str) -> Result<Arc<Process>, String> {
        let cache = match config.cache.enabled {
            true => {
                let largest = config
                    .buckets
                    .iter()
                    .map(|b| b.cache.max_item_bytes)
                    .fold(config.cache.max_item_bytes, u64::max);
                Some(MemoryStore::new(config.cache.memory_bytes, largest)?)
            }
            false => None,
        };
        let (disk, disk_queue) = match (&cache, &config.cache.disk) {
            (Some(_), Some(d)) => {
                let origins = config
                    .buckets
                    .iter()
                    .map(|b| (b.name.clone(), b.origin.clone()))
                    .collect();
                let (store, rx, opened) =
                    crate::cache::disk::DiskStore::open(&d.dir, d.max_bytes, &origins);
                match opened {
                    Ok(n) => crate::log!(
                        crate::config::Level::Info,
                        "Disk cache opened",
                        dir = d.dir,
                        entries = n,
                        bytes = store.bytes(),
                        dropped_other_origin = store.foreign.load(Ordering::Relaxed),
                    ),
                    Err(e) => crate::log!(
                        crate::config::Level::Error,
                        "Disk cache unusable; continuing memory-only",
                        dir = d.dir,
                        error = e
                    ),
                }
                (Some(Arc::new(store)), Some(rx))
            }
            _ => (None, None),
        };
        let (redis, redis_queue) = match (&cache, &config.cache.redis) {
            (Some(_), Some(r)) => {
                let (tier, rx) = crate::cache::redis::RedisTier::new(r.clone());
                (Some(tier), Some(rx))
            }
            _ => (None, None),
        };
        let audit = match &config.audit {
            Some(settings) => Some(crate::audit::Audit::start(settings.clone())?),
            None => None,
        };
        let traces = match &config.tracing {
            Some(t) => Some(crate::trace::export::Exporter::start(t.clone())?),
            None => None,
        };
        let process = Arc::new(Process {
            config_path: config_path.to_string(),
            workers: (0..config.server.workers)
                .map(|_| CoreStatus::default())
                .collect(),
            scrape_generation: AtomicU64::new(0),
            shutdown: AtomicBool::new(false),
            generation: crate::published::Published::new(None),
            reloads_ok: AtomicU64::new(0),
            reloads_failed: AtomicU64::new(0),
            registry: Mutex::new(Registry::default()),
            cache,
            disk,
            disk_queue: Mutex::new(disk_queue),
            redis,
            redis_queue: Mutex::new(redis_queue),
            stale_warned: Mutex::new(HashMap::new()),
            jwks: Arc::default(),
            credentials: Arc::default(),
            fills: Default::default(),
            prewarm: Default::default(),
            audit,
            traces,
            image_stats: Arc::default(),
        });
        let first = Generation::build(config, process.clone(), None)?;
        process.install(first);
        Ok(process)
    }

    /// The current generation.
    pub fn current(&self) -> Arc<Generation> {
        (*self.generation.load())
            .clone()
            .expect("a generation is installed at start")
    }

    /// The generation's version: bumped by each install (one atomic load).
    pub fn epoch(&self) -> u64 {
        self.generation.version()
    }

    fn install(&self, gen: Generation) {
        self.generation.publish(Some(Arc::new(gen)));
    }

    /// Re-reads the config file and installs it; on any problem the running
    /// generation stays and the problems are returned.
    pub fn reload(self: &Arc<Self>) -> Result<Arc<Generation>, Vec<String>> {
        let result = self.try_reload();
        match &result {
            Ok(_) => self.reloads_ok.fetch_add(1, Ordering::Relaxed),
            Err(_) => self.reloads_failed.fetch_add(1, Ordering::Relaxed),
        };
        result
    }

    fn try_reload(self: &Arc<Self>) -> Result<Arc<Generation>, Vec<String>> {
        let config = config::load(&self.config_path)?;
        for w in &config.warnings {
            crate::log!(crate::config::Level::Warn, "Configuration", warning = w);
        }
        let old = self.current();
        let mut errs = Vec::new();
        let (a, b) = (&old.config.server, &config.server);
        if a.address != b.address
            || a.workers != b.workers
            || a.tls != b.tls
            || a.max_connections != b.max_connections
            || a.max_upstream_connections != b.max_upstream_connections
        {
            errs.push("server.address, server.workers, server.tls, server.max_connections and server.max_upstream_connections cannot change on reload; restart instead".into());
        }
        if old.config.metrics.enabled != config.metrics.enabled
            || old.config.metrics.address != config.metrics.address
        {
            errs.push("metrics cannot change on reload; restart instead".into());
        }
        if old.config.cache != config.cache {
            errs.push(
                "cache cannot change on reload (bucket-level cache settings can); restart instead"
                    .into(),
            );
        }
        if old.config.audit != config.audit {
            errs.push("audit_log cannot change on reload; restart instead".into());
        }
        if old.config.tracing != config.tracing {
            errs.push("observability.tracing cannot change on reload; restart instead".into());
        }
        if !errs.is_empty() {
            return Err(errs);
        }
        self.drop_moved_buckets(&old.config, &config);
        let new = Generation::build(config, self.clone(), Some(&old)).map_err(|e| vec![e])?;
        self.install(new);
        Ok(self.current())
    }

    /// A bucket whose S3 location changed (replica endpoints or bucket
    /// names) loses its cached entries: they may not be the same objects.
    /// (Its new cache keys name the new origin, so the old entries could
    /// never be found again; this frees their room at once.)
    fn drop_moved_buckets(&self, old: &Config, new: &Config) {
        let Some(store) = &self.cache else { return };
        for b in &old.buckets {
            let moved = new
                .buckets
                .iter()
                .find(|n| n.name == b.name)
                .is_none_or(|n| n.origin != b.origin);
            if moved {
                let prefix = crate::cache::store::bucket_prefix(&b.name);
                store.remove_prefix(&prefix);
                if let Some(disk) = &self.disk {
                    disk.remove_prefix(&prefix);
                }
            }
        }
    }

    /// Requests being served now, over all workers.
    pub fn in_flight(&self) -> usize {
        self.workers
            .iter()
            .map(|s| s.in_flight.load(Ordering::Relaxed))
            .sum()
    }

    /// Drops the local copies whose cache keys begin with `prefix` (`""`:
    /// every copy); how many, in memory and on disk. The one local purge
    /// (admin API, fleet purges).
    pub fn purge_local(&self, prefix: &str) -> (usize, usize) {
        let memory = self.cache.as_ref().map_or(0, |c| c.purge(prefix));
        let disk = self.disk.as_ref().map_or(0, |d| d.remove_prefix(prefix));
        (memory, disk)
    }

    /// Copies held in the local tiers.
    pub fn local_items(&self) -> usize {
        self.cache.as_ref().map_or(0, |c| c.items()) + self.disk.as_ref().map_or(0, |d| d.items())
    }

    /// Client connections open now, over all workers.
    pub fn open_connections(&self) -> i64 {
        self.workers
            .iter()
            .map(|s| s.open_connections.load(Ordering::Relaxed))
            .sum()
    }
}

impl Generation {
    /// Builds a generation; replicas unchanged since `previous` keep their
    /// breaker state. Fails only when a TLS client cannot be set up.
    fn build(
        config: Config,
        process: Arc<Process>,
        previous: Option<&Generation>,
    ) -> Result<Generation, String> {
        let router = Router::new(config.buckets.iter().map(|b| b.path_prefix.as_str()));
        let mut replicas = Vec::new();
        let mut bucket_replicas = Vec::new();
        let mut bucket_metric = Vec::new();
        let mut registry = match process.registry.lock() {
            Ok(r) => r,
            Err(poisoned) => poisoned.into_inner(),
        };
        let mut carried: HashMap<(&str, &str), &ReplicaState> = HashMap::new();
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
                    let c = crate::tls::connector(r.ca_file.as_deref(), r.insecure_skip_verify)
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
                replicas.push(ReplicaState {
                    bucket: bi,
                    tls,
                    config: r.clone(),
                    breaker,
                    probe,
                    metric_id: registry.replica_id(&b.name, &r.name),
                    last_answer_ms: AtomicU64::new(0),
                    credentials: process.credentials.cell(&r.credentials, &r.region),
                });
            }
            bucket_replicas.push(ids);
        }
        drop(registry);
        let images = match config.image_pool {
            None => None,
            Some(size) => match previous.filter(|p| p.config.image_pool == Some(size)) {
                Some(p) => p.images.clone(),
                None => Some(Arc::new(crate::images::Pool::start(
                    size.threads,
                    size.queue,
                    process.image_stats.clone(),
                )?)),
            },
        };
        Ok(Generation {
            process,
            config,
            router,
            replicas,
            bucket_replicas,
            bucket_metric,
            images,
        })
    }

    /// Bucket `idx` of this generation.
    pub fn bucket(&self, idx: usize) -> &Bucket {
        &self.config.buckets[idx]
    }
}
