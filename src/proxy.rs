//! The request flow, top to bottom:
//!
//! ```text
//! parse head -> route prefix -> plan replicas (priority, weight, breakers)
//!   -> for each replica: sign, send, read head within timeout_seconds
//!        failure? record it, log "Replica 'a' failed, trying 'b'", next
//!        answer?  record success, stream the body to the client
//!   -> body broke after bytes went out? resume on the next replica with
//!      Range + If-Match, or close the client connection (never short data)
//!   -> nothing answered: 502 (attempts failed) or 503 + Retry-After (all open)
//!   -> metrics + one access-log line
//! ```
//!
//! What counts as a replica *failure*: connect refused or timed out, reset,
//! timeout (head not received within `timeout_seconds`, or a body read stalled
//! longer than that), malformed or truncated response, any 5xx, and 403 with S3
//! code `InvalidAccessKeyId` or `SignatureDoesNotMatch`. Every other status is
//! an *answer*: relayed to the client, never retried.

use crate::config::{Level, Replica};
use crate::http::body::{self, PumpError, Pumped, Timeouts};
use crate::http::head::{
    self, Framing, HeadError, Method, Request, Response, FORWARDED_REQUEST_HEADERS,
};
use crate::http::io::{read_more, write_all, write_range};
use crate::log;
use crate::metrics::ShardMetrics;
use crate::router::{self, RouteError};
use crate::s3::{self, Signer};
use crate::shared::{now_ms, Process, Shared};
use crate::upstream::breaker::{Admit, Breaker, State};
use crate::upstream::pool::{Pool, UpConn};
use crate::upstream::select::{Plan, Selector};
use crate::upstream::tls::{ClientStream, MaybeTls};
use monoio::net::TcpStream;
use std::cell::{Cell, RefCell};
use std::fmt::Write as _;
use std::io;
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

/// Largest S3 error body read to classify a 403.
const ERROR_BODY_MAX: u64 = 8 * 1024;
/// Bodies up to this size are sent in the same write as the response head.
const COALESCE_MAX: usize = 16 * 1024;
/// Initial client read buffer (grows to the head limit when needed).
const CLIENT_BUF: usize = 4 * 1024;
/// A keep-alive connection idle this long gives its buffers back ("parks").
/// Busy connections never reach it; idle ones hold no buffer (see loadtest).
const PARK_AFTER: Duration = Duration::from_millis(100);
/// Free read buffers kept per core.
const READ_BUF_POOL: usize = 1024;

struct LocalBreaker {
    breaker: Breaker,
    seen: u32,
}

/// Everything one core needs to serve requests. Owned by that core's thread.
pub struct Shard {
    pub id: usize,
    /// The configuration generation this state was built for.
    pub shared: Arc<Shared>,
    breakers: RefCell<Vec<LocalBreaker>>,
    selectors: RefCell<Vec<Selector>>,
    signers: Vec<Signer>,
    pub pool: Pool,
    /// Per-core state that outlives generations.
    pub core: Rc<Core>,
}

/// Per-core state that outlives configuration generations: metrics, buffers,
/// pipes, the drain flag, and the shard built for the current generation.
pub struct Core {
    pub id: usize,
    pub process: Arc<Process>,
    current: RefCell<Option<Rc<Shard>>>,
    seen_epoch: Cell<u64>,
    pub metrics: RefCell<ShardMetrics>,
    rid_state: Cell<u64>,
    pub draining: Cell<bool>,
    /// Empty pipes kept for splicing bodies.
    pipes: RefCell<Vec<body::SplicePipe>>,
    /// Connections parked since the last memory trim (see `server::tick`).
    pub parked: Cell<usize>,
    /// Free client read buffers: reused across connections, so buffers freed
    /// by idle connections do not leave holes between live allocations.
    read_bufs: RefCell<Vec<Vec<u8>>>,
}

impl Core {
    pub fn new(id: usize, process: Arc<Process>) -> Rc<Core> {
        let seed = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0)
            ^ ((id as u64 + 1) << 56);
        Rc::new(Core {
            id,
            process,
            current: RefCell::new(None),
            seen_epoch: Cell::new(u64::MAX),
            metrics: RefCell::new(ShardMetrics::new(0)),
            rid_state: Cell::new(seed),
            draining: Cell::new(false),
            pipes: RefCell::new(Vec::new()),
            parked: Cell::new(0),
            read_bufs: RefCell::new(Vec::new()),
        })
    }

    /// The shard for the current configuration generation; adopts a newly
    /// reloaded generation on first use (one relaxed load per request).
    pub fn current(self: &Rc<Self>) -> Rc<Shard> {
        let epoch = self.process.epoch.load(Ordering::Acquire);
        if epoch != self.seen_epoch.get() {
            let shard = Rc::new(Shard::new(self.clone(), self.process.current()));
            *self.current.borrow_mut() = Some(shard);
            self.seen_epoch.set(epoch);
        }
        match &*self.current.borrow() {
            Some(s) => s.clone(),
            None => Rc::new(Shard::new(self.clone(), self.process.current())),
        }
    }
}

/// One client connection's reusable state.
struct Client {
    stream: ClientStream,
    rbuf: Vec<u8>,
    wbuf: Vec<u8>,
    req: Request,
    resp: Response,
    path: String,
    upath: String,
    /// The upstream request path, reused.
    opath: String,
}

