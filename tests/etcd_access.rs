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

use support::certs::Ca;
use support::harness::{by_name, check, run_suite, TestFn};
use support::rolegate::Rolegate;
use support::secure_etcd::{EtcdTls, SecureEtcd};
use support::static_cluster::StaticCluster;
use support::status_refusal::StatusRefusal;
use support::{connect, conninfo, free_port, holds_within, runtime};

type Env = StaticCluster;

fn main() {
    let tests: &[(&str, TestFn<Env>)] = by_name![
        a_read_only_etcd_user_follows_where_status_is_refused,
        a_stopped_fleet_instance_releases_its_id_at_once,
        client_certificate_tls_with_expiring_tokens_is_followed,
        a_wrong_etcd_password_is_named,
        a_client_certificate_etcd_rejects_is_named
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

    /// Also TLS: the CA etcd's certificate is checked against, and a
    /// client certificate.
    fn with_tls(mut self, ca: &std::path::Path, client: &support::certs::Pair) -> Self {
        self.lines.push_str(&format!(
            "etcd_ca = \"{}\"\netcd_cert = \"{}\"\netcd_key = \"{}\"\n",
            ca.display(),
            client.cert.display(),
            client.key.display()
        ));
        self
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

/// etcd as Debian runs it with TLS: client certificates required
/// (`--client-cert-auth`), users with passwords, and tokens that live 2 s.
/// rolegate follows the cluster for longer than several token lifetimes,
/// idle in between, and still sees the leader key move; its fleet id stays
/// claimed and is released at shutdown.
fn client_certificate_tls_with_expiring_tokens_is_followed(env: &Env) -> Result<(), Failed> {
    let dir = env.root.join("tls-etcd");
    let etcd = SecureEtcd::start(&dir, Some(EtcdTls::new(&dir.join("certs"))), 2);
    let tls = etcd.tls().ok_or("no TLS")?;
    seed(&etcd, env, "sealed", "pg1");
    etcd.user(
        "sealed",
        "sealed-secret",
        &["/service/sealed/"],
        &["/rolegate/sealed/"],
    );
    let access = Access::user(etcd.endpoint(), "sealed", "sealed-secret")
        .with_tls(&tls.ca, &tls.client_for("sealed"));
    let (mut rolegate, rw) = rolegate(env, "sealed", "sealed", &access, Some(&access));
    writes_reach(&rolegate, rw, env.primary.port, Duration::from_secs(20))?;
    check(
        holds_within(Duration::from_secs(10), || fleet_id(&rolegate).is_some()),
        format!("the fleet claimed no id over TLS\n{}", rolegate.log()),
    )?;
    // Three token lifetimes with nothing to read.
    std::thread::sleep(Duration::from_secs(7));
    seed(&etcd, env, "sealed", "pg2");
    writes_reach(&rolegate, rw, env.replicas[0].port, Duration::from_secs(10))?;
    std::thread::sleep(Duration::from_secs(3));
    seed(&etcd, env, "sealed", "pg3");
    writes_reach(&rolegate, rw, env.replicas[1].port, Duration::from_secs(10))?;
    check(fleet_id(&rolegate).is_some(), "the fleet lost its id")?;
    let log = rolegate.log();
    check(
        !log.contains("etcd is unreachable"),
        format!("etcd was taken as lost while tokens expired:\n{log}"),
    )?;
    let prefix = "/rolegate/sealed/members/";
    rolegate.signal(Signal::SIGTERM);
    check(
        rolegate.wait_exit(Duration::from_secs(15)).is_some(),
        "rolegate did not exit within 15 s of SIGTERM",
    )?;
    let claims = etcd.keys(prefix);
    check(
        !claims.contains(prefix),
        format!("the claim outlived the instance: {claims:?}"),
    )
}

/// `/readyz`'s body (it names why rolegate is not ready).
fn readyz(rolegate: &Rolegate) -> String {
    rolegate
        .admin_get("/readyz")
        .map(|(_, body)| body)
        .unwrap_or_default()
}

/// `/cluster`'s `no_leader_reason` of cluster `name`.
fn no_leader_reason(rolegate: &Rolegate, name: &str) -> String {
    let Some((_, body)) = rolegate.admin_get("/cluster") else {
        return String::new();
    };
    let json = serde_json::from_str::<serde_json::Value>(&body).unwrap_or_default();
    json["clusters"]
        .as_array()
        .and_then(|clusters| clusters.iter().find(|c| c["cluster"] == name))
        .and_then(|c| c["no_leader_reason"].as_str())
        .unwrap_or_default()
        .to_owned()
}

/// Checks that the log, `/cluster` and `/readyz` all say that etcd refused
/// what `key` names, for cluster `name` (and the fleet, in the log), with
/// the config file; and that `secret` appears nowhere.
fn refusal_is_named(
    rolegate: &Rolegate,
    name: &str,
    key: &str,
    secret: &str,
) -> Result<(), Failed> {
    let file = rolegate.config_path.display().to_string();
    let wanted = format!("clusters.{name}.{key}");
    let named = |text: &str| text.contains(&wanted) && text.contains(&file);
    let said = holds_within(Duration::from_secs(15), || {
        named(&rolegate.log())
            && named(&no_leader_reason(rolegate, name))
            && named(&readyz(rolegate))
    });
    let log = rolegate.log();
    check(
        said,
        format!(
            "expected {wanted} and {file} in the log, /cluster and /readyz;\n/cluster: {}\n/readyz: {}\nlog:\n{log}",
            no_leader_reason(rolegate, name),
            readyz(rolegate)
        ),
    )?;
    check(
        log.contains(&format!("fleet.{key}")),
        format!("the fleet's refusal does not name fleet.{key}:\n{log}"),
    )?;
    let cluster = rolegate
        .admin_get("/cluster")
        .map(|(_, b)| b)
        .unwrap_or_default();
    check(
        !log.contains(secret) && !cluster.contains(secret) && !readyz(rolegate).contains(secret),
        "a secret was shown",
    )
}

/// A password etcd does not accept: every place that says why rolegate
/// cannot follow names `etcd_password` of the cluster and the file, not
/// "no member passes Patroni's /primary check".
fn a_wrong_etcd_password_is_named(env: &Env) -> Result<(), Failed> {
    let etcd = SecureEtcd::start(&env.root.join("wrong-password"), None, 300);
    seed(&etcd, env, "locked", "pg1");
    etcd.user(
        "locked",
        "right-secret",
        &["/service/locked/"],
        &["/rolegate/locked/"],
    );
    let access = Access::user(etcd.endpoint(), "locked", "wrong-secret");
    let (rolegate, _) = rolegate(env, "locked", "locked", &access, Some(&access));
    refusal_is_named(&rolegate, "locked", "etcd_password", "wrong-secret")
}

/// A client certificate from a CA etcd does not trust: the refusal names
/// `etcd_cert` of the cluster and the file.
fn a_client_certificate_etcd_rejects_is_named(env: &Env) -> Result<(), Failed> {
    let dir = env.root.join("wrong-cert");
    let etcd = SecureEtcd::start(&dir, Some(EtcdTls::new(&dir.join("certs"))), 300);
    let tls = etcd.tls().ok_or("no TLS")?;
    seed(&etcd, env, "stranger", "pg1");
    etcd.user(
        "stranger",
        "stranger-secret",
        &["/service/stranger/"],
        &["/rolegate/stranger/"],
    );
    let other = Ca::new("a CA etcd does not trust");
    let client = other.issue(&dir, "stranger", "stranger", &[]);
    let access =
        Access::user(etcd.endpoint(), "stranger", "stranger-secret").with_tls(&tls.ca, &client);
    let (rolegate, _) = rolegate(env, "stranger", "stranger", &access, Some(&access));
    refusal_is_named(&rolegate, "stranger", "etcd_cert", "stranger-secret")
}
