//! One client connection: read request heads within limits, hand each request
//! to the current configuration generation, keep the connection alive, and
//! park it (no buffers held) when it goes idle.
//!
//! Limits: a request head must be complete within
//! `server.request_head_timeout_seconds` of its first byte (one deadline,
//! not one per read), an idle connection closes after
//! `server.idle_timeout_seconds`. A refused head is answered with
//! `Connection: close`, the write side is shut down and what the client still
//! sends is drained (bounded) before closing, so the client reads the error
//! instead of a reset (RFC 9112 §9.6). A body cut short is the opposite: the
//! connection is reset (SO_LINGER 0) so the client sees an abort.

use super::park::Woke;
use super::*;
use crate::reuse::ReusedBox;

/// Initial client read buffer (grows to the head limit when needed).
const CLIENT_BUF: usize = 4 * 1024;
/// A keep-alive connection idle this long gives its buffers back ("parks").
/// Busy connections never reach it; idle ones hold no buffer (see loadtest).
const PARK_AFTER: Duration = Duration::from_millis(100);
/// Free read buffers kept per core (enough for bursts of new or waking
/// connections; parked ones hold none).
const READ_BUF_POOL: usize = 64;
/// Most bytes drained from a client after an error response, and for how long.
const DRAIN_MAX_BYTES: usize = 256 * 1024;
const DRAIN_FOR: Duration = Duration::from_secs(2);
/// How long a TLS connection's close_notify may take to leave.
const CLOSE_NOTIFY_WAIT: Duration = Duration::from_millis(100);

/// Makes the next close of `fd` send a reset (RST) instead of a FIN.
fn reset_on_close(fd: RawFd) {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: `fd` is the client socket, still open (owned by the `Client`
    // being closed); the option value is a valid `linger` of the given size.
    unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&linger as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        );
    }
}

/// What reading a request head came to.
pub(super) enum Next {
    /// A complete head of this many bytes is buffered.
    Head(usize),
    /// Nothing for [`PARK_AFTER`] between requests: park (buffers given
    /// back) for at most this long. A new connection parks before its first
    /// read (`serve_client`).
    Park(Duration),
    /// The client closed or idled out before a head began.
    Closed,
}

impl RequestState {
    /// Releases every buffer (the connection is idle).
    pub(super) fn clear(&mut self) {
        *self = RequestState::default();
    }
}

impl CoreGeneration {
    pub(super) fn next_request_id(&self, out: &mut String) {
        // splitmix64: unique per worker and start time, cheap, no allocation.
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
        crate::s3::push_hex(out, &z.to_be_bytes());
    }

    // ---- connection loop ----

    /// Serves one client connection until it closes, errs or idles out (or
    /// moves to the lot, see [`Core::watch_lot`]).
    pub async fn serve(
        &self,
        stream: TcpStream,
        tls: Option<&crate::tls::TlsAcceptor>,
        peer: std::net::IpAddr,
    ) {
        let _ = stream.set_nodelay(true);
        let fd = std::os::fd::AsRawFd::as_raw_fd(&stream);
        let stream = match tls {
            None => MaybeTls::Plain(stream),
            Some(acceptor) => {
                let idle = self.shared.config.server.idle_timeout;
                match Box::pin(monoio::time::timeout(idle, acceptor.accept(stream))).await {
                    Ok(Ok(s)) => {
                        self.core.metrics.borrow_mut().tls_handshakes += 1;
                        MaybeTls::Tls(Box::new(s))
                    }
                    Ok(Err(e)) => {
                        log!(Level::Debug, "TLS handshake with client failed", error = e);
                        self.core.connection_closed();
                        return;
                    }
                    Err(_) => {
                        self.core.connection_closed();
                        return;
                    }
                }
            }
        };
        let c = Client {
            stream,
            fd,
            peer,
            // Buffers are allocated when the first bytes are readable (see
            // read_head).
            s: self.core.take_state(),
        };
        self.serve_client(c).await;
    }

