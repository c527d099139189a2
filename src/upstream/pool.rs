//! Per-core keep-alive pool of upstream connections, one idle list per replica.
//!
//! Owned by one worker and used through `&self` with `RefCell`s: no locks. Idle
//! connections are reused newest first and dropped after `IDLE_TTL` (S3
//! endpoints close idle connections after a few seconds to a minute). Each
//! connection carries its own read buffer, so reusing a connection reuses the
//! buffer too: no allocation per request.
//!
//! Connections count against the worker's [`Budget`]
//! (`server.max_upstream_connections`, split across workers): a request that
//! needs a new connection beyond it first closes an idle one of any replica,
//! and when none is idle waits (bounded by the replica timeout) for one to
//! be returned or closed, so a flood of clients cannot exhaust the process's
//! file descriptors on upstream sockets.
//!
//! A connection is taken from the pool only if its socket holds no unread
//! input: bytes nobody asked for (a 304 with a body, more bytes than the
//! Content-Length said) or a close would otherwise be read as the *next*
//! request's response (RFC 9112 §9.3). The check is one non-blocking
//! `recv(MSG_PEEK)`.

use super::client::Cause;
use crate::config::Endpoint;
use crate::stream::{MaybeTls, UpStream};
use crate::tls;
use crate::tls::TlsConnector;
use monoio::net::TcpStream;
use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::io;
use std::net::{SocketAddr, ToSocketAddrs};
use std::os::fd::{AsRawFd, RawFd};
use std::rc::Rc;
use std::task::{Poll, Waker};
use std::time::{Duration, Instant};

/// Size of each upstream connection's read buffer (also the body copy
/// chunk): a 64 KiB body and its response head fit, so such a response can
/// be read in one receive and sent on in one write.
pub const CONN_BUF: usize = 68 * 1024;
/// Idle connections older than this are closed instead of reused.
pub const IDLE_TTL: Duration = Duration::from_secs(15);
/// Idle connections kept per replica per core.
pub const MAX_IDLE: usize = 64;
/// How long a resolved address is reused before resolving again.
const DNS_TTL: Duration = Duration::from_secs(30);

/// How many upstream connections one worker may hold open (idle or busy).
pub struct Budget {
    limit: usize,
    open: Cell<usize>,
    waiters: RefCell<Waiters>,
}

/// Requests waiting for a connection, first come first served. A waiter
/// that gives up (its deadline passed) leaves its place empty, so no wake-up
/// is spent on it.
#[derive(Default)]
struct Waiters {
    wakers: Vec<Option<Waker>>,
    free: Vec<usize>,
    queue: VecDeque<usize>,
}

impl Waiters {
    fn id(&mut self) -> usize {
        self.free.pop().unwrap_or_else(|| {
            self.wakers.push(None);
            self.wakers.len() - 1
        })
    }

    fn wait(&mut self, id: usize, waker: &Waker) {
        self.wakers[id] = Some(waker.clone());
        self.queue.push_back(id);
    }

    fn leave(&mut self, id: usize) {
        self.wakers[id] = None;
        self.free.push(id);
    }

    fn wake_one(&mut self) {
        while let Some(id) = self.queue.pop_front() {
            if let Some(w) = self.wakers[id].take() {
                w.wake();
                return;
            }
        }
    }
}

impl Budget {
    /// A budget of `limit` connections (`usize::MAX`: unlimited).
    pub fn new(limit: usize) -> Rc<Budget> {
        Rc::new(Budget {
            limit: limit.max(1),
            open: Cell::new(0),
            waiters: RefCell::new(Waiters::default()),
        })
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        self.open.get()
    }

    fn try_take(&self) -> bool {
        if self.open.get() < self.limit {
            self.open.set(self.open.get() + 1);
            true
        } else {
            false
        }
    }

    /// A connection closed (or was never made): a waiter may go on.
    fn release(&self) {
        self.open.set(self.open.get().saturating_sub(1));
        self.wake_one();
    }

    fn wake_one(&self) {
        self.waiters.borrow_mut().wake_one();
    }
}

