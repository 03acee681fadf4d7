//! rolegate in front of a real Patroni cluster: routing by role, following
//! switchovers and failovers, etcd loss, stopped replicas, tags, REST-only
//! discovery. Tests change the cluster, so they run one at a time, each
//! leaving the cluster healthy for the next.

mod support;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use libtest_mimic::Failed;
use tokio::sync::watch;

use support::harness::{by_name, check, run_suite, TestFn};
use support::lab::{replicas_of, MEMBERS};
use support::lab_suite::LabSuite;
use support::rolegate::Rolegate;
use support::routes::{reached, wait_for_readers, wait_for_writable_leader};
use support::{
    connect, connect_watched, conninfo, free_port, runtime, server_message, sqlstate, wait_until,
    wire, writer,
};

type Env = LabSuite;

fn main() {
    // Tests take turns with the one cluster.
    let tests: &[(&str, TestFn<Env>)] = by_name![
        rw_reaches_the_leader_and_ro_alternates_replicas,
        rest_only_cluster_routes_by_role,
        switchover_drains_old_write_sessions_and_holds_new_ones,
        failover_to_a_candidate_is_followed_like_a_switchover,
        killed_leader_writes_resume_on_the_new_leader,
        stopped_replica_leaves_the_rotation_and_its_sessions_end,
        noloadbalance_member_gets_no_reads,
        etcd_loss_falls_back_to_rest_checks,
        protocol_3_9999_is_negotiated_by_the_member,
        sync_replica_listener_follows_the_sync_key,
        a_standby_cluster_serves_reads_and_refuses_writes,
        fleet_keys_follow_the_session_protocol,
        a_client_that_leaves_while_held_is_let_go,
        a_stalled_login_holds_up_others_only_briefly,
        pooled_sessions_follow_a_switchover_and_a_killed_leader
    ];
    run_suite(tests, || LabSuite::start("patroni"), true);
}

/// In a fleet rolegate issues the cancel keys: the process id names the
/// instance and the secret is as long as the session's protocol has them
/// (4 bytes under 3.0; 32 under 3.2, which PostgreSQL 18 speaks and 15
/// negotiates down). A cancel with the issued key cancels.
fn fleet_keys_follow_the_session_protocol(env: &LabSuite) -> Result<(), Failed> {
    use std::io::Write;
    use support::wire;

    let peer = support::free_port();
    let fleet = format!("\n[fleet]\nlisten = \"127.0.0.1:{peer}\"\nid = 7\n");
    let (_rolegate, rw, _ro) = env.rolegate_with_limits("fleet-keys", &env.lab.etcd_line(), &fleet);
    for minor in [0u16, 2] {
        let mut stream = wire::connect(rw);
        stream.write_all(&wire::startup_packet(
            3,
            minor,
            &[("user", "app"), ("database", "app")],
        ))?;
        let login = wire::login(&mut stream, "app");
        check(
            login.error.is_none(),
            format!("3.{minor}: login failed: {login:?}"),
        )?;
        let (pid, secret) = login.key.clone().ok_or("no BackendKeyData")?;
        let negotiated = login.negotiated_minor.unwrap_or(minor);
        let expected = if negotiated >= 2 { 32 } else { 4 };
        check(
            (pid >> 20) & 0x7ff == 7 && pid <= i32::MAX as u32,
            format!("3.{minor}: process id {pid:#x} names instance 7"),
        )?;
        check(
            secret.len() == expected,
            format!(
                "3.{minor} (negotiated 3.{negotiated}): a secret of {} bytes, expected {expected}",
                secret.len()
            ),
        )?;
        stream.write_all(&wire::message(b'Q', b"select pg_sleep(30)\0"))?;
        std::thread::sleep(Duration::from_millis(300));
        let mut cancel = wire::connect(rw);
        cancel.write_all(&wire::cancel_request(pid, &secret))?;
        check(wire::closes(&mut cancel), "the cancel connection is closed")?;
        let mut code = None;
        while let Some(msg) = wire::read_msg(&mut stream) {
            if msg.tag == b'E' {
                code = msg.field(b'C');
                break;
            }
        }
        check(
            code.as_deref() == Some("57014"),
            format!("3.{minor}: the query ended with {code:?}"),
        )?;
        println!("    protocol 3.{minor} (negotiated 3.{negotiated}): pid {pid:#x}, {expected}-byte secret, cancelled");
    }
    Ok(())
}

/// `patronictl list` rows as (member, host:port, role), via `lab status`.
fn patronictl_members(env: &Env) -> Vec<(String, String, String)> {
    env.lab
        .run(&["status"])
        .lines()
        .filter_map(|line| {
            let cells: Vec<_> = line.split('|').map(str::trim).collect();
            (cells.len() > 4 && MEMBERS.contains(&cells[1])).then(|| {
                (
                    cells[1].to_owned(),
                    cells[2].to_owned(),
                    cells[3].to_owned(),
                )
            })
        })
        .collect()
}

