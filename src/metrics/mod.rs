//! Metrics: per-core recording with no lock or atomic on the request path,
//! merged into Prometheus text only when scraped.
//!
//! Each worker owns a [`CoreMetrics`] (plain counters and `hdrhistogram`s in
//! microseconds). When a scrape starts it bumps a generation counter; each worker
//! notices on its next tick (every few ms) and copies its metrics into its
//! publication slot, the only place a lock is taken, off the request path. The
//! scraper merges the slots, adds live gauges (connections, breaker states) and
//! encodes with the `prometheus` crate's text encoder.

pub mod render;

use crate::http::head::Method;
use hdrhistogram::Histogram;
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
    /// Failures blamed on the replica, by reason label.
    pub failures: HashMap<&'static str, u64>,
    /// 5xx answers judged to follow the request, not the replica (not
    /// counted by the breaker), by reason.
    pub request_caused: HashMap<&'static str, u64>,
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
    /// Client connections closed because their request head was not
    /// complete within `server.request_head_timeout_seconds`.
    pub head_timeouts: u64,
    /// Indexed by global replica id.
    pub replicas: Vec<ReplicaMetrics>,
    /// `(bucket metric id, result) -> count` of cache lookups.
    pub cache: HashMap<(usize, &'static str), u64>,
    /// Bucket metric id -> body bytes served from the cache.
    pub cache_saved: HashMap<usize, u64>,
    /// Cached body bytes sent by reference (vmsplice), not copied.
    pub cache_by_reference: u64,
    /// Relayed body bytes moved upstream -> client with splice(2), not copied.
    pub spliced: u64,
    /// Bodies copied that `server.zero_copy` would have spliced or sent by
    /// reference, for want of a pipe (the worker's pipe budget spent, or
    /// out of file descriptors).
    pub splice_fallbacks: u64,
    /// Bucket metric id -> requests that streamed another request's fill.
    pub coalesced: HashMap<usize, u64>,
    /// Waiters that fell behind a shared fetch and continued with a range
    /// request, by bucket metric id.
    pub detached: HashMap<usize, u64>,
    /// Bucket metric id -> requests refused by the bucket's IP filter.
    pub ip_filtered: HashMap<usize, u64>,
    /// `(bucket metric id, result)` -> authentication outcomes.
    pub auth: HashMap<(usize, &'static str), u64>,
    /// Scope (global, per_ip, bucket) -> requests refused by a rate limit.
    pub rate_limited: HashMap<&'static str, u64>,
    /// `(from replica id, to replica id) -> count`.
    pub failovers: HashMap<(usize, usize), u64>,
    /// `(bucket metric id, engine, result)` -> policy decisions.
    pub authz: HashMap<(usize, &'static str, &'static str), u64>,
    /// `(bucket metric id, hit or miss)` -> decision cache lookups.
    pub authz_cache: HashMap<(usize, &'static str), u64>,
    /// Engine -> decision latency (us) of calls made (not remembered ones).
    pub authz_duration: HashMap<&'static str, Histogram<u64>>,
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
            head_timeouts: 0,
            cache_by_reference: 0,
            spliced: 0,
            splice_fallbacks: 0,
            replicas: Vec::with_capacity(replicas),
            failovers: HashMap::new(),
            cache: HashMap::new(),
            cache_saved: HashMap::new(),
            coalesced: HashMap::new(),
            detached: HashMap::new(),
            ip_filtered: HashMap::new(),
            rate_limited: HashMap::new(),
            auth: HashMap::new(),
            authz: HashMap::new(),
            authz_cache: HashMap::new(),
            authz_duration: HashMap::new(),
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
                failures: HashMap::new(),
                request_caused: HashMap::new(),
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
    pub fn replica_failure(&mut self, replica: usize, reason: &'static str) {
        *self.replica(replica).failures.entry(reason).or_insert(0) += 1;
    }

    /// Counts a 5xx blamed on the request (see `upstream::blame`).
    pub fn request_caused(&mut self, replica: usize, reason: &'static str) {
        *self
            .replica(replica)
            .request_caused
            .entry(reason)
            .or_insert(0) += 1;
    }

    /// Counts a cache lookup of bucket `bucket` by result (hit, miss, bypass).
    pub fn cache(&mut self, bucket: usize, result: &'static str) {
        *self.cache.entry((bucket, result)).or_insert(0) += 1;
    }

    /// Counts a request refused by bucket `bucket`'s IP filter.
    pub fn ip_filtered(&mut self, bucket: usize) {
        *self.ip_filtered.entry(bucket).or_insert(0) += 1;
    }

    /// Counts a policy decision of bucket `bucket` by `engine`.
    pub fn authz(&mut self, bucket: usize, engine: &'static str, result: &'static str) {
        *self.authz.entry((bucket, engine, result)).or_insert(0) += 1;
    }

    /// Counts a decision cache lookup of bucket `bucket`.
    pub fn authz_cache(&mut self, bucket: usize, result: &'static str) {
        *self.authz_cache.entry((bucket, result)).or_insert(0) += 1;
    }

    /// Records how long `engine` took to decide.
    pub fn authz_duration(&mut self, engine: &'static str, micros: u64) {
        let _ = self
            .authz_duration
            .entry(engine)
            .or_insert_with(new_histogram)
            .record(micros.max(1));
    }

    /// Counts an authentication outcome of bucket `bucket`.
    pub fn auth(&mut self, bucket: usize, result: &'static str) {
        *self.auth.entry((bucket, result)).or_insert(0) += 1;
    }

    /// Counts a request refused with 429 by a limit of `scope`.
    pub fn rate_limited(&mut self, scope: &'static str) {
        *self.rate_limited.entry(scope).or_insert(0) += 1;
    }

    /// Counts a waiter that fell behind a shared fetch and continued with
    /// a range request.
    pub fn detached(&mut self, bucket: usize) {
        *self.detached.entry(bucket).or_insert(0) += 1;
    }

    /// Counts a request that streamed another request's fill.
    pub fn coalesced(&mut self, bucket: usize) {
        *self.coalesced.entry(bucket).or_insert(0) += 1;
    }

    /// Counts body bytes served from the cache instead of an upstream GET.
    pub fn cache_saved(&mut self, bucket: usize, bytes: u64) {
        *self.cache_saved.entry(bucket).or_insert(0) += bytes;
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
        self.head_timeouts += other.head_timeouts;
        self.cache_by_reference += other.cache_by_reference;
        self.spliced += other.spliced;
        self.splice_fallbacks += other.splice_fallbacks;
        for (id, theirs) in other.replicas.iter().enumerate() {
            let mine = self.replica(id);
            mine.requests += theirs.requests;
            mine.resumes += theirs.resumes;
            for (k, v) in &theirs.failures {
                *mine.failures.entry(k).or_insert(0) += v;
            }
            for (k, v) in &theirs.request_caused {
                *mine.request_caused.entry(k).or_insert(0) += v;
            }
            let _ = mine.duration.add(&theirs.duration);
        }
        for (k, v) in &other.failovers {
            *self.failovers.entry(*k).or_insert(0) += v;
        }
        for (k, v) in &other.cache {
            *self.cache.entry(*k).or_insert(0) += v;
        }
        for (k, v) in &other.cache_saved {
            *self.cache_saved.entry(*k).or_insert(0) += v;
        }
        for (k, v) in &other.detached {
            *self.detached.entry(*k).or_insert(0) += v;
        }
        for (k, v) in &other.coalesced {
            *self.coalesced.entry(*k).or_insert(0) += v;
        }
        for (k, v) in &other.ip_filtered {
            *self.ip_filtered.entry(*k).or_insert(0) += v;
        }
        for (k, v) in &other.auth {
            *self.auth.entry(*k).or_insert(0) += v;
        }
        for (k, v) in &other.rate_limited {
            *self.rate_limited.entry(k).or_insert(0) += v;
        }
        for (k, v) in &other.authz {
            *self.authz.entry(*k).or_insert(0) += v;
        }
        for (k, v) in &other.authz_cache {
            *self.authz_cache.entry(*k).or_insert(0) += v;
        }
        for (k, h) in &other.authz_duration {
            let _ = self
                .authz_duration
                .entry(k)
                .or_insert_with(new_histogram)
                .add(h);
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
        b.replica_failure(1, "connect");
        b.failover(1, 0);
        a.merge(&b);
        assert_eq!(a.requests[&(0, Method::Get, 200)], 2);
        assert_eq!(a.bytes_sent, 15);
        assert_eq!(a.request_duration.len(), 2);
        assert_eq!(a.replicas[1].failures["connect"], 1);
        assert_eq!(a.failovers[&(1, 0)], 1);
    }
}
