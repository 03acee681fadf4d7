//! The admin HTTP endpoint: `/metrics`, `/healthz`, `/readyz`, `/cluster`,
//! `/events` and the status page at `/`.
//!
//! - `/metrics`: Prometheus text exposition of everything in [`crate::metrics`].
//! - `/healthz`: 200 while the process serves HTTP at all.
//! - `/readyz`: 200 when every cluster has a confirmed primary (or, with
//!   `ready_when = "targets"`, when every listener has a target); 503 with
//!   a one-line reason otherwise. For load balancers in front of a fleet.
//! - `/cluster`: JSON of each cluster's fused view and the evidence behind
//!   it, with session counts per member and role, and each listener with
//!   where it would send a new session now and how many it holds.
//! - `/events`: the event timeline (see [`crate::events`]), newest first,
//!   with `?cluster=` and `?since=` (RFC 3339), and each cluster's last
//!   leader change in phases.
//! - `/`: the status page, one self-contained HTML page that draws the two
//!   above and refreshes itself; `POST /login` signs a browser in.
//!
//! `/cluster`, `/events` and `/` are behind `[admin] token` when one is set
//! (see [`auth`]).
//!
//! It binds to loopback by default and reads only published snapshots:
//! nothing here can slow the data path. Connections are bounded in all and
//! per client address ([`places`]); over the bounds, probes are still
//! answered ([`over_limit`]).

mod auth;
mod json;
mod over_limit;
mod places;
mod status_page;

pub use places::{MAX_CONNECTIONS, MAX_PER_ADDRESS};

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{HeaderValue, CACHE_CONTROL, CONTENT_TYPE, LOCATION, SET_COOKIE};
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::config::{PoolMode, ReadyWhen, TlsMode};
use crate::events::EventLog;
use crate::fleet::Fleet;
use crate::metrics::SessionCounts;
use crate::pool::Pools;
use crate::router::Router;
use crate::server::stream::BackendStream;
use crate::topology::{ClusterReport, ClusterView};

/// How often the exporter's histograms are rolled and idle entries pruned.
const UPKEEP_INTERVAL: Duration = Duration::from_secs(5);
/// Bound on the wait for each request's headers, the wait between
/// requests on a kept-alive connection included: per request, so a
/// scraper that keeps its connection open is never cut mid-answer.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a request with a wrong token (a sign-in, a bearer header, a
/// cookie) waits for its answer: guessing costs time, and the places a
/// guesser's waiting requests hold are its own address's (see [`places`]).
const WRONG_TOKEN_DELAY: Duration = Duration::from_secs(1);
/// After this long a connection is closed once its current answer is out
/// (or `REQUEST_TIMEOUT` later, for a client that stopped reading).
const CONNECTION_LIFETIME: Duration = Duration::from_secs(300);

/// Everything the admin endpoint reads.
pub struct Admin {
    pub metrics: PrometheusHandle,
    pub sessions: Arc<SessionCounts>,
    /// Pooled listeners' pools, for `/cluster`.
    pub pools: Arc<Pools<BackendStream>>,
    pub events: Arc<EventLog>,
    /// Replaced whole by a reload.
    state: ArcSwap<AdminState>,
}

/// What a reload changes: the clusters, the listeners, the settings.
#[derive(Default)]
pub struct AdminState {
    pub views: Vec<(String, watch::Receiver<Arc<ClusterView>>)>,
    pub reports: Vec<(String, watch::Receiver<Arc<ClusterReport>>)>,
    pub listeners: Vec<ListenerEntry>,
    pub ready_when: ReadyWhen,
    pub token: Option<String>,
    /// This instance's fleet, when `[fleet]` is configured.
    pub fleet: Option<Arc<Fleet>>,
}

/// What the endpoint shows of one listener, published with each
/// configuration: where it listens, its cluster and TLS mode, and the
/// router that says where a new session would go now.
pub struct ListenerEntry {
    pub listen: SocketAddr,
    pub cluster: Arc<str>,
    pub tls: TlsMode,
    pub router: Arc<Router>,
    /// A pooled listener's mode and `pool_size`.
    pub pooling: Option<(PoolMode, usize)>,
}

