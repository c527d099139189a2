//! A bare monoio HTTP/1.1 forwarder: the floor the full proxy is measured
//! against. Same runtime setup, listener, head parser and body pump as
//! yatagarasu, but no signing, routing table, breakers, metrics or logs.
//! `/data/<key>` is forwarded to `<origin>/data-bucket/<key>`.
//!
//! usage: bare-forwarder LISTEN_ADDR ORIGIN_ADDR

use monoio::net::{TcpListener, TcpStream};
use std::cell::RefCell;
use std::net::SocketAddr;
use std::rc::Rc;
use std::time::Duration;
use yatagarasu::http::body::{self, Timeouts};
use yatagarasu::http::head::{self, Framing, Request, Response};
use yatagarasu::http::io::{read_more, write_all};
use yatagarasu::server::driver;

const T: Duration = Duration::from_secs(30);

/// Idle upstream connections with their read buffers.
type Pool = Rc<RefCell<Vec<(TcpStream, Vec<u8>)>>>;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (Some(listen), Some(origin)) = (args.get(1), args.get(2)) else {
        eprintln!("usage: bare-forwarder LISTEN_ADDR ORIGIN_ADDR");
        std::process::exit(2);
    };
    let listen: SocketAddr = listen.parse().expect("listen address");
    let origin: SocketAddr = origin.parse().expect("origin address");
    if let Some(core) = core_affinity::get_core_ids().and_then(|c| c.first().copied()) {
        core_affinity::set_for_current(core);
    }
    let result = driver::block_on(driver::choose(), |used| {
        eprintln!("bare-forwarder on {listen} -> {origin} ({used})");
        async move {
            let listener = TcpListener::bind(listen).expect("bind");
            let pool: Pool = Rc::new(RefCell::new(Vec::new()));
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let pool = pool.clone();
                monoio::spawn(async move {
                    let _ = stream.set_nodelay(true);
                    serve(stream, origin, pool).await;
                });
            }
        }
    });
    if let Err(e) = result {
        eprintln!("runtime: {e}");
    }
}

async fn serve(mut client: TcpStream, origin: SocketAddr, pool: Pool) {
    let mut rbuf = Vec::with_capacity(4096);
    let mut wbuf = Vec::with_capacity(1024);
    let mut req = Request::default();
    let mut resp = Response::default();
    loop {
        let n = loop {
            match head::parse_request(&rbuf, &mut req) {
                Ok(n) => break n,
                Err(head::HeadError::Partial) => {}
                Err(_) => return,
            }
            match read_more(&mut client, &mut rbuf, T).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        };
        rbuf.drain(..n);
        let target = String::from_utf8_lossy(&req.target).into_owned();
        let key = target.strip_prefix("/data/").unwrap_or(&target);
        wbuf.clear();
        wbuf.extend_from_slice(
            format!("GET /data-bucket/{key} HTTP/1.1\r\nHost: origin\r\n\r\n").as_bytes(),
        );
        let pooled = pool.borrow_mut().pop();
        let (mut up, mut ubuf) = match pooled {
            Some(c) => c,
            None => match TcpStream::connect_addr(origin).await {
                Ok(s) => {
                    let _ = s.set_nodelay(true);
                    (s, Vec::with_capacity(64 * 1024))
                }
                Err(_) => return,
            },
        };
        if write_all(&mut up, &mut wbuf, T).await.is_err() {
            return;
        }
        ubuf.clear();
        let head_len = loop {
            match read_more(&mut up, &mut ubuf, T).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
            match head::parse_response(&ubuf, false, &mut resp) {
                Ok(Some(n)) => break n,
                Ok(None) => {}
                Err(_) => return,
            }
        };
        let Framing::Length(len) = resp.framing() else {
            return;
        };
        head::status_line(&mut wbuf, resp.status);
        wbuf.extend_from_slice(resp.forward.as_bytes());
        wbuf.extend_from_slice(b"\r\n");
        let avail = (ubuf.len() - head_len).min(len as usize);
        if avail <= 16 * 1024 {
            wbuf.extend_from_slice(&ubuf[head_len..head_len + avail]);
        }
        let start = if avail <= 16 * 1024 {
            head_len + avail
        } else {
            head_len
        };
        let already = if avail <= 16 * 1024 { avail as u64 } else { 0 };
        if write_all(&mut client, &mut wbuf, T).await.is_err() {
            return;
        }
        let t = Timeouts {
            upstream: T,
            client: T,
        };
        match body::length(
            &mut up,
            &mut ubuf,
            start,
            len - already,
            &mut client,
            t,
            None,
        )
        .await
        {
            Ok(p) if p.reusable => pool.borrow_mut().push((up, ubuf)),
            Ok(_) => {}
            Err(_) => return,
        }
        if !req.keep_alive {
            return;
        }
    }
}
