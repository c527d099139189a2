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

/// An upstream connection.
pub type UpStream = MaybeTls<monoio_rustls::ClientTlsStream<TcpStream>>;
/// A client connection.
pub type ClientStream = MaybeTls<monoio_rustls::ServerTlsStream<TcpStream>>;

// The TLS arms' futures are boxed: inline, every read or write future of a
// connection (and every state machine holding one) would be as large as
// TLS's (712 against 120 bytes per read), plain TCP included; a TLS
// operation's allocation is small next to its cryptography.
impl<T: AsyncReadRent> AsyncReadRent for MaybeTls<T> {
    async fn read<B: monoio::buf::IoBufMut>(&mut self, buf: B) -> BufResult<usize, B> {
        match self {
            MaybeTls::Plain(s) => s.read(buf).await,
            MaybeTls::Tls(s) => Box::pin(s.read(buf)).await,
        }
    }

    async fn readv<B: monoio::buf::IoVecBufMut>(&mut self, buf: B) -> BufResult<usize, B> {
        match self {
            MaybeTls::Plain(s) => s.readv(buf).await,
            MaybeTls::Tls(s) => Box::pin(s.readv(buf)).await,
        }
    }
}

impl<T: AsyncWriteRent> AsyncWriteRent for MaybeTls<T> {
    async fn write<B: monoio::buf::IoBuf>(&mut self, buf: B) -> BufResult<usize, B> {
        match self {
            MaybeTls::Plain(s) => s.write(buf).await,
            MaybeTls::Tls(s) => Box::pin(s.write(buf)).await,
        }
    }

    async fn writev<B: monoio::buf::IoVecBuf>(&mut self, buf: B) -> BufResult<usize, B> {
        match self {
            MaybeTls::Plain(s) => s.writev(buf).await,
            MaybeTls::Tls(s) => Box::pin(s.writev(buf)).await,
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

    #[test]
    fn a_plain_connection_s_io_futures_are_not_as_large_as_tls_ones() {
        crate::testing::run(async {
            let (plain, _peer) = crate::testing::loopback_pair().await;
            let mut client: ClientStream = MaybeTls::Plain(plain);
            // Every request's state holds a few of these: a TLS future
            // inline (712 bytes per read) made each of them that large.
            let read = client.read(Vec::<u8>::new());
            assert!(
                std::mem::size_of_val(&read) <= 256,
                "read future: {} bytes",
                std::mem::size_of_val(&read)
            );
            drop(read);
            let write = client.write(Vec::<u8>::new());
            assert!(
                std::mem::size_of_val(&write) <= 256,
                "write future: {} bytes",
                std::mem::size_of_val(&write)
            );
        });
    }
}
