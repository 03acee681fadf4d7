//! Hostile clients and dying backends: malformed openings, slowloris,
//! connection floods, a backend killed mid-query, a second SIGTERM. Each
//! case gets a protocol error or a close within `handshake_timeout`, and a
//! healthy session beside it keeps working. And other programs on
//! rolegate's ports: refused at start and at reload, not shared.

mod support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::process::CommandExt;
use std::time::{Duration, Instant};

use libtest_mimic::Failed;
use nix::sys::signal::Signal;

use support::harness::{by_name, check, run_suite, TestFn};
use support::pg::PgServer;
use support::rolegate::Rolegate;
use support::static_cluster::StaticCluster;
use support::wire::{self, startup_packet};
use support::{connect, conninfo, free_port, runtime, sqlstate, wait_until};

type Env = StaticCluster;

/// A short handshake timeout, so the cases that end in a close end fast.
const LIMITS: &str = "[limits]\nhandshake_timeout = \"2s\"\n";

fn main() {
    let tests: &[(&str, TestFn<Env>)] = by_name![
        malformed_openings_get_an_error_or_a_close,
        malformed_authentication_messages,
        slowloris_connections_are_cut_at_handshake_timeout,
        a_flood_gets_53300_and_service_recovers,
        a_backend_killed_mid_query_gives_08006,
        a_second_sigterm_ends_at_once,
        a_port_another_program_listens_on_is_refused,
        a_reload_onto_a_taken_port_is_refused_and_serving_goes_on,
        a_handover_name_held_by_another_user_is_named,
        a_third_process_in_a_fleet_starts_while_the_first_drains
    ];
    run_suite(tests, || StaticCluster::start("hostile"), false);
}

/// What a hostile opening must get.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Expect {
    /// An ErrorResponse with this SQLSTATE, then a close.
    Error(&'static str),
    /// Any ErrorResponse (the server's own), then a close.
    AnyError,
    /// A close without an ErrorResponse (nothing sensible to say).
    Close,
}

fn packet(code: u32, body: &[u8], declared: Option<u32>) -> Vec<u8> {
    let len = declared.unwrap_or((8 + body.len()) as u32);
    let mut out = len.to_be_bytes().to_vec();
    out.extend_from_slice(&code.to_be_bytes());
    out.extend_from_slice(body);
    out
}

const SSL: u32 = (1234 << 16) | 5679;
const GSS: u32 = (1234 << 16) | 5680;
const CANCEL: u32 = (1234 << 16) | 5678;
const V3: u32 = 3 << 16;

