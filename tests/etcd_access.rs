//! rolegate against etcd as production runs it, in front of real
//! PostgreSQL servers: authentication on, users that may read only their
//! cluster's prefix (and write only their fleet's), client-certificate
//! TLS, tokens that expire, a wrong password, and a fleet instance that
//! says goodbye.
//!
//! Each test starts an etcd member of its own ([`SecureEtcd`]) and writes
//! the cluster's keys the way Patroni 4.1 writes them; rolegate follows
//! them under `leader_policy = "etcd"` (the key alone), so a write session
//! reaches whichever server the leader key names.

mod support;

use std::time::{Duration, Instant};

use libtest_mimic::Failed;
use nix::sys::signal::Signal;

use support::harness::{check, run_suite, TestFn};
use support::rolegate::Rolegate;
use support::secure_etcd::SecureEtcd;
use support::static_cluster::StaticCluster;
use support::status_refusal::StatusRefusal;
use support::{connect, conninfo, free_port, holds_within, runtime};

type Env = StaticCluster;

fn main() {
    let tests: &[(&str, TestFn<Env>)] = &[
        (
            "a_read_only_etcd_user_follows_where_status_is_refused",
            a_read_only_etcd_user_follows_where_status_is_refused,
        ),
        (
            "a_stopped_fleet_instance_releases_its_id_at_once",
            a_stopped_fleet_instance_releases_its_id_at_once,
        ),
    ];
    run_suite(tests, || StaticCluster::start("etcd-access"), true);
}

