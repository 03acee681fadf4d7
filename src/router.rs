//! Target selection: which member a new session goes to, and whether an
//! existing session's member still fits its listener's role.
//!
//! | listener role    | target                                              |
//! |------------------|-----------------------------------------------------|
//! | `primary`        | the confirmed leader only                           |
//! | `replica`        | readable replicas round-robin; none → hold, or the primary with `replica_fallback = "primary"` |
//! | `prefer-replica` | readable replicas round-robin, else the primary      |
//! | `sync-replica`   | readable synchronous (or quorum) standbys round-robin; none → hold, or the primary with `replica_fallback = "primary"` |
//! | `any`            | the leader and readable replicas round-robin        |
//!
//! When no target exists the router *holds* the new session: it waits on
//! the cluster's view channel until a view offers a target or
//! `hold_timeout` passes. The rules are pure functions of a view; only
//! [`Router::route`] waits.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;

use crate::config::{ListenerRole, ReplicaFallback};
use crate::metrics;
use crate::protocol::{ProtocolError, SqlState};
use crate::topology::{ClusterView, Member};

/// Routes the new sessions of one listener.
pub struct Router {
    role: ListenerRole,
    fallback: ReplicaFallback,
    views: watch::Receiver<Arc<ClusterView>>,
    next: AtomicUsize,
    /// Sessions waiting for a target now.
    held: AtomicUsize,
}

/// One held session: counted in the router and the metric while it lives.
struct Held<'a> {
    count: &'a AtomicUsize,
    _gauge: metrics::GaugeGuard,
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        self.count.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The outcome of routing: the view it was made from and the members to
/// try, best first (later ones are for when a connect fails).
#[derive(Debug)]
pub struct Route {
    pub view: Arc<ClusterView>,
    pub candidates: Vec<Member>,
}

impl Router {
    pub fn new(
        role: ListenerRole,
        fallback: ReplicaFallback,
        views: watch::Receiver<Arc<ClusterView>>,
    ) -> Self {
        Self {
            role,
            fallback,
            views,
            next: AtomicUsize::new(0),
            held: AtomicUsize::new(0),
        }
    }

    pub fn role(&self) -> ListenerRole {
        self.role
    }

    pub fn fallback(&self) -> ReplicaFallback {
        self.fallback
    }

    /// Sessions this router holds now, waiting for a target.
    pub fn held(&self) -> usize {
        self.held.load(Ordering::Relaxed)
    }

    /// Where a new session would go now (best first), without taking a
    /// turn of the round-robin.
    pub fn targets_now(&self) -> Vec<Member> {
        let view = self.view();
        let scratch = AtomicUsize::new(0);
        candidates(self.role, self.fallback, &view, &scratch)
    }

    /// The current view of this listener's cluster.
    pub fn view(&self) -> Arc<ClusterView> {
        self.views.borrow().clone()
    }

    /// A receiver that sessions watch to learn of view changes.
    pub fn subscribe(&self) -> watch::Receiver<Arc<ClusterView>> {
        self.views.clone()
    }

    /// Finds targets for a new session, holding it for up to `hold` while
    /// the view offers none.
    pub async fn route(&self, hold: Duration) -> Result<Route, NoTarget> {
        let started = Instant::now();
        let mut views = self.views.clone();
        // Raised while this session waits for a target.
        let mut held: Option<Held<'_>> = None;
        loop {
            let view = views.borrow_and_update().clone();
            let candidates = candidates(self.role, self.fallback, &view, &self.next);
            if !candidates.is_empty() {
                if held.is_some() {
                    metrics::hold_wait(&view.cluster, self.role, started.elapsed(), false);
                }
                return Ok(Route { view, candidates });
            }
            let remaining = hold.saturating_sub(started.elapsed());
            if !view.dynamic || remaining.is_zero() {
                return Err(self.hold_failed(&view, started, held.is_some()));
            }
            held.get_or_insert_with(|| {
                self.held.fetch_add(1, Ordering::Relaxed);
                Held {
                    count: &self.held,
                    _gauge: metrics::held_session(&view.cluster, self.role),
                }
            });
            match tokio::time::timeout(remaining, views.changed()).await {
                Ok(Ok(())) => {}
                // Timed out, or the source is gone and nothing will change.
                Ok(Err(_)) | Err(_) => {
                    let view = views.borrow().clone();
                    return Err(self.hold_failed(&view, started, true));
                }
            }
        }
    }

