//! Changes without downtime, in front of the real lab and under a steady
//! load of new connections and open sessions: reloads that add a cluster
//! and a listener, change a listener's role, remove a listener, and remove
//! the cluster again (its view source stops after its last session); a
//! restart (twice over) by a new process that takes over the listening
//! sockets; and a new process that fails to start, which must leave the
//! old one serving.

mod support;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use libtest_mimic::Failed;
use nix::sys::signal::Signal;

use support::harness::{by_name, check, run_suite, TestFn};
use support::lab_suite::LabSuite;
use support::rolegate::Rolegate;
use support::scenarios::cancelled;
use support::steady_load::{LoadStats, SteadyLoad, ENOUGH_CONNECTIONS};
use support::{
    connect, connect_watched, conninfo, free_port, holds_within, runtime, sqlstate, wait_until,
    wire, writer,
};

type Env = LabSuite;

/// Clients that connect only to ask for TLS, during a restart: enough new
/// connections that some are in flight in the old process's accept queue
/// when it closes its sockets. Without the handover (plain SO_REUSEPORT)
/// those are reset.
const RESTART_ASKERS: usize = 8;

fn main() {
    let tests: &[(&str, TestFn<Env>)] = by_name![
        reloads_add_change_and_remove_listeners_under_load,
        a_restart_by_a_new_process_refuses_no_connection,
        a_restart_hands_over_more_sockets_than_one_message,
        a_cancel_reaches_its_session_across_a_restart,
        a_new_process_that_fails_to_start_leaves_the_old_serving
    ];
    run_suite(tests, || LabSuite::start("no-downtime"), true);
}

/// The configuration text: the lab's cluster `demo`, the given listener
/// tables, and `extra` (more clusters, other tables).
fn config(env: &Env, admin: u16, listeners: &[(u16, &str, &str)], extra: &str) -> String {
    let mut text = format!(
        "[admin]\nlisten = \"127.0.0.1:{admin}\"\n\n[log]\nformat = \"json\"\n\n\
         [limits]\nhold_timeout = \"30s\"\nshutdown_timeout = \"4s\"\n\n\
         [clusters.demo]\nscope = \"demo\"\nnamespace = \"/service/\"\n{}\n\n{extra}\n",
        env.lab.etcd_line()
    );
    for (port, cluster, role) in listeners {
        text.push_str(&format!(
            "[[listeners]]\nlisten = \"127.0.0.1:{port}\"\ncluster = \"{cluster}\"\nrole = \"{role}\"\n\n"
        ));
    }
    text
}

/// A second cluster following the same Patroni cluster.
fn second_cluster(env: &Env) -> String {
    format!(
        "[clusters.demo2]\nscope = \"demo\"\nnamespace = \"/service/\"\n{}\n",
        env.lab.etcd_line()
    )
}

/// Rewrites the file and sends SIGHUP; waits for the reload's outcome,
/// which must be success.
fn reload(rolegate: &Rolegate, text: &str) -> Result<(), Failed> {
    const APPLIED: &str = "SIGHUP: reloaded the configuration";
    const REFUSED: &str = "keeping the configuration in use";
    let count = |what: &str| rolegate.log().matches(what).count();
    let (applied, refused) = (count(APPLIED), count(REFUSED));
    std::fs::write(&rolegate.config_path, text)?;
    rolegate.signal(Signal::SIGHUP);
    wait_until(Duration::from_secs(15), "the reload", || {
        (count(APPLIED) + count(REFUSED) > applied + refused).then_some(())
    });
    check(
        count(APPLIED) > applied,
        format!("the reload was refused:\n{}", rolegate.log()),
    )
}

/// Waits (up to 15 s) for a watched session to be ended by rolegate with
/// FATAL 57P01; `what` names it in the failure.
async fn ended_with_57p01(
    connection: tokio::task::JoinHandle<Result<(), tokio_postgres::Error>>,
    what: &str,
) -> Result<(), Failed> {
    let ended = tokio::time::timeout(Duration::from_secs(15), connection)
        .await
        .map_err(|_| format!("{what} was never ended"))??;
    check(
        matches!(&ended, Err(e) if sqlstate(e).as_deref() == Some("57P01")),
        format!("{what} ended with {ended:?}"),
    )
}

