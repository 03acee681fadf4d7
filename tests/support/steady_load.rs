//! A steady load through a rolegate's rw and ro ports, as during a reload
//! or a restart: clients that open a new connection for every write or
//! read, one long session that writes all along, and (for restarts) many
//! short connections that only ask for TLS and read rolegate's answer, the
//! cheapest exchange a client can have with rolegate, so that new
//! connections arrive far faster than SCRAM logins allow. Every failure is
//! counted with its message; every acknowledged row is kept, to be looked
//! for afterwards.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::writer::TABLE;
use super::{connect, conninfo};

/// One new connection per this much time and client (at most: a client
/// that takes longer to connect and write goes on at once).
const CADENCE: Duration = Duration::from_millis(10);
/// Connections a load makes before it stops, so that a check of its
/// numbers has something to count.
pub const ENOUGH_CONNECTIONS: u32 = 30;
/// Row numbers of each client start this far apart.
const SEQ_SPAN: i64 = 10_000_000;

#[derive(Debug, Default)]
pub struct LoadStats {
    /// New connections that opened (rw and ro).
    pub connections: u32,
    /// Connection attempts that failed, and the first messages.
    pub refused: u32,
    /// Writes or reads that failed on an open connection.
    pub failed: u32,
    pub errors: Vec<String>,
    pub acknowledged: Vec<i64>,
    /// Writes of the long session, and how it ended if it failed.
    pub long_session_writes: u32,
    pub long_session_error: Option<String>,
}

impl LoadStats {
    fn note(&mut self, what: String) {
        if self.errors.len() < 10 {
            self.errors.push(what);
        }
    }
}

pub struct SteadyLoad {
    stop: watch::Sender<bool>,
    close_long_session: watch::Sender<bool>,
    stats: Arc<Mutex<LoadStats>>,
    tasks: Vec<JoinHandle<()>>,
}

impl SteadyLoad {
    /// Starts the load on `rw` and `ro`: `writers` clients that connect for
    /// each write, one that connects for each read, `askers` that connect
    /// to ask for TLS, and the long session. Rows are numbered from
    /// `seq_base`. The probe table must exist.
    pub fn start(rw: u16, ro: u16, writers: i64, askers: usize, seq_base: i64) -> Self {
        let (stop, stopped) = watch::channel(false);
        let (close_long_session, long_closed) = watch::channel(false);
        let stats = Arc::new(Mutex::new(LoadStats::default()));
        let mut tasks = Vec::new();
        for i in 0..writers {
            tasks.push(tokio::spawn(churn(
                conninfo(rw, "app", "app"),
                Some(seq_base + i * SEQ_SPAN),
                Arc::clone(&stats),
                stopped.clone(),
            )));
        }
        tasks.push(tokio::spawn(churn(
            conninfo(ro, "app", "app"),
            None,
            Arc::clone(&stats),
            stopped.clone(),
        )));
        for i in 0..askers {
            let port = if i % 2 == 0 { rw } else { ro };
            tasks.push(tokio::spawn(ask_for_tls(
                port,
                Arc::clone(&stats),
                stopped.clone(),
            )));
        }
        tasks.push(tokio::spawn(long_session(
            conninfo(rw, "app", "app"),
            seq_base + writers * SEQ_SPAN,
            Arc::clone(&stats),
            long_closed,
        )));
        Self {
            stop,
            close_long_session,
            stats,
            tasks,
        }
    }

    /// Ends the long session from the client side (an application
    /// recycling its pooled connection).
    pub fn close_long_session(&self) {
        let _ = self.close_long_session.send(true);
    }

