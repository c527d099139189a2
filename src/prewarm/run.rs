//! One pre-warming task's work, on its own threads (blocking I/O through
//! `ureq`; no core is involved but as the server of the fetches): the
//! listing thread pages through ListObjectsV2 and hands objects in scope to
//! `cache.warming.concurrency` fetcher threads, paced by [`Pacer`].

use super::{Pacer, Status, Task, HEADER};
use crate::cache::policy;
use crate::cache::store;
use crate::s3::list::{self, Listed, Page};
use crate::shared::{Generation, Process};
use std::io::Read;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

/// Keys asked per listing page.
const PAGE: u32 = 1000;

/// One object to fetch.
struct Job {
    key: String,
    size: u64,
}

/// What the fetchers share: where to send, how, and the task.
struct Fetching {
    base: String,
    prefix: String,
    agent: ureq::Agent,
    secret: String,
}

/// Runs `task` to its end; returns how it ended.
pub(super) fn run(process: &Arc<Process>, task: &Arc<Task>) -> Status {
    let generation = process.current();
    let Some(bucket) = generation
        .config
        .buckets
        .iter()
        .position(|b| b.name == task.request.bucket)
    else {
        task.note_error("the bucket is no longer configured".into());
        return Status::Failed;
    };
    let fetching = match fetching(&generation, bucket, &process.prewarm.secret) {
        Ok(f) => Arc::new(f),
        Err(e) => {
            task.note_error(e);
            return Status::Failed;
        }
    };
    let warming = generation.config.cache.warming;
    let (tx, rx) = sync_channel::<Job>(warming.concurrency);
    let rx = Arc::new(Mutex::new(rx));
    let mut fetchers = Vec::with_capacity(warming.concurrency);
    for _ in 0..warming.concurrency {
        let (rx, f, t, p) = (rx.clone(), fetching.clone(), task.clone(), process.clone());
        let spawned = std::thread::Builder::new()
            .name("yatagarasu-prewarm-fetch".into())
            .spawn(move || fetcher(&rx, &f, &t, &p));
        match spawned {
            Ok(h) => fetchers.push(h),
            Err(e) => task.note_error(format!("fewer fetchers than configured: {e}")),
        }
    }
    let listed = if fetchers.is_empty() {
        Err("no fetcher thread could start".to_string())
    } else {
        feed(process, &generation, bucket, task, &tx)
    };
    drop(tx);
    for h in fetchers {
        let _ = h.join();
    }
    match listed {
        _ if task.cancelled() => Status::Cancelled,
        Ok(()) => Status::Completed,
        Err(e) => {
            process
                .prewarm
                .totals
                .errors
                .fetch_add(1, Ordering::Relaxed);
            task.note_error(e);
            Status::Failed
        }
    }
}

/// Where and how fetches go: the proxy's own listener (loopback when it
/// listens on every address), over TLS trusting exactly its certificate
/// when it serves TLS.
fn fetching(generation: &Generation, bucket: usize, secret: &str) -> Result<Fetching, String> {
    let server = &generation.config.server;
    let mut addr = server.address;
    if addr.ip().is_unspecified() {
        addr.set_ip(match addr {
            std::net::SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
            std::net::SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
        });
    }
    let mut agent = ureq::AgentBuilder::new()
        .timeout_connect(Duration::from_secs(10))
        .timeout_read(Duration::from_secs(60))
        .user_agent("yatagarasu-prewarm");
    let scheme = match &server.tls {
        Some(tls) => {
            agent = agent.tls_config(crate::tls::pinned_config(&tls.cert_file)?);
            "https"
        }
        None => "http",
    };
    Ok(Fetching {
        base: format!("{scheme}://{addr}"),
        prefix: generation.config.buckets[bucket].path_prefix.clone(),
        agent: agent.build(),
        secret: secret.to_string(),
    })
}