impl Client {
    /// Releases every per-connection buffer while the connection is idle.
    fn park(&mut self) {
        self.rbuf = Vec::new();
        self.wbuf = Vec::new();
        self.resp.forward = String::new();
        self.path = String::new();
        self.upath = String::new();
        self.opath = String::new();
    }
}

/// How a request ended, for the access log and metrics.
struct Outcome {
    status: u16,
    bytes: u64,
    keep_alive: bool,
    replica: Option<usize>,
}

/// A replica's response head classified as an answer.
struct Answer {
    conn: UpConn,
    head_len: usize,
}

/// A failed attempt.
struct Failure {
    reason: &'static str,
    detail: String,
    /// For a 403 auth failure: the response, relayed if no replica answers.
    captured: Option<Answer>,
}

impl Failure {
    fn new(reason: &'static str, detail: impl Into<String>) -> Failure {
        Failure {
            reason,
            detail: detail.into(),
            captured: None,
        }
    }
}

fn io_reason(e: &io::Error) -> &'static str {
    match e.kind() {
        io::ErrorKind::TimedOut => "timeout",
        io::ErrorKind::ConnectionRefused => "connect",
        io::ErrorKind::ConnectionReset
        | io::ErrorKind::ConnectionAborted
        | io::ErrorKind::BrokenPipe => "reset",
        _ => "io",
    }
}

fn status_reason(status: u16) -> &'static str {
    match status {
        500 => "http_500",
        502 => "http_502",
        503 => "http_503",
        504 => "http_504",
        _ => "http_5xx",
    }
}

/// Overrides for a resumed body: `Range` and `If-Match` replace the client's.
#[derive(Clone, Copy)]
struct Resume<'a> {
    first: u64,
    last: u64,
    etag: &'a str,
}

impl Shard {
    pub fn new(core: Rc<Core>, shared: Arc<Shared>) -> Shard {
        let breakers = shared
            .replicas
            .iter()
            .map(|r| LocalBreaker {
                breaker: Breaker::new(&shared.bucket(r.bucket).breaker),
                seen: u32::MAX,
            })
            .collect();
        let selectors = shared
            .config
            .buckets
            .iter()
            .map(|b| {
                Selector::new(
                    &b.replicas
                        .iter()
                        .map(|r| (r.priority, r.weight))
                        .collect::<Vec<_>>(),
                )
            })
            .collect();
        let signers = shared
            .replicas
            .iter()
            .map(|r| Signer::new(&r.config.access_key, &r.config.secret_key, &r.config.region))
            .collect();
        Shard {
            id: core.id,
            pool: Pool::new(shared.replicas.len()),
            breakers: RefCell::new(breakers),
            selectors: RefCell::new(selectors),
            signers,
            shared,
            core,
        }
    }

    /// Stable metric id of a replica of this generation.
    fn mid(&self, rid: usize) -> usize {
        self.shared.replicas[rid].metric_id
    }

    fn replica(&self, rid: usize) -> &Replica {
        &self.shared.replicas[rid].config
    }

    // ---- breakers: local copy, synchronised with the shared snapshot ----

    fn sync(&self, rid: usize, b: &mut LocalBreaker) {
        let p = self.shared.replicas[rid].breaker.load();
        if p.generation != b.seen {
            b.breaker.adopt(p.state, p.open_until);
            b.seen = p.generation;
        }
    }

    fn usable(&self, rid: usize, now: u64) -> bool {
        let mut all = self.breakers.borrow_mut();
        let b = &mut all[rid];
        self.sync(rid, b);
        b.breaker.would_admit(now)
    }

    fn admit(&self, rid: usize, now: u64) -> Admit {
        let mut all = self.breakers.borrow_mut();
        let b = &mut all[rid];
        self.sync(rid, b);
        let (admit, t) = b.breaker.admit(now);
        if let Some(t) = t {
            b.seen = self.shared.replicas[rid]
                .breaker
                .publish(t.to, b.breaker.open_until());
            self.log_transition(rid, t.from, t.to);
        }
        admit
    }

    fn record(&self, rid: usize, admit: Admit, ok: bool) {
        let mut all = self.breakers.borrow_mut();
        let b = &mut all[rid];
        let shared = &self.shared.replicas[rid].breaker;
        if admit == Admit::Normal {
            if ok {
                shared.clear_failures();
            } else {
                // Consecutive failures are counted across cores.
                let n = shared.add_failure();
                b.breaker.record_failure_count(n - 1);
            }
        }
        if let Some(t) = b.breaker.record(admit, ok, now_ms()) {
            b.seen = self.shared.replicas[rid]
                .breaker
                .publish(t.to, b.breaker.open_until());
            drop(all);
            self.log_transition(rid, t.from, t.to);
            if t.to == State::Open {
                self.pool.clear(rid);
            }
        }
    }

    fn release(&self, rid: usize, admit: Admit) {
        self.breakers.borrow_mut()[rid].breaker.release(admit);
    }

    fn log_transition(&self, rid: usize, from: State, to: State) {
        let r = &self.shared.replicas[rid];
        let level = if to == State::Open {
            Level::Warn
        } else {
            Level::Info
        };
        log!(
            level,
            "Circuit breaker state changed",
            bucket = self.shared.bucket(r.bucket).name,
            replica = r.config.name,
            from = from.as_str(),
            to = to.as_str(),
        );
    }

