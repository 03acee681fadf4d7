//! `proxy.toml`: the schema, its defaults and its validation.
//!
//! Loading happens in two steps. Serde reads the file into typed structs,
//! with unknown keys refused and every parse error carrying the dotted path
//! of the key that caused it (via `serde_path_to_error`). Then [`validate`]
//! checks what types alone cannot say: that listeners name clusters that
//! exist, that addresses parse, that a cluster has a source of members.
//! Every error names the file and the key, so an operator never has to guess
//! which line of a long config was wrong.
//!
//! This module never opens a socket or starts a task: the result is plain
//! data, built once and handed to the parts that need it.

/// The [`EtcdAccess`] of a table with the `etcd*` keys (a cluster, the
/// fleet): serde cannot flatten one shared table into tables that refuse
/// unknown keys, so each declares the keys and this gathers them.
macro_rules! etcd_access_of {
    ($table:expr) => {
        EtcdAccess {
            endpoints: $table.etcd.clone(),
            user: $table.etcd_user.clone(),
            password: $table.etcd_password.clone(),
            ca: $table.etcd_ca.clone(),
            cert: $table.etcd_cert.clone(),
            key: $table.etcd_key.clone(),
        }
    };
}

mod error;
mod fleet;
mod limits;
mod listener;
mod units;
mod validate;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use validate::validate;

pub use error::{ConfigError, KeyedError};
pub use fleet::{parse_fleet_id, FleetConfig, MAX_FLEET_ID};
pub use limits::Limits;
pub use listener::{ListenerConfig, ListenerRole, PoolMode, ReplicaFallback};
pub use units::{ByteSize, Duration};

/// The whole configuration of one rolegate process.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub admin: AdminConfig,
    #[serde(default)]
    pub log: LogConfig,
    #[serde(default)]
    pub clusters: BTreeMap<String, ClusterConfig>,
    #[serde(default)]
    pub listeners: Vec<ListenerConfig>,
    #[serde(default)]
    pub limits: Limits,
    #[serde(default)]
    pub tls: TlsConfig,
    #[serde(default)]
    pub runtime: RuntimeConfig,
    /// Several instances behind one address; without it, cancel keys pass
    /// through unchanged.
    #[serde(default)]
    pub fleet: Option<FleetConfig>,
}

/// How to reach one etcd: endpoints, password and TLS. Clusters and the
/// fleet registry connect through the same code ([`crate::etcd::connector`]).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct EtcdAccess {
    pub endpoints: Vec<String>,
    pub user: Option<String>,
    pub password: Option<String>,
    pub ca: Option<PathBuf>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
}

/// `[runtime]`: how many threads rolegate uses.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuntimeConfig {
    /// Event loops serving sessions; default: one per CPU rolegate may use
    /// (see [`RuntimeConfig::threads`]).
    #[serde(default)]
    pub worker_threads: Option<usize>,
}

impl RuntimeConfig {
    /// The session event loops to run, each on a thread of its own. By
    /// default one per CPU this process may run on (affinity and cgroup
    /// quota included), as HAProxy's `nbthread`. A loop with nothing to do
    /// sleeps in `epoll_wait` and costs nothing; a single loop on a busy
    /// 2-CPU host left the CPUs 4-8% idle while it waited to be scheduled
    /// (BENCHMARKS.md). A sidecar that must leave CPUs to its neighbours
    /// may set fewer.
    pub fn threads(&self) -> usize {
        self.worker_threads.unwrap_or_else(|| {
            std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get)
        })
    }
}

/// `[tls]`: TLS for clients, terminated by rolegate.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM certificate chain presented to clients.
    #[serde(default)]
    pub cert: Option<PathBuf>,
    /// PEM private key of `cert`.
    #[serde(default)]
    pub key: Option<PathBuf>,
    /// PEM CA bundle; when set, clients must present a certificate it signed.
    #[serde(default)]
    pub client_ca: Option<PathBuf>,
    /// Default for every listener; `allow` when `cert` is set, else `disable`.
    #[serde(default)]
    pub mode: Option<TlsMode>,
    #[serde(default)]
    pub min_version: TlsVersion,
}

/// Whether a listener offers TLS to clients.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TlsMode {
    /// Refuse TLS (answer `N` to SSLRequest).
    Disable,
    /// Offer TLS; plaintext clients are served too.
    Allow,
    /// Plaintext StartupMessages get FATAL 28000.
    Require,
}

impl TlsMode {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Disable => "disable",
            Self::Allow => "allow",
            Self::Require => "require",
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
pub enum TlsVersion {
    #[default]
    #[serde(rename = "1.2")]
    V1_2,
    #[serde(rename = "1.3")]
    V1_3,
}

/// TLS from rolegate to a cluster's members, as libpq's `sslmode`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum BackendTls {
    #[default]
    Disable,
    /// TLS when the server offers it, plaintext otherwise; not verified.
    Prefer,
    /// TLS or fail; not verified.
    Require,
    /// TLS with the chain checked against `backend_ca`.
    VerifyCa,
    /// As `verify-ca`, and the certificate must name the member's host.
    VerifyFull,
}

