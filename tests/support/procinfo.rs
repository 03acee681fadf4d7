//! What a process holds, read from /proc: resident memory, open file
//! descriptors, and its TCP sockets with their ports, to check that
//! sessions leave nothing behind.

use std::collections::HashSet;

/// One TCP socket of a process: local and remote port, kernel state
/// (`01` is ESTABLISHED, `0A` LISTEN) and the kernel timer pending on it
/// (`00` none, `01` retransmit, `02` keepalive).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Socket {
    pub local_port: u16,
    pub remote_port: u16,
    pub state: String,
    pub timer: String,
}

#[derive(Debug, Clone)]
pub struct Usage {
    pub rss_kib: u64,
    pub fds: usize,
    pub sockets: Vec<Socket>,
}

impl Usage {
    pub fn of(pid: i32) -> Option<Self> {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        let rss_kib = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))?
            .split_whitespace()
            .next()?
            .parse()
            .ok()?;
        let mut inodes = HashSet::new();
        let mut fds = 0;
        for entry in std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.flatten() {
            fds += 1;
            if let Ok(target) = std::fs::read_link(entry.path()) {
                let target = target.to_string_lossy().into_owned();
                if let Some(inode) = target
                    .strip_prefix("socket:[")
                    .and_then(|t| t.strip_suffix(']'))
                {
                    inodes.insert(inode.to_owned());
                }
            }
        }
        let mut sockets = Vec::new();
        for table in ["tcp", "tcp6"] {
            let text =
                std::fs::read_to_string(format!("/proc/{pid}/net/{table}")).unwrap_or_default();
            for line in text.lines().skip(1) {
                let cells: Vec<_> = line.split_whitespace().collect();
                if cells.len() > 9 && inodes.contains(cells[9]) {
                    sockets.push(Socket {
                        local_port: port_of(cells[1])?,
                        remote_port: port_of(cells[2])?,
                        state: cells[3].to_owned(),
                        timer: cells[5].split(':').next().unwrap_or_default().to_owned(),
                    });
                }
            }
        }
        Some(Self {
            rss_kib,
            fds,
            sockets,
        })
    }

    /// Established sockets whose local port is one of `ports` (sessions
    /// accepted on those listeners).
    pub fn accepted_on(&self, ports: &[u16]) -> usize {
        self.sockets
            .iter()
            .filter(|s| s.state == "01" && ports.contains(&s.local_port))
            .count()
    }

    /// Established sockets whose remote port is one of `ports` (backend
    /// connections to those servers).
    pub fn connected_to(&self, ports: &[u16]) -> usize {
        self.sockets
            .iter()
            .filter(|s| s.state == "01" && ports.contains(&s.remote_port))
            .count()
    }
}

/// The port of a /proc/net/tcp address (`0100007F:1F90`).
fn port_of(address: &str) -> Option<u16> {
    u16::from_str_radix(address.rsplit(':').next()?, 16).ok()
}
