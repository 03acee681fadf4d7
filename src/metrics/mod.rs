//! Every metric rolegate exports, in one place.
//!
//! Names carry their unit (`_seconds`, `_bytes`) and counters end in
//! `_total`. Labels are bounded: listener addresses, cluster and member
//! names, roles and fixed outcome words; never client addresses or user
//! names. Gauges that follow a session are RAII guards, so an early return
//! cannot leave a gauge raised. Recording goes through the `metrics`
//! facade; [`install`] sets up the Prometheus recorder that the admin
//! endpoint renders. Without an installed recorder every call is a no-op,
//! which is what unit tests get.
//!
//! `docs/metrics.md` describes each metric for operators.

use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use metrics::{
    counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram, Counter,
    Gauge, Unit,
};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

use crate::config::ListenerRole;
use crate::fast_map::FastMap;

pub mod listener;
pub mod pool;

pub use listener::{ListenerMetrics, MemberMetrics};

pub const BUILD_INFO: &str = "rolegate_build_info";
pub const CLIENT_CONNECTIONS: &str = "rolegate_client_connections";
pub const CLIENT_CONNECTIONS_TOTAL: &str = "rolegate_client_connections_total";
pub const HELD_SESSIONS: &str = "rolegate_held_sessions";
pub const HOLD_WAIT_SECONDS: &str = "rolegate_hold_wait_seconds";
pub const HOLD_TIMEOUTS_TOTAL: &str = "rolegate_hold_timeouts_total";
pub const LOGIN_QUEUE: &str = "rolegate_login_queue";
pub const SESSIONS: &str = "rolegate_sessions";
pub const SESSIONS_ENDED_TOTAL: &str = "rolegate_sessions_ended_total";
pub const HANDSHAKE_SECONDS: &str = "rolegate_handshake_duration_seconds";
pub const BACKEND_CONNECT_SECONDS: &str = "rolegate_backend_connect_duration_seconds";
pub const BACKEND_CONNECT_FAILURES_TOTAL: &str = "rolegate_backend_connect_failures_total";
pub const RELAYED_BYTES_TOTAL: &str = "rolegate_relayed_bytes_total";
pub const CANCEL_REQUESTS_TOTAL: &str = "rolegate_cancel_requests_total";
pub const LEADER_CHANGES_TOTAL: &str = "rolegate_leader_changes_total";
pub const CLUSTER_LEADER: &str = "rolegate_cluster_leader";
pub const MEMBER_HEALTHY: &str = "rolegate_member_healthy";
pub const MEMBER_READABLE: &str = "rolegate_member_readable";
pub const ETCD_UP: &str = "rolegate_etcd_up";
pub const ETCD_RECONNECTS_TOTAL: &str = "rolegate_etcd_reconnects_total";
pub const PATRONI_CHECK_SECONDS: &str = "rolegate_patroni_check_duration_seconds";
pub const PATRONI_CHECK_FAILURES_TOTAL: &str = "rolegate_patroni_check_failures_total";
pub const TLS_HANDSHAKES_TOTAL: &str = "rolegate_tls_handshakes_total";
pub const CONFIG_RELOADS_TOTAL: &str = "rolegate_config_reloads_total";
pub const BACKGROUND_TASK_FAILURES_TOTAL: &str = "rolegate_background_task_failures_total";

/// Histogram buckets for durations, from 1 ms to 60 s.
const SECONDS_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

/// Installs the Prometheus recorder and describes every metric.
pub fn install() -> Result<PrometheusHandle, String> {
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".to_owned()), SECONDS_BUCKETS)
        .map_err(|e| format!("cannot configure histogram buckets: {e}"))?
        .install_recorder()
        .map_err(|e| format!("cannot install the metrics recorder: {e}"))?;
    describe();
    gauge!(BUILD_INFO, "version" => env!("CARGO_PKG_VERSION")).set(1.0);
    Ok(handle)
}

