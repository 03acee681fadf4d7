//! The admin HTTP endpoint: `/metrics`, `/healthz`, `/readyz`, `/cluster`.
//!
//! - `/metrics`: Prometheus text exposition of everything in [`crate::metrics`].
//! - `/healthz`: 200 while the process serves HTTP at all.
//! - `/readyz`: 200 when every cluster has a confirmed primary (or, with
//!   `ready_when = "targets"`, when every listener has a target); 503 with
//!   a one-line reason otherwise. For load balancers in front of a fleet.
//! - `/cluster`: JSON of each cluster's fused view and the evidence behind
//!   it, with session counts per member and role; optionally behind a
//!   bearer token.
//!
//! It binds to loopback by default and reads only published snapshots:
//! nothing here can slow the data path.

use std::convert::Infallible;
use std::sync::atomic::AtomicUsize;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{AUTHORIZATION, CONTENT_TYPE};
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::config::{ListenerRole, ReadyWhen, ReplicaFallback};
use crate::metrics::SessionCounts;
use crate::router::candidates;
use crate::topology::{ClusterReport, ClusterView};

/// How often the exporter's histograms are rolled and idle entries pruned.
const UPKEEP_INTERVAL: Duration = Duration::from_secs(5);
/// Bound on the wait for each request's headers, the wait between
/// requests on a kept-alive connection included: per request, so a
/// scraper that keeps its connection open is never cut mid-answer.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Admin connections served at once; one more is answered 503 and closed.
pub const MAX_CONNECTIONS: usize = 64;
/// After this long a connection is closed once its current answer is out
/// (or `REQUEST_TIMEOUT` later, for a client that stopped reading).
const CONNECTION_LIFETIME: Duration = Duration::from_secs(300);

/// A listener as readiness sees it.
pub struct ListenerTarget {
    pub listen: String,
    pub cluster: String,
    pub role: ListenerRole,
    pub fallback: ReplicaFallback,
}

/// Everything the admin endpoint reads.
pub struct Admin {
    pub metrics: PrometheusHandle,
    pub views: Vec<(String, watch::Receiver<Arc<ClusterView>>)>,
    pub reports: Vec<(String, watch::Receiver<Arc<ClusterReport>>)>,
    pub listeners: Vec<ListenerTarget>,
    pub sessions: Arc<SessionCounts>,
    pub ready_when: ReadyWhen,
    pub token: Option<String>,
}

/// Serves admin requests on `listener` until `shutdown`.
pub async fn serve(listener: TcpListener, admin: Arc<Admin>, shutdown: CancellationToken) {
    let upkeep_handle = admin.metrics.clone();
    let upkeep_stop = shutdown.clone();
    tokio::spawn(async move {
        let mut interval = tokio::time::interval(UPKEEP_INTERVAL);
        loop {
            tokio::select! {
                _ = interval.tick() => upkeep_handle.run_upkeep(),
                () = upkeep_stop.cancelled() => return,
            }
        }
    });
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
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
        let Ok(permit) = Arc::clone(&slots).try_acquire_owned() else {
            debug!(client = %peer, "admin connection refused: {MAX_CONNECTIONS} already open");
            tokio::spawn(refuse(stream));
            continue;
        };
        let admin = Arc::clone(&admin);
        tokio::spawn(async move {
            let _permit = permit;
            let service = service_fn(move |request| {
                let admin = Arc::clone(&admin);
                async move { Ok::<_, Infallible>(admin.answer(&request)) }
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
        });
    }
}

/// Answers a connection over [`MAX_CONNECTIONS`] with 503 and closes it.
async fn refuse(mut stream: tokio::net::TcpStream) {
    let body = format!("too many admin connections (at most {MAX_CONNECTIONS}); retry shortly\n");
    let answer = format!(
        "HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\nRetry-After: 1\r\n\r\n{body}",
        body.len()
    );
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        stream.write_all(answer.as_bytes()).await?;
        stream.shutdown().await
    })
    .await;
}

type Answer = Response<Full<Bytes>>;

fn text(status: StatusCode, body: impl Into<Bytes>) -> Answer {
    respond(status, "text/plain; charset=utf-8", body)
}

fn respond(status: StatusCode, content_type: &'static str, body: impl Into<Bytes>) -> Answer {
    let mut response = Response::new(Full::new(body.into()));
    *response.status_mut() = status;
    response.headers_mut().insert(
        CONTENT_TYPE,
        hyper::header::HeaderValue::from_static(content_type),
    );
    response
}

impl Admin {
    fn answer(&self, request: &Request<Incoming>) -> Answer {
        if request.method() != Method::GET && request.method() != Method::HEAD {
            return text(StatusCode::METHOD_NOT_ALLOWED, "only GET is served\n");
        }
        match request.uri().path() {
            "/metrics" => respond(
                StatusCode::OK,
                "text/plain; version=0.0.4; charset=utf-8",
                self.metrics.render(),
            ),
            "/healthz" => text(StatusCode::OK, "ok\n"),
            "/readyz" => match self.not_ready() {
                None => text(StatusCode::OK, "ready\n"),
                Some(reason) => text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("not ready: {reason}\n"),
                ),
            },
            "/cluster" => {
                if !self.authorized(request) {
                    return text(
                        StatusCode::UNAUTHORIZED,
                        "a bearer token is required for /cluster\n",
                    );
                }
                respond(StatusCode::OK, "application/json", self.cluster_json())
            }
            _ => text(
                StatusCode::NOT_FOUND,
                "not found; try /metrics, /healthz, /readyz or /cluster\n",
            ),
        }
    }

    fn authorized(&self, request: &Request<Incoming>) -> bool {
        let Some(token) = &self.token else {
            return true;
        };
        request
            .headers()
            .get(AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .is_some_and(|given| constant_time_eq(given.as_bytes(), token.as_bytes()))
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
                let views = self
                    .views
                    .iter()
                    .find(|(name, _)| *name == listener.cluster)?;
                let view = views.1.borrow();
                let scratch = AtomicUsize::new(0);
                candidates(listener.role, listener.fallback, &view, &scratch)
                    .is_empty()
                    .then(|| {
                        format!(
                            "listener {} ({} of cluster {}) has no target",
                            listener.listen, listener.role, listener.cluster
                        )
                    })
            }),
        }
    }

    fn cluster_json(&self) -> String {
        let clusters: Vec<_> = self
            .reports
            .iter()
            .map(|(name, reports)| {
                let report = reports.borrow().clone();
                let mut value = serde_json::to_value(&*report).unwrap_or_default();
                let sessions: Vec<_> = self
                    .sessions
                    .of_cluster(name)
                    .into_iter()
                    .map(|(member, role, count)| {
                        serde_json::json!({"member": &*member, "role": role.as_str(), "sessions": count})
                    })
                    .collect();
                if let Some(object) = value.as_object_mut() {
                    object.insert("sessions".to_owned(), serde_json::Value::Array(sessions));
                }
                value
            })
            .collect();
        let mut body = serde_json::to_string_pretty(&serde_json::json!({ "clusters": clusters }))
            .unwrap_or_else(|_| "{}".to_owned());
        body.push('\n');
        body
    }
}

/// Compares secrets without an early exit on the first differing byte.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_comparison() {
        assert!(constant_time_eq(b"secret", b"secret"));
        assert!(!constant_time_eq(b"secret", b"secreT"));
        assert!(!constant_time_eq(b"secret", b"secret2"));
    }
}