fn cases() -> Vec<(&'static str, Vec<u8>, Expect)> {
    let user = b"user\0app\0\0".to_vec();
    let with = |first: &[u8], then: &[u8]| [first, then].concat();
    vec![
        (
            "length 0",
            0u32.to_be_bytes().to_vec(),
            Expect::Error("08P01"),
        ),
        (
            "length 3",
            3u32.to_be_bytes().to_vec(),
            Expect::Error("08P01"),
        ),
        ("length 7", packet(V3, b"", Some(7)), Expect::Error("08P01")),
        (
            "negative length",
            (-16i32).to_be_bytes().to_vec(),
            Expect::Error("08P01"),
        ),
        (
            "length 2^31",
            0x8000_0000u32.to_be_bytes().to_vec(),
            Expect::Error("08P01"),
        ),
        (
            "length 10,001",
            packet(V3, &vec![b'a'; 9_993], None),
            Expect::Error("08P01"),
        ),
        (
            "length 1 MB declared",
            packet(V3, &user, Some(1 << 20)),
            Expect::Error("08P01"),
        ),
        (
            "length larger than the data",
            packet(V3, &user, Some(200)),
            Expect::Error("08006"),
        ),
        (
            "protocol 2.0",
            packet(2 << 16, &user, None),
            Expect::Error("0A000"),
        ),
        (
            "protocol 4.0",
            packet(4 << 16, &user, None),
            Expect::Error("0A000"),
        ),
        (
            "protocol 0.0",
            packet(0, &user, None),
            Expect::Error("0A000"),
        ),
        (
            "missing final terminator",
            packet(V3, b"user\0app\0", None),
            Expect::Error("08P01"),
        ),
        (
            "unterminated value",
            packet(V3, b"user\0app", None),
            Expect::Error("08P01"),
        ),
        (
            "parameter without value",
            packet(V3, b"user\0app\0database\0\0", None),
            Expect::Error("08P01"),
        ),
        (
            "bytes after the terminator",
            packet(V3, b"user\0app\0\0junk\0", None),
            Expect::Error("08P01"),
        ),
        (
            "no parameters at all",
            packet(V3, b"", None),
            Expect::Error("08P01"),
        ),
        (
            "only the terminator",
            packet(V3, b"\0", None),
            Expect::Error("28000"),
        ),
        (
            "no user",
            packet(V3, b"database\0app\0\0", None),
            Expect::Error("28000"),
        ),
        (
            "non-UTF-8 user name",
            packet(V3, b"user\0\xff\xfe\0\0", None),
            Expect::AnyError,
        ),
        (
            "non-UTF-8 parameter name",
            packet(V3, b"user\0app\0\xff\0x\0\0", None),
            Expect::AnyError,
        ),
        (
            "cancel request too short",
            packet(CANCEL, b"\0\0\0\x01ab", None),
            Expect::Error("08P01"),
        ),
        (
            "cancel request too long",
            packet(CANCEL, &[7u8; 300], None),
            Expect::Error("08P01"),
        ),
        (
            "cancel for an unknown key",
            packet(CANCEL, b"\0\0\0\x01abcd", None),
            Expect::Close,
        ),
        (
            "SSLRequest with a body",
            packet(SSL, b"\0\0\0\0", None),
            Expect::Error("08P01"),
        ),
        (
            "two SSLRequests",
            with(&packet(SSL, b"", None), &packet(SSL, b"", None)),
            Expect::Error("08P01"),
        ),
        (
            "two GSSENCRequests",
            with(&packet(GSS, b"", None), &packet(GSS, b"", None)),
            Expect::Error("08P01"),
        ),
        (
            "SSLRequest then GSSENCRequest",
            with(&packet(SSL, b"", None), &packet(GSS, b"", None)),
            Expect::Error("08P01"),
        ),
        (
            "GSSENCRequest then SSLRequest then garbage",
            [
                packet(GSS, b"", None),
                packet(SSL, b"", None),
                vec![0xff; 16],
            ]
            .concat(),
            Expect::Error("08P01"),
        ),
        (
            "direct TLS on a plaintext listener",
            vec![0x16, 3, 1, 0, 200, 1, 0, 0],
            Expect::Close,
        ),
        (
            "an HTTP request",
            b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
            Expect::Error("08P01"),
        ),
        ("1 KB of garbage", vec![0x5a; 1024], Expect::Error("08P01")),
        ("nothing, then silence", Vec::new(), Expect::Error("08006")),
        (
            "half a length, then silence",
            vec![0, 0],
            Expect::Error("08006"),
        ),
    ]
}

/// Sends `bytes`, then reads whatever comes until the close; returns the
/// SQLSTATEs of the ErrorResponses seen and whether anything else came.
fn answer(port: u16, bytes: &[u8]) -> (Vec<String>, Vec<u8>, Duration) {
    let started = Instant::now();
    let mut stream = wire::connect(port);
    let _ = stream.write_all(bytes);
    let mut received = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        match stream.read(&mut chunk) {
            Ok(0) | Err(_) => break,
            Ok(n) => received.extend_from_slice(&chunk[..n]),
        }
    }
    let elapsed = started.elapsed();
    // Single-byte answers to SSLRequest/GSSENCRequest come first.
    let mut rest = &received[..];
    while let Some((&b, tail)) = rest.split_first() {
        if b == b'N' || b == b'S' {
            rest = tail;
        } else {
            break;
        }
    }
    let mut states = Vec::new();
    while rest.len() >= 5 {
        let len = u32::from_be_bytes([rest[1], rest[2], rest[3], rest[4]]) as usize;
        let Some(message) = rest.get(..len + 1) else {
            break;
        };
        if rest[0] == b'E' {
            let msg = wire::Msg {
                tag: b'E',
                body: message[5..].to_vec(),
            };
            states.extend(msg.field(b'C'));
        }
        rest = &rest[len + 1..];
    }
    (states, received, elapsed)
}

