//! Who else listens on an address, before rolegate binds it.
//!
//! Listening sockets are bound with `SO_REUSEPORT` (see [`super::socket`]),
//! and Linux lets any process of the same user bind beside a socket that
//! has it: HAProxy by default, PgBouncer with `so_reuseport`, or a second
//! rolegate of another configuration. The kernel would then split new
//! connections between them, so that a client meant for one cluster logs
//! in to another. So before rolegate binds an address it holds no socket
//! for, it probes it with a socket that sets `SO_REUSEADDR` but not
//! `SO_REUSEPORT`: on Linux that bind fails with `EADDRINUSE` exactly when
//! something listens there (connections in `TIME_WAIT` do not count).
//!
//! Only the rolegate this process took over from (its handover
//! predecessor, see [`crate::handover`]) may be found there: it listens
//! until it has let its sockets go. Anything else is refused, as a plain
//! bind would be ("address already in use"), naming the other program
//! where `/proc` says: the listening socket's inode from
//! `/proc/net/tcp{,6}`, the processes holding it from `/proc/*/fd` (see
//! [`crate::proc_net`]). This module only probes; it never binds for good.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use socket2::{Domain, Protocol, Socket, Type};

use crate::proc_net::{processes_holding, Process};

/// The TCP state `/proc/net/tcp` prints for a listening socket.
const LISTEN: &str = "0A";

/// Something other than this rolegate and its predecessor listens on an
/// address.
#[derive(Debug, thiserror::Error)]
pub struct AddressTaken {
    holders: Vec<Holder>,
}

/// A listening socket found on the address: its owner's uid, and the
/// processes holding it (none when `/proc` does not say).
#[derive(Debug, Clone, PartialEq)]
struct Holder {
    uid: u32,
    processes: Vec<Process>,
}

impl fmt::Display for AddressTaken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "address already in use")?;
        let mut named: Vec<String> = Vec::new();
        for holder in &self.holders {
            if holder.processes.is_empty() {
                named.push(format!("a program of uid {}", holder.uid));
            }
            named.extend(holder.processes.iter().map(Process::to_string));
        }
        named.dedup();
        if !named.is_empty() {
            write!(f, " by {}", named.join(", "))?;
        }
        Ok(())
    }
}

/// Fails with `AddrInUse` (carrying an [`AddressTaken`]) when anything but
/// this process and `predecessor` listens on `addr`; other bind errors
/// (an address not on this host) come back as the probe met them.
pub fn check_free(addr: SocketAddr, predecessor: Option<u32>) -> io::Result<()> {
    if addr.port() == 0 || !in_use(addr)? {
        return Ok(());
    }
    let holders = holders(addr);
    let own = std::process::id();
    let ours = |holder: &Holder| {
        !holder.processes.is_empty()
            && holder
                .processes
                .iter()
                .all(|p| p.pid == own || Some(p.pid) == predecessor)
    };
    if !holders.is_empty() && holders.iter().all(ours) {
        return Ok(());
    }
    // Gone between the probe and the look: the address is free after all.
    if holders.is_empty() && !in_use(addr)? {
        return Ok(());
    }
    Err(io::Error::new(
        io::ErrorKind::AddrInUse,
        AddressTaken { holders },
    ))
}

/// Whether a socket without `SO_REUSEPORT` is refused `addr`.
fn in_use(addr: SocketAddr) -> io::Result<bool> {
    let probe = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    probe.set_reuse_address(true)?;
    match probe.bind(&addr.into()) {
        Ok(()) => Ok(false),
        Err(e) if e.kind() == io::ErrorKind::AddrInUse => Ok(true),
        Err(e) => Err(e),
    }
}

/// The listening sockets that clash with `addr`, with their processes.
fn holders(addr: SocketAddr) -> Vec<Holder> {
    let mut sockets: BTreeMap<u64, u32> = BTreeMap::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        if let Ok(text) = std::fs::read_to_string(table) {
            sockets.extend(listening(&text, addr));
        }
    }
    if sockets.is_empty() {
        return Vec::new();
    }
    let inodes: BTreeSet<u64> = sockets.keys().copied().collect();
    let mut processes = processes_holding(&inodes);
    sockets
        .into_iter()
        .map(|(inode, uid)| Holder {
            uid,
            processes: processes.remove(&inode).unwrap_or_default(),
        })
        .collect()
}