/// Compares `/cluster` with `patronictl list` once rolegate has confirmed
/// a leader: ready means its listeners are bound, and under the
/// `etcd+patroni` rule the leader is confirmed only when the first REST
/// check has answered, which may come a moment later.
fn cluster_json_matches_patronictl(env: &Env, rolegate: &Rolegate) -> Result<(), Failed> {
    let (json, body) = wait_until(Duration::from_secs(15), "/cluster to name a leader", || {
        let (status, body) = rolegate.admin_get("/cluster")?;
        let json: serde_json::Value = serde_json::from_str(&body).ok()?;
        (status == 200 && json["clusters"][0]["leader"].is_string()).then_some((json, body))
    });
    let cluster = &json["clusters"][0];
    let listed = patronictl_members(env);
    check(listed.len() == 3, format!("patronictl list: {listed:?}"))?;
    for (name, address, role) in &listed {
        let member = cluster["members"]
            .as_array()
            .and_then(|ms| ms.iter().find(|m| m["name"] == name.as_str()))
            .ok_or(format!("{name} missing from /cluster: {body}"))?;
        let ours = format!(
            "{}:{}",
            member["host"].as_str().unwrap_or(""),
            member["port"]
        );
        check(&ours == address, format!("{name}: {ours} vs {address}"))?;
        let expected = if role == "Leader" {
            "primary"
        } else {
            "replica"
        };
        check(
            member["role"] == expected,
            format!("{name}: role {} vs {role}", member["role"]),
        )?;
        if role == "Leader" {
            check(
                cluster["leader"] == name.as_str(),
                format!("leader {}", cluster["leader"]),
            )?;
        }
    }
    check(cluster["sources"]["etcd"] == "up", "etcd source up")?;
    check(
        cluster["rule"] == "etcd+patroni",
        format!("rule {}", cluster["rule"]),
    )
}

fn rw_reaches_the_leader_and_ro_alternates_replicas(env: &Env) -> Result<(), Failed> {
    let (rolegate, rw, ro) = env.default_rolegate("routing");
    let leader = env.lab.leader();
    cluster_json_matches_patronictl(env, &rolegate)?;
    runtime().block_on(async {
        for _ in 0..3 {
            let (port, recovery) = reached(rw).await?;
            check(!recovery, "rw session in recovery")?;
            check(
                port == env.lab.pg_port(&leader),
                format!("rw reached {port}, leader is {leader}"),
            )?;
        }
        let mut ports = Vec::new();
        for _ in 0..4 {
            let (port, recovery) = reached(ro).await?;
            check(recovery, "ro session not on a replica")?;
            ports.push(port);
        }
        check(
            ports[0] != ports[1] && ports[0] == ports[2] && ports[1] == ports[3],
            format!("ro sessions did not alternate: {ports:?}"),
        )?;
        let mut members: Vec<_> = ports
            .iter()
            .filter_map(|p| env.lab.member_of_port(*p))
            .collect();
        members.sort();
        members.dedup();
        check(
            members == replicas_of(&leader),
            format!("ro reached {members:?}"),
        )
    })
}

fn rest_only_cluster_routes_by_role(env: &Env) -> Result<(), Failed> {
    let (_rolegate, rw, ro) = env.rolegate("rest-only", &env.lab.patroni_line());
    let leader = env.lab.leader();
    runtime().block_on(async {
        let member = wait_for_writable_leader(&env.lab, rw, None, Duration::from_secs(20)).await?;
        check(
            member == leader,
            format!("rw reached {member}, leader is {leader}"),
        )?;
        wait_for_readers(&env.lab, ro, &replicas_of(&leader), Duration::from_secs(20)).await
    })
}

/// Seconds between two JSON log lines' timestamps of the same day.
fn seconds_of_day(timestamp: &str) -> Option<f64> {
    let time = timestamp.split('T').nth(1)?.trim_end_matches('Z');
    let mut parts = time.split(':');
    let (h, m, s): (f64, f64, f64) = (
        parts.next()?.parse().ok()?,
        parts.next()?.parse().ok()?,
        parts.next()?.parse().ok()?,
    );
    Some(h * 3600.0 + m * 60.0 + s)
}

/// From rolegate's JSON log: the time from the etcd leader-key change to
/// the new leader's confirmation, and to the first session opened on it.
fn leader_change_timings(log: &str, new_leader: &str) -> (Option<f64>, Option<f64>) {
    let lines: Vec<serde_json::Value> = log
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let at = |pred: &dyn Fn(&serde_json::Value) -> bool| {
        lines
            .iter()
            .find(|l| pred(l))
            .and_then(|l| l["timestamp"].as_str())
            .and_then(seconds_of_day)
    };
    let key_moved = at(&|l| l["message"] == "etcd leader key changed" && l["to"] == new_leader);
    let confirmed = at(&|l| l["message"] == "confirmed leader changed" && l["to"] == new_leader);
    let first_session = at(&|l| {
        l["message"] == "session open"
            && l["span"]["member"] == new_leader
            && l["span"]["listener"].as_str().is_some()
    });
    let since = |t: Option<f64>| key_moved.zip(t).map(|(a, b)| b - a);
    (since(confirmed), since(first_session))
}

fn switchover_drains_old_write_sessions_and_holds_new_ones(env: &Env) -> Result<(), Failed> {
    planned_leader_change(env, "switchover", &["switchover"])
}

