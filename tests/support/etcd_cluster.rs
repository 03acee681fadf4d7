//! A three-member etcd cluster of a test's own on loopback, for faults
//! that need a quorum: a member cut off from its peers, a rolling restart.
//!
//! Each member is a real `etcd` process (Debian's `etcd-server`, which
//! `lab/lab up` installs) with its own data directory and ports; every one
//! is stopped by its PID when the cluster is dropped.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use nix::sys::signal::Signal;

use super::process::{signal, stop_pid};
use super::{free_port, wait_until};

pub struct EtcdMember {
    pub name: String,
    pub client_port: u16,
    peer_port: u16,
    dir: PathBuf,
    child: Option<Child>,
}

pub struct EtcdCluster {
    pub members: Vec<EtcdMember>,
    initial_cluster: String,
}

impl EtcdCluster {
    /// Starts three members under `root` and waits until the cluster has a
    /// leader and answers on every member.
    pub fn start(root: &Path) -> Self {
        let mut members: Vec<_> = (1..=3)
            .map(|i| EtcdMember {
                name: format!("e{i}"),
                client_port: free_port(),
                peer_port: free_port(),
                dir: root.join(format!("etcd{i}")),
                child: None,
            })
            .collect();
        let initial_cluster = members
            .iter()
            .map(|m| format!("{}=http://127.0.0.1:{}", m.name, m.peer_port))
            .collect::<Vec<_>>()
            .join(",");
        for member in &mut members {
            let _ = std::fs::remove_dir_all(&member.dir);
            std::fs::create_dir_all(&member.dir).expect("etcd dir");
        }
        let mut cluster = Self {
            members,
            initial_cluster,
        };
        for i in 0..3 {
            cluster.spawn(i);
        }
        for i in 0..3 {
            cluster.wait_healthy(i);
        }
        cluster
    }

    fn spawn(&mut self, i: usize) {
        let initial_cluster = self.initial_cluster.clone();
        let member = &mut self.members[i];
        let log = std::fs::File::create(member.dir.join("etcd.log")).expect("etcd log");
        let client = format!("http://127.0.0.1:{}", member.client_port);
        let peer = format!("http://127.0.0.1:{}", member.peer_port);
        let child = Command::new("etcd")
            .args(["--name", &member.name])
            .arg("--data-dir")
            .arg(member.dir.join("data"))
            .args(["--listen-client-urls", &client])
            .args(["--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peer])
            .args(["--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &initial_cluster])
            .args(["--initial-cluster-state", "new"])
            .args(["--initial-cluster-token", "rolegate-quorum-test"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn etcd (install etcd-server: lab/lab up does)");
        member.child = Some(child);
    }

    /// `etcdctl` against member `i`, its output if it succeeded.
    pub fn etcdctl(&self, i: usize, args: &[&str]) -> Option<String> {
        let output = Command::new("etcdctl")
            .env("ETCDCTL_API", "3")
            .arg(format!("--endpoints={}", self.endpoint(i)))
            .args(["--dial-timeout=1s", "--command-timeout=2s"])
            .args(args)
            .output()
            .ok()?;
        output
            .status
            .success()
            .then(|| String::from_utf8_lossy(&output.stdout).into_owned())
    }

    pub fn wait_healthy(&self, i: usize) {
        wait_until(
            Duration::from_secs(30),
            &format!("etcd member {} to be healthy", self.members[i].name),
            || self.etcdctl(i, &["endpoint", "health"]),
        );
    }

    pub fn put(&self, key: &str, value: &str) {
        self.etcdctl(0, &["put", key, value])
            .unwrap_or_else(|| panic!("etcdctl put {key}"));
    }

    pub fn endpoint(&self, i: usize) -> String {
        format!("http://127.0.0.1:{}", self.members[i].client_port)
    }

    fn pid(&self, i: usize) -> Option<i32> {
        self.members[i].child.as_ref().map(|c| c.id() as i32)
    }

    /// Stops member `i` (SIGTERM, then SIGKILL after 10 s).
    pub fn stop(&mut self, i: usize) {
        if let Some(mut child) = self.members[i].child.take() {
            stop_pid(child.id() as i32, Signal::SIGTERM, Duration::from_secs(10));
            let _ = child.wait();
        }
    }

    /// Starts member `i` again from its data directory and waits for it.
    pub fn restart(&mut self, i: usize) {
        self.stop(i);
        self.spawn(i);
        self.wait_healthy(i);
    }

    /// Starts every stopped member again, then waits for the quorum (a
    /// lone member of a stopped cluster cannot become healthy).
    pub fn restart_stopped(&mut self) {
        let stopped: Vec<usize> = (0..self.members.len())
            .filter(|&i| self.members[i].child.is_none())
            .collect();
        for &i in &stopped {
            self.spawn(i);
        }
        for i in stopped {
            self.wait_healthy(i);
        }
    }

    /// Freezes member `i` (SIGSTOP): its connections stay open and silent.
    pub fn freeze(&self, i: usize) {
        if let Some(pid) = self.pid(i) {
            signal(pid, Signal::SIGSTOP);
        }
    }

    pub fn thaw(&self, i: usize) {
        if let Some(pid) = self.pid(i) {
            signal(pid, Signal::SIGCONT);
        }
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        for i in 0..self.members.len() {
            self.thaw(i);
            self.stop(i);
        }
    }
}
