//! Test support: real processes and real sockets only.
//!
//! - [`S3`]: an `s3s-fs` process that verifies SigV4, started, killed (-9) and
//!   restarted by PID on the same port and data directory.
//! - [`Moto`]: a `moto_server` process (it honours `If-None-Match`).
//! - [`Proxy`]: the built `yatagarasu` binary with a generated config; its log
//!   is captured to a file.
//! - [`Fault`]: a TCP fault proxy put in front of a replica: pass, hang,
//!   answer 5xx, reset or stall mid-body, drip slowly, close idle connections.
//! - [`http`]: a tiny blocking HTTP/1.1 client that can send raw bytes.
//!
//! Everything listens on 127.0.0.1 and is stopped by PID when dropped.

#![allow(dead_code)]

pub mod fault;
pub mod http;
pub mod metadata;
pub mod otlp;
pub mod policy;
pub mod redis;
pub mod rogue;
pub mod tls_front;

use std::io::Write;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const AK: &str = "test-access-key";
pub const SK: &str = "test-secret-key";

/// `read`, retried when a signal interrupts it (EINTR).
pub fn read_retry<R: std::io::Read>(r: &mut R, buf: &mut [u8]) -> std::io::Result<usize> {
    loop {
        match r.read(buf) {
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            other => return other,
        }
    }
}

/// A free loopback port (bound then released), never one this process
/// handed out before: the kernel may offer a released port again, and two
/// proxies given the same one would both listen on it (SO_REUSEPORT) and
/// share each other's clients.
pub fn free_port() -> u16 {
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    loop {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("a free loopback port");
        let mut given = GIVEN.lock().unwrap_or_else(|e| e.into_inner());
        if !given.contains(&port) {
            given.push(port);
            return port;
        }
    }
}

pub fn wait_for_port(port: u16, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

fn find_bin(name: &str) -> PathBuf {
    if let Ok(p) = std::env::var(format!("{}_BIN", name.to_uppercase().replace('-', "_"))) {
        return PathBuf::from(p);
    }
    let home = std::env::var("HOME").unwrap_or_default();
    let cargo_bin = Path::new(&home).join(".cargo/bin").join(name);
    if cargo_bin.exists() {
        return cargo_bin;
    }
    PathBuf::from(name)
}

fn kill_pid(child: &mut Child, signal: i32) {
    // SAFETY: kill(2) on our own child, not yet reaped (wait follows), so
    // its PID cannot belong to another process.
    unsafe {
        libc::kill(child.id() as i32, signal);
    }
    let _ = child.wait();
}

/// An s3s-fs process with credentials [`AK`]/[`SK`] unless told otherwise.
pub struct S3 {
    pub port: u16,
    pub dir: std::sync::Arc<tempfile::TempDir>,
    /// The one key pair it accepts (s3s-fs takes a single pair).
    pub keys: (String, String),
    child: Option<Child>,
}

impl S3 {
    pub fn start() -> S3 {
        Self::start_with_keys(AK, SK)
    }

    pub fn start_with_keys(access_key: &str, secret_key: &str) -> S3 {
        let dir = std::sync::Arc::new(tempfile::tempdir().expect("temp dir"));
        Self::start_in(dir, access_key, secret_key)
    }

    /// A second server on the same data directory (same objects).
    pub fn sharing(&self, access_key: &str, secret_key: &str) -> S3 {
        Self::start_in(self.dir.clone(), access_key, secret_key)
    }

    fn start_in(dir: std::sync::Arc<tempfile::TempDir>, access_key: &str, secret_key: &str) -> S3 {
        let mut s = S3 {
            port: free_port(),
            dir,
            keys: (access_key.into(), secret_key.into()),
            child: None,
        };
        // Another test's server may take the free port before s3s-fs binds
        // it (s3s-fs then exits): start again on another.
        for _ in 0..5 {
            if s.try_start() {
                return s;
            }
            s.port = free_port();
        }
        panic!("s3s-fs did not start");
    }

    /// Stops it, and starts it again accepting only these keys.
    pub fn restart_with_keys(&mut self, access_key: &str, secret_key: &str) {
        self.kill();
        self.keys = (access_key.into(), secret_key.into());
        self.restart();
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// (Re)starts the process on the same port and data directory.
    pub fn restart(&mut self) {
        assert!(
            self.try_start(),
            "s3s-fs did not start on port {}",
            self.port
        );
    }

    /// Starts the process; false when it exited instead of serving (its
    /// port taken).
    fn try_start(&mut self) -> bool {
        assert!(self.child.is_none(), "already running");
        let log =
            std::fs::File::create(self.dir.path().with_extension(format!("{}.log", self.port)))
                .expect("log file");
        let child = Command::new(find_bin("s3s-fs"))
            .args(["--host", "127.0.0.1", "--port", &self.port.to_string()])
            .args(["--access-key", &self.keys.0, "--secret-key", &self.keys.1])
            .arg(self.dir.path())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect(
                "s3s-fs must be installed (cargo install s3s-fs@0.14.1 --features binary --locked)",
            );
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if self.exited() {
                return false;
            }
            if TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                // Answered: by this process only if it is still alive once
                // it has had time to bind (or fail to).
                std::thread::sleep(Duration::from_millis(100));
                return !self.exited();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.kill();
        false
    }

    /// The process ended by itself (it is then forgotten).
    fn exited(&mut self) -> bool {
        let gone = self
            .child
            .as_mut()
            .is_some_and(|c| !matches!(c.try_wait(), Ok(None)));
        if gone {
            self.child = None;
        }
        gone
    }

    /// `kill -9`, as a crash would.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            kill_pid(&mut c, libc::SIGKILL);
        }
    }

    pub fn create_bucket(&self, bucket: &str) {
        let (ak, sk) = (&self.keys.0, &self.keys.1);
        let r = http::signed(self.port, "PUT", &format!("/{bucket}"), b"", ak, sk);
        assert!(
            r.status == 200 || r.status == 409,
            "create bucket: {} {}",
            r.status,
            r.text()
        );
    }

    pub fn put(&self, bucket: &str, key_encoded: &str, body: &[u8]) {
        let r = http::signed(
            self.port,
            "PUT",
            &format!("/{bucket}/{key_encoded}"),
            body,
            &self.keys.0,
            &self.keys.1,
        );
        assert_eq!(r.status, 200, "put {key_encoded}: {}", r.text());
    }
}

