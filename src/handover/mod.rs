//! Restarts without a refused or reset connection: a running rolegate hands
//! its listening sockets to the new process that starts beside it.
//!
//! Listening sockets are bound with `SO_REUSEPORT`, so a new process can
//! always bind beside the old one. That alone is not enough: when the old
//! process then closes its socket, the connections waiting in that
//! socket's own accept queue are reset, unless the kernel migrates them
//! (`net.ipv4.tcp_migrate_req`, off by default). So, as HAProxy does, the
//! old process passes its sockets over a Unix socket (`SCM_RIGHTS`): both
//! processes then hold the same sockets, with one accept queue each, and
//! when the old one stops accepting and closes its copies, the sockets and
//! their queues live on in the new process. Nothing is reset.
//!
//! The Unix socket is in Linux's abstract namespace, named after the
//! configuration file's path: the rolegate of one configuration finds its
//! predecessor without any file to create or clean up, and one network
//! namespace (host, container, pod) is exactly where listening ports can
//! clash. A peer is served only when it runs as the same user (or root),
//! read from `SO_PEERCRED`. Anyone may bind an abstract name first, so a
//! holder of another user is named in a warning ([`name_holder`]). The
//! sockets travel in framed messages ([`frame`]).
//!
//! The new process asks once, at start, before binding anything. The name
//! is held by the oldest process still running; a process that received
//! sockets takes the name over once its predecessor has let it go (at
//! SIGTERM), so the next restart finds it.

use std::collections::HashMap;
use std::io;
use std::mem::MaybeUninit;
use std::net::SocketAddr;
use std::os::fd::{AsFd, OwnedFd};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr as UnixAddr, UnixListener, UnixStream};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use frame::{receive_one, send_chunk, MAX_MESSAGE};
use rustix::net::sockopt::socket_peercred;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

mod frame;
mod name_holder;

/// How long a new process waits for its predecessor's answer.
const ASK_TIMEOUT: Duration = Duration::from_secs(5);
/// How often a process that received sockets tries to take the name over.
const TAKE_OVER_INTERVAL: Duration = Duration::from_millis(500);
/// Every how many tries it looks who holds the name (at the first, then
/// each minute): one of another user is named in a warning.
const LOOK_EVERY: u64 = 120;
/// The most sockets one message carries (the kernel's limit per message
/// is 253). A handover sends as many messages as its sockets need: a
/// client listener has one socket per event loop, so a 64-CPU machine with
/// four listeners already offers 257.
pub(crate) const SOCKETS_PER_MESSAGE: usize = 250;
/// The most messages a successor reads (62,500 sockets).
const MAX_MESSAGES: usize = 250;
/// The abstract socket name of the rolegate of the configuration at `path`.
pub fn name_for(config_path: &Path) -> String {
    let path = std::fs::canonicalize(config_path).unwrap_or_else(|_| config_path.to_owned());
    let path = path.to_string_lossy();
    // An abstract name holds at most 107 bytes.
    if path.len() <= 90 {
        format!("rolegate:{path}")
    } else {
        format!("rolegate:{:016x}", fnv1a(path.as_bytes()))
    }
}

