//! Faults in the cluster around rolegate, on the real lab: etcd stopped
//! and restarted under traffic, a slow and a stalled etcd link, a frozen
//! Patroni, the leader partitioned from etcd, and a soak through
//! switchovers and a kill. What must hold throughout: no write session on a
//! server in recovery, no acknowledged write lost, no write acknowledged by
//! a leader after its leader key expired, and nothing left behind.
//! Tests change the cluster, so they run one at a time.

mod support;

use std::io::Write;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use libtest_mimic::Failed;
use tokio::sync::watch;

use support::forwarder::{Forwarder, Link};
use support::harness::{by_name, check, run_suite, TestFn};
use support::lab::{replicas_of, Lab, MEMBERS};
use support::lab_suite::LabSuite;
use support::procinfo::Usage;
use support::rolegate::Rolegate;
use support::routes::{reached, wait_for_readers, wait_for_writable_leader};
use support::{churn, conninfo, leader_key, runtime, wire, writer};

type Env = LabSuite;

fn main() {
    let tests: &[(&str, TestFn<Env>)] = by_name![
        etcd_stopped_and_restarted_under_traffic,
        slow_then_stalled_etcd_link,
        frozen_replica_patroni_leaves_the_read_rotation,
        a_member_that_left_during_the_login_gets_no_pipelined_byte,
        partitioned_leader_acknowledges_no_write_after_its_key_expires,
        soak_through_switchovers_and_a_kill
    ];
    // Patroni 3.0.2 demotes even under failsafe_mode when etcd goes away
    // between a loop's read and its key update (lab/README.md), so this one
    // runs on the current stack, whose failsafe holds.
    let failsafe: &[(&str, TestFn<Env>)] = by_name![a_primary_kept_under_failsafe_stays_writable];
    let current = std::env::var("LAB_STACK").is_ok_and(|s| s == "current");
    let tests: Vec<_> = tests
        .iter()
        .chain(failsafe.iter().filter(|_| current))
        .copied()
        .collect();
    run_suite(&tests, || LabSuite::start("faults"), true);
}

fn writer_conninfo(rw: u16) -> String {
    format!("{} connect_timeout=1", conninfo(rw, "app", "app"))
}

fn etcd_address(lab: &Lab) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], lab.etcd_port()))
}

