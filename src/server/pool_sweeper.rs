//! Keeps a pooled listener's idle servers honest when no client asks for
//! one: at every new view, the idle servers of members that no longer fit
//! the listener's role are closed (a demoted leader's pool is emptied at
//! once, not at its next lend), and every [`SWEEP_INTERVAL`] the ones idle
//! longer than `server_idle_timeout`, or closed by the member, are closed.
//!
//! One task per listener, stopped with its accept loops; it reads the
//! listener's context anew each round, so a reload that makes a listener
//! pooled (or not) needs nothing else.

use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::{ListenerContext, Shared};
use crate::router::check_fit;
use crate::topology::ClusterView;

/// How often aged idle servers are looked for.
const SWEEP_INTERVAL: Duration = Duration::from_secs(5);

pub async fn run(
    contexts: Arc<ArcSwap<ListenerContext>>,
    shared: Arc<Shared>,
    stop: CancellationToken,
) {
    let mut tick = tokio::time::interval(SWEEP_INTERVAL);
    let mut context = contexts.load_full();
    let mut views = fresh_subscription(&context);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = tick.tick() => {}
            changed = views.changed() => {
                if changed.is_err() {
                    // The view source is gone (a reload replaced it):
                    // wait for the next tick and the current context.
                    tick.tick().await;
                }
            }
        }
        let now = contexts.load_full();
        if !Arc::ptr_eq(&now, &context) {
            context = now;
            views = fresh_subscription(&context);
        }
        let Some(settings) = &context.pool else {
            continue;
        };
        let view = context.router.view();
        let role = context.router.role();
        shared
            .pools
            .sweep(context.listen, settings.idle_timeout, |member| {
                check_fit(role, &view, member).is_ok()
            });
    }
}

/// The router's views, with the current one counted as seen: a clone of
/// the router's receiver would report every view published since the
/// router was made as new, and the loop would never wait.
fn fresh_subscription(context: &ListenerContext) -> watch::Receiver<Arc<ClusterView>> {
    let mut views = context.router.subscribe();
    views.mark_unchanged();
    views
}
