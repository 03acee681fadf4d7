//! Message framing of the server→client stream, without decoding bodies.
//!
//! After authentication rolegate copies bytes, but it must still know where
//! one backend message ends and the next begins: ending a session (demotion,
//! shutdown, a dead backend) is only clean when rolegate's own FATAL
//! ErrorResponse starts at a message boundary. [`FrameTracker`] follows the
//! 5-byte headers ("Message Formats", PostgreSQL docs chapter 55) of the
//! bytes actually delivered to the client and skips over the bodies; its
//! cost is a few instructions per message, whatever the message size.

/// Type byte + 4-byte length.
pub const HEADER_LEN: usize = 5;

/// Where the delivered server→client byte stream stands.
#[derive(Debug, Clone, Default)]
pub struct FrameTracker {
    header: [u8; HEADER_LEN],
    header_have: u8,
    body_remaining: u32,
    last_tag: u8,
    desynchronised: bool,
}

impl FrameTracker {
    pub fn new() -> Self {
        Self::default()
    }

    /// Accounts for `data`, the next bytes delivered to the client.
    pub fn advance(&mut self, mut data: &[u8]) {
        while !data.is_empty() && !self.desynchronised {
            if self.body_remaining > 0 {
                let skip = data.len().min(self.body_remaining as usize);
                data = &data[skip..];
                self.body_remaining -= skip as u32;
                continue;
            }
            let have = self.header_have as usize;
            let take = (HEADER_LEN - have).min(data.len());
            self.header[have..have + take].copy_from_slice(&data[..take]);
            data = &data[take..];
            self.header_have += take as u8;
            if self.header_have as usize == HEADER_LEN {
                let h = &self.header;
                let len = u32::from_be_bytes([h[1], h[2], h[3], h[4]]);
                if len < 4 {
                    // A length below 4 cannot be framed: stop claiming to
                    // know where boundaries are.
                    self.desynchronised = true;
                    return;
                }
                self.last_tag = h[0];
                self.body_remaining = len - 4;
                self.header_have = 0;
            }
        }
    }

    /// True when the next byte delivered would start a new message.
    pub fn at_boundary(&self) -> bool {
        !self.desynchronised && self.header_have == 0 && self.body_remaining == 0
    }

    /// How many more bytes complete the current message, when that is known
    /// (the header of the current message has been seen).
    pub fn bytes_to_boundary(&self) -> Option<usize> {
        if self.desynchronised || self.header_have != 0 {
            None
        } else {
            Some(self.body_remaining as usize)
        }
    }

    /// The type byte of the most recent message whose header was delivered.
    pub fn last_tag(&self) -> u8 {
        self.last_tag
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::protocol::message::encode as msg;

    #[test]
    fn boundaries_across_every_split() {
        let mut stream = msg(b'T', b"abc");
        stream.extend(msg(b'D', &[7u8; 300]));
        stream.extend(msg(b'Z', b"I"));
        let ends = [8usize, 8 + 305, stream.len()];
        for split in 0..=stream.len() {
            let mut t = FrameTracker::new();
            t.advance(&stream[..split]);
            let expected = split == 0 || ends.contains(&split);
            assert_eq!(t.at_boundary(), expected, "split at {split}");
            t.advance(&stream[split..]);
            assert!(t.at_boundary());
            assert_eq!(t.last_tag(), b'Z');
        }
    }

    #[test]
    fn byte_at_a_time() {
        let stream = [msg(b'C', b"SELECT 1\0"), msg(b'Z', b"I")].concat();
        let mut t = FrameTracker::new();
        for (i, b) in stream.iter().enumerate() {
            t.advance(std::slice::from_ref(b));
            assert_eq!(t.at_boundary(), i + 1 == 14 || i + 1 == stream.len(), "{i}");
        }
    }

    #[test]
    fn bytes_to_boundary_is_known_after_the_header() {
        let m = msg(b'D', &[0u8; 10]);
        let mut t = FrameTracker::new();
        t.advance(&m[..3]);
        assert_eq!(t.bytes_to_boundary(), None);
        t.advance(&m[3..7]);
        assert_eq!(t.bytes_to_boundary(), Some(8));
        t.advance(&m[7..]);
        assert_eq!(t.bytes_to_boundary(), Some(0));
    }

    #[test]
    fn empty_body_message() {
        let mut t = FrameTracker::new();
        t.advance(&msg(b'I', b""));
        assert!(t.at_boundary());
        assert_eq!(t.last_tag(), b'I');
    }

    #[test]
    fn impossible_length_desynchronises() {
        let mut t = FrameTracker::new();
        t.advance(&[b'Z', 0, 0, 0, 2, b'Z']);
        assert!(!t.at_boundary());
        assert_eq!(t.bytes_to_boundary(), None);
    }
}