    fn hold_failed(&self, view: &ClusterView, started: Instant, was_held: bool) -> NoTarget {
        if was_held {
            metrics::hold_wait(&view.cluster, self.role, started.elapsed(), true);
        }
        NoTarget::new(self.role, view, started.elapsed())
    }
}

/// The members a new session may go to, best first, rotating the start
/// among equals so sessions spread round-robin.
pub fn candidates(
    role: ListenerRole,
    fallback: ReplicaFallback,
    view: &ClusterView,
    next: &AtomicUsize,
) -> Vec<Member> {
    let leader = || view.leader().cloned().into_iter().collect::<Vec<_>>();
    let rotated = |members: Vec<Member>| {
        if members.len() > 1 {
            let start = next.fetch_add(1, Ordering::Relaxed) % members.len();
            let mut members = members;
            members.rotate_left(start);
            members
        } else {
            members
        }
    };
    let replicas = || {
        view.readable_replicas()
            .filter(|m| serves_reads(view, m))
            .cloned()
            .collect::<Vec<_>>()
    };
    let or_fallback = |members: Vec<Member>| {
        if members.is_empty() && fallback == ReplicaFallback::Primary {
            leader()
        } else {
            members
        }
    };
    match role {
        ListenerRole::Primary => leader(),
        ListenerRole::Replica => or_fallback(rotated(replicas())),
        ListenerRole::SyncReplica => {
            let mut synchronous = replicas();
            synchronous.retain(|m| m.synchronous);
            or_fallback(rotated(synchronous))
        }
        ListenerRole::PreferReplica => {
            let mut members = rotated(replicas());
            members.extend(leader());
            members
        }
        ListenerRole::Any => {
            let mut members = leader();
            members.extend(replicas());
            rotated(members)
        }
    }
}

/// Why an existing session's backend no longer fits its listener's role.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Misfit {
    /// A write session's member is no longer the confirmed leader.
    LeaderChanged {
        old: Arc<str>,
        new: Option<Arc<str>>,
    },
    /// A read session's member left the view or failed its checks.
    MemberUnavailable { member: Arc<str> },
    /// A `sync-replica` session's member is no longer a synchronous
    /// standby.
    NoLongerSynchronous { member: Arc<str> },
}

impl Misfit {
    /// Why the session no longer fits, in words that finish "terminating
    /// connection because …": the FATAL's message, and the reason the
    /// event timeline counts ended sessions under.
    pub fn reason(&self, cluster: &str) -> String {
        match self {
            Self::LeaderChanged { old, new: Some(new) } => {
                format!("the leader of cluster \"{cluster}\" changed from {old} to {new}")
            }
            Self::LeaderChanged { old, new: None } => format!(
                "{old} is no longer the leader of cluster \"{cluster}\" and no new leader is confirmed yet"
            ),
            Self::MemberUnavailable { member } => {
                format!("member {member} of cluster \"{cluster}\" is no longer available")
            }
            Self::NoLongerSynchronous { member } => format!(
                "member {member} of cluster \"{cluster}\" is no longer a synchronous standby, so it may miss acknowledged commits"
            ),
        }
    }

    /// The FATAL the client receives when its session is ended for this.
    pub fn to_error(&self, cluster: &str) -> ProtocolError {
        let hint = match self {
            Self::LeaderChanged { new: Some(_), .. } => "Reconnect to reach the new primary.",
            Self::LeaderChanged { new: None, .. } => {
                "Reconnect; rolegate holds new sessions until a new primary is confirmed."
            }
            Self::MemberUnavailable { .. } => "Reconnect to be routed to another member.",
            Self::NoLongerSynchronous { .. } => "Reconnect to be routed to a synchronous standby.",
        };
        ProtocolError::new(
            SqlState::ADMIN_SHUTDOWN,
            format!("terminating connection because {}", self.reason(cluster)),
        )
        .with_hint(hint)
    }
}

/// Whether `member` may carry read sessions under `view`: the confirmed
/// leader, or a member that is running and passing its checks. The
/// confirmed leader counts even while its REST checks go unanswered (a
/// Patroni starved of CPU; see [`crate::topology::fuse`]): writes go to it
/// then, so reads may too. Routing offers only members this accepts, and
/// a session ends when its member stops being accepted, so a session is
/// never started on a member that would end it at once.
fn serves_reads(view: &ClusterView, member: &Member) -> bool {
    member.healthy || is_leader(view, member)
}

