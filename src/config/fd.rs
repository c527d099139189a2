//! The open-file limit and the connection budgets derived from it: the soft
//! limit is raised toward the hard one at start (as HAProxy and the Go
//! runtime do), and `server.max_connections` / `max_upstream_connections`
//! default to what it allows.

/// `server.max_connections` default: what the file-descriptor limit allows,
/// with room for two upstream sockets per client connection and a reserve
/// for listeners, pipes and files (a third of the limit per client, at least 64).
pub fn default_max_connections() -> usize {
    (fd_limit().saturating_sub(64) / 3).max(64)
}

/// `server.max_upstream_connections` default: the descriptors left after
/// the client connections and a reserve of 64 (at least 64).
pub fn default_max_upstream_connections(max_connections: usize) -> usize {
    fd_limit()
        .saturating_sub(64)
        .saturating_sub(max_connections)
        .max(64)
}

/// The open-file limit: soft before and after [`raise_fd_limit`], and hard.
#[derive(Debug, Clone, Copy)]
pub struct FdLimit {
    /// The soft limit the process was started with.
    pub was: u64,
    /// The soft limit now.
    pub soft: u64,
    /// The hard limit (the most the soft one may be raised to).
    pub hard: u64,
}

/// Most the soft open-file limit is raised to (as the Go runtime does).
const FD_RAISE_CAP: u64 = 1 << 20;

/// Raises the soft open-file limit to the hard one (at most 2^20), as
/// HAProxy and the Go runtime do: started from a shell with the usual soft
/// limit of 1024, the default connection budgets (derived from the limit)
/// would admit only about 320 clients. Call before the config is read.
pub fn raise_fd_limit() -> FdLimit {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the valid rlimit struct passed by pointer.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return FdLimit {
            was: 0,
            soft: 0,
            hard: 0,
        };
    }
    let was: u64 = lim.rlim_cur;
    let hard: u64 = lim.rlim_max;
    let want = hard.min(FD_RAISE_CAP).max(was);
    if want > was {
        let raised = libc::rlimit {
            rlim_cur: want,
            rlim_max: lim.rlim_max,
        };
        // SAFETY: setrlimit reads the valid rlimit struct passed by pointer;
        // raising the soft limit up to the hard one needs no privilege.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            return FdLimit {
                was,
                soft: want,
                hard,
            };
        }
    }
    FdLimit {
        was,
        soft: was,
        hard,
    }
}

/// The process's open-file limit (1024 when unknown or unlimited).
fn fd_limit() -> usize {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the valid rlimit struct passed by pointer.
    let ok = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } == 0;
    if ok && lim.rlim_cur != libc::RLIM_INFINITY {
        lim.rlim_cur as usize
    } else {
        1024
    }
}
