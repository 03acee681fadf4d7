//! Transaction-pooled listeners against a real PostgreSQL server: many
//! clients over few servers, each client's named statements working on
//! whichever server its transaction gets, nothing one client sets seen by
//! another, cancels reaching only the query they belong to, and broken
//! clients leaving the pool healthy.

mod support;

use std::collections::HashSet;
use std::io::Write;
use std::time::Duration;

use libtest_mimic::Failed;

use support::harness::{by_name, check, run_suite, TestFn};
use support::pooled::PooledCluster;
use support::{connect, conninfo, runtime, scenarios, sqlstate, wire};

type Env = PooledCluster;

fn main() {
    let tests: &[(&str, TestFn<Env>)] = by_name![
        many_clients_share_few_servers_with_their_prepared_statements,
        nothing_one_client_sets_is_seen_by_another,
        a_cancel_reaches_the_running_transaction_only,
        errors_inside_a_pipeline_and_discard_all_keep_statements_right,
        broken_clients_mid_transaction_leave_the_pool_healthy
    ];
    run_suite(tests, start, false);
}

fn start() -> Env {
    PooledCluster::start("transactions")
}

fn pooled(env: &Env, name: &str, extra: &str) -> (support::rolegate::Rolegate, u16) {
    env.rolegate(name, "transaction", extra)
}

fn many_clients_share_few_servers_with_their_prepared_statements(env: &Env) -> Result<(), Failed> {
    let (rolegate, port) = pooled(env, "many", "pool_size = 4");
    let pids = runtime().block_on(async {
        let mut tasks = Vec::new();
        for i in 0..40i32 {
            let conninfo = conninfo(port, "app", "app");
            tasks.push(tokio::spawn(async move {
                let client = connect(&conninfo).await?;
                // tokio-postgres names every statement it prepares.
                let add = client.prepare("select $1::int + 1").await?;
                let pid = client.prepare("select pg_backend_pid()").await?;
                let mut seen = HashSet::new();
                for round in 0..10i32 {
                    let n: i32 = client.query_one(&add, &[&(i * 100 + round)]).await?.get(0);
                    if n != i * 100 + round + 1 {
                        return Err(format!("client {i}: {n} for {}", i * 100 + round).into());
                    }
                    seen.insert(client.query_one(&pid, &[]).await?.get::<_, i32>(0));
                    // A transaction keeps its server from BEGIN to COMMIT.
                    client.batch_execute("begin").await?;
                    let inside: i32 = client.query_one(&pid, &[]).await?.get(0);
                    let again: i32 = client.query_one(&pid, &[]).await?.get(0);
                    client.batch_execute("commit").await?;
                    if inside != again {
                        return Err(
                            format!("client {i}: one transaction on {inside} and {again}").into(),
                        );
                    }
                    seen.insert(inside);
                }
                Ok::<_, Failed>(seen)
            }));
        }
        let mut all = HashSet::new();
        for task in tasks {
            all.extend(
                tokio::time::timeout(Duration::from_secs(120), task)
                    .await
                    .map_err(|_| "a client hung")???,
            );
        }
        Ok::<_, Failed>(all)
    })?;
    check(
        !pids.is_empty() && pids.len() <= 4,
        format!(
            "40 clients used {} servers over a pool of 4: {pids:?}",
            pids.len()
        ),
    )?;
    let lends = rolegate.metric("rolegate_pool_lends_total", "server=\"idle\"");
    check(lends > 400.0, format!("only {lends} lends of idle servers"))
}

