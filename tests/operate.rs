//! Operating it as a service (issue #27): systemd readiness and watchdog
//! through a socket that plays systemd's side, and the shipped unit file
//! checked by `systemd-analyze verify` where it is installed.

mod support;

use std::os::unix::net::UnixDatagram;
use std::time::{Duration, Instant};
use support::*;

#[test]
fn readiness_and_the_watchdog_reach_systemd_s_socket() {
    let dir = tempfile::tempdir().expect("dir");
    let path = dir.path().join("notify");
    let systemd = UnixDatagram::bind(&path).expect("bind the notify socket");
    systemd
        .set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    let s3 = S3::start();
    s3.create_bucket("data-bucket");
    let socket = path.to_str().expect("utf-8 path");
    let proxy = Proxy::start_with(
        &single_bucket("/data", "data-bucket", &s3.endpoint()),
        2,
        &[("NOTIFY_SOCKET", socket), ("WATCHDOG_USEC", "400000")],
    );
    let mut buf = [0u8; 512];
    let n = systemd.recv(&mut buf).expect("READY=1");
    let ready = String::from_utf8_lossy(&buf[..n]).into_owned();
    assert!(ready.contains("READY=1"), "{ready}");
    assert!(
        ready.contains(&format!("MAINPID={}", proxy.pid())),
        "{ready}"
    );
    // Fed every half interval while both workers tick.
    let started = Instant::now();
    let mut fed = 0;
    while fed < 3 {
        let n = systemd.recv(&mut buf).expect("WATCHDOG=1");
        if &buf[..n] == b"WATCHDOG=1" {
            fed += 1;
        }
        assert!(started.elapsed() < Duration::from_secs(30));
    }
}

#[test]
fn the_shipped_unit_file_verifies() {
    if std::process::Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!("systemd-analyze is not installed; skipped");
        return;
    }
    // The unit names the packaged path; verify a copy naming the built one.
    let unit = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/deploy/systemd/yatagarasu.service"
    ))
    .expect("unit file")
    .replace("/usr/bin/yatagarasu", env!("CARGO_BIN_EXE_yatagarasu"));
    let dir = tempfile::tempdir().expect("dir");
    let path = dir.path().join("yatagarasu.service");
    std::fs::write(&path, unit).expect("write unit");
    let out = std::process::Command::new("systemd-analyze")
        .arg("verify")
        .arg(&path)
        .output()
        .expect("systemd-analyze");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // Lines about this unit only (the host's other units may warn).
    let ours: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("yatagarasu.service"))
        .collect();
    assert!(ours.is_empty(), "{text}");
}

fn run(cmd: &str, args: &[&str]) -> (bool, String) {
    run_command(std::process::Command::new(cmd).args(args))
}

/// The package (deploy/debian/build.sh, dpkg-deb) installs the binary, the
/// config as a conffile, the unit and the system user; the installed
/// binary checks the installed config; a purge removes it all.
#[test]
fn the_debian_package_installs_checks_and_purges_cleanly() {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    if !root || !run("dpkg", &["--version"]).0 {
        eprintln!("needs root and dpkg; skipped");
        return;
    }
    if run("dpkg", &["-s", "yatagarasu"]).0 {
        eprintln!("a yatagarasu package is installed on this machine; left alone, skipped");
        return;
    }
    let dir = tempfile::tempdir().expect("dir");
    let deb = dir.path().join("yatagarasu.deb");
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/debian/build.sh");
    let deb_path = deb.to_str().expect("utf-8 path");
    let out = std::process::Command::new("bash")
        .args([script, env!("CARGO_BIN_EXE_yatagarasu"), deb_path])
        .env("DEB_COMPRESSION", "gzip")
        .output()
        .expect("bash");
    let (ok, out) = (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    );
    assert!(ok, "{out}");
    let (ok, out) = run("dpkg", &["-i", deb_path]);
    assert!(ok, "{out}");
    let installed = || {
        assert!(std::path::Path::new("/usr/bin/yatagarasu").exists());
        assert!(std::path::Path::new("/lib/systemd/system/yatagarasu.service").exists());
        assert!(run("getent", &["passwd", "yatagarasu"]).0, "no system user");
        let (ok, out) = run(
            "/usr/bin/yatagarasu",
            &["--check", "--config", "/etc/yatagarasu/config.yaml"],
        );
        assert!(ok, "{out}");
        let (_, conffiles) = run("dpkg-query", &["-W", "-f=${Conffiles}", "yatagarasu"]);
        assert!(
            conffiles.contains("/etc/yatagarasu/config.yaml"),
            "{conffiles}"
        );
        // An operator's edit survives reinstalling the package.
        let edited = std::fs::read_to_string("/etc/yatagarasu/config.yaml")
            .expect("config")
            .replace("max_cache_size_mb: 512", "max_cache_size_mb: 256");
        std::fs::write("/etc/yatagarasu/config.yaml", &edited).expect("edit");
        let (ok, out) = run("dpkg", &["-i", "--force-confold", deb_path]);
        assert!(ok, "{out}");
        let now = std::fs::read_to_string("/etc/yatagarasu/config.yaml").expect("config");
        assert!(
            now.contains("max_cache_size_mb: 256"),
            "the conffile was replaced"
        );
    };
    let outcome = std::panic::catch_unwind(installed);
    // Whatever happened, the machine is left as it was.
    let (purged, out) = run("dpkg", &["--purge", "yatagarasu"]);
    if let Err(e) = outcome {
        std::panic::resume_unwind(e);
    }
    assert!(purged, "{out}");
    assert!(!std::path::Path::new("/usr/bin/yatagarasu").exists());
    assert!(!std::path::Path::new("/etc/yatagarasu/config.yaml").exists());
    assert!(
        !run("getent", &["passwd", "yatagarasu"]).0,
        "the user outlived the purge"
    );
}

