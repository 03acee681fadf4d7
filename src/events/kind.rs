//! What can happen to a cluster, as rolegate saw it: one variant per kind
//! of event, each with the evidence an operator needs, a one-line summary
//! for the status page and `rolegate status`, and the log line rolegate
//! writes for it.

use serde::Serialize;
use tracing::{info, warn};

/// One kind of topology (or process) event. Serialized flat: `kind` plus
/// the variant's fields.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum EventKind {
    /// A member became the confirmed leader. `previous` is the leader
    /// confirmed before it (across a gap without one), `evidence` the rule
    /// that confirmed it.
    LeaderConfirmed {
        leader: String,
        previous: Option<String>,
        evidence: String,
    },
    /// No member is the confirmed leader any more.
    LeaderLost { previous: String, reason: String },
    /// Patroni's leader key in etcd moved (or was released: `to` empty).
    LeaderKeyChanged {
        from: Option<String>,
        to: Option<String>,
    },
    /// A switchover or failover was requested through Patroni's `failover`
    /// key.
    SwitchoverRequested {
        key: &'static str,
        leader: Option<String>,
        candidate: Option<String>,
        scheduled_at: Option<String>,
    },
    /// A member now takes new read sessions.
    ReadableJoined { member: String },
    /// A member no longer takes new read sessions, and why.
    ReadableLeft { member: String, why: String },
    /// A member's REST check answered differently than the last one:
    /// `primary`, `replica`, `neither` or `unreachable`.
    RestCheckChanged {
        member: String,
        from: String,
        to: String,
        error: Option<String>,
    },
    /// The etcd connection broke; it has the grace period to come back.
    EtcdReconnecting { reason: String, grace_ms: u64 },
    /// etcd did not come back in time: `on_etcd_loss` decides now.
    EtcdLost {
        reason: String,
        on_etcd_loss: &'static str,
    },
    /// etcd answers again after `down_ms`; `within_grace` when it had not
    /// yet counted as lost.
    EtcdRegained { down_ms: u64, within_grace: bool },
    /// rolegate ended sessions (e.g. of a demoted member); counts the
    /// sessions of one member ended for one reason within a few seconds.
    SessionsEnded {
        member: String,
        reason: String,
        count: u64,
    },
    /// New sessions refused after their hold timed out, counted like
    /// [`EventKind::SessionsEnded`].
    HoldsTimedOut {
        role: &'static str,
        reason: String,
        count: u64,
    },
    /// The first session a newly confirmed leader served.
    FirstSessionServed { member: String },
    /// SIGHUP applied a new configuration.
    ConfigReloaded { file: String },
    /// SIGHUP refused a configuration; the one in use stays.
    ConfigRefused { reason: String },
}

impl EventKind {
    /// One line a person reads.
    pub fn summary(&self) -> String {
        let or_none = |m: &Option<String>| m.clone().unwrap_or_else(|| "(none)".to_owned());
        match self {
            Self::LeaderConfirmed {
                leader,
                previous,
                evidence,
            } => match previous {
                Some(previous) if previous != leader => {
                    format!("{leader} confirmed as leader (was {previous}) by {evidence}")
                }
                _ => format!("{leader} confirmed as leader by {evidence}"),
            },
            Self::LeaderLost { previous, reason } => {
                format!("no confirmed leader (was {previous}): {reason}")
            }
            Self::LeaderKeyChanged { from, to } => match to {
                Some(to) => format!("etcd leader key moved from {} to {to}", or_none(from)),
                None => format!("etcd leader key released by {}", or_none(from)),
            },
            Self::SwitchoverRequested {
                key,
                leader,
                candidate,
                scheduled_at,
            } => {
                let mut line = format!(
                    "switchover requested ({key} key): from {} to {}",
                    leader.as_deref().unwrap_or("the leader"),
                    candidate.as_deref().unwrap_or("any healthy replica")
                );
                if let Some(at) = scheduled_at {
                    line.push_str(&format!(", scheduled for {at}"));
                }
                line
            }
            Self::ReadableJoined { member } => format!("{member} takes read sessions"),
            Self::ReadableLeft { member, why } => {
                format!("{member} no longer takes read sessions: {why}")
            }
            Self::RestCheckChanged {
                member,
                from,
                to,
                error,
            } => match error {
                Some(error) => format!("REST check of {member}: {from} -> {to} ({error})"),
                None => format!("REST check of {member}: {from} -> {to}"),
            },
            Self::EtcdReconnecting { reason, grace_ms } => {
                format!("etcd connection lost, reconnecting (grace {grace_ms} ms): {reason}")
            }
            Self::EtcdLost {
                reason,
                on_etcd_loss,
            } => format!("etcd is unreachable, on_etcd_loss = {on_etcd_loss}: {reason}"),
            Self::EtcdRegained {
                down_ms,
                within_grace,
            } => {
                let grace = if *within_grace {
                    " (within the grace period)"
                } else {
                    ""
                };
                format!("etcd is reachable again after {down_ms} ms{grace}")
            }
            Self::SessionsEnded {
                member,
                reason,
                count,
            } => format!("{count} session(s) on {member} ended by rolegate: {reason}"),
            Self::HoldsTimedOut {
                role,
                reason,
                count,
            } => format!("{count} new {role} session(s) refused after their hold: {reason}"),
            Self::FirstSessionServed { member } => {
                format!("first session served by the new leader {member}")
            }
            Self::ConfigReloaded { file } => format!("configuration reloaded from {file}"),
            Self::ConfigRefused { reason } => {
                format!("configuration reload refused: {reason}")
            }
        }
    }

