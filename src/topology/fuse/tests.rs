use super::*;
use crate::topology::dcs::DcsState;
use crate::topology::patroni_data::{
    fixture_dcs_state, split_http_capture, FailoverIntent, RestStatus,
};

fn directory() -> DcsState {
    fixture_dcs_state()
}

/// REST states as the fixtures captured them: pg1 primary, pg2 and pg3
/// replicas.
fn rest_from_fixtures(at: Instant) -> HashMap<String, RestState> {
    let mut rest = HashMap::new();
    for (member, primary_file, replica_file) in [
        ("pg1", "node-pg1-read-write.txt", "node-pg1-read-only.txt"),
        ("pg2", "node-pg2-master.txt", "node-pg2-replica.txt"),
        ("pg3", "node-pg3-primary.txt", "node-pg3-replica.txt"),
    ] {
        let check = |file: &str| {
            let text = std::fs::read_to_string(
                std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                    .join("tests/fixtures/patroni-3.0")
                    .join(file),
            )
            .ok();
            text.map(|t| {
                let (status, body) = split_http_capture(&t);
                (status == 200, RestStatus::parse(body.as_bytes()).ok())
            })
        };
        let (primary, status) = check(primary_file).expect("primary fixture");
        // pg3 has no replica capture under that name: it is a replica.
        let replica = check(replica_file).map(|(ok, _)| ok).unwrap_or(!primary);
        rest.insert(
            member.to_owned(),
            RestState::after_check(at, primary, replica, status),
        );
    }
    rest
}

struct Case {
    directory: DcsState,
    rest: HashMap<String, RestState>,
    policy: LeaderPolicy,
    etcd: EtcdStatus,
    on_etcd_loss: EtcdLossPolicy,
    leader_since: Option<Instant>,
    previous_leader: Option<&'static str>,
    max_lag: Option<u64>,
    now: Instant,
    wall_now: std::time::SystemTime,
}

impl Case {
    fn new() -> Self {
        let now = Instant::now();
        Self {
            directory: directory(),
            rest: rest_from_fixtures(now),
            policy: LeaderPolicy::EtcdAndPatroni,
            etcd: EtcdStatus::Up,
            on_etcd_loss: EtcdLossPolicy::Patroni,
            leader_since: None,
            previous_leader: None,
            max_lag: None,
            now,
            wall_now: std::time::SystemTime::now(),
        }
    }

    fn view(&self) -> ClusterView {
        let cluster: Arc<str> = "demo".into();
        fuse(&FuseInput {
            cluster: &cluster,
            policy: self.policy,
            on_etcd_loss: self.on_etcd_loss,
            max_replica_lag: self.max_lag,
            directory: &self.directory,
            etcd: self.etcd,
            rest: &self.rest,
            leader_since: self.leader_since,
            previous_leader: self.previous_leader,
            now: self.now,
            wall_now: self.wall_now,
        })
    }

    fn leader(&self) -> Option<String> {
        self.view().leader().map(|m| m.name.to_string())
    }

    fn readable(&self) -> Vec<String> {
        self.view()
            .readable_replicas()
            .map(|m| m.name.to_string())
            .collect()
    }

    /// Sets the role in `member`'s etcd record.
    fn set_role(&mut self, member: &str, role: &str) {
        if let Some(m) = self.directory.members.get_mut(member) {
            m.role = Some(role.into());
        }
    }

    /// A check whose body gives PostgreSQL's live role, as Patroni's do.
    fn set_rest_with_body(&mut self, member: &str, primary: bool, role: &str) {
        let status = RestStatus {
            state: Some("running".into()),
            role: Some(role.into()),
            ..RestStatus::default()
        };
        let state = self.rest.entry(member.to_owned()).or_default();
        state.record(RestCheck {
            at: self.now,
            took: Duration::ZERO,
            primary: Some(primary),
            replica: Some(!primary),
            status: Some(status),
            error: None,
        });
    }

    fn set_rest(&mut self, member: &str, primary: Option<bool>, replica: Option<bool>) {
        let state = self.rest.entry(member.to_owned()).or_default();
        state.record(RestCheck {
            at: self.now,
            took: Duration::ZERO,
            primary,
            replica,
            status: None,
            error: None,
        });
    }
}

#[test]
fn healthy_cluster_under_every_policy() {
    for policy in [
        LeaderPolicy::EtcdAndPatroni,
        LeaderPolicy::Etcd,
        LeaderPolicy::Patroni,
    ] {
        let mut case = Case::new();
        case.policy = policy;
        assert_eq!(case.leader().as_deref(), Some("pg1"), "{policy:?}");
        assert_eq!(case.readable(), ["pg2", "pg3"], "{policy:?}");
        let view = case.view();
        assert_eq!(view.member("pg1").map(|m| m.port), Some(5441));
    }
}