/// A request's place among a budget's waiters, given up when dropped.
struct Place<'a>(&'a Budget, usize);

impl Drop for Place<'_> {
    fn drop(&mut self) {
        self.0.waiters.borrow_mut().leave(self.1);
    }
}

/// One connection's share of a [`Budget`], given back when dropped.
pub struct BudgetSlot(Option<Rc<Budget>>);

impl BudgetSlot {
    /// A slot outside any budget (the health prober, `--probe`).
    pub fn unbudgeted() -> BudgetSlot {
        BudgetSlot(None)
    }
}

impl Drop for BudgetSlot {
    fn drop(&mut self) {
        if let Some(b) = self.0.take() {
            b.release();
        }
    }
}

/// One upstream HTTP/1.1 connection.
pub struct UpConn {
    /// The stream (plain or TLS).
    pub stream: UpStream,
    /// Bytes read but not yet consumed live in `buf[..len]`.
    pub buf: Vec<u8>,
    /// Came from the pool (may have been closed by the peer meanwhile).
    pub reused: bool,
    idle_since: Instant,
    /// The TCP socket under the (possibly TLS) stream, for the idle check.
    fd: RawFd,
    /// Its share of the worker's upstream budget (freed when it closes).
    _slot: BudgetSlot,
}

/// True when an idle socket has input waiting (stray bytes or a close) or
/// an error: such a connection must not carry another request. One
/// `recv(MSG_PEEK | MSG_DONTWAIT)`; `benches/hot_path.rs` prices it.
pub fn has_pending_input(fd: RawFd) -> bool {
    let mut byte = [0u8; 1];
    // SAFETY: `fd` is the open socket owned by the connection being checked
    // (the caller holds the `UpConn`); the buffer is a valid 1-byte array and
    // MSG_PEEK | MSG_DONTWAIT neither consumes data nor blocks.
    let n = unsafe {
        libc::recv(
            fd,
            byte.as_mut_ptr().cast(),
            1,
            libc::MSG_PEEK | libc::MSG_DONTWAIT,
        )
    };
    if n < 0 {
        let e = io::Error::last_os_error();
        return !matches!(
            e.kind(),
            io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
        );
    }
    // n > 0: unread bytes; n == 0: the peer closed.
    true
}

/// Addresses of a name and the time they were looked up.
type Resolved = (Vec<SocketAddr>, Instant);

#[derive(Default)]
/// Per-core keep-alive pool and resolver cache, per replica.
pub struct Pool {
    idle: RefCell<Vec<Vec<UpConn>>>,
    /// Per replica: resolved addresses and when they were resolved.
    addrs: RefCell<Vec<Option<Resolved>>>,
    /// The worker's connection budget (`None`: unlimited).
    budget: Option<Rc<Budget>>,
}

/// What a request gets from [`Pool::acquire`].
pub enum Acquired {
    /// An idle connection to the replica, checked.
    Pooled(UpConn),
    /// Room to open a new one.
    New(BudgetSlot),
}

impl Pool {
    /// An empty pool for `replicas` replica ids, outside any budget.
    pub fn new(replicas: usize) -> Pool {
        Pool {
            idle: RefCell::new((0..replicas).map(|_| Vec::new()).collect()),
            addrs: RefCell::new(vec![None; replicas]),
            budget: None,
        }
    }

    /// An empty pool whose connections count against `budget`.
    pub fn with_budget(replicas: usize, budget: Rc<Budget>) -> Pool {
        Pool {
            budget: Some(budget),
            ..Pool::new(replicas)
        }
    }

