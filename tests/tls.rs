//! TLS on both sides, with throwaway certificates: psql through a TLS
//! listener (SCRAM with channel binding removed), verify-full, require
//! mode, direct TLS with ALPN, bytes smuggled after an SSLRequest,
//! certificate reload on SIGHUP, and TLS from rolegate to a PostgreSQL
//! server with `ssl = on`.

mod support;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use libtest_mimic::Failed;
use nix::sys::signal::Signal;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

use support::certs::{Ca, Pair};
use support::harness::{by_name, check, run_suite, TestEnv, TestFn};
use support::pg::PgServer;
use support::rolegate::Rolegate;
use support::{connect, conninfo, free_port, runtime, scenarios, sqlstate, wait_until, wire};

struct Env {
    root: PathBuf,
    ca: PathBuf,
    wrong_ca: PathBuf,
    proxy_cert: Pair,
    server: PgServer,
}

impl TestEnv for Env {
    fn scratch_dir(&self) -> Option<PathBuf> {
        Some(self.root.clone())
    }
}

impl Env {
    fn start() -> Self {
        let root = std::env::temp_dir().join(format!("rolegate-tls-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(&root).expect("test root");
        let ca = Ca::new("rolegate test CA");
        let wrong = Ca::new("some other CA");
        let proxy_cert = ca.issue(&root, "proxy", "first", &["localhost", "127.0.0.1"]);
        let pg_cert = ca.issue(&root, "postgres", "postgres", &["127.0.0.1", "localhost"]);
        let server = PgServer::start_with_tls(&root, "tlspg", &pg_cert.cert, &pg_cert.key);
        Self {
            ca: ca.write(&root, "ca.crt"),
            wrong_ca: wrong.write(&root, "wrong-ca.crt"),
            root,
            proxy_cert,
            server,
        }
    }

    /// rolegate with TLS for clients (`mode`), a static cluster of the TLS
    /// server, and `cluster_extra` lines (backend TLS settings).
    fn rolegate(&self, name: &str, mode: &str, cluster_extra: &str) -> (Rolegate, u16) {
        let port = free_port();
        let config = format!(
            r#"
[tls]
cert = "{}"
key = "{}"
mode = "{mode}"

[clusters.secure]
primary = "{}"
{cluster_extra}

[[listeners]]
listen = "127.0.0.1:{port}"
cluster = "secure"
role = "primary"
"#,
            self.proxy_cert.cert.display(),
            self.proxy_cert.key.display(),
            self.server.address()
        );
        (Rolegate::start(&self.root, name, &config), port)
    }

    fn verify_full(&self, ca: &Path) -> String {
        format!(
            "backend_tls = \"verify-full\"\nbackend_ca = \"{}\"",
            ca.display()
        )
    }
}

fn main() {
    let tests: &[(&str, TestFn<Env>)] = by_name![
        psql_sslmode_require_authenticates_with_scram,
        psql_sslmode_verify_full_checks_the_certificate,
        channel_binding_require_fails_with_a_clear_message,
        require_mode_refuses_plaintext_with_28000,
        direct_tls_with_alpn_gets_a_session,
        bytes_smuggled_after_ssl_request_close_the_connection,
        sighup_serves_a_new_certificate_and_keeps_old_sessions,
        backend_verify_full_and_a_wrong_ca,
        client_ca_requires_a_client_certificate,
        a_slow_tls_reader_gets_every_byte_and_a_clean_close,
        clients_that_leave_while_held_are_let_go,
        a_pooled_listener_logs_tls_clients_in_with_scram
    ];
    run_suite(tests, Env::start, false);
}

fn psql(conninfo: &str, sql: &str) -> std::process::Output {
    std::process::Command::new("psql")
        .arg(conninfo)
        .args(["-AtX", "-v", "ON_ERROR_STOP=1", "-c", sql])
        .output()
        .expect("run psql")
}

fn stdout(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).trim().to_owned()
}

fn psql_sslmode_require_authenticates_with_scram(env: &Env) -> Result<(), Failed> {
    let backend_ssl = "select ssl from pg_stat_ssl where pid = pg_backend_pid()";
    // TLS to rolegate, plaintext to PostgreSQL: libpq's defaults work.
    let (_plain, port) = env.rolegate("require-plain-backend", "allow", "");
    let out = psql(
        &format!("{} sslmode=require", conninfo(port, "app", "app")),
        backend_ssl,
    );
    check(out.status.success(), stderr(&out))?;
    check(stdout(&out) == "f", format!("backend ssl {}", stdout(&out)))?;

    // TLS on both hops: PostgreSQL offers SCRAM-SHA-256-PLUS, rolegate
    // removes it, and a client that does not insist on channel binding
    // authenticates with SCRAM-SHA-256.
    let (_tls, port) = env.rolegate("require-tls-backend", "allow", &env.verify_full(&env.ca));
    let out = psql(
        &format!(
            "{} sslmode=require channel_binding=disable",
            conninfo(port, "app", "app")
        ),
        backend_ssl,
    );
    check(out.status.success(), stderr(&out))?;
    check(
        stdout(&out) == "t",
        format!("backend connection not TLS: {}", stdout(&out)),
    )?;

    // libpq's default channel_binding=prefer announces channel binding over
    // TLS, which PostgreSQL refuses on a TLS connection: rolegate says so.
    let out = psql(
        &format!("{} sslmode=require", conninfo(port, "app", "app")),
        "select 1",
    );
    check(
        !out.status.success(),
        "channel_binding=prefer over two TLS hops cannot authenticate",
    )?;
    check(
        stderr(&out).contains("channel_binding=disable")
            && stderr(&out).contains("cannot work through rolegate"),
        stderr(&out),
    )
}

fn psql_sslmode_verify_full_checks_the_certificate(env: &Env) -> Result<(), Failed> {
    let (_rolegate, port) = env.rolegate("verify-full", "allow", "");
    let base =
        format!("host=localhost hostaddr=127.0.0.1 port={port} user=app password=app dbname=app");
    let out = psql(
        &format!(
            "{base} sslmode=verify-full sslrootcert={}",
            env.ca.display()
        ),
        "select 1",
    );
    check(out.status.success() && stdout(&out) == "1", stderr(&out))?;
    let out = psql(
        &format!(
            "{base} sslmode=verify-full sslrootcert={}",
            env.wrong_ca.display()
        ),
        "select 1",
    );
    check(
        !out.status.success(),
        "a certificate from another CA must be refused",
    )?;
    check(
        stderr(&out).contains("certificate verify failed"),
        stderr(&out),
    )
}

fn channel_binding_require_fails_with_a_clear_message(env: &Env) -> Result<(), Failed> {
    let (_rolegate, port) = env.rolegate("binding", "allow", &env.verify_full(&env.ca));
    let out = psql(
        &format!(
            "{} sslmode=require channel_binding=require",
            conninfo(port, "app", "app")
        ),
        "select 1",
    );
    check(
        !out.status.success(),
        "channel_binding=require cannot work through a proxy",
    )?;
    check(stderr(&out).contains("channel binding"), stderr(&out))
}

fn require_mode_refuses_plaintext_with_28000(env: &Env) -> Result<(), Failed> {
    let (_rolegate, port) = env.rolegate("tls-only", "require", "");
    runtime().block_on(async {
        let err = connect(&conninfo(port, "app", "app"))
            .await
            .err()
            .ok_or("plaintext accepted")?;
        check(
            sqlstate(&err).as_deref() == Some("28000"),
            format!("got {err}"),
        )
    })?;
    let out = psql(
        &format!("{} sslmode=require", conninfo(port, "app", "app")),
        "select 1",
    );
    check(out.status.success(), stderr(&out))
}

/// A TLS client trusting `ca`, offering `alpn`.
fn tls_connector(ca: &Path, alpn: Option<&[u8]>) -> tokio_rustls::TlsConnector {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca).expect("read CA") {
        roots.add(cert.expect("CA cert")).expect("add CA");
    }
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("versions")
    .with_root_certificates(roots)
    .with_no_client_auth();
    config.alpn_protocols = alpn.map(|a| vec![a.to_vec()]).unwrap_or_default();
    tokio_rustls::TlsConnector::from(Arc::new(config))
}

