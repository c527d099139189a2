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
    // Before the config is read: the default connection budgets follow
    // the limit.
    let fds = config::raise_fd_limit();
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
            for w in config::no_effect_warnings(&path) {
                eprintln!("warning: {w}");
            }
            std::process::exit(1);
        }
    };
    if check {
        for w in &cfg.warnings {
            println!("warning: {w}");
        }
        println!(
            "connection budgets: server.max_connections={}, server.max_upstream_connections={} (open-file limit {}, raised from {}; hard limit {})",
            cfg.server.max_connections,
            cfg.server.max_upstream_connections,
            fds.soft,
            fds.was,
            fds.hard
        );
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
    for w in &cfg.warnings {
        yatagarasu::log!(Level::Warn, "Configuration", warning = w);
    }
    yatagarasu::log!(
        Level::Info,
        "Open-file limit",
        soft = fds.soft,
        raised_from = fds.was,
        hard = fds.hard,
        max_connections = cfg.server.max_connections,
        max_upstream_connections = cfg.server.max_upstream_connections,
    );
    std::process::exit(server::run(cfg, &path));
}

fn fail_usage(msg: &str) -> ! {
    eprintln!("yatagarasu: {msg}\n\n{USAGE}");
    std::process::exit(2);
}

/// A liveness probe for container health checks (no curl in the image):
/// `GET /health` through the proxy's own upstream client.
fn probe(addr: &str) -> i32 {
    use std::net::ToSocketAddrs;
    let Some(sock) = addr.to_socket_addrs().ok().and_then(|mut a| a.next()) else {
        eprintln!("--probe: {addr:?} is not host:port");
        return 2;
    };
    let host = match sock.ip() {
        std::net::IpAddr::V6(v6) => format!("[{v6}]"),
        v4 => v4.to_string(),
    };
    let endpoint = config::Endpoint {
        tls: false,
        authority: format!("{host}:{}", sock.port()),
        host,
        port: sock.port(),
    };
    let runtime = monoio::RuntimeBuilder::<monoio::LegacyDriver>::new()
        .enable_timer()
        .build();
    let Ok(mut runtime) = runtime else {
        eprintln!("--probe: cannot start a runtime");
        return 1;
    };
    let timeout = std::time::Duration::from_secs(3);
    match runtime.block_on(yatagarasu::upstream::client::get_status(
        &endpoint, "/health", timeout,
    )) {
        Ok(200) => 0,
        Ok(status) => {
            eprintln!("--probe: /health answered {status}");
            1
        }
        Err(e) => {
            eprintln!("--probe: {e}");
            1
        }
    }
}
