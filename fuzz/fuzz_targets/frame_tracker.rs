//! The server→client frame tracker fed the same bytes in arbitrary splits:
//! never panics, and the boundary it reports does not depend on how the
//! stream was split.
#![no_main]

use libfuzzer_sys::fuzz_target;
use rolegate::protocol::frame::FrameTracker;

fuzz_target!(|input: (Vec<u8>, Vec<u8>)| {
    let (stream, cuts) = input;
    let mut whole = FrameTracker::new();
    whole.advance(&stream);
    let mut pieces = FrameTracker::new();
    let mut rest = &stream[..];
    for cut in cuts {
        let n = usize::from(cut).min(rest.len());
        pieces.advance(&rest[..n]);
        rest = &rest[n..];
    }
    pieces.advance(rest);
    assert_eq!(whole.at_boundary(), pieces.at_boundary());
    assert_eq!(whole.bytes_to_boundary(), pieces.bytes_to_boundary());
    assert_eq!(whole.last_tag(), pieces.last_tag());
});
