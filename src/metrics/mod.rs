//! Metrics: per-core recording with no lock or atomic on the request path,
//! merged into Prometheus text only when scraped.
//!
//! Each worker owns a [`CoreMetrics`] (plain counters and `hdrhistogram`s in
//! microseconds). When a scrape starts it bumps a generation counter; each worker
//! notices on its next tick (every few ms) and copies its metrics into its
//! publication slot, the only place a lock is taken, off the request path. The
//! scraper merges the slots, adds live gauges (connections, breaker states) and
//! encodes with the `prometheus` crate's text encoder.

pub mod outcome;
pub mod render;

use crate::http::head::Method;
use crate::upstream::client::Cause;
use hdrhistogram::Histogram;
use outcome::{
    AuthResult, CacheResult, Counts, Decision, Engine, Label as _, LimitScope, Lookup, PerKey,
    RequestCaused,
};
use std::collections::HashMap;

/// Latency histogram bounds in microseconds: 1 us .. 1 hour, 2 significant digits.
pub fn new_histogram() -> Histogram<u64> {
    // Constant, valid bounds: construction cannot fail.
    Histogram::new_with_bounds(1, 3_600_000_000, 2).expect("constant histogram bounds are valid")
}

/// Counters of one replica on one worker.
#[derive(Clone)]
pub struct ReplicaMetrics {
    /// Requests sent to the replica.
    pub requests: u64,
    /// Failures blamed on the replica, by cause.
    pub failures: Counts<Cause>,
    /// 5xx answers judged to follow the request, not the replica, and
    /// bodies broken by a stalled client (not counted by the breaker).
    pub request_caused: Counts<RequestCaused>,
    /// Bodies resumed from this replica.
    pub resumes: u64,
    /// Upstream response-head latency (us).
    pub duration: Histogram<u64>,
}

/// Everything one worker records, keyed by the stable metric ids of
/// `shared::Registry` (so counters survive configuration reloads). Cloned into the publication slot on demand.
#[derive(Clone)]
pub struct CoreMetrics {
    /// `(bucket index or usize::MAX, method, status) -> count`.
    pub requests: HashMap<(usize, Method, u16), u64>,
    /// Client request latency (us).
    pub request_duration: Histogram<u64>,
    /// Upstream response-head latency over all replicas (us).
    pub upstream_duration: Histogram<u64>,
    /// Payload bytes sent to clients.
    pub bytes_sent: u64,
    /// Client connections accepted.
    pub connections_total: u64,
    /// Connections refused at accept because `server.max_connections` was reached.
    pub connections_refused: u64,
    /// TLS handshakes with clients completed (full and resumed).
    pub tls_handshakes: u64,
    /// Client connections closed because their request head was not
    /// complete within `server.request_head_timeout_seconds`.
    pub head_timeouts: u64,
    /// Indexed by global replica id.
    pub replicas: Vec<ReplicaMetrics>,
    /// Cache lookups by bucket metric id and result.
    pub cache: Counts<CacheResult>,
    /// Body bytes served from the cache, by bucket metric id.
    pub cache_saved: PerKey,
    /// Cached body bytes sent by reference (vmsplice), not copied.
    pub cache_by_reference: u64,
    /// Relayed body bytes moved upstream -> client with splice(2), not copied.
    pub spliced: u64,
    /// Bodies copied that `server.zero_copy` would have spliced or sent by
    /// reference, for want of a pipe (the worker's pipe budget spent, or
    /// out of file descriptors).
    pub splice_fallbacks: u64,
    /// Requests that streamed another request's fill, by bucket metric id.
    pub coalesced: PerKey,
    /// Waiters that fell behind a shared fetch and continued with a range
    /// request, by bucket metric id.
    pub detached: PerKey,
    /// Requests refused by the bucket's IP filter, by bucket metric id.
    pub ip_filtered: PerKey,
    /// Authentication outcomes by bucket metric id.
    pub auth: Counts<AuthResult>,
    /// Requests refused by a rate limit, by scope (one key: 0).
    pub rate_limited: Counts<LimitScope>,
    /// `(from replica id, to replica id) -> count`.
    pub failovers: HashMap<(usize, usize), u64>,
    /// Policy decisions by `(bucket metric id, engine)` (key
    /// `bucket * Engine::COUNT + engine`) and result.
    pub authz: Counts<Decision>,
    /// Decision cache lookups by bucket metric id.
    pub authz_cache: Counts<Lookup>,
    /// Decision latency (us) of calls made (not remembered ones), by engine.
    pub authz_duration: [Option<Histogram<u64>>; 3],
}

