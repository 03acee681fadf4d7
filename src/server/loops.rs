//! The event loops that sessions run on.
//!
//! rolegate runs sessions on `[runtime] worker_threads` loops: the main
//! runtime, and one single-threaded runtime per further thread.
//! Each loop has its own epoll set and timers, and a session stays on the
//! loop that accepted it, which is HAProxy's model (`nbthread`) rather than
//! a work-stealing pool: with one intake of events the CPUs sit idle while
//! the proxy's thread waits to be scheduled, which work-stealing workers
//! do not change, and independent loops keep them busy.
//!
//! Loop 0, the runtime `main` starts, is single-threaded like the others
//! rather than a multi-threaded runtime with one worker: the same one
//! thread of work, for fewer instructions per connection, the
//! work-stealing scheduler's queues and parking being of no use to a
//! single worker. (Both measured: BENCHMARKS.md, "Measurements behind the
//! design".)
//! The price: what the main task does synchronously now holds up loop 0's
//! sessions, where it used to have the main thread to itself. That is a
//! reload (reading the configuration and TLS files, binding new
//! listeners): 1.6 ms from SIGHUP to "reloaded" under `strace`, for a
//! configuration without TLS files.
//!
//! Every loop accepts on a listening socket of its own (see
//! [`super::listener_set`]), so a connection never moves between loops: an
//! earlier design accepted on the main loop and handed each connection to
//! the next loop, which cost two `epoll_ctl` calls and a cross-thread
//! wake-up per connection.

use std::future::Future;
use std::io;

use tokio::runtime::{Builder, Handle};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// Handles to the session loops, loop 0 being the main runtime's.
pub struct Loops {
    handles: Vec<Handle>,
}

impl Loops {
    /// Loop 0 is the runtime the caller runs on; starts `count - 1` more,
    /// each on a thread of its own, which run until `stop`.
    pub fn start(count: usize, stop: &CancellationToken) -> io::Result<Self> {
        let mut handles = vec![Handle::current()];
        for i in 1..count {
            let runtime = Builder::new_current_thread().enable_all().build()?;
            handles.push(runtime.handle().clone());
            let stop = stop.clone();
            std::thread::Builder::new()
                .name(format!("rolegate-loop-{i}"))
                .spawn(move || runtime.block_on(stop.cancelled_owned()))?;
        }
        Ok(Self { handles })
    }

    /// How many loops there are (at least one).
    pub fn count(&self) -> usize {
        self.handles.len()
    }

    /// Runs `task` on loop `index` (modulo the loop count).
    pub fn spawn_on<F>(&self, index: usize, task: F) -> JoinHandle<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.handles[index % self.handles.len()].spawn(task)
    }
}
