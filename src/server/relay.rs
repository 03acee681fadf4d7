//! The byte pump between an authenticated client and its backend.
//!
//! Both directions are driven from one task by polling both sockets, so a
//! side that stops reading never blocks the other direction and no lock or
//! channel sits between them. Reads go into a stack buffer and are written
//! straight on; only bytes a slow peer did not accept are copied to a heap
//! buffer, which is released once drained. An idle session therefore holds
//! no relay buffer at all.
//!
//! Bodies are never decoded. The server→client direction feeds the bytes
//! actually delivered to a [`FrameTracker`], so that when a session must be
//! ended (demotion, shutdown, a dead backend) rolegate can finish the
//! message in flight and append its own FATAL ErrorResponse at a clean
//! boundary. The client→server direction is framed too, only to know
//! whether the last message the server got was the client's Terminate: a
//! server that closes after it has done what it was asked, and the client,
//! which said goodbye, must not be told it lost its server (node-postgres
//! sends Terminate and closes a moment later, and raises an error event
//! for anything it receives in between). The relay state lives outside the polling future, so the
//! caller may stop polling at any point (a `select!` on an end signal)
//! without losing bytes or the framing position.

use std::future::poll_fn;
use std::io;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};

use crate::metrics::RelayedBytes;
use crate::protocol::frame::FrameTracker;
use crate::protocol::message::tag;

/// Size of one read. Matches PostgreSQL's own send buffer (8 KiB) twice
/// over, so one read usually carries a whole batch of rows.
const READ_CHUNK: usize = 16 * 1024;
/// Reads per direction before yielding to the scheduler, so one busy
/// session cannot starve others or its own end signal.
const READS_PER_POLL: usize = 32;
/// How long rolegate waits for the backend to finish the message in
/// flight before ending a session with its own error.
const FINISH_MESSAGE_TIMEOUT: Duration = Duration::from_secs(2);

/// Which side ended the relay, and how.
#[derive(Debug)]
pub enum RelayEnd {
    ClientClosed,
    BackendClosed,
    ClientError(io::Error),
    BackendError(io::Error),
}

/// One direction's bytes that were read but not yet written.
#[derive(Default)]
struct Backlog {
    bytes: BytesMut,
    needs_flush: bool,
    closed: bool,
}

/// The state of a relay between two streams.
pub struct Relay {
    to_backend: Backlog,
    to_client: Backlog,
    tracker: FrameTracker,
    /// The client→server stream, as delivered to the server.
    from_client: FrameTracker,
    pub bytes_to_backend: u64,
    pub bytes_to_client: u64,
    counters: RelayedBytes,
    /// Bytes already added to `counters`.
    counted: (u64, u64),
}

impl Relay {
    /// Starts a relay. `to_backend`/`to_client` hold bytes already read
    /// during the handshake that belong to the relayed streams.
    pub fn new(to_backend: BytesMut, to_client: BytesMut, counters: RelayedBytes) -> Self {
        Self {
            to_backend: Backlog {
                bytes: to_backend,
                ..Backlog::default()
            },
            to_client: Backlog {
                bytes: to_client,
                ..Backlog::default()
            },
            tracker: FrameTracker::new(),
            from_client: FrameTracker::new(),
            bytes_to_backend: 0,
            bytes_to_client: 0,
            counters,
            counted: (0, 0),
        }
    }

    /// Adds the bytes moved since the last call to the exported counters:
    /// once per poll, not per read.
    fn count(&mut self) {
        let (up, down) = self.counted;
        if self.bytes_to_backend != up {
            self.counters
                .client_to_server
                .increment(self.bytes_to_backend - up);
        }
        if self.bytes_to_client != down {
            self.counters
                .server_to_client
                .increment(self.bytes_to_client - down);
        }
        self.counted = (self.bytes_to_backend, self.bytes_to_client);
    }

