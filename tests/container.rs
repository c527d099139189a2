//! The container image, built without a registry (deploy/docker/rootfs.sh +
//! Dockerfile.scratch) and run by the Docker Engine of the test machine:
//! the HA tutorial under Compose (two s3s-fs replicas from the same image
//! and the proxy), a replica killed and brought back with no failed
//! request; the shipped seccomp profile (io_uring, said in the log) and one
//! that blocks io_uring as Docker 25+'s default does (epoll, said too);
//! a non-root process; a HEALTHCHECK that reports healthy.
//!
//! Without a Docker Engine (`docker info` fails) the test says so and
//! passes: there is nothing to run the image on.

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};
use support::*;

const WAIT: Duration = Duration::from_secs(90);

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Containers, networks and the image this test made, removed when it ends
/// (whatever happened).
struct Cleanup {
    project: String,
    compose_env: Vec<(String, String)>,
    containers: Vec<String>,
    networks: Vec<String>,
    image: String,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let mut down = Command::new("docker-compose");
        down.args(["-p", &self.project, "-f"])
            .arg(repo().join("deploy/docker/compose.ha.yml"))
            .args(["down", "-v", "-t", "1"]);
        for (k, v) in &self.compose_env {
            down.env(k, v);
        }
        let _ = run_command(&mut down);
        for c in &self.containers {
            let _ = run_command(Command::new("docker").args(["rm", "-f", c]));
        }
        for n in &self.networks {
            let _ = run_command(Command::new("docker").args(["network", "rm", n]));
        }
        let _ = run_command(Command::new("docker").args(["rmi", "-f", &self.image]));
    }
}

/// Builds the offline image with the proxy and `tools` (looked up on PATH)
/// in `dir`; its tag.
fn build_image(dir: &Path, tools: &[&str]) -> String {
    let ctx = dir.join("ctx");
    let mut cmd = Command::new("bash");
    cmd.arg(repo().join("deploy/docker/rootfs.sh"))
        .arg(ctx.join("rootfs"))
        .arg(env!("CARGO_BIN_EXE_yatagarasu"));
    for tool in tools {
        let path = Command::new("which")
            .arg(tool)
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap_or_default();
        assert!(!path.is_empty(), "{tool} must be installed");
        cmd.arg(path);
    }
    let (ok, out) = run_command(&mut cmd);
    assert!(ok, "rootfs: {out}");
    let image = format!(
        "yatagarasu-test:{}-{}",
        std::process::id(),
        dir.file_name().map_or("x".into(), |n| n
            .to_string_lossy()
            .to_lowercase()
            .replace('.', ""))
    );
    let (ok, out) = run_command(
        Command::new("docker")
            .args(["build", "-q", "-f"])
            .arg(repo().join("deploy/docker/Dockerfile.scratch"))
            .args(["-t", &image])
            .arg(&ctx),
    );
    assert!(ok, "docker build: {out}");
    image
}

fn get(port: u16) -> Option<(u16, String)> {
    http::try_get(port, "/data/test.txt", &[])
        .ok()
        .map(|r| (r.status, r.text()))
}

fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn inspect(container: &str, format: &str) -> String {
    run_command(Command::new("docker").args(["inspect", "-f", format, container]))
        .1
        .trim()
        .to_string()
}

/// The shipped seccomp profile without the io_uring calls: what Docker
/// 25+'s default profile does to io_uring.
fn profile_without_io_uring(dir: &Path) -> PathBuf {
    let text =
        std::fs::read_to_string(repo().join("deploy/seccomp-io-uring.json")).expect("profile");
    let mut profile: serde_json::Value = serde_json::from_str(&text).expect("JSON profile");
    for rule in profile["syscalls"].as_array_mut().expect("syscalls") {
        if let Some(names) = rule["names"].as_array_mut() {
            names.retain(|n| !n.as_str().unwrap_or("").starts_with("io_uring"));
        }
    }
    let path = dir.join("seccomp-no-io-uring.json");
    std::fs::write(&path, profile.to_string()).expect("write profile");
    path
}

