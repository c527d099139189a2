//! Serving requests: per-core state ([`Core`], [`CoreGeneration`]) and
//! the request path as named phases, listed in order in `session.rs`, one
//! file each (read and log: `connection.rs`; route; access; lookup:
//! `cache.rs`; forward; respond: `relay.rs`, `resume.rs`).
//!
//! Every upstream request a client request causes (the first answer, a
//! resumed body, a cache slice) walks its plan of replicas with one
//! `upstream::cursor::ReplicaCursor` on this core's breakers
//! (`breakers.rs`): one blame rule (`upstream::blame`, documented in the
//! docs/behaviour.md, "What is a replica failure"), one half-open accounting.

use crate::config::{Layer, Level, Replica};
use crate::error::{Error, Source};
use crate::http::body::{self, Pumped, Timeouts};
use crate::http::head::{self, Forwarded, Framing, HeadError, Method, Request, Response};
use crate::http::io::{read_more, write_all, write_head_and, write_head_and_body, write_range};
use crate::log;
use crate::metrics::outcome::{
    AuthResult, CacheResult, Decision, Engine, Label as _, LimitScope, Lookup, RequestCaused,
};
use crate::metrics::CoreMetrics;
use crate::router::{self, RouteError};
use crate::s3::{self, Signer};
use crate::shared::{now_ms, Generation, Process};
use crate::upstream::client::{self as upclient, Cause};

mod access;
mod attempt;
mod authorize;
mod breakers;
use breakers::Cursor;
mod cache;
mod connection;
mod fill;
mod forward;
mod images;
mod limits;
pub mod lot;
pub mod park;
mod relay;
mod respond;
mod resume;
mod route;
mod session;
mod slices;
mod tiers;
mod traces;
mod waiter;
use crate::stream::{ClientStream, MaybeTls};
use crate::upstream::breaker::{Admit, Breaker, State};
use crate::upstream::pool::{Acquired, Pool, UpConn};
use crate::upstream::select::{Plan, Selector};
use monoio::net::TcpStream;
use std::cell::{Cell, RefCell};
use std::io;
use std::os::fd::RawFd;
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

/// Verified tokens remembered per worker.
const VERIFIED_TOKENS: usize = 4096;

struct LocalBreaker {
    breaker: Breaker,
    seen: u32,
}

/// A core's signer for one replica, and the credentials it was built from.
#[derive(Default)]
struct LocalSigner {
    /// `KeyCell::version` it was built from (0: none yet).
    version: u64,
    signer: Option<Signer>,
    expires: Option<SystemTime>,
}

/// One worker's view of one configuration [`Generation`] (owned by that
/// worker's thread, rebuilt on reload): breaker copies, replica selectors,
/// signers and the upstream connection pool.
pub struct CoreGeneration {
    /// The worker's index.
    pub id: usize,
    /// The configuration generation this state was built for.
    pub shared: Arc<Generation>,
    breakers: RefCell<Vec<LocalBreaker>>,
    selectors: RefCell<Vec<Selector>>,
    /// Per replica: the credentials version it was built from, and the signer.
    signers: RefCell<Vec<LocalSigner>>,
    /// This worker's upstream connections to this generation's replicas.
    pub pool: Pool,
    /// Per-core state that outlives generations.
    pub core: Rc<Core>,
    /// This worker's share of the rate limits.
    limits: RefCell<limits::Limiters>,
    /// Tokens this worker verified (whose claims held), until their `exp`:
    /// an ES256 verification costs ~50 us, a lookup well under one.
    /// Keyed by token; the value names the settings (by address, stable
    /// for the generation) that verified it.
    verified: RefCell<quick_cache::unsync::Cache<String, (usize, crate::access::jwt::Authorized)>>,
    /// The JWKS key set this worker uses, and its version.
    jwks: RefCell<crate::published::Local<crate::access::jwks::KeyMap>>,
    /// Policy decisions: remembered, in flight, breakers, Rego copies.
    authz: authorize::Authz,
    /// Connections to the buckets' decision services (by bucket index).
    authz_pool: Pool,
}

