//! Connections that may or may not be encrypted.
//!
//! A client connection starts in plaintext and may become TLS (after an
//! SSLRequest, or at once for direct TLS); a backend connection likewise,
//! depending on `backend_tls`. [`MaybeTls`] lets the session and the relay
//! handle both without caring which. [`Prefixed`] replays bytes already
//! read before a TLS handshake: a direct-TLS ClientHello is detected by its
//! first byte, after which the bytes already buffered belong to rustls.

use std::borrow::Borrow;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// A plaintext or TLS connection.
pub enum MaybeTls<P, T> {
    Plain(P),
    Tls(Box<T>),
}

impl<P, T> MaybeTls<P, T> {
    pub fn is_tls(&self) -> bool {
        matches!(self, Self::Tls(_))
    }
}

/// A client connection as accepted by a listener.
pub type ClientStream<P = TcpStream> = MaybeTls<P, tokio_rustls::server::TlsStream<Prefixed<P>>>;
/// A connection to a member.
pub type BackendStream = MaybeTls<TcpStream, tokio_rustls::client::TlsStream<TcpStream>>;

impl<P, T> AsyncRead for MaybeTls<P, T>
where
    P: AsyncRead + Unpin,
    T: AsyncRead + Unpin,
{
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl<P, T> AsyncWrite for MaybeTls<P, T>
where
    P: AsyncWrite + Unpin,
    T: AsyncWrite + Unpin,
{
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_flush(cx),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// A stream that first yields `prefix`, then reads from `inner`.
pub struct Prefixed<P> {
    prefix: BytesMut,
    inner: P,
}

impl<P> Prefixed<P> {
    pub fn new(prefix: BytesMut, inner: P) -> Self {
        Self { prefix, inner }
    }
}

impl<P: Borrow<TcpStream>> ClientStream<P> {
    /// Resolves once the client has closed its connection (a FIN or a
    /// reset), without reading anything it sent; see [`super::hangup`].
    pub async fn closed(&self) {
        let tcp: &TcpStream = match self {
            Self::Plain(tcp) => tcp.borrow(),
            Self::Tls(tls) => tls.get_ref().0.inner.borrow(),
        };
        super::hangup::closed(tcp).await
    }
}

impl<P: AsyncRead + Unpin> AsyncRead for Prefixed<P> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.prefix.is_empty() {
            let n = this.prefix.len().min(buf.remaining());
            buf.put_slice(&this.prefix[..n]);
            this.prefix.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl<P: AsyncWrite + Unpin> AsyncWrite for Prefixed<P> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{duplex, AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn prefixed_replays_then_reads_on() {
        let (mut far, near) = duplex(64);
        far.write_all(b" world").await.expect("write");
        drop(far);
        let mut stream = Prefixed::new(BytesMut::from(&b"hello"[..]), near);
        let mut out = String::new();
        stream.read_to_string(&mut out).await.expect("read");
        assert_eq!(out, "hello world");
    }
}
