//! One connection to Redis on the calling thread's monoio runtime: RESP2
//! frames (the `redis-protocol` crate's codec) over TCP, or TLS for
//! `rediss://` (rustls, the system's roots plus `cache.redis.ca_file`, the
//! certificate checked against the URL's host), each command bounded by a
//! deadline. Opening it sends `AUTH` and `SELECT` as configured; a
//! connection that failed once is dropped, never reused.

use crate::config::{RedisCache, RedisTls};
use crate::http::io::{read_more, write_all};
use crate::stream::{MaybeTls, UpStream};
use monoio::net::TcpStream;
use redis_protocol::resp2::decode::decode;
use redis_protocol::resp2::types::OwnedFrame;
use std::time::Duration;

/// Read buffer to start with; grows to the largest reply read.
const BUF: usize = 16 * 1024;
/// A read buffer grown past this shrinks back once its reply is taken
/// (a chunk of the default size, 1 MiB, and its framing fit).
const MAX_KEPT: usize = 1024 * 1024 + BUF;

/// An open, authenticated connection.
pub struct Conn {
    stream: UpStream,
    buf: Vec<u8>,
    out: Vec<u8>,
}

impl Conn {
    /// Connects to `redis_url`'s server (see [`Conn::open_at`]).
    pub async fn open(s: &RedisCache) -> Result<Conn, String> {
        Conn::open_at(s, &s.address).await
    }

    /// Connects to `address` (a node of a Cluster, or the one server)
    /// within `connection_timeout_ms`, then authenticates and selects the
    /// database within `operation_timeout_ms`.
    pub async fn open_at(s: &RedisCache, address: &str) -> Result<Conn, String> {
        let stream = connect(s, address).await?;
        let stream = match &s.tls {
            None => MaybeTls::Plain(stream),
            Some(tls) => MaybeTls::Tls(Box::new(handshake(tls, stream, s, address).await?)),
        };
        let mut conn = Conn::over(stream);
        if let Some(password) = &s.password {
            let reply = match &s.user {
                Some(user) => {
                    let args = [&b"AUTH"[..], user.as_bytes(), password.as_bytes()];
                    conn.call(&args, s.operation_timeout).await?
                }
                None => {
                    let args = [&b"AUTH"[..], password.as_bytes()];
                    conn.call(&args, s.operation_timeout).await?
                }
            };
            ok(reply).map_err(|e| format!("AUTH refused: {e}"))?;
        }
        if s.db != 0 {
            let db = s.db.to_string();
            let reply = conn
                .call(&[&b"SELECT"[..], db.as_bytes()], s.operation_timeout)
                .await?;
            ok(reply).map_err(|e| format!("SELECT {db} refused: {e}"))?;
        }
        Ok(conn)
    }

    /// Connects to a Sentinel at `address` within `connection_timeout_ms`:
    /// plain TCP, no `AUTH` or `SELECT` (a Sentinel has no database).
    pub async fn open_sentinel(s: &RedisCache, address: &str) -> Result<Conn, String> {
        Ok(Conn::over(MaybeTls::Plain(connect(s, address).await?)))
    }

    fn over(stream: UpStream) -> Conn {
        Conn {
            stream,
            buf: Vec::with_capacity(BUF),
            out: Vec::with_capacity(256),
        }
    }

    /// Sends one command and reads its reply within `timeout`. An error
    /// reply is `Ok(OwnedFrame::Error)`; `Err` means the connection is done.
    pub async fn call(&mut self, args: &[&[u8]], timeout: Duration) -> Result<OwnedFrame, String> {
        let mut replies = self.pipeline(&[args], timeout).await?;
        replies.pop().ok_or_else(|| "no reply".to_string())
    }