fn nothing_one_client_sets_is_seen_by_another(env: &Env) -> Result<(), Failed> {
    let (rolegate, port) = pooled(env, "leaks", "pool_size = 2");
    runtime().block_on(async {
        let named = connect(&format!(
            "{} application_name=named",
            conninfo(port, "app", "app")
        ))
        .await?;
        let plain = connect(&conninfo(port, "app", "app")).await?;
        // Startup parameters hold on every server each client gets.
        for _ in 0..5 {
            let a: String = named.query_one("show application_name", &[]).await?.get(0);
            let b: String = plain.query_one("show application_name", &[]).await?.get(0);
            check(
                a == "named" && b.is_empty(),
                format!("application_name: {a:?} and {b:?}"),
            )?;
        }
        let setter = connect(&conninfo(port, "app", "app")).await?;
        setter
            .batch_execute(
                "set search_path = nowhere; set timezone = 'Asia/Tokyo'; \
                 create temp table left_behind (x int)",
            )
            .await?;
        let zone: String = setter.query_one("show timezone", &[]).await?.get(0);
        check(
            zone == "Asia/Tokyo",
            format!("the pinned client lost its TimeZone: {zone}"),
        )?;
        // The setter keeps its server; the others never see its state.
        for _ in 0..5 {
            for other in [&named, &plain] {
                let row = other
                    .query_one(
                        "select current_setting('search_path'), current_setting('TimeZone'), \
                         to_regclass('pg_temp.left_behind') is null",
                        &[],
                    )
                    .await?;
                let (path, zone, no_table): (String, String, bool) =
                    (row.get(0), row.get(1), row.get(2));
                check(
                    path == "\"$user\", public" && zone != "Asia/Tokyo" && no_table,
                    format!(
                        "leaked: search_path {path}, TimeZone {zone}, temp table {}",
                        !no_table
                    ),
                )?;
            }
        }
        drop(setter);
        tokio::time::sleep(Duration::from_millis(500)).await;
        // Its server was reset on the way back.
        for _ in 0..4 {
            let path: String = plain.query_one("show search_path", &[]).await?.get(0);
            check(
                path == "\"$user\", public",
                format!("search_path after reset: {path}"),
            )?;
        }
        Ok::<_, Failed>(())
    })?;
    let pins = rolegate.metric("rolegate_pool_pins_total", "cause=\"set\"");
    check(pins == 1.0, format!("pins counted: {pins}"))
}

fn a_cancel_reaches_the_running_transaction_only(env: &Env) -> Result<(), Failed> {
    let (rolegate, port) = pooled(env, "cancel", "pool_size = 1");
    runtime().block_on(async {
        let first = connect(&conninfo(port, "app", "app")).await?;
        scenarios::cancelled(&first, "a transaction-pooled query").await?;
        let n: i32 = first.query_one("select 7", &[]).await?.get(0);
        check(n == 7, "the cancelled client cannot go on")?;
        // A cancel between transactions reaches nobody: the other client's
        // query on the same server runs to its end.
        let second = connect(&conninfo(port, "app", "app")).await?;
        let token = first.cancel_token();
        let slept = tokio::spawn(async move { second.batch_execute("select pg_sleep(1.5)").await });
        tokio::time::sleep(Duration::from_millis(500)).await;
        token.cancel_query(tokio_postgres::NoTls).await?;
        let result = tokio::time::timeout(Duration::from_secs(20), slept)
            .await
            .map_err(|_| "the sleep hung")??;
        check(
            result.is_ok(),
            format!("another client's cancel hit this query: {result:?}"),
        )
    })?;
    let closed = rolegate.metric("rolegate_pool_servers_closed_total", "reason=\"cancelled\"");
    check(
        closed == 1.0,
        format!("servers closed after a cancel: {closed}"),
    )
}

fn errors_inside_a_pipeline_and_discard_all_keep_statements_right(env: &Env) -> Result<(), Failed> {
    let (_rolegate, port) = pooled(env, "pipeline", "pool_size = 1");
    let mut session = wire::KeyedSession::login(port)?.stream;
    let parse =
        |name: &str, sql: &str| wire::message(b'P', format!("{name}\0{sql}\0\0\0").as_bytes());
    let bind = |name: &str| wire::message(b'B', format!("\0{name}\0\0\0\0\0\0\0").as_bytes());
    let execute = wire::message(b'E', b"\0\0\0\0\0");
    let sync = wire::message(b'S', b"");
    let mut batch = Vec::new();
    for part in [
        parse("ok", "select 1"),
        bind("ok"),
        execute.clone(),
        parse("bad", "select * from no_such_table"),
        bind("bad"),
        execute.clone(),
        sync.clone(),
        bind("ok"),
        execute.clone(),
        bind("bad"),
        execute.clone(),
        sync.clone(),
    ] {
        batch.extend_from_slice(&part);
    }
    session.write_all(&batch)?;
    let tags = read_until_ready(&mut session, 2)?;
    check(
        tags == "12DCEZ2DCEZ",
        format!("answers to the pipeline: {tags} (the failed Parse must leave no statement)"),
    )?;
    // A second client's Parse of the same query is answered by rolegate:
    // the one server has it already.
    let mut other = wire::KeyedSession::login(port)?.stream;
    let mut batch = parse("mine", "select 1");
    batch.extend_from_slice(&bind("mine"));
    batch.extend_from_slice(&execute);
    batch.extend_from_slice(&sync);
    other.write_all(&batch)?;
    let tags = read_until_ready(&mut other, 1)?;
    check(tags == "12DCZ", format!("a shared statement: {tags}"))?;
    // DISCARD ALL forgets the client's statements.
    let error = wire::query_error(&mut other, "discard all")?;
    check(error.is_none(), format!("discard all: {error:?}"))?;
    let mut batch = bind("mine");
    batch.extend_from_slice(&execute);
    batch.extend_from_slice(&sync);
    other.write_all(&batch)?;
    let tags = read_until_ready(&mut other, 1)?;
    check(
        tags == "EZ",
        format!("a statement after DISCARD ALL: {tags}"),
    )
}

