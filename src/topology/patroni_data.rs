//! What Patroni writes and answers, parsed leniently.
//!
//! Patroni publishes each member as JSON under `<namespace><scope>/members/
//! <name>` in etcd, the cluster's dynamic configuration under `config`, and
//! answers REST checks with a JSON status body. Field sets differ between
//! Patroni versions (3.0 writes `role: "master"`, later versions
//! `"primary"`; `replication_state` appeared after 3.0), so every field is
//! optional and unknown fields are ignored. Parsing never panics on peer
//! input: malformed JSON is an error value the caller logs.
//!
//! Reference: Patroni's docs, "REST API" and "Dynamic Configuration
//! Settings"; samples in `tests/fixtures/patroni-3.0/`.

use std::collections::BTreeMap;
use std::time::SystemTime;

use serde::Deserialize;

/// The value of `members/<name>` in etcd.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct MemberRecord {
    #[serde(default)]
    pub conn_url: Option<String>,
    #[serde(default)]
    pub api_url: Option<String>,
    #[serde(default)]
    pub state: Option<String>,
    #[serde(default)]
    pub role: Option<String>,
    #[serde(default)]
    pub xlog_location: Option<u64>,
    #[serde(default)]
    pub timeline: Option<u64>,
    #[serde(default)]
    pub replication_state: Option<String>,
    /// The Patroni version that wrote the record (`"4.1.5"`).
    #[serde(default)]
    pub version: Option<String>,
    /// Set by rolegate, never by Patroni: the record's lease expired while
    /// `failsafe_mode` was on and the member is listed in the `failsafe`
    /// key, so it is kept (Patroni may keep running without etcd) and only
    /// REST checks say what it is now.
    #[serde(skip)]
    pub kept_by_failsafe: bool,
    #[serde(default)]
    pub tags: BTreeMap<String, serde_json::Value>,
}

/// The first Patroni version that reports `replication_state`: from it
/// on, a replica record without the field is not streaming.
const REPLICATION_STATE_SINCE: (u32, u32, u32) = (3, 0, 4);

impl MemberRecord {
    pub fn parse(json: &[u8]) -> Result<Self, String> {
        serde_json::from_slice(json).map_err(|e| format!("malformed member JSON: {e}"))
    }

    /// Patroni says PostgreSQL is up.
    pub fn is_running(&self) -> bool {
        is_running_state(self.state.as_deref())
    }

    /// Patroni reports this member as the primary.
    pub fn is_primary_role(&self) -> bool {
        is_primary_role(self.role.as_deref())
    }

    /// A standby that may serve reads: a replica, a synchronous or quorum
    /// standby, or the leader of a standby cluster (which replicates from
    /// elsewhere and takes no writes).
    pub fn is_replica_role(&self) -> bool {
        matches!(
            self.role.as_deref(),
            Some("replica" | "sync_standby" | "quorum_standby" | "standby_leader")
        )
    }

    /// A synchronous or quorum standby, as `/cluster` names them.
    pub fn is_synchronous_role(&self) -> bool {
        matches!(
            self.role.as_deref(),
            Some("sync_standby" | "quorum_standby")
        )
    }

    /// The leader of a standby cluster (`standby_cluster` in Patroni's
    /// configuration): it holds the leader key, but no member of the
    /// cluster takes writes.
    pub fn is_standby_leader(&self) -> bool {
        self.role.as_deref() == Some("standby_leader")
    }

    /// Whether the member streams WAL from its upstream. Patroni reports
    /// `replication_state` from 3.0.4 on, and from then on a record without
    /// it describes a replica that does not stream (and has no
    /// `restore_command`); records of older versions never carry it, and
    /// count as streaming.
    pub fn is_streaming(&self) -> bool {
        match self.replication_state.as_deref() {
            Some(state) => state == "streaming",
            None => self
                .patroni_version()
                .is_none_or(|v| v < REPLICATION_STATE_SINCE),
        }
    }

    /// `version` as numbers; `None` when absent or not `X.Y.Z`.
    fn patroni_version(&self) -> Option<(u32, u32, u32)> {
        let mut parts = self.version.as_deref()?.split('.');
        let mut next = || -> Option<u32> {
            let part = parts.next()?;
            let digits: String = part.chars().take_while(char::is_ascii_digit).collect();
            digits.parse().ok()
        };
        Some((next()?, next()?, next().unwrap_or(0)))
    }

