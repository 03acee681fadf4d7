//! rolegate against a three-member etcd of the test's own, in front of
//! real PostgreSQL servers: the etcd faults that need a quorum. A member
//! cut off from its peers must count as etcd lost (it keeps its watch
//! streams open and silent otherwise), and a rolling restart of the etcd
//! members must not count as lost at all.
//!
//! The cluster's keys are written the way Patroni 4.1 writes them, and
//! rolegate follows them under `leader_policy = "etcd"` (the key alone), so
//! what is tested is how rolegate follows etcd, with nothing else moving.

mod support;

use std::time::{Duration, Instant};

use libtest_mimic::Failed;

use support::etcd_cluster::EtcdCluster;
use support::harness::{by_name, check, run_suite, TestFn};
use support::rolegate::Rolegate;
use support::static_cluster::StaticCluster;
use support::{connect, conninfo, free_port, runtime, sqlstate};

type Env = StaticCluster;

fn main() {
    let tests: &[(&str, TestFn<Env>)] = by_name![
        a_member_cut_off_from_its_quorum_counts_as_etcd_lost,
        a_rolling_etcd_restart_ends_no_session
    ];
    run_suite(tests, || StaticCluster::start("etcd-quorum"), true);
}

/// Writes the keys of a healthy Patroni cluster "quorum": the static
/// primary leads, the two other servers are streaming replicas.
fn seed(etcd: &EtcdCluster, env: &Env) {
    let prefix = "/service/quorum";
    etcd.put(
        &format!("{prefix}/config"),
        r#"{"ttl":20,"loop_wait":1,"retry_timeout":5}"#,
    );
    let servers = [
        ("pg1", &env.primary, "primary"),
        ("pg2", &env.replicas[0], "replica"),
        ("pg3", &env.replicas[1], "replica"),
    ];
    for (name, server, role) in servers {
        let record = format!(
            r#"{{"conn_url":"postgres://127.0.0.1:{}/postgres","state":"running","role":"{role}","version":"4.1.5","xlog_location":100{}}}"#,
            server.port,
            if role == "replica" {
                r#","replication_state":"streaming""#
            } else {
                ""
            }
        );
        etcd.put(&format!("{prefix}/members/{name}"), &record);
    }
    etcd.put(&format!("{prefix}/leader"), "pg1");
}

/// rolegate following "quorum" through `endpoints`, refusing writes when
/// etcd is lost; returns it with its rw port.
fn rolegate(env: &Env, name: &str, endpoints: &[String]) -> (Rolegate, u16) {
    let (rw, ro) = (free_port(), free_port());
    let endpoints = endpoints
        .iter()
        .map(|e| format!("\"{e}\""))
        .collect::<Vec<_>>()
        .join(", ");
    let config = format!(
        r#"
[log]
format = "json"

[limits]
hold_timeout = "2s"

[clusters.quorum]
scope = "quorum"
namespace = "/service/"
etcd = [{endpoints}]
leader_policy = "etcd"
on_etcd_loss = "refuse"

[[listeners]]
listen = "127.0.0.1:{rw}"
cluster = "quorum"
role = "primary"

[[listeners]]
listen = "127.0.0.1:{ro}"
cluster = "quorum"
role = "replica"
"#
    );
    (Rolegate::start(&env.root, name, &config), rw)
}

