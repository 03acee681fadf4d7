//! The rules that combine etcd's and Patroni REST's answers into one
//! [`ClusterView`].
//!
//! The leader is *confirmed* only when the sources the policy names agree:
//!
//! | policy          | confirmed leader                                              |
//! |-----------------|---------------------------------------------------------------|
//! | `etcd`          | the leader key names it, and its own record says primary and running |
//! | `etcd+patroni`  | the leader key names it, its record says running, its REST `/primary` check passed after the key moved to it (and has not failed since, though it may have stopped answering), its record or that check's body says primary, and no other member answers `/primary` |
//! | `patroni`       | exactly one member answers `/primary`                         |
//!
//! Patroni's `/primary` answers 200 as soon as the member holds the key,
//! before PostgreSQL has left recovery, so its status alone does not show
//! that a promotion finished. The body's role does: Patroni computes it
//! from `pg_is_in_recovery()` for every answer, while the record in etcd
//! says "master" only from Patroni's next HA loop (`loop_wait` later).
//!
//! While etcd is unreachable, `on_etcd_loss` picks the rule: `patroni`
//! (REST alone), `freeze` (the last confirmed leader while its REST check
//! passes, for at most the leader key's `ttl` unless Patroni runs with
//! `failsafe_mode`), or `refuse` (no writes). When the sources disagree,
//! nobody is writable: rolegate refuses writes rather than guess.
//!
//! A replica takes new reads when its record says replica, running and
//! streaming, it is not tagged `noloadbalance`, and (where REST is in use)
//! its `/replica` check passes, lag limit included; under the `etcd` policy
//! the lag is computed from the WAL positions in etcd. A member Patroni is
//! about to promote (it holds the leader key, or a switchover names it)
//! takes no new reads even while its record and REST checks still say
//! replica: a read session opened there would find itself on the primary
//! moments later. Pure functions only.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::SystemTime;

use tokio::time::{Duration, Instant};

use super::dcs::DcsState;
use super::patroni_data::{MemberRecord, RestStatus};
use super::view::{static_exclusion, ClusterView, Handover, Member, MemberRole};
use crate::config::{EtcdLossPolicy, LeaderPolicy};

/// Consecutive failed REST checks before a member counts as unreachable:
/// one lost packet does not change a verdict.
pub const REST_FAILURES_TO_UNREACHABLE: u32 = 2;

/// The result of one REST check of a member.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RestCheck {
    /// When the check started: an answer may reflect any moment after it,
    /// so only the start is safe to compare with when the key moved.
    pub at: Instant,
    /// How long the check took.
    pub took: Duration,
    /// `Some(true)` for 200 from `/primary`, `Some(false)` for another
    /// status, `None` when there was no answer.
    pub primary: Option<bool>,
    pub replica: Option<bool>,
    pub status: Option<RestStatus>,
    pub error: Option<String>,
}

/// What rolegate believes about a member's REST checks.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RestState {
    pub primary: Option<bool>,
    pub replica: Option<bool>,
    pub status: Option<RestStatus>,
    /// When `status` was read.
    pub status_at: Option<Instant>,
    /// When `/primary` last answered 200, unless it has answered
    /// otherwise since.
    pub primary_at: Option<Instant>,
    /// False after [`REST_FAILURES_TO_UNREACHABLE`] checks without answer.
    pub reachable: bool,
    pub failures: u32,
    /// When the last check started, answered or not.
    pub checked_at: Option<Instant>,
    /// When the last check that got an answer started: what `primary`,
    /// `replica` and `reachable` rest on.
    pub answered_at: Option<Instant>,
    pub last_error: Option<String>,
    /// How long the last check took, answered or not.
    pub took: Option<Duration>,
}

