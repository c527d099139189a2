//! Active health checks: one prober per process (its own thread and runtime),
//! not one per core.
//!
//! Every `interval_seconds`, each replica of each bucket with checks enabled
//! gets a signed `HEAD` of `health_check.path` relative to its bucket (`/` is
//! `HEAD /<bucket>/`, S3's HeadBucket). Any HTTP response below 500 within
//! `timeout_seconds` means alive. [`FALL`] consecutive failing probes open the
//! replica's breaker (no client request needs to fail first; one lost probe
//! is not enough); a passing probe moves an OPEN breaker to HALF-OPEN at once, so a recovered replica gets trial traffic
//! within one interval. Results are published through the same shared breaker
//! words the workers read, so every core sees them on its next request.

use crate::config::Level;
use crate::http::head::{self, Response};
use crate::log;
use crate::s3::Signer;
use crate::shared::{now_ms, Generation, Process, PROBE_FAILED, PROBE_OK};
use crate::upstream::breaker::{Breaker, State};
use crate::upstream::client;
use crate::upstream::pool::Pool;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

/// Consecutive failed probes that open a breaker.
pub const FALL: u32 = 2;

/// Probes every replica whose bucket has health checks enabled, forever;
/// after a configuration reload, the new generation's replicas instead.
pub async fn run(process: Arc<Process>) {
    loop {
        let epoch = process.epoch();
        let shared = process.current();
        let pool = std::rc::Rc::new(Pool::new(shared.replicas.len()));
        for rid in 0..shared.replicas.len() {
            if !shared.bucket(shared.replicas[rid].bucket).health.enabled {
                continue;
            }
            let (shared, pool, process) = (shared.clone(), pool.clone(), process.clone());
            monoio::spawn(async move {
                let interval = shared.bucket(shared.replicas[rid].bucket).health.interval;
                let mut failed_in_a_row = 0;
                loop {
                    let started = Instant::now();
                    if process.shutdown.load(Ordering::Relaxed) || process.epoch() != epoch {
                        return;
                    }
                    let result = probe(&shared, &pool, rid).await;
                    failed_in_a_row = if result.is_ok() {
                        0
                    } else {
                        failed_in_a_row + 1
                    };
                    apply(&shared, rid, result, failed_in_a_row);
                    let due = next_due(started, interval, Instant::now());
                    monoio::time::sleep(due.saturating_duration_since(Instant::now())).await;
                }
            });
        }
        drop(shared);
        while process.epoch() == epoch {
            monoio::time::sleep(Duration::from_millis(250)).await;
        }
    }
}

/// When the probe after one that started at `started` is due: the first
/// tick (`started` plus a whole number of intervals) still ahead of `now`.
/// Ticks missed while a probe or the machine was slow are skipped, never
/// fired in a burst to catch up.
pub fn next_due(started: Instant, interval: Duration, now: Instant) -> Instant {
    let interval = interval.max(Duration::from_millis(1));
    let late = now.saturating_duration_since(started);
    let ticks = late.as_nanos() / interval.as_nanos() + 1;
    started + interval * u32::try_from(ticks).unwrap_or(u32::MAX)
}

