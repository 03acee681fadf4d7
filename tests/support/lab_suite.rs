//! The environment of the test binaries that change the lab cluster
//! (`patroni`, `faults`): the lab, a scratch directory for rolegate
//! processes, and a healthy cluster handed from each test to the next.

use std::path::PathBuf;

use super::free_port;
use super::harness::TestEnv;
use super::lab::Lab;
use super::rolegate::Rolegate;

pub struct LabSuite {
    pub lab: Lab,
    pub root: PathBuf,
}

impl TestEnv for LabSuite {
    fn scratch_dir(&self) -> Option<PathBuf> {
        Some(self.root.clone())
    }

    fn after_test(&self) {
        self.lab.run(&["wait"]);
    }
}

impl LabSuite {
    /// Brings the lab up; `name` labels the scratch directory.
    pub fn start(name: &str) -> Self {
        let root = std::env::temp_dir().join(format!("rolegate-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&root).expect("test root");
        Self {
            lab: Lab::ensure_up(),
            root,
        }
    }

    /// Starts rolegate in front of the lab with the given cluster lines;
    /// returns it with its rw and ro ports.
    pub fn rolegate(&self, name: &str, cluster_extra: &str) -> (Rolegate, u16, u16) {
        self.rolegate_with_limits(name, cluster_extra, "")
    }

    /// As [`LabSuite::rolegate`], with more `[limits]` lines.
    pub fn rolegate_with_limits(
        &self,
        name: &str,
        cluster_extra: &str,
        limits: &str,
    ) -> (Rolegate, u16, u16) {
        let (rw, ro) = (free_port(), free_port());
        let config = self.lab.rolegate_config(
            rw,
            ro,
            cluster_extra,
            &format!("[log]\nformat = \"json\"\n\n[limits]\nhold_timeout = \"30s\"\n{limits}"),
        );
        let rolegate = Rolegate::start(&self.root, name, &config);
        (rolegate, rw, ro)
    }

    /// rolegate following the lab's etcd directly.
    pub fn default_rolegate(&self, name: &str) -> (Rolegate, u16, u16) {
        self.rolegate(name, &self.lab.etcd_line())
    }
}
