//! Parsing what Patroni writes and answers, on captures from real clusters
//! (`tests/fixtures/`) and on the shapes each Patroni version uses.

use super::*;

/// Parses the `etcd-get-prefix.txt` capture: key line, value line.
fn etcd_keys() -> BTreeMap<String, String> {
    let text = fixture("etcd-get-prefix.txt");
    let lines: Vec<_> = text.lines().collect();
    lines
        .chunks(2)
        .filter(|c| c.len() == 2)
        .map(|c| (c[0].to_owned(), c[1].to_owned()))
        .collect()
}

#[test]
fn etcd_member_records_from_a_real_cluster() {
    let keys = etcd_keys();
    let pg1 = MemberRecord::parse(keys["/service/demo/members/pg1"].as_bytes()).expect("pg1");
    assert!(pg1.is_primary_role() && pg1.is_running() && pg1.is_streaming());
    assert_eq!(pg1.postgres_address(), Some(("127.0.0.1".to_owned(), 5441)));
    assert_eq!(
        pg1.api_url.as_deref(),
        Some("http://127.0.0.1:8041/patroni")
    );
    let pg2 = MemberRecord::parse(keys["/service/demo/members/pg2"].as_bytes()).expect("pg2");
    assert!(pg2.is_replica_role());
    assert_eq!(pg2.xlog_location, Some(202_603_224));
    assert!(!pg2.tag("noloadbalance"));
}