fn malformed_openings_get_an_error_or_a_close(env: &Env) -> Result<(), Failed> {
    let (rolegate, rw, _ro) = env.rolegate("openings", LIMITS);
    let rt = runtime();
    let healthy = rt.block_on(connect(&conninfo(rw, "app", "app")))?;
    let cases = cases();
    check(cases.len() >= 30, format!("only {} cases", cases.len()))?;
    // All at once, as a hostile crowd would arrive.
    let workers: Vec<_> = cases
        .into_iter()
        .map(|(name, bytes, expect)| std::thread::spawn(move || (name, expect, answer(rw, &bytes))))
        .collect();
    let mut failures = Vec::new();
    for worker in workers {
        let (name, expect, (states, received, elapsed)) =
            worker.join().map_err(|_| "case panicked")?;
        let ok = match expect {
            Expect::Error(code) => states.first().map(String::as_str) == Some(code),
            Expect::AnyError => !states.is_empty(),
            Expect::Close => states.is_empty() && received.iter().all(|b| *b == b'N'),
        };
        if !ok || elapsed > Duration::from_secs(10) {
            failures.push(format!(
                "{name}: expected {expect:?}, got {states:?} after {elapsed:?} ({} bytes)",
                received.len()
            ));
        }
    }
    check(failures.is_empty(), failures.join("\n"))?;
    let row = rt.block_on(healthy.query_one("select 2 + 2", &[]))?;
    check(row.get::<_, i32>(0) == 4, "the healthy session still works")?;
    check(
        rolegate.admin_get("/healthz").map(|r| r.0) == Some(200),
        "rolegate is alive",
    )
}

fn message(tag: u8, body: &[u8], declared: Option<u32>) -> Vec<u8> {
    let mut out = vec![tag];
    out.extend_from_slice(&declared.unwrap_or((body.len() + 4) as u32).to_be_bytes());
    out.extend_from_slice(body);
    out
}

fn malformed_authentication_messages(env: &Env) -> Result<(), Failed> {
    let (_rolegate, rw, _ro) = env.rolegate("auth", LIMITS);
    let login = startup_packet(3, 0, &[("user", "app"), ("database", "app")]);
    let cases: Vec<(&str, Vec<u8>, Expect)> = vec![
        (
            "a query before authentication",
            message(b'Q', b"select 1\0", None),
            Expect::Error("08P01"),
        ),
        (
            "a password message of length 2^31-1",
            message(b'p', b"", Some(0x7fff_ffff)),
            Expect::Error("08P01"),
        ),
        (
            "a password message of length 3",
            message(b'p', b"", Some(3)),
            Expect::Error("08P01"),
        ),
        (
            "a Terminate during authentication",
            message(b'X', b"", None),
            Expect::Close,
        ),
        (
            "a SASL response the server cannot parse",
            message(b'p', b"garbage\0", None),
            Expect::AnyError,
        ),
    ];
    let mut failures = Vec::new();
    for (name, bytes, expect) in cases {
        let (states, _, elapsed) = answer(rw, &[login.clone(), bytes].concat());
        let ok = match expect {
            Expect::Error(code) => states.first().map(String::as_str) == Some(code),
            Expect::AnyError => !states.is_empty(),
            Expect::Close => states.is_empty(),
        };
        if !ok || elapsed > Duration::from_secs(10) {
            failures.push(format!(
                "{name}: expected {expect:?}, got {states:?} after {elapsed:?}"
            ));
        }
    }
    check(failures.is_empty(), failures.join("\n"))
}

fn rss_kib(pid: i32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        })
        .unwrap_or(0)
}