/// One worker thread's state that outlives configuration generations (owned
/// by that thread): metrics, buffers, pipes, the drain flag, and its
/// [`CoreGeneration`] for the current generation.
pub struct Core {
    /// The worker's index (its core and listener).
    pub id: usize,
    /// Process-wide state.
    pub process: Arc<Process>,
    current: RefCell<Option<Rc<CoreGeneration>>>,
    seen_epoch: Cell<u64>,
    /// This worker's metrics, published on scrape.
    pub metrics: RefCell<CoreMetrics>,
    rid_state: Cell<u64>,
    /// Set once shutdown began: answer with `Connection: close`.
    pub draining: Cell<bool>,
    /// Empty pipes kept for splicing bodies (relayed, or sent by reference).
    pipes: RefCell<Vec<crate::http::zerocopy::Pipe>>,
    /// How much pipe capacity this worker may still take.
    pipe_budget: crate::http::zerocopy::PipeBudget,
    /// Disk-tier entry files kept open between hits.
    pub open_entries: RefCell<crate::cache::open::OpenEntries<crate::cache::disk::Resident>>,
    /// Connections that gave memory back (parked, or moved to the lot)
    /// since the last memory trim (see `server::tick`).
    pub parked: Cell<usize>,
    /// Parked connections waiting for data, swept for idle timeouts.
    pub parking: park::Parking,
    /// Connections idle past a sweep, with no task (none when this worker
    /// could not make an epoll instance: they stay parked in their tasks).
    pub lot: Option<IdleLot>,
    /// This worker's share of `server.max_upstream_connections`, shared by
    /// the pools of every configuration generation.
    pub upstream_budget: Rc<crate::upstream::pool::Budget>,
    /// When (ms, process clock) this worker last logged running out of
    /// local resources (0: never).
    pub overload_logged: Cell<u64>,
    /// Request states of parked and closed connections, for the next to
    /// wake or open (at most [`KEPT_STATES`]).
    // Boxes, not values: a state moves between a connection and this pool
    // without being copied or reallocated.
    #[allow(clippy::vec_box)]
    states: RefCell<Vec<Box<RequestState>>>,
    /// Free client read buffers: reused across connections, so buffers freed
    /// by idle connections do not leave holes between live allocations.
    read_bufs: RefCell<Vec<Vec<u8>>>,
    /// `Date` header value for responses the proxy generates, and the
    /// second it was formatted for.
    date: RefCell<(u64, String)>,
    /// This core's connections to the Redis tier, when there is one.
    pub redis: Option<crate::cache::redis::Reader>,
    /// The cache key of the request being looked up (a buffer reused by
    /// every lookup: a hit allocates no key).
    pub key_scratch: RefCell<String>,
    /// Cache keys of memory hits whose disk-tier entries are to be marked
    /// used, at the next tick, under one lock.
    pub disk_touches: RefCell<Vec<String>>,
    /// Audit records (JSON lines) and their count since the last tick,
    /// handed to the audit writer at the next one.
    pub audit_batch: RefCell<(Vec<u8>, u64)>,
    /// When (ms) this core last said a fleet rate limit was unavailable.
    pub fleet_limit_warned: Cell<u64>,
    /// Trace and span ids, sampling draws.
    pub trace_ids: RefCell<crate::trace::Ids>,
    /// Finished traces since the last tick, handed to the exporter then.
    pub trace_batch: RefCell<Vec<crate::trace::Trace>>,
}

/// Empty pipes a worker keeps for splicing, two descriptors each (more are
/// made, and closed after use, while more splices run at once; a pipe that
/// cannot be made means a copy).
const KEPT_PIPES: usize = 64;

/// Request states a worker keeps for reuse: enough for the connections
/// that are busy at once; parked ones beyond it free theirs.
const KEPT_STATES: usize = 1024;

impl Core {
    /// A cleared request state (reused, or new).
    fn take_state(&self) -> Box<RequestState> {
        self.states.borrow_mut().pop().unwrap_or_default()
    }

    /// Hands a connection's request state back (its buffers released).
    fn give_state(&self, mut state: Box<RequestState>) {
        state.clear();
        let mut states = self.states.borrow_mut();
        if states.len() < KEPT_STATES {
            states.push(state);
        }
    }

    /// An empty pipe for splicing: a kept one, or a new one (fails when out
    /// of file descriptors or of the worker's pipe budget).
    fn take_pipe(&self) -> io::Result<crate::http::zerocopy::Pipe> {
        let kept = self.pipes.borrow_mut().pop();
        kept.map_or_else(|| self.pipe_budget.pipe(), Ok)
    }

    /// A pipe for a body `server.zero_copy` would splice or send by
    /// reference; none (the body is copied, and that is counted) when the
    /// worker's pipe budget is spent or descriptors ran out.
    fn pipe_for_splice(&self) -> Option<crate::http::zerocopy::Pipe> {
        let pipe = self.take_pipe().ok();
        if pipe.is_none() {
            self.metrics.borrow_mut().splice_fallbacks += 1;
        }
        pipe
    }