/// Waits until rolegate's log holds `needle` at least `count` times.
async fn wait_for_log(
    rolegate: &Rolegate,
    needle: &str,
    count: usize,
    limit: Duration,
) -> Result<(), Failed> {
    let started = Instant::now();
    while rolegate.log().matches(needle).count() < count {
        check(
            started.elapsed() < limit,
            format!("rolegate did not log {needle:?} (x{count}) within {limit:?}"),
        )?;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}

/// Waits until rolegate has established its etcd watch once more than
/// the `before` times it had.
async fn wait_for_new_watch(rolegate: &Rolegate, before: usize) -> Result<(), Failed> {
    wait_for_log(
        rolegate,
        "watching etcd",
        before + 1,
        Duration::from_secs(30),
    )
    .await
}

/// Checks common to every writer: nothing misrouted, nothing lost.
async fn check_writes(rw: u16, stats: &writer::WriterStats, what: &str) -> Result<usize, Failed> {
    check(
        stats.misrouted == 0,
        format!("{what}: {} writes were misrouted", stats.misrouted),
    )?;
    check(
        !stats.acknowledged.is_empty(),
        format!("{what}: no write was acknowledged"),
    )?;
    let missing = writer::missing_rows(&conninfo(rw, "app", "app"), &stats.seqs()).await?;
    check(
        missing == 0,
        format!("{what}: {missing} acknowledged rows are missing"),
    )?;
    Ok(missing)
}

fn etcd_stopped_and_restarted_under_traffic(env: &Env) -> Result<(), Failed> {
    let (rolegate, rw, ro) = env.default_rolegate("etcd-restart");
    let result = runtime().block_on(async {
        writer::prepare(&conninfo(rw, "app", "app")).await?;
        let (stop_tx, stop_rx) = watch::channel(false);
        let writer = tokio::spawn(writer::run(writer_conninfo(rw), 1_000_000, stop_rx.clone()));
        let reader = tokio::spawn(churn::run(
            conninfo(ro, "app", "app"),
            true,
            Duration::from_millis(100),
            stop_rx,
        ));
        tokio::time::sleep(Duration::from_secs(1)).await;
        env.lab.run_async(&["stop-etcd"]).await?;
        wait_for_log(&rolegate, "etcd is unreachable", 1, Duration::from_secs(15)).await?;
        // Past Patroni's retry_timeout (5 s): without failsafe_mode the
        // leader demotes itself and the cluster has no primary at all.
        tokio::time::sleep(Duration::from_secs(10)).await;
        let watching = rolegate.log().matches("watching etcd").count();
        env.lab.run_async(&["start-etcd"]).await?;
        wait_for_new_watch(&rolegate, watching).await?;
        let leader = wait_for_writable_leader(&env.lab, rw, None, Duration::from_secs(90)).await?;
        tokio::time::sleep(Duration::from_secs(1)).await;
        let _ = stop_tx.send(true);
        let stats = writer.await?;
        let reads = reader.await?;
        let missing = check_writes(rw, &stats, "etcd restart").await?;
        check(
            reads.sessions > 0,
            format!("no read session was served: {reads:?}"),
        )?;
        println!(
            "etcd stopped and restarted: writes resumed on {leader}; longest write gap {:?}, \
             acknowledged {}, failed connects {}, failed writes {}, missing {missing}; \
             read sessions {:?}",
            stats.longest_gap,
            stats.acknowledged.len(),
            stats.failed_connects,
            stats.failed_writes,
            reads,
        );
        Ok::<(), Failed>(())
    });
    env.lab.run(&["start-etcd"]);
    result
}

fn slow_then_stalled_etcd_link(env: &Env) -> Result<(), Failed> {
    let link = Forwarder::start(etcd_address(&env.lab));
    link.set(Link::Delay(Duration::from_millis(250)));
    let (rolegate, rw, _ro) = env.rolegate(
        "slow-etcd",
        &format!("etcd = [\"http://{}\"]", link.address()),
    );
    let old_leader = env.lab.leader();
    runtime().block_on(async {
        writer::prepare(&conninfo(rw, "app", "app")).await?;

        // A slow etcd (250 ms each way) is still followed through a
        // switchover, by its own watch.
        let (stop_tx, stop_rx) = watch::channel(false);
        let writer = tokio::spawn(writer::run(writer_conninfo(rw), 1_000_000, stop_rx));
        tokio::time::sleep(Duration::from_millis(500)).await;
        let new_leader = env.lab.run_async(&["switchover"]).await?;
        let reached =
            wait_for_writable_leader(&env.lab, rw, Some(&old_leader), Duration::from_secs(30))
                .await?;
        check(
            reached == new_leader,
            format!("rw reached {reached}, leader is {new_leader}"),
        )?;
        tokio::time::sleep(Duration::from_secs(1)).await;
        let _ = stop_tx.send(true);
        let slow = writer.await?;
        check_writes(rw, &slow, "slow etcd").await?;
        let log = rolegate.log();
        check(
            log.contains("etcd leader key changed"),
            "the leader key change did not arrive through the slow etcd link",
        )?;
        check(
            !log.contains("etcd is unreachable"),
            "a slow etcd was taken for a lost one",
        )?;

        // A stalled link (a partition between rolegate and etcd, not a
        // refused connection): rolegate notices, falls back to Patroni's
        // REST checks, and the write session it serves is not disturbed.
        let (stop_tx, stop_rx) = watch::channel(false);
        let writer = tokio::spawn(writer::run(writer_conninfo(rw), 2_000_000, stop_rx));
        tokio::time::sleep(Duration::from_secs(1)).await;
        let watching = rolegate.log().matches("watching etcd").count();
        let cut_at = Instant::now();
        link.set(Link::Cut);
        wait_for_log(&rolegate, "etcd is unreachable", 1, Duration::from_secs(20)).await?;
        tokio::time::sleep(Duration::from_secs(3)).await;
        let healed_at = Instant::now();
        link.set(Link::Pass);
        wait_for_new_watch(&rolegate, watching).await?;
        tokio::time::sleep(Duration::from_secs(1)).await;
        let _ = stop_tx.send(true);
        let stalled = writer.await?;
        check_writes(rw, &stalled, "stalled etcd").await?;
        let during = stalled
            .acknowledged
            .iter()
            .filter(|a| a.at > cut_at && a.at < healed_at)
            .count();
        check(
            during > 0,
            "no write was acknowledged while the etcd link was cut",
        )?;
        check(
            stalled.failed_writes == 0 && stalled.failed_connects == 0,
            format!("the stalled etcd link disturbed the writer: {stalled:?}"),
        )?;
        println!(
            "slow etcd: switchover {old_leader} -> {new_leader}, longest write gap {:?}; \
             stalled etcd: {during} writes acknowledged during the cut, longest gap {:?}",
            slow.longest_gap, stalled.longest_gap,
        );
        Ok(())
    })
}

/// Runs a lab command that undoes a fault however the test ends.
struct Undo<'a> {
    lab: &'a Lab,
    args: [&'a str; 2],
}

impl Drop for Undo<'_> {
    fn drop(&mut self) {
        self.lab.run_in_cleanup(&self.args);
    }
}