    fn next_request_id(&self, out: &mut String) {
        // splitmix64: unique per shard and start time, cheap, no allocation.
        let mut z = self
            .core
            .rid_state
            .get()
            .wrapping_add(0x9E37_79B9_7F4A_7C15);
        self.core.rid_state.set(z);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        out.clear();
        let _ = write!(out, "{z:016x}");
    }

    // ---- connection loop ----

    /// Serves one client connection until it closes, errs or idles out.
    pub async fn serve(&self, stream: TcpStream, tls: Option<&monoio_rustls::TlsAcceptor>) {
        let _ = stream.set_nodelay(true);
        let stream = match tls {
            None => MaybeTls::Plain(stream),
            Some(acceptor) => {
                let idle = self.shared.config.server.idle_timeout;
                match monoio::time::timeout(idle, acceptor.accept(stream)).await {
                    Ok(Ok(s)) => MaybeTls::Tls(Box::new(s)),
                    Ok(Err(e)) => {
                        log!(
                            Level::Debug,
                            "TLS handshake with client failed",
                            error = io::Error::from(e)
                        );
                        return;
                    }
                    Err(_) => return,
                }
            }
        };
        let mut c = Client {
            stream,
            // Allocated when the first bytes are readable (see read_head).
            rbuf: Vec::new(),
            wbuf: Vec::new(),
            req: Request::default(),
            resp: Response::default(),
            path: String::new(),
            upath: String::new(),
            opath: String::new(),
        };
        self.connection(&mut c).await;
        self.give_read_buf(std::mem::take(&mut c.rbuf));
    }

    async fn connection(&self, c: &mut Client) {
        let idle = self.shared.config.server.idle_timeout;
        loop {
            let head_len = match self.read_head(c, idle).await {
                Ok(Some(n)) => n,
                Ok(None) => return,
                Err(e) => {
                    let status = e.status();
                    let msg = match e {
                        HeadError::BadRequest(m) => m,
                        HeadError::UriTooLong => "request line too long",
                        HeadError::HeadersTooLarge => "request head too large",
                        HeadError::Partial => "incomplete request",
                    };
                    c.req.request_id.clear();
                    self.next_request_id(&mut c.req.request_id);
                    let _ =
                        Box::pin(self.simple(c, status, "text/plain", msg.as_bytes(), false, &[]))
                            .await;
                    self.core
                        .metrics
                        .borrow_mut()
                        .request(None, Method::Other, status, 1, 0);
                    log!(
                        Level::Info,
                        "bad request",
                        status = status,
                        reason = msg,
                        request_id = c.req.request_id
                    );
                    return;
                }
            };
            let shard = &self.shared.process.shards[self.id];
            shard.in_flight.fetch_add(1, Ordering::Relaxed);
            let started = Instant::now();
            // Boxed so an idle connection's task stays small: the request
            // state machine exists only while a request is being served.
            // The newest configuration generation serves this request; it
            // keeps its generation alive until it finishes, whatever reloads.
            let current = self.core.current();
            let outcome = Box::pin(current.handle(c)).await;
            shard.in_flight.fetch_sub(1, Ordering::Relaxed);
            current.finish(c, &outcome, started);
            // Keep any pipelined bytes that followed this head.
            c.rbuf.drain(..head_len.min(c.rbuf.len()));
            if !outcome.keep_alive || self.core.draining.get() {
                return;
            }
        }
    }

    fn take_read_buf(&self) -> Vec<u8> {
        self.core
            .read_bufs
            .borrow_mut()
            .pop()
            .unwrap_or_else(|| Vec::with_capacity(CLIENT_BUF))
    }

    /// Keeps an empty standard-size read buffer for the next connection.
    fn give_read_buf(&self, mut buf: Vec<u8>) {
        let mut pool = self.core.read_bufs.borrow_mut();
        if buf.capacity() == CLIENT_BUF && pool.len() < READ_BUF_POOL {
            buf.clear();
            pool.push(buf);
        }
    }

    /// Reads until a full request head is buffered. `Ok(None)`: clean close or idle timeout.
    async fn read_head(&self, c: &mut Client, idle: Duration) -> Result<Option<usize>, HeadError> {
        loop {
            if !c.rbuf.is_empty() {
                match head::parse_request(&c.rbuf, &mut c.req) {
                    Ok(n) => return Ok(Some(n)),
                    Err(HeadError::Partial) => {}
                    Err(e) => return Err(e),
                }
            }
            if c.rbuf.len() == c.rbuf.capacity() {
                if c.rbuf.capacity() > head::MAX_REQUEST_HEAD {
                    return Err(HeadError::HeadersTooLarge);
                }
                c.rbuf.reserve(head::MAX_REQUEST_HEAD + 1 - c.rbuf.len());
            }
            if c.rbuf.capacity() == 0 {
                // New or parked connection: no buffer until there is data
                // (TLS may hold decrypted bytes already, so it reads at once).
                if let MaybeTls::Plain(s) = &c.stream {
                    match monoio::time::timeout(idle, s.readable(false)).await {
                        Ok(Ok(())) => {}
                        _ => return Ok(None),
                    }
                }
                c.rbuf = self.take_read_buf();
            }
            let plain = matches!(c.stream, MaybeTls::Plain(_));
            if plain && c.rbuf.is_empty() && idle > PARK_AFTER {
                // Between requests: a normal read for a while, then park.
                match read_more(&mut c.stream, &mut c.rbuf, PARK_AFTER).await {
                    Ok(0) => return Ok(None),
                    Ok(_) => continue,
                    Err(e) if e.kind() == io::ErrorKind::TimedOut => {
                        // An idle keep-alive connection keeps no buffers: wait
                        // for readability only, then read with fresh ones.
                        self.give_read_buf(std::mem::take(&mut c.rbuf));
                        c.park();
                        self.core.parked.set(self.core.parked.get() + 1);
                        let left = idle.saturating_sub(PARK_AFTER);
                        let MaybeTls::Plain(s) = &c.stream else {
                            return Ok(None);
                        };
                        match monoio::time::timeout(left, s.readable(false)).await {
                            Ok(Ok(())) => c.rbuf = self.take_read_buf(),
                            _ => return Ok(None),
                        }
                        continue;
                    }
                    Err(_) => return Ok(None),
                }
            }
            match read_more(&mut c.stream, &mut c.rbuf, idle).await {
                Ok(0) => {
                    return if c.rbuf.is_empty() {
                        Ok(None)
                    } else {
                        Err(HeadError::BadRequest("connection closed mid-head"))
                    };
                }
                Ok(_) => {}
                Err(_) => return Ok(None),
            }
        }
    }

