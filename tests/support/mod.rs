//! Shared harness for the integration tests: real PostgreSQL servers, a
//! real rolegate process, real clients, all on loopback.
//!
//! Every process started here is stopped by its PID when its handle drops;
//! every wait is bounded in time.

#![allow(dead_code)]

pub mod balancer;
pub mod browser;
pub mod certs;
pub mod churn;
pub mod docker_lab;
pub mod etcd_cluster;
pub mod forwarder;
pub mod harness;
pub mod lab;
pub mod lab_suite;
pub mod leader_key;
pub mod pg;
pub mod pooled;
pub mod process;
pub mod procinfo;
pub mod rolegate;
pub mod routes;
pub mod scenarios;
pub mod secure_etcd;
pub mod static_cluster;
pub mod status_refusal;
pub mod steady_load;
pub mod wire;
pub mod writer;

use std::net::TcpListener;
use std::time::{Duration, Instant};

/// A loopback port that was free a moment ago, for a server the test
/// starts next.
///
/// Drawn below the kernel's ephemeral range: a port the kernel picks (port
/// 0) is one it may also give any outgoing connection, from this test or
/// the other lane, before the server binds it, and the server then fails
/// with "address already in use". Ports outside that range are taken only
/// by those who ask for them by number; each is handed out once per
/// process and checked free by binding it.
pub fn free_port() -> u16 {
    use std::collections::BTreeSet;
    use std::hash::{BuildHasher, RandomState};
    use std::sync::Mutex;

    static GIVEN: Mutex<BTreeSet<u16>> = Mutex::new(BTreeSet::new());
    const LOWEST: u16 = 20_000;
    let ephemeral_low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|range| range.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32_768);
    if ephemeral_low > LOWEST + 1_000 {
        let span = u64::from(ephemeral_low - LOWEST);
        let random = RandomState::new();
        let mut given = GIVEN.lock().unwrap_or_else(|p| p.into_inner());
        for attempt in 0..1_000u64 {
            let port = LOWEST + (random.hash_one(attempt) % span) as u16;
            if !given.contains(&port) && TcpListener::bind(("127.0.0.1", port)).is_ok() {
                given.insert(port);
                return port;
            }
        }
    }
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("bind a free port")
}

/// Polls `check` every 50 ms until it returns `Some` (its value) or `limit`
/// passes (`None`).
fn poll_until<T>(limit: Duration, mut check: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(value) = check() {
            return Some(value);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Polls `check` every 50 ms until it returns `Some`; panics naming `what`
/// once `limit` passes.
pub fn wait_until<T>(limit: Duration, what: &str, check: impl FnMut() -> Option<T>) -> T {
    poll_until(limit, check)
        .unwrap_or_else(|| panic!("timed out after {limit:?} waiting for {what}"))
}

/// Whether `check` comes to hold within `limit`, polled every 50 ms: for
/// what a process records after its client already saw the effect (a
/// cancel's counters are bumped once the member has closed the cancel
/// connection, which may be after the cancelled query's error arrived).
pub fn holds_within(limit: Duration, mut check: impl FnMut() -> bool) -> bool {
    poll_until(limit, || check().then_some(())).is_some()
}

/// A single-threaded runtime for one test's async code.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime")
}

/// A libpq-style connection string to `port` on loopback.
pub fn conninfo(port: u16, user: &str, password: &str) -> String {
    format!(
        "host=127.0.0.1 port={port} user={user} password={password} dbname=app connect_timeout=10"
    )
}

/// Connects with tokio-postgres and drives the connection in the
/// background.
pub async fn connect(conninfo: &str) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let (client, connection) = tokio_postgres::connect(conninfo, tokio_postgres::NoTls).await?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(client)
}

/// The SQLSTATE of a tokio-postgres error, if the server sent one.
pub fn sqlstate(e: &tokio_postgres::Error) -> Option<String> {
    e.as_db_error().map(|d| d.code().code().to_owned())
}

/// The server's message of a tokio-postgres error (its Display says only
/// "db error"), or the error itself when the server sent none.
pub fn server_message(e: &tokio_postgres::Error) -> String {
    e.as_db_error()
        .map(|db| db.message().to_owned())
        .unwrap_or_else(|| e.to_string())
}

/// Connects and hands back the connection's own result, which carries an
/// error the server sent while the session was idle (e.g. a FATAL).
pub async fn connect_watched(
    conninfo: &str,
) -> Result<
    (
        tokio_postgres::Client,
        tokio::task::JoinHandle<Result<(), tokio_postgres::Error>>,
    ),
    tokio_postgres::Error,
> {
    let (client, connection) = tokio_postgres::connect(conninfo, tokio_postgres::NoTls).await?;
    Ok((client, tokio::spawn(connection)))
}
