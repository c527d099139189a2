//! Moving bodies without copying them through user space, with plain
//! non-blocking splice(2) calls and the runtime's readiness waits (io_uring's
//! splice operation runs in kernel worker threads: for a 1 MiB relay they
//! took more than half the process's CPU).
//!
//! Sending a stored body by reference: vmsplice(2) its pages into a pipe
//! (or splice(2) a disk entry's pages from the page cache), splice(2) the
//! pipe into a plain-TCP client. The sender's copy into the
//! socket (half the CPU of a 1 MiB cache hit, see loadtest/results) is
//! gone; the kernel holds the pages until the receiver has read them.
//! Relaying a large upstream body: splice(2) from the upstream socket into
//! a pipe and from the pipe into the client socket (`fill_from`, `drain`),
//! woken once per pipeful rather than per segment (the upstream socket's
//! receive low-water mark, put back when the body ends).
//!
//! Only bodies that live in a mapping of their own may be sent this way
//! (`cache::region::Body::mapped`): their pages are never written again and
//! never reused while the kernel may hold them. The pipe is this module's
//! own (non-blocking, its descriptors known); the client socket is made
//! non-blocking for the splice ([`NonBlocking`]) and waited on with the
//! runtime's readiness poll, so a full socket never blocks the core.

use monoio::net::TcpStream;
use std::cell::Cell;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::rc::Rc;
use std::time::Duration;

/// Pipe capacity asked for while the worker's [`PipeBudget`] allows it: a
/// 1 MiB body in one splice each way (a 1 MiB relay: 21 -> 16 syscalls,
/// 0.85-0.98x the CPU of 256 KiB pipes in four A/B runs).
const LARGE_PIPE_BYTES: usize = 1024 * 1024;

/// Pipe capacity asked for when a large one does not fit the budget.
const PIPE_BYTES: usize = 256 * 1024;

/// A new pipe's capacity (the kernel's default), the least one can hold.
const DEFAULT_PIPE_BYTES: usize = 64 * 1024;

/// A pipe whose two ends this process reads and writes with plain
/// syscalls (both non-blocking). Empty whenever it is not in use: a send
/// that fails drops its pipe.
pub struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
    capacity: usize,
    /// The budget this pipe's capacity was taken from, and how much it
    /// took, given back when it closes.
    budget: Rc<Cell<usize>>,
    charged: usize,
}

impl Pipe {
    /// A new pipe, its capacity asked for when it is not the default
    /// (fails when out of file descriptors; a smaller capacity than asked
    /// for is not a failure).
    fn with_capacity(bytes: usize, budget: Rc<Cell<usize>>) -> io::Result<Pipe> {
        let mut fds = [0 as libc::c_int; 2];
        // SAFETY: `fds` has room for the two descriptors pipe2 writes.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) } != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: pipe2 succeeded, so both descriptors are open and ours alone.
        let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        if bytes > DEFAULT_PIPE_BYTES {
            let ask = libc::c_int::try_from(bytes).unwrap_or(libc::c_int::MAX);
            // SAFETY: fcntl on a descriptor we own; failure leaves the default.
            unsafe { libc::fcntl(write.as_raw_fd(), libc::F_SETPIPE_SZ, ask) };
        }
        // SAFETY: fcntl on a descriptor we own.
        let capacity = unsafe { libc::fcntl(write.as_raw_fd(), libc::F_GETPIPE_SZ) };
        let capacity = usize::try_from(capacity).unwrap_or(0).max(4096);
        // What the kernel gave is charged (its pages count against the
        // user), all that is left if it gave more than asked.
        let charged = capacity.min(budget.get());
        budget.set(budget.get() - charged);
        Ok(Pipe {
            read,
            write,
            capacity,
            budget,
            charged,
        })
    }
}

impl Drop for Pipe {
    fn drop(&mut self) {
        self.budget
            .set(self.budget.get().saturating_add(self.charged));
    }
}

/// How much pipe capacity one worker may hold at once, in use or kept. The
/// kernel counts every pipe's pages against its user, and past
/// `fs.pipe-user-pages-soft` (64 MiB by default) an unprivileged user's new
/// pipes get two pages each, so every splice would take many rounds. The
/// process keeps to half that limit, shared by its workers; a worker whose
/// share is spent copies instead of splicing until a pipe closes. With
/// CAP_SYS_RESOURCE or CAP_SYS_ADMIN, or no limit set, there is no budget.
pub struct PipeBudget {
    left: Rc<Cell<usize>>,
}