    fn finish(&self, c: &Client, o: &Outcome, started: Instant) {
        let micros = started.elapsed().as_micros() as u64;
        let bucket = o.replica.map(|r| self.shared.replicas[r].bucket);
        let bucket_metric = bucket.map(|b| self.shared.bucket_metric[b]);
        self.core.metrics.borrow_mut().request(
            bucket_metric,
            c.req.method(),
            o.status,
            micros,
            o.bytes,
        );
        log!(
            Level::Info,
            "request",
            method = c.req.method_text,
            path = String::from_utf8_lossy(&c.req.target),
            status = o.status,
            bytes = o.bytes,
            duration_ms = format_args!("{:.3}", micros as f64 / 1000.0),
            bucket = bucket.map_or("-", |b| self.shared.bucket(b).name.as_str()),
            replica = o.replica.map_or("-", |r| self.replica(r).name.as_str()),
            request_id = c.req.request_id,
            worker = self.id,
        );
    }

    /// Sends a response generated by the proxy itself.
    async fn simple(
        &self,
        c: &mut Client,
        status: u16,
        content_type: &str,
        body: &[u8],
        keep_alive: bool,
        extra: &[(&str, &str)],
    ) -> bool {
        let keep = keep_alive && c.req.keep_alive && !self.core.draining.get();
        head::status_line(&mut c.wbuf, status);
        head::header(&mut c.wbuf, "Content-Type", content_type);
        let mut len = itoa(body.len() as u64);
        head::header(&mut c.wbuf, "Content-Length", &len);
        head::header(&mut c.wbuf, "X-Request-ID", &c.req.request_id);
        for (k, v) in extra {
            head::header(&mut c.wbuf, k, v);
        }
        connection_header(&mut c.wbuf, keep, c.req.http10);
        c.wbuf.extend_from_slice(b"\r\n");
        if c.req.method() != Method::Head {
            c.wbuf.extend_from_slice(body);
        }
        len.clear();
        let ok = write_all(
            &mut c.stream,
            &mut c.wbuf,
            self.shared.config.server.idle_timeout,
        )
        .await
        .is_ok();
        ok && keep
    }

    async fn simple_outcome(
        &self,
        c: &mut Client,
        status: u16,
        ctype: &str,
        body: &[u8],
        extra: &[(&str, &str)],
    ) -> Outcome {
        let keep_alive = self.simple(c, status, ctype, body, true, extra).await;
        Outcome {
            status,
            bytes: body.len() as u64,
            keep_alive,
            replica: None,
        }
    }

    // ---- one request ----

    async fn handle(&self, c: &mut Client) -> Outcome {
        if c.req.request_id.is_empty() {
            let mut id = std::mem::take(&mut c.req.request_id);
            self.next_request_id(&mut id);
            c.req.request_id = id;
        }
        let method = c.req.method();
        if method == Method::Other {
            return self
                .simple_outcome(
                    c,
                    405,
                    "text/plain",
                    b"only GET and HEAD are supported",
                    &[("Allow", "GET, HEAD")],
                )
                .await;
        }
        let mut path = std::mem::take(&mut c.path);
        let decoded = router::decode_path(&c.req.target, &mut path);
        let outcome = match decoded {
            Err(RouteError::BadPath(why)) => {
                self.simple_outcome(c, 400, "text/plain", why.as_bytes(), &[])
                    .await
            }
            Err(_) => {
                self.simple_outcome(c, 400, "text/plain", b"bad path", &[])
                    .await
            }
            Ok(()) if path == "/health" => {
                self.simple_outcome(c, 200, "application/json", b"{\"status\":\"ok\"}", &[])
                    .await
            }
            Ok(()) if path == "/ready" => {
                let (ready, body) = readiness(&self.shared);
                self.simple_outcome(
                    c,
                    if ready { 200 } else { 503 },
                    "application/json",
                    body.as_bytes(),
                    &[],
                )
                .await
            }
            Ok(()) => match self.shared.router.route(&path) {
                Err(RouteError::NoBucket) => {
                    self.simple_outcome(
                        c,
                        404,
                        "text/plain",
                        b"no bucket is configured for this path",
                        &[],
                    )
                    .await
                }
                Err(_) => {
                    self.simple_outcome(c, 404, "text/plain", b"no object key in path", &[])
                        .await
                }
                Ok((bucket, key)) => {
                    let mut upath = std::mem::take(&mut c.upath);
                    upath.clear();
                    router::encode_key(key, &mut upath);
                    let o = self.proxy(c, bucket, &upath).await;
                    c.upath = upath;
                    o
                }
            },
        };
        c.path = path;
        outcome
    }