fn is_leader(view: &ClusterView, member: &Member) -> bool {
    view.leader().is_some_and(|l| l.name == member.name)
}

/// Checks whether a session on `member`, opened through a listener of
/// `role`, may continue under `view`.
///
/// Write sessions need their member to remain the confirmed leader, or to
/// be the leader stepping down in a planned switchover: that member is
/// still the primary until Patroni stops its PostgreSQL, which ends the
/// sessions itself, after the checkpoint it takes while still serving and
/// before the leader key moves (its clean shutdown streams every commit to
/// the replicas first). Ending them at the request would only lengthen the
/// outage; new write sessions are held meanwhile, since the view confirms
/// no leader. Read sessions need their member to remain present and
/// healthy: a replica that is promoted keeps its readers, and rising lag
/// does not end a session.
pub fn check_fit(role: ListenerRole, view: &ClusterView, member: &str) -> Result<(), Misfit> {
    match role {
        ListenerRole::Primary => match (view.leader(), &view.handover) {
            (Some(leader), _) if &*leader.name == member => Ok(()),
            (None, Some(handover)) if &*handover.from == member => Ok(()),
            (other, _) => Err(Misfit::LeaderChanged {
                old: member.into(),
                new: other.map(|m| m.name.clone()),
            }),
        },
        ListenerRole::Replica | ListenerRole::PreferReplica | ListenerRole::Any => {
            match view.member(member) {
                Some(m) if serves_reads(view, m) => Ok(()),
                _ => Err(Misfit::MemberUnavailable {
                    member: member.into(),
                }),
            }
        }
        // A standby that leaves the sync key may miss commits from now on;
        // the leader (a fallback, or a promoted standby) has them all.
        ListenerRole::SyncReplica => match view.member(member) {
            Some(m) if serves_reads(view, m) && (m.synchronous || is_leader(view, m)) => Ok(()),
            Some(m) if serves_reads(view, m) => Err(Misfit::NoLongerSynchronous {
                member: member.into(),
            }),
            _ => Err(Misfit::MemberUnavailable {
                member: member.into(),
            }),
        },
    }
}

/// Why a new session found no member for its role: the router's refusal,
/// which renders itself for the client and the event log.
#[derive(Debug, Clone)]
pub struct NoTarget {
    role: ListenerRole,
    cluster: Arc<str>,
    /// The view's own words for a missing leader.
    no_leader_reason: Option<String>,
    /// How long the session was held for a target: `None` for a static
    /// cluster, which never holds.
    held: Option<Duration>,
}

impl NoTarget {
    pub fn new(role: ListenerRole, view: &ClusterView, waited: Duration) -> Self {
        Self {
            role,
            cluster: view.cluster.clone(),
            no_leader_reason: view.no_leader_reason.clone(),
            held: view.dynamic.then_some(waited),
        }
    }

    /// What is missing, in a few words: the reason the event log records a
    /// hold that ran out under.
    pub fn reason(&self) -> String {
        let cluster = &self.cluster;
        match self.role {
            ListenerRole::Primary => {
                let reason = self
                    .no_leader_reason
                    .as_deref()
                    .unwrap_or("no member is the confirmed leader");
                format!("cluster \"{cluster}\" has no confirmed primary ({reason})")
            }
            ListenerRole::Replica => format!("cluster \"{cluster}\" has no eligible replica"),
            ListenerRole::SyncReplica => format!(
                "cluster \"{cluster}\" has no eligible synchronous standby (synchronous_mode off, or none streaming)"
            ),
            ListenerRole::PreferReplica | ListenerRole::Any => {
                format!("cluster \"{cluster}\" has no healthy member")
            }
        }
    }

    /// True when the session was held and the hold ran out.
    pub fn was_held(&self) -> bool {
        self.held.is_some()
    }

    /// The FATAL the client receives.
    pub fn to_error(&self) -> ProtocolError {
        let what = self.reason();
        let message = match self.held {
            Some(waited) => format!(
                "{what}; rolegate held the connection for {:.1}s (hold_timeout) without one appearing",
                waited.as_secs_f64()
            ),
            None => what,
        };
        ProtocolError::new(SqlState::CANNOT_CONNECT_NOW, message)
            .with_hint("Retry later; check the cluster's state (e.g. patronictl list).")
    }
}

#[cfg(test)]
mod tests;
