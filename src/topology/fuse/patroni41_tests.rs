//! The fuser on what Patroni 4.1.5 with PostgreSQL 18 wrote and answered
//! in the lab (`tests/fixtures/patroni-4.1/`, made by
//! `scripts/capture-fixtures`): the steady cluster, and the etcd events of
//! a switchover and of a failover to a candidate, replayed in order.

use super::*;
use crate::topology::dcs::DcsState;
use crate::topology::patroni_data::{
    fixture_dcs_state_of, fixture_of, split_http_capture, ClusterListing, RestStatus,
};

const PREFIX: &str = "/service/demo/";

/// The REST state of `member` from its captured `/primary` and `/replica`
/// answers.
fn rest_of(member: &str, at: Instant) -> RestState {
    let check = |path: &str| {
        let text = fixture_of("4.1", &format!("node-{member}-{path}.txt"));
        let (status, body) = split_http_capture(&text);
        (status == 200, RestStatus::parse(body.as_bytes()).ok())
    };
    let (primary, status) = check("primary");
    let (replica, _) = check("replica");
    RestState::after_check(at, primary, replica, status)
}

fn view(
    directory: &DcsState,
    rest: &HashMap<String, RestState>,
    policy: LeaderPolicy,
) -> ClusterView {
    let cluster: Arc<str> = "demo".into();
    fuse(&FuseInput {
        cluster: &cluster,
        policy,
        on_etcd_loss: EtcdLossPolicy::Patroni,
        max_replica_lag: None,
        directory,
        etcd: EtcdStatus::Up,
        rest,
        leader_since: None,
        previous_leader: None,
        now: Instant::now(),
        wall_now: std::time::SystemTime::now(),
    })
}

fn readable(view: &ClusterView) -> Vec<String> {
    view.readable_replicas()
        .map(|m| m.name.to_string())
        .collect()
}

/// The events of an `etcdctl watch` capture: (PUT or DELETE, key, value).
fn watch_events(name: &str) -> Vec<(String, String, String)> {
    let text = fixture_of("4.1", name);
    let lines: Vec<_> = text.lines().collect();
    lines
        .chunks(3)
        .filter(|c| c.len() >= 2)
        .map(|c| {
            (
                c[0].to_owned(),
                c[1].to_owned(),
                c.get(2).copied().unwrap_or_default().to_owned(),
            )
        })
        .collect()
}

fn apply(directory: &mut DcsState, (kind, key, value): &(String, String, String)) {
    if kind == "DELETE" {
        directory.apply_delete(PREFIX, key.as_bytes());
    } else {
        directory.apply_put(PREFIX, key.as_bytes(), value.as_bytes());
    }
}

#[test]
fn a_healthy_patroni_41_cluster() {
    let directory = fixture_dcs_state_of("4.1");
    let leader = directory.leader.clone().expect("a leader key");
    let now = Instant::now();
    let rest: HashMap<_, _> = ["pg1", "pg2", "pg3"]
        .into_iter()
        .map(|m| (m.to_owned(), rest_of(m, now)))
        .collect();
    let mut replicas: Vec<_> = ["pg1", "pg2", "pg3"]
        .into_iter()
        .filter(|m| *m != leader)
        .map(str::to_owned)
        .collect();
    replicas.sort();
    for policy in [
        LeaderPolicy::EtcdAndPatroni,
        LeaderPolicy::Etcd,
        LeaderPolicy::Patroni,
    ] {
        let view = view(&directory, &rest, policy);
        assert_eq!(
            view.leader().map(|m| m.name.to_string()),
            Some(leader.clone()),
            "{policy:?}: {:?}",
            view.no_leader_reason
        );
        assert_eq!(readable(&view), replicas, "{policy:?}");
    }
    // Patroni 4.1 writes "primary" and the replication state.
    let record = &directory.members[&replicas[0]];
    assert_eq!(record.version.as_deref(), Some("4.1.5"));
    assert!(record.is_streaming());
    assert!(directory.members[&leader].is_primary_role());
}