impl RestState {
    /// Folds a new check into the state. An answer (any HTTP status) is
    /// Patroni's word and applies at once; a missing answer counts toward
    /// the unreachable threshold and otherwise keeps the last verdict.
    pub fn record(&mut self, check: RestCheck) {
        self.checked_at = Some(check.at);
        self.took = Some(check.took);
        if check.primary.is_some() || check.replica.is_some() {
            match check.primary {
                Some(true) => self.primary_at = Some(check.at),
                Some(false) => self.primary_at = None,
                None => {}
            }
            self.primary = check.primary.or(self.primary);
            self.replica = check.replica.or(self.replica);
            if check.status.is_some() {
                self.status = check.status;
                self.status_at = Some(check.at);
            }
            self.reachable = true;
            self.answered_at = Some(check.at);
            self.failures = 0;
            self.last_error = check.error;
        } else {
            self.failures = self.failures.saturating_add(1);
            self.last_error = check.error;
            if self.failures >= REST_FAILURES_TO_UNREACHABLE {
                self.reachable = false;
                self.primary = None;
                self.replica = None;
            }
        }
    }

    /// What the checks say the member is, in one word: `unchecked`,
    /// `unreachable`, `primary`, `replica` or `neither`. The event
    /// timeline records each change of it.
    pub fn verdict(&self) -> &'static str {
        if self.checked_at.is_none() {
            "unchecked"
        } else if !self.reachable {
            "unreachable"
        } else if self.primary == Some(true) {
            "primary"
        } else if self.replica == Some(true) {
            "replica"
        } else {
            "neither"
        }
    }

    fn claims_primary(&self) -> bool {
        self.primary == Some(true)
    }

    /// The state after one answered check, for tests built on captures.
    #[cfg(test)]
    pub(crate) fn after_check(
        at: Instant,
        primary: bool,
        replica: bool,
        status: Option<RestStatus>,
    ) -> Self {
        let mut state = Self::default();
        state.record(RestCheck {
            at,
            took: Duration::ZERO,
            primary: Some(primary),
            replica: Some(replica),
            status,
            error: None,
        });
        state
    }
}

/// The state of the etcd source.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EtcdStatus {
    NotConfigured,
    /// Not yet read once.
    Connecting,
    Up,
    /// The connection ended moments ago and is being re-established:
    /// routing goes on from the last state read (an etcd member restart or
    /// a reset stream is not an outage) until the grace period ends.
    Reconnecting {
        since: Instant,
    },
    Down {
        since: Instant,
    },
}

/// Everything the fuser decides from.
pub struct FuseInput<'a> {
    pub cluster: &'a Arc<str>,
    pub policy: LeaderPolicy,
    pub on_etcd_loss: EtcdLossPolicy,
    pub max_replica_lag: Option<u64>,
    /// Members and leader key: from etcd, or from Patroni's `/cluster`.
    pub directory: &'a DcsState,
    pub etcd: EtcdStatus,
    pub rest: &'a HashMap<String, RestState>,
    /// When the leader key last changed; REST confirmations must be newer.
    pub leader_since: Option<Instant>,
    /// The leader of the previous view, for `on_etcd_loss = "freeze"`.
    pub previous_leader: Option<&'a str>,
    pub now: Instant,
    /// The wall-clock time, for a switchover scheduled at a given time.
    pub wall_now: SystemTime,
}

/// The rule in force at this moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rule {
    Policy(LeaderPolicy),
    Freeze {
        deadline: Option<Instant>,
    },
    Refuse,
    /// etcd has not been read yet: nothing is known.
    Waiting,
}

impl Rule {
    /// Whether REST checks gate members under this rule.
    fn uses_rest(self) -> bool {
        !matches!(self, Rule::Policy(LeaderPolicy::Etcd))
    }
}

pub fn rule(input: &FuseInput<'_>) -> Rule {
    match input.etcd {
        EtcdStatus::NotConfigured => Rule::Policy(LeaderPolicy::Patroni),
        EtcdStatus::Connecting => Rule::Waiting,
        EtcdStatus::Up | EtcdStatus::Reconnecting { .. } => Rule::Policy(input.policy),
        EtcdStatus::Down { since } => match input.on_etcd_loss {
            EtcdLossPolicy::Patroni => Rule::Policy(LeaderPolicy::Patroni),
            EtcdLossPolicy::Refuse => Rule::Refuse,
            EtcdLossPolicy::Freeze => {
                let failsafe = input.directory.config.failsafe_mode == Some(true);
                let ttl = Duration::from_secs(input.directory.config.ttl_secs());
                Rule::Freeze {
                    deadline: (!failsafe).then_some(since + ttl),
                }
            }
        },
    }
}

