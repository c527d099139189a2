//! Body pumps: move a response body from the upstream connection to the
//! client through one fixed buffer, whatever the body's size.
//!
//! Framings: Content-Length, chunked (decoded, re-chunked to HTTP/1.1 clients)
//! and read-to-close. Each pump reports how many payload bytes reached the
//! client, and on failure which side failed, so the proxy can resume a body
//! from another replica at exactly that offset.

use super::chunked::ChunkedDecoder;
use super::io::{read_more, write_range};
use super::zerocopy;
use crate::error::{Cause, Error, Source};
use monoio::io::{AsyncReadRent, AsyncWriteRentExt};
use std::io::Write as _;
use std::time::Duration;

/// A client write that waits this long means the client stopped reading
/// (and so, through backpressure, did the pump).
pub const CLIENT_STALL: Duration = Duration::from_secs(1);

/// Whether a pump's client stalled: once one client write waited
/// [`CLIENT_STALL`], an upstream failure later in the same body is laid at
/// the client's door (the upstream cannot tell a proxy that stopped reading
/// from a dead one). An upstream that fails a body read at full speed is
/// still the replica's failure.
#[derive(Default)]
struct Backpressure {
    stalled: bool,
}

impl Backpressure {
    /// Notes a client write that began at `started` and has just ended.
    fn wrote(&mut self, started: std::time::Instant) {
        self.stalled |= started.elapsed() >= CLIENT_STALL;
    }

    /// The error for an upstream failure with `cause`.
    fn upstream(&self, cause: Cause) -> Error {
        match self.stalled {
            true => Error::stalled_client(cause),
            false => Error::upstream(cause, ""),
        }
    }

    /// Reclassifies an upstream error.
    fn judge(&self, e: Error) -> Error {
        match e.source {
            Source::Upstream => self.upstream(e.cause),
            _ => e,
        }
    }
}

#[derive(Debug, Clone, Copy)]
/// What a body pump did.
pub struct Pumped {
    /// Payload bytes written to the client.
    pub sent: u64,
    /// The upstream connection ended exactly at the body's end and can be reused.
    pub reusable: bool,
}

/// Timeouts for one pump: upstream stall and client write.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    /// Longest wait for upstream bytes.
    pub upstream: Duration,
    /// Longest wait for the client to take bytes.
    pub client: Duration,
}

fn upstream_error(e: &std::io::Error) -> Cause {
    Cause::of_io(e)
}

/// Receives a copy of every body byte a pump sends (a cache fill), each
/// piece before it is written to the client.
pub trait Tee {
    /// The next bytes of the body.
    fn push(&mut self, bytes: &[u8]);

    /// The next bytes of the body, already in a shared buffer (a Redis
    /// chunk): a tee that keeps pieces may keep this one by reference
    /// rather than copy it.
    fn push_shared(&mut self, piece: &bytes::Bytes) {
        self.push(piece);
    }
}

impl Tee for Vec<u8> {
    fn push(&mut self, bytes: &[u8]) {
        self.extend_from_slice(bytes);
    }
}

/// Streams exactly `remaining` bytes; `buf[start..]` already holds the first
/// ones. Every byte sent is also given to `tee` when there is one.
pub async fn length<U, C>(
    up: &mut U,
    buf: &mut Vec<u8>,
    start: usize,
    mut remaining: u64,
    client: &mut C,
    t: Timeouts,
    mut tee: Option<&mut dyn Tee>,
) -> Result<Pumped, (Error, u64)>
where
    U: AsyncReadRent,
    C: AsyncWriteRentExt,
{
    let mut sent = 0u64;
    let mut reusable = true;
    let mut from = start;
    let mut backpressure = Backpressure::default();
    loop {
        let avail = (buf.len() - from) as u64;
        if avail > remaining {
            // The upstream sent more than it announced: never forward it, never reuse.
            buf.truncate(from + remaining as usize);
            reusable = false;
        }
        let n = buf.len() - from;
        if n > 0 {
            if let Some(copy) = tee.as_deref_mut() {
                copy.push(&buf[from..from + n]);
            }
            let started = std::time::Instant::now();
            if write_range(client, buf, from, from + n, t.client)
                .await
                .is_err()
            {
                return Err((Error::client_gone(), sent));
            }
            backpressure.wrote(started);
            sent += n as u64;
            remaining -= n as u64;
        }
        if remaining == 0 {
            return Ok(Pumped { sent, reusable });
        }
        buf.clear();
        from = 0;
        match read_more(up, buf, t.upstream).await {
            Ok(0) => return Err((backpressure.upstream(Cause::Truncated), sent)),
            Ok(_) => {}
            Err(e) => return Err((backpressure.upstream(upstream_error(&e)), sent)),
        }
    }
}

