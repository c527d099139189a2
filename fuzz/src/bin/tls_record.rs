//! cargo-afl target: see `src/targets.rs`.
#[allow(dead_code)]
#[path = "../targets.rs"]
mod targets;

fn main() {
    afl::fuzz!(|data: &[u8]| targets::tls_record(data));
}
