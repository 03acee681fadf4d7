//! The routing rules on views built by hand, the property that routing and
//! fit are one rule over every view of three members, and holding.

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
                                    |(((&&(role, healthy, readable), name), port), synchronous)| {
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
        .expect_err("no leader")
        .to_error();
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
        .expect_err("none")
        .to_error();
    assert_eq!(err.sqlstate, SqlState::CANNOT_CONNECT_NOW);
    assert!(started.elapsed() < Duration::from_secs(1));
}
