//! Process layout: one pinned monoio runtime per worker, each with its own
//! `SO_REUSEPORT` listener, connection pool and metrics; plus a health-prober
//! thread, a metrics-endpoint thread, and the main thread waiting for signals.
//!
//! Shutdown (SIGTERM/SIGINT): every worker stops accepting, answers with
//! `Connection: close` from then on, and the process exits once no request is
//! in flight or `server.shutdown_timeout_seconds` has passed.

pub mod admin;
pub mod driver;
pub mod metrics_http;
mod systemd;
pub mod upgrade;

use crate::config::{Config, Level};
use crate::log;
use crate::proxy::Core;
use crate::shared::{Generation, Process};
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, RawFd};
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How often each worker checks for shutdown, scrape requests and log flushing.
const TICK: Duration = Duration::from_millis(20);
/// While draining, keep-alive connections idle this long are closed.
const DRAIN_IDLE: Duration = Duration::from_secs(1);

fn bind_reuseport(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    if addr.is_ipv6() {
        let _ = socket.set_only_v6(false);
    }
    socket.bind(&addr.into())?;
    socket.listen(4096)?;
    socket.set_nonblocking(true)?;
    Ok(socket.into())
}

/// What the embedding code tells a running server (signals, or a test).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Control {
    /// Re-read the configuration file (SIGHUP).
    Reload,
    /// Stop accepting, drain, return (SIGTERM, SIGINT).
    Stop,
    /// Hand the listeners to a new process from the binary at the same
    /// path, which stops this one once it serves (SIGUSR2; `upgrade`).
    Upgrade,
}

/// A proxy with its sockets bound and its process state built, not yet
/// serving. `bind` reports a taken port before any thread starts.
pub struct Bound {
    process: Arc<Process>,
    listeners: Vec<std::net::TcpListener>,
    metrics_listener: Option<std::net::TcpListener>,
    acceptor: Option<crate::tls::TlsAcceptor>,
    address: SocketAddr,
}

impl Bound {
    /// Binds one `SO_REUSEPORT` listener per worker (port 0 picks one port for
    /// all), the metrics listener, builds the listener TLS acceptor once, and
    /// the first configuration generation.
    pub fn bind(config: Config, config_path: &str) -> Result<Bound, String> {
        let mut address = config.server.address;
        let mut listeners = Vec::with_capacity(config.server.workers);
        let mut inherited = match upgrade::inherited() {
            None => upgrade::Inherited::default(),
            Some(Ok(i)) => i,
            Some(Err(e)) => return Err(e),
        };
        let handed = inherited.workers.len();
        // An upgrade's sockets first (the same sockets, their queues intact).
        for fd in std::mem::take(&mut inherited.workers) {
            let adopted = upgrade::adopt(fd, true).filter(|l| {
                l.local_addr()
                    .is_ok_and(|a| address.port() == 0 || a.port() == address.port())
            });
            match adopted {
                Some(l) if listeners.len() < config.server.workers => {
                    if address.port() == 0 {
                        address = l
                            .local_addr()
                            .map_err(|e| format!("listener address: {e}"))?;
                    }
                    listeners.push(l);
                }
                Some(_) => log!(
                    Level::Warn,
                    "Upgrade: more listeners handed over than workers; the extra one is closed (server.workers changed)",
                ),
                None => log!(
                    Level::Warn,
                    "Upgrade: a handed descriptor is not a listener on this address; ignored",
                    fd = fd,
                ),
            }
        }
        if handed > 0 {
            log!(
                Level::Info,
                "Upgrade: took over the listeners",
                pid = std::process::id(),
                listeners = listeners.len(),
            );
        }
        while listeners.len() < config.server.workers {
            let l =
                bind_reuseport(address).map_err(|e| format!("cannot listen on {address}: {e}"))?;
            if address.port() == 0 {
                address = l
                    .local_addr()
                    .map_err(|e| format!("listener address: {e}"))?;
            }
            listeners.push(l);
        }
        let metrics_listener = match (config.metrics.enabled, inherited.metrics) {
            (false, _) => None,
            (true, Some(fd)) => match upgrade::adopt(fd, false) {
                Some(l) => Some(l),
                None => {
                    return Err("Upgrade: the handed metrics descriptor is not a listener".into())
                }
            },
            (true, None) => Some(std::net::TcpListener::bind(config.metrics.address).map_err(
                |e| {
                    format!(
                        "cannot listen for metrics on {}: {e}",
                        config.metrics.address
                    )
                },
            )?),
        };
        let acceptor = match &config.server.tls {
            None => None,
            Some(t) => Some(crate::tls::acceptor(&t.cert_file, &t.key_file)?),
        };
        let process = Process::start(config, config_path)?;
        Ok(Bound {
            process,
            listeners,
            metrics_listener,
            acceptor,
            address,
        })
    }