    /// An idle connection to `replica`, or a slot to open one: beyond the
    /// budget, an idle connection of another replica is closed to make room,
    /// and with none idle the request waits until `deadline` for a
    /// connection to be returned or closed (`Err(())`: it waited in vain).
    /// `fresh`: never a pooled connection (a retry after a stale one).
    pub async fn acquire(
        &self,
        replica: usize,
        deadline: Instant,
        fresh: bool,
    ) -> Result<Acquired, ()> {
        let pooled = || if fresh { None } else { self.take(replica) };
        let Some(budget) = &self.budget else {
            return Ok(match pooled() {
                Some(c) => Acquired::Pooled(c),
                None => Acquired::New(BudgetSlot::unbudgeted()),
            });
        };
        if let Some(c) = pooled() {
            return Ok(Acquired::Pooled(c));
        }
        if budget.try_take() || (self.close_one_idle() && budget.try_take()) {
            return Ok(Acquired::New(BudgetSlot(Some(budget.clone()))));
        }
        let place = Place(budget, budget.waiters.borrow_mut().id());
        let wait = std::future::poll_fn(|cx| {
            if let Some(c) = pooled() {
                return Poll::Ready(Acquired::Pooled(c));
            }
            if budget.try_take() || (self.close_one_idle() && budget.try_take()) {
                return Poll::Ready(Acquired::New(BudgetSlot(Some(budget.clone()))));
            }
            budget.waiters.borrow_mut().wait(place.1, cx.waker());
            Poll::Pending
        });
        let left = deadline.saturating_duration_since(Instant::now());
        monoio::time::timeout(left, wait).await.map_err(|_| ())
    }

    /// Closes the idle connection unused longest, of any replica.
    fn close_one_idle(&self) -> bool {
        let mut idle = self.idle.borrow_mut();
        let oldest = idle
            .iter()
            .enumerate()
            .filter_map(|(r, list)| list.first().map(|c| (r, c.idle_since)))
            .min_by_key(|(_, since)| *since)
            .map(|(r, _)| r);
        match oldest {
            Some(r) => {
                drop(idle[r].remove(0));
                true
            }
            None => false,
        }
    }

    /// An idle connection to `replica`, if a fresh enough one exists.
    pub fn take(&self, replica: usize) -> Option<UpConn> {
        let mut idle = self.idle.borrow_mut();
        let list = idle.get_mut(replica)?;
        while let Some(mut c) = list.pop() {
            if c.idle_since.elapsed() < IDLE_TTL && !has_pending_input(c.fd) {
                c.reused = true;
                c.buf.clear();
                return Some(c);
            }
        }
        None
    }

    /// Returns a connection whose last response was fully read.
    pub fn put(&self, replica: usize, mut conn: UpConn) {
        let mut idle = self.idle.borrow_mut();
        if let Some(list) = idle.get_mut(replica) {
            if list.len() >= MAX_IDLE {
                list.remove(0);
            }
            conn.idle_since = Instant::now();
            list.push(conn);
        }
        drop(idle);
        // A waiter may take this connection, or close it to make room.
        if let Some(b) = &self.budget {
            b.wake_one();
        }
    }

    /// Drops every idle connection to `replica` (after it failed).
    pub fn clear(&self, replica: usize) {
        if let Some(list) = self.idle.borrow_mut().get_mut(replica) {
            list.clear();
        }
    }

    /// Opens a new connection (TCP, then TLS for `https://`) within `timeout`.
    /// Errors carry a failure reason (`connect`, `timeout`, `tls`) and detail.
    pub async fn connect(
        &self,
        replica: usize,
        endpoint: &Endpoint,
        tls: Option<&TlsConnector>,
        timeout: Duration,
        slot: BudgetSlot,
    ) -> Result<UpConn, (Cause, String)> {
        let deadline = Instant::now() + timeout;
        let addrs = self
            .resolve(replica, endpoint)
            .await
            .map_err(|e| (Cause::Connect, format!("resolve {}: {e}", endpoint.host)))?;
        let stream = connect_any(&addrs, endpoint, deadline).await?;
        let _ = stream.set_nodelay(true);
        let fd = stream.as_raw_fd();
        let stream = match (endpoint.tls, tls) {
            (false, _) => MaybeTls::Plain(stream),
            (true, None) => {
                return Err((
                    Cause::Tls,
                    format!("no TLS client for {}", endpoint.authority),
                ))
            }
            (true, Some(connector)) => MaybeTls::Tls(Box::new(
                handshake(connector, stream, endpoint, deadline).await?,
            )),
        };
        Ok(UpConn {
            stream,
            buf: Vec::with_capacity(CONN_BUF),
            reused: false,
            idle_since: Instant::now(),
            fd,
            _slot: slot,
        })
    }