/// Builds the view for `input`.
pub fn fuse(input: &FuseInput<'_>) -> ClusterView {
    let rule = rule(input);
    let handover = handover(input.directory, rule, input.wall_now);
    let leader = confirmed_leader(input, rule, handover.as_ref());
    let uses_rest = rule.uses_rest();
    let directory = input.directory;
    let leader_wal = directory.leader_wal_position();
    let etcd_rule = matches!(
        rule,
        Rule::Policy(LeaderPolicy::Etcd | LeaderPolicy::EtcdAndPatroni)
    );
    let promoting = |name: &str| {
        etcd_rule
            && ((directory.leader.as_deref() == Some(name)
                && !directory
                    .members
                    .get(name)
                    .is_some_and(MemberRecord::is_standby_leader))
                || directory
                    .failover
                    .as_ref()
                    .is_some_and(|f| f.is_due_to(name, input.wall_now)))
    };
    let mut members = Vec::with_capacity(directory.members.len());
    for (name, record) in &directory.members {
        let Some((host, port)) = record.postgres_address() else {
            continue;
        };
        let rest = input.rest.get(name);
        let is_leader = leader.as_ref().ok().is_some_and(|l| l == name);
        let replica_role = record.is_replica_role() && record.is_running();
        let role = if is_leader {
            MemberRole::Primary
        } else if replica_role {
            MemberRole::Replica
        } else {
            MemberRole::Unknown
        };
        let rest_reachable = rest.is_none_or(|r| r.reachable || r.checked_at.is_none());
        // A record kept under failsafe is Patroni's last word before it lost
        // etcd: only REST can say the member still runs.
        let healthy = record.is_running()
            && if uses_rest {
                rest_reachable
            } else {
                !record.kept_by_failsafe
            };
        let lag_ok = uses_rest
            || match (input.max_replica_lag, leader_wal, record.xlog_location) {
                (Some(max), Some(leader), Some(own)) => leader.saturating_sub(own) <= max,
                (Some(_), _, None) => false,
                _ => true,
            };
        let rest_replica_ok = !uses_rest
            || rest.is_some_and(|r| {
                r.replica == Some(true)
                    || (record.is_standby_leader()
                        && r.reachable
                        && r.status
                            .as_ref()
                            .is_some_and(RestStatus::is_running_standby_leader))
            });
        let unreadable_because = if role != MemberRole::Replica {
            static_exclusion(role)
        } else {
            replica_exclusion(record, promoting(name), healthy, lag_ok, rest_replica_ok)
        };
        members.push(Member {
            name: name.as_str().into(),
            host: host.into(),
            port,
            role,
            healthy,
            readable: unreadable_because.is_none(),
            unreadable_because,
            synchronous: directory.is_synchronous(name),
        });
    }
    let (leader_name, reason) = match leader {
        Ok(name) => (Some(name), None),
        Err(reason) => (None, Some(reason)),
    };
    let view = ClusterView::new(
        Arc::clone(input.cluster),
        members,
        leader_name.as_deref(),
        true,
    )
    .with_handover(handover);
    match reason {
        Some(reason) => view.with_no_leader_reason(reason),
        None => view,
    }
}

/// Why a member in the replica role takes no reads, if it does not: the
/// first of the reasons that holds, in the order a person would check.
fn replica_exclusion(
    record: &MemberRecord,
    promoting: bool,
    healthy: bool,
    lag_ok: bool,
    rest_replica_ok: bool,
) -> Option<&'static str> {
    if promoting {
        Some("it is being promoted")
    } else if !healthy {
        Some("its REST check fails")
    } else if !record.is_streaming() {
        Some("not streaming from the leader")
    } else if record.tag("noloadbalance") {
        Some("tagged noloadbalance")
    } else if !lag_ok {
        Some("lagging more than max_replica_lag")
    } else if !rest_replica_ok {
        Some("Patroni's /replica check does not pass (lag or replication state)")
    } else {
        None
    }
}

