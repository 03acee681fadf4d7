//! The rules of `proxy.toml` that serde's types alone cannot express:
//! listeners name clusters that exist, addresses parse, a cluster has a
//! source of members. Each violation comes back as a [`KeyedError`], which
//! [`super::Config::parse`] turns into an error naming the file. The TLS
//! files a configuration names are loaded where they are used, once per
//! start or reload ([`crate::tls::TlsFiles`]).

use std::collections::BTreeMap;
use std::net::SocketAddr;

use super::{
    parse_cidr, parse_host_port, parse_http_url, parse_socket_addr, ClusterConfig, Config,
    EtcdAccess, KeyedError, LeaderPolicy, ListenerConfig, ListenerRole, ReplicaFallback, TlsMode,
};

/// Checks the rules that the types alone cannot express.
/// Returns the dotted key and a message on the first violation.
pub(super) fn validate(config: &Config) -> Result<(), KeyedError> {
    parse_socket_addr(&config.admin.listen).map_err(|m| KeyedError::new("admin.listen", m))?;

    if config.clusters.is_empty() {
        return Err(KeyedError::new(
            "clusters",
            "no cluster is configured; add a [clusters.NAME] table",
        ));
    }
    for (name, cluster) in &config.clusters {
        validate_cluster(name, cluster)?;
    }

    if config.listeners.is_empty() {
        return Err(KeyedError::new(
            "listeners",
            "no listener is configured; add a [[listeners]] table",
        ));
    }
    let mut seen = BTreeMap::new();
    for (i, listener) in config.listeners.iter().enumerate() {
        let addr = validate_listener(i, listener, config)?;
        if let Some(other) = seen.insert(addr, i) {
            return Err(KeyedError::new(
                format!("listeners[{i}].listen"),
                format!("{addr} is already used by listeners[{other}]"),
            ));
        }
    }

    for i in 0..config.listeners.len() {
        if config.listener_tls(i) != TlsMode::Disable
            && (config.tls.cert.is_none() || config.tls.key.is_none())
        {
            let key = if config.listeners[i].tls.is_some() {
                format!("listeners[{i}].tls")
            } else {
                "tls.mode".to_owned()
            };
            return Err(KeyedError::new(
                key,
                "TLS is enabled but [tls] cert and key are not both set",
            ));
        }
    }
    if let Some(fleet) = &config.fleet {
        super::fleet::validate(fleet)?;
        if !fleet.etcd.is_empty() {
            validate_etcd_access("fleet", &fleet.etcd_access())?;
        }
    }

    if config.runtime.worker_threads == Some(0) {
        return Err(KeyedError::new(
            "runtime.worker_threads",
            "must be at least 1",
        ));
    }

    let limits = &config.limits;
    if limits.max_client_connections == 0 {
        return Err(KeyedError::new(
            "limits.max_client_connections",
            "must be at least 1",
        ));
    }
    for (key, value) in [
        ("handshake_timeout", limits.handshake_timeout),
        ("connect_timeout", limits.connect_timeout),
    ] {
        if value.get().is_zero() {
            return Err(KeyedError::new(
                format!("limits.{key}"),
                "must be longer than 0s",
            ));
        }
    }
    Ok(())
}

