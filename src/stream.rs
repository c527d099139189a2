//! A connection that is plain TCP or TLS, read and written through one type:
//! plain TCP keeps what only a raw socket offers (splice, readiness waits).

use monoio::io::{AsyncReadRent, AsyncWriteRent};
use monoio::net::TcpStream;
use monoio::BufResult;

/// A connection that is plain TCP (splice-capable, pollable) or TLS.
pub enum MaybeTls<T> {
    /// Plain TCP (splice-capable, pollable).
    Plain(TcpStream),
    /// TLS over TCP.
    Tls(Box<T>),
}

impl<S: crate::tls::stream::Side> MaybeTls<crate::tls::stream::TlsStream<S>> {
    /// The TCP stream underneath (for readiness waits and the descriptor).
    pub fn tcp(&self) -> &TcpStream {
        match self {
            MaybeTls::Plain(tcp) => tcp,
            MaybeTls::Tls(tls) => tls.tcp(),
        }
    }
}

/// An upstream connection.
pub type UpStream = MaybeTls<crate::tls::ClientTls>;
/// A client connection.
pub type ClientStream = MaybeTls<crate::tls::ServerTls>;

// Both arms' futures are inline, so a TLS operation costs no allocation;
// our TLS stream's futures are about 530 bytes (the test below), a plain
// read's 120: every request's (boxed, once) state grows by that, no more.
impl<T: AsyncReadRent> AsyncReadRent for MaybeTls<T> {
    async fn read<B: monoio::buf::IoBufMut>(&mut self, buf: B) -> BufResult<usize, B> {
        match self {
            MaybeTls::Plain(s) => s.read(buf).await,
            MaybeTls::Tls(s) => s.read(buf).await,
        }
    }

    async fn readv<B: monoio::buf::IoVecBufMut>(&mut self, buf: B) -> BufResult<usize, B> {
        match self {
            MaybeTls::Plain(s) => s.readv(buf).await,
            MaybeTls::Tls(s) => s.readv(buf).await,
        }
    }
}

impl<T: AsyncWriteRent> AsyncWriteRent for MaybeTls<T> {
    async fn write<B: monoio::buf::IoBuf>(&mut self, buf: B) -> BufResult<usize, B> {
        match self {
            MaybeTls::Plain(s) => s.write(buf).await,
            MaybeTls::Tls(s) => s.write(buf).await,
        }
    }

    async fn writev<B: monoio::buf::IoVecBuf>(&mut self, buf: B) -> BufResult<usize, B> {
        match self {
            MaybeTls::Plain(s) => s.writev(buf).await,
            MaybeTls::Tls(s) => s.writev(buf).await,
        }
    }

    async fn flush(&mut self) -> std::io::Result<()> {
        match self {
            MaybeTls::Plain(s) => s.flush().await,
            MaybeTls::Tls(s) => s.flush().await,
        }
    }

    async fn shutdown(&mut self) -> std::io::Result<()> {
        match self {
            MaybeTls::Plain(s) => s.shutdown().await,
            MaybeTls::Tls(s) => s.shutdown().await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn size_of_io_futures(client: &mut ClientStream) -> (usize, usize) {
        let read = client.read(Vec::<u8>::new());
        let r = std::mem::size_of_val(&read);
        drop(read);
        let write = client.write(Vec::<u8>::new());
        let w = std::mem::size_of_val(&write);
        (r, w)
    }

    #[test]
    fn io_futures_stay_small_with_tls_inline() {
        crate::testing::run(async {
            let (plain, _peer) = crate::testing::loopback_pair().await;
            let mut client: ClientStream = MaybeTls::Plain(plain);
            // Every request's state holds a few of these: monoio-rustls's
            // (712 bytes per read, more with the plain arm) were boxed, an
            // allocation per TLS operation; ours (528 and 552 bytes) are
            // inline, and must stay about that size.
            let (r, w) = size_of_io_futures(&mut client);
            assert!(r <= 640, "read future: {r} bytes");
            assert!(w <= 640, "write future: {w} bytes");
        });
    }
}
