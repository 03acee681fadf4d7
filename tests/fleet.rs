//! A fleet of rolegates in front of the Patroni lab: ids claimed in etcd,
//! cancels that reach another instance than the session's, a killed peer,
//! etcd stopped, static peers (and a wrong map), and the PROXY protocol.
//!
//! The instances find each other through a three-member etcd of the test's
//! own, so stopping it does not disturb the lab's Patroni. The clients are
//! tokio-postgres (whose `cancel_query_raw` sends a session's key over any
//! connection, here to another instance) and a hand-made wire client; the
//! four drivers through a fleet behind a balancer are in `tests/drivers.rs`.

mod support;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use libtest_mimic::Failed;
use nix::sys::signal::Signal;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_postgres::{CancelToken, NoTls};

use support::balancer::{header_bytes, Balancer, Header};
use support::etcd_cluster::EtcdCluster;
use support::harness::{by_name, check, run_suite, TestEnv, TestFn};
use support::lab_suite::LabSuite;
use support::rolegate::Rolegate;
use support::{connect, conninfo, free_port, holds_within, runtime, sqlstate, wait_until, wire};

struct Env {
    suite: LabSuite,
    etcd: std::sync::Mutex<EtcdCluster>,
}

impl TestEnv for Env {
    fn scratch_dir(&self) -> Option<std::path::PathBuf> {
        self.suite.scratch_dir()
    }
    fn after_test(&self) {
        self.suite.after_test();
    }
}

fn main() {
    let tests: &[(&str, TestFn<Env>)] = by_name![
        ids_are_claimed_once_and_peers_found,
        a_cancel_at_another_instance_cancels,
        etcd_stopped_keeps_the_peer_table,
        a_killed_peer_then_its_lease_expires,
        static_peers_and_a_wrong_map,
        guessed_keys_are_rate_limited,
        guesses_through_a_peer_leave_real_cancels_their_way,
        proxy_protocol_headers
    ];
    run_suite(
        tests,
        || {
            let suite = LabSuite::start("fleet");
            let etcd = EtcdCluster::start(&suite.root.join("fleet-etcd"));
            Env {
                suite,
                etcd: std::sync::Mutex::new(etcd),
            }
        },
        true,
    )
}

/// One instance: its process and its ports.
struct Instance {
    rolegate: Rolegate,
    rw: u16,
    ro: u16,
}

impl Instance {
    fn cancels(&self, via: &str, outcome: &str) -> f64 {
        self.rolegate.metric(
            "rolegate_cancel_requests_total",
            &format!("via=\"{via}\",outcome=\"{outcome}\""),
        )
    }

    /// Every cancel outcome counted, as the metrics page shows them.
    fn cancel_outcomes(&self) -> String {
        let page = self
            .rolegate
            .admin_get("/metrics")
            .map(|(_, body)| body)
            .unwrap_or_default();
        page.lines()
            .filter(|line| line.starts_with("rolegate_cancel_requests_total{"))
            .collect::<Vec<_>>()
            .join("; ")
    }

    /// `/cluster`'s fleet object.
    fn fleet(&self) -> serde_json::Value {
        let body = self
            .rolegate
            .admin_get("/cluster")
            .map(|(_, body)| body)
            .unwrap_or_default();
        serde_json::from_str::<serde_json::Value>(&body).unwrap_or_default()["fleet"].clone()
    }

    fn id(&self) -> Option<u64> {
        self.fleet()["id"].as_u64()
    }

    fn peer_ids(&self) -> Vec<u64> {
        self.fleet()["peers"]
            .as_array()
            .map(|peers| peers.iter().filter_map(|p| p["id"].as_u64()).collect())
            .unwrap_or_default()
    }
}

/// Starts an instance with `fleet` as its `[fleet]` table (after
/// `listen`, which is given).
fn instance(env: &Env, name: &str, fleet: &str) -> Instance {
    instance_at(env, name, free_port(), fleet)
}

/// The `[fleet]` lines of an etcd fleet named `name` on the test's etcd,
/// its instances' leases living `lease_ttl`.
fn etcd_fleet(env: &Env, name: &str, lease_ttl: &str) -> String {
    let etcd = env.etcd.lock().unwrap_or_else(|p| p.into_inner());
    let endpoints: Vec<String> = (0..3)
        .map(|i| format!("\"{}\"", etcd.endpoint(i)))
        .collect();
    format!(
        "name = \"{name}\"\netcd = [{}]\nlease_ttl = \"{lease_ttl}\"\n",
        endpoints.join(", ")
    )
}