/// One probe: `Ok(status)` for any HTTP response below 500, `Err(cause)`
/// otherwise. Uses the proxy's own upstream client (interim responses,
/// framing checks, failure causes).
pub async fn probe(shared: &Generation, pool: &Pool, rid: usize) -> Result<u16, String> {
    let r = &shared.replicas[rid];
    let settings = &shared.bucket(r.bucket).health;
    let replica = &r.config;
    let deadline = Instant::now() + settings.timeout;
    let path = if replica.virtual_hosted {
        settings.path.clone()
    } else {
        format!("/{}{}", replica.bucket, settings.path)
    };
    let mut req = Vec::with_capacity(512);
    req.extend_from_slice(format!("HEAD {path} HTTP/1.1\r\n").as_bytes());
    head::header(&mut req, "Host", &replica.endpoint.authority);
    head::header(&mut req, "User-Agent", "yatagarasu-health-check");
    head::header(&mut req, "Connection", "close");
    let creds = r
        .credentials
        .current()
        .ok_or_else(|| "credentials: none fetched yet".to_string())?;
    if creds.expired(SystemTime::now()) {
        return Err("credentials: expired".into());
    }
    Signer::new(&creds, &replica.region).sign_into(
        "HEAD",
        &replica.endpoint.authority,
        &path,
        SystemTime::now(),
        &mut req,
    )?;
    req.extend_from_slice(b"\r\n");
    let mut conn = pool
        .connect(
            rid,
            &replica.endpoint,
            r.tls.as_ref(),
            settings.timeout,
            crate::upstream::pool::BudgetSlot::unbudgeted(),
        )
        .await
        .map_err(|(cause, detail)| format!("{}: {detail}", cause.label()))?;
    let mut resp = Response::default();
    client::exchange(&mut conn, &mut req, true, deadline, &mut resp)
        .await
        .map_err(|e| format!("{}: {}", e.cause.label(), e.detail))?;
    if resp.status < 500 {
        Ok(resp.status)
    } else {
        Err(format!("HTTP {}", resp.status))
    }
}

/// Publishes a probe result into the replica's shared breaker word;
/// `failed_in_a_row` counts this probe if it failed.
pub fn apply(shared: &Generation, rid: usize, result: Result<u16, String>, failed_in_a_row: u32) {
    let r = &shared.replicas[rid];
    let bucket = shared.bucket(r.bucket);
    let before = r.probe.swap(
        if result.is_ok() {
            PROBE_OK
        } else {
            PROBE_FAILED
        },
        Ordering::Relaxed,
    );
    // The breaker's own probe transitions, on a copy of the published state.
    let published = r.breaker.load();
    let mut breaker = Breaker::new(&bucket.breaker);
    breaker.adopt(published.state, published.open_until);
    let now = now_ms();
    let transition = match &result {
        Ok(status) => {
            if before == PROBE_FAILED {
                log!(
                    Level::Info,
                    "Health check passed again",
                    bucket = bucket.name,
                    replica = r.config.name,
                    status = status
                );
            }
            breaker.probe_passed(now)
        }
        Err(cause) => {
            if before != PROBE_FAILED {
                log!(
                    Level::Warn,
                    "Health check failed",
                    bucket = bucket.name,
                    replica = r.config.name,
                    cause = cause
                );
            }
            (failed_in_a_row >= FALL)
                .then(|| breaker.probe_failed(now))
                .flatten()
        }
    };
    if let Some(t) = transition {
        r.breaker.publish(t.to, breaker.open_until());
        log!(
            if t.to == State::Open {
                Level::Warn
            } else {
                Level::Info
            },
            "Circuit breaker state changed",
            bucket = bucket.name,
            replica = r.config.name,
            from = t.from.as_str(),
            to = t.to.as_str(),
            by = "health check",
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_probe_on_time_waits_for_the_next_tick() {
        let t0 = Instant::now();
        let second = Duration::from_secs(1);
        assert_eq!(next_due(t0, second, t0), t0 + second);
        let quick = t0 + Duration::from_millis(30);
        assert_eq!(next_due(t0, second, quick), t0 + second);
    }

    #[test]
    fn ticks_missed_by_a_slow_probe_are_skipped_not_fired_in_a_burst() {
        let t0 = Instant::now();
        let second = Duration::from_secs(1);
        // The probe (or the machine) took 3.4 intervals: the next one is at
        // the fourth tick, once; the three missed ones never fire.
        let late = t0 + Duration::from_millis(3_400);
        assert_eq!(next_due(t0, second, late), t0 + second * 4);
        // Exactly on a tick: that tick is spent, the next is due.
        assert_eq!(next_due(t0, second, t0 + second * 2), t0 + second * 3);
    }
}
