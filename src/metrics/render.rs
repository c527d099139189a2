//! Prometheus text exposition of merged worker metrics and live replica state.

use super::outcome::{Engine, Label};
use super::CoreMetrics;
use crate::shared::{Generation, PROBE_FAILED};
use crate::upstream::breaker::State;
use hdrhistogram::Histogram;
use prometheus::proto::{
    Bucket, Counter, Gauge, Histogram as PHistogram, LabelPair, Metric, MetricFamily, MetricType,
};
use prometheus::{Encoder, TextEncoder};
use std::sync::atomic::Ordering;

/// Histogram bucket bounds in seconds.
const BOUNDS: [f64; 16] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0,
];

fn labels(pairs: &[(&str, &str)]) -> Vec<LabelPair> {
    pairs
        .iter()
        .map(|(k, v)| {
            let mut l = LabelPair::default();
            l.set_name((*k).to_string());
            l.set_value((*v).to_string());
            l
        })
        .collect()
}

fn family(name: &str, help: &str, kind: MetricType, metrics: Vec<Metric>) -> MetricFamily {
    let mut f = MetricFamily::default();
    f.set_name(name.to_string());
    f.set_help(help.to_string());
    f.set_field_type(kind);
    f.set_metric(metrics);
    f
}

fn counter(pairs: &[(&str, &str)], v: f64) -> Metric {
    let mut c = Counter::default();
    c.set_value(v);
    let mut m = Metric::default();
    m.set_label(labels(pairs));
    m.set_counter(c);
    m
}

fn gauge(pairs: &[(&str, &str)], v: f64) -> Metric {
    let mut g = Gauge::default();
    g.set_value(v);
    let mut m = Metric::default();
    m.set_label(labels(pairs));
    m.set_gauge(g);
    m
}

fn histogram(pairs: &[(&str, &str)], h: &Histogram<u64>) -> Metric {
    let mut counts = [0u64; BOUNDS.len()];
    let mut sum_us = 0f64;
    for v in h.iter_recorded() {
        let value = h.highest_equivalent(v.value_iterated_to());
        let n = v.count_at_value();
        sum_us += h.median_equivalent(value) as f64 * n as f64;
        let secs = value as f64 / 1e6;
        if let Some(i) = BOUNDS.iter().position(|b| secs <= *b) {
            counts[i] += n;
        }
    }
    let mut cumulative = 0;
    let buckets = BOUNDS
        .iter()
        .zip(counts)
        .map(|(bound, c)| {
            cumulative += c;
            let mut b = Bucket::default();
            b.set_upper_bound(*bound);
            b.set_cumulative_count(cumulative);
            b
        })
        .collect();
    let mut ph = PHistogram::default();
    ph.set_sample_count(h.len());
    ph.set_sample_sum(sum_us / 1e6);
    ph.set_bucket(buckets);
    let mut m = Metric::default();
    m.set_label(labels(pairs));
    m.set_histogram(ph);
    m
}

/// `yatagarasu_credentials_*`: per replica of the current generation, its
/// source's fetch counts and the time its keys have left. Static keys have
/// no expiry and no refreshes.
fn credential_families(shared: &Generation, families: &mut Vec<MetricFamily>) {
    let now = std::time::SystemTime::now();
    let mut refreshes = Vec::new();
    let mut expiry = Vec::new();
    for r in &shared.replicas {
        let bucket = shared.bucket(r.bucket).name.as_str();
        let l = [("bucket", bucket), ("replica", r.config.name.as_str())];
        let cell = &r.credentials;
        if cell.refreshable() {
            for (result, n) in [("ok", &cell.ok), ("failure", &cell.failed)] {
                refreshes.push(counter(
                    &[l[0], l[1], ("result", result)],
                    n.load(Ordering::Relaxed) as f64,
                ));
            }
        }
        if let Some(left) = cell.expires_in(now) {
            expiry.push(gauge(&l, left));
        }
    }
    families.push(family(
        "yatagarasu_credentials_refresh_total",
        "Credential fetches per replica by result (ok, failure); static keys are never fetched.",
        MetricType::COUNTER,
        refreshes,
    ));
    families.push(family(
        "yatagarasu_credentials_expiry_seconds",
        "Seconds until the replica's current credentials expire (negative once expired); absent for keys that never expire.",
        MetricType::GAUGE,
        expiry,
    ));
}