fn slowloris_connections_are_cut_at_handshake_timeout(env: &Env) -> Result<(), Failed> {
    let (rolegate, rw, _ro) = env.rolegate("slowloris", LIMITS);
    let before = rss_kib(rolegate.pid());
    let login = startup_packet(3, 0, &[("user", "app"), ("database", "app")]);
    let started = Instant::now();
    // 300 clients dribbling their startup packet one byte every 500 ms.
    let dribblers: Vec<_> = (0..300)
        .map(|_| {
            let login = login.clone();
            std::thread::spawn(move || -> Option<Duration> {
                let mut stream = TcpStream::connect(("127.0.0.1", rw)).ok()?;
                let started = Instant::now();
                for byte in login.iter().take(40) {
                    if stream.write_all(std::slice::from_ref(byte)).is_err() {
                        return Some(started.elapsed());
                    }
                    std::thread::sleep(Duration::from_millis(500));
                    let mut probe = [0u8; 256];
                    stream.set_nonblocking(true).ok()?;
                    // Data (rolegate's 08006) or EOF or a reset: cut.
                    let closed = match stream.read(&mut probe) {
                        Err(e) => e.kind() != std::io::ErrorKind::WouldBlock,
                        Ok(_) => true,
                    };
                    stream.set_nonblocking(false).ok()?;
                    if closed {
                        return Some(started.elapsed());
                    }
                }
                None
            })
        })
        .collect();
    // Meanwhile a normal client gets through.
    std::thread::sleep(Duration::from_millis(500));
    let rt = runtime();
    let client = rt.block_on(connect(&conninfo(rw, "app", "app")))?;
    rt.block_on(client.simple_query("select 1"))?;
    let during = rss_kib(rolegate.pid());
    let mut cut = 0;
    for dribbler in dribblers {
        match dribbler.join().map_err(|_| "dribbler panicked")? {
            Some(after) if after < Duration::from_secs(6) => cut += 1,
            _ => {}
        }
    }
    check(
        cut == 300,
        format!("only {cut} of 300 slow clients were cut within 6 s"),
    )?;
    check(
        started.elapsed() < Duration::from_secs(30),
        "the slow clients took too long",
    )?;
    check(
        during.saturating_sub(before) < 64 * 1024,
        format!("memory grew from {before} KiB to {during} KiB with 300 slow clients"),
    )?;
    rt.block_on(client.simple_query("select 1"))?;
    Ok(())
}

fn a_flood_gets_53300_and_service_recovers(env: &Env) -> Result<(), Failed> {
    let limit = 50;
    let (rolegate, rw, _ro) = env.rolegate(
        "flood",
        &format!("[limits]\nmax_client_connections = {limit}\n"),
    );
    let login = startup_packet(3, 0, &[("user", "trustuser"), ("database", "app")]);
    // Twice the limit, all at once; the first `limit` log in and stay.
    let mut held = Vec::new();
    let mut refused = 0;
    let streams: Vec<_> = (0..2 * limit)
        .map(|_| {
            let mut stream = wire::connect(rw);
            let _ = stream.write_all(&login);
            stream
        })
        .collect();
    for mut stream in streams {
        match wire::read_msg(&mut stream) {
            Some(msg) if msg.tag == b'E' => {
                check(
                    msg.field(b'C').as_deref() == Some("53300"),
                    format!("got {:?}", msg.field(b'C')),
                )?;
                refused += 1;
            }
            Some(_) => held.push(stream),
            None => return Err("a flooding connection got nothing".into()),
        }
    }
    check(
        refused == limit,
        format!("{refused} refused, expected {limit}"),
    )?;
    check(held.len() == limit, format!("{} served", held.len()))?;
    drop(held);
    // Full service again once the flood is gone.
    let rt = runtime();
    wait_until(Duration::from_secs(10), "the slots to be released", || {
        (rolegate.metric(
            "rolegate_client_connections",
            &format!("listener=\"127.0.0.1:{rw}\""),
        ) == 0.0)
            .then_some(())
    });
    let clients: Vec<_> = (0..limit)
        .map(|_| rt.block_on(connect(&conninfo(rw, "app", "app"))))
        .collect::<Result<_, _>>()?;
    for client in &clients {
        rt.block_on(client.simple_query("select 1"))?;
    }
    Ok(())
}