/// Three instances of one etcd fleet (leases of `lease_ttl`), once each
/// knows the two others.
fn etcd_trio(env: &Env, name: &str, lease_ttl: &str) -> Vec<Instance> {
    let fleet = etcd_fleet(env, name, lease_ttl);
    let trio: Vec<Instance> = (0..3)
        .map(|i| instance(env, &format!("{name}-{i}"), &fleet))
        .collect();
    wait_until(Duration::from_secs(30), "the fleet to find itself", || {
        trio.iter()
            .all(|i| i.id().is_some() && i.peer_ids().len() == 2)
            .then_some(())
    });
    trio
}

/// A session on `port` busy in `pg_sleep(seconds)`, and its cancel token.
struct Sleeper {
    token: CancelToken,
    sleep: tokio::task::JoinHandle<Result<(), tokio_postgres::Error>>,
}

async fn start_sleeper(port: u16, seconds: u32) -> Sleeper {
    let client = connect(&conninfo(port, "app", "app"))
        .await
        .expect("connect");
    let token = client.cancel_token();
    let sleep = tokio::spawn(async move {
        client
            .batch_execute(&format!("select pg_sleep({seconds})"))
            .await
    });
    // Let the query start before it is cancelled.
    tokio::time::sleep(Duration::from_millis(300)).await;
    Sleeper { token, sleep }
}

/// Sends the session's cancel key to another instance's `port`.
async fn cancel_at(token: &CancelToken, port: u16) {
    let stream = TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect");
    token
        .cancel_query_raw(stream, NoTls)
        .await
        .expect("cancel request sent");
}

/// How the sleeper's query ended, within `limit`: `None` when it ran to
/// its end, else the SQLSTATE or error.
async fn outcome(sleeper: &mut Sleeper, limit: Duration) -> Result<Option<String>, String> {
    match tokio::time::timeout(limit, &mut sleeper.sleep).await {
        Ok(Ok(Ok(()))) => Ok(None),
        Ok(Ok(Err(e))) => Ok(Some(sqlstate(&e).unwrap_or_else(|| e.to_string()))),
        Ok(Err(e)) => Err(format!("the query task failed: {e}")),
        Err(_) => Err(format!("the query did not end within {limit:?}")),
    }
}

fn ids_are_claimed_once_and_peers_found(env: &Env) -> Result<(), Failed> {
    let trio = etcd_trio(env, "ids", "3s");
    let mut ids: Vec<u64> = trio.iter().filter_map(Instance::id).collect();
    ids.sort_unstable();
    ids.dedup();
    check(ids.len() == 3, format!("three distinct ids: {ids:?}"))?;
    for instance in &trio {
        let own = instance.id();
        let mut peers = instance.peer_ids();
        peers.sort_unstable();
        let expected: Vec<u64> = ids.iter().copied().filter(|id| Some(*id) != own).collect();
        check(
            peers == expected,
            format!("instance {own:?} lists peers {peers:?}, expected {expected:?}"),
        )?;
    }
    // The status page shows the fleet: this instance's id and its peers.
    let page = format!("http://127.0.0.1:{}/", trio[0].rolegate.admin_port);
    let dom = support::browser::dump_dom(&page, &env.suite.root.join("chromium-fleet"))?;
    let fleet_section = dom
        .split("<section id=\"fleet\"")
        .nth(1)
        .unwrap_or_default();
    let own = trio[0].id().unwrap_or(0);
    let peers: Vec<u64> = ids.iter().copied().filter(|id| *id != own).collect();
    check(
        !fleet_section.starts_with(" hidden")
            && fleet_section.contains(&format!("this instance </b><code>{own}</code>"))
            && peers
                .iter()
                .all(|id| fleet_section.contains(&format!("<td><code>{id}</code></td>"))),
        format!(
            "the status page shows instance {own} and peers {peers:?}:\n{}",
            &fleet_section[..fleet_section.len().min(1500)]
        ),
    )?;
    let etcd = env.etcd.lock().unwrap_or_else(|p| p.into_inner());
    let keys = etcd
        .etcdctl(
            0,
            &["get", "--prefix", "--keys-only", "/rolegate/ids/members/"],
        )
        .unwrap_or_default();
    let claimed = keys.lines().filter(|l| !l.is_empty()).count();
    check(claimed == 3, format!("three claims in etcd:\n{keys}"))
}