    /// Serves a connection taken out of the lot (its socket is readable).
    async fn serve_from_lot(&self, idle: Idle) {
        // The runtime's stream again (on epoll: registered with its poller;
        // the descriptor kept its non-blocking mode, which it shares with
        // the one it was duplicated from).
        match TcpStream::from_std(std::net::TcpStream::from(idle.fd)) {
            Ok(tcp) => {
                let c = self.woken(MaybeTls::Plain(tcp), idle.peer);
                self.serve_client(c).await;
            }
            Err(e) => {
                log!(
                    Level::Warn,
                    "Idle connection could not be served again",
                    error = e
                );
                self.core.connection_closed();
            }
        }
    }

    /// A connection back from parking: a request state and a read buffer.
    fn woken(&self, stream: ClientStream, peer: std::net::IpAddr) -> Client {
        let fd = std::os::fd::AsRawFd::as_raw_fd(stream.tcp());
        let mut s = self.core.take_state();
        s.rbuf = self.take_read_buf();
        Client {
            stream,
            fd,
            peer,
            s,
        }
    }

    /// Serves `c`'s requests, parking it whenever it idles, until it closes
    /// (counted) or moves to the lot.
    async fn serve_client(&self, mut c: Client) {
        // A new plain connection has no buffer yet: it parks until its first
        // bytes before any serving state is made.
        let fresh = matches!(c.stream, MaybeTls::Plain(_)) && c.s.rbuf.capacity() == 0;
        let mut park_for = fresh.then_some(self.shared.config.server.idle_timeout);
        loop {
            if let Some(left) = park_for {
                self.core.parked.set(self.core.parked.get() + 1);
                match self.park(c, left).await {
                    Some(woken) => c = woken,
                    None => return,
                }
            }
            // Boxed: the serving state exists only while requests are served.
            park_for = Box::pin(self.connection(&mut c)).await;
            if park_for.is_none() {
                break;
            }
        }
        close_notify(&mut c.stream).await;
        self.give_read_buf(std::mem::take(&mut c.s.rbuf));
        self.core.give_state(c.s);
        self.core.connection_closed();
    }

