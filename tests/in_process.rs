//! The proxy started in-process (`Bound::bind` + `run_until`) on an
//! ephemeral port: fast tests of the request path without spawning the
//! binary. The upstream is still a real socket server (`support::rogue`).

mod support;

use std::sync::mpsc;
use std::time::Duration;
use support::http;
use support::rogue::{send, Rogue};
use yatagarasu::server::{Bound, Control};

/// A running in-process proxy; stopping it waits for `run_until` to return.
struct InProcess {
    port: u16,
    metrics_port: u16,
    control: mpsc::Sender<Control>,
    done: std::thread::JoinHandle<i32>,
}

impl InProcess {
    fn start(upstream: &str) -> InProcess {
        let yaml = format!(
            "server:\n  address: \"127.0.0.1:0\"\n  workers: 1\nmetrics:\n  address: \"127.0.0.1\"\n  port: 0\nbuckets:\n  - name: \"b\"\n    path_prefix: \"/b\"\n    s3:\n      bucket: \"bkt\"\n      endpoint: \"{upstream}\"\n      access_key: \"k\"\n      secret_key: \"s\"\n      health_check:\n        enabled: false\n"
        );
        let config = yatagarasu::config::parse(&yaml, &|_| None).expect("valid config");
        let server = Bound::bind(config, "in-process.yaml").expect("bind");
        let port = server.local_addr().port();
        let metrics_port = server.metrics_addr().expect("metrics").port();
        let (control, rx) = mpsc::channel();
        let done = std::thread::spawn(move || server.run_until(rx));
        InProcess {
            port,
            metrics_port,
            control,
            done,
        }
    }

    fn stop(self) -> i32 {
        self.control.send(Control::Stop).expect("server running");
        self.done.join().expect("run_until returns")
    }
}

#[test]
fn serves_on_an_ephemeral_port_and_stops_on_request() {
    let up = Rogue::start(|_| vec![send("HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhi")]);
    let p = InProcess::start(&up.endpoint());
    let r = http::get(p.port, "/b/k", &[]);
    assert_eq!((r.status, r.text().as_str()), (200, "hi"));
    assert_eq!(up.seen()[0].target, "/bkt/k");
    let m = http::get(p.metrics_port, "/metrics", &[]).text();
    assert!(m.contains("yatagarasu_requests_total"), "{m}");
    assert_eq!(p.stop(), 0);
}

#[test]
fn a_stopped_server_refuses_new_connections() {
    let up = Rogue::start(|_| vec![send("HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")]);
    let p = InProcess::start(&up.endpoint());
    let port = p.port;
    assert_eq!(p.stop(), 0);
    std::thread::sleep(Duration::from_millis(100));
    assert!(http::try_get(port, "/b/k", &[]).is_err());
}