impl Config {
    /// The TLS mode of listener `index`.
    pub fn listener_tls(&self, index: usize) -> TlsMode {
        self.listeners
            .get(index)
            .and_then(|l| l.tls)
            .or(self.tls.mode)
            .unwrap_or(if self.tls.cert.is_some() {
                TlsMode::Allow
            } else {
                TlsMode::Disable
            })
    }
}

/// `[admin]`: the HTTP endpoint for metrics and health.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    #[serde(default = "default_admin_listen")]
    pub listen: String,
    /// When `/readyz` answers 200.
    #[serde(default)]
    pub ready_when: ReadyWhen,
    /// A token required for the status page, `/cluster` and `/events` (as a
    /// bearer header or the page's sign-in cookie); `/metrics`, `/healthz`
    /// and `/readyz` stay open.
    #[serde(default)]
    pub token: Option<String>,
}

impl Default for AdminConfig {
    fn default() -> Self {
        Self {
            listen: default_admin_listen(),
            ready_when: ReadyWhen::default(),
            token: None,
        }
    }
}

/// The condition `/readyz` reports.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ReadyWhen {
    /// Every cluster has a confirmed primary.
    #[default]
    Primary,
    /// Every listener has at least one target.
    Targets,
}

fn default_admin_listen() -> String {
    "127.0.0.1:9432".to_owned()
}

/// `[log]`: how rolegate writes its own log lines.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    #[serde(default)]
    pub format: LogFormat,
    /// A `tracing` filter such as `info` or `rolegate=debug`; `RUST_LOG` wins.
    #[serde(default)]
    pub level: Option<String>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// `[clusters.NAME]`: where the members of one PostgreSQL cluster are.
///
/// A cluster is either *static* (`primary`, `replicas`: members listed by
/// address and trusted as configured) or *Patroni-managed* (`etcd` and/or
/// `patroni`: members and roles discovered and followed live).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterConfig {
    /// Static mode: the address of the read-write member.
    #[serde(default)]
    pub primary: Option<String>,
    /// Static mode: the addresses of the read-only members.
    #[serde(default)]
    pub replicas: Vec<String>,

    /// Patroni's `scope` (the cluster name in etcd); defaults to the table name.
    #[serde(default)]
    pub scope: Option<String>,
    /// Patroni's `namespace`.
    #[serde(default = "default_namespace")]
    pub namespace: String,
    /// etcd v3 endpoints, e.g. `http://127.0.0.1:2379` (`https://` for TLS).
    #[serde(default)]
    pub etcd: Vec<String>,
    #[serde(default)]
    pub etcd_user: Option<String>,
    #[serde(default)]
    pub etcd_password: Option<String>,
    /// PEM CA bundle that signed the etcd servers' certificates.
    #[serde(default)]
    pub etcd_ca: Option<PathBuf>,
    /// PEM client certificate and key for etcd's mutual TLS.
    #[serde(default)]
    pub etcd_cert: Option<PathBuf>,
    #[serde(default)]
    pub etcd_key: Option<PathBuf>,
    /// Patroni REST URLs; used to discover members when `etcd` is not set.
    #[serde(default)]
    pub patroni: Vec<String>,
    /// How the leader is confirmed; defaults to `etcd+patroni` with etcd,
    /// `patroni` without.
    #[serde(default)]
    pub leader_policy: Option<LeaderPolicy>,
    /// What to trust while etcd is unreachable.
    #[serde(default)]
    pub on_etcd_loss: EtcdLossPolicy,
    /// Interval of the Patroni REST checks of every member.
    #[serde(default = "default_health_interval")]
    pub health_interval: Duration,
    /// Timeout of one REST check.
    #[serde(default = "default_health_timeout")]
    pub health_timeout: Duration,
    /// Replicas lagging more than this take no new read sessions.
    #[serde(default)]
    pub max_replica_lag: Option<ByteSize>,
    /// TLS towards the members.
    #[serde(default)]
    pub backend_tls: BackendTls,
    /// PEM CA bundle for `verify-ca` / `verify-full`.
    #[serde(default)]
    pub backend_ca: Option<PathBuf>,
    /// PEM client certificate and key presented to the members.
    #[serde(default)]
    pub backend_cert: Option<PathBuf>,
    #[serde(default)]
    pub backend_key: Option<PathBuf>,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        Self {
            primary: None,
            replicas: Vec::new(),
            scope: None,
            namespace: default_namespace(),
            etcd: Vec::new(),
            etcd_user: None,
            etcd_password: None,
            etcd_ca: None,
            etcd_cert: None,
            etcd_key: None,
            patroni: Vec::new(),
            leader_policy: None,
            on_etcd_loss: EtcdLossPolicy::default(),
            health_interval: default_health_interval(),
            health_timeout: default_health_timeout(),
            max_replica_lag: None,
            backend_tls: BackendTls::default(),
            backend_ca: None,
            backend_cert: None,
            backend_key: None,
        }
    }
}