/// Sends `buf[from..from + n]` to the client: as one chunk (size line,
/// payload, CRLF) when `rechunk`, raw otherwise. `buf` is cut after the
/// payload (the CRLF goes there, so payload and CRLF leave in one write).
async fn forward<C: AsyncWriteRentExt>(
    client: &mut C,
    frame: &mut Vec<u8>,
    buf: &mut Vec<u8>,
    (from, n): (usize, usize),
    rechunk: bool,
    t: Timeouts,
) -> Result<(), Error> {
    if !rechunk {
        return write_range(client, buf, from, from + n, t.client)
            .await
            .map_err(|_| Error::client_gone());
    }
    frame.clear();
    let _ = write!(frame, "{n:x}\r\n");
    let flen = frame.len();
    write_range(client, frame, 0, flen, t.client)
        .await
        .map_err(|_| Error::client_gone())?;
    buf.truncate(from + n);
    buf.extend_from_slice(b"\r\n");
    write_range(client, buf, from, from + n + 2, t.client)
        .await
        .map_err(|_| Error::client_gone())
}

/// Ends a re-chunked body with the last (empty) chunk.
async fn last_chunk<C: AsyncWriteRentExt>(
    client: &mut C,
    frame: &mut Vec<u8>,
    rechunk: bool,
    t: Timeouts,
) -> Result<(), Error> {
    if !rechunk {
        return Ok(());
    }
    frame.clear();
    frame.extend_from_slice(b"0\r\n\r\n");
    write_range(client, frame, 0, 5, t.client)
        .await
        .map_err(|_| Error::client_gone())
}

/// Reads the next piece of the body; end of stream is `Ok(0)`.
async fn next_piece<U: AsyncReadRent>(
    up: &mut U,
    buf: &mut Vec<u8>,
    t: Timeouts,
) -> Result<usize, Error> {
    buf.clear();
    read_more(up, buf, t.upstream)
        .await
        .map_err(|e| Error::upstream(upstream_error(&e), ""))
}

/// Streams a chunked body, re-chunked (`rechunk`) or raw until close for HTTP/1.0 clients.
pub async fn chunked<U, C>(
    up: &mut U,
    buf: &mut Vec<u8>,
    start: usize,
    client: &mut C,
    rechunk: bool,
    t: Timeouts,
) -> Result<Pumped, (Error, u64)>
where
    U: AsyncReadRent,
    C: AsyncWriteRentExt,
{
    let mut decoder = ChunkedDecoder::default();
    let mut sent = 0u64;
    let mut from = start;
    let mut frame = Vec::with_capacity(24);
    let mut backpressure = Backpressure::default();
    loop {
        let d = decoder
            .decode(&mut buf[from..])
            .map_err(|_| (Error::upstream(Cause::Malformed, ""), sent))?;
        let reusable = d.done && from + d.consumed == buf.len();
        if d.payload > 0 {
            // Payload now sits at buf[from..from + payload].
            let started = std::time::Instant::now();
            forward(client, &mut frame, buf, (from, d.payload), rechunk, t)
                .await
                .map_err(|e| (e, sent))?;
            backpressure.wrote(started);
            sent += d.payload as u64;
        }
        if d.done {
            last_chunk(client, &mut frame, rechunk, t)
                .await
                .map_err(|e| (e, sent))?;
            return Ok(Pumped { sent, reusable });
        }
        from = 0;
        match next_piece(up, buf, t).await {
            Ok(0) => return Err((backpressure.upstream(Cause::Truncated), sent)),
            Ok(_) => {}
            Err(e) => return Err((backpressure.judge(e), sent)),
        }
    }
}