    /// A boolean tag, accepting Patroni's `true` and `"true"` spellings.
    pub fn tag(&self, name: &str) -> bool {
        match self.tags.get(name) {
            Some(serde_json::Value::Bool(b)) => *b,
            Some(serde_json::Value::String(s)) => s.eq_ignore_ascii_case("true"),
            _ => false,
        }
    }

    /// Host and port of PostgreSQL, from `conn_url`
    /// (`postgres://host:port/db`). The member name is never used for this.
    pub fn postgres_address(&self) -> Option<(String, u16)> {
        let url = url::Url::parse(self.conn_url.as_deref()?).ok()?;
        let host = url.host_str()?;
        let host = host
            .strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .unwrap_or(host);
        Some((host.to_owned(), url.port().unwrap_or(5432)))
    }
}

/// The parts of Patroni's dynamic `config` key that change rolegate's
/// behaviour. Patroni accepts numbers written as strings and booleans
/// written as `"on"`, `"true"`, `"yes"`, `"1"` (and their opposites), so
/// these do too; a value of another shape is ignored, not fatal.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct DynamicConfig {
    #[serde(default, deserialize_with = "lenient::number")]
    pub ttl: Option<u64>,
    #[serde(default, deserialize_with = "lenient::boolean")]
    pub failsafe_mode: Option<bool>,
}

/// Patroni's lenient reading of configuration values.
mod lenient {
    use serde::{Deserialize, Deserializer};
    use serde_json::Value;

    pub fn number<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
        Ok(match Value::deserialize(d)? {
            Value::Number(n) => n.as_u64(),
            Value::String(s) => s.trim().parse().ok(),
            _ => None,
        })
    }

    pub fn boolean<'de, D: Deserializer<'de>>(d: D) -> Result<Option<bool>, D::Error> {
        Ok(match Value::deserialize(d)? {
            Value::Bool(b) => Some(b),
            Value::Number(n) => n.as_u64().map(|n| n != 0),
            Value::String(s) => match s.trim().to_ascii_lowercase().as_str() {
                "on" | "true" | "yes" | "1" => Some(true),
                "off" | "false" | "no" | "0" => Some(false),
                _ => None,
            },
            _ => None,
        })
    }
}

impl DynamicConfig {
    pub fn parse(json: &[u8]) -> Result<Self, String> {
        serde_json::from_slice(json).map_err(|e| format!("malformed config JSON: {e}"))
    }

    /// Patroni's default leader-key TTL is 30 s.
    pub fn ttl_secs(&self) -> u64 {
        self.ttl.unwrap_or(30)
    }
}

/// The value of the `sync` key, which Patroni keeps with
/// `synchronous_mode`: the leader it applies to, the synchronous standbys
/// (comma-separated), and in quorum mode (Patroni 4.0+,
/// `synchronous_mode: quorum`) how many of them must confirm a commit.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct SyncKey {
    #[serde(default)]
    pub leader: Option<String>,
    #[serde(default)]
    pub sync_standby: Option<String>,
    #[serde(default, deserialize_with = "lenient::number")]
    pub quorum: Option<u64>,
}

impl SyncKey {
    /// Parses the key's value; `{}`, `null` and malformed values mean no
    /// synchronous standby.
    pub fn parse(json: &[u8]) -> Option<Self> {
        serde_json::from_slice(json).ok()
    }

    /// The synchronous (or quorum) standbys of `leader`; none when the key
    /// belongs to another leader (it lags a leader change by a loop).
    pub fn standbys_of(&self, leader: &str) -> Vec<&str> {
        if self.leader.as_deref() != Some(leader) {
            return Vec::new();
        }
        self.sync_standby
            .as_deref()
            .unwrap_or("")
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .collect()
    }
}

/// The value of the `failover` key: a requested switchover (with `leader`)
/// or failover, possibly to a named candidate (`member`), possibly at a
/// later time (`scheduled_at`). Patroni deletes or empties it when done.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct FailoverIntent {
    #[serde(default)]
    pub leader: Option<String>,
    #[serde(default, alias = "candidate")]
    pub member: Option<String>,
    #[serde(default)]
    pub scheduled_at: Option<String>,
}

