//! One listener's metric handles, looked up once rather than per
//! connection.
//!
//! `counter!` and its kin find their series in the recorder's registry on
//! every call: they build the key, allocate the label values and hash
//! them. rolegate recorded seven such series per connection, and under
//! callgrind (`pgbench -C`, a new connection per transaction) those
//! lookups were about a sixth of its instructions. A listener's labels are
//! fixed, and so are a member's, so each handle is looked up the first
//! time it is used and kept: a series still appears only once something
//! happened to it, as before.

use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use metrics::{counter, gauge, histogram, Counter, Gauge, Histogram};

use super::{
    ConnectionOutcome, EndReason, GaugeGuard, BACKEND_CONNECT_SECONDS, CLIENT_CONNECTIONS,
    CLIENT_CONNECTIONS_TOTAL, HANDSHAKE_SECONDS, SESSIONS, SESSIONS_ENDED_TOTAL,
    TLS_HANDSHAKES_TOTAL,
};
use crate::config::ListenerRole;
use crate::fast_map::FastMap;

/// The handles of one listener (its address, cluster and role).
pub struct ListenerMetrics {
    label: String,
    cluster: Arc<str>,
    role: ListenerRole,
    open: OnceLock<Gauge>,
    outcomes: [OnceLock<Counter>; ConnectionOutcome::COUNT],
    tls: [OnceLock<Counter>; 2],
    handshake: OnceLock<Histogram>,
    ended: [OnceLock<Counter>; EndReason::COUNT],
    members: Mutex<FastMap<Arc<str>, Arc<MemberMetrics>>>,
}

/// The handles of one member as this listener's sessions use it.
pub struct MemberMetrics {
    sessions: Gauge,
    connect: Histogram,
}

impl ListenerMetrics {
    /// `label` is the listener's address as its metrics show it.
    pub fn new(label: String, cluster: Arc<str>, role: ListenerRole) -> Self {
        Self {
            label,
            cluster,
            role,
            open: OnceLock::new(),
            outcomes: [const { OnceLock::new() }; ConnectionOutcome::COUNT],
            tls: [const { OnceLock::new() }; 2],
            handshake: OnceLock::new(),
            ended: [const { OnceLock::new() }; EndReason::COUNT],
            members: Mutex::new(FastMap::default()),
        }
    }

    /// Counts one open client connection while the guard lives.
    pub fn client_connection(&self) -> GaugeGuard {
        let gauge = self
            .open
            .get_or_init(|| gauge!(CLIENT_CONNECTIONS, "listener" => self.label.clone()));
        GaugeGuard::raise(gauge.clone())
    }

    /// Counts how a connection ended up.
    pub fn connection_outcome(&self, outcome: ConnectionOutcome) {
        self.outcomes[outcome as usize]
            .get_or_init(|| {
                counter!(CLIENT_CONNECTIONS_TOTAL, "listener" => self.label.clone(), "outcome" => outcome.as_str())
            })
            .increment(1);
    }

    /// Counts a TLS handshake with a client.
    pub fn tls_handshake(&self, ok: bool) {
        self.tls[usize::from(ok)]
            .get_or_init(|| {
                let outcome = if ok { "ok" } else { "failed" };
                counter!(TLS_HANDSHAKES_TOTAL, "listener" => self.label.clone(), "outcome" => outcome)
            })
            .increment(1);
    }

    /// Records how long a session took from accept to relaying.
    pub fn handshake_duration(&self, duration: Duration) {
        self.handshake
            .get_or_init(|| histogram!(HANDSHAKE_SECONDS, "listener" => self.label.clone()))
            .record(duration.as_secs_f64());
    }

    /// Counts a relaying session that ended.
    pub fn session_ended(&self, reason: EndReason) {
        self.ended[reason as usize]
            .get_or_init(|| {
                counter!(SESSIONS_ENDED_TOTAL, "cluster" => self.cluster.to_string(), "role" => self.role.as_str(), "reason" => reason.as_str())
            })
            .increment(1);
    }

    /// The handles of `member` (the first call per member looks them up).
    pub fn member(&self, member: &Arc<str>) -> Arc<MemberMetrics> {
        let mut members = self.members.lock().unwrap_or_else(|p| p.into_inner());
        let entry = members.entry(Arc::clone(member)).or_insert_with(|| {
            Arc::new(MemberMetrics {
                sessions: gauge!(SESSIONS, "cluster" => self.cluster.to_string(), "member" => member.to_string(), "role" => self.role.as_str()),
                connect: histogram!(BACKEND_CONNECT_SECONDS, "cluster" => self.cluster.to_string(), "member" => member.to_string()),
            })
        });
        Arc::clone(entry)
    }
}

impl MemberMetrics {
    /// Counts one relaying session on the member while the guard lives.
    pub fn session(&self) -> GaugeGuard {
        GaugeGuard::raise(self.sessions.clone())
    }

    /// Records how long a connection to the member took (or took to fail).
    pub fn connected(&self, duration: Duration) {
        self.connect.record(duration.as_secs_f64());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use metrics_exporter_prometheus::PrometheusBuilder;

    /// The kept handles feed the same series the macros name, counted
    /// across calls, in a recorder of the test's own.
    #[test]
    fn kept_handles_count_into_the_named_series() {
        let recorder = PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        metrics::with_local_recorder(&recorder, || {
            let listener = ListenerMetrics::new(
                "127.0.0.1:6432".into(),
                "demo".into(),
                ListenerRole::Primary,
            );
            let open = listener.client_connection();
            listener.connection_outcome(ConnectionOutcome::Session);
            listener.connection_outcome(ConnectionOutcome::Session);
            listener.connection_outcome(ConnectionOutcome::ProxyHeader);
            listener.session_ended(EndReason::Shutdown);
            let pg1: Arc<str> = "pg1".into();
            let first = listener.member(&pg1).session();
            let second = listener.member(&pg1).session();
            drop(first);
            listener.member(&pg1).connected(Duration::from_millis(2));
            let text = handle.render();
            for line in [
                r#"rolegate_client_connections{listener="127.0.0.1:6432"} 1"#,
                r#"rolegate_client_connections_total{listener="127.0.0.1:6432",outcome="session"} 2"#,
                r#"rolegate_client_connections_total{listener="127.0.0.1:6432",outcome="proxy_header"} 1"#,
                r#"rolegate_sessions_ended_total{cluster="demo",role="primary",reason="shutdown"} 1"#,
                r#"rolegate_sessions{cluster="demo",member="pg1",role="primary"} 1"#,
                r#"rolegate_backend_connect_duration_seconds_count{cluster="demo",member="pg1"} 1"#,
            ] {
                assert!(text.contains(line), "{line} is not in:\n{text}");
            }
            assert!(
                !text.contains("tls_handshakes"),
                "a series appears only once used:\n{text}"
            );
            drop((open, second));
        });
    }
}
