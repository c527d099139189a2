//! The systemd side of `Type=notify` (sd_notify(3), the protocol's few
//! lines, no crate): `READY=1` once every worker has started its accept
//! loop, and, when the unit sets `WatchdogSec`, `WATCHDOG=1` every half
//! interval while every worker's tick is fresh. A worker stuck in a busy
//! loop stops ticking; the watchdog then goes unfed and systemd restarts
//! the service. Without `NOTIFY_SOCKET` nothing here runs.

use crate::config::Level;
use crate::log;
use crate::shared::{now_ms, Process};
use std::os::unix::net::UnixDatagram;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

/// Whether every worker ticked within `max_age_ms` of `now_ms` (pure).
pub fn all_fresh(last_ticks: impl IntoIterator<Item = u64>, now_ms: u64, max_age_ms: u64) -> bool {
    last_ticks
        .into_iter()
        .all(|t| t > 0 && now_ms.saturating_sub(t) <= max_age_ms)
}

/// The watchdog interval systemd asks for (`WATCHDOG_USEC`, for this PID).
fn watchdog_interval() -> Option<Duration> {
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.parse().ok()?;
    if let Ok(pid) = std::env::var("WATCHDOG_PID") {
        if pid.parse::<u32>().ok()? != std::process::id() {
            return None;
        }
    }
    (usec > 0).then(|| Duration::from_micros(usec))
}

fn send(socket: &UnixDatagram, path: &str, message: &str) -> std::io::Result<usize> {
    match path.strip_prefix('@') {
        Some(name) => {
            use std::os::linux::net::SocketAddrExt;
            let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())?;
            socket.send_to_addr(message.as_bytes(), &addr)
        }
        None => socket.send_to(message.as_bytes(), path),
    }
}

/// Starts the notifier's thread when systemd (or a test playing it) gave
/// a `NOTIFY_SOCKET`.
pub fn start(process: &Arc<Process>) {
    let Ok(path) = std::env::var("NOTIFY_SOCKET") else {
        return;
    };
    let process = process.clone();
    let _ = std::thread::Builder::new()
        .name("yatagarasu-notify".into())
        .spawn(move || run(&process, &path));
}

fn run(process: &Process, path: &str) {
    let socket = match UnixDatagram::unbound() {
        Ok(s) => s,
        Err(e) => {
            log!(Level::Warn, "sd_notify: no socket", error = e);
            return;
        }
    };
    while !process
        .workers
        .iter()
        .all(|w| w.accepting.load(Ordering::Acquire))
    {
        if process.shutdown.load(Ordering::Relaxed) {
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let ready = format!("READY=1\nSTATUS=serving\nMAINPID={}", std::process::id());
    if let Err(e) = send(&socket, path, &ready) {
        log!(
            Level::Warn,
            "sd_notify: READY=1 not sent",
            socket = path,
            error = e
        );
        return;
    }
    log!(Level::Info, "sd_notify: ready", socket = path);
    let Some(interval) = watchdog_interval() else {
        return;
    };
    let max_age = (interval.as_millis() as u64 / 2).max(1);
    while !process.shutdown.load(Ordering::Relaxed) {
        std::thread::sleep(interval / 2);
        let ticks = process
            .workers
            .iter()
            .map(|w| w.last_tick_ms.load(Ordering::Relaxed));
        if all_fresh(ticks, now_ms(), max_age) {
            let _ = send(&socket, path, "WATCHDOG=1");
        } else {
            log!(
                Level::Error,
                "sd_notify: a worker stopped ticking; the watchdog is not fed"
            );
        }
    }
    let _ = send(&socket, path, "STOPPING=1");
}

#[cfg(test)]
mod tests {
    use super::all_fresh;

    #[test]
    fn the_watchdog_is_fed_only_while_every_worker_ticks() {
        assert!(all_fresh([1000, 1400], 1500, 500));
        assert!(!all_fresh([1000, 900], 1500, 500), "worker 1 is stuck");
        assert!(!all_fresh([0, 1400], 1500, 500), "worker 0 never ticked");
        assert!(all_fresh(Vec::<u64>::new(), 1500, 500));
    }
}
