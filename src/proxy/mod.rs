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
use crate::upstream::blame::{blame, Blame};
use crate::upstream::client::{self as upclient, Cause};

mod breakers;
mod connection;
mod relay;
use crate::upstream::breaker::{Admit, Breaker, State};
use crate::upstream::pool::{Pool, UpConn};
use crate::upstream::select::{Plan, Selector};
use crate::upstream::tls::{ClientStream, MaybeTls};
use monoio::net::TcpStream;
use std::cell::{Cell, RefCell};
use std::io;
use std::os::fd::RawFd;
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

/// Largest S3 error body read to classify a 403.
const ERROR_BODY_MAX: u64 = 8 * 1024;

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
    /// `Date` header value for responses the proxy generates, and the
    /// second it was formatted for.
    date: RefCell<(u64, String)>,
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
            date: RefCell::new((0, String::new())),
        })
    }

    /// Appends a `Date` header (RFC 9110 §6.6.1), formatted once a second.
    pub fn date_header(&self, out: &mut Vec<u8>) {
        let now = SystemTime::now();
        let secs = now
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let mut cached = self.date.borrow_mut();
        if cached.0 != secs || cached.1.is_empty() {
            *cached = (secs, httpdate::fmt_http_date(now));
        }
        head::header(out, "Date", &cached.1);
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
    /// The TCP socket under `stream`, to abort it with a reset.
    fd: RawFd,
    rbuf: Vec<u8>,
    wbuf: Vec<u8>,
    req: Request,
    resp: Response,
    path: String,
    upath: String,
    /// The upstream request path, reused.
    opath: String,
    /// The query forwarded upstream (`partNumber`, `versionId`), canonical.
    query: String,
}

/// How a request ended, for the access log and metrics.
struct Outcome {
    status: u16,
    bytes: u64,
    keep_alive: bool,
    /// The body was cut short: reset the connection (SO_LINGER 0) so the
    /// client sees an abort, never a clean end of a short body.
    abort: bool,
    replica: Option<usize>,
}

/// A replica's response head classified as an answer.
struct Answer {
    conn: UpConn,
    head_len: usize,
}

/// A failed attempt.
struct Failure {
    cause: Cause,
    detail: String,
    /// For a 403 auth failure: the response, relayed if no replica answers.
    captured: Option<Box<Answer>>,
}