impl FailoverIntent {
    /// Parses the key's value; `{}`, `null` and malformed values mean no
    /// request.
    pub fn parse(json: &[u8]) -> Option<Self> {
        let intent: Self = serde_json::from_slice(json).ok()?;
        (intent.leader.is_some() || intent.member.is_some()).then_some(intent)
    }

    /// When a scheduled request is due: `scheduled_at` is an ISO 8601
    /// time with an offset (Patroni refuses one without). `None` for an
    /// immediate request, and for a time that does not parse, which
    /// Patroni would not act on either.
    pub fn scheduled_for(&self) -> Option<Result<SystemTime, ()>> {
        let at = self.scheduled_at.as_deref()?;
        Some(
            time::OffsetDateTime::parse(
                at,
                &time::format_description::well_known::Iso8601::DEFAULT,
            )
            .map(SystemTime::from)
            .map_err(|_| ()),
        )
    }

    /// Whether Patroni carries the request out at `now`: at once, or from
    /// its scheduled time on (at its first HA loop after that time).
    pub fn is_due(&self, now: SystemTime) -> bool {
        match self.scheduled_for() {
            None => true,
            Some(Ok(at)) => at <= now,
            Some(Err(())) => false,
        }
    }

    /// A switchover or failover to `member` that Patroni carries out now;
    /// it stays requested while the leader key is empty between the old
    /// leader's release and the candidate's promotion.
    pub fn is_due_to(&self, member: &str, now: SystemTime) -> bool {
        self.member.as_deref() == Some(member) && self.is_due(now)
    }

    /// A planned change away from `leader`, the healthy key holder, that
    /// Patroni carries out now: a switchover (`leader` names it), or a
    /// failover to a named candidate requested while it leads
    /// (`patronictl failover --candidate`, `POST /failover`: `member`
    /// only), which Patroni 4 carries out the same way, the leader
    /// demoting itself gracefully.
    pub fn is_due_switchover_from(&self, leader: &str, now: SystemTime) -> bool {
        let away = match (self.leader.as_deref(), self.member.as_deref()) {
            (Some(named), _) => named == leader,
            (None, Some(candidate)) => candidate != leader,
            (None, None) => false,
        };
        away && self.is_due(now)
    }
}

/// The body of a REST health check (`/primary`, `/replica`, `/patroni`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct RestStatus {
    #[serde(default)]
    pub state: Option<String>,
    #[serde(default)]
    pub role: Option<String>,
    #[serde(default)]
    pub timeline: Option<u64>,
    #[serde(default)]
    pub replication_state: Option<String>,
    /// Set while Patroni keeps its primary running under `failsafe_mode`
    /// without etcd (every member confirmed it over REST).
    #[serde(default)]
    pub failsafe_mode_is_active: Option<bool>,
}

impl RestStatus {
    pub fn parse(json: &[u8]) -> Result<Self, String> {
        serde_json::from_slice(json).map_err(|e| format!("malformed REST status: {e}"))
    }

    /// PostgreSQL is running and out of recovery. Patroni derives this
    /// role from `pg_is_in_recovery()` when it answers, so it is live,
    /// while the member record in etcd says "master" only from Patroni's
    /// next loop after a promotion.
    pub fn is_running_primary(&self) -> bool {
        is_running_state(self.state.as_deref()) && is_primary_role(self.role.as_deref())
    }

    /// A running primary that Patroni keeps under active failsafe.
    pub fn is_failsafe_primary(&self) -> bool {
        self.is_running_primary() && self.failsafe_mode_is_active == Some(true)
    }

    /// A running standby leader: Patroni answers its `/replica` with 503
    /// (it holds its cluster's leader key) but it serves reads, as its
    /// `/read-only` says.
    pub fn is_running_standby_leader(&self) -> bool {
        is_running_state(self.state.as_deref()) && self.role.as_deref() == Some("standby_leader")
    }
}

/// Patroni's word for PostgreSQL being up, in records and REST answers.
fn is_running_state(state: Option<&str>) -> bool {
    state == Some("running")
}

