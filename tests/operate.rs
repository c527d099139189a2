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
