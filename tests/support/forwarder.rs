//! A TCP forwarder on loopback that a test controls: it passes bytes to a
//! target, delays them, or cuts the link.
//!
//! A cut behaves like a network partition, not like a refused connection:
//! open connections stay open but nothing crosses, and new connections are
//! accepted but not carried through until the link heals (then the held
//! bytes are delivered, as TCP would retransmit them). The forwarder runs on
//! its own thread and runtime, so it keeps working while the test thread
//! blocks; dropping it stops the thread and closes every connection.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Link {
    /// Bytes cross at once.
    Pass,
    /// Every chunk crosses this long after it was read, in order.
    Delay(Duration),
    /// Nothing crosses; held bytes wait for the link to heal.
    Cut,
}

pub struct Forwarder {
    pub port: u16,
    link: watch::Sender<Link>,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Forwarder {
    /// Listens on a free loopback port and forwards to `target`.
    pub fn start(target: SocketAddr) -> Self {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind forwarder");
        listener.set_nonblocking(true).expect("nonblocking");
        let port = listener.local_addr().expect("forwarder address").port();
        let (link, link_rx) = watch::channel(Link::Pass);
        let (stop, stop_rx) = oneshot::channel();
        let thread = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("forwarder runtime");
            runtime.block_on(async move {
                let listener = TcpListener::from_std(listener).expect("tokio listener");
                tokio::select! {
                    _ = stop_rx => {}
                    () = accept_loop(listener, target, link_rx) => {}
                }
            });
        });
        Self {
            port,
            link,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    pub fn set(&self, link: Link) {
        self.link.send_replace(link);
    }

    pub fn address(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }
}

impl Drop for Forwarder {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

async fn accept_loop(listener: TcpListener, target: SocketAddr, link: watch::Receiver<Link>) {
    while let Ok((client, _)) = listener.accept().await {
        let link = link.clone();
        tokio::spawn(async move {
            // A cut link carries no SYN either: wait for it to heal.
            let mut waiting = link.clone();
            if waiting.wait_for(|l| *l != Link::Cut).await.is_err() {
                return;
            }
            let Ok(server) = TcpStream::connect(target).await else {
                return;
            };
            let (client_read, client_write) = client.into_split();
            let (server_read, server_write) = server.into_split();
            tokio::join!(
                carry(client_read, server_write, link.clone()),
                carry(server_read, client_write, link),
            );
        });
    }
}

/// One direction: a reader stamps each chunk with its due time, a writer
/// delivers it then, holding everything while the link is cut.
async fn carry(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    link: watch::Receiver<Link>,
) {
    let (chunks, mut due) = mpsc::unbounded_channel::<(Instant, Vec<u8>)>();
    let reader_link = link.clone();
    let reader = async move {
        let mut buffer = vec![0u8; 16 * 1024];
        loop {
            match from.read(&mut buffer).await {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    let delay = match *reader_link.borrow() {
                        Link::Delay(d) => d,
                        Link::Pass | Link::Cut => Duration::ZERO,
                    };
                    if chunks
                        .send((Instant::now() + delay, buffer[..n].to_vec()))
                        .is_err()
                    {
                        return;
                    }
                }
            }
        }
    };
    let writer = async move {
        let mut link = link;
        while let Some((at, bytes)) = due.recv().await {
            tokio::time::sleep_until(at).await;
            if link.wait_for(|l| *l != Link::Cut).await.is_err() {
                return;
            }
            if to.write_all(&bytes).await.is_err() {
                return;
            }
        }
        let _ = to.shutdown().await;
    };
    tokio::join!(reader, writer);
}
