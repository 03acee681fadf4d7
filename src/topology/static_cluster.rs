//! Static clusters: members listed by address in `proxy.toml`.
//!
//! This is a real mode for PostgreSQL setups without Patroni: the operator
//! says which server is the primary and which are replicas, and rolegate
//! trusts that. The view is built once and never changes.

use std::sync::Arc;

use crate::config::{parse_host_port, ClusterConfig};

use super::report::{self, ClusterReport, Sources};
use super::view::{static_exclusion, ClusterView, Member, MemberRole};

/// Builds the fixed view of a static cluster. Members are named by their
/// configured address, which is what an operator will recognise in logs.
pub fn static_view(name: &str, config: &ClusterConfig) -> Result<ClusterView, String> {
    let mut members = Vec::new();
    let mut add = |address: &str, role: MemberRole| -> Result<(), String> {
        let (host, port) = parse_host_port(address)?;
        members.push(Member {
            name: address.into(),
            host: host.into(),
            port,
            role,
            healthy: true,
            readable: role == MemberRole::Replica,
            unreadable_because: static_exclusion(role),
            synchronous: false,
        });
        Ok(())
    };
    if let Some(primary) = &config.primary {
        add(primary, MemberRole::Primary)?;
    }
    for replica in &config.replicas {
        add(replica, MemberRole::Replica)?;
    }
    let view = ClusterView::new(Arc::from(name), members, config.primary.as_deref(), false);
    Ok(view.with_no_leader_reason("the static cluster has no `primary` configured"))
}

/// The fixed report of a static cluster.
pub fn static_report(view: &ClusterView) -> ClusterReport {
    ClusterReport {
        cluster: view.cluster.to_string(),
        mode: "static",
        leader_policy: None,
        on_etcd_loss: None,
        rule: "static".to_owned(),
        leader: view.leader().map(|m| m.name.to_string()),
        no_leader_reason: view.no_leader_reason.clone(),
        switchover: None,
        sync: None,
        sources: Sources {
            etcd: "not configured",
            etcd_down_since: None,
            patroni_rest: false,
        },
        members: report::member_reports(view, None, &Default::default(), &Default::default()),
        view_changed_at: report::now_rfc3339(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn static_members_and_leader() {
        let config = ClusterConfig {
            primary: Some("127.0.0.1:5441".into()),
            replicas: vec!["127.0.0.1:5442".into(), "db3:5443".into()],
            ..ClusterConfig::default()
        };
        let view = static_view("demo", &config).expect("valid");
        assert_eq!(view.leader().map(|m| m.port), Some(5441));
        let replicas: Vec<_> = view.readable_replicas().map(|m| m.address()).collect();
        assert_eq!(replicas, ["127.0.0.1:5442", "db3:5443"]);
        assert!(!view.dynamic);
    }

    #[test]
    fn replicas_only() {
        let config = ClusterConfig {
            primary: None,
            replicas: vec!["127.0.0.1:5442".into()],
            ..ClusterConfig::default()
        };
        let view = static_view("ro", &config).expect("valid");
        assert!(view.leader().is_none());
        assert!(view
            .no_leader_reason
            .as_deref()
            .is_some_and(|r| r.contains("no `primary`")));
    }
}