/// Connects over TLS, by SSLRequest or directly, trusting `ca`.
async fn tls_session(
    port: u16,
    ca: &Path,
    direct: bool,
    alpn: Option<&[u8]>,
) -> std::io::Result<TlsStream<TcpStream>> {
    let mut tcp = TcpStream::connect(("127.0.0.1", port)).await?;
    if !direct {
        tcp.write_all(&[0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f]).await?;
        let answer = tcp.read_u8().await?;
        if answer != b'S' {
            return Err(std::io::Error::other(format!(
                "SSLRequest answered {:?}",
                char::from(answer)
            )));
        }
    }
    let name = ServerName::try_from("localhost").expect("server name");
    tls_connector(ca, alpn).connect(name, tcp).await
}

/// Reads messages until ReadyForQuery; returns their type bytes.
async fn read_until_ready<S: AsyncRead + Unpin>(stream: &mut S) -> std::io::Result<Vec<u8>> {
    let mut tags = Vec::new();
    loop {
        let tag = stream.read_u8().await?;
        let len = stream.read_u32().await? as usize;
        let mut body = vec![0u8; len.saturating_sub(4)];
        stream.read_exact(&mut body).await?;
        tags.push(tag);
        if tag == b'Z' {
            return Ok(tags);
        }
    }
}

