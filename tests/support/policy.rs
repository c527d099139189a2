//! Decision services for the authorization tests, real sockets:
//! - [`Opa`]: OPA's REST Data API (`POST /v1/data/<path>`) in front of a
//!   real Rego engine (regorus) loaded with the policies the proxy's own
//!   `type: rego` uses (`config/policies/`), so both engines are asked the
//!   same questions of the same files;
//! - [`Fga`]: a stand-in for OpenFGA's Check API (`POST
//!   /stores/<id>/check`; no OpenFGA server can be installed from the
//!   registries here): relation tuples, with `viewer` inherited from a
//!   bucket and from every enclosing folder by the files below them.
//!
//! Each can be switched to misbehave (`Mode`): answer garbage, 500, or
//! never; and counts the questions it was asked.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

/// How a decision service behaves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Answers as the real service would.
    Serve,
    /// 200 with a body that is not an answer.
    Garbage,
    /// 500.
    Fail,
    /// Reads the question, never answers.
    Hang,
    /// Answers as `Serve` once [`Opa::release`] is called.
    Held,
}

struct Server {
    port: u16,
    mode: Arc<Mutex<Mode>>,
    asked: Arc<AtomicUsize>,
    gate: super::rogue::Gate,
    /// The last question's `Authorization` header and body.
    last: Arc<Mutex<(Option<String>, serde_json::Value)>>,
}

type Answer = dyn Fn(&str, &serde_json::Value) -> serde_json::Value + Send + Sync;

impl Server {
    fn start(answer: Arc<Answer>) -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let mode = Arc::new(Mutex::new(Mode::Serve));
        let asked = Arc::new(AtomicUsize::new(0));
        let gate = super::rogue::Gate::default();
        let last = Arc::new(Mutex::new((None, serde_json::Value::Null)));
        let (m, a, g, l) = (mode.clone(), asked.clone(), gate.clone(), last.clone());
        std::thread::spawn(move || {
            for s in listener.incoming().flatten() {
                let (m, a, g, l, answer) =
                    (m.clone(), a.clone(), g.clone(), l.clone(), answer.clone());
                std::thread::spawn(move || serve(s, &m, &a, &g, &l, &*answer));
            }
        });
        Server {
            port,
            mode,
            asked,
            gate,
            last,
        }
    }
}

/// Answers requests on one keep-alive connection.
fn serve(
    s: TcpStream,
    mode: &Mutex<Mode>,
    asked: &AtomicUsize,
    gate: &super::rogue::Gate,
    last: &Mutex<(Option<String>, serde_json::Value)>,
    answer: &Answer,
) {
    let mut out = match s.try_clone() {
        Ok(o) => o,
        Err(_) => return,
    };
    let mut r = BufReader::new(s);
    loop {
        let mut line = String::new();
        if r.read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
        let target = line.split(' ').nth(1).unwrap_or("").to_string();
        let mut len = 0usize;
        let mut authorization = None;
        loop {
            let mut h = String::new();
            if r.read_line(&mut h).unwrap_or(0) == 0 {
                return;
            }
            if h == "\r\n" {
                break;
            }
            if let Some((k, v)) = h.split_once(':') {
                if k.eq_ignore_ascii_case("content-length") {
                    len = v.trim().parse().unwrap_or(0);
                }
                if k.eq_ignore_ascii_case("authorization") {
                    authorization = Some(v.trim().to_string());
                }
            }
        }
        let mut body = vec![0u8; len];
        if r.read_exact(&mut body).is_err() {
            return;
        }
        *last.lock().unwrap() = (
            authorization,
            serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null),
        );
        asked.fetch_add(1, Ordering::SeqCst);
        let mode = *mode.lock().unwrap();
        let (status, text) = match mode {
            Mode::Hang => {
                std::thread::sleep(std::time::Duration::from_secs(3600));
                return;
            }
            Mode::Fail => (500, "{\"code\":\"internal\"}".to_string()),
            Mode::Garbage => (200, "<html>not json</html>".to_string()),
            Mode::Serve | Mode::Held => {
                if mode == Mode::Held {
                    gate.wait();
                }
                let question: serde_json::Value =
                    serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null);
                (200, answer(&target, &question).to_string())
            }
        };
        let reply = format!(
            "HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{text}",
            text.len()
        );
        if out.write_all(reply.as_bytes()).is_err() {
            return;
        }
    }
}

/// OPA's Data API around regorus.
pub struct Opa {
    server: Server,
}

