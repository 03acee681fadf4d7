//! Stand-alone PostgreSQL 15 servers for tests of the data path.
//!
//! Each server gets its own data directory and a free loopback port, uses
//! scram-sha-256 for host connections (md5 and trust for dedicated test
//! users, to prove every method relays), and is stopped by the PID in its
//! `postmaster.pid` when dropped.

use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::sys::signal::Signal;

use super::free_port;
use super::process::{is_root, pg_command, run_ok, stop_pid};

/// Where Debian installs PostgreSQL 15's server binaries.
fn bin_dir() -> PathBuf {
    std::env::var_os("PG_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/lib/postgresql/15/bin"))
}

pub struct PgServer {
    pub name: String,
    pub port: u16,
    pub dir: PathBuf,
    pid: i32,
}

impl PgServer {
    /// Initialises and starts a server under `root/name`.
    pub fn start(root: &Path, name: &str) -> Self {
        Self::start_with(root, name, None)
    }

    /// As [`PgServer::start`], with `ssl = on` and this certificate and key.
    pub fn start_with_tls(root: &Path, name: &str, cert: &Path, key: &Path) -> Self {
        Self::start_with(root, name, Some((cert, key)))
    }

    fn start_with(root: &Path, name: &str, tls: Option<(&Path, &Path)>) -> Self {
        let dir = root.join(name);
        std::fs::create_dir_all(&dir).expect("create server dir");
        if is_root() {
            let user = nix::unistd::User::from_name("postgres")
                .expect("look up the postgres user")
                .expect("the postgres OS user exists (install postgresql-15)");
            nix::unistd::chown(&dir, Some(user.uid), Some(user.gid)).expect("chown server dir");
        }
        let data = dir.join("data");
        let pwfile = dir.join("pwfile");
        std::fs::write(&pwfile, "postgres\n").expect("write pwfile");
        if is_root() {
            let user = nix::unistd::User::from_name("postgres")
                .ok()
                .flatten()
                .expect("postgres user");
            nix::unistd::chown(&pwfile, Some(user.uid), Some(user.gid)).expect("chown pwfile");
        }
        run_ok(
            pg_command(&bin_dir().join("initdb"))
                .arg("-D")
                .arg(&data)
                .args([
                    "-U",
                    "postgres",
                    "-E",
                    "UTF8",
                    "--no-sync",
                    "--auth-local=trust",
                ])
                .args(["--auth-host=scram-sha-256"])
                .arg(format!("--pwfile={}", pwfile.display())),
            "initdb",
        );
        let port = free_port();
        let conf = format!(
            "\nport = {port}\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = '{}'\n\
             fsync = off\nsynchronous_commit = off\nfull_page_writes = off\nmax_connections = 120\n\
             log_min_messages = warning\n",
            dir.display()
        );
        append(&data.join("postgresql.conf"), &conf);
        if let Some((cert, key)) = tls {
            for (from, to) in [(cert, "server.crt"), (key, "server.key")] {
                let target = data.join(to);
                std::fs::copy(from, &target).expect("copy TLS file");
                use std::os::unix::fs::PermissionsExt;
                std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o600))
                    .expect("chmod");
                if is_root() {
                    let user = nix::unistd::User::from_name("postgres")
                        .ok()
                        .flatten()
                        .expect("postgres user");
                    nix::unistd::chown(&target, Some(user.uid), Some(user.gid))
                        .expect("chown TLS file");
                }
            }
            append(&data.join("postgresql.conf"), "ssl = on\n");
        }
        // More specific lines first: the first match wins.
        let hba = std::fs::read_to_string(data.join("pg_hba.conf")).expect("read pg_hba");
        let hba = format!(
            "host all trustuser 127.0.0.1/32 trust\nhost all md5user 127.0.0.1/32 md5\n{hba}"
        );
        std::fs::write(data.join("pg_hba.conf"), hba).expect("write pg_hba");
        let pid = pg_ctl_start(&dir);
        let server = Self {
            name: name.to_owned(),
            port,
            dir,
            pid,
        };
        server.psql("CREATE ROLE app LOGIN PASSWORD 'app'");
        server.psql("CREATE DATABASE app OWNER app");
        server.psql("CREATE ROLE trustuser LOGIN");
        server.psql("SET password_encryption = 'md5'; CREATE ROLE md5user LOGIN PASSWORD 'md5pw'");
        server
    }

    /// As [`PgServer::start`], then restarted in standby mode without a
    /// primary to follow: a real server in recovery, accepting read-only
    /// logins (`in_hot_standby = on`), as a demoted leader is.
    pub fn start_standby(root: &Path, name: &str) -> Self {
        let mut server = Self::start(root, name);
        stop_pid(server.pid, Signal::SIGINT, Duration::from_secs(15));
        std::fs::write(server.dir.join("data/standby.signal"), "").expect("write standby.signal");
        server.pid = pg_ctl_start(&server.dir);
        server
    }

    /// Runs SQL as the superuser over the server's unix socket.
    pub fn psql(&self, sql: &str) -> String {
        self.psql_in("postgres", sql)
    }

    /// As [`PgServer::psql`], in `database`.
    pub fn psql_in(&self, database: &str, sql: &str) -> String {
        let out = run_ok(
            pg_command(Path::new("/usr/bin/psql"))
                .arg("-h")
                .arg(&self.dir)
                .args([
                    "-p",
                    &self.port.to_string(),
                    "-U",
                    "postgres",
                    "-d",
                    database,
                ])
                .args(["-v", "ON_ERROR_STOP=1", "-AtX", "-c", sql]),
            "psql",
        );
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    pub fn address(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn pid(&self) -> i32 {
        self.pid
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        // SIGINT is PostgreSQL's "fast" shutdown: sessions are ended.
        stop_pid(self.pid, Signal::SIGINT, Duration::from_secs(15));
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Starts the server under `dir` and returns its postmaster's pid once it
/// accepts connections.
fn pg_ctl_start(dir: &Path) -> i32 {
    let data = dir.join("data");
    run_ok(
        pg_command(&bin_dir().join("pg_ctl"))
            .arg("-D")
            .arg(&data)
            .arg("-l")
            .arg(dir.join("server.log"))
            .args(["-w", "-t", "60", "start"]),
        "pg_ctl start",
    );
    std::fs::read_to_string(data.join("postmaster.pid"))
        .ok()
        .and_then(|s| s.lines().next().and_then(|l| l.trim().parse().ok()))
        .expect("postmaster.pid")
}

fn append(path: &Path, text: &str) {
    use std::io::Write;
    let mut file = std::fs::OpenOptions::new()
        .append(true)
        .open(path)
        .expect("open for append");
    file.write_all(text.as_bytes()).expect("append");
}