#[test]
fn dynamic_config_from_a_real_cluster() {
    let keys = etcd_keys();
    let config = DynamicConfig::parse(keys["/service/demo/config"].as_bytes()).expect("config");
    assert_eq!(config.ttl_secs(), 20);
    assert_eq!(config.failsafe_mode, None);
    let failsafe = DynamicConfig::parse(br#"{"failsafe_mode": true}"#).expect("parse");
    assert_eq!(failsafe.failsafe_mode, Some(true));
    assert_eq!(failsafe.ttl_secs(), 30);
}

#[test]
fn rest_bodies_from_a_real_cluster() {
    let capture = fixture("node-pg3-primary.txt");
    let (status, body) = split_http_capture(&capture);
    assert_eq!(status, 503);
    let parsed = RestStatus::parse(body.as_bytes()).expect("body");
    assert_eq!(parsed.role.as_deref(), Some("replica"));
    assert_eq!(parsed.state.as_deref(), Some("running"));
    let (status, _) = split_http_capture(&fixture("node-pg2-replica.txt"));
    assert_eq!(status, 200);
}

#[test]
fn cluster_listing_becomes_member_records() {
    let capture = fixture("node-pg2-cluster.txt");
    let (_, body) = split_http_capture(&capture);
    let listing = ClusterListing::parse(body.as_bytes()).expect("listing");
    assert_eq!(listing.members.len(), 3);
    let leader = listing.members[0].to_record();
    assert!(leader.is_primary_role());
    assert_eq!(
        leader.postgres_address(),
        Some(("127.0.0.1".to_owned(), 5441))
    );
    assert!(listing.members[1].to_record().is_replica_role());
}

#[test]
fn failover_intents() {
    let now = SystemTime::now();
    let intent = FailoverIntent::parse(br#"{"leader":"pg1"}"#).expect("switchover");
    assert!(intent.is_due_switchover_from("pg1", now));
    assert!(!intent.is_due_switchover_from("pg2", now));
    let intent = FailoverIntent::parse(br#"{"leader":"pg1","member":"pg3"}"#).expect("parse");
    assert_eq!(intent.member.as_deref(), Some("pg3"));
    let later = FailoverIntent::parse(
        br#"{"leader":"pg1","member":"pg3","scheduled_at":"2030-01-01T00:00:00+00:00"}"#,
    )
    .expect("parse");
    assert!(!later.is_due_switchover_from("pg1", now));
    assert!(!later.is_due_to("pg3", now));
    // From its time on, a scheduled switchover is Patroni's to do.
    let due = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_893_456_000);
    assert!(later.is_due_switchover_from("pg1", due));
    assert!(later.is_due_to("pg3", due));
    // Patroni writes microseconds and any offset.
    let offset = FailoverIntent::parse(
        br#"{"leader":"pg1","scheduled_at":"2029-12-31T23:00:00.250000-01:00"}"#,
    )
    .expect("parse");
    assert_eq!(
        offset.scheduled_for(),
        Some(Ok(due + std::time::Duration::from_millis(250)))
    );
    let garbled =
        FailoverIntent::parse(br#"{"leader":"pg1","scheduled_at":"soon"}"#).expect("parse");
    assert!(!garbled.is_due(due));
    assert_eq!(FailoverIntent::parse(b"{}"), None);
    assert_eq!(FailoverIntent::parse(b"null"), None);
    assert_eq!(FailoverIntent::parse(b"pg1:pg3"), None);
}

/// From Patroni 3.0.4 on a replica record without `replication_state`
/// does not stream; older records never carry the field.
#[test]
fn replication_state_follows_the_version() {
    let record = |json: &str| MemberRecord::parse(json.as_bytes()).expect("parse");
    let old = record(r#"{"role":"replica","state":"running","version":"3.0.2"}"#);
    assert!(old.is_streaming());
    let new = record(r#"{"role":"replica","state":"running","version":"4.1.5"}"#);
    assert!(!new.is_streaming(), "4.1 without replication_state");
    let boundary = record(r#"{"role":"replica","state":"running","version":"3.0.4"}"#);
    assert!(!boundary.is_streaming());
    let streaming = record(
        r#"{"role":"replica","state":"running","version":"4.1.5","replication_state":"streaming"}"#,
    );
    assert!(streaming.is_streaming());
    let unknown = record(r#"{"role":"replica","state":"running","version":"dev"}"#);
    assert!(
        unknown.is_streaming(),
        "an unreadable version is taken as old"
    );
    assert!(record(r#"{"role":"replica","state":"running"}"#).is_streaming());
}

/// Patroni 4 writes numbers as strings and booleans as words when an
/// operator did (`patronictl edit-config`); Patroni accepts them, so
/// rolegate must read them, not fall back to defaults.
#[test]
fn dynamic_config_accepts_patronis_spellings() {
    let config = DynamicConfig::parse(br#"{"ttl":"25","failsafe_mode":"on"}"#).expect("parse");
    assert_eq!((config.ttl_secs(), config.failsafe_mode), (25, Some(true)));
    for (word, value) in [
        ("true", true),
        ("yes", true),
        ("off", false),
        ("false", false),
    ] {
        let json = format!(r#"{{"failsafe_mode":"{word}"}}"#);
        let config = DynamicConfig::parse(json.as_bytes()).expect("parse");
        assert_eq!(config.failsafe_mode, Some(value), "{word}");
    }
    let odd = DynamicConfig::parse(br#"{"ttl":{"x":1},"failsafe_mode":"maybe"}"#)
        .expect("a value of another shape is ignored");
    assert_eq!((odd.ttl, odd.failsafe_mode), (None, None));
}

/// Patroni 4.1's `/cluster` gives a replica's replication state as its
/// `state`; the member is running.
#[test]
fn cluster_listing_replication_states_are_running() {
    let listing = ClusterListing::parse(
        br#"{"members":[
            {"name":"pg1","role":"leader","state":"running","host":"127.0.0.1","port":5441,"timeline":1},
            {"name":"pg2","role":"replica","state":"streaming","host":"127.0.0.1","port":5442,"timeline":1,"lag":0},
            {"name":"pg3","role":"replica","state":"in archive recovery","host":"127.0.0.1","port":5443,"timeline":1,"lag":0}
        ]}"#,
    )
    .expect("parse");
    let records: Vec<_> = listing.members.iter().map(|m| m.to_record()).collect();
    assert!(records[0].is_primary_role() && records[0].is_running());
    assert!(records[1].is_replica_role() && records[1].is_running() && records[1].is_streaming());
    assert!(records[2].is_running() && !records[2].is_streaming());
}

/// `patronictl failover --candidate` with a healthy leader writes the
/// key with `member` only; the leader steps down as in a switchover.
#[test]
fn a_failover_to_a_candidate_moves_away_from_the_leader() {
    let now = SystemTime::now();
    let intent = FailoverIntent::parse(br#"{"member":"pg3"}"#).expect("parse");
    assert!(intent.is_due_switchover_from("pg1", now));
    assert!(!intent.is_due_switchover_from("pg3", now), "already there");
    assert!(intent.is_due_to("pg3", now));
}

#[test]
fn standby_leader_serves_reads_and_leads_no_writes() {
    let record = MemberRecord::parse(
        br#"{"role":"standby_leader","state":"running","version":"4.1.5","replication_state":"streaming"}"#,
    )
    .expect("parse");
    assert!(record.is_standby_leader() && record.is_replica_role());
    assert!(!record.is_primary_role());
}

#[test]
fn tags_and_states() {
    let record = MemberRecord::parse(
        br#"{"conn_url":"postgres://[::1]:6000/postgres","role":"replica","state":"running",
             "replication_state":"in archive recovery","tags":{"noloadbalance":"true"}}"#,
    )
    .expect("parse");
    assert!(record.tag("noloadbalance"));
    assert!(!record.is_streaming());
    assert_eq!(record.postgres_address(), Some(("::1".to_owned(), 6000)));
}

#[test]
fn hostile_json_is_an_error_not_a_panic() {
    for input in [&b""[..], b"{", b"{\"xlog_location\": -1}", b"\xff\xfe"] {
        assert!(MemberRecord::parse(input).is_err(), "{input:?}");
    }
    // serde reads an empty array as a record with no fields: it has no
    // address, so the fuser leaves it out.
    assert_eq!(
        MemberRecord::parse(b"[]").map(|r| r.postgres_address()),
        Ok(None)
    );
    assert!(RestStatus::parse(b"null").is_err());
    assert!(MemberRecord::parse(br#"{"conn_url": "not a url"}"#)
        .expect("parses")
        .postgres_address()
        .is_none());
}