impl Drop for S3 {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A moto S3 server (signatures not checked; used for conditional requests).
pub struct Moto {
    pub port: u16,
    child: Child,
}

impl Moto {
    /// A moto server on a free port. A port the harness picked can be taken
    /// by another test's server before moto binds it (moto then exits, and
    /// the port answers, but not as moto): then it starts again elsewhere.
    pub fn start() -> Moto {
        for _ in 0..5 {
            let mut moto = Self::start_on(free_port());
            let ours = wait_for_port(moto.port, Duration::from_secs(30))
                && http::try_get(moto.port, "/moto-api/data.json", &[])
                    .is_ok_and(|r| r.status == 200 && r.body.starts_with(b"{"))
                && matches!(moto.child.try_wait(), Ok(None));
            if ours {
                return moto;
            }
            drop(moto); // killed and reaped once, by its Drop
        }
        panic!("moto did not start (5 tries)");
    }

    fn start_on(port: u16) -> Moto {
        let args = [
            "-H".to_string(),
            "127.0.0.1".to_string(),
            "-p".to_string(),
            port.to_string(),
        ];
        // The console script, or the module when the script is not on PATH.
        let child = Command::new(find_bin("moto_server"))
            .args(&args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .or_else(|_| {
                Command::new("python3")
                    .args(["-m", "moto.server"])
                    .args(&args)
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()
            })
            .expect("moto must be installed (pip install 'moto[server]')");
        Moto { port, child }
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        kill_pid(&mut self.child, libc::SIGKILL);
    }
}

/// The yatagarasu binary under test.
pub struct Proxy {
    /// The `server:`/`metrics:` sections the harness added (kept on reload).
    prefix: String,
    pub port: u16,
    pub metrics_port: u16,
    pub dir: tempfile::TempDir,
    child: Option<Child>,
    pub exit: Option<std::process::ExitStatus>,
}

/// How the proxy's process is started, besides its config.
#[derive(Clone, Copy, Default)]
struct Launch {
    /// Its open-file limit, lowered through the shell's `ulimit` (which
    /// then execs the binary: same PID).
    nofile: Option<u64>,
    /// Started without CAP_SYS_RESOURCE and CAP_SYS_ADMIN.
    unprivileged: bool,
    /// Its soft open-file limit only (the hard one left as it is).
    soft_nofile: Option<u64>,
}

impl Proxy {
    /// Starts the proxy with `body` as the config; `server:` and `metrics:`
    /// sections are added (with free ports) unless `body` has them.
    pub fn start(body: &str) -> Proxy {
        Self::start_with(body, 2, &[])
    }