/// A hash every rolegate version computes the same way.
pub(crate) fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, b| {
        (hash ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// Sockets received from a predecessor, by what they listen on.
#[derive(Default)]
pub struct Inherited {
    sockets: HashMap<String, OwnedFd>,
    /// The predecessor's process id, from its peer credentials.
    pub predecessor: Option<u32>,
}

impl Inherited {
    /// Takes the socket listening on `key` (a listener's or the admin
    /// endpoint's address, see [`Offered`]), if one was received.
    pub fn take(&mut self, key: &str) -> Option<std::net::TcpListener> {
        let fd = self.sockets.remove(key)?;
        let listener = std::net::TcpListener::from(fd);
        listener.set_nonblocking(true).ok()?;
        Some(listener)
    }

    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.sockets.is_empty()
    }
}

/// Asks the running rolegate of `name` for its listening sockets. No
/// predecessor (or one that does not answer) means nothing inherited. A
/// predecessor of this user that answered but whose sockets did not
/// arrive is still known as the predecessor: its addresses may be bound
/// beside it (see [`crate::server::address_owner`]).
pub fn ask(name: &str) -> Inherited {
    let stream = match connect(name) {
        Ok(stream) => stream,
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => return Inherited::default(),
        Err(e) => {
            warn!(
                name,
                "could not take over the sockets of a running rolegate ({e}); binding anew"
            );
            return Inherited::default();
        }
    };
    match socket_peercred(&stream) {
        Ok(peer) if !same_user(peer.uid.as_raw()) => {
            name_holder::warn_foreign(
                name,
                name_holder::Foreign {
                    pid: peer_pid(&stream),
                    uid: peer.uid.as_raw(),
                },
            );
            return Inherited::default();
        }
        Ok(_) => {}
        Err(e) => {
            warn!(
                name,
                "could not tell who answered the handover ({e}); binding anew"
            );
            return Inherited::default();
        }
    }
    let predecessor = peer_pid(&stream);
    match receive(&stream) {
        Ok(sockets) => {
            if !sockets.is_empty() {
                info!(
                    sockets = sockets.len(),
                    "took over the listening sockets of the rolegate running before"
                );
            }
            Inherited {
                sockets,
                predecessor,
            }
        }
        Err(e) => {
            warn!("could not take over the sockets of a running rolegate ({e}); binding anew");
            Inherited {
                sockets: HashMap::new(),
                predecessor,
            }
        }
    }
}

/// Connects to the process holding `name`.
fn connect(name: &str) -> io::Result<UnixStream> {
    let address = UnixAddr::from_abstract_name(name.as_bytes())?;
    let stream = UnixStream::connect_addr(&address)?;
    stream.set_read_timeout(Some(ASK_TIMEOUT))?;
    Ok(stream)
}

/// Reads the predecessor's messages until it closes the stream (or sent
/// as many as a handover carries): each carries some sockets and the list
/// of their keys, framed (see [`receive_one`]). (Earlier builds sent
/// unframed messages, of which the first reads the same way.) A stream
/// closed before any message
/// is an error, as is a first message that does not read; a later one that
/// fails leaves the sockets already received, and the rest are bound anew.
fn receive(stream: &UnixStream) -> io::Result<HashMap<String, OwnedFd>> {
    let mut sockets = HashMap::new();
    let mut buffer = vec![0u8; MAX_MESSAGE];
    let mut space =
        vec![MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(SOCKETS_PER_MESSAGE))];
    for read in 0..MAX_MESSAGES {
        match receive_one(stream, &mut buffer, &mut space) {
            Ok(Some(received)) => sockets.extend(received),
            Ok(None) if read == 0 => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the running rolegate closed without sending its sockets",
                ))
            }
            Ok(None) => break,
            Err(e) if read == 0 => return Err(e),
            Err(e) => {
                warn!(
                    sockets = sockets.len(),
                    "a later message of the handover failed ({e}); binding the rest anew"
                );
                break;
            }
        }
    }
    Ok(sockets)
}

/// The process id at the other end of `stream`, when the kernel says.
pub(crate) fn peer_pid(stream: impl AsFd) -> Option<u32> {
    let pid = socket_peercred(stream).ok()?.pid.as_raw_nonzero().get();
    u32::try_from(pid).ok()
}

/// The sockets this process offers its successor, kept current as
/// listeners come and go: `(key, descriptor)` pairs whose descriptors stay
/// open while they are offered.
#[derive(Default)]
pub struct Offered {
    sockets: Mutex<Vec<(String, Arc<dyn AsFd + Send + Sync>)>>,
}

impl Offered {
    /// The key of a client listener's socket `index` on `addr` (it has one
    /// per event loop). The first is keyed by the address alone, as
    /// versions with one socket per listener offered it, so a restart
    /// across that change still hands the queue over.
    pub fn listener_key(addr: SocketAddr, index: usize) -> String {
        if index == 0 {
            addr.to_string()
        } else {
            format!("{addr} #{index}")
        }
    }

    /// The key of the admin endpoint on `addr`.
    pub fn admin_key(addr: SocketAddr) -> String {
        format!("admin {addr}")
    }

    /// The key of the fleet's peer listener on `addr`.
    pub fn peer_key(addr: SocketAddr) -> String {
        format!("peer {addr}")
    }

    /// Replaces what is offered.
    pub fn set(&self, sockets: Vec<(String, Arc<dyn AsFd + Send + Sync>)>) {
        *self.sockets.lock().unwrap_or_else(|p| p.into_inner()) = sockets;
    }

