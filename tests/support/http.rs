//! A tiny blocking HTTP/1.1 client for tests, able to send raw bytes and to
//! keep a connection alive across requests.

use std::io::{self, Write};
use std::net::TcpStream;
use std::time::Duration;

#[derive(Debug, Clone)]
pub struct Resp {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Resp {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// A client connection that can carry several requests.
pub struct Conn {
    pub stream: TcpStream,
    buf: Vec<u8>,
}

impl Conn {
    pub fn open(port: u16) -> io::Result<Conn> {
        let stream = TcpStream::connect(("127.0.0.1", port))?;
        stream.set_read_timeout(Some(Duration::from_secs(60)))?;
        stream.set_nodelay(true)?;
        Ok(Conn {
            stream,
            buf: Vec::new(),
        })
    }

    /// A connection whose receive buffer is `rcvbuf` bytes from the start
    /// (set before connecting, so the window offered is small too): the
    /// proxy's writes to it end part-way while the client does not read.
    pub fn open_small_window(port: u16, rcvbuf: i32) -> io::Result<Conn> {
        use std::os::fd::FromRawFd;
        // SAFETY: plain socket calls on a descriptor created here; the
        // option and address point to values that live across each call.
        let stream = unsafe {
            let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
            if fd < 0 {
                return Err(io::Error::last_os_error());
            }
            let stream = TcpStream::from_raw_fd(fd);
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_RCVBUF,
                (&rcvbuf as *const i32).cast(),
                std::mem::size_of::<i32>() as libc::socklen_t,
            );
            let addr = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: port.to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from(std::net::Ipv4Addr::LOCALHOST).to_be(),
                },
                sin_zero: [0; 8],
            };
            let r = libc::connect(
                fd,
                (&addr as *const libc::sockaddr_in).cast(),
                std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
            );
            if r < 0 {
                return Err(io::Error::last_os_error());
            }
            stream
        };
        stream.set_read_timeout(Some(Duration::from_secs(60)))?;
        Ok(Conn {
            stream,
            buf: Vec::new(),
        })
    }

    pub fn send(&mut self, raw: &[u8]) -> io::Result<()> {
        self.stream.write_all(raw)
    }

    pub fn request(
        &mut self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
    ) -> io::Result<Resp> {
        let mut raw = format!("{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n");
        for (k, v) in headers {
            raw.push_str(&format!("{k}: {v}\r\n"));
        }
        raw.push_str("\r\n");
        self.send(raw.as_bytes())?;
        self.read_response(method == "HEAD")
    }

    fn fill(&mut self) -> io::Result<usize> {
        let mut tmp = [0u8; 65536];
        let n = super::read_retry(&mut self.stream, &mut tmp)?;
        self.buf.extend_from_slice(&tmp[..n]);
        Ok(n)
    }

    /// Reads one response; errors if the connection ends before it is complete.
    pub fn read_response(&mut self, head_request: bool) -> io::Result<Resp> {
        loop {
            let mut headers = [httparse::EMPTY_HEADER; 64];
            let mut r = httparse::Response::new(&mut headers);
            match r.parse(&self.buf) {
                Ok(httparse::Status::Complete(n)) => {
                    let status = r.code.unwrap_or(0);
                    let hs: Vec<(String, String)> = r
                        .headers
                        .iter()
                        .map(|h| {
                            (
                                h.name.to_string(),
                                String::from_utf8_lossy(h.value).into_owned(),
                            )
                        })
                        .collect();
                    self.buf.drain(..n);
                    let get = |name: &str| {
                        hs.iter()
                            .find(|(k, _)| k.eq_ignore_ascii_case(name))
                            .map(|(_, v)| v.clone())
                    };
                    let body = if head_request || status == 304 || status == 204 {
                        Vec::new()
                    } else if get("transfer-encoding")
                        .is_some_and(|v| v.eq_ignore_ascii_case("chunked"))
                    {
                        self.read_chunked()?
                    } else if let Some(len) = get("content-length") {
                        let len: usize = len
                            .trim()
                            .parse()
                            .map_err(|_| io::Error::other("bad content-length"))?;
                        while self.buf.len() < len {
                            if self.fill()? == 0 {
                                return Err(io::Error::new(
                                    io::ErrorKind::UnexpectedEof,
                                    format!("body cut short at {} of {len}", self.buf.len()),
                                ));
                            }
                        }
                        self.buf.drain(..len).collect()
                    } else {
                        while self.fill()? > 0 {}
                        std::mem::take(&mut self.buf)
                    };
                    return Ok(Resp {
                        status,
                        headers: hs,
                        body,
                    });
                }
                Ok(httparse::Status::Partial) => {
                    if self.fill()? == 0 {
                        return Err(io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            "connection closed before a response",
                        ));
                    }
                }
                Err(e) => return Err(io::Error::other(format!("bad response: {e}"))),
            }
        }
    }

    fn read_chunked(&mut self) -> io::Result<Vec<u8>> {
        let mut body = Vec::new();
        loop {
            let line_end = loop {
                if let Some(p) = self.buf.windows(2).position(|w| w == b"\r\n") {
                    break p;
                }
                if self.fill()? == 0 {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "chunked body cut short",
                    ));
                }
            };
            let line = String::from_utf8_lossy(&self.buf[..line_end]).into_owned();
            let size = usize::from_str_radix(line.split(';').next().unwrap_or("").trim(), 16)
                .map_err(|_| io::Error::other("bad chunk size"))?;
            self.buf.drain(..line_end + 2);
            while self.buf.len() < size + 2 {
                if self.fill()? == 0 {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "chunk cut short",
                    ));
                }
            }
            if size == 0 {
                // Skip (empty) trailers.
                self.buf.drain(..2);
                return Ok(body);
            }
            body.extend_from_slice(&self.buf[..size]);
            self.buf.drain(..size + 2);
        }
    }

    /// True once the peer has closed the connection (EOF or reset within `wait`).
    pub fn is_closed(&mut self, wait: Duration) -> bool {
        let _ = self.stream.set_read_timeout(Some(wait));
        let mut tmp = [0u8; 1];
        match super::read_retry(&mut self.stream, &mut tmp) {
            Ok(0) => true,
            Ok(_) => false,
            Err(e) => !matches!(
                e.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
            ),
        }
    }
}