impl CoreMetrics {
    /// Empty metrics for `replicas` replica ids (grown on demand).
    pub fn new(replicas: usize) -> CoreMetrics {
        CoreMetrics {
            requests: HashMap::new(),
            request_duration: new_histogram(),
            upstream_duration: new_histogram(),
            bytes_sent: 0,
            connections_total: 0,
            connections_refused: 0,
            tls_handshakes: 0,
            head_timeouts: 0,
            cache_by_reference: 0,
            spliced: 0,
            splice_fallbacks: 0,
            replicas: Vec::with_capacity(replicas),
            failovers: HashMap::new(),
            cache: Counts::default(),
            cache_saved: PerKey::default(),
            coalesced: PerKey::default(),
            detached: PerKey::default(),
            ip_filtered: PerKey::default(),
            rate_limited: Counts::default(),
            auth: Counts::default(),
            authz: Counts::default(),
            authz_cache: Counts::default(),
            authz_duration: Default::default(),
        }
    }

    /// Records one finished client request.
    pub fn request(
        &mut self,
        bucket: Option<usize>,
        method: Method,
        status: u16,
        micros: u64,
        bytes: u64,
    ) {
        *self
            .requests
            .entry((bucket.unwrap_or(usize::MAX), method, status))
            .or_insert(0) += 1;
        let _ = self.request_duration.record(micros.max(1));
        self.bytes_sent += bytes;
    }

    /// The counters of replica metric id `id` (grown on first use).
    fn replica(&mut self, id: usize) -> &mut ReplicaMetrics {
        while self.replicas.len() <= id {
            self.replicas.push(ReplicaMetrics {
                requests: 0,
                failures: Counts::default(),
                request_caused: Counts::default(),
                resumes: 0,
                duration: new_histogram(),
            });
        }
        &mut self.replicas[id]
    }

    /// Records one upstream attempt and its head latency.
    pub fn upstream(&mut self, replica: usize, micros: u64) {
        let _ = self.upstream_duration.record(micros.max(1));
        let r = self.replica(replica);
        r.requests += 1;
        let _ = r.duration.record(micros.max(1));
    }

    /// Counts a failure blamed on the replica.
    pub fn replica_failure(&mut self, replica: usize, cause: Cause) {
        self.replica(replica).failures.add(0, cause, 1);
    }

    /// Counts a failure laid at the request's door, not the replica's.
    pub fn request_caused(&mut self, replica: usize, why: RequestCaused) {
        self.replica(replica).request_caused.add(0, why, 1);
    }

    /// Counts a cache lookup of bucket `bucket` by result.
    pub fn cache(&mut self, bucket: usize, result: CacheResult) {
        self.cache.add(bucket, result, 1);
    }

    /// Counts a request refused by bucket `bucket`'s IP filter.
    pub fn ip_filtered(&mut self, bucket: usize) {
        self.ip_filtered.add(bucket, 1);
    }

    /// Counts a policy decision of bucket `bucket` by `engine`.
    pub fn authz(&mut self, bucket: usize, engine: Engine, result: Decision) {
        self.authz
            .add(bucket * Engine::COUNT + engine.index(), result, 1);
    }

    /// Counts a decision cache lookup of bucket `bucket`.
    pub fn authz_cache(&mut self, bucket: usize, result: Lookup) {
        self.authz_cache.add(bucket, result, 1);
    }