fn describe() {
    pool::describe();
    describe_gauge!(
        BUILD_INFO,
        "Always 1; the version label says which rolegate runs."
    );
    describe_gauge!(
        CLIENT_CONNECTIONS,
        "Client connections open now, by listener (held and handshaking ones included)."
    );
    describe_counter!(
        CLIENT_CONNECTIONS_TOTAL,
        "Client connections accepted, by listener and outcome."
    );
    describe_gauge!(
        HELD_SESSIONS,
        "New sessions waiting for a target to exist, by cluster and role."
    );
    describe_histogram!(
        HOLD_WAIT_SECONDS,
        Unit::Seconds,
        "How long sessions were held before a target existed or the hold timed out."
    );
    describe_counter!(
        HOLD_TIMEOUTS_TOTAL,
        "Sessions refused with 57P03 after hold_timeout, by cluster and role."
    );
    describe_gauge!(
        LOGIN_QUEUE,
        "New sessions waiting for one of a member's login slots (limits.backend_logins), by cluster and member."
    );
    describe_gauge!(
        SESSIONS,
        "Relaying sessions now, by cluster, member and listener role."
    );
    describe_counter!(SESSIONS_ENDED_TOTAL, "Relaying sessions ended, by cluster, role and reason (client, backend, demotion, shutdown).");
    describe_histogram!(
        HANDSHAKE_SECONDS,
        Unit::Seconds,
        "From accept to the first ReadyForQuery, time held excluded, by listener."
    );
    describe_histogram!(
        BACKEND_CONNECT_SECONDS,
        Unit::Seconds,
        "TCP connect time to a member, by cluster and member."
    );
    describe_counter!(
        BACKEND_CONNECT_FAILURES_TOTAL,
        "Failed connects to a member, by cluster, member and reason (refused, timeout, other)."
    );
    describe_counter!(
        RELAYED_BYTES_TOTAL,
        Unit::Bytes,
        "Bytes relayed after authentication, by direction (client_to_server, server_to_client)."
    );
    describe_counter!(
        CANCEL_REQUESTS_TOTAL,
        "Cancel requests, by via (client, peer) and outcome (forwarded, failed, unknown_key, to_peer, unknown_peer, peer_unreachable, rate_limited)."
    );
    describe_counter!(
        LEADER_CHANGES_TOTAL,
        "Times a leader other than the last confirmed one was confirmed, by cluster."
    );
    describe_gauge!(
        CLUSTER_LEADER,
        "1 for the member that is the confirmed leader, 0 for the others, by cluster and member."
    );
    describe_gauge!(
        MEMBER_HEALTHY,
        "1 when the member is running and passing its checks, by cluster and member."
    );
    describe_gauge!(
        MEMBER_READABLE,
        "1 when the member takes new read sessions, by cluster and member."
    );
    describe_gauge!(
        ETCD_UP,
        "1 while the etcd watch of the cluster is established, by cluster."
    );
    describe_counter!(
        ETCD_RECONNECTS_TOTAL,
        "Times the etcd watch was lost and re-established, by cluster."
    );
    describe_histogram!(
        PATRONI_CHECK_SECONDS,
        Unit::Seconds,
        "Duration of one REST check (/primary and /replica), by cluster and member."
    );
    describe_counter!(
        PATRONI_CHECK_FAILURES_TOTAL,
        "REST checks that got no answer, by cluster and member."
    );
    describe_counter!(
        TLS_HANDSHAKES_TOTAL,
        "Client TLS handshakes, by listener and outcome (ok, failed)."
    );
    describe_counter!(
        BACKGROUND_TASK_FAILURES_TOTAL,
        "Background tasks that ended unexpectedly (a panic), by cluster and task (etcd_watch, rest_check); each is restarted or retried."
    );
    describe_counter!(
        CONFIG_RELOADS_TOTAL,
        "Configuration reloads on SIGHUP, by outcome (ok, failed)."
    );
}

/// How a client connection turned out, for `rolegate_client_connections_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnectionOutcome {
    /// Reached a backend and relayed.
    Session,
    Cancel,
    RefusedLimit,
    ProtocolError,
    HandshakeTimeout,
    /// Left during the handshake or authentication.
    ClientGone,
    NoTarget,
    BackendUnreachable,
    /// The server refused authentication (wrong password, no such database).
    AuthRefused,
    TlsError,
    BackendError,
    Shutdown,
    /// No valid PROXY protocol header, or not from a trusted proxy.
    ProxyHeader,
}

