//! Options rolegate sets on every TCP connection it accepts or opens.
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

use std::time::Duration;

use socket2::{SockRef, TcpKeepalive};
use tokio::net::TcpStream;
use tracing::debug;

const PROBES: u32 = 4;

/// Sets `TCP_NODELAY` and, unless `keepalive` is `None`, keepalive probes
/// after that much silence.
pub fn tune(tcp: &TcpStream, keepalive: Option<Duration>) {
    let _ = tcp.set_nodelay(true);
    let Some(idle) = keepalive else { return };
    let probes = TcpKeepalive::new()
        .with_time(idle)
        .with_interval((idle / PROBES).max(Duration::from_secs(1)))
        .with_retries(PROBES);
    if let Err(e) = SockRef::from(tcp).set_tcp_keepalive(&probes) {
        debug!("cannot enable TCP keepalive: {e}");
    }
}
