//! Turning the follower's state into what others read: the fused
//! [`ClusterView`] the router routes by (sent only when it changed, with an
//! event, and its log line, for each change a person would want to see),
//! the metrics, and the `/cluster` report.

use std::sync::Arc;
use std::time::SystemTime;

use tokio::time::Instant;

use super::Follower;
use crate::etcd::trouble::EtcdTrouble;
use crate::events::EventKind;
use crate::topology::fuse::{fuse, rule, EtcdStatus, FuseInput};
use crate::topology::report::{self, ClusterReport, Sources};
use crate::topology::view::ClusterView;

impl Follower {
    pub(super) fn publish(&mut self) {
        let view = self.with_refusal(fuse(&self.fuse_input()));
        let current = self.views.borrow().clone();
        if *current == view {
            self.publish_report(&view);
            return;
        }
        let now = report::now_rfc3339();
        self.view_changed_at = now.clone();
        for member in &view.members {
            if current.member(&member.name) != Some(member) {
                self.member_changed_at
                    .insert(member.name.to_string(), now.clone());
                self.metrics
                    .member(&member.name, member.healthy, member.readable);
            }
        }
        for gone in current
            .members
            .iter()
            .filter(|m| view.member(&m.name).is_none())
        {
            self.member_changed_at.remove(&*gone.name);
            self.metrics.member_gone(&gone.name);
        }
        let old_leader = current.leader().map(|m| m.name.clone());
        let new_leader = view.leader().map(|m| m.name.clone());
        if old_leader != new_leader {
            self.metrics
                .leader_gauge(old_leader.as_deref(), new_leader.as_deref());
            if let (Some(new), Some(last)) = (&new_leader, &self.last_leader) {
                if **new != **last {
                    self.metrics.new_leader_confirmed();
                }
            }
            let previous = self.last_leader.clone();
            let event = match &new_leader {
                Some(leader) => EventKind::LeaderConfirmed {
                    leader: leader.to_string(),
                    previous,
                    evidence: report::rule_name(rule(&self.fuse_input())),
                },
                None => EventKind::LeaderLost {
                    previous: previous.unwrap_or_else(|| "(none)".to_owned()),
                    reason: view.no_leader_reason.clone().unwrap_or_default(),
                },
            };
            self.events.record(Some(&self.cluster), event);
        }
        for member in &view.members {
            let was = current.member(&member.name);
            let was_readable = was.is_some_and(|m| m.readable);
            if member.readable && !was_readable {
                self.events.record(
                    Some(&self.cluster),
                    EventKind::ReadableJoined {
                        member: member.name.to_string(),
                    },
                );
            } else if was_readable && !member.readable {
                self.events.record(
                    Some(&self.cluster),
                    EventKind::ReadableLeft {
                        member: member.name.to_string(),
                        why: member.unreadable_because.unwrap_or("unknown").to_owned(),
                    },
                );
            }
        }
        for gone in current
            .members
            .iter()
            .filter(|m| m.readable && view.member(&m.name).is_none())
        {
            self.events.record(
                Some(&self.cluster),
                EventKind::ReadableLeft {
                    member: gone.name.to_string(),
                    why: "it left the cluster".to_owned(),
                },
            );
        }
        if let Some(leader) = &new_leader {
            self.last_leader = Some(leader.to_string());
        }
        self.publish_report(&view);
        self.views.send_replace(Arc::new(view));
    }

    /// `view`, whose reason for having no primary leads with etcd's
    /// refusal of the configuration while etcd refuses it: the fallback's
    /// own reason ("no member passes Patroni's /primary check") alone
    /// would hide the key to fix.
    fn with_refusal(&self, view: ClusterView) -> ClusterView {
        let Some(refusal @ EtcdTrouble::Refused { .. }) = self.link.trouble() else {
            return view;
        };
        let reason = match &view.no_leader_reason {
            Some(reason) => format!("{refusal}; {reason}"),
            None => refusal.to_string(),
        };
        view.with_no_leader_reason(reason)
    }

    pub(super) fn fuse_input(&self) -> FuseInput<'_> {
        FuseInput {
            cluster: &self.cluster,
            policy: self.settings.policy,
            on_etcd_loss: self.settings.on_etcd_loss,
            max_replica_lag: self.settings.max_replica_lag,
            directory: &self.directory,
            etcd: self.link.status(),
            rest: &self.rest,
            leader_since: self.leader_since,
            previous_leader: self.last_leader.as_deref(),
            now: Instant::now(),
            wall_now: SystemTime::now(),
        }
    }

    pub(super) fn publish_report(&self, view: &ClusterView) {
        let (etcd, etcd_down_since) = report::etcd_source(self.link.status());
        let report = ClusterReport {
            cluster: self.cluster.to_string(),
            mode: "patroni",
            leader_policy: Some(self.settings.policy.as_str()),
            on_etcd_loss: (self.link.status() != EtcdStatus::NotConfigured)
                .then_some(self.settings.on_etcd_loss.as_str()),
            rule: report::rule_name(rule(&self.fuse_input())),
            leader: view.leader().map(|m| m.name.to_string()),
            no_leader_reason: view.no_leader_reason.clone(),
            switchover: view.handover.as_ref().map(|h| {
                [
                    ("from", Some(h.from.to_string())),
                    ("to", h.to.as_deref().map(str::to_owned)),
                ]
                .into_iter()
                .collect()
            }),
            sync: self.directory.sync.as_ref().map(report::SyncReport::of),
            sources: Sources {
                etcd,
                etcd_down_since,
                patroni_rest: true,
            },
            members: report::member_reports(
                view,
                Some(&self.directory),
                &self.rest,
                &self.member_changed_at,
            ),
            view_changed_at: self.view_changed_at.clone(),
        };
        self.reports.send_replace(Arc::new(report));
    }
}
