//! The data path against real PostgreSQL 15 servers: routing, relayed
//! authentication, cancel, limits, hostile first packets, shutdown.
//!
//! One static cluster of three servers is started once for the whole
//! binary; each test starts its own rolegate in front of it.

mod support;

use std::io::Write;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use libtest_mimic::Failed;
use nix::sys::signal::Signal;

use support::harness::{by_name, check, run_suite, TestFn};
use support::pg::PgServer;
use support::procinfo::Usage;
use support::rolegate::Rolegate;
use support::static_cluster::StaticCluster;
use support::{connect, conninfo, free_port, runtime, scenarios, sqlstate, wait_until, wire};

type Env = StaticCluster;

fn main() {
    let tests: &[(&str, TestFn<Env>)] = by_name![
        rw_listener_reaches_the_primary,
        ro_listener_alternates_between_replicas,
        psql_works_through_both_listeners,
        wrong_scram_password_gives_the_servers_28p01,
        md5_and_trust_authentication_relay,
        cancel_reaches_the_right_replica,
        a_cancel_is_delivered_before_its_connection_closes,
        a_terminate_is_a_quiet_goodbye,
        too_many_connections_gives_53300,
        unreachable_backend_gives_08001_naming_the_member,
        a_write_session_is_refused_by_a_server_in_recovery,
        hostile_first_packets_leave_other_sessions_alone,
        protocol_32_startup_is_forwarded_unchanged,
        handshake_timeout_cuts_silent_clients,
        sigterm_drains_then_ends_sessions_with_57p01,
        check_config_names_the_key_and_file,
        admin_connections_are_bounded_and_timed_per_request,
        admin_endpoint_serves_health_readiness_and_the_cluster,
        metrics_follow_sessions_cancels_and_refusals,
        example_alert_rules_are_valid,
        sighup_reloads_limits_and_refuses_bad_files,
        tcp_keepalive_guards_both_connections
    ];
    run_suite(tests, || StaticCluster::start("core"), false);
}

async fn server_port(conninfo: &str) -> Result<u16, Failed> {
    let client = connect(conninfo)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let row = client
        .query_one("select inet_server_port()", &[])
        .await
        .map_err(|e| format!("query: {e}"))?;
    let port: i32 = row.get(0);
    Ok(port as u16)
}

fn rw_listener_reaches_the_primary(env: &Env) -> Result<(), Failed> {
    let (_rolegate, rw, _ro) = env.rolegate("rw", "");
    runtime().block_on(async {
        for _ in 0..3 {
            let port = server_port(&conninfo(rw, "app", "app")).await?;
            check(
                port == env.primary.port,
                format!("rw reached {port}, not the primary"),
            )?;
        }
        Ok(())
    })
}

fn ro_listener_alternates_between_replicas(env: &Env) -> Result<(), Failed> {
    let (_rolegate, _rw, ro) = env.rolegate("ro", "");
    runtime().block_on(async {
        let mut ports = Vec::new();
        for _ in 0..4 {
            ports.push(server_port(&conninfo(ro, "app", "app")).await?);
        }
        let (a, b) = (env.replicas[0].port, env.replicas[1].port);
        check(
            ports == [a, b, a, b] || ports == [b, a, b, a],
            format!("ro sessions went to {ports:?}; expected alternation of {a} and {b}"),
        )
    })
}

fn psql(port: u16, user: &str, password: &str, sql: &str) -> std::process::Output {
    std::process::Command::new("psql")
        .arg(conninfo(port, user, password))
        .args(["-AtX", "-v", "ON_ERROR_STOP=1", "-c", sql])
        .env("PGCONNECT_TIMEOUT", "10")
        .output()
        .expect("run psql")
}

fn psql_works_through_both_listeners(env: &Env) -> Result<(), Failed> {
    let (_rolegate, rw, ro) = env.rolegate("psql", "");
    let out = psql(
        rw,
        "app",
        "app",
        "select inet_server_port(), pg_backend_pid() > 0",
    );
    check(out.status.success(), String::from_utf8_lossy(&out.stderr))?;
    check(
        String::from_utf8_lossy(&out.stdout).trim() == format!("{}|t", env.primary.port),
        format!("psql rw printed {:?}", String::from_utf8_lossy(&out.stdout)),
    )?;
    // A transaction, a multi-row result and an error inside one session.
    let out = psql(
        ro,
        "app",
        "app",
        "begin; select count(*) from generate_series(1, 100000); select 1/0;",
    );
    check(!out.status.success(), "division by zero must fail")?;
    check(
        String::from_utf8_lossy(&out.stderr).contains("division by zero"),
        String::from_utf8_lossy(&out.stderr),
    )
}

fn wrong_scram_password_gives_the_servers_28p01(env: &Env) -> Result<(), Failed> {
    let (_rolegate, rw, _ro) = env.rolegate("password", "");
    runtime().block_on(async {
        let err = connect(&conninfo(rw, "app", "wrong"))
            .await
            .err()
            .ok_or("a wrong password must fail")?;
        check(
            sqlstate(&err).as_deref() == Some("28P01"),
            format!("got {err}"),
        )
    })?;
    let out = psql(rw, "app", "wrong", "select 1");
    check(
        String::from_utf8_lossy(&out.stderr)
            .contains("password authentication failed for user \"app\""),
        String::from_utf8_lossy(&out.stderr),
    )
}

