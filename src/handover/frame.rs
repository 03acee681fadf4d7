//! The handover's messages on the Unix stream between two rolegates.
//!
//! A stream keeps no message boundaries, so each message is framed: its
//! body's length (4 bytes, big-endian), then the body, a JSON list of the
//! keys of the sockets that travel with the frame's first bytes
//! (`SCM_RIGHTS`). The reader asks for no more than the rest of the frame
//! at each read, so it never takes bytes (or sockets) of the next message,
//! however the kernel splits or joins the writes.
//!
//! Earlier builds sent the body alone. A frame that starts with `[` is
//! such a body (as a length it would be over [`MAX_MESSAGE`]), read as it
//! was written: the rest of it in one read. A build of before this change
//! that receives a framed message cannot read it, and binds anew.

use std::io::{self, IoSlice, IoSliceMut, Write};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::Arc;

use rustix::net::{
    recvmsg, sendmsg, RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags,
};

/// The longest list of addresses one message carries.
pub(super) const MAX_MESSAGE: usize = 64 * 1024;
/// A message's frame starts with its body's length, in 4 bytes.
const FRAME_HEADER: usize = 4;

/// One message (framed as the module says): its sockets by key, or `None`
/// at the end of the stream. `buffer` holds the longest body.
pub(super) fn receive_one(
    stream: &UnixStream,
    buffer: &mut [u8],
    space: &mut [MaybeUninit<u8>],
) -> io::Result<Option<Vec<(String, OwnedFd)>>> {
    let mut fds: Vec<OwnedFd> = Vec::new();
    let mut header = [0u8; FRAME_HEADER];
    let got = read_up_to(stream, &mut header, space, &mut fds, true)?;
    if got == 0 {
        return Ok(None);
    }
    let body = if header[0] == b'[' {
        buffer[..got].copy_from_slice(&header[..got]);
        let rest = if got == FRAME_HEADER {
            read_up_to(stream, &mut buffer[got..], space, &mut fds, false)?
        } else {
            0
        };
        &buffer[..got + rest]
    } else {
        if got < FRAME_HEADER {
            return Err(cut_short());
        }
        let length = usize::try_from(u32::from_be_bytes(header)).unwrap_or(usize::MAX);
        let body = buffer.get_mut(..length).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("a message of {length} bytes (at most {MAX_MESSAGE})"),
            )
        })?;
        if read_up_to(stream, body, space, &mut fds, true)? < length {
            return Err(cut_short());
        }
        body
    };
    let keys: Vec<String> =
        serde_json::from_slice(body).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
    if keys.len() != fds.len() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{} addresses but {} sockets", keys.len(), fds.len()),
        ));
    }
    Ok(Some(keys.into_iter().zip(fds).collect()))
}

fn cut_short() -> io::Error {
    io::Error::new(
        io::ErrorKind::UnexpectedEof,
        "the running rolegate closed in the middle of a message",
    )
}

/// Reads into `buffer` until it is full (or, unless `fill`, after one
/// read) or the stream ends, adding every socket that arrives to `fds`.
/// Returns how many bytes it read.
fn read_up_to(
    stream: &UnixStream,
    buffer: &mut [u8],
    space: &mut [MaybeUninit<u8>],
    fds: &mut Vec<OwnedFd>,
    fill: bool,
) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buffer.len() {
        let mut control = RecvAncillaryBuffer::new(space);
        let mut iov = [IoSliceMut::new(&mut buffer[filled..])];
        let read = match recvmsg(stream, &mut iov, &mut control, RecvFlags::CMSG_CLOEXEC) {
            Ok(message) => message.bytes,
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => return Err(e.into()),
        };
        for cmsg in control.drain() {
            if let RecvAncillaryMessage::ScmRights(received) = cmsg {
                fds.extend(received);
            }
        }
        filled += read;
        if read == 0 || !fill {
            break;
        }
    }
    Ok(filled)
}