fn frozen_replica_patroni_leaves_the_read_rotation(env: &Env) -> Result<(), Failed> {
    let (_rolegate, rw, ro) = env.default_rolegate("frozen-replica");
    let leader = env.lab.leader();
    let replicas = replicas_of(&leader);
    let (frozen, other) = (replicas[0], replicas[1]);
    runtime().block_on(async {
        writer::prepare(&conninfo(rw, "app", "app")).await?;
        let (stop_tx, stop_rx) = watch::channel(false);
        let writer = tokio::spawn(writer::run(writer_conninfo(rw), 1_000_000, stop_rx));
        wait_for_readers(&env.lab, ro, &replicas, Duration::from_secs(20)).await?;
        {
            // Its REST API stops answering; its Postgres keeps streaming.
            env.lab.run(&["freeze", frozen]);
            let _thaw = Undo {
                lab: &env.lab,
                args: ["thaw", frozen],
            };
            wait_for_readers(&env.lab, ro, &[other], Duration::from_secs(30)).await?;
            tokio::time::sleep(Duration::from_secs(3)).await;
            wait_for_readers(&env.lab, ro, &[other], Duration::from_secs(5)).await?;
        }
        wait_for_readers(&env.lab, ro, &replicas, Duration::from_secs(30)).await?;
        let _ = stop_tx.send(true);
        let stats = writer.await?;
        check_writes(rw, &stats, "frozen replica").await?;
        check(
            stats.failed_writes == 0 && stats.failed_connects == 0,
            format!("a replica's Patroni disturbed the writer: {stats:?}"),
        )?;
        println!(
            "{frozen}'s Patroni frozen: reads went to {other} only, then to both again; \
             the writer on {leader} wrote {} rows undisturbed",
            stats.acknowledged.len()
        );
        Ok(())
    })
}