/// Bucket and replica names by their stable metric ids.
struct Names<'r>(&'r crate::shared::Registry);

impl Names<'_> {
    fn bucket(&self, i: usize) -> &str {
        self.0.buckets.get(i).map_or("", |b| b.as_str())
    }

    fn replica(&self, i: usize) -> Option<(&str, &str)> {
        self.0
            .replicas
            .get(i)
            .map(|(b, r)| (b.as_str(), r.as_str()))
    }
}

/// Renders every metric as Prometheus text.
pub fn render(shared: &Generation, merged: &CoreMetrics) -> String {
    let mut families = Vec::new();
    // Counters are keyed by stable metric ids; names come from the registry.
    let registry = match shared.process.registry.lock() {
        Ok(r) => r,
        Err(poisoned) => poisoned.into_inner(),
    };
    let names = Names(&registry);
    request_families(merged, &names, &mut families);
    cache_families(shared, merged, &|i| names.bucket(i), &mut families);
    access_families(shared, merged, &names, &mut families);
    traffic_families(shared, merged, &mut families);
    replica_families(shared, merged, &names, &mut families);
    process_families(shared, &mut families);
    families.retain(|f| !f.get_metric().is_empty());

    let mut out = Vec::new();
    if TextEncoder::new().encode(&families, &mut out).is_err() {
        return String::from("# metrics encoding failed\n");
    }
    String::from_utf8(out).unwrap_or_default()
}

/// Client requests by bucket, method and status.
fn request_families(merged: &CoreMetrics, names: &Names<'_>, families: &mut Vec<MetricFamily>) {
    let bucket_name = |i: usize| names.bucket(i);
    let mut reqs: Vec<_> = merged.requests.iter().collect();
    reqs.sort_by_key(|(k, _)| **k);
    let metrics = reqs
        .into_iter()
        .map(|((b, m, s), v)| {
            let status = s.to_string();
            counter(
                &[
                    ("bucket", bucket_name(*b)),
                    ("method", m.as_str()),
                    ("status", &status),
                ],
                *v as f64,
            )
        })
        .collect();
    families.push(family(
        "yatagarasu_requests_total",
        "Client requests served, by bucket, method and status.",
        MetricType::COUNTER,
        metrics,
    ));
}

/// Who may read: JWKS, authentication, policy decisions, limits, IP filters.
fn access_families(
    shared: &Generation,
    merged: &CoreMetrics,
    names: &Names<'_>,
    families: &mut Vec<MetricFamily>,
) {
    let bucket_name = |i: usize| names.bucket(i);
    let jwks = &shared.process.jwks;
    families.push(family(
        "yatagarasu_jwks_refresh_total",
        "JWKS fetches by result (ok, failure).",
        MetricType::COUNTER,
        vec![
            counter(&[("result", "ok")], jwks.ok.load(Ordering::Relaxed) as f64),
            counter(
                &[("result", "failure")],
                jwks.failed.load(Ordering::Relaxed) as f64,
            ),
        ],
    ));
    credential_families(shared, families);
    audit_families(shared, families);
    trace_families(shared, families);
    families.push(family(
        "yatagarasu_auth_requests_total",
        "JWT authentication outcomes by bucket and result (ok, missing, invalid, expired, forbidden).",
        MetricType::COUNTER,
        merged
            .auth
            .nonzero()
            .map(|(b, r, v)| counter(&[("bucket", bucket_name(b)), ("result", r)], v as f64))
            .collect(),
    ));
    families.push(family(
        "yatagarasu_authz_decisions_total",
        "Policy decisions by bucket, engine (opa, openfga, rego) and result (allow, deny, error_open: allowed by fail_mode open, error_closed: refused with 503).",
        MetricType::COUNTER,
        merged
            .authz
            .nonzero()
            .map(|(key, r, v)| {
                let (b, e) = (key / Engine::COUNT, Engine::label_at(key % Engine::COUNT));
                counter(&[("bucket", bucket_name(b)), ("engine", e), ("result", r)], v as f64)
            })
            .collect(),
    ));
    families.push(family(
        "yatagarasu_authz_cache_total",
        "Policy decision cache lookups by bucket and result (hit, miss).",
        MetricType::COUNTER,
        merged
            .authz_cache
            .nonzero()
            .map(|(b, r, v)| counter(&[("bucket", bucket_name(b)), ("result", r)], v as f64))
            .collect(),
    ));
    families.push(family(
        "yatagarasu_authz_duration_seconds",
        "Time a policy engine took to decide (calls made, not remembered decisions), by engine.",
        MetricType::HISTOGRAM,
        merged
            .authz_duration
            .iter()
            .enumerate()
            .filter_map(|(e, h)| Some(histogram(&[("engine", Engine::label_at(e))], h.as_ref()?)))
            .collect(),
    ));
    families.push(family(
        "yatagarasu_rate_limited_total",
        "Requests refused with 429 by a rate limit, by scope (global, per_ip, bucket).",
        MetricType::COUNTER,
        merged
            .rate_limited
            .nonzero()
            .map(|(_, scope, v)| counter(&[("scope", scope)], v as f64))
            .collect(),
    ));
    families.push(family(
        "yatagarasu_ip_filtered_total",
        "Requests refused by a bucket's IP filter.",
        MetricType::COUNTER,
        merged
            .ip_filtered
            .nonzero()
            .map(|(b, v)| counter(&[("bucket", bucket_name(b))], v as f64))
            .collect(),
    ));
}

