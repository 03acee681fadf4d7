//! Which processes hold a socket, as Linux's `/proc` tells: for naming the
//! other program in an error ("address already in use by pid 812
//! (haproxy …)") or a warning, never for a decision `/proc` may not be
//! able to back (a process of another user cannot be read, unless this
//! one is root).
//!
//! Only reads. The other program's command line is its own to choose, so
//! it is shown bounded and with its control characters replaced.

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::fs::MetadataExt;

/// The most characters of another program's command line shown.
const MAX_PROGRAM: usize = 160;

/// A process holding a socket.
#[derive(Debug, Clone, PartialEq)]
pub struct Process {
    pub pid: u32,
    /// The owner of its `/proc` entry: its effective uid.
    pub uid: u32,
    /// Its command line (or name), printable.
    pub program: Option<String>,
}

impl std::fmt::Display for Process {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.program {
            Some(program) => write!(f, "pid {} ({program})", self.pid),
            None => write!(f, "pid {}", self.pid),
        }
    }
}

/// For each socket inode of `inodes`, the processes that hold it, as far
/// as this process may read their descriptors.
pub fn processes_holding(inodes: &BTreeSet<u64>) -> BTreeMap<u64, Vec<Process>> {
    let mut found: BTreeMap<u64, Vec<Process>> = BTreeMap::new();
    if inodes.is_empty() {
        return found;
    }
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return found;
    };
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(fds) = std::fs::read_dir(entry.path().join("fd")) else {
            continue;
        };
        let mut held: Vec<u64> = fds
            .flatten()
            .filter_map(|fd| std::fs::read_link(fd.path()).ok())
            .filter_map(|target| socket_inode(&target.to_string_lossy()))
            .filter(|inode| inodes.contains(inode))
            .collect();
        held.sort_unstable();
        held.dedup();
        if held.is_empty() {
            continue;
        }
        let Ok(metadata) = entry.metadata() else {
            continue;
        };
        let process = Process {
            pid,
            uid: metadata.uid(),
            program: program(pid),
        };
        for inode in held {
            found.entry(inode).or_default().push(process.clone());
        }
    }
    found
}

/// `socket:[12345]` → 12345.
fn socket_inode(link: &str) -> Option<u64> {
    link.strip_prefix("socket:[")?
        .strip_suffix(']')?
        .parse()
        .ok()
}

/// A process's command line (or, failing that, its name), printable and
/// bounded.
fn program(pid: u32) -> Option<String> {
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let text = if cmdline.is_empty() {
        std::fs::read_to_string(format!("/proc/{pid}/comm")).ok()?
    } else {
        String::from_utf8_lossy(&cmdline).replace('\0', " ")
    };
    let printable: String = text
        .trim()
        .chars()
        .map(|c| if c.is_control() { '?' } else { c })
        .take(MAX_PROGRAM)
        .collect();
    (!printable.is_empty()).then_some(printable)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// This test's own socket is found in its own process, named by its
    /// command line.
    #[test]
    fn a_socket_is_found_in_the_process_holding_it() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let fd = std::os::fd::AsRawFd::as_raw_fd(&listener);
        let inode = std::fs::metadata(format!("/proc/self/fd/{fd}"))
            .expect("fd")
            .ino();
        let found = processes_holding(&BTreeSet::from([inode]));
        let own = std::process::id();
        let process = found
            .get(&inode)
            .and_then(|p| p.iter().find(|p| p.pid == own))
            .expect("found in this process");
        assert!(process.to_string().starts_with(&format!("pid {own} (")));
        assert_eq!(socket_inode("socket:[42]"), Some(42));
        assert_eq!(socket_inode("pipe:[42]"), None);
    }
}