/// A read session whose member leaves the rotation while the client is
/// still logging in (both replicas' Patroni frozen between the SCRAM
/// messages) is ended once the login is through, and the query the client
/// pipelined behind its last SCRAM message never reaches the member.
fn a_member_that_left_during_the_login_gets_no_pipelined_byte(env: &Env) -> Result<(), Failed> {
    let (rolegate, _rw, ro) = env.default_rolegate("left-during-login");
    let leader = env.lab.leader();
    let replicas = replicas_of(&leader);
    runtime().block_on(wait_for_readers(
        &env.lab,
        ro,
        &replicas,
        Duration::from_secs(20),
    ))?;
    let marker = "pipelined-behind-the-login";
    let mut thaws = Vec::new();
    let mut frozen_in_time = false;
    let mut session = wire::connect(ro);
    session.write_all(&wire::startup_packet(
        3,
        0,
        &[("user", "app"), ("database", "app")],
    ))?;
    let login = wire::login_pausing(&mut session, "app", &mut || {
        for member in &replicas {
            env.lab.run(&["freeze", member]);
            thaws.push(Undo {
                lab: &env.lab,
                args: ["thaw", member],
            });
        }
        let unhealthy = |page: &str| {
            replicas.iter().all(|member| {
                page.lines().any(|line| {
                    line.starts_with("rolegate_member_healthy{")
                        && line.contains(&format!("member=\"{member}\""))
                        && line.ends_with(" 0")
                })
            })
        };
        frozen_in_time = support::holds_within(Duration::from_secs(30), || {
            let page = rolegate
                .admin_get("/metrics")
                .map(|(_, body)| body)
                .unwrap_or_default();
            unhealthy(&page)
        });
        wire::message(
            b'Q',
            format!("select pg_sleep(5) /* {marker} */\0").as_bytes(),
        )
    });
    check(
        frozen_in_time,
        "both replicas failed their REST checks while the client logged in",
    )?;
    check(
        login.error.is_none(),
        format!("the login failed: {:?}", login.error),
    )?;
    let ended = loop {
        match wire::read_msg(&mut session) {
            Some(msg) if msg.tag == b'E' => break Some((msg.field(b'S'), msg.field(b'M'))),
            Some(msg) if msg.tag == b'T' || msg.tag == b'D' => break None,
            Some(_) => {}
            None => break None,
        }
    };
    let reached: Vec<String> = runtime().block_on(async {
        let mut reached = Vec::new();
        for member in &replicas {
            let direct = support::connect(&conninfo(env.lab.pg_port(member), "app", "app")).await?;
            let count: i64 = direct
                .query_one(
                    "select count(*) from pg_stat_activity where query like $1 and pid <> pg_backend_pid()",
                    &[&format!("%{marker}%")],
                )
                .await?
                .get(0);
            if count > 0 {
                reached.push(member.to_string());
            }
        }
        Ok::<_, Failed>(reached)
    })?;
    drop(thaws);
    check(
        reached.is_empty(),
        format!("the pipelined query reached {reached:?}"),
    )?;
    check(
        matches!(&ended, Some((Some(severity), _)) if severity == "FATAL"),
        format!("the session was not ended with a FATAL: {ended:?}"),
    )?;
    println!("    ended after its login: {ended:?}; the pipelined query reached no member");
    runtime().block_on(wait_for_readers(
        &env.lab,
        ro,
        &replicas,
        Duration::from_secs(30),
    ))
}

fn partitioned_leader_acknowledges_no_write_after_its_key_expires(env: &Env) -> Result<(), Failed> {
    let first_leader = env.lab.leader();
    let isolated = replicas_of(&first_leader)[0];
    let link = Forwarder::start(etcd_address(&env.lab));
    env.lab.run(&["etcd-via", isolated, &link.address()]);
    let _direct = Rewired {
        lab: &env.lab,
        member: isolated,
        link: &link,
    };
    partition(env, isolated, &link)
}

/// Heals the link and puts the member back on a direct line to etcd,
/// however the test ends (a failed lab command panics).
struct Rewired<'a> {
    lab: &'a Lab,
    member: &'a str,
    link: &'a Forwarder,
}

impl Drop for Rewired<'_> {
    fn drop(&mut self) {
        self.link.set(Link::Pass);
        self.lab
            .run_in_cleanup(&["etcd-via", self.member, "direct"]);
    }
}

/// A writer through `rw` and a watch on the leader key (which names
/// `leader` at the start), both stopped by `stop`.
struct KeyWatchedWrites {
    stop: watch::Sender<bool>,
    /// The first moment the key stops naming `leader`.
    watcher: tokio::task::JoinHandle<Result<Option<Instant>, String>>,
    writer: tokio::task::JoinHandle<writer::WriterStats>,
}