    /// Parks `c` for at most `left`, its request state handed back to the
    /// worker: the task holds only the socket and a readiness wait. Returns
    /// the connection when it is readable; `None` when it closed (counted)
    /// or moved to the lot at a sweep (plain connections only).
    async fn park(&self, c: Client, left: Duration) -> Option<Client> {
        let Client {
            stream, peer, s, ..
        } = c;
        self.core.give_state(s);
        let deadline = now_ms().saturating_add(left.as_millis() as u64);
        // A TLS connection parks in its task (rustls's state cannot move
        // to the lot with the descriptor).
        let mut movable = self.core.lot.is_some() && matches!(stream, MaybeTls::Plain(_));
        loop {
            let slot = self.core.parking.park(deadline, movable);
            match super::park::until_readable(stream.tcp().readable(false), &slot).await {
                Woke::Readable => return Some(self.woken(stream, peer)),
                Woke::Waiting | Woke::Expired => {
                    let mut stream = stream;
                    close_notify(&mut stream).await;
                    self.core.connection_closed();
                    return None;
                }
                Woke::ToLot => {
                    let (Some(idle), MaybeTls::Plain(tcp)) = (&self.core.lot, &stream) else {
                        movable = false;
                        continue;
                    };
                    let fd = {
                        use std::os::fd::AsRawFd;
                        // SAFETY: `tcp` owns this open descriptor and
                        // outlives the borrow, which only duplicates it.
                        let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(tcp.as_raw_fd()) };
                        fd.try_clone_to_owned()
                    };
                    let outcome = match fd {
                        Ok(fd) => idle
                            .lot
                            .insert(Idle { fd, peer }, deadline)
                            .map_err(|(e, _duplicate)| e),
                        Err(e) => Err(e),
                    };
                    match outcome {
                        Ok(()) => {
                            // The lot holds the duplicate; the runtime's
                            // stream closes here. Its task's memory is freed
                            // now: counted for the next trim, as parking is.
                            drop(stream);
                            self.core.parked.set(self.core.parked.get() + 1);
                            return None;
                        }
                        Err(e) => {
                            // Kept in its task instead (e.g. max_user_watches,
                            // or no descriptor left to duplicate into).
                            log!(
                                Level::Debug,
                                "Idle connection not moved to the lot",
                                error = e
                            );
                            movable = false;
                        }
                    }
                }
            }
        }
    }

    /// Serves requests until the connection ends (`None`) or is to be
    /// parked for at most the time given (`Some`).
    pub(super) async fn connection(&self, c: &mut Client) -> Option<Duration> {
        let idle = self.shared.config.server.idle_timeout;
        loop {
            // This loop is boxed by `serve_client` (once per wake from
            // parking), so a parked connection holds none of it.
            let head_len = match self.read_head(c, idle).await {
                Ok(Next::Head(n)) => n,
                Ok(Next::Park(left)) => {
                    self.give_read_buf(std::mem::take(&mut c.s.rbuf));
                    return Some(left);
                }
                Ok(Next::Closed) => return None,
                Err(e) => {
                    Box::pin(self.reject(c, e)).await;
                    return None;
                }
            };
            let worker = &self.shared.process.workers[self.id];
            worker.in_flight.fetch_add(1, Ordering::Relaxed);
            let started = Instant::now();
            // Boxed, in a block the worker reuses (no allocation once it has
            // served a few): serving a request takes an 8.7 KiB state
            // machine, held only while it runs (a connection waiting up to
            // PARK_AFTER for its next request holds none of it; unboxed,
            // 10 000 clients that went idle together left 300 more bytes
            // each behind as heap fragments, for 4% less CPU per request).
            // The newest configuration generation serves this request; it
            // keeps its generation alive until it finishes, whatever reloads.
            let current = self.core.current();
            let outcome = ReusedBox::new(current.handle(c)).await;
            current.end_fill(c);
            worker.in_flight.fetch_sub(1, Ordering::Relaxed);
            current.finish(c, &outcome, started);
            current.trace_finish(c, &outcome);
            if outcome.abort {
                reset_on_close(c.fd);
                return None;
            }
            if c.s.req.has_body {
                // Answered without reading the body: close without losing the answer.
                Box::pin(self.drain_and_close(c)).await;
                return None;
            }
            // Keep any pipelined bytes that followed this head.
            c.s.rbuf.drain(..head_len.min(c.s.rbuf.len()));
            // What the response told the client decides: one that promised
            // keep-alive before draining began gets its next request read
            // and answered (with `Connection: close`), never a close it
            // could not expect.
            if !outcome.keep_alive {
                return None;
            }
        }
    }

    /// Answers a refused request head (400, 408, 414, 431) and closes.
    async fn reject(&self, c: &mut Client, e: HeadError) {
        let status = e.status();
        let msg = match e {
            HeadError::BadRequest(m) => m,
            HeadError::UriTooLong => "request line too long",
            HeadError::HeadersTooLarge => "request head too large",
            HeadError::TimedOut => "request head not received in time",
            HeadError::Partial => "incomplete request",
        };
        c.s.req.request_id.clear();
        self.next_request_id(&mut c.s.req.request_id);
        c.s.req.keep_alive = false;
        c.s.req.method = Some(Method::Other);
        let _ = Box::pin(self.simple(c, status, "text/plain", msg.as_bytes(), false, &[])).await;
        {
            let mut m = self.core.metrics.borrow_mut();
            m.request(None, Method::Other, status, 1, 0);
            if e == HeadError::TimedOut {
                m.head_timeouts += 1;
            }
        }
        log!(
            Level::Info,
            "bad request",
            status = status,
            reason = msg,
            request_id = c.s.req.request_id
        );
        self.drain_and_close(c).await;
    }

    /// Shuts down the write side (the response is out), reads and discards
    /// what the client still sends (at most [`DRAIN_MAX_BYTES`] for
    /// [`DRAIN_FOR`]), then lets the connection close.
    async fn drain_and_close(&self, c: &mut Client) {
        // SAFETY: `c.fd` is the client's open socket; SHUT_WR only ends our
        // sending direction (a FIN after the queued response).
        unsafe {
            libc::shutdown(c.fd, libc::SHUT_WR);
        }
        let deadline = Instant::now() + DRAIN_FOR;
        let mut drained = 0;
        if c.s.rbuf.capacity() == 0 {
            c.s.rbuf = self.take_read_buf();
        }
        while drained < DRAIN_MAX_BYTES {
            c.s.rbuf.clear();
            let left = deadline.saturating_duration_since(Instant::now());
            match read_more(&mut c.stream, &mut c.s.rbuf, left).await {
                Ok(0) | Err(_) => return,
                Ok(n) => drained += n,
            }
        }
    }

    pub(super) fn take_read_buf(&self) -> Vec<u8> {
        self.core
            .read_bufs
            .borrow_mut()
            .pop()
            .unwrap_or_else(|| Vec::with_capacity(CLIENT_BUF))
    }

    /// Keeps an empty standard-size read buffer for the next connection.
    pub(super) fn give_read_buf(&self, mut buf: Vec<u8>) {
        let mut pool = self.core.read_bufs.borrow_mut();
        if buf.capacity() == CLIENT_BUF && pool.len() < READ_BUF_POOL {
            buf.clear();
            pool.push(buf);
        }
    }

    /// Reads until a full request head is buffered. `Closed`: clean close
    /// or idle timeout before any byte of a head; `Park`: no byte for
    /// [`PARK_AFTER`] between requests (the caller parks the connection); a
    /// head started but not complete within `request_head_timeout_seconds`
    /// is `TimedOut`.
    pub(super) async fn read_head(
        &self,
        c: &mut Client,
        idle: Duration,
    ) -> Result<Next, HeadError> {
        let head_timeout = self.shared.config.server.request_head_timeout;
        // Set when the head's first byte is buffered: one deadline for the head.
        let mut deadline: Option<Instant> = None;
        loop {
            if !c.s.rbuf.is_empty() {
                match head::parse_request(&c.s.rbuf, &mut c.s.req) {
                    Ok(n) => return Ok(Next::Head(n)),
                    Err(HeadError::Partial) => {}
                    Err(e) => return Err(e),
                }
                deadline.get_or_insert_with(|| Instant::now() + head_timeout);
            }
            // Nothing of the client's held in TLS either (a read given up
            // with none held leaves the stream as it was: tls::stream).
            let parkable = match &c.stream {
                MaybeTls::Plain(_) => true,
                MaybeTls::Tls(tls) => !tls.holds_input(),
            };
            self.room_to_read(c)?;
            if parkable && c.s.rbuf.is_empty() && idle > PARK_AFTER {
                // Between requests: a normal read for a while, then park.
                match read_more(&mut c.stream, &mut c.s.rbuf, PARK_AFTER).await {
                    Ok(0) => return Ok(Next::Closed),
                    Ok(_) => continue,
                    Err(e) if e.kind() == io::ErrorKind::TimedOut => {
                        return Ok(Next::Park(idle.saturating_sub(PARK_AFTER)))
                    }
                    Err(_) => return Ok(Next::Closed),
                }
            }
            let left = match deadline {
                Some(d) => d.saturating_duration_since(Instant::now()),
                None => idle,
            };
            match read_more(&mut c.stream, &mut c.s.rbuf, left).await {
                Ok(0) => {
                    return if c.s.rbuf.is_empty() {
                        Ok(Next::Closed)
                    } else {
                        Err(HeadError::BadRequest("connection closed mid-head"))
                    };
                }
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::TimedOut && deadline.is_some() => {
                    return Err(HeadError::TimedOut)
                }
                Err(_) => return Ok(Next::Closed),
            }
        }
    }

    /// Makes room in the read buffer: grows it up to the head limit (431
    /// beyond); a TLS connection without one takes one at once (TLS may hold
    /// decrypted bytes already; plain connections get theirs when parking
    /// ends).
    fn room_to_read(&self, c: &mut Client) -> Result<(), HeadError> {
        if c.s.rbuf.capacity() == 0 {
            c.s.rbuf = self.take_read_buf();
        }
        if c.s.rbuf.len() == c.s.rbuf.capacity() {
            if c.s.rbuf.capacity() > head::MAX_REQUEST_HEAD {
                return Err(HeadError::HeadersTooLarge);
            }
            c.s.rbuf
                .reserve(head::MAX_REQUEST_HEAD + 1 - c.s.rbuf.len());
        }
        Ok(())
    }

    pub(super) fn finish(&self, c: &Client, o: &Outcome, started: Instant) {
        let micros = started.elapsed().as_micros() as u64;
        let bucket = o
            .bucket
            .or_else(|| o.replica.map(|r| self.shared.replicas[r].bucket));
        let bucket_metric = bucket.map(|b| self.shared.bucket_metric[b]);
        self.core.metrics.borrow_mut().request(
            bucket_metric,
            c.s.req.method(),
            o.status,
            micros,
            o.bytes,
        );
        if self.shared.process.audit.is_some() {
            self.audit(c, o, micros);
        }
        // The query's values never reach the log (signatures, tokens).
        let redacted;
        let target = if c.s.req.target.contains(&b'?') {
            let mut t = String::new();
            router::loggable_target(&c.s.req.target, &mut t);
            redacted = t;
            std::borrow::Cow::Borrowed(redacted.as_str())
        } else {
            String::from_utf8_lossy(&c.s.req.target)
        };
        let trace_id = match self.shared.config.tracing.is_some() {
            true => std::borrow::Cow::Owned(hex::encode(c.s.trace.trace_id)),
            false => std::borrow::Cow::Borrowed("-"),
        };
        log!(
            Level::Info,
            "request",
            method = c.s.req.method_text,
            path = target,
            status = o.status,
            bytes = o.bytes,
            duration_ms = format_args!("{:.3}", micros as f64 / 1000.0),
            bucket = bucket.map_or("-", |b| self.shared.bucket(b).name.as_str()),
            replica = o.replica.map_or("-", |r| self.replica(r).name.as_str()),
            request_id = c.s.req.request_id,
            sub = if c.s.subject.is_empty() {
                "-"
            } else {
                c.s.subject.as_str()
            },
            cache = if c.s.flags.x_cache.is_empty() {
                "-"
            } else {
                c.s.flags.x_cache
            },
            failovers = c.s.flags.failovers,
            resumed = c.s.flags.resumed,
            cause = if c.s.flags.cause.is_empty() {
                "-"
            } else {
                c.s.flags.cause
            },
            authz = c.s.authz.map_or("-", |d| d.label()),
            authz_reason = if c.s.authz_reason.is_empty() {
                "-"
            } else {
                c.s.authz_reason.as_str()
            },
            trace_id = trace_id,
            worker = self.id,
        );
    }

    /// Appends the request's audit record to this core's batch (handed to
    /// the audit writer at the next tick), when its level keeps it. Only
    /// requests routed to a bucket are access decisions.
    fn audit(&self, c: &Client, o: &Outcome, micros: u64) {
        let (Some(audit), Some(bucket)) = (&self.shared.process.audit, c.s.routed) else {
            return;
        };
        let decision = crate::audit::decision(o.status, c.s.refusal);
        if !crate::audit::keeps(audit.settings.level, decision, o.status) {
            return;
        }
        let b = self.shared.bucket(bucket);
        let key =
            c.s.decoded_path
                .strip_prefix(b.path_prefix.as_str())
                .unwrap_or(&c.s.decoded_path)
                .trim_start_matches('/');
        let client = self.client_ip(c).unwrap_or(c.peer).to_string();
        let now = crate::clock::now()
            .duration_since(std::time::SystemTime::UNIX_EPOCH)
            .unwrap_or_default();
        let mut timestamp = String::with_capacity(24);
        crate::log::timestamp(&mut timestamp, now.as_secs(), now.subsec_millis());
        let reason = match c.s.refusal {
            Some("policy") if !c.s.authz_reason.is_empty() => Some(c.s.authz_reason.as_str()),
            other => other,
        };
        let record = crate::audit::Record {
            timestamp: &timestamp,
            request_id: &c.s.req.request_id,
            client_ip: &client,
            sub: (!c.s.subject.is_empty()).then_some(c.s.subject.as_str()),
            bucket: &b.name,
            key,
            method: &c.s.req.method_text,
            decision,
            reason,
            status: o.status,
            bytes: o.bytes,
            duration_ms: micros as f64 / 1000.0,
            cache: (!c.s.flags.x_cache.is_empty()).then_some(c.s.flags.x_cache),
        };
        let mut batch = self.core.audit_batch.borrow_mut();
        if serde_json::to_writer(&mut batch.0, &record).is_ok() {
            batch.0.push(b'\n');
            batch.1 += 1;
        }
    }

    /// Sends a response generated by the proxy itself.
    pub(super) async fn simple(
        &self,
        c: &mut Client,
        status: u16,
        content_type: &str,
        body: &[u8],
        keep_alive: bool,
        extra: &[(&str, &str)],
    ) -> bool {
        let keep = keep_alive && c.s.req.keep_alive && !self.core.draining.get();
        let w = &mut c.s.wbuf;
        head::status_line(w, status);
        head::header(w, "Content-Type", content_type);
        head::header(w, "Content-Length", &itoa(body.len() as u64));
        for (name, value) in extra {
            head::header(w, name, value);
        }
        self.end_head(
            c,
            respond::HeadEnd {
                date: true,
                keep,
                ..Default::default()
            },
        );
        if c.s.req.method() != Method::Head {
            c.s.wbuf.extend_from_slice(body);
        }
        let ok = write_all(
            &mut c.stream,
            &mut c.s.wbuf,
            self.shared.config.server.idle_timeout,
        )
        .await
        .is_ok();
        ok && keep
    }

    pub(super) async fn simple_outcome(
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
            abort: false,
            replica: None,
            bucket: None,
        }
    }
}