/// Pages through the listing and hands each object in scope to the
/// fetchers, paced; stops at a cancel, at `max_files`, or before the
/// cache's bound.
fn feed(
    process: &Process,
    generation: &Generation,
    bucket: usize,
    task: &Task,
    tx: &SyncSender<Job>,
) -> Result<(), String> {
    let b = &generation.config.buckets[bucket];
    let req = &task.request;
    let prefix = req.path.trim_start_matches('/').to_string();
    let delimited = !req.recursive;
    let bound = cache_bound(generation);
    let mut planned = 0u64;
    let mut considered = 0u64;
    let mut pacer = Pacer::new(generation.config.cache.warming.rate_limit);
    let mut token: Option<String> = None;
    loop {
        if task.cancelled() {
            return Ok(());
        }
        let page = page(generation, bucket, &prefix, delimited, token.as_deref())?;
        for Listed { key, size } in page.objects {
            if req.recursive
                && req
                    .max_depth
                    .is_some_and(|d| list::depth(&prefix, &key) > d)
            {
                continue;
            }
            if req.max_files.is_some_and(|m| considered >= m) {
                task.note_stopped(format!("max_files ({considered}) reached"));
                return Ok(());
            }
            considered += 1;
            task.scanned.fetch_add(1, Ordering::Relaxed);
            if size > b.cache.max_item_bytes || held(process, generation, bucket, &key) {
                skip(process, task);
                continue;
            }
            if planned.saturating_add(size) > bound {
                task.note_stopped(format!(
                    "the cache's bound ({bound} bytes) would be passed; the rest is not fetched"
                ));
                return Ok(());
            }
            planned += size;
            // Paced, in steps short enough to notice a cancel.
            let mut wait = pacer.wait(Instant::now());
            while !wait.is_zero() {
                if task.cancelled() {
                    return Ok(());
                }
                let step = wait.min(Duration::from_millis(100));
                std::thread::sleep(step);
                wait -= step;
            }
            if tx.send(Job { key, size }).is_err() {
                return Err("every fetcher stopped".into());
            }
        }
        match page.next {
            Some(next) => token = Some(next),
            None => return Ok(()),
        }
    }
}

/// The most the task may bring in: the larger tier's bound.
fn cache_bound(generation: &Generation) -> u64 {
    let c = &generation.config.cache;
    c.disk
        .as_ref()
        .map_or(c.memory_bytes, |d| d.max_bytes.max(c.memory_bytes))
}

/// Whether the object is fresh in memory or held on disk already.
fn held(process: &Process, generation: &Generation, bucket: usize, key: &str) -> bool {
    let b = &generation.config.buckets[bucket];
    let mut encoded = String::new();
    crate::router::encode_key(key, &mut encoded);
    let k = store::key(&b.name, &b.origin, &encoded, "");
    let fresh_in_memory = process.cache.as_ref().is_some_and(|c| {
        c.peek(&k)
            .is_some_and(|o| policy::is_fresh(o.stored_at, o.fresh_for, crate::clock::now()))
    });
    fresh_in_memory || process.disk.as_ref().is_some_and(|d| d.contains(&k))
}

fn skip(process: &Process, task: &Task) {
    task.skipped.fetch_add(1, Ordering::Relaxed);
    process
        .prewarm
        .totals
        .skipped
        .fetch_add(1, Ordering::Relaxed);
}

/// One listing page from the first replica that gives one: replicas in
/// priority order, those whose breaker is open last.
fn page(
    generation: &Generation,
    bucket: usize,
    prefix: &str,
    delimited: bool,
    token: Option<&str>,
) -> Result<Page, String> {
    let now = crate::clock::now_ms();
    let mut order: Vec<usize> = generation.bucket_replicas[bucket].clone();
    order.sort_by_key(|&r| {
        let open = generation.replicas[r].breaker.load().state
            == crate::upstream::breaker::State::Open
            && generation.replicas[r].breaker.load().open_until > now;
        (open, generation.replicas[r].config.priority)
    });
    let mut errors = Vec::new();
    for r in order {
        match page_from(generation, r, prefix, delimited, token) {
            Ok(p) => return Ok(p),
            Err(e) => errors.push(format!("{}: {e}", generation.replicas[r].config.name)),
        }
    }
    Err(format!(
        "listing failed on every replica ({})",
        errors.join("; ")
    ))
}