    /// Writes the event's log line (the lines rolegate wrote before it kept
    /// events, with their fields). Counted events are logged per session
    /// where they happen, so they write nothing here.
    pub fn log(&self, cluster: Option<&str>) {
        let cluster = cluster.unwrap_or("");
        match self {
            Self::LeaderConfirmed {
                leader,
                previous,
                evidence,
            } => info!(
                %cluster,
                from = previous.as_deref().unwrap_or("(none)"),
                to = %leader,
                %evidence,
                "confirmed leader changed"
            ),
            Self::LeaderLost { previous, reason } => {
                warn!(%cluster, from = %previous, %reason, "no confirmed leader");
            }
            Self::LeaderKeyChanged { from, to } => info!(
                %cluster,
                from = from.as_deref().unwrap_or("(none)"),
                to = to.as_deref().unwrap_or("(none)"),
                "etcd leader key changed"
            ),
            Self::SwitchoverRequested { .. } => info!(%cluster, "{}", self.summary()),
            Self::ReadableJoined { member } => {
                info!(%cluster, %member, "member takes read sessions");
            }
            Self::ReadableLeft { member, why } => {
                info!(%cluster, %member, %why, "member no longer takes read sessions");
            }
            Self::RestCheckChanged {
                member, from, to, ..
            } => info!(%cluster, %member, %from, %to, "REST check changed"),
            Self::EtcdReconnecting { reason, grace_ms } => info!(
                %cluster,
                grace_ms,
                "etcd connection lost, reconnecting: {reason}"
            ),
            Self::EtcdLost {
                reason,
                on_etcd_loss,
            } => warn!(%cluster, on_etcd_loss, "etcd is unreachable: {reason}"),
            Self::EtcdRegained {
                down_ms,
                within_grace: true,
            } => info!(
                %cluster,
                after_ms = down_ms,
                "etcd watch re-established within the grace period"
            ),
            Self::EtcdRegained { down_ms, .. } => {
                info!(%cluster, down_for_ms = down_ms, "etcd is reachable again");
            }
            Self::FirstSessionServed { member } => {
                info!(%cluster, %member, "first session served by the new leader");
            }
            Self::ConfigReloaded { file } => {
                info!(%file, "SIGHUP: reloaded the configuration");
            }
            Self::ConfigRefused { reason } => {
                warn!("SIGHUP: keeping the configuration in use: {reason}");
            }
            Self::SessionsEnded { .. } | Self::HoldsTimedOut { .. } => {}
        }
    }

    /// Adds one more occurrence to a counted event of the same kind, member
    /// or role, and reason; false when `other` is a different event.
    pub(super) fn absorb(&mut self, other: &EventKind) -> bool {
        match (self, other) {
            (
                Self::SessionsEnded {
                    member,
                    reason,
                    count,
                },
                Self::SessionsEnded {
                    member: m,
                    reason: r,
                    count: n,
                },
            ) if member == m && reason == r => {
                *count += n;
                true
            }
            (
                Self::HoldsTimedOut {
                    role,
                    reason,
                    count,
                },
                Self::HoldsTimedOut {
                    role: o,
                    reason: r,
                    count: n,
                },
            ) if role == o && reason == r => {
                *count += n;
                true
            }
            _ => false,
        }
    }
}
