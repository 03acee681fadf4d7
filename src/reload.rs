//! SIGHUP: re-read `proxy.toml` and apply everything that can change while
//! running (see [`crate::running`] for how): `[limits]`, clusters (added,
//! removed, their settings, where their members come from), listeners
//! (added, removed, their role, cluster, fallback and TLS), `[tls]` (the
//! files are re-read even when their paths are unchanged; TLS may be
//! turned on or off), backend TLS, `[admin]` (its address too), and
//! `[log]`. New sessions get the new settings; open sessions keep theirs,
//! except those of a removed listener, which end after `shutdown_timeout`.
//!
//! Refused whole, with the key named, when the new file does not parse or
//! validate, when a new socket cannot be bound, or when it changes what
//! only a restart can change: `[runtime] worker_threads`, the number of
//! event loops, and `[fleet]` (an instance's id and peer listener live as
//! long as its process; a restart hands the client sockets over anyway).
//! A refused reload changes nothing: the configuration in use stays in
//! force. Either outcome is counted and is an event.

use crate::config::Config;
use crate::events::EventKind;
use crate::handover::Inherited;
use crate::metrics;
use crate::running::Running;
use crate::tls::TlsFiles;

impl Running {
    /// Re-reads the file and applies it, or records why not.
    pub fn reload(&mut self) {
        let events = std::sync::Arc::clone(&self.shared.events);
        match self.try_reload() {
            Ok(()) => {
                metrics::config_reload(true);
                let file = self.path.display().to_string();
                events.record(None, EventKind::ConfigReloaded { file });
            }
            Err(reason) => {
                metrics::config_reload(false);
                events.record(None, EventKind::ConfigRefused { reason });
            }
        }
    }

    fn try_reload(&mut self) -> Result<(), String> {
        let file = self.path.display().to_string();
        let new = Config::load(&self.path).map_err(|e| e.to_string())?;
        let tls = TlsFiles::load(&new, &self.path).map_err(|e| e.to_string())?;
        if let Some(key) = restart_needed(&self.config, &new) {
            return Err(format!(
                "{file}: {key} changed, which needs a restart; nothing was applied"
            ));
        }
        self.apply(&new, tls, &mut Inherited::default())
            .map_err(|e| format!("{file}: {e}; nothing was applied"))
    }
}

/// The first key whose change needs a restart, if any.
pub fn restart_needed(old: &Config, new: &Config) -> Option<String> {
    if old.runtime != new.runtime {
        return Some("runtime.worker_threads".to_owned());
    }
    (old.fleet != new.fleet).then(|| "fleet".to_owned())
}

#[cfg(test)]
mod tests {
    use std::path::Path;

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
    fn limits_routing_knobs_listeners_and_clusters_reload() {
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
    fn listeners_clusters_admin_and_log_reload_without_a_restart() {
        let old = parse(BASE);
        let cases = [
            BASE.replace("6432", "6440"),
            BASE.replace("role = \"primary\"", "role = \"replica\""),
            BASE.replace("2379", "2380"),
            format!("[admin]\nlisten = \"127.0.0.1:9999\"\n{BASE}"),
            format!("[log]\nformat = \"json\"\n{BASE}"),
            BASE.replace(
                "health_interval = \"1s\"",
                "health_interval = \"1s\"\nscope = \"other\"",
            ),
        ];
        for text in cases {
            assert_eq!(restart_needed(&old, &parse(&text)), None, "{text}");
        }
    }

    #[test]
    fn the_number_of_event_loops_needs_a_restart() {
        let old = parse(BASE);
        let new = parse(&format!("[runtime]\nworker_threads = 3\n{BASE}"));
        assert_eq!(
            restart_needed(&old, &new).as_deref(),
            Some("runtime.worker_threads")
        );
    }
}