/// A switchover Patroni is carrying out now, away from the leader-key
/// holder. Patroni stops that member's PostgreSQL (ending its sessions)
/// before etcd shows any other sign, so this request is the earliest
/// moment to stop sending it new write sessions; those already there run
/// on until PostgreSQL ends them (see [`crate::router::check_fit`]).
fn handover(directory: &DcsState, rule: Rule, wall_now: SystemTime) -> Option<Handover> {
    if !matches!(
        rule,
        Rule::Policy(LeaderPolicy::Etcd | LeaderPolicy::EtcdAndPatroni)
    ) {
        return None;
    }
    let leader = directory.leader.as_deref()?;
    let intent = directory.failover.as_ref()?;
    intent
        .is_due_switchover_from(leader, wall_now)
        .then(|| Handover {
            from: leader.into(),
            to: intent.member.as_deref().map(Arc::from),
        })
}

/// The confirmed leader's name, or why there is none.
fn confirmed_leader(
    input: &FuseInput<'_>,
    rule: Rule,
    handover: Option<&Handover>,
) -> Result<String, String> {
    let directory = input.directory;
    let rest_of = |name: &str| input.rest.get(name);
    if let Some((standby_leader, _)) = directory
        .members
        .iter()
        .find(|(_, record)| record.is_standby_leader())
    {
        return Err(format!(
            "it is a standby cluster: its leader {standby_leader} replicates from another cluster (standby_cluster), so no member takes writes"
        ));
    }
    match rule {
        Rule::Waiting => Err("etcd has not been read yet".to_owned()),
        Rule::Refuse => Err("etcd is unreachable and on_etcd_loss = \"refuse\"".to_owned()),
        Rule::Policy(LeaderPolicy::Patroni) => match primary_claimants(input).as_slice() {
            [] => Err("no member passes Patroni's /primary check".to_owned()),
            [one] => Ok((*one).to_owned()),
            many => Err(format!(
                "{} members pass Patroni's /primary check ({}); refusing writes",
                many.len(),
                many.join(", ")
            )),
        },
        Rule::Policy(policy) => etcd_leader(input, policy, handover),
        Rule::Freeze { deadline } => {
            let previous = input
                .previous_leader
                .ok_or("etcd is unreachable and no leader was confirmed before")?;
            if deadline.is_some_and(|d| input.now >= d) {
                return Err(format!(
                    "etcd has been unreachable longer than the leader key's ttl; {previous} may have been demoted"
                ));
            }
            if !rest_of(previous).is_some_and(RestState::claims_primary) {
                return Err(format!(
                    "etcd is unreachable and {previous} no longer passes its /primary check"
                ));
            }
            Ok(previous.to_owned())
        }
    }
}