async fn write_and_watch_the_key(
    env: &Env,
    rw: u16,
    leader: &str,
) -> Result<KeyWatchedWrites, Failed> {
    writer::prepare(&conninfo(rw, "app", "app")).await?;
    let (stop, stop_rx) = watch::channel(false);
    let watcher = tokio::spawn(leader_key::leaves(
        format!("http://{}", etcd_address(&env.lab)),
        leader.to_owned(),
        stop_rx.clone(),
    ));
    let writer = tokio::spawn(writer::run(writer_conninfo(rw), 1_000_000, stop_rx));
    tokio::time::sleep(Duration::from_secs(1)).await;
    if watcher.is_finished() {
        return Err(format!("watching the leader key failed: {:?}", watcher.await).into());
    }
    Ok(KeyWatchedWrites {
        stop,
        watcher,
        writer,
    })
}

fn partition(env: &Env, isolated: &str, link: &Forwarder) -> Result<(), Failed> {
    env.lab.run(&["wait"]);
    env.lab.run(&["switchover", "--candidate", isolated]);
    let (_rolegate, rw, _ro) = env.default_rolegate("partition");
    let isolated_port = env.lab.pg_port(isolated);
    runtime().block_on(async {
        let KeyWatchedWrites {
            stop: stop_tx,
            watcher,
            writer,
        } = write_and_watch_the_key(env, rw, isolated).await?;
        // The leader's Patroni loses etcd; rolegate still reaches its
        // Postgres and etcd.
        let cut_at = Instant::now();
        link.set(Link::Cut);
        let new_leader =
            wait_for_writable_leader(&env.lab, rw, Some(isolated), Duration::from_secs(60)).await?;
        tokio::time::sleep(Duration::from_secs(1)).await;
        let _ = stop_tx.send(true);
        let stats = writer.await?;
        let expired_at = watcher
            .await??
            .ok_or(format!("the leader key never left {isolated}"))?;
        let on_isolated: Vec<_> = stats
            .acknowledged
            .iter()
            .filter(|a| a.port == isolated_port)
            .collect();
        let late = on_isolated.iter().filter(|a| a.at >= expired_at).count();
        check(
            late == 0,
            format!("{late} writes were acknowledged by {isolated} after its leader key expired"),
        )?;
        let last_on_isolated = on_isolated
            .last()
            .map(|a| a.at)
            .ok_or(format!("no write reached {isolated} before the partition"))?;
        let first_on_new = stats
            .acknowledged
            .iter()
            .find(|a| a.port == env.lab.pg_port(&new_leader))
            .map(|a| a.at)
            .ok_or(format!("no write reached {new_leader}"))?;
        let missing = check_writes(rw, &stats, "partition").await?;
        println!(
            "{isolated} cut from etcd: its last acknowledged write {:?} after the cut and {:?} \
             before its leader key expired ({:?} after the cut); writes resumed on {new_leader} \
             {:?} after the expiry; failed writes {}, failed connects {}, missing {missing}",
            last_on_isolated - cut_at,
            expired_at - last_on_isolated,
            expired_at - cut_at,
            first_on_new.saturating_duration_since(expired_at),
            stats.failed_writes,
            stats.failed_connects,
        );
        Ok(())
    })
}

fn soak_through_switchovers_and_a_kill(env: &Env) -> Result<(), Failed> {
    env.lab.run(&["sync", "on"]);
    let _async_again = Undo {
        lab: &env.lab,
        args: ["sync", "off"],
    };
    soak(env)
}