impl PipeBudget {
    /// One worker's share among `workers`.
    pub fn new(workers: usize) -> PipeBudget {
        let soft_pages = std::fs::read_to_string("/proc/sys/fs/pipe-user-pages-soft")
            .ok()
            .and_then(|s| s.trim().parse::<usize>().ok())
            .unwrap_or(16384);
        let share = if soft_pages == 0 || pipe_limits_exempt() {
            usize::MAX
        } else {
            soft_pages * 4096 / 2 / workers.max(1)
        };
        PipeBudget {
            left: Rc::new(Cell::new(share)),
        }
    }

    /// A new pipe, as large as the budget allows; an error when the budget
    /// is spent (the caller copies instead) or out of file descriptors.
    pub fn pipe(&self) -> io::Result<Pipe> {
        let Some(bytes) = ask_for(self.left.get()) else {
            return Err(io::Error::new(
                io::ErrorKind::OutOfMemory,
                "the worker's pipe budget is spent",
            ));
        };
        Pipe::with_capacity(bytes, self.left.clone())
    }
}

/// The capacity to ask a new pipe for, with `left` bytes of budget: the
/// largest that fits; none when not even a default pipe does.
fn ask_for(left: usize) -> Option<usize> {
    [LARGE_PIPE_BYTES, PIPE_BYTES, DEFAULT_PIPE_BYTES]
        .into_iter()
        .find(|&bytes| bytes <= left)
}

/// Whether this process holds CAP_SYS_RESOURCE or CAP_SYS_ADMIN, which
/// exempt it from the kernel's per-user pipe limits.
fn pipe_limits_exempt() -> bool {
    const CAP_SYS_ADMIN: u32 = 21;
    const CAP_SYS_RESOURCE: u32 = 24;
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        .is_some_and(|caps| caps & (1 << CAP_SYS_ADMIN | 1 << CAP_SYS_RESOURCE) != 0)
}

/// A socket made non-blocking for splicing, its mode put back when this
/// is dropped: the runtime's io_uring operations on it expect the mode it
/// set (some kernels answer an io_uring read of a non-blocking socket with
/// EAGAIN instead of waiting). One ioctl(FIONBIO) each way; none where the
/// thread's sockets are non-blocking anyway ([`sockets_are_nonblocking`]).
pub struct NonBlocking<'a> {
    stream: &'a TcpStream,
    /// Whether drop makes the socket blocking again.
    restore: bool,
    /// The receive low-water mark [`fill_from`] set (SO_RCVLOWAT), put
    /// back to 1 on drop; 1 while untouched.
    low_water: Cell<usize>,
    /// Set once a wait for a pipeful timed out: the stream is slow, and
    /// the rest of its body is taken as it comes.
    slow: Cell<bool>,
}

thread_local! {
    /// Whether this thread's runtime makes every socket non-blocking (epoll)
    /// or none (io_uring); unknown on threads that never said.
    static SOCKETS_NONBLOCKING: std::cell::Cell<Option<bool>> =
        const { std::cell::Cell::new(None) };
}

/// Tells this thread's splices how its runtime makes sockets: every one
/// non-blocking (`true`, epoll) or none (`false`, io_uring).
pub fn sockets_are_nonblocking(yes: bool) {
    SOCKETS_NONBLOCKING.with(|c| c.set(Some(yes)));
}

