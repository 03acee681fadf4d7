//! The one authentication message rolegate changes: AuthenticationSASL.
//!
//! SCRAM-SHA-256-PLUS binds the SCRAM exchange to the TLS channel the
//! *server* sees ("Channel Binding", PostgreSQL docs 55.3.1). Through a
//! proxy the client's TLS session ends at rolegate and the backend sees
//! another (or none), so channel binding can never succeed end to end.
//! rolegate therefore removes SCRAM-SHA-256-PLUS from the mechanisms the
//! backend offers: libpq with `channel_binding=prefer` (its default) then
//! uses plain SCRAM-SHA-256, and a client that requires channel binding
//! gets libpq's own clear refusal instead of a failed exchange.

use super::error::{ProtocolError, SqlState};

/// The mechanism that needs channel binding.
pub const SCRAM_PLUS: &[u8] = b"SCRAM-SHA-256-PLUS";

/// Rewrites the body of an AuthenticationSASL message (request code 10,
/// then NUL-terminated mechanism names, then a final NUL) without
/// SCRAM-SHA-256-PLUS. Returns `Ok(None)` when nothing needs to change.
pub fn without_channel_binding(body: &[u8]) -> Result<Option<Vec<u8>>, ProtocolError> {
    let malformed = || {
        ProtocolError::new(
            SqlState::PROTOCOL_VIOLATION,
            "the server sent a malformed SASL mechanism list",
        )
    };
    let (code, mut list) = body.split_at_checked(4).ok_or_else(malformed)?;
    let mut kept = Vec::new();
    let mut removed = false;
    loop {
        let nul = list.iter().position(|&b| b == 0).ok_or_else(malformed)?;
        let (name, rest) = list.split_at(nul);
        list = &rest[1..];
        if name.is_empty() {
            break;
        }
        if name == SCRAM_PLUS {
            removed = true;
        } else {
            kept.push(name);
        }
    }
    if !list.is_empty() {
        return Err(malformed());
    }
    if !removed {
        return Ok(None);
    }
    let mut out = code.to_vec();
    for name in kept {
        out.extend_from_slice(name);
        out.push(0);
    }
    out.push(0);
    Ok(Some(out))
}

/// The GS2 channel-binding flag of a SASLInitialResponse body (mechanism
/// name, then the length and data of the client-first-message): `y`
/// means "I support channel binding but think the server does not".
/// `None` when the body is not a SCRAM first message.
pub fn channel_binding_flag(body: &[u8]) -> Option<u8> {
    let nul = body.iter().position(|&b| b == 0)?;
    let data = body.get(nul + 1 + 4..)?;
    data.first().copied()
}

/// Whether a SASLInitialResponse announces channel-binding support the
/// server was not seen to offer (libpq `channel_binding=prefer` over TLS).
pub fn announces_unoffered_channel_binding(body: &[u8]) -> bool {
    channel_binding_flag(body) == Some(b'y')
}

#[cfg(test)]
mod tests {
    use super::*;

    const SASL: [u8; 4] = [0, 0, 0, 10];

    fn body(names: &[&[u8]]) -> Vec<u8> {
        let mut out = SASL.to_vec();
        for name in names {
            out.extend_from_slice(name);
            out.push(0);
        }
        out.push(0);
        out
    }

    #[test]
    fn plus_is_removed() {
        let offered = body(&[b"SCRAM-SHA-256-PLUS", b"SCRAM-SHA-256"]);
        assert_eq!(
            without_channel_binding(&offered),
            Ok(Some(body(&[b"SCRAM-SHA-256"])))
        );
    }

    /// Found by the `auth_messages` fuzz target (its invariant, not this
    /// code, was wrong): a mechanism whose name merely ends in
    /// SCRAM-SHA-256-PLUS is another mechanism and stays; only the exact
    /// name goes. The body is the crasher's, byte for byte.
    #[test]
    fn only_the_exact_plus_name_is_removed() {
        let crasher: &[u8] = b"AM-S@A-256-PLUS\x00SAMH\x00*\x00\xff\xff\x00SCRAM-SHA-256-PLUS\x00\
            S\xbf\xb2\xb7\xf9SCRAM-SHA-256-PLUS\x00S\xff\xff\xfbaa5\x00\x00";
        let rewritten = without_channel_binding(crasher)
            .expect("well formed")
            .expect("the exact name is removed");
        let names: Vec<&[u8]> = rewritten[4..rewritten.len() - 1]
            .split(|&b| b == 0)
            .filter(|name| !name.is_empty())
            .collect();
        assert_eq!(
            names,
            [
                &b"@A-256-PLUS"[..],
                b"SAMH",
                b"*",
                b"\xff\xff",
                b"S\xbf\xb2\xb7\xf9SCRAM-SHA-256-PLUS",
                b"S\xff\xff\xfbaa5",
            ]
        );
        assert_eq!(without_channel_binding(&rewritten), Ok(None));
    }

    /// PostgreSQL 18 offers OAUTHBEARER beside SCRAM when `pg_hba.conf`
    /// says `oauth`; it is relayed untouched, only SCRAM-SHA-256-PLUS goes.
    #[test]
    fn oauthbearer_passes_through() {
        assert_eq!(without_channel_binding(&body(&[b"OAUTHBEARER"])), Ok(None));
        let offered = body(&[b"OAUTHBEARER", b"SCRAM-SHA-256-PLUS", b"SCRAM-SHA-256"]);
        assert_eq!(
            without_channel_binding(&offered),
            Ok(Some(body(&[b"OAUTHBEARER", b"SCRAM-SHA-256"])))
        );
    }

    #[test]
    fn lists_without_plus_are_untouched() {
        assert_eq!(
            without_channel_binding(&body(&[b"SCRAM-SHA-256"])),
            Ok(None)
        );
        assert_eq!(without_channel_binding(&body(&[])), Ok(None));
    }

    #[test]
    fn gs2_flags() {
        let initial = |first: &[u8]| {
            let mut body = b"SCRAM-SHA-256\0".to_vec();
            body.extend_from_slice(&(first.len() as u32).to_be_bytes());
            body.extend_from_slice(first);
            body
        };
        assert!(announces_unoffered_channel_binding(&initial(
            b"y,,n=,r=abc"
        )));
        assert!(!announces_unoffered_channel_binding(&initial(
            b"n,,n=,r=abc"
        )));
        assert_eq!(
            channel_binding_flag(&initial(b"p=tls-server-end-point,,n=")),
            Some(b'p')
        );
        assert_eq!(channel_binding_flag(b"SCRAM-SHA-256"), None);
        assert_eq!(channel_binding_flag(b"SCRAM\0\0\0"), None);
    }

    #[test]
    fn malformed_lists_are_errors() {
        for bad in [
            &b""[..],
            b"\0\0\0",
            b"\0\0\0\x0aSCRAM-SHA-256",
            b"\0\0\0\x0aSCRAM-SHA-256\0",
            b"\0\0\0\x0a\0junk",
        ] {
            assert!(without_channel_binding(bad).is_err(), "{bad:?}");
        }
    }
}
