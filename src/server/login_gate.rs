//! Pacing backend logins: at most `limits.backend_logins` logins to one
//! member at a time, the rest queued in arrival order.
//!
//! After a failover every application reconnects at once, and rolegate
//! holds their sessions until the new leader is confirmed. Released all at
//! the same instant, they start hundreds of logins on one server (a fork,
//! the backend's start-up, SCRAM), each of which then takes about as long
//! as all of them together. Clients' connect timeouts expire mid-login,
//! each retry starts the work over, and the storm feeds itself
//! (BENCHMARKS.md, "Measurements behind the design"). Let through a few at
//! a time, logins finish at
//! the server's pace; a queued client that gives up leaves the queue
//! without having cost the server anything (the session watches its
//! client while it waits).
//!
//! Who goes next matters as much as how many. Clients give up after
//! their own connect timeout (libpq's `connect_timeout`, a pool's), so
//! the session accepted last has the most patience left, and the one
//! accepted first is the likeliest to leave mid-login and waste it. In
//! arrival order, sessions released together after a hold are served
//! oldest first, and nearly every one times out before its turn. So a
//! queue is served newest first (by the time its connection was
//! accepted). With no queue, as in normal operation, order is moot; under
//! a lasting overload the oldest wait longest, at most `hold_timeout`.
//!
//! A slot is held from the backend connect until the login ends, except
//! that a client slow to answer its authentication request gives its slot
//! up after [`CLIENT_TURN_GRACE`]: the login goes on, but a handful of
//! clients that never answer cannot stop everyone else's.
//!
//! The gates live in one registry, by cluster and member, so every
//! listener's sessions to a member share its slots. Each entry reads the
//! limit in force, so a reload's new value applies to the next login.

use std::collections::BinaryHeap;
use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use crate::fast_map::FastMap;
use crate::metrics;
use crate::protocol::{ProtocolError, SqlState};

/// How long a client may take to answer an authentication request before
/// its login stops counting against the member's slots.
pub const CLIENT_TURN_GRACE: Duration = Duration::from_secs(1);

/// Every member's gate, by cluster and member name.
#[derive(Default)]
pub struct LoginGates {
    gates: Mutex<FastMap<Arc<str>, MemberGates>>,
}

/// One cluster's gates, by member name.
type MemberGates = FastMap<Arc<str>, Arc<Gate>>;

/// One member's logins: how many are in flight, and who waits.
#[derive(Default)]
struct Gate {
    state: Mutex<GateState>,
}

#[derive(Default)]
struct GateState {
    in_flight: usize,
    /// The limit the last entry read; `usize::MAX` for no bound.
    limit: usize,
    waiting: BinaryHeap<Waiter>,
    /// Breaks ties between sessions accepted at the same instant.
    arrivals: u64,
}

/// A queued session: served newest accepted first. Its sender fails once
/// the session stopped waiting (its client left, its hold ran out).
struct Waiter {
    accepted: Instant,
    arrival: u64,
    wake: oneshot::Sender<LoginSlot>,
}

impl PartialEq for Waiter {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other).is_eq()
    }
}
impl Eq for Waiter {}
impl PartialOrd for Waiter {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Waiter {
    /// The greatest (served first) is the latest accepted, then the latest
    /// to arrive at the gate.
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.accepted, self.arrival).cmp(&(other.accepted, other.arrival))
    }
}

/// A login's place among its member's slots, held until the login ends.
/// Dropping it frees the slot (for the next waiter, if there is one).
#[derive(Default)]
pub struct LoginSlot(Option<Arc<Gate>>);

impl LoginGates {
    /// Waits, until `until` at the latest, for one of `slots` login slots
    /// of `member` of `cluster` (`slots == 0`: no bound), for a session
    /// whose connection was accepted at `accepted`.
    pub async fn enter(
        &self,
        cluster: &Arc<str>,
        member: &Arc<str>,
        slots: usize,
        accepted: Instant,
        until: Instant,
    ) -> Result<LoginSlot, QueueTimeout> {
        if slots == 0 {
            return Ok(LoginSlot(None));
        }
        let gate = self.gate(cluster, member);
        let waiting = {
            let mut state = gate.lock();
            state.limit = slots;
            if state.waiting.is_empty() && state.in_flight < state.limit {
                state.in_flight += 1;
                drop(state);
                return Ok(LoginSlot(Some(gate)));
            }
            let (wake, waiting) = oneshot::channel();
            state.arrivals += 1;
            let arrival = state.arrivals;
            state.waiting.push(Waiter {
                accepted,
                arrival,
                wake,
            });
            waiting
        };
        // Room may be left (a raised limit, a slot freed meanwhile): the
        // newest waiter takes it, which may be this one.
        Gate::admit(&gate);
        let started = Instant::now();
        let _queued = metrics::queued_login(cluster, member);
        match tokio::time::timeout_at(until.into(), waiting).await {
            Ok(Ok(slot)) => Ok(slot),
            // A waiter's sender is only dropped by serving it.
            Ok(Err(_)) | Err(_) => Err(QueueTimeout {
                member: Arc::clone(member),
                cluster: Arc::clone(cluster),
                slots,
                waited: started.elapsed(),
            }),
        }
    }

