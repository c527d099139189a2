//! The one HTTP/1.1 client both the proxy and the health prober use to talk
//! to a replica: write a signed request, read past every interim (1xx)
//! response to the final head, and say why an exchange failed with one
//! [`Cause`] whose metric label is defined once.
//!
//! What the client guarantees to its callers:
//! - the head it returns is a *final* response (status 200-599); `100` and
//!   `103` heads are read and dropped (RFC 9110 §15.2), a `101` is malformed
//!   (S3 never switches protocols for a GET), a status outside 100-599 too;
//! - `conn.buf[..head_len]` is that final head and `conn.buf[head_len..]` the
//!   first body bytes (interim heads are removed from the buffer);
//! - [`reusable`] decides whether a connection may go back to the pool after
//!   a response: only when the response was consumed exactly.

use super::pool::UpConn;
use crate::http::head::{self, Framing, Response};
use crate::http::io::{read_more, write_all};
use std::io;
use std::time::Instant;

/// Why an attempt at a replica failed. [`Cause::label`] is the
/// `reason` label of `yatagarasu_replica_failures_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cause {
    /// Connection refused, or the name did not resolve.
    Connect,
    /// No connection, head or body progress within the replica's timeout.
    Timeout,
    /// The replica reset or aborted the connection.
    Reset,
    /// TLS handshake or certificate failure.
    Tls,
    /// A response that is not valid HTTP/1.1 framing (bad status, bad
    /// Content-Length, unsupported transfer coding, 101, oversized head).
    Malformed,
    /// The connection ended before the head or the body was complete.
    Truncated,
    /// Any other socket error.
    Io,
    /// The replica answered with a 5xx status.
    Http(u16),
    /// No valid credentials for this replica: none fetched yet, expired, or
    /// a 403 whose S3 code says the replica refuses them.
    Credentials,
    /// The request could not be signed.
    Signing,
    /// The proxy itself ran out of file descriptors, socket buffers or
    /// memory while connecting: not the replica's failure, never counted
    /// against its breaker (a flood of clients must not open it).
    LocalResources,
    /// The bucket's upstream rate limit (`s3.rate_limit`, the S3 bill
    /// guard) had no token for this request in time: nothing was sent, and
    /// the replica's breaker is untouched.
    RateLimited,
}

impl Cause {
    /// The metric label; defined here once for every path (head, body, probe).
    pub fn label(self) -> &'static str {
        match self {
            Cause::Connect => "connect",
            Cause::Timeout => "timeout",
            Cause::Reset => "reset",
            Cause::Tls => "tls",
            Cause::Malformed => "malformed",
            Cause::Truncated => "truncated",
            Cause::Io => "io",
            Cause::Http(500) => "http_500",
            Cause::Http(502) => "http_502",
            Cause::Http(503) => "http_503",
            Cause::Http(504) => "http_504",
            Cause::Http(_) => "http_5xx",
            Cause::Credentials => "credentials",
            Cause::Signing => "signing",
            Cause::LocalResources => "local_resources",
            Cause::RateLimited => "rate_limited",
        }
    }

    /// The cause of a socket error.
    pub fn of_io(e: &io::Error) -> Cause {
        match e.kind() {
            io::ErrorKind::TimedOut => Cause::Timeout,
            io::ErrorKind::ConnectionRefused => Cause::Connect,
            io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::BrokenPipe => Cause::Reset,
            io::ErrorKind::UnexpectedEof => Cause::Truncated,
            io::ErrorKind::InvalidData => Cause::Malformed,
            _ => Cause::Io,
        }
    }

    /// A failure the request rather than the replica may have caused
    /// (an HTTP answer, as opposed to a transport or protocol failure).
    pub fn is_http_status(self) -> bool {
        matches!(self, Cause::Http(_))
    }

    /// A failure of the proxy's own making (its resources, its limits):
    /// it says nothing about the replica, whose breaker is never charged.
    pub fn is_local(self) -> bool {
        matches!(self, Cause::LocalResources | Cause::RateLimited)
    }
}

/// A failed exchange: its cause, a human-readable detail, and whether any
/// response byte had arrived (a pooled connection that fails before any
/// byte is retried once on a fresh connection).
#[derive(Debug)]
pub struct ExchangeError {
    /// Why the exchange failed.
    pub cause: Cause,
    /// What happened, for the log.
    pub detail: String,
    /// Some response bytes had arrived.
    pub got_bytes: bool,
}

