//! A scripted misbehaving upstream: a real socket server on loopback that
//! answers each request with whatever raw bytes the test scripts, including
//! responses no well-behaved S3 would send (interim 1xx heads, bodies after a
//! 304, bytes past the Content-Length, bad framing, resets mid-body).
//!
//! Connections are kept alive: after a script's steps, the next request on
//! the same connection is read and answered, unless a step closed it. Every
//! request head is recorded with the index of the connection it came on, so
//! tests can tell whether a connection was reused.

use std::io::Write;
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// One thing the upstream does while answering a request.
#[derive(Debug, Clone)]
pub enum Step {
    /// Write these bytes.
    Send(Vec<u8>),
    /// Wait.
    Sleep(Duration),
    /// Close with a reset (SO_LINGER 0).
    Reset,
    /// Close cleanly (FIN).
    Close,
    /// Keep the connection open, never answer again.
    Hang,
    /// Wait until the gate is opened (by the test, on an event it saw).
    Wait(Gate),
    /// Write these bytes as S3 does: a send that makes no progress for
    /// `stall` is dropped (the connection reset), and `dropped` opened.
    SendOrDrop {
        bytes: Vec<u8>,
        stall: Duration,
        dropped: Gate,
    },
}

/// A latch a script waits on: the test opens it when what it waits for
/// has happened (no sleeping to line events up).
#[derive(Debug, Clone, Default)]
pub struct Gate(Arc<(Mutex<bool>, std::sync::Condvar)>);

impl Gate {
    pub fn open(&self) {
        let (lock, cv) = &*self.0;
        *lock.lock().unwrap() = true;
        cv.notify_all();
    }

    pub fn wait(&self) {
        let (lock, cv) = &*self.0;
        let mut open = lock.lock().unwrap();
        while !*open {
            open = cv.wait(open).unwrap();
        }
    }

    /// Waits until the gate is opened or `timeout` passes; whether it was.
    pub fn wait_for(&self, timeout: Duration) -> bool {
        let (lock, cv) = &*self.0;
        let open = lock.lock().unwrap();
        let (open, _) = cv.wait_timeout_while(open, timeout, |o| !*o).unwrap();
        *open
    }
}

/// `Step::Send` of a string.
pub fn send(s: &str) -> Step {
    Step::Send(s.as_bytes().to_vec())
}

/// A whole 200: its `Content-Length`, then `headers` (each line ending in
/// CRLF), then `body`, in one write.
pub fn ok_with(headers: &str, body: &[u8]) -> Step {
    let mut out = format!(
        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n{headers}\r\n",
        body.len()
    )
    .into_bytes();
    out.extend_from_slice(body);
    Step::Send(out)
}

/// A request as the upstream saw it.
#[derive(Debug, Clone)]
pub struct Seen {
    /// Request line and headers.
    pub head: String,
    /// The request target (path and query).
    pub target: String,
    /// Which accepted connection (0-based) carried it.
    pub connection: usize,
}

impl Seen {
    /// The single range asked for (`bytes=a-b`, `a-`, `-n`) of an object of
    /// `total` bytes, as `(first, last)` with `last` clamped to the object
    /// (`first` may be past it: unsatisfiable); `None` without one.
    pub fn range(&self, total: u64) -> Option<(u64, u64)> {
        let r = self.header("range")?;
        let (a, b) = r.strip_prefix("bytes=")?.split_once('-')?;
        let end = total.saturating_sub(1);
        match (a.parse::<u64>().ok(), b.parse::<u64>().ok()) {
            (Some(a), Some(b)) => Some((a, b.min(end))),
            (Some(a), None) => Some((a, end)),
            (None, Some(n)) => Some((total - n.min(total), end)),
            _ => None,
        }
    }

    pub fn header(&self, name: &str) -> Option<String> {
        self.head.lines().skip(1).find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim()
                .eq_ignore_ascii_case(name)
                .then(|| v.trim().to_string())
        })
    }
}

type Script = dyn Fn(&Seen) -> Vec<Step> + Send + Sync;

pub struct Rogue {
    pub port: u16,
    pub seen: Arc<Mutex<Vec<Seen>>>,
    pub connections: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    /// A clone of every connection (by index), to shut them down on drop.
    sockets: Arc<Mutex<Vec<(usize, TcpStream)>>>,
}

