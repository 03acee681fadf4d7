//! The first-packet parser (SSLRequest, GSSENCRequest, CancelRequest,
//! StartupMessage, direct TLS) on arbitrary bytes: never panics, never
//! consumes more than one packet, keeps the raw bytes it was given, and
//! waits (consuming nothing) when the input is merely incomplete.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use rolegate::protocol::startup::{decode_first_packet, FirstPacket, MAX_STARTUP_PACKET};

fuzz_target!(|data: &[u8]| {
    let mut buf = BytesMut::from(data);
    // Decode packet after packet, as a client may send several (e.g. an
    // SSLRequest, then a StartupMessage).
    for _ in 0..8 {
        let before = buf.len();
        match decode_first_packet(&mut buf) {
            Ok(None) => {
                assert_eq!(buf.len(), before, "an incomplete packet must not be consumed");
                break;
            }
            Ok(Some(FirstPacket::DirectTls)) => {
                assert_eq!(buf.len(), before, "direct TLS leaves the ClientHello in place");
                break;
            }
            Ok(Some(FirstPacket::Startup(startup))) => {
                let consumed = before - buf.len();
                assert_eq!(startup.raw.len(), consumed);
                assert!(consumed <= MAX_STARTUP_PACKET);
                assert_eq!(&startup.raw[..], &data[data.len() - before..][..consumed]);
                let _ = (startup.user(), startup.database());
            }
            Ok(Some(FirstPacket::Cancel(key))) => {
                let encoded = key.encode_cancel_request();
                assert_eq!(encoded.len(), before - buf.len());
            }
            Ok(Some(_)) => assert_eq!(before - buf.len(), 8),
            Err(_) => break,
        }
    }
});