    /// Tries the bucket's replicas in plan order until one answers.
    async fn proxy(&self, c: &mut Client, bucket: usize, encoded_key: &str) -> Outcome {
        let now = now_ms();
        let ids = &self.shared.bucket_replicas[bucket];
        let mut plan = Plan::default();
        self.selectors.borrow_mut()[bucket].plan(|i| self.usable(ids[i], now), &mut plan);
        // Global replica ids in plan order, on the stack.
        let mut order_buf = [0usize; crate::config::MAX_REPLICAS];
        for (slot, &i) in order_buf.iter_mut().zip(plan.as_slice()) {
            *slot = ids[i as usize];
        }
        let order = &order_buf[..plan.as_slice().len()];
        let bucket_name = &self.shared.bucket(bucket).name;
        let mut attempted = false;
        let mut last: Option<(usize, Failure)> = None;
        for (pos, &rid) in order.iter().enumerate() {
            let admit = self.admit(rid, now_ms());
            if admit == Admit::Rejected {
                continue;
            }
            if let Some((prev, _)) = &last {
                self.core
                    .metrics
                    .borrow_mut()
                    .failover(self.mid(*prev), self.mid(rid));
            }
            attempted = true;
            let t0 = Instant::now();
            match self.attempt(c, rid, encoded_key, None).await {
                Ok(answer) => {
                    self.core
                        .metrics
                        .borrow_mut()
                        .upstream(self.mid(rid), t0.elapsed().as_micros() as u64);
                    self.record(rid, admit, true);
                    return self
                        .relay(c, rid, answer, &order[pos + 1..], bucket, encoded_key)
                        .await;
                }
                Err(f) => {
                    self.core
                        .metrics
                        .borrow_mut()
                        .upstream(self.mid(rid), t0.elapsed().as_micros() as u64);
                    self.core
                        .metrics
                        .borrow_mut()
                        .replica_failure(self.mid(rid), f.reason);
                    self.record(rid, admit, false);
                    let next = order[pos + 1..]
                        .iter()
                        .copied()
                        .find(|&n| self.usable(n, now_ms()));
                    if let Some(next) = next {
                        log!(
                            Level::Warn,
                            &format!(
                                "Replica '{}' failed, trying '{}'",
                                self.replica(rid).name,
                                self.replica(next).name
                            ),
                            bucket = bucket_name,
                            request_id = c.req.request_id,
                            cause = format_args!("{}: {}", f.reason, f.detail),
                        );
                    }
                    last = Some((rid, f));
                }
            }
        }
        if !attempted {
            let wait_ms = ids
                .iter()
                .map(|&rid| {
                    let p = self.shared.replicas[rid].breaker.load();
                    if p.state == State::Open {
                        p.open_until.saturating_sub(now_ms())
                    } else {
                        1000
                    }
                })
                .min()
                .unwrap_or(1000);
            let secs = itoa(wait_ms.div_ceil(1000).max(1));
            log!(
                Level::Error,
                "No replica available: every circuit breaker is open",
                bucket = bucket_name,
                request_id = c.req.request_id,
                retry_after = secs,
            );
            let body = format!(
                "bucket '{bucket_name}': no replica available (all circuit breakers open)\n"
            );
            return self
                .simple_outcome(
                    c,
                    503,
                    "text/plain",
                    body.as_bytes(),
                    &[("Retry-After", &secs)],
                )
                .await;
        }
        let (rid, failure) = match last {
            Some(l) => l,
            None => (ids[0], Failure::new("io", "no attempt")),
        };
        log!(
            Level::Error,
            "All replicas failed",
            bucket = bucket_name,
            request_id = c.req.request_id,
            last_replica = self.replica(rid).name,
            cause = format_args!("{}: {}", failure.reason, failure.detail),
        );
        if let Some(captured) = failure.captured {
            // Every replica refused our credentials: S3's own 403 explains it best.
            return self.relay(c, rid, captured, &[], bucket, encoded_key).await;
        }
        let body = format!("bucket '{bucket_name}': all replicas failed\n");
        self.simple_outcome(c, 502, "text/plain", body.as_bytes(), &[])
            .await
    }