/// `patronictl failover --candidate` while the leader is healthy: Patroni
/// writes the failover key with the candidate only, and the leader steps
/// down as in a switchover. rolegate treats it as one: new writes held
/// from the request, none on the demoting leader, open ones drained.
fn failover_to_a_candidate_is_followed_like_a_switchover(env: &Env) -> Result<(), Failed> {
    let leader = env.lab.leader();
    let candidate = replicas_of(&leader)[1];
    planned_leader_change(env, "failover", &["failover", "--candidate", candidate])
}

/// A leader change Patroni carries out with a healthy leader (`lab`
/// command `change`), under a writer, a stream of new clients, an idle
/// write session and a readiness poller.
fn planned_leader_change(env: &Env, name: &str, change: &[&str]) -> Result<(), Failed> {
    let (rolegate, rw, _ro) = env.default_rolegate(name);
    let old_leader = env.lab.leader();
    let changes_before = rolegate.metric("rolegate_leader_changes_total", "cluster=\"demo\"");
    let demotions = || {
        rolegate.metric(
            "rolegate_sessions_ended_total",
            "cluster=\"demo\",role=\"primary\",reason=\"demotion\"",
        )
    };
    let demotions_before = demotions();
    let rt = runtime();
    rt.block_on(async {
        writer::prepare(&conninfo(rw, "app", "app")).await?;
        // Readiness as a load balancer would poll it.
        let (readiness_stop, readiness_stop_rx) = watch::channel(false);
        let readiness = {
            let admin_port = rolegate.admin_port;
            let mut stop = readiness_stop_rx;
            tokio::spawn(async move {
                let mut seen = Vec::new();
                loop {
                    let status = tokio::task::spawn_blocking(move || {
                        support::lab::http_get(admin_port, "/readyz").map(|r| r.0)
                    })
                    .await
                    .ok()
                    .flatten();
                    if seen.last() != Some(&status) {
                        seen.push(status);
                    }
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_millis(50)) => {}
                        _ = stop.changed() => return seen,
                    }
                }
            })
        };
        let (open, connection) = connect_watched(&conninfo(rw, "app", "app")).await?;
        open.simple_query("select 1").await?;

        let (stop_tx, stop_rx) = watch::channel(false);
        let writer_conninfo = format!("{} connect_timeout=1", conninfo(rw, "app", "app"));
        let writer = tokio::spawn(writer::run(writer_conninfo, 1_000_000, stop_rx.clone()));

        // New clients keep arriving during the switchover, with patience:
        // they must be held, then served by the new leader, never refused.
        let connector = {
            let mut stop = stop_rx.clone();
            tokio::spawn(async move {
                let (mut served, mut refused, mut on_replica) = (0u32, Vec::new(), 0u32);
                loop {
                    // A session opened just before the switchover request
                    // may be ended by it before its first query: that is
                    // the switchover ending a session, not a refusal.
                    match connect(&conninfo(rw, "app", "app")).await {
                        Ok(client) => {
                            match client.query_one("select pg_is_in_recovery()", &[]).await {
                                Ok(row) if row.get::<_, bool>(0) => on_replica += 1,
                                Ok(_) => served += 1,
                                Err(_) => {}
                            }
                        }
                        Err(e) => refused.push(e.to_string()),
                    }
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                        _ = stop.changed() => return (served, refused, on_replica),
                    }
                }
            })
        };
        tokio::time::sleep(Duration::from_millis(500)).await;

        let new_leader = env
            .lab
            .run_async(change)
            .await?
            .lines()
            .last()
            .unwrap_or_default()
            .to_owned();
        check(
            new_leader != old_leader && MEMBERS.contains(&new_leader.as_str()),
            format!("new leader {new_leader:?}"),
        )?;
        let member =
            wait_for_writable_leader(&env.lab, rw, Some(&old_leader), Duration::from_secs(20)).await?;
        check(
            member == new_leader,
            format!("rw reached {member}, new leader is {new_leader}"),
        )?;
        tokio::time::sleep(Duration::from_secs(1)).await;
        let _ = stop_tx.send(true);
        let stats = writer.await?;
        let (served, refused, on_replica) = connector.await?;
        let _ = readiness_stop.send(true);
        let readiness = readiness.await?;
        check(
            readiness.contains(&Some(503)) && readiness.last() == Some(&Some(200)),
            format!("/readyz went {readiness:?}; expected a 503 while no primary was confirmed, then 200"),
        )?;
        let changes = rolegate.metric("rolegate_leader_changes_total", "cluster=\"demo\"");
        check(
            changes == changes_before + 1.0,
            format!("leader changes went from {changes_before} to {changes}"),
        )?;
        let gauge = |member: &str| {
            rolegate.metric(
                "rolegate_cluster_leader",
                &format!("cluster=\"demo\",member=\"{member}\""),
            )
        };
        check(
            gauge(&new_leader) == 1.0 && gauge(&old_leader) == 0.0,
            format!("leader gauge: {new_leader}={} {old_leader}={}", gauge(&new_leader), gauge(&old_leader)),
        )?;

        // The sessions open on the old leader ran on until its PostgreSQL
        // ended them on Patroni's stop: rolegate ended none of them itself
        // at the request, and the idle one got the server's own FATAL.
        let ended_by_rolegate = demotions() - demotions_before;
        check(
            ended_by_rolegate == 0.0,
            format!(
                "rolegate ended {ended_by_rolegate} write sessions itself; the old leader's PostgreSQL should have"
            ),
        )?;
        let ended = tokio::time::timeout(Duration::from_secs(5), connection).await;
        let err = match ended {
            Ok(Ok(Err(e))) => e,
            other => {
                return Err(
                    format!("old write session was not ended with an error: {other:?}").into(),
                )
            }
        };
        let db = err
            .as_db_error()
            .ok_or(format!("not a server error: {err}"))?;
        check(
            db.code().code() == "57P01",
            format!("sqlstate {}", db.code().code()),
        )?;

        check(
            refused.is_empty(),
            format!("new connections were refused: {refused:?}"),
        )?;
        check(
            on_replica == 0,
            format!("{on_replica} new connections reached a replica"),
        )?;
        check(served > 0, "no connection was served")?;
        check(
            stats.misrouted == 0,
            format!("{} writes were misrouted", stats.misrouted),
        )?;
        check(
            stats.acknowledged.len() > 50,
            format!("the writer barely wrote: {stats:?}"),
        )?;
        let missing =
            writer::missing_rows(&conninfo(rw, "app", "app"), &stats.seqs()).await?;
        check(
            missing == 0,
            format!("{missing} acknowledged rows are missing"),
        )?;
        if let Ok(dir) = std::env::var("ROLEGATE_TEST_KEEP_LOGS") {
            let _ = std::fs::copy(
                &rolegate.log_path,
                PathBuf::from(dir).join(format!("{name}.log")),
            );
        }
        check(
            stats.longest_gap < Duration::from_secs(15),
            format!("writes stopped for {:?}", stats.longest_gap),
        )?;
        let (confirmed, first_session) = leader_change_timings(&rolegate.log(), &new_leader);
        println!(
            "{name} {old_leader} -> {new_leader}: write-unavailability window {:?}, \
             failed connects {}, failed writes {}, acknowledged {}, missing {missing}; \
             leader key -> confirmed {:?}s, leader key -> first write session {:?}s; \
             clients held and served {served}",
            stats.longest_gap,
            stats.failed_connects,
            stats.failed_writes,
            stats.acknowledged.len(),
            confirmed,
            first_session,
        );
        Ok(())
    })
}

