//! rolegate in a container, in front of the compose cluster (etcd, three
//! Patroni + PostgreSQL 18 nodes), all on a private Docker network that
//! `docker/lab` makes: the images build here without a registry, the
//! container runs unprivileged and turns healthy, `docker stop` drains, and
//! failures of the cluster and of the network itself (a container taken off
//! the network, single links cut in a network namespace) are followed.
//! Tests change the cluster, so they run one at a time, and each leaves it
//! healthy for the next.

mod support;

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use libtest_mimic::Failed;
use tokio::sync::watch;

use support::docker_lab::{DockerLab, MEMBERS, SHUTDOWN_TIMEOUT_SECS};
use support::harness::{by_name, check, run_suite, TestFn};
use support::lab::http_get;
use support::writer::{self, WriterStats};
use support::{connect, connect_watched, conninfo, leader_key, runtime, sqlstate};

type Env = DockerLab;

fn main() {
    let tests: &[(&str, TestFn<Env>)] = by_name![
        the_image_runs_unprivileged_and_turns_healthy,
        rw_reaches_the_primary_and_ro_a_replica,
        a_switchover_and_a_killed_leader_are_followed_without_losing_a_write,
        a_leader_off_the_network_acknowledges_no_write_after_its_key_expires,
        rolegate_cut_from_one_replica_reads_from_the_other,
        rolegate_cut_from_etcd_follows_through_rest_and_returns_to_the_watch,
        docker_stop_drains_sessions
    ];
    run_suite(tests, DockerLab::start, true);
}

fn app(port: u16) -> String {
    conninfo(port, "app", "app")
}

fn writer_conninfo(rw: u16) -> String {
    format!("{} connect_timeout=1", app(rw))
}

/// The address of the server a new session on `port` reaches, and whether
/// it is in recovery.
async fn reached(port: u16) -> Result<(IpAddr, bool), Failed> {
    let client = connect(&app(port)).await?;
    let row = client
        .query_one("select host(inet_server_addr()), pg_is_in_recovery()", &[])
        .await?;
    let addr: String = row.get(0);
    Ok((addr.parse()?, row.get(1)))
}

