//! A client that writes a row every 20 ms through a rolegate rw port,
//! reconnecting (1 s connect timeout) whenever its session fails: what an
//! application sees during a failover.
//!
//! It records every acknowledged row, the longest gap between two
//! acknowledged writes (the write-unavailability window), failed connection
//! attempts, and misroutes: sessions that landed on a server in recovery,
//! or writes refused as read-only.

use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, Instant};

use tokio::sync::watch;

use super::connect;

pub const TABLE: &str = "failover_probe";
const CADENCE: Duration = Duration::from_millis(20);

/// One acknowledged write: its row, when the ack arrived, and the port and
/// address of the server that acknowledged it (the lab's members differ by
/// port, the container cluster's by address).
#[derive(Debug, Clone, Copy)]
pub struct Ack {
    pub seq: i64,
    pub at: Instant,
    pub port: u16,
    pub addr: IpAddr,
}

#[derive(Debug, Default)]
pub struct WriterStats {
    pub acknowledged: Vec<Ack>,
    pub failed_connects: u32,
    pub failed_writes: u32,
    pub misrouted: u32,
    /// The first failed write's error, for diagnosis.
    pub first_write_error: Option<String>,
    pub longest_gap: Duration,
    /// When the longest gap ended.
    pub longest_gap_end: Option<Instant>,
}

impl WriterStats {
    pub fn seqs(&self) -> Vec<i64> {
        self.acknowledged.iter().map(|a| a.seq).collect()
    }
}

/// Creates the probe table through `conninfo`, empty.
pub async fn prepare(conninfo: &str) -> Result<(), tokio_postgres::Error> {
    let client = connect(conninfo).await?;
    client
        .batch_execute(&format!(
            "create table if not exists {TABLE} (seq bigint primary key, at timestamptz default now()); \
             truncate {TABLE}"
        ))
        .await
}

/// Writes until `stop` turns true; `conninfo` should carry
/// `connect_timeout=1`.
pub async fn run(conninfo: String, seq_base: i64, mut stop: watch::Receiver<bool>) -> WriterStats {
    let mut stats = WriterStats::default();
    let mut client: Option<(tokio_postgres::Client, u16, IpAddr)> = None;
    let mut last_ok: Option<Instant> = None;
    let mut seq = seq_base;
    let mut ticker = tokio::time::interval(CADENCE);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = stop.changed() => {}
        }
        if *stop.borrow() {
            return stats;
        }
        let session = match client.take() {
            Some(session) => session,
            None => match connect(&conninfo).await {
                Ok(session) => match session
                    .query_one(
                        "select pg_is_in_recovery(), inet_server_port(), host(inet_server_addr())",
                        &[],
                    )
                    .await
                {
                    Ok(row) if !row.get::<_, bool>(0) => (
                        session,
                        row.get::<_, i32>(1) as u16,
                        row.get::<_, String>(2)
                            .parse()
                            .unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED)),
                    ),
                    Ok(_) => {
                        stats.misrouted += 1;
                        continue;
                    }
                    Err(_) => {
                        stats.failed_connects += 1;
                        continue;
                    }
                },
                Err(_) => {
                    stats.failed_connects += 1;
                    continue;
                }
            },
        };
        seq += 1;
        match session
            .0
            .execute(&format!("insert into {TABLE} (seq) values ($1)"), &[&seq])
            .await
        {
            Ok(_) => {
                let now = Instant::now();
                if let Some(previous) = last_ok {
                    let gap = now - previous;
                    if gap > stats.longest_gap {
                        stats.longest_gap = gap;
                        stats.longest_gap_end = Some(now);
                    }
                }
                last_ok = Some(now);
                stats.acknowledged.push(Ack {
                    seq,
                    at: now,
                    port: session.1,
                    addr: session.2,
                });
                client = Some(session);
            }
            Err(e) => {
                if e.code().map(|c| c.code()) == Some("25006") {
                    stats.misrouted += 1;
                }
                stats.failed_writes += 1;
                stats
                    .first_write_error
                    .get_or_insert_with(|| format!("{e:?}"));
            }
        }
    }
}

/// How many of `acknowledged` are missing from the table.
pub async fn missing_rows(
    conninfo: &str,
    acknowledged: &[i64],
) -> Result<usize, tokio_postgres::Error> {
    let client = connect(conninfo).await?;
    let row = client
        .query_one(
            &format!("select count(*) from {TABLE} where seq = any($1)"),
            &[&acknowledged],
        )
        .await?;
    let present: i64 = row.get(0);
    Ok(acknowledged.len() - present as usize)
}
