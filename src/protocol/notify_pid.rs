//! Rewriting the sender of NotificationResponse in the server→client
//! stream, for sessions whose client holds a rolegate-issued process id.
//!
//! Applications skip their own notifications by comparing a notification's
//! process id with the one BackendKeyData gave them (node-postgres users
//! and PHP's documentation do this). In a fleet the client was given
//! rolegate's id, so a notification whose sender is the session's own
//! backend must carry that id too; other senders pass unchanged.
//!
//! Like [`super::frame::FrameTracker`] this follows message headers and
//! skips bodies; it only looks into the first four body bytes of a
//! NotificationResponse (`A`). Those four bytes may be split between two
//! reads: [`NotifyPidRewriter::rewrite`] then reports them as not final,
//! and the caller presents them again with the bytes that follow.

use super::frame::HEADER_LEN;

const NOTIFICATION_RESPONSE: u8 = b'A';
const PID_LEN: usize = 4;

#[derive(Debug, Clone)]
pub struct NotifyPidRewriter {
    from: [u8; PID_LEN],
    to: [u8; PID_LEN],
    header: [u8; HEADER_LEN],
    header_have: usize,
    body_remaining: u32,
    /// The body about to start is a NotificationResponse's.
    pid_next: bool,
    /// A malformed length was seen: pass everything unchanged.
    desynchronised: bool,
}

impl NotifyPidRewriter {
    /// Replaces sender `from` (the backend's pid) with `to` (the client's).
    pub fn new(from: u32, to: u32) -> Self {
        Self {
            from: from.to_be_bytes(),
            to: to.to_be_bytes(),
            header: [0; HEADER_LEN],
            header_have: 0,
            body_remaining: 0,
            pid_next: false,
            desynchronised: false,
        }
    }

    /// Rewrites `data`, the next bytes from the server, in place. Returns
    /// how many leading bytes are final; the rest (at most 3, the start of
    /// a sender pid) must be presented again at the start of the next call.
    pub fn rewrite(&mut self, data: &mut [u8]) -> usize {
        let mut at = 0;
        while at < data.len() && !self.desynchronised {
            if self.body_remaining > 0 {
                if self.pid_next {
                    let Some(pid) = data.get_mut(at..at + PID_LEN) else {
                        return at;
                    };
                    if *pid == self.from {
                        pid.copy_from_slice(&self.to);
                    }
                    self.pid_next = false;
                }
                let skip = (data.len() - at).min(self.body_remaining as usize);
                at += skip;
                self.body_remaining -= skip as u32;
                continue;
            }
            let take = (HEADER_LEN - self.header_have).min(data.len() - at);
            self.header[self.header_have..self.header_have + take]
                .copy_from_slice(&data[at..at + take]);
            at += take;
            self.header_have += take;
            if self.header_have == HEADER_LEN {
                self.header_have = 0;
                let h = self.header;
                let len = u32::from_be_bytes([h[1], h[2], h[3], h[4]]);
                if len < 4 {
                    self.desynchronised = true;
                    break;
                }
                self.body_remaining = len - 4;
                self.pid_next =
                    h[0] == NOTIFICATION_RESPONSE && self.body_remaining as usize >= PID_LEN;
            }
        }
        data.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::message::encode as msg;

    fn notification(pid: u32, channel: &str) -> Vec<u8> {
        let mut body = pid.to_be_bytes().to_vec();
        body.extend_from_slice(channel.as_bytes());
        body.extend_from_slice(b"\0payload\0");
        msg(b'A', &body)
    }

    /// Feeds `input` in pieces of `step` bytes, as reads would deliver it.
    fn feed(input: &[u8], step: usize) -> Vec<u8> {
        let mut rewriter = NotifyPidRewriter::new(7, 0x0030_0001);
        let mut out = Vec::new();
        let mut pending = Vec::new();
        for piece in input.chunks(step) {
            pending.extend_from_slice(piece);
            let done = rewriter.rewrite(&mut pending);
            out.extend_from_slice(&pending[..done]);
            pending.drain(..done);
            assert!(pending.len() < PID_LEN);
        }
        out.extend_from_slice(&pending);
        out
    }

    #[test]
    fn own_notifications_carry_the_issued_pid_whatever_the_split() {
        let input = [
            msg(b'Z', b"I"),
            notification(7, "mine"),
            msg(b'D', &7u32.to_be_bytes()),
            notification(8, "theirs"),
            notification(7, "again"),
        ]
        .concat();
        let expected = [
            msg(b'Z', b"I"),
            notification(0x0030_0001, "mine"),
            msg(b'D', &7u32.to_be_bytes()),
            notification(8, "theirs"),
            notification(0x0030_0001, "again"),
        ]
        .concat();
        for step in 1..=input.len() {
            assert_eq!(feed(&input, step), expected, "pieces of {step}");
        }
    }

    #[test]
    fn a_bad_length_stops_rewriting() {
        let input = [b"A\0\0\0\x02".to_vec(), notification(7, "x")].concat();
        assert_eq!(feed(&input, 64), input);
    }
}
