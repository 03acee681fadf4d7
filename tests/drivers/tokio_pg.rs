//! tokio-postgres through rolegate.

use futures_util::{SinkExt, StreamExt};
use tokio_postgres::{AsyncMessage, NoTls, SimpleQueryMessage};

use super::*;

pub(crate) async fn connect(port: u16) -> Result<tokio_postgres::Client, String> {
    support::connect(&conninfo(port, "app", "app"))
        .await
        .map_err(|e| format!("connect: {e}"))
}

pub(crate) fn err(e: tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{} [{}]", db.message(), db.code().code()),
        None => e.to_string(),
    }
}

pub(crate) async fn tokio_scenario(scenario: &str, t: &Target) -> Result<String, String> {
    let flag = recovery_flag(t.writable);
    match scenario {
        "simple_query" => {
            let client = connect(t.port).await?;
            let messages = client
                .simple_query("select 1; select pg_is_in_recovery(), inet_server_port()")
                .await
                .map_err(err)?;
            let rows: Vec<_> = messages
                .iter()
                .filter_map(|m| match m {
                    SimpleQueryMessage::Row(row) => Some(row),
                    _ => None,
                })
                .collect();
            match rows.as_slice() {
                [one, row] if one.get(0) == Some("1") && row.get(0) == Some(flag) => Ok(format!(
                    "server port {} in_recovery={flag}",
                    row.get(1).unwrap_or("?")
                )),
                _ => Err(format!("{} rows, unexpected values", rows.len())),
            }
        }
        "extended_prepared" => {
            let client = connect(t.port).await?;
            let statement = client
                .prepare("select $1::int * 2, $2::text || '!', pg_is_in_recovery()")
                .await
                .map_err(err)?;
            for i in 1..=3i32 {
                let text = format!("v{i}");
                let row = client
                    .query_one(&statement, &[&i, &text])
                    .await
                    .map_err(err)?;
                let (d, s, r): (i32, String, bool) = (row.get(0), row.get(1), row.get(2));
                if d != i * 2 || s != format!("v{i}!") || r == t.writable {
                    return Err(format!("bind {i}: ({d}, {s}, {r})"));
                }
            }
            Ok("3 binds of a named prepared statement".to_owned())
        }
        "transaction_rollback" => {
            let mut client = connect(t.port).await?;
            if t.writable {
                client
                    .batch_execute("create temp table drv_tx (v int)")
                    .await
                    .map_err(err)?;
                let tx = client.transaction().await.map_err(err)?;
                tx.execute("insert into drv_tx select generate_series(1, 3)", &[])
                    .await
                    .map_err(err)?;
                let inside: i64 = tx
                    .query_one("select count(*) from drv_tx", &[])
                    .await
                    .map_err(err)?
                    .get(0);
                tx.rollback().await.map_err(err)?;
                let after: i64 = client
                    .query_one("select count(*) from drv_tx", &[])
                    .await
                    .map_err(err)?
                    .get(0);
                return if (inside, after) == (3, 0) {
                    Ok("3 inserted rows rolled back".to_owned())
                } else {
                    Err(format!("{inside} rows inside, {after} after rollback"))
                };
            }
            let tx = client.transaction().await.map_err(err)?;
            tx.batch_execute("set local statement_timeout = '1234ms'")
                .await
                .map_err(err)?;
            let inside: String = tx
                .query_one("show statement_timeout", &[])
                .await
                .map_err(err)?
                .get(0);
            tx.rollback().await.map_err(err)?;
            let after: String = client
                .query_one("show statement_timeout", &[])
                .await
                .map_err(err)?
                .get(0);
            if inside != "1234ms" || after == "1234ms" {
                return Err(format!("SET LOCAL: {inside} inside, {after} after"));
            }
            let tx = client.transaction().await.map_err(err)?;
            let refused = tx.batch_execute("create temp table drv_tx (v int)").await;
            drop(tx);
            match refused {
                Err(e) if support::sqlstate(&e).as_deref() == Some("25006") => {}
                other => return Err(format!("write on the ro listener: {other:?}")),
            }
            client.simple_query("select 1").await.map_err(err)?;
            Ok("SET LOCAL rolled back; write refused with 25006, session usable".to_owned())
        }
        "copy_10mb" => {
            let data = copy_bytes();
            let client = connect(t.port).await?;
            let source = if t.writable {
                client
                    .batch_execute("create temp table drv_copy (i int, t text)")
                    .await
                    .map_err(err)?;
                let sink = client
                    .copy_in::<_, bytes::Bytes>("copy drv_copy from stdin")
                    .await
                    .map_err(err)?;
                futures_util::pin_mut!(sink);
                for chunk in data.chunks(1 << 16) {
                    sink.send(bytes::Bytes::copy_from_slice(chunk))
                        .await
                        .map_err(err)?;
                }
                let rows = sink.finish().await.map_err(err)?;
                if rows != u64::from(COPY_ROWS) {
                    return Err(format!("COPY FROM reported {rows} rows"));
                }
                "copy (select i, t from drv_copy order by i) to stdout".to_owned()
            } else {
                format!("copy ({COPY_QUERY}) to stdout")
            };
            let stream = client.copy_out(source.as_str()).await.map_err(err)?;
            futures_util::pin_mut!(stream);
            let mut got = Vec::with_capacity(data.len());
            while let Some(chunk) = stream.next().await {
                got.extend_from_slice(&chunk.map_err(err)?);
            }
            if got != data {
                return Err(format!(
                    "COPY TO returned {} bytes, differing from the {} expected",
                    got.len(),
                    data.len()
                ));
            }
            Ok(format!(
                "{} bytes {}, identical",
                data.len(),
                if t.writable { "in and back out" } else { "out" }
            ))
        }
        "listen_notify" => {
            let (listener, mut connection) =
                tokio_postgres::connect(&conninfo(t.port, "app", "app"), NoTls)
                    .await
                    .map_err(|e| format!("connect: {e}"))?;
            let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
            tokio::spawn(async move {
                loop {
                    match std::future::poll_fn(|cx| connection.poll_message(cx)).await {
                        Some(Ok(AsyncMessage::Notification(n))) => {
                            let _ = tx.send(n);
                        }
                        Some(Ok(_)) => {}
                        Some(Err(_)) | None => break,
                    }
                }
            });
            listener
                .batch_execute("listen drv_channel")
                .await
                .map_err(err)?;
            let notifier = connect(t.port).await?;
            let pid: i32 = notifier
                .query_one("select pg_backend_pid()", &[])
                .await
                .map_err(err)?
                .get(0);
            notifier
                .batch_execute("select pg_notify('drv_channel', 'from tokio-postgres')")
                .await
                .map_err(err)?;
            let n = tokio::time::timeout(Duration::from_secs(10), rx.recv())
                .await
                .map_err(|_| "no notification within 10 s".to_owned())?
                .ok_or("the listening connection ended")?;
            if n.channel() == "drv_channel"
                && n.payload() == "from tokio-postgres"
                && n.process_id() == pid
            {
                Ok(format!("notification from pid {pid} received"))
            } else {
                Err(format!("unexpected notification {n:?}"))
            }
        }
        "result_50mb" => {
            let client = connect(t.port).await?;
            let started = Instant::now();
            let rows = client.query(BIG_QUERY, &[]).await.map_err(err)?;
            let bytes: usize = rows.iter().map(|r| r.get::<_, &str>(1).len()).sum();
            if rows.len() == BIG_ROWS && bytes == BIG_ROWS * BIG_WIDTH {
                Ok(format!(
                    "{} rows, {bytes} bytes of text in {:.2?}",
                    rows.len(),
                    started.elapsed()
                ))
            } else {
                Err(format!("{} rows, {bytes} bytes", rows.len()))
            }
        }
        "cancel" => {
            let client = connect(t.port).await?;
            let token = client.cancel_token();
            let canceller = tokio::spawn(async move {
                tokio::time::sleep(Duration::from_secs(1)).await;
                token.cancel_query(NoTls).await
            });
            let started = Instant::now();
            let result = tokio::time::timeout(
                Duration::from_secs(20),
                client.simple_query("select pg_sleep(60)"),
            )
            .await;
            let took = started.elapsed();
            let sent = canceller.await.map_err(|e| e.to_string())?;
            sent.map_err(|e| format!("cancel_query: {e}"))?;
            match result {
                Ok(Err(e)) if support::sqlstate(&e).as_deref() == Some("57014") => {}
                Ok(other) => return Err(format!("pg_sleep(60) ended with {other:?}")),
                Err(_) => return Err("pg_sleep(60) not cancelled within 20 s".to_owned()),
            }
            client.simple_query("select 1").await.map_err(err)?;
            Ok(format!(
                "cancelled after {took:.2?} (57014), session still usable"
            ))
        }
        other => Err(format!("unknown scenario {other}")),
    }
}

