//! A typed mirror of one Patroni cluster's keys in the DCS (etcd).
//!
//! Patroni keeps everything under `<namespace><scope>/`: `leader` (the
//! leader's member name, bound to a lease of `ttl` seconds), `members/<name>`
//! (JSON per member, also lease-bound), `config` (dynamic configuration),
//! `status` (`{"optime": N}`, the leader's WAL position), `failover`, `sync`,
//! `history` and `initialize`. [`DcsState`] applies puts and deletes of those
//! keys and says what kind of change each was, so the follower knows which
//! members to probe at once. Pure data: no I/O.

use std::collections::{BTreeMap, BTreeSet};

use super::patroni_data::{DynamicConfig, FailoverIntent, MemberRecord, SyncKey};

/// What an applied key event changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DcsChange {
    /// The leader key was set, moved or removed (old, new).
    Leader {
        old: Option<String>,
        new: Option<String>,
    },
    /// A member's record appeared, changed role or state, or went away.
    MemberRole(String),
    /// A member's record changed in another way (WAL position, timeline).
    MemberData(String),
    Config,
    Optime,
    /// A switchover or failover was requested or finished.
    Failover,
    /// The synchronous standbys changed.
    Sync,
    /// A key rolegate does not act on.
    Other,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DcsState {
    pub leader: Option<String>,
    pub members: BTreeMap<String, MemberRecord>,
    pub config: DynamicConfig,
    /// The leader's last published WAL position.
    pub optime: Option<u64>,
    /// A pending switchover or failover request.
    pub failover: Option<FailoverIntent>,
    /// The synchronous (or quorum) standbys, with `synchronous_mode`.
    pub sync: Option<SyncKey>,
    /// The members of the `failsafe` key: those the leader may keep
    /// serving with when Patroni loses etcd under `failsafe_mode`.
    pub failsafe: BTreeSet<String>,
}

