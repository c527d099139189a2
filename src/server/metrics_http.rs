//! The metrics endpoint (`metrics.port`), with the admin endpoints
//! (`admin.rs`) when `admin.token` is set: a small blocking HTTP server on its
//! own thread. `GET /metrics` asks every worker to publish its per-core metrics
//! (they do on their next tick), merges them and renders Prometheus text.

use crate::config::Level;
use crate::http::head::Generated;
use crate::log;
use crate::metrics::{render::render, CoreMetrics};
use crate::shared::Process;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Connections served at once; more are closed at accept.
const MAX_CONCURRENT: usize = 32;
/// One deadline per connection: read the request and write the answer.
const DEADLINE: Duration = Duration::from_secs(5);

/// Accepts scrape connections and serves each on its own short-lived thread,
/// so one slow client cannot hold up a scrape.
pub fn serve(listener: TcpListener, shared: Arc<Process>) {
    let active = Arc::new(AtomicUsize::new(0));
    for stream in listener.incoming() {
        match stream {
            Ok(s) => {
                if active.fetch_add(1, Ordering::AcqRel) >= MAX_CONCURRENT {
                    active.fetch_sub(1, Ordering::AcqRel);
                    drop(s);
                    continue;
                }
                let (shared, mine) = (shared.clone(), active.clone());
                let spawned = std::thread::Builder::new()
                    .name("yatagarasu-scrape".into())
                    .spawn(move || {
                        if let Err(e) = handle(s, &shared) {
                            log!(Level::Debug, "metrics request failed", error = e);
                        }
                        mine.fetch_sub(1, Ordering::AcqRel);
                    });
                if spawned.is_err() {
                    active.fetch_sub(1, Ordering::AcqRel);
                }
            }
            Err(e) => {
                log!(Level::Warn, "metrics accept failed", error = e);
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

/// Time left before `deadline`, or a `TimedOut` error once it has passed.
fn left(deadline: Instant) -> std::io::Result<Duration> {
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "metrics request deadline passed",
        ));
    }
    Ok(left)
}

/// Largest request body read (an admin request's JSON).
const BODY_MAX: usize = 64 * 1024;

fn handle(mut s: TcpStream, shared: &Arc<Process>) -> std::io::Result<()> {
    let deadline = Instant::now() + DEADLINE;
    let mut buf = vec![0u8; 8192];
    let mut len = 0;
    let head_len = loop {
        s.set_read_timeout(Some(left(deadline)?))?;
        let n = s.read(&mut buf[len..])?;
        if n == 0 {
            return Ok(());
        }
        len += n;
        if let Some(at) = buf[..len].windows(4).position(|w| w == b"\r\n\r\n") {
            break at + 4;
        }
        if len == buf.len() {
            break len;
        }
    };
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut req = httparse::Request::new(&mut headers);
    let _ = req.parse(&buf[..head_len]);
    let method = req.method.unwrap_or("").to_string();
    let path = req.path.unwrap_or("").to_string();
    let header = |name: &str| {
        req.headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case(name))
            .and_then(|h| std::str::from_utf8(h.value).ok())
    };
    let authorization = header("authorization").map(str::to_string);
    // An admin request's body (pre-warming's JSON), by Content-Length.
    let body_len = header("content-length")
        .and_then(|v| v.trim().parse::<usize>().ok())
        .unwrap_or(0);
    if body_len > BODY_MAX {
        return answer(
            &mut s,
            deadline,
            &method,
            (413, "text/plain", "request body too large\n".into()),
        );
    }
    let mut body = buf[head_len..len].to_vec();
    body.truncate(body_len);
    while body.len() < body_len {
        s.set_read_timeout(Some(left(deadline)?))?;
        let mut more = vec![0u8; body_len - body.len()];
        let n = s.read(&mut more)?;
        if n == 0 {
            return Ok(());
        }
        body.extend_from_slice(&more[..n]);
    }
    let (method, path) = (method.as_str(), path.as_str());
    let authorization = authorization.as_deref();
    let (status, ctype, body) = if path.starts_with("/admin/") {
        super::admin::handle(shared, method, path, authorization, &body)
    } else if (method == "GET" || method == "HEAD")
        && (path == "/metrics" || path.starts_with("/metrics?"))
    {
        (200, "text/plain; version=0.0.4", gather(shared))
    } else if (method == "GET" || method == "HEAD") && path == "/ready" {
        // The details (buckets, replicas, breaker and credential state)
        // are for the operator's listener only; the public port says
        // ready or not.
        let (ready, body) = crate::proxy::readiness(&shared.current());
        (if ready { 200 } else { 503 }, "application/json", body)
    } else {
        (404, "text/plain", "not found; try /metrics\n".to_string())
    };
    answer(&mut s, deadline, method, (status, ctype, body))
}

/// Writes one answer and closes (no keep-alive on this listener).
fn answer(
    s: &mut TcpStream,
    deadline: Instant,
    method: &str,
    (status, ctype, body): (u16, &str, String),
) -> std::io::Result<()> {
    let mut head = Vec::with_capacity(256);
    Generated {
        status,
        content_type: ctype,
        content_length: body.len(),
        date: &httpdate::fmt_http_date(std::time::SystemTime::now()),
        extra: &[],
        keep_alive: false,
        http10: false,
    }
    .write(&mut head);
    s.set_write_timeout(Some(left(deadline)?))?;
    s.write_all(&head)?;
    if method != "HEAD" {
        s.write_all(body.as_bytes())?;
    }
    Ok(())
}

/// Collects a fresh snapshot from every worker (waiting up to 500 ms) and renders it.
pub fn gather(shared: &Process) -> String {
    let generation = shared.scrape_generation.fetch_add(1, Ordering::AcqRel) + 1;
    let deadline = Instant::now() + Duration::from_millis(500);
    while Instant::now() < deadline
        && !shared.workers.iter().all(|s| {
            s.published.load(Ordering::Acquire) >= generation
                || s.stopped_accepting.load(Ordering::Relaxed)
        })
    {
        std::thread::sleep(Duration::from_millis(2));
    }
    let mut merged = CoreMetrics::new(0);
    for s in &shared.workers {
        if let Ok(slot) = s.metrics.lock() {
            if let Some(m) = slot.as_ref() {
                merged.merge(m);
            }
        }
    }
    render(&shared.current(), &merged)
}
