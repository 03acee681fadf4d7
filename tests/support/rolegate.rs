//! A real rolegate process started from the built binary.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use nix::sys::signal::Signal;

use super::process::stop_pid;
use super::wait_until;

pub struct Rolegate {
    child: Child,
    pub config_path: PathBuf,
    pub log_path: PathBuf,
}

impl Rolegate {
    /// Starts rolegate with `config` (TOML text) and waits until every
    /// port in `ports` accepts connections.
    pub fn start(dir: &Path, name: &str, config: &str, ports: &[u16]) -> Self {
        std::fs::create_dir_all(dir).expect("create dir");
        let config_path = dir.join(format!("{name}.toml"));
        let log_path = dir.join(format!("{name}.log"));
        std::fs::write(&config_path, config).expect("write config");
        let log = std::fs::File::create(&log_path).expect("create log");
        let child = Command::new(env!("CARGO_BIN_EXE_rolegate"))
            .arg("--config")
            .arg(&config_path)
            .env("RUST_LOG", "rolegate=debug")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn rolegate");
        let mut rolegate = Self {
            child,
            config_path,
            log_path,
        };
        for &port in ports {
            wait_until(Duration::from_secs(20), "rolegate to listen", || {
                if let Ok(Some(status)) = rolegate.child.try_wait() {
                    panic!("rolegate exited early ({status}):\n{}", rolegate.log());
                }
                std::net::TcpStream::connect(("127.0.0.1", port)).ok()
            });
        }
        rolegate
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
