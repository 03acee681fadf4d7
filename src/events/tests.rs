use std::sync::Arc;
use std::time::{Duration, SystemTime};

use super::failover::{
    CONFIRMED, FIRST_SESSION, KEY_MOVED, LEADER_LOST, OLD_LEADER_STOPPED, REQUESTED,
};
use super::*;

fn cluster() -> Arc<str> {
    "demo".into()
}

fn confirmed(leader: &str, previous: Option<&str>) -> EventKind {
    EventKind::LeaderConfirmed {
        leader: leader.to_owned(),
        previous: previous.map(str::to_owned),
        evidence: "etcd+patroni".to_owned(),
    }
}

#[test]
fn a_timeline_keeps_its_newest_events_up_to_its_capacity() {
    let log = EventLog::new();
    let c = cluster();
    for i in 0..CAPACITY + 20 {
        log.record(
            Some(&c),
            EventKind::ReadableJoined {
                member: format!("m{i}"),
            },
        );
    }
    let events = log.query(Some("demo"), None);
    assert_eq!(events.len(), CAPACITY);
    assert_eq!(
        events[0].kind,
        EventKind::ReadableJoined {
            member: format!("m{}", CAPACITY + 19)
        },
        "newest first"
    );
    assert!(events.windows(2).all(|w| w[0].seq > w[1].seq));
}

#[test]
fn queries_filter_by_cluster_and_time() {
    let log = EventLog::new();
    let (a, b): (Arc<str>, Arc<str>) = ("a".into(), "b".into());
    log.record(Some(&a), confirmed("n1", None));
    log.record(
        None,
        EventKind::ConfigReloaded {
            file: "proxy.toml".to_owned(),
        },
    );
    log.record(Some(&b), confirmed("n2", None));
    let of_a = log.query(Some("a"), None);
    assert_eq!(of_a.len(), 2, "a's event and the process's: {of_a:?}");
    assert!(of_a.iter().all(|e| e.cluster.as_deref() != Some("b")));
    assert_eq!(log.query(None, None).len(), 3);
    let newest = log.query(None, None)[0].at;
    assert!(log.query(None, Some(newest)).is_empty());
    assert_eq!(
        log.query(None, Some(newest - Duration::from_secs(60)))
            .len(),
        3
    );
}

#[test]
fn a_burst_of_ended_sessions_is_one_event_with_a_count() {
    let log = EventLog::new();
    let c = cluster();
    for _ in 0..3 {
        log.session_ended(&c, "n1", "demoted");
    }
    log.session_ended(&c, "n2", "demoted");
    log.hold_timed_out(&c, "primary", "no leader");
    log.hold_timed_out(&c, "primary", "no leader");
    let events = log.query(Some("demo"), None);
    assert_eq!(events.len(), 3, "{events:?}");
    assert!(events.iter().any(|e| e.kind
        == EventKind::SessionsEnded {
            member: "n1".to_owned(),
            reason: "demoted".to_owned(),
            count: 3
        }
        && e.summary.starts_with("3 session(s) on n1")));
    assert!(events
        .iter()
        .any(|e| matches!(e.kind, EventKind::HoldsTimedOut { count: 2, .. })));
}

#[test]
fn the_first_session_of_a_new_leader_is_recorded_once() {
    let log = EventLog::new();
    let c = cluster();
    log.record(Some(&c), confirmed("n1", None));
    log.session_served(&c, "n1");
    assert!(
        log.query(None, None).len() == 1,
        "a first confirmation is not a change"
    );
    log.record(Some(&c), confirmed("n2", Some("n1")));
    log.session_served(&c, "n1");
    log.session_served(&c, "n2");
    log.session_served(&c, "n2");
    let served: Vec<_> = log
        .query(None, None)
        .into_iter()
        .filter(|e| matches!(e.kind, EventKind::FirstSessionServed { .. }))
        .collect();
    assert_eq!(served.len(), 1);
    assert!(!log.awaiting.load(Ordering::Acquire));
}

fn event(seq: u64, at_ms: u64, kind: EventKind) -> Event {
    Event {
        seq,
        at: SystemTime::UNIX_EPOCH + Duration::from_millis(1_000_000 + at_ms),
        cluster: Some(cluster()),
        summary: kind.summary(),
        kind,
    }
}

#[test]
fn a_switchover_is_read_back_in_phases() {
    let events = [
        event(0, 0, confirmed("n1", None)),
        event(
            1,
            5_000,
            EventKind::SwitchoverRequested {
                key: "failover",
                leader: Some("n1".to_owned()),
                candidate: Some("n2".to_owned()),
                scheduled_at: None,
            },
        ),
        event(
            2,
            5_001,
            EventKind::LeaderLost {
                previous: "n1".to_owned(),
                reason: "switchover requested".to_owned(),
            },
        ),
        event(
            2,
            5_400,
            EventKind::RestCheckChanged {
                member: "n1".to_owned(),
                from: "primary".to_owned(),
                to: "unreachable".to_owned(),
                error: None,
            },
        ),
        event(
            3,
            6_000,
            EventKind::LeaderKeyChanged {
                from: Some("n1".to_owned()),
                to: Some("n2".to_owned()),
            },
        ),
        event(4, 6_100, confirmed("n2", Some("n1"))),
        event(
            5,
            6_150,
            EventKind::FirstSessionServed {
                member: "n2".to_owned(),
            },
        ),
    ];
    let refs: Vec<_> = events.iter().collect();
    let phases = last_failover(&refs).expect("a leader change");
    assert_eq!(
        (&*phases.from, &*phases.to, phases.kind),
        ("n1", "n2", "switchover")
    );
    let names: Vec<_> = phases.phases.iter().map(|p| (p.phase, p.took_ms)).collect();
    assert_eq!(
        names,
        [
            (REQUESTED, 0),
            (OLD_LEADER_STOPPED, 400),
            (KEY_MOVED, 600),
            (CONFIRMED, 100),
            (FIRST_SESSION, 50)
        ]
    );
    assert_eq!(phases.total_ms, 1_150);
}

#[test]
fn a_failover_starts_at_the_first_sign_and_an_unchanged_leader_is_none() {
    let events = [
        event(0, 0, confirmed("n1", None)),
        event(
            1,
            1_000,
            EventKind::LeaderLost {
                previous: "n1".to_owned(),
                reason: "leader key expired".to_owned(),
            },
        ),
        event(2, 9_000, confirmed("n3", Some("n1"))),
    ];
    let refs: Vec<_> = events.iter().collect();
    let phases = last_failover(&refs).expect("a leader change");
    assert_eq!(phases.kind, "failover");
    let names: Vec<_> = phases.phases.iter().map(|p| p.phase).collect();
    assert_eq!(names, [LEADER_LOST, CONFIRMED]);
    assert_eq!(phases.total_ms, 8_000);
    assert_eq!(last_failover(&refs[..2]), None);
}