fn a_backend_killed_mid_query_gives_08006(env: &Env) -> Result<(), Failed> {
    // A server of its own: killing a backend makes PostgreSQL restart.
    let victim = PgServer::start(&env.root, "victim");
    let port = free_port();
    let config = format!(
        "[clusters.victim]\nprimary = \"{}\"\n\n[[listeners]]\nlisten = \"127.0.0.1:{port}\"\ncluster = \"victim\"\nrole = \"primary\"\n",
        victim.address()
    );
    let _rolegate = Rolegate::start(&env.root, "victim", &config);
    runtime().block_on(async {
        let client = connect(&conninfo(port, "app", "app")).await?;
        let row = client.query_one("select pg_backend_pid()", &[]).await?;
        let backend: i32 = row.get(0);
        let killer = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(300)).await;
            support::process::signal(backend, Signal::SIGKILL);
        });
        let err = client
            .simple_query("select pg_sleep(20)")
            .await
            .err()
            .ok_or("the query survived")?;
        killer.await?;
        check(
            sqlstate(&err).as_deref() == Some("08006"),
            format!("got {err:?}"),
        )?;
        let message = err
            .as_db_error()
            .map(|d| d.message().to_owned())
            .unwrap_or_default();
        check(
            message.contains(&victim.address()),
            format!("message: {message}"),
        )
    })
}

fn a_second_sigterm_ends_at_once(env: &Env) -> Result<(), Failed> {
    let (mut rolegate, rw, _ro) =
        env.rolegate("second-sigterm", "[limits]\nshutdown_timeout = \"60s\"\n");
    runtime().block_on(async {
        let (client, connection) = support::connect_watched(&conninfo(rw, "app", "app")).await?;
        client.simple_query("select 1").await?;
        rolegate.signal(Signal::SIGTERM);
        tokio::time::sleep(Duration::from_millis(500)).await;
        client.simple_query("select 1").await?;
        let started = Instant::now();
        rolegate.signal(Signal::SIGTERM);
        let ended = tokio::time::timeout(Duration::from_secs(10), connection).await;
        let err = match ended {
            Ok(Ok(Err(e))) => e,
            other => {
                return Err(format!("the session was not ended with an error: {other:?}").into())
            }
        };
        check(
            sqlstate(&err).as_deref() == Some("57P01"),
            format!("got {err:?}"),
        )?;
        check(
            started.elapsed() < Duration::from_secs(5),
            "ended at once, not after shutdown_timeout",
        )
    })?;
    let status = rolegate
        .wait_exit(Duration::from_secs(10))
        .ok_or("rolegate did not exit")?;
    check(status.success(), format!("exit status {status}"))
}