impl ExchangeError {
    fn io(e: io::Error, got_bytes: bool) -> ExchangeError {
        ExchangeError {
            cause: Cause::of_io(&e),
            detail: e.to_string(),
            got_bytes,
        }
    }

    fn malformed(detail: impl Into<String>) -> ExchangeError {
        ExchangeError {
            cause: Cause::Malformed,
            detail: detail.into(),
            got_bytes: true,
        }
    }
}

/// Writes `request` (a complete head) and reads the final response head into
/// `resp`. Returns the final head's length in `conn.buf`.
pub async fn exchange(
    conn: &mut UpConn,
    request: &mut Vec<u8>,
    head_request: bool,
    deadline: Instant,
    resp: &mut Response,
) -> Result<usize, ExchangeError> {
    let left = deadline.saturating_duration_since(Instant::now());
    write_all(&mut conn.stream, request, left)
        .await
        .map_err(|e| ExchangeError::io(e, false))?;
    conn.buf.clear();
    read_final_head(conn, head_request, deadline, resp).await
}

/// Reads response heads until a final one; interim 100/103 heads are
/// dropped from the buffer, a 101 is malformed.
pub async fn read_final_head(
    conn: &mut UpConn,
    head_request: bool,
    deadline: Instant,
    resp: &mut Response,
) -> Result<usize, ExchangeError> {
    loop {
        if !conn.buf.is_empty() {
            match head::parse_response(&conn.buf, head_request, resp) {
                Ok(Some(n)) => match resp.status {
                    101 => {
                        return Err(ExchangeError::malformed(
                            "101 Switching Protocols from upstream",
                        ))
                    }
                    100..=199 => {
                        // Interim response (100 Continue, 103 Early Hints):
                        // read on to the final one.
                        conn.buf.drain(..n);
                        continue;
                    }
                    _ => return Ok(n),
                },
                Ok(None) => {}
                Err(msg) => return Err(ExchangeError::malformed(msg)),
            }
        }
        let left = deadline.saturating_duration_since(Instant::now());
        match read_more(&mut conn.stream, &mut conn.buf, left).await {
            Ok(0) => {
                return Err(ExchangeError {
                    cause: Cause::Truncated,
                    detail: "upstream closed before a full response head".into(),
                    got_bytes: !conn.buf.is_empty(),
                })
            }
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::TimedOut => {
                return Err(ExchangeError {
                    cause: Cause::Timeout,
                    detail: "no response head within timeout_seconds".into(),
                    got_bytes: !conn.buf.is_empty(),
                })
            }
            Err(e) if e.kind() == io::ErrorKind::OutOfMemory => {
                return Err(ExchangeError::malformed("response head too large"))
            }
            Err(e) => {
                let got = !conn.buf.is_empty();
                return Err(ExchangeError::io(e, got));
            }
        }
    }
}

/// Whether a connection may carry another request after a response whose
/// head was `head_len` bytes and whose body pump consumed it exactly
/// (`body_exact`). A bodiless response with bytes after it, a response that
/// asked to close, or a body that was not consumed exactly: close.
pub fn reusable(resp: &Response, conn: &UpConn, head_len: usize, body_exact: bool) -> bool {
    if !resp.keep_alive || !body_exact {
        return false;
    }
    match resp.framing() {
        Framing::None => conn.buf.len() == head_len,
        Framing::Close => false,
        Framing::Length(_) | Framing::Chunked => true,
    }
}

/// `GET <path>` on a plain-HTTP endpoint through this client, within
/// `timeout`: the final status, or why there is none. For `--probe`.
pub async fn get_status(
    endpoint: &crate::config::Endpoint,
    path: &str,
    timeout: std::time::Duration,
) -> Result<u16, String> {
    let deadline = Instant::now() + timeout;
    let pool = super::pool::Pool::new(1);
    let mut conn = pool
        .connect(
            0,
            endpoint,
            None,
            timeout,
            super::pool::BudgetSlot::unbudgeted(),
        )
        .await
        .map_err(|(cause, detail)| format!("{}: {detail}", cause.label()))?;
    let mut request = Vec::with_capacity(128);
    for part in ["GET ", path, " HTTP/1.1\r\n"] {
        request.extend_from_slice(part.as_bytes());
    }
    head::header(&mut request, "Host", &endpoint.authority);
    head::header(&mut request, "Connection", "close");
    request.extend_from_slice(b"\r\n");
    let mut resp = Response::default();
    exchange(&mut conn, &mut request, false, deadline, &mut resp)
        .await
        .map(|_| resp.status)
        .map_err(|e| format!("{}: {}", e.cause.label(), e.detail))
}
