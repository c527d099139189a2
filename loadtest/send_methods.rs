//! How a body held in memory is best sent to a TCP client (issue #13: "try
//! io_uring send_zc for bodies the proxy holds in memory and report it
//! against plain send"). The same page-aligned, never-written body (as a
//! cache hit's, see `cache::region`) is sent over loopback TCP, many times,
//! with each method:
//!
//! - `send`: plain `send(2)`, the kernel copies the body into the socket;
//! - `vmsplice`: the body's pages into a pipe, the pipe into the socket
//!   (what yatagarasu does for hits of 64 KiB and more);
//! - `send_zc`: io_uring `IORING_OP_SEND_ZC`, the socket keeps references to
//!   the pages until a notification says the kernel let them go.
//!
//! The sender runs on core 0, a reader draining the socket on core 1. Two
//! figures per GiB sent: the sender's CPU (the process's CPU minus the
//! reader thread's, so work done for the sender in io_uring's own threads
//! counts too) and the whole machine's (every core's busy time from
//! /proc/stat: loopback's receive work and the reader included, wherever
//! the kernel charged it), each with its ratio against `send`. The machine
//! should be otherwise idle for the second.
//!
//! usage: send-methods [body bytes ...]   (default: 65536 1048576)

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::time::Instant;

/// Bytes each method sends per body size (enough for a steady figure).
const TOTAL: usize = 4 << 30;

fn main() {
    let sizes: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let sizes = if sizes.is_empty() {
        vec![64 * 1024, 1024 * 1024]
    } else {
        sizes
    };
    pin(0);
    println!("| body | method | MiB/s | sender CPU ms per GiB | vs send | machine CPU ms per GiB | vs send |");
    println!("|---|---|---|---|---|---|---|");
    for size in sizes {
        let body = Body::new(size);
        let mut base = None;
        for method in [Method::Send, Method::Vmsplice, Method::SendZc] {
            match run(method, &body) {
                Ok(r) => {
                    let (b_sender, b_machine) = *base.get_or_insert((r.sender, r.machine));
                    println!(
                        "| {} KiB | {} | {:.0} | {:.1} | {:.2}x | {:.1} | {:.2}x |",
                        size / 1024,
                        method.name(),
                        r.mib_s,
                        r.sender,
                        r.sender / b_sender,
                        r.machine,
                        r.machine / b_machine,
                    );
                }
                Err(e) => println!(
                    "| {} KiB | {} | failed: {e} | | |",
                    size / 1024,
                    method.name()
                ),
            }
        }
    }
}

#[derive(Clone, Copy)]
enum Method {
    Send,
    Vmsplice,
    SendZc,
}

impl Method {
    fn name(self) -> &'static str {
        match self {
            Method::Send => "send",
            Method::Vmsplice => "vmsplice + splice",
            Method::SendZc => "io_uring send_zc",
        }
    }
}

/// A body as the cache stores a large one: in a mapping of its own
/// (`cache::region`), filled once, never written again, so its pages may
/// be lent to the kernel.
struct Body(yatagarasu::cache::region::Body);

impl Body {
    fn new(len: usize) -> Body {
        let mut region = yatagarasu::cache::region::Region::new(len).expect("mapping");
        let bytes: Vec<u8> = (0..len).map(|i| (i * 7 + 3) as u8).collect();
        assert!(
            region.extend_from_slice(&bytes),
            "the mapping holds the body"
        );
        Body(region.freeze())
    }

    fn bytes(&self) -> &[u8] {
        self.0.mapped().expect("a body in a mapping of its own")
    }

    fn len(&self) -> usize {
        self.0.len()
    }
}

fn pin(core: usize) {
    if let Some(id) = core_affinity::get_core_ids().and_then(|ids| ids.into_iter().nth(core)) {
        core_affinity::set_for_current(id);
    }
}

fn cpu(who: libc::c_int) -> f64 {
    // SAFETY: rusage is plain integers, for which all zeroes is valid.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: getrusage writes the struct we pass, a live local.
    unsafe { libc::getrusage(who, &mut u) };
    let t = |v: libc::timeval| v.tv_sec as f64 + v.tv_usec as f64 / 1e6;
    t(u.ru_utime) + t(u.ru_stime)
}

/// Busy time of every core so far (seconds, from /proc/stat).
fn machine_busy() -> f64 {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let Some(line) = stat.lines().next() else {
        return 0.0;
    };
    // cpu user nice system idle iowait irq softirq steal ...
    let v: Vec<f64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    let busy: f64 = [0, 1, 2, 5, 6].iter().filter_map(|&i| v.get(i)).sum();
    // SAFETY: sysconf has no memory effects.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    busy / hz
}

/// One method's figures.
struct Figures {
    mib_s: f64,
    /// Sender CPU, ms per GiB.
    sender: f64,
    /// Every core's busy time, ms per GiB.
    machine: f64,
}

