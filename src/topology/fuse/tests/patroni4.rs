//! The rules for what Patroni 4 writes and does (a failover to a
//! candidate, the sync key and quorum commit, standby clusters,
//! failsafe_mode), and a watch reconnecting within its grace period, on the
//! same captured cluster as the other fuser tests.

use super::*;

/// `patronictl failover --candidate pg3` while pg1 leads: Patroni 4
/// writes `{"member": "pg3"}` and pg1 demotes itself gracefully, so new
/// writes are held from the request, as in a switchover.
#[test]
fn a_failover_to_a_candidate_with_a_healthy_leader_is_a_handover() {
    let mut case = Case::new();
    case.directory.failover = FailoverIntent::parse(br#"{"member":"pg3"}"#);
    assert_handover_from_pg1_to_pg3(&case);
}

/// With `synchronous_mode` (or Patroni 4's quorum mode) the `sync` key
/// names the leader's synchronous standbys; a key left from the previous
/// leader names none.
#[test]
fn the_sync_key_marks_synchronous_standbys() {
    let mut case = Case::new();
    let prefix = "/service/demo/";
    case.directory.apply_put(
        prefix,
        b"/service/demo/sync",
        br#"{"leader":"pg1","sync_standby":"pg2,pg3","quorum":1}"#,
    );
    let view = case.view();
    let synchronous: Vec<_> = view
        .members
        .iter()
        .filter(|m| m.synchronous)
        .map(|m| m.name.to_string())
        .collect();
    assert_eq!(synchronous, ["pg2", "pg3"]);
    assert_eq!(case.directory.sync.as_ref().and_then(|s| s.quorum), Some(1));
    case.directory.apply_put(
        prefix,
        b"/service/demo/sync",
        br#"{"leader":"pg2","sync_standby":"pg3"}"#,
    );
    assert!(case.view().members.iter().all(|m| !m.synchronous));
    case.directory.apply_delete(prefix, b"/service/demo/sync");
    assert_eq!(case.directory.sync, None);
}

/// A standby cluster's leader holds the key but replicates from another
/// cluster: nobody takes writes, and the standby leader serves reads.
#[test]
fn a_standby_cluster_takes_no_writes() {
    let mut case = Case::new();
    case.policy = LeaderPolicy::Etcd;
    case.set_role("pg1", "standby_leader");
    assert_eq!(case.leader(), None);
    let reason = case.view().no_leader_reason.unwrap_or_default();
    assert!(reason.contains("standby cluster"), "{reason}");
    assert_eq!(case.readable(), ["pg1", "pg2", "pg3"]);
    // With REST: Patroni answers the standby leader's /replica with 503
    // and a body saying standby_leader; that is its read check.
    case.policy = LeaderPolicy::EtcdAndPatroni;
    case.set_rest_with_body("pg1", false, "standby_leader");
    if let Some(r) = case.rest.get_mut("pg1") {
        r.replica = Some(false);
    }
    assert_eq!(case.leader(), None);
    assert_eq!(case.readable(), ["pg1", "pg2", "pg3"]);
}

/// Patroni (not rolegate) lost etcd with `failsafe_mode` on: its keys
/// expire, the primary runs on while every member confirms it, and says so
/// in its REST answers. rolegate follows Patroni's decision.
#[test]
fn a_primary_patroni_keeps_under_failsafe_stays_writable() {
    let mut case = Case::new();
    let prefix = "/service/demo/";
    case.directory.apply_put(
        prefix,
        b"/service/demo/config",
        br#"{"ttl":20,"failsafe_mode":"on"}"#,
    );
    case.directory.apply_put(
        prefix,
        b"/service/demo/failsafe",
        br#"{"pg1":"http://127.0.0.1:8041/patroni","pg2":"http://127.0.0.1:8042/patroni","pg3":"http://127.0.0.1:8043/patroni"}"#,
    );
    // The leases expire: leader key and member keys go.
    case.directory.apply_delete(prefix, b"/service/demo/leader");
    for member in ["pg1", "pg2", "pg3"] {
        let key = format!("/service/demo/members/{member}");
        case.directory.apply_delete(prefix, key.as_bytes());
    }
    assert_eq!(case.directory.members.len(), 3, "kept under failsafe");
    case.leader_since = Some(case.now);
    case.now += Duration::from_millis(10);
    // pg1 answers as a primary, not (yet) saying failsafe is active.
    case.set_rest_with_body("pg1", true, "primary");
    assert_eq!(case.leader(), None);
    // Patroni says it keeps pg1 under failsafe.
    let failsafe = RestStatus {
        state: Some("running".into()),
        role: Some("primary".into()),
        failsafe_mode_is_active: Some(true),
        ..RestStatus::default()
    };
    let state = case.rest.entry("pg1".to_owned()).or_default();
    state.record(RestCheck {
        at: case.now,
        took: Duration::ZERO,
        primary: Some(true),
        replica: Some(false),
        status: Some(failsafe),
        error: None,
    });
    assert_eq!(case.leader().as_deref(), Some("pg1"));
    assert_eq!(
        case.readable(),
        ["pg2", "pg3"],
        "replicas keep serving reads"
    );
    // The etcd policy cannot see Patroni's decision.
    case.policy = LeaderPolicy::Etcd;
    assert_eq!(case.leader(), None);
    assert!(
        case.readable().is_empty(),
        "kept records alone prove nothing"
    );
    case.policy = LeaderPolicy::EtcdAndPatroni;
    // Patroni demoted it: /primary 503.
    case.set_rest_with_body("pg1", false, "replica");
    assert_eq!(case.leader(), None);
    // Without failsafe_mode, expired members are gone.
    let mut plain = Case::new();
    plain
        .directory
        .apply_delete(prefix, b"/service/demo/members/pg3");
    assert!(!plain.directory.members.contains_key("pg3"));
}

/// While a lost etcd connection is being re-established (within the
/// grace period) the policy still rules, from the state last read: a
/// watch reconnect is not an outage, even under `refuse`.
#[test]
fn a_reconnecting_watch_keeps_the_policy() {
    let mut case = Case::new();
    case.on_etcd_loss = EtcdLossPolicy::Refuse;
    case.etcd = EtcdStatus::Reconnecting { since: case.now };
    assert_eq!(case.leader().as_deref(), Some("pg1"));
    case.directory.failover = FailoverIntent::parse(br#"{"leader":"pg1","member":"pg3"}"#);
    assert!(
        case.view().handover.is_some(),
        "switchover protection holds"
    );
    case.etcd = EtcdStatus::Down { since: case.now };
    assert_eq!(case.leader(), None);
}
