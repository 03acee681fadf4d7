//! The phases of a leader change, read back from a cluster's timeline:
//! how long the request, the old leader stopping, the leader key moving,
//! rolegate's confirmation and the first session on the new leader each
//! took. A switchover starts at its request; a failover (the leader died)
//! at the first sign of it: its REST check failing, its leader key
//! released, or else rolegate losing its confirmation.

use std::time::SystemTime;

use serde::Serialize;

use super::{Event, EventKind};

/// One phase: what happened, when, and how long after the phase before.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Phase {
    pub phase: &'static str,
    #[serde(serialize_with = "super::rfc3339")]
    pub at: SystemTime,
    /// Milliseconds since the previous phase (0 for the first).
    pub took_ms: u64,
}

/// A leader change, from `from` to `to`, in phases.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FailoverPhases {
    pub from: String,
    pub to: String,
    /// `switchover` when it was requested, `failover` otherwise.
    pub kind: &'static str,
    pub phases: Vec<Phase>,
    /// From the first phase to the last.
    pub total_ms: u64,
}

pub const REQUESTED: &str = "requested";
pub const LEADER_LOST: &str = "leader lost";
pub const OLD_LEADER_STOPPED: &str = "old leader stopped";
pub const KEY_MOVED: &str = "leader key moved";
pub const CONFIRMED: &str = "new leader confirmed";
pub const FIRST_SESSION: &str = "first session served";

/// The last leader change in `events` (oldest first), or `None` when the
/// timeline has none.
pub fn last_failover(events: &[&Event]) -> Option<FailoverPhases> {
    let (confirmed_at, (to, from)) = events.iter().enumerate().rev().find_map(|(i, e)| match &e
        .kind
    {
        EventKind::LeaderConfirmed {
            leader,
            previous: Some(previous),
            ..
        } if previous != leader => Some((i, (leader.clone(), previous.clone()))),
        _ => None,
    })?;
    // The change's own events: after the old leader was last confirmed.
    let start = events[..confirmed_at]
        .iter()
        .rposition(
            |e| matches!(&e.kind, EventKind::LeaderConfirmed { leader, .. } if *leader == from),
        )
        .map_or(0, |i| i + 1);
    let before = &events[start..confirmed_at];
    let first =
        |wanted: &dyn Fn(&EventKind) -> bool| before.iter().find(|e| wanted(&e.kind)).map(|e| e.at);
    let requested = before
        .iter()
        .rev()
        .find(|e| matches!(e.kind, EventKind::SwitchoverRequested { .. }))
        .map(|e| e.at);
    let stopped = first(&|k| match k {
        EventKind::RestCheckChanged {
            member, from: was, ..
        } => *member == from && was == "primary",
        EventKind::LeaderKeyChanged { from: Some(f), to } => {
            *f == from && to.as_deref() != Some(&from)
        }
        _ => false,
    });
    // rolegate stops confirming a leader at a switchover's request (new
    // writes are held from then on), so losing the confirmation is no
    // sign that the old leader stopped; without a request it is where a
    // failover shows first, when nothing else showed it.
    let lost = before
        .iter()
        .find(|e| matches!(&e.kind, EventKind::LeaderLost { previous, .. } if *previous == from))
        .map(|e| e.at);
    let moved = before
        .iter()
        .rev()
        .find(|e| matches!(&e.kind, EventKind::LeaderKeyChanged { to: Some(t), .. } if *t == to))
        .map(|e| e.at);
    let served = events[confirmed_at + 1..]
        .iter()
        .find(|e| matches!(&e.kind, EventKind::FirstSessionServed { member } if *member == to))
        .map(|e| e.at);
    let marks = [
        (REQUESTED, requested),
        (
            LEADER_LOST,
            lost.filter(|_| requested.is_none() && stopped.is_none()),
        ),
        (OLD_LEADER_STOPPED, stopped),
        (KEY_MOVED, moved),
        (CONFIRMED, Some(events[confirmed_at].at)),
        (FIRST_SESSION, served),
    ];
    let mut marks: Vec<_> = marks
        .into_iter()
        .filter_map(|(phase, at)| Some((phase, at?)))
        .collect();
    // Sources disagree on order now and then (a REST check answers before
    // etcd shows the key released): the phases are listed as they came.
    marks.sort_by_key(|(_, at)| *at);
    let mut phases: Vec<Phase> = Vec::new();
    for (phase, at) in marks {
        let took_ms = phases.last().map_or(0, |p| millis_between(p.at, at));
        phases.push(Phase { phase, at, took_ms });
    }
    let total_ms = match (phases.first(), phases.last()) {
        (Some(a), Some(b)) => millis_between(a.at, b.at),
        _ => 0,
    };
    Some(FailoverPhases {
        from,
        to,
        kind: if requested.is_some() {
            "switchover"
        } else {
            "failover"
        },
        phases,
        total_ms,
    })
}

fn millis_between(earlier: SystemTime, later: SystemTime) -> u64 {
    later
        .duration_since(earlier)
        .map_or(0, |d| d.as_millis() as u64)
}