impl Admin {
    pub fn new(
        metrics: PrometheusHandle,
        sessions: Arc<SessionCounts>,
        pools: Arc<Pools<BackendStream>>,
        events: Arc<EventLog>,
        state: AdminState,
    ) -> Arc<Self> {
        Arc::new(Self {
            metrics,
            sessions,
            pools,
            events,
            state: ArcSwap::from_pointee(state),
        })
    }

    /// Replaces what the endpoint shows and how it guards it.
    pub fn set(&self, state: AdminState) {
        self.state.store(Arc::new(state));
    }
}

/// Rolls the exporter's histograms and prunes idle entries until `stop`.
pub async fn upkeep(metrics: PrometheusHandle, stop: CancellationToken) {
    let mut interval = tokio::time::interval(UPKEEP_INTERVAL);
    loop {
        tokio::select! {
            _ = interval.tick() => metrics.run_upkeep(),
            () = stop.cancelled() => return,
        }
    }
}

/// Serves admin requests on `listener` until `shutdown` (the process's, or
/// a reload that moved the endpoint).
pub async fn serve(listener: Arc<TcpListener>, admin: Arc<Admin>, shutdown: CancellationToken) {
    let places = places::AdminPlaces::new();
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    warn!("admin accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            () = shutdown.cancelled() => return,
        };
        let place = match places.admit(peer.ip()) {
            places::Admission::Served(place) => place,
            places::Admission::OverLimit(place, refusal) => {
                debug!(client = %peer, ?refusal, "admin connection over the limit: read for a probe only");
                let admin = Arc::clone(&admin);
                tokio::spawn(async move {
                    let _place = place;
                    over_limit::answer(&admin, stream, refusal).await;
                });
                continue;
            }
            places::Admission::Closed => {
                debug!(client = %peer, "admin connection closed unread: over every limit");
                continue;
            }
        };
        let admin = Arc::clone(&admin);
        tokio::spawn(async move {
            let _place = place;
            serve_connection(admin, stream, peer).await;
        });
    }
}

/// Serves requests on one connection, each within [`REQUEST_TIMEOUT`],
/// until the client closes it or [`CONNECTION_LIFETIME`] is up.
async fn serve_connection(admin: Arc<Admin>, stream: tokio::net::TcpStream, peer: SocketAddr) {
    let service = service_fn(move |request| {
        let admin = Arc::clone(&admin);
        async move { Ok::<_, Infallible>(admin.answer(request).await) }
    });
    let connection = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(REQUEST_TIMEOUT)
        .serve_connection(TokioIo::new(stream), service);
    tokio::pin!(connection);
    let served = tokio::select! {
        served = connection.as_mut() => Some(served),
        () = tokio::time::sleep(CONNECTION_LIFETIME) => None,
    };
    let served = match served {
        Some(served) => Ok(served),
        None => {
            connection.as_mut().graceful_shutdown();
            tokio::time::timeout(REQUEST_TIMEOUT, connection).await
        }
    };
    match served {
        Ok(Ok(())) => {}
        Ok(Err(e)) => debug!(client = %peer, "admin connection: {e}"),
        Err(_) => debug!(client = %peer, "admin connection stopped reading its answer"),
    }
}

type Answer = Response<Full<Bytes>>;

fn text(status: StatusCode, body: impl Into<Bytes>) -> Answer {
    respond(status, "text/plain; charset=utf-8", body)
}