    /// Keeps an empty pipe for the next splice (at most [`KEPT_PIPES`]).
    fn keep_pipe(&self, pipe: crate::http::zerocopy::Pipe) {
        let mut pool = self.pipes.borrow_mut();
        if pool.len() < KEPT_PIPES {
            pool.push(pipe);
        }
    }

    /// State for worker `id`, before any generation is adopted.
    pub fn new(id: usize, process: Arc<Process>) -> Rc<Core> {
        let seed = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0)
            ^ ((id as u64 + 1) << 56);
        let redis = process.redis.as_ref().map(|r| {
            let workers = process.workers.len().max(1);
            crate::cache::redis::Reader::new(r.settings.max_connections.div_ceil(workers))
        });
        // Both budgets are this worker's share of a process-wide limit.
        let (upstream_budget, pipe_budget) = {
            let server = &process.current().config.server;
            let workers = server.workers.max(1);
            (
                crate::upstream::pool::Budget::new(
                    server.max_upstream_connections.div_ceil(workers),
                ),
                crate::http::zerocopy::PipeBudget::new(workers),
            )
        };
        Rc::new(Core {
            id,
            process,
            current: RefCell::new(None),
            seen_epoch: Cell::new(u64::MAX),
            metrics: RefCell::new(CoreMetrics::new(0)),
            rid_state: Cell::new(seed),
            draining: Cell::new(false),
            pipes: RefCell::new(Vec::new()),
            pipe_budget,
            open_entries: RefCell::default(),
            parked: Cell::new(0),
            parking: park::Parking::default(),
            lot: match IdleLot::new() {
                Ok(l) => Some(l),
                Err(e) => {
                    log!(
                        Level::Warn,
                        "No epoll instance for idle connections; they keep their tasks",
                        worker = id,
                        error = e
                    );
                    None
                }
            },
            upstream_budget,
            overload_logged: Cell::new(0),
            read_bufs: RefCell::new(Vec::new()),
            states: RefCell::new(Vec::new()),
            date: RefCell::new((0, String::new())),
            redis,
            key_scratch: RefCell::default(),
            disk_touches: RefCell::default(),
            audit_batch: RefCell::default(),
            fleet_limit_warned: Cell::new(0),
            trace_ids: RefCell::default(),
            trace_batch: RefCell::default(),
        })
    }

    /// Calls `f` with the current `Date` header value (RFC 9110 §6.6.1),
    /// formatted at most once a second.
    pub fn with_date<R>(&self, f: impl FnOnce(&str) -> R) -> R {
        let now = SystemTime::now();
        let secs = now
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let mut cached = self.date.borrow_mut();
        if cached.0 != secs || cached.1.is_empty() {
            *cached = (secs, httpdate::fmt_http_date(now));
        }
        f(&cached.1)
    }

    /// Appends a `Date` header line.
    pub fn date_header(&self, out: &mut Vec<u8>) {
        self.with_date(|d| head::header(out, "Date", d));
    }

    /// The worker for the current configuration generation; adopts a newly
    /// reloaded generation on first use (one relaxed load per request).
    pub fn current(self: &Rc<Self>) -> Rc<CoreGeneration> {
        let epoch = self.process.epoch();
        if epoch != self.seen_epoch.get() {
            let worker = Rc::new(CoreGeneration::new(self.clone(), self.process.current()));
            *self.current.borrow_mut() = Some(worker);
            self.seen_epoch.set(epoch);
        }
        match &*self.current.borrow() {
            Some(s) => s.clone(),
            None => Rc::new(CoreGeneration::new(self.clone(), self.process.current())),
        }
    }
}

/// One client connection: its socket, and its request state (in a box of
/// its own, handed back to the worker while the connection is parked, so
/// an idle connection's task holds only the socket).
struct Client {
    stream: ClientStream,
    /// The TCP socket under `stream`, to abort it with a reset.
    fd: RawFd,
    /// The socket peer's address.
    peer: std::net::IpAddr,
    s: Box<RequestState>,
}

/// A plain-TCP client connection in the lot: all an idle connection keeps.
/// The socket is held as a plain descriptor (a duplicate of the runtime's),
/// not as the runtime's stream: a stream's shared state is a small heap
/// allocation made when the connection was accepted, and one of those
/// living on amid each connection's freed serving memory kept those heap
/// pages resident (loadtest/idle.sh).
pub struct Idle {
    fd: std::os::fd::OwnedFd,
    peer: std::net::IpAddr,
}