/// Waits until rolegate's log holds `needle`.
fn wait_for_log(rolegate: &Rolegate, needle: &str, limit: Duration) -> Result<(), Failed> {
    let started = Instant::now();
    while !rolegate.log().contains(needle) {
        check(
            started.elapsed() < limit,
            format!("rolegate did not log {needle:?} within {limit:?}"),
        )?;
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}

/// The port of the server a new rw session reaches.
async fn writable_port(rw: u16) -> Result<u16, tokio_postgres::Error> {
    let client = connect(&conninfo(rw, "app", "app")).await?;
    let row = client.query_one("select inet_server_port()", &[]).await?;
    Ok(row.get::<_, i32>(0) as u16)
}

/// The etcd member rolegate follows loses its peers (frozen: their
/// connections stay open and silent, as in a partition). That member keeps
/// rolegate's watch open and answers its pings, but it has no leader, so
/// what it serves may be stale: rolegate must treat etcd as lost (here:
/// refuse writes), and follow it again once the quorum is back.
fn a_member_cut_off_from_its_quorum_counts_as_etcd_lost(env: &Env) -> Result<(), Failed> {
    let etcd = EtcdCluster::start(&env.root.join("isolated"));
    seed(&etcd, env);
    let (rolegate, rw) = rolegate(env, "isolated", &[etcd.endpoint(0)]);
    let rt = runtime();
    let port = rt.block_on(async {
        let started = Instant::now();
        loop {
            match writable_port(rw).await {
                Ok(port) => return Ok(port),
                Err(e) if started.elapsed() > Duration::from_secs(20) => {
                    return Err(Failed::from(format!("no write session: {e}")))
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
    })?;
    check(port == env.primary.port, format!("rw reached {port}"))?;

    etcd.freeze(1);
    etcd.freeze(2);
    let cut = Instant::now();
    let lost = wait_for_log(&rolegate, "etcd is unreachable", Duration::from_secs(30));
    let refused = rt.block_on(writable_port(rw));
    etcd.thaw(1);
    etcd.thaw(2);
    lost?;
    println!(
        "rolegate counted etcd as lost {:.1?} after its member lost its peers",
        cut.elapsed()
    );
    match refused {
        Ok(port) => {
            return Err(format!(
            "a write session reached port {port} while etcd was lost and on_etcd_loss = \"refuse\""
        )
            .into())
        }
        Err(e) => check(
            sqlstate(&e).as_deref() == Some("57P03"),
            format!("expected 57P03, got {e:?}"),
        )?,
    }

    wait_for_log(
        &rolegate,
        "etcd is reachable again",
        Duration::from_secs(30),
    )?;
    let port = rt.block_on(writable_port(rw))?;
    check(
        port == env.primary.port,
        format!("after healing rw reached {port}"),
    )
}

/// Each etcd member is restarted in turn under a write session: a watch
/// that reconnects (to the same member or another) within the grace
/// period is no outage, so with `on_etcd_loss = "refuse"` no session ends
/// and no write fails.
fn a_rolling_etcd_restart_ends_no_session(env: &Env) -> Result<(), Failed> {
    let mut etcd = EtcdCluster::start(&env.root.join("rolling"));
    seed(&etcd, env);
    let endpoints: Vec<_> = (0..3).map(|i| etcd.endpoint(i)).collect();
    let (rolegate, rw) = rolegate(env, "rolling", &endpoints);
    let rt = runtime();
    let client = rt.block_on(async {
        let started = Instant::now();
        loop {
            match connect(&conninfo(rw, "app", "app")).await {
                Ok(client) => return Ok(client),
                Err(e) if started.elapsed() > Duration::from_secs(20) => {
                    return Err(Failed::from(format!("no write session: {e}")))
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
    })?;
    rt.block_on(
        client.batch_execute(
            "create temporary table rolling (n int); insert into rolling values (0)",
        ),
    )?;
    let (stop_tx, stop_rx) = std::sync::mpsc::channel::<()>();
    let restarts = std::thread::spawn(move || {
        for i in 0..3 {
            etcd.restart(i);
            std::thread::sleep(Duration::from_secs(2));
        }
        let _ = stop_tx.send(());
        etcd
    });
    let mut writes = 0u32;
    let written: Result<(), Failed> = rt.block_on(async {
        let started = Instant::now();
        while stop_rx.try_recv().is_err() {
            check(
                started.elapsed() < Duration::from_secs(120),
                "the rolling restart took over 120 s",
            )?;
            writes += 1;
            client
                .execute("insert into rolling values ($1)", &[&(writes as i32)])
                .await
                .map_err(|e| format!("write {writes} failed during the rolling restart: {e:?}"))?;
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(())
    });
    let etcd = restarts.join().map_err(|_| "the restart thread panicked")?;
    let log = rolegate.log();
    written.map_err(|e| {
        let etcd_lines: Vec<_> = log
            .lines()
            .filter(|l| l.contains("etcd") || l.contains("ending session"))
            .collect();
        format!(
            "{}\nrolegate's etcd log lines:\n{}",
            e.message().unwrap_or("failed"),
            etcd_lines.join("\n")
        )
    })?;
    check(
        log.contains("etcd connection lost, reconnecting"),
        "rolegate's etcd connection was never restarted: the test proved nothing",
    )?;
    check(
        !log.contains("etcd is unreachable"),
        "a rolling restart was taken for an etcd outage",
    )?;
    check(!log.contains("ending session"), "rolegate ended a session")?;
    let count: i64 = rt
        .block_on(client.query_one("select count(*) from rolling", &[]))?
        .get(0);
    check(
        count == i64::from(writes) + 1,
        format!("{count} rows for {writes} writes"),
    )?;
    // How long each reconnect took, against the grace period.
    let reconnects: Vec<u64> = log
        .lines()
        .filter(|l| l.contains("re-established within the grace period"))
        .filter_map(|l| {
            let value: serde_json::Value = serde_json::from_str(l).ok()?;
            value["after_ms"].as_u64()
        })
        .collect();
    println!(
        "{writes} writes through a rolling restart of three etcd members, none failed; \
         the watch reconnected after {reconnects:?} ms"
    );
    drop(etcd);
    Ok(())
}