fn a_cancel_at_another_instance_cancels(env: &Env) -> Result<(), Failed> {
    let trio = etcd_trio(env, "cancel", "3s");
    runtime().block_on(async {
        for (owner, other, listener) in [(0, 1, "rw"), (1, 2, "ro"), (2, 0, "rw")] {
            let port = |i: usize| if listener == "rw" { trio[i].rw } else { trio[i].ro };
            let passed = trio[other].cancels("client", "to_peer");
            let delivered = trio[owner].cancels("peer", "forwarded");
            let started = Instant::now();
            let mut sleeper = start_sleeper(port(owner), 30).await;
            cancel_at(&sleeper.token, port(other)).await;
            let ended = outcome(&mut sleeper, Duration::from_secs(10)).await?;
            check(
                ended.as_deref() == Some("57014"),
                format!("{listener}: session on instance {owner}, cancel at {other}: {ended:?}"),
            )?;
            check(
                holds_within(Duration::from_secs(5), || {
                    trio[other].cancels("client", "to_peer") == passed + 1.0
                        && trio[owner].cancels("peer", "forwarded") == delivered + 1.0
                }),
                format!("{listener}: the cancel went from instance {other} to {owner} and on to the member"),
            )?;
            println!("    {listener}: cancelled through another instance in {:.2?}", started.elapsed());
        }
        Ok::<(), Failed>(())
    })?;
    // The close of a cancel connection at another instance comes after
    // the owner delivered it, so the client's next query is safe.
    let mut session = wire::KeyedSession::login(trio[0].rw)?;
    let cancelled = wire::late_cancels(&mut session, trio[1].rw, 10)?;
    check(
        cancelled == 0,
        format!("{cancelled} of 10 queries sent after a cancel's close at another instance were cancelled"),
    )
}

fn etcd_stopped_keeps_the_peer_table(env: &Env) -> Result<(), Failed> {
    let trio = etcd_trio(env, "etcdloss", "3s");
    {
        let mut etcd = env.etcd.lock().unwrap_or_else(|p| p.into_inner());
        for i in 0..3 {
            etcd.stop(i);
        }
    }
    let result = (|| {
        wait_until(
            Duration::from_secs(20),
            "the instances to notice etcd is gone",
            || {
                trio.iter()
                    .all(|i| i.rolegate.log().contains("etcd lost"))
                    .then_some(())
            },
        );
        let tables: Vec<(Option<u64>, Vec<u64>)> =
            trio.iter().map(|i| (i.id(), i.peer_ids())).collect();
        check(
            tables.iter().all(|(_, peers)| peers.len() == 2),
            format!("the peer tables are kept while etcd is away: (own id, peers) {tables:?}"),
        )?;
        runtime().block_on(async {
            let mut sleeper = start_sleeper(trio[0].rw, 30).await;
            cancel_at(&sleeper.token, trio[2].rw).await;
            let ended = outcome(&mut sleeper, Duration::from_secs(10)).await?;
            check(
                ended.as_deref() == Some("57014"),
                format!("a cancel at another instance with etcd stopped: {ended:?}"),
            )
        })
    })();
    env.etcd
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .restart_stopped();
    result
}