/// Another program listening on `port` the way HAProxy does by default
/// (and PgBouncer with `so_reuseport`): with `SO_REUSEPORT`, which a
/// socket of the same user that sets it too may join.
fn reuseport_listener(port: u16) -> Result<std::net::TcpListener, Failed> {
    use socket2::{Domain, Socket, Type};
    let socket = Socket::new(Domain::IPV4, Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.bind(&std::net::SocketAddr::from(([127, 0, 0, 1], port)).into())?;
    socket.listen(16)?;
    Ok(socket.into())
}

/// Spawns rolegate on `config` and expects it to refuse to start, with
/// `expect` in its log.
fn refuses_to_start(env: &Env, name: &str, config: &str, expect: &str) -> Result<(), Failed> {
    let path = env.root.join(format!("{name}.toml"));
    std::fs::write(&path, config)?;
    let mut rolegate = Rolegate::spawn(&path, &env.root.join(format!("{name}.log")));
    let status = rolegate.wait_exit(Duration::from_secs(20));
    check(
        status.is_some_and(|s| !s.success()),
        format!(
            "{name}: rolegate started beside another program ({status:?}):\n{}",
            rolegate.log()
        ),
    )?;
    check(
        rolegate.log().contains(expect),
        format!("{name}: the refusal says {expect:?}:\n{}", rolegate.log()),
    )
}

/// A listener, the admin endpoint and the fleet's peer port, each on a
/// port another program listens on with `SO_REUSEPORT`, and a listener
/// on a port another rolegate (of another configuration) serves: each
/// time rolegate refuses to start, naming the key, the address and the
/// other program, instead of sharing the port with it.
fn a_port_another_program_listens_on_is_refused(env: &Env) -> Result<(), Failed> {
    let own = std::process::id();
    let admin = |port: u16| format!("[admin]\nlisten = \"127.0.0.1:{port}\"\n\n");
    let taken = free_port();
    let _stranger = reuseport_listener(taken)?;
    let in_use = |key: &str, port: u16, pid: u32| {
        format!("{key}: cannot listen on 127.0.0.1:{port}: address already in use by pid {pid} (")
    };
    refuses_to_start(
        env,
        "taken-listener",
        &format!(
            "{}{}",
            admin(free_port()),
            env.config(taken, free_port(), "")
        ),
        &in_use("listeners[0].listen", taken, own),
    )?;
    refuses_to_start(
        env,
        "taken-admin",
        &format!(
            "{}{}",
            admin(taken),
            env.config(free_port(), free_port(), "")
        ),
        &in_use("admin.listen", taken, own),
    )?;
    refuses_to_start(
        env,
        "taken-peer-port",
        &format!(
            "{}{}",
            admin(free_port()),
            env.config(
                free_port(),
                free_port(),
                &format!("\n[fleet]\nlisten = \"127.0.0.1:{taken}\"\nid = 1\n")
            )
        ),
        &in_use("fleet.listen", taken, own),
    )?;

    let (first, rw, _ro) = env.rolegate("first-of-two", "");
    let other = u32::try_from(first.pid())?;
    refuses_to_start(
        env,
        "second-of-two",
        &format!("{}{}", admin(free_port()), env.config(rw, free_port(), "")),
        &in_use("listeners[0].listen", rw, other),
    )?;
    check(
        first
            .log()
            .lines()
            .all(|line| !line.contains("handed the listening sockets")),
        "the first rolegate handed nothing to the second",
    )
}

/// A reload that adds a listener on a port another program listens on
/// (with `SO_REUSEPORT`) is refused whole, naming the key, the address
/// and the program; the running listeners go on serving.
fn a_reload_onto_a_taken_port_is_refused_and_serving_goes_on(env: &Env) -> Result<(), Failed> {
    const APPLIED: &str = "SIGHUP: reloaded the configuration";
    const REFUSED: &str = "keeping the configuration in use";
    let (rolegate, rw, ro) = env.rolegate("reload-taken", "");
    let admin = rolegate.admin_table()?;
    let taken = free_port();
    let stranger = reuseport_listener(taken)?;
    let added = format!(
        "\n[[listeners]]\nlisten = \"127.0.0.1:{taken}\"\ncluster = \"main\"\nrole = \"primary\"\n"
    );
    std::fs::write(
        &rolegate.config_path,
        format!("{admin}\n{}", env.config(rw, ro, &added)),
    )?;
    rolegate.signal(Signal::SIGHUP);
    wait_until(Duration::from_secs(15), "the reload's outcome", || {
        let log = rolegate.log();
        (log.contains(APPLIED) || log.contains(REFUSED)).then_some(())
    });
    let log = rolegate.log();
    check(
        log.contains(REFUSED) && !log.contains(APPLIED),
        format!("the reload was applied beside another program:\n{log}"),
    )?;
    let expect = format!(
        "listeners[2].listen: cannot listen on 127.0.0.1:{taken}: address already in use by pid {} (",
        std::process::id()
    );
    check(
        log.contains(&expect),
        format!("the refusal says {expect:?}:\n{log}"),
    )?;
    runtime().block_on(async {
        for port in [rw, ro] {
            let client = connect(&conninfo(port, "app", "app")).await?;
            client.simple_query("select 1").await?;
        }
        Ok::<_, Failed>(())
    })?;
    drop(stranger);
    Ok(())
}

/// The handover name follows the configuration's path, and anyone may bind
/// an abstract name: here a rolegate run as `nobody` on the same path (its
/// own ports) holds it first. The rolegate started after it (as root, its
/// own ports) starts, and says loudly, both when it asks and while it
/// waits to take the name over, which process of which uid holds it.
fn a_handover_name_held_by_another_user_is_named(env: &Env) -> Result<(), Failed> {
    const NOBODY: u32 = 65534;
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: running a process as another user needs root");
        return Ok(());
    }
    let path = env.root.join("squatted.toml");
    // Fresh ports each time: the config path, not the ports, is shared.
    let write_config = || {
        let admin = format!("[admin]\nlisten = \"127.0.0.1:{}\"\n\n", free_port());
        std::fs::write(
            &path,
            format!("{admin}{}", env.config(free_port(), free_port(), "")),
        )
    };
    write_config()?;
    let squatter_log = env.root.join("squatter.log");
    let mut squatter = std::process::Command::new(env!("CARGO_BIN_EXE_rolegate"))
        .arg("--config")
        .arg(&path)
        .env("RUST_LOG", "rolegate=debug")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&squatter_log)?)
        .uid(NOBODY)
        .gid(NOBODY)
        .spawn()?;
    let squatter_pid = squatter.id();
    let outcome = (|| {
        wait_until(Duration::from_secs(20), "the squatter to be ready", || {
            let log = std::fs::read_to_string(&squatter_log).unwrap_or_default();
            if let Ok(Some(status)) = squatter.try_wait() {
                panic!("the squatter exited ({status}):\n{log}");
            }
            log.contains("rolegate is ready").then_some(())
        });
        write_config()?;
        let mut rolegate = Rolegate::spawn(&path, &env.root.join("squatted.log"));
        rolegate.wait_ready();
        let named = format!("is held by pid {squatter_pid} of uid {NOBODY}, another user");
        let told = support::holds_within(Duration::from_secs(10), || {
            rolegate.log().matches(&named).count() >= 2
        });
        check(
            told,
            format!(
                "the log names the holder when asking and when waiting ({named:?}):\n{}",
                rolegate.log()
            ),
        )?;
        check(
            rolegate.log().contains("@rolegate:"),
            format!("the warning names the socket:\n{}", rolegate.log()),
        )
    })();
    support::process::stop_pid(
        i32::try_from(squatter_pid)?,
        Signal::SIGKILL,
        Duration::from_secs(5),
    );
    let _ = squatter.wait();
    outcome
}

