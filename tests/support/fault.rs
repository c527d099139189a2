//! A TCP fault proxy placed between yatagarasu and a replica.
//!
//! The mode is read when a connection is accepted, so switching it affects new
//! upstream connections. It also counts connections and records the first
//! bytes of every request for assertions, and can hold what clients send
//! (recorded, not yet forwarded) until released ([`Fault::hold`]).

use std::io::Write;
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Forward both ways untouched.
    Pass,
    /// Accept, read, never answer.
    Hang,
    /// Answer every request with this status and an empty body.
    Status(u16),
    /// Forward, then reset the connection after this many response bytes.
    ResetAfter(usize),
    /// Forward this many response bytes, then go silent (connection kept open).
    StallAfter(usize),
    /// Forward responses `bytes` at a time, sleeping `every_ms` between pieces.
    Drip { bytes: usize, every_ms: u64 },
    /// Forward, but close connections idle for this many ms (without saying so).
    CloseIdle(u64),
}

pub struct Fault {
    pub port: u16,
    mode: Arc<Mutex<Mode>>,
    pub connections: Arc<AtomicUsize>,
    pub requests: Arc<Mutex<Vec<Vec<u8>>>>,
    stop: Arc<AtomicBool>,
    sockets: Arc<Mutex<Vec<TcpStream>>>,
    held: Held,
}

/// Whether what clients send is held back, and the forwarders waiting.
type Held = Arc<(Mutex<bool>, Condvar)>;

impl Fault {
    /// Starts a fault proxy forwarding to `127.0.0.1:target`.
    pub fn start(target: u16, mode: Mode) -> Fault {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind fault proxy");
        let port = listener.local_addr().expect("addr").port();
        let f = Fault {
            port,
            mode: Arc::new(Mutex::new(mode)),
            connections: Arc::new(AtomicUsize::new(0)),
            requests: Arc::new(Mutex::new(Vec::new())),
            stop: Arc::new(AtomicBool::new(false)),
            sockets: Arc::new(Mutex::new(Vec::new())),
            held: Arc::new((Mutex::new(false), Condvar::new())),
        };
        let (m, c, r, s, socks, held) = (
            f.mode.clone(),
            f.connections.clone(),
            f.requests.clone(),
            f.stop.clone(),
            f.sockets.clone(),
            f.held.clone(),
        );
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                if s.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(client) = conn else { continue };
                c.fetch_add(1, Ordering::SeqCst);
                let mode = *m.lock().unwrap();
                if let Ok(clone) = client.try_clone() {
                    socks.lock().unwrap().push(clone);
                }
                let (r, socks, held) = (r.clone(), socks.clone(), held.clone());
                std::thread::spawn(move || handle(client, target, mode, r, socks, held));
            }
        });
        f
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn set(&self, mode: Mode) {
        *self.mode.lock().unwrap() = mode;
    }

    /// Holds what clients send from now on: recorded as it arrives, and
    /// forwarded once [`Fault::release`]d.
    pub fn hold(&self) {
        *self.held.0.lock().unwrap() = true;
    }

    /// Forwards what was held, and everything after.
    pub fn release(&self) {
        *self.held.0.lock().unwrap() = false;
        self.held.1.notify_all();
    }

    /// Closes every connection made so far (the listener stays).
    pub fn drop_connections(&self) {
        for s in self.sockets.lock().unwrap().drain(..) {
            let _ = s.shutdown(Shutdown::Both);
        }
    }

    pub fn recorded(&self) -> Vec<String> {
        self.requests
            .lock()
            .unwrap()
            .iter()
            .map(|r| String::from_utf8_lossy(r).into_owned())
            .collect()
    }
}

impl Drop for Fault {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(("127.0.0.1", self.port));
        self.drop_connections();
    }
}

fn read_head(s: &mut TcpStream, buf: &mut Vec<u8>, rec: &Mutex<Vec<Vec<u8>>>) -> bool {
    let mut tmp = [0u8; 4096];
    loop {
        if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            rec.lock().unwrap().push(buf[..p + 4].to_vec());
            buf.drain(..p + 4);
            return true;
        }
        match super::read_retry(s, &mut tmp) {
            Ok(0) | Err(_) => return false,
            Ok(n) => buf.extend_from_slice(&tmp[..n]),
        }
    }
}