    pub fn start_with(body: &str, workers: usize, env: &[(&str, &str)]) -> Proxy {
        Self::start_attempt(body, workers, env, Launch::default(), 0)
    }

    /// Starts the proxy with its open-file limit lowered to `nofile`
    /// (through the shell's `ulimit`, which then execs the binary: same PID).
    pub fn start_with_nofile(body: &str, workers: usize, nofile: u64) -> Proxy {
        let launch = Launch {
            nofile: Some(nofile),
            ..Launch::default()
        };
        Self::start_attempt(body, workers, &[], launch, 0)
    }

    /// Starts the proxy with its soft open-file limit at `soft` and the
    /// hard one left as it is (a shell's usual 1024 under a higher hard
    /// limit).
    pub fn start_with_soft_nofile(body: &str, workers: usize, soft: u64) -> Proxy {
        let launch = Launch {
            soft_nofile: Some(soft),
            ..Launch::default()
        };
        Self::start_attempt(body, workers, &[], launch, 0)
    }

    /// Starts the proxy without CAP_SYS_RESOURCE and CAP_SYS_ADMIN, so the
    /// kernel's per-user limits (pipe pages) bind it as they bind an
    /// unprivileged user's process, even when the tests run as root.
    pub fn start_unprivileged(body: &str, workers: usize) -> Proxy {
        let launch = Launch {
            unprivileged: true,
            ..Launch::default()
        };
        Self::start_attempt(body, workers, &[], launch, 0)
    }

