//! One connection to Redis on the calling thread's monoio runtime: RESP2
//! frames (the `redis-protocol` crate's codec) over TCP, or TLS for
//! `rediss://` (rustls, the system's roots plus `cache.redis.ca_file`, the
//! certificate checked against the URL's host), each command bounded by a
//! deadline. Opening it sends `AUTH` and `SELECT` as configured; a
//! connection that failed once is dropped, never reused.

use super::values;
use crate::config::{RedisCache, RedisTls};
use crate::http::io::{read_more, write_all};
use crate::stream::{MaybeTls, UpStream};
use monoio::buf::IoBufMut;
use monoio::io::AsyncReadRent;
use monoio::net::TcpStream;
use redis_protocol::resp2::decode::decode;
use redis_protocol::resp2::types::OwnedFrame;
use std::time::{Duration, Instant};

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
        let deadline = Instant::now() + timeout;
        self.send(commands, timeout).await?;
        let mut replies = Vec::with_capacity(commands.len());
        for args in commands {
            let reply = match args.first() {
                Some(&name) if [&b"GET"[..], b"MGET", b"GETRANGE"].contains(&name) => {
                    self.read_values(deadline).await?
                }
                _ => self.read_frame(deadline).await?,
            };
            replies.push(reply);
        }
        Ok(replies)
    }

    /// Writes `commands` without reading (a subscriber's PING, SUBSCRIBE).
    pub async fn send(&mut self, commands: &[&[&[u8]]], timeout: Duration) -> Result<(), String> {
        use std::io::Write as _;
        self.out.clear();
        // Writing into a Vec cannot fail.
        for args in commands {
            let _ = write!(self.out, "*{}\r\n", args.len());
            for a in *args {
                let _ = write!(self.out, "${}\r\n", a.len());
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
    pub async fn read_frame(&mut self, deadline: Instant) -> Result<OwnedFrame, String> {
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
            self.fill(&mut 0, want.max(self.buf.len() + 1), deadline)
                .await?;
        }
    }

    /// The reply to a `GET`, `GETRANGE` or `MGET`: a value or null, an
    /// array of them, or an error. A value of [`values::POOLED_MIN`] bytes or more
    /// is read straight off the socket into a buffer of its own
    /// ([`values::take`]); smaller ones are copied out of the read buffer.
    async fn read_values(&mut self, deadline: Instant) -> Result<OwnedFrame, String> {
        let mut at = 0;
        let reply = match self.header(&mut at, deadline).await? {
            Header::Value(n) => self.value(&mut at, n, deadline).await?,
            Header::Array(None) => OwnedFrame::Null,
            Header::Array(Some(n)) => {
                let mut items = Vec::with_capacity(n.min(1024));
                for _ in 0..n {
                    match self.header(&mut at, deadline).await? {
                        Header::Value(v) => items.push(self.value(&mut at, v, deadline).await?),
                        _ => {
                            return Err("unreadable reply: not a value in an array of values".into())
                        }
                    }
                }
                OwnedFrame::Array(items)
            }
            Header::Error(e) => OwnedFrame::Error(e),
        };
        self.buf.drain(..at);
        Ok(reply)
    }

    /// The header line at `buf[*at..]`, read in if need be; `*at` moves
    /// past it.
    async fn header(&mut self, at: &mut usize, deadline: Instant) -> Result<Header, String> {
        loop {
            let rest = &self.buf[*at..];
            if let Some(eol) = rest.windows(2).position(|w| w == b"\r\n") {
                let header = Header::parse(rest[0], &rest[1..eol])?;
                *at += eol + 2;
                return Ok(header);
            }
            if rest.len() > MAX_HEADER {
                return Err("unreadable reply: header line too long".into());
            }
            let more = rest.len() + 1;
            self.fill(at, more, deadline).await?;
        }
    }

    /// A value of `n` bytes (`None`: null) at `buf[*at..]`, its body read
    /// in as need be; `*at` moves past it.
    async fn value(
        &mut self,
        at: &mut usize,
        n: Option<usize>,
        deadline: Instant,
    ) -> Result<OwnedFrame, String> {
        let Some(n) = n else {
            return Ok(OwnedFrame::Null);
        };
        if n > MAX_VALUE {
            return Err(format!("unreadable reply: a value of {n} bytes announced"));
        }
        let framed = n + 2;
        let mut v;
        if n < values::POOLED_MIN {
            self.fill(at, framed, deadline).await?;
            v = self.buf[*at..*at + framed].to_vec();
            *at += framed;
        } else {
            // What is already in, copied; the rest read straight in, no
            // further than the value's end (what follows is the next
            // reply's).
            // Room for what has come, not for all a header says: a value
            // beyond `AHEAD` grows as it arrives.
            v = values::take(framed.min(AHEAD));
            let have = (self.buf.len() - *at).min(framed);
            v.extend_from_slice(&self.buf[*at..*at + have]);
            *at += have;
            while v.len() < framed {
                if v.len() == v.capacity() {
                    v.reserve((framed - v.len()).min(v.capacity()));
                }
                let left = deadline.saturating_duration_since(Instant::now());
                let (len, end) = (v.len(), framed.min(v.capacity()));
                let read = monoio::time::timeout(left, self.stream.read(v.slice_mut(len..end)));
                match read.await {
                    Ok((Ok(0), _)) => return Err("connection closed".into()),
                    Ok((Ok(_), slice)) => v = slice.into_inner(),
                    Ok((Err(e), _)) => return Err(format!("read: {e}")),
                    Err(_) => return Err(TIMED_OUT.into()),
                }
            }
        }
        if !v.ends_with(b"\r\n") {
            return Err("unreadable reply: a value not followed by CRLF".into());
        }
        v.truncate(n);
        Ok(OwnedFrame::BulkString(v))
    }

    /// Reads until `buf[*at..]` holds at least `want` bytes (moving what is
    /// unread to the front first when the buffer lacks room; room for all
    /// of them made at once, not grown and copied step by step). More than
    /// Redis ever sends is an error, not an allocation.
    async fn fill(&mut self, at: &mut usize, want: usize, deadline: Instant) -> Result<(), String> {
        if want > MAX_VALUE + BUF {
            return Err(format!("unreadable reply: {want} bytes announced"));
        }
        while self.buf.len() - *at < want {
            if *at > 0 && *at + want > self.buf.capacity() {
                self.buf.drain(..*at);
                *at = 0;
            }
            if want > self.buf.capacity() - *at {
                self.buf.reserve_exact(*at + want - self.buf.len());
            } else if self.buf.len() == self.buf.capacity() {
                self.buf.reserve(BUF);
            }
            self.read_some(deadline).await?;
        }
        Ok(())
    }

    /// Reads what has come into the spare room of the read buffer, by
    /// `deadline`.
    async fn read_some(&mut self, deadline: Instant) -> Result<(), String> {
        let left = deadline.saturating_duration_since(Instant::now());
        match read_more(&mut self.stream, &mut self.buf, left).await {
            Ok(0) => Err("connection closed".into()),
            Ok(_) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => Err(TIMED_OUT.into()),
            Err(e) => Err(format!("read: {e}")),
        }
    }
}

/// The longest value Redis sends (its `proto-max-bulk-len` default): a
/// header announcing more is not believed.
const MAX_VALUE: usize = 512 << 20;
/// A value's buffer is made this large at most before its bytes come.
const AHEAD: usize = 4 << 20;

/// The longest header line a reply to `GET` or `MGET` may have.
const MAX_HEADER: usize = 4096;

/// The header line of a reply to `GET` or `MGET`, or of one of its values.
#[derive(Debug, PartialEq, Eq)]
enum Header {
    /// A value of this many bytes; `None`: null.
    Value(Option<usize>),
    /// An array of this many values; `None`: null.
    Array(Option<usize>),
    Error(String),
}

impl Header {
    /// The header of type `kind` whose text (CRLF excluded) is `line`.
    fn parse(kind: u8, line: &[u8]) -> Result<Header, String> {
        let count = || -> Result<Option<usize>, String> {
            let n: i64 = std::str::from_utf8(line)
                .ok()
                .and_then(|l| l.parse().ok())
                .ok_or("unreadable reply: a length that is not a number")?;
            Ok(usize::try_from(n).ok())
        };
        match kind {
            b'$' => Ok(Header::Value(count()?)),
            b'*' => Ok(Header::Array(count()?)),
            b'-' => Ok(Header::Error(String::from_utf8_lossy(line).into_owned())),
            other => Err(format!(
                "unreadable reply: {:?} where a value was expected",
                other as char
            )),
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
    let deadline = Instant::now() + s.connect_timeout;
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
            let end = next.checked_add(usize::try_from(n).ok()?)?.checked_add(2)?;
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
    use super::{scan, Conn, Scan};
    use crate::stream::MaybeTls;
    use crate::testing::{loopback_pair, run, xorshift};
    use monoio::io::{AsyncReadRent, AsyncWriteRent, AsyncWriteRentExt};
    use redis_protocol::resp2::types::OwnedFrame;
    use std::time::Duration;

    /// Plays `reply` to `commands` sent on a new connection, in pieces of
    /// random sizes (a few bytes to a few KiB) with pauses between some, so
    /// that headers and values arrive split anywhere; then the end of the
    /// stream.
    fn replies(commands: &[&[&[u8]]], reply: Vec<u8>) -> Result<Vec<OwnedFrame>, String> {
        run(async move {
            let (ours, mut theirs) = loopback_pair().await;
            let _ = theirs.set_nodelay(true);
            let server = monoio::spawn(async move {
                let mut next = xorshift(0x9e37_79b9_7f4a_7c15);
                let mut at = 0;
                while at < reply.len() {
                    let n = (next() % 3000 + 1) as usize;
                    let piece = reply[at..(at + n).min(reply.len())].to_vec();
                    at += piece.len();
                    if theirs.write_all(piece).await.0.is_err() {
                        return;
                    }
                    if next().is_multiple_of(4) {
                        monoio::time::sleep(Duration::from_millis(1)).await;
                    }
                }
                // The end of the reply (a cut one ends here), then held
                // open until the client has read and closed.
                let _ = theirs.shutdown().await;
                let mut buf = vec![0u8; 4096];
                loop {
                    match theirs.read(buf).await {
                        (Ok(n), b) if n > 0 => buf = b,
                        _ => return,
                    }
                }
            });
            let mut conn = Conn::over(MaybeTls::Plain(ours));
            let got = conn.pipeline(commands, Duration::from_secs(20)).await;
            drop(conn);
            server.await;
            got
        })
    }

    fn value(n: usize, seed: u64) -> Vec<u8> {
        let mut next = xorshift(seed);
        (0..n).map(|_| next() as u8).collect()
    }

    fn bulk(v: &[u8]) -> Vec<u8> {
        let mut out = format!("${}\r\n", v.len()).into_bytes();
        out.extend_from_slice(v);
        out.extend_from_slice(b"\r\n");
        out
    }

    #[test]
    fn values_arrive_whole_however_the_reply_is_split_and_the_next_reply_is_left_alone() {
        let (big, mid) = (value(100_000, 1), value(40_000, 2));
        let mut reply = bulk(b"hello");
        reply.extend_from_slice(b"$-1\r\n:1\r\n*4\r\n");
        reply.extend(bulk(b"abc"));
        reply.extend_from_slice(b"$-1\r\n");
        reply.extend(bulk(&big));
        reply.extend(bulk(b""));
        reply.extend_from_slice(b"-MOVED 123 127.0.0.1:7000\r\n");
        reply.extend(bulk(&mid));
        reply.extend_from_slice(b"+PONG\r\n");
        let commands: [&[&[u8]]; 7] = [
            &[b"GET", b"a"],
            &[b"GET", b"b"],
            &[b"EXISTS", b"k"],
            &[b"MGET", b"w", b"x", b"y", b"z"],
            &[b"GET", b"c"],
            &[b"GET", b"mid"],
            &[b"PING"],
        ];
        let got = replies(&commands, reply).expect("every reply read");
        let bs = |v: &[u8]| OwnedFrame::BulkString(v.to_vec());
        assert_eq!(
            got,
            vec![
                bs(b"hello"),
                OwnedFrame::Null,
                OwnedFrame::Integer(1),
                OwnedFrame::Array(vec![bs(b"abc"), OwnedFrame::Null, bs(&big), bs(b"")]),
                OwnedFrame::Error("MOVED 123 127.0.0.1:7000".into()),
                bs(&mid),
                OwnedFrame::SimpleString(b"PONG".to_vec()),
            ]
        );
    }

    #[test]
    fn a_value_longer_than_its_first_buffer_grows_as_it_arrives() {
        let big = value(5 << 20, 3);
        let mut reply = bulk(&big);
        reply.extend_from_slice(b":7\r\n");
        let commands: [&[&[u8]]; 2] = [&[b"GET", b"big"], &[b"EXISTS", b"k"]];
        let got = replies(&commands, reply).expect("read");
        assert_eq!(
            got,
            vec![OwnedFrame::BulkString(big), OwnedFrame::Integer(7)]
        );
    }

    #[test]
    fn a_malformed_or_cut_reply_to_a_get_is_an_error_naming_it() {
        let get: [&[&[u8]]; 1] = [&[b"GET", b"k"]];
        let cases: [(&[u8], &str); 8] = [
            (b"$abc\r\n", "not a number"),
            (b"$5\r\nhelloXX", "not followed by CRLF"),
            (b":1\r\n", "where a value was expected"),
            (b"*2\r\n*1\r\n$1\r\na\r\n", "not a value in an array"),
            (b"$5\r\nhel", "connection closed"),
            (b"$70000\r\nabc", "connection closed"),
            (b"$99999999999999\r\nabc", "bytes announced"),
            (b"*1\r\n$536870913\r\nabc", "bytes announced"),
        ];
        for (reply, says) in cases {
            let err = replies(&get, reply.to_vec()).expect_err("not a value");
            assert!(err.contains(says), "{reply:?}: {err}");
        }
        let ping: [&[&[u8]]; 1] = [&[b"PING"]];
        let err = replies(&ping, b"$99999999999999\r\nabc".to_vec()).expect_err("too long");
        assert!(err.contains("bytes announced"), "{err}");
        let long = vec![b'$'; 5000];
        let err = replies(&get, long).expect_err("no end of line");
        assert!(err.contains("header line too long"), "{err}");
    }

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
