//! Where new sessions through a rolegate port land on the lab: the checks
//! the Patroni and fault tests share.

use std::time::{Duration, Instant};

use libtest_mimic::Failed;

use super::lab::Lab;
use super::{connect, conninfo};

/// The port of the server a new session on `port` reaches, and whether it
/// is in recovery.
pub async fn reached(port: u16) -> Result<(u16, bool), Failed> {
    // tokio-postgres says only "db error"; the server's message is the
    // part worth reading when a test fails.
    let said = |e: tokio_postgres::Error| match e.as_db_error() {
        Some(db) => Failed::from(format!(
            "port {port}: {} ({})",
            db.message(),
            db.code().code()
        )),
        None => Failed::from(format!("port {port}: {e}")),
    };
    let client = connect(&conninfo(port, "app", "app")).await.map_err(said)?;
    let row = client
        .query_one("select inet_server_port(), pg_is_in_recovery()", &[])
        .await
        .map_err(said)?;
    Ok((row.get::<_, i32>(0) as u16, row.get(1)))
}

/// Polls until a new rw session reaches a member that is not in recovery
/// and is not `not`; returns that member.
pub async fn wait_for_writable_leader(
    lab: &Lab,
    rw: u16,
    not: Option<&str>,
    limit: Duration,
) -> Result<String, Failed> {
    let started = Instant::now();
    loop {
        if let Ok((port, false)) = reached(rw).await {
            if let Some(member) = lab.member_of_port(port) {
                if Some(member) != not {
                    return Ok(member.to_owned());
                }
            }
        }
        if started.elapsed() > limit {
            return Err(format!("no writable leader other than {not:?} within {limit:?}").into());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Waits until the ro port spreads sessions over exactly `expected`.
pub async fn wait_for_readers(
    lab: &Lab,
    ro: u16,
    expected: &[&str],
    limit: Duration,
) -> Result<(), Failed> {
    let started = Instant::now();
    let mut want: Vec<_> = expected.to_vec();
    want.sort();
    loop {
        let mut seen = Vec::new();
        for _ in 0..(2 * expected.len()).max(2) {
            if let Ok((port, true)) = reached(ro).await {
                seen.extend(lab.member_of_port(port));
            }
        }
        seen.sort();
        seen.dedup();
        if seen == want {
            return Ok(());
        }
        if started.elapsed() > limit {
            return Err(format!("ro sessions reached {seen:?}, expected {want:?}").into());
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}