fn handle(
    mut client: TcpStream,
    target: u16,
    mode: Mode,
    rec: Arc<Mutex<Vec<Vec<u8>>>>,
    socks: Arc<Mutex<Vec<TcpStream>>>,
    held: Held,
) {
    match mode {
        Mode::Hang => {
            let mut tmp = [0u8; 4096];
            while matches!(super::read_retry(&mut client, &mut tmp), Ok(n) if n > 0) {}
            return;
        }
        Mode::Status(code) => {
            let mut buf = Vec::new();
            while read_head(&mut client, &mut buf, &rec) {
                let body = format!(
                    "<Error><Code>InjectedFault</Code><Message>status {code}</Message></Error>"
                );
                let resp = format!(
                    "HTTP/1.1 {code} Injected\r\nContent-Length: {}\r\n\r\n{body}",
                    body.len()
                );
                if client.write_all(resp.as_bytes()).is_err() {
                    return;
                }
            }
            return;
        }
        _ => {}
    }
    let Ok(upstream) = TcpStream::connect(("127.0.0.1", target)) else {
        return;
    };
    let _ = upstream.set_nodelay(true);
    let _ = client.set_nodelay(true);
    if let Ok(u) = upstream.try_clone() {
        socks.lock().unwrap().push(u);
    }
    // client -> upstream, recording requests.
    let (Ok(mut c_read), Ok(mut u_write)) = (client.try_clone(), upstream.try_clone()) else {
        return;
    };
    std::thread::spawn(move || {
        let mut tmp = [0u8; 65536];
        loop {
            match super::read_retry(&mut c_read, &mut tmp) {
                Ok(0) | Err(_) => {
                    let _ = u_write.shutdown(Shutdown::Write);
                    return;
                }
                Ok(n) => {
                    rec.lock().unwrap().push(tmp[..n.min(8192)].to_vec());
                    let (lock, released) = &*held;
                    drop(released.wait_while(lock.lock().unwrap(), |h| *h));
                    if u_write.write_all(&tmp[..n]).is_err() {
                        return;
                    }
                }
            }
        }
    });
    // upstream -> client, applying the mode.
    let mut upstream = upstream;
    if let Mode::CloseIdle(ms) = mode {
        let _ = upstream.set_read_timeout(Some(Duration::from_millis(ms)));
    }
    let mut sent = 0usize;
    let mut tmp = vec![0u8; 65536];
    loop {
        let n = match super::read_retry(&mut upstream, &mut tmp) {
            Ok(0) => break,
            Ok(n) => n,
            Err(_) => break,
        };
        let mut chunk = &tmp[..n];
        match mode {
            Mode::ResetAfter(limit) | Mode::StallAfter(limit) => {
                let room = limit.saturating_sub(sent);
                if chunk.len() > room {
                    chunk = &chunk[..room];
                    let _ = client.write_all(chunk);
                    if matches!(mode, Mode::ResetAfter(_)) {
                        // SO_LINGER 0 then close: the peer sees a reset.
                        super::rogue::reset_on_close(&client);
                        let _ = upstream.shutdown(Shutdown::Both);
                        drop(client);
                        return;
                    }
                    // Stall: keep both sockets open, send nothing more.
                    let mut t = [0u8; 1];
                    while matches!(super::read_retry(&mut client, &mut t), Ok(n) if n > 0) {}
                    return;
                }
            }
            Mode::Drip { bytes, every_ms } => {
                for piece in chunk.chunks(bytes.max(1)) {
                    if client.write_all(piece).is_err() {
                        return;
                    }
                    std::thread::sleep(Duration::from_millis(every_ms));
                }
                sent += chunk.len();
                continue;
            }
            _ => {}
        }
        if client.write_all(chunk).is_err() {
            break;
        }
        sent += chunk.len();
    }
    let _ = client.shutdown(Shutdown::Both);
    let _ = upstream.shutdown(Shutdown::Both);
}
