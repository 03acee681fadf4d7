//! `ClusterView`: the one fused picture of a cluster that routing reads.
//!
//! A view is immutable. Sources (a static list today, etcd and Patroni's
//! REST checks in the Patroni mode) build a complete new view and publish it
//! through a `tokio::sync::watch` channel; readers clone the `Arc` and never
//! lock. This module holds the data and the questions routing asks of it
//! ("who is the confirmed leader", "which members take reads", "does this
//! session's backend still fit its role"); it knows nothing of sockets or
//! client sessions.

use std::fmt;
use std::sync::Arc;

/// What a member currently is, as far as the view's sources agree.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MemberRole {
    Primary,
    Replica,
    /// Neither confirmed primary nor usable replica (starting, stopped,
    /// sources disagree).
    Unknown,
}

impl MemberRole {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Primary => "primary",
            Self::Replica => "replica",
            Self::Unknown => "unknown",
        }
    }
}

/// One PostgreSQL server of the cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    pub name: Arc<str>,
    /// Host name or IP of the member's PostgreSQL port.
    pub host: Arc<str>,
    pub port: u16,
    pub role: MemberRole,
    /// Running and passing its checks: existing sessions may stay.
    pub healthy: bool,
    /// Eligible for new read sessions (a healthy replica within the lag
    /// limit and not excluded from load balancing).
    pub readable: bool,
    /// Why the member takes no new read sessions, when `readable` is
    /// false: for `/cluster`, the status page and the event timeline.
    pub unreadable_because: Option<&'static str>,
    /// A synchronous (or quorum) standby of the current leader: it has
    /// every commit the leader acknowledged.
    pub synchronous: bool,
}

impl Member {
    pub fn address(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

impl fmt::Display for Member {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.name, self.address())
    }
}

/// A planned switchover under way: `from` is stepping down, `to` is the
/// candidate when the request named one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Handover {
    pub from: Arc<str>,
    pub to: Option<Arc<str>>,
}

/// The fused, immutable view of one cluster at one moment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterView {
    pub cluster: Arc<str>,
    pub members: Vec<Member>,
    /// Index in `members` of the confirmed leader, if there is one.
    leader: Option<usize>,
    /// Why there is no confirmed leader, for error messages and logs.
    pub no_leader_reason: Option<String>,
    /// A switchover that has been requested but not completed.
    pub handover: Option<Handover>,
    /// False for a static cluster: the view will never change, so holding a
    /// session for a better view is pointless.
    pub dynamic: bool,
}

impl ClusterView {
    /// Builds a view; `leader` names the confirmed leader among `members`.
    pub fn new(
        cluster: Arc<str>,
        members: Vec<Member>,
        leader: Option<&str>,
        dynamic: bool,
    ) -> Self {
        let leader = leader.and_then(|l| members.iter().position(|m| &*m.name == l));
        let no_leader_reason = match leader {
            Some(_) => None,
            None => Some("no member is the confirmed leader".to_owned()),
        };
        Self {
            cluster,
            members,
            leader,
            no_leader_reason,
            handover: None,
            dynamic,
        }
    }

    pub fn with_handover(mut self, handover: Option<Handover>) -> Self {
        self.handover = handover;
        self
    }

    pub fn with_no_leader_reason(mut self, reason: impl Into<String>) -> Self {
        if self.leader.is_none() {
            self.no_leader_reason = Some(reason.into());
        }
        self
    }

    pub fn leader(&self) -> Option<&Member> {
        self.leader.and_then(|i| self.members.get(i))
    }

    pub fn member(&self, name: &str) -> Option<&Member> {
        self.members.iter().find(|m| &*m.name == name)
    }

    /// Replicas that may take new read sessions, in view order.
    pub fn readable_replicas(&self) -> impl Iterator<Item = &Member> {
        self.members
            .iter()
            .filter(|m| m.role == MemberRole::Replica && m.readable)
    }
}

/// Why a member of a fixed role takes no reads: the leader, or a member
/// that is neither leader nor replica.
pub fn static_exclusion(role: MemberRole) -> Option<&'static str> {
    match role {
        MemberRole::Primary => Some("it is the leader"),
        MemberRole::Replica => None,
        MemberRole::Unknown => Some("not a running replica"),
    }
}

#[cfg(test)]
pub(crate) mod test_support {
    use super::*;

    pub fn member(name: &str, port: u16, role: MemberRole) -> Member {
        Member {
            name: name.into(),
            host: "127.0.0.1".into(),
            port,
            role,
            healthy: role != MemberRole::Unknown,
            readable: role == MemberRole::Replica,
            unreadable_because: static_exclusion(role),
            synchronous: false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::test_support::member;
    use super::*;

    #[test]
    fn leader_is_looked_up_by_name() {
        let view = ClusterView::new(
            "demo".into(),
            vec![
                member("pg1", 5441, MemberRole::Replica),
                member("pg2", 5442, MemberRole::Primary),
            ],
            Some("pg2"),
            true,
        );
        assert_eq!(view.leader().map(|m| &*m.name), Some("pg2"));
        assert_eq!(view.readable_replicas().count(), 1);
        assert!(view.no_leader_reason.is_none());
    }

    #[test]
    fn unknown_leader_name_means_no_leader() {
        let view = ClusterView::new("demo".into(), vec![], Some("pg9"), true);
        assert!(view.leader().is_none());
        assert!(view.no_leader_reason.is_some());
    }

    #[test]
    fn ipv6_addresses_are_bracketed() {
        let mut m = member("a", 5432, MemberRole::Primary);
        m.host = "::1".into();
        assert_eq!(m.address(), "[::1]:5432");
    }
}