    /// Records how long `engine` took to decide.
    pub fn authz_duration(&mut self, engine: Engine, micros: u64) {
        let _ = self.authz_duration[engine.index()]
            .get_or_insert_with(new_histogram)
            .record(micros.max(1));
    }

    /// Counts an authentication outcome of bucket `bucket`.
    pub fn auth(&mut self, bucket: usize, result: AuthResult) {
        self.auth.add(bucket, result, 1);
    }

    /// Counts a request refused with 429 by a limit of `scope`.
    pub fn rate_limited(&mut self, scope: LimitScope) {
        self.rate_limited.add(0, scope, 1);
    }

    /// Counts a waiter that fell behind a shared fetch and continued with
    /// a range request.
    pub fn detached(&mut self, bucket: usize) {
        self.detached.add(bucket, 1);
    }

    /// Counts a request that streamed another request's fill.
    pub fn coalesced(&mut self, bucket: usize) {
        self.coalesced.add(bucket, 1);
    }

    /// Counts body bytes served from the cache instead of an upstream GET.
    pub fn cache_saved(&mut self, bucket: usize, bytes: u64) {
        self.cache_saved.add(bucket, bytes);
    }

    /// Counts a request moved from replica `from` to `to`.
    pub fn failover(&mut self, from: usize, to: usize) {
        *self.failovers.entry((from, to)).or_insert(0) += 1;
    }

    /// Counts a body resumed from `replica`.
    pub fn resume(&mut self, replica: usize) {
        self.replica(replica).resumes += 1;
    }

    /// Adds `other` into `self` (scrape-time merge).
    pub fn merge(&mut self, other: &CoreMetrics) {
        for (k, v) in &other.requests {
            *self.requests.entry(*k).or_insert(0) += v;
        }
        let _ = self.request_duration.add(&other.request_duration);
        let _ = self.upstream_duration.add(&other.upstream_duration);
        self.bytes_sent += other.bytes_sent;
        self.connections_total += other.connections_total;
        self.connections_refused += other.connections_refused;
        self.tls_handshakes += other.tls_handshakes;
        self.head_timeouts += other.head_timeouts;
        self.cache_by_reference += other.cache_by_reference;
        self.spliced += other.spliced;
        self.splice_fallbacks += other.splice_fallbacks;
        for (id, theirs) in other.replicas.iter().enumerate() {
            let mine = self.replica(id);
            mine.requests += theirs.requests;
            mine.resumes += theirs.resumes;
            mine.failures.merge(&theirs.failures);
            mine.request_caused.merge(&theirs.request_caused);
            let _ = mine.duration.add(&theirs.duration);
        }
        for (k, v) in &other.failovers {
            *self.failovers.entry(*k).or_insert(0) += v;
        }
        self.cache.merge(&other.cache);
        self.cache_saved.merge(&other.cache_saved);
        self.detached.merge(&other.detached);
        self.coalesced.merge(&other.coalesced);
        self.ip_filtered.merge(&other.ip_filtered);
        self.auth.merge(&other.auth);
        self.rate_limited.merge(&other.rate_limited);
        self.authz.merge(&other.authz);
        self.authz_cache.merge(&other.authz_cache);
        for (mine, theirs) in self.authz_duration.iter_mut().zip(&other.authz_duration) {
            if let Some(h) = theirs {
                let _ = mine.get_or_insert_with(new_histogram).add(h);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merge_adds_everything() {
        let mut a = CoreMetrics::new(2);
        let mut b = CoreMetrics::new(2);
        a.request(Some(0), Method::Get, 200, 1500, 10);
        b.request(Some(0), Method::Get, 200, 2500, 5);
        b.replica_failure(1, Cause::Connect);
        b.failover(1, 0);
        a.merge(&b);
        assert_eq!(a.requests[&(0, Method::Get, 200)], 2);
        assert_eq!(a.bytes_sent, 15);
        assert_eq!(a.request_duration.len(), 2);
        assert_eq!(a.replicas[1].failures.get(0, Cause::Connect), 1);
        assert_eq!(a.failovers[&(1, 0)], 1);
    }
}