fn soak(env: &Env) -> Result<(), Failed> {
    let (rolegate, rw, ro) = env.default_rolegate("soak");
    let pg_ports: Vec<u16> = MEMBERS.iter().map(|m| env.lab.pg_port(m)).collect();
    let pid = rolegate.pid();
    let usage = || Usage::of(pid).ok_or("cannot read rolegate's /proc entry");
    runtime().block_on(async {
        writer::prepare(&conninfo(rw, "app", "app")).await?;
        // Warm up (TLS-free connection paths, REST clients, the allocator),
        // then take the baseline with no session open.
        for _ in 0..20 {
            reached(rw).await?;
            reached(ro).await?;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
        let baseline = usage()?;

        let (stop_tx, stop_rx) = watch::channel(false);
        let writers: Vec<_> = (1..=2)
            .map(|i| {
                tokio::spawn(writer::run(
                    writer_conninfo(rw),
                    i * 10_000_000,
                    stop_rx.clone(),
                ))
            })
            .collect();
        let rw_churn = tokio::spawn(churn::run(
            writer_conninfo(rw),
            false,
            Duration::from_millis(50),
            stop_rx.clone(),
        ));
        let ro_churn: Vec<_> = (0..2)
            .map(|_| {
                tokio::spawn(churn::run(
                    conninfo(ro, "app", "app"),
                    true,
                    Duration::from_millis(20),
                    stop_rx.clone(),
                ))
            })
            .collect();

        let mut events = Vec::new();
        for _ in 0..3 {
            tokio::time::sleep(Duration::from_secs(8)).await;
            let leader = env.lab.run_async(&["switchover"]).await?;
            events.push(format!("switchover to {leader}"));
        }
        tokio::time::sleep(Duration::from_secs(8)).await;
        // Waits for the failover, restarts the killed member, waits until
        // it streams again.
        let killed = env.lab.run_async(&["kill-leader"]).await?;
        events.push(format!("kill -9 of {killed}"));
        wait_for_writable_leader(&env.lab, rw, Some(&killed), Duration::from_secs(60)).await?;
        tokio::time::sleep(Duration::from_secs(8)).await;
        let _ = stop_tx.send(true);

        let mut all = writer::WriterStats::default();
        for writer in writers {
            let stats = writer.await?;
            check(
                stats.misrouted == 0,
                format!("{} writes reached a server in recovery", stats.misrouted),
            )?;
            all.acknowledged.extend(stats.acknowledged);
            all.failed_writes += stats.failed_writes;
            all.failed_connects += stats.failed_connects;
            all.longest_gap = all.longest_gap.max(stats.longest_gap);
        }
        let missing = check_writes(rw, &all, "soak").await?;
        let rw_sessions = rw_churn.await?;
        check(
            rw_sessions.wrong_role == 0,
            format!(
                "{} rw sessions were on a server in recovery",
                rw_sessions.wrong_role
            ),
        )?;
        let mut reads = churn::ChurnStats::default();
        for reader in ro_churn {
            let stats = reader.await?;
            reads.sessions += stats.sessions;
            reads.wrong_role += stats.wrong_role;
            reads.failed += stats.failed;
        }
        // A read session opened on a replica that Patroni promotes a moment
        // later finds itself on the primary; rolegate sends no new reads to
        // a member once it holds the leader key or a switchover names it,
        // but cannot undo a promotion that races a session's first query.
        // Such reads are harmless and only reported.
        check(reads.sessions > 0, "no read session was served")?;

        // Every session is gone from rolegate: no client or backend socket
        // left, descriptors and memory back at the baseline.
        let started = Instant::now();
        let after = loop {
            let now = usage()?;
            let clean = now.accepted_on(&[rw, ro]) == 0
                && now.connected_to(&pg_ports) == 0
                && now.fds <= baseline.fds;
            if clean || started.elapsed() > Duration::from_secs(20) {
                break now;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        };
        check(
            after.accepted_on(&[rw, ro]) == 0 && after.connected_to(&pg_ports) == 0,
            format!("sessions left open after the soak: {:?}", after.sockets),
        )?;
        check(
            after.fds <= baseline.fds,
            format!(
                "file descriptors: {} at the baseline, {} after",
                baseline.fds, after.fds
            ),
        )?;
        check(
            after.rss_kib <= baseline.rss_kib + 8 * 1024,
            format!(
                "resident memory grew from {} KiB to {} KiB",
                baseline.rss_kib, after.rss_kib
            ),
        )?;
        println!(
            "soak ({}): {} writes acknowledged, {missing} missing, longest write gap {:?}, \
             failed writes {}, failed connects {}; rw sessions {:?}; ro sessions {:?}; \
             rolegate fds {} -> {}, RSS {} KiB -> {} KiB",
            events.join(", "),
            all.acknowledged.len(),
            all.longest_gap,
            all.failed_writes,
            all.failed_connects,
            rw_sessions,
            reads,
            baseline.fds,
            after.fds,
            baseline.rss_kib,
            after.rss_kib,
        );
        Ok(())
    })
}

/// Puts every member back on a direct line to etcd and failsafe_mode off,
/// however the test ends.
struct AllDirect<'a> {
    lab: &'a Lab,
    link: &'a Forwarder,
}

impl Drop for AllDirect<'_> {
    fn drop(&mut self) {
        self.link.set(Link::Pass);
        for member in MEMBERS {
            self.lab.run_in_cleanup(&["etcd-via", member, "direct"]);
        }
        self.lab.run_in_cleanup(&["wait"]);
        self.lab.run_in_cleanup(&["failsafe", "off"]);
    }
}

