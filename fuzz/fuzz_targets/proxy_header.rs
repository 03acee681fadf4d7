//! The PROXY protocol header parser (v1 and v2) on arbitrary bytes: never
//! panics, a complete header never claims more bytes than it was given nor
//! more than the longest header, and more bytes never turn a complete
//! header into another answer.
#![no_main]

use libfuzzer_sys::fuzz_target;
use rolegate::protocol::proxy_header::{parse, Parsed, V1_MAX, V2_MAX_BLOCK};

fuzz_target!(|data: &[u8]| {
    match parse(data) {
        Ok(Parsed::Complete { len, source }) => {
            assert!(len <= data.len());
            assert!(len <= (16 + V2_MAX_BLOCK).max(V1_MAX));
            // The header alone parses the same: the parser does not look
            // past its end.
            assert_eq!(parse(&data[..len]), Ok(Parsed::Complete { len, source }));
        }
        Ok(Parsed::Incomplete) => {
            // Every prefix of an incomplete header is incomplete too.
            for cut in 0..data.len().min(64) {
                assert_eq!(parse(&data[..cut]), Ok(Parsed::Incomplete), "prefix {cut}");
            }
        }
        Err(_) => {}
    }
});
