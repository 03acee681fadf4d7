//! SIGHUP: re-read `proxy.toml` and apply what can change while running.
//!
//! Applied to new sessions without touching existing ones: `[limits]`, each
//! Patroni cluster's `leader_policy`, `on_etcd_loss`, `max_replica_lag`,
//! `health_interval` and `health_timeout`, and `[tls]` (the certificate and
//! key files are re-read even when their paths are unchanged).
//!
//! Refused whole, with the key named, when the new file does not parse or
//! validate, or when it changes something only a restart can change:
//! listeners, the admin address, logging, where a cluster's members come
//! from, backend TLS, or whether TLS is configured at all. A refused reload
//! changes nothing: the configuration in use stays in force.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::config::{ClusterConfig, Config};
use crate::events::{EventKind, EventLog};
use crate::metrics;
use crate::server::Shared;
use crate::tls::ServerTls;
use crate::topology::Topology;

pub struct Reloader {
    path: PathBuf,
    current: Config,
    shared: Arc<Shared>,
    server_tls: Option<Arc<ServerTls>>,
    events: Arc<EventLog>,
}

impl Reloader {
    pub fn new(
        path: PathBuf,
        current: Config,
        shared: Arc<Shared>,
        server_tls: Option<Arc<ServerTls>>,
    ) -> Self {
        let events = Arc::clone(&shared.events);
        Self {
            path,
            current,
            shared,
            server_tls,
            events,
        }
    }

    /// Re-reads the file and applies it, or logs why not.
    pub fn reload(&mut self, topology: &Topology) {
        match self.try_reload(topology) {
            Ok(()) => {
                metrics::config_reload(true);
                let file = self.path.display().to_string();
                self.events.record(None, EventKind::ConfigReloaded { file });
            }
            Err(reason) => {
                metrics::config_reload(false);
                self.events
                    .record(None, EventKind::ConfigRefused { reason });
            }
        }
    }

    fn try_reload(&mut self, topology: &Topology) -> Result<(), String> {
        let new = Config::load(&self.path).map_err(|e| e.to_string())?;
        if let Some(key) = restart_needed(&self.current, &new) {
            return Err(format!(
                "{}: {key} changed, which needs a restart; nothing was applied",
                self.path.display()
            ));
        }
        if let Some(server_tls) = &self.server_tls {
            server_tls
                .replace(new.tls.clone())
                .map_err(|e| format!("{}: {e}", self.path.display()))?;
        }
        self.shared.set_limits(new.limits.clone());
        topology.apply(&new);
        self.current = new;
        Ok(())
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// The first key whose change needs a restart, if any.
pub fn restart_needed(old: &Config, new: &Config) -> Option<String> {
    if old.admin.listen != new.admin.listen {
        return Some("admin.listen".to_owned());
    }
    if old.admin != new.admin {
        return Some("admin".to_owned());
    }
    if old.log != new.log {
        return Some("log".to_owned());
    }
    if old.runtime != new.runtime {
        return Some("runtime".to_owned());
    }
    if old.listeners.len() != new.listeners.len() {
        return Some("listeners".to_owned());
    }
    for (i, (a, b)) in old.listeners.iter().zip(&new.listeners).enumerate() {
        if a != b || old.listener_tls(i) != new.listener_tls(i) {
            return Some(format!("listeners[{i}]"));
        }
    }
    if old.tls.cert.is_some() != new.tls.cert.is_some() {
        return Some("tls.cert".to_owned());
    }
    if old.clusters.keys().ne(new.clusters.keys()) {
        return Some("clusters".to_owned());
    }
    for (name, a) in &old.clusters {
        let b = &new.clusters[name];
        if let Some(field) = membership_change(a, b) {
            return Some(format!("clusters.{name}.{field}"));
        }
    }
    None
}

/// The first changed field of a cluster that only a restart applies.
fn membership_change(a: &ClusterConfig, b: &ClusterConfig) -> Option<&'static str> {
    macro_rules! fields {
        ($($field:ident),*) => {
            $(if a.$field != b.$field { return Some(stringify!($field)); })*
        };
    }
    fields!(
        primary,
        replicas,
        scope,
        namespace,
        etcd,
        etcd_user,
        etcd_password,
        etcd_ca,
        etcd_cert,
        etcd_key,
        patroni,
        backend_tls,
        backend_ca,
        backend_cert,
        backend_key
    );
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = r#"
        [clusters.demo]
        etcd = ["http://127.0.0.1:2379"]
        health_interval = "1s"

        [[listeners]]
        listen = "127.0.0.1:6432"
        cluster = "demo"
        role = "primary"

        [limits]
        hold_timeout = "30s"
    "#;

    fn parse(text: &str) -> Config {
        Config::parse(text, Path::new("proxy.toml")).expect("valid")
    }

    #[test]
    fn limits_and_routing_knobs_reload() {
        let old = parse(BASE);
        let new = parse(
            &BASE
                .replace(
                    "hold_timeout = \"30s\"",
                    "hold_timeout = \"5s\"\nmax_client_connections = 7",
                )
                .replace(
                    "health_interval = \"1s\"",
                    "health_interval = \"2s\"\nleader_policy = \"etcd\"\nmax_replica_lag = \"1MB\"",
                ),
        );
        assert_eq!(restart_needed(&old, &new), None);
    }

    #[test]
    fn structural_changes_need_a_restart() {
        let old = parse(BASE);
        let cases = [
            (BASE.replace("6432", "6440"), "listeners[0]"),
            (
                BASE.replace("role = \"primary\"", "role = \"replica\""),
                "listeners[0]",
            ),
            (BASE.replace("2379", "2380"), "clusters.demo.etcd"),
            (
                format!("[admin]\nlisten = \"127.0.0.1:9999\"\n{BASE}"),
                "admin.listen",
            ),
            (
                BASE.replace(
                    "health_interval = \"1s\"",
                    "health_interval = \"1s\"\nscope = \"other\"",
                ),
                "clusters.demo.scope",
            ),
        ];
        for (text, key) in cases {
            assert_eq!(
                restart_needed(&old, &parse(&text)).as_deref(),
                Some(key),
                "{text}"
            );
        }
    }
}
