//! Upgrading the binary without a dropped request (SIGUSR2), as nginx does:
//! the running process hands its listening sockets to a new process started
//! from the binary now at the same path, and drains once that one serves.
//!
//! 1. SIGUSR2: the old process duplicates its listeners (one
//!    `SO_REUSEPORT` socket per worker, and the metrics listener) without
//!    close-on-exec and starts `<its executable path> <its arguments>` with
//!    `YATAGARASU_LISTEN_FDS` naming them and `YATAGARASU_UPGRADE_FROM`
//!    its pid. It keeps serving meanwhile.
//! 2. The new process adopts those sockets instead of binding (the same
//!    sockets: their accept queues, with every connection the kernel has
//!    queued, carry over), starts its workers, and once every worker
//!    accepts sends SIGTERM to the old process (and `MAINPID=` to systemd).
//! 3. The old process drains: it stops accepting (its copies of the sockets
//!    close; the new process's stay open, so nothing queued is reset),
//!    answers requests in flight with `Connection: close`, closes keep-alive
//!    connections idle for a second, and exits once its connections are
//!    gone or `shutdown_timeout_seconds` passed.
//!
//! A new process that fails (bad binary, invalid config) exits; the old one
//! logs it and serves on. The worker count cannot change across an upgrade
//! (sockets beyond the new count are closed, with a WARN); everything else
//! in the config may. Carried over: the disk cache (the new process reads
//! its index at start), nothing in memory (breakers start closed, the
//! memory tier empty).

use crate::config::Level;
use crate::log;
use std::os::fd::{FromRawFd, RawFd};

/// Names the inherited listeners: `w=3,4;m=5` (workers', then metrics').
pub const LISTEN_FDS: &str = "YATAGARASU_LISTEN_FDS";
/// The pid of the process to stop once this one serves.
pub const UPGRADE_FROM: &str = "YATAGARASU_UPGRADE_FROM";

/// The listening sockets handed over by an upgrade.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Inherited {
    /// One per worker of the old process.
    pub workers: Vec<RawFd>,
    /// The metrics listener, if it had one.
    pub metrics: Option<RawFd>,
}

/// Reads `w=3,4;m=5`.
pub fn parse(value: &str) -> Result<Inherited, String> {
    let mut out = Inherited::default();
    for part in value.split(';').filter(|p| !p.is_empty()) {
        let (kind, fds) = part
            .split_once('=')
            .ok_or_else(|| format!("{LISTEN_FDS}: {part:?} is not kind=fds"))?;
        let fds = fds
            .split(',')
            .filter(|f| !f.is_empty())
            .map(|f| {
                f.parse::<RawFd>()
                    .ok()
                    .filter(|&n| n > 2)
                    .ok_or_else(|| format!("{LISTEN_FDS}: {f:?} is not a descriptor"))
            })
            .collect::<Result<Vec<_>, _>>()?;
        match kind {
            "w" => out.workers = fds,
            "m" => out.metrics = fds.first().copied(),
            other => return Err(format!("{LISTEN_FDS}: unknown kind {other:?}")),
        }
    }
    Ok(out)
}

/// Writes what [`parse`] reads.
pub fn format(i: &Inherited) -> String {
    let workers: Vec<String> = i.workers.iter().map(|f| f.to_string()).collect();
    let mut out = format!("w={}", workers.join(","));
    if let Some(m) = i.metrics {
        out.push_str(&format!(";m={m}"));
    }
    out
}

/// The listeners this process was handed, if it was started by an upgrade
/// (the variable is removed, so its own children do not see it).
pub fn inherited() -> Option<Result<Inherited, String>> {
    let value = std::env::var(LISTEN_FDS).ok()?;
    // SAFETY: called once at start, before any other thread exists.
    unsafe { std::env::remove_var(LISTEN_FDS) };
    Some(parse(&value))
}

/// Takes ownership of an inherited listening socket, checking that it is
/// one: `None` (and the descriptor closed) when it is not. `nonblocking`
/// must be what the old process set: the flag belongs to the socket both
/// processes share, and the old one still accepts on it meanwhile.
pub fn adopt(fd: RawFd, nonblocking: bool) -> Option<std::net::TcpListener> {
    // SAFETY: the descriptor was handed to this process by its parent for
    // this purpose and nothing else in the process owns it; it is owned by
    // the listener from here on.
    let socket = unsafe { socket2::Socket::from_raw_fd(fd) };
    let listening = socket.r#type().ok() == Some(socket2::Type::STREAM)
        && socket.local_addr().is_ok()
        // SO_ACCEPTCONN: a listening socket.
        && socket.is_listener().unwrap_or(false);
    if !listening {
        return None;
    }
    let _ = socket.set_cloexec(true);
    let _ = socket.set_nonblocking(nonblocking);
    Some(socket.into())
}

