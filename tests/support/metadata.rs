//! A fake credentials endpoint on loopback, real sockets: the EC2 instance
//! metadata service (IMDSv2: session-token PUT, role name, role credentials)
//! and the ECS container credentials URI, both served from one port. Tests
//! choose the keys it hands out, make it slow or failing, and count what it
//! was asked.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The IMDSv2 session token the fake issues.
pub const IMDS_TOKEN: &str = "imds-session-token-1";
/// The role name the fake reports.
pub const ROLE: &str = "origin-reader";
/// The path of the ECS credentials endpoint.
pub const ECS_PATH: &str = "/v2/credentials/task-1";

/// Keys the fake hands out.
#[derive(Debug, Clone)]
pub struct Keys {
    pub access_key: String,
    pub secret_key: String,
    pub token: String,
    pub expires: SystemTime,
}

impl Keys {
    pub fn new(access_key: &str, secret_key: &str, token: &str, valid_for: Duration) -> Keys {
        Keys {
            access_key: access_key.into(),
            secret_key: secret_key.into(),
            token: token.into(),
            expires: SystemTime::now() + valid_for,
        }
    }
}

#[derive(Debug, Default)]
pub struct Seen {
    /// Session-token PUTs.
    pub token_puts: usize,
    /// Credential documents served (IMDS role credentials or ECS).
    pub credentials_served: usize,
    /// Requests refused (no or wrong IMDS session token).
    pub unauthorized: usize,
    /// Requests answered 500 while failing.
    pub failed: usize,
}

struct State {
    keys: Keys,
    failing: bool,
    delay: Duration,
    seen: Seen,
}

pub struct Metadata {
    pub port: u16,
    state: Arc<Mutex<State>>,
    stop: Arc<AtomicBool>,
}

impl Metadata {
    pub fn start(keys: Keys) -> Metadata {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind metadata");
        let port = listener.local_addr().expect("addr").port();
        listener.set_nonblocking(true).expect("nonblocking");
        let state = Arc::new(Mutex::new(State {
            keys,
            failing: false,
            delay: Duration::ZERO,
            seen: Seen::default(),
        }));
        let stop = Arc::new(AtomicBool::new(false));
        let (st, sp) = (state.clone(), stop.clone());
        std::thread::spawn(move || {
            while !sp.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((s, _)) => {
                        let st = st.clone();
                        std::thread::spawn(move || serve(s, st));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        Metadata { port, state, stop }
    }

    /// `AWS_EC2_METADATA_SERVICE_ENDPOINT`.
    pub fn imds_endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// `AWS_CONTAINER_CREDENTIALS_FULL_URI`.
    pub fn ecs_uri(&self) -> String {
        format!("http://127.0.0.1:{}{ECS_PATH}", self.port)
    }

    pub fn set_keys(&self, keys: Keys) {
        self.state.lock().unwrap().keys = keys;
    }

    /// Answer every credentials request with a 500.
    pub fn set_failing(&self, failing: bool) {
        self.state.lock().unwrap().failing = failing;
    }

    /// Wait this long before answering a credentials request.
    pub fn set_delay(&self, d: Duration) {
        self.state.lock().unwrap().delay = d;
    }

    pub fn seen(&self) -> Seen {
        let s = self.state.lock().unwrap();
        Seen {
            token_puts: s.seen.token_puts,
            credentials_served: s.seen.credentials_served,
            unauthorized: s.seen.unauthorized,
            failed: s.seen.failed,
        }
    }
}

impl Drop for Metadata {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// RFC 3339 UTC, as IMDS writes `Expiration`.
fn rfc3339(t: SystemTime) -> String {
    let secs = t.duration_since(UNIX_EPOCH).unwrap().as_secs();
    let (y, mo, d, h, mi, s) = yatagarasu::clock::civil(secs);
    format!("{y:04}-{mo:02}-{d:02}T{h:02}:{mi:02}:{s:02}Z")
}

fn serve(mut s: TcpStream, state: Arc<Mutex<State>>) {
    let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
    let mut buf = Vec::new();
    loop {
        // One request head (these requests carry no body except the PUT's, which is empty).
        let head_end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            let mut chunk = [0u8; 4096];
            match s.read(&mut chunk) {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
        buf.drain(..head_end);
        let mut line = head.lines().next().unwrap_or("").split(' ');
        let (method, path) = (line.next().unwrap_or(""), line.next().unwrap_or(""));
        let header = |name: &str| {
            head.lines().skip(1).find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.trim()
                    .eq_ignore_ascii_case(name)
                    .then(|| v.trim().to_string())
            })
        };
        let (status, body) = answer(method, path, &header, &state);
        let ttl = match (status, method) {
            (200, "PUT") => "x-aws-ec2-metadata-token-ttl-seconds: 21600\r\n",
            _ => "",
        };
        let resp = format!(
            "HTTP/1.1 {status} X\r\nContent-Type: text/plain\r\n{ttl}Content-Length: {}\r\n\r\n{body}",
            body.len()
        );
        if s.write_all(resp.as_bytes()).is_err() {
            return;
        }
    }
}

fn answer(
    method: &str,
    path: &str,
    header: &dyn Fn(&str) -> Option<String>,
    state: &Mutex<State>,
) -> (u16, String) {
    let imds_ok = || header("x-aws-ec2-metadata-token").as_deref() == Some(IMDS_TOKEN);
    let creds_path = format!("/latest/meta-data/iam/security-credentials/{ROLE}");
    let credentials = |state: &Mutex<State>| {
        let delay = state.lock().unwrap().delay;
        std::thread::sleep(delay);
        let mut st = state.lock().unwrap();
        if st.failing {
            st.seen.failed += 1;
            return (500, "metadata service is failing".to_string());
        }
        st.seen.credentials_served += 1;
        let k = &st.keys;
        let body = format!(
            "{{\"Code\":\"Success\",\"LastUpdated\":\"{}\",\"Type\":\"AWS-HMAC\",\"AccessKeyId\":\"{}\",\"SecretAccessKey\":\"{}\",\"Token\":\"{}\",\"Expiration\":\"{}\"}}",
            rfc3339(SystemTime::now()),
            k.access_key,
            k.secret_key,
            k.token,
            rfc3339(k.expires)
        );
        (200, body)
    };
    match (method, path) {
        ("PUT", "/latest/api/token") => {
            if header("x-aws-ec2-metadata-token-ttl-seconds").is_none() {
                return (400, "missing ttl".into());
            }
            state.lock().unwrap().seen.token_puts += 1;
            (200, IMDS_TOKEN.into())
        }
        ("GET", "/latest/meta-data/iam/security-credentials/") => {
            if !imds_ok() {
                state.lock().unwrap().seen.unauthorized += 1;
                return (401, String::new());
            }
            (200, ROLE.into())
        }
        ("GET", p) if p == creds_path => {
            if !imds_ok() {
                state.lock().unwrap().seen.unauthorized += 1;
                return (401, String::new());
            }
            credentials(state)
        }
        ("GET", ECS_PATH) => credentials(state),
        _ => (404, String::new()),
    }
}