#[test]
fn sources_disagree_means_no_writes() {
    let mut case = Case::new();
    case.set_rest("pg2", Some(true), Some(false));
    assert_eq!(case.leader(), None);
    let reason = case.view().no_leader_reason.unwrap_or_default();
    assert!(
        reason.contains("disagree") && reason.contains("pg2"),
        "{reason}"
    );
    // Under the patroni policy, two claimants are just as refused.
    case.policy = LeaderPolicy::Patroni;
    assert_eq!(case.leader(), None);
    // Under the etcd policy, REST is not consulted for the leader.
    case.policy = LeaderPolicy::Etcd;
    assert_eq!(case.leader().as_deref(), Some("pg1"));
}

#[test]
fn leader_key_holder_must_pass_rest_after_the_key_moved() {
    let mut case = Case::new();
    // The key moved to pg3 and pg3 promoted, per etcd.
    case.directory.leader = Some("pg3".into());
    case.set_role("pg3", "master");
    case.set_role("pg1", "replica");
    case.set_rest("pg1", Some(false), Some(true));
    case.leader_since = Some(case.now + Duration::from_millis(10));
    // pg3's REST state predates the key change: not confirmed.
    case.set_rest("pg3", Some(true), Some(false));
    assert_eq!(
        case.leader(),
        None,
        "a REST answer older than the key does not confirm"
    );
    // The etcd policy trusts the record alone.
    case.policy = LeaderPolicy::Etcd;
    assert_eq!(case.leader().as_deref(), Some("pg3"));
    case.policy = LeaderPolicy::EtcdAndPatroni;
    case.now += Duration::from_millis(20);
    case.set_rest("pg3", Some(true), Some(false));
    assert_eq!(case.leader().as_deref(), Some("pg3"));
    // A promoted replica keeps serving reads? No: it is the primary now.
    assert_eq!(case.readable(), ["pg1", "pg2"]);
}

#[test]
fn leader_key_holder_still_promoting() {
    let mut case = Case::new();
    case.directory.leader = Some("pg3".into());
    case.set_role("pg3", "promoted");
    case.set_rest("pg1", Some(false), Some(true));
    // The etcd policy waits for the record to say "master".
    case.policy = LeaderPolicy::Etcd;
    assert_eq!(case.leader(), None);
    let reason = case.view().no_leader_reason.unwrap_or_default();
    assert!(reason.contains("promoted"), "{reason}");
    case.policy = LeaderPolicy::EtcdAndPatroni;
    assert_eq!(case.leader(), None, "REST has not confirmed yet");
    assert_eq!(
        case.readable(),
        ["pg2"],
        "the key holder takes no new reads"
    );
    // Patroni answers /primary 200 for the key holder while PostgreSQL is
    // still in recovery: the body says so, and that is not enough.
    case.set_rest_with_body("pg3", true, "replica");
    assert_eq!(case.leader(), None, "still in recovery");
    // Out of recovery per Patroni's live answer: confirmed, though the
    // record says "promoted" (or still "replica") until Patroni's next loop.
    case.set_rest_with_body("pg3", true, "master");
    assert_eq!(case.leader().as_deref(), Some("pg3"));
    case.set_role("pg3", "replica");
    assert_eq!(case.leader().as_deref(), Some("pg3"));
    // The etcd policy does not look at REST bodies.
    case.policy = LeaderPolicy::Etcd;
    assert_eq!(case.leader(), None);
}

#[test]
fn a_confirmed_leader_whose_patroni_stops_answering_stays_writable() {
    let mut case = Case::new();
    assert_eq!(case.leader().as_deref(), Some("pg1"));
    // Two checks without an answer: REST unreachable.
    case.set_rest("pg1", None, None);
    case.set_rest("pg1", None, None);
    assert_eq!(
        case.leader().as_deref(),
        Some("pg1"),
        "the key still holds, so nobody else can be promoted"
    );
    // An answer that says "not primary" ends it.
    case.set_rest("pg1", Some(false), Some(true));
    assert_eq!(case.leader(), None);
    // Silence after the key moved to pg1 again confirms nothing.
    case.set_rest("pg1", None, None);
    case.set_rest("pg1", None, None);
    case.leader_since = Some(case.now + Duration::from_millis(10));
    assert_eq!(case.leader(), None);
}

