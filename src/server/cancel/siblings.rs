//! Cancel requests between the two processes of a restart.
//!
//! While a restart hands the listening sockets over, the old and the new
//! process of one configuration run side by side, and a cancel request can
//! reach the one that does not hold its session: once the old process has
//! stopped accepting, every new connection (a cancel's too) goes to the new
//! one while the old one still drains its sessions; before that both accept
//! from the same sockets; and in a fleet both listen on the peer port. So a
//! key that is not found here, and is not meant for another instance, is
//! passed to these sibling processes, which look it up in their own
//! registry only and never pass it on again.
//!
//! A process learns its siblings from the handover, by peer credentials:
//! its predecessor from the process that answered its request for the
//! sockets, each successor from a process that asked. Each takes cancels
//! from siblings on a Unix socket in Linux's abstract namespace named after
//! the configuration's handover name and its own process id, served only to
//! processes of the same user (or root). A sibling whose socket is gone has
//! exited and is forgotten.

use std::net::SocketAddr;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::SocketAddr as UnixAddr;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use bytes::{BufMut, BytesMut};
use rustix::net::sockopt::socket_peercred;
use tokio::io::AsyncReadExt;
use tokio::net::{UnixListener, UnixStream};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::intake::{read_request, Intake};
use super::{deliver, relay_bound, Via};
use crate::handover::{fnv1a, peer_pid, same_user};
use crate::protocol::startup::{CancelKey, MAX_CANCEL_REQUEST};
use crate::server::Shared;

/// Relayed requests read at once; more are closed at once.
const MAX_CONNECTIONS: usize = 64;
/// The longest client address a relayed request carries.
const MAX_SOURCE: usize = 64;
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(100);

/// The other running processes of this configuration.
#[derive(Default)]
pub struct Siblings {
    /// The configuration's handover name, set once at start.
    name: OnceLock<String>,
    pids: Mutex<Vec<u32>>,
}

impl Siblings {
    /// Names the configuration (its handover name) this process serves.
    pub fn set_name(&self, handover_name: &str) {
        let _ = self.name.set(handover_name.to_owned());
    }

    /// Adds a sibling process; this process and unknown ids are ignored.
    pub fn add(&self, pid: u32) {
        if pid == 0 || pid == std::process::id() {
            return;
        }
        let mut pids = self.lock();
        if !pids.contains(&pid) {
            pids.push(pid);
        }
    }

    fn forget(&self, pid: u32) {
        self.lock().retain(|p| *p != pid);
    }

