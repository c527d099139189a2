//! Command line: `yatagarasu [--config PATH] [--check]`.

use yatagarasu::config::{self, Level};
use yatagarasu::{log, server};

const USAGE: &str = "usage: yatagarasu [--config PATH] [--check]

  --config PATH   configuration file (default /etc/yatagarasu/config.yaml)
  --check         validate the configuration, list every problem, exit 0 or 1
  --probe ADDR    GET http://ADDR/health, exit 0 if it answers 200 (container HEALTHCHECK)
  --version       print the version
";

fn main() {
    let mut path = config::DEFAULT_PATH.to_string();
    let mut check = false;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--config" | "-c" => match args.next() {
                Some(p) => path = p,
                None => fail_usage("--config needs a path"),
            },
            s if s.starts_with("--config=") => path = s["--config=".len()..].to_string(),
            "--check" => check = true,
            "--probe" => match args.next() {
                Some(addr) => std::process::exit(probe(&addr)),
                None => fail_usage("--probe needs host:port"),
            },
            "--version" | "-V" => {
                println!("yatagarasu {}", env!("CARGO_PKG_VERSION"));
                return;
            }
            "--help" | "-h" => {
                print!("{USAGE}");
                return;
            }
            other => fail_usage(&format!("unknown argument {other:?}")),
        }
    }
    let cfg = match config::load(&path) {
        Ok(c) => c,
        Err(errors) => {
            eprintln!(
                "{path}: configuration is invalid ({} problem{}):",
                errors.len(),
                if errors.len() == 1 { "" } else { "s" }
            );
            for e in &errors {
                eprintln!("  - {e}");
            }
            std::process::exit(1);
        }
    };
    if check {
        println!(
            "{path}: configuration is valid ({} bucket{}, {} replica{})",
            cfg.buckets.len(),
            if cfg.buckets.len() == 1 { "" } else { "s" },
            cfg.buckets.iter().map(|b| b.replicas.len()).sum::<usize>(),
            if cfg.buckets.iter().map(|b| b.replicas.len()).sum::<usize>() == 1 {
                ""
            } else {
                "s"
            },
        );
        return;
    }
    log::init(cfg.logging.level, cfg.logging.format);
    log::install_bridge();
    // A panic is a bug: report it and exit non-zero so a supervisor restarts
    // the whole process, instead of running on with a dead worker.
    std::panic::set_hook(Box::new(|info| {
        let thread = std::thread::current().name().unwrap_or("?").to_string();
        yatagarasu::log!(
            Level::Error,
            "panic: exiting",
            thread = thread,
            detail = info
        );
        log::flush();
        std::process::exit(70);
    }));
    yatagarasu::log!(
        Level::Info,
        "Starting yatagarasu",
        version = env!("CARGO_PKG_VERSION"),
        config = path
    );
    std::process::exit(server::run(cfg, &path));
}

fn fail_usage(msg: &str) -> ! {
    eprintln!("yatagarasu: {msg}\n\n{USAGE}");
    std::process::exit(2);
}

/// A dependency-free liveness probe for container health checks.
fn probe(addr: &str) -> i32 {
    use std::io::{Read, Write};
    use std::net::ToSocketAddrs;
    use std::time::Duration;
    let Some(sock) = addr.to_socket_addrs().ok().and_then(|mut a| a.next()) else {
        eprintln!("--probe: {addr:?} is not host:port");
        return 2;
    };
    let Ok(mut s) = std::net::TcpStream::connect_timeout(&sock, Duration::from_secs(3)) else {
        return 1;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(3)));
    let req = format!("GET /health HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    if s.write_all(req.as_bytes()).is_err() {
        return 1;
    }
    let mut buf = [0u8; 32];
    match s.read(&mut buf) {
        Ok(n) if buf[..n].starts_with(b"HTTP/1.1 200") => 0,
        _ => 1,
    }
}
