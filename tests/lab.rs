//! The lab itself: a real etcd and a 3-node Patroni cluster that looks
//! like the one the fixtures of its stack were captured from
//! (`tests/fixtures/patroni-3.0/` for Debian's Patroni 3.0.2,
//! `tests/fixtures/patroni-4.1/` for the current stack). These checks only
//! read the cluster, so they run in parallel.

mod support;

use std::collections::BTreeSet;
use std::process::Command;

use libtest_mimic::Failed;
use rolegate::topology::patroni_data::{MemberRecord, RestStatus};

use support::harness::{by_name, check, run_suite, TestFn};
use support::lab::{http_get, Lab, MEMBERS};

fn main() {
    let tests: &[(&str, TestFn<Lab>)] = by_name![
        one_leader_and_two_streaming_replicas,
        etcd_holds_the_leader_and_three_members,
        rest_checks_answer_as_patroni_documents,
        app_role_authenticates_with_scram
    ];
    run_suite(tests, Lab::ensure_up, false);
}

fn one_leader_and_two_streaming_replicas(lab: &Lab) -> Result<(), Failed> {
    let leader = lab.leader();
    check(
        MEMBERS.contains(&leader.as_str()),
        format!("leader {leader:?}"),
    )?;
    check(
        lab.psql(&leader, "select pg_is_in_recovery()") == "f",
        "the leader is not in recovery",
    )?;
    let streaming = lab.psql(
        &leader,
        "select string_agg(application_name, ',' order by application_name) \
         from pg_stat_replication where state = 'streaming'",
    );
    let expected: Vec<_> = MEMBERS.iter().filter(|m| **m != leader).copied().collect();
    check(
        streaming == expected.join(","),
        format!("streaming replicas: {streaming:?}, expected {expected:?}"),
    )?;
    for replica in expected {
        check(
            lab.psql(replica, "select pg_is_in_recovery()") == "t",
            format!("{replica} is in recovery"),
        )?;
    }
    Ok(())
}

fn etcd_holds_the_leader_and_three_members(lab: &Lab) -> Result<(), Failed> {
    let output = Command::new("etcdctl")
        .args([
            &format!("--endpoints=127.0.0.1:{}", lab.etcd_port()),
            "get",
            "--prefix",
            "/service/demo/",
        ])
        .env("ETCDCTL_API", "3")
        .output()?;
    check(
        output.status.success(),
        String::from_utf8_lossy(&output.stderr),
    )?;
    let text = String::from_utf8_lossy(&output.stdout);
    let lines: Vec<_> = text.lines().collect();
    let pairs: Vec<_> = lines.chunks(2).filter(|c| c.len() == 2).collect();
    let keys: BTreeSet<_> = pairs.iter().map(|c| c[0]).collect();
    check(
        keys.contains("/service/demo/leader"),
        format!("keys: {keys:?}"),
    )?;
    check(keys.contains("/service/demo/config"), "config key")?;
    let members: Vec<_> = pairs
        .iter()
        .filter(|c| c[0].starts_with("/service/demo/members/"))
        .collect();
    check(members.len() == 3, format!("{} member keys", members.len()))?;

    // Each member record has the fields of the captured fixture, and
    // rolegate's parser reads it.
    let fixture = std::fs::read_to_string(lab.fixtures().join("etcd-get-prefix.txt"))?;
    let fixture_lines: Vec<_> = fixture.lines().collect();
    let fixture_pairs: Vec<_> = fixture_lines.chunks(2).filter(|c| c.len() == 2).collect();
    let fixture_leader = fixture_pairs
        .iter()
        .find(|c| c[0] == "/service/demo/leader")
        .map(|c| c[1])
        .unwrap_or_default();
    let fixture_replica = fixture_pairs
        .iter()
        .find(|c| {
            c[0].starts_with("/service/demo/members/")
                && c[0] != format!("/service/demo/members/{fixture_leader}")
        })
        .map(|c| c[1])
        .unwrap_or_default();
    let fixture_fields = json_fields(fixture_replica);
    let leader = lab.leader();
    for pair in members {
        let name = pair[0].trim_start_matches("/service/demo/members/");
        let record = MemberRecord::parse(pair[1].as_bytes())?;
        check(record.is_running(), format!("{name} is running"))?;
        let expected_port = lab.pg_port(name);
        check(
            record.postgres_address() == Some(("127.0.0.1".to_owned(), expected_port)),
            format!("{name} conn_url {:?}", record.conn_url),
        )?;
        check(
            record.is_primary_role() == (name == leader),
            format!("{name} role {:?}", record.role),
        )?;
        if name != leader {
            let fields = json_fields(pair[1]);
            check(
                fields == fixture_fields,
                format!("{name} fields {fields:?} differ from the fixture's {fixture_fields:?}"),
            )?;
        }
    }
    Ok(())
}

fn json_fields(json: &str) -> BTreeSet<String> {
    serde_json::from_str::<serde_json::Map<String, serde_json::Value>>(json)
        .map(|m| m.keys().cloned().collect())
        .unwrap_or_default()
}

fn rest_checks_answer_as_patroni_documents(lab: &Lab) -> Result<(), Failed> {
    let leader = lab.leader();
    for member in MEMBERS {
        let is_leader = member == leader;
        let primary = lab.rest_status(member, "/primary");
        let replica = lab.rest_status(member, "/replica");
        check(
            primary == Some(if is_leader { 200 } else { 503 }),
            format!("{member} /primary answered {primary:?}"),
        )?;
        check(
            replica == Some(if is_leader { 503 } else { 200 }),
            format!("{member} /replica answered {replica:?}"),
        )?;
        let (_, body) = http_get(lab.rest_port(member), "/patroni").ok_or("GET /patroni")?;
        let status = RestStatus::parse(body.as_bytes())?;
        let role = status.role.as_deref().unwrap_or_default();
        // Patroni 3.0 says "master", 4.x "primary".
        let expected = if lab.stack() == "debian" {
            "master"
        } else {
            "primary"
        };
        check(
            (role == expected) == is_leader,
            format!("{member} reports role {role:?}"),
        )?;
    }
    Ok(())
}

fn app_role_authenticates_with_scram(lab: &Lab) -> Result<(), Failed> {
    let leader = lab.leader();
    let conninfo = |password: &str| {
        format!(
            "host=127.0.0.1 port={} user=app password={password} dbname=app",
            lab.pg_port(&leader)
        )
    };
    let ok = Command::new("psql")
        .arg(conninfo("app"))
        .args(["-AtXc", "select current_user"])
        .output()?;
    check(
        String::from_utf8_lossy(&ok.stdout).trim() == "app",
        String::from_utf8_lossy(&ok.stderr),
    )?;
    let method = lab.psql(
        &leader,
        "select rolpassword like 'SCRAM-SHA-256$%' from pg_authid where rolname = 'app'",
    );
    check(method == "t", "app's password is stored as SCRAM")?;
    let bad = Command::new("psql")
        .arg(conninfo("wrong"))
        .args(["-AtXc", "select 1"])
        .output()?;
    check(
        String::from_utf8_lossy(&bad.stderr).contains("password authentication failed"),
        String::from_utf8_lossy(&bad.stderr),
    )
}