/// The message types read up to the `n`th ReadyForQuery.
fn read_until_ready(stream: &mut std::net::TcpStream, n: usize) -> Result<String, Failed> {
    let mut tags = String::new();
    let mut ready = 0;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    while ready < n {
        let msg = wire::read_msg(stream).ok_or_else(|| format!("closed after {tags}"))?;
        tags.push(char::from(msg.tag));
        if msg.tag == b'Z' {
            ready += 1;
        }
    }
    Ok(tags)
}

fn broken_clients_mid_transaction_leave_the_pool_healthy(env: &Env) -> Result<(), Failed> {
    let (rolegate, port) = pooled(env, "broken", "pool_size = 1");
    runtime().block_on(async {
        let client = connect(&conninfo(port, "app", "app")).await?;
        client
            .batch_execute("create table if not exists tx_broken (x int)")
            .await?;
        Ok::<_, Failed>(())
    })?;
    // Garbage inside a transaction: that session ends, with an error.
    let mut garbage = wire::KeyedSession::login(port)?.stream;
    let error = wire::query_error(&mut garbage, "begin")?;
    check(error.is_none(), format!("begin: {error:?}"))?;
    garbage.write_all(b"Q\0\0\0\x01")?;
    check(
        wire::closes(&mut garbage),
        "the garbage session stayed open",
    )?;
    // A client that vanishes inside a transaction, and one during COPY.
    let mut vanishing = wire::KeyedSession::login(port)?.stream;
    let error = wire::query_error(&mut vanishing, "begin; insert into tx_broken values (1)")?;
    check(error.is_none(), format!("insert: {error:?}"))?;
    drop(vanishing);
    let mut copying = wire::KeyedSession::login(port)?.stream;
    copying.write_all(&wire::message(b'Q', b"copy tx_broken from stdin\0"))?;
    copying.write_all(&wire::message(b'd', b"2\n"))?;
    drop(copying);
    runtime().block_on(async {
        let client = tokio::time::timeout(Duration::from_secs(20), async {
            loop {
                if let Ok(client) = connect(&conninfo(port, "app", "app")).await {
                    if client.simple_query("select 1").await.is_ok() {
                        return client;
                    }
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
        .await
        .map_err(|_| "no healthy server within 20 s")?;
        let row = client
            .query_one(
                "select (select count(*) from tx_broken), \
                 current_setting('transaction_isolation') is not null, \
                 txid_current_if_assigned() is null",
                &[],
            )
            .await?;
        let (rows, _, fresh): (i64, bool, bool) = (row.get(0), row.get(1), row.get(2));
        check(
            rows == 0 && fresh,
            format!("left behind: {rows} rows, fresh transaction {fresh}"),
        )?;
        let err = client.batch_execute("commit; select 1/0").await.err();
        check(
            err.as_ref().and_then(sqlstate).as_deref() == Some("22012"),
            format!("the next client is not in a clean session: {err:?}"),
        )?;
        Ok::<_, Failed>(())
    })?;
    let busy = rolegate.metric("rolegate_pool_servers_closed_total", "reason=\"busy\"");
    check(busy >= 3.0, format!("servers closed as busy: {busy}"))
}
