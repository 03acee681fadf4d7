//! One owner for rolegate's long-lived tasks: each cluster's follower, the
//! admin endpoint and its upkeep, the fleet's peer listener and registry,
//! the handover server and the sibling relay of a restart.
//!
//! Each is spawned here with a [`Task`]: what it is (a metric label), the
//! words for the log, and the token that asks it to stop. None of them
//! ends on its own: one that ends unasked (returned, or panicked) is a bug
//! whose consequence would be silent (a cluster's view frozen, cancels
//! no longer routed), so it is logged, counted in
//! `rolegate_background_task_failures_total` and ends the process, which
//! a supervisor of its own (systemd, Kubernetes) restarts. Tasks asked to
//! stop (a retired follower, an admin endpoint a reload moved) are passed
//! over.
//!
//! At shutdown every task is asked to stop and given a bounded time to
//! say its farewell (the fleet's lease revoked, the handover name let go)
//! before the process exits.

use std::collections::HashMap;
use std::future::Future;
use std::time::Duration;

use tokio::task::{Id, JoinSet};
use tokio_util::sync::CancellationToken;
use tracing::{error, warn};

use crate::metrics;

/// What a supervised task is.
pub struct Task {
    /// The metric label: `follower`, `admin`, `fleet_registry`, …
    pub kind: &'static str,
    /// The cluster a follower follows, for the metric; empty otherwise.
    pub cluster: String,
    /// The words for the log, e.g. `the follower of cluster "demo"`.
    pub label: String,
    /// Cancelled when the task is asked to stop.
    pub stop: CancellationToken,
}

/// The long-lived tasks of the process.
#[derive(Default)]
pub struct Supervisor {
    running: JoinSet<()>,
    tasks: HashMap<Id, Task>,
}

impl Supervisor {
    /// Runs `work` as `task`.
    pub fn spawn(&mut self, task: Task, work: impl Future<Output = ()> + Send + 'static) {
        let handle = self.running.spawn(work);
        self.tasks.insert(handle.id(), task);
    }

    /// Resolves when a task ends unasked, with what it was; never, if none
    /// does. Logged and counted. Cancel-safe: a task that has not ended
    /// stays supervised.
    pub async fn first_failure(&mut self) -> String {
        loop {
            let Some(ended) = self.running.join_next_with_id().await else {
                return std::future::pending().await;
            };
            let (id, panic) = match ended {
                Ok((id, ())) => (id, None),
                Err(e) => (e.id(), e.is_panic().then(|| e.to_string())),
            };
            let Some(task) = self.tasks.remove(&id) else {
                continue;
            };
            if task.stop.is_cancelled() {
                continue;
            }
            metrics::background_task_failed(&task.cluster, task.kind);
            let how = match panic {
                Some(panic) => format!("{} failed: {panic}", task.label),
                None => format!("{} stopped", task.label),
            };
            error!(task = task.kind, "{how}");
            return how;
        }
    }

    /// Asks every task to stop, and waits up to `limit` for all of them to
    /// end, each after its farewell.
    pub async fn farewell(&mut self, limit: Duration) {
        for task in self.tasks.values() {
            task.stop.cancel();
        }
        let running = &mut self.running;
        let ended = async { while running.join_next().await.is_some() {} };
        if tokio::time::timeout(limit, ended).await.is_err() {
            let left: Vec<_> = self.tasks.values().map(|t| t.label.as_str()).collect();
            warn!(
                tasks = self.running.len(),
                "background tasks still running at exit: {}",
                left.join(", ")
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn task(kind: &'static str, stop: &CancellationToken) -> Task {
        Task {
            kind,
            cluster: String::new(),
            label: format!("the {kind}"),
            stop: stop.clone(),
        }
    }

    #[tokio::test]
    async fn a_task_that_ends_unasked_is_reported_and_one_asked_to_stop_is_not() {
        let mut supervisor = Supervisor::default();
        let retired = CancellationToken::new();
        let waiting = retired.clone();
        supervisor.spawn(task("retired", &retired), async move {
            waiting.cancelled().await;
        });
        retired.cancel();
        let kept = CancellationToken::new();
        let waiting = kept.clone();
        supervisor.spawn(task("kept", &kept), async move {
            waiting.cancelled().await;
        });
        supervisor.spawn(task("broken", &CancellationToken::new()), async {
            panic!("a bug");
        });
        let failure = tokio::time::timeout(Duration::from_secs(5), supervisor.first_failure())
            .await
            .expect("the panic is reported");
        assert!(failure.starts_with("the broken failed"), "{failure}");
        supervisor.farewell(Duration::from_secs(5)).await;
        assert!(kept.is_cancelled(), "farewell asks every task to stop");
        assert_eq!(supervisor.running.len(), 0);
    }
}