/// Also: a client without a connect timeout of its own (psql's default)
/// that arrives just after the kill is held until the new leader is
/// confirmed and then served. Its connect to the dead leader is refused,
/// and the wait for a newer view is time held, which the handshake
/// timeout does not count.
/// `kill -9` of the leader's Patroni and PostgreSQL, not restarted: the
/// member killed.
async fn kill_leader(env: &Env) -> Result<String, Failed> {
    let said = env.lab.run_async(&["kill-leader", "--no-restart"]).await?;
    Ok(said.lines().last().unwrap_or_default().to_owned())
}

fn killed_leader_writes_resume_on_the_new_leader(env: &Env) -> Result<(), Failed> {
    let (_rolegate, rw, _ro) =
        env.rolegate_with_limits("kill", &env.lab.etcd_line(), "handshake_timeout = \"5s\"\n");
    let old_leader = env.lab.leader();
    runtime().block_on(async {
        writer::prepare(&conninfo(rw, "app", "app")).await?;
        let (stop_tx, stop_rx) = watch::channel(false);
        let writer_conninfo = format!("{} connect_timeout=1", conninfo(rw, "app", "app"));
        let writer = tokio::spawn(writer::run(writer_conninfo, 2_000_000, stop_rx));
        tokio::time::sleep(Duration::from_millis(500)).await;
        let killed = kill_leader(env).await?;
        check(killed == old_leader, format!("killed {killed}, leader was {old_leader}"))?;
        tokio::time::sleep(Duration::from_secs(1)).await;
        let patient = tokio::spawn(reached(rw));
        let new_leader = wait_for_writable_leader(&env.lab, rw, Some(&old_leader), Duration::from_secs(60)).await?;
        let (port, in_recovery) = tokio::time::timeout(Duration::from_secs(40), patient)
            .await
            .map_err(|_| Failed::from("the client that arrived after the kill was not served within 40 s"))??
            .map_err(|e| format!("the client that arrived 1 s after the kill, without a connect timeout: {}", e.message().unwrap_or("failed")))?;
        check(
            !in_recovery && env.lab.member_of_port(port) == Some(new_leader.as_str()),
            format!("the held client reached port {port} (in recovery: {in_recovery}), not {new_leader}"),
        )?;
        tokio::time::sleep(Duration::from_secs(1)).await;
        let _ = stop_tx.send(true);
        let stats = writer.await?;
        check(stats.misrouted == 0, format!("{} writes were misrouted", stats.misrouted))?;
        let missing = writer::missing_rows(&conninfo(rw, "app", "app"), &stats.seqs()).await?;
        println!(
            "kill -9 of {old_leader}: writes resumed on {new_leader}; write-unavailability window {:?}, \
             failed connects {}, failed writes {}, acknowledged {}, missing after failover {missing} \
             (asynchronous replication may lose the last commits of a killed leader)",
            stats.longest_gap,
            stats.failed_connects,
            stats.failed_writes,
            stats.acknowledged.len(),
        );
        Ok::<(), Failed>(())
    })?;
    env.lab.run(&["start-member", &old_leader]);
    Ok(())
}

