//! Replays the committed fuzz corpus (`fuzz/corpus/<target>/*`, grown by
//! cargo-afl runs, see docs/security.md, "Fuzzing") through the same target bodies the
//! fuzzers run: every input must pass its target's invariants, no panic.

#[allow(dead_code)]
#[path = "../fuzz/src/targets.rs"]
mod targets;

use std::path::Path;

fn replay(target: &str, run: fn(&[u8])) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target);
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.expect("corpus entry").path();
        if path.is_file() {
            let data = std::fs::read(&path).expect("read corpus file");
            let result = std::panic::catch_unwind(|| run(&data));
            assert!(result.is_ok(), "{target}: {} fails", path.display());
            n += 1;
        }
    }
    assert!(n > 0, "{target}: empty corpus");
}

#[test]
fn request_head_corpus() {
    replay("request_head", targets::request_head);
}

#[test]
fn response_head_corpus() {
    replay("response_head", targets::response_head);
}

#[test]
fn chunked_corpus() {
    replay("chunked", targets::chunked);
}

#[test]
fn route_corpus() {
    replay("route", targets::route);
}

#[test]
fn expand_corpus() {
    replay("expand", targets::expand);
}

#[test]
fn tls_server_corpus() {
    replay("tls_server", targets::tls_server);
}

#[test]
fn tls_record_corpus() {
    replay("tls_record", targets::tls_record);
}
