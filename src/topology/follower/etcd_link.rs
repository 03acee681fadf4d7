//! The follower's link to etcd, as a state machine of its own: not
//! configured, connecting (nothing read yet), up, reconnecting (lost a
//! moment ago: routing goes on from the last state read until
//! [`ETCD_RECONNECT_GRACE`] ends), down (`on_etcd_loss` decides).
//!
//! Each transition returns the events to record; the follower records
//! them and sets the metrics. Nothing here does I/O or reads a clock
//! other than the `now` it is given.

use tokio::time::Instant;

use super::ETCD_RECONNECT_GRACE;
use crate::config::EtcdLossPolicy;
use crate::etcd::trouble::EtcdTrouble;
use crate::events::EventKind;
use crate::topology::fuse::EtcdStatus;

pub(super) struct EtcdLink {
    status: EtcdStatus,
    /// Why etcd was last unreachable, while it is.
    trouble: Option<EtcdTrouble>,
}

impl EtcdLink {
    pub(super) fn new(configured: bool) -> Self {
        Self {
            status: if configured {
                EtcdStatus::Connecting
            } else {
                EtcdStatus::NotConfigured
            },
            trouble: None,
        }
    }

    pub(super) fn status(&self) -> EtcdStatus {
        self.status
    }

    pub(super) fn trouble(&self) -> Option<&EtcdTrouble> {
        self.trouble.as_ref()
    }

    /// A full read arrived: etcd is up. The event, when it had been lost.
    pub(super) fn read(&mut self) -> Option<EventKind> {
        let regained = match self.status {
            EtcdStatus::Down { since } => Some((since, false)),
            EtcdStatus::Reconnecting { since } => Some((since, true)),
            EtcdStatus::NotConfigured | EtcdStatus::Connecting | EtcdStatus::Up => None,
        };
        self.status = EtcdStatus::Up;
        self.trouble = None;
        regained.map(|(since, within_grace)| EventKind::EtcdRegained {
            down_ms: since.elapsed().as_millis() as u64,
            within_grace,
        })
    }

    /// The connection failed for `reason`. Up, it starts the grace period;
    /// never read, etcd is lost at once (there is no state to go on).
    /// Already failing, nothing changes but the reason.
    pub(super) fn failed(
        &mut self,
        reason: EtcdTrouble,
        now: Instant,
        on_loss: EtcdLossPolicy,
    ) -> Option<EventKind> {
        let event = match self.status {
            EtcdStatus::Up => {
                self.status = EtcdStatus::Reconnecting { since: now };
                Some(EventKind::EtcdReconnecting {
                    reason: reason.to_string(),
                    grace_ms: ETCD_RECONNECT_GRACE.as_millis() as u64,
                })
            }
            EtcdStatus::Connecting => {
                self.status = EtcdStatus::Reconnecting { since: now };
                self.trouble = Some(reason);
                return self.grace_over(on_loss);
            }
            EtcdStatus::Reconnecting { .. }
            | EtcdStatus::Down { .. }
            | EtcdStatus::NotConfigured => None,
        };
        self.trouble = Some(reason);
        event
    }

    /// When the grace period of a lost connection ends, if one runs.
    pub(super) fn grace_ends(&self) -> Option<Instant> {
        match self.status {
            EtcdStatus::Reconnecting { since } => Some(since + ETCD_RECONNECT_GRACE),
            _ => None,
        }
    }

    /// The grace period ended without etcd: from now on `on_etcd_loss`
    /// decides, counting from the moment the connection was lost.
    pub(super) fn grace_over(&mut self, on_loss: EtcdLossPolicy) -> Option<EventKind> {
        let EtcdStatus::Reconnecting { since } = self.status else {
            return None;
        };
        self.status = EtcdStatus::Down { since };
        Some(EventKind::EtcdLost {
            reason: self
                .trouble
                .as_ref()
                .map_or_else(|| "no reason given".to_owned(), ToString::to_string),
            on_etcd_loss: on_loss.as_str(),
        })
    }

    /// The task that watches etcd failed (`why`): nothing follows etcd any
    /// more, so it is lost at once, from when it was first lost if it was.
    pub(super) fn task_failed(
        &mut self,
        why: &str,
        now: Instant,
        on_loss: EtcdLossPolicy,
    ) -> Option<EventKind> {
        let since = match self.status {
            EtcdStatus::Reconnecting { since } | EtcdStatus::Down { since } => since,
            _ => now,
        };
        self.status = EtcdStatus::Reconnecting { since };
        self.trouble = Some(EtcdTrouble::Lost(format!(
            "the etcd watch task failed: {why}"
        )));
        self.grace_over(on_loss)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LOSS: EtcdLossPolicy = EtcdLossPolicy::Patroni;

    fn lost(reason: &str) -> EtcdTrouble {
        EtcdTrouble::Lost(reason.to_owned())
    }

    #[tokio::test(start_paused = true)]
    async fn a_short_loss_is_bridged_and_a_long_one_is_not() {
        let mut link = EtcdLink::new(true);
        assert_eq!(link.status(), EtcdStatus::Connecting);
        assert!(link.read().is_none(), "the first read is no regain");
        assert_eq!(link.status(), EtcdStatus::Up);

        let now = Instant::now();
        let event = link.failed(lost("reset"), now, LOSS);
        assert!(
            matches!(event, Some(EventKind::EtcdReconnecting { .. })),
            "{event:?}"
        );
        assert_eq!(link.grace_ends(), Some(now + ETCD_RECONNECT_GRACE));
        assert!(link.failed(lost("again"), now, LOSS).is_none());
        assert!(matches!(
            link.read(),
            Some(EventKind::EtcdRegained {
                within_grace: true,
                ..
            })
        ));
        assert!(link.trouble().is_none());

        link.failed(lost("gone"), Instant::now(), LOSS);
        let event = link.grace_over(LOSS);
        assert!(
            matches!(&event, Some(EventKind::EtcdLost { reason, .. }) if reason.contains("gone")),
            "{event:?}"
        );
        assert!(matches!(link.status(), EtcdStatus::Down { .. }));
        assert!(link.grace_ends().is_none());
        assert!(link.grace_over(LOSS).is_none(), "lost once");
        assert!(matches!(
            link.read(),
            Some(EventKind::EtcdRegained {
                within_grace: false,
                ..
            })
        ));
    }

    #[test]
    fn etcd_never_read_is_lost_at_once_and_a_failed_task_too() {
        let mut link = EtcdLink::new(true);
        let event = link.failed(lost("refused"), Instant::now(), LOSS);
        assert!(
            matches!(event, Some(EventKind::EtcdLost { .. })),
            "{event:?}"
        );
        assert!(matches!(link.status(), EtcdStatus::Down { .. }));

        let mut link = EtcdLink::new(true);
        link.read();
        let event = link.task_failed("a panic", Instant::now(), LOSS);
        assert!(
            matches!(&event, Some(EventKind::EtcdLost { reason, .. }) if reason.contains("a panic")),
            "{event:?}"
        );
        assert!(EtcdLink::new(false)
            .failed(lost("x"), Instant::now(), LOSS)
            .is_none());
    }
}
