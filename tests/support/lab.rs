//! The Patroni lab (`lab/lab`) as seen from tests.
//!
//! Tests use a lab on shifted ports (`LAB_PORT_OFFSET`, default 100) so a
//! running demo on the default ports is never touched. `ensure_up` runs
//! `lab/lab up`, which is a no-op when the lab is already healthy; the
//! test command (`scripts/test.sh`) takes the lab down at the end.

use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use super::harness::TestEnv;

pub const MEMBERS: [&str; 3] = ["pg1", "pg2", "pg3"];

#[derive(Clone)]
pub struct Lab {
    pub offset: u16,
    script: PathBuf,
}

impl TestEnv for Lab {}

impl Lab {
    /// The lab for this test run, brought up if needed.
    pub fn ensure_up() -> Self {
        let offset = std::env::var("LAB_PORT_OFFSET")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(100);
        let lab = Self {
            offset,
            script: PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("lab/lab"),
        };
        lab.run(&["up"]);
        lab
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut command = Command::new(&self.script);
        command
            .args(args)
            .env("LAB_PORT_OFFSET", self.offset.to_string());
        if std::env::var_os("LAB_DIR").is_none() && self.offset == 100 {
            command.env("LAB_DIR", "/tmp/rolegate-test-lab");
        }
        command
    }

    /// Runs a lab command and returns its stdout; panics when it fails.
    pub fn run(&self, args: &[&str]) -> String {
        let output = self
            .command(args)
            .output()
            .unwrap_or_else(|e| panic!("lab {args:?}: {e}"));
        assert!(
            output.status.success(),
            "lab {args:?} failed ({}):\n{}\n{}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout).trim().to_owned()
    }

    /// [`Lab::run`] off the async thread, for tests that keep clients
    /// going while the lab changes the cluster.
    pub async fn run_async(&self, args: &[&str]) -> Result<String, libtest_mimic::Failed> {
        let lab = self.clone();
        let args: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
        Ok(tokio::task::spawn_blocking(move || {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            lab.run(&args)
        })
        .await?)
    }

    /// Runs a lab command for cleanup: reports a failure instead of
    /// panicking (a guard's `drop` may run while a test already panics).
    pub fn run_in_cleanup(&self, args: &[&str]) {
        match self.command(args).output() {
            Ok(output) if output.status.success() => {}
            Ok(output) => eprintln!(
                "cleanup: lab {args:?} failed ({}):\n{}",
                output.status,
                String::from_utf8_lossy(&output.stderr)
            ),
            Err(e) => eprintln!("cleanup: lab {args:?}: {e}"),
        }
    }

    pub fn leader(&self) -> String {
        self.run(&["leader"])
    }

    /// The stack the lab runs (`LAB_STACK`): `current` (Patroni 4.1,
    /// PostgreSQL 18) or `debian` (Patroni 3.0.2, PostgreSQL 15).
    pub fn stack(&self) -> String {
        self.run(&["env"])
            .lines()
            .find_map(|l| l.strip_prefix("export LAB_STACK="))
            .unwrap_or_default()
            .to_owned()
    }

    /// The fixtures captured from a lab of this stack
    /// (`scripts/capture-fixtures`).
    pub fn fixtures(&self) -> PathBuf {
        let version = if self.stack() == "debian" {
            "3.0"
        } else {
            "4.1"
        };
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures")
            .join(format!("patroni-{version}"))
    }

    /// Superuser SQL on a member over its unix socket.
    pub fn psql(&self, member: &str, sql: &str) -> String {
        self.run(&["psql", member, "-AtX", "-c", sql])
    }

    pub fn pg_port(&self, member: &str) -> u16 {
        5441 + member_index(member) + self.offset
    }

    pub fn rest_port(&self, member: &str) -> u16 {
        8041 + member_index(member) + self.offset
    }

    pub fn etcd_port(&self) -> u16 {
        2379 + self.offset
    }

    pub fn member_of_port(&self, port: u16) -> Option<&'static str> {
        MEMBERS.into_iter().find(|m| self.pg_port(m) == port)
    }

    /// HTTP status of `GET path` on a member's Patroni REST API.
    pub fn rest_status(&self, member: &str, path: &str) -> Option<u16> {
        http_get(self.rest_port(member), path).map(|(status, _)| status)
    }

    /// A rolegate config for a Patroni cluster on this lab, with an rw and
    /// an ro listener and `cluster_extra` lines in the cluster table.
    pub fn rolegate_config(&self, rw: u16, ro: u16, cluster_extra: &str, extra: &str) -> String {
        format!(
            r#"
[clusters.demo]
scope = "demo"
namespace = "/service/"
{cluster_extra}

[[listeners]]
listen = "127.0.0.1:{rw}"
cluster = "demo"
role = "primary"

[[listeners]]
listen = "127.0.0.1:{ro}"
cluster = "demo"
role = "replica"

{extra}
"#
        )
    }

    pub fn etcd_line(&self) -> String {
        format!("etcd = [\"http://127.0.0.1:{}\"]", self.etcd_port())
    }

    pub fn patroni_line(&self) -> String {
        let urls: Vec<_> = MEMBERS
            .iter()
            .map(|m| format!("\"http://127.0.0.1:{}\"", self.rest_port(m)))
            .collect();
        format!("patroni = [{}]", urls.join(", "))
    }
}

/// The members other than `leader`.
pub fn replicas_of(leader: &str) -> Vec<&'static str> {
    MEMBERS.into_iter().filter(|m| *m != leader).collect()
}

fn member_index(member: &str) -> u16 {
    MEMBERS
        .iter()
        .position(|m| *m == member)
        .unwrap_or_else(|| panic!("unknown member {member}")) as u16
}

/// A minimal HTTP/1.0 GET on loopback: status and body.
pub fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    http_request(port, "GET", path, &[], "").map(|(status, _, body)| (status, body))
}

/// A minimal HTTP/1.0 request on loopback with extra header lines
/// (`"Name: value"`) and a body: status, response head, body.
pub fn http_request(
    port: u16,
    method: &str,
    path: &str,
    headers: &[&str],
    body: &str,
) -> Option<(u16, String, String)> {
    http_request_from([127, 0, 0, 1], port, method, path, headers, body)
}

/// As [`http_request`], from the loopback address `source`.
pub fn http_request_from(
    source: [u8; 4],
    port: u16,
    method: &str,
    path: &str,
    headers: &[&str],
    body: &str,
) -> Option<(u16, String, String)> {
    let mut stream = super::wire::connect_from(source, port);
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    let mut request = format!("{method} {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n");
    for header in headers {
        request.push_str(header);
        request.push_str("\r\n");
    }
    if !body.is_empty() {
        request.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    request.push_str("\r\n");
    request.push_str(body);
    stream.write_all(request.as_bytes()).ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let status = response.split_whitespace().nth(1)?.parse().ok()?;
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
    Some((status, head.to_owned(), body.to_owned()))
}
