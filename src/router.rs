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
        }
    }

    pub fn role(&self) -> ListenerRole {
        self.role
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
    pub async fn route(&self, hold: Duration) -> Result<Route, ProtocolError> {
        let started = Instant::now();
        let mut views = self.views.clone();
        // Raised while this session waits for a target.
        let mut held: Option<metrics::GaugeGuard> = None;
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
            held.get_or_insert_with(|| metrics::held_session(&view.cluster, self.role));
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

    fn hold_failed(&self, view: &ClusterView, started: Instant, was_held: bool) -> ProtocolError {
        if was_held {
            metrics::hold_wait(&view.cluster, self.role, started.elapsed(), true);
        }
        no_target_error(self.role, view, started.elapsed())
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
    /// The FATAL the client receives when its session is ended for this.
    pub fn to_error(&self, cluster: &str) -> ProtocolError {
        match self {
            Self::LeaderChanged { old, new: Some(new) } => ProtocolError::new(
                SqlState::ADMIN_SHUTDOWN,
                format!(
                    "terminating connection because the leader of cluster \"{cluster}\" changed from {old} to {new}"
                ),
            )
            .with_hint("Reconnect to reach the new primary."),
            Self::LeaderChanged { old, new: None } => ProtocolError::new(
                SqlState::ADMIN_SHUTDOWN,
                format!(
                    "terminating connection because {old} is no longer the leader of cluster \"{cluster}\" and no new leader is confirmed yet"
                ),
            )
            .with_hint("Reconnect; rolegate holds new sessions until a new primary is confirmed."),
            Self::MemberUnavailable { member } => ProtocolError::new(
                SqlState::ADMIN_SHUTDOWN,
                format!(
                    "terminating connection because member {member} of cluster \"{cluster}\" is no longer available"
                ),
            )
            .with_hint("Reconnect to be routed to another member."),
            Self::NoLongerSynchronous { member } => ProtocolError::new(
                SqlState::ADMIN_SHUTDOWN,
                format!(
                    "terminating connection because member {member} of cluster \"{cluster}\" is no longer a synchronous standby, so it may miss acknowledged commits"
                ),
            )
            .with_hint("Reconnect to be routed to a synchronous standby."),
        }
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

fn no_target_error(role: ListenerRole, view: &ClusterView, waited: Duration) -> ProtocolError {
    let cluster = &view.cluster;
    let what = match role {
        ListenerRole::Primary => {
            let reason = view
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
    };
    let message = if view.dynamic {
        format!(
            "{what}; rolegate held the connection for {:.1}s (hold_timeout) without one appearing",
            waited.as_secs_f64()
        )
    } else {
        what
    };
    ProtocolError::new(SqlState::CANNOT_CONNECT_NOW, message)
        .with_hint("Retry later; check the cluster's state (e.g. patronictl list).")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::topology::view::test_support::member;
    use crate::topology::MemberRole;

    fn view(leader: Option<&str>) -> ClusterView {
        ClusterView::new(
            "demo".into(),
            vec![
                member("pg1", 5441, MemberRole::Primary),
                member("pg2", 5442, MemberRole::Replica),
                member("pg3", 5443, MemberRole::Replica),
            ],
            leader,
            true,
        )
    }

    fn names(members: &[Member]) -> Vec<&str> {
        members.iter().map(|m| &*m.name).collect()
    }

    #[test]
    fn primary_gets_the_leader_only() {
        let next = AtomicUsize::new(0);
        let c = candidates(
            ListenerRole::Primary,
            ReplicaFallback::Hold,
            &view(Some("pg1")),
            &next,
        );
        assert_eq!(names(&c), ["pg1"]);
        let c = candidates(
            ListenerRole::Primary,
            ReplicaFallback::Hold,
            &view(None),
            &next,
        );
        assert!(c.is_empty());
    }

    #[test]
    fn replicas_alternate() {
        let next = AtomicUsize::new(0);
        let v = view(Some("pg1"));
        let first: Vec<_> = (0..4)
            .map(|_| {
                candidates(ListenerRole::Replica, ReplicaFallback::Hold, &v, &next)[0]
                    .name
                    .clone()
            })
            .collect();
        assert_eq!(
            first.iter().map(|n| &**n).collect::<Vec<_>>(),
            ["pg2", "pg3", "pg2", "pg3"]
        );
    }

    #[test]
    fn replica_fallback_and_prefer_replica() {
        let next = AtomicUsize::new(0);
        let mut v = view(Some("pg1"));
        for m in &mut v.members {
            m.readable = false;
        }
        assert!(candidates(ListenerRole::Replica, ReplicaFallback::Hold, &v, &next).is_empty());
        let c = candidates(ListenerRole::Replica, ReplicaFallback::Primary, &v, &next);
        assert_eq!(names(&c), ["pg1"]);
        let c = candidates(
            ListenerRole::PreferReplica,
            ReplicaFallback::Hold,
            &v,
            &next,
        );
        assert_eq!(names(&c), ["pg1"]);
        let c = candidates(
            ListenerRole::PreferReplica,
            ReplicaFallback::Hold,
            &view(Some("pg1")),
            &next,
        );
        assert_eq!(c.last().map(|m| &*m.name), Some("pg1"));
        assert_eq!(c.len(), 3);
    }

    #[test]
    fn any_covers_every_usable_member() {
        let next = AtomicUsize::new(0);
        let v = view(Some("pg1"));
        let mut seen: Vec<_> = (0..3)
            .map(|_| {
                candidates(ListenerRole::Any, ReplicaFallback::Hold, &v, &next)[0]
                    .name
                    .clone()
            })
            .collect();
        seen.sort();
        assert_eq!(
            seen.iter().map(|n| &**n).collect::<Vec<_>>(),
            ["pg1", "pg2", "pg3"]
        );
    }

    #[test]
    fn write_sessions_end_when_the_leader_moves() {
        let v = view(Some("pg2"));
        assert_eq!(
            check_fit(ListenerRole::Primary, &v, "pg1"),
            Err(Misfit::LeaderChanged {
                old: "pg1".into(),
                new: Some("pg2".into())
            })
        );
        assert_eq!(check_fit(ListenerRole::Primary, &v, "pg2"), Ok(()));
        let err = check_fit(ListenerRole::Primary, &view(None), "pg1").expect_err("no leader");
        assert!(err.to_error("demo").message.contains("no new leader"));
    }

    #[test]
    fn write_sessions_on_the_leader_stepping_down_run_until_the_key_moves() {
        let v = view(None).with_handover(Some(crate::topology::Handover {
            from: "pg1".into(),
            to: Some("pg3".into()),
        }));
        assert_eq!(check_fit(ListenerRole::Primary, &v, "pg1"), Ok(()));
        assert!(check_fit(ListenerRole::Primary, &v, "pg3").is_err());
        // The key released, no new leader yet: the old one is done.
        let misfit = check_fit(ListenerRole::Primary, &view(None), "pg1").expect_err("released");
        assert_eq!(misfit.to_error("demo").sqlstate, SqlState::ADMIN_SHUTDOWN);
    }

    #[test]
    fn read_sessions_survive_promotion_but_not_removal() {
        let v = view(Some("pg2"));
        assert_eq!(check_fit(ListenerRole::Replica, &v, "pg2"), Ok(()));
        let mut v = view(Some("pg1"));
        v.members.retain(|m| &*m.name != "pg3");
        assert!(check_fit(ListenerRole::Replica, &v, "pg3").is_err());
        let mut v = view(Some("pg1"));
        v.members[1].healthy = false;
        assert!(check_fit(ListenerRole::Any, &v, "pg2").is_err());
    }

    /// Every view three members can make: each member's role, health and
    /// readability, the confirmed leader, and a switchover or none.
    fn every_view() -> impl Iterator<Item = ClusterView> {
        let roles = [
            MemberRole::Primary,
            MemberRole::Replica,
            MemberRole::Unknown,
        ];
        let states: Vec<(MemberRole, bool, bool)> = roles
            .iter()
            .flat_map(|&r| {
                [
                    (r, false, false),
                    (r, false, true),
                    (r, true, false),
                    (r, true, true),
                ]
            })
            .collect();
        let names = ["pg1", "pg2", "pg3"];
        let mut views = Vec::new();
        for a in &states {
            for b in &states {
                for c in &states {
                    for leader in [None, Some("pg1"), Some("pg2"), Some("pg3")] {
                        for handover in [None, Some(("pg1", Some("pg2"))), Some(("pg2", None))] {
                            for synchronous in [
                                [false, false, false],
                                [false, true, false],
                                [true, false, true],
                            ] {
                                let members = [a, b, c]
                                    .iter()
                                    .zip(names)
                                    .zip([5441, 5442, 5443])
                                    .zip(synchronous)
                                    .map(
                                        |(
                                            ((&&(role, healthy, readable), name), port),
                                            synchronous,
                                        )| {
                                            let mut m = member(name, port, role);
                                            m.healthy = healthy;
                                            m.readable = readable;
                                            m.synchronous = synchronous;
                                            m
                                        },
                                    )
                                    .collect();
                                let view = ClusterView::new("demo".into(), members, leader, true)
                                    .with_handover(handover.map(|(from, to)| {
                                        crate::topology::Handover {
                                            from: from.into(),
                                            to: to.map(Into::into),
                                        }
                                    }));
                                views.push(view);
                            }
                        }
                    }
                }
            }
        }
        views.into_iter()
    }

    /// Routing and fit are one rule: a new session is never sent to a
    /// member on which its listener's fit check would end it at once.
    #[test]
    fn every_candidate_fits() {
        let roles = [
            ListenerRole::Primary,
            ListenerRole::Replica,
            ListenerRole::PreferReplica,
            ListenerRole::SyncReplica,
            ListenerRole::Any,
        ];
        let next = AtomicUsize::new(0);
        let mut checked = 0;
        for view in every_view() {
            for role in roles {
                for fallback in [ReplicaFallback::Hold, ReplicaFallback::Primary] {
                    for candidate in candidates(role, fallback, &view, &next) {
                        checked += 1;
                        assert_eq!(
                            check_fit(role, &view, &candidate.name),
                            Ok(()),
                            "{role} ({fallback:?}) offered {} under {view:?}",
                            candidate.name
                        );
                    }
                }
            }
        }
        assert!(checked > 10_000, "only {checked} candidates checked");
    }

    #[test]
    fn a_confirmed_leader_with_silent_rest_serves_reads_on_any() {
        let mut v = view(Some("pg1"));
        v.members[0].healthy = false;
        let next = AtomicUsize::new(0);
        let offered: Vec<_> = (0..3)
            .flat_map(|_| candidates(ListenerRole::Any, ReplicaFallback::Hold, &v, &next))
            .map(|m| m.name)
            .collect();
        assert!(offered.iter().any(|n| &**n == "pg1"));
        assert_eq!(check_fit(ListenerRole::Any, &v, "pg1"), Ok(()));
        assert!(check_fit(ListenerRole::Any, &v, "pg9").is_err());
    }

    #[test]
    fn sync_replica_gets_synchronous_standbys_only() {
        let next = AtomicUsize::new(0);
        let mut v = view(Some("pg1"));
        let c = candidates(ListenerRole::SyncReplica, ReplicaFallback::Hold, &v, &next);
        assert!(c.is_empty(), "no synchronous standby: hold");
        let c = candidates(
            ListenerRole::SyncReplica,
            ReplicaFallback::Primary,
            &v,
            &next,
        );
        assert_eq!(names(&c), ["pg1"]);
        v.members[2].synchronous = true;
        for _ in 0..3 {
            let c = candidates(ListenerRole::SyncReplica, ReplicaFallback::Hold, &v, &next);
            assert_eq!(names(&c), ["pg3"]);
        }
        assert_eq!(check_fit(ListenerRole::SyncReplica, &v, "pg3"), Ok(()));
        // pg3 leaves the sync key: its sync-replica sessions end.
        v.members[2].synchronous = false;
        let misfit = check_fit(ListenerRole::SyncReplica, &v, "pg3").expect_err("left");
        assert_eq!(
            misfit,
            Misfit::NoLongerSynchronous {
                member: "pg3".into()
            }
        );
        assert!(misfit.to_error("demo").message.contains("synchronous"));
        // Its plain replica sessions stay.
        assert_eq!(check_fit(ListenerRole::Replica, &v, "pg3"), Ok(()));
    }

    #[tokio::test]
    async fn held_session_is_released_by_a_new_view() {
        let (tx, rx) = watch::channel(Arc::new(view(None)));
        let router = Router::new(ListenerRole::Primary, ReplicaFallback::Hold, rx);
        let publish = async {
            tokio::time::sleep(Duration::from_millis(50)).await;
            tx.send_replace(Arc::new(view(Some("pg1"))));
        };
        let started = Instant::now();
        let (route, ()) = tokio::join!(router.route(Duration::from_secs(5)), publish);
        let route = route.expect("released");
        assert_eq!(names(&route.candidates), ["pg1"]);
        assert!(started.elapsed() >= Duration::from_millis(40));
    }

    #[tokio::test]
    async fn hold_times_out_with_57p03() {
        let (_tx, rx) = watch::channel(Arc::new(view(None)));
        let router = Router::new(ListenerRole::Primary, ReplicaFallback::Hold, rx);
        let err = router
            .route(Duration::from_millis(30))
            .await
            .expect_err("no leader");
        assert_eq!(err.sqlstate, SqlState::CANNOT_CONNECT_NOW);
        assert!(err.message.contains("hold_timeout"), "{}", err.message);
    }

    #[tokio::test]
    async fn static_view_without_target_fails_at_once() {
        let mut v = view(None);
        v.dynamic = false;
        let (_tx, rx) = watch::channel(Arc::new(v));
        let router = Router::new(ListenerRole::Primary, ReplicaFallback::Hold, rx);
        let started = Instant::now();
        let err = router
            .route(Duration::from_secs(30))
            .await
            .expect_err("none");
        assert_eq!(err.sqlstate, SqlState::CANNOT_CONNECT_NOW);
        assert!(started.elapsed() < Duration::from_secs(1));
    }
}