/// A check without an answer says nothing new: an old "primary" verdict
/// must not count as read after the key moved because a later check got
/// no answer.
#[test]
fn a_failed_check_does_not_refresh_an_old_primary_answer() {
    let mut case = Case::new();
    let t0 = case.now;
    // pg3 answered /primary with 200 at t0 (rest_from_fixtures gave pg3
    // its own capture; make it a primary answer here).
    case.set_rest("pg3", Some(true), Some(false));
    // The key moves to pg3 at t1, its record says master.
    case.directory.leader = Some("pg3".into());
    case.set_role("pg3", "master");
    case.set_role("pg1", "replica");
    case.set_rest("pg1", Some(false), Some(true));
    case.leader_since = Some(t0 + Duration::from_millis(10));
    // One check at t2 gets no answer.
    case.now = t0 + Duration::from_millis(20);
    case.set_rest("pg3", None, None);
    assert_eq!(
        case.leader(),
        None,
        "only an answer read after the key moved confirms"
    );
    // An answer read after the key moved does.
    case.now += Duration::from_millis(10);
    case.set_rest("pg3", Some(true), Some(false));
    assert_eq!(case.leader().as_deref(), Some("pg3"));
}

/// A check is stamped with its start: an answer Patroni gave before the
/// key moved does not count as after it because it arrived later.
#[test]
fn a_check_started_before_the_key_moved_does_not_confirm() {
    let mut case = Case::new();
    let t0 = case.now;
    case.directory.leader = Some("pg3".into());
    case.set_role("pg3", "master");
    case.set_role("pg1", "replica");
    case.set_rest("pg1", Some(false), Some(true));
    case.leader_since = Some(t0 + Duration::from_millis(10));
    // Started at t0, before the key moved; its answer arrived at t0 + 50ms.
    let state = case.rest.entry("pg3".to_owned()).or_default();
    state.record(RestCheck {
        at: t0,
        took: Duration::from_millis(50),
        primary: Some(true),
        replica: Some(false),
        status: None,
        error: None,
    });
    assert_eq!(case.leader(), None);
}

#[test]
fn a_primary_body_read_before_the_key_moved_does_not_confirm() {
    let mut case = Case::new();
    case.directory.leader = Some("pg3".into());
    case.set_rest("pg1", Some(false), Some(true));
    case.set_rest_with_body("pg3", true, "master");
    case.leader_since = Some(case.now + Duration::from_millis(10));
    assert_eq!(case.leader(), None);
    // A later answer without a body confirms /primary but not the role.
    case.now += Duration::from_millis(20);
    case.set_rest("pg3", Some(true), Some(false));
    assert_eq!(case.leader(), None);
    let reason = case.view().no_leader_reason.unwrap_or_default();
    assert!(reason.contains("not a running primary yet"), "{reason}");
    case.set_rest_with_body("pg3", true, "master");
    assert_eq!(case.leader().as_deref(), Some("pg3"));
}

/// A handover under way from pg1 to pg3: nobody writable, and the
/// candidate takes no new reads.
fn assert_handover_from_pg1_to_pg3(case: &Case) {
    let view = case.view();
    assert!(view.leader().is_none());
    assert_eq!(
        view.handover,
        Some(Handover {
            from: "pg1".into(),
            to: Some("pg3".into())
        })
    );
    assert_eq!(case.readable(), ["pg2"], "the candidate takes no new reads");
}

