//! Scenarios more than one suite runs.

use std::time::Duration;

use libtest_mimic::Failed;

use super::harness::check;
use super::sqlstate;

/// Runs `select pg_sleep(30)` on `client` and cancels it half a second in,
/// on a connection of its own, as drivers do: the query must end with
/// 57014 (query_canceled), long before its 30 s.
pub async fn cancelled(client: &tokio_postgres::Client, what: &str) -> Result<(), Failed> {
    let token = client.cancel_token();
    let query = tokio::time::timeout(
        Duration::from_secs(15),
        client.simple_query("select pg_sleep(30)"),
    );
    let cancel = async {
        tokio::time::sleep(Duration::from_millis(500)).await;
        token.cancel_query(tokio_postgres::NoTls).await
    };
    let (ended, sent) = tokio::join!(query, cancel);
    sent.map_err(|e| format!("{what}: sending the cancel: {e}"))?;
    let ended = ended.map_err(|_| format!("{what}: not cancelled within 15 s"))?;
    check(
        matches!(&ended, Err(e) if sqlstate(e).as_deref() == Some("57014")),
        format!("{what}: the query ended with {ended:?}"),
    )
}