/// Streams until the upstream closes; re-chunked for HTTP/1.1 clients.
pub async fn until_close<U, C>(
    up: &mut U,
    buf: &mut Vec<u8>,
    start: usize,
    client: &mut C,
    rechunk: bool,
    t: Timeouts,
) -> Result<Pumped, (Error, u64)>
where
    U: AsyncReadRent,
    C: AsyncWriteRentExt,
{
    let mut sent = 0u64;
    let mut from = start;
    let mut frame = Vec::with_capacity(24);
    let mut backpressure = Backpressure::default();
    loop {
        let n = buf.len() - from;
        if n > 0 {
            let started = std::time::Instant::now();
            forward(client, &mut frame, buf, (from, n), rechunk, t)
                .await
                .map_err(|e| (e, sent))?;
            backpressure.wrote(started);
            sent += n as u64;
        }
        from = 0;
        match next_piece(up, buf, t).await {
            Ok(0) => {
                last_chunk(client, &mut frame, rechunk, t)
                    .await
                    .map_err(|e| (e, sent))?;
                let reusable = false;
                return Ok(Pumped { sent, reusable });
            }
            Ok(_) => {}
            Err(e) => return Err((backpressure.judge(e), sent)),
        }
    }
}

/// A pipe pair for splicing: `(read end, write end)`.
/// Streams exactly `remaining` bytes from a plain-TCP upstream to a plain-TCP
/// client with splice(2) through `pipe` (see `http::zerocopy`): the payload
/// never enters user space. Both sockets are non-blocking only while this
/// runs. The pipe is empty again when this returns `Ok`; after an error it
/// may hold bytes and must be dropped.
pub async fn splice_length(
    up: &monoio::net::TcpStream,
    pipe: &mut zerocopy::Pipe,
    mut remaining: u64,
    client: &monoio::net::TcpStream,
    t: Timeouts,
) -> Result<Pumped, (Error, u64)> {
    let up =
        zerocopy::NonBlocking::new(up).map_err(|e| (Error::upstream(upstream_error(&e), ""), 0))?;
    let client = zerocopy::NonBlocking::new(client).map_err(|_| (Error::client_gone(), 0))?;
    let mut sent = 0u64;
    let mut backpressure = Backpressure::default();
    while remaining > 0 {
        let want = usize::try_from(remaining).unwrap_or(usize::MAX);
        let n = match zerocopy::fill_from(&up, pipe, want, t.upstream).await {
            Ok(0) => return Err((backpressure.upstream(Cause::Truncated), sent)),
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {
                return Err((backpressure.upstream(Cause::Timeout), sent))
            }
            Err(e) => return Err((backpressure.upstream(upstream_error(&e)), sent)),
        };
        let more = (n as u64) < remaining;
        let started = std::time::Instant::now();
        if zerocopy::drain(&client, pipe, n, more, t.client)
            .await
            .is_err()
        {
            return Err((Error::client_gone(), sent));
        }
        backpressure.wrote(started);
        sent += n as u64;
        remaining -= n as u64;
    }
    Ok(Pumped {
        sent,
        reusable: true,
    })
}

#[cfg(test)]
mod tests {
    //! The pumps over scripted in-memory streams: every split point of a
    //! valid body relays exactly its payload; truncation, bad framing,
    //! stalls and client failures are reported as the right side's error.

    use super::*;
    use monoio::buf::{IoBuf, IoBufMut, IoVecBuf, IoVecBufMut};
    use monoio::io::{AsyncReadRent, AsyncWriteRent};
    use monoio::BufResult;
    use std::collections::VecDeque;
    use std::io;

    /// What a scripted upstream does on each read.
    enum Event {
        Data(Vec<u8>),
        Fail(io::ErrorKind),
        /// Never completes (a stalled upstream).
        Stall,
    }

    /// An upstream that returns its events one read at a time; EOF after.
    struct Scripted(VecDeque<Event>);

    impl Scripted {
        /// `bytes` delivered in reads split at `cuts` (ascending offsets).
        fn split(bytes: &[u8], cuts: &[usize]) -> Scripted {
            let mut events = VecDeque::new();
            let mut from = 0;
            for &c in cuts.iter().chain(std::iter::once(&bytes.len())) {
                if c > from {
                    events.push_back(Event::Data(bytes[from..c].to_vec()));
                    from = c;
                }
            }
            Scripted(events)
        }
    }

