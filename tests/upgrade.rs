//! Upgrading the binary under load (SIGUSR2, `server::upgrade`): the
//! running process hands its listeners to a new process started from the
//! file now at its path, which stops the old one once it serves. Ten
//! upgrades in a row while clients keep asking, on keep-alive connections
//! and on new ones: not one request fails, not one connection is reset.

mod support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use support::rogue::{send, Rogue};
use support::*;

/// One GET on `s`; `Ok(true)` for a whole 200 (the server keeps the
/// connection), `Ok(false)` for a whole 200 with `Connection: close`.
/// `Err((got_any_byte, why))`.
fn get(s: &mut TcpStream) -> Result<bool, (bool, String)> {
    s.write_all(b"GET /b/k HTTP/1.1\r\nHost: t\r\n\r\n")
        .map_err(|e| (false, format!("write: {e}")))?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let n = s
            .read(&mut chunk)
            .map_err(|e| (!buf.is_empty(), format!("read: {e}")))?;
        if n == 0 {
            return Err((!buf.is_empty(), format!("closed after {} bytes", buf.len())));
        }
        buf.extend_from_slice(&chunk[..n]);
        let text = String::from_utf8_lossy(&buf);
        if let Some(end) = text.find("\r\n\r\n") {
            if buf.len() >= end + 4 + 2 {
                let head = text[..end].to_ascii_lowercase();
                if !head.starts_with("http/1.1 200") || &buf[end + 4..end + 6] != b"ok" {
                    return Err((true, format!("not the answer: {head}")));
                }
                return Ok(!head.contains("connection: close"));
            }
        }
    }
}