fn a_killed_peer_then_its_lease_expires(env: &Env) -> Result<(), Failed> {
    use std::io::Write;

    // The dead peer must stay in the others' tables until its key has been
    // tried there: a lease that outlives a slow machine's pauses.
    let trio = etcd_trio(env, "killed", "10s");
    let victim_id = trio[2].id();
    // A session on the instance about to die, busy in pg_sleep.
    let mut session = wire::connect(trio[2].rw);
    session.write_all(&wire::startup_packet(
        3,
        0,
        &[("user", "app"), ("database", "app")],
    ))?;
    let login = wire::login(&mut session, "app");
    let (pid, secret) = login.key.ok_or("no BackendKeyData")?;
    session.write_all(&wire::message(b'Q', b"select pg_sleep(30)\0"))?;
    std::thread::sleep(Duration::from_millis(300));
    trio[2].rolegate.signal(Signal::SIGKILL);
    check(
        wire::closes(&mut session),
        "the killed instance's session is gone",
    )?;

    // Its key at another instance: passed to a peer that is not there,
    // and the client's connection closed at once all the same.
    let cancel_and_time = || -> Result<Duration, Failed> {
        let mut cancel = wire::connect(trio[0].rw);
        let started = Instant::now();
        cancel.write_all(&wire::cancel_request(pid, &secret))?;
        check(wire::closes(&mut cancel), "the cancel connection is closed")?;
        Ok(started.elapsed())
    };
    let unreachable = trio[0].cancels("client", "peer_unreachable");
    let took = cancel_and_time()?;
    check(
        took < Duration::from_secs(2),
        format!("the cancel connection closed after {took:?}"),
    )?;
    check(
        holds_within(Duration::from_secs(5), || {
            trio[0].cancels("client", "peer_unreachable") == unreachable + 1.0
        }),
        format!(
            "peer_unreachable was not counted; the cancel outcomes: {}",
            trio[0].cancel_outcomes()
        ),
    )?;
    // Its lease expires and it leaves the others' tables.
    wait_until(
        Duration::from_secs(30),
        "the dead peer's lease to expire",
        || (!trio[0].peer_ids().contains(&victim_id.unwrap_or(0))).then_some(()),
    );
    let unknown = trio[0].cancels("client", "unknown_peer");
    cancel_and_time()?;
    wait_until(Duration::from_secs(5), "unknown_peer to be counted", || {
        (trio[0].cancels("client", "unknown_peer") == unknown + 1.0).then_some(())
    });
    Ok(())
}

fn static_peers_and_a_wrong_map(env: &Env) -> Result<(), Failed> {
    // Two instances that list each other, and a third whose map is wrong:
    // it believes instance 1 is at instance 2's peer address.
    let (one, two, peer2) = static_pair(env, "static");
    let wrong = instance(
        env,
        "static3",
        &format!("id = 3\npeers = {{ \"1\" = \"127.0.0.1:{peer2}\" }}"),
    );
    check(
        one.id() == Some(1) && two.peer_ids() == [1],
        "static ids and peers in /cluster",
    )?;
    runtime().block_on(async {
        let mut sleeper = start_sleeper(one.rw, 30).await;
        cancel_at(&sleeper.token, two.rw).await;
        let ended = outcome(&mut sleeper, Duration::from_secs(10)).await?;
        check(
            ended.as_deref() == Some("57014"),
            format!("a cancel through a static peer: {ended:?}"),
        )?;

        let passed = wrong.cancels("client", "to_peer");
        let missed = two.cancels("peer", "unknown_key");
        let two_passed = two.cancels("client", "to_peer");
        let mut sleeper = start_sleeper(one.rw, 3).await;
        cancel_at(&sleeper.token, wrong.rw).await;
        let ended = outcome(&mut sleeper, Duration::from_secs(10)).await?;
        check(
            ended.is_none(),
            format!("a cancel sent to the wrong instance cancels nothing: {ended:?}"),
        )?;
        check(
            wrong.cancels("client", "to_peer") == passed + 1.0
                && two.cancels("peer", "unknown_key") == missed + 1.0
                && two.cancels("client", "to_peer") == two_passed
                && one.cancels("peer", "forwarded") == 1.0,
            "one forward, one miss at the wrong peer, and no second forward",
        )
    })
}

/// Instances 1 and 2 of a static fleet that list each other (named
/// `{name}1` and `{name}2`), and instance 2's peer port.
fn static_pair(env: &Env, name: &str) -> (Instance, Instance, u16) {
    let (peer1, peer2) = (free_port(), free_port());
    let one = instance_at(
        env,
        &format!("{name}1"),
        peer1,
        &format!("id = 1\npeers = {{ \"2\" = \"127.0.0.1:{peer2}\" }}"),
    );
    let two = instance_at(
        env,
        &format!("{name}2"),
        peer2,
        &format!("id = 2\npeers = {{ \"1\" = \"127.0.0.1:{peer1}\" }}"),
    );
    (one, two, peer2)
}

/// As [`instance`], with the peer listener on `peer`.
fn instance_at(env: &Env, name: &str, peer: u16, fleet: &str) -> Instance {
    let (rw, ro) = (free_port(), free_port());
    let lab = &env.suite.lab;
    let config = lab.rolegate_config(
        rw,
        ro,
        &lab.etcd_line(),
        &format!(
            "[limits]\nhold_timeout = \"30s\"\n\n[fleet]\nlisten = \"127.0.0.1:{peer}\"\n{fleet}\n"
        ),
    );
    let rolegate = Rolegate::start(&env.suite.root, name, &config);
    Instance { rolegate, rw, ro }
}