impl Rogue {
    /// Starts the upstream; `script` decides the steps for each request.
    pub fn start(script: impl Fn(&Seen) -> Vec<Step> + Send + Sync + 'static) -> Rogue {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind rogue upstream");
        let port = listener.local_addr().expect("addr").port();
        let r = Rogue {
            port,
            seen: Arc::new(Mutex::new(Vec::new())),
            connections: Arc::new(AtomicUsize::new(0)),
            stop: Arc::new(AtomicBool::new(false)),
            sockets: Arc::new(Mutex::new(Vec::new())),
        };
        let script: Arc<Script> = Arc::new(script);
        let (seen, conns, stop, socks) = (
            r.seen.clone(),
            r.connections.clone(),
            r.stop.clone(),
            r.sockets.clone(),
        );
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                if stop.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(stream) = conn else { continue };
                let index = conns.fetch_add(1, Ordering::SeqCst);
                if let Ok(clone) = stream.try_clone() {
                    socks.lock().unwrap().push((index, clone));
                }
                let (script, seen, socks) = (script.clone(), seen.clone(), socks.clone());
                std::thread::spawn(move || serve(stream, index, &*script, &seen, &socks));
            }
        });
        r
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    /// The GET requests it answered (an origin's own count of fetches).
    pub fn gets(&self) -> usize {
        self.seen
            .lock()
            .unwrap()
            .iter()
            .filter(|s| s.head.starts_with("GET "))
            .count()
    }
}

impl Drop for Rogue {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(("127.0.0.1", self.port));
        for (_, s) in self.sockets.lock().unwrap().drain(..) {
            let _ = s.shutdown(Shutdown::Both);
        }
    }
}

/// Sets SO_LINGER 0 so closing `s` sends a reset.
pub fn reset_on_close(s: &TcpStream) {
    let l = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: the fd belongs to `s`, open for the duration of the call; the
    // option value is a valid `linger` of the size passed.
    unsafe {
        use std::os::fd::AsRawFd;
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            &l as *const libc::linger as *const libc::c_void,
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        );
    }
}

fn serve(
    mut s: TcpStream,
    index: usize,
    script: &Script,
    seen: &Mutex<Vec<Seen>>,
    sockets: &Mutex<Vec<(usize, TcpStream)>>,
) {
    let _ = s.set_nodelay(true);
    let mut buf = Vec::new();
    let mut tmp = [0u8; 8192];
    loop {
        let end = loop {
            if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break p + 4;
            }
            match super::read_retry(&mut s, &mut tmp) {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&tmp[..n]),
            }
        };
        let head = String::from_utf8_lossy(&buf[..end]).into_owned();
        buf.drain(..end);
        let target = head.split(' ').nth(1).unwrap_or("").to_string();
        let request = Seen {
            head,
            target,
            connection: index,
        };
        seen.lock().unwrap().push(request.clone());
        for step in script(&request) {
            match step {
                Step::Send(bytes) => {
                    if s.write_all(&bytes).is_err() {
                        return;
                    }
                }
                Step::Sleep(d) => std::thread::sleep(d),
                Step::Wait(g) => g.wait(),
                Step::SendOrDrop {
                    bytes,
                    stall,
                    dropped,
                } => {
                    let _ = s.set_write_timeout(Some(stall));
                    if s.write_all(&bytes).is_err() {
                        reset_on_close(&s);
                        sockets.lock().unwrap().retain(|(i, _)| *i != index);
                        dropped.open();
                        return;
                    }
                    let _ = s.set_write_timeout(None);
                }
                Step::Reset => {
                    reset_on_close(&s);
                    // The reset goes out when the last descriptor closes:
                    // drop the clone kept for shutdown first.
                    sockets.lock().unwrap().retain(|(i, _)| *i != index);
                    return;
                }
                Step::Close => {
                    let _ = s.shutdown(Shutdown::Both);
                    return;
                }
                Step::Hang => {
                    while matches!(super::read_retry(&mut s, &mut tmp), Ok(n) if n > 0) {}
                    return;
                }
            }
        }
    }
}