impl Core {
    /// A connection of this worker ended (closed or idled out).
    pub fn connection_closed(&self) {
        self.process.workers[self.id]
            .open_connections
            .fetch_sub(1, Ordering::Relaxed);
    }

    /// The lot's watcher, one task per worker: gives each connection whose
    /// socket became readable (or hung up) a task again, served by the
    /// newest configuration generation.
    pub async fn watch_lot(self: Rc<Core>) {
        let Some(idle) = &self.lot else {
            return;
        };
        let mut woke = Vec::new();
        loop {
            if let Err(e) = idle.watch.readable(false).await {
                log!(
                    Level::Error,
                    "Idle connections cannot be watched; they close at their idle timeout",
                    worker = self.id,
                    error = e
                );
                return;
            }
            idle.lot.take_ready(&mut woke);
            for conn in woke.drain(..) {
                let generation = self.current();
                monoio::spawn(async move { generation.serve_from_lot(conn).await });
            }
        }
    }

    /// Closes the connections in the lot past their idle deadline (from the
    /// worker's tick, after a sweep).
    pub fn expire_lot(&self, now_ms: u64) {
        let Some(idle) = &self.lot else {
            return;
        };
        let mut expired = Vec::new();
        idle.lot.take_expired(now_ms, &mut expired);
        for conn in expired {
            drop(conn);
            self.connection_closed();
        }
        self.process.workers[self.id]
            .lot_connections
            .store(idle.lot.len(), Ordering::Relaxed);
    }
}

/// Ends a TLS connection with close_notify before the FIN: a client keeps
/// the session of a connection closed without it out of resumption
/// (OpenSSL takes the bare EOF for a truncation), so every reconnect after
/// `Connection: close` or an idle timeout paid a full handshake. Bounded: a
/// client that stopped reading costs no wait. Plain connections: nothing.
async fn close_notify(stream: &mut ClientStream) {
    if let MaybeTls::Tls(s) = stream {
        let close = monoio::io::AsyncWriteRent::shutdown(s.as_mut());
        let _ = monoio::time::timeout(CLOSE_NOTIFY_WAIT, close).await;
    }
}
