//! A static cluster with an `auth_file` of its roles' own secrets, and
//! rolegates with one pooled listener on its primary: what the pooling
//! suites start from.

use std::path::PathBuf;

use super::free_port;
use super::harness::TestEnv;
use super::rolegate::Rolegate;
use super::static_cluster::StaticCluster;

pub struct PooledCluster {
    pub cluster: StaticCluster,
    /// app's and md5user's secrets, as the primary stores them.
    pub userlist: PathBuf,
}

impl TestEnv for PooledCluster {
    fn scratch_dir(&self) -> Option<PathBuf> {
        self.cluster.scratch_dir()
    }
}

impl PooledCluster {
    pub fn start(name: &str) -> Self {
        let cluster = StaticCluster::start(name);
        let secret = |role: &str| {
            cluster.primary.psql(&format!(
                "select rolpassword from pg_authid where rolname = '{role}'"
            ))
        };
        let userlist = cluster.root.join("userlist.txt");
        let text = format!(
            "; the primary's own secrets\n\"app\" \"{}\"\n\"md5user\" \"{}\"\n",
            secret("app"),
            secret("md5user")
        );
        std::fs::write(&userlist, text).expect("write userlist");
        Self { cluster, userlist }
    }

    /// A rolegate with one listener on the primary pooling in `mode`;
    /// `extra` adds keys to the listener. Returns it and the listener's
    /// port.
    pub fn rolegate(&self, name: &str, mode: &str, extra: &str) -> (Rolegate, u16) {
        let port = free_port();
        let config = format!(
            "[clusters.main]\nprimary = \"{}\"\n\n[[listeners]]\nlisten = \"127.0.0.1:{port}\"\n\
             cluster = \"main\"\nrole = \"primary\"\npool_mode = \"{mode}\"\nauth_file = \"{}\"\n{extra}\n",
            self.cluster.primary.address(),
            self.userlist.display()
        );
        (Rolegate::start(&self.cluster.root, name, &config), port)
    }
}