    /// Relays until either side closes or fails. Cancel-safe.
    pub async fn run<C, B>(&mut self, client: &mut C, backend: &mut B) -> RelayEnd
    where
        C: AsyncRead + AsyncWrite + Unpin,
        B: AsyncRead + AsyncWrite + Unpin,
    {
        poll_fn(|cx| {
            let polled = self.poll_relay(cx, client, backend);
            self.count();
            polled
        })
        .await
    }

    fn poll_relay<C, B>(
        &mut self,
        cx: &mut Context<'_>,
        client: &mut C,
        backend: &mut B,
    ) -> Poll<RelayEnd>
    where
        C: AsyncRead + AsyncWrite + Unpin,
        B: AsyncRead + AsyncWrite + Unpin,
    {
        let tracker = &mut self.tracker;
        let from_client = &mut self.from_client;
        let up = pump(
            cx,
            &mut self.to_backend,
            &mut *client,
            &mut *backend,
            &mut self.bytes_to_backend,
            |written| from_client.advance(written),
        );
        match up {
            Poll::Ready(Err(PumpError::Read(e))) => return Poll::Ready(RelayEnd::ClientError(e)),
            Poll::Ready(Err(PumpError::Write(e))) => return Poll::Ready(RelayEnd::BackendError(e)),
            Poll::Ready(Ok(())) => return Poll::Ready(RelayEnd::ClientClosed),
            Poll::Pending => {}
        }
        let down = pump(
            cx,
            &mut self.to_client,
            &mut *backend,
            &mut *client,
            &mut self.bytes_to_client,
            |written| tracker.advance(written),
        );
        match down {
            Poll::Ready(Err(PumpError::Read(e))) => Poll::Ready(RelayEnd::BackendError(e)),
            Poll::Ready(Err(PumpError::Write(e))) => Poll::Ready(RelayEnd::ClientError(e)),
            Poll::Ready(Ok(())) => Poll::Ready(RelayEnd::BackendClosed),
            Poll::Pending => Poll::Pending,
        }
    }

    /// True when the client has received whole messages only, and the last
    /// one was an ErrorResponse: the backend has already told the client
    /// why the session ends.
    pub fn backend_sent_error_last(&self) -> bool {
        self.tracker.at_boundary() && self.tracker.last_tag() == tag::ERROR_RESPONSE
    }

    /// True when the last whole message delivered to the server was the
    /// client's Terminate: the server closing then is the session's normal
    /// end.
    pub fn client_said_goodbye(&self) -> bool {
        self.from_client.at_boundary() && self.from_client.last_tag() == tag::TERMINATE
    }

    /// Ends the client side with `fatal`, an ErrorResponse, placed at a
    /// message boundary: the message in flight from the backend is finished
    /// first (reading more of it if needed, for a bounded time). Returns
    /// false when no clean boundary could be reached; the caller then just
    /// closes the connection.
    pub async fn finish_with<C, B>(
        &mut self,
        client: &mut C,
        backend: &mut B,
        fatal: &Bytes,
    ) -> bool
    where
        C: AsyncWrite + Unpin,
        B: AsyncRead + Unpin,
    {
        let finish = async {
            while !self.tracker.at_boundary() {
                // With only part of a header delivered, go one byte at a
                // time until the header, and so the length, is known.
                let needed = self.tracker.bytes_to_boundary().unwrap_or(1);
                if self.to_client.bytes.is_empty() {
                    if self.to_client.closed
                        || backend.read_buf(&mut self.to_client.bytes).await? == 0
                    {
                        return Ok(false);
                    }
                    continue;
                }
                let chunk = self
                    .to_client
                    .bytes
                    .split_to(needed.min(self.to_client.bytes.len()));
                client.write_all(&chunk).await?;
                self.tracker.advance(&chunk);
                self.bytes_to_client += chunk.len() as u64;
            }
            client.write_all(fatal).await?;
            client.flush().await?;
            Ok::<bool, io::Error>(true)
        };
        let finished = matches!(
            tokio::time::timeout(FINISH_MESSAGE_TIMEOUT, finish).await,
            Ok(Ok(true))
        );
        self.count();
        finished
    }
}

