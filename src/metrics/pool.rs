//! The metrics of pooled listeners' pools, one series per pool
//! (listener, member, database, role): what operators read in
//! PgBouncer's `SHOW POOLS` and `SHOW STATS`, in Prometheus' words.

use metrics::{counter, describe_counter, describe_gauge, gauge, Counter, Gauge};

pub const POOL_SERVERS: &str = "rolegate_pool_servers";
pub const POOL_WAITING_CLIENTS: &str = "rolegate_pool_waiting_clients";
pub const POOL_LENDS_TOTAL: &str = "rolegate_pool_lends_total";
pub const POOL_WAIT_TIMEOUTS_TOTAL: &str = "rolegate_pool_wait_timeouts_total";
pub const POOL_SERVERS_CLOSED_TOTAL: &str = "rolegate_pool_servers_closed_total";
pub const POOL_PINS_TOTAL: &str = "rolegate_pool_pins_total";

pub(super) fn describe() {
    describe_gauge!(
        POOL_SERVERS,
        "Server connections of a pool, by state: idle (in the pool) or lent (to a client, or being opened for one)."
    );
    describe_gauge!(
        POOL_WAITING_CLIENTS,
        "Clients waiting for a server of a full pool."
    );
    describe_counter!(
        POOL_LENDS_TOTAL,
        "Servers lent to clients, by server: idle (no PostgreSQL login) or new."
    );
    describe_counter!(
        POOL_WAIT_TIMEOUTS_TOTAL,
        "Clients refused (53300) because the pool stayed full for query_wait_timeout."
    );
    describe_counter!(
        POOL_SERVERS_CLOSED_TOTAL,
        "Servers closed instead of lent again, by reason: busy (the client left mid-request or inside a transaction), reset (the reset query failed), stale (closed by the member or idle too long), demotion (the member left the pool's role), cancelled (a cancel was sent to it during the transaction)."
    );
    describe_counter!(
        POOL_PINS_TOTAL,
        "Transaction-pooled clients pinned to their server for the rest of their session, by cause (set, listen, prepare, with_hold_cursor, temp_table, load, advisory_lock, unread, discard, unsure)."
    );
}

/// Why a pooled server was closed rather than lent again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Closed {
    Busy,
    Reset,
    Stale,
    Demotion,
    Cancelled,
}

impl Closed {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Busy => "busy",
            Self::Reset => "reset",
            Self::Stale => "stale",
            Self::Demotion => "demotion",
            Self::Cancelled => "cancelled",
        }
    }
}

/// One pool's series.
pub struct PoolMetrics {
    idle: Gauge,
    lent: Gauge,
    waiting: Gauge,
    lent_idle: Counter,
    lent_new: Counter,
    wait_timeouts: Counter,
    labels: [(&'static str, String); 4],
}

impl PoolMetrics {
    pub fn new(listener: String, member: String, database: String, user: String) -> Self {
        let labels = [
            ("listener", listener),
            ("member", member),
            ("database", database),
            ("user", user),
        ];
        let with = |extra: (&'static str, &'static str)| {
            let mut all: Vec<(&'static str, String)> = labels.to_vec();
            all.push((extra.0, extra.1.to_owned()));
            all
        };
        Self {
            idle: gauge!(POOL_SERVERS, &with(("state", "idle"))),
            lent: gauge!(POOL_SERVERS, &with(("state", "lent"))),
            waiting: gauge!(POOL_WAITING_CLIENTS, &labels),
            lent_idle: counter!(POOL_LENDS_TOTAL, &with(("server", "idle"))),
            lent_new: counter!(POOL_LENDS_TOTAL, &with(("server", "new"))),
            wait_timeouts: counter!(POOL_WAIT_TIMEOUTS_TOTAL, &labels),
            labels,
        }
    }

    /// The pool now holds `open` servers, `idle` of them idle.
    pub fn servers(&self, open: usize, idle: usize) {
        self.idle.set(idle as f64);
        self.lent.set(open.saturating_sub(idle) as f64);
    }

    pub fn waiting(&self, delta: f64) {
        self.waiting.increment(delta);
    }

    pub fn lent(&self, new: bool) {
        if new {
            self.lent_new.increment(1);
        } else {
            self.lent_idle.increment(1);
        }
    }

    pub fn wait_timed_out(&self) {
        self.wait_timeouts.increment(1);
    }

    pub fn closed(&self, why: Closed) {
        let mut labels: Vec<(&'static str, String)> = self.labels.to_vec();
        labels.push(("reason", why.as_str().to_owned()));
        counter!(POOL_SERVERS_CLOSED_TOTAL, &labels).increment(1);
    }

    /// A client was pinned to its server; `cause` is the pin's label.
    pub fn pinned(&self, cause: &'static str) {
        let mut labels: Vec<(&'static str, String)> = self.labels.to_vec();
        labels.push(("cause", cause.to_owned()));
        counter!(POOL_PINS_TOTAL, &labels).increment(1);
    }
}