pub(crate) fn tokio_switchover(env: &Env) -> Result<Vec<Check>, String> {
    let rt = runtime();
    let (client, connection) = rt.block_on(async {
        let (client, connection) = support::connect_watched(&conninfo(env.rw, "app", "app"))
            .await
            .map_err(err)?;
        client.simple_query("select 1").await.map_err(err)?;
        Ok::<_, String>((client, connection))
    })?;
    // The runtime is idle meanwhile: whatever rolegate sends waits in the
    // socket until the connection task runs again.
    let (_old, _new, port) = switchover(env)?;
    let old_session = rt.block_on(async {
        let ended = tokio::time::timeout(Duration::from_secs(10), connection).await;
        let after = client.simple_query("select 1").await;
        match (ended, after) {
            (Ok(Ok(Err(e))), Err(_)) => Ok(format!("connection ended: {}", err(e))),
            (ended, after) => Err(format!(
                "the old session was not ended with an error: connection {ended:?}, query {after:?}"
            )),
        }
    });
    let rw = env.rw;
    let reconnect = reconnect_until(port, || {
        rt.block_on(async {
            let client = connect(rw).await?;
            client
                .batch_execute("create temp table drv_after (v int)")
                .await
                .map_err(err)?;
            let row = client
                .query_one("select pg_is_in_recovery(), inet_server_port()", &[])
                .await
                .map_err(err)?;
            if row.get::<_, bool>(0) {
                return Err("in recovery".to_owned());
            }
            Ok(row.get::<_, i32>(1) as u16)
        })
    });
    Ok(vec![
        switchover_check("switchover_old_session", old_session),
        reconnect,
    ])
}
