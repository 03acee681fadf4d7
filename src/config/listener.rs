//! `[[listeners]]`: a client-facing address, the role it serves, and,
//! for a pooled listener, how it pools and where its secrets come from.

use std::fmt;
use std::path::PathBuf;

use serde::Deserialize;

use super::{Duration, TlsMode};

/// `[[listeners]]`: one client-facing address and the role it serves.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerConfig {
    pub listen: String,
    pub cluster: String,
    pub role: ListenerRole,
    /// What a `replica` listener does when no replica is eligible.
    #[serde(default)]
    pub replica_fallback: ReplicaFallback,
    /// Overrides `[tls] mode` for this listener.
    #[serde(default)]
    pub tls: Option<TlsMode>,
    /// Every connection starts with a PROXY protocol header (v1 or v2)
    /// from one of `trusted_proxies`, naming the real client.
    #[serde(default)]
    pub proxy_protocol: bool,
    /// The load balancers allowed to send that header, as CIDRs.
    #[serde(default)]
    pub trusted_proxies: Vec<String>,
    /// Set to pool server connections: rolegate ends the client's login
    /// itself (against `auth_file`) and lends logged-in servers.
    #[serde(default)]
    pub pool_mode: Option<PoolMode>,
    /// The roles and secrets of a pooled listener, in PgBouncer's
    /// `userlist.txt` format.
    #[serde(default)]
    pub auth_file: Option<PathBuf>,
    /// Servers per (member, database, role), idle or lent.
    #[serde(default = "default_pool_size")]
    pub pool_size: usize,
    /// Run on a server before it is lent to the next client.
    #[serde(default = "default_server_reset_query")]
    pub server_reset_query: String,
    /// Statements kept prepared per server in transaction mode; the
    /// least recently used one is closed to make room.
    #[serde(default = "default_max_prepared_statements")]
    pub max_prepared_statements: usize,
    /// An idle server unused this long is closed instead of lent.
    #[serde(default = "default_server_idle_timeout")]
    pub server_idle_timeout: Duration,
    /// How long a client waits for a server of a full pool.
    #[serde(default = "default_query_wait_timeout")]
    pub query_wait_timeout: Duration,
    /// The role that reads other roles' secrets from the cluster.
    #[serde(default)]
    pub auth_user: Option<String>,
    /// A file holding `auth_user`'s password (one line).
    #[serde(default)]
    pub auth_password_file: Option<PathBuf>,
    /// An environment variable holding `auth_user`'s password.
    #[serde(default)]
    pub auth_password_env: Option<String>,
    /// The query `auth_user` runs; `$1` is the role, the secret is the
    /// last column.
    #[serde(default)]
    pub auth_query: Option<String>,
    /// How long a secret read by `auth_query` is used before it is read
    /// again.
    #[serde(default = "default_auth_cache_lifetime")]
    pub auth_cache_lifetime: Duration,
}

/// How a pooled listener lends servers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PoolMode {
    /// A server is the client's from its login until it leaves.
    Session,
    /// A server is the client's for one transaction at a time.
    Transaction,
}

impl PoolMode {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Session => "session",
            Self::Transaction => "transaction",
        }
    }
}

fn default_pool_size() -> usize {
    20
}
fn default_max_prepared_statements() -> usize {
    200
}
fn default_server_reset_query() -> String {
    "DISCARD ALL".to_owned()
}
fn default_server_idle_timeout() -> Duration {
    Duration::from_secs(600)
}
fn default_auth_cache_lifetime() -> Duration {
    Duration::from_secs(60)
}
fn default_query_wait_timeout() -> Duration {
    Duration::from_secs(120)
}

/// The kind of member a listener sends its sessions to; mirrors libpq's
/// `target_session_attrs`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ListenerRole {
    Primary,
    Replica,
    PreferReplica,
    /// Synchronous (in quorum mode, quorum) standbys only: reads that see
    /// every commit the primary acknowledged.
    SyncReplica,
    Any,
}

impl ListenerRole {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Primary => "primary",
            Self::Replica => "replica",
            Self::PreferReplica => "prefer-replica",
            Self::SyncReplica => "sync-replica",
            Self::Any => "any",
        }
    }
}

impl fmt::Display for ListenerRole {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ReplicaFallback {
    /// Hold the session until a replica is eligible (up to `hold_timeout`).
    #[default]
    Hold,
    /// Send the session to the primary instead.
    Primary,
}

impl ReplicaFallback {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Hold => "hold",
            Self::Primary => "primary",
        }
    }
}