impl std::os::fd::AsRawFd for Idle {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

/// This worker's lot and the descriptor its watcher waits on (see
/// `Core::watch_lot`).
pub struct IdleLot {
    lot: lot::Lot<Idle>,
    watch: monoio::net::unix::UnixDatagram,
}

impl IdleLot {
    /// Needs the worker's runtime: the watch descriptor is registered with
    /// its driver.
    fn new() -> io::Result<IdleLot> {
        let lot = lot::Lot::new()?;
        // The epoll instance is only polled for readiness through this
        // wrapper; no datagram operation is ever made on it.
        let std = std::os::unix::net::UnixDatagram::from(lot.watch_fd()?);
        let watch = monoio::net::unix::UnixDatagram::from_std(std)?;
        Ok(IdleLot { lot, watch })
    }
}

/// A client connection's per-request state and buffers.
#[derive(Default)]
struct RequestState {
    rbuf: Vec<u8>,
    wbuf: Vec<u8>,
    req: Request,
    /// Response heads not in use, kept for their buffers (an attempt takes
    /// one, its answer gives it back).
    responses: Vec<Response>,
    /// The request path, percent-decoded (its buffer, reused).
    decoded_path: String,
    /// The object key, URI-encoded for S3 (its buffer, reused).
    encoded_key: String,
    /// The upstream request target (its buffer, reused).
    upstream_target: String,
    /// The query forwarded upstream (`partNumber`, `versionId`), canonical.
    query: String,
    /// What the cache does for the current request.
    cache: cache::CacheUse,
    /// The cache fill this request leads (collapsed forwarding), by key.
    leading: Option<(String, Arc<crate::cache::collapse::SharedFill>)>,
    /// This request's fill holds the fleet's lease on its key for this
    /// long (`cache::redis::lease`): it publishes the object as it comes.
    fleet_hold: Option<Duration>,
    /// This request's fill publishes an object the memory tier does not
    /// hold: the entry written at its end ends the fleet's lease.
    fleet_published: std::cell::Cell<bool>,
    /// The authenticated token's `sub` claim (for the access log).
    subject: String,
    /// The authenticated token's claims (for a policy engine's input).
    claims: Option<Arc<serde_json::Value>>,
    /// The authenticated token (it stands for its claims in the policy
    /// decision cache's key).
    token: String,
    /// The policy decision (for the access log), when a policy applies.
    authz: Option<crate::metrics::outcome::Decision>,
    /// The policy's reason for its decision, when it gave one.
    authz_reason: String,
    /// What the access line says of the request beyond its status (as
    /// Envoy's response flags): the `X-Cache` it got, the replicas it
    /// moved past, whether its body was resumed, and the last failure.
    flags: Flags,
    /// An expired copy that may answer if no replica can (stale-if-error).
    stale: Option<Arc<crate::cache::store::Object>>,
    /// The bucket's upstream limit already paid for this request's next
    /// upstream request (see `limits`).
    upstream_prepaid: bool,
    /// A pre-warming fetch of this process (`crate::prewarm`): it passes
    /// the access and authorize phases.
    prewarm: bool,
    /// Why the access phases refused the request, if they did (for the
    /// audit log): `ip_filter`, a JWT result, `rate_limit`, `policy`.
    refusal: Option<&'static str>,
    /// The bucket the request was routed to, once it was.
    routed: Option<usize>,
    /// Its trace (`observability.tracing`): ids, and the spans closed.
    trace: crate::trace::Trace,
}

/// What the access line says of a request beyond its status.
#[derive(Default, Clone, Copy)]
struct Flags {
    /// The `X-Cache` value sent (empty: none).
    x_cache: &'static str,
    /// Times the request moved on to another replica (resumes included).
    failovers: u32,
    /// A body that broke was continued from another replica.
    resumed: bool,
    /// The last replica failure's cause label (empty: none).
    cause: &'static str,
}

/// How a request ended, for the access log and metrics.
struct Outcome {
    status: u16,
    bytes: u64,
    keep_alive: bool,
    /// The body was cut short: reset the connection (SO_LINGER 0) so the
    /// client sees an abort, never a clean end of a short body.
    abort: bool,
    /// The replica that answered, if any.
    replica: Option<usize>,
    /// The bucket, when no replica was involved (a cache hit).
    bucket: Option<usize>,
}

/// A replica's final response, classified as an answer: the connection it
/// came on (body bytes may follow the head in `conn.buf`) and its head.
struct Answer {
    rid: usize,
    conn: UpConn,
    head_len: usize,
    resp: Response,
}

/// One request on its way through the steps, once routed and planned.
struct RequestCtx<'a> {
    bucket: usize,
    /// The object key, URI-encoded for S3.
    key: &'a str,
    /// Replica ids in the order they are tried (the plan).
    order: &'a [usize],
}