    /// The address the proxy listens on (the bound port when 0 was asked).
    pub fn local_addr(&self) -> SocketAddr {
        self.address
    }

    /// The metrics endpoint's address, when enabled.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_listener
            .as_ref()
            .and_then(|l| l.local_addr().ok())
    }

    /// Starts the workers, the prober and the metrics endpoint, then obeys
    /// `control` until it says [`Control::Stop`] (or ends): stops accepting,
    /// drains in-flight requests (bounded by `shutdown_timeout_seconds`) and
    /// returns the exit code. Core threads end with the process.
    pub fn run_until(self, control: impl IntoIterator<Item = Control>) -> i32 {
        let Bound {
            process,
            listeners,
            metrics_listener,
            acceptor,
            address,
        } = self;
        warn_insecure(&process.current());
        // Kept for an upgrade: the descriptors stay open while the workers
        // accept (upgrades are refused once draining began).
        let listener_fds: Vec<RawFd> = listeners.iter().map(AsRawFd::as_raw_fd).collect();
        let metrics_fd = metrics_listener.as_ref().map(AsRawFd::as_raw_fd);
        // Read now: an upgrade replaces the file at this path.
        let exe = std::env::current_exe();
        start_helpers(&process, metrics_listener);
        wait_for_the_fleet(&process);
        if let Err(e) = start_workers(&process, listeners, acceptor) {
            log!(Level::Error, "cannot start worker thread", error = e);
            return 1;
        }
        systemd::start(&process);
        log_listening(&process, address);
        take_over_when_serving(&process);
        for c in control {
            match c {
                Control::Reload => {
                    let _ = reload(&process);
                }
                Control::Upgrade => match &exe {
                    Ok(exe) => match upgrade::spawn(exe, &listener_fds, metrics_fd) {
                        Ok(pid) => log!(
                            Level::Info,
                            "Upgrade: started the new process; serving until it takes over",
                            binary = exe.display(),
                            pid = pid,
                        ),
                        Err(e) => log!(Level::Error, "Upgrade failed; serving on", error = e),
                    },
                    Err(e) => log!(Level::Error, "Upgrade: own executable unknown", error = e),
                },
                Control::Stop => break,
            }
        }
        log!(Level::Info, "Shutdown requested, draining");
        drain(&process);
        if let Some(audit) = &process.audit {
            // The cores' last batches (they hand them over each tick),
            // then whatever the writer buffers, on disk before exit.
            std::thread::sleep(Duration::from_millis(100));
            audit.flush(Duration::from_secs(2));
        }
        0
    }
}

/// Started by an upgrade: once every worker accepts, stops the process it
/// took over from (see `upgrade`).
fn take_over_when_serving(process: &Arc<Process>) {
    let Some(from) = std::env::var(upgrade::UPGRADE_FROM)
        .ok()
        .and_then(|v| v.parse::<u32>().ok())
    else {
        return;
    };
    let process = process.clone();
    let _ = std::thread::Builder::new()
        .name("yatagarasu-takeover".into())
        .spawn(move || {
            while !process
                .workers
                .iter()
                .all(|w| w.accepting.load(Ordering::Acquire))
            {
                std::thread::sleep(Duration::from_millis(5));
            }
            upgrade::take_over(from);
        });
}

