//! The event loops that sessions run on.
//!
//! rolegate runs sessions on `[runtime] worker_threads` loops: the main
//! runtime's worker, and one single-threaded runtime per further thread.
//! Each loop has its own epoll set and timers, and a session stays on the
//! loop it was handed to, which is HAProxy's model (`nbthread`) rather than
//! a work-stealing pool. Measured on 2 shared CPUs: with one intake of
//! events, the CPUs sat 4-8% idle while the proxy's thread waited to be
//! scheduled, and two work-stealing workers did not change that; two
//! independent loops kept the CPUs busy (BENCHMARKS.md).
//!
//! The accept loops stay on the main runtime and hand each accepted
//! connection to the next loop, round robin. The handover moves the socket
//! from one epoll set to another (two `epoll_ctl` calls) before the
//! session reads anything.

use std::future::Future;
use std::io;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::net::TcpStream;
use tokio::runtime::{Builder, Handle};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::warn;

/// The session loops beside the main runtime's own.
pub struct Loops {
    others: Vec<Handle>,
    next: AtomicUsize,
}

impl Loops {
    /// Loop 0 is the runtime the caller runs on; starts `count - 1` more,
    /// each on a thread of its own, which run until `stop`.
    pub fn start(count: usize, stop: &CancellationToken) -> io::Result<Self> {
        let mut others = Vec::new();
        for i in 1..count {
            let runtime = Builder::new_current_thread().enable_all().build()?;
            others.push(runtime.handle().clone());
            let stop = stop.clone();
            std::thread::Builder::new()
                .name(format!("rolegate-loop-{i}"))
                .spawn(move || runtime.block_on(stop.cancelled_owned()))?;
        }
        Ok(Self {
            others,
            next: AtomicUsize::new(0),
        })
    }

    /// Runs `session(stream)` on the next loop, tracked by `tasks`.
    pub fn spawn<F, Fut>(&self, tasks: &TaskTracker, stream: TcpStream, session: F)
    where
        F: FnOnce(TcpStream) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let turn = self.next.fetch_add(1, Ordering::Relaxed) % (self.others.len() + 1);
        let Some(handle) = turn.checked_sub(1).and_then(|i| self.others.get(i)) else {
            tasks.spawn(session(stream));
            return;
        };
        // Leaving this loop's epoll set; the other loop registers it anew.
        let stream = match stream.into_std() {
            Ok(stream) => stream,
            Err(e) => {
                warn!("cannot hand a connection to another loop: {e}");
                return;
            }
        };
        handle.spawn(tasks.track_future(async move {
            match TcpStream::from_std(stream) {
                Ok(stream) => session(stream).await,
                Err(e) => warn!("cannot take over a connection from another loop: {e}"),
            }
        }));
    }
}