/// Whether a new session through `port` lands on a server in recovery.
async fn in_recovery(port: u16) -> Result<bool, Failed> {
    let client = connect(&conninfo(port, "app", "app")).await?;
    Ok(client
        .query_one("select pg_is_in_recovery()", &[])
        .await?
        .get::<_, bool>(0))
}

/// The load saw no refusal, no failure, kept its long session (unless
/// `long_session_closed`), and every row it was told was written is there.
async fn check_load(stats: &LoadStats, check_port: u16) -> Result<(), Failed> {
    check(
        stats.connections >= ENOUGH_CONNECTIONS,
        format!("only {} connections made", stats.connections),
    )?;
    check(
        stats.refused == 0 && stats.failed == 0,
        format!(
            "{} refused and {} failed of {} connections: {:?}",
            stats.refused, stats.failed, stats.connections, stats.errors
        ),
    )?;
    check(
        stats.long_session_error.is_none() && stats.long_session_writes > 10,
        format!(
            "the long session: {} writes, {:?}",
            stats.long_session_writes, stats.long_session_error
        ),
    )?;
    let missing =
        writer::missing_rows(&conninfo(check_port, "app", "app"), &stats.acknowledged).await?;
    check(
        missing == 0,
        format!(
            "{missing} of {} acknowledged rows missing",
            stats.acknowledged.len()
        ),
    )
}

fn reloads_add_change_and_remove_listeners_under_load(env: &Env) -> Result<(), Failed> {
    let (admin, rw, ro, removed, added) = (
        free_port(),
        free_port(),
        free_port(),
        free_port(),
        free_port(),
    );
    let base: Vec<(u16, &str, &str)> = vec![(rw, "demo", "primary"), (ro, "demo", "replica")];
    let mut first = base.clone();
    first.push((removed, "demo", "replica"));
    let mut rolegate = Rolegate::start(&env.root, "reload", &config(env, admin, &first, ""));
    rolegate.admin_port = admin;
    runtime().block_on(async {
        writer::prepare(&conninfo(rw, "app", "app")).await?;
        // A session on the listener that will be removed.
        let (doomed, doomed_connection) = connect_watched(&conninfo(removed, "app", "app")).await?;
        doomed.simple_query("select 1").await?;
        let load = SteadyLoad::start(rw, ro, 2, 0, 0);
        tokio::time::sleep(Duration::from_secs(1)).await;

        // 1. A new cluster and a listener on it.
        let mut second = first.clone();
        second.push((added, "demo2", "primary"));
        reload(
            &rolegate,
            &config(env, admin, &second, &second_cluster(env)),
        )?;
        let started = Instant::now();
        let (kept, kept_connection) = loop {
            match connect_watched(&conninfo(added, "app", "app")).await {
                Ok(session) => break session,
                Err(_) if started.elapsed() < Duration::from_secs(10) => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => return Err(format!("the added listener: {e:?}").into()),
            }
        };
        check(
            !kept
                .query_one("select pg_is_in_recovery()", &[])
                .await?
                .get::<_, bool>(0),
            "the added primary listener reaches the leader",
        )?;
        tokio::time::sleep(Duration::from_secs(1)).await;

        // 2. That listener's role changes: new sessions go to replicas,
        //    the open one stays.
        let mut third = first.clone();
        third.push((added, "demo2", "replica"));
        reload(&rolegate, &config(env, admin, &third, &second_cluster(env)))?;
        check(
            in_recovery(added).await?,
            "after the role change, a replica",
        )?;
        kept.simple_query("select 1")
            .await
            .map_err(|e| format!("the session on the changed listener: {e:?}"))?;
        tokio::time::sleep(Duration::from_secs(1)).await;

        // 3. A listener is removed: no new sessions there; the open one
        //    runs on, then ends with 57P01 after shutdown_timeout (4 s).
        let mut fourth = base.clone();
        fourth.push((added, "demo2", "replica"));
        reload(
            &rolegate,
            &config(env, admin, &fourth, &second_cluster(env)),
        )?;
        let removed_at = Instant::now();
        doomed
            .simple_query("select 1")
            .await
            .map_err(|e| format!("the removed listener's session ended at once: {e:?}"))?;
        check(
            connect(&conninfo(removed, "app", "app")).await.is_err(),
            "the removed listener still accepts",
        )?;
        ended_with_57p01(doomed_connection, "the removed listener's session").await?;
        let waited = removed_at.elapsed();
        check(
            waited >= Duration::from_secs(3),
            format!("the removed listener's session ended after {waited:?}"),
        )?;
        kept.simple_query("select 1")
            .await
            .map_err(|e| format!("the session on the kept listener: {e:?}"))?;

        // 4. A port another program owns (and, in the same file, the added
        //    listener gone): refused whole, the key named, nothing applied.
        let blocker = std::net::TcpListener::bind("127.0.0.1:0")?;
        let blocked = blocker.local_addr()?.port();
        let mut fifth = base.clone();
        fifth.push((blocked, "demo", "replica"));
        std::fs::write(&rolegate.config_path, config(env, admin, &fifth, ""))?;
        rolegate.signal(Signal::SIGHUP);
        wait_until(Duration::from_secs(15), "the refused reload", || {
            rolegate
                .log()
                .contains("keeping the configuration in use")
                .then_some(())
        });
        check(
            rolegate.log().contains(&format!(
                "listeners[2].listen: cannot listen on 127.0.0.1:{blocked}"
            )),
            format!("the refusal names the key:\n{}", rolegate.log()),
        )?;
        check(
            in_recovery(added).await?,
            "the added listener is still there",
        )?;
        drop(blocker);

        // 5. The second cluster goes, with its listener: the listener's
        //    session ends after shutdown_timeout, and then the cluster's
        //    view source, which watched it to the end, stops.
        reload(&rolegate, &config(env, admin, &base, ""))?;
        ended_with_57p01(kept_connection, "the removed cluster's session").await?;
        wait_until(
            Duration::from_secs(15),
            "the retired view source to stop",
            || {
                rolegate
                    .log()
                    .contains("the retired view source stopped")
                    .then_some(())
            },
        );

        tokio::time::sleep(Duration::from_secs(1)).await;
        let stats = load.stop().await;
        check_load(&stats, rw).await?;
        let (_, events) = rolegate.admin_get("/events").ok_or("no /events")?;
        check(
            events.matches("\"kind\": \"config_reloaded\"").count() == 4
                && events.matches("\"kind\": \"config_refused\"").count() == 1,
            format!("four reloads and a refusal in the timeline: {events}"),
        )
    })
}