/// The listening sockets of a `/proc/net/tcp{,6}` table that clash with
/// `addr`: inode and owner uid.
fn listening(table: &str, addr: SocketAddr) -> Vec<(u64, u32)> {
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            if fields.get(3) != Some(&LISTEN) {
                return None;
            }
            let local = parse_local(fields.get(1)?)?;
            let uid = fields.get(7)?.parse().ok()?;
            let inode = fields.get(9)?.parse().ok()?;
            (local.port() == addr.port() && clash(local.ip(), addr.ip())).then_some((inode, uid))
        })
        .collect()
}

/// `0100007F:1F90` (IPv4) or 32 hex digits and a port (IPv6), each 32-bit
/// group printed in the host's byte order.
fn parse_local(field: &str) -> Option<SocketAddr> {
    let (ip, port) = field.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let group = |i: usize| -> Option<[u8; 4]> {
        let hex = ip.get(i * 8..i * 8 + 8)?;
        Some(u32::from_str_radix(hex, 16).ok()?.to_ne_bytes())
    };
    let ip = match ip.len() {
        8 => IpAddr::V4(Ipv4Addr::from(group(0)?)),
        32 => {
            let mut octets = [0u8; 16];
            for i in 0..4 {
                octets[i * 4..i * 4 + 4].copy_from_slice(&group(i)?);
            }
            IpAddr::V6(Ipv6Addr::from(octets))
        }
        _ => return None,
    };
    Some(SocketAddr::new(ip, port))
}

/// Whether sockets on `a` and `b` (same port) clash, as the kernel sees
/// it: the same address, or either one the wildcard (a dual-stack `[::]`
/// covers IPv4 too).
fn clash(a: IpAddr, b: IpAddr) -> bool {
    let (a, b) = (a.to_canonical(), b.to_canonical());
    match (a, b) {
        (IpAddr::V4(_), IpAddr::V4(_)) | (IpAddr::V6(_), IpAddr::V6(_)) => {
            a == b || a.is_unspecified() || b.is_unspecified()
        }
        (IpAddr::V4(_), IpAddr::V6(v6)) | (IpAddr::V6(v6), IpAddr::V4(_)) => v6.is_unspecified(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stranger(addr: SocketAddr) -> std::net::TcpListener {
        let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None).expect("socket");
        socket.set_reuse_address(true).expect("reuseaddr");
        socket.set_reuse_port(true).expect("reuseport");
        socket.bind(&addr.into()).expect("bind");
        socket.listen(16).expect("listen");
        socket.into()
    }

    #[test]
    fn proc_addresses_parse() {
        let v4 = parse_local("0100007F:1F90").expect("v4");
        assert_eq!(v4, "127.0.0.1:8080".parse().expect("addr"));
        let v6 = parse_local("00000000000000000000000001000000:0016").expect("v6");
        assert_eq!(v6, "[::1]:22".parse().expect("addr"));
        assert_eq!(parse_local("zz:1"), None);
    }

    #[test]
    fn wildcards_clash_with_everything_of_their_port() {
        let ip = |s: &str| s.parse::<IpAddr>().expect("ip");
        assert!(clash(ip("0.0.0.0"), ip("127.0.0.1")));
        assert!(clash(ip("::"), ip("127.0.0.1")));
        assert!(clash(ip("::ffff:127.0.0.1"), ip("127.0.0.1")));
        assert!(!clash(ip("127.0.0.2"), ip("127.0.0.1")));
        assert!(!clash(ip("::1"), ip("0.0.0.0")));
    }

    /// The probe sees a listener that has `SO_REUSEPORT` (which a plain
    /// bind with it would join), and lets a free address and this
    /// process's own sockets pass.
    #[test]
    fn a_listener_with_reuseport_is_found_and_named() {
        let free = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = free.local_addr().expect("addr");
        drop(free);
        check_free(addr, None).expect("a free address passes");

        let _theirs = stranger(addr);
        assert!(in_use(addr).expect("probe"));
        // This test's own process holds it: that passes, as a predecessor.
        check_free(addr, None).expect("this process's own socket passes");
        let holders = holders(addr);
        assert_eq!(holders.len(), 1, "{holders:?}");
        let own = std::process::id();
        assert!(
            holders[0].processes.iter().any(|p| p.pid == own),
            "{holders:?}"
        );
        let message = AddressTaken { holders }.to_string();
        assert!(
            message.starts_with(&format!("address already in use by pid {own} (")),
            "{message}"
        );
    }

    #[test]
    fn an_unreadable_holder_is_named_by_its_uid() {
        let taken = AddressTaken {
            holders: vec![Holder {
                uid: 1001,
                processes: Vec::new(),
            }],
        };
        assert_eq!(
            taken.to_string(),
            "address already in use by a program of uid 1001"
        );
        assert_eq!(
            AddressTaken {
                holders: Vec::new()
            }
            .to_string(),
            "address already in use"
        );
    }
}