/// Sends `TOTAL` bytes as bodies with `method`.
fn run(method: Method, body: &Body) -> std::io::Result<Figures> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let reader = std::thread::spawn(move || -> std::io::Result<f64> {
        pin(1);
        let (mut s, _) = listener.accept()?;
        let mut buf = vec![0u8; 256 * 1024];
        let mut got = 0usize;
        while got < TOTAL {
            let n = s.read(&mut buf)?;
            if n == 0 {
                break;
            }
            got += n;
        }
        s.write_all(b"k")?;
        Ok(cpu(libc::RUSAGE_THREAD))
    });
    let mut s = TcpStream::connect(addr)?;
    s.set_nodelay(true)?;
    let rounds = TOTAL / body.len();
    let (cpu0, busy0, t0) = (cpu(libc::RUSAGE_SELF), machine_busy(), Instant::now());
    match method {
        Method::Send => {
            for _ in 0..rounds {
                s.write_all(body.bytes())?;
            }
        }
        Method::Vmsplice => send_vmsplice(&s, body, rounds)?,
        Method::SendZc => send_zc(&s, body, rounds)?,
    }
    let mut ack = [0u8; 1];
    s.read_exact(&mut ack)?;
    let elapsed = t0.elapsed().as_secs_f64();
    let busy = machine_busy() - busy0;
    let reader_cpu = reader
        .join()
        .map_err(|_| std::io::Error::other("reader panicked"))??;
    let sender_cpu = cpu(libc::RUSAGE_SELF) - cpu0 - reader_cpu;
    let gib = (rounds * body.len()) as f64 / (1u64 << 30) as f64;
    Ok(Figures {
        mib_s: gib * 1024.0 / elapsed,
        sender: sender_cpu * 1000.0 / gib,
        machine: busy * 1000.0 / gib,
    })
}

fn send_vmsplice(s: &TcpStream, body: &Body, rounds: usize) -> std::io::Result<()> {
    let mut fds = [0 as libc::c_int; 2];
    // SAFETY: `fds` has room for the two descriptors pipe2 writes.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fcntl on the pipe just made; failure leaves the default size.
    let cap = unsafe {
        libc::fcntl(fds[1], libc::F_SETPIPE_SZ, 256 * 1024);
        libc::fcntl(fds[1], libc::F_GETPIPE_SZ)
    }
    .max(4096) as usize;
    let bytes = body.bytes();
    let result = (|| {
        for _ in 0..rounds {
            let mut off = 0;
            while off < bytes.len() {
                let want = (bytes.len() - off).min(cap);
                let iov = libc::iovec {
                    iov_base: bytes[off..].as_ptr() as *mut libc::c_void,
                    iov_len: want,
                };
                // SAFETY: the iovec covers readable bytes of the body, whose
                // pages are never written while the kernel may hold them.
                let put = unsafe { libc::vmsplice(fds[1], &iov, 1, 0) };
                if put <= 0 {
                    return Err(std::io::Error::last_os_error());
                }
                let mut left = put as usize;
                while left > 0 {
                    let more = if off + (put as usize) < bytes.len() {
                        libc::SPLICE_F_MORE
                    } else {
                        0
                    };
                    // SAFETY: splice between two descriptors we own; no
                    // memory is passed.
                    let n = unsafe {
                        libc::splice(
                            fds[0],
                            std::ptr::null_mut(),
                            s.as_raw_fd(),
                            std::ptr::null_mut(),
                            left,
                            more,
                        )
                    };
                    if n <= 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    left -= n as usize;
                }
                off += put as usize;
            }
        }
        Ok(())
    })();
    // SAFETY: closing the pipe's two descriptors, ours alone.
    unsafe {
        libc::close(fds[0]);
        libc::close(fds[1]);
    }
    result
}

/// IORING_CQE_F_NOTIF: the kernel no longer holds a send_zc's pages.
const CQE_F_NOTIF: u32 = 1 << 3;

fn send_zc(s: &TcpStream, body: &Body, rounds: usize) -> std::io::Result<()> {
    use io_uring::{cqueue, opcode, types, IoUring};
    let mut ring = IoUring::new(8)?;
    let bytes = body.bytes();
    let fd = types::Fd(s.as_raw_fd());
    // Notifications still to come: the body may be unmapped only when none is.
    let mut notes = 0usize;
    for _ in 0..rounds {
        let mut off = 0usize;
        while off < bytes.len() {
            let want = (bytes.len() - off).min(u32::MAX as usize) as u32;
            let sqe = opcode::SendZc::new(fd, bytes[off..].as_ptr(), want)
                .build()
                .user_data(1);
            // SAFETY: the buffer is the body's mapping, alive and unwritten
            // until every notification has come (waited for below).
            unsafe { ring.submission().push(&sqe) }
                .map_err(|_| std::io::Error::other("submission queue full"))?;
            ring.submit_and_wait(1)?;
            let mut sent = None;
            while sent.is_none() {
                for cqe in ring.completion() {
                    if cqe.flags() & CQE_F_NOTIF != 0 {
                        notes -= 1;
                        continue;
                    }
                    if cqe.result() < 0 {
                        return Err(std::io::Error::from_raw_os_error(-cqe.result()));
                    }
                    if cqueue::more(cqe.flags()) {
                        notes += 1;
                    }
                    sent = Some(cqe.result() as usize);
                }
                if sent.is_none() {
                    ring.submit_and_wait(1)?;
                }
            }
            match sent {
                Some(0) | None => return Err(std::io::Error::other("send_zc sent nothing")),
                Some(n) => off += n,
            }
        }
    }
    while notes > 0 {
        ring.submit_and_wait(1)?;
        for cqe in ring.completion() {
            if cqe.flags() & CQE_F_NOTIF != 0 {
                notes -= 1;
            }
        }
    }
    Ok(())
}