#[test]
fn a_requested_switchover_sends_no_new_writes_to_the_old_leader() {
    let mut case = Case::new();
    case.directory.failover = FailoverIntent::parse(br#"{"leader":"pg1","member":"pg3"}"#);
    assert_handover_from_pg1_to_pg3(&case);
    // The old leader released the key; the candidate has not taken it yet.
    case.directory.leader = None;
    case.set_role("pg1", "demoted");
    assert_eq!(
        case.readable(),
        ["pg2"],
        "the candidate takes no new reads between the two leaders"
    );
    case.directory.leader = Some("pg1".into());
    case.set_role("pg1", "master");
    // A scheduled switchover changes nothing until its time comes...
    case.directory.failover = FailoverIntent::parse(
        br#"{"leader":"pg1","member":"pg3","scheduled_at":"2030-01-01T00:00:00+00:00"}"#,
    );
    assert_eq!(case.leader().as_deref(), Some("pg1"));
    assert_eq!(case.readable(), ["pg2", "pg3"]);
    // ...and from then on is a switchover under way.
    case.wall_now = std::time::SystemTime::UNIX_EPOCH + Duration::from_secs(1_893_456_000);
    assert_eq!(case.leader(), None);
    assert_eq!(case.view().handover.map(|h| h.from), Some("pg1".into()));
    assert_eq!(case.readable(), ["pg2"]);
    case.wall_now = std::time::SystemTime::now();
    // REST-only routing has no failover key to read.
    case.directory.failover = FailoverIntent::parse(br#"{"leader":"pg1"}"#);
    case.policy = LeaderPolicy::Patroni;
    assert_eq!(case.leader().as_deref(), Some("pg1"));
}

#[test]
fn empty_leader_key_and_stopping_leader() {
    let mut case = Case::new();
    case.directory.leader = None;
    assert_eq!(case.leader(), None);
    let mut case = Case::new();
    if let Some(m) = case.directory.members.get_mut("pg1") {
        m.state = Some("stopping".into());
    }
    assert_eq!(
        case.leader(),
        None,
        "a leader that is shutting down takes no writes"
    );
    assert!(!case.view().member("pg1").is_some_and(|m| m.healthy));
}

#[test]
fn one_lost_rest_answer_changes_nothing_two_do() {
    let mut case = Case::new();
    case.set_rest("pg2", None, None);
    assert_eq!(case.readable(), ["pg2", "pg3"]);
    case.set_rest("pg2", None, None);
    assert_eq!(case.readable(), ["pg3"]);
    assert!(!case.view().member("pg2").is_some_and(|m| m.healthy));
    // The leader losing REST twice: with etcd, its key still holds (see
    // a_confirmed_leader_whose_patroni_stops_answering_stays_writable);
    // with REST alone nothing is left to confirm it.
    case.set_rest("pg1", None, None);
    case.set_rest("pg1", None, None);
    assert_eq!(case.leader().as_deref(), Some("pg1"));
    case.policy = LeaderPolicy::Patroni;
    assert_eq!(case.leader(), None);
}

#[test]
fn replica_eligibility() {
    let mut case = Case::new();
    if let Some(m) = case.directory.members.get_mut("pg3") {
        m.tags
            .insert("noloadbalance".into(), serde_json::Value::Bool(true));
    }
    assert_eq!(case.readable(), ["pg2"]);
    // Lagging per REST (Patroni applied ?lag=): no new reads, but the
    // member stays healthy so its sessions continue.
    case.set_rest("pg2", Some(false), Some(false));
    assert!(case.readable().is_empty());
    assert!(case.view().member("pg2").is_some_and(|m| m.healthy));
    // Not streaming.
    let mut case = Case::new();
    if let Some(m) = case.directory.members.get_mut("pg2") {
        m.replication_state = Some("in archive recovery".into());
    }
    assert_eq!(case.readable(), ["pg3"]);
}

#[test]
fn etcd_policy_computes_lag_from_wal_positions() {
    let mut case = Case::new();
    case.policy = LeaderPolicy::Etcd;
    case.max_lag = Some(1024);
    assert_eq!(case.readable(), ["pg2", "pg3"]);
    if let Some(m) = case.directory.members.get_mut("pg2") {
        m.xlog_location = Some(202_603_224 - 4096);
    }
    assert_eq!(case.readable(), ["pg3"]);
}

#[test]
fn etcd_loss_policies() {
    let since = Instant::now();
    let mut case = Case::new();
    case.etcd = EtcdStatus::Down { since };
    case.previous_leader = Some("pg1");
    // patroni: REST alone.
    assert_eq!(case.leader().as_deref(), Some("pg1"));
    // refuse: no writes.
    case.on_etcd_loss = EtcdLossPolicy::Refuse;
    assert_eq!(case.leader(), None);
    assert_eq!(case.readable(), ["pg2", "pg3"], "reads continue");
    // freeze without failsafe: until ttl (20 s here).
    case.on_etcd_loss = EtcdLossPolicy::Freeze;
    case.now = since + Duration::from_secs(5);
    assert_eq!(case.leader().as_deref(), Some("pg1"));
    case.now = since + Duration::from_secs(21);
    assert_eq!(case.leader(), None);
    // freeze with failsafe: as long as REST confirms.
    case.directory.config.failsafe_mode = Some(true);
    assert_eq!(case.leader().as_deref(), Some("pg1"));
    case.set_rest("pg1", Some(false), Some(false));
    assert_eq!(case.leader(), None);
}

#[test]
fn nothing_before_the_first_read_of_etcd() {
    let mut case = Case::new();
    case.etcd = EtcdStatus::Connecting;
    assert_eq!(case.leader(), None);
}

mod patroni4;