fn md5_and_trust_authentication_relay(env: &Env) -> Result<(), Failed> {
    let (_rolegate, rw, _ro) = env.rolegate("methods", "");
    runtime().block_on(async {
        for (user, password) in [("md5user", "md5pw"), ("trustuser", "ignored")] {
            let client = connect(&conninfo(rw, user, password))
                .await
                .map_err(|e| format!("{user}: {e}"))?;
            let row = client.query_one("select current_user::text", &[]).await?;
            check(row.get::<_, String>(0) == user, "current_user")?;
        }
        let err = connect(&conninfo(rw, "md5user", "nope"))
            .await
            .err()
            .ok_or("md5 wrong password")?;
        check(
            sqlstate(&err).as_deref() == Some("28P01"),
            format!("md5: {err}"),
        )
    })
}

fn cancel_reaches_the_right_replica(env: &Env) -> Result<(), Failed> {
    let (_rolegate, _rw, ro) = env.rolegate("cancel", "");
    runtime().block_on(async {
        // Two sessions so the two replicas are both in use.
        let first = connect(&conninfo(ro, "app", "app")).await?;
        let second = connect(&conninfo(ro, "app", "app")).await?;
        for (client, what) in [(&first, "first"), (&second, "second")] {
            scenarios::cancelled(client, what).await?;
            client.simple_query("select 1").await?;
        }
        Ok(())
    })
}

fn a_cancel_is_delivered_before_its_connection_closes(env: &Env) -> Result<(), Failed> {
    let (_rolegate, rw, _ro) = env.rolegate("late-cancel", "");
    // A client that cancels its idle session and, once the cancel
    // connection is closed, sends its next query: the cancel must have
    // reached the server by then (and found nothing to cancel).
    let mut session = wire::KeyedSession::login(rw)?;
    let cancelled = wire::late_cancels(&mut session, rw, 20)?;
    check(
        cancelled == 0,
        format!("{cancelled} of 20 queries sent after a cancel's close were cancelled"),
    )
}

fn a_terminate_is_a_quiet_goodbye(env: &Env) -> Result<(), Failed> {
    let (_rolegate, rw, _ro) = env.rolegate("goodbye", "");
    // node-postgres's end(): Terminate, then the socket closed a moment
    // later, after PostgreSQL has closed its side.
    for round in 0..5 {
        let mut session = wire::connect(rw);
        session.write_all(&wire::startup_packet(
            3,
            0,
            &[("user", "app"), ("database", "app")],
        ))?;
        let login = wire::login(&mut session, "app");
        check(login.key.is_some(), "logged in")?;
        session.write_all(&wire::message(b'X', b""))?;
        wire::closes_silently(&mut session)
            .map_err(|e| format!("round {round}: after Terminate rolegate {e}"))?;
    }
    // Terminate as the very first bytes (connect(); end() at once):
    // closed without an answer, as PostgreSQL does; other bytes that look
    // like an impossible length still get 08P01.
    let mut quick = wire::connect(rw);
    quick.write_all(&wire::message(b'X', b""))?;
    wire::closes_silently(&mut quick)
        .map_err(|e| format!("after a Terminate first, rolegate {e}"))?;
    let state = wire::send_and_read_error(rw, b"X\0\0\0\x05");
    check(
        state.as_deref() == Some("08P01"),
        format!("X with another length: {state:?}"),
    )
}

