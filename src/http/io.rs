//! Owned-buffer I/O helpers over monoio streams, with timeouts.
//!
//! monoio moves buffers into each operation and hands them back. These helpers
//! keep a `&mut Vec<u8>` interface: on success the buffer comes back in place;
//! on timeout the operation (and the buffer it owns) is cancelled and the
//! caller gets an empty buffer of the same capacity plus a `TimedOut` error.

use monoio::buf::{IoBuf, IoBufMut};
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