    /// Sends one request to `rid` and reads its response head into `c.resp`.
    async fn attempt(
        &self,
        c: &mut Client,
        rid: usize,
        encoded_key: &str,
        resume: Option<Resume<'_>>,
    ) -> Result<Answer, Failure> {
        let replica = self.replica(rid);
        let deadline = Instant::now() + replica.timeout;
        let method = if c.req.method() == Method::Head {
            "HEAD"
        } else {
            "GET"
        };
        let mut object_path = std::mem::take(&mut c.opath);
        replica.object_path(encoded_key, &mut object_path);
        c.wbuf.clear();
        c.wbuf.extend_from_slice(method.as_bytes());
        c.wbuf.push(b' ');
        c.wbuf.extend_from_slice(object_path.as_bytes());
        c.wbuf.extend_from_slice(b" HTTP/1.1\r\n");
        head::header(&mut c.wbuf, "Host", &replica.endpoint.authority);
        match resume {
            None => {
                for (idx, value) in &c.req.forwarded {
                    head::header(&mut c.wbuf, FORWARDED_REQUEST_HEADERS[*idx], value);
                }
            }
            Some(r) => {
                head::header(
                    &mut c.wbuf,
                    "Range",
                    &format!("bytes={}-{}", r.first, r.last),
                );
                head::header(&mut c.wbuf, "If-Match", r.etag);
            }
        }
        head::header(&mut c.wbuf, "X-Request-ID", &c.req.request_id);
        if let Err(e) = self.signers[rid].sign_into(
            method,
            &replica.endpoint.authority,
            &object_path,
            SystemTime::now(),
            &mut c.wbuf,
        ) {
            c.opath = object_path;
            return Err(Failure::new("signing", e));
        }
        c.opath = object_path;
        c.wbuf.extend_from_slice(b"\r\n");

        let mut conn = match self.pool.take(rid) {
            Some(conn) => conn,
            None => self.connect(rid, deadline).await?,
        };
        let head_len = match self.exchange(c, &mut conn, deadline).await {
            Ok(n) => n,
            Err((e, got_bytes)) if conn.reused && !got_bytes => {
                // A pooled connection the peer had closed: retry once on a fresh one.
                log!(
                    Level::Debug,
                    "stale pooled connection, retrying",
                    replica = replica.name,
                    cause = e
                );
                conn = self.connect(rid, deadline).await?;
                self.exchange(c, &mut conn, deadline)
                    .await
                    .map_err(|(e, _)| Failure::new(io_reason(&e), e.to_string()))?
            }
            Err((e, _)) => return Err(Failure::new(io_reason(&e), e.to_string())),
        };
        let status = c.resp.status;
        if status >= 500 {
            return Err(Failure::new(
                status_reason(status),
                format!("HTTP {status} from upstream"),
            ));
        }
        if status == 403 {
            if let Framing::Length(len) = c.resp.framing() {
                if len <= ERROR_BODY_MAX {
                    let want = head_len + len as usize;
                    while conn.buf.len() < want {
                        let left = deadline.saturating_duration_since(Instant::now());
                        match read_more(&mut conn.stream, &mut conn.buf, left).await {
                            Ok(0) => return Err(Failure::new("truncated", "403 body cut short")),
                            Ok(_) => {}
                            Err(e) => return Err(Failure::new(io_reason(&e), e.to_string())),
                        }
                    }
                    if let Some(code) = s3::error_code(&conn.buf[head_len..want]) {
                        if s3::is_broken_replica_code(code) {
                            let mut f = Failure::new("auth", format!("HTTP 403 {code}"));
                            f.captured = Some(Answer { conn, head_len });
                            return Err(f);
                        }
                    }
                }
            }
        }
        Ok(Answer { conn, head_len })
    }

    async fn connect(&self, rid: usize, deadline: Instant) -> Result<UpConn, Failure> {
        let r = &self.shared.replicas[rid];
        let left = deadline.saturating_duration_since(Instant::now());
        self.pool
            .connect(rid, &r.config.endpoint, r.tls.as_ref(), left)
            .await
            .map_err(|(reason, detail)| Failure::new(reason, detail))
    }