/// Sends one framed message: the sockets of `chunk`
/// with the list of their keys.
pub(super) fn send_chunk(
    stream: &UnixStream,
    chunk: &[(String, Arc<dyn AsFd + Send + Sync>)],
) -> io::Result<()> {
    let keys: Vec<&str> = chunk.iter().map(|(k, _)| k.as_str()).collect();
    let body = serde_json::to_vec(&keys).map_err(io::Error::other)?;
    let length = u32::try_from(body.len())
        .ok()
        .filter(|_| body.len() <= MAX_MESSAGE)
        .ok_or_else(|| io::Error::other("the addresses do not fit one message"))?;
    let mut frame = Vec::with_capacity(FRAME_HEADER + body.len());
    frame.extend_from_slice(&length.to_be_bytes());
    frame.extend_from_slice(&body);
    let fds: Vec<BorrowedFd<'_>> = chunk.iter().map(|(_, s)| s.as_fd()).collect();
    let mut space = vec![MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(fds.len().max(1)))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    if !fds.is_empty() && !control.push(SendAncillaryMessage::ScmRights(&fds)) {
        return Err(io::Error::other("the sockets do not fit one message"));
    }
    let sent = sendmsg(
        stream,
        &[IoSlice::new(&frame)],
        &mut control,
        SendFlags::empty(),
    )?;
    // The sockets went with the first bytes; the rest of the frame follows.
    (&*stream).write_all(&frame[sent..])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::handover::{hand_over, receive, Offered, SOCKETS_PER_MESSAGE};
    use std::time::Duration;

    /// Sockets as a handover offers them, by key.
    type OfferedSockets = Vec<(String, Arc<dyn AsFd + Send + Sync>)>;

    /// Offers `count` listening sockets of their own, keyed by address.
    fn offered_listeners(count: usize) -> (Vec<Arc<std::net::TcpListener>>, OfferedSockets) {
        let listeners: Vec<_> = (0..count)
            .map(|_| Arc::new(std::net::TcpListener::bind("127.0.0.1:0").expect("bind")))
            .collect();
        let offered = listeners
            .iter()
            .map(|l| {
                let key = Offered::listener_key(l.local_addr().expect("addr"), 0);
                (key, Arc::clone(l) as Arc<dyn AsFd + Send + Sync>)
            })
            .collect();
        (listeners, offered)
    }

    /// What `hand_over` wrote, read back as the kernel delivers it: each
    /// read's bytes and the sockets that came with them.
    fn captured(offered: &OfferedSockets) -> Vec<(Vec<u8>, Vec<OwnedFd>)> {
        let (ours, theirs) = UnixStream::pair().expect("socket pair");
        hand_over(&ours, offered).expect("sent");
        drop(ours);
        let mut space =
            vec![MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(SOCKETS_PER_MESSAGE))];
        let mut reads = Vec::new();
        for _ in 0..1000 {
            let mut buffer = vec![0u8; MAX_MESSAGE];
            let mut fds = Vec::new();
            let read = read_up_to(&theirs, &mut buffer, &mut space, &mut fds, false).expect("read");
            if read == 0 {
                return reads;
            }
            buffer.truncate(read);
            reads.push((buffer, fds));
        }
        panic!("the handover never ended");
    }

    /// A stream keeps no message boundaries: the same handover, delivered
    /// in pieces of every size (the sockets with each message's first
    /// piece), arrives whole, each socket under its key.
    #[test]
    fn a_handover_split_into_pieces_arrives_whole() {
        let (listeners, offered) = offered_listeners(SOCKETS_PER_MESSAGE + 3);
        for piece in [1, 3, 7, 1000] {
            let reads = captured(&offered);
            assert!(reads.len() >= 2, "two messages' worth of sockets");
            let (ours, theirs) = UnixStream::pair().expect("socket pair");
            let sender = std::thread::spawn(move || {
                for (bytes, fds) in &reads {
                    let borrowed: Vec<BorrowedFd<'_>> = fds.iter().map(AsFd::as_fd).collect();
                    for (i, part) in bytes.chunks(piece).enumerate() {
                        let mut space = vec![
                            MaybeUninit::uninit();
                            rustix::cmsg_space!(ScmRights(borrowed.len().max(1)))
                        ];
                        let mut control = SendAncillaryBuffer::new(&mut space);
                        if i == 0 && !borrowed.is_empty() {
                            assert!(control.push(SendAncillaryMessage::ScmRights(&borrowed)));
                        }
                        let sent = sendmsg(
                            &ours,
                            &[IoSlice::new(part)],
                            &mut control,
                            SendFlags::empty(),
                        )
                        .expect("send");
                        assert_eq!(sent, part.len());
                    }
                }
            });
            theirs
                .set_read_timeout(Some(Duration::from_secs(5)))
                .expect("timeout");
            let received = receive(&theirs).expect("receive");
            sender.join().expect("sender");
            assert_eq!(received.len(), listeners.len(), "pieces of {piece} bytes");
            super::super::tests::assert_every_listener_arrived(&listeners, &received);
        }
    }

    /// An earlier build's unframed message still reads; a frame that
    /// declares more than a message may hold is refused before anything
    /// is read into it.
    #[test]
    fn unframed_messages_read_and_long_frames_are_refused() {
        let (listeners, offered) = offered_listeners(1);
        let (ours, theirs) = UnixStream::pair().expect("socket pair");
        let keys = serde_json::to_vec(&[offered[0].0.as_str()]).expect("json");
        let fds = [offered[0].1.as_fd()];
        let mut space = vec![MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
        let mut control = SendAncillaryBuffer::new(&mut space);
        assert!(control.push(SendAncillaryMessage::ScmRights(&fds)));
        sendmsg(
            &ours,
            &[IoSlice::new(&keys)],
            &mut control,
            SendFlags::empty(),
        )
        .expect("send");
        drop(ours);
        let received = receive(&theirs).expect("receive");
        let addr = listeners[0].local_addr().expect("addr");
        assert!(received.contains_key(&Offered::listener_key(addr, 0)));

        let (mut ours, theirs) = UnixStream::pair().expect("socket pair");
        let declared = u32::try_from(MAX_MESSAGE + 1).expect("fits");
        ours.write_all(&declared.to_be_bytes()).expect("write");
        theirs
            .set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        let error = receive(&theirs).expect_err("too long");
        assert_eq!(error.kind(), io::ErrorKind::InvalidData);
        drop(ours);
    }
}
