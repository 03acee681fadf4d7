//! The container cluster of `docker/lab` for the container suite: images
//! built, the compose project started once on its own port offset, and at
//! the end every container, the network and the volumes removed (by the
//! compose project, then each container and the network again by id).

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Mutex;

use libtest_mimic::Failed;

use super::harness::TestEnv;

/// Its own offset: the Patroni labs use 100-300.
pub const OFFSET: u16 = 500;
pub const MEMBERS: [&str; 3] = ["pg1", "pg2", "pg3"];
const SERVICES: [&str; 5] = ["etcd", "pg1", "pg2", "pg3", "rolegate"];
/// rolegate's drain in the suite's copy of docker/proxy.toml (30 s there).
pub const SHUTDOWN_TIMEOUT_SECS: u64 = 4;

pub struct DockerLab {
    scratch: PathBuf,
    config: PathBuf,
    /// Every container and network the suite made, by id.
    made: Mutex<Vec<(&'static str, String)>>,
    /// Links cut by a test (`partition A B`), healed after it.
    cut: Mutex<Vec<(String, String)>>,
}

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

impl DockerLab {
    /// Builds the images from this tree and starts the cluster.
    pub fn start() -> Self {
        let scratch =
            std::env::temp_dir().join(format!("rolegate-containers-{}", std::process::id()));
        std::fs::create_dir_all(&scratch).expect("scratch dir");
        let config = scratch.join("proxy.toml");
        let shipped =
            std::fs::read_to_string(repo().join("docker/proxy.toml")).expect("docker/proxy.toml");
        let ours = shipped.replace(
            "shutdown_timeout = \"30s\"",
            &format!("shutdown_timeout = \"{SHUTDOWN_TIMEOUT_SECS}s\""),
        );
        assert_ne!(
            ours, shipped,
            "docker/proxy.toml no longer sets shutdown_timeout = \"30s\""
        );
        std::fs::write(&config, ours).expect("write the suite's config");
        let lab = DockerLab {
            scratch,
            config,
            made: Mutex::new(Vec::new()),
            cut: Mutex::new(Vec::new()),
        };
        // A leftover project from a killed run would hold the ports.
        lab.run(&["down"]);
        lab.run(&["build"]);
        let up = lab.command(&["up"]).output().expect("run docker/lab up");
        // Recorded before checking, so a failed start is cleaned up too.
        lab.record_ids();
        assert!(
            up.status.success(),
            "docker/lab up failed:\n{}",
            String::from_utf8_lossy(&up.stderr)
        );
        lab
    }

    fn record_ids(&self) {
        let mut made = self.made.lock().expect("ids");
        for service in SERVICES {
            if let Ok(out) = self.command(&["container", service]).output() {
                let id = String::from_utf8_lossy(&out.stdout).trim().to_owned();
                if out.status.success() && !id.is_empty() {
                    made.push(("container", id));
                }
            }
        }
        let network = format!("rolegate-lab-{OFFSET}_default");
        if let Ok(out) = Command::new("docker")
            .args(["network", "inspect", "--format", "{{.Id}}", &network])
            .output()
        {
            let id = String::from_utf8_lossy(&out.stdout).trim().to_owned();
            if out.status.success() && !id.is_empty() {
                made.push(("network", id));
            }
        }
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut command = Command::new(repo().join("docker/lab"));
        command
            .args(args)
            .env("LAB_PORT_OFFSET", OFFSET.to_string())
            .env("LAB_STACK", "current")
            .env("ROLEGATE_CONFIG", &self.config);
        command
    }

    /// Runs a docker/lab command; panics with its output if it fails.
    pub fn run(&self, args: &[&str]) -> String {
        let output = self.command(args).output().expect("run docker/lab");
        expect_success(args, &output);
        String::from_utf8_lossy(&output.stdout).trim().to_owned()
    }

    /// [`DockerLab::run`] off the async thread, for tests that keep
    /// clients going while the cluster changes.
    pub async fn run_async(&self, args: &[&str]) -> Result<String, Failed> {
        let mut command = self.command(args);
        let output = tokio::task::spawn_blocking(move || command.output()).await??;
        if !output.status.success() {
            return Err(failure(args, &output).into());
        }
        Ok(String::from_utf8_lossy(&output.stdout).trim().to_owned())
    }

    /// Cuts the link between `a` and `b` (both ways, packets dropped in
    /// `a`'s network namespace); healed after the test at the latest.
    pub async fn cut(&self, a: &str, b: &str) -> Result<(), Failed> {
        self.cut
            .lock()
            .expect("cuts")
            .push((a.to_owned(), b.to_owned()));
        self.run_async(&["partition", a, b]).await.map(drop)
    }

    pub async fn mend(&self, a: &str, b: &str) -> Result<(), Failed> {
        self.cut
            .lock()
            .expect("cuts")
            .retain(|c| c != &(a.to_owned(), b.to_owned()));
        self.run_async(&["heal", a, b]).await.map(drop)
    }

    pub fn leader(&self) -> String {
        self.run(&["leader"])
    }

    pub fn container(&self, service: &str) -> String {
        self.run(&["container", service])
    }

    /// A service's address on the lab's own network.
    pub fn address(&self, service: &str) -> IpAddr {
        let text = self.run(&["address", service]);
        text.parse()
            .unwrap_or_else(|_| panic!("{service} has no address on the lab network: {text:?}"))
    }

    pub fn rw(&self) -> u16 {
        6432 + OFFSET
    }

    pub fn ro(&self) -> u16 {
        6433 + OFFSET
    }

    pub fn admin(&self) -> u16 {
        9432 + OFFSET
    }

    pub fn config(&self) -> &Path {
        &self.config
    }
}

fn failure(args: &[&str], output: &Output) -> String {
    format!(
        "docker/lab {args:?} failed ({}):\n{}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

fn expect_success(args: &[&str], output: &Output) {
    assert!(output.status.success(), "{}", failure(args, output));
}

impl TestEnv for DockerLab {
    fn scratch_dir(&self) -> Option<PathBuf> {
        Some(self.scratch.clone())
    }

    /// Heals what the test cut and waits for a healthy cluster, so the next
    /// test starts from one.
    fn after_test(&self) {
        let cut: Vec<_> = std::mem::take(&mut *self.cut.lock().expect("cuts"));
        for (a, b) in cut {
            report(self.command(&["heal", &a, &b]).output(), "heal");
        }
        report(self.command(&["wait"]).output(), "wait");
    }
}

fn report(result: std::io::Result<Output>, what: &str) {
    match result {
        Ok(output) if output.status.success() => {}
        Ok(output) => eprintln!(
            "cleanup: docker/lab {what}: {}",
            String::from_utf8_lossy(&output.stderr)
        ),
        Err(e) => eprintln!("cleanup: docker/lab {what}: {e}"),
    }
}

impl Drop for DockerLab {
    fn drop(&mut self) {
        report(self.command(&["down"]).output(), "down");
        // Whatever compose left: each container and the network by id.
        for (kind, id) in self.made.lock().expect("ids").iter() {
            let args: &[&str] = match *kind {
                "container" => &["rm", "--force", "--volumes"],
                _ => &["network", "rm"],
            };
            let _ = Command::new("docker")
                .args(args)
                .arg(id)
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .status();
        }
    }
}
