//! Command line: `yatagarasu [--config PATH] [--check]`.

use yatagarasu::config::{self, Level};
use yatagarasu::{log, server};

const USAGE: &str = "usage: yatagarasu [--config PATH] [--check]

  --config PATH   configuration file (default /etc/yatagarasu/config.yaml)
  --check         validate the configuration, list every problem, exit 0 or 1
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
    yatagarasu::log!(
        Level::Info,
        "Starting yatagarasu",
        version = env!("CARGO_PKG_VERSION"),
        config = path
    );
    std::process::exit(server::run(cfg));
}

fn fail_usage(msg: &str) -> ! {
    eprintln!("yatagarasu: {msg}\n\n{USAGE}");
    std::process::exit(2);
}