impl ClusterConfig {
    pub fn etcd_access(&self) -> EtcdAccess {
        etcd_access_of!(self)
    }

    pub fn is_static(&self) -> bool {
        self.etcd.is_empty() && self.patroni.is_empty()
    }

    /// The leader policy in force when etcd is reachable.
    pub fn effective_leader_policy(&self) -> LeaderPolicy {
        match (self.leader_policy, self.etcd.is_empty()) {
            (Some(policy), _) => policy,
            (None, false) => LeaderPolicy::EtcdAndPatroni,
            (None, true) => LeaderPolicy::Patroni,
        }
    }
}

fn default_namespace() -> String {
    "/service/".to_owned()
}
fn default_health_interval() -> Duration {
    Duration::from_secs(1)
}
fn default_health_timeout() -> Duration {
    Duration::from_secs(1)
}

/// Which sources must agree before a member counts as the leader.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum LeaderPolicy {
    /// The etcd leader key names it and its REST check says primary.
    #[serde(rename = "etcd+patroni")]
    EtcdAndPatroni,
    /// The etcd leader key alone (with the member's own role in etcd).
    #[serde(rename = "etcd")]
    Etcd,
    /// Exactly one member answers Patroni's `/primary` check.
    #[serde(rename = "patroni")]
    Patroni,
}

impl LeaderPolicy {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::EtcdAndPatroni => "etcd+patroni",
            Self::Etcd => "etcd",
            Self::Patroni => "patroni",
        }
    }
}

/// What the leader decision rests on while etcd cannot be reached.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EtcdLossPolicy {
    /// Patroni's REST checks alone (as HAProxy does).
    #[default]
    Patroni,
    /// Keep the last confirmed leader while its REST check still passes:
    /// indefinitely under Patroni's `failsafe_mode`, else for at most `ttl`.
    Freeze,
    /// No writes until etcd is back.
    Refuse,
}

impl EtcdLossPolicy {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Patroni => "patroni",
            Self::Freeze => "freeze",
            Self::Refuse => "refuse",
        }
    }
}

impl Config {
    /// Reads, parses and validates the file at `path`.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            file: path.to_owned(),
            key: "(file)".to_owned(),
            message: format!("cannot read the config file: {e}"),
        })?;
        Self::parse(&text, path)
    }

    /// Parses and validates `text`; `path` is used in error messages only.
    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let error = |key: String, message: String| KeyedError::new(key, message).in_file(path);
        let deserializer = toml::Deserializer::parse(text)
            .map_err(|e| error("(syntax)".to_owned(), describe_toml_error(&e, text)))?;
        let config: Config = serde_path_to_error::deserialize(deserializer).map_err(|e| {
            let key = e.path().to_string();
            let key = if key == "." {
                "(top level)".to_owned()
            } else {
                key
            };
            error(key, describe_toml_error(e.inner(), text))
        })?;
        validate(&config).map_err(|e| e.in_file(path))?;
        Ok(config)
    }

    pub fn cluster(&self, name: &str) -> Option<&ClusterConfig> {
        self.clusters.get(name)
    }
}

fn describe_toml_error(e: &toml::de::Error, text: &str) -> String {
    match e.span() {
        Some(span) => {
            let line = text[..span.start.min(text.len())].matches('\n').count() + 1;
            format!("{} (line {line})", e.message())
        }
        None => e.message().to_owned(),
    }
}

/// Parses an `http://` or `https://` URL with a host.
pub fn parse_http_url(text: &str) -> Result<url::Url, String> {
    let url = url::Url::parse(text).map_err(|e| format!("{text:?} is not a URL ({e})"))?;
    if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
        return Err(format!(
            "{text:?} must be an http:// or https:// URL with a host"
        ));
    }
    Ok(url)
}

/// Parses `ip:port` for a local bind address.
pub fn parse_socket_addr(text: &str) -> Result<SocketAddr, String> {
    text.parse()
        .map_err(|_| format!("{text:?} is not an address of the form IP:PORT"))
}

/// Parses `host:port` (host may be a name, an IPv4 or a bracketed IPv6).
pub fn parse_host_port(text: &str) -> Result<(String, u16), String> {
    let bad = || format!("{text:?} is not an address of the form HOST:PORT");
    let (host, port) = text.rsplit_once(':').ok_or_else(bad)?;
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    if host.is_empty() {
        return Err(bad());
    }
    let port: u16 = port.parse().map_err(|_| bad())?;
    if port == 0 {
        return Err(bad());
    }
    Ok((host.to_owned(), port))
}

/// Parses a CIDR such as `10.0.0.0/8` or `::1/128`; a bare address is a
/// single host.
pub fn parse_cidr(text: &str) -> Result<ipnet::IpNet, String> {
    text.parse::<ipnet::IpNet>()
        .or_else(|_| text.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
        .map_err(|_| format!("{text:?} is not a CIDR such as 10.0.0.0/8 or an IP address"))
}

#[cfg(test)]
mod tests;
