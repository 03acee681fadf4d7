//! A single etcd member as production runs it: authentication enabled
//! (a root user and least-privilege users), optionally client-certificate
//! TLS (`--client-cert-auth`), and a token TTL of the test's choosing.
//!
//! It is a real `etcd` process (Debian's `etcd-server`) with its own data
//! directory and port, stopped by its PID when dropped. The test's own
//! `etcdctl` calls go in as root.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use nix::sys::signal::Signal;

use super::certs::{Ca, Pair};
use super::process::stop_pid;
use super::{free_port, wait_until};

pub const ROOT_PASSWORD: &str = "root-secret";

/// The files of an etcd that speaks TLS and asks clients for certificates.
pub struct EtcdTls {
    pub ca: PathBuf,
    authority: Ca,
    dir: PathBuf,
    server: Pair,
    /// The certificate of the test's own `etcdctl` (common name `root`).
    client: Pair,
}

impl EtcdTls {
    /// A CA, a server certificate for 127.0.0.1 and a client certificate,
    /// written under `dir`.
    pub fn new(dir: &Path) -> Self {
        std::fs::create_dir_all(dir).expect("tls dir");
        let authority = Ca::new("rolegate test etcd CA");
        Self {
            ca: authority.write(dir, "etcd-ca.crt"),
            server: authority.issue(dir, "etcd-server", "etcd", &["127.0.0.1", "localhost"]),
            client: authority.issue(dir, "etcdctl", "root", &[]),
            dir: dir.to_owned(),
            authority,
        }
    }

    /// A client certificate the member accepts, for etcd user `user`.
    pub fn client_for(&self, user: &str) -> Pair {
        self.authority
            .issue(&self.dir, &format!("etcd-client-{user}"), user, &[])
    }
}

pub struct SecureEtcd {
    pub port: u16,
    dir: PathBuf,
    tls: Option<EtcdTls>,
    child: Option<Child>,
}

impl SecureEtcd {
    /// Starts a member under `dir` (TLS if `tls`, tokens living
    /// `token_ttl` seconds), creates the root user and enables
    /// authentication.
    pub fn start(dir: &Path, tls: Option<EtcdTls>, token_ttl: u32) -> Self {
        let _ = std::fs::remove_dir_all(dir.join("data"));
        std::fs::create_dir_all(dir).expect("etcd dir");
        let port = free_port();
        let peer = format!("http://127.0.0.1:{}", free_port());
        let scheme = if tls.is_some() { "https" } else { "http" };
        let client = format!("{scheme}://127.0.0.1:{port}");
        let log = std::fs::File::create(dir.join("etcd.log")).expect("etcd log");
        let mut command = Command::new("etcd");
        command
            .args(["--name", "secure"])
            .arg("--data-dir")
            .arg(dir.join("data"))
            .args(["--listen-client-urls", &client])
            .args(["--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peer])
            .args(["--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &format!("secure={peer}")])
            .args(["--auth-token-ttl", &token_ttl.to_string()]);
        if let Some(tls) = &tls {
            command
                .arg("--client-cert-auth")
                .arg("--trusted-ca-file")
                .arg(&tls.ca)
                .arg("--cert-file")
                .arg(&tls.server.cert)
                .arg("--key-file")
                .arg(&tls.server.key);
        }
        let child = command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn etcd (install etcd-server: scripts/deps.sh does)");
        let etcd = Self {
            port,
            dir: dir.to_owned(),
            tls,
            child: Some(child),
        };
        wait_until(Duration::from_secs(30), "etcd to be healthy", || {
            etcd.etcdctl_as(None, &["endpoint", "health"])
        });
        etcd.ok(None, &["user", "add", &format!("root:{ROOT_PASSWORD}")]);
        etcd.ok(None, &["auth", "enable"]);
        etcd
    }

    pub fn endpoint(&self) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://127.0.0.1:{}", self.port)
    }

    pub fn tls(&self) -> Option<&EtcdTls> {
        self.tls.as_ref()
    }

    /// `etcdctl` as `user` (`name:password`; none before auth is on), its
    /// output if it succeeded.
    fn etcdctl_as(&self, user: Option<&str>, args: &[&str]) -> Option<String> {
        let mut command = Command::new("etcdctl");
        command
            .env("ETCDCTL_API", "3")
            .arg(format!("--endpoints={}", self.endpoint()))
            .args(["--dial-timeout=2s", "--command-timeout=3s"]);
        if let Some(user) = user {
            command.arg(format!("--user={user}"));
        }
        if let Some(tls) = &self.tls {
            command
                .arg("--cacert")
                .arg(&tls.ca)
                .arg("--cert")
                .arg(&tls.client.cert)
                .arg("--key")
                .arg(&tls.client.key);
        }
        let output = command.args(args).output().ok()?;
        output
            .status
            .success()
            .then(|| String::from_utf8_lossy(&output.stdout).into_owned())
    }

    fn ok(&self, user: Option<&str>, args: &[&str]) -> String {
        self.etcdctl_as(user, args)
            .unwrap_or_else(|| panic!("etcdctl {}", args.join(" ")))
    }

    /// `etcdctl` as root.
    pub fn root(&self, args: &[&str]) -> String {
        self.ok(Some(&format!("root:{ROOT_PASSWORD}")), args)
    }

    pub fn put(&self, key: &str, value: &str) {
        self.root(&["put", key, value]);
    }

    /// A user `name` whose role may read under `read` and read and write
    /// under `readwrite` (each a key prefix), and nothing else.
    pub fn user(&self, name: &str, password: &str, read: &[&str], readwrite: &[&str]) {
        self.root(&["role", "add", name]);
        for prefix in read {
            self.root(&[
                "role",
                "grant-permission",
                name,
                "--prefix=true",
                "read",
                prefix,
            ]);
        }
        for prefix in readwrite {
            self.root(&[
                "role",
                "grant-permission",
                name,
                "--prefix=true",
                "readwrite",
                prefix,
            ]);
        }
        self.root(&["user", "add", &format!("{name}:{password}")]);
        self.root(&["user", "grant-role", name, name]);
    }

    /// The keys under `prefix`, one a line.
    pub fn keys(&self, prefix: &str) -> String {
        self.root(&["get", "--prefix", "--keys-only", prefix])
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("etcd.log")).unwrap_or_default()
    }
}

impl Drop for SecureEtcd {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            stop_pid(child.id() as i32, Signal::SIGTERM, Duration::from_secs(10));
            let _ = child.wait();
        }
    }
}
