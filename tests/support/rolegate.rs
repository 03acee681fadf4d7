//! A real rolegate process started from the built binary.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use nix::sys::signal::Signal;

use super::process::stop_pid;
use super::wait_until;

pub struct Rolegate {
    child: Child,
    /// The admin endpoint's port.
    pub admin_port: u16,
    pub config_path: PathBuf,
    pub log_path: PathBuf,
}

impl Rolegate {
    /// Starts rolegate with `config` (TOML text) and waits until it says it
    /// is ready (see [`Rolegate::wait_ready`]). Unless `config` has an
    /// `[admin]` table, the admin endpoint gets a free port of its own.
    pub fn start(dir: &Path, name: &str, config: &str) -> Self {
        std::fs::create_dir_all(dir).expect("create dir");
        let mut admin_port = 0;
        let config = if config.contains("[admin]") {
            config.to_owned()
        } else {
            admin_port = super::free_port();
            format!("[admin]\nlisten = \"127.0.0.1:{admin_port}\"\n\n{config}")
        };
        let config_path = dir.join(format!("{name}.toml"));
        std::fs::write(&config_path, &config).expect("write config");
        let mut rolegate = Self::spawn(&config_path, &dir.join(format!("{name}.log")));
        rolegate.admin_port = admin_port;
        rolegate.wait_ready();
        rolegate
    }

    /// Starts rolegate on an existing config file, logging to `log_path`,
    /// without waiting for it: a second process of one configuration, or
    /// one expected to fail. `admin_port` is left 0.
    pub fn spawn(config_path: &Path, log_path: &Path) -> Self {
        let log = std::fs::File::create(log_path).expect("create log");
        let child = Command::new(env!("CARGO_BIN_EXE_rolegate"))
            .arg("--config")
            .arg(config_path)
            .env("RUST_LOG", "rolegate=debug")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn rolegate");
        Self {
            child,
            admin_port: 0,
            config_path: config_path.to_owned(),
            log_path: log_path.to_owned(),
        }
    }

    /// Waits until the process says it is ready (every listener bound).
    /// Readiness is read from its log, not probed with connections, which
    /// would take client slots.
    pub fn wait_ready(&mut self) {
        wait_until(Duration::from_secs(20), "rolegate to be ready", || {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("rolegate exited early ({status}):\n{}", self.log());
            }
            self.log().contains("rolegate is ready").then_some(())
        });
    }

    /// The `[admin]` table of the configuration the harness wrote (the
    /// port the test reads), for a test that rewrites the rest.
    pub fn admin_table(&self) -> std::io::Result<String> {
        Ok(std::fs::read_to_string(&self.config_path)?
            .lines()
            .take_while(|l| !l.starts_with("[clusters"))
            .collect::<Vec<_>>()
            .join("\n"))
    }

    /// `GET path` on the admin endpoint: status and body.
    pub fn admin_get(&self, path: &str) -> Option<(u16, String)> {
        super::lab::http_get(self.admin_port, path)
    }

    /// The value of the metric series `name{labels}` (labels as written in
    /// the exposition, e.g. `cluster="demo",member="pg1"`), or 0 if absent.
    pub fn metric(&self, name: &str, labels: &str) -> f64 {
        let (_, body) = self.admin_get("/metrics").unwrap_or_default();
        metric_value(&body, name, labels).unwrap_or(0.0)
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    pub fn signal(&self, signal: Signal) {
        super::process::signal(self.pid(), signal);
    }

    /// Waits up to `limit` for the process to exit and returns its status.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let deadline = std::time::Instant::now() + limit;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            if std::time::Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(25));
        }
    }
}

impl Drop for Rolegate {
    fn drop(&mut self) {
        stop_pid(self.pid(), Signal::SIGKILL, Duration::from_secs(5));
        let _ = self.child.wait();
    }
}

/// Finds `name{...}` in a Prometheus exposition whose labels include every
/// `key="value"` pair of `labels` (comma-separated), and returns its value.
pub fn metric_value(exposition: &str, name: &str, labels: &str) -> Option<f64> {
    let wanted: Vec<&str> = labels.split(',').filter(|l| !l.is_empty()).collect();
    exposition.lines().find_map(|line| {
        if line.starts_with('#') {
            return None;
        }
        let (series, value) = line.rsplit_once(' ')?;
        let (series_name, series_labels) = match series.split_once('{') {
            Some((n, rest)) => (n, rest.trim_end_matches('}')),
            None => (series, ""),
        };
        if series_name != name {
            return None;
        }
        let have: Vec<&str> = series_labels.split(',').collect();
        wanted
            .iter()
            .all(|w| have.contains(w))
            .then(|| value.parse().ok())?
    })
}