#[test]
fn the_image_runs_the_ha_tutorial_under_compose_and_fails_over_without_a_failed_request() {
    if !run_command(Command::new("docker").arg("info")).0 {
        eprintln!(
            "no Docker Engine here (docker info failed): the container test has nothing to run on"
        );
        return;
    }
    let dir = tempfile::tempdir().expect("temp dir");
    // The image: the proxy and s3s-fs (the tutorial's replicas) from scratch.
    let image = build_image(dir.path(), &["s3s-fs"]);
    let project = format!("yt{}", std::process::id());
    let data = dir.path().join("data");
    let (proxy_port, metrics_port) = (free_port(), free_port());
    let env = vec![
        ("YATAGARASU_IMAGE".to_string(), image.clone()),
        ("DATA_DIR".to_string(), data.display().to_string()),
        (
            "CONFIG".to_string(),
            repo().join("deploy/docker/ha.yaml").display().to_string(),
        ),
        ("PROXY_PORT".to_string(), proxy_port.to_string()),
        ("METRICS_PORT".to_string(), metrics_port.to_string()),
        (
            "SECCOMP".to_string(),
            repo()
                .join("deploy/seccomp-io-uring.json")
                .display()
                .to_string(),
        ),
    ];
    let mut cleanup = Cleanup {
        project: project.clone(),
        compose_env: env.clone(),
        containers: Vec::new(),
        networks: Vec::new(),
        image: image.clone(),
    };
    for (replica, text) in [("primary", "Primary data!\n"), ("backup", "Backup data!\n")] {
        let bucket = data.join(replica).join("data-bucket");
        std::fs::create_dir_all(&bucket).expect("mkdir");
        std::fs::write(bucket.join("test.txt"), text).expect("object");
    }
    let _ = run_command(Command::new("chmod").args(["-R", "a+rwX"]).arg(&data));

    let compose = |args: &[&str]| {
        let mut c = Command::new("docker-compose");
        c.args(["-p", &project, "-f"])
            .arg(repo().join("deploy/docker/compose.ha.yml"))
            .args(args);
        for (k, v) in &env {
            c.env(k, v);
        }
        run_command(&mut c)
    };
    let (ok, out) = compose(&["up", "-d"]);
    assert!(ok, "compose up: {out}");
    let proxy = format!("{project}_yatagarasu_1");
    wait_until("the proxy's HEALTHCHECK to say healthy", || {
        inspect(&proxy, "{{.State.Health.Status}}") == "healthy"
    });
    wait_until("the primary's data", || {
        get(proxy_port).is_some_and(|(s, b)| s == 200 && b == "Primary data!\n")
    });
    // The shipped profile lets io_uring through, and the log says which
    // driver runs; the process is not root.
    let logs = run_command(Command::new("docker").args(["logs", &proxy])).1;
    assert!(logs.contains("driver=io_uring"), "{logs}");
    let pid = inspect(&proxy, "{{.State.Pid}}");
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    assert!(
        status
            .lines()
            .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("10001")),
        "{status}"
    );

    // The primary dies: every request is still answered, by the backup.
    let (ok, out) = compose(&["kill", "primary"]);
    assert!(ok, "kill: {out}");
    for i in 0..30 {
        let got = get(proxy_port);
        assert_eq!(
            got,
            Some((200, "Backup data!\n".to_string())),
            "request {i} after the kill"
        );
    }
    // It comes back: traffic returns to it, and nothing fails meanwhile.
    let (ok, out) = compose(&["start", "primary"]);
    assert!(ok, "start: {out}");
    wait_until("the primary to serve again", || {
        let got = get(proxy_port);
        assert!(
            got.as_ref().is_some_and(|(s, _)| *s == 200),
            "a failed request: {got:?}"
        );
        got.is_some_and(|(_, b)| b == "Primary data!\n")
    });

    // The primary cut off the network (not killed: its packets go
    // nowhere): answered by the backup within the replica timeout, none
    // failing; back on the network, it serves again.
    let network = format!("{project}_default");
    let primary = format!("{project}_primary_1");
    let (ok, out) =
        run_command(Command::new("docker").args(["network", "disconnect", &network, &primary]));
    assert!(ok, "disconnect: {out}");
    for i in 0..20 {
        let got = get(proxy_port);
        assert_eq!(
            got,
            Some((200, "Backup data!\n".to_string())),
            "request {i} after the cut"
        );
    }
    let (ok, out) = run_command(Command::new("docker").args([
        "network", "connect", "--alias", "primary", &network, &primary,
    ]));
    assert!(ok, "connect: {out}");
    wait_until("the primary to serve again after the cut", || {
        let got = get(proxy_port);
        assert!(
            got.as_ref().is_some_and(|(s, _)| *s == 200),
            "a failed request: {got:?}"
        );
        got.is_some_and(|(_, b)| b == "Primary data!\n")
    });

    // A profile that blocks io_uring (Docker 25+'s default): epoll, said in
    // the log, and it serves.
    let blocked = profile_without_io_uring(dir.path());
    let port = free_port();
    let name = format!("{project}-epoll");
    cleanup.containers.push(name.clone());
    let config = dir.path().join("epoll.yaml");
    std::fs::write(
        &config,
        "server:\n  address: \"0.0.0.0:8080\"\nbuckets:\n  - name: \"b\"\n    path_prefix: \"/b\"\n    s3:\n      bucket: \"x\"\n      endpoint: \"http://127.0.0.1:9\"\n      access_key: \"a\"\n      secret_key: \"b\"\n      health_check:\n        enabled: false\n",
    )
    .expect("config");
    let (ok, out) = run_command(
        Command::new("docker")
            .args(["run", "-d", "--name", &name])
            .arg(format!("--security-opt=seccomp={}", blocked.display()))
            .args(["-p", &format!("127.0.0.1:{port}:8080")])
            .arg("-v")
            .arg(format!(
                "{}:/etc/yatagarasu/config.yaml:ro",
                config.display()
            ))
            .arg(&image),
    );
    assert!(ok, "docker run: {out}");
    wait_until("the epoll container to answer /health", || {
        http::try_get(port, "/health", &[]).is_ok_and(|r| r.status == 200)
    });
    let logs = run_command(Command::new("docker").args(["logs", &name])).1;
    assert!(logs.contains("driver=epoll"), "{logs}");
    assert!(!logs.contains("driver=io_uring"), "{logs}");
    drop(cleanup);
}

