//! Pooled listeners against real PostgreSQL servers: rolegate checks
//! passwords itself against an `auth_file` of the servers' own secrets and
//! lends logged-in server connections, in session mode one client at a
//! time, reset between clients.
//!
//! One static cluster is started for the binary; each test starts its own
//! rolegate with a pooled listener in front of the primary.

mod support;

use std::time::{Duration, Instant};

use libtest_mimic::Failed;

use support::harness::{by_name, check, run_suite, TestFn};
use support::pooled::PooledCluster;
use support::rolegate::Rolegate;
use support::{
    connect, conninfo, free_port, holds_within, runtime, scenarios, server_message, sqlstate, wire,
};

type Env = PooledCluster;

fn main() {
    let tests: &[(&str, TestFn<Env>)] = by_name![
        session_mode_lends_one_server_to_clients_in_turn_and_resets_it,
        passwords_are_checked_by_rolegate_with_postgresql_answers,
        a_full_pool_makes_clients_wait_then_says_which_limit,
        cancel_and_psql_work_through_a_pooled_listener,
        auth_query_reads_secrets_as_postgresql_would_let_roles_in,
        idle_servers_past_their_timeout_are_closed_unasked,
        garbage_mid_session_ends_that_session_and_its_server_only
    ];
    run_suite(tests, start, false);
}

fn start() -> Env {
    PooledCluster::start("pooling")
}

/// A rolegate with one session-pooled listener on the primary.
fn pooled(env: &Env, name: &str, extra: &str) -> (Rolegate, u16) {
    env.rolegate(name, "session", extra)
}

async fn backend_pid(client: &tokio_postgres::Client) -> Result<i32, Failed> {
    Ok(client
        .query_one("select pg_backend_pid()", &[])
        .await?
        .get(0))
}

