//! Who holds the handover name, when it is not this user.
//!
//! The name is in Linux's abstract namespace, which has no permissions and
//! is predictable (it follows the configuration's path): another local
//! user may bind it first. No predecessor is then ever found: every
//! restart binds anew, which resets the connections queued at the old
//! process, and is refused an address the old process still listens on
//! (see [`crate::server::address_owner`]); and a process waiting to take
//! the name over would wait without a word. So whoever holds it is looked
//! up, and one of another user is named in a warning, with its uid.

use std::collections::BTreeSet;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr as UnixAddr, UnixStream};

use rustix::net::sockopt::socket_peercred;
use tracing::warn;

use super::same_user;
use crate::proc_net::processes_holding;

/// `__SO_ACCEPTCON` in `/proc/net/unix`'s flags: a listening socket.
const ACCEPTING: u32 = 0x0001_0000;

/// A process of another user holding the handover name.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Foreign {
    pub pid: Option<u32>,
    pub uid: u32,
}

/// The holder of the abstract name `name`, if it is not this user (nor
/// root). Read from `/proc` (the sockets listening under the name, and the
/// processes holding them); where it shows none this process may read,
/// from the credentials of a connection to the name. `None` when nothing
/// listens there, or this user does.
pub fn foreign_holder(name: &str) -> Option<Foreign> {
    let table = std::fs::read_to_string("/proc/net/unix").ok()?;
    let inodes = listening_under(&table, name);
    if inodes.is_empty() {
        return None;
    }
    let holders: Vec<_> = processes_holding(&inodes).into_values().flatten().collect();
    if !holders.is_empty() {
        return holders.iter().find(|p| !same_user(p.uid)).map(|p| Foreign {
            pid: Some(p.pid),
            uid: p.uid,
        });
    }
    let address = UnixAddr::from_abstract_name(name.as_bytes()).ok()?;
    let stream = UnixStream::connect_addr(&address).ok()?;
    let credentials = socket_peercred(&stream).ok()?;
    let foreign = Foreign {
        pid: u32::try_from(credentials.pid.as_raw_nonzero().get()).ok(),
        uid: credentials.uid.as_raw(),
    };
    (!same_user(foreign.uid)).then_some(foreign)
}

/// The inodes of the sockets of a `/proc/net/unix` table that listen under
/// the abstract name `name` (shown as `@name`).
fn listening_under(table: &str, name: &str) -> BTreeSet<u64> {
    let wanted = format!("@{name}");
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            // Num RefCount Protocol Flags Type St Inode Path: the path is
            // the rest of the line, and may hold spaces.
            let mut rest = line;
            let mut fields = Vec::with_capacity(7);
            for _ in 0..7 {
                let trimmed = rest.trim_start();
                let end = trimmed.find(' ').unwrap_or(trimmed.len());
                fields.push(&trimmed[..end]);
                rest = &trimmed[end..];
            }
            let path = rest.strip_prefix(' ')?;
            let flags = u32::from_str_radix(fields[3], 16).ok()?;
            (path == wanted && flags & ACCEPTING != 0)
                .then(|| fields[6].parse().ok())
                .flatten()
        })
        .collect()
}

/// Says, loudly, that `holder` holds the handover name.
pub fn warn_foreign(name: &str, holder: Foreign) {
    let pid = holder
        .pid
        .map_or_else(|| "a process".to_owned(), |pid| format!("pid {pid}"));
    warn!(
        name,
        uid = holder.uid,
        "the handover socket @{name} is held by {pid} of uid {}, another user: \
         restarts cannot hand over the listening sockets (connections queued at \
         the old process are reset, and a new process is refused the addresses \
         the old one still listens on); stop that process, or keep the \
         configuration at another path",
        holder.uid
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listening_sockets_are_found_under_their_name() {
        let table = "Num       RefCount Protocol Flags    Type St Inode Path\n\
             00000000e6e0f12a: 00000002 00000000 00010000 0001 01 23822 @rolegate:/tmp/x y.toml\n\
             00000000e6e0f12b: 00000002 00000000 00000000 0001 03   101 @rolegate:/tmp/x y.toml\n\
             00000000e6e0f12c: 00000002 00000000 00010000 0001 01   102 @rolegate:/tmp/other\n\
             00000000e6e0f12d: 00000002 00000000 00010000 0001 01   103\n";
        assert_eq!(
            listening_under(table, "rolegate:/tmp/x y.toml"),
            BTreeSet::from([23822])
        );
    }

    /// A name this user listens under is not foreign; one nothing listens
    /// under has no holder.
    #[test]
    fn a_name_of_this_user_has_no_foreign_holder() {
        let name = format!("rolegate-test-holder:{}", std::process::id());
        assert_eq!(foreign_holder(&name), None);
        let address = UnixAddr::from_abstract_name(name.as_bytes()).expect("name");
        let _listener =
            std::os::unix::net::UnixListener::bind_addr(&address).expect("bind the name");
        let table = std::fs::read_to_string("/proc/net/unix").expect("table");
        assert_eq!(listening_under(&table, &name).len(), 1);
        assert_eq!(foreign_holder(&name), None);
    }
}