struct Load {
    /// The upgrade round under way (for failure messages).
    round: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicUsize>,
    failures: Arc<Mutex<Vec<String>>>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

/// Clients that keep asking: `keep` on keep-alive connections (a new one
/// when the server says `Connection: close`), `fresh` on a new connection
/// per request.
fn load(port: u16, keep: usize, fresh: usize) -> Load {
    let stop = Arc::new(AtomicBool::new(false));
    let round = Arc::new(AtomicUsize::new(0));
    let ok = Arc::new(AtomicUsize::new(0));
    let failures = Arc::new(Mutex::new(Vec::new()));
    let mut threads = Vec::new();
    for i in 0..keep + fresh {
        let (stop, ok, failures, round) =
            (stop.clone(), ok.clone(), failures.clone(), round.clone());
        threads.push(std::thread::spawn(move || {
            let mut conn: Option<TcpStream> = None;
            while !stop.load(Ordering::Relaxed) {
                let mut s = match conn.take() {
                    Some(s) => s,
                    None => match TcpStream::connect(("127.0.0.1", port)) {
                        Ok(s) => {
                            let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
                            s
                        }
                        Err(e) => {
                            failures.lock().unwrap().push(format!("connect: {e}"));
                            continue;
                        }
                    },
                };
                match get(&mut s) {
                    Ok(keep_open) => {
                        ok.fetch_add(1, Ordering::Relaxed);
                        if keep_open && i < keep {
                            conn = Some(s);
                        }
                    }
                    Err((any, why)) => failures.lock().unwrap().push(format!(
                        "round {}: {} client {i}: {why} (response bytes: {any})",
                        round.load(Ordering::Relaxed),
                        if i < keep {
                            "keep-alive"
                        } else {
                            "new-connection"
                        }
                    )),
                }
            }
        }));
    }
    Load {
        round,
        stop,
        ok,
        failures,
        threads,
    }
}

/// Whether `pid` is gone: reaped here (this test is the subreaper of the
/// proxies' orphans), or no longer a process.
fn gone(pid: i32) -> bool {
    let mut status = 0;
    // SAFETY: waitpid on a pid that is, or will be, our (adopted) child.
    let r = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
    r == pid || !std::path::Path::new(&format!("/proc/{pid}")).exists()
}

/// Pids of the processes that took over, in order, from the log.
fn takeovers(log: &str) -> Vec<i32> {
    log.lines()
        .filter(|l| l.contains("Upgrade: took over the listeners"))
        .filter_map(|l| {
            let at = l.find("pid=")? + 4;
            l[at..]
                .chars()
                .take_while(char::is_ascii_digit)
                .collect::<String>()
                .parse()
                .ok()
        })
        .collect()
}

#[test]
fn ten_upgrades_under_load_fail_no_request_and_reset_no_connection() {
    // Orphaned proxies (an old one exits before its successor) come to us,
    // to be reaped and stopped by pid.
    // SAFETY: prctl with valid arguments on this process.
    unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
    let up = Rogue::start(|_| {
        vec![send(
            "HTTP/1.1 200 OK\r\nContent-Length: 2\r\nETag: \"e\"\r\n\r\nok",
        )]
    });
    // The binary at a path of our own: each upgrade first replaces the
    // file (as a package upgrade does), then signals.
    let dir = tempfile::tempdir().expect("dir");
    let exe = dir.path().join("yatagarasu");
    let install = || {
        let staged = dir.path().join("yatagarasu.new");
        std::fs::copy(env!("CARGO_BIN_EXE_yatagarasu"), &staged).expect("copy the binary");
        std::fs::rename(&staged, &exe).expect("replace the binary");
    };
    install();
    let port = free_port();
    let metrics = loop {
        let p = free_port();
        if p != port {
            break p;
        }
    };
    let config = dir.path().join("config.yaml");
    std::fs::write(
        &config,
        format!(
            "server:\n  address: \"127.0.0.1:{port}\"\n  workers: 2\n  shutdown_timeout_seconds: 20\nmetrics:\n  enabled: true\n  port: {metrics}\nbuckets:\n  - name: \"b\"\n    path_prefix: \"/b\"\n    s3:\n      bucket: \"bkt\"\n      endpoint: \"{}\"\n      access_key: \"{AK}\"\n      secret_key: \"{SK}\"\n      health_check:\n        enabled: false\n",
            up.endpoint()
        ),
    )
    .expect("config");
    let log_path = dir.path().join("proxy.log");
    let log = std::fs::File::create(&log_path).expect("log");
    // Reaped by pid (`gone`, then the final waitpid), as its successors are.
    #[allow(clippy::zombie_processes)]
    let first = std::process::Command::new(&exe)
        .arg("--config")
        .arg(&config)
        .stdout(std::process::Stdio::null())
        .stderr(log)
        .spawn()
        .expect("start");
    let mut pid = first.id() as i32;
    let deadline = Instant::now() + Duration::from_secs(15);
    while !support::http::try_get(port, "/health", &[]).is_ok_and(|r| r.status == 200) {
        assert!(Instant::now() < deadline, "the proxy did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    let read_log = || std::fs::read_to_string(&log_path).unwrap_or_default();
    let mut running = vec![pid];
    let load = load(port, 4, 2);
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let rounds: usize = std::env::var("UPGRADE_ROUNDS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(10);
        for round in 0..rounds {
            load.round.store(round, Ordering::Relaxed);
            // Requests go through before each upgrade.
            let before = load.ok.load(Ordering::Relaxed);
            let deadline = Instant::now() + Duration::from_secs(30);
            while load.ok.load(Ordering::Relaxed) < before + 50 {
                assert!(Instant::now() < deadline, "round {round}: no progress");
                std::thread::sleep(Duration::from_millis(5));
            }
            install();
            // SAFETY: kill(2) on a proxy this test started (or adopted).
            unsafe { libc::kill(pid, libc::SIGUSR2) };
            let deadline = Instant::now() + Duration::from_secs(30);
            let next = loop {
                if let Some(&p) = takeovers(&read_log()).get(round) {
                    break p;
                }
                assert!(
                    Instant::now() < deadline,
                    "round {round}: no takeover\n{}",
                    read_log()
                );
                std::thread::sleep(Duration::from_millis(10));
            };
            running.push(next);
            let deadline = Instant::now() + Duration::from_secs(60);
            while !gone(pid) {
                assert!(
                    Instant::now() < deadline,
                    "round {round}: the old process did not exit"
                );
                std::thread::sleep(Duration::from_millis(10));
            }
            running.retain(|&p| p != pid);
            pid = next;
        }
        load.round.store(10, Ordering::Relaxed);
        let before = load.ok.load(Ordering::Relaxed);
        let deadline = Instant::now() + Duration::from_secs(30);
        while load.ok.load(Ordering::Relaxed) < before + 50 {
            assert!(
                Instant::now() < deadline,
                "no progress after the last upgrade"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }));
    load.stop.store(true, Ordering::Relaxed);
    for t in load.threads {
        let _ = t.join();
    }
    for &p in &running {
        // SAFETY: stopping the proxies this test started, by pid.
        unsafe { libc::kill(p, libc::SIGKILL) };
        let mut status = 0;
        // SAFETY: reaping our (adopted) child.
        unsafe { libc::waitpid(p, &mut status, 0) };
    }
    if let Err(e) = result {
        std::panic::resume_unwind(e);
    }
    let failures = load.failures.lock().unwrap().clone();
    let served = load.ok.load(Ordering::Relaxed);
    assert!(
        failures.is_empty(),
        "{} of {} requests failed: {:?}\n{}",
        failures.len(),
        served + failures.len(),
        &failures[..failures.len().min(10)],
        read_log()
            .lines()
            .filter(|l| !l.contains("\"request\"") && !l.contains(" request "))
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert!(served > 500, "{served}");
    let log = read_log();
    let rounds: usize = std::env::var("UPGRADE_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10);
    assert_eq!(takeovers(&log).len(), rounds, "{log}");
    assert!(!log.contains("The upgraded process exited"), "{log}");
}
