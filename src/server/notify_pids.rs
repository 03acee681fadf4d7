//! The backend stream of a fleet session, with its own notifications'
//! sender rewritten to the process id the client holds
//! ([`crate::protocol::notify_pid`]).
//!
//! Outside a fleet there is nothing to rewrite and reads go straight to
//! the stream. Up to three bytes (the start of a sender pid split between
//! two reads) are held back until the read that completes them.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::protocol::notify_pid::NotifyPidRewriter;

pub struct NotifyPids<S> {
    inner: S,
    rewriter: Option<NotifyPidRewriter>,
    held: [u8; 4],
    held_len: usize,
}

impl<S> NotifyPids<S> {
    /// Wraps `inner`. With `swap` = (backend pid, client pid), rewrites
    /// from here on, starting with `read_ahead`, the backend bytes already
    /// read during authentication (whose unfinished pid moves here).
    pub fn new(inner: S, swap: Option<(u32, u32)>, read_ahead: &mut BytesMut) -> Self {
        let mut wrapped = Self {
            inner,
            rewriter: swap.map(|(from, to)| NotifyPidRewriter::new(from, to)),
            held: [0; 4],
            held_len: 0,
        };
        if let Some(rewriter) = &mut wrapped.rewriter {
            let done = rewriter.rewrite(read_ahead);
            let rest = &read_ahead[done..];
            wrapped.held[..rest.len()].copy_from_slice(rest);
            wrapped.held_len = rest.len();
            read_ahead.truncate(done);
        }
        wrapped
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for NotifyPids<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let Some(rewriter) = &mut this.rewriter else {
            return Pin::new(&mut this.inner).poll_read(cx, buf);
        };
        let start = buf.filled().len();
        loop {
            let held = this.held_len;
            if buf.remaining() <= held {
                // The relay reads 16 KiB at a time and a BytesMut offers
                // at least 64 bytes: a buffer that cannot take a held pid
                // and one more byte is a caller's bug, not the server's.
                return Poll::Ready(Err(io::Error::other(
                    "read buffer too small to complete a notification's sender",
                )));
            }
            buf.put_slice(&this.held[..held]);
            match Pin::new(&mut this.inner).poll_read(cx, buf) {
                Poll::Ready(Ok(())) => {}
                other => {
                    buf.set_filled(start);
                    return other;
                }
            }
            let end = buf.filled().len();
            if end == start + held {
                // The server closed: what was held goes out as it is.
                this.held_len = 0;
                return Poll::Ready(Ok(()));
            }
            let done = rewriter.rewrite(&mut buf.filled_mut()[start..end]);
            let rest = start + done..end;
            this.held[..rest.len()].copy_from_slice(&buf.filled()[rest.clone()]);
            this.held_len = rest.len();
            buf.set_filled(start + done);
            if done > 0 {
                return Poll::Ready(Ok(()));
            }
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for NotifyPids<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, data)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use crate::protocol::message::encode as msg;

    #[tokio::test]
    async fn a_pid_split_between_writes_is_rewritten() {
        let (mut server, backend) = tokio::io::duplex(64);
        let mut body = 7u32.to_be_bytes().to_vec();
        body.extend_from_slice(b"ch\0\0");
        let notification = msg(b'A', &body);
        let mut read_ahead = BytesMut::from(&notification[..7]);
        let mut stream = NotifyPids::new(backend, Some((7, 99)), &mut read_ahead);
        assert_eq!(&read_ahead[..], &notification[..5]);
        server.write_all(&notification[7..]).await.expect("write");
        drop(server);
        let mut rest = Vec::new();
        stream.read_to_end(&mut rest).await.expect("read");
        let got = [read_ahead.to_vec(), rest].concat();
        let mut expected = notification.clone();
        expected[5..9].copy_from_slice(&99u32.to_be_bytes());
        assert_eq!(got, expected);
    }
}
