//! A round-robin TCP load balancer on loopback, as a fleet sits behind:
//! connection n goes to target n mod N, so a client's cancel connection
//! (the next one it opens) reaches another instance than its session.
//! It may put a PROXY protocol header (v1 or v2) naming a client address
//! of the test's choosing before the client's bytes. It runs on its own
//! thread and runtime; dropping it stops the thread and every connection.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;

/// What the balancer writes before the client's first byte.
#[derive(Clone, Copy, Debug)]
pub enum Header {
    None,
    /// `PROXY TCP4|TCP6 …` naming this client address.
    V1(SocketAddr),
    /// The binary header naming this client address.
    V2(SocketAddr),
}

pub struct Balancer {
    pub port: u16,
    /// Connections accepted so far.
    accepted: Arc<AtomicUsize>,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Balancer {
    pub fn start(targets: Vec<SocketAddr>, header: Header) -> Self {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind balancer");
        listener.set_nonblocking(true).expect("nonblocking");
        let port = listener.local_addr().expect("balancer address").port();
        let accepted = Arc::new(AtomicUsize::new(0));
        let counter = Arc::clone(&accepted);
        let (stop, stop_rx) = oneshot::channel();
        let thread = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("balancer runtime");
            runtime.block_on(async move {
                let listener = TcpListener::from_std(listener).expect("tokio listener");
                tokio::select! {
                    _ = stop_rx => {}
                    () = accept_loop(listener, targets, header, counter) => {}
                }
            });
        });
        Self {
            port,
            accepted,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::Relaxed)
    }
}

impl Drop for Balancer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

async fn accept_loop(
    listener: TcpListener,
    targets: Vec<SocketAddr>,
    header: Header,
    accepted: Arc<AtomicUsize>,
) {
    while let Ok((mut client, _)) = listener.accept().await {
        let n = accepted.fetch_add(1, Ordering::Relaxed);
        let target = targets[n % targets.len()];
        tokio::spawn(async move {
            let Ok(mut server) = TcpStream::connect(target).await else {
                return;
            };
            let bytes = header_bytes(header, target);
            if server.write_all(&bytes).await.is_err() {
                return;
            }
            let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
        });
    }
}

/// The header naming `client` on a connection to `target`.
pub fn header_bytes(header: Header, target: SocketAddr) -> Vec<u8> {
    match header {
        Header::None => Vec::new(),
        Header::V1(client) => {
            let family = if client.is_ipv4() { "TCP4" } else { "TCP6" };
            let destination = match (client, target) {
                (SocketAddr::V6(_), SocketAddr::V4(t)) => t.ip().to_ipv6_mapped().to_string(),
                _ => target.ip().to_string(),
            };
            format!(
                "PROXY {family} {} {destination} {} {}\r\n",
                client.ip(),
                client.port(),
                target.port()
            )
            .into_bytes()
        }
        Header::V2(client) => {
            let mut out = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
            out.push(0x21);
            let mut block = Vec::new();
            match client {
                SocketAddr::V4(c) => {
                    out.push(0x11);
                    block.extend_from_slice(&c.ip().octets());
                    block.extend_from_slice(&[127, 0, 0, 1]);
                }
                SocketAddr::V6(c) => {
                    out.push(0x21);
                    block.extend_from_slice(&c.ip().octets());
                    block.extend_from_slice(&std::net::Ipv6Addr::LOCALHOST.octets());
                }
            }
            block.extend_from_slice(&client.port().to_be_bytes());
            block.extend_from_slice(&target.port().to_be_bytes());
            out.extend_from_slice(&(block.len() as u16).to_be_bytes());
            out.extend_from_slice(&block);
            out
        }
    }
}