    /// Sends `commands` in one write and reads their replies, in order,
    /// within `timeout`.
    pub async fn pipeline(
        &mut self,
        commands: &[&[&[u8]]],
        timeout: Duration,
    ) -> Result<Vec<OwnedFrame>, String> {
        let deadline = std::time::Instant::now() + timeout;
        self.send(commands, timeout).await?;
        let mut replies = Vec::with_capacity(commands.len());
        while replies.len() < commands.len() {
            replies.push(self.read_frame(deadline).await?);
        }
        Ok(replies)
    }

    /// Writes `commands` without reading (a subscriber's PING, SUBSCRIBE).
    pub async fn send(&mut self, commands: &[&[&[u8]]], timeout: Duration) -> Result<(), String> {
        self.out.clear();
        for args in commands {
            self.out
                .extend_from_slice(format!("*{}\r\n", args.len()).as_bytes());
            for a in *args {
                self.out
                    .extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
                self.out.extend_from_slice(a);
                self.out.extend_from_slice(b"\r\n");
            }
        }
        write_all(&mut self.stream, &mut self.out, timeout)
            .await
            .map_err(|e| format!("write: {e}"))
    }

    /// The next frame Redis sends (a reply, or a subscriber's message),
    /// by `deadline`.
    pub async fn read_frame(&mut self, deadline: std::time::Instant) -> Result<OwnedFrame, String> {
        loop {
            // Decoded once whole: a partial reply is only scanned (decoding
            // it would copy what is in, again after every read).
            let scanned = scan(&self.buf, 0, 0);
            let decoded = match scanned {
                None => None,
                Some(Scan::Whole(_)) => Some(decode(&self.buf)),
                Some(Scan::Need(_)) => Some(Ok(None)),
            };
            match decoded {
                None => return Err("unreadable reply".into()),
                Some(Ok(Some((frame, used)))) => {
                    self.buf.drain(..used);
                    // A large value read once is not kept for the
                    // connection's life.
                    if self.buf.capacity() > MAX_KEPT && self.buf.len() <= BUF {
                        self.buf.shrink_to(BUF);
                    }
                    return Ok(frame);
                }
                Some(Ok(None)) => {}
                Some(Err(e)) => return Err(format!("unreadable reply: {e:?}")),
            }
            // A value's length is known from its header: room for all of
            // it at once, not grown (and copied) step by step.
            let want = match scanned {
                Some(Scan::Need(n)) => n,
                _ => 0,
            };
            if want > self.buf.capacity() {
                self.buf.reserve_exact(want - self.buf.len());
            } else if self.buf.len() == self.buf.capacity() {
                self.buf.reserve(self.buf.capacity().max(BUF));
            }
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match read_more(&mut self.stream, &mut self.buf, left).await {
                Ok(0) => return Err("connection closed".into()),
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::TimedOut => return Err(TIMED_OUT.into()),
                Err(e) => return Err(format!("read: {e}")),
            }
        }
    }
}

/// A TCP connection to `address` within `connection_timeout_ms`.
async fn connect(s: &RedisCache, address: &str) -> Result<TcpStream, String> {
    let stream = monoio::time::timeout(s.connect_timeout, TcpStream::connect(address))
        .await
        .map_err(|_| format!("connect to {address} timed out"))?
        .map_err(|e| format!("connect to {address}: {e}"))?;
    let _ = stream.set_nodelay(true);
    Ok(stream)
}

/// The TLS handshake of a `rediss://` connection, within
/// `connection_timeout_ms`. The client settings are built once per process
/// (the Redis settings cannot change on reload).
async fn handshake(
    tls: &RedisTls,
    stream: TcpStream,
    s: &RedisCache,
    address: &str,
) -> Result<crate::tls::ClientTls, String> {
    static CONNECTOR: std::sync::OnceLock<Result<crate::tls::TlsConnector, String>> =
        std::sync::OnceLock::new();
    let connector = CONNECTOR
        .get_or_init(|| crate::tls::connector(tls.ca_file.as_deref(), false))
        .as_ref()
        .map_err(|e| format!("TLS to Redis: {e}"))?;
    let deadline = std::time::Instant::now() + s.connect_timeout;
    crate::upstream::pool::tls_handshake(connector, stream, &tls.server_name, address, deadline)
        .await
        .map_err(|(_, e)| e)
}