impl ConnectionOutcome {
    /// How many outcomes there are (`ProxyHeader` stays the last).
    pub const COUNT: usize = Self::ProxyHeader as usize + 1;

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Session => "session",
            Self::Cancel => "cancel",
            Self::RefusedLimit => "refused_limit",
            Self::ProtocolError => "protocol_error",
            Self::HandshakeTimeout => "handshake_timeout",
            Self::ClientGone => "client_gone",
            Self::NoTarget => "no_target",
            Self::BackendUnreachable => "backend_unreachable",
            Self::AuthRefused => "auth_refused",
            Self::TlsError => "tls_error",
            Self::BackendError => "backend_error",
            Self::Shutdown => "shutdown",
            Self::ProxyHeader => "proxy_header",
        }
    }
}

/// Why a relaying session ended, for `rolegate_sessions_ended_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EndReason {
    Client,
    Backend,
    Demotion,
    Shutdown,
}

impl EndReason {
    /// How many reasons there are (`Shutdown` stays the last).
    pub const COUNT: usize = Self::Shutdown as usize + 1;

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Client => "client",
            Self::Backend => "backend",
            Self::Demotion => "demotion",
            Self::Shutdown => "shutdown",
        }
    }
}

/// A long-lived task that ended unexpectedly; `cluster` is empty for the
/// process's own tasks.
pub fn background_task_failed(cluster: &str, task: &'static str) {
    counter!(BACKGROUND_TASK_FAILURES_TOTAL, "cluster" => cluster.to_owned(), "task" => task)
        .increment(1);
}

pub fn config_reload(ok: bool) {
    counter!(CONFIG_RELOADS_TOTAL, "outcome" => if ok { "ok" } else { "failed" }).increment(1);
}

pub fn cancel_outcome(via: &'static str, outcome: &'static str) {
    counter!(CANCEL_REQUESTS_TOTAL, "via" => via, "outcome" => outcome).increment(1);
}

pub fn hold_wait(cluster: &str, role: ListenerRole, waited: Duration, timed_out: bool) {
    let labels = [
        ("cluster", cluster.to_owned()),
        ("role", role.as_str().to_owned()),
    ];
    histogram!(HOLD_WAIT_SECONDS, &labels).record(waited.as_secs_f64());
    if timed_out {
        counter!(HOLD_TIMEOUTS_TOTAL, &labels).increment(1);
    }
}

pub fn backend_connect_failed(cluster: &str, member: &str, reason: &'static str) {
    counter!(BACKEND_CONNECT_FAILURES_TOTAL, "cluster" => cluster.to_owned(), "member" => member.to_owned(), "reason" => reason)
        .increment(1);
}

/// The two byte counters of relayed traffic.
#[derive(Clone)]
pub struct RelayedBytes {
    pub client_to_server: Counter,
    pub server_to_client: Counter,
}

impl RelayedBytes {
    pub fn new() -> Self {
        Self {
            client_to_server: counter!(RELAYED_BYTES_TOTAL, "direction" => "client_to_server"),
            server_to_client: counter!(RELAYED_BYTES_TOTAL, "direction" => "server_to_client"),
        }
    }
}

impl Default for RelayedBytes {
    fn default() -> Self {
        Self::new()
    }
}

/// A gauge raised while the guard lives.
pub struct GaugeGuard(Gauge);

impl GaugeGuard {
    fn raise(gauge: Gauge) -> Self {
        gauge.increment(1.0);
        Self(gauge)
    }
}

impl Drop for GaugeGuard {
    fn drop(&mut self) {
        self.0.decrement(1.0);
    }
}

/// Counts one held session.
pub fn held_session(cluster: &str, role: ListenerRole) -> GaugeGuard {
    GaugeGuard::raise(
        gauge!(HELD_SESSIONS, "cluster" => cluster.to_owned(), "role" => role.as_str()),
    )
}

/// Counts one session waiting for a login slot of `member`.
pub fn queued_login(cluster: &str, member: &str) -> GaugeGuard {
    GaugeGuard::raise(
        gauge!(LOGIN_QUEUE, "cluster" => cluster.to_owned(), "member" => member.to_owned()),
    )
}

/// (cluster, member, listener role).
type SessionKey = (Arc<str>, Arc<str>, ListenerRole);

/// Sessions per (cluster, member, role), for the gauge and for `/cluster`,
/// and per (cluster, client address) for `/cluster` (never a metric label:
/// client addresses are unbounded).
#[derive(Default)]
pub struct SessionCounts {
    counts: Mutex<Counts>,
}