    /// Writes the request in `c.wbuf` and reads the response head.
    /// On error, says whether any response byte had arrived.
    async fn exchange(
        &self,
        c: &mut Client,
        conn: &mut UpConn,
        deadline: Instant,
    ) -> Result<usize, (io::Error, bool)> {
        let left = deadline.saturating_duration_since(Instant::now());
        write_all(&mut conn.stream, &mut c.wbuf, left)
            .await
            .map_err(|e| (e, false))?;
        conn.buf.clear();
        let head_request = c.req.method() == Method::Head;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match read_more(&mut conn.stream, &mut conn.buf, left).await {
                Ok(0) => {
                    let got = !conn.buf.is_empty();
                    return Err((
                        io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            "upstream closed before a full response head",
                        ),
                        got,
                    ));
                }
                Ok(_) => {}
                Err(e) => {
                    let got = !conn.buf.is_empty();
                    let e = if e.kind() == io::ErrorKind::TimedOut {
                        io::Error::new(
                            io::ErrorKind::TimedOut,
                            "no response head within timeout_seconds",
                        )
                    } else {
                        e
                    };
                    return Err((e, got));
                }
            }
            match head::parse_response(&conn.buf, head_request, &mut c.resp) {
                Ok(Some(n)) => return Ok(n),
                Ok(None) => {}
                Err(msg) => return Err((io::Error::new(io::ErrorKind::InvalidData, msg), true)),
            }
        }
    }

    /// Streams an answer to the client; resumes on `rest` if the body breaks.
    #[allow(clippy::too_many_arguments)]
    async fn relay(
        &self,
        c: &mut Client,
        rid: usize,
        answer: Answer,
        rest: &[usize],
        bucket: usize,
        encoded_key: &str,
    ) -> Outcome {
        let Answer { mut conn, head_len } = answer;
        let framing = c.resp.framing();
        let status = c.resp.status;
        let mut keep = c.req.keep_alive && !self.core.draining.get();
        let rechunk = !c.req.http10;
        if matches!(framing, Framing::Chunked | Framing::Close) && !rechunk {
            keep = false;
        }
        head::status_line(&mut c.wbuf, status);
        c.wbuf.extend_from_slice(c.resp.forward.as_bytes());
        head::header(&mut c.wbuf, "X-Request-ID", &c.req.request_id);
        if matches!(framing, Framing::Chunked | Framing::Close) && rechunk {
            head::header(&mut c.wbuf, "Transfer-Encoding", "chunked");
        }
        connection_header(&mut c.wbuf, keep, c.req.http10);
        c.wbuf.extend_from_slice(b"\r\n");
        let timeouts = Timeouts {
            upstream: self.replica(rid).timeout,
            client: self.shared.config.server.idle_timeout,
        };
        let mut out = Outcome {
            status,
            bytes: 0,
            keep_alive: keep,
            replica: Some(rid),
        };
        let mut start = head_len;
        if let Framing::Length(len) = framing {
            let avail = conn.buf.len() - head_len;
            if avail <= COALESCE_MAX {
                let n = avail.min(len as usize);
                c.wbuf.extend_from_slice(&conn.buf[head_len..head_len + n]);
                start = head_len + n;
                out.bytes = n as u64;
            }
        }
        if write_all(&mut c.stream, &mut c.wbuf, timeouts.client)
            .await
            .is_err()
        {
            out.keep_alive = false;
            return out;
        }
        let result: Result<Pumped, (PumpError, u64)> = match framing {
            Framing::None => Ok(Pumped {
                sent: 0,
                reusable: true,
            }),
            Framing::Length(len) => {
                let remaining = len - out.bytes;
                let splice = self.shared.config.server.zero_copy.splice(remaining);
                if let (true, MaybeTls::Plain(client)) = (splice, &mut c.stream) {
                    self.splice_body(&mut conn, start, remaining, client, timeouts)
                        .await
                } else {
                    body::length(
                        &mut conn.stream,
                        &mut conn.buf,
                        start,
                        remaining,
                        &mut c.stream,
                        timeouts,
                    )
                    .await
                }
            }
            Framing::Chunked => {
                body::chunked(
                    &mut conn.stream,
                    &mut conn.buf,
                    start,
                    &mut c.stream,
                    rechunk,
                    timeouts,
                )
                .await
            }
            Framing::Close => {
                body::until_close(
                    &mut conn.stream,
                    &mut conn.buf,
                    start,
                    &mut c.stream,
                    rechunk,
                    timeouts,
                )
                .await
            }
        };
        match result {
            Ok(p) => {
                out.bytes += p.sent;
                if p.reusable && c.resp.keep_alive {
                    self.pool.put(rid, conn);
                }
            }
            Err((PumpError::Client, sent)) => {
                out.bytes += sent;
                out.keep_alive = false;
            }
            Err((PumpError::Upstream(reason), sent)) => {
                out.bytes += sent;
                self.core
                    .metrics
                    .borrow_mut()
                    .replica_failure(self.mid(rid), reason);
                self.record(rid, Admit::Normal, false);
                drop(conn);
                match framing {
                    Framing::Length(len) => {
                        let resumed = self
                            .resume(c, rid, bucket, encoded_key, out.bytes, len, rest, timeouts)
                            .await;
                        out.bytes = resumed.0;
                        out.keep_alive = out.keep_alive && resumed.1;
                        if let Some(r) = resumed.2 {
                            out.replica = Some(r);
                        }
                    }
                    _ => {
                        log!(
                            Level::Error,
                            "Upstream failed mid-body; closing client connection",
                            bucket = self.shared.bucket(bucket).name,
                            replica = self.replica(rid).name,
                            request_id = c.req.request_id,
                            cause = reason,
                        );
                        out.keep_alive = false;
                    }
                }
            }
        }
        out
    }

    /// Sends the bytes already buffered, then splices the rest of the body.
    async fn splice_body(
        &self,
        conn: &mut UpConn,
        start: usize,
        remaining: u64,
        client: &mut TcpStream,
        t: Timeouts,
    ) -> Result<Pumped, (PumpError, u64)> {
        let buffered = (conn.buf.len() - start).min(remaining as usize);
        if buffered > 0
            && write_range(client, &mut conn.buf, start, start + buffered, t.client)
                .await
                .is_err()
        {
            return Err((PumpError::Client, 0));
        }
        // Splicing needs a plain-TCP upstream and a pipe (none when out of
        // file descriptors); otherwise the bytes are copied.
        let pipe = match conn.stream {
            MaybeTls::Plain(_) => {
                let pooled = self.core.pipes.borrow_mut().pop();
                pooled.map_or_else(monoio::net::unix::new_pipe, Ok).ok()
            }
            MaybeTls::Tls(_) => None,
        };
        let (Some(mut pipe), MaybeTls::Plain(upstream)) = (pipe, &mut conn.stream) else {
            let end = conn.buf.len();
            return body::length(
                &mut conn.stream,
                &mut conn.buf,
                end,
                remaining - buffered as u64,
                client,
                t,
            )
            .await
            .map(|p| Pumped {
                sent: p.sent + buffered as u64,
                ..p
            })
            .map_err(|(e, n)| (e, n + buffered as u64));
        };
        match body::splice_length(upstream, &mut pipe, remaining - buffered as u64, client, t).await
        {
            Ok(p) => {
                self.core.pipes.borrow_mut().push(pipe);
                conn.buf.clear();
                Ok(Pumped {
                    sent: p.sent + buffered as u64,
                    ..p
                })
            }
            Err((e, n)) => Err((e, n + buffered as u64)),
        }
    }

    /// Continues a Content-Length body that broke after `sent` of `len` bytes.
    /// Returns (bytes sent in total, body complete, replica that finished it).
    #[allow(clippy::too_many_arguments)]
    async fn resume(
        &self,
        c: &mut Client,
        failed: usize,
        bucket: usize,
        encoded_key: &str,
        mut sent: u64,
        len: u64,
        rest: &[usize],
        timeouts: Timeouts,
    ) -> (u64, bool, Option<usize>) {
        let etag = c.resp.etag.clone();
        // Offset of the body's first byte within the object.
        let base = c.resp.content_range_start.unwrap_or(0);
        let bucket_name = &self.shared.bucket(bucket).name;
        let mut from = failed;
        if etag.is_empty() {
            log!(
                Level::Error,
                "Upstream failed mid-body and the object has no ETag to resume with; closing client connection",
                bucket = bucket_name,
                request_id = c.req.request_id,
            );
            return (sent, false, None);
        }
        for &rid in rest {
            let admit = self.admit(rid, now_ms());
            if admit == Admit::Rejected {
                continue;
            }
            log!(
                Level::Warn,
                &format!(
                    "Replica '{}' failed mid-body, resuming from '{}'",
                    self.replica(from).name,
                    self.replica(rid).name
                ),
                bucket = bucket_name,
                request_id = c.req.request_id,
                offset = base + sent,
            );
            self.core
                .metrics
                .borrow_mut()
                .failover(self.mid(from), self.mid(rid));
            let r = Resume {
                first: base + sent,
                last: base + len - 1,
                etag: &etag,
            };
            let original_status = c.resp.status;
            let attempt = self.attempt(c, rid, encoded_key, Some(r)).await;
            let Answer { mut conn, head_len } = match attempt {
                Ok(a) => a,
                Err(f) => {
                    self.core
                        .metrics
                        .borrow_mut()
                        .replica_failure(self.mid(rid), f.reason);
                    self.record(rid, admit, false);
                    from = rid;
                    continue;
                }
            };
            let same = c.resp.status == 206
                && c.resp.etag == etag
                && c.resp.content_range_start == Some(r.first)
                && c.resp.framing() == Framing::Length(r.last - r.first + 1);
            c.resp.status = original_status;
            if !same {
                // 412 (ETag changed) or an unexpected answer: this replica cannot continue the body.
                self.release(rid, admit);
                log!(
                    Level::Warn,
                    "Replica cannot resume the body with the same ETag",
                    bucket = bucket_name,
                    replica = self.replica(rid).name,
                    request_id = c.req.request_id,
                );
                from = rid;
                continue;
            }
            self.record(rid, admit, true);
            self.core.metrics.borrow_mut().resume(self.mid(rid));
            let remaining = r.last - r.first + 1;
            match body::length(
                &mut conn.stream,
                &mut conn.buf,
                head_len,
                remaining,
                &mut c.stream,
                timeouts,
            )
            .await
            {
                Ok(p) => {
                    sent += p.sent;
                    if p.reusable && c.resp.keep_alive {
                        self.pool.put(rid, conn);
                    }
                    return (sent, true, Some(rid));
                }
                Err((PumpError::Client, n)) => return (sent + n, false, Some(rid)),
                Err((PumpError::Upstream(reason), n)) => {
                    sent += n;
                    self.core
                        .metrics
                        .borrow_mut()
                        .replica_failure(self.mid(rid), reason);
                    self.record(rid, Admit::Normal, false);
                    from = rid;
                }
            }
        }
        log!(
            Level::Error,
            "No replica could resume the body; closing client connection",
            bucket = bucket_name,
            request_id = c.req.request_id,
            sent = sent,
            expected = len,
        );
        (sent, false, None)
    }
}

