//! The event timeline: what happened to each cluster, newest first, for
//! `/events`, the status page and `rolegate status`.
//!
//! Each cluster keeps its last [`CAPACITY`] events in memory (process-wide
//! events such as configuration reloads have a list of their own). Events
//! are rare next to packets: a leader change, a REST check that answers
//! differently, a reload. Recording one takes a lock that only recorders
//! and admin requests share; the data path never touches it, except one
//! atomic load per new session while a new leader waits for its first
//! session (see [`EventLog::session_served`]).
//!
//! Sessions that rolegate ends, and holds that time out, come in bursts (a
//! demotion ends every session on a member at once): each is counted into
//! the newest event of its kind, member and reason when that is less than
//! [`COUNT_WINDOW`] old, so a burst is one event with a count.

mod failover;
mod kind;

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use serde::Serialize;

pub use failover::{last_failover, FailoverPhases};
pub use kind::EventKind;

/// Events kept per cluster (and for the process).
pub const CAPACITY: usize = 500;
/// How long a counted event keeps counting more of the same.
pub const COUNT_WINDOW: Duration = Duration::from_secs(5);

/// One event: when, where, what.
#[derive(Debug, Clone, Serialize)]
pub struct Event {
    /// Increases by one with every event of the process.
    pub seq: u64,
    #[serde(serialize_with = "rfc3339")]
    pub at: SystemTime,
    /// The cluster, or `None` for the process (configuration reloads).
    pub cluster: Option<Arc<str>>,
    pub summary: String,
    #[serde(flatten)]
    pub kind: EventKind,
}

fn rfc3339<S: serde::Serializer>(at: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(&humantime::format_rfc3339_millis(*at))
}

/// The timeline of every cluster of the process.
#[derive(Default)]
pub struct EventLog {
    timelines: Mutex<HashMap<Option<Arc<str>>, VecDeque<Event>>>,
    next_seq: AtomicU64,
    /// Clusters whose new leader has served no session yet, with that
    /// leader; `awaiting` is set while the map is not empty.
    first_session: Mutex<HashMap<Arc<str>, Arc<str>>>,
    awaiting: AtomicBool,
}

impl EventLog {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    fn timelines(&self) -> MutexGuard<'_, HashMap<Option<Arc<str>>, VecDeque<Event>>> {
        // Each change is one push or one count: a panic cannot leave a
        // timeline half-changed, so a poisoned lock is still usable.
        self.timelines.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Logs the event and adds it to its cluster's timeline.
    pub fn record(&self, cluster: Option<&Arc<str>>, kind: EventKind) {
        kind.log(cluster.map(|c| &**c));
        if let EventKind::LeaderConfirmed {
            leader,
            previous: Some(previous),
            ..
        } = &kind
        {
            if let Some(cluster) = cluster.filter(|_| previous != leader) {
                self.await_first_session(cluster, leader);
            }
        }
        self.push(cluster.cloned(), kind, SystemTime::now());
    }

    /// Counts a session that rolegate ended (not logged here: the session
    /// logs its own end).
    pub fn session_ended(&self, cluster: &Arc<str>, member: &str, reason: &str) {
        self.count(
            cluster,
            EventKind::SessionsEnded {
                member: member.to_owned(),
                reason: reason.to_owned(),
                count: 1,
            },
        );
    }

    /// Counts a new session refused after its hold timed out.
    pub fn hold_timed_out(&self, cluster: &Arc<str>, role: &'static str, reason: &str) {
        self.count(
            cluster,
            EventKind::HoldsTimedOut {
                role,
                reason: reason.to_owned(),
                count: 1,
            },
        );
    }

    fn count(&self, cluster: &Arc<str>, kind: EventKind) {
        let now = SystemTime::now();
        {
            let mut timelines = self.timelines();
            if let Some(newest) = timelines.get_mut(&Some(Arc::clone(cluster))).and_then(|t| {
                t.iter_mut()
                    .rev()
                    .find(|e| std::mem::discriminant(&e.kind) == std::mem::discriminant(&kind))
            }) {
                let recent = now
                    .duration_since(newest.at)
                    .is_ok_and(|age| age < COUNT_WINDOW);
                if recent && newest.kind.absorb(&kind) {
                    newest.summary = newest.kind.summary();
                    return;
                }
            }
        }
        self.push(Some(Arc::clone(cluster)), kind, now);
    }

    fn push(&self, cluster: Option<Arc<str>>, kind: EventKind, at: SystemTime) {
        let event = Event {
            seq: self.next_seq.fetch_add(1, Ordering::Relaxed),
            at,
            summary: kind.summary(),
            cluster: cluster.clone(),
            kind,
        };
        let mut timelines = self.timelines();
        let timeline = timelines.entry(cluster).or_default();
        if timeline.len() == CAPACITY {
            timeline.pop_front();
        }
        timeline.push_back(event);
    }

    fn await_first_session(&self, cluster: &Arc<str>, leader: &str) {
        let mut waiting = self.first_session.lock().unwrap_or_else(|p| p.into_inner());
        waiting.insert(Arc::clone(cluster), leader.into());
        self.awaiting.store(true, Ordering::Release);
    }

    /// A session of `cluster` was established on `member`: if that member
    /// is a new leader that had served none yet, records the first one.
    /// One atomic load unless a new leader waits.
    pub fn session_served(&self, cluster: &Arc<str>, member: &str) {
        if !self.awaiting.load(Ordering::Acquire) {
            return;
        }
        let first = {
            let mut waiting = self.first_session.lock().unwrap_or_else(|p| p.into_inner());
            let first = waiting.get(cluster).is_some_and(|m| &**m == member);
            if first {
                waiting.remove(cluster);
            }
            self.awaiting.store(!waiting.is_empty(), Ordering::Release);
            first
        };
        if first {
            self.record(
                Some(cluster),
                EventKind::FirstSessionServed {
                    member: member.to_owned(),
                },
            );
        }
    }

    /// Events newest first: of one cluster (and the process's) when
    /// `cluster` is given, of all otherwise; only those after `since`.
    pub fn query(&self, cluster: Option<&str>, since: Option<SystemTime>) -> Vec<Event> {
        let timelines = self.timelines();
        let mut events: Vec<Event> = timelines
            .iter()
            .filter(|(c, _)| match (cluster, c) {
                (Some(wanted), Some(c)) => &**c == wanted,
                _ => true,
            })
            .flat_map(|(_, timeline)| timeline.iter())
            .filter(|e| since.is_none_or(|since| e.at > since))
            .cloned()
            .collect();
        events.sort_by_key(|e| std::cmp::Reverse(e.seq));
        events
    }

    /// The phases of `cluster`'s last leader change, if its timeline holds
    /// one.
    pub fn last_failover(&self, cluster: &str) -> Option<FailoverPhases> {
        let timelines = self.timelines();
        let timeline = timelines.get(&Some(Arc::from(cluster)))?;
        let events: Vec<&Event> = timeline.iter().collect();
        last_failover(&events)
    }
}

#[cfg(test)]
mod tests;