impl Opa {
    /// Serves the policies in `config/policies/`.
    pub fn start() -> Opa {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/config/policies");
        let mut engine = regorus::Engine::new();
        for e in std::fs::read_dir(dir).expect("policies") {
            let path = e.expect("entry").path();
            if path.extension().is_some_and(|x| x == "rego") {
                engine.add_policy_from_file(&path).expect("policy compiles");
            }
        }
        let engine = Mutex::new(engine);
        let answer = move |target: &str, question: &serde_json::Value| {
            let Some(path) = target.strip_prefix("/v1/data/") else {
                return serde_json::json!({ "code": "not found" });
            };
            let rule = format!("data.{}", path.replace('/', "."));
            let mut e = engine.lock().unwrap();
            let input = regorus::Value::from_json_str(&question["input"].to_string())
                .unwrap_or_else(|_| regorus::Value::new_object());
            e.set_input(input);
            match e.eval_rule(rule) {
                Ok(regorus::Value::Undefined) => serde_json::json!({}),
                Ok(v) => {
                    let json: serde_json::Value =
                        serde_json::from_str(&v.to_json_str().unwrap_or_default())
                            .unwrap_or_default();
                    serde_json::json!({ "result": json })
                }
                Err(_) => serde_json::json!({}),
            }
        };
        Opa {
            server: Server::start(Arc::new(answer)),
        }
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.server.port)
    }

    /// Its plain-HTTP port (for a TLS front).
    pub fn port(&self) -> u16 {
        self.server.port
    }

    pub fn set_mode(&self, mode: Mode) {
        *self.server.mode.lock().unwrap() = mode;
    }

    /// Lets the questions held (`Mode::Held`) be answered.
    pub fn release(&self) {
        self.server.gate.open();
    }

    /// Questions asked so far.
    pub fn asked(&self) -> usize {
        self.server.asked.load(Ordering::SeqCst)
    }
}

/// OpenFGA's Check API over a list of tuples.
pub struct Fga {
    server: Server,
    /// The store id it answers for.
    pub store: String,
}

impl Fga {
    /// A store holding `tuples` of (user, relation, object).
    pub fn start(tuples: &[(&str, &str, &str)]) -> Fga {
        let store = "01HSTOREFORTESTS0000000000".to_string();
        let tuples: Vec<(String, String, String)> = tuples
            .iter()
            .map(|(u, r, o)| (u.to_string(), r.to_string(), o.to_string()))
            .collect();
        let want = format!("/stores/{store}/check");
        let answer = move |target: &str, q: &serde_json::Value| {
            if target != want {
                return serde_json::json!({ "code": "store_id_not_found" });
            }
            let t = &q["tuple_key"];
            let (user, relation, object) = (
                t["user"].as_str().unwrap_or(""),
                t["relation"].as_str().unwrap_or(""),
                t["object"].as_str().unwrap_or(""),
            );
            let has = |o: &str| {
                tuples
                    .iter()
                    .any(|(u, r, obj)| u == user && r == relation && obj == o)
            };
            serde_json::json!({ "allowed": has(object) || enclosing(object).iter().any(|o| has(o)) })
        };
        Fga {
            server: Server::start(Arc::new(answer)),
            store,
        }
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.server.port)
    }

    pub fn set_mode(&self, mode: Mode) {
        *self.server.mode.lock().unwrap() = mode;
    }

    pub fn asked(&self) -> usize {
        self.server.asked.load(Ordering::SeqCst)
    }

    /// The last question's `Authorization` header and body.
    pub fn last(&self) -> (Option<String>, serde_json::Value) {
        self.server.last.lock().unwrap().clone()
    }
}

/// The folders and the bucket that enclose `file:b/a/b/c.txt` or
/// `folder:b/a/`: `folder:b/a/b/`, `folder:b/a/`, `bucket:b`.
fn enclosing(object: &str) -> Vec<String> {
    let Some((_, path)) = object.split_once(':') else {
        return Vec::new();
    };
    let path = path.trim_end_matches('/');
    let Some((bucket, _)) = path.split_once('/') else {
        return Vec::new();
    };
    let mut out = Vec::new();
    let mut at = path;
    while let Some((parent, _)) = at.rsplit_once('/') {
        if parent == bucket {
            break;
        }
        out.push(format!("folder:{parent}/"));
        at = parent;
    }
    out.push(format!("bucket:{bucket}"));
    out
}