/// One signed ListObjectsV2 request to replica `r`.
fn page_from(
    generation: &Generation,
    r: usize,
    prefix: &str,
    delimited: bool,
    token: Option<&str>,
) -> Result<Page, String> {
    let state = &generation.replicas[r];
    let replica = &state.config;
    let bucket_path = if replica.virtual_hosted {
        String::new()
    } else {
        format!("/{}", replica.bucket)
    };
    let target = list::target(&bucket_path, prefix, delimited, token, PAGE);
    let creds = state
        .credentials
        .current()
        .ok_or("credentials: none fetched yet")?;
    if creds.expired(SystemTime::now()) {
        return Err("credentials: expired".into());
    }
    let mut signed = Vec::with_capacity(512);
    crate::s3::Signer::new(&creds, &replica.region).sign_into(
        "GET",
        &replica.endpoint.authority,
        &target,
        SystemTime::now(),
        &mut signed,
    )?;
    let mut agent = ureq::AgentBuilder::new()
        .timeout(replica.timeout)
        .user_agent("yatagarasu-prewarm");
    let scheme = if replica.endpoint.tls {
        agent = agent.tls_config(crate::tls::client_config(
            replica.ca_file.as_deref(),
            replica.insecure_skip_verify,
        )?);
        "https"
    } else {
        "http"
    };
    let url = format!("{scheme}://{}{target}", replica.endpoint.authority);
    let mut request = agent.build().get(&url);
    let signed = String::from_utf8_lossy(&signed).into_owned();
    for line in signed.split("\r\n").filter(|l| !l.is_empty()) {
        if let Some((name, value)) = line.split_once(": ") {
            request = request.set(name, value);
        }
    }
    let response = match request.call() {
        Ok(r) => r,
        Err(ureq::Error::Status(code, r)) => {
            let body = r.into_string().unwrap_or_default();
            let code_name = crate::s3::error_code(body.as_bytes()).unwrap_or("");
            return Err(format!("HTTP {code} {code_name}").trim_end().to_string());
        }
        Err(e) => return Err(e.to_string()),
    };
    let mut body = Vec::new();
    response
        .into_reader()
        .take(64 * 1024 * 1024)
        .read_to_end(&mut body)
        .map_err(|e| format!("reading the listing: {e}"))?;
    list::parse(&body)
}

/// Fetches jobs until the listing ends (or the task is cancelled: the
/// jobs queued are dropped).
fn fetcher(rx: &Mutex<Receiver<Job>>, f: &Fetching, task: &Task, process: &Process) {
    loop {
        let job = {
            let rx = rx.lock().unwrap_or_else(|e| e.into_inner());
            rx.recv()
        };
        let Ok(job) = job else { return };
        if task.cancelled() {
            continue;
        }
        let totals = &process.prewarm.totals;
        match fetch(f, &job) {
            Ok(Fetched::Stored(bytes)) => {
                task.cached.fetch_add(1, Ordering::Relaxed);
                task.bytes.fetch_add(bytes, Ordering::Relaxed);
                totals.files.fetch_add(1, Ordering::Relaxed);
                totals.bytes.fetch_add(bytes, Ordering::Relaxed);
            }
            Ok(Fetched::AlreadyCached) => skip(process, task),
            Err(e) => {
                task.failed.fetch_add(1, Ordering::Relaxed);
                totals.errors.fetch_add(1, Ordering::Relaxed);
                task.note_error(format!("{}: {e}", job.key));
            }
        }
    }
}

enum Fetched {
    Stored(u64),
    AlreadyCached,
}

/// One GET through the proxy's listener, the body read to its end (the
/// proxy fills its cache as it serves it).
fn fetch(f: &Fetching, job: &Job) -> Result<Fetched, String> {
    let mut path = f.prefix.trim_end_matches('/').to_string();
    path.push('/');
    crate::router::encode_key(&job.key, &mut path);
    let url = format!("{}{path}", f.base);
    let response = match f.agent.get(&url).set(HEADER, &f.secret).call() {
        Ok(r) => r,
        Err(ureq::Error::Status(code, _)) => return Err(format!("HTTP {code}")),
        Err(e) => return Err(e.to_string()),
    };
    let hit = response
        .header("x-cache")
        .is_some_and(|v| v.eq_ignore_ascii_case("HIT"));
    let got = std::io::copy(&mut response.into_reader(), &mut std::io::sink())
        .map_err(|e| format!("reading the body: {e}"))?;
    if got != job.size {
        return Err(format!("{got} bytes read, {} listed", job.size));
    }
    Ok(if hit {
        Fetched::AlreadyCached
    } else {
        Fetched::Stored(got)
    })
}
