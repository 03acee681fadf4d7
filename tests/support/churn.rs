//! A client that opens a new session for every query through a rolegate
//! port and checks, inside each session, which role the server has: the
//! connection churn of short-lived clients, and a role check per session.

use std::time::Duration;

use tokio::sync::watch;

use super::connect;

#[derive(Debug, Default, Clone, Copy)]
pub struct ChurnStats {
    /// Sessions whose server had the expected role.
    pub sessions: u32,
    /// Sessions whose server had the other role.
    pub wrong_role: u32,
    /// Sessions that failed to open or to answer.
    pub failed: u32,
}

/// Until `stop` turns true, every `pause`: connect, ask
/// `pg_is_in_recovery()`, compare with `expect_recovery`, disconnect.
pub async fn run(
    conninfo: String,
    expect_recovery: bool,
    pause: Duration,
    mut stop: watch::Receiver<bool>,
) -> ChurnStats {
    let mut stats = ChurnStats::default();
    loop {
        match connect(&conninfo).await {
            Ok(client) => match client.query_one("select pg_is_in_recovery()", &[]).await {
                Ok(row) if row.get::<_, bool>(0) == expect_recovery => stats.sessions += 1,
                Ok(_) => stats.wrong_role += 1,
                Err(_) => stats.failed += 1,
            },
            Err(_) => stats.failed += 1,
        }
        tokio::select! {
            _ = tokio::time::sleep(pause) => {}
            _ = stop.changed() => {}
        }
        if *stop.borrow() {
            return stats;
        }
    }
}