/// Latency, bytes, connections and splicing.
fn traffic_families(shared: &Generation, merged: &CoreMetrics, families: &mut Vec<MetricFamily>) {
    families.push(family(
        "yatagarasu_request_duration_seconds",
        "Time from request head to last response byte.",
        MetricType::HISTOGRAM,
        vec![histogram(&[], &merged.request_duration)],
    ));
    families.push(family(
        "yatagarasu_upstream_duration_seconds",
        "Time from sending a request upstream to its response head.",
        MetricType::HISTOGRAM,
        vec![histogram(&[], &merged.upstream_duration)],
    ));
    families.push(family(
        "yatagarasu_response_bytes_total",
        "Response body bytes sent to clients.",
        MetricType::COUNTER,
        vec![counter(&[], merged.bytes_sent as f64)],
    ));
    families.push(family(
        "yatagarasu_connections_total",
        "Client connections accepted.",
        MetricType::COUNTER,
        vec![counter(&[], merged.connections_total as f64)],
    ));
    families.push(family(
        "yatagarasu_connections_refused_total",
        "Client connections refused at accept: server.max_connections reached.",
        MetricType::COUNTER,
        vec![counter(&[], merged.connections_refused as f64)],
    ));
    families.push(family(
        "yatagarasu_tls_handshakes_total",
        "TLS handshakes with clients completed (server.tls), full and resumed.",
        MetricType::COUNTER,
        vec![counter(&[], merged.tls_handshakes as f64)],
    ));
    families.push(family(
        "yatagarasu_tls_resumed_handshakes_total",
        "TLS handshakes with clients that resumed a session (a TLS 1.3 ticket or a TLS 1.2 session) instead of a full handshake.",
        MetricType::COUNTER,
        vec![counter(&[], crate::tls::resumed_handshakes() as f64)],
    ));
    families.push(family(
        "yatagarasu_request_head_timeouts_total",
        "Client connections closed: request head not complete within request_head_timeout_seconds.",
        MetricType::COUNTER,
        vec![counter(&[], merged.head_timeouts as f64)],
    ));
    let open: i64 = shared
        .process
        .workers
        .iter()
        .map(|s| s.open_connections.load(Ordering::Relaxed))
        .sum();
    families.push(family(
        "yatagarasu_open_connections",
        "Client connections open now.",
        MetricType::GAUGE,
        vec![gauge(&[], open.max(0) as f64)],
    ));

    let in_lot: usize = shared
        .process
        .workers
        .iter()
        .map(|s| s.lot_connections.load(Ordering::Relaxed))
        .sum();
    families.push(family(
        "yatagarasu_spliced_bytes_total",
        "Body bytes relayed from upstream to clients with splice(2) (server.zero_copy), not copied.",
        MetricType::COUNTER,
        vec![counter(&[], merged.spliced as f64)],
    ));
    families.push(family(
        "yatagarasu_splice_fallbacks_total",
        "Bodies copied that server.zero_copy would have spliced or sent by reference, for want of a pipe (the worker's pipe budget spent, or out of file descriptors).",
        MetricType::COUNTER,
        vec![counter(&[], merged.splice_fallbacks as f64)],
    ));
    families.push(family(
        "yatagarasu_idle_connections",
        "Keep-alive client connections idle with no task of their own (in the lot), as of each worker's last sweep.",
        MetricType::GAUGE,
        vec![gauge(&[], in_lot as f64)],
    ));
}

