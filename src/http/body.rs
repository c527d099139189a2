//! Body pumps: move a response body from the upstream connection to the
//! client through one fixed buffer, whatever the body's size.
//!
//! Framings: Content-Length, chunked (decoded, re-chunked to HTTP/1.1 clients)
//! and read-to-close. Each pump reports how many payload bytes reached the
//! client, and on failure which side failed, so the proxy can resume a body
//! from another replica at exactly that offset.

use super::chunked::ChunkedDecoder;
use super::io::{read_more, write_range};
use monoio::io::{AsyncReadRent, AsyncWriteRentExt};
use std::time::Duration;

/// Which side broke a pump.
#[derive(Debug)]
pub enum PumpError {
    /// The upstream stalled, reset, closed early or sent bad framing.
    Upstream(&'static str),
    /// The client went away or stopped reading.
    Client,
}

#[derive(Debug, Clone, Copy)]
pub struct Pumped {
    /// Payload bytes written to the client.
    pub sent: u64,
    /// The upstream connection ended exactly at the body's end and can be reused.
    pub reusable: bool,
}

/// Timeouts for one pump: upstream stall and client write.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    pub upstream: Duration,
    pub client: Duration,
}

fn upstream_error(e: &std::io::Error) -> &'static str {
    match e.kind() {
        std::io::ErrorKind::TimedOut => "timeout",
        std::io::ErrorKind::ConnectionReset => "reset",
        _ => "io",
    }
}

/// Streams exactly `remaining` bytes; `buf[start..]` already holds the first ones.
pub async fn length<U, C>(
    up: &mut U,
    buf: &mut Vec<u8>,
    start: usize,
    mut remaining: u64,
    client: &mut C,
    t: Timeouts,
) -> Result<Pumped, (PumpError, u64)>
where
    U: AsyncReadRent,
    C: AsyncWriteRentExt,
{
    let mut sent = 0u64;
    let mut reusable = true;
    let mut from = start;
    loop {
        let avail = (buf.len() - from) as u64;
        if avail > remaining {
            // The upstream sent more than it announced: never forward it, never reuse.
            buf.truncate(from + remaining as usize);
            reusable = false;
        }
        let n = buf.len() - from;
        if n > 0 {
            if write_range(client, buf, from, from + n, t.client)
                .await
                .is_err()
            {
                return Err((PumpError::Client, sent));
            }
            sent += n as u64;
            remaining -= n as u64;
        }
        if remaining == 0 {
            return Ok(Pumped { sent, reusable });
        }
        buf.clear();
        from = 0;
        match read_more(up, buf, t.upstream).await {
            Ok(0) => return Err((PumpError::Upstream("truncated"), sent)),
            Ok(_) => {}
            Err(e) => return Err((PumpError::Upstream(upstream_error(&e)), sent)),
        }
    }
}

