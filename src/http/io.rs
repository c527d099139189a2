//! Owned-buffer I/O helpers over monoio streams, with timeouts.
//!
//! monoio moves buffers into each operation and hands them back. These helpers
//! keep a `&mut Vec<u8>` interface: on success the buffer comes back in place;
//! on timeout the operation (and the buffer it owns) is cancelled and the
//! caller gets an empty buffer of the same capacity plus a `TimedOut` error.

use monoio::buf::{IoBuf, IoBufMut, IoVecBuf};
use monoio::io::{AsyncReadRent, AsyncWriteRentExt};
use std::io;
use std::time::Duration;

fn timed_out(what: &'static str) -> io::Error {
    io::Error::new(io::ErrorKind::TimedOut, what)
}

/// Reads more bytes, appending after `buf.len()`. `Ok(0)` is end of stream.
pub async fn read_more<S: AsyncReadRent>(
    s: &mut S,
    buf: &mut Vec<u8>,
    timeout: Duration,
) -> io::Result<usize> {
    let cap = buf.capacity();
    let owned = std::mem::take(buf);
    let len = owned.len();
    if len >= cap {
        *buf = owned;
        return Err(io::Error::new(io::ErrorKind::OutOfMemory, "buffer full"));
    }
    match monoio::time::timeout(timeout, s.read(owned.slice_mut(len..cap))).await {
        Ok((r, slice)) => {
            *buf = slice.into_inner();
            r
        }
        Err(_) => {
            *buf = Vec::with_capacity(cap);
            Err(timed_out("read timed out"))
        }
    }
}

/// Writes `buf[start..end]` completely.
pub async fn write_range<S: AsyncWriteRentExt>(
    s: &mut S,
    buf: &mut Vec<u8>,
    start: usize,
    end: usize,
    timeout: Duration,
) -> io::Result<()> {
    if start >= end {
        return Ok(());
    }
    let cap = buf.capacity();
    let owned = std::mem::take(buf);
    match monoio::time::timeout(timeout, s.write_all(owned.slice(start..end))).await {
        Ok((r, slice)) => {
            *buf = slice.into_inner();
            r.map(|_| ())
        }
        Err(_) => {
            *buf = Vec::with_capacity(cap);
            Err(timed_out("write timed out"))
        }
    }
}

/// Writes all of `buf`.
pub async fn write_all<S: AsyncWriteRentExt>(
    s: &mut S,
    buf: &mut Vec<u8>,
    timeout: Duration,
) -> io::Result<()> {
    let end = buf.len();
    write_range(s, buf, 0, end, timeout).await
}

/// Two owned buffers written as one (`head`, then `body[from..to]`).
struct HeadAndBody {
    head: Vec<u8>,
    body: Vec<u8>,
    iov: [libc::iovec; 2],
}

// SAFETY: the iovecs point into the two vectors' heap buffers, which neither
// move nor change while the value is owned by the runtime (the vectors are
// not touched until it hands the value back); `from..to` was checked against
// `body`'s length when the iovecs were made.
unsafe impl IoVecBuf for HeadAndBody {
    fn read_iovec_ptr(&self) -> *const libc::iovec {
        self.iov.as_ptr()
    }

    fn read_iovec_len(&self) -> usize {
        self.iov.len()
    }
}

/// Writes all of `head` and then `body[from..to]` with vectored writes: a
/// response head and the first body bytes leave in one operation, and so in
/// as few TCP segments as the bytes need.
pub async fn write_head_and_body<S: AsyncWriteRentExt>(
    s: &mut S,
    head: &mut Vec<u8>,
    body: &mut Vec<u8>,
    (from, to): (usize, usize),
    timeout: Duration,
) -> io::Result<()> {
    if from >= to || to > body.len() {
        write_all(s, head, timeout).await?;
        return write_range(s, body, from, to, timeout).await;
    }
    let (head_cap, body_cap) = (head.capacity(), body.capacity());
    let (mut h, mut b) = (std::mem::take(head), std::mem::take(body));
    let iov = [
        libc::iovec {
            iov_base: h.as_mut_ptr().cast(),
            iov_len: h.len(),
        },
        libc::iovec {
            // SAFETY: `from < to <= b.len()` (checked above): in bounds.
            iov_base: unsafe { b.as_mut_ptr().add(from) }.cast(),
            iov_len: to - from,
        },
    ];
    let both = HeadAndBody {
        head: h,
        body: b,
        iov,
    };
    match monoio::time::timeout(timeout, s.write_vectored_all(both)).await {
        Ok((r, both)) => {
            *head = both.head;
            *body = both.body;
            r.map(|_| ())
        }
        Err(_) => {
            *head = Vec::with_capacity(head_cap);
            *body = Vec::with_capacity(body_cap);
            Err(timed_out("write timed out"))
        }
    }
}