    impl AsyncReadRent for Scripted {
        async fn read<T: IoBufMut>(&mut self, buf: T) -> BufResult<usize, T> {
            match self.0.pop_front() {
                None => (Ok(0), buf),
                Some(Event::Fail(kind)) => (Err(io::Error::from(kind)), buf),
                Some(Event::Stall) => {
                    std::future::pending::<()>().await;
                    (Ok(0), buf)
                }
                Some(Event::Data(chunk)) => {
                    let mut src: &[u8] = &chunk;
                    let (r, buf) = src.read(buf).await;
                    if !src.is_empty() {
                        self.0.push_front(Event::Data(src.to_vec()));
                    }
                    (r, buf)
                }
            }
        }

        async fn readv<T: IoVecBufMut>(&mut self, buf: T) -> BufResult<usize, T> {
            (Err(io::Error::from(io::ErrorKind::Unsupported)), buf)
        }
    }

    /// A client that takes at most `max` bytes per write; fails after `fail_after` bytes.
    struct Sink {
        out: Vec<u8>,
        max: usize,
        fail_after: usize,
    }

    impl Sink {
        fn new(max: usize) -> Sink {
            Sink {
                out: Vec::new(),
                max,
                fail_after: usize::MAX,
            }
        }
    }

    impl AsyncWriteRent for Sink {
        async fn write<T: IoBuf>(&mut self, buf: T) -> BufResult<usize, T> {
            if self.out.len() >= self.fail_after {
                return (Err(io::Error::from(io::ErrorKind::BrokenPipe)), buf);
            }
            // SAFETY: `read_ptr` points at `bytes_init` initialised bytes owned
            // by `buf`, which lives until this function returns it.
            let bytes = unsafe { std::slice::from_raw_parts(buf.read_ptr(), buf.bytes_init()) };
            let n = bytes.len().min(self.max);
            self.out.extend_from_slice(&bytes[..n]);
            (Ok(n), buf)
        }

        async fn writev<T: IoVecBuf>(&mut self, buf: T) -> BufResult<usize, T> {
            (Err(io::Error::from(io::ErrorKind::Unsupported)), buf)
        }

        async fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }

        async fn shutdown(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    use crate::testing::run;

    const T: Timeouts = Timeouts {
        upstream: Duration::from_millis(200),
        client: Duration::from_millis(200),
    };

    fn buf() -> Vec<u8> {
        Vec::with_capacity(16)
    }

    /// Decodes an HTTP/1.1 chunked body (for checking re-chunked output).
    fn dechunk(mut b: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        loop {
            let nl = b.windows(2).position(|w| w == b"\r\n").expect("size line");
            let size = usize::from_str_radix(std::str::from_utf8(&b[..nl]).unwrap(), 16).unwrap();
            b = &b[nl + 2..];
            if size == 0 {
                assert_eq!(b, b"\r\n");
                return out;
            }
            out.extend_from_slice(&b[..size]);
            assert_eq!(&b[size..size + 2], b"\r\n");
            b = &b[size + 2..];
        }
    }

    #[test]
    fn length_relays_exactly_the_body_at_every_split_point() {
        let body: Vec<u8> = (0..40u8).collect();
        for cut in 0..=body.len() {
            for write_max in [1, 7, 1000] {
                let mut up = Scripted::split(&body, &[cut]);
                let mut client = Sink::new(write_max);
                let p = run(length(&mut up, &mut buf(), 0, 40, &mut client, T, None)).unwrap();
                assert_eq!((p.sent, p.reusable), (40, true));
                assert_eq!(client.out, body, "cut {cut}");
            }
        }
    }

    #[test]
    fn length_never_forwards_bytes_past_the_length_and_marks_the_connection() {
        let mut up = Scripted::split(b"abcdefEXTRA", &[3]);
        let mut client = Sink::new(1000);
        let p = run(length(&mut up, &mut buf(), 0, 6, &mut client, T, None)).unwrap();
        assert_eq!(client.out, b"abcdef");
        assert!(!p.reusable);
    }

    #[test]
    fn length_reports_truncation_reset_and_stall_as_upstream_failures() {
        let cases: [(Vec<Event>, Cause); 3] = [
            (vec![Event::Data(b"abc".to_vec())], Cause::Truncated),
            (
                vec![
                    Event::Data(b"abc".to_vec()),
                    Event::Fail(io::ErrorKind::ConnectionReset),
                ],
                Cause::Reset,
            ),
            (
                vec![Event::Data(b"abc".to_vec()), Event::Stall],
                Cause::Timeout,
            ),
        ];
        for (events, want) in cases {
            let mut up = Scripted(events.into());
            let mut client = Sink::new(1000);
            match run(length(&mut up, &mut buf(), 0, 10, &mut client, T, None)) {
                Err((e, 3)) if e.source == Source::Upstream => assert_eq!(e.cause, want),
                other => panic!("{want:?}: {other:?}"),
            }
            assert_eq!(client.out, b"abc");
        }
    }

    #[test]
    fn a_failing_client_is_the_clients_error() {
        let mut up = Scripted::split(b"abcdef", &[3]);
        let mut client = Sink::new(3);
        client.fail_after = 3;
        match run(length(&mut up, &mut buf(), 0, 6, &mut client, T, None)) {
            Err((e, 3)) if e.source == Source::Downstream => {}
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn chunked_relays_the_payload_at_every_pair_of_split_points() {
        let wire = b"5;x=1\r\nhello\r\n1\r\n \r\n5\r\nworld\r\n0\r\nT: v\r\n\r\n";
        for a in 0..=wire.len() {
            for b in a..=wire.len() {
                let mut up = Scripted::split(wire, &[a, b]);
                let mut client = Sink::new(1000);
                let p = run(chunked(&mut up, &mut buf(), 0, &mut client, true, T))
                    .unwrap_or_else(|e| panic!("cuts {a},{b}: {e:?}"));
                assert_eq!(dechunk(&client.out), b"hello world", "cuts {a},{b}");
                assert_eq!(p.sent, 11);
                assert!(p.reusable);
                // Raw (HTTP/1.0 client): the payload alone.
                let mut up = Scripted::split(wire, &[a, b]);
                let mut client = Sink::new(1000);
                run(chunked(&mut up, &mut buf(), 0, &mut client, false, T)).unwrap();
                assert_eq!(client.out, b"hello world");
            }
        }
    }

    #[test]
    fn chunked_with_bytes_after_the_end_is_not_reusable() {
        let mut up = Scripted::split(b"1\r\na\r\n0\r\n\r\nHTTP/1.1 200 OK\r\n", &[]);
        let mut client = Sink::new(1000);
        let p = run(chunked(&mut up, &mut buf(), 0, &mut client, true, T)).unwrap();
        assert!(!p.reusable);
    }

    #[test]
    fn chunked_reports_cut_and_garbage_bodies() {
        let mut up = Scripted::split(b"5\r\nhel", &[]);
        let mut client = Sink::new(1000);
        assert!(matches!(
            run(chunked(&mut up, &mut buf(), 0, &mut client, true, T)),
            Err((
                Error {
                    source: Source::Upstream,
                    cause: Cause::Truncated,
                    ..
                },
                3
            ))
        ));
        let mut up = Scripted::split(b"zz\r\n", &[]);
        assert!(matches!(
            run(chunked(&mut up, &mut buf(), 0, &mut Sink::new(9), true, T)),
            Err((
                Error {
                    source: Source::Upstream,
                    cause: Cause::Malformed,
                    ..
                },
                0
            ))
        ));
    }

    #[test]
    fn until_close_relays_everything_and_rechunks() {
        let body: Vec<u8> = (0..30u8).collect();
        for cut in 0..=body.len() {
            let mut up = Scripted::split(&body, &[cut]);
            let mut client = Sink::new(1000);
            let p = run(until_close(&mut up, &mut buf(), 0, &mut client, true, T)).unwrap();
            assert_eq!(dechunk(&client.out), body, "cut {cut}");
            assert_eq!((p.sent, p.reusable), (30, false));
        }
        let mut up = Scripted(
            vec![
                Event::Data(b"ab".to_vec()),
                Event::Fail(io::ErrorKind::ConnectionReset),
            ]
            .into(),
        );
        assert!(matches!(
            run(until_close(
                &mut up,
                &mut buf(),
                0,
                &mut Sink::new(9),
                false,
                T
            )),
            Err((
                Error {
                    source: Source::Upstream,
                    cause: Cause::Reset,
                    ..
                },
                2
            ))
        ));
    }
}