impl DcsState {
    /// Builds the state from a full read of the prefix.
    pub fn from_keys<'a>(
        prefix: &str,
        kvs: impl IntoIterator<Item = (&'a [u8], &'a [u8])>,
    ) -> Self {
        let mut state = Self::default();
        for (key, value) in kvs {
            state.apply_put(prefix, key, value);
        }
        state
    }

    /// Applies a put of `key` (the full etcd key) to `value`.
    pub fn apply_put(&mut self, prefix: &str, key: &[u8], value: &[u8]) -> DcsChange {
        let Some(name) = relative_key(prefix, key) else {
            return DcsChange::Other;
        };
        match name {
            "leader" => {
                let new = std::str::from_utf8(value)
                    .ok()
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .map(str::to_owned);
                self.set_leader(new)
            }
            "config" => {
                self.config = DynamicConfig::parse(value).unwrap_or_default();
                DcsChange::Config
            }
            "status" => {
                self.optime = serde_json::from_slice::<serde_json::Value>(value)
                    .ok()
                    .and_then(|v| v.get("optime").and_then(serde_json::Value::as_u64));
                DcsChange::Optime
            }
            "failover" => {
                self.failover = FailoverIntent::parse(value);
                DcsChange::Failover
            }
            "sync" => {
                self.sync = SyncKey::parse(value);
                DcsChange::Sync
            }
            "failsafe" => {
                self.failsafe =
                    serde_json::from_slice::<BTreeMap<String, serde_json::Value>>(value)
                        .map(|m| m.into_keys().collect())
                        .unwrap_or_default();
                DcsChange::Other
            }
            "optime/leader" => {
                self.optime = std::str::from_utf8(value)
                    .ok()
                    .and_then(|s| s.trim().parse().ok());
                DcsChange::Optime
            }
            _ => match name.strip_prefix("members/") {
                Some(member) if !member.is_empty() && !member.contains('/') => {
                    match MemberRecord::parse(value) {
                        Ok(record) => self.set_member(member, record),
                        Err(e) => {
                            tracing::warn!(member, "ignoring a malformed member record: {e}");
                            self.remove_member(member)
                        }
                    }
                }
                _ => DcsChange::Other,
            },
        }
    }

    /// Applies a delete (or lease expiry) of `key`.
    pub fn apply_delete(&mut self, prefix: &str, key: &[u8]) -> DcsChange {
        match relative_key(prefix, key) {
            Some("leader") => self.set_leader(None),
            Some("config") => {
                self.config = DynamicConfig::default();
                DcsChange::Config
            }
            Some("failover") => {
                self.failover = None;
                DcsChange::Failover
            }
            Some("sync") => {
                self.sync = None;
                DcsChange::Sync
            }
            Some("failsafe") => {
                self.failsafe.clear();
                DcsChange::Other
            }
            Some(name) => match name.strip_prefix("members/") {
                Some(member) if !member.is_empty() && self.keeps_under_failsafe(member) => {
                    if let Some(record) = self.members.get_mut(member) {
                        record.kept_by_failsafe = true;
                    }
                    DcsChange::MemberRole(member.to_owned())
                }
                Some(member) if !member.is_empty() => self.remove_member(member),
                _ => DcsChange::Other,
            },
            None => DcsChange::Other,
        }
    }

    fn set_leader(&mut self, new: Option<String>) -> DcsChange {
        if self.leader == new {
            return DcsChange::Other;
        }
        let old = std::mem::replace(&mut self.leader, new.clone());
        DcsChange::Leader { old, new }
    }

    fn set_member(&mut self, name: &str, record: MemberRecord) -> DcsChange {
        let change = match self.members.get(name) {
            Some(old) if old.role == record.role && old.state == record.state => {
                if old == &record {
                    DcsChange::Other
                } else {
                    DcsChange::MemberData(name.to_owned())
                }
            }
            _ => DcsChange::MemberRole(name.to_owned()),
        };
        self.members.insert(name.to_owned(), record);
        change
    }

    /// Whether a member whose key went away stays: with `failsafe_mode` on
    /// and the member in the `failsafe` key, Patroni lost etcd but may keep
    /// running, its leader serving as primary while every member confirms
    /// it. REST checks then say what each member is.
    fn keeps_under_failsafe(&self, member: &str) -> bool {
        self.config.failsafe_mode == Some(true)
            && self.failsafe.contains(member)
            && self.members.contains_key(member)
    }

    /// After a full re-read, keeps the members `old` kept under failsafe
    /// that are still absent (their keys do not come back by re-reading).
    pub fn carry_failsafe_members(&mut self, old: &DcsState) {
        for (name, record) in &old.members {
            if record.kept_by_failsafe
                && !self.members.contains_key(name)
                && self.config.failsafe_mode == Some(true)
                && self.failsafe.contains(name)
            {
                self.members.insert(name.clone(), record.clone());
            }
        }
    }

    fn remove_member(&mut self, name: &str) -> DcsChange {
        match self.members.remove(name) {
            Some(_) => DcsChange::MemberRole(name.to_owned()),
            None => DcsChange::Other,
        }
    }

    /// Whether `member` is a synchronous (or quorum) standby of the
    /// current leader: named in the `sync` key for this leader, or, from
    /// `/cluster` (REST-only discovery), listed as `sync_standby` or
    /// `quorum_standby`.
    pub fn is_synchronous(&self, member: &str) -> bool {
        let named = match (&self.sync, self.leader.as_deref()) {
            (Some(sync), Some(leader)) => sync.standbys_of(leader).contains(&member),
            _ => false,
        };
        named
            || self
                .members
                .get(member)
                .is_some_and(MemberRecord::is_synchronous_role)
    }

    /// The WAL position replicas are compared with: `status.optime`, else
    /// the leader's own record.
    pub fn leader_wal_position(&self) -> Option<u64> {
        self.optime.or_else(|| {
            self.leader
                .as_ref()
                .and_then(|l| self.members.get(l))
                .and_then(|m| m.xlog_location)
        })
    }
}

/// The key below the cluster prefix, e.g. `members/pg1`.
fn relative_key<'a>(prefix: &str, key: &'a [u8]) -> Option<&'a str> {
    std::str::from_utf8(key).ok()?.strip_prefix(prefix)
}