fn session_mode_lends_one_server_to_clients_in_turn_and_resets_it(env: &Env) -> Result<(), Failed> {
    let (rolegate, port) = pooled(env, "turns", "pool_size = 1");
    runtime().block_on(async {
        let first = connect(&format!(
            "{} application_name=first",
            conninfo(port, "app", "app")
        ))
        .await?;
        let pid = backend_pid(&first).await?;
        let name: String = first.query_one("show application_name", &[]).await?.get(0);
        check(
            name == "first",
            format!("the startup application_name was not set: {name:?}"),
        )?;
        first
            .batch_execute(
                "set search_path = nowhere; set timezone = 'Asia/Tokyo'; \
                 create temp table left_behind (x int); prepare sneaky as select 1",
            )
            .await?;
        drop(first);
        // The next client gets the same server, and nothing of the first.
        let second = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                if let Ok(client) = connect(&conninfo(port, "app", "app")).await {
                    return client;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
        .await
        .map_err(|_| "no second client within 10 s")?;
        let reused = backend_pid(&second).await?;
        check(
            reused == pid,
            format!("the second client got server {reused}, not the pooled {pid}"),
        )?;
        let row = second
            .query_one(
                "select current_setting('search_path'), current_setting('TimeZone'), \
                 current_setting('application_name'), to_regclass('pg_temp.left_behind') is null, \
                 (select count(*) from pg_prepared_statements where name = 'sneaky')",
                &[],
            )
            .await?;
        let (path, zone, name): (String, String, String) = (row.get(0), row.get(1), row.get(2));
        let (no_table, prepared): (bool, i64) = (row.get(3), row.get(4));
        check(
            path == "\"$user\", public",
            format!("search_path leaked: {path}"),
        )?;
        check(zone != "Asia/Tokyo", "TimeZone leaked")?;
        check(
            name.is_empty(),
            format!("application_name leaked: {name:?}"),
        )?;
        check(no_table, "the temp table leaked")?;
        check(prepared == 0, "the prepared statement leaked")?;
        // A client that leaves inside a transaction takes its server with
        // it: the next client gets a new one.
        second.batch_execute("begin; select 1").await?;
        drop(second);
        tokio::time::sleep(Duration::from_millis(300)).await;
        let third = connect(&conninfo(port, "app", "app")).await?;
        let fresh = backend_pid(&third).await?;
        check(
            fresh != pid,
            "a server left inside a transaction was lent again",
        )?;
        third.query_one("select 1", &[]).await?;
        Ok::<_, Failed>(())
    })?;
    let sessions = || {
        rolegate.metric(
            "rolegate_client_connections_total",
            &format!("listener=\"127.0.0.1:{port}\",outcome=\"session\""),
        )
    };
    let pool = format!("listener=\"127.0.0.1:{port}\",user=\"app\"");
    let reused = rolegate.metric(
        "rolegate_pool_lends_total",
        &format!("{pool},server=\"idle\""),
    );
    check(reused >= 1.0, format!("idle lends counted: {reused}"))?;
    let busy = rolegate.metric(
        "rolegate_pool_servers_closed_total",
        &format!("{pool},reason=\"busy\""),
    );
    check(busy == 1.0, format!("servers closed busy: {busy}"))?;
    // The third session is counted once its task has seen the close.
    let counted = holds_within(Duration::from_secs(5), || sessions() == 3.0);
    check(counted, format!("sessions counted: {}", sessions()))?;
    println!("session mode: one server lent in turn, reset between clients; a server left in a transaction closed");
    Ok(())
}

fn passwords_are_checked_by_rolegate_with_postgresql_answers(env: &Env) -> Result<(), Failed> {
    let (rolegate, port) = pooled(env, "passwords", "");
    runtime().block_on(async {
        let md5 = connect(&conninfo(port, "md5user", "md5pw")).await?;
        md5.query_one("select 1", &[]).await?;
        let mut answers = Vec::new();
        for (user, password) in [("app", "wrong"), ("ghost", "app"), ("md5user", "wrong")] {
            let started = Instant::now();
            let err = connect(&conninfo(port, user, password))
                .await
                .err()
                .ok_or(format!("{user} logged in with a wrong password"))?;
            answers.push((
                user,
                sqlstate(&err),
                server_message(&err),
                started.elapsed(),
            ));
        }
        for (user, code, message, took) in &answers {
            check(
                code.as_deref() == Some("28P01"),
                format!("{user}: {code:?} {message}"),
            )?;
            check(
                *message == format!("password authentication failed for user \"{user}\""),
                format!("{user}: {message}"),
            )?;
            check(
                *took >= Duration::from_millis(900),
                format!("{user} was answered at once"),
            )?;
        }
        Ok::<_, Failed>(())
    })?;
    let refused = rolegate.metric(
        "rolegate_client_connections_total",
        &format!("listener=\"127.0.0.1:{port}\",outcome=\"auth_refused\""),
    );
    check(refused == 3.0, format!("auth_refused counted {refused}"))?;
    check(
        !rolegate.log().contains("SCRAM-SHA-256$"),
        "a secret reached the log",
    )?;
    println!("pooled logins: SCRAM and md5 checked by rolegate; a wrong password and an unknown role get the same 28P01 after 1 s");
    Ok(())
}

fn a_full_pool_makes_clients_wait_then_says_which_limit(env: &Env) -> Result<(), Failed> {
    let (rolegate, port) = pooled(env, "full", "pool_size = 1\nquery_wait_timeout = \"1s\"");
    let pool = format!("listener=\"127.0.0.1:{port}\",user=\"app\"");
    runtime().block_on(async {
        let holder = connect(&conninfo(port, "app", "app")).await?;
        let err = connect(&conninfo(port, "app", "app"))
            .await
            .err()
            .ok_or("a second client got a server of a full pool")?;
        let message = server_message(&err);
        check(
            sqlstate(&err).as_deref() == Some("53300") && message.contains("pool_size"),
            format!("got {:?}: {message}", sqlstate(&err)),
        )?;
        let timeouts = rolegate.metric("rolegate_pool_wait_timeouts_total", &pool);
        check(
            timeouts == 1.0,
            format!("wait timeouts counted: {timeouts}"),
        )?;
        // A client that waits gets the server once the holder leaves.
        let waiter = tokio::spawn(async move { connect(&conninfo(port, "app", "app")).await });
        let waiting = || rolegate.metric("rolegate_pool_waiting_clients", &pool);
        for _ in 0..50 {
            if waiting() == 1.0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        check(waiting() == 1.0, format!("waiting clients: {}", waiting()))?;
        let lent = rolegate.metric("rolegate_pool_servers", &format!("{pool},state=\"lent\""));
        check(lent == 1.0, format!("lent servers: {lent}"))?;
        // /cluster shows the pool as operators know it from SHOW POOLS.
        let (_, body) = rolegate.admin_get("/cluster").ok_or("no /cluster")?;
        let cluster: serde_json::Value = serde_json::from_str(&body)?;
        let shown = &cluster["listeners"][0]["pool"];
        check(
            shown["mode"] == "session"
                && shown["pool_size"] == 1
                && shown["pools"][0]["user"] == "app"
                && shown["pools"][0]["servers_lent"] == 1
                && shown["pools"][0]["clients_waiting"] == 1,
            format!("/cluster shows {shown}"),
        )?;
        drop(holder);
        let waiter = tokio::time::timeout(Duration::from_secs(10), waiter)
            .await
            .map_err(|_| "the waiting client was not served")???;
        waiter.query_one("select 1", &[]).await?;
        Ok(())
    })
}

fn cancel_and_psql_work_through_a_pooled_listener(env: &Env) -> Result<(), Failed> {
    let (_rolegate, port) = pooled(env, "cancel", "pool_size = 2");
    runtime().block_on(async {
        let client = connect(&conninfo(port, "app", "app")).await?;
        let pid = backend_pid(&client).await?;
        scenarios::cancelled(&client, "a pooled query").await?;
        let after: i32 = backend_pid(&client).await?;
        check(after == pid, "the cancel ended the session")?;
        Ok::<_, Failed>(())
    })?;
    let out = std::process::Command::new("psql")
        .arg(conninfo(port, "app", "app"))
        .args(["-AtX", "-v", "ON_ERROR_STOP=1", "-c", "select 40 + 2"])
        .env("PGCONNECT_TIMEOUT", "10")
        .output()?;
    check(
        out.status.success() && String::from_utf8_lossy(&out.stdout).trim() == "42",
        format!("psql: {}", String::from_utf8_lossy(&out.stderr)),
    )
}

/// A rolegate whose pooled listener reads secrets with `auth_query` as
/// `auth_user` (no `auth_file`); `extra` adds listener keys.
fn queried(env: &Env, name: &str, user: &str, password: &str, extra: &str) -> (Rolegate, u16) {
    let file = env.cluster.root.join(format!("{name}-password"));
    std::fs::write(&file, format!("{password}\n")).expect("write the password file");
    let port = free_port();
    let config = format!(
        "[clusters.main]\nprimary = \"{}\"\n\n[[listeners]]\nlisten = \"127.0.0.1:{port}\"\n\
         cluster = \"main\"\nrole = \"primary\"\npool_mode = \"session\"\nauth_user = \"{user}\"\n\
         auth_password_file = \"{}\"\n{extra}\n",
        env.cluster.primary.address(),
        file.display()
    );
    (Rolegate::start(&env.cluster.root, name, &config), port)
}

/// The 28P01 a login through `port` gets, or why not.
async fn refused_login(port: u16, user: &str, password: &str) -> Result<(), Failed> {
    let err = connect(&conninfo(port, user, password))
        .await
        .err()
        .ok_or(format!("{user} logged in"))?;
    check(
        sqlstate(&err).as_deref() == Some("28P01"),
        format!("{user}: {:?} {}", sqlstate(&err), server_message(&err)),
    )
}

fn auth_query_reads_secrets_as_postgresql_would_let_roles_in(env: &Env) -> Result<(), Failed> {
    let primary = &env.cluster.primary;
    primary.psql(
        "CREATE ROLE nologin_role NOLOGIN PASSWORD 'pw'; \
         CREATE ROLE expired_role LOGIN PASSWORD 'pw' VALID UNTIL '2000-01-01'; \
         CREATE ROLE authq LOGIN PASSWORD 'authq-secret'",
    );
    // In the database the clients ask for: auth_query runs there.
    primary.psql_in(
        "app",
        "CREATE SCHEMA pgbouncer AUTHORIZATION authq; \
         CREATE FUNCTION pgbouncer.get_auth(p_usename text) RETURNS TABLE(usename name, passwd text) \
           LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog AS \
           $$ SELECT usename, passwd FROM pg_shadow WHERE usename = p_usename $$; \
         REVOKE ALL ON FUNCTION pgbouncer.get_auth(text) FROM PUBLIC; \
         GRANT EXECUTE ON FUNCTION pgbouncer.get_auth(text) TO authq",
    );
    let (rolegate, port) = queried(env, "query", "postgres", "postgres", "");
    runtime().block_on(async {
        for (user, password) in [("app", "app"), ("md5user", "md5pw")] {
            let client = connect(&conninfo(port, user, password))
                .await
                .map_err(|e| format!("{user}: {}", server_message(&e)))?;
            client.query_one("select 1", &[]).await?;
        }
        for (user, password) in [
            ("app", "wrong"),
            ("ghost", "pw"),
            ("nologin_role", "pw"),
            ("expired_role", "pw"),
        ] {
            refused_login(port, user, password).await?;
        }
        Ok::<_, Failed>(())
    })?;
    // Refused by rolegate's own check (PostgreSQL's server login would
    // refuse an expired role too, with the same SQLSTATE).
    let log = rolegate.log();
    for role in ["nologin_role", "expired_role"] {
        check(
            log.lines()
                .any(|l| l.contains("pooled login refused") && l.contains(role)),
            format!("{role} was not refused by the query's answer"),
        )?;
    }
    // PgBouncer's recommended function, run by a role of its own.
    let (_pgbouncer_style, port) = queried(
        env,
        "function",
        "authq",
        "authq-secret",
        "auth_query = \"SELECT usename, passwd FROM pgbouncer.get_auth($1)\"",
    );
    runtime().block_on(async {
        let client = connect(&conninfo(port, "app", "app"))
            .await
            .map_err(|e| format!("app through get_auth: {}", server_message(&e)))?;
        client.query_one("select 1", &[]).await?;
        Ok::<_, Failed>(())
    })?;
    // A wrong auth_user password: a clear error naming the keys, and not
    // the password.
    let (broken, port) = queried(env, "broken", "authq", "not-the-password", "");
    runtime().block_on(async {
        let err = connect(&conninfo(port, "app", "app"))
            .await
            .err()
            .ok_or("logged in with a broken auth_user")?;
        let db = err
            .as_db_error()
            .ok_or(format!("not a server error: {err}"))?;
        let hint = db.hint().unwrap_or_default();
        check(
            db.code().code() == "08001"
                && db.message().contains("auth_user \"authq\"")
                && hint.contains("listeners[0].auth_user"),
            format!("got {}: {} ({hint})", db.code().code(), db.message()),
        )?;
        check(
            !db.message().contains("not-the-password") && !hint.contains("not-the-password"),
            "the password is in the error",
        )
    })?;
    check(
        !broken.log().contains("not-the-password"),
        "auth_user's password reached the log",
    )?;
    println!("auth_query: SCRAM and md5 roles in; wrong password, unknown, NOLOGIN and expired roles get 28P01; PgBouncer's get_auth works; a broken auth_user names its keys");
    Ok(())
}

/// Nobody asks the pool for a server: its idle one is closed anyway once
/// it has been idle longer than `server_idle_timeout`.
fn idle_servers_past_their_timeout_are_closed_unasked(env: &Env) -> Result<(), Failed> {
    let (rolegate, port) = pooled(env, "aging", "server_idle_timeout = \"1s\"");
    let pid = runtime().block_on(async {
        let client = connect(&conninfo(port, "app", "app")).await?;
        backend_pid(&client).await
    })?;
    let pool = format!("listener=\"127.0.0.1:{port}\",user=\"app\"");
    let closed = || {
        rolegate.metric(
            "rolegate_pool_servers_closed_total",
            &format!("{pool},reason=\"stale\""),
        )
    };
    check(
        holds_within(Duration::from_secs(15), || closed() == 1.0),
        format!("stale closes: {}", closed()),
    )?;
    let idle = rolegate.metric("rolegate_pool_servers", &format!("{pool},state=\"idle\""));
    check(idle == 0.0, format!("idle servers left: {idle}"))?;
    let gone = holds_within(Duration::from_secs(5), || {
        env.cluster.primary.psql(&format!(
            "select count(*) from pg_stat_activity where pid = {pid}"
        )) == "0"
    });
    check(gone, format!("server {pid} is still connected"))
}

/// A client that sends a message no framing can follow (a length below 4)
/// mid-session gets 08P01; its server is closed, and the next client of a
/// one-server pool is served by a new one.
fn garbage_mid_session_ends_that_session_and_its_server_only(env: &Env) -> Result<(), Failed> {
    use std::io::Write as _;
    let (rolegate, port) = pooled(env, "garbage", "pool_size = 1");
    {
        let mut session = wire::KeyedSession::login(port)?;
        session.stream.write_all(b"Q\0\0\0\x02")?;
        let error = wire::read_msg(&mut session.stream).ok_or("no answer to the garbage")?;
        check(
            error.tag == b'E' && error.field(b'C').as_deref() == Some("08P01"),
            format!(
                "answered {:?} {:?}",
                char::from(error.tag),
                error.field(b'M')
            ),
        )?;
        check(wire::closes(&mut session.stream), "the session stayed open")?;
    }
    let closed = || {
        rolegate.metric(
            "rolegate_pool_servers_closed_total",
            &format!("listener=\"127.0.0.1:{port}\",reason=\"busy\""),
        )
    };
    check(
        holds_within(Duration::from_secs(5), || closed() == 1.0),
        format!("servers closed: {}", closed()),
    )?;
    runtime().block_on(async {
        let next = connect(&conninfo(port, "app", "app")).await?;
        next.query_one("select 1", &[]).await?;
        Ok(())
    })
}