/// Per replica: health, breaker state, requests, failures, failovers, resumes, latency.
fn replica_families(
    shared: &Generation,
    merged: &CoreMetrics,
    names: &Names<'_>,
    families: &mut Vec<MetricFamily>,
) {
    let replica_name = |i: usize| names.replica(i);
    let mut health = Vec::new();
    let mut state = Vec::new();
    let mut requests = Vec::new();
    let mut failures = Vec::new();
    let mut request_caused = Vec::new();
    let mut resumes = Vec::new();
    let mut durations = Vec::new();
    // Live state: the replicas of the current configuration.
    for r in &shared.replicas {
        let b = shared.bucket(r.bucket).name.as_str();
        let l = [("bucket", b), ("replica", r.config.name.as_str())];
        let s = r.breaker.load().state;
        let healthy = s != State::Open && r.probe.load(Ordering::Relaxed) != PROBE_FAILED;
        health.push(gauge(&l, healthy as u8 as f64));
        state.push(gauge(&l, s.code() as f64));
    }
    // Counters: every replica ever configured (they survive reloads).
    for (id, m) in merged.replicas.iter().enumerate() {
        let Some((b, name)) = replica_name(id) else {
            continue;
        };
        let l = [("bucket", b), ("replica", name)];
        requests.push(counter(&l, m.requests as f64));
        resumes.push(counter(&l, m.resumes as f64));
        durations.push(histogram(&l, &m.duration));
        for (_, reason, v) in m.failures.nonzero() {
            failures.push(counter(
                &[("bucket", b), ("replica", name), ("reason", reason)],
                v as f64,
            ));
        }
        for (_, reason, v) in m.request_caused.nonzero() {
            request_caused.push(counter(
                &[("bucket", b), ("replica", name), ("reason", reason)],
                v as f64,
            ));
        }
    }
    let mut failovers: Vec<_> = merged.failovers.iter().collect();
    failovers.sort();
    let failovers = failovers
        .into_iter()
        .filter_map(|((from, to), v)| {
            let (b, f) = replica_name(*from)?;
            let (_, t) = replica_name(*to)?;
            Some(counter(&[("bucket", b), ("from", f), ("to", t)], *v as f64))
        })
        .collect();
    families.push(family(
        "yatagarasu_replica_health",
        "1 if the replica is usable (breaker not open, last probe passed).",
        MetricType::GAUGE,
        health,
    ));
    families.push(family(
        "yatagarasu_circuit_breaker_state",
        "Breaker state: 0 closed, 1 open, 2 half-open.",
        MetricType::GAUGE,
        state,
    ));
    families.push(family(
        "yatagarasu_replica_requests_total",
        "Requests sent to each replica.",
        MetricType::COUNTER,
        requests,
    ));
    families.push(family(
        "yatagarasu_replica_failures_total",
        "Failed attempts per replica, by reason.",
        MetricType::COUNTER,
        failures,
    ));
    families.push(family(
        "yatagarasu_request_caused_failures_total",
        "5xx answers that followed the request, not the replica (every replica tried answered it with a 5xx while serving other requests): not counted by the breaker.",
        MetricType::COUNTER,
        request_caused,
    ));
    families.push(family(
        "yatagarasu_replica_failovers_total",
        "Requests moved from one replica to the next.",
        MetricType::COUNTER,
        failovers,
    ));
    families.push(family(
        "yatagarasu_replica_resumes_total",
        "Bodies resumed on a replica after another failed mid-body.",
        MetricType::COUNTER,
        resumes,
    ));
    families.push(family(
        "yatagarasu_replica_request_duration_seconds",
        "Time to response head, per replica.",
        MetricType::HISTOGRAM,
        durations,
    ));
}

