//! Choosing the I/O driver: io_uring where the kernel allows it, epoll otherwise.
//!
//! `YATAGARASU_DRIVER=auto|io_uring|epoll` (default `auto`); monoio's own
//! `MONOIO_FORCE_LEGACY_DRIVER=1` also forces epoll. Under `auto`, io_uring is
//! used if the kernel supports every operation monoio needs (Docker's default
//! seccomp profile blocks `io_uring_setup`, so containers fall back to epoll).
//! io_uring rings are set up with COOP_TASKRUN + SINGLE_ISSUER + DEFER_TASKRUN
//! (each ring has one thread), falling back to a plain ring on older kernels.

use monoio::blocking::DefaultThreadPool;
use monoio::{IoUringDriver, LegacyDriver, RuntimeBuilder};
use std::future::Future;
use std::sync::OnceLock;

/// One process-wide thread for blocking work (DNS lookups), shared by every
/// runtime so no core ever blocks on the system resolver.
fn blocking_pool() -> Box<DefaultThreadPool> {
    static POOL: OnceLock<DefaultThreadPool> = OnceLock::new();
    Box::new(POOL.get_or_init(|| DefaultThreadPool::new(1)).clone())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
/// The event loop a worker runs.
pub enum Choice {
    /// io_uring (monoio's fusion driver).
    IoUring,
    /// epoll (monoio's legacy driver).
    Epoll,
}

/// Decides once per process, from the environment and the kernel.
pub fn choose() -> Choice {
    let wanted = std::env::var("YATAGARASU_DRIVER")
        .unwrap_or_default()
        .to_ascii_lowercase();
    match wanted.as_str() {
        "epoll" | "legacy" => Choice::Epoll,
        _ if !monoio::utils::detect_uring() => Choice::Epoll,
        _ => Choice::IoUring,
    }
}

fn tuned_uring() -> io_uring::Builder {
    let mut b = io_uring::IoUring::builder();
    b.setup_coop_taskrun()
        .setup_single_issuer()
        .setup_defer_taskrun();
    b
}

/// Builds a runtime for `choice` on this thread and runs `f`'s future on it.
/// `f` receives the driver actually used ("io_uring" or "epoll").
pub fn block_on<F, Fut>(choice: Choice, f: F) -> std::io::Result<Fut::Output>
where
    F: FnOnce(&'static str) -> Fut,
    Fut: Future,
{
    if choice == Choice::IoUring {
        let tuned = RuntimeBuilder::<IoUringDriver>::new()
            .enable_timer()
            .attach_thread_pool(blocking_pool())
            .with_entries(1024)
            .uring_builder(tuned_uring())
            .build();
        let rt = match tuned {
            Ok(rt) => Ok(rt),
            Err(_) => RuntimeBuilder::<IoUringDriver>::new()
                .enable_timer()
                .attach_thread_pool(blocking_pool())
                .with_entries(1024)
                .build(),
        };
        if let Ok(mut rt) = rt {
            crate::http::zerocopy::sockets_are_nonblocking(false);
            return Ok(rt.block_on(f("io_uring")));
        }
    }
    let mut rt = RuntimeBuilder::<LegacyDriver>::new()
        .enable_timer()
        .attach_thread_pool(blocking_pool())
        .build()?;
    crate::http::zerocopy::sockets_are_nonblocking(true);
    Ok(rt.block_on(f("epoll")))
}