/// Patroni's words for the primary: 3.0 says "master", later versions
/// "primary"; records and REST answers use the same ones.
fn is_primary_role(role: Option<&str>) -> bool {
    matches!(role, Some("master" | "primary"))
}

/// One member in Patroni's `GET /cluster` answer.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct ClusterListingMember {
    pub name: String,
    #[serde(default)]
    pub role: Option<String>,
    #[serde(default)]
    pub state: Option<String>,
    #[serde(default)]
    pub api_url: Option<String>,
    #[serde(default)]
    pub host: Option<String>,
    #[serde(default)]
    pub port: Option<u16>,
    #[serde(default)]
    pub timeline: Option<u64>,
    #[serde(default)]
    pub tags: BTreeMap<String, serde_json::Value>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct ClusterListing {
    pub members: Vec<ClusterListingMember>,
}

impl ClusterListing {
    pub fn parse(json: &[u8]) -> Result<Self, String> {
        serde_json::from_slice(json).map_err(|e| format!("malformed /cluster answer: {e}"))
    }
}

impl ClusterListingMember {
    /// The same member as etcd would describe it, so both discovery paths
    /// feed one fuser. `/cluster` calls the leader "leader" (or
    /// "standby_leader"); its role in etcd terms comes from REST checks.
    /// From Patroni 3.0.4 on, a replica's `state` there is its replication
    /// state (`streaming`, `in archive recovery`): PostgreSQL is running.
    pub fn to_record(&self) -> MemberRecord {
        let role = match self.role.as_deref() {
            Some("leader") => Some("master".to_owned()),
            other => other.map(str::to_owned),
        };
        let (state, replication_state) = match self.state.as_deref() {
            Some(replication @ ("streaming" | "in archive recovery")) => {
                (Some("running".to_owned()), Some(replication.to_owned()))
            }
            other => (other.map(str::to_owned), None),
        };
        MemberRecord {
            conn_url: self.host.as_ref().map(|h| {
                let host = if h.contains(':') {
                    format!("[{h}]")
                } else {
                    h.clone()
                };
                format!("postgres://{host}:{}/postgres", self.port.unwrap_or(5432))
            }),
            api_url: self.api_url.clone(),
            state,
            role,
            xlog_location: None,
            timeline: self.timeline,
            replication_state,
            version: None,
            kept_by_failsafe: false,
            tags: self.tags.clone(),
        }
    }
}

/// Splits a captured HTTP answer (`HTTP/1.0 200 OK`, headers, blank line,
/// body) into status and body; for fixture-based tests.
#[cfg(test)]
pub(crate) fn split_http_capture(text: &str) -> (u16, &str) {
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .or_else(|| text.split_once("\n\n"));
    (status, body.map(|(_, b)| b.trim()).unwrap_or(""))
}

/// A file captured from Patroni 3.0.2 (`tests/fixtures/patroni-3.0/`).
#[cfg(test)]
pub(crate) fn fixture(name: &str) -> String {
    fixture_of("3.0", name)
}

/// A file captured by `scripts/capture-fixtures` from the lab of one
/// Patroni version (`"3.0"`: Debian's 3.0.2; `"4.1"`: 4.1.5).
#[cfg(test)]
pub(crate) fn fixture_of(version: &str, name: &str) -> String {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join(format!("tests/fixtures/patroni-{version}"))
        .join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("fixture {}: {e}", path.display()))
}

/// The cluster state captured in `etcd-get-prefix.txt` (key line, value
/// line), as the DCS mirror reads it.
#[cfg(test)]
pub(crate) fn fixture_dcs_state() -> super::dcs::DcsState {
    fixture_dcs_state_of("3.0")
}

#[cfg(test)]
pub(crate) fn fixture_dcs_state_of(version: &str) -> super::dcs::DcsState {
    let text = fixture_of(version, "etcd-get-prefix.txt");
    let lines: Vec<_> = text.lines().collect();
    super::dcs::DcsState::from_keys(
        "/service/demo/",
        lines
            .chunks(2)
            .filter(|c| c.len() == 2)
            .map(|c| (c[0].as_bytes(), c[1].as_bytes())),
    )
}

#[cfg(test)]
mod tests;