/// Configuration reloads.
fn process_families(shared: &Generation, families: &mut Vec<MetricFamily>) {
    let reloads = ["success", "failure"]
        .iter()
        .zip([&shared.process.reloads_ok, &shared.process.reloads_failed])
        .map(|(result, n)| counter(&[("result", result)], n.load(Ordering::Relaxed) as f64))
        .collect();
    families.push(family(
        "yatagarasu_config_reloads_total",
        "Configuration reloads (SIGHUP), by result.",
        MetricType::COUNTER,
        reloads,
    ));
    image_families(shared, families);
}

/// Image transforms (only once some bucket uses images).
fn image_families(shared: &Generation, families: &mut Vec<MetricFamily>) {
    if shared.images.is_none() {
        return;
    }
    let s = &shared.process.image_stats;
    let load = |n: &std::sync::atomic::AtomicU64| n.load(Ordering::Relaxed) as f64;
    let results = [
        ("ok", &s.ok),
        ("failed", &s.failed),
        ("refused", &s.refused),
        ("busy", &s.busy),
    ]
    .into_iter()
    .map(|(result, n)| counter(&[("result", result)], load(n)))
    .collect();
    families.push(family(
        "yatagarasu_image_transforms_total",
        "Image transforms by result: ok, failed (codec or watermark source), refused (limits, not an image), busy (queue full: 503).",
        MetricType::COUNTER,
        results,
    ));
    families.push(family(
        "yatagarasu_image_transform_seconds_total",
        "Time the transform pool spent on transforms.",
        MetricType::COUNTER,
        vec![counter(&[], load(&s.micros) / 1e6)],
    ));
    families.push(family(
        "yatagarasu_image_transforms_queued",
        "Transforms waiting or running now.",
        MetricType::GAUGE,
        vec![gauge(&[], load(&s.queued))],
    ));
}

/// The origin cache's families (only when the cache is enabled).
fn cache_families<'n>(
    shared: &Generation,
    merged: &CoreMetrics,
    bucket_name: &dyn Fn(usize) -> &'n str,
    families: &mut Vec<MetricFamily>,
) {
    let Some(store) = shared.process.cache.as_ref() else {
        return;
    };
    let requests = merged
        .cache
        .nonzero()
        .map(|(b, r, v)| counter(&[("bucket", bucket_name(b)), ("result", r)], v as f64))
        .collect();
    families.push(family(
        "yatagarasu_cache_requests_total",
        "Cache lookups by bucket and result (hit, miss, bypass).",
        MetricType::COUNTER,
        requests,
    ));
    let saved = merged
        .cache_saved
        .nonzero()
        .map(|(b, v)| counter(&[("bucket", bucket_name(b))], v as f64))
        .collect();
    families.push(family(
        "yatagarasu_cache_upstream_bytes_saved_total",
        "Body bytes served from the cache instead of an upstream GET.",
        MetricType::COUNTER,
        saved,
    ));
    families.push(family(
        "yatagarasu_cache_sent_by_reference_bytes_total",
        "Cached body bytes sent to clients by reference (vmsplice, server.zero_copy), not copied.",
        MetricType::COUNTER,
        vec![counter(&[], merged.cache_by_reference as f64)],
    ));
    families.push(family(
        "yatagarasu_cache_coalesced_total",
        "Requests that streamed another request's upstream fetch (collapsed forwarding).",
        MetricType::COUNTER,
        merged
            .coalesced
            .nonzero()
            .map(|(b, v)| counter(&[("bucket", bucket_name(b))], v as f64))
            .collect(),
    ));
    families.push(family(
        "yatagarasu_cache_waiters_detached_total",
        "Requests that fell behind a shared fetch they streamed (a pass-through fill's window, or a stored copy gone) and continued with a range request of their own.",
        MetricType::COUNTER,
        merged
            .detached
            .nonzero()
            .map(|(b, v)| counter(&[("bucket", bucket_name(b))], v as f64))
            .collect(),
    ));
    tier_families(shared, store, families);
}