/// Logs in as `trustuser` and runs `select 1`.
async fn login_and_query<S: AsyncRead + AsyncWrite + Unpin>(stream: &mut S) -> Result<(), Failed> {
    stream
        .write_all(&wire::startup_packet(
            3,
            0,
            &[("user", "trustuser"), ("database", "app")],
        ))
        .await?;
    let tags = read_until_ready(stream).await?;
    check(!tags.contains(&b'E'), format!("login failed: {tags:?}"))?;
    query(stream).await
}

async fn query<S: AsyncRead + AsyncWrite + Unpin>(stream: &mut S) -> Result<(), Failed> {
    let sql = b"select 1\0";
    let mut message = vec![b'Q'];
    message.extend_from_slice(&((sql.len() + 4) as u32).to_be_bytes());
    message.extend_from_slice(sql);
    stream.write_all(&message).await?;
    let tags = read_until_ready(stream).await?;
    check(
        tags.contains(&b'D') && !tags.contains(&b'E'),
        format!("query answered {tags:?}"),
    )
}

fn direct_tls_with_alpn_gets_a_session(env: &Env) -> Result<(), Failed> {
    let (_rolegate, port) = env.rolegate("direct", "allow", "");
    runtime().block_on(async {
        let mut session = tls_session(port, &env.ca, true, Some(b"postgresql")).await?;
        login_and_query(&mut session).await?;
        // Without ALPN, PostgreSQL 17 semantics: no session.
        let refused = match tls_session(port, &env.ca, true, None).await {
            Err(_) => true,
            Ok(mut stream) => {
                let _ = stream
                    .write_all(&wire::startup_packet(3, 0, &[("user", "trustuser")]))
                    .await;
                read_until_ready(&mut stream).await.is_err()
            }
        };
        check(refused, "direct TLS without ALPN must not get a session")?;
        // A different ALPN protocol fails the handshake.
        check(
            tls_session(port, &env.ca, true, Some(b"http/1.1"))
                .await
                .is_err(),
            "ALPN http/1.1 must be refused",
        )
    })
}

fn bytes_smuggled_after_ssl_request_close_the_connection(env: &Env) -> Result<(), Failed> {
    let (_rolegate, port) = env.rolegate("smuggle", "allow", "");
    let mut stream = wire::connect(port);
    let mut bytes = vec![0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f];
    bytes.extend(wire::startup_packet(3, 0, &[("user", "trustuser")]));
    std::io::Write::write_all(&mut stream, &bytes)?;
    let mut first = [0u8; 1];
    std::io::Read::read_exact(&mut stream, &mut first)?;
    check(first[0] != b'S', "TLS must not start after smuggled bytes")?;
    check(
        first[0] == b'E',
        format!("expected an ErrorResponse, got {:?}", char::from(first[0])),
    )?;
    check(wire::closes(&mut stream), "the connection is closed")
}

fn peer_certificate(stream: &TlsStream<TcpStream>) -> Option<Vec<u8>> {
    stream
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .map(|c| c.to_vec())
}

fn pem_der(path: &Path) -> Vec<u8> {
    CertificateDer::from_pem_file(path)
        .expect("read cert")
        .to_vec()
}