    fn snapshot(&self) -> Vec<(String, Arc<dyn AsFd + Send + Sync>)> {
        self.sockets
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

/// Serves successors under `name` until `stop`: at once when the name is
/// free, else once the process holding it lets it go (warning when that
/// process is another user's, see [`name_holder`]). `handed_to` learns
/// the process id of each successor that took the sockets.
pub async fn serve(
    name: String,
    offered: Arc<Offered>,
    stop: CancellationToken,
    handed_to: impl Fn(u32) + Send + 'static,
) {
    let mut warned = None;
    let mut attempts: u64 = 0;
    let listener = loop {
        match bind(&name) {
            Ok(listener) => break listener,
            Err(e) if e.kind() == io::ErrorKind::AddrInUse => {
                if attempts % LOOK_EVERY == 0 {
                    let asked = name.clone();
                    let holder =
                        tokio::task::spawn_blocking(move || name_holder::foreign_holder(&asked))
                            .await
                            .ok()
                            .flatten();
                    if let Some(holder) = holder.filter(|h| Some(*h) != warned) {
                        name_holder::warn_foreign(&name, holder);
                        warned = Some(holder);
                    }
                }
                attempts += 1;
                tokio::select! {
                    () = tokio::time::sleep(TAKE_OVER_INTERVAL) => continue,
                    () = stop.cancelled() => return,
                }
            }
            Err(e) => {
                warn!("cannot offer sockets to a successor (restarts may reset connections): {e}");
                // Serving goes on without a handover; the task ends when
                // asked, as the supervisor expects of it.
                stop.cancelled().await;
                return;
            }
        }
    };
    debug!(name, "offering the listening sockets to a successor");
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = stop.cancelled() => return,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(e) => {
                debug!("handover accept failed: {e}");
                tokio::time::sleep(TAKE_OVER_INTERVAL).await;
                continue;
            }
        };
        let offered = Arc::clone(&offered);
        let handed = tokio::task::spawn_blocking(move || {
            let stream = stream.into_std()?;
            stream.set_nonblocking(false)?;
            let successor = peer_pid(&stream);
            let count = hand_over(&stream, &offered.snapshot())?;
            Ok::<_, io::Error>((count, successor))
        })
        .await;
        match handed {
            Ok(Ok((count, successor))) => {
                info!(
                    sockets = count,
                    pid = successor,
                    "handed the listening sockets to a new rolegate"
                );
                if let Some(pid) = successor {
                    handed_to(pid);
                }
            }
            Ok(Err(e)) => warn!("handing the sockets to a new rolegate failed: {e}"),
            Err(e) => warn!("handing the sockets to a new rolegate failed: {e}"),
        }
    }
}

fn bind(name: &str) -> io::Result<tokio::net::UnixListener> {
    let address = UnixAddr::from_abstract_name(name.as_bytes())?;
    let listener = UnixListener::bind_addr(&address)?;
    listener.set_nonblocking(true)?;
    tokio::net::UnixListener::from_std(listener)
}

/// Refuses a peer of another user (root excepted): the name is in the
/// abstract namespace, which anyone may bind or connect to.
fn check_same_user(stream: &UnixStream) -> io::Result<()> {
    let peer = socket_peercred(stream)?.uid.as_raw();
    if !same_user(peer) {
        let own = rustix::process::geteuid().as_raw();
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!("the process at the other end runs as uid {peer}, not {own}"),
        ));
    }
    Ok(())
}

/// Whether a process of user `uid` may trade sockets or cancel keys with
/// this one: the same user, or root.
pub(crate) fn same_user(uid: u32) -> bool {
    uid == rustix::process::geteuid().as_raw() || uid == 0
}