enum PumpError {
    Read(io::Error),
    Write(io::Error),
}

/// Moves bytes from `reader` to `writer` until the reader would block
/// (`Pending`), the reader ends (`Ready(Ok)`), or either side fails.
fn pump<R, W>(
    cx: &mut Context<'_>,
    backlog: &mut Backlog,
    reader: &mut R,
    writer: &mut W,
    counter: &mut u64,
    mut on_written: impl FnMut(&[u8]),
) -> Poll<Result<(), PumpError>>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    for _ in 0..READS_PER_POLL {
        // First deliver what an earlier poll could not.
        while !backlog.bytes.is_empty() {
            match Pin::new(&mut *writer).poll_write(cx, &backlog.bytes) {
                Poll::Ready(Ok(0)) => {
                    return Poll::Ready(Err(PumpError::Write(io::ErrorKind::WriteZero.into())))
                }
                Poll::Ready(Ok(n)) => {
                    on_written(&backlog.bytes[..n]);
                    *counter += n as u64;
                    backlog.bytes.advance(n);
                    backlog.needs_flush = true;
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(PumpError::Write(e))),
                Poll::Pending => return Poll::Pending,
            }
        }
        if backlog.bytes.capacity() > 0 {
            // Drained: give the memory back while the session idles.
            backlog.bytes = BytesMut::new();
        }
        if backlog.closed {
            return Poll::Ready(Ok(()));
        }

        let mut storage = [MaybeUninit::<u8>::uninit(); READ_CHUNK];
        let mut read = ReadBuf::uninit(&mut storage);
        match Pin::new(&mut *reader).poll_read(cx, &mut read) {
            Poll::Ready(Ok(())) => {}
            Poll::Ready(Err(e)) => return Poll::Ready(Err(PumpError::Read(e))),
            Poll::Pending => {
                if backlog.needs_flush {
                    match Pin::new(&mut *writer).poll_flush(cx) {
                        Poll::Ready(Ok(())) => backlog.needs_flush = false,
                        Poll::Ready(Err(e)) => return Poll::Ready(Err(PumpError::Write(e))),
                        Poll::Pending => {}
                    }
                }
                return Poll::Pending;
            }
        }
        let data = read.filled();
        if data.is_empty() {
            backlog.closed = true;
            return Poll::Ready(Ok(()));
        }
        let mut offset = 0;
        while offset < data.len() {
            match Pin::new(&mut *writer).poll_write(cx, &data[offset..]) {
                Poll::Ready(Ok(0)) => {
                    return Poll::Ready(Err(PumpError::Write(io::ErrorKind::WriteZero.into())))
                }
                Poll::Ready(Ok(n)) => {
                    on_written(&data[offset..offset + n]);
                    *counter += n as u64;
                    offset += n;
                    backlog.needs_flush = true;
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(PumpError::Write(e))),
                Poll::Pending => {
                    backlog.bytes.extend_from_slice(&data[offset..]);
                    return Poll::Pending;
                }
            }
        }
    }
    // Budget used up: let other tasks run, then continue.
    cx.waker().wake_by_ref();
    Poll::Pending
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::duplex;

    use crate::protocol::message::encode as msg;

    #[tokio::test]
    async fn copies_both_ways_until_client_closes() {
        let (mut client_app, mut client_side) = duplex(1024);
        let (mut backend_side, mut backend_app) = duplex(1024);
        let mut relay = Relay::new(BytesMut::new(), BytesMut::new(), RelayedBytes::new());
        let relay_task = tokio::spawn(async move {
            let end = relay.run(&mut client_side, &mut backend_side).await;
            (end, relay.bytes_to_backend, relay.bytes_to_client)
        });
        let big = vec![42u8; 200_000];
        let expected = big.clone();
        let writer = tokio::spawn(async move {
            client_app.write_all(&big).await.expect("client write");
            let mut back = vec![0u8; 5];
            client_app.read_exact(&mut back).await.expect("client read");
            assert_eq!(&back, b"hello");
        });
        let mut got = vec![0u8; expected.len()];
        backend_app
            .read_exact(&mut got)
            .await
            .expect("backend read");
        assert_eq!(got, expected);
        backend_app
            .write_all(b"hello")
            .await
            .expect("backend write");
        writer.await.expect("writer");
        let (end, up, down) = relay_task.await.expect("relay");
        assert!(matches!(end, RelayEnd::ClientClosed), "{end:?}");
        assert_eq!(up, 200_000);
        assert_eq!(down, 5);
    }

    #[tokio::test]
    async fn a_terminate_delivered_last_is_known() {
        let (mut client_app, mut client_side) = duplex(1024);
        let (mut backend_side, mut backend_app) = duplex(1024);
        let mut relay = Relay::new(BytesMut::new(), BytesMut::new(), RelayedBytes::new());
        let query = msg(b'Q', b"select 1\0");
        let terminate = msg(tag::TERMINATE, b"");
        // A query whose text holds an X, then the Terminate, split mid-way.
        let both = [msg(b'Q', b"X\0"), query.clone(), terminate].concat();
        let (first, second) = both.split_at(both.len() - 2);
        client_app.write_all(first).await.expect("write");
        let mut got = vec![0; first.len()];
        let _ = tokio::time::timeout(
            Duration::from_millis(50),
            relay.run(&mut client_side, &mut backend_side),
        )
        .await;
        backend_app.read_exact(&mut got).await.expect("read");
        assert!(!relay.client_said_goodbye(), "half a Terminate");
        client_app.write_all(second).await.expect("write");
        let _ = tokio::time::timeout(
            Duration::from_millis(50),
            relay.run(&mut client_side, &mut backend_side),
        )
        .await;
        assert!(relay.client_said_goodbye());
        // More after it (a pipelining client) is not a goodbye.
        client_app.write_all(&query).await.expect("write");
        let _ = tokio::time::timeout(
            Duration::from_millis(50),
            relay.run(&mut client_side, &mut backend_side),
        )
        .await;
        assert!(!relay.client_said_goodbye());
    }

    #[tokio::test]
    async fn finish_completes_the_message_in_flight() {
        let (mut client_app, mut client_side) = duplex(1 << 16);
        let (mut backend_side, mut backend_app) = duplex(1 << 16);
        let row = msg(b'D', &[1u8; 100]);
        // The backend has sent half a row; the relay delivers it.
        backend_app.write_all(&row[..50]).await.expect("write");
        let mut relay = Relay::new(BytesMut::new(), BytesMut::new(), RelayedBytes::new());
        let _ = tokio::time::timeout(
            Duration::from_millis(50),
            relay.run(&mut client_side, &mut backend_side),
        )
        .await;
        backend_app.write_all(&row[50..]).await.expect("write");
        let fatal = Bytes::from(msg(b'E', b"SFATAL\0\0"));
        assert!(
            relay
                .finish_with(&mut client_side, &mut backend_side, &fatal)
                .await
        );
        drop(client_side);
        let mut got = Vec::new();
        client_app.read_to_end(&mut got).await.expect("read");
        assert_eq!(got, [row, fatal.to_vec()].concat());
    }

    #[tokio::test]
    async fn finish_gives_up_when_the_backend_is_gone() {
        let (_client_app, mut client_side) = duplex(1 << 16);
        let (mut backend_side, mut backend_app) = duplex(1 << 16);
        backend_app
            .write_all(&msg(b'D', &[1u8; 100])[..20])
            .await
            .expect("write");
        drop(backend_app);
        let mut relay = Relay::new(BytesMut::new(), BytesMut::new(), RelayedBytes::new());
        let end = relay.run(&mut client_side, &mut backend_side).await;
        assert!(matches!(end, RelayEnd::BackendClosed));
        let fatal = Bytes::from(msg(b'E', b"SFATAL\0\0"));
        assert!(
            !relay
                .finish_with(&mut client_side, &mut backend_side, &fatal)
                .await
        );
    }
}
