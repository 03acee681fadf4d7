//! What an operator sees of a cluster at `GET /cluster`: the view plus the
//! evidence behind it (what etcd and each REST check said, and when).
//!
//! Reports are published separately from [`ClusterView`]s: they change on
//! every REST check, and routing must not wake sessions for that.

use std::collections::BTreeMap;
use std::time::SystemTime;

use serde::Serialize;
use tokio::time::Instant;

use super::dcs::DcsState;
use super::fuse::{EtcdStatus, RestState, Rule};
use super::view::ClusterView;

#[derive(Debug, Clone, Serialize)]
pub struct ClusterReport {
    pub cluster: String,
    /// `static` or `patroni`.
    pub mode: &'static str,
    /// The configured leader policy.
    pub leader_policy: Option<&'static str>,
    pub on_etcd_loss: Option<&'static str>,
    /// The rule deciding the leader right now, e.g. `etcd+patroni`, or
    /// `patroni (etcd unreachable)`.
    pub rule: String,
    pub leader: Option<String>,
    pub no_leader_reason: Option<String>,
    /// A switchover requested and not yet done: `{"from", "to"}`.
    pub switchover: Option<BTreeMap<&'static str, Option<String>>>,
    /// Patroni's `sync` key, with `synchronous_mode`: the leader's
    /// synchronous standbys, and in quorum mode how many must confirm.
    pub sync: Option<SyncReport>,
    pub sources: Sources,
    pub members: Vec<MemberReport>,
    /// When the routing view last changed (RFC 3339).
    pub view_changed_at: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct SyncReport {
    pub leader: Option<String>,
    pub standbys: Vec<String>,
    /// Set in quorum mode (`synchronous_mode: quorum`, Patroni 4.0+).
    pub quorum: Option<u64>,
}

impl SyncReport {
    pub fn of(sync: &crate::topology::patroni_data::SyncKey) -> Self {
        Self {
            leader: sync.leader.clone(),
            standbys: sync
                .leader
                .as_deref()
                .map(|l| sync.standbys_of(l).into_iter().map(str::to_owned).collect())
                .unwrap_or_default(),
            quorum: sync.quorum,
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Sources {
    /// `up`, `down`, `connecting`, or `not configured`.
    pub etcd: &'static str,
    pub etcd_down_since: Option<String>,
    pub patroni_rest: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct MemberReport {
    pub name: String,
    pub host: String,
    pub port: u16,
    /// rolegate's verdict: `primary`, `replica` or `unknown`.
    pub role: &'static str,
    pub healthy: bool,
    pub readable: bool,
    /// Why the member takes no new read sessions, when it takes none.
    pub not_readable_because: Option<&'static str>,
    /// A synchronous (or quorum) standby of the leader.
    pub synchronous: bool,
    /// What Patroni published for the member (etcd or `/cluster`).
    pub patroni_state: Option<String>,
    pub patroni_role: Option<String>,
    pub timeline: Option<u64>,
    /// Bytes behind the leader's last published WAL position.
    pub lag_bytes: Option<u64>,
    pub tags: BTreeMap<String, serde_json::Value>,
    pub rest: Option<RestReport>,
    /// When rolegate's verdict on this member last changed (RFC 3339).
    pub changed_at: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct RestReport {
    pub primary: Option<bool>,
    pub replica: Option<bool>,
    pub reachable: bool,
    pub checked_at: Option<String>,
    /// How long the last check took, in milliseconds.
    pub latency_ms: Option<f64>,
    pub last_error: Option<String>,
}

/// Wall-clock time of a monotonic instant, as RFC 3339.
pub fn wall_time(at: Instant) -> String {
    let ago = at.elapsed();
    let time = SystemTime::now()
        .checked_sub(ago)
        .unwrap_or(SystemTime::UNIX_EPOCH);
    humantime::format_rfc3339_millis(time).to_string()
}

pub fn now_rfc3339() -> String {
    humantime::format_rfc3339_millis(SystemTime::now()).to_string()
}

pub fn rule_name(rule: Rule) -> String {
    match rule {
        Rule::Policy(policy) => policy.as_str().to_owned(),
        Rule::Freeze { .. } => "freeze (etcd unreachable)".to_owned(),
        Rule::Refuse => "refuse (etcd unreachable)".to_owned(),
        Rule::Waiting => "waiting for etcd".to_owned(),
    }
}

pub fn etcd_source(status: EtcdStatus) -> (&'static str, Option<String>) {
    match status {
        EtcdStatus::NotConfigured => ("not configured", None),
        EtcdStatus::Connecting => ("connecting", None),
        EtcdStatus::Up => ("up", None),
        EtcdStatus::Reconnecting { since } => ("reconnecting", Some(wall_time(since))),
        EtcdStatus::Down { since } => ("down", Some(wall_time(since))),
    }
}

/// Members as the view decided them, with Patroni's and REST's evidence.
pub fn member_reports(
    view: &ClusterView,
    directory: Option<&DcsState>,
    rest: &std::collections::HashMap<String, RestState>,
    changed_at: &std::collections::HashMap<String, String>,
) -> Vec<MemberReport> {
    let leader_wal = directory.and_then(DcsState::leader_wal_position);
    view.members
        .iter()
        .map(|member| {
            let record = directory.and_then(|d| d.members.get(&*member.name));
            let rest = rest.get(&*member.name).map(|r| RestReport {
                primary: r.primary,
                replica: r.replica,
                reachable: r.reachable,
                checked_at: r.checked_at.map(wall_time),
                latency_ms: r.took.map(|t| (t.as_secs_f64() * 10_000.0).round() / 10.0),
                last_error: r.last_error.clone(),
            });
            MemberReport {
                name: member.name.to_string(),
                host: member.host.to_string(),
                port: member.port,
                role: member.role.as_str(),
                healthy: member.healthy,
                readable: member.readable,
                not_readable_because: member.unreadable_because,
                synchronous: member.synchronous,
                patroni_state: record.and_then(|r| r.state.clone()),
                patroni_role: record.and_then(|r| r.role.clone()),
                timeline: record.and_then(|r| r.timeline),
                lag_bytes: record
                    .and_then(|r| r.xlog_location)
                    .zip(leader_wal)
                    .filter(|_| view.leader().is_none_or(|l| l.name != member.name))
                    .map(|(own, leader)| leader.saturating_sub(own)),
                tags: record.map(|r| r.tags.clone()).unwrap_or_default(),
                rest,
                changed_at: changed_at.get(&*member.name).cloned(),
            }
        })
        .collect()
}
