//! Walking a stream of messages as it passes: each message's type and
//! length are seen, small messages of interest whole, and everything is
//! passed on without waiting for large bodies (a 100 MB row streams
//! through; it is never held whole).
//!
//! Pooled sessions need this where a passthrough session only counts
//! frames ([`super::frame`]): which messages a client sent (a Terminate is
//! rolegate's to answer, a Sync or Query awaits a ReadyForQuery), and what
//! the server said (ReadyForQuery's transaction status, ParameterStatus).

use bytes::BytesMut;

use super::frame::HEADER_LEN;
use super::{ProtocolError, SqlState};

/// Messages up to this length are shown whole when asked for, unless a
/// walker is made with another limit.
pub const WATCHED_BODY_LIMIT: usize = 64 * 1024;

/// What a walker's owner decides for a message whose header it sees.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Seen {
    /// Pass it on without looking at the body.
    Pass,
    /// Hold it until it is whole, then show it.
    Watch,
    /// Consume it whole and pass nothing on.
    Drop,
}

/// Where one direction's message stream stands.
#[derive(Debug)]
pub struct Walker {
    /// Bytes of a passed-through body still to come.
    streaming: usize,
    /// The body being dropped is this many bytes from its end.
    dropping: usize,
    /// The longest message held whole when watched.
    limit: usize,
}

impl Default for Walker {
    fn default() -> Self {
        Self::with_limit(WATCHED_BODY_LIMIT)
    }
}

impl Walker {
    /// A walker that holds watched messages of up to `limit` bytes whole;
    /// longer ones pass through unseen.
    pub fn with_limit(limit: usize) -> Self {
        Self {
            streaming: 0,
            dropping: 0,
            limit,
        }
    }

    /// True when nothing of a message is in flight: the next byte starts
    /// a new message.
    pub fn at_boundary(&self, pending: &BytesMut) -> bool {
        self.streaming == 0 && self.dropping == 0 && pending.is_empty()
    }

    /// Moves what can be moved from `input` to `output`. `header` decides
    /// per message type and length (and may put messages of its own into
    /// the output first); `whole` gets each watched message, header
    /// included, and writes to the output what goes on in its place (the
    /// message itself, usually), or refuses it. Incomplete headers and watched messages
    /// stay in `input` for the next read.
    pub fn walk(
        &mut self,
        input: &mut BytesMut,
        output: &mut BytesMut,
        side: &str,
        mut header: impl FnMut(u8, usize, &mut BytesMut) -> Seen,
        mut whole: impl FnMut(u8, &[u8], &mut BytesMut) -> Result<(), ProtocolError>,
    ) -> Result<(), ProtocolError> {
        loop {
            if self.streaming > 0 {
                let n = self.streaming.min(input.len());
                output.extend_from_slice(&input.split_to(n));
                self.streaming -= n;
                if self.streaming > 0 {
                    return Ok(());
                }
            }
            if self.dropping > 0 {
                let n = self.dropping.min(input.len());
                let _ = input.split_to(n);
                self.dropping -= n;
                if self.dropping > 0 {
                    return Ok(());
                }
            }
            if input.len() < HEADER_LEN {
                return Ok(());
            }
            let tag = input[0];
            let len = u32::from_be_bytes([input[1], input[2], input[3], input[4]]) as usize;
            if len < 4 {
                return Err(ProtocolError::new(
                    SqlState::PROTOCOL_VIOLATION,
                    format!(
                        "invalid message length {len} from the {side} for message type {:?}",
                        char::from(tag)
                    ),
                ));
            }
            match header(tag, len, output) {
                Seen::Watch if len <= self.limit => {
                    if input.len() < len + 1 {
                        return Ok(());
                    }
                    let message = input.split_to(len + 1);
                    whole(tag, &message, output)?;
                }
                Seen::Drop => {
                    let n = (len + 1).min(input.len());
                    let _ = input.split_to(n);
                    self.dropping = len + 1 - n;
                }
                Seen::Pass | Seen::Watch => {
                    let n = (len + 1).min(input.len());
                    output.extend_from_slice(&input.split_to(n));
                    self.streaming = len + 1 - n;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::message::encode as msg;

    #[test]
    fn watched_messages_wait_to_be_whole_and_others_stream() {
        let mut walker = Walker::default();
        let mut input = BytesMut::new();
        let mut output = BytesMut::new();
        let mut seen = Vec::new();
        let row = msg(b'D', &[7; 100]);
        let ready = msg(b'Z', b"I");
        // Half a row, then the rest with a ReadyForQuery cut in two.
        input.extend_from_slice(&row[..50]);
        walker
            .walk(
                &mut input,
                &mut output,
                "server",
                |_, _, _| Seen::Pass,
                pass,
            )
            .expect("walk");
        assert_eq!(output.len(), 50, "the row's first half streamed on");
        input.extend_from_slice(&row[50..]);
        input.extend_from_slice(&ready[..3]);
        let watch = |tag, _, _: &mut BytesMut| if tag == b'Z' { Seen::Watch } else { Seen::Pass };
        walker
            .walk(&mut input, &mut output, "server", watch, |t, m, out| {
                seen.push((t, m[HEADER_LEN..].to_vec()));
                pass(t, m, out)
            })
            .expect("walk");
        assert_eq!(output.len(), row.len());
        assert!(seen.is_empty());
        assert!(!walker.at_boundary(&input));
        input.extend_from_slice(&ready[3..]);
        walker
            .walk(&mut input, &mut output, "server", watch, |t, m, out| {
                seen.push((t, m[HEADER_LEN..].to_vec()));
                pass(t, m, out)
            })
            .expect("walk");
        assert_eq!(seen, vec![(b'Z', b"I".to_vec())]);
        assert_eq!(output.len(), row.len() + ready.len());
        assert!(walker.at_boundary(&input));
    }

    #[test]
    fn dropped_messages_pass_nothing_and_bad_lengths_are_errors() {
        let mut walker = Walker::default();
        let mut input = BytesMut::from(&msg(b'X', b"")[..]);
        input.extend_from_slice(&msg(b'Q', b"select 1\0"));
        let mut output = BytesMut::new();
        let drop_x = |tag, _, _: &mut BytesMut| if tag == b'X' { Seen::Drop } else { Seen::Pass };
        walker
            .walk(&mut input, &mut output, "client", drop_x, pass)
            .expect("walk");
        assert_eq!(&output[..], &msg(b'Q', b"select 1\0")[..]);
        let mut input = BytesMut::from(&b"Q\0\0\0\x02"[..]);
        assert!(walker
            .walk(
                &mut input,
                &mut output,
                "client",
                |_, _, _| Seen::Pass,
                pass
            )
            .is_err());
    }

    fn pass(_: u8, message: &[u8], out: &mut BytesMut) -> Result<(), ProtocolError> {
        out.extend_from_slice(message);
        Ok(())
    }
}
