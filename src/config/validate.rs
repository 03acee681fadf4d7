//! The rules of `proxy.toml` that serde's types alone cannot express:
//! listeners name clusters that exist, addresses parse, a cluster has a
//! source of members, TLS files load. Each violation comes back as the
//! dotted key and a message, which [`super::Config::parse`] turns into an
//! error naming the file.

use std::collections::BTreeMap;

use super::{
    parse_cidr, parse_host_port, parse_http_url, parse_socket_addr, ClusterConfig, Config,
    EtcdAccess, LeaderPolicy, ListenerRole, ReplicaFallback, TlsMode,
};

/// Checks the rules that the types alone cannot express.
/// Returns the dotted key and a message on the first violation.
pub(super) fn validate(config: &Config) -> Result<(), (String, String)> {
    parse_socket_addr(&config.admin.listen).map_err(|m| ("admin.listen".to_owned(), m))?;

    if config.clusters.is_empty() {
        return Err((
            "clusters".to_owned(),
            "no cluster is configured; add a [clusters.NAME] table".to_owned(),
        ));
    }
    for (name, cluster) in &config.clusters {
        validate_cluster(name, cluster)?;
    }

    if config.listeners.is_empty() {
        return Err((
            "listeners".to_owned(),
            "no listener is configured; add a [[listeners]] table".to_owned(),
        ));
    }
    let mut seen = BTreeMap::new();
    for (i, listener) in config.listeners.iter().enumerate() {
        let key = |field: &str| format!("listeners[{i}].{field}");
        let addr = parse_socket_addr(&listener.listen).map_err(|m| (key("listen"), m))?;
        if let Some(other) = seen.insert(addr, i) {
            return Err((
                key("listen"),
                format!("{addr} is already used by listeners[{other}]"),
            ));
        }
        if !config.clusters.contains_key(&listener.cluster) {
            return Err((
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
            return Err((
                key("replica_fallback"),
                "only a listener with role = \"replica\" or \"sync-replica\" has a fallback"
                    .to_owned(),
            ));
        }
        if listener.proxy_protocol && listener.trusted_proxies.is_empty() {
            return Err((
                key("trusted_proxies"),
                "proxy_protocol = true needs the load balancers' addresses, e.g. trusted_proxies = [\"10.0.0.0/8\"]".to_owned(),
            ));
        }
        if !listener.proxy_protocol && !listener.trusted_proxies.is_empty() {
            return Err((
                key("trusted_proxies"),
                "only a listener with proxy_protocol = true has trusted proxies".to_owned(),
            ));
        }
        for (j, cidr) in listener.trusted_proxies.iter().enumerate() {
            parse_cidr(cidr).map_err(|m| (key(&format!("trusted_proxies[{j}]")), m))?;
        }
        if listener.role == ListenerRole::SyncReplica
            && config
                .clusters
                .get(&listener.cluster)
                .is_some_and(|c| c.is_static())
        {
            return Err((
                key("role"),
                format!(
                    "\"sync-replica\" needs a Patroni cluster: the static cluster \"{}\" does not know its synchronous standbys",
                    listener.cluster
                ),
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
            return Err((
                key,
                "TLS is enabled but [tls] cert and key are not both set".to_owned(),
            ));
        }
    }
    if config.tls.cert.is_some() || config.tls.key.is_some() {
        crate::tls::server_config(&config.tls).map_err(split_key)?;
    }
    for (name, cluster) in &config.clusters {
        crate::tls::backend_config(
            cluster.backend_tls,
            cluster.backend_ca.as_deref(),
            cluster.backend_cert.as_deref(),
            cluster.backend_key.as_deref(),
            name,
        )
        .map_err(split_key)?;
    }

    if let Some(fleet) = &config.fleet {
        super::fleet::validate(fleet)?;
    }

    if config.runtime.worker_threads == Some(0) {
        return Err((
            "runtime.worker_threads".to_owned(),
            "must be at least 1".to_owned(),
        ));
    }

    let limits = &config.limits;
    if limits.max_client_connections == 0 {
        return Err((
            "limits.max_client_connections".to_owned(),
            "must be at least 1".to_owned(),
        ));
    }
    for (key, value) in [
        ("handshake_timeout", limits.handshake_timeout),
        ("connect_timeout", limits.connect_timeout),
    ] {
        if value.get().is_zero() {
            return Err((format!("limits.{key}"), "must be longer than 0s".to_owned()));
        }
    }
    Ok(())
}

/// Splits a `key: message` error from the TLS loader.
fn split_key(error: String) -> (String, String) {
    match error.split_once(": ") {
        Some((key, message)) => (key.to_owned(), message.to_owned()),
        None => ("tls".to_owned(), error),
    }
}

fn validate_cluster(name: &str, cluster: &ClusterConfig) -> Result<(), (String, String)> {
    let key = |field: &str| format!("clusters.{name}.{field}");
    let is_static = cluster.primary.is_some() || !cluster.replicas.is_empty();
    if is_static && !cluster.is_static() {
        let field = if cluster.primary.is_some() {
            "primary"
        } else {
            "replicas"
        };
        return Err((
            key(field),
            "a cluster is either static (`primary`/`replicas`) or Patroni-managed (`etcd`/`patroni`), not both".to_owned(),
        ));
    }
    if !is_static && cluster.is_static() {
        return Err((
            key("etcd"),
            "the cluster has no members: set `etcd` (or `patroni`) for a Patroni cluster, or `primary`/`replicas` for a static one".to_owned(),
        ));
    }
    if !cluster.is_static() {
        return validate_patroni_cluster(name, cluster);
    }
    if let Some(primary) = &cluster.primary {
        parse_host_port(primary).map_err(|m| (key("primary"), m))?;
    }
    for (i, replica) in cluster.replicas.iter().enumerate() {
        parse_host_port(replica).map_err(|m| (format!("clusters.{name}.replicas[{i}]"), m))?;
    }
    Ok(())
}

fn validate_patroni_cluster(name: &str, cluster: &ClusterConfig) -> Result<(), (String, String)> {
    let key = |field: &str| format!("clusters.{name}.{field}");
    validate_etcd_access(&format!("clusters.{name}"), &cluster.etcd_access())?;
    for (i, endpoint) in cluster.patroni.iter().enumerate() {
        parse_http_url(endpoint).map_err(|m| (format!("clusters.{name}.patroni[{i}]"), m))?;
    }
    let policy = cluster.effective_leader_policy();
    if cluster.etcd.is_empty() && policy != LeaderPolicy::Patroni {
        return Err((
            key("leader_policy"),
            format!(
                "\"{}\" needs etcd, but `etcd` is not set; use \"patroni\" or add etcd endpoints",
                policy.as_str()
            ),
        ));
    }
    if cluster.health_interval.get().is_zero() || cluster.health_timeout.get().is_zero() {
        return Err((
            key("health_interval"),
            "health_interval and health_timeout must be longer than 0s".to_owned(),
        ));
    }
    Ok(())
}

/// The `etcd*` keys of `table` (a cluster, or `fleet`): endpoints that
/// parse, a user with its password, a certificate with its key, and files
/// that exist.
pub(super) fn validate_etcd_access(
    table: &str,
    access: &EtcdAccess,
) -> Result<(), (String, String)> {
    let key = |field: &str| format!("{table}.{field}");
    for (i, endpoint) in access.endpoints.iter().enumerate() {
        parse_http_url(endpoint).map_err(|m| (key(&format!("etcd[{i}]")), m))?;
    }
    if access.user.is_some() != access.password.is_some() {
        return Err((
            key("etcd_user"),
            "`etcd_user` and `etcd_password` go together".to_owned(),
        ));
    }
    if access.cert.is_some() != access.key.is_some() {
        return Err((
            key("etcd_cert"),
            "`etcd_cert` and `etcd_key` go together".to_owned(),
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
            return Err((
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
                return Err((
                    key(field),
                    format!("{} is not a readable file", path.display()),
                ));
            }
        }
    }
    Ok(())
}