/// A runtime whose test code may wait for a process in place.
fn multi_runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
}

/// Starts a process of the configuration at `config_path`, logging to
/// `log`, and waits until it is ready.
fn successor(config_path: &Path, log: PathBuf, admin: u16) -> Rolegate {
    let mut rolegate = Rolegate::spawn(config_path, &log);
    rolegate.admin_port = admin;
    rolegate.wait_ready();
    rolegate
}

/// SIGTERM to `old` once `new` is ready; the load's long session, which
/// lives on `old`, is closed by its client a moment later, and `old` must
/// then exit on its own, well before its shutdown_timeout ends sessions.
async fn hand_over(old: &mut Rolegate, new: &Rolegate, load: &SteadyLoad) -> Result<(), Failed> {
    check(
        new.log().contains("took over the listening sockets"),
        format!("the new process bound its own sockets:\n{}", new.log()),
    )?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    old.signal(Signal::SIGTERM);
    tokio::time::sleep(Duration::from_millis(500)).await;
    load.close_long_session();
    let status = tokio::task::block_in_place(|| old.wait_exit(Duration::from_secs(20)))
        .ok_or("the old process did not exit after its sessions ended")?;
    check(
        status.success(),
        format!("the old process exited with {status}"),
    )?;
    let log = old.log();
    check(
        log.contains("handed the listening sockets to a new rolegate") && !log.contains("57P01"),
        format!("the old process's log:\n{log}"),
    )
}

/// A first process to restart, named `name`, with an rw and an ro listener,
/// a shutdown_timeout (60 s) longer than any test waits and `extra` tables:
/// returns it, its rw and ro ports, and its admin port (which its
/// successors share).
fn restartable(env: &Env, name: &str, extra: &str) -> (Rolegate, u16, u16, u16) {
    let (admin, rw, ro) = (free_port(), free_port(), free_port());
    let listeners = [(rw, "demo", "primary"), (ro, "demo", "replica")];
    let text = config(env, admin, &listeners, extra)
        .replace("shutdown_timeout = \"4s\"", "shutdown_timeout = \"60s\"");
    let mut first = Rolegate::start(&env.root, name, &text);
    first.admin_port = admin;
    (first, rw, ro, admin)
}