impl Failure {
    fn new(cause: Cause, detail: impl Into<String>) -> Failure {
        Failure {
            cause,
            detail: detail.into(),
            captured: None,
        }
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

    // ---- one request ----

    async fn handle(&self, c: &mut Client) -> Outcome {
        if c.req.request_id.is_empty() {
            let mut id = std::mem::take(&mut c.req.request_id);
            self.next_request_id(&mut id);
            c.req.request_id = id;
        }
        if c.req.method() == Method::Other {
            // A read-only proxy: 405. A body it will not read means the
            // connection cannot carry another request.
            if c.req.has_body {
                c.req.keep_alive = false;
            }
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
        let outcome = match router::decode_path(&c.req.target, &mut path) {
            Err(e) => self.route_error(c, e).await,
            Ok(()) if path == "/health" => {
                self.simple_outcome(c, 200, "application/json", b"{\"status\":\"ok\"}", &[])
                    .await
            }
            Ok(()) if path == "/ready" => {
                let (ready, body) = readiness(&self.shared);
                let status = if ready { 200 } else { 503 };
                self.simple_outcome(c, status, "application/json", body.as_bytes(), &[])
                    .await
            }
            Ok(()) => self.route_and_proxy(c, &path).await,
        };
        c.path = path;
        outcome
    }

    /// Routes a decoded path to its bucket, checks the query, proxies.
    async fn route_and_proxy(&self, c: &mut Client, path: &str) -> Outcome {
        let (bucket, key) = match self.shared.router.route(path) {
            Ok(found) => found,
            Err(e) => return self.route_error(c, e).await,
        };
        c.query.clear();
        if let Err(e) = router::upstream_query(&c.req.target, &mut c.query) {
            return self.route_error(c, e).await;
        }
        let mut upath = std::mem::take(&mut c.upath);
        upath.clear();
        router::encode_key(key, &mut upath);
        let o = self.proxy(c, bucket, &upath).await;
        c.upath = upath;
        o
    }

    async fn route_error(&self, c: &mut Client, e: RouteError) -> Outcome {
        let (status, body) = match e {
            RouteError::BadPath(why) => (400, why.to_string()),
            RouteError::NoBucket => (404, "no bucket is configured for this path".into()),
            RouteError::NoKey => (404, "no object key in path".into()),
            RouteError::BadQuery(name) => (
                400,
                format!("query parameter '{name}' is not supported by this read-only proxy"),
            ),
        };
        self.simple_outcome(c, status, "text/plain", body.as_bytes(), &[])
            .await
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
        // Replicas that answered this request with a 5xx: judged once we know
        // whether any replica answered it (see upstream::blame).
        let mut answered_5xx: Vec<(usize, Admit, Cause)> = Vec::new();
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
            let result = self.attempt(c, rid, encoded_key, None).await;
            self.core
                .metrics
                .borrow_mut()
                .upstream(self.mid(rid), t0.elapsed().as_micros() as u64);
            match result {
                Ok(answer) => {
                    self.record_answer(rid, admit);
                    self.judge_5xx(&answered_5xx, true);
                    return self
                        .relay(c, rid, answer, &order[pos + 1..], bucket, encoded_key)
                        .await;
                }
                Err(f) => {
                    if f.cause.is_http_status() {
                        answered_5xx.push((rid, admit, f.cause));
                    } else {
                        self.record_failure(rid, admit, f.cause);
                    }
                    self.log_failover(c, bucket, rid, &order[pos + 1..], &f);
                    last = Some((rid, f));
                }
            }
        }
        self.judge_5xx(&answered_5xx, false);
        if !attempted {
            return self.all_open(c, bucket).await;
        }
        let (rid, failure) = match last {
            Some(l) => l,
            None => (ids[0], Failure::new(Cause::Io, "no attempt")),
        };
        let bucket_name = &self.shared.bucket(bucket).name;
        log!(
            Level::Error,
            "All replicas failed",
            bucket = bucket_name,
            request_id = c.req.request_id,
            last_replica = self.replica(rid).name,
            cause = format_args!("{}: {}", failure.cause.label(), failure.detail),
        );
        if let Some(captured) = failure.captured {
            // Every replica refused our credentials: S3's own 403 explains it best.
            return self
                .relay(c, rid, *captured, &[], bucket, encoded_key)
                .await;
        }
        let body = format!("bucket '{bucket_name}': all replicas failed\n");
        self.simple_outcome(c, 502, "text/plain", body.as_bytes(), &[])
            .await
    }

    /// Logs "Replica 'a' failed, trying 'b'" when a usable replica is left.
    fn log_failover(&self, c: &Client, bucket: usize, rid: usize, rest: &[usize], f: &Failure) {
        let Some(next) = rest.iter().copied().find(|&n| self.usable(n, now_ms())) else {
            return;
        };
        log!(
            Level::Warn,
            &format!(
                "Replica '{}' failed, trying '{}'",
                self.replica(rid).name,
                self.replica(next).name
            ),
            bucket = self.shared.bucket(bucket).name,
            request_id = c.req.request_id,
            cause = format_args!("{}: {}", f.cause.label(), f.detail),
        );
    }

    /// Every breaker of the bucket is open: 503 with `Retry-After`.
    async fn all_open(&self, c: &mut Client, bucket: usize) -> Outcome {
        let wait_ms = self.shared.bucket_replicas[bucket]
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
        let bucket_name = &self.shared.bucket(bucket).name;
        log!(
            Level::Error,
            "No replica available: every circuit breaker is open",
            bucket = bucket_name,
            request_id = c.req.request_id,
            retry_after = secs,
        );
        let body =
            format!("bucket '{bucket_name}': no replica available (all circuit breakers open)\n");
        self.simple_outcome(
            c,
            503,
            "text/plain",
            body.as_bytes(),
            &[("Retry-After", &secs)],
        )
        .await
    }

    /// Writes the upstream request head for `rid` into `c.wbuf`.
    fn build_request(
        &self,
        c: &mut Client,
        rid: usize,
        encoded_key: &str,
        resume: Option<Resume<'_>>,
    ) -> Result<(), Failure> {
        let replica = self.replica(rid);
        let method = if c.req.method() == Method::Head {
            "HEAD"
        } else {
            "GET"
        };
        let mut target = std::mem::take(&mut c.opath);
        replica.object_path(encoded_key, &mut target);
        if !c.query.is_empty() {
            target.push('?');
            target.push_str(&c.query);
        }
        c.wbuf.clear();
        c.wbuf.extend_from_slice(method.as_bytes());
        c.wbuf.push(b' ');
        c.wbuf.extend_from_slice(target.as_bytes());
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
        let signed = self.signers[rid].sign_into(
            method,
            &replica.endpoint.authority,
            &target,
            SystemTime::now(),
            &mut c.wbuf,
        );
        c.opath = target;
        c.wbuf.extend_from_slice(b"\r\n");
        signed.map_err(|e| Failure::new(Cause::Signing, e))
    }

    /// Sends one request to `rid` and reads its final response head into `c.resp`.
    async fn attempt(
        &self,
        c: &mut Client,
        rid: usize,
        encoded_key: &str,
        resume: Option<Resume<'_>>,
    ) -> Result<Answer, Failure> {
        let deadline = Instant::now() + self.replica(rid).timeout;
        self.build_request(c, rid, encoded_key, resume)?;
        let head_request = c.req.method() == Method::Head;
        let mut conn = match self.pool.take(rid) {
            Some(conn) => conn,
            None => self.connect(rid, deadline).await?,
        };
        let head_len =
            match upclient::exchange(&mut conn, &mut c.wbuf, head_request, deadline, &mut c.resp)
                .await
            {
                Ok(n) => n,
                Err(e) if conn.reused && !e.got_bytes => {
                    // A pooled connection the peer had closed: retry once on a fresh one.
                    log!(
                        Level::Debug,
                        "stale pooled connection, retrying",
                        replica = self.replica(rid).name,
                        cause = e.detail
                    );
                    self.build_request(c, rid, encoded_key, resume)?;
                    conn = self.connect(rid, deadline).await?;
                    upclient::exchange(&mut conn, &mut c.wbuf, head_request, deadline, &mut c.resp)
                        .await
                        .map_err(|e| Failure::new(e.cause, e.detail))?
                }
                Err(e) => return Err(Failure::new(e.cause, e.detail)),
            };
        let status = c.resp.status;
        if status >= 500 {
            return Err(Failure::new(
                Cause::Http(status),
                format!("HTTP {status} from upstream"),
            ));
        }
        if status == 403 {
            self.check_credentials(c, conn, head_len, deadline).await
        } else {
            Ok(Answer { conn, head_len })
        }
    }

    /// A 403 is an answer unless S3's error code says this replica refuses
    /// our credentials (`InvalidAccessKeyId`, `SignatureDoesNotMatch`).
    async fn check_credentials(
        &self,
        c: &Client,
        mut conn: UpConn,
        head_len: usize,
        deadline: Instant,
    ) -> Result<Answer, Failure> {
        let Framing::Length(len) = c.resp.framing() else {
            return Ok(Answer { conn, head_len });
        };
        if len > ERROR_BODY_MAX {
            return Ok(Answer { conn, head_len });
        }
        let want = head_len + len as usize;
        while conn.buf.len() < want {
            let left = deadline.saturating_duration_since(Instant::now());
            match read_more(&mut conn.stream, &mut conn.buf, left).await {
                Ok(0) => return Err(Failure::new(Cause::Truncated, "403 body cut short")),
                Ok(_) => {}
                Err(e) => return Err(Failure::new(Cause::of_io(&e), e.to_string())),
            }
        }
        match s3::error_code(&conn.buf[head_len..want]) {
            Some(code) if s3::is_broken_replica_code(code) => {
                let mut f = Failure::new(Cause::Auth, format!("HTTP 403 {code}"));
                f.captured = Some(Box::new(Answer { conn, head_len }));
                Err(f)
            }
            _ => Ok(Answer { conn, head_len }),
        }
    }

    async fn connect(&self, rid: usize, deadline: Instant) -> Result<UpConn, Failure> {
        let r = &self.shared.replicas[rid];
        let left = deadline.saturating_duration_since(Instant::now());
        self.pool
            .connect(rid, &r.config.endpoint, r.tls.as_ref(), left)
            .await
            .map_err(|(cause, detail)| Failure::new(cause, detail))
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

/// `/ready`: 503 when some bucket has no usable replica; lists every
/// replica's breaker state as JSON (serde_json: names are escaped properly).
pub fn readiness(shared: &Shared) -> (bool, String) {
    let now = now_ms();
    let mut ready = true;
    let buckets: Vec<serde_json::Value> = shared
        .config
        .buckets
        .iter()
        .enumerate()
        .map(|(bi, b)| {
            let replicas: Vec<serde_json::Value> = shared.bucket_replicas[bi]
                .iter()
                .map(|&rid| {
                    let r = &shared.replicas[rid];
                    let p = r.breaker.load();
                    let usable = p.state != State::Open || now >= p.open_until;
                    serde_json::json!({
                        "name": r.config.name,
                        "state": p.state.as_str(),
                        "usable": usable,
                    })
                })
                .collect();
            let usable = replicas.iter().any(|r| r["usable"] == true);
            ready &= usable;
            serde_json::json!({ "name": b.name, "replicas": replicas, "usable": usable })
        })
        .collect();
    let body = serde_json::json!({
        "buckets": buckets,
        "status": if ready { "ready" } else { "unavailable" },
    });
    (ready, body.to_string())
}
