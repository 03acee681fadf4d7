//! Three stand-alone PostgreSQL servers as one static cluster: a primary
//! and two "replicas" (independent servers: a static cluster trusts its
//! config, so replication is not what is tested with it).

use std::path::PathBuf;

use super::free_port;
use super::harness::TestEnv;
use super::pg::PgServer;
use super::rolegate::Rolegate;

pub struct StaticCluster {
    pub root: PathBuf,
    pub primary: PgServer,
    pub replicas: [PgServer; 2],
}

impl TestEnv for StaticCluster {
    fn scratch_dir(&self) -> Option<PathBuf> {
        Some(self.root.clone())
    }
}

impl StaticCluster {
    /// Starts the three servers in parallel under a fresh `/tmp` directory
    /// named after `suite`.
    pub fn start(suite: &str) -> Self {
        let root = std::env::temp_dir().join(format!("rolegate-{suite}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(&root).expect("create test root");
        let starters: Vec<_> = ["primary", "replica1", "replica2"]
            .into_iter()
            .map(|name| {
                let root = root.clone();
                std::thread::spawn(move || PgServer::start(&root, name))
            })
            .collect();
        let mut servers = starters
            .into_iter()
            .map(|t| t.join().expect("start postgres"));
        let primary = servers.next().expect("primary");
        let replicas = [servers.next().expect("r1"), servers.next().expect("r2")];
        Self {
            root,
            primary,
            replicas,
        }
    }

    /// A config for a static cluster of the three servers with an rw and
    /// an ro listener, plus `extra` appended (e.g. a `[limits]` table).
    pub fn config(&self, rw: u16, ro: u16, extra: &str) -> String {
        format!(
            r#"
[clusters.main]
primary = "{}"
replicas = ["{}", "{}"]

[[listeners]]
listen = "127.0.0.1:{rw}"
cluster = "main"
role = "primary"

[[listeners]]
listen = "127.0.0.1:{ro}"
cluster = "main"
role = "replica"
{extra}
"#,
            self.primary.address(),
            self.replicas[0].address(),
            self.replicas[1].address()
        )
    }

    /// Starts a rolegate with its own two ports (rw, ro).
    pub fn rolegate(&self, name: &str, extra: &str) -> (Rolegate, u16, u16) {
        let (rw, ro) = (free_port(), free_port());
        let rolegate = Rolegate::start(&self.root, name, &self.config(rw, ro, extra));
        (rolegate, rw, ro)
    }
}