fn connection_header(out: &mut Vec<u8>, keep: bool, http10: bool) {
    if !keep {
        head::header(out, "Connection", "close");
    } else if http10 {
        head::header(out, "Connection", "keep-alive");
    }
}

fn itoa(v: u64) -> String {
    v.to_string()
}

/// `/ready`: 503 when some bucket has no usable replica; lists every replica's state.
pub fn readiness(shared: &Shared) -> (bool, String) {
    let now = now_ms();
    let mut ready = true;
    let mut body = String::from("{\"buckets\":[");
    for (bi, b) in shared.config.buckets.iter().enumerate() {
        if bi > 0 {
            body.push(',');
        }
        let _ = write!(body, "{{\"name\":{:?},\"replicas\":[", b.name);
        let mut usable = false;
        for (n, &rid) in shared.bucket_replicas[bi].iter().enumerate() {
            let r = &shared.replicas[rid];
            let p = r.breaker.load();
            let ok = p.state != State::Open || now >= p.open_until;
            usable |= ok;
            if n > 0 {
                body.push(',');
            }
            let _ = write!(
                body,
                "{{\"name\":{:?},\"state\":\"{}\",\"usable\":{}}}",
                r.config.name,
                p.state.as_str(),
                ok
            );
        }
        let _ = write!(body, "],\"usable\":{usable}}}");
        ready &= usable;
    }
    let _ = write!(
        body,
        "],\"status\":\"{}\"}}",
        if ready { "ready" } else { "unavailable" }
    );
    (ready, body)
}