fn respond(status: StatusCode, content_type: &'static str, body: impl Into<Bytes>) -> Answer {
    let mut response = Response::new(Full::new(body.into()));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

impl Admin {
    async fn answer(&self, request: Request<Incoming>) -> Answer {
        let state = self.state.load_full();
        let path = request.uri().path();
        if request.method() == Method::POST && path == "/login" {
            return self.sign_in(&state, request).await;
        }
        if request.method() != Method::GET && request.method() != Method::HEAD {
            return text(
                StatusCode::METHOD_NOT_ALLOWED,
                "only GET is served (and POST /login)\n",
            );
        }
        if let Some((status, body)) = state.probe(path) {
            return text(status, body);
        }
        let access = auth::access(request.headers(), state.token.as_deref());
        let guarded = matches!(path, "/" | "/cluster" | "/events");
        if guarded && access == auth::Access::WrongToken {
            debug!("admin request for {path} with a wrong token");
            tokio::time::sleep(WRONG_TOKEN_DELAY).await;
        }
        let authorized = access == auth::Access::Granted;
        match path {
            "/metrics" => respond(
                StatusCode::OK,
                "text/plain; version=0.0.4; charset=utf-8",
                self.metrics.render(),
            ),
            // The page holds no data: without the token it shows only its
            // sign-in form.
            "/" => {
                let status = if authorized {
                    StatusCode::OK
                } else {
                    StatusCode::UNAUTHORIZED
                };
                let mut page = respond(status, "text/html; charset=utf-8", status_page::PAGE);
                page.headers_mut()
                    .insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
                page
            }
            "/cluster" | "/events" if !authorized => text(
                StatusCode::UNAUTHORIZED,
                match access {
                    auth::Access::WrongToken => format!("wrong token for {path}\n"),
                    _ => format!(
                        "a bearer token (or the status page's sign-in) is required for {path}\n"
                    ),
                },
            ),
            "/cluster" => respond(
                StatusCode::OK,
                "application/json",
                json::cluster(self, &state),
            ),
            "/events" => match json::events(self, &state, request.uri().query()) {
                Ok(body) => respond(StatusCode::OK, "application/json", body),
                Err(e) => text(StatusCode::BAD_REQUEST, format!("{e}\n")),
            },
            _ => text(
                StatusCode::NOT_FOUND,
                "not found; try /, /metrics, /healthz, /readyz, /cluster or /events\n",
            ),
        }
    }

    /// `POST /login` from the status page's form: with the right token,
    /// sets the cookie and goes back to the page.
    async fn sign_in(&self, state: &AdminState, request: Request<Incoming>) -> Answer {
        let Some(token) = &state.token else {
            return see_other("/", None);
        };
        let body = Limited::new(request.into_body(), auth::MAX_FORM_BYTES).collect();
        let body = match tokio::time::timeout(REQUEST_TIMEOUT, body).await {
            Ok(Ok(body)) => body.to_bytes(),
            Err(_) => {
                return text(
                    StatusCode::REQUEST_TIMEOUT,
                    format!("the sign-in form did not arrive within {REQUEST_TIMEOUT:?}\n"),
                )
            }
            Ok(Err(_)) => {
                return text(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    format!(
                        "the sign-in form is limited to {} bytes\n",
                        auth::MAX_FORM_BYTES
                    ),
                )
            }
        };
        let given = auth::token_from_form(&body).unwrap_or_default();
        if !auth::token_matches(&given, token) {
            debug!("status page sign-in with a wrong token");
            tokio::time::sleep(WRONG_TOKEN_DELAY).await;
            return text(
                StatusCode::UNAUTHORIZED,
                "wrong token; go back and try again\n",
            );
        }
        see_other("/", auth::sign_in_cookie(token))
    }
}

impl AdminState {
    /// The answer to a probe (`/healthz`, `/readyz`); `None` for any other
    /// path. Probes are answered even over the connection limits.
    fn probe(&self, path: &str) -> Option<(StatusCode, String)> {
        match path {
            "/healthz" => Some((StatusCode::OK, "ok\n".into())),
            "/readyz" => Some(match self.not_ready() {
                None => (StatusCode::OK, "ready\n".into()),
                Some(reason) => (
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("not ready: {reason}\n"),
                ),
            }),
            _ => None,
        }
    }

    /// Why rolegate is not ready, or `None` when it is.
    fn not_ready(&self) -> Option<String> {
        match self.ready_when {
            ReadyWhen::Primary => self.views.iter().find_map(|(name, views)| {
                let view = views.borrow();
                view.leader().is_none().then(|| {
                    format!(
                        "cluster {name} has no confirmed primary ({})",
                        view.no_leader_reason.as_deref().unwrap_or("unknown reason")
                    )
                })
            }),
            ReadyWhen::Targets => self.listeners.iter().find_map(|listener| {
                listener.router.targets_now().is_empty().then(|| {
                    format!(
                        "listener {} ({} of cluster {}) has no target",
                        listener.listen,
                        listener.router.role(),
                        listener.cluster
                    )
                })
            }),
        }
    }
}

/// A redirect after a form, optionally setting a cookie.
fn see_other(location: &'static str, cookie: Option<HeaderValue>) -> Answer {
    let mut response = text(StatusCode::SEE_OTHER, "signed in\n");
    response
        .headers_mut()
        .insert(LOCATION, HeaderValue::from_static(location));
    if let Some(cookie) = cookie {
        response.headers_mut().insert(SET_COOKIE, cookie);
    }
    response
}