/// Both tallies, under one lock: a session opens and closes with one
/// lock each.
#[derive(Default)]
struct Counts {
    by_member: FastMap<SessionKey, usize>,
    by_client: FastMap<(Arc<str>, IpAddr), usize>,
}

/// One relaying session, counted while it lives.
pub struct SessionGuard {
    counts: Arc<SessionCounts>,
    key: SessionKey,
    client: IpAddr,
    _gauge: GaugeGuard,
}

/// The client addresses `/cluster` lists per cluster, busiest first.
const CLIENTS_LISTED: usize = 20;

impl SessionCounts {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Counts> {
        // Each operation is one insert or update: a panic cannot leave the
        // map inconsistent, so a poisoned lock is still usable.
        self.counts.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Counts a session of `client` that opened on `member`, and holds
    /// `gauge` (the member's raised session gauge) as long. Called once
    /// per session, never per packet.
    pub fn open(
        self: &Arc<Self>,
        cluster: Arc<str>,
        member: Arc<str>,
        role: ListenerRole,
        client: IpAddr,
        gauge: GaugeGuard,
    ) -> SessionGuard {
        let mut counts = self.lock();
        *counts
            .by_member
            .entry((cluster.clone(), member.clone(), role))
            .or_insert(0) += 1;
        *counts
            .by_client
            .entry((cluster.clone(), client))
            .or_insert(0) += 1;
        drop(counts);
        SessionGuard {
            counts: Arc::clone(self),
            key: (cluster, member, role),
            client,
            _gauge: gauge,
        }
    }

    /// The client addresses with sessions in `cluster`, busiest first, at
    /// most [`CLIENTS_LISTED`].
    pub fn clients_of(&self, cluster: &str) -> Vec<(IpAddr, usize)> {
        let mut out: Vec<_> = self
            .lock()
            .by_client
            .iter()
            .filter(|((c, _), n)| &**c == cluster && **n > 0)
            .map(|((_, ip), n)| (*ip, *n))
            .collect();
        out.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        out.truncate(CLIENTS_LISTED);
        out
    }

    /// Sessions of `cluster` by member and role.
    pub fn of_cluster(&self, cluster: &str) -> Vec<(Arc<str>, ListenerRole, usize)> {
        let mut out: Vec<_> = self
            .lock()
            .by_member
            .iter()
            .filter(|((c, _, _), n)| &**c == cluster && **n > 0)
            .map(|((_, m, r), n)| (m.clone(), *r, *n))
            .collect();
        out.sort_by(|a, b| (&a.0, a.1.as_str()).cmp(&(&b.0, b.1.as_str())));
        out
    }
}

impl Drop for SessionGuard {
    fn drop(&mut self) {
        let mut counts = self.counts.lock();
        release(&mut counts.by_member, &self.key);
        release(&mut counts.by_client, &(self.key.0.clone(), self.client));
    }
}

/// Takes one off `key`'s count, forgetting the key at zero.
fn release<K: std::hash::Hash + Eq>(counts: &mut FastMap<K, usize>, key: &K) {
    if let Some(n) = counts.get_mut(key) {
        *n = n.saturating_sub(1);
        if *n == 0 {
            counts.remove(key);
        }
    }
}

/// Cluster-level gauges and counters, updated by whoever publishes views.
pub struct ClusterMetrics {
    cluster: String,
}

impl ClusterMetrics {
    pub fn new(cluster: &str) -> Self {
        Self {
            cluster: cluster.to_owned(),
        }
    }

    /// A different member than before is the confirmed leader.
    pub fn new_leader_confirmed(&self) {
        counter!(LEADER_CHANGES_TOTAL, "cluster" => self.cluster.clone()).increment(1);
    }

    /// Moves the leader gauge from `old` to `new` (either may be none).
    pub fn leader_gauge(&self, old: Option<&str>, new: Option<&str>) {
        if let Some(old) = old {
            gauge!(CLUSTER_LEADER, "cluster" => self.cluster.clone(), "member" => old.to_owned())
                .set(0.0);
        }
        if let Some(new) = new {
            gauge!(CLUSTER_LEADER, "cluster" => self.cluster.clone(), "member" => new.to_owned())
                .set(1.0);
        }
    }

