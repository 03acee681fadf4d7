//! What a pooled listener decodes from its peers: the message walker fed
//! the same stream in arbitrary splits (never panics; what it passes on
//! and what it shows whole do not depend on the splits), and the SCRAM
//! and userlist parsers on arbitrary input (never panic).
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use rolegate::auth::scram::ServerExchange;
use rolegate::auth::secret::Secret;
use rolegate::auth::userlist;
use rolegate::protocol::walk::{Seen, Walker};

/// Walks `pieces` in turn: the bytes passed on, the messages shown
/// whole, and whether the walk failed.
fn walk(pieces: &[&[u8]]) -> (Vec<u8>, Vec<(u8, Vec<u8>)>, bool) {
    let mut walker = Walker::default();
    let mut input = BytesMut::new();
    let mut output = BytesMut::new();
    let mut shown = Vec::new();
    for piece in pieces {
        input.extend_from_slice(piece);
        let walked = walker.walk(
            &mut input,
            &mut output,
            "fuzz",
            |tag, _, _| match tag {
                b'Z' | b'S' => Seen::Watch,
                b'X' => Seen::Drop,
                _ => Seen::Pass,
            },
            |tag, message, out| {
                shown.push((tag, message[5..].to_vec()));
                out.extend_from_slice(message);
                Ok(())
            },
        );
        if walked.is_err() {
            return (output.to_vec(), shown, true);
        }
    }
    (output.to_vec(), shown, false)
}

fuzz_target!(|input: (Vec<u8>, Vec<u8>, String)| {
    let (stream, cuts, text) = input;
    let mut pieces = Vec::new();
    let mut rest = &stream[..];
    for cut in cuts {
        let n = usize::from(cut).min(rest.len());
        pieces.push(&rest[..n]);
        rest = &rest[n..];
    }
    pieces.push(rest);
    let (whole_out, whole_shown, whole_failed) = walk(&[&stream]);
    let (split_out, split_shown, split_failed) = walk(&pieces);
    assert_eq!(whole_failed, split_failed);
    if !whole_failed {
        assert_eq!(whole_out, split_out);
        assert_eq!(whole_shown, split_shown);
    }
    let _ = userlist::parse(&text);
    if let Ok(Secret::Scram(secret)) = Secret::parse(&text) {
        let _ = ServerExchange::start(stream.as_slice(), &secret);
    }
    let secret = rolegate::auth::scram::decoy("fuzz");
    if let Ok(exchange) = ServerExchange::start(text.as_bytes(), &secret) {
        let _ = exchange.finish(&stream, &secret);
    }
    let _ = rolegate::protocol::rewrite::parse(&stream);
    let _ = rolegate::protocol::rewrite::bind(&stream);
    let _ = rolegate::protocol::rewrite::target(&stream);
});
