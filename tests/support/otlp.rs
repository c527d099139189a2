//! An OTLP/HTTP trace receiver: accepts `POST /v1/traces` and decodes each
//! body with the official protobuf definitions (`opentelemetry-proto`),
//! keeping every span it got.

use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::trace::v1::Span;
use prost::Message;
use std::io::{Read, Write};
use std::net::TcpListener;
use std::sync::{Arc, Mutex};

pub struct Collector {
    pub port: u16,
    spans: Arc<Mutex<Vec<Span>>>,
    service_names: Arc<Mutex<Vec<String>>>,
}

impl Collector {
    pub fn start() -> Collector {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind collector");
        let port = listener.local_addr().expect("addr").port();
        let spans = Arc::new(Mutex::new(Vec::new()));
        let names = Arc::new(Mutex::new(Vec::new()));
        let (s, n) = (spans.clone(), names.clone());
        std::thread::spawn(move || {
            for conn in listener.incoming().flatten() {
                let (s, n) = (s.clone(), n.clone());
                std::thread::spawn(move || serve(conn, &s, &n));
            }
        });
        Collector {
            port,
            spans,
            service_names: names,
        }
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Every span received of trace `trace_id` (hex).
    pub fn trace(&self, trace_id: &str) -> Vec<Span> {
        self.spans
            .lock()
            .expect("lock")
            .iter()
            .filter(|s| hex::encode(&s.trace_id) == trace_id)
            .cloned()
            .collect()
    }

    pub fn span_count(&self) -> usize {
        self.spans.lock().expect("lock").len()
    }

    pub fn service_names(&self) -> Vec<String> {
        self.service_names.lock().expect("lock").clone()
    }
}

fn serve(mut conn: std::net::TcpStream, spans: &Mutex<Vec<Span>>, names: &Mutex<Vec<String>>) {
    let mut buf = Vec::new();
    let mut tmp = [0u8; 65536];
    loop {
        let head_end = buf.windows(4).position(|w| w == b"\r\n\r\n");
        if let Some(end) = head_end {
            let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0);
            if buf.len() >= end + 4 + len {
                let body = buf[end + 4..end + 4 + len].to_vec();
                buf.drain(..end + 4 + len);
                let ok = head.starts_with("post /v1/traces ")
                    && head.contains("content-type: application/x-protobuf");
                let status = match ExportTraceServiceRequest::decode(body.as_slice()) {
                    Ok(req) if ok => {
                        for rs in req.resource_spans {
                            if let Some(r) = rs.resource {
                                for kv in r.attributes {
                                    if kv.key == "service.name" {
                                        if let Some(v) = kv.value.and_then(|v| v.value) {
                                            names.lock().expect("lock").push(format!("{v:?}"));
                                        }
                                    }
                                }
                            }
                            for ss in rs.scope_spans {
                                spans.lock().expect("lock").extend(ss.spans);
                            }
                        }
                        "200 OK"
                    }
                    _ => "400 Bad Request",
                };
                let answer = format!("HTTP/1.1 {status}\r\nContent-Type: application/x-protobuf\r\nContent-Length: 0\r\n\r\n");
                if conn.write_all(answer.as_bytes()).is_err() {
                    return;
                }
                continue;
            }
        }
        match conn.read(&mut tmp) {
            Ok(0) | Err(_) => return,
            Ok(n) => buf.extend_from_slice(&tmp[..n]),
        }
    }
}
