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
use crate::upstream::breaker::State;
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
        let epoch = process.epoch.load(Ordering::Acquire);
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
                    if process.shutdown.load(Ordering::Relaxed)
                        || process.epoch.load(Ordering::Acquire) != epoch
                    {
                        return;
                    }
                    let result = probe(&shared, &pool, rid).await;
                    failed_in_a_row = if result.is_ok() {
                        0
                    } else {
                        failed_in_a_row + 1
                    };
                    apply(&shared, rid, result, failed_in_a_row);
                    monoio::time::sleep(interval.saturating_sub(started.elapsed())).await;
                }
            });
        }
        drop(shared);
        while process.epoch.load(Ordering::Acquire) == epoch {
            monoio::time::sleep(Duration::from_millis(250)).await;
        }
    }
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
            crate::upstream::pool::Slot::unbudgeted(),
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
    let published = r.breaker.load();
    match result {
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
            if published.state == State::Open {
                r.breaker.publish(State::HalfOpen, published.open_until);
                log!(
                    Level::Info,
                    "Circuit breaker state changed",
                    bucket = bucket.name,
                    replica = r.config.name,
                    from = "open",
                    to = "half-open",
                    by = "health check",
                );
            }
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
            if published.state != State::Open && failed_in_a_row >= FALL {
                let until = now_ms() + bucket.breaker.open_for.as_millis() as u64;
                r.breaker.publish(State::Open, until);
                log!(
                    Level::Warn,
                    "Circuit breaker state changed",
                    bucket = bucket.name,
                    replica = r.config.name,
                    from = published.state.as_str(),
                    to = "open",
                    by = "health check",
                );
            }
        }
    }
}