/// Sends every offered socket to the peer, if it is this user (or root),
/// in as many messages as they need. Returns how many it took.
fn hand_over(
    stream: &UnixStream,
    sockets: &[(String, Arc<dyn AsFd + Send + Sync>)],
) -> io::Result<usize> {
    check_same_user(stream)?;
    if sockets.is_empty() {
        // One message all the same: earlier builds read exactly one.
        send_chunk(stream, &[])?;
        return Ok(0);
    }
    let most = MAX_MESSAGES * SOCKETS_PER_MESSAGE;
    if sockets.len() > most {
        warn!(
            "{} listening sockets, of which a handover carries {most}; the others are bound anew",
            sockets.len()
        );
    }
    let mut sent = 0;
    for chunk in sockets[..sockets.len().min(most)].chunks(SOCKETS_PER_MESSAGE) {
        // A successor of a build that reads one message may have closed
        // after the first; that is seldom seen here, as the kernel takes
        // the next messages before it closes.
        match send_chunk(stream, chunk) {
            Ok(()) => sent += chunk.len(),
            Err(e) if sent > 0 => {
                warn!(
                    "the new rolegate took at most {sent} of {} listening sockets ({e}); the others are bound anew",
                    sockets.len()
                );
                break;
            }
            Err(e) => return Err(e),
        }
    }
    Ok(sent)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each of `listeners` is in `received` under its key, as itself.
    pub(super) fn assert_every_listener_arrived<
        L: std::ops::Deref<Target = std::net::TcpListener>,
    >(
        listeners: &[L],
        received: &HashMap<String, OwnedFd>,
    ) {
        for listener in listeners {
            let addr = listener.local_addr().expect("addr");
            let fd = received
                .get(&Offered::listener_key(addr, 0))
                .expect("every socket arrives under its key");
            let arrived = std::net::TcpListener::from(fd.try_clone().expect("dup"));
            assert_eq!(arrived.local_addr().expect("addr"), addr);
        }
    }

    #[test]
    fn names_fit_the_abstract_namespace_and_are_stable() {
        let short = name_for(Path::new("/etc/rolegate/proxy.toml"));
        assert_eq!(short, "rolegate:/etc/rolegate/proxy.toml");
        let long = format!("/{}", "x".repeat(200));
        let hashed = name_for(Path::new(&long));
        assert!(hashed.len() < 107, "{hashed}");
        assert_eq!(hashed, name_for(Path::new(&long)));
        assert_eq!(fnv1a(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a(b"a"), 0xaf63_dc4c_8601_ec8c);
    }

    /// More sockets than one message carries arrive, each under its key,
    /// in one handover.
    #[test]
    fn a_handover_carries_more_sockets_than_one_message() {
        let (ours, theirs) = UnixStream::pair().expect("socket pair");
        let listeners: Vec<_> = (0..SOCKETS_PER_MESSAGE + 10)
            .map(|_| Arc::new(std::net::TcpListener::bind("127.0.0.1:0").expect("bind")))
            .collect();
        let offered: Vec<(String, Arc<dyn AsFd + Send + Sync>)> = listeners
            .iter()
            .map(|l| {
                let key = Offered::listener_key(l.local_addr().expect("addr"), 0);
                (key, Arc::clone(l) as Arc<dyn AsFd + Send + Sync>)
            })
            .collect();
        let sender = std::thread::spawn(move || {
            let sent = hand_over(&ours, &offered);
            drop(ours);
            sent
        });
        theirs
            .set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        let received = receive(&theirs).expect("receive");
        assert_eq!(
            sender.join().expect("sender").expect("sent"),
            listeners.len()
        );
        assert_eq!(received.len(), listeners.len());
        assert_every_listener_arrived(&listeners, &received);
    }

    /// With nothing to offer, one empty message still goes (earlier builds
    /// read exactly one), and reads as no sockets; a predecessor that
    /// closes without a message is an error, not an empty handover.
    #[test]
    fn an_empty_handover_is_one_empty_message() {
        let (ours, theirs) = UnixStream::pair().expect("socket pair");
        assert_eq!(hand_over(&ours, &[]).expect("sent"), 0);
        drop(ours);
        theirs
            .set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        assert!(receive(&theirs).expect("receive").is_empty());

        let (ours, theirs) = UnixStream::pair().expect("socket pair");
        drop(ours);
        let error = receive(&theirs).expect_err("nothing was sent");
        assert_eq!(error.kind(), io::ErrorKind::UnexpectedEof);
    }

    /// A real handover between two "processes" of this test: the sockets
    /// arrive, keyed, and still accept connections made before they moved.
    #[tokio::test]
    async fn listening_sockets_move_with_their_queues() {
        let name = format!("rolegate-test:{}", std::process::id());
        let first = Arc::new(std::net::TcpListener::bind("127.0.0.1:0").expect("bind"));
        let addr = first.local_addr().expect("addr");
        // Queued before the handover: must be accepted by the receiver.
        let early = std::net::TcpStream::connect(addr).expect("connect");
        let offered = Arc::new(Offered::default());
        offered.set(vec![(
            Offered::listener_key(addr, 0),
            Arc::clone(&first) as Arc<dyn AsFd + Send + Sync>,
        )]);
        let stop = CancellationToken::new();
        let (handed_to, mut successors) = tokio::sync::mpsc::unbounded_channel();
        let server = tokio::spawn(serve(
            name.clone(),
            Arc::clone(&offered),
            stop.clone(),
            move |pid| {
                let _ = handed_to.send(pid);
            },
        ));
        let mut inherited = Inherited::default();
        for _ in 0..50 {
            let asked = name.clone();
            inherited = tokio::task::spawn_blocking(move || ask(&asked))
                .await
                .expect("ask");
            if !inherited.is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let received = inherited
            .take(&Offered::listener_key(addr, 0))
            .expect("the socket arrived");
        assert_eq!(received.local_addr().expect("addr"), addr);
        // Both ends are this process: each learns the other's id.
        let own = std::process::id();
        assert_eq!(inherited.predecessor, Some(own));
        let successor = tokio::time::timeout(Duration::from_secs(5), successors.recv()).await;
        assert_eq!(successor.ok().flatten(), Some(own));
        offered.set(Vec::new());
        drop(first);
        let received = tokio::net::TcpListener::from_std(received).expect("tokio listener");
        let (accepted, _) = tokio::time::timeout(Duration::from_secs(5), received.accept())
            .await
            .expect("the queued connection is still there")
            .expect("accept");
        assert_eq!(
            accepted.peer_addr().expect("peer"),
            early.local_addr().expect("local")
        );
        stop.cancel();
        server.await.expect("server");
    }
}