/// Runs the proxy until SIGTERM or SIGINT (SIGHUP reloads, SIGUSR2
/// upgrades); returns the exit code.
pub fn run(config: Config, config_path: &str) -> i32 {
    let server = match Bound::bind(config, config_path) {
        Ok(s) => s,
        Err(e) => {
            log!(Level::Error, "cannot start", error = e);
            return 1;
        }
    };
    let mut signals = match signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGTERM,
        signal_hook::consts::SIGINT,
        signal_hook::consts::SIGHUP,
        signal_hook::consts::SIGUSR2,
    ]) {
        Ok(s) => s,
        Err(e) => {
            log!(Level::Error, "cannot install signal handlers", error = e);
            return 1;
        }
    };
    let control = signals.forever().map(|sig| match sig {
        signal_hook::consts::SIGHUP => Control::Reload,
        signal_hook::consts::SIGUSR2 => Control::Upgrade,
        _ => Control::Stop,
    });
    server.run_until(control)
}

/// One pinned worker thread per listener.
fn start_workers(
    process: &Arc<Process>,
    listeners: Vec<std::net::TcpListener>,
    acceptor: Option<crate::tls::TlsAcceptor>,
) -> std::io::Result<()> {
    let choice = driver::choose();
    let cores = core_affinity::get_core_ids().unwrap_or_default();
    for (i, listener) in listeners.into_iter().enumerate() {
        let process = process.clone();
        let tls = acceptor.clone();
        let core = if cores.is_empty() {
            None
        } else {
            Some(cores[i % cores.len()])
        };
        let spawned = std::thread::Builder::new()
            .name(format!("yatagarasu-w{i}"))
            .spawn(move || {
                let pinned = core.is_some_and(core_affinity::set_for_current);
                log::buffer_this_thread();
                let result = driver::block_on(choice, |used| {
                    log!(
                        Level::Info,
                        "Worker started",
                        worker = i,
                        driver = used,
                        core = core.map_or("-".to_string(), |c| c.id.to_string()),
                        pinned = pinned,
                    );
                    log::flush();
                    worker_main(i, process, listener, tls)
                });
                if let Err(e) = result {
                    log!(Level::Error, "worker runtime failed", worker = i, error = e);
                    log::flush();
                    std::process::exit(1);
                }
            });
        spawned?;
    }
    Ok(())
}