fn sighup_serves_a_new_certificate_and_keeps_old_sessions(env: &Env) -> Result<(), Failed> {
    // The rolegate under test reads its own copy of the files.
    let dir = env.root.join("reload");
    std::fs::create_dir_all(&dir)?;
    let ca = Ca::new("reload CA");
    let ca_path = ca.write(&dir, "ca.crt");
    let first = ca.issue(&dir, "first", "first", &["localhost", "127.0.0.1"]);
    let second = ca.issue(&dir, "second", "second", &["localhost", "127.0.0.1"]);
    let live = Pair {
        cert: dir.join("live.crt"),
        key: dir.join("live.key"),
    };
    std::fs::copy(&first.cert, &live.cert)?;
    std::fs::copy(&first.key, &live.key)?;
    let port = free_port();
    let config = format!(
        "[tls]\ncert = \"{}\"\nkey = \"{}\"\n\n[clusters.secure]\nprimary = \"{}\"\n\n[[listeners]]\nlisten = \"127.0.0.1:{port}\"\ncluster = \"secure\"\nrole = \"primary\"\n",
        live.cert.display(),
        live.key.display(),
        env.server.address()
    );
    let rolegate = Rolegate::start(&dir, "reload", &config);
    runtime().block_on(async {
        let mut old = tls_session(port, &ca_path, false, None).await?;
        check(
            peer_certificate(&old) == Some(pem_der(&first.cert)),
            "first certificate served",
        )?;
        login_and_query(&mut old).await?;

        std::fs::copy(&second.cert, &live.cert)?;
        std::fs::copy(&second.key, &live.key)?;
        rolegate.signal(Signal::SIGHUP);
        wait_until(Duration::from_secs(10), "the reload", || {
            rolegate
                .log()
                .contains("SIGHUP: reloaded the configuration")
                .then_some(())
        });
        let new = tls_session(port, &ca_path, false, None).await?;
        check(
            peer_certificate(&new) == Some(pem_der(&second.cert)),
            "second certificate served",
        )?;
        query(&mut old).await?;

        // A broken certificate is refused; the one in use stays.
        std::fs::write(&live.cert, "not a certificate")?;
        rolegate.signal(Signal::SIGHUP);
        wait_until(Duration::from_secs(10), "the refused reload", || {
            rolegate
                .log()
                .contains("keeping the configuration in use")
                .then_some(())
        });
        let after = tls_session(port, &ca_path, false, None).await?;
        check(
            peer_certificate(&after) == Some(pem_der(&second.cert)),
            "second certificate kept",
        )?;
        query(&mut old).await
    })?;
    check(
        rolegate.metric("rolegate_config_reloads_total", "outcome=\"ok\"") == 1.0
            && rolegate.metric("rolegate_config_reloads_total", "outcome=\"failed\"") == 1.0,
        "reload outcomes counted",
    )
}

fn backend_verify_full_and_a_wrong_ca(env: &Env) -> Result<(), Failed> {
    let (good, port) = env.rolegate("backend-good", "allow", &env.verify_full(&env.ca));
    runtime().block_on(async {
        let client = connect(&conninfo(port, "app", "app")).await?;
        let row = client
            .query_one(
                "select ssl from pg_stat_ssl where pid = pg_backend_pid()",
                &[],
            )
            .await?;
        check(row.get::<_, bool>(0), "the backend connection uses TLS")?;
        // A cancel goes over TLS as well.
        scenarios::cancelled(&client, "a session over TLS").await
    })?;
    drop(good);
    let (_bad, port) = env.rolegate("backend-bad", "allow", &env.verify_full(&env.wrong_ca));
    runtime().block_on(async {
        let err = connect(&conninfo(port, "app", "app"))
            .await
            .err()
            .ok_or("wrong CA accepted")?;
        let db = err
            .as_db_error()
            .ok_or(format!("not a server error: {err}"))?;
        check(
            db.code().code() == "08001",
            format!("sqlstate {}", db.code().code()),
        )?;
        check(
            db.message().contains("certificate") && db.message().contains(&env.server.address()),
            format!("message: {}", db.message()),
        )
    })
}