/// `promtool` with `args`, from `dir`; its output, and whether it passed.
fn promtool(dir: &str, args: &[&str], stdin: Option<&str>) -> (bool, String) {
    use std::io::Write;
    let mut cmd = std::process::Command::new("promtool");
    cmd.current_dir(dir)
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let mut child = cmd
        .spawn()
        .expect("promtool must be installed (apt-get install prometheus)");
    if let Some(mut input) = child.stdin.take() {
        let _ = input.write_all(stdin.unwrap_or("").as_bytes());
    }
    let out = child.wait_with_output().expect("promtool");
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

const PROMETHEUS_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/prometheus");

#[test]
fn the_alert_rules_check_and_fire_on_their_unit_tests() {
    let (ok, out) = promtool(PROMETHEUS_DIR, &["check", "rules", "alerts.yml"], None);
    assert!(ok, "{out}");
    let (ok, out) = promtool(PROMETHEUS_DIR, &["test", "rules", "alerts_test.yml"], None);
    assert!(ok, "{out}");
}

#[test]
fn a_live_scrape_passes_promtool_and_has_every_metric_the_dashboard_and_alerts_use() {
    let up = support::rogue::Rogue::start(|_| {
        vec![support::rogue::send(
            "HTTP/1.1 200 OK\r\nContent-Length: 2\r\nETag: \"e\"\r\n\r\nok",
        )]
    });
    // Every tier and feature whose metrics the dashboard shows.
    let body = format!(
        "cache:\n  enabled: true\n  cache_layers: [\"memory\", \"redis\"]\n  redis:\n    redis_url: \"redis://127.0.0.1:{}\"\nbuckets:\n  - name: \"b\"\n    path_prefix: \"/b\"\n    s3:\n      bucket: \"bkt\"\n      endpoint: \"{}\"\n      access_key: \"{AK}\"\n      secret_key: \"{SK}\"\n      health_check:\n        enabled: false\n",
        free_port(),
        up.endpoint()
    );
    let proxy = Proxy::start(&body);
    for _ in 0..3 {
        assert_eq!(proxy.get("/b/k").status, 200);
    }
    let scrape = proxy.metrics();
    let (ok, out) = promtool(PROMETHEUS_DIR, &["check", "metrics"], Some(&scrape));
    assert!(ok, "{out}\n{scrape}");
    let dashboard = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/deploy/grafana/yatagarasu.json"
    ))
    .expect("dashboard");
    let json: serde_json::Value = serde_json::from_str(&dashboard).expect("dashboard is JSON");
    assert!(json["panels"].as_array().is_some_and(|p| p.len() >= 10));
    let alerts = std::fs::read_to_string(format!("{PROMETHEUS_DIR}/alerts.yml")).expect("alerts");
    let mut names: Vec<String> = Vec::new();
    for text in [&dashboard, &alerts] {
        let mut rest = text.as_str();
        while let Some(at) = rest.find("yatagarasu_") {
            let tail = &rest[at..];
            let end = tail
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(tail.len());
            let name = tail[..end].trim_end_matches("_bucket").to_string();
            if !names.contains(&name) {
                names.push(name);
            }
            rest = &tail[end..];
        }
    }
    assert!(names.len() >= 20, "{names:?}");
    // Families with no series yet (no failover, no refusal) are not in a
    // scrape: those must at least be families the renderer defines.
    let renderer = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/src/metrics/render.rs"
    ))
    .expect("renderer");
    let mut scraped = 0;
    for name in &names {
        if scrape.contains(&format!("# TYPE {name} ")) {
            scraped += 1;
            continue;
        }
        assert!(
            renderer.contains(&format!("\"{name}\"")),
            "{name} is used by the dashboard or alerts but never exported"
        );
    }
    assert!(scraped * 2 >= names.len(), "{scraped} of {names:?} scraped");
}

/// The configs the Kubernetes manifests ship (the base's ConfigMap and the
/// Redis overlay's) pass `--check`, with the mounted key files in place.
#[test]
fn the_kubernetes_configs_pass_check() {
    let dir = tempfile::tempdir().expect("temp dir");
    let keys = dir.path().join("s3");
    std::fs::create_dir_all(&keys).expect("mkdir");
    std::fs::write(keys.join("access_key"), "AKIAEXAMPLEEXAMPLE").expect("key");
    std::fs::write(keys.join("secret_key"), "secret-example-0123456789").expect("key");
    for manifest in [
        "deploy/k8s/base/configmap.yaml",
        "deploy/k8s/overlays/redis/config-redis.yaml",
    ] {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(manifest);
        let doc: serde_yaml::Value =
            serde_yaml::from_str(&std::fs::read_to_string(&path).expect("read")).expect("YAML");
        let config = doc["data"]["config.yaml"]
            .as_str()
            .expect("data.config.yaml");
        let config = config.replace("/var/run/secrets/s3", &keys.display().to_string());
        let file = dir.path().join("config.yaml");
        std::fs::write(&file, config).expect("write");
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_yatagarasu"))
            .arg("--check")
            .arg("--config")
            .arg(&file)
            .output()
            .expect("run --check");
        assert!(
            out.status.success(),
            "{manifest}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
