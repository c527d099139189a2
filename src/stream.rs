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