pub fn try_get(port: u16, path: &str, headers: &[(&str, &str)]) -> io::Result<Resp> {
    Conn::open(port)?.request("GET", path, &[&[("Connection", "close")], headers].concat())
}

/// `method path` on a new connection, with `Authorization: Bearer <token>`
/// when a token is given (the admin API).
pub fn with_bearer(port: u16, method: &str, path: &str, token: Option<&str>) -> Resp {
    let bearer = token.map(|t| format!("Bearer {t}"));
    let headers: Vec<(&str, &str)> = bearer
        .iter()
        .map(|b| ("Authorization", b.as_str()))
        .collect();
    Conn::open(port)
        .and_then(|mut c| c.request(method, path, &headers))
        .unwrap_or_else(|e| panic!("{method} {path} on :{port}: {e}"))
}

pub fn get(port: u16, path: &str, headers: &[(&str, &str)]) -> Resp {
    try_get(port, path, headers).unwrap_or_else(|e| panic!("GET {path} on :{port}: {e}"))
}

pub fn head(port: u16, path: &str) -> Resp {
    Conn::open(port)
        .and_then(|mut c| c.request("HEAD", path, &[("Connection", "close")]))
        .unwrap_or_else(|e| panic!("HEAD {path}: {e}"))
}

/// Sends raw bytes on a new connection and reads one response.
pub fn raw(port: u16, bytes: &[u8]) -> io::Result<Resp> {
    let mut c = Conn::open(port)?;
    c.send(bytes)?;
    c.read_response(false)
}

/// A SigV4-signed request straight to an S3 endpoint (test setup: buckets, uploads).
pub fn signed(port: u16, method: &str, path: &str, body: &[u8], ak: &str, sk: &str) -> Resp {
    let host = format!("127.0.0.1:{port}");
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {host}\r\nContent-Length: {}\r\nConnection: close\r\n",
        body.len()
    )
    .into_bytes();
    let creds = yatagarasu::credentials::Credentials {
        access_key: ak.into(),
        secret_key: sk.into(),
        session_token: None,
        expires: None,
    };
    yatagarasu::s3::Signer::new(&creds, "us-east-1")
        .sign_into(method, &host, path, std::time::SystemTime::now(), &mut head)
        .expect("sign");
    head.extend_from_slice(b"\r\n");
    let mut c = Conn::open(port).expect("connect to S3");
    c.send(&head).expect("send head");
    c.send(body).expect("send body");
    c.read_response(method == "HEAD").expect("S3 response")
}