/// The leader under a policy that reads etcd: the leader-key holder, once
/// its record (or, with REST, Patroni's live answer) says it leads and,
/// under `etcd+patroni`, its REST check confirmed it after the key moved.
fn etcd_leader(
    input: &FuseInput<'_>,
    policy: LeaderPolicy,
    handover: Option<&Handover>,
) -> Result<String, String> {
    let directory = input.directory;
    let rest_of = |name: &str| input.rest.get(name);
    if let Some(handover) = handover {
        return Err(format!(
            "a switchover from {} to {} is in progress",
            handover.from,
            handover.to.as_deref().unwrap_or("another member")
        ));
    }
    let Some(holder) = directory.leader.as_deref() else {
        return failsafe_primary(input, policy)
            .ok_or_else(|| "the leader key is empty (an election is in progress)".to_owned());
    };
    // A REST answer counts only if it was read after the key moved.
    let fresh = |read: Instant| input.leader_since.is_none_or(|since| read >= since);
    // With REST in use, Patroni's live answer that PostgreSQL left
    // recovery stands in for the record, which says "master" only
    // about one HA loop later.
    let promoted = policy == LeaderPolicy::EtcdAndPatroni
        && rest_of(holder).is_some_and(|r| {
            r.status_at.is_some_and(fresh)
                && r.status
                    .as_ref()
                    .is_some_and(RestStatus::is_running_primary)
        });
    check_holder(directory, holder, promoted)?;
    if policy == LeaderPolicy::EtcdAndPatroni {
        // Confirmed by a /primary 200 read after the key moved to
        // it. A Patroni that has answered so and then stops
        // answering (starved of CPU, say) keeps it: while the key
        // holds, Patroni promotes nobody else, and if Patroni is
        // gone the key expires within ttl. A 503 does not keep it.
        let confirmed = |r: &RestState| {
            (r.claims_primary() && r.answered_at.is_some_and(fresh))
                || (!r.reachable && r.primary_at.is_some_and(fresh))
        };
        if !rest_of(holder).is_some_and(confirmed) {
            return Err(format!(
                "{holder} holds the leader key but its REST /primary check has not confirmed it yet"
            ));
        }
        let others: Vec<_> = primary_claimants(input)
            .into_iter()
            .filter(|m| *m != holder)
            .collect();
        if !others.is_empty() {
            return Err(format!(
                "sources disagree: etcd names {holder} but {} also passes /primary; refusing writes",
                others.join(", ")
            ));
        }
    }
    Ok(holder.to_owned())
}

/// The members whose REST check says they are the primary.
fn primary_claimants<'i>(input: &'i FuseInput<'_>) -> Vec<&'i str> {
    input
        .directory
        .members
        .keys()
        .filter(|m| input.rest.get(*m).is_some_and(RestState::claims_primary))
        .map(String::as_str)
        .collect()
}

/// The primary Patroni keeps under `failsafe_mode` while the leader key is
/// gone: Patroni (not rolegate) lost etcd, the keys expired, and the
/// primary runs on because every member confirmed it over REST. Patroni
/// says so in each REST answer (`failsafe_mode_is_active`); a primary it
/// could not keep demotes and stops answering `/primary` with 200. Only
/// REST can tell, so only `etcd+patroni` follows it, and only when exactly
/// one member claims the primary in an answer read after the key went.
fn failsafe_primary(input: &FuseInput<'_>, policy: LeaderPolicy) -> Option<String> {
    let directory = input.directory;
    if policy != LeaderPolicy::EtcdAndPatroni || directory.config.failsafe_mode != Some(true) {
        return None;
    }
    let fresh = |read: Instant| input.leader_since.is_none_or(|since| read >= since);
    let mut claimants = input.rest.iter().filter(|(name, r)| {
        directory.members.contains_key(name.as_str())
            && r.claims_primary()
            && r.answered_at.is_some_and(fresh)
            && r.status
                .as_ref()
                .is_some_and(RestStatus::is_failsafe_primary)
    });
    match (claimants.next(), claimants.next()) {
        (Some((name, _)), None) => Some(name.clone()),
        _ => None,
    }
}

/// Checks the leader key's holder: its record must say running, and
/// primary unless `promoted` (REST's live word) stands in for the role.
fn check_holder(directory: &DcsState, holder: &str, promoted: bool) -> Result<(), String> {
    let record = directory
        .members
        .get(holder)
        .ok_or_else(|| format!("the leader key names {holder}, which has no member record"))?;
    if !(record.is_primary_role() || promoted) || !record.is_running() {
        return Err(format!(
            "{holder} holds the leader key but is not a running primary yet (role {}, state {})",
            record.role.as_deref().unwrap_or("unknown"),
            record.state.as_deref().unwrap_or("unknown")
        ));
    }
    Ok(())
}

#[cfg(test)]
mod patroni41_tests;
#[cfg(test)]
mod tests;
