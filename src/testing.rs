//! Shared by unit tests that need the runtime: a one-thread monoio runtime
//! (epoll, with timers) and a connected loopback TCP pair.

use monoio::net::{TcpListener, TcpStream};

/// Runs `f` to completion on a fresh runtime.
pub fn run<F: std::future::Future>(f: F) -> F::Output {
    monoio::RuntimeBuilder::<monoio::LegacyDriver>::new()
        .enable_timer()
        .build()
        .expect("test runtime")
        .block_on(f)
}

/// A connected loopback pair: (the connecting end, the accepted end).
pub async fn loopback_pair() -> (TcpStream, TcpStream) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    let ours = TcpStream::connect(addr).await.expect("connect");
    let (theirs, _) = listener.accept().await.expect("accept");
    (ours, theirs)
}

/// A deterministic xorshift generator, for tests that fuzz a little with a
/// fixed seed (the same bytes every run).
pub fn xorshift(mut state: u64) -> impl FnMut() -> u64 {
    move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    }
}