    /// `member`'s gate, made when first needed.
    fn gate(&self, cluster: &Arc<str>, member: &Arc<str>) -> Arc<Gate> {
        let mut gates = self.gates.lock().unwrap_or_else(|e| e.into_inner());
        let members = match gates.get_mut(&**cluster) {
            Some(members) => members,
            None => gates.entry(Arc::clone(cluster)).or_default(),
        };
        match members.get(&**member) {
            Some(gate) => Arc::clone(gate),
            None => Arc::clone(members.entry(Arc::clone(member)).or_default()),
        }
    }
}

impl Gate {
    fn lock(&self) -> MutexGuard<'_, GateState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Gives free slots to the newest waiters still waiting. Slots are
    /// sent with the lock released: a slot refused by a waiter that just
    /// left would otherwise be dropped under it.
    fn admit(gate: &Arc<Gate>) {
        loop {
            let waiter = {
                let mut state = gate.lock();
                if state.in_flight >= state.limit {
                    return;
                }
                let Some(waiter) = state.waiting.pop() else {
                    return;
                };
                state.in_flight += 1;
                waiter
            };
            if let Err(mut refused) = waiter.wake.send(LoginSlot(Some(Arc::clone(gate)))) {
                refused.0 = None;
                gate.lock().in_flight -= 1;
            }
        }
    }
}

impl Drop for LoginSlot {
    fn drop(&mut self) {
        if let Some(gate) = self.0.take() {
            gate.lock().in_flight -= 1;
            Gate::admit(&gate);
        }
    }
}

impl LoginSlot {
    /// Runs `turn`, a wait for the client's answer, giving the slot up if
    /// the client takes longer than [`CLIENT_TURN_GRACE`].
    pub async fn client_turn<F: Future>(&mut self, turn: F) -> F::Output {
        if self.0.is_none() {
            return turn.await;
        }
        tokio::pin!(turn);
        tokio::select! {
            answered = &mut turn => answered,
            () = tokio::time::sleep(CLIENT_TURN_GRACE) => {
                *self = LoginSlot(None);
                turn.await
            }
        }
    }
}

/// A login that waited for a slot until the hold time ran out.
#[derive(Debug, Clone)]
pub struct QueueTimeout {
    member: Arc<str>,
    cluster: Arc<str>,
    slots: usize,
    waited: Duration,
}

impl QueueTimeout {
    /// What happened, in a few words: the reason the event log records a
    /// hold that ran out under.
    pub fn reason(&self) -> String {
        format!(
            "member {} of cluster {} is slow to accept logins: this session waited {:.1}s for one \
             of its {} login slots (limits.backend_logins) and the hold time ran out",
            self.member,
            self.cluster,
            self.waited.as_secs_f64(),
            self.slots
        )
    }