fn a_restart_by_a_new_process_refuses_no_connection(env: &Env) -> Result<(), Failed> {
    let (mut first, rw, ro, admin) = restartable(env, "restart", "");
    let config_path = first.config_path.clone();
    multi_runtime()?.block_on(async {
        writer::prepare(&conninfo(rw, "app", "app")).await?;
        let load = SteadyLoad::start(rw, ro, 2, RESTART_ASKERS, 0);
        tokio::time::sleep(Duration::from_secs(1)).await;
        let second = successor(&config_path, env.root.join("restart-2.log"), admin);
        hand_over(&mut first, &second, &load).await?;
        let stats = load.stop().await;
        check_load(&stats, rw).await?;

        // Again: the second process took the name over from the first and
        // hands its sockets on in turn.
        let load = SteadyLoad::start(rw, ro, 2, RESTART_ASKERS, 100_000_000);
        tokio::time::sleep(Duration::from_secs(1)).await;
        let mut second = second;
        let third = successor(&config_path, env.root.join("restart-3.log"), admin);
        hand_over(&mut second, &third, &load).await?;
        tokio::time::sleep(Duration::from_secs(1)).await;
        let stats = load.stop().await;
        check_load(&stats, rw).await?;
        let (status, _) = third
            .admin_get("/readyz")
            .ok_or("the admin endpoint is gone")?;
        check(
            status == 200,
            format!("/readyz of the last process: {status}"),
        )
    })
}

/// On a host with many CPUs each listener has many sockets, one per event
/// loop: 130 loops and two listeners offer 261 with the admin endpoint's,
/// more than one handover message carries (250). All of them reach the new
/// process, and the restart refuses no connection.
fn a_restart_hands_over_more_sockets_than_one_message(env: &Env) -> Result<(), Failed> {
    let (mut first, rw, ro, admin) =
        restartable(env, "many-sockets", "[runtime]\nworker_threads = 130\n");
    let config_path = first.config_path.clone();
    multi_runtime()?.block_on(async {
        writer::prepare(&conninfo(rw, "app", "app")).await?;
        let load = SteadyLoad::start(rw, ro, 2, RESTART_ASKERS, 300_000_000);
        tokio::time::sleep(Duration::from_secs(1)).await;
        let second = successor(&config_path, env.root.join("many-sockets-2.log"), admin);
        hand_over(&mut first, &second, &load).await?;
        let stats = load.stop().await;
        check_load(&stats, rw).await?;
        let log = second.log();
        check(
            log.contains("\"sockets\":261"),
            format!("the new process did not take 261 sockets:\n{log}"),
        )
    })
}

/// How many cancels, passed on by the other process of a restart, the
/// process whose log this is forwarded to a member.
fn forwarded_for_sibling(log: &str) -> usize {
    log.lines()
        .filter(|l| l.contains("forwarded cancel request") && l.contains("\"via\":\"sibling\""))
        .count()
}