fn guessed_keys_are_rate_limited(env: &Env) -> Result<(), Failed> {
    let target = instance(env, "guessing", "id = 9");
    let guesses = 64u32;
    for n in 0..guesses {
        let mut stream = wire::connect(target.rw);
        let _ =
            std::io::Write::write_all(&mut stream, &wire::cancel_request((9 << 20) | n, b"abcd"));
        check(
            wire::closes(&mut stream),
            "a cancel request is answered by closing",
        )?;
    }
    let (limited, unknown) =
        wait_until(Duration::from_secs(10), "every guess to be counted", || {
            let limited = target.cancels("client", "rate_limited");
            let unknown = target.cancels("client", "unknown_key");
            (limited + unknown == f64::from(guesses)).then_some((limited, unknown))
        });
    println!("    {guesses} guesses: {unknown} looked up, {limited} dropped");
    check(
        limited > 0.0 && unknown <= 32.0,
        format!("failed guesses hold their places: {unknown} looked up, {limited} rate limited"),
    )
}

/// Clients guessing keys of one instance at another fill the places the
/// owner gives that forwarder's misses; a real cancel passed on the same
/// way still reaches its session.
fn guesses_through_a_peer_leave_real_cancels_their_way(env: &Env) -> Result<(), Failed> {
    let (owner, forwarder, _) = static_pair(env, "guessed");
    let mut session = wire::KeyedSession::login(owner.rw)?;
    // Five guessing addresses, each as many guesses as the forwarder lets
    // one address have at once: 80 misses at the owner within its hold.
    let (pid, port) = (session.pid, forwarder.rw);
    let guessers: Vec<_> = (2..7u8)
        .map(|last| {
            std::thread::spawn(move || {
                for n in 0..16u32 {
                    let mut stream = wire::connect_from([127, 0, 0, last], port);
                    let guess = wire::cancel_request(pid, &n.to_be_bytes());
                    let _ = std::io::Write::write_all(&mut stream, &guess);
                    wire::closes(&mut stream);
                }
            })
        })
        .collect();
    for guesser in guessers {
        guesser.join().map_err(|_| "a guessing thread panicked")?;
    }
    let dropped = owner.cancels("peer", "rate_limited");
    println!("    80 guesses passed on: the owner dropped {dropped}");
    check(
        dropped > 0.0,
        format!(
            "the guesses filled the owner's places for the forwarder's misses: {}",
            owner.cancel_outcomes()
        ),
    )?;
    std::io::Write::write_all(
        &mut session.stream,
        &wire::message(b'Q', b"select pg_sleep(10)\0"),
    )?;
    std::thread::sleep(Duration::from_millis(300));
    let mut cancel = wire::connect(forwarder.rw);
    std::io::Write::write_all(
        &mut cancel,
        &wire::cancel_request(session.pid, &session.secret),
    )?;
    check(wire::closes(&mut cancel), "the cancel connection closes")?;
    let ended = wire::query_outcome(&mut session.stream)?;
    check(
        ended.as_deref() == Some("57014"),
        format!(
            "the real cancel through the forwarder: {ended:?}; owner: {}",
            owner.cancel_outcomes()
        ),
    )
}

