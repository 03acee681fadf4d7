//! A stand-in between rolegate and etcd that answers as etcd 3.4.42–3.4.45,
//! 3.5.28–3.5.31 and 3.6.0–3.6.11 do with authentication on: a
//! `Maintenance.Status` from a user without the root role is refused with
//! gRPC status PermissionDenied ("etcdserver: permission denied"). Every
//! other call is passed through to the real etcd behind it, streams (the
//! watch, the lease keep-alive) included.
//!
//! It speaks plain-text HTTP/2 (gRPC without TLS) on a loopback port of
//! its own: each client connection gets one connection to etcd, and each
//! request is forwarded as it comes, body and trailers streamed both ways.
//! It runs on a thread with a runtime of its own, ended when dropped.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Empty};
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;

use super::free_port;

const STATUS: &str = "/etcdserverpb.Maintenance/Status";

pub struct StatusRefusal {
    pub port: u16,
    refused: Arc<AtomicUsize>,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl StatusRefusal {
    /// Listens on a free loopback port, forwarding to `etcd` (`HOST:PORT`).
    pub fn start(etcd: SocketAddr) -> Self {
        let port = free_port();
        let listener = std::net::TcpListener::bind(("127.0.0.1", port)).expect("bind stand-in");
        listener.set_nonblocking(true).expect("nonblocking");
        let refused = Arc::new(AtomicUsize::new(0));
        let counted = Arc::clone(&refused);
        let (stop, stopped) = oneshot::channel();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("stand-in runtime");
            rt.block_on(async move {
                let listener = TcpListener::from_std(listener).expect("tokio listener");
                tokio::select! {
                    () = accept(listener, etcd, counted) => {}
                    _ = stopped => {}
                }
            });
        });
        Self {
            port,
            refused,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// How many `Status` calls it refused.
    pub fn refused(&self) -> usize {
        self.refused.load(Ordering::Relaxed)
    }
}

impl Drop for StatusRefusal {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

async fn accept(listener: TcpListener, etcd: SocketAddr, refused: Arc<AtomicUsize>) {
    while let Ok((client, _)) = listener.accept().await {
        tokio::spawn(relay(client, etcd, Arc::clone(&refused)));
    }
}

type Body = BoxBody<Bytes, hyper::Error>;

/// Serves one client connection over one connection to etcd.
async fn relay(client: TcpStream, etcd: SocketAddr, refused: Arc<AtomicUsize>) {
    let Ok(upstream) = TcpStream::connect(etcd).await else {
        return;
    };
    let Ok((sender, connection)) = hyper::client::conn::http2::handshake::<_, _, Incoming>(
        TokioExecutor::new(),
        TokioIo::new(upstream),
    )
    .await
    else {
        return;
    };
    tokio::spawn(connection);
    let service = hyper::service::service_fn(move |request: Request<Incoming>| {
        let mut sender = sender.clone();
        let refused = Arc::clone(&refused);
        async move {
            if request.uri().path() == STATUS {
                refused.fetch_add(1, Ordering::Relaxed);
                return Ok::<_, Infallible>(permission_denied());
            }
            Ok(match sender.send_request(request).await {
                Ok(response) => response.map(BodyExt::boxed),
                Err(_) => unavailable(),
            })
        }
    });
    let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
        .serve_connection(TokioIo::new(client), service)
        .await;
}

/// A trailers-only gRPC answer with `status` and `message`.
fn grpc_error(status: u8, message: &str) -> Response<Body> {
    let mut response = Response::new(Empty::new().map_err(|never| match never {}).boxed());
    let headers = response.headers_mut();
    headers.insert("content-type", "application/grpc".parse().expect("header"));
    headers.insert("grpc-status", status.to_string().parse().expect("header"));
    headers.insert("grpc-message", message.parse().expect("header"));
    response
}

/// What etcd's auth layer answers a `Status` from a user without root.
fn permission_denied() -> Response<Body> {
    grpc_error(7, "etcdserver: permission denied")
}

fn unavailable() -> Response<Body> {
    grpc_error(14, "stand-in: etcd did not answer")
}