fn stopped_replica_leaves_the_rotation_and_its_sessions_end(env: &Env) -> Result<(), Failed> {
    let (_rolegate, _rw, ro) = env.default_rolegate("replica-stop");
    let leader = env.lab.leader();
    let replicas = replicas_of(&leader);
    let (victim, survivor) = (replicas[0], replicas[1]);
    runtime().block_on(async {
        // Open read sessions until one sits on the victim.
        let mut on_victim = None;
        for _ in 0..4 {
            let (client, connection) = connect_watched(&conninfo(ro, "app", "app")).await?;
            let row = client.query_one("select inet_server_port()", &[]).await?;
            if env.lab.member_of_port(row.get::<_, i32>(0) as u16) == Some(victim) {
                on_victim = Some((client, connection));
                break;
            }
        }
        let (client, connection) = on_victim.ok_or("no read session reached the victim")?;
        env.lab.run_async(&["stop-member", victim]).await?;
        let ended = tokio::time::timeout(Duration::from_secs(20), connection).await;
        check(
            matches!(ended, Ok(Ok(Err(_)))),
            format!("session on {victim} did not end with an error: {ended:?}"),
        )?;
        check(
            client.simple_query("select 1").await.is_err(),
            "the session is closed",
        )?;
        wait_for_readers(&env.lab, ro, &[survivor], Duration::from_secs(30)).await?;
        env.lab.run_async(&["start-member", victim]).await?;
        env.lab.run_async(&["wait"]).await?;
        wait_for_readers(&env.lab, ro, &replicas, Duration::from_secs(30)).await
    })
}

fn noloadbalance_member_gets_no_reads(env: &Env) -> Result<(), Failed> {
    let (_rolegate, _rw, ro) = env.default_rolegate("noloadbalance");
    let leader = env.lab.leader();
    let replicas = replicas_of(&leader);
    let (tagged, other) = (replicas[0], replicas[1]);
    env.lab.run(&["tag", tagged, "noloadbalance", "true"]);
    let result = runtime().block_on(async {
        wait_for_readers(&env.lab, ro, &[other], Duration::from_secs(30)).await?;
        for _ in 0..4 {
            let (port, _) = reached(ro).await?;
            check(
                env.lab.member_of_port(port) == Some(other),
                format!("a read reached {port}"),
            )?;
        }
        Ok::<(), Failed>(())
    });
    env.lab.run(&["tag", tagged, "noloadbalance", "false"]);
    result?;
    runtime().block_on(wait_for_readers(
        &env.lab,
        ro,
        &replicas,
        Duration::from_secs(30),
    ))
}