/// What each tier holds and has evicted, the fills in flight and their
/// waiters, and the Redis and disk tiers' own counters.
fn tier_families(
    shared: &Generation,
    store: &crate::cache::store::MemoryStore,
    families: &mut Vec<MetricFamily>,
) {
    let memory = [("layer", "memory")];
    let disk = [("layer", "disk")];
    let tiers = |memory_value: f64,
                 disk_value: &dyn Fn(&crate::cache::disk::DiskStore) -> f64,
                 f: fn(&[(&str, &str)], f64) -> Metric| {
        let mut v = vec![f(&memory, memory_value)];
        if let Some(d) = &shared.process.disk {
            v.push(f(&disk, disk_value(d)));
        }
        v
    };
    families.push(family(
        "yatagarasu_cache_bytes",
        "Bytes held by each cache layer.",
        MetricType::GAUGE,
        tiers(store.bytes() as f64, &|d| d.bytes() as f64, gauge),
    ));
    families.push(family(
        "yatagarasu_cache_items",
        "Objects held by each cache layer.",
        MetricType::GAUGE,
        tiers(store.items() as f64, &|d| d.items() as f64, gauge),
    ));
    families.push(family(
        "yatagarasu_cache_evictions_total",
        "Objects evicted from each cache layer.",
        MetricType::COUNTER,
        tiers(store.evictions() as f64, &|d| d.evictions() as f64, counter),
    ));
    families.push(family(
        "yatagarasu_cache_waiters",
        "Requests waiting now on a fetch another request leads (collapsed forwarding of objects and slices).",
        MetricType::GAUGE,
        vec![gauge(&[], shared.process.fills.waiting() as f64)],
    ));
    families.push(family(
        "yatagarasu_cache_fill_bytes",
        "Bytes held by cache fills in flight (bodies being stored and the copies their waiters stream), within the fill budget.",
        MetricType::GAUGE,
        vec![gauge(&[], store.fill_bytes() as f64)],
    ));
    families.push(family(
        "yatagarasu_cache_fills_refused_total",
        "Cacheable answers relayed uncached because the fills in flight would have passed the fill budget.",
        MetricType::COUNTER,
        vec![counter(
            &[],
            store.fills_refused.load(Ordering::Relaxed) as f64,
        )],
    ));
    if let Some(r) = &shared.process.redis {
        let redis = [
            ("hits", "Memory misses answered by the Redis tier.", &r.hits),
            ("misses", "Redis lookups that found no usable entry.", &r.misses),
            ("errors", "Redis lookups and writes that failed or were skipped while Redis was unavailable (each then a miss, never a client error).", &r.errors),
            ("writes", "Entries written to the Redis tier.", &r.writes),
            ("writes_dropped", "Redis writes not made because the writer's queue was full.", &r.writes_dropped),
            ("bad_entries", "Values under the proxy's Redis keys refused (foreign, cut short, checksum) and deleted.", &r.bad_entries),
            ("fleet_purges", "Purges announced by the fleet (or a purge count that moved while this instance was not listening) applied to the local tiers.", &r.fleet_purges),
        ];
        for (name, help, value) in redis {
            families.push(family(
                &format!("yatagarasu_cache_redis_{name}_total"),
                help,
                MetricType::COUNTER,
                vec![counter(&[], value.load(Ordering::Relaxed) as f64)],
            ));
        }
    }
    if let Some(d) = &shared.process.disk {
        families.push(family(
            "yatagarasu_cache_disk_corrupt_total",
            "Disk entries dropped for a bad length or checksum (then refetched).",
            MetricType::COUNTER,
            vec![counter(&[], d.corrupt.load(Ordering::Relaxed) as f64)],
        ));
        families.push(family(
            "yatagarasu_cache_disk_recency_refreshes_total",
            "Disk entries marked used because memory served them (at most once a second per copy), so the disk's LRU keeps what memory serves most.",
            MetricType::COUNTER,
            vec![counter(&[], d.recency_refreshes.load(Ordering::Relaxed) as f64)],
        ));
        families.push(family(
            "yatagarasu_cache_disk_writes_dropped_total",
            "Disk-tier writes not made because the writer's queue was full (the object stays in memory only).",
            MetricType::COUNTER,
            vec![counter(&[], d.writes_dropped.load(Ordering::Relaxed) as f64)],
        ));
    }
    prewarm_families(shared, families);
}