/// The rules of `listeners[i]`; returns its address.
fn validate_listener(
    i: usize,
    listener: &ListenerConfig,
    config: &Config,
) -> Result<SocketAddr, KeyedError> {
    let key = |field: &str| format!("listeners[{i}].{field}");
    let addr =
        parse_socket_addr(&listener.listen).map_err(|m| KeyedError::new(key("listen"), m))?;
    if !config.clusters.contains_key(&listener.cluster) {
        return Err(KeyedError::new(
            key("cluster"),
            format!(
                "no cluster named {:?} is configured (known: {})",
                listener.cluster,
                config
                    .clusters
                    .keys()
                    .cloned()
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        ));
    }
    if listener.replica_fallback == ReplicaFallback::Primary
        && !matches!(
            listener.role,
            ListenerRole::Replica | ListenerRole::SyncReplica
        )
    {
        return Err(KeyedError::new(
            key("replica_fallback"),
            "only a listener with role = \"replica\" or \"sync-replica\" has a fallback".to_owned(),
        ));
    }
    if listener.proxy_protocol && listener.trusted_proxies.is_empty() {
        return Err(KeyedError::new(key("trusted_proxies"), "proxy_protocol = true needs the load balancers' addresses, e.g. trusted_proxies = [\"10.0.0.0/8\"]"));
    }
    if !listener.proxy_protocol && !listener.trusted_proxies.is_empty() {
        return Err(KeyedError::new(
            key("trusted_proxies"),
            "only a listener with proxy_protocol = true has trusted proxies",
        ));
    }
    for (j, cidr) in listener.trusted_proxies.iter().enumerate() {
        parse_cidr(cidr).map_err(|m| KeyedError::new(key(&format!("trusted_proxies[{j}]")), m))?;
    }
    validate_pooling(i, listener)?;
    if listener.role == ListenerRole::SyncReplica
        && config
            .clusters
            .get(&listener.cluster)
            .is_some_and(|c| c.is_static())
    {
        return Err(KeyedError::new(key("role"), format!(
                "\"sync-replica\" needs a Patroni cluster: the static cluster \"{}\" does not know its synchronous standbys",
                listener.cluster
            )));
    }
    Ok(addr)
}

/// A pooled listener names where its secrets come from; a passthrough one
/// has none.
fn validate_pooling(i: usize, listener: &ListenerConfig) -> Result<(), KeyedError> {
    let key = |field: &str| format!("listeners[{i}].{field}");
    let pooled_only = [
        ("auth_file", listener.auth_file.is_some()),
        ("auth_user", listener.auth_user.is_some()),
        ("auth_password_file", listener.auth_password_file.is_some()),
        ("auth_password_env", listener.auth_password_env.is_some()),
        ("auth_query", listener.auth_query.is_some()),
    ];
    if listener.pool_mode.is_none() {
        if let Some((field, _)) = pooled_only.iter().find(|(_, set)| *set) {
            return Err(KeyedError::new(
                key(field),
                "only a pooled listener (pool_mode = \"session\" or \"transaction\") reads secrets; a passthrough listener relays the login to PostgreSQL",
            ));
        }
        return Ok(());
    }
    if listener.auth_file.is_none() && listener.auth_user.is_none() {
        return Err(KeyedError::new(
            key("auth_file"),
            "a pooled listener (pool_mode) checks passwords itself: name the file of its roles' secrets (auth_file = \"/etc/rolegate/userlist.txt\") or the role that reads them from the cluster (auth_user)",
        ));
    }
    if listener.auth_user.is_none() {
        for field in ["auth_password_file", "auth_password_env", "auth_query"] {
            if pooled_only.iter().any(|(f, set)| *f == field && *set) {
                return Err(KeyedError::new(
                    key(field),
                    "only used with auth_user, the role that runs auth_query",
                ));
            }
        }
    }
    if listener.auth_password_file.is_some() && listener.auth_password_env.is_some() {
        return Err(KeyedError::new(
            key("auth_password_env"),
            "auth_user's password comes from auth_password_file or auth_password_env, not both",
        ));
    }
    if let Some(query) = &listener.auth_query {
        if !query.contains("$1") || query.contains('\0') {
            return Err(KeyedError::new(
                key("auth_query"),
                "the query takes the role as $1 (and no NUL byte), e.g. \"SELECT usename, passwd FROM pgbouncer.get_auth($1)\"",
            ));
        }
    }
    if !(1..=10_000).contains(&listener.pool_size) {
        return Err(KeyedError::new(
            key("pool_size"),
            format!("{} is out of range (1 to 10000)", listener.pool_size),
        ));
    }
    if !(1..=100_000).contains(&listener.max_prepared_statements) {
        return Err(KeyedError::new(
            key("max_prepared_statements"),
            format!(
                "{} is out of range (1 to 100000)",
                listener.max_prepared_statements
            ),
        ));
    }
    if listener.server_reset_query.contains('\0') {
        return Err(KeyedError::new(
            key("server_reset_query"),
            "a query cannot contain a NUL byte",
        ));
    }
    Ok(())
}

fn validate_cluster(name: &str, cluster: &ClusterConfig) -> Result<(), KeyedError> {
    let key = |field: &str| format!("clusters.{name}.{field}");
    let is_static = cluster.primary.is_some() || !cluster.replicas.is_empty();
    if is_static && !cluster.is_static() {
        let field = if cluster.primary.is_some() {
            "primary"
        } else {
            "replicas"
        };
        return Err(KeyedError::new(key(field), "a cluster is either static (`primary`/`replicas`) or Patroni-managed (`etcd`/`patroni`), not both"));
    }
    if !is_static && cluster.is_static() {
        return Err(KeyedError::new(key("etcd"), "the cluster has no members: set `etcd` (or `patroni`) for a Patroni cluster, or `primary`/`replicas` for a static one"));
    }
    if !cluster.is_static() {
        return validate_patroni_cluster(name, cluster);
    }
    if let Some(primary) = &cluster.primary {
        parse_host_port(primary).map_err(|m| KeyedError::new(key("primary"), m))?;
    }
    for (i, replica) in cluster.replicas.iter().enumerate() {
        parse_host_port(replica)
            .map_err(|m| KeyedError::new(format!("clusters.{name}.replicas[{i}]"), m))?;
    }
    Ok(())
}

fn validate_patroni_cluster(name: &str, cluster: &ClusterConfig) -> Result<(), KeyedError> {
    let key = |field: &str| format!("clusters.{name}.{field}");
    validate_etcd_access(&format!("clusters.{name}"), &cluster.etcd_access())?;
    for (i, endpoint) in cluster.patroni.iter().enumerate() {
        parse_http_url(endpoint)
            .map_err(|m| KeyedError::new(format!("clusters.{name}.patroni[{i}]"), m))?;
    }
    let policy = cluster.effective_leader_policy();
    if cluster.etcd.is_empty() && policy != LeaderPolicy::Patroni {
        return Err(KeyedError::new(
            key("leader_policy"),
            format!(
                "\"{}\" needs etcd, but `etcd` is not set; use \"patroni\" or add etcd endpoints",
                policy.as_str()
            ),
        ));
    }
    if cluster.health_interval.get().is_zero() || cluster.health_timeout.get().is_zero() {
        return Err(KeyedError::new(
            key("health_interval"),
            "health_interval and health_timeout must be longer than 0s",
        ));
    }
    Ok(())
}

/// The `etcd*` keys of `table` (a cluster, or `fleet`): endpoints that
/// parse, a user with its password, a certificate with its key, and files
/// that exist.
fn validate_etcd_access(table: &str, access: &EtcdAccess) -> Result<(), KeyedError> {
    let key = |field: &str| format!("{table}.{field}");
    for (i, endpoint) in access.endpoints.iter().enumerate() {
        parse_http_url(endpoint).map_err(|m| KeyedError::new(key(&format!("etcd[{i}]")), m))?;
    }
    if access.user.is_some() != access.password.is_some() {
        return Err(KeyedError::new(
            key("etcd_user"),
            "`etcd_user` and `etcd_password` go together",
        ));
    }
    if access.cert.is_some() != access.key.is_some() {
        return Err(KeyedError::new(
            key("etcd_cert"),
            "`etcd_cert` and `etcd_key` go together",
        ));
    }
    // An http:// endpoint is spoken to in plain text: with TLS keys beside
    // it the connection would fail only once rolegate runs.
    let tls_key = [("etcd_ca", &access.ca), ("etcd_cert", &access.cert)]
        .into_iter()
        .find_map(|(field, path)| path.is_some().then_some(field));
    if let Some(field) = tls_key {
        if let Some((i, endpoint)) = access
            .endpoints
            .iter()
            .enumerate()
            .find(|(_, e)| parse_http_url(e).is_ok_and(|url| url.scheme() == "http"))
        {
            return Err(KeyedError::new(
                key(field),
                format!(
                    "`{field}` asks for TLS, but `etcd[{i}]` ({endpoint}) is http://; \
                     use https:// endpoints, or remove the TLS keys"
                ),
            ));
        }
    }
    for (field, path) in [
        ("etcd_ca", &access.ca),
        ("etcd_cert", &access.cert),
        ("etcd_key", &access.key),
    ] {
        if let Some(path) = path {
            if !path.is_file() {
                return Err(KeyedError::new(
                    key(field),
                    format!("{} is not a readable file", path.display()),
                ));
            }
        }
    }
    Ok(())
}