/// During a restart a cancel request can reach the process that does not
/// hold its session: while both run they accept from the same sockets,
/// and once the old one has stopped accepting, a cancel for one of its
/// draining sessions can only reach the new one. Each passes the keys it
/// does not know to the other. (The admin endpoint is shared too, so the
/// logs say which process did what.)
fn a_cancel_reaches_its_session_across_a_restart(env: &Env) -> Result<(), Failed> {
    const PASSED: &str = "passed cancel request to the restart's other process";
    /// Sessions tried until one, held by the new process, has its cancel
    /// accepted by the old one: each does with a chance of about 1 in 4.
    const CROSSING_TRIES: usize = 30;
    let (mut old, rw, _ro, admin) = restartable(env, "cancel-restart", "");
    let config_path = old.config_path.clone();
    multi_runtime()?.block_on(async {
        let draining = connect(&conninfo(rw, "app", "app")).await?;
        let mut draining_idle = wire::KeyedSession::login(rw)?;
        let new = successor(&config_path, env.root.join("cancel-restart-2.log"), admin);
        check(
            new.log().contains("took over the listening sockets"),
            format!("the new process bound its own sockets:\n{}", new.log()),
        )?;
        // Sessions and cancels land on either process now.
        for i in 0..CROSSING_TRIES {
            if forwarded_for_sibling(&new.log()) > 0 {
                break;
            }
            let client = connect(&conninfo(rw, "app", "app")).await?;
            cancelled(&client, &format!("session {i}, while both processes accept")).await?;
        }
        check(
            holds_within(Duration::from_secs(5), || forwarded_for_sibling(&new.log()) > 0),
            format!(
                "in {CROSSING_TRIES} sessions no cancel went from the old process to the new one; the old one's log:\n{}",
                old.log()
            ),
        )?;
        old.signal(Signal::SIGTERM);
        wait_until(Duration::from_secs(10), "the old process to stop accepting", || {
            old.log().contains("stopped accepting connections").then_some(())
        });
        // Every accept loop of the old process ends at once; give the last
        // one a moment.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let (passed, forwarded) = (
            new.log().matches(PASSED).count(),
            forwarded_for_sibling(&old.log()),
        );
        cancelled(&draining, "a draining session of the old process").await?;
        check(
            holds_within(Duration::from_secs(5), || {
                new.log().matches(PASSED).count() > passed
                    && forwarded_for_sibling(&old.log()) > forwarded
            }),
            format!(
                "the draining session's cancel did not go from the new process to the old one; the new one's log:\n{}\nthe old one's:\n{}",
                new.log(),
                old.log()
            ),
        )?;
        // Its cancel connection closes only once the old process has
        // delivered the key: the next query is never hit.
        let late = tokio::task::block_in_place(|| wire::late_cancels(&mut draining_idle, rw, 10))?;
        check(
            late == 0,
            format!("{late} of 10 queries of a draining session sent after its cancel's close were cancelled"),
        )?;
        drop(draining);
        drop(draining_idle);
        let status = tokio::task::block_in_place(|| old.wait_exit(Duration::from_secs(20)))
            .ok_or("the old process did not exit after its session ended")?;
        check(
            status.success(),
            format!("the old process exited with {status}"),
        )?;
        let client = connect(&conninfo(rw, "app", "app")).await?;
        cancelled(&client, "a session of the new process alone").await
    })
}

fn a_new_process_that_fails_to_start_leaves_the_old_serving(env: &Env) -> Result<(), Failed> {
    let (admin, rw, ro) = (free_port(), free_port(), free_port());
    let listeners = [(rw, "demo", "primary"), (ro, "demo", "replica")];
    let text = config(env, admin, &listeners, "");
    let mut old = Rolegate::start(&env.root, "fails", &text);
    old.admin_port = admin;
    multi_runtime()?.block_on(async {
        writer::prepare(&conninfo(rw, "app", "app")).await?;
        let load = SteadyLoad::start(rw, ro, 2, 0, 200_000_000);
        tokio::time::sleep(Duration::from_secs(1)).await;

        // A port another program owns (without SO_REUSEPORT): the new
        // process takes over the old one's sockets, cannot bind this one,
        // and exits.
        let blocker = std::net::TcpListener::bind("127.0.0.1:0")?;
        let blocked = blocker.local_addr()?.port();
        let mut more = listeners.to_vec();
        more.push((blocked, "demo", "replica"));
        std::fs::write(&old.config_path, config(env, admin, &more, ""))?;
        let mut clash = Rolegate::spawn(&old.config_path, &env.root.join("fails-clash.log"));
        let status = tokio::task::block_in_place(|| clash.wait_exit(Duration::from_secs(20)))
            .ok_or("the process with a port clash did not exit")?;
        check(
            !status.success()
                && clash.log().contains(&format!(
                    "listeners[2].listen: cannot listen on 127.0.0.1:{blocked}"
                )),
            format!("the clash: {status}\n{}", clash.log()),
        )?;
        std::fs::write(&old.config_path, &text)?;

        // A file that does not parse.
        let broken = env.root.join("fails-broken.toml");
        std::fs::write(&broken, text.replace("[limits]", "[limits\n"))?;
        let mut bad = Rolegate::spawn(&broken, &env.root.join("fails-broken.log"));
        let status = tokio::task::block_in_place(|| bad.wait_exit(Duration::from_secs(20)))
            .ok_or("the process with a broken file did not exit")?;
        check(
            status.code() == Some(2),
            format!("a broken file: {status}\n{}", bad.log()),
        )?;

        tokio::time::sleep(Duration::from_secs(1)).await;
        let stats = load.stop().await;
        check_load(&stats, rw).await?;
        check(
            old.wait_exit(Duration::from_millis(10)).is_none(),
            "the old process is still running",
        )
    })
}
