//! Owned-buffer I/O helpers over monoio streams, with timeouts.
//!
//! monoio moves buffers into each operation and hands them back. These helpers
//! keep a `&mut Vec<u8>` interface: on success the buffer comes back in place;
//! on timeout the operation (and the buffer it owns) is cancelled and the
//! caller gets an empty buffer of the same capacity plus a `TimedOut` error.

use crate::reuse::ReusedBox;
use monoio::buf::{IoBuf, IoBufMut, IoVecBuf};
use monoio::io::{AsyncReadRent, AsyncWriteRent, AsyncWriteRentExt};
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

/// An owned head and body written as one (`head`, then part of `body`).
struct HeadAndBody<B> {
    head: Vec<u8>,
    body: B,
    /// Boxed (in a block the thread reuses): the value moves after the
    /// operation is queued, and the kernel may read the iovecs only when the
    /// queue is submitted.
    iov: ReusedBox<[libc::iovec; 2]>,
}

// SAFETY: the iovec array is on the heap, so its address stays put however
// the value moves; the iovecs point into `head`'s heap buffer and into
// `body`, whose memory an `IoBuf` keeps in place while it is owned
// (neither is touched until the runtime hands the value back); the body's
// part was checked against its initialised length when the iovecs were
// made.
unsafe impl<B: IoBuf> IoVecBuf for HeadAndBody<B> {
    fn read_iovec_ptr(&self) -> *const libc::iovec {
        self.iov.as_ptr()
    }

    fn read_iovec_len(&self) -> usize {
        self.iov.len()
    }
}

/// Writes all of `head` and then `body[from..to]`: one vectored write, so a
/// response head and its body bytes leave in one operation (and in as few
/// TCP segments as the bytes need), then plain writes for whatever a short
/// write left. Returns the body (`None` when the write timed out and the
/// operation kept it).
pub async fn write_head_and<S, B>(
    s: &mut S,
    head: &mut Vec<u8>,
    body: B,
    (from, to): (usize, usize),
    timeout: Duration,
) -> (io::Result<()>, Option<B>)
where
    S: AsyncWriteRent,
    B: IoBuf,
{
    if to > body.bytes_init() {
        let e = io::Error::new(io::ErrorKind::InvalidInput, "body range out of bounds");
        return (Err(e), Some(body));
    }
    if from >= to {
        return (write_all(s, head, timeout).await, Some(body));
    }
    let head_cap = head.capacity();
    let mut h = std::mem::take(head);
    let iov = ReusedBox::new([
        libc::iovec {
            iov_base: h.as_mut_ptr().cast(),
            iov_len: h.len(),
        },
        libc::iovec {
            // SAFETY: `from < to <= body.bytes_init()` (checked above).
            iov_base: unsafe { body.read_ptr().add(from) } as *mut libc::c_void,
            iov_len: to - from,
        },
    ]);
    let both = HeadAndBody { head: h, body, iov };
    // One writev; what a short write leaves is written with the plain
    // writers. (Not monoio's `write_vectored_all`: after a write that ends
    // inside an iovec it shortens the iovec without advancing its start, so
    // the next write repeats bytes, which a TLS client showed.)
    let (n, both) = match monoio::time::timeout(timeout, s.writev(both)).await {
        Ok((Ok(n), both)) => (n, both),
        Ok((Err(e), both)) => {
            *head = both.head;
            return (Err(e), Some(both.body));
        }
        Err(_) => {
            *head = Vec::with_capacity(head_cap);
            return (Err(timed_out("write timed out")), None);
        }
    };
    *head = both.head;
    let mut body = both.body;
    let head_len = head.len();
    if n < head_len {
        if let Err(e) = write_range(s, head, n, head_len, timeout).await {
            return (Err(e), Some(body));
        }
    }
    let body_from = from + n.saturating_sub(head_len);
    if body_from < to {
        match monoio::time::timeout(timeout, s.write_all(body.slice(body_from..to))).await {
            Ok((r, slice)) => {
                body = slice.into_inner();
                if let Err(e) = r {
                    return (Err(e), Some(body));
                }
            }
            Err(_) => return (Err(timed_out("write timed out")), None),
        }
    }
    (Ok(()), Some(body))
}

/// [`write_head_and`] for a body in a buffer the caller keeps (it comes
/// back in place, or empty with its capacity after a timeout).
pub async fn write_head_and_body<S: AsyncWriteRent>(
    s: &mut S,
    head: &mut Vec<u8>,
    body: &mut Vec<u8>,
    range: (usize, usize),
    timeout: Duration,
) -> io::Result<()> {
    let cap = body.capacity();
    let (r, back) = write_head_and(s, head, std::mem::take(body), range, timeout).await;
    *body = back.unwrap_or_else(|| Vec::with_capacity(cap));
    r
}