/// Starts the new process with duplicates of `listeners` and `metrics`;
/// returns its pid. A thread waits for it and logs if it ends before this
/// process does.
pub fn spawn(
    exe: &std::path::Path,
    listeners: &[RawFd],
    metrics: Option<RawFd>,
) -> Result<u32, String> {
    let dup = |fd: RawFd| {
        // SAFETY: dup(2) on a descriptor this process holds open (the
        // workers' listeners live until the process drains, and upgrades
        // are refused once it does); the duplicate has no close-on-exec.
        let d = unsafe { libc::dup(fd) };
        if d < 0 {
            Err(format!("dup({fd}): {}", std::io::Error::last_os_error()))
        } else {
            Ok(d)
        }
    };
    let mut handed = Inherited::default();
    let close_all = |h: &Inherited| {
        for &fd in h.workers.iter().chain(h.metrics.iter()) {
            // SAFETY: our own duplicates, closed once the child has them.
            unsafe { libc::close(fd) };
        }
    };
    for &fd in listeners {
        match dup(fd) {
            Ok(d) => handed.workers.push(d),
            Err(e) => {
                close_all(&handed);
                return Err(e);
            }
        }
    }
    if let Some(m) = metrics {
        match dup(m) {
            Ok(d) => handed.metrics = Some(d),
            Err(e) => {
                close_all(&handed);
                return Err(e);
            }
        }
    }
    let mut keep: Vec<RawFd> = handed
        .workers
        .iter()
        .chain(handed.metrics.iter())
        .copied()
        .collect();
    keep.sort_unstable();
    let mut command = std::process::Command::new(exe);
    command
        .args(std::env::args_os().skip(1))
        .env(LISTEN_FDS, format(&handed))
        .env(UPGRADE_FROM, std::process::id().to_string());
    {
        use std::os::unix::process::CommandExt;
        // SAFETY: between fork and exec the closure only makes close_range
        // and close calls (async-signal-safe) and allocates nothing (`keep`
        // was built before the fork).
        unsafe {
            command.pre_exec(move || {
                close_all_but(&keep);
                Ok(())
            });
        }
    }
    let spawned = command.spawn();
    close_all(&handed);
    let mut child = spawned.map_err(|e| format!("cannot start {}: {e}", exe.display()))?;
    let pid = child.id();
    let _ = std::thread::Builder::new()
        .name("yatagarasu-upgrade".into())
        .spawn(move || {
            if let Ok(status) = child.wait() {
                log!(
                    Level::Error,
                    "The upgraded process exited; this one keeps serving",
                    pid = pid,
                    status = status,
                );
            }
        });
    Ok(pid)
}

/// Closes every descriptor above stderr but `keep` (sorted): the new
/// process must hold no copy of this one's client or upstream connections,
/// some of which descriptors lack close-on-exec (the runtime's accept does
/// not set it). A leaked copy keeps a connection open after this process
/// closed it, and a request sent on it is never read.
fn close_all_but(keep: &[RawFd]) {
    let mut from: libc::c_uint = 3;
    for &fd in keep {
        let fd = fd as libc::c_uint;
        if fd > from {
            close_range(from, fd - 1);
        }
        from = fd + 1;
    }
    close_range(from, libc::c_uint::MAX);
}

/// close_range(2), or one close(2) per descriptor up to the open-file limit
/// where the kernel has no close_range (before 5.9).
fn close_range(first: libc::c_uint, last: libc::c_uint) {
    // SAFETY: closes descriptors of this (forked, about to exec) process.
    let r = unsafe { libc::syscall(libc::SYS_close_range, first, last, 0) };
    if r == 0 {
        return;
    }
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit into a valid struct.
    let max = match unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } {
        0 => limit.rlim_cur.min(1 << 20) as libc::c_uint,
        _ => 65_536,
    };
    for fd in first..=last.min(max) {
        // SAFETY: as above; a descriptor that is not open gives EBADF.
        unsafe { libc::close(fd as libc::c_int) };
    }
}

/// Once this process serves, stops the one it took over from.
pub fn take_over(from: u32) {
    log!(
        Level::Info,
        "Upgrade: serving; stopping the previous process",
        pid = std::process::id(),
        previous = from,
    );
    // SAFETY: kill(2) with a pid our parent gave us and a valid signal.
    let sent = unsafe { libc::kill(from as libc::pid_t, libc::SIGTERM) };
    if sent != 0 {
        log!(
            Level::Warn,
            "Upgrade: the previous process could not be signalled",
            previous = from,
            error = std::io::Error::last_os_error(),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_handed_descriptors_read_back() {
        let i = Inherited {
            workers: vec![7, 8, 9],
            metrics: Some(10),
        };
        assert_eq!(parse(&format(&i)), Ok(i));
        let none = Inherited {
            workers: vec![4],
            metrics: None,
        };
        assert_eq!(parse(&format(&none)), Ok(none));
        assert!(parse("w=1").is_err(), "stdio is never a listener");
        assert!(parse("w=x").is_err());
        assert!(parse("q=5").is_err());
    }
}