/// Two restarts in quick succession in a fleet: the first process still
/// drains a session (and so still serves the peer port) when the third
/// starts. The third may share every address with the process it took
/// over from, and the peer port is one socket handed from each to the
/// next, so it starts; were the second's peer socket its own, the first's
/// would be a stranger to the third.
fn a_third_process_in_a_fleet_starts_while_the_first_drains(env: &Env) -> Result<(), Failed> {
    let peer = free_port();
    let (first, rw, _ro) = env.rolegate(
        "generations",
        &format!(
            "[limits]\nshutdown_timeout = \"30s\"\n\n[fleet]\nlisten = \"127.0.0.1:{peer}\"\nid = 1\n"
        ),
    );
    let log = |n: usize| env.root.join(format!("generations-{n}.log"));
    runtime().block_on(async {
        let draining = connect(&conninfo(rw, "app", "app")).await?;
        let mut second = Rolegate::spawn(&first.config_path, &log(2));
        second.wait_ready();
        first.signal(Signal::SIGTERM);
        wait_until(
            Duration::from_secs(15),
            "the second process to take the handover name over",
            || {
                second
                    .log()
                    .contains("offering the listening sockets to a successor")
                    .then_some(())
            },
        );
        let mut third = Rolegate::spawn(&first.config_path, &log(3));
        let started = support::holds_within(Duration::from_secs(20), || {
            third.log().contains("rolegate is ready") || third.wait_exit(Duration::ZERO).is_some()
        });
        check(
            started && third.log().contains("rolegate is ready"),
            format!("the third process did not start:\n{}", third.log()),
        )?;
        draining.simple_query("select 1").await?;
        let fresh = connect(&conninfo(rw, "app", "app")).await?;
        fresh.simple_query("select 1").await?;
        Ok::<_, Failed>(())
    })
}