/// Sets the socket's receive low-water mark: readiness (and the wake-up
/// behind it) waits for this many bytes, or the end of the stream.
fn set_low_water(fd: RawFd, bytes: usize) -> io::Result<()> {
    let value = libc::c_int::try_from(bytes).unwrap_or(libc::c_int::MAX);
    // SAFETY: setsockopt reads one int from the live local `value`; `fd`
    // is open.
    let r = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_RCVLOWAT,
            (&value as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Sets or clears O_NONBLOCK on `fd`.
fn set_nonblocking(fd: RawFd, on: bool) -> io::Result<()> {
    let mut value: libc::c_int = on.into();
    // SAFETY: FIONBIO reads one int from the live local `value`; `fd` is open.
    if unsafe { libc::ioctl(fd, libc::FIONBIO, &mut value) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

impl<'a> NonBlocking<'a> {
    /// Makes `stream` non-blocking until the result is dropped.
    pub fn new(stream: &'a TcpStream) -> io::Result<NonBlocking<'a>> {
        let fd = stream.as_raw_fd();
        let already = match SOCKETS_NONBLOCKING.with(|c| c.get()) {
            Some(known) => known,
            None => {
                // SAFETY: fcntl on the stream's open descriptor.
                let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
                if flags < 0 {
                    return Err(io::Error::last_os_error());
                }
                flags & libc::O_NONBLOCK != 0
            }
        };
        if !already {
            set_nonblocking(fd, true)?;
        }
        Ok(NonBlocking {
            stream,
            restore: !already,
            low_water: Cell::new(1),
            slow: Cell::new(false),
        })
    }
}

impl Drop for NonBlocking<'_> {
    fn drop(&mut self) {
        if self.low_water.get() != 1 {
            let _ = set_low_water(self.stream.as_raw_fd(), 1);
        }
        if self.restore {
            let _ = set_nonblocking(self.stream.as_raw_fd(), false);
        }
    }
}

/// Sends a response head (copied, it is ordinary memory) with MSG_MORE: the
/// kernel holds it back to leave with the body spliced right after, so
/// head and body share segments.
pub async fn send_head(stream: &NonBlocking<'_>, head: &[u8], timeout: Duration) -> io::Result<()> {
    let mut off = 0;
    while off < head.len() {
        let rest = &head[off..];
        // SAFETY: `rest` is readable memory of the given length; the socket
        // is open (borrowed) and non-blocking, so this never waits.
        let sent = unsafe {
            libc::send(
                stream.stream.as_raw_fd(),
                rest.as_ptr().cast(),
                rest.len(),
                libc::MSG_MORE | libc::MSG_NOSIGNAL,
            )
        };
        match moved(sent, "send head") {
            Ok(n) => off += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => writable(stream, timeout).await?,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// How long [`fill_from`] waits for a whole pipeful before it takes what
/// has arrived: a stream at network speed fills a pipe in far less; a slow
/// one's bytes still reach the client without waiting for the rest.
const PIPEFUL_WAIT: Duration = Duration::from_millis(10);

/// Splices up to `want` bytes from the socket `stream` into the empty
/// `pipe`, waiting (within `timeout`, plus [`PIPEFUL_WAIT`] once per
/// stream) for bytes to arrive: how many moved, 0 at the end of the
/// stream. `want` must not exceed what the stream still owes.
pub(crate) async fn fill_from(
    stream: &NonBlocking<'_>,
    pipe: &mut Pipe,
    want: usize,
    timeout: Duration,
) -> io::Result<usize> {
    fill_within(stream, pipe, want, timeout, PIPEFUL_WAIT).await
}

/// [`fill_from`], waiting up to `pipeful_wait` for a pipeful.
async fn fill_within(
    stream: &NonBlocking<'_>,
    pipe: &mut Pipe,
    want: usize,
    timeout: Duration,
    pipeful_wait: Duration,
) -> io::Result<usize> {
    let (from, to) = (stream.stream.as_raw_fd(), pipe.write.as_raw_fd());
    let flags = libc::SPLICE_F_NONBLOCK | libc::SPLICE_F_MOVE;
    loop {
        let n = splice(from, None, to, want.min(pipe.capacity), flags);
        if let Ok(n) = usize::try_from(n) {
            return Ok(n);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::WouldBlock {
            return Err(e);
        }
        if !stream.slow.get() {
            // Wake up for a pipeful (or the body's rest), not for every
            // segment that arrives: fewer wake-ups and larger splices per
            // body (a 1 MiB relay: 36 -> 17 syscalls, 4.1 -> 0.6 context
            // switches). The upstream owes at least this many bytes; its
            // end or an error wakes us too.
            let low = want.min(pipe.capacity);
            if stream.low_water.get() != low {
                set_low_water(from, low)?;
                stream.low_water.set(low);
            }
            if let Ok(ready) =
                monoio::time::timeout(pipeful_wait, stream.stream.readable(false)).await
            {
                ready?;
                continue;
            }
            // Slower than that: bytes that arrived go on now, and the
            // rest of the body is waited for segment by segment.
            set_low_water(from, 1)?;
            stream.low_water.set(1);
            stream.slow.set(true);
        }
        readable(stream, timeout).await?;
    }
}

/// Waits until the socket has room, within `timeout`.
async fn writable(stream: &NonBlocking<'_>, timeout: Duration) -> io::Result<()> {
    match monoio::time::timeout(timeout, stream.stream.writable(false)).await {
        Ok(r) => r,
        Err(_) => Err(io::Error::new(io::ErrorKind::TimedOut, "write timed out")),
    }
}

/// Sends `bytes` to `stream` by reference, each wait for the socket within
/// `timeout`.
///
/// # Safety
/// `bytes` must stay unmodified for as long as the kernel may hold its
/// pages, which is past this call: memory of a `cache::region::Region`
/// (`Body::mapped`) is; heap memory is not.
pub async unsafe fn send(
    stream: &NonBlocking<'_>,
    pipe: &mut Pipe,
    bytes: &[u8],
    timeout: Duration,
) -> io::Result<()> {
    let mut off = 0;
    while off < bytes.len() {
        let want = (bytes.len() - off).min(pipe.capacity);
        let iov = libc::iovec {
            iov_base: bytes[off..].as_ptr() as *mut libc::c_void,
            iov_len: want,
        };
        // SAFETY: the iovec describes readable memory inside `bytes`; the
        // caller guarantees those pages are never written again (see the
        // function's contract), so the references vmsplice takes stay
        // valid. The pipe is empty and non-blocking: this never waits.
        let put =
            unsafe { libc::vmsplice(pipe.write.as_raw_fd(), &iov, 1, libc::SPLICE_F_NONBLOCK) };
        let put = moved(put, "vmsplice")?;
        drain(stream, pipe, put, off + put < bytes.len(), timeout).await?;
        off += put;
    }
    Ok(())
}

/// Sends `len` bytes of the file `fd` from `offset` to `stream` through the
/// page cache (splice: no copy), each wait for the socket within
/// `timeout`. The file
/// must never be written in place (the kernel may hold its pages past this
/// call), and its pages should be in the page cache: reading one that is
/// not blocks the core for a disk read.
pub async fn send_file(
    stream: &NonBlocking<'_>,
    pipe: &mut Pipe,
    fd: RawFd,
    offset: u64,
    len: u64,
    timeout: Duration,
) -> io::Result<()> {
    let mut at = i64::try_from(offset).map_err(io::Error::other)?;
    let end = offset.saturating_add(len);
    while (at as u64) < end {
        let want = ((end - at as u64) as usize).min(pipe.capacity);
        let put = splice(
            fd,
            Some(&mut at),
            pipe.write.as_raw_fd(),
            want,
            libc::SPLICE_F_NONBLOCK,
        );
        let put = moved(put, "splice from file")?;
        drain(stream, pipe, put, (at as u64) < end, timeout).await?;
    }
    Ok(())
}

/// splice(2) of up to `len` bytes from `from` (at `*offset` when given: a
/// file, which the kernel advances) to `to`; the raw result.
fn splice(from: RawFd, offset: Option<&mut i64>, to: RawFd, len: usize, flags: u32) -> isize {
    let off = offset.map_or(std::ptr::null_mut(), |o| o as *mut i64);
    // SAFETY: both descriptors are held open by the callers (a socket, a
    // file or one of our pipe's ends); `off` is null or a live local the
    // caller lends for the call; no user memory is involved.
    unsafe { libc::splice(from, off, to, std::ptr::null_mut(), len, flags) }
}

/// Waits until the socket has bytes (or a close) to read, within `timeout`.
async fn readable(stream: &NonBlocking<'_>, timeout: Duration) -> io::Result<()> {
    match monoio::time::timeout(timeout, stream.stream.readable(false)).await {
        Ok(r) => r,
        Err(_) => Err(io::Error::new(io::ErrorKind::TimedOut, "read timed out")),
    }
}

/// The count a splice call returned; an error for failure or nothing moved
/// (end of file, closed socket).
fn moved(n: isize, what: &str) -> io::Result<usize> {
    match usize::try_from(n) {
        Ok(0) => Err(io::Error::new(
            io::ErrorKind::WriteZero,
            format!("{what} moved nothing"),
        )),
        Ok(n) => Ok(n),
        Err(_) => Err(io::Error::last_os_error()),
    }
}

/// Splices the `n` bytes in `pipe` into `stream`, waiting for room within
/// `timeout`; `more`: further bytes follow (MSG_MORE).
pub(crate) async fn drain(
    stream: &NonBlocking<'_>,
    pipe: &mut Pipe,
    n: usize,
    more: bool,
    timeout: Duration,
) -> io::Result<()> {
    let flags = libc::SPLICE_F_NONBLOCK | if more { libc::SPLICE_F_MORE } else { 0 };
    let mut left = n;
    let (from, to) = (pipe.read.as_raw_fd(), stream.stream.as_raw_fd());
    while left > 0 {
        match moved(splice(from, None, to, left, flags), "splice to socket") {
            Ok(m) => left -= m.min(left),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => writable(stream, timeout).await?,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    //! The receive low-water mark over a real loopback connection: set while
    //! a body is waited for, dropped for a slow stream, put back after.

    use super::*;
    use monoio::io::AsyncWriteRentExt;

    /// The socket's SO_RCVLOWAT.
    fn low_water(stream: &TcpStream) -> libc::c_int {
        let mut value: libc::c_int = 0;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: getsockopt writes at most `len` bytes into the live local
        // `value`; the descriptor is open (borrowed).
        let r = unsafe {
            libc::getsockopt(
                stream.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVLOWAT,
                (&mut value as *mut libc::c_int).cast(),
                &mut len,
            )
        };
        assert_eq!(r, 0, "getsockopt: {}", io::Error::last_os_error());
        value
    }

    /// The origin's writes: each after its pause.
    async fn write_after(mut origin: TcpStream, writes: Vec<(u64, usize)>) -> TcpStream {
        for (pause_ms, n) in writes {
            monoio::time::sleep(Duration::from_millis(pause_ms)).await;
            let (r, _) = origin.write_all(vec![7u8; n]).await;
            r.expect("origin write");
        }
        origin
    }

    #[test]
    fn a_new_pipe_asks_for_the_largest_capacity_the_budget_has_room_for() {
        assert_eq!(ask_for(usize::MAX), Some(LARGE_PIPE_BYTES));
        assert_eq!(ask_for(LARGE_PIPE_BYTES), Some(LARGE_PIPE_BYTES));
        assert_eq!(ask_for(LARGE_PIPE_BYTES - 1), Some(PIPE_BYTES));
        assert_eq!(ask_for(PIPE_BYTES - 1), Some(DEFAULT_PIPE_BYTES));
        assert_eq!(ask_for(DEFAULT_PIPE_BYTES - 1), None);
        assert_eq!(ask_for(0), None);
    }

    #[test]
    fn pipes_are_made_within_the_budget_and_give_it_back_when_closed() {
        let start = LARGE_PIPE_BYTES + DEFAULT_PIPE_BYTES;
        let budget = PipeBudget {
            left: Rc::new(Cell::new(start)),
        };
        let first = budget.pipe().expect("pipe");
        assert!(first.capacity <= LARGE_PIPE_BYTES, "{}", first.capacity);
        assert_eq!(budget.left.get(), start - first.capacity);
        // What is left holds a default pipe at most.
        let mut held = vec![];
        while ask_for(budget.left.get()).is_some() {
            held.push(budget.pipe().expect("pipe"));
        }
        assert!(held.iter().all(|p| p.capacity <= PIPE_BYTES));
        let spent = budget.pipe().err().expect("a pipe past the budget");
        assert_eq!(spent.kind(), io::ErrorKind::OutOfMemory);
        drop(held);
        drop(first);
        assert_eq!(budget.left.get(), start);
    }

    #[test]
    fn a_body_is_waited_for_a_pipeful_at_a_time_and_the_mark_is_put_back() {
        crate::testing::run(async {
            let (ours, origin) = crate::testing::loopback_pair().await;
            assert_eq!(low_water(&ours), 1);
            // 1000 bytes, then the other 3096 a moment later.
            let origin = monoio::spawn(write_after(origin, vec![(5, 1000), (20, 3096)]));
            let mut pipe = PipeBudget::new(1).pipe().expect("pipe");
            {
                let guard = NonBlocking::new(&ours).expect("non-blocking");
                let long = Duration::from_secs(5);
                let n = fill_within(&guard, &mut pipe, 4096, long, long)
                    .await
                    .expect("fill");
                // Woken once, for all of it: not for the first 1000.
                assert_eq!(n, 4096);
                assert_eq!(low_water(&ours), 4096);
            }
            assert_eq!(low_water(&ours), 1, "the mark outlived the body");
            drop(origin.await);
        });
    }

    #[test]
    fn a_slow_stream_s_bytes_are_taken_as_they_come() {
        crate::testing::run(async {
            let (ours, origin) = crate::testing::loopback_pair().await;
            // 1000 bytes, then nothing for a second.
            let origin = monoio::spawn(write_after(origin, vec![(5, 1000), (1000, 3096)]));
            let mut pipe = PipeBudget::new(1).pipe().expect("pipe");
            let guard = NonBlocking::new(&ours).expect("non-blocking");
            let started = std::time::Instant::now();
            let n = fill_within(
                &guard,
                &mut pipe,
                4096,
                Duration::from_secs(5),
                Duration::from_millis(50),
            )
            .await
            .expect("fill");
            assert_eq!(n, 1000);
            assert!(started.elapsed() < Duration::from_millis(900));
            assert_eq!(low_water(&ours), 1);
            drop(guard);
            drop(origin.await);
        });
    }
}