    /// One start. A port the harness picked can be taken by someone else
    /// (another test's client socket) before the proxy binds it: then the
    /// harness picks new ones and starts again, a few times.
    fn start_attempt(
        body: &str,
        workers: usize,
        env: &[(&str, &str)],
        launch: Launch,
        attempt: u32,
    ) -> Proxy {
        // Use the ports the body names, if it has its own sections.
        let find = |key: &str| {
            body.find(key).and_then(|i| {
                let rest = &body[i + key.len()..];
                let digits: String = rest.chars().take_while(|c| c.is_ascii_digit()).collect();
                digits.parse::<u16>().ok()
            })
        };
        // `host:port`, or the other system's host with `port:` after it.
        let port = find("address: \"127.0.0.1:")
            .or_else(|| find("  address: \"127.0.0.1\"\n  port: "))
            .unwrap_or_else(free_port);
        // Two free ports asked for in a row can be the same one.
        let metrics_port = find("metrics:\n  enabled: true\n  port: ")
            .or_else(|| find("  port: ").filter(|p| *p != port))
            .unwrap_or_else(|| loop {
                let p = free_port();
                if p != port {
                    break p;
                }
            });
        let mut config = String::new();
        if !body.contains("server:") {
            config.push_str(&format!(
                "server:\n  address: \"127.0.0.1:{port}\"\n  workers: {workers}\n"
            ));
        }
        if !body.contains("metrics:") {
            config.push_str(&format!(
                "metrics:\n  enabled: true\n  port: {metrics_port}\n"
            ));
        }
        let prefix = config.clone();
        config.push_str(body);
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("config.yaml");
        std::fs::write(&path, config).expect("write config");
        let log = std::fs::File::create(dir.path().join("proxy.log")).expect("log");
        let ulimit = match (launch.nofile, launch.soft_nofile) {
            (Some(n), _) => Some(format!("ulimit -n {n}")),
            (None, Some(n)) => Some(format!("ulimit -Sn {n}")),
            (None, None) => None,
        };
        let mut cmd = match ulimit {
            None => Command::new(env!("CARGO_BIN_EXE_yatagarasu")),
            Some(ulimit) => {
                let mut c = Command::new("bash");
                c.arg("-c")
                    .arg(format!("{ulimit} && exec \"$0\" \"$@\""))
                    .arg(env!("CARGO_BIN_EXE_yatagarasu"));
                c
            }
        };
        cmd.arg("--config")
            .arg(&path)
            .stdout(Stdio::null())
            .stderr(log);
        for (k, v) in env {
            cmd.env(k, v);
        }
        if launch.unprivileged {
            use std::os::unix::process::CommandExt;
            // SAFETY: between fork and exec the closure only makes two
            // prctl calls (async-signal-safe) and allocates nothing.
            unsafe {
                cmd.pre_exec(|| {
                    // Out of the bounding set, they are not in the new
                    // program's capabilities either, even for root. A caller
                    // who may not drop them (EPERM) does not hold them.
                    const CAP_SYS_ADMIN: libc::c_ulong = 21;
                    const CAP_SYS_RESOURCE: libc::c_ulong = 24;
                    for cap in [CAP_SYS_RESOURCE, CAP_SYS_ADMIN] {
                        libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0);
                    }
                    Ok(())
                });
            }
        }
        let child = cmd.spawn().expect("start yatagarasu");
        let mut p = Proxy {
            prefix,
            port,
            metrics_port,
            dir,
            child: Some(child),
            exit: None,
        };
        let deadline = Instant::now() + Duration::from_secs(15);
        let https = body.contains("cert_file:");
        loop {
            if https {
                // An HTTPS listener: being connectable is the readiness signal here.
                if TcpStream::connect(("127.0.0.1", port)).is_ok() {
                    break;
                }
            } else if let Ok(r) = http::try_get(port, "/health", &[]) {
                if r.status == 200 {
                    break;
                }
            }
            if let Some(c) = p.child.as_mut() {
                if let Ok(Some(status)) = c.try_wait() {
                    // Reaped: never signal that PID again.
                    p.child = None;
                    let log = p.log();
                    let ours = !body.contains("server:") || !body.contains("metrics:");
                    if log.contains("Address already in use") && ours && attempt < 3 {
                        return Self::start_attempt(body, workers, env, launch, attempt + 1);
                    }
                    panic!("proxy exited at start ({status}):\n{log}");
                }
            }
            assert!(
                Instant::now() < deadline,
                "proxy did not become healthy:\n{}",
                p.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        p
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("proxy.log")).unwrap_or_default()
    }

    /// Waits until the log contains `needle` (workers flush buffered lines every few ms).
    pub fn wait_log(&self, needle: &str, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if self.log().contains(needle) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }

    pub fn get(&self, path: &str) -> http::Resp {
        http::get(self.port, path, &[])
    }

    /// Started so that [`Proxy::advance_clock`] can move its clocks (an
    /// admin token is added to `body`).
    pub fn start_with_test_clock(body: &str, workers: usize) -> Proxy {
        let body = format!("admin:\n  token: \"{TEST_CLOCK_TOKEN}\"\n{body}");
        Proxy::start_with(&body, workers, &[("YATAGARASU_TEST_CLOCK", "1")])
    }

    /// Moves the proxy's cache and breaker clocks forward by `ms`, instead
    /// of sleeping (a proxy from [`Proxy::start_with_test_clock`]).
    pub fn advance_clock(&self, ms: u64) {
        let path = format!("/admin/debug/advance-clock?ms={ms}");
        let r = http::with_bearer(self.metrics_port, "POST", &path, Some(TEST_CLOCK_TOKEN));
        assert_eq!(r.status, 200, "advance the clock: {}", r.text());
    }

    /// Steps the proxy's wall clock back by `ms` (as NTP may step a real
    /// one); its monotonic clock stays (a [`Proxy::start_with_test_clock`] proxy).
    pub fn step_clock_back(&self, ms: u64) {
        let path = format!("/admin/debug/advance-clock?ms=-{ms}");
        let r = http::with_bearer(self.metrics_port, "POST", &path, Some(TEST_CLOCK_TOKEN));
        assert_eq!(r.status, 200, "step the clock back: {}", r.text());
    }