/// A Redis tier cut off the network (`docker network disconnect`, not
/// killed) under load: the proxy treats the silent peer as a dead one
/// within operation_timeout_ms, no request fails, and once Redis is back on
/// the network the proxy writes to it again.
#[test]
fn redis_cut_off_the_network_mid_load_fails_no_request() {
    if !run_command(Command::new("docker").arg("info")).0 {
        eprintln!(
            "no Docker Engine here (docker info failed): the container test has nothing to run on"
        );
        return;
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let image = build_image(dir.path(), &["s3s-fs", "redis-server"]);
    let tag = format!("ytnet{}", std::process::id());
    let (s3, redis, proxy) = (
        format!("{tag}-s3"),
        format!("{tag}-redis"),
        format!("{tag}-proxy"),
    );
    let cleanup = Cleanup {
        project: format!("{tag}none"),
        compose_env: vec![
            ("DATA_DIR".into(), "/nonexistent".into()),
            ("CONFIG".into(), "/nonexistent".into()),
        ],
        containers: vec![proxy.clone(), redis.clone(), s3.clone()],
        networks: vec![tag.clone()],
        image: image.clone(),
    };
    assert!(run_command(Command::new("docker").args(["network", "create", &tag])).0);
    let data = dir.path().join("data");
    let bucket = data.join("data-bucket");
    std::fs::create_dir_all(&bucket).expect("mkdir");
    for i in 0..200 {
        std::fs::write(bucket.join(format!("k{i}")), format!("object {i}\n")).expect("object");
    }
    let _ = run_command(Command::new("chmod").args(["-R", "a+rwX"]).arg(&data));
    let docker_run = |name: &str, args: &[&str]| {
        let mut c = Command::new("docker");
        c.args(["run", "-d", "--name", name, "--network", &tag]);
        c.args(args);
        let (ok, out) = run_command(&mut c);
        assert!(ok, "docker run {name}: {out}");
    };
    docker_run(
        &s3,
        &[
            "-v",
            &format!("{}:/data", data.display()),
            "--entrypoint",
            "/usr/local/bin/s3s-fs",
            &image,
            "--host",
            "0.0.0.0",
            "--port",
            "9000",
            "--access-key",
            "minioadmin",
            "--secret-key",
            "minioadmin",
            "/data",
        ],
    );
    docker_run(
        &redis,
        &[
            "--entrypoint",
            "/usr/local/bin/redis-server",
            &image,
            "--port",
            "6379",
            "--bind",
            "0.0.0.0",
            "--protected-mode",
            "no",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            "/tmp",
        ],
    );
    let config = dir.path().join("proxy.yaml");
    std::fs::write(
        &config,
        format!(
            "server:\n  address: \"0.0.0.0:8080\"\nmetrics:\n  port: 9090\ncache:\n  enabled: true\n  cache_layers: [\"memory\", \"redis\"]\n  redis:\n    enabled: true\n    redis_url: \"redis://{redis}:6379\"\n    connection_timeout_ms: 500\n    operation_timeout_ms: 300\nbuckets:\n  - name: \"ha-data\"\n    path_prefix: \"/data\"\n    s3:\n      bucket: \"data-bucket\"\n      endpoint: \"http://{s3}:9000\"\n      access_key: \"minioadmin\"\n      secret_key: \"minioadmin\"\n      health_check:\n        enabled: false\n"
        ),
    )
    .expect("config");
    let (port, metrics) = (free_port(), free_port());
    docker_run(
        &proxy,
        &[
            "-p",
            &format!("127.0.0.1:{port}:8080"),
            "-p",
            &format!("127.0.0.1:{metrics}:9090"),
            "-v",
            &format!("{}:/etc/yatagarasu/config.yaml:ro", config.display()),
            &format!(
                "--security-opt=seccomp={}",
                repo().join("deploy/seccomp-io-uring.json").display()
            ),
            &image,
        ],
    );
    let metric = |name: &str| -> f64 {
        http::try_get(metrics, "/metrics", &[])
            .ok()
            .and_then(|r| {
                r.text()
                    .lines()
                    .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
            })
            .unwrap_or(-1.0)
    };
    let fetch = |i: usize| {
        let r = http::try_get(port, &format!("/data/k{i}"), &[]);
        let r = r.unwrap_or_else(|e| panic!("k{i}: {e}"));
        assert_eq!((r.status, r.text()), (200, format!("object {i}\n")), "k{i}");
    };
    wait_until("the proxy to answer", || {
        http::try_get(port, "/health", &[]).is_ok_and(|r| r.status == 200)
    });
    const WRITES: &str = "yatagarasu_cache_redis_writes_total";
    for i in 0..20 {
        fetch(i);
    }
    wait_until("writes to Redis", || metric(WRITES) >= 20.0);
    // Cut Redis off: its packets go nowhere (no reset, no refusal).
    assert!(run_command(Command::new("docker").args(["network", "disconnect", &tag, &redis])).0);
    let errors_before = metric("yatagarasu_cache_redis_errors_total");
    for i in 20..120 {
        fetch(i);
    }
    assert!(metric("yatagarasu_cache_redis_errors_total") > errors_before);
    // Back on the network: new fills are written to it again.
    assert!(run_command(Command::new("docker").args(["network", "connect", &tag, &redis])).0);
    let written = metric(WRITES);
    let mut i = 120;
    wait_until("writes to resume", || {
        if i < 200 {
            fetch(i);
            i += 1;
        }
        metric(WRITES) > written
    });
    drop(cleanup);
}