/// The servers of `env` by member name, as the seed writes them.
fn servers(env: &Env) -> [(&'static str, u16); 3] {
    [
        ("pg1", env.primary.port),
        ("pg2", env.replicas[0].port),
        ("pg3", env.replicas[1].port),
    ]
}

/// Writes the keys of a healthy Patroni cluster `scope` under `/service/`,
/// `leader` leading.
fn seed(etcd: &SecureEtcd, env: &Env, scope: &str, leader: &str) {
    let prefix = format!("/service/{scope}");
    etcd.put(
        &format!("{prefix}/config"),
        r#"{"ttl":20,"loop_wait":1,"retry_timeout":5}"#,
    );
    for (name, port) in servers(env) {
        let role = if name == leader { "primary" } else { "replica" };
        let record = format!(
            r#"{{"conn_url":"postgres://127.0.0.1:{port}/postgres","state":"running","role":"{role}","version":"4.1.5","xlog_location":100{}}}"#,
            if role == "replica" {
                r#","replication_state":"streaming""#
            } else {
                ""
            }
        );
        etcd.put(&format!("{prefix}/members/{name}"), &record);
    }
    etcd.put(&format!("{prefix}/leader"), leader);
}

/// How rolegate reaches etcd: endpoint and the `etcd_*` lines of a table.
struct Access {
    endpoint: String,
    lines: String,
}

impl Access {
    fn user(endpoint: String, user: &str, password: &str) -> Self {
        Self {
            endpoint,
            lines: format!("etcd_user = \"{user}\"\netcd_password = \"{password}\"\n"),
        }
    }
}

/// rolegate following cluster `scope` through `cluster`, and, with
/// `fleet`, in an etcd fleet through it; returns it with its rw port.
fn rolegate(
    env: &Env,
    name: &str,
    scope: &str,
    cluster: &Access,
    fleet: Option<&Access>,
) -> (Rolegate, u16) {
    let rw = free_port();
    let fleet = fleet
        .map(|access| {
            format!(
                "[fleet]\nlisten = \"127.0.0.1:{}\"\nname = \"{name}\"\netcd = [\"{}\"]\nlease_ttl = \"30s\"\n{}\n",
                free_port(),
                access.endpoint,
                access.lines
            )
        })
        .unwrap_or_default();
    let config = format!(
        r#"
[log]
format = "json"

[limits]
hold_timeout = "2s"

[clusters.{scope}]
scope = "{scope}"
namespace = "/service/"
etcd = ["{}"]
leader_policy = "etcd"
{}
[[listeners]]
listen = "127.0.0.1:{rw}"
cluster = "{scope}"
role = "primary"

{fleet}"#,
        cluster.endpoint, cluster.lines
    );
    (Rolegate::start(&env.root, name, &config), rw)
}

/// The port of the server a new rw session reaches.
async fn writable_port(rw: u16) -> Result<u16, tokio_postgres::Error> {
    let client = connect(&conninfo(rw, "app", "app")).await?;
    let row = client.query_one("select inet_server_port()", &[]).await?;
    Ok(row.get::<_, i32>(0) as u16)
}

/// Waits (up to `limit`) until a write session reaches `port`.
fn writes_reach(rolegate: &Rolegate, rw: u16, port: u16, limit: Duration) -> Result<(), Failed> {
    let rt = runtime();
    let started = Instant::now();
    let mut last = String::new();
    while started.elapsed() < limit {
        match rt.block_on(writable_port(rw)) {
            Ok(reached) if reached == port => return Ok(()),
            Ok(reached) => last = format!("reached port {reached}"),
            Err(e) => last = format!("{e:?}"),
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let etcd_lines: Vec<_> = rolegate
        .log()
        .lines()
        .filter(|l| l.contains("etcd"))
        .take(20)
        .map(str::to_owned)
        .collect();
    Err(format!(
        "no write session reached port {port} within {limit:?} (last: {last})\nrolegate's etcd lines:\n{}",
        etcd_lines.join("\n")
    )
    .into())
}

/// `/cluster`'s fleet id.
fn fleet_id(rolegate: &Rolegate) -> Option<u64> {
    let (_, body) = rolegate.admin_get("/cluster")?;
    serde_json::from_str::<serde_json::Value>(&body).ok()?["fleet"]["id"].as_u64()
}

/// A user who may only read its cluster's keys, and one who may only read
/// and write its fleet's, reach etcd through a stand-in that refuses
/// `Maintenance.Status` as etcd 3.4.42+, 3.5.28+ and 3.6.0–3.6.11 do for
/// users without root. rolegate must follow the cluster (a write lands on
/// the leader, and moves when the leader key does) and claim its fleet id.
fn a_read_only_etcd_user_follows_where_status_is_refused(env: &Env) -> Result<(), Failed> {
    let etcd = SecureEtcd::start(&env.root.join("least-privilege"), None, 300);
    seed(&etcd, env, "ro", "pg1");
    etcd.user("reader", "reader-secret", &["/service/ro/"], &[]);
    etcd.user("fleeter", "fleeter-secret", &[], &["/rolegate/least/"]);
    let stand_in = StatusRefusal::start(format!("127.0.0.1:{}", etcd.port).parse()?);
    let cluster = Access::user(stand_in.endpoint(), "reader", "reader-secret");
    let fleet = Access::user(stand_in.endpoint(), "fleeter", "fleeter-secret");
    let (rolegate, rw) = rolegate(env, "least", "ro", &cluster, Some(&fleet));

    writes_reach(&rolegate, rw, env.primary.port, Duration::from_secs(20))?;
    seed(&etcd, env, "ro", "pg2");
    writes_reach(&rolegate, rw, env.replicas[0].port, Duration::from_secs(10))?;
    check(
        holds_within(Duration::from_secs(10), || fleet_id(&rolegate).is_some()),
        format!(
            "the fleet claimed no id through a user that may write its prefix\n{}",
            rolegate.log()
        ),
    )?;
    check(
        !rolegate.log().contains("reader-secret") && !rolegate.log().contains("fleeter-secret"),
        "rolegate logged an etcd password",
    )
}

/// A fleet instance stopped with SIGTERM revokes its lease on the way out:
/// its claim is gone from etcd at once, not after the lease's 30 s.
fn a_stopped_fleet_instance_releases_its_id_at_once(env: &Env) -> Result<(), Failed> {
    let etcd = SecureEtcd::start(&env.root.join("farewell"), None, 300);
    seed(&etcd, env, "bye", "pg1");
    etcd.user(
        "bye",
        "bye-secret",
        &["/service/bye/"],
        &["/rolegate/farewell/"],
    );
    let access = Access::user(etcd.endpoint(), "bye", "bye-secret");
    let (mut rolegate, rw) = rolegate(env, "farewell", "bye", &access, Some(&access));
    writes_reach(&rolegate, rw, env.primary.port, Duration::from_secs(20))?;
    check(
        holds_within(Duration::from_secs(10), || fleet_id(&rolegate).is_some()),
        "the fleet claimed no id",
    )?;
    let prefix = "/rolegate/farewell/members/";
    let claims = etcd.keys(prefix);
    check(
        claims.contains(prefix),
        format!("no claim in etcd: {claims:?}"),
    )?;

    rolegate.signal(Signal::SIGTERM);
    let exited = rolegate.wait_exit(Duration::from_secs(15));
    check(
        exited.is_some(),
        "rolegate did not exit within 15 s of SIGTERM",
    )?;
    let claims = etcd.keys(prefix);
    check(
        !claims.contains(prefix),
        format!(
            "the stopped instance's claim is still in etcd (it would stay for the lease's 30 s): {claims:?}\n{}",
            rolegate.log()
        ),
    )
}