/// `<namespace><scope>/`, normalised as Patroni does (`/service/` + `demo`).
pub fn cluster_prefix(namespace: &str, scope: &str) -> String {
    let namespace = namespace.trim_matches('/');
    if namespace.is_empty() {
        format!("/{scope}/")
    } else {
        format!("/{namespace}/{scope}/")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::topology::patroni_data::{fixture, fixture_dcs_state};

    const PREFIX: &str = "/service/demo/";

    fn fixture_state() -> DcsState {
        fixture_dcs_state()
    }

    #[test]
    fn full_read_of_a_real_cluster() {
        let state = fixture_state();
        assert_eq!(state.leader.as_deref(), Some("pg1"));
        assert_eq!(state.members.len(), 3);
        assert_eq!(state.config.ttl_secs(), 20);
        assert_eq!(state.optime, Some(202_603_224));
        assert_eq!(state.leader_wal_position(), Some(202_603_224));
    }

    #[test]
    fn prefix_normalisation() {
        assert_eq!(cluster_prefix("/service/", "demo"), PREFIX);
        assert_eq!(cluster_prefix("service", "demo"), PREFIX);
        assert_eq!(cluster_prefix("/", "demo"), "/demo/");
    }

    #[test]
    fn changes_are_classified() {
        let mut state = fixture_state();
        assert_eq!(
            state.apply_delete(PREFIX, b"/service/demo/leader"),
            DcsChange::Leader {
                old: Some("pg1".into()),
                new: None
            }
        );
        assert_eq!(
            state.apply_put(PREFIX, b"/service/demo/leader", b"pg3"),
            DcsChange::Leader {
                old: None,
                new: Some("pg3".into())
            }
        );
        assert_eq!(
            state.apply_put(PREFIX, b"/service/demo/leader", b"pg3"),
            DcsChange::Other
        );
        let promoted = br#"{"conn_url":"postgres://127.0.0.1:5443/postgres","state":"running","role":"promoted"}"#;
        assert_eq!(
            state.apply_put(PREFIX, b"/service/demo/members/pg3", promoted),
            DcsChange::MemberRole("pg3".into())
        );
        let moved = br#"{"conn_url":"postgres://127.0.0.1:5443/postgres","state":"running","role":"promoted","xlog_location":5}"#;
        assert_eq!(
            state.apply_put(PREFIX, b"/service/demo/members/pg3", moved),
            DcsChange::MemberData("pg3".into())
        );
        assert_eq!(
            state.apply_delete(PREFIX, b"/service/demo/members/pg2"),
            DcsChange::MemberRole("pg2".into())
        );
        assert_eq!(
            state.apply_put(PREFIX, b"/service/other/leader", b"x"),
            DcsChange::Other
        );
        assert_eq!(
            state.apply_put(
                PREFIX,
                b"/service/demo/failover",
                br#"{"leader":"pg3","member":"pg1"}"#
            ),
            DcsChange::Failover
        );
        assert!(state.failover.is_some());
        assert_eq!(
            state.apply_put(PREFIX, b"/service/demo/failover", b"{}"),
            DcsChange::Failover
        );
        assert!(state.failover.is_none());
    }

    #[test]
    fn malformed_member_record_removes_the_member() {
        let mut state = fixture_state();
        assert_eq!(
            state.apply_put(PREFIX, b"/service/demo/members/pg2", b"{not json"),
            DcsChange::MemberRole("pg2".into())
        );
        assert!(!state.members.contains_key("pg2"));
    }

    #[test]
    fn the_switchover_capture_moves_the_leader() {
        let mut state = fixture_state();
        let text = fixture("switchover/etcd-watch.decoded.jsonl");
        let mut leaders = Vec::new();
        for line in text.lines() {
            let response: serde_json::Value = serde_json::from_str(line).expect("jsonl");
            for event in response["Events"].as_array().into_iter().flatten() {
                let key = event["kv"]["key"].as_str().unwrap_or_default().as_bytes();
                let change = if event["type"] == 1 {
                    state.apply_delete(PREFIX, key)
                } else {
                    let value = event["kv"]["value"].as_str().unwrap_or_default();
                    state.apply_put(PREFIX, key, value.as_bytes())
                };
                if let DcsChange::Leader { new, .. } = change {
                    leaders.push(new);
                }
            }
        }
        assert_eq!(leaders, [None, Some("pg3".to_owned())]);
        assert!(state.members["pg3"].is_primary_role());
        assert!(state.members["pg1"].is_replica_role());
    }
}