fn proxy_protocol_headers(env: &Env) -> Result<(), Failed> {
    let lab = &env.suite.lab;
    let (trusted, untrusted) = (free_port(), free_port());
    let config = format!(
        r#"
[clusters.demo]
scope = "demo"
{}

[[listeners]]
listen = "127.0.0.1:{trusted}"
cluster = "demo"
role = "primary"
proxy_protocol = true
trusted_proxies = ["127.0.0.1/32", "::1"]

[[listeners]]
listen = "127.0.0.1:{untrusted}"
cluster = "demo"
role = "primary"
proxy_protocol = true
trusted_proxies = ["10.0.0.0/8"]
"#,
        lab.etcd_line()
    );
    let rolegate = Rolegate::start(&env.suite.root, "proxy", &config);
    let target = SocketAddr::from(([127, 0, 0, 1], trusted));
    let clients = [
        (
            "v1 IPv4",
            Header::V1 as fn(SocketAddr) -> Header,
            "192.0.2.7:40001",
        ),
        ("v1 IPv6", Header::V1, "[2001:db8::7]:40002"),
        ("v2 IPv4", Header::V2, "198.51.100.9:40003"),
        ("v2 IPv6", Header::V2, "[2001:db8::9]:40004"),
    ];
    runtime().block_on(async {
        for (what, version, claimed) in clients {
            let header = version(claimed.parse().expect("address"));
            let balancer = Balancer::start(vec![target], header);
            let client = connect(&conninfo(balancer.port, "app", "app"))
                .await
                .map_err(|e| format!("{what}: {e}"))?;
            let row = client
                .query_one("select pg_is_in_recovery()", &[])
                .await
                .map_err(|e| format!("{what}: {e}"))?;
            check(
                !row.get::<_, bool>(0),
                format!("{what}: reached the primary"),
            )?;
            let clients = rolegate
                .admin_get("/cluster")
                .map(|(_, body)| body)
                .unwrap_or_default();
            let client_ip = claimed.rsplit_once(':').map_or(claimed, |(ip, _)| ip);
            let client_ip = client_ip.trim_start_matches('[').trim_end_matches(']');
            check(
                clients.contains(&format!("\"address\": \"{client_ip}\"")),
                format!("{what}: /cluster lists the client {client_ip}"),
            )?;
            let log = rolegate.log();
            check(
                log.contains(&format!("client={claimed}")),
                format!("{what}: the session is logged as from {claimed}"),
            )?;
            println!("    {what}: session from {claimed}");
        }
        // The balancer's own connection (LOCAL) keeps the connection's address.
        let mut stream = TcpStream::connect(target)
            .await
            .map_err(|e| e.to_string())?;
        let mut local = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
        local.extend_from_slice(&[0x20, 0x00, 0x00, 0x00]);
        stream.write_all(&local).await.map_err(|e| e.to_string())?;
        let (client, connection) = conninfo(trusted, "app", "app")
            .parse::<tokio_postgres::Config>()
            .map_err(|e| e.to_string())?
            .connect_raw(stream, NoTls)
            .await
            .map_err(|e| format!("LOCAL: {e}"))?;
        tokio::spawn(connection);
        client
            .simple_query("select 1")
            .await
            .map_err(|e| format!("LOCAL: {e}"))?;
        println!("    v2 LOCAL: session served");

        // No header, garbage, an untrusted balancer: a FATAL, then closed.
        let refused = |port: u16, bytes: Vec<u8>| async move {
            let mut stream = TcpStream::connect(("127.0.0.1", port))
                .await
                .map_err(|e| e.to_string())?;
            stream.write_all(&bytes).await.map_err(|e| e.to_string())?;
            let mut answer = Vec::new();
            tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut answer))
                .await
                .map_err(|_| "no answer in 10 s".to_owned())?
                .map_err(|e| e.to_string())?;
            Ok::<String, String>(String::from_utf8_lossy(&answer).into_owned())
        };
        let startup = wire::startup_packet(3, 0, &[("user", "app"), ("database", "app")]);
        let no_header = refused(trusted, startup.clone()).await?;
        check(
            no_header.contains("C08P01") && no_header.contains("PROXY protocol"),
            format!("no header: {no_header:?}"),
        )?;
        let garbage = refused(trusted, b"GET / HTTP/1.1\r\n\r\n".to_vec()).await?;
        check(garbage.contains("C08P01"), format!("garbage: {garbage:?}"))?;
        let mut from_untrusted =
            header_bytes(Header::V1("192.0.2.7:1".parse().expect("addr")), target);
        from_untrusted.extend_from_slice(&startup);
        let untrusted_answer = refused(untrusted, from_untrusted).await?;
        check(
            untrusted_answer.contains("C28000") && untrusted_answer.contains("trusted_proxies"),
            format!("untrusted: {untrusted_answer:?}"),
        )?;
        let refused = |port: u16| {
            rolegate.metric(
                "rolegate_client_connections_total",
                &format!("listener=\"127.0.0.1:{port}\",outcome=\"proxy_header\""),
            )
        };
        check(
            refused(trusted) == 2.0 && refused(untrusted) == 1.0,
            format!(
                "the refusals are counted as proxy_header: {} and {}",
                refused(trusted),
                refused(untrusted)
            ),
        )
    })
}