/// REST-only discovery reads `/cluster`, where 4.1 gives a replica's
/// replication state as its `state`: both replicas take reads.
#[test]
fn rest_only_discovery_of_a_patroni_41_cluster() {
    let text = fixture_of("4.1", "node-pg2-cluster.txt");
    let (status, body) = split_http_capture(&text);
    assert_eq!(status, 200);
    let listing = ClusterListing::parse(body.as_bytes()).expect("listing");
    let mut directory = DcsState::default();
    for member in &listing.members {
        directory
            .members
            .insert(member.name.clone(), member.to_record());
    }
    let now = Instant::now();
    let rest: HashMap<_, _> = ["pg1", "pg2", "pg3"]
        .into_iter()
        .map(|m| (m.to_owned(), rest_of(m, now)))
        .collect();
    let view = view(&directory, &rest, LeaderPolicy::Patroni);
    let leader = view.leader().map(|m| m.name.to_string()).expect("a leader");
    assert_eq!(readable(&view).len(), 2, "{view:?}");
    assert!(!readable(&view).contains(&leader));
}

/// A switchover, event by event: from the request on, no member is
/// writable and the candidate takes no new reads; at the end the
/// candidate leads.
#[test]
fn a_patroni_41_switchover_replayed() {
    let mut directory = fixture_dcs_state_of("4.1");
    let before = fixture_of("4.1", "switchover/leader-before.txt");
    let after = fixture_of("4.1", "switchover/leader-after.txt");
    let (before, after) = (before.trim(), after.trim());
    assert_eq!(directory.leader.as_deref(), Some(before));
    let rest = HashMap::new();
    let mut saw_handover = false;
    for event in watch_events("switchover/etcd-watch.txt") {
        apply(&mut directory, &event);
        let view = view(&directory, &rest, LeaderPolicy::Etcd);
        if let Some(handover) = &view.handover {
            saw_handover = true;
            assert_eq!(&*handover.from, before);
            assert_eq!(handover.to.as_deref(), Some(after));
            assert!(view.leader().is_none(), "writable during the handover");
            assert!(!readable(&view).iter().any(|m| m == after));
        }
        if let Some(leader) = view.leader() {
            assert!(
                &*leader.name == before || &*leader.name == after,
                "{} led",
                leader.name
            );
        }
    }
    assert!(saw_handover, "the failover key never started a handover");
    let view = view(&directory, &rest, LeaderPolicy::Etcd);
    assert_eq!(view.leader().map(|m| &*m.name), Some(after));
}

/// `POST /failover {"candidate": …}` with a healthy leader: Patroni 4.1
/// writes `{"member": …}` only, and the leader steps down as in a
/// switchover; rolegate holds writes from the request.
#[test]
fn a_patroni_41_failover_to_a_candidate_replayed() {
    let mut directory = fixture_dcs_state_of("4.1");
    for event in watch_events("switchover/etcd-watch.txt") {
        apply(&mut directory, &event);
    }
    let before = fixture_of("4.1", "failover-candidate/leader-before.txt");
    let after = fixture_of("4.1", "failover-candidate/leader-after.txt");
    let (before, after) = (before.trim(), after.trim());
    assert_eq!(directory.leader.as_deref(), Some(before));
    let rest = HashMap::new();
    let mut saw_handover = false;
    for event in watch_events("failover-candidate/etcd-watch.txt") {
        let intent = event.1.ends_with("/failover") && event.2.contains("member");
        apply(&mut directory, &event);
        let view = view(&directory, &rest, LeaderPolicy::Etcd);
        if intent {
            assert!(
                !event.2.contains("leader"),
                "4.1 names no leader: {}",
                event.2
            );
            let handover = view.handover.clone().expect("a handover from the request");
            assert_eq!(
                (&*handover.from, handover.to.as_deref()),
                (before, Some(after))
            );
            saw_handover = true;
        }
        if view.handover.is_some() {
            assert!(view.leader().is_none());
        }
    }
    assert!(saw_handover);
    let view = view(&directory, &rest, LeaderPolicy::Etcd);
    assert_eq!(view.leader().map(|m| &*m.name), Some(after));
}
