//! Noticing that a client has gone while its session waits for a backend.
//!
//! A session held for a target (no leader yet, a switchover under way)
//! reads nothing from its client, yet must notice a client that gives up,
//! as libpq does at its `connect_timeout`: otherwise every retry of a
//! reconnect storm leaves a held session behind, and each one opens a
//! backend connection for nobody once the hold ends.
//!
//! The client's FIN or reset is what tells, and epoll reports it
//! (`EPOLLRDHUP`, tokio's `Ready::is_read_closed`) whether or not bytes
//! wait unread before it. That matters: a TLS client sends a close_notify
//! alert before it closes, and bytes a client sent while held belong to
//! whoever reads the client next, so the watch must not consume them. It
//! never reads: it waits for readiness, tells a leftover readiness from
//! waiting bytes with a one-byte peek, and while bytes wait without a FIN
//! it watches a second registration of the same socket (a duplicated
//! descriptor), whose readiness it can clear at each event without hiding
//! those bytes from the session's own reads.

use std::io;
use std::mem::MaybeUninit;
use std::os::fd::AsFd;

use socket2::SockRef;
use tokio::io::Interest;
use tokio::net::TcpStream;
use tracing::debug;

/// Resolves once the client at the other end of `tcp` has closed its side
/// of the connection or reset it, without reading anything it sent.
pub async fn closed(tcp: &TcpStream) {
    loop {
        match tcp.ready(Interest::READABLE).await {
            Ok(ready) if ready.is_read_closed() => return,
            Ok(_) => {}
            Err(_) => return,
        }
        // Readable without a FIN: bytes wait, or the readiness is left over
        // from the handshake's last read (then the peek clears it, and the
        // next `ready` waits for a new event).
        match tcp.try_io(Interest::READABLE, || peek(tcp)) {
            Ok(0) => return,
            Ok(_) => break,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(_) => return,
        }
    }
    match second_registration(tcp) {
        Ok(watch) => hang_up(&watch).await,
        Err(e) => {
            // The hold then ends as it would have: with a target or at
            // its timeout.
            debug!("cannot watch a held client for its hang-up: {e}");
            std::future::pending().await
        }
    }
}

fn peek(tcp: &TcpStream) -> io::Result<usize> {
    let mut byte = [MaybeUninit::<u8>::uninit()];
    SockRef::from(tcp).peek(&mut byte)
}

/// The same socket under a second descriptor, registered on its own.
/// Dropping it deregisters and closes that descriptor only: the socket
/// stays open under the session's.
fn second_registration(tcp: &TcpStream) -> io::Result<TcpStream> {
    let fd = tcp.as_fd().try_clone_to_owned()?;
    TcpStream::from_std(std::net::TcpStream::from(fd))
}

/// Waits on `watch` until the peer's FIN or reset: each event without one
/// (more bytes) is cleared, and the next one waited for.
async fn hang_up(watch: &TcpStream) {
    loop {
        match watch.ready(Interest::READABLE).await {
            Ok(ready) if ready.is_read_closed() => return,
            Ok(_) => {
                let _ = watch.try_io(Interest::READABLE, || {
                    Err::<(), _>(io::ErrorKind::WouldBlock.into())
                });
            }
            Err(_) => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    use super::*;

    async fn pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let client = TcpStream::connect(listener.local_addr().expect("addr"))
            .await
            .expect("connect");
        let (server, _) = listener.accept().await.expect("accept");
        (client, server)
    }

    async fn resolves(server: &TcpStream) -> bool {
        tokio::time::timeout(Duration::from_secs(5), closed(server))
            .await
            .is_ok()
    }

    async fn stays_pending(server: &TcpStream) -> bool {
        tokio::time::timeout(Duration::from_millis(300), closed(server))
            .await
            .is_err()
    }

    #[tokio::test]
    async fn a_client_that_closes_without_a_word_is_seen_to_go() {
        let (client, server) = pair().await;
        assert!(stays_pending(&server).await);
        drop(client);
        assert!(resolves(&server).await);
    }

    #[tokio::test]
    async fn bytes_alone_are_not_a_close_and_stay_for_the_reader() {
        let (mut client, mut server) = pair().await;
        client.write_all(b"alert").await.expect("write");
        assert!(stays_pending(&server).await);
        client.write_all(b" and more").await.expect("write");
        assert!(stays_pending(&server).await);
        drop(client);
        assert!(resolves(&server).await);
        let mut read = Vec::new();
        server.read_to_end(&mut read).await.expect("read");
        assert_eq!(read, b"alert and more");
    }

    #[tokio::test]
    async fn bytes_and_a_close_together_are_seen_at_once() {
        let (mut client, server) = pair().await;
        client.write_all(b"bye").await.expect("write");
        client.shutdown().await.expect("shutdown");
        assert!(resolves(&server).await);
    }

    #[tokio::test]
    async fn a_reset_is_a_close() {
        let (client, server) = pair().await;
        client.set_zero_linger().expect("linger");
        drop(client);
        assert!(resolves(&server).await);
    }
}
