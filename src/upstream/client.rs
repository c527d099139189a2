//! The one HTTP/1.1 client both the proxy and the health prober use to talk
//! to a replica: write a signed request, read past every interim (1xx)
//! response to the final head, and say why an exchange failed with one
//! [`Cause`] (in `crate::error`) whose metric label is defined once.
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
pub use crate::error::Cause;
use crate::error::Error;
use crate::http::head::{self, Framing, Response};
use crate::http::io::{read_more, write_all};
use std::io;
use std::time::Instant;

/// Writes `request` (a complete head) and reads the final response head into
/// `resp`. Returns the final head's length in `conn.buf`.
pub async fn exchange(
    conn: &mut UpConn,
    request: &mut Vec<u8>,
    head_request: bool,
    deadline: Instant,
    resp: &mut Response,
) -> Result<usize, Error> {
    let left = deadline.saturating_duration_since(Instant::now());
    write_all(&mut conn.stream, request, left)
        .await
        .map_err(|e| Error::io(e, false))?;
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
) -> Result<usize, Error> {
    loop {
        if !conn.buf.is_empty() {
            match head::parse_response(&conn.buf, head_request, resp) {
                Ok(Some(n)) => match resp.status {
                    101 => return Err(Error::malformed("101 Switching Protocols from upstream")),
                    100..=199 => {
                        // Interim response (100 Continue, 103 Early Hints):
                        // read on to the final one.
                        conn.buf.drain(..n);
                        continue;
                    }
                    _ => return Ok(n),
                },
                Ok(None) => {}
                Err(msg) => return Err(Error::malformed(msg)),
            }
        }
        let left = deadline.saturating_duration_since(Instant::now());
        match read_more(&mut conn.stream, &mut conn.buf, left).await {
            Ok(0) => {
                return Err(Error::upstream(
                    Cause::Truncated,
                    "upstream closed before a full response head",
                )
                .after_bytes(!conn.buf.is_empty()))
            }
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::TimedOut => {
                return Err(Error::upstream(
                    Cause::Timeout,
                    "no response head within timeout_seconds",
                )
                .after_bytes(!conn.buf.is_empty()))
            }
            Err(e) if e.kind() == io::ErrorKind::OutOfMemory => {
                return Err(Error::malformed("response head too large"))
            }
            Err(e) => {
                let got = !conn.buf.is_empty();
                return Err(Error::io(e, got));
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