    /// Stops every client and returns what they saw.
    /// Stops the load once it has made at least [`ENOUGH_CONNECTIONS`]
    /// (waiting up to 30 s for them: the test's own SCRAM, unoptimized,
    /// makes connections slow on a busy machine), and returns its stats.
    pub async fn stop(self) -> LoadStats {
        for _ in 0..300 {
            if self.stats.lock().expect("stats").connections >= ENOUGH_CONNECTIONS {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let _ = self.stop.send(true);
        let _ = self.close_long_session.send(true);
        for task in self.tasks {
            let _ = tokio::time::timeout(Duration::from_secs(30), task).await;
        }
        let mut stats = self.stats.lock().expect("stats");
        std::mem::take(&mut *stats)
    }
}

/// Until `stop`: connect, write a row (`seq` given) or read, disconnect.
async fn churn(
    conninfo: String,
    mut seq: Option<i64>,
    stats: Arc<Mutex<LoadStats>>,
    mut stop: watch::Receiver<bool>,
) {
    let mut ticker = tokio::time::interval(CADENCE);
    while !*stop.borrow() {
        tokio::select! {
            _ = ticker.tick() => {}
            changed = stop.changed() => match changed {
                Ok(()) => continue,
                Err(_) => break,
            },
        }
        let client = match connect(&conninfo).await {
            Ok(client) => client,
            Err(e) => {
                let mut stats = stats.lock().expect("stats");
                stats.refused += 1;
                stats.note(format!("connect: {e:?}"));
                continue;
            }
        };
        let done = match seq.as_mut() {
            Some(seq) => {
                *seq += 1;
                client
                    .execute(&format!("insert into {TABLE} (seq) values ($1)"), &[&*seq])
                    .await
                    .map(|_| Some(*seq))
            }
            None => client.simple_query("select 1").await.map(|_| None),
        };
        let mut stats = stats.lock().expect("stats");
        stats.connections += 1;
        match done {
            Ok(Some(row)) => stats.acknowledged.push(row),
            Ok(None) => {}
            Err(e) => {
                stats.failed += 1;
                stats.note(format!("query: {e:?}"));
            }
        }
    }
}

/// Until `stop`: connect, send an SSLRequest, read rolegate's one-byte
/// answer, close; again at once.
async fn ask_for_tls(port: u16, stats: Arc<Mutex<LoadStats>>, stop: watch::Receiver<bool>) {
    const SSL_REQUEST: [u8; 8] = [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f];
    while !*stop.borrow() {
        let asked = async {
            let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
            stream.write_all(&SSL_REQUEST).await?;
            let mut answer = [0u8; 1];
            stream.read_exact(&mut answer).await?;
            Ok::<u8, std::io::Error>(answer[0])
        };
        let answer = tokio::time::timeout(Duration::from_secs(10), asked).await;
        let mut stats = stats.lock().expect("stats");
        stats.connections += 1;
        match answer {
            Ok(Ok(b'N' | b'S')) => {}
            Ok(Ok(other)) => {
                stats.failed += 1;
                stats.note(format!("SSLRequest answered {other:?}"));
            }
            Ok(Err(e)) => {
                stats.refused += 1;
                stats.note(format!("SSLRequest: {e}"));
            }
            Err(_) => {
                stats.refused += 1;
                stats.note("SSLRequest: no answer within 10 s".to_owned());
            }
        }
    }
}

/// One session writing every 50 ms until the client closes it; a failure
/// ends it and is recorded.
async fn long_session(
    conninfo: String,
    mut seq: i64,
    stats: Arc<Mutex<LoadStats>>,
    mut close: watch::Receiver<bool>,
) {
    let client = match connect(&conninfo).await {
        Ok(client) => client,
        Err(e) => {
            stats.lock().expect("stats").long_session_error = Some(format!("connect: {e:?}"));
            return;
        }
    };
    let mut ticker = tokio::time::interval(Duration::from_millis(50));
    while !*close.borrow() {
        tokio::select! {
            _ = ticker.tick() => {}
            changed = close.changed() => match changed {
                Ok(()) => continue,
                Err(_) => break,
            },
        }
        seq += 1;
        let written = client
            .execute(&format!("insert into {TABLE} (seq) values ($1)"), &[&seq])
            .await;
        let mut stats = stats.lock().expect("stats");
        match written {
            Ok(_) => {
                stats.long_session_writes += 1;
                stats.acknowledged.push(seq);
            }
            Err(e) => {
                stats.long_session_error = Some(format!("{e:?}"));
                return;
            }
        }
    }
}