/// Streams a chunked body, re-chunked (`rechunk`) or raw until close for HTTP/1.0 clients.
pub async fn chunked<U, C>(
    up: &mut U,
    buf: &mut Vec<u8>,
    start: usize,
    client: &mut C,
    rechunk: bool,
    t: Timeouts,
) -> Result<Pumped, (PumpError, u64)>
where
    U: AsyncReadRent,
    C: AsyncWriteRentExt,
{
    let mut decoder = ChunkedDecoder::default();
    let mut sent = 0u64;
    let mut from = start;
    let mut frame = Vec::with_capacity(24);
    loop {
        let d = decoder
            .decode(&mut buf[from..])
            .map_err(|_| (PumpError::Upstream("malformed"), sent))?;
        let reusable = d.done && from + d.consumed == buf.len();
        if d.payload > 0 {
            // Payload now sits at buf[from..from + payload].
            if rechunk {
                frame.clear();
                frame.extend_from_slice(format!("{:x}\r\n", d.payload).as_bytes());
                let flen = frame.len();
                if write_range(client, &mut frame, 0, flen, t.client)
                    .await
                    .is_err()
                {
                    return Err((PumpError::Client, sent));
                }
                buf.truncate(from + d.payload);
                buf.extend_from_slice(b"\r\n");
                if write_range(client, buf, from, from + d.payload + 2, t.client)
                    .await
                    .is_err()
                {
                    return Err((PumpError::Client, sent));
                }
            } else if write_range(client, buf, from, from + d.payload, t.client)
                .await
                .is_err()
            {
                return Err((PumpError::Client, sent));
            }
            sent += d.payload as u64;
        }
        if d.done {
            if rechunk {
                frame.clear();
                frame.extend_from_slice(b"0\r\n\r\n");
                if write_range(client, &mut frame, 0, 5, t.client)
                    .await
                    .is_err()
                {
                    return Err((PumpError::Client, sent));
                }
            }
            return Ok(Pumped { sent, reusable });
        }
        buf.clear();
        from = 0;
        match read_more(up, buf, t.upstream).await {
            Ok(0) => return Err((PumpError::Upstream("truncated"), sent)),
            Ok(_) => {}
            Err(e) => return Err((PumpError::Upstream(upstream_error(&e)), sent)),
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
) -> Result<Pumped, (PumpError, u64)>
where
    U: AsyncReadRent,
    C: AsyncWriteRentExt,
{
    let mut sent = 0u64;
    let mut from = start;
    let mut frame = Vec::with_capacity(24);
    loop {
        let n = buf.len() - from;
        if n > 0 {
            if rechunk {
                frame.clear();
                frame.extend_from_slice(format!("{n:x}\r\n").as_bytes());
                let flen = frame.len();
                if write_range(client, &mut frame, 0, flen, t.client)
                    .await
                    .is_err()
                {
                    return Err((PumpError::Client, sent));
                }
                buf.extend_from_slice(b"\r\n");
                if write_range(client, buf, from, from + n + 2, t.client)
                    .await
                    .is_err()
                {
                    return Err((PumpError::Client, sent));
                }
            } else if write_range(client, buf, from, from + n, t.client)
                .await
                .is_err()
            {
                return Err((PumpError::Client, sent));
            }
            sent += n as u64;
        }
        buf.clear();
        from = 0;
        match read_more(up, buf, t.upstream).await {
            Ok(0) => {
                if rechunk {
                    frame.clear();
                    frame.extend_from_slice(b"0\r\n\r\n");
                    if write_range(client, &mut frame, 0, 5, t.client)
                        .await
                        .is_err()
                    {
                        return Err((PumpError::Client, sent));
                    }
                }
                return Ok(Pumped {
                    sent,
                    reusable: false,
                });
            }
            Ok(_) => {}
            Err(e) => return Err((PumpError::Upstream(upstream_error(&e)), sent)),
        }
    }
}

/// A pipe pair for splicing: `(read end, write end)`.
pub type SplicePipe = (monoio::net::Pipe, monoio::net::Pipe);

/// Most bytes moved per splice call (the default pipe capacity).
const SPLICE_CHUNK: u64 = 64 * 1024;

/// Streams exactly `remaining` bytes from a plain-TCP upstream to a plain-TCP
/// client with splice(2) through `pipe`: the payload never enters user space.
/// The pipe is empty again when this returns `Ok`; after an error it may hold
/// bytes and must be dropped.
pub async fn splice_length<U, C>(
    up: &mut U,
    pipe: &mut SplicePipe,
    mut remaining: u64,
    client: &mut C,
    t: Timeouts,
) -> Result<Pumped, (PumpError, u64)>
where
    U: monoio::io::as_fd::AsReadFd,
    C: monoio::io::as_fd::AsWriteFd,
{
    use monoio::io::splice::{SpliceDestination, SpliceSource};
    let mut sent = 0u64;
    while remaining > 0 {
        let want = remaining.min(SPLICE_CHUNK) as u32;
        let n = match monoio::time::timeout(t.upstream, up.splice_to_pipe(&mut pipe.1, want)).await
        {
            Ok(Ok(0)) => return Err((PumpError::Upstream("truncated"), sent)),
            Ok(Ok(n)) => n,
            Ok(Err(e)) => return Err((PumpError::Upstream(upstream_error(&e)), sent)),
            Err(_) => return Err((PumpError::Upstream("timeout"), sent)),
        };
        let mut left = n;
        while left > 0 {
            match monoio::time::timeout(t.client, client.splice_from_pipe(&mut pipe.0, left)).await
            {
                Ok(Ok(0)) | Ok(Err(_)) | Err(_) => return Err((PumpError::Client, sent)),
                Ok(Ok(m)) => {
                    left -= m.min(left);
                    sent += m as u64;
                }
            }
        }
        remaining -= n as u64;
    }
    Ok(Pumped {
        sent,
        reusable: true,
    })
}