fn too_many_connections_gives_53300(env: &Env) -> Result<(), Failed> {
    let (_rolegate, rw, _ro) = env.rolegate("limit", "[limits]\nmax_client_connections = 2\n");
    runtime().block_on(async {
        let a = connect(&conninfo(rw, "app", "app")).await?;
        let b = connect(&conninfo(rw, "app", "app")).await?;
        let err = connect(&conninfo(rw, "app", "app"))
            .await
            .err()
            .ok_or("third must fail")?;
        check(
            sqlstate(&err).as_deref() == Some("53300"),
            format!("got {err}"),
        )?;
        a.simple_query("select 1").await?;
        drop(a);
        // The freed slot serves a new client (the slot is released when
        // rolegate sees the close, so allow it a moment).
        let mut last = None;
        for _ in 0..50 {
            match connect(&conninfo(rw, "app", "app")).await {
                Ok(c) => {
                    c.simple_query("select 1").await?;
                    b.simple_query("select 1").await?;
                    return Ok(());
                }
                Err(e) => last = Some(e),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Err(format!("no recovery after a slot was freed: {last:?}").into())
    })
}

fn unreachable_backend_gives_08001_naming_the_member(env: &Env) -> Result<(), Failed> {
    let dead = free_port();
    let (rw, ro) = (free_port(), free_port());
    let config = format!(
        "[clusters.gone]\nprimary = \"127.0.0.1:{dead}\"\n\n[[listeners]]\nlisten = \"127.0.0.1:{rw}\"\ncluster = \"gone\"\nrole = \"primary\"\n\n[[listeners]]\nlisten = \"127.0.0.1:{ro}\"\ncluster = \"gone\"\nrole = \"replica\"\n"
    );
    let _rolegate = Rolegate::start(&env.root, "unreachable", &config);
    runtime().block_on(async {
        let err = connect(&conninfo(rw, "app", "app"))
            .await
            .err()
            .ok_or("must fail")?;
        let db = err
            .as_db_error()
            .ok_or(format!("not a server error: {err}"))?;
        check(db.code().code() == "08001", format!("got {err}"))?;
        check(
            db.message().contains(&format!("127.0.0.1:{dead}")),
            format!("message does not name the member: {}", db.message()),
        )?;
        // No replica in a static cluster: 57P03 at once, not a hang.
        let err = connect(&conninfo(ro, "app", "app"))
            .await
            .err()
            .ok_or("must fail")?;
        check(
            sqlstate(&err).as_deref() == Some("57P03"),
            format!("got {err}"),
        )
    })
}

/// rolegate's view names a leader that is in recovery (a demoted leader
/// restarted as a replica before the view moved): the server's own
/// `in_hot_standby` at login refuses the write session with 57P03 before
/// it opens, while a read session there is served.
fn a_write_session_is_refused_by_a_server_in_recovery(env: &Env) -> Result<(), Failed> {
    let standby = PgServer::start_standby(&env.root, "standby");
    let (rw, ro) = (free_port(), free_port());
    let config = format!(
        "[clusters.demoted]\nprimary = \"{}\"\nreplicas = [\"{}\"]\n\n\
         [[listeners]]\nlisten = \"127.0.0.1:{rw}\"\ncluster = \"demoted\"\nrole = \"primary\"\n\n\
         [[listeners]]\nlisten = \"127.0.0.1:{ro}\"\ncluster = \"demoted\"\nrole = \"prefer-replica\"\n",
        standby.address(),
        env.replicas[0].address()
    );
    let rolegate = Rolegate::start(&env.root, "in-recovery", &config);
    runtime().block_on(async {
        let err = connect(&conninfo(rw, "app", "app"))
            .await
            .err()
            .ok_or("a write session opened on a server in recovery")?;
        let db = err
            .as_db_error()
            .ok_or(format!("not a server error: {err}"))?;
        check(db.code().code() == "57P03", format!("got {err}: {db:?}"))?;
        check(
            db.message().contains("in recovery") && db.message().contains(&standby.address()),
            format!("the message does not say why: {}", db.message()),
        )?;
        // The same server serves reads: prefer-replica reaches it when the
        // replica is set aside.
        let reader = connect(&conninfo(ro, "app", "app")).await?;
        reader.query_one("select 1", &[]).await?;
        Ok::<_, Failed>(())
    })?;
    let refused = rolegate.metric(
        "rolegate_client_connections_total",
        &format!("listener=\"127.0.0.1:{rw}\",outcome=\"no_target\""),
    );
    check(
        refused == 1.0,
        format!("refusals counted as no_target: {refused}"),
    )?;
    check(
        standby.psql("select pg_is_in_recovery()") == "t",
        "the standby left recovery",
    )
}

fn hostile_first_packets_leave_other_sessions_alone(env: &Env) -> Result<(), Failed> {
    let (_rolegate, rw, _ro) = env.rolegate("hostile", "[limits]\nhandshake_timeout = \"2s\"\n");
    let rt = runtime();
    let healthy = rt.block_on(connect(&conninfo(rw, "app", "app")))?;
    rt.block_on(healthy.simple_query("select 1"))?;

    // 10 KB+ first packet: refused from its length alone.
    let mut big = 10_001u32.to_be_bytes().to_vec();
    big.extend(vec![b'a'; 10_001 - 4]);
    let state = wire::send_and_read_error(rw, &big);
    check(
        state.as_deref() == Some("08P01"),
        format!("oversized packet: {state:?}"),
    )?;

    // A huge declared length with little data.
    let state = wire::send_and_read_error(rw, &0x7fff_fff0u32.to_be_bytes());
    check(
        state.as_deref() == Some("08P01"),
        format!("huge length: {state:?}"),
    )?;

    // Truncated: a length promising more than is ever sent.
    let packet = wire::startup_packet(3, 0, &[("user", "app")]);
    let mut stream = wire::connect(rw);
    stream.write_all(&packet[..packet.len() - 3])?;
    let started = Instant::now();
    check(
        wire::closes(&mut stream),
        "a truncated packet must end in a close",
    )?;
    check(
        started.elapsed() < Duration::from_secs(10),
        "closed by handshake_timeout",
    )?;

    // Unsupported protocol version.
    let state = wire::send_and_read_error(rw, &wire::startup_packet(4, 0, &[("user", "app")]));
    check(
        state.as_deref() == Some("0A000"),
        format!("protocol 4.0: {state:?}"),
    )?;

    // No user.
    let state = wire::send_and_read_error(rw, &wire::startup_packet(3, 0, &[("database", "app")]));
    check(
        state.as_deref() == Some("28000"),
        format!("no user: {state:?}"),
    )?;

    let rows = rt.block_on(healthy.query_one("select 41 + 1", &[]))?;
    check(
        rows.get::<_, i32>(0) == 42,
        "the healthy session still works",
    )
}

/// Protocol 3.2, and later minors that no server speaks yet (libpq's test
/// builds ask for 3.9999): rolegate passes the request on, the server
/// negotiates, and the session goes on.
fn protocol_32_startup_is_forwarded_unchanged(env: &Env) -> Result<(), Failed> {
    let (_rolegate, rw, _ro) = env.rolegate("v32", "");
    for minor in [2, 3, 9999] {
        negotiated_through_rolegate(rw, minor)
            .map_err(|e| format!("protocol 3.{minor}: {}", e.message().unwrap_or("failed")))?;
    }
    Ok(())
}

fn negotiated_through_rolegate(rw: u16, minor: u16) -> Result<(), Failed> {
    let mut stream = wire::connect(rw);
    stream.write_all(&wire::startup_packet(
        3,
        minor,
        &[
            ("user", "trustuser"),
            ("database", "app"),
            ("_pq_.unknown", "x"),
        ],
    ))?;
    let mut tags = Vec::new();
    let mut negotiated = None;
    while let Some(msg) = wire::read_msg(&mut stream) {
        tags.push(msg.tag);
        if msg.tag == b'v' {
            negotiated = Some(msg.body.clone());
        }
        if msg.tag == b'Z' || msg.tag == b'E' {
            break;
        }
    }
    // PostgreSQL 15 answers a 3.x request with NegotiateProtocolVersion
    // (newest version 3.0, one unrecognised `_pq_` option): proof that the
    // startup packet reached it byte for byte.
    let body = negotiated.ok_or(format!("no NegotiateProtocolVersion; got {tags:?}"))?;
    check(
        body[..4] == [0, 3, 0, 0],
        format!("negotiated version {:?}", &body[..4]),
    )?;
    check(body[4..8] == [0, 0, 0, 1], "one unrecognised option")?;
    check(
        tags.last() == Some(&b'Z'),
        format!("session not ready: {tags:?}"),
    )
}

fn handshake_timeout_cuts_silent_clients(env: &Env) -> Result<(), Failed> {
    let (_rolegate, rw, _ro) = env.rolegate("timeout", "[limits]\nhandshake_timeout = \"1s\"\n");
    // Silent from the start.
    let mut silent = wire::connect(rw);
    let started = Instant::now();
    let first = wire::read_msg(&mut silent);
    check(
        first.as_ref().and_then(|m| m.field(b'C')).as_deref() == Some("08006"),
        format!("silent client got {first:?}"),
    )?;
    check(
        started.elapsed() < Duration::from_secs(5),
        "cut within the timeout",
    )?;

    // Silent in the middle of SCRAM: the server asked, the client never
    // answers.
    let mut stalled = wire::connect(rw);
    stalled.write_all(&wire::startup_packet(
        3,
        0,
        &[("user", "app"), ("database", "app")],
    ))?;
    let started = Instant::now();
    let request = wire::read_msg(&mut stalled).ok_or("no auth request")?;
    check(request.tag == b'R', "an authentication request")?;
    let next = wire::read_msg(&mut stalled);
    check(
        next.as_ref().and_then(|m| m.field(b'C')).as_deref() == Some("08006"),
        format!("stalled client got {next:?}"),
    )?;
    check(
        started.elapsed() < Duration::from_secs(5),
        "cut within the timeout",
    )?;
    check(wire::closes(&mut stalled), "closed after the error")
}

fn sigterm_drains_then_ends_sessions_with_57p01(env: &Env) -> Result<(), Failed> {
    let (mut rolegate, rw, _ro) = env.rolegate("drain", "[limits]\nshutdown_timeout = \"3s\"\n");
    runtime().block_on(async {
        let finishing = connect(&conninfo(rw, "app", "app")).await?;
        let lingering = connect(&conninfo(rw, "app", "app")).await?;
        rolegate.signal(Signal::SIGTERM);
        tokio::time::sleep(Duration::from_millis(300)).await;
        // Draining: open sessions keep working, new ones are not accepted.
        finishing.simple_query("select 1").await?;
        check(
            connect(&conninfo(rw, "app", "app")).await.is_err(),
            "a new connection must not be accepted while draining",
        )?;
        drop(finishing);
        // The lingering session is ended at shutdown_timeout with 57P01.
        let started = Instant::now();
        let mut ended = None;
        while started.elapsed() < Duration::from_secs(10) {
            match lingering.simple_query("select 1").await {
                Ok(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                Err(e) => {
                    ended = Some(e);
                    break;
                }
            }
        }
        let err = ended.ok_or("the lingering session was never ended")?;
        check(
            sqlstate(&err).as_deref() == Some("57P01") || err.is_closed(),
            format!("got {err}"),
        )?;
        check(
            rolegate
                .log()
                .contains("ending the remaining sessions with FATAL 57P01"),
            "the log tells about ending sessions",
        )
    })?;
    let status = rolegate
        .wait_exit(Duration::from_secs(10))
        .ok_or("rolegate did not exit")?;
    check(status.success(), format!("exit status {status}"))
}

fn check_config_names_the_key_and_file(env: &Env) -> Result<(), Failed> {
    let dir = env.root.join("check-config");
    std::fs::create_dir_all(&dir)?;
    let good = dir.join("good.toml");
    std::fs::write(&good, env.config(free_port(), free_port(), ""))?;
    let bad = dir.join("bad.toml");
    std::fs::write(
        &bad,
        env.config(
            free_port(),
            free_port(),
            "[limits]\nhold_timeout = \"soon\"\n",
        ),
    )?;
    let run = |file: &PathBuf| {
        std::process::Command::new(env!("CARGO_BIN_EXE_rolegate"))
            .arg("check-config")
            .arg(file)
            .output()
            .expect("run rolegate check-config")
    };
    check(run(&good).status.success(), "good config passes")?;
    let out = run(&bad);
    let stderr = String::from_utf8_lossy(&out.stderr);
    check(
        out.status.code() == Some(2),
        format!("exit {:?}", out.status),
    )?;
    check(
        stderr.contains("bad.toml") && stderr.contains("limits.hold_timeout"),
        format!("error must name file and key: {stderr}"),
    )?;
    let version = std::process::Command::new(env!("CARGO_BIN_EXE_rolegate"))
        .arg("--version")
        .output()?;
    check(
        String::from_utf8_lossy(&version.stdout).contains(env!("CARGO_PKG_VERSION")),
        "--version prints the version",
    )
}

/// One HTTP/1.1 request on a kept-alive connection: the status.
fn keep_alive_get(stream: &mut std::net::TcpStream, path: &str) -> Result<u16, Failed> {
    use std::io::{BufRead, BufReader, Read};
    write!(stream, "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut status_line = String::new();
    reader.read_line(&mut status_line)?;
    let status = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("no HTTP status in {status_line:?}"))?;
    let mut length = 0;
    loop {
        let mut line = String::new();
        reader.read_line(&mut line)?;
        if line.trim().is_empty() {
            break;
        }
        if let Some(value) = line.to_ascii_lowercase().strip_prefix("content-length:") {
            length = value.trim().parse()?;
        }
    }
    let mut body = vec![0; length];
    reader.read_exact(&mut body)?;
    check(reader.buffer().is_empty(), "nothing after the body")?;
    Ok(status)
}

/// A scraper that keeps its connection open is served request after
/// request, past the per-request timeout (10 s), and an idle one is let
/// go; one address holds at most 16 connections and all at most 64, past
/// which probes are still answered; a sign-in whose body never comes is
/// answered, and a wrong token is answered late on every guarded path.
fn admin_connections_are_bounded_and_timed_per_request(env: &Env) -> Result<(), Failed> {
    let admin_port = free_port();
    let (mut rolegate, _rw, _ro) = env.rolegate(
        "admin-limits",
        &format!("\n[admin]\nlisten = \"127.0.0.1:{admin_port}\"\ntoken = \"s3cret\"\n"),
    );
    rolegate.admin_port = admin_port;
    let mut kept = wire::connect(admin_port);
    let started = Instant::now();
    for round in 0..7 {
        let status = keep_alive_get(&mut kept, "/metrics").map_err(|e| {
            format!(
                "request {round} at {:?} on one connection: {e:?}",
                started.elapsed()
            )
        })?;
        check(status == 200, format!("request {round}: {status}"))?;
        std::thread::sleep(Duration::from_secs(2));
    }
    // From here `kept` is idle, and a second connection never says a word.
    let mut silent = wire::connect(admin_port);

    let get = |source: [u8; 4], path: &str| {
        support::lab::http_request_from(source, admin_port, "GET", path, &[], "")
            .map(|(status, _, body)| (status, body))
            .ok_or_else(|| format!("GET {path} from {source:?}: no answer"))
    };
    let half_requests = |source: [u8; 4]| -> Result<Vec<std::net::TcpStream>, Failed> {
        (0..::rolegate::admin::MAX_PER_ADDRESS)
            .map(|_| {
                let mut stream = wire::connect_from(source, admin_port);
                stream.write_all(b"GET /metrics HTTP/1.1\r\nHo")?;
                Ok(stream)
            })
            .collect()
    };
    let mut held = half_requests([127, 0, 0, 2])?;
    std::thread::sleep(Duration::from_millis(300));
    let (status, body) = get([127, 0, 0, 2], "/metrics")?;
    check(
        status == 503 && body.contains("from your address"),
        format!("one address over its bound: {status} {body}"),
    )?;
    let (status, _) = get([127, 0, 0, 1], "/metrics")?;
    check(
        status == 200,
        format!("another address is served: {status}"),
    )?;
    for last in 3..6 {
        held.extend(half_requests([127, 0, 0, last])?);
    }
    std::thread::sleep(Duration::from_millis(300));
    let (status, body) = get([127, 0, 0, 1], "/metrics")?;
    check(
        status == 503 && body.contains("too many admin connections (at most 64)"),
        format!("over the bound in all: {status} {body}"),
    )?;
    for (source, path, expected) in [
        ([127, 0, 0, 1], "/healthz", "ok"),
        ([127, 0, 0, 1], "/readyz", "ready"),
        ([127, 0, 0, 2], "/healthz", "ok"),
    ] {
        let (status, body) = get(source, path)?;
        check(
            status == 200 && body.trim() == expected,
            format!("{path} from {source:?} while every place is held: {status} {body}"),
        )?;
    }
    drop(held);
    wait_until(
        Duration::from_secs(5),
        "the admin endpoint to serve again",
        || (rolegate.admin_get("/healthz").map(|r| r.0) == Some(200)).then_some(()),
    );

    // A sign-in that declares a body and never sends it is answered.
    let mut sign_in = wire::connect(admin_port);
    sign_in.write_all(
        b"POST /login HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: 100\r\n\r\n",
    )?;
    let mut answer = String::new();
    std::io::Read::read_to_string(&mut sign_in, &mut answer)
        .map_err(|e| format!("the sign-in without its body was not answered: {e}"))?;
    check(
        answer.starts_with("HTTP/1.1 408"),
        format!("a sign-in without its body: {answer:?}"),
    )?;

    // A guess is answered late on every guarded path; no credential at once.
    for path in ["/cluster", "/events", "/"] {
        let asked = Instant::now();
        let answer = support::lab::http_request(
            admin_port,
            "GET",
            path,
            &["Authorization: Bearer guess"],
            "",
        );
        let waited = asked.elapsed();
        check(
            answer.as_ref().map(|a| a.0) == Some(401) && waited >= Duration::from_secs(1),
            format!("a wrong token on {path}: {answer:?} after {waited:?}"),
        )?;
    }
    let (status, body) = get([127, 0, 0, 1], "/cluster")?;
    check(
        status == 401 && body.contains("is required"),
        format!("no token on /cluster: {status} {body}"),
    )?;

    // Idle connections are let go (each read bounded in time).
    for (what, stream) in [("kept-alive", &mut kept), ("silent", &mut silent)] {
        stream.set_read_timeout(Some(Duration::from_secs(20)))?;
        let mut byte = [0u8; 1];
        match std::io::Read::read(stream, &mut byte) {
            Ok(0) => {}
            other => return Err(format!("the {what} idle connection was kept: {other:?}").into()),
        }
    }
    Ok(())
}

fn admin_endpoint_serves_health_readiness_and_the_cluster(env: &Env) -> Result<(), Failed> {
    let (rolegate, rw, _ro) = env.rolegate("admin", "");
    check(
        rolegate.admin_get("/healthz").map(|r| r.0) == Some(200),
        "/healthz",
    )?;
    check(
        rolegate.admin_get("/readyz").map(|r| r.0) == Some(200),
        "/readyz",
    )?;
    check(
        rolegate.admin_get("/nope").map(|r| r.0) == Some(404),
        "unknown path",
    )?;
    runtime().block_on(async {
        let client = connect(&conninfo(rw, "app", "app")).await?;
        client.simple_query("select 1").await?;
        let (status, body) = rolegate.admin_get("/cluster").ok_or("GET /cluster")?;
        check(status == 200, format!("/cluster answered {status}"))?;
        let json: serde_json::Value = serde_json::from_str(&body)?;
        let cluster = &json["clusters"][0];
        check(
            cluster["cluster"] == "main",
            format!("cluster {}", cluster["cluster"]),
        )?;
        check(cluster["mode"] == "static", "static mode")?;
        check(
            cluster["leader"] == env.primary.address().as_str(),
            format!("leader {}", cluster["leader"]),
        )?;
        check(
            cluster["members"].as_array().map(Vec::len) == Some(3),
            "three members",
        )?;
        let sessions = &cluster["sessions"][0];
        check(
            sessions["member"] == env.primary.address().as_str()
                && sessions["role"] == "primary"
                && sessions["sessions"] == 1,
            format!("sessions {sessions}"),
        )
    })?;
    // A static cluster without a primary is not ready.
    let (rw, ro) = (free_port(), free_port());
    let config = format!(
        "[clusters.ro]\nreplicas = [\"{}\"]\n\n[[listeners]]\nlisten = \"127.0.0.1:{rw}\"\ncluster = \"ro\"\nrole = \"replica\"\n\n[[listeners]]\nlisten = \"127.0.0.1:{ro}\"\ncluster = \"ro\"\nrole = \"any\"\n",
        env.replicas[0].address()
    );
    let replicas_only = Rolegate::start(&env.root, "admin-ro", &config);
    let (status, body) = replicas_only.admin_get("/readyz").ok_or("GET /readyz")?;
    check(
        status == 503 && body.contains("no confirmed primary"),
        format!("/readyz answered {status}: {body}"),
    )
}

fn metrics_follow_sessions_cancels_and_refusals(env: &Env) -> Result<(), Failed> {
    let (rolegate, rw, ro) = env.rolegate("metrics", "[limits]\nmax_client_connections = 2\n");
    let listener = format!("listener=\"127.0.0.1:{rw}\"");
    let primary_sessions = format!(
        "cluster=\"main\",member=\"{}\",role=\"primary\"",
        env.primary.address()
    );
    let outcome = |o: &str| {
        rolegate.metric(
            "rolegate_client_connections_total",
            &format!("{listener},outcome=\"{o}\""),
        )
    };
    runtime().block_on(async {
        let client = connect(&conninfo(rw, "app", "app")).await?;
        client.simple_query("select repeat('x', 100000)").await?;
        let open = rolegate.metric("rolegate_sessions", &primary_sessions);
        check(open == 1.0, format!("sessions gauge {open}"))?;
        check(
            rolegate.metric(
                "rolegate_relayed_bytes_total",
                "direction=\"server_to_client\"",
            ) > 100_000.0,
            "server-to-client bytes counted",
        )?;
        // A cancel through the replica listener.
        let reader = connect(&conninfo(ro, "app", "app")).await?;
        scenarios::cancelled(&reader, "a read").await?;
        // Two sessions open: a third connection is refused.
        let refused = connect(&conninfo(rw, "app", "app"))
            .await
            .err()
            .ok_or("third connection")?;
        check(
            sqlstate(&refused).as_deref() == Some("53300"),
            format!("{refused}"),
        )?;
        drop(client);
        drop(reader);
        Ok::<(), Failed>(())
    })?;
    // A malformed opening, once the closed sessions' slots are free (the
    // limit is 2, and a connection over it is refused before it is read).
    wait_until(Duration::from_secs(10), "the slots to be released", || {
        (rolegate.metric("rolegate_client_connections", &listener) == 0.0).then_some(())
    });
    let _ = wire::send_and_read_error(rw, &7u32.to_be_bytes());
    let settled = || {
        [
            ("session", outcome("session") >= 1.0),
            ("refused_limit", outcome("refused_limit") >= 1.0),
            ("protocol_error", outcome("protocol_error") >= 1.0),
            (
                "cancel forwarded",
                rolegate.metric("rolegate_cancel_requests_total", "outcome=\"forwarded\"") >= 1.0,
            ),
            (
                "session ended by client",
                rolegate.metric(
                    "rolegate_sessions_ended_total",
                    "cluster=\"main\",role=\"primary\",reason=\"client\"",
                ) >= 1.0,
            ),
            (
                "no open session",
                rolegate.metric("rolegate_sessions", &primary_sessions) == 0.0,
            ),
        ]
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while settled().iter().any(|(_, ok)| !ok) {
        if Instant::now() > deadline {
            let (_, exposition) = rolegate.admin_get("/metrics").unwrap_or_default();
            return Err(format!(
                "counters did not settle: {:?}\n{}",
                settled(),
                exposition
                    .lines()
                    .filter(|l| l.starts_with("rolegate_client")
                        || l.starts_with("rolegate_sessions")
                        || l.starts_with("rolegate_cancel"))
                    .collect::<Vec<_>>()
                    .join("\n")
            )
            .into());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    check(
        rolegate.metric("rolegate_handshake_duration_seconds_count", &listener) >= 1.0,
        "handshake durations recorded",
    )?;
    check(
        rolegate.metric("rolegate_build_info", "") == 1.0,
        "build info",
    )?;
    // The exposition passes Prometheus' own checker.
    let (_, exposition) = rolegate.admin_get("/metrics").ok_or("GET /metrics")?;
    let mut promtool = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    promtool
        .stdin
        .take()
        .ok_or("promtool stdin")?
        .write_all(exposition.as_bytes())?;
    let checked = promtool.wait_with_output()?;
    check(
        checked.status.success(),
        format!(
            "promtool check metrics failed:\n{}{}",
            String::from_utf8_lossy(&checked.stdout),
            String::from_utf8_lossy(&checked.stderr)
        ),
    )
}

fn example_alert_rules_are_valid(_env: &Env) -> Result<(), Failed> {
    let out = std::process::Command::new("promtool")
        .args([
            "check",
            "rules",
            concat!(env!("CARGO_MANIFEST_DIR"), "/docs/alerts.yml"),
        ])
        .output()?;
    check(
        out.status.success(),
        format!(
            "promtool check rules failed:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

fn sighup_reloads_limits_and_refuses_bad_files(env: &Env) -> Result<(), Failed> {
    let (rolegate, rw, ro) = env.rolegate("reload", "[limits]\nmax_client_connections = 1\n");
    let admin = rolegate.admin_table()?;
    let reload = |extra: &str, expect: &str, count: usize| -> Result<(), Failed> {
        std::fs::write(
            &rolegate.config_path,
            format!("{admin}\n{}", env.config(rw, ro, extra)),
        )?;
        rolegate.signal(Signal::SIGHUP);
        wait_until(Duration::from_secs(10), expect, || {
            (rolegate.log().matches(expect).count() >= count).then_some(())
        });
        Ok(())
    };
    runtime().block_on(async {
        let first = connect(&conninfo(rw, "app", "app")).await?;
        let err = connect(&conninfo(rw, "app", "app"))
            .await
            .err()
            .ok_or("over the limit")?;
        check(
            sqlstate(&err).as_deref() == Some("53300"),
            format!("got {err}"),
        )?;

        // A higher limit applies to new connections; the open one stays.
        reload(
            "[limits]\nmax_client_connections = 3\n",
            "SIGHUP: reloaded the configuration",
            1,
        )?;
        let second = connect(&conninfo(rw, "app", "app"))
            .await
            .map_err(|e| format!("second connection after raising the limit: {e:?}"))?;
        second.simple_query("select 1").await?;
        first.simple_query("select 1").await?;

        // A broken file is refused, naming the file and the key.
        reload(
            "[limits]\nmax_client_connections = 1\nhold_timeout = \"soon\"\n",
            "keeping the configuration in use",
            1,
        )?;
        let log = rolegate.log();
        check(
            log.contains("limits.hold_timeout") && log.contains("reload.toml"),
            "the refusal names the key and the file",
        )?;
        // ... and the limit of 3 is still in force.
        let third = connect(&conninfo(rw, "app", "app"))
            .await
            .map_err(|e| format!("third connection after a refused reload: {e:?}"))?;
        third.simple_query("select 1").await?;

        // A change only a restart can apply (the number of event loops) is
        // refused whole: the lower limit in the same file is not applied.
        std::fs::write(
            &rolegate.config_path,
            format!(
                "{admin}\n{}",
                env.config(
                    rw,
                    ro,
                    "[limits]\nmax_client_connections = 1\n\n[runtime]\nworker_threads = 7\n"
                )
            ),
        )?;
        rolegate.signal(Signal::SIGHUP);
        wait_until(
            Duration::from_secs(10),
            "the refused restart-only reload",
            || rolegate.log().contains("needs a restart").then_some(()),
        );
        let fourth = connect(&conninfo(rw, "app", "app"))
            .await
            .err()
            .ok_or("limit of 3")?;
        check(
            sqlstate(&fourth).as_deref() == Some("53300"),
            format!("got {fourth}"),
        )?;
        Ok::<(), Failed>(())
    })?;
    check(
        rolegate.metric("rolegate_config_reloads_total", "outcome=\"ok\"") == 1.0
            && rolegate.metric("rolegate_config_reloads_total", "outcome=\"failed\"") == 2.0,
        "reload outcomes counted",
    )
}

/// The kernel timers on rolegate's two sockets of one idle session (the
/// accepted client connection and the backend connection).
fn idle_session_timers(rolegate: &Rolegate, rw: u16, backend: u16) -> Result<Vec<String>, Failed> {
    let usage = Usage::of(rolegate.pid()).ok_or("cannot read rolegate's /proc entry")?;
    let timers: Vec<String> = usage
        .sockets
        .iter()
        .filter(|s| s.state == "01" && (s.local_port == rw || s.remote_port == backend))
        .map(|s| s.timer.clone())
        .collect();
    check(
        timers.len() == 2,
        format!("expected 2 session sockets: {:?}", usage.sockets),
    )?;
    Ok(timers)
}

fn tcp_keepalive_guards_both_connections(env: &Env) -> Result<(), Failed> {
    let backend = env.primary.port;
    let (on, on_rw, _) = env.rolegate("keepalive-on", "[limits]\ntcp_keepalive = \"7s\"\n");
    let (off, off_rw, _) = env.rolegate("keepalive-off", "[limits]\ntcp_keepalive = \"0s\"\n");
    runtime().block_on(async {
        let with = connect(&conninfo(on_rw, "app", "app")).await?;
        let without = connect(&conninfo(off_rw, "app", "app")).await?;
        with.simple_query("select 1").await?;
        without.simple_query("select 1").await?;
        // Idle now: a pending keepalive timer (02) on both of rolegate's
        // sockets when keepalive is on, no timer at all (00) when off.
        settled_timers(&[(&on, on_rw, "02"), (&off, off_rw, "00")], backend).await?;
        // Client connections take their options from the listening socket,
        // which a reload sets anew: the next session has keepalive.
        drop(without);
        let config = std::fs::read_to_string(&off.config_path)?;
        std::fs::write(
            &off.config_path,
            config.replace("tcp_keepalive = \"0s\"", "tcp_keepalive = \"7s\""),
        )?;
        off.signal(Signal::SIGHUP);
        wait_until(Duration::from_secs(10), "the keepalive reload", || {
            (off.metric("rolegate_config_reloads_total", "outcome=\"ok\"") == 1.0).then_some(())
        });
        let after = connect(&conninfo(off_rw, "app", "app")).await?;
        after.simple_query("select 1").await?;
        settled_timers(&[(&off, off_rw, "02")], backend).await?;
        drop(with);
        Ok(())
    })
}

/// Waits (bounded) until each listed rolegate's one idle session has the
/// given timer on both its sockets. A retransmit timer may linger for a
/// moment after the last write.
async fn settled_timers(expected: &[(&Rolegate, u16, &str)], backend: u16) -> Result<(), Failed> {
    let mut seen = Vec::new();
    for _ in 0..20 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        seen = expected
            .iter()
            .map(|(rolegate, rw, _)| idle_session_timers(rolegate, *rw, backend))
            .collect::<Result<Vec<_>, _>>()?;
        if seen
            .iter()
            .zip(expected)
            .all(|(timers, (_, _, want))| timers.iter().all(|t| t == want))
        {
            return Ok(());
        }
    }
    let wanted: Vec<&str> = expected.iter().map(|e| e.2).collect();
    Err(format!("socket timers {seen:?}, expected {wanted:?}").into())
}
