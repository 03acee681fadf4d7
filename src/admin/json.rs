//! The JSON answers of `/cluster` and `/events`, built from published
//! snapshots only.

use std::time::SystemTime;

use serde_json::{json, Value};

use super::{Admin, AdminState, ListenerEntry};

/// `/cluster`: each cluster's report with its sessions, and the listeners.
pub fn cluster(admin: &Admin, state: &AdminState) -> String {
    let clusters: Vec<_> = state
        .reports
        .iter()
        .map(|(name, reports)| {
            let report = reports.borrow().clone();
            let mut value = serde_json::to_value(&*report).unwrap_or_default();
            let sessions: Vec<_> = admin
                .sessions
                .of_cluster(name)
                .into_iter()
                .map(|(member, role, count)| {
                    json!({"member": &*member, "role": role.as_str(), "sessions": count})
                })
                .collect();
            let clients: Vec<_> = admin
                .sessions
                .clients_of(name)
                .into_iter()
                .map(|(address, count)| json!({"address": address.to_string(), "sessions": count}))
                .collect();
            if let Some(object) = value.as_object_mut() {
                object.insert("sessions".to_owned(), Value::Array(sessions));
                object.insert("clients".to_owned(), Value::Array(clients));
            }
            value
        })
        .collect();
    let listeners: Vec<_> = state
        .listeners
        .iter()
        .map(|listener| {
            let router = &listener.router;
            let targets: Vec<_> = router
                .targets_now()
                .iter()
                .map(|m| m.name.to_string())
                .collect();
            json!({
                "listen": listener.listen.to_string(),
                "cluster": &*listener.cluster,
                "role": router.role().as_str(),
                "replica_fallback": router.fallback().as_str(),
                "tls": listener.tls.as_str(),
                "targets": targets,
                "held": router.held(),
                "pool": pooling(admin, listener),
            })
        })
        .collect();
    pretty(&json!({
        "version": env!("CARGO_PKG_VERSION"),
        "clusters": clusters,
        "listeners": listeners,
        "fleet": state.fleet.as_ref().map(|fleet| fleet.to_json()),
    }))
}

/// A pooled listener's mode, size and pools (null for passthrough).
fn pooling(admin: &Admin, listener: &ListenerEntry) -> Value {
    let Some((mode, size)) = listener.pooling else {
        return Value::Null;
    };
    let pools: Vec<_> = admin
        .pools
        .of_listener(listener.listen)
        .into_iter()
        .map(|(key, counts)| {
            json!({
                "member": &*key.member,
                "database": key.database,
                "user": key.user,
                "servers_idle": counts.idle,
                "servers_lent": counts.lent,
                "clients_waiting": counts.waiting,
            })
        })
        .collect();
    json!({"mode": mode.as_str(), "pool_size": size, "pools": pools})
}

/// `/events?cluster=NAME&since=RFC3339`: events newest first, and each
/// cluster's last leader change in phases.
pub fn events(admin: &Admin, state: &AdminState, query: Option<&str>) -> Result<String, String> {
    let mut cluster = None;
    let mut since = None;
    for (name, value) in url::form_urlencoded::parse(query.unwrap_or_default().as_bytes()) {
        match &*name {
            "cluster" => cluster = Some(value.into_owned()),
            "since" => since = Some(parse_since(&value)?),
            other => {
                return Err(format!(
                    "unknown parameter {other:?}; /events takes cluster and since"
                ))
            }
        }
    }
    let events = admin.events.query(cluster.as_deref(), since);
    let failovers: serde_json::Map<String, Value> = state
        .reports
        .iter()
        .filter(|(name, _)| cluster.as_deref().is_none_or(|c| c == name))
        .filter_map(|(name, _)| {
            let phases = admin.events.last_failover(name)?;
            Some((name.clone(), serde_json::to_value(phases).ok()?))
        })
        .collect();
    Ok(pretty(&json!({
        "events": events,
        "last_failover": failovers,
    })))
}

fn parse_since(value: &str) -> Result<SystemTime, String> {
    humantime::parse_rfc3339_weak(value).map_err(|e| {
        format!("since={value:?} is not an RFC 3339 time (e.g. 2026-12-02T10:00:00.000Z): {e}")
    })
}

fn pretty(value: &Value) -> String {
    let mut body = serde_json::to_string_pretty(value).unwrap_or_else(|_| "{}".to_owned());
    body.push('\n');
    body
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn since_takes_rfc3339_times_and_names_a_bad_one() {
        assert!(parse_since("2026-12-02T10:00:00.123Z").is_ok());
        assert!(parse_since("2026-12-02T10:00:00Z").is_ok());
        let error = parse_since("yesterday").expect_err("not a time");
        assert!(error.contains("since=\"yesterday\""), "{error}");
    }
}