/// How much of a RESP2 reply is in a buffer.
#[derive(Debug, PartialEq, Eq)]
enum Scan {
    /// The reply ends at this offset.
    Whole(usize),
    /// Incomplete: at least this many bytes are needed (as far as the
    /// headers in hand tell).
    Need(usize),
}

/// Walks the RESP2 reply at `buf[at..]` without copying anything (`depth`:
/// arrays within arrays); `None` when it is not RESP2.
fn scan(buf: &[u8], at: usize, depth: usize) -> Option<Scan> {
    if depth > 8 {
        return None;
    }
    let Some(&kind) = buf.get(at) else {
        return Some(Scan::Need(at + 1));
    };
    let Some(eol) = buf[at..].windows(2).position(|w| w == b"\r\n") else {
        return Some(Scan::Need(buf.len() + 1));
    };
    let line = std::str::from_utf8(&buf[at + 1..at + eol]).ok()?;
    let next = at + eol + 2;
    match kind {
        b'+' | b'-' | b':' => Some(Scan::Whole(next)),
        b'$' => {
            let n: i64 = line.parse().ok()?;
            if n < 0 {
                return Some(Scan::Whole(next));
            }
            let end = next + n as usize + 2;
            Some(if end <= buf.len() {
                Scan::Whole(end)
            } else {
                Scan::Need(end)
            })
        }
        b'*' => {
            let n: i64 = line.parse().ok()?;
            let mut at = next;
            for _ in 0..n.max(0) {
                match scan(buf, at, depth + 1)? {
                    Scan::Whole(end) => at = end,
                    need => return Some(need),
                }
            }
            Some(Scan::Whole(at))
        }
        _ => None,
    }
}

/// What [`Conn::read_frame`] says when nothing came by its deadline.
pub const TIMED_OUT: &str = "read timed out";

/// `+OK` or an error naming what Redis said.
pub fn ok(reply: OwnedFrame) -> Result<(), String> {
    match reply {
        OwnedFrame::SimpleString(_) => Ok(()),
        OwnedFrame::Error(e) => Err(e),
        other => Err(format!("unexpected reply {other:?}")),
    }
}

#[cfg(test)]
mod tests {
    use super::{scan, Scan};

    #[test]
    fn a_reply_is_scanned_for_its_end_or_the_bytes_it_still_needs() {
        assert_eq!(scan(b"$5\r\nhello\r\n", 0, 0), Some(Scan::Whole(11)));
        assert_eq!(scan(b"$65536\r\nxx", 0, 0), Some(Scan::Need(65536 + 10)));
        assert_eq!(
            scan(b"$655", 0, 0),
            Some(Scan::Need(5)),
            "header not in yet"
        );
        assert_eq!(scan(b"$-1\r\n", 0, 0), Some(Scan::Whole(5)), "null");
        assert_eq!(scan(b"+OK\r\n:1\r\n", 0, 0), Some(Scan::Whole(5)));
        let mget = b"*3\r\n$2\r\nab\r\n$-1\r\n$4\r\ncd";
        assert_eq!(scan(mget, 0, 0), Some(Scan::Need(mget.len() + 4)));
        let whole = b"*3\r\n$2\r\nab\r\n$-1\r\n$4\r\ncdef\r\n";
        assert_eq!(scan(whole, 0, 0), Some(Scan::Whole(whole.len())));
        assert_eq!(scan(b"*2\r\n*1\r\n:1\r\n", 0, 0), Some(Scan::Need(13)));
        assert_eq!(scan(b"", 0, 0), Some(Scan::Need(1)));
        assert_eq!(scan(b"?x\r\n", 0, 0), None);
        assert_eq!(scan(b"$x\r\n", 0, 0), None);
    }
}