impl Client {
    /// A response head to fill, with buffers from an earlier request.
    fn take_response(&mut self) -> Response {
        self.s.responses.pop().unwrap_or_default()
    }

    /// Returns a response head's buffers for the next attempt.
    fn give_response(&mut self, r: Response) {
        if self.s.responses.len() < 2 {
            self.s.responses.push(r);
        }
    }
}

impl CoreGeneration {
    /// Builds this worker's state for generation `shared`.
    pub fn new(core: Rc<Core>, shared: Arc<Generation>) -> CoreGeneration {
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
        let signers = RefCell::new(
            shared
                .replicas
                .iter()
                .map(|_| LocalSigner::default())
                .collect(),
        );
        CoreGeneration {
            limits: RefCell::new(limits::Limiters::new(&shared.config)),
            jwks: RefCell::default(),
            verified: RefCell::new(quick_cache::unsync::Cache::new(VERIFIED_TOKENS)),
            authz: authorize::Authz::default(),
            authz_pool: Pool::new(shared.config.buckets.len()),
            id: core.id,
            pool: Pool::with_budget(shared.replicas.len(), core.upstream_budget.clone()),
            breakers: RefCell::new(breakers),
            selectors: RefCell::new(selectors),
            signers,
            shared,
            core,
        }
    }

    /// Signs for `rid` with the keys published last: rebuilds this core's
    /// signer when their version moved (one atomic load otherwise). Fails
    /// when there are none yet or they have expired.
    fn sign(
        &self,
        rid: usize,
        method: &str,
        host: &str,
        target: &str,
        out: &mut Vec<u8>,
    ) -> Result<(), Error<Answer>> {
        let cell = &self.shared.replicas[rid].credentials;
        let mut signers = self.signers.borrow_mut();
        let local = &mut signers[rid];
        let version = cell.version();
        if local.version != version {
            if let Some(creds) = cell.current() {
                local.signer = Some(Signer::new(&creds, &self.replica(rid).region));
                local.expires = creds.expires;
            }
            local.version = version;
        }
        let now = SystemTime::now();
        let Some(signer) = &local.signer else {
            return Err(Error::upstream(
                Cause::Credentials,
                format!("no credentials yet from {}", cell.source.describe()),
            ));
        };
        if local.expires.is_some_and(|e| e <= now) {
            return Err(Error::upstream(
                Cause::Credentials,
                format!(
                    "credentials from {} expired and no refresh has replaced them",
                    cell.source.describe()
                ),
            ));
        }
        signer
            .sign_into(method, host, target, now, out)
            .map_err(|e| Error::upstream(Cause::Signing, e))
    }

    /// Stable metric id of a replica of this generation.
    fn mid(&self, rid: usize) -> usize {
        self.shared.replicas[rid].metric_id
    }

    fn replica(&self, rid: usize) -> &Replica {
        &self.shared.replicas[rid].config
    }
}

/// `v` in decimal, on the stack: a header's number costs no allocation.
fn itoa(v: u64) -> Digits {
    let mut buf = [0u8; 20];
    let start = buf.len() - head::decimal(v, &mut buf).len();
    Digits { buf, start }
}

/// A number's decimal digits (u64::MAX has 20).
struct Digits {
    buf: [u8; 20],
    start: usize,
}

impl Digits {
    fn as_str(&self) -> &str {
        // Only ASCII digits are ever written.
        std::str::from_utf8(&self.buf[self.start..]).unwrap_or("0")
    }
}

impl std::ops::Deref for Digits {
    type Target = str;
    fn deref(&self) -> &str {
        self.as_str()
    }
}

impl std::fmt::Display for Digits {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `/ready`: 503 when some bucket has no usable replica; lists every
/// replica's breaker state as JSON (serde_json: names are escaped properly).
pub fn readiness(shared: &Generation) -> (bool, String) {
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
                    let clock = SystemTime::now();
                    serde_json::json!({
                        "name": r.config.name,
                        "state": p.state.as_str(),
                        "usable": usable,
                        "credentials": {
                            "source": r.credentials.source.describe(),
                            "state": r.credentials.state(clock).label(),
                            "expires_in_seconds": r.credentials.expires_in(clock).map(|s| s.floor() as i64),
                        },
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

#[cfg(test)]
mod digits_tests {
    #[test]
    fn numbers_are_written_in_decimal_without_allocating() {
        for v in [0, 7, 10, 65_536, 1 << 40, u64::MAX] {
            assert_eq!(super::itoa(v).as_str(), v.to_string());
        }
    }
}