/// Cache pre-warming tasks (`crate::prewarm`).
fn prewarm_families(shared: &Generation, families: &mut Vec<MetricFamily>) {
    let warm = &shared.process.prewarm;
    let prewarm = [
        ("yatagarasu_prewarm_tasks_total", "Cache pre-warming tasks started.", &warm.totals.tasks),
        ("yatagarasu_prewarm_files_total", "Objects fetched into the cache by pre-warming.", &warm.totals.files),
        ("yatagarasu_prewarm_files_skipped_total", "Objects pre-warming skipped: already held, too large to store, or past the cache's bound.", &warm.totals.skipped),
        ("yatagarasu_prewarm_errors_total", "Pre-warming fetches that failed, and listings that failed on every replica.", &warm.totals.errors),
        ("yatagarasu_prewarm_bytes_total", "Body bytes pre-warming fetched into the cache.", &warm.totals.bytes),
    ];
    for (name, help, value) in prewarm {
        families.push(family(
            name,
            help,
            MetricType::COUNTER,
            vec![counter(&[], value.load(Ordering::Relaxed) as f64)],
        ));
    }
    families.push(family(
        "yatagarasu_prewarm_tasks_running",
        "Cache pre-warming tasks running now.",
        MetricType::GAUGE,
        vec![gauge(&[], warm.running() as f64)],
    ));
}

/// The audit log's records written and dropped (`crate::audit`).
fn audit_families(shared: &Generation, families: &mut Vec<MetricFamily>) {
    let Some(a) = &shared.process.audit else {
        return;
    };
    let load = |v: &std::sync::atomic::AtomicU64| v.load(Ordering::Relaxed) as f64;
    families.push(family(
        "yatagarasu_audit_records_total",
        "Audit records written, by output (file, syslog).",
        MetricType::COUNTER,
        vec![
            counter(&[("output", "file")], load(&a.written_file)),
            counter(&[("output", "syslog")], load(&a.written_syslog)),
        ],
    ));
    families.push(family(
        "yatagarasu_audit_records_dropped_total",
        "Audit records dropped, by reason (queue_full: the writer was behind; file: the file could not be written, e.g. a full disk; syslog: the receiver could not be reached). Requests are never held up for them.",
        MetricType::COUNTER,
        vec![
            counter(&[("reason", "queue_full")], load(&a.dropped_queue)),
            counter(&[("reason", "file")], load(&a.dropped_file)),
            counter(&[("reason", "syslog")], load(&a.dropped_syslog)),
        ],
    ));
}

/// Spans exported and dropped (`crate::trace`).
fn trace_families(shared: &Generation, families: &mut Vec<MetricFamily>) {
    let Some(t) = &shared.process.traces else {
        return;
    };
    let load = |v: &std::sync::atomic::AtomicU64| v.load(Ordering::Relaxed) as f64;
    families.push(family(
        "yatagarasu_trace_spans_exported_total",
        "Spans the OTLP collector accepted.",
        MetricType::COUNTER,
        vec![counter(&[], load(&t.exported))],
    ));
    families.push(family(
        "yatagarasu_trace_spans_dropped_total",
        "Spans dropped, by reason (queue_full: the exporter was behind; export: the collector did not take them). Requests never wait for the collector.",
        MetricType::COUNTER,
        vec![
            counter(&[("reason", "queue_full")], load(&t.dropped_queue)),
            counter(&[("reason", "export")], load(&t.dropped_export)),
        ],
    ));
}