    /// `/ready` with its details (buckets, replicas, breakers, credentials),
    /// from the metrics listener.
    pub fn ready_details(&self) -> http::Resp {
        http::get(self.metrics_port, "/ready", &[])
    }

    pub fn metrics(&self) -> String {
        http::get(self.metrics_port, "/metrics", &[]).text()
    }

    /// Rewrites the config file with `body` (same server/metrics sections)
    /// and sends SIGHUP.
    /// The value of an unlabelled metric (`None` when absent).
    pub fn metric(&self, name: &str) -> Option<f64> {
        let m = self.metrics();
        m.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
            .and_then(|v| v.trim().parse().ok())
    }

    /// Waits until the metric `name` reads `want`; false after `timeout`.
    pub fn wait_metric(&self, name: &str, want: f64, timeout: Duration) -> bool {
        let end = std::time::Instant::now() + timeout;
        while std::time::Instant::now() < end {
            if self.metric(name) == Some(want) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        false
    }

    /// Writes `body` (after the generated server and metrics sections) as
    /// the config file, for a reload.
    pub fn write_config(&self, body: &str) {
        let path = self.dir.path().join("config.yaml");
        std::fs::write(&path, format!("{}{body}", self.prefix)).expect("write config");
    }

    pub fn reload(&self, body: &str) {
        self.write_config(body);
        // SAFETY: kill(2) on our own child, not yet reaped.
        unsafe {
            libc::kill(self.pid() as i32, libc::SIGHUP);
        }
    }

    /// Sends SIGTERM.
    pub fn term(&self) {
        unsafe {
            libc::kill(self.pid() as i32, libc::SIGTERM);
        }
    }

    /// Waits for the process to exit; returns its status.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Some(c) = self.child.as_mut() {
                if let Ok(Some(s)) = c.try_wait() {
                    self.child = None;
                    self.exit = Some(s);
                    return Some(s);
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    /// VmHWM (peak resident set) in KiB.
    pub fn peak_rss_kib(&self) -> u64 {
        let status =
            std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap_or_default();
        status
            .lines()
            .find(|l| l.starts_with("VmHWM:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            kill_pid(&mut c, libc::SIGKILL);
        }
    }
}

/// A bucket section with one endpoint.
pub fn single_bucket(prefix: &str, bucket: &str, endpoint: &str) -> String {
    format!(
        "buckets:\n  - name: \"b\"\n    path_prefix: \"{prefix}\"\n    s3:\n      bucket: \"{bucket}\"\n      region: \"us-east-1\"\n      endpoint: \"{endpoint}\"\n      access_key: \"{AK}\"\n      secret_key: \"{SK}\"\n"
    )
}

/// sha256 hex of `data`.
/// An HS256 JWT of `claims` signed with `secret`.
pub fn hs256_token(secret: &str, claims: &serde_json::Value) -> String {
    use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
    encode(
        &Header::new(Algorithm::HS256),
        claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .expect("token")
}

/// The admin token of proxies started with a test clock.
const TEST_CLOCK_TOKEN: &str = "test-clock-admin-token-0123456789";

/// Seconds since the Unix epoch.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

pub fn sha256(data: &[u8]) -> String {
    use sha2::Digest;
    let d = sha2::Sha256::digest(data);
    d.iter().map(|b| format!("{b:02x}")).collect()
}

/// Deterministic pseudo-random bytes.
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(len);
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

pub fn write_file(path: &Path, text: &str) {
    let mut f = std::fs::File::create(path).expect("create");
    f.write_all(text.as_bytes()).expect("write");
}

/// Runs `cmd` to its end: whether it succeeded, and its stdout then stderr
/// (or why it could not start).
pub fn run_command(cmd: &mut std::process::Command) -> (bool, String) {
    match cmd.output() {
        Ok(o) => (
            o.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            ),
        ),
        Err(e) => (false, e.to_string()),
    }
}