/// The health prober's thread and the metrics endpoint's thread.
/// With a Redis tier, the cores start serving once the fleet thread has
/// read the fleet's purge count (or Redis did not answer in time): a copy
/// made before then would be dropped when it is read (the instance could
/// not know which purges it missed).
fn wait_for_the_fleet(process: &Process) {
    let Some(tier) = &process.redis else {
        return;
    };
    let deadline =
        std::time::Instant::now() + tier.settings.connect_timeout + tier.settings.operation_timeout;
    while !tier.knows_fleet_epoch() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn start_helpers(process: &Arc<Process>, metrics_listener: Option<std::net::TcpListener>) {
    let choice = driver::choose();
    let prober = process.clone();
    let _ = std::thread::Builder::new()
        .name("yatagarasu-health".into())
        .spawn(move || {
            if let Err(e) = driver::block_on(choice, |_| crate::upstream::health::run(prober)) {
                log!(Level::Error, "health checker failed to start", error = e);
            }
        });
    if let Some(l) = metrics_listener {
        let process = process.clone();
        let _ = std::thread::Builder::new()
            .name("yatagarasu-metrics".into())
            .spawn(move || metrics_http::serve(l, process));
    }
    // The disk cache's writer: its own monoio runtime (io_uring where allowed).
    let queue = match process.disk_queue.lock() {
        Ok(mut q) => q.take(),
        Err(poisoned) => poisoned.into_inner().take(),
    };
    if let (Some(disk), Some(rx)) = (process.disk.clone(), queue) {
        let writer = process.clone();
        let _ = std::thread::Builder::new()
            .name("yatagarasu-disk".into())
            .spawn(move || {
                let epoch = || writer.cache.as_ref().map_or(0, |c| c.purge_epoch());
                if let Err(e) = driver::block_on(choice, |_| disk.run_writer(rx, epoch)) {
                    log!(Level::Error, "disk cache writer failed to start", error = e);
                }
            });
    }
    // The Redis tier's writer: its own runtime, off the cores.
    let queue = match process.redis_queue.lock() {
        Ok(mut q) => q.take(),
        Err(poisoned) => poisoned.into_inner().take(),
    };
    if let (Some(tier), Some(rx)) = (process.redis.clone(), queue) {
        let writer = process.clone();
        let writes = tier.clone();
        let _ = std::thread::Builder::new()
            .name("yatagarasu-redis".into())
            .spawn(move || {
                let epoch = || writer.cache.as_ref().map_or(0, |c| c.purge_epoch());
                if let Err(e) = driver::block_on(choice, |_| writes.run_writer(rx, epoch)) {
                    log!(
                        Level::Error,
                        "Redis cache writer failed to start",
                        error = e
                    );
                }
            });
        // Purges from the fleet, applied to this instance's tiers.
        let fleet = process.clone();
        let _ = std::thread::Builder::new()
            .name("yatagarasu-fleet".into())
            .spawn(move || {
                let purge = |prefix: &str| {
                    let (memory, disk) = fleet.purge_local(prefix);
                    memory + disk
                };
                let items = || fleet.local_items();
                let stop = || fleet.shutdown.load(Ordering::Relaxed);
                if let Err(e) = driver::block_on(choice, |_| tier.run_fleet(purge, items, stop)) {
                    log!(
                        Level::Error,
                        "Redis purge follower failed to start",
                        error = e
                    );
                }
            });
    }
    // Signing credentials other than static keys, fetched off the cores.
    let hub = process.credentials.clone();
    let stopper = process.clone();
    let _ = std::thread::Builder::new()
        .name("yatagarasu-credentials".into())
        .spawn(move || crate::credentials::fetch::run(hub, &stopper.shutdown));
    // JWKS keys, fetched off the cores; idles while no jwks_url is set.
    let fetcher = process.clone();
    let _ = std::thread::Builder::new()
        .name("yatagarasu-jwks".into())
        .spawn(move || {
            let settings = || {
                fetcher
                    .current()
                    .config
                    .jwt
                    .as_ref()
                    .and_then(|j| j.jwks.clone())
            };
            crate::access::jwks::run(fetcher.jwks.clone(), settings, &fetcher.shutdown)
        });
}

fn log_listening(process: &Process, address: SocketAddr) {
    let first = process.current();
    log!(
        Level::Info,
        "Yatagarasu listening",
        address = address,
        workers = first.config.server.workers,
        metrics = if first.config.metrics.enabled {
            first.config.metrics.address.to_string()
        } else {
            "off".into()
        },
        buckets = first.config.buckets.len(),
    );
}

/// Stops every worker accepting and waits for in-flight requests, bounded by
/// `server.shutdown_timeout_seconds`.
fn drain(process: &Process) {
    process.shutdown.store(true, Ordering::SeqCst);
    let deadline = Instant::now() + process.current().config.server.shutdown_timeout;
    loop {
        let stopped = process
            .workers
            .iter()
            .all(|s| s.stopped_accepting.load(Ordering::SeqCst));
        let in_flight = process.in_flight();
        // Every connection gone: requests in flight answered with
        // `Connection: close`, idle ones closed after a second (`tick`).
        if stopped && in_flight == 0 && process.open_connections() <= 0 {
            break;
        }
        if Instant::now() >= deadline {
            log!(
                Level::Warn,
                "Drain timed out; exiting with requests in flight",
                in_flight = in_flight
            );
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    // Give workers one tick to flush their buffered log lines.
    std::thread::sleep(TICK * 2);
    log!(
        Level::Info,
        "Shutdown complete",
        open_connections = process.open_connections(),
        in_flight = process.in_flight(),
    );
}

/// SIGHUP (and `POST /admin/reload`): re-read the config file; keep the
/// running one if it is invalid. Returns the new bucket and replica
/// counts, or every problem.
pub(crate) fn reload(process: &Arc<Process>) -> Result<(usize, usize), Vec<String>> {
    log!(
        Level::Info,
        "Reloading configuration",
        config = process.config_path
    );
    match process.reload() {
        Ok(gen) => {
            crate::log::init(gen.config.logging.level, gen.config.logging.format);
            warn_insecure(&gen);
            log!(
                Level::Info,
                "Configuration reloaded",
                buckets = gen.config.buckets.len(),
                replicas = gen.replicas.len(),
            );
            Ok((gen.config.buckets.len(), gen.replicas.len()))
        }
        Err(errors) => {
            log!(
                Level::Error,
                "Configuration reload rejected; keeping the running configuration",
                problems = errors.join("; "),
            );
            Err(errors)
        }
    }
}

fn warn_insecure(gen: &Generation) {
    for r in &gen.replicas {
        if r.config.insecure_skip_verify {
            log!(
                Level::Warn,
                "TLS certificate verification is OFF for this replica (insecure_skip_verify)",
                bucket = gen.bucket(r.bucket).name,
                replica = r.config.name,
                endpoint = r.config.endpoint.authority,
            );
        }
    }
}

async fn worker_main(
    id: usize,
    process: Arc<Process>,
    listener: std::net::TcpListener,
    tls: Option<crate::tls::TlsAcceptor>,
) {
    let listen_fd = listener.as_raw_fd();
    let listener = match monoio::net::TcpListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => {
            log!(
                Level::Error,
                "cannot adopt listener",
                worker = id,
                error = e
            );
            log::flush();
            std::process::exit(1);
        }
    };
    let core = Core::new(id, process.clone());
    let shared = process.current();
    let tls = tls.map(Rc::new);
    {
        let core = core.clone();
        monoio::spawn(async move {
            loop {
                monoio::time::sleep(TICK).await;
                tick(&core);
                if core.process.shutdown.load(Ordering::Relaxed) && !core.draining.get() {
                    core.draining.set(true);
                }
            }
        });
    }
    monoio::spawn(core.clone().watch_lot());
    // This worker's share of server.max_connections (rounded up).
    let limit = shared
        .config
        .server
        .max_connections
        .div_ceil(shared.config.server.workers.max(1)) as i64;
    drop(shared);
    let me = &process.workers[id];
    me.last_tick_ms
        .store(crate::shared::now_ms().max(1), Ordering::Relaxed);
    me.accepting.store(true, Ordering::Release);
    let mut last_refusal_log: Option<Instant> = None;
    while !core.draining.get() {
        let (stream, peer) = match accept(&listener, listen_fd).await {
            Ok(Some(accepted)) => accepted,
            // Nothing yet: look at the drain flag again.
            Ok(None) => continue,
            Err(e) => {
                // EMFILE and friends: back off briefly instead of spinning.
                log!(Level::Warn, "accept failed", worker = id, error = e);
                monoio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        if me.open_connections.load(Ordering::Relaxed) >= limit {
            // Refused at accept: closed before any byte is read.
            drop(stream);
            core.metrics.borrow_mut().connections_refused += 1;
            if last_refusal_log.is_none_or(|t| t.elapsed() >= Duration::from_secs(10)) {
                last_refusal_log = Some(Instant::now());
                log!(
                    Level::Warn,
                    "Connection refused: server.max_connections reached",
                    worker = id,
                    limit_per_worker = limit,
                    peer = peer,
                );
            }
            continue;
        }
        me.open_connections.fetch_add(1, Ordering::Relaxed);
        core.metrics.borrow_mut().connections_total += 1;
        let worker = core.current();
        let tls = tls.clone();
        // Counted closed where it ends (its task, or the lot).
        monoio::spawn(async move {
            worker.serve(stream, tls.as_deref(), peer.ip()).await;
        });
    }
    drop(listener);
    me.stopped_accepting.store(true, Ordering::SeqCst);
    log!(Level::Info, "Worker stopped accepting", worker = id);
    // Keep serving in-flight requests; the main thread ends the process.
    loop {
        monoio::time::sleep(Duration::from_secs(3600)).await;
    }
}

/// How long an accept waits for a connection before the worker looks at its
/// drain flag again.
const ACCEPT_WAIT: Duration = Duration::from_millis(100);

/// Accepts one connection: accept4(2) on the (nonblocking) listener, and
/// when none is queued, a wait for readiness of at most [`ACCEPT_WAIT`]
/// (`Ok(None)`). Never an accept left in flight: an io_uring accept still
/// pending when a worker drains takes a connection from the queue this
/// process shares with its successor during an upgrade, and nobody serves
/// it. The socket is nonblocking and close-on-exec.
async fn accept(
    listener: &monoio::net::TcpListener,
    fd: RawFd,
) -> std::io::Result<Option<(monoio::net::TcpStream, SocketAddr)>> {
    use std::os::fd::FromRawFd;
    // The peer's address comes back from accept4 itself (no getpeername
    // per connection).
    // SAFETY: accept4(2) on this worker's open listener, writing at most
    // `len` bytes of address into the storage socket2 hands over (and
    // reading back the length it wrote); a descriptor it returns is owned
    // by `std` below.
    let accepted = unsafe {
        socket2::SockAddr::try_init(|storage, len| {
            let conn = libc::accept4(
                fd,
                storage.cast(),
                len,
                libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
            );
            match conn {
                c if c < 0 => Err(std::io::Error::last_os_error()),
                c => Ok(c),
            }
        })
    };
    let (conn, addr) = match accepted {
        Ok(both) => both,
        Err(e) => {
            return match e.kind() {
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted => {
                    let _ = monoio::time::timeout(ACCEPT_WAIT, listener.readable(false)).await;
                    Ok(None)
                }
                // The peer gave up while queued: not this worker's failure.
                std::io::ErrorKind::ConnectionAborted => Ok(None),
                _ => Err(e),
            };
        }
    };
    // SAFETY: accept4 returned a new descriptor that nothing else owns.
    let std = unsafe { std::net::TcpStream::from_raw_fd(conn) };
    // A TCP listener's peers are IPv4 or IPv6; anything else is dropped.
    let Some(peer) = addr.as_socket() else {
        return Ok(None);
    };
    Ok(Some((monoio::net::TcpStream::from_std(std)?, peer)))
}

/// Returns freed heap pages to the OS (glibc only; other C libraries, such
/// as musl for a static build, return memory on their own terms).
fn trim_heap() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only walks glibc's own heap bookkeeping.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Periodic per-worker housekeeping, off the request path.
fn tick(worker: &Core) {
    log::flush();
    let now = crate::shared::now_ms();
    worker.process.workers[worker.id]
        .last_tick_ms
        .store(now.max(1), Ordering::Relaxed);
    // Draining: a keep-alive connection idle for DRAIN_IDLE is closed (one
    // that sends a request meanwhile is answered with `Connection: close`).
    let sweep_at = match worker.draining.get() {
        true => {
            let idle = worker.process.current().config.server.idle_timeout;
            now + (idle.saturating_sub(DRAIN_IDLE).as_millis() as u64)
        }
        false => now,
    };
    // Finished traces of the last tick, handed over in one batch.
    if let Some(exporter) = &worker.process.traces {
        let batch = std::mem::take(&mut *worker.trace_batch.borrow_mut());
        if !batch.is_empty() {
            exporter.submit(batch);
        }
    }
    // Audit records of the last tick, handed over in one batch.
    if let Some(audit) = &worker.process.audit {
        let batch = std::mem::take(&mut *worker.audit_batch.borrow_mut());
        if batch.1 > 0 {
            audit.submit(batch.0, batch.1);
        }
    }
    // Memory hits' disk-tier recency, batched under one lock.
    if let Some(disk) = &worker.process.disk {
        let mut touches = worker.disk_touches.borrow_mut();
        if !touches.is_empty() {
            disk.touch_all(&touches);
            touches.clear();
        }
    }
    if worker.parking.tick(sweep_at) {
        worker.expire_lot(sweep_at);
        // Disk-tier files kept open whose entry was replaced or removed
        // are closed, so they do not hold the disk space of a removed file.
        if let Some(disk) = &worker.process.disk {
            let mut open = worker.open_entries.borrow_mut();
            if !open.is_empty() {
                open.prune(|key| disk.entry_id(key));
            }
        }
    }
    // Parked connections freed their buffers; hand the memory back to the
    // OS once a burst of them has gone idle, so RSS follows live use.
    if worker.parked.get() >= 256 {
        worker.parked.set(0);
        trim_heap();
    }
    let me = &worker.process.workers[worker.id];
    let wanted = worker.process.scrape_generation.load(Ordering::Acquire);
    if wanted > me.published.load(Ordering::Relaxed) {
        let snapshot = worker.metrics.borrow().clone();
        if let Ok(mut slot) = me.metrics.lock() {
            *slot = Some(snapshot);
        }
        me.published.store(wanted, Ordering::Release);
    }
}