    fn snapshot(&self) -> Vec<u32> {
        self.lock().clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<u32>> {
        self.pids.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The relay socket of process `pid`, once the name is set.
    fn address(&self, pid: u32) -> Option<UnixAddr> {
        let name = self.name.get()?;
        UnixAddr::from_abstract_name(relay_name(name, pid).as_bytes()).ok()
    }
}

/// The abstract socket name of process `pid` of the configuration whose
/// handover name is `handover` (at most 48 bytes).
fn relay_name(handover: &str, pid: u32) -> String {
    format!("rolegate-cancel:{:016x}:{pid}", fnv1a(handover.as_bytes()))
}

/// Passes `key` (from `source`) to every sibling, and waits for each to
/// close the connection, which it does once it has acted on the key (see
/// [`super::delivery`]); each is given up to [`super::relay_bound`] of
/// `timeout`. Returns how many took it; what each then found is not known
/// here.
pub async fn relay(
    key: &CancelKey,
    source: SocketAddr,
    shared: &Shared,
    timeout: Duration,
) -> usize {
    let siblings = &shared.siblings;
    let message = encode(key, source);
    let mut passed = 0;
    for pid in siblings.snapshot() {
        let Some(address) = siblings.address(pid) else {
            return passed;
        };
        match tokio::time::timeout(relay_bound(timeout), send(&address, pid, &message)).await {
            Ok(Ok(())) => passed += 1,
            Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                debug!(pid, "the restart's other process has exited");
                siblings.forget(pid);
            }
            Ok(Err(e)) => debug!(pid, "could not pass a cancel request to process {pid}: {e}"),
            Err(_) => debug!(pid, "passing a cancel request to process {pid} timed out"),
        }
    }
    passed
}

/// Sends `message` to process `pid`'s relay socket, once the socket is
/// known to be that process's and of this user (or root): a name in the
/// abstract namespace can be taken by anyone, and the message holds a
/// valid key.
async fn send(address: &UnixAddr, pid: u32, message: &[u8]) -> std::io::Result<()> {
    let mut stream = UnixStream::connect_addr(&address.clone().into()).await?;
    let owner = socket_peercred(&stream)?.uid.as_raw();
    if peer_pid(&stream) != Some(pid) || !same_user(owner) {
        // Treated like a sibling that has exited: it is forgotten.
        return Err(std::io::Error::new(
            std::io::ErrorKind::ConnectionRefused,
            format!("the relay socket of process {pid} is held by another process (uid {owner})"),
        ));
    }
    deliver(&mut stream, message).await
}

/// A relayed request: the client's address (length-prefixed text), then
/// the CancelRequest packet as the client sent it.
fn encode(key: &CancelKey, source: SocketAddr) -> BytesMut {
    let source = source.to_string();
    let packet = key.encode_cancel_request();
    let mut message = BytesMut::with_capacity(1 + source.len() + packet.len());
    // A socket address's text is at most 58 bytes (IPv6 with a scope id).
    message.put_u8(source.len() as u8);
    message.put_slice(source.as_bytes());
    message.put_slice(&packet);
    message
}

/// Reads one relayed request; `None` for anything else.
async fn decode<R: tokio::io::AsyncRead + Unpin>(stream: R) -> Option<(CancelKey, SocketAddr)> {
    let mut limited = stream.take((1 + MAX_SOURCE + MAX_CANCEL_REQUEST) as u64);
    let length = usize::from(limited.read_u8().await.ok()?);
    if length > MAX_SOURCE {
        return None;
    }
    let mut source = vec![0; length];
    limited.read_exact(&mut source).await.ok()?;
    let source = std::str::from_utf8(&source).ok()?.parse().ok()?;
    Some((read_request(limited).await?, source))
}

/// Binds this process's relay socket, once the handover name is set. Done
/// before the handover, so that the process handing its sockets over can
/// reach this one as soon as it learns its id.
pub fn bind(siblings: &Siblings) -> Option<UnixListener> {
    let address = siblings.address(std::process::id())?;
    match UnixListener::bind_addr(&address.into()) {
        Ok(listener) => Some(listener),
        Err(e) => {
            warn!("cannot take cancel requests from another process of this configuration ({e}): during a restart, cancels for the sessions of one process that reach the other are dropped");
            None
        }
    }
}

/// Takes cancel requests from siblings on `listener` until `stop`.
pub async fn serve(listener: UnixListener, shared: Arc<Shared>, stop: CancellationToken) {
    let intake = Intake::new(Via::Sibling, MAX_CONNECTIONS, shared);
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    debug!("accepting a relayed cancel request failed: {e}");
                    tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                    continue;
                }
            },
            () = stop.cancelled() => return,
        };
        let uid = socket_peercred(&stream).map(|c| c.uid.as_raw());
        if !matches!(uid, Ok(u) if same_user(u)) {
            debug!("a relayed cancel request from another user ({uid:?}): closed");
            continue;
        }
        intake.take(None, async move {
            let mut stream = stream;
            let (key, source) = decode(&mut stream).await?;
            Some((key, source, stream))
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn key() -> CancelKey {
        CancelKey {
            pid: 0x0102_0304,
            secret: Bytes::from_static(&[9; 32]),
        }
    }

    #[tokio::test]
    async fn a_relayed_request_carries_the_key_and_the_client() {
        let source: SocketAddr = "[2001:db8::7]:54321".parse().expect("address");
        let message = encode(&key(), source);
        let (decoded, from) = decode(&message[..]).await.expect("decodes");
        assert_eq!(
            (decoded.pid, &decoded.secret, from),
            (key().pid, &key().secret, source)
        );
    }

    #[tokio::test]
    async fn malformed_requests_are_refused() {
        let message = encode(&key(), "127.0.0.1:5".parse().expect("address"));
        // Cut short, an overlong address, an address that does not parse,
        // and a startup packet instead of a cancel.
        assert!(decode(&message[..message.len() - 1]).await.is_none());
        let mut long = vec![200u8];
        long.extend_from_slice(&message[1..]);
        assert!(decode(&long[..]).await.is_none());
        let mut garbled = message.to_vec();
        garbled[1] = b'x';
        assert!(decode(&garbled[..]).await.is_none());
        let mut startup = vec![11u8];
        startup.extend_from_slice(b"127.0.0.1:5");
        startup.extend_from_slice(&[0, 0, 0, 8, 0, 3, 0, 0]);
        assert!(decode(&startup[..]).await.is_none());
    }

    #[test]
    fn names_fit_and_siblings_are_other_processes() {
        let name = relay_name(&format!("rolegate:/{}", "x".repeat(200)), u32::MAX);
        assert!(name.len() <= 48, "{name}");
        let siblings = Siblings::default();
        siblings.add(0);
        siblings.add(std::process::id());
        siblings.add(42);
        siblings.add(42);
        assert_eq!(siblings.snapshot(), vec![42]);
        assert!(siblings.address(42).is_none(), "no name yet");
        siblings.set_name("rolegate:/etc/rolegate/proxy.toml");
        assert!(siblings.address(42).is_some());
        siblings.forget(42);
        assert!(siblings.snapshot().is_empty());
    }
}