fn etcd_loss_falls_back_to_rest_checks(env: &Env) -> Result<(), Failed> {
    let (rolegate, rw, ro) = env.rolegate(
        "etcd-loss",
        &format!("{}\non_etcd_loss = \"patroni\"", env.lab.etcd_line()),
    );
    let leader = env.lab.leader();
    // With failsafe_mode, Patroni keeps its primary while etcd is away, so
    // the cluster stays writable and rolegate must keep routing to it.
    env.lab.run(&["failsafe", "on"]);
    env.lab.run(&["stop-etcd"]);
    let result = runtime().block_on(async {
        let started = Instant::now();
        while !rolegate.log().contains("etcd is unreachable") {
            check(
                started.elapsed() < Duration::from_secs(15),
                "rolegate did not notice etcd loss",
            )?;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        // Past Patroni's retry_timeout: a non-failsafe leader would demote now.
        tokio::time::sleep(Duration::from_secs(8)).await;
        let (port, recovery) = reached(rw).await?;
        check(!recovery, "rw reached a server in recovery")?;
        check(
            port == env.lab.pg_port(&leader),
            format!("rw reached {port}, leader is {leader}"),
        )?;
        let (_, recovery) = reached(ro).await?;
        check(recovery, "ro reached the primary")?;
        let err = connect(&conninfo(rw, "app", "wrong"))
            .await
            .err()
            .ok_or("bad password accepted")?;
        check(
            sqlstate(&err).as_deref() == Some("28P01"),
            "authentication still relayed",
        )
    });
    env.lab.run(&["start-etcd"]);
    env.lab.run(&["failsafe", "off"]);
    result
}

/// rolegate following `scope` on the lab's etcd, with one listener per
/// role in `roles`; returns it and the listeners' ports in that order.
fn rolegate_with_roles(env: &Env, name: &str, scope: &str, roles: &[&str]) -> (Rolegate, Vec<u16>) {
    let ports: Vec<u16> = roles.iter().map(|_| support::free_port()).collect();
    let listeners: String = roles
        .iter()
        .zip(&ports)
        .map(|(role, port)| {
            format!("\n[[listeners]]\nlisten = \"127.0.0.1:{port}\"\ncluster = \"c\"\nrole = \"{role}\"\n")
        })
        .collect();
    let config = format!(
        "[log]\nformat = \"json\"\n\n[limits]\nhold_timeout = \"3s\"\n\n[clusters.c]\nscope = \"{scope}\"\nnamespace = \"/service/\"\n{}\n{listeners}",
        env.lab.etcd_line()
    );
    (Rolegate::start(&env.root, name, &config), ports)
}

/// A `sync-replica` listener sends sessions to Patroni's synchronous
/// standbys only (with Patroni 4's quorum commit, to every quorum
/// standby), and ends a session whose standby leaves the sync key.
fn sync_replica_listener_follows_the_sync_key(env: &Env) -> Result<(), Failed> {
    let (_rolegate, ports) = rolegate_with_roles(env, "sync-replica", "demo", &["sync-replica"]);
    let sync_port = ports[0];
    let sync = env.lab.run(&["sync", "on"]);
    let result = runtime().block_on(async {
        let sync = sync.lines().last().unwrap_or_default().to_owned();
        check(
            MEMBERS.contains(&sync.as_str()),
            format!("synchronous standby {sync:?}"),
        )?;
        wait_for_readers(
            &env.lab,
            sync_port,
            &[sync.as_str()],
            Duration::from_secs(30),
        )
        .await?;
        if env.lab.stack() == "current" {
            let quorum = env.lab.run_async(&["sync", "quorum"]).await?;
            let standbys: Vec<&str> = quorum
                .lines()
                .last()
                .unwrap_or_default()
                .split(',')
                .collect();
            check(standbys.len() == 2, format!("quorum standbys {standbys:?}"))?;
            wait_for_readers(&env.lab, sync_port, &standbys, Duration::from_secs(30)).await?;
        }
        // A session on a synchronous standby ends when it leaves the key.
        let (client, connection) = connect_watched(&conninfo(sync_port, "app", "app")).await?;
        client.simple_query("select 1").await?;
        env.lab.run_async(&["sync", "off"]).await?;
        let ended = tokio::time::timeout(Duration::from_secs(20), connection)
            .await
            .map_err(|_| "the sync-replica session outlived the sync key")?;
        let err = match ended {
            Ok(Err(e)) => e,
            other => return Err(format!("the session did not end with an error: {other:?}").into()),
        };
        check(
            sqlstate(&err).as_deref() == Some("57P01")
                && server_message(&err).contains("no longer a synchronous standby"),
            format!("ended with {}", server_message(&err)),
        )?;
        // No synchronous standby now: new sessions are held, then 57P03.
        let refused = connect(&conninfo(sync_port, "app", "app")).await;
        match refused {
            Err(e) => check(
                sqlstate(&e).as_deref() == Some("57P03"),
                format!("refused with {}", server_message(&e)),
            ),
            Ok(_) => Err("a sync-replica session was served without a synchronous standby".into()),
        }
    });
    env.lab.run(&["sync", "off"]);
    result
}

/// A standby cluster (Patroni's `standby_cluster`, replicating from the
/// lab's cluster): its standby leader serves reads, and the primary
/// listener answers 57P03 saying it is a standby cluster.
fn a_standby_cluster_serves_reads_and_refuses_writes(env: &Env) -> Result<(), Failed> {
    env.lab.run(&["standby", "up"]);
    let result = standby_cluster_routes(env);
    env.lab.run(&["standby", "down"]);
    result
}

fn standby_cluster_routes(env: &Env) -> Result<(), Failed> {
    let standby_port = 5444 + env.lab.offset;
    let (_rolegate, ports) =
        rolegate_with_roles(env, "standby", "demo-standby", &["primary", "replica"]);
    runtime().block_on(async {
        let started = std::time::Instant::now();
        loop {
            match reached(ports[1]).await {
                Ok((port, in_recovery)) => {
                    check(
                        port == standby_port && in_recovery,
                        format!("a read reached port {port} (in recovery: {in_recovery})"),
                    )?;
                    break;
                }
                Err(e) if started.elapsed() > Duration::from_secs(30) => {
                    return Err(format!(
                        "no read reached the standby leader: {}",
                        e.message().unwrap_or("failed")
                    )
                    .into())
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(300)).await,
            }
        }
        match connect(&conninfo(ports[0], "app", "app")).await {
            Ok(_) => Err(Failed::from(
                "a write session was served by a standby cluster",
            )),
            Err(e) => check(
                sqlstate(&e).as_deref() == Some("57P03")
                    && server_message(&e).contains("standby cluster"),
                format!("the primary listener answered {}", server_message(&e)),
            ),
        }
    })
}

/// A client asking for protocol 3.9999 (libpq's test builds do; future
/// clients will ask for 3.3+) with a `_pq_` option: rolegate passes the
/// request on, the member answers NegotiateProtocolVersion with the newest
/// version it speaks (3.2 for PostgreSQL 18, 3.0 for 15), and the session
/// goes on at that version, its cancel key as the member issued it (32
/// bytes under 3.2), and a cancel through rolegate cancels.
fn protocol_3_9999_is_negotiated_by_the_member(env: &Env) -> Result<(), Failed> {
    let (_rolegate, rw, _ro) = env.default_rolegate("v3-9999");
    let mut stream = support::wire::connect(rw);
    use std::io::Write;
    stream.write_all(&support::wire::startup_packet(
        3,
        9999,
        &[
            ("user", "app"),
            ("database", "app"),
            ("_pq_.rolegate_test", "x"),
        ],
    ))?;
    let login = support::wire::login(&mut stream, "app");
    check(login.error.is_none(), format!("login failed: {login:?}"))?;
    let expected_minor = if env.lab.stack() == "debian" { 0 } else { 2 };
    check(
        login.negotiated_minor == Some(expected_minor),
        format!(
            "negotiated {:?}, expected 3.{expected_minor}",
            login.negotiated_minor
        ),
    )?;
    check(
        login.unrecognised == ["_pq_.rolegate_test"],
        format!("unrecognised options {:?}", login.unrecognised),
    )?;
    let (pid, secret) = login.key.clone().ok_or("no BackendKeyData")?;
    let expected_len = if expected_minor >= 2 { 32 } else { 4 };
    check(
        secret.len() == expected_len,
        format!(
            "a {}-byte cancel key under 3.{expected_minor}",
            secret.len()
        ),
    )?;
    stream.write_all(&support::wire::message(b'Q', b"select pg_sleep(30)\0"))?;
    std::thread::sleep(Duration::from_millis(500));
    let mut canceller = support::wire::connect(rw);
    canceller.write_all(&support::wire::cancel_request(pid, &secret))?;
    let started = std::time::Instant::now();
    let cancelled = loop {
        match support::wire::read_msg(&mut stream) {
            Some(msg) if msg.tag == b'E' => break msg.field(b'C'),
            Some(_) => continue,
            None => break None,
        }
    };
    check(
        cancelled.as_deref() == Some("57014") && started.elapsed() < Duration::from_secs(10),
        format!(
            "pg_sleep ended with {cancelled:?} after {:?}",
            started.elapsed()
        ),
    )
}

/// A client that gives up while its session is held (as libpq does after
/// `connect_timeout`) is let go at once, not when the hold ends: otherwise
/// every retry of a reconnect storm would leave a held session behind, and
/// each would open a backend connection for nobody once the leader is
/// confirmed. The cluster here has no leader at all (a scope nobody
/// runs), so its sessions are held for the whole `hold_timeout`.
fn a_client_that_leaves_while_held_is_let_go(env: &Env) -> Result<(), Failed> {
    let rw = free_port();
    let config = format!(
        r#"
[clusters.empty]
scope = "nobody-runs-this"
namespace = "/service/"
{etcd}

[[listeners]]
listen = "127.0.0.1:{rw}"
cluster = "empty"
role = "primary"

[limits]
hold_timeout = "60s"
"#,
        etcd = env.lab.etcd_line()
    );
    let rolegate = Rolegate::start(&env.root, "held-and-gone", &config);
    let held = || rolegate.metric("rolegate_held_sessions", "cluster=\"empty\"");
    let startup = wire::startup_packet(3, 0, &[("user", "app"), ("database", "app")]);
    let clients: Vec<_> = (0..5)
        .map(|_| {
            let mut client = wire::connect(rw);
            std::io::Write::write_all(&mut client, &startup).map(|()| client)
        })
        .collect::<Result<_, _>>()?;
    wait_until(Duration::from_secs(10), "five held sessions", || {
        (held() == 5.0).then_some(())
    });
    drop(clients);
    wait_until(Duration::from_secs(5), "the held sessions let go", || {
        (held() == 0.0).then_some(())
    });
    let gone = rolegate.metric(
        "rolegate_client_connections_total",
        "outcome=\"client_gone\"",
    );
    check(
        gone == 5.0,
        format!("{gone} connections counted as client_gone, expected 5"),
    )
}

/// With one login slot per member (`backend_logins = 1`), a client that
/// stops answering its login holds the slot for about a second, not until
/// its handshake times out: the next session waits in the member's queue
/// (its gauge appears), then logs in while the first is still silent.
fn a_stalled_login_holds_up_others_only_briefly(env: &Env) -> Result<(), Failed> {
    use std::io::Write;

    let (rolegate, rw, _ro) = env.rolegate_with_limits(
        "login-gate",
        &env.lab.etcd_line(),
        "backend_logins = 1\nhandshake_timeout = \"60s\"\n",
    );
    let rt = runtime();
    rt.block_on(wait_for_writable_leader(
        &env.lab,
        rw,
        None,
        Duration::from_secs(30),
    ))?;
    let queue_exists = || {
        let (_, body) = rolegate.admin_get("/metrics").unwrap_or_default();
        support::rolegate::metric_value(&body, "rolegate_login_queue", "").is_some()
    };
    check(!queue_exists(), "no session has queued yet")?;

    let mut stalled = wire::connect(rw);
    stalled.write_all(&wire::startup_packet(
        3,
        0,
        &[("user", "app"), ("database", "app")],
    ))?;
    let request = wire::read_msg(&mut stalled).ok_or("no answer to the stalled login")?;
    check(
        request.tag == b'R',
        format!(
            "the member asked for a password, got {:?}",
            request.tag as char
        ),
    )?;

    let started = Instant::now();
    let client = rt.block_on(connect(&conninfo(rw, "app", "app")))?;
    let waited = started.elapsed();
    rt.block_on(client.simple_query("select 1"))?;
    println!("    the second login took {waited:?} behind the stalled one");
    check(
        queue_exists(),
        "the second login waited in the member's queue (rolegate_login_queue)",
    )?;
    check(
        waited < Duration::from_secs(8),
        format!("the second login waited {waited:?}; the stalled one should give its slot up after about 1 s"),
    )?;
    stalled.set_nonblocking(true)?;
    let mut byte = [0u8; 1];
    let silent = matches!(
        std::io::Read::read(&mut stalled, &mut byte),
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock
    );
    check(
        silent,
        "the stalled login is still open, waiting for its answer",
    )
}

/// A pooled rolegate (session mode) in front of the lab: app's secret as
/// the leader stores it (every member has the same `pg_authid`), a pooled
/// primary and a pooled replica listener.
fn pooled_rolegate(env: &Env, name: &str) -> (Rolegate, u16, u16) {
    let secret = env.lab.psql(
        &env.lab.leader(),
        "select rolpassword from pg_authid where rolname = 'app'",
    );
    let userlist = env.root.join(format!("{name}-userlist.txt"));
    std::fs::write(&userlist, format!("\"app\" \"{secret}\"\n")).expect("write userlist");
    let pooled = format!(
        "pool_mode = \"session\"\nauth_file = \"{}\"\npool_size = 4",
        userlist.display()
    );
    let (rw, ro) = (free_port(), free_port());
    let config = format!(
        "[clusters.demo]\nscope = \"demo\"\nnamespace = \"/service/\"\n{}\n\n\
         [[listeners]]\nlisten = \"127.0.0.1:{rw}\"\ncluster = \"demo\"\nrole = \"primary\"\n{pooled}\n\n\
         [[listeners]]\nlisten = \"127.0.0.1:{ro}\"\ncluster = \"demo\"\nrole = \"replica\"\n{pooled}\n\n\
         [limits]\nhold_timeout = \"30s\"\nhandshake_timeout = \"5s\"\n",
        env.lab.etcd_line()
    );
    (Rolegate::start(&env.root, name, &config), rw, ro)
}

/// Pooled sessions through a switchover, then a `kill -9` of the new
/// leader: writes go on the leader of the moment only (none on a server in
/// recovery), no row acknowledged before the switchover is lost, reads
/// stay on replicas, and the pools serve again after each change.
fn pooled_sessions_follow_a_switchover_and_a_killed_leader(env: &Env) -> Result<(), Failed> {
    let (rolegate, rw, ro) = pooled_rolegate(env, "pooled");
    let first = env.lab.leader();
    let killed = std::sync::Mutex::new(None::<String>);
    let result = runtime().block_on(async {
        writer::prepare(&conninfo(rw, "app", "app")).await?;
        let (stop_tx, stop_rx) = watch::channel(false);
        let writer_conninfo = format!("{} connect_timeout=1", conninfo(rw, "app", "app"));
        let writer = tokio::spawn(writer::run(writer_conninfo, 4_000_000, stop_rx));
        tokio::time::sleep(Duration::from_millis(500)).await;
        env.lab.run_async(&["switchover"]).await?;
        let second = wait_for_writable_leader(&env.lab, rw, Some(&first), Duration::from_secs(60)).await?;
        let (port, in_recovery) = reached(ro).await?;
        check(in_recovery, format!("a pooled read reached port {port}, not a replica"))?;
        tokio::time::sleep(Duration::from_secs(1)).await;
        let victim = kill_leader(env).await?;
        *killed.lock().unwrap_or_else(|p| p.into_inner()) = Some(victim.clone());
        check(victim == second, format!("killed {victim}, the leader was {second}"))?;
        let third = wait_for_writable_leader(&env.lab, rw, Some(&second), Duration::from_secs(60)).await?;
        tokio::time::sleep(Duration::from_secs(1)).await;
        let _ = stop_tx.send(true);
        let stats = writer.await?;
        check(stats.misrouted == 0, format!("{} writes reached a server in recovery", stats.misrouted))?;
        let acked_before_kill: Vec<i64> = stats
            .acknowledged
            .iter()
            .filter(|a| env.lab.member_of_port(a.port) != Some(second.as_str()))
            .map(|a| a.seq)
            .collect();
        let missing = writer::missing_rows(&conninfo(rw, "app", "app"), &acked_before_kill).await?;
        check(missing == 0, format!("{missing} rows acknowledged outside the killed leader are missing"))?;
        let servers: std::collections::BTreeSet<_> = stats
            .acknowledged
            .iter()
            .filter_map(|a| env.lab.member_of_port(a.port))
            .collect();
        check(
            servers.contains(first.as_str()) && servers.contains(third.as_str()),
            format!("writes reached {servers:?}, expected {first} and {third} among them"),
        )?;
        println!(
            "pooled: switchover {first} -> {second}, then {second} killed -> {third}: {} rows acknowledged \
             on {servers:?}, none in recovery, none lost outside the killed leader; longest gap {:?}",
            stats.acknowledged.len(),
            stats.longest_gap
        );
        Ok::<(), Failed>(())
    });
    if let Some(victim) = killed.into_inner().unwrap_or_else(|p| p.into_inner()) {
        env.lab.run_in_cleanup(&["start-member", &victim]);
    }
    drop(rolegate);
    result
}
