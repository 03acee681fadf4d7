//! Everything rolegate reads during authentication: message framing with a
//! length limit, authentication request codes, BackendKeyData capture, the
//! SASL mechanism-list rewrite and the GS2 flag of a SASLInitialResponse.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use rolegate::protocol::message::{auth_request_code, decode_message};
use rolegate::protocol::sasl::{channel_binding_flag, without_channel_binding, SCRAM_PLUS};
use rolegate::protocol::startup::CancelKey;

fuzz_target!(|data: &[u8]| {
    let mut buf = BytesMut::from(data);
    for _ in 0..16 {
        match decode_message(&mut buf, 1 << 16, "fuzzer") {
            Ok(Some(message)) => {
                assert!(message.raw.len() <= (1 << 16) + 1);
                let _ = auth_request_code(message.body());
                let _ = CancelKey::from_backend_key_data(message.body());
                if let Ok(Some(rewritten)) = without_channel_binding(message.body()) {
                    assert!(rewritten.len() < message.body().len());
                    // No mechanism is named SCRAM-SHA-256-PLUS any more
                    // (a longer name that ends with it is another one).
                    let names = &rewritten[4..rewritten.len() - 1];
                    assert!(!names.split(|&b| b == 0).any(|name| name == SCRAM_PLUS));
                    // Rewriting is idempotent.
                    assert_eq!(without_channel_binding(&rewritten), Ok(None));
                }
                let _ = channel_binding_flag(message.body());
            }
            Ok(None) | Err(_) => break,
        }
    }
    let _ = without_channel_binding(data);
    let _ = CancelKey::from_backend_key_data(data);
});