fn client_ca_requires_a_client_certificate(env: &Env) -> Result<(), Failed> {
    let dir = env.root.join("client-ca");
    std::fs::create_dir_all(&dir)?;
    let clients = Ca::new("client CA");
    let client_ca = clients.write(&dir, "clients.crt");
    let app = clients.issue(&dir, "app", "app", &["app"]);
    // libpq refuses a client key readable by others.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&app.key, std::fs::Permissions::from_mode(0o600))?;
    let port = free_port();
    let config = format!(
        "[tls]\ncert = \"{}\"\nkey = \"{}\"\nclient_ca = \"{}\"\nmode = \"require\"\n\n[clusters.secure]\nprimary = \"{}\"\n\n[[listeners]]\nlisten = \"127.0.0.1:{port}\"\ncluster = \"secure\"\nrole = \"primary\"\n",
        env.proxy_cert.cert.display(),
        env.proxy_cert.key.display(),
        client_ca.display(),
        env.server.address()
    );
    let _rolegate = Rolegate::start(&dir, "client-ca", &config);
    let base = format!("{} sslmode=require", conninfo(port, "app", "app"));
    let out = psql(
        &format!(
            "{base} sslcert={} sslkey={}",
            app.cert.display(),
            app.key.display()
        ),
        "select 1",
    );
    check(out.status.success() && stdout(&out) == "1", stderr(&out))?;
    let out = psql(
        &format!("{base} sslcert=/nonexistent sslkey=/nonexistent"),
        "select 1",
    );
    check(
        !out.status.success(),
        "a client without a certificate must be refused",
    )
}

/// The backend ends the session right after a large result (the session
/// terminates itself, so PostgreSQL sends its FATAL 57P01 and closes),
/// while the TLS client is not reading yet. When the client does read, it
/// gets every row, the server's own FATAL, and a TLS close_notify: nothing
/// is lost in rolegate's TLS buffers when the backend goes, and OpenSSL 3
/// clients see no "unexpected eof".
fn a_slow_tls_reader_gets_every_byte_and_a_clean_close(env: &Env) -> Result<(), Failed> {
    let (_rolegate, port) = env.rolegate("slow-reader", "allow", "");
    runtime().block_on(async {
        let mut stream = tls_session(port, &env.ca, false, None).await?;
        stream
            .write_all(&wire::startup_packet(
                3,
                0,
                &[("user", "trustuser"), ("database", "app")],
            ))
            .await?;
        read_until_ready(&mut stream).await?;
        let sql = b"select repeat('x', 100000) from generate_series(1, 40); \
                    select pg_terminate_backend(pg_backend_pid())\0";
        let mut message = vec![b'Q'];
        message.extend_from_slice(&((sql.len() + 4) as u32).to_be_bytes());
        message.extend_from_slice(sql);
        stream.write_all(&message).await?;
        stream.flush().await?;
        // The backend sends 4 MB and closes while nobody reads.
        tokio::time::sleep(Duration::from_secs(2)).await;
        let mut rows = 0;
        let mut fatal = None;
        let ended = loop {
            let tag = match stream.read_u8().await {
                Ok(tag) => tag,
                Err(e) => break Err(e),
            };
            let len = stream.read_u32().await? as usize;
            let mut body = vec![0u8; len.saturating_sub(4)];
            stream.read_exact(&mut body).await?;
            match tag {
                // The repeat() rows; pg_terminate_backend's own row may
                // come before its signal is taken.
                b'D' if body.len() > 100_000 => rows += 1,
                b'E' => fatal = Some(String::from_utf8_lossy(&body).into_owned()),
                _ => {}
            }
            if fatal.is_some() {
                let mut rest = Vec::new();
                break stream.read_to_end(&mut rest).await.map(|_| rest);
            }
        };
        check(rows == 40, format!("{rows} of 40 rows arrived"))?;
        let fatal = fatal.ok_or("the server's FATAL was lost")?;
        check(fatal.contains("C57P01"), format!("expected 57P01: {fatal}"))?;
        match ended {
            Ok(rest) => check(
                rest.is_empty(),
                format!("{} bytes after the FATAL", rest.len()),
            ),
            Err(e) => Err(format!("the TLS session did not end with close_notify: {e}").into()),
        }
    })
}