    /// The FATAL the client receives.
    pub fn to_error(&self) -> ProtocolError {
        ProtocolError::new(
            SqlState::CANNOT_CONNECT_NOW,
            format!(
                "{}; try again, or raise limits.backend_logins or limits.hold_timeout",
                self.reason()
            ),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The gate of member pg1 of cluster main, as the tests use it.
    #[derive(Clone)]
    struct Pg1 {
        gates: Arc<LoginGates>,
        cluster: Arc<str>,
        member: Arc<str>,
    }

    impl Pg1 {
        fn new() -> Self {
            Self {
                gates: Arc::new(LoginGates::default()),
                cluster: Arc::from("main"),
                member: Arc::from("pg1"),
            }
        }

        /// Enters with `slots` slots for a session accepted at `accepted`,
        /// waiting at most `wait`.
        async fn enter(
            &self,
            slots: usize,
            accepted: Instant,
            wait: Duration,
        ) -> Result<LoginSlot, QueueTimeout> {
            let until = Instant::now() + wait;
            (self.gates)
                .enter(&self.cluster, &self.member, slots, accepted, until)
                .await
        }

        /// Takes a slot that is free.
        async fn take(&self, slots: usize) -> LoginSlot {
            self.enter(slots, Instant::now(), Duration::from_millis(1))
                .await
                .expect("a free slot")
        }

        /// Enters from a task of its own.
        fn spawn_enter(
            &self,
            slots: usize,
            accepted: Instant,
            wait: Duration,
        ) -> tokio::task::JoinHandle<Result<LoginSlot, QueueTimeout>> {
            let me = self.clone();
            tokio::spawn(async move { me.enter(slots, accepted, wait).await })
        }
    }

    const LONG: Duration = Duration::from_secs(5);

    #[tokio::test]
    async fn no_bound_gives_a_slot_that_holds_nothing() {
        assert!(Pg1::new().take(0).await.0.is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn a_queue_is_served_newest_accepted_first() {
        let pg1 = Pg1::new();
        let first = pg1.take(1).await;
        let origin = Instant::now();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        // Accepted in the order 1, 3, 2; queued in the order 1, 2, 3.
        for accepted_ms in [1u64, 3, 2] {
            let (pg1, tx) = (pg1.clone(), tx.clone());
            let accepted = origin + Duration::from_millis(accepted_ms);
            tokio::spawn(async move {
                let slot = pg1.enter(1, accepted, LONG).await.expect("a slot");
                tx.send(accepted_ms).expect("receiver");
                tokio::time::sleep(Duration::from_millis(10)).await;
                drop(slot);
            });
            tokio::task::yield_now().await;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(rx.try_recv().is_err(), "a login went past the full gate");
        drop(first);
        let mut order = Vec::new();
        for _ in 0..3 {
            order.push(rx.recv().await.expect("a login"));
        }
        assert_eq!(order, [3, 2, 1]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_waiter_that_left_is_passed_over() {
        let pg1 = Pg1::new();
        let first = pg1.take(1).await;
        let older = Instant::now();
        // The newest waiter gives up before the slot is free.
        let newer = older + Duration::from_millis(1);
        let leaving = pg1.spawn_enter(1, newer, Duration::from_millis(100));
        let staying = pg1.spawn_enter(1, older, LONG);
        assert!(leaving.await.expect("task").is_err(), "the hold ran out");
        drop(first);
        let slot = staying.await.expect("task");
        assert!(slot.is_ok(), "the remaining waiter got the slot");
        drop(slot);
        pg1.take(1).await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_queued_login_gives_up_when_the_hold_time_runs_out() {
        let pg1 = Pg1::new();
        let _held = pg1.take(1).await;
        let Err(e) = pg1
            .enter(1, Instant::now(), Duration::from_millis(200))
            .await
        else {
            panic!("entered a full gate");
        };
        let e = e.to_error();
        assert_eq!(e.sqlstate, SqlState::CANNOT_CONNECT_NOW);
        assert!(e.message.contains("limits.backend_logins"), "{}", e.message);
        assert!(e.message.contains("pg1"), "{}", e.message);
    }

    #[tokio::test(start_paused = true)]
    async fn members_have_separate_gates() {
        let pg1 = Pg1::new();
        let _held = pg1.take(1).await;
        let pg2 = Pg1 {
            member: Arc::from("pg2"),
            ..pg1.clone()
        };
        pg2.take(1).await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_raised_limit_lets_the_queue_move() {
        let pg1 = Pg1::new();
        let _held = pg1.take(1).await;
        let queued = pg1.spawn_enter(1, Instant::now(), LONG);
        tokio::time::sleep(Duration::from_millis(10)).await;
        let _second = pg1.take(3).await;
        assert!(
            queued.await.expect("task").is_ok(),
            "the queued login was let in too"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_client_gives_its_slot_up() {
        let pg1 = Pg1::new();
        let mut slot = pg1.take(1).await;
        slot.client_turn(tokio::time::sleep(Duration::from_millis(10)))
            .await;
        assert!(slot.0.is_some(), "a prompt answer keeps the slot");
        slot.client_turn(tokio::time::sleep(CLIENT_TURN_GRACE * 2))
            .await;
        assert!(slot.0.is_none(), "a slow answer gives it up");
        pg1.take(1).await;
    }
}