/// Every Patroni loses etcd while rolegate keeps it, with `failsafe_mode`
/// on: the leader and member keys expire, and the primary runs on because
/// every member confirms it over REST (Patroni 4.1 says so in its REST
/// answers). rolegate follows Patroni: writes go on on that primary after
/// its key expired, and no other member takes them.
fn a_primary_kept_under_failsafe_stays_writable(env: &Env) -> Result<(), Failed> {
    let link = Forwarder::start(etcd_address(&env.lab));
    let _direct = AllDirect {
        lab: &env.lab,
        link: &link,
    };
    for member in MEMBERS {
        env.lab.run(&["etcd-via", member, &link.address()]);
    }
    env.lab.run(&["wait"]);
    env.lab.run(&["failsafe", "on"]);
    let leader = env.lab.leader();
    let leader_port = env.lab.pg_port(&leader);
    let (_rolegate, rw, _ro) = env.default_rolegate("failsafe");
    runtime().block_on(async {
        let KeyWatchedWrites {
            stop: stop_tx,
            watcher,
            writer,
        } = write_and_watch_the_key(env, rw, &leader).await?;
        let cut_at = Instant::now();
        link.set(Link::Cut);
        // The key expires (ttl 20 s); then writes must go on for a while.
        let expired = tokio::time::timeout(Duration::from_secs(60), watcher)
            .await
            .map_err(|_| "the leader key did not expire within 60 s")???
            .ok_or("the leader key never left")?;
        tokio::time::sleep(Duration::from_secs(8)).await;
        let (_, body) = support::lab::http_get(env.lab.rest_port(&leader), "/patroni")
            .ok_or("GET /patroni on the leader")?;
        let _ = stop_tx.send(true);
        let stats = writer.await?;
        check(
            body.contains("\"failsafe_mode_is_active\": true"),
            format!("Patroni does not keep {leader} under failsafe: {body}"),
        )?;
        let after: Vec<_> = stats
            .acknowledged
            .iter()
            .filter(|a| a.at >= expired + Duration::from_secs(2))
            .collect();
        check(
            !after.is_empty() && after.iter().all(|a| a.port == leader_port),
            format!(
                "{} writes acknowledged from 2 s after the key expired, on ports {:?}; expected them on {leader}",
                after.len(),
                after.iter().map(|a| a.port).collect::<std::collections::BTreeSet<_>>()
            ),
        )?;
        let missing = check_writes(rw, &stats, "failsafe").await?;
        println!(
            "every Patroni cut from etcd: {leader}'s key expired {:?} after the cut; \
             {} writes acknowledged by it under failsafe after that; longest gap {:?}, \
             failed writes {}, missing {missing}",
            expired - cut_at,
            after.len(),
            stats.longest_gap,
            stats.failed_writes,
        );
        Ok(())
    })
}