/// A client that gives up while its session is held is let go when it
/// closes, whatever it sent first: a TLS client closing with close_notify
/// as libpq does (the alert and the FIN at once), one whose FIN comes well
/// after its alert, and a plaintext client that sent bytes before closing.
/// Bytes alone do not end the hold. Nothing answers at the cluster's one
/// Patroni REST URL, so no member is known and its sessions are held for
/// the whole `hold_timeout`.
fn clients_that_leave_while_held_are_let_go(env: &Env) -> Result<(), Failed> {
    let (port, nobody) = (free_port(), free_port());
    let config = format!(
        r#"
[tls]
cert = "{}"
key = "{}"
mode = "allow"

[clusters.secure]
patroni = ["http://127.0.0.1:{nobody}"]

[[listeners]]
listen = "127.0.0.1:{port}"
cluster = "secure"
role = "replica"

[limits]
hold_timeout = "60s"
"#,
        env.proxy_cert.cert.display(),
        env.proxy_cert.key.display(),
    );
    let rolegate = Rolegate::start(&env.root, "held-and-gone", &config);
    let held = || rolegate.metric("rolegate_held_sessions", "cluster=\"secure\"");
    let startup = wire::startup_packet(3, 0, &[("user", "app"), ("database", "app")]);
    runtime().block_on(async {
        let mut at_once = tls_session(port, &env.ca, false, None).await?;
        let mut alert_first = tls_session(port, &env.ca, false, None).await?;
        for tls in [&mut at_once, &mut alert_first] {
            tls.write_all(&startup).await?;
            tls.flush().await?;
        }
        let mut plain = TcpStream::connect(("127.0.0.1", port)).await?;
        plain.write_all(&startup).await?;
        wait_until(Duration::from_secs(10), "three held sessions", || {
            (held() == 3.0).then_some(())
        });

        at_once.shutdown().await?;
        drop(at_once);
        alert_first.get_mut().1.send_close_notify();
        alert_first.flush().await?;
        plain.write_all(b"early bytes").await?;
        wait_until(Duration::from_secs(5), "the first client let go", || {
            (held() == 2.0).then_some(())
        });
        tokio::time::sleep(Duration::from_millis(500)).await;
        check(
            held() == 2.0,
            format!(
                "{} sessions held after an alert or bytes without a close, expected 2",
                held()
            ),
        )?;

        drop(alert_first);
        drop(plain);
        wait_until(Duration::from_secs(5), "the other two let go", || {
            (held() == 0.0).then_some(())
        });
        let gone = rolegate.metric(
            "rolegate_client_connections_total",
            "outcome=\"client_gone\"",
        );
        check(
            gone == 3.0,
            format!("{gone} connections counted as client_gone, expected 3"),
        )
    })
}

/// A pooled listener ends the client's SCRAM itself, so TLS on both hops
/// needs no `channel_binding=disable`: libpq's default (`prefer`) sees no
/// SCRAM-SHA-256-PLUS offered and logs in; `require` is refused by libpq.
fn a_pooled_listener_logs_tls_clients_in_with_scram(env: &Env) -> Result<(), Failed> {
    let secret = env
        .server
        .psql("select rolpassword from pg_authid where rolname = 'app'");
    let userlist = env.root.join("pooled-userlist.txt");
    std::fs::write(&userlist, format!("\"app\" \"{secret}\"\n"))?;
    let port = free_port();
    let config = format!(
        "[tls]\ncert = \"{}\"\nkey = \"{}\"\nmode = \"require\"\n\n\
         [clusters.secure]\nprimary = \"{}\"\n{}\n\n\
         [[listeners]]\nlisten = \"127.0.0.1:{port}\"\ncluster = \"secure\"\nrole = \"primary\"\n\
         pool_mode = \"session\"\nauth_file = \"{}\"\n",
        env.proxy_cert.cert.display(),
        env.proxy_cert.key.display(),
        env.server.address(),
        env.verify_full(&env.ca),
        userlist.display()
    );
    let _rolegate = Rolegate::start(&env.root, "pooled-tls", &config);
    let out = psql(
        &format!("{} sslmode=require", conninfo(port, "app", "app")),
        "select ssl from pg_stat_ssl where pid = pg_backend_pid()",
    );
    check(out.status.success(), stderr(&out))?;
    check(
        stdout(&out) == "t",
        format!("the server connection is not TLS: {}", stdout(&out)),
    )?;
    let out = psql(
        &format!(
            "{} sslmode=require channel_binding=require",
            conninfo(port, "app", "app")
        ),
        "select 1",
    );
    check(
        !out.status.success() && stderr(&out).contains("channel binding"),
        format!("channel_binding=require: {}", stderr(&out)),
    )?;
    let out = psql(
        &format!("{} sslmode=disable", conninfo(port, "app", "app")),
        "select 1",
    );
    check(
        !out.status.success(),
        "a plaintext client was served by a TLS-only listener",
    )
}
