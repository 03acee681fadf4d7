//! Options rolegate sets on every TCP connection it accepts or opens, and
//! on the sockets it listens on.
//!
//! Listening sockets are bound with `SO_REUSEPORT`: a second rolegate
//! started with the same configuration binds beside the running one
//! instead of failing, which is how a restart or an upgrade starts (see
//! [`crate::handover`] for how it then avoids resetting connections). An
//! address rolegate holds no socket for yet is claimed first: only that
//! predecessor may be listening there (see [`super::address_owner`]).
//!
//! `TCP_NODELAY`: queries and results are small writes that must not wait
//! for Nagle's algorithm.
//!
//! Keepalive: an idle PostgreSQL session sends nothing, so a peer that
//! vanished without closing (a crashed client host, a backend cut off by
//! the network) would otherwise hold its session, its backend connection
//! and a client slot forever. After `idle` of silence the kernel probes the
//! peer every `idle / 4` (at least 1 s); after 4 unanswered probes it
//! resets the connection, and the session ends as on any other reset.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use socket2::{Domain, Protocol, SockRef, Socket, TcpKeepalive, Type};
use tokio::net::{TcpListener, TcpStream};
use tracing::debug;

use super::address_owner::check_free;

const PROBES: u32 = 4;
/// Connections the kernel queues for a listener before rolegate accepts
/// them (as tokio's and std's own `bind`).
const LISTEN_BACKLOG: i32 = 1024;

/// Binds a listening socket on `addr`, which this process holds no socket
/// for, registered with the caller's runtime: as [`claim_std_listener`].
pub fn claim_listener(addr: SocketAddr, predecessor: Option<u32>) -> io::Result<TcpListener> {
    TcpListener::from_std(claim_std_listener(addr, predecessor)?)
}

/// Binds the first listening socket on `addr`, which this process holds no
/// socket for: fails as a plain bind would ("address already in use",
/// naming the other program) when anything but `predecessor` (the process
/// this one took over from) listens there. Not yet registered with any
/// runtime.
pub fn claim_std_listener(
    addr: SocketAddr,
    predecessor: Option<u32>,
) -> io::Result<std::net::TcpListener> {
    check_free(addr, predecessor)?;
    bind_std_listener(addr)
}

/// Binds a listening socket on `addr` with `SO_REUSEADDR` and
/// `SO_REUSEPORT`, not yet registered with any runtime (and non-blocking,
/// as a runtime expects): beside a socket this process already holds (see
/// [`claim_std_listener`] for the first), for a loop other than the
/// caller's to accept on.
pub fn bind_std_listener(addr: SocketAddr) -> io::Result<std::net::TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(LISTEN_BACKLOG)?;
    Ok(socket.into())
}

/// Sets `TCP_NODELAY` and, unless `keepalive` is `None`, keepalive probes
/// after that much silence.
pub fn tune(tcp: &TcpStream, keepalive: Option<Duration>) {
    let _ = tcp.set_nodelay(true);
    let Some(idle) = keepalive else { return };
    if let Err(e) = SockRef::from(tcp).set_tcp_keepalive(&probes(idle)) {
        debug!("cannot enable TCP keepalive: {e}");
    }
}

/// Sets on a listening socket what [`tune`] sets on a connection. Linux
/// passes `TCP_NODELAY` and the keepalive settings on to every connection
/// accepted from the socket, so client connections need no `setsockopt`
/// of their own (five calls each). Set again at every reload, as
/// `tcp_keepalive` may change.
pub fn tune_listener(
    listener: &std::net::TcpListener,
    keepalive: Option<Duration>,
) -> io::Result<()> {
    let socket = SockRef::from(listener);
    socket.set_tcp_nodelay(true)?;
    match keepalive {
        Some(idle) => socket.set_tcp_keepalive(&probes(idle)),
        None => socket.set_keepalive(false),
    }
}

fn probes(idle: Duration) -> TcpKeepalive {
    TcpKeepalive::new()
        .with_time(idle)
        .with_interval((idle / PROBES).max(Duration::from_secs(1)))
        .with_retries(PROBES)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What the listener was given, its accepted connections have.
    #[test]
    fn accepted_connections_inherit_the_listeners_options() {
        let listener = bind_std_listener("127.0.0.1:0".parse().expect("addr")).expect("bind");
        let addr = listener.local_addr().expect("addr");
        listener.set_nonblocking(false).expect("blocking");
        for keepalive in [Some(Duration::from_secs(40)), None] {
            tune_listener(&listener, keepalive).expect("tune");
            let _client = std::net::TcpStream::connect(addr).expect("connect");
            let (accepted, _) = listener.accept().expect("accept");
            let accepted = SockRef::from(&accepted);
            assert!(accepted.tcp_nodelay().expect("nodelay"));
            assert_eq!(
                accepted.keepalive().expect("keepalive"),
                keepalive.is_some()
            );
            if keepalive.is_some() {
                assert_eq!(
                    accepted.tcp_keepalive_time().expect("idle"),
                    Duration::from_secs(40)
                );
                assert_eq!(
                    accepted.tcp_keepalive_interval().expect("interval"),
                    Duration::from_secs(10)
                );
                assert_eq!(accepted.tcp_keepalive_retries().expect("retries"), PROBES);
            }
        }
    }
}