/// Polls until a new rw session reaches a writable server other than `not`.
async fn wait_for_writable(rw: u16, not: IpAddr, limit: Duration) -> Result<IpAddr, Failed> {
    let started = Instant::now();
    loop {
        if let Ok((addr, false)) = reached(rw).await {
            if addr != not {
                return Ok(addr);
            }
        }
        if started.elapsed() > limit {
            return Err(format!("no writable server other than {not} within {limit:?}").into());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Polls until eight new ro sessions in a row reach exactly `expected`.
async fn wait_for_readers(ro: u16, expected: &[IpAddr], limit: Duration) -> Result<(), Failed> {
    let want: BTreeSet<IpAddr> = expected.iter().copied().collect();
    let started = Instant::now();
    loop {
        let mut seen = BTreeSet::new();
        for _ in 0..8 {
            if let Ok((addr, true)) = reached(ro).await {
                seen.insert(addr);
            }
        }
        if seen == want {
            return Ok(());
        }
        if started.elapsed() > limit {
            return Err(format!("ro sessions reached {seen:?}, expected {want:?}").into());
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// A writer through rw until `stop`: its rows and their servers.
fn start_writer(
    rw: u16,
    seq_base: i64,
) -> (watch::Sender<bool>, tokio::task::JoinHandle<WriterStats>) {
    let (stop, stop_rx) = watch::channel(false);
    (
        stop,
        tokio::spawn(writer::run(writer_conninfo(rw), seq_base, stop_rx)),
    )
}

/// Every acknowledged row is in the table, read through rw.
async fn check_no_row_lost(rw: u16, stats: &WriterStats, what: &str) -> Result<(), Failed> {
    check(
        !stats.acknowledged.is_empty(),
        format!("{what}: no write was acknowledged"),
    )?;
    check(
        stats.misrouted == 0,
        format!(
            "{what}: {} writes reached a server in recovery",
            stats.misrouted
        ),
    )?;
    let missing = writer::missing_rows(&app(rw), &stats.seqs()).await?;
    check(
        missing == 0,
        format!(
            "{what}: {missing} of {} acknowledged rows are missing",
            stats.acknowledged.len()
        ),
    )
}

/// A gauge or counter of rolegate's /metrics for cluster "demo".
fn metric(env: &Env, name: &str) -> Option<f64> {
    let (_, body) = http_get(env.admin(), "/metrics")?;
    let prefix = format!("{name}{{cluster=\"demo\"}} ");
    body.lines()
        .find_map(|line| line.strip_prefix(&prefix))
        .and_then(|value| value.trim().parse().ok())
}

async fn wait_for_metric(env: &Env, name: &str, value: f64, limit: Duration) -> Result<(), Failed> {
    let started = Instant::now();
    loop {
        let now = metric(env, name);
        if now == Some(value) {
            return Ok(());
        }
        if started.elapsed() > limit {
            return Err(format!("{name} is {now:?}, not {value}, after {limit:?}").into());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn docker(args: &[&str]) -> Result<String, Failed> {
    let output = std::process::Command::new("docker").args(args).output()?;
    if !output.status.success() {
        return Err(format!(
            "docker {args:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        )
        .into());
    }
    Ok(String::from_utf8_lossy(&output.stdout).trim().to_owned())
}

fn the_image_runs_unprivileged_and_turns_healthy(env: &Env) -> Result<(), Failed> {
    let id = env.container("rolegate");
    let user = docker(&[
        "image",
        "inspect",
        "--format",
        "{{.Config.User}}",
        "rolegate:local",
    ])?;
    check(
        user == "10001:10001",
        format!("the image's user is {user:?}"),
    )?;
    // The process itself, as the host's kernel sees it.
    let pid = docker(&["inspect", "--format", "{{.State.Pid}}", &id])?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let uids = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .unwrap_or_default()
        .split_whitespace()
        .collect::<Vec<_>>();
    check(
        uids.len() == 4 && uids.iter().all(|u| *u == "10001"),
        format!("rolegate runs with uids {uids:?}"),
    )?;
    let started = Instant::now();
    let health = loop {
        let health = docker(&["inspect", "--format", "{{.State.Health.Status}}", &id])?;
        if health != "starting" || started.elapsed() > Duration::from_secs(60) {
            break health;
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    check(
        health == "healthy",
        format!("the HEALTHCHECK says {health}"),
    )?;
    let bytes: f64 = docker(&[
        "image",
        "inspect",
        "--format",
        "{{.Size}}",
        "rolegate:local",
    ])?
    .parse()?;
    let patroni = docker(&[
        "run",
        "--rm",
        "--network",
        "none",
        "--entrypoint",
        "patroni",
        "rolegate-lab-patroni:current",
        "--version",
    ])?;
    check(
        patroni.contains("4.1.5"),
        format!("the Patroni image runs {patroni:?}"),
    )?;
    runtime().block_on(async {
        let client = connect(&app(env.rw())).await?;
        let version: String = client.query_one("show server_version", &[]).await?.get(0);
        check(version.starts_with("18."), format!("the cluster runs PostgreSQL {version}"))?;
        println!(
            "rolegate:local is {:.1} MB, runs as uid 10001 and is {health}; the cluster runs {patroni} and PostgreSQL {version}",
            bytes / 1e6
        );
        Ok(())
    })
}

fn rw_reaches_the_primary_and_ro_a_replica(env: &Env) -> Result<(), Failed> {
    let leader = env.leader();
    let leader_addr = env.address(&leader);
    let replicas: Vec<IpAddr> = MEMBERS
        .iter()
        .filter(|m| **m != leader)
        .map(|m| env.address(m))
        .collect();
    runtime().block_on(async {
        let (addr, in_recovery) = reached(env.rw()).await?;
        check(
            addr == leader_addr && !in_recovery,
            format!("rw reached {addr} (in recovery: {in_recovery}), the leader {leader} is {leader_addr}"),
        )?;
        wait_for_readers(env.ro(), &replicas, Duration::from_secs(20)).await?;
        println!("rw reached {leader} ({leader_addr}); ro reached both replicas {replicas:?}");
        Ok(())
    })
}

fn a_switchover_and_a_killed_leader_are_followed_without_losing_a_write(
    env: &Env,
) -> Result<(), Failed> {
    let rw = env.rw();
    runtime().block_on(async {
        writer::prepare(&app(rw)).await?;
        let (stop, writer) = start_writer(rw, 1_000_000);
        tokio::time::sleep(Duration::from_secs(1)).await;
        let first = env.run_async(&["leader"]).await?;
        let first_addr = env.address(&first);
        let second = env.run_async(&["switchover"]).await?;
        let second_addr = wait_for_writable(rw, first_addr, Duration::from_secs(30)).await?;
        check(
            second_addr == env.address(&second),
            format!("after the switchover to {second} rw reached {second_addr}"),
        )?;
        let killed = env.run_async(&["kill-leader"]).await?;
        check(killed == second, format!("kill-leader killed {killed}, not {second}"))?;
        let third_addr = wait_for_writable(rw, second_addr, Duration::from_secs(60)).await?;
        tokio::time::sleep(Duration::from_secs(1)).await;
        let _ = stop.send(true);
        let stats = writer.await?;
        check_no_row_lost(rw, &stats, "switchover and kill").await?;
        let servers: BTreeSet<IpAddr> = stats.acknowledged.iter().map(|a| a.addr).collect();
        check(
            servers.contains(&first_addr) && servers.contains(&second_addr) && servers.contains(&third_addr),
            format!("writes reached {servers:?}, expected {first_addr}, {second_addr} and {third_addr}"),
        )?;
        println!(
            "switchover {first} -> {second}, then {second} killed: {} rows acknowledged, none lost; \
             longest gap {:?}, failed writes {}, failed connects {}",
            stats.acknowledged.len(),
            stats.longest_gap,
            stats.failed_writes,
            stats.failed_connects
        );
        Ok(())
    })
}

fn a_leader_off_the_network_acknowledges_no_write_after_its_key_expires(
    env: &Env,
) -> Result<(), Failed> {
    let rw = env.rw();
    let old = env.leader();
    let old_addr = env.address(&old);
    let etcd = format!("http://{}:2379", env.address("etcd"));
    runtime().block_on(async {
        writer::prepare(&app(rw)).await?;
        let (stop, writer) = start_writer(rw, 2_000_000);
        let watcher = tokio::spawn(leader_key::leaves(etcd, old.clone(), stop.subscribe()));
        tokio::time::sleep(Duration::from_secs(1)).await;
        if watcher.is_finished() {
            return Err(format!("watching the leader key failed: {:?}", watcher.await).into());
        }
        // Its Patroni loses etcd and rolegate loses its PostgreSQL at once.
        let cut_at = Instant::now();
        env.run_async(&["partition", &old]).await?;
        let healed = async {
            let new_addr = wait_for_writable(rw, old_addr, Duration::from_secs(90)).await?;
            tokio::time::sleep(Duration::from_secs(1)).await;
            let _ = stop.send(true);
            Ok::<_, Failed>(new_addr)
        }
        .await;
        env.run_async(&["heal", &old]).await?;
        let new_addr = healed?;
        let stats = writer.await?;
        let expired_at = watcher.await??.ok_or(format!("the leader key never left {old}"))?;
        let late = stats
            .acknowledged
            .iter()
            .filter(|a| a.addr == old_addr && a.at >= expired_at)
            .count();
        check(late == 0, format!("{late} writes were acknowledged by {old} after its leader key expired"))?;
        let resumed = stats
            .acknowledged
            .iter()
            .find(|a| a.addr == new_addr)
            .map(|a| a.at)
            .ok_or(format!("no write reached the new leader {new_addr}"))?;
        check_no_row_lost(rw, &stats, "partition").await?;
        // Back on the network, the old leader must stream as a replica.
        env.run_async(&["wait"]).await?;
        let now = env.run_async(&["leader"]).await?;
        check(now != old, format!("{old} is the leader again"))?;
        println!(
            "{old} off the network: its key expired {:?} after the cut, writes resumed on {new_addr} {:?} \
             after the expiry; {} rows acknowledged, none lost, none by {old} after the expiry; \
             after the heal {old} streams from {now}",
            expired_at - cut_at,
            resumed.saturating_duration_since(expired_at),
            stats.acknowledged.len()
        );
        Ok(())
    })
}

fn rolegate_cut_from_one_replica_reads_from_the_other(env: &Env) -> Result<(), Failed> {
    let leader = env.leader();
    let replicas: Vec<&str> = MEMBERS.iter().copied().filter(|m| *m != leader).collect();
    let (cut, kept) = (replicas[0], replicas[1]);
    let (cut_addr, kept_addr) = (env.address(cut), env.address(kept));
    runtime().block_on(async {
        // Read sessions on both replicas, each watched for rolegate's FATAL.
        let mut sessions = Vec::new();
        for _ in 0..6 {
            let (client, connection) = connect_watched(&app(env.ro())).await?;
            let addr: String = client.query_one("select host(inet_server_addr())", &[]).await?.get(0);
            sessions.push((addr.parse::<IpAddr>()?, client, connection));
        }
        let on_cut = sessions.iter().filter(|s| s.0 == cut_addr).count();
        check(
            on_cut > 0 && on_cut < sessions.len(),
            format!("{on_cut} of {} read sessions landed on {cut}", sessions.len()),
        )?;
        env.cut("rolegate", cut).await?;
        let mut ended = Vec::new();
        for (addr, client, connection) in sessions {
            if addr == cut_addr {
                let end = tokio::time::timeout(Duration::from_secs(30), connection)
                    .await
                    .map_err(|_| format!("a read session on {cut} was not ended within 30 s of the cut"))??;
                let code = end.err().as_ref().and_then(sqlstate);
                check(code.is_some(), format!("a session on {cut} ended without an ErrorResponse"))?;
                ended.extend(code);
            } else {
                client
                    .query_one("select 1", &[])
                    .await
                    .map_err(|e| format!("a read session on {kept} failed: {e}"))?;
            }
        }
        wait_for_readers(env.ro(), &[kept_addr], Duration::from_secs(10)).await?;
        env.mend("rolegate", cut).await?;
        wait_for_readers(env.ro(), &[cut_addr, kept_addr], Duration::from_secs(30)).await?;
        println!(
            "rolegate cut from {cut}: its {} read sessions ended ({ended:?}), those on {kept} went on, \
             new reads went to {kept}; after the mend to both again",
            ended.len()
        );
        Ok(())
    })
}

fn rolegate_cut_from_etcd_follows_through_rest_and_returns_to_the_watch(
    env: &Env,
) -> Result<(), Failed> {
    let rw = env.rw();
    runtime().block_on(async {
        wait_for_metric(env, "rolegate_etcd_up", 1.0, Duration::from_secs(10)).await?;
        let reconnects = metric(env, "rolegate_etcd_reconnects_total").unwrap_or_default();
        writer::prepare(&app(rw)).await?;
        let (stop, writer) = start_writer(rw, 3_000_000);
        env.cut("rolegate", "etcd").await?;
        wait_for_metric(env, "rolegate_etcd_up", 0.0, Duration::from_secs(30)).await?;
        // Patroni still has etcd: a switchover that rolegate sees only
        // through the members' REST answers.
        let old = env.run_async(&["leader"]).await?;
        let new = env.run_async(&["switchover"]).await?;
        let new_addr = wait_for_writable(rw, env.address(&old), Duration::from_secs(30)).await?;
        check(
            new_addr == env.address(&new),
            format!(
                "rolegate without etcd sent writes to {new_addr}, the leader {new} is {}",
                env.address(&new)
            ),
        )?;
        env.mend("rolegate", "etcd").await?;
        wait_for_metric(env, "rolegate_etcd_up", 1.0, Duration::from_secs(60)).await?;
        let after = metric(env, "rolegate_etcd_reconnects_total").unwrap_or_default();
        check(
            after > reconnects,
            "the etcd watch came back without a reconnect counted",
        )?;
        let _ = stop.send(true);
        let stats = writer.await?;
        check_no_row_lost(rw, &stats, "etcd cut").await?;
        println!(
            "rolegate cut from etcd: followed the switchover {old} -> {new} through REST, \
             watch back after the mend; {} rows acknowledged, none lost",
            stats.acknowledged.len()
        );
        Ok(())
    })
}

fn docker_stop_drains_sessions(env: &Env) -> Result<(), Failed> {
    let id = env.container("rolegate");
    runtime().block_on(async {
        let (client, connection) = connect_watched(&app(env.rw())).await?;
        client.query_one("select 1", &[]).await?;
        let mut stop = std::process::Command::new("docker");
        stop.args(["stop", "--time", "30", &id]);
        let stopping = tokio::task::spawn_blocking(move || stop.output());
        tokio::time::sleep(Duration::from_secs(1)).await;
        // Draining: the open session still works.
        client
            .query_one("select 1", &[])
            .await
            .map_err(|e| format!("the session failed while rolegate drained: {e}"))?;
        let limit = Duration::from_secs(SHUTDOWN_TIMEOUT_SECS + 20);
        let end = tokio::time::timeout(limit, connection)
            .await
            .map_err(|_| format!("the session was not ended within {limit:?} of docker stop"))??;
        let code = end.err().as_ref().and_then(sqlstate);
        check(
            code.as_deref() == Some("57P01"),
            format!("the drained session ended with {code:?}"),
        )?;
        let stopped = stopping.await??;
        check(stopped.status.success(), "docker stop failed")?;
        let exit = docker(&["inspect", "--format", "{{.State.ExitCode}}", &id])?;
        check(exit == "0", format!("rolegate exited with {exit}"))?;
        docker(&["start", &id])?;
        env.run_async(&["wait"]).await?;
        println!(
            "docker stop: the open session kept working, then ended with 57P01; rolegate exited 0"
        );
        Ok(())
    })
}