    pub fn member(&self, member: &str, healthy: bool, readable: bool) {
        let labels = [
            ("cluster", self.cluster.clone()),
            ("member", member.to_owned()),
        ];
        gauge!(MEMBER_HEALTHY, &labels).set(f64::from(u8::from(healthy)));
        gauge!(MEMBER_READABLE, &labels).set(f64::from(u8::from(readable)));
    }

    pub fn member_gone(&self, member: &str) {
        self.member(member, false, false);
        gauge!(CLUSTER_LEADER, "cluster" => self.cluster.clone(), "member" => member.to_owned())
            .set(0.0);
    }

    pub fn etcd_up(&self, up: bool) {
        gauge!(ETCD_UP, "cluster" => self.cluster.clone()).set(f64::from(u8::from(up)));
    }

    pub fn background_task_failed(&self, task: &'static str) {
        background_task_failed(&self.cluster, task);
    }

    pub fn etcd_reconnected(&self) {
        counter!(ETCD_RECONNECTS_TOTAL, "cluster" => self.cluster.clone()).increment(1);
    }

    pub fn patroni_check(&self, member: &str, duration: Duration, answered: bool) {
        let labels = [
            ("cluster", self.cluster.clone()),
            ("member", member.to_owned()),
        ];
        histogram!(PATRONI_CHECK_SECONDS, &labels).record(duration.as_secs_f64());
        if !answered {
            counter!(PATRONI_CHECK_FAILURES_TOTAL, &labels).increment(1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_metric_is_documented() {
        let doc = include_str!("../../docs/metrics.md");
        for name in [
            BUILD_INFO,
            CLIENT_CONNECTIONS,
            CLIENT_CONNECTIONS_TOTAL,
            HELD_SESSIONS,
            LOGIN_QUEUE,
            HOLD_WAIT_SECONDS,
            HOLD_TIMEOUTS_TOTAL,
            SESSIONS,
            SESSIONS_ENDED_TOTAL,
            HANDSHAKE_SECONDS,
            BACKEND_CONNECT_SECONDS,
            BACKEND_CONNECT_FAILURES_TOTAL,
            RELAYED_BYTES_TOTAL,
            CANCEL_REQUESTS_TOTAL,
            LEADER_CHANGES_TOTAL,
            CLUSTER_LEADER,
            MEMBER_HEALTHY,
            MEMBER_READABLE,
            ETCD_UP,
            ETCD_RECONNECTS_TOTAL,
            PATRONI_CHECK_SECONDS,
            PATRONI_CHECK_FAILURES_TOTAL,
        ] {
            assert!(
                doc.contains(&format!("`{name}`")),
                "{name} is missing from docs/metrics.md"
            );
        }
    }

    /// A gauge guard on no recorder's series.
    fn raised() -> GaugeGuard {
        GaugeGuard::raise(Gauge::noop())
    }

    #[test]
    fn session_counts_follow_guards() {
        let counts = SessionCounts::new();
        let here: IpAddr = "192.0.2.7".parse().expect("ip");
        let there: IpAddr = "192.0.2.8".parse().expect("ip");
        let a = counts.open(
            "demo".into(),
            "pg1".into(),
            ListenerRole::Primary,
            here,
            raised(),
        );
        let b = counts.open(
            "demo".into(),
            "pg1".into(),
            ListenerRole::Primary,
            there,
            raised(),
        );
        let c = counts.open(
            "demo".into(),
            "pg2".into(),
            ListenerRole::Replica,
            here,
            raised(),
        );
        assert_eq!(counts.clients_of("demo"), [(here, 2), (there, 1)]);
        assert_eq!(
            counts.of_cluster("demo"),
            [
                (Arc::from("pg1"), ListenerRole::Primary, 2),
                (Arc::from("pg2"), ListenerRole::Replica, 1)
            ]
        );
        drop((a, c));
        assert_eq!(
            counts.of_cluster("demo"),
            [(Arc::from("pg1"), ListenerRole::Primary, 1)]
        );
        drop(b);
        assert!(counts.of_cluster("demo").is_empty());
        assert!(counts.clients_of("demo").is_empty());
        assert!(counts.of_cluster("other").is_empty());
    }
}