    /// The endpoint's addresses, in the resolver's order. Literal addresses
    /// need no lookup; names are resolved on the process's blocking thread
    /// (never on a worker's core) and cached for [`DNS_TTL`] per core.
    async fn resolve(&self, replica: usize, endpoint: &Endpoint) -> io::Result<Vec<SocketAddr>> {
        let host = endpoint.host.trim_start_matches('[').trim_end_matches(']');
        if let Ok(ip) = host.parse::<std::net::IpAddr>() {
            return Ok(vec![SocketAddr::new(ip, endpoint.port)]);
        }
        if let Some(Some((addrs, at))) = self.addrs.borrow().get(replica) {
            if at.elapsed() < DNS_TTL {
                return Ok(addrs.clone());
            }
        }
        let (name, port) = (host.to_string(), endpoint.port);
        let addrs: Vec<SocketAddr> =
            monoio::spawn_blocking(move || (name.as_str(), port).to_socket_addrs())
                .await
                .map_err(|_| io::Error::other("resolver thread unavailable"))??
                .collect();
        if addrs.is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("{host}: no address"),
            ));
        }
        if let Some(slot) = self.addrs.borrow_mut().get_mut(replica) {
            *slot = Some((addrs.clone(), Instant::now()));
        }
        Ok(addrs)
    }
}

/// The proxy's own limits, not the replica's: out of file descriptors
/// (process or system), socket buffers or memory.
pub fn is_local_exhaustion(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EMFILE) | Some(libc::ENFILE) | Some(libc::ENOBUFS) | Some(libc::ENOMEM)
    )
}

/// Connects to each address in turn, within the one deadline.
async fn connect_any(
    addrs: &[SocketAddr],
    endpoint: &Endpoint,
    deadline: Instant,
) -> Result<TcpStream, (Cause, String)> {
    let mut last_error = String::new();
    for &addr in addrs {
        let left = deadline.saturating_duration_since(Instant::now());
        match monoio::time::timeout(left, TcpStream::connect_addr(addr)).await {
            Ok(Ok(s)) => return Ok(s),
            Ok(Err(e)) if is_local_exhaustion(&e) => {
                return Err((
                    Cause::LocalResources,
                    format!("connect to {}: {e}", endpoint.authority),
                ));
            }
            Ok(Err(e)) => {
                last_error = if addr.to_string() == endpoint.authority {
                    format!("connect to {addr}: {e}")
                } else {
                    format!("connect to {} ({addr}): {e}", endpoint.authority)
                }
            }
            Err(_) => {
                let detail = format!("connect to {} timed out", endpoint.authority);
                return Err((Cause::Timeout, detail));
            }
        }
    }
    Err((Cause::Connect, last_error))
}

/// The TLS handshake with an `https://` endpoint (SNI from its host).
async fn handshake(
    connector: &TlsConnector,
    stream: TcpStream,
    endpoint: &Endpoint,
    deadline: Instant,
) -> Result<crate::tls::ClientTls, (Cause, String)> {
    tls_handshake(
        connector,
        stream,
        &endpoint.host,
        &endpoint.authority,
        deadline,
    )
    .await
}

/// A TLS handshake by `deadline`, the certificate checked against `host`
/// (SNI too); errors name `authority` and what rustls found wrong. For
/// replicas, decision services and `rediss://` alike.
pub async fn tls_handshake(
    connector: &TlsConnector,
    stream: TcpStream,
    host: &str,
    authority: &str,
    deadline: Instant,
) -> Result<crate::tls::ClientTls, (Cause, String)> {
    let name = tls::server_name(host).map_err(|e| (Cause::Tls, e))?;
    let left = deadline.saturating_duration_since(Instant::now());
    match monoio::time::timeout(left, connector.connect(name, stream)).await {
        Ok(Ok(s)) => Ok(s),
        Ok(Err(e)) => Err((Cause::Tls, format!("TLS handshake with {authority}: {e}"))),
        Err(_) => Err((
            Cause::Timeout,
            format!("TLS handshake with {authority} timed out"),
        )),
    }
}
