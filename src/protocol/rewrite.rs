//! Reading and rewriting the statement names in a client's
//! extended-protocol messages, for transaction pooling: a client's named
//! statement lives on the server under a name of rolegate's, so Parse,
//! Bind, Describe and Close are rewritten with it on their way.
//!
//! Only the names are touched; everything after them (query text,
//! parameter types, bound values, in whatever encoding the client uses)
//! is copied as it came. Every function takes a whole message, header
//! included, and refuses a malformed one instead of guessing.

use bytes::{BufMut, BytesMut};

use super::frame::HEADER_LEN;
use super::{ProtocolError, SqlState};

/// Parse: the statement's name and the rest (query, parameter types).
pub fn parse(message: &[u8]) -> Result<(&[u8], &[u8]), ProtocolError> {
    let body = body(message);
    let (name, rest) = cstring(body, "Parse")?;
    Ok((name, rest))
}

/// A Bind's portal name, statement name and the rest (formats, values).
pub type BindParts<'a> = (&'a [u8], &'a [u8], &'a [u8]);

/// Bind: the portal's name, the statement's name and the rest.
pub fn bind(message: &[u8]) -> Result<BindParts<'_>, ProtocolError> {
    let (portal, rest) = cstring(body(message), "Bind")?;
    let (statement, rest) = cstring(rest, "Bind")?;
    Ok((portal, statement, rest))
}

/// Describe or Close: the target (`S` statement, `P` portal) and its name.
pub fn target(message: &[u8]) -> Result<(u8, &[u8]), ProtocolError> {
    let body = body(message);
    let Some((&kind, rest)) = body.split_first() else {
        return Err(malformed("Describe or Close"));
    };
    if kind != b'S' && kind != b'P' {
        return Err(malformed("Describe or Close"));
    }
    let (name, rest) = cstring(rest, "Describe or Close")?;
    if !rest.is_empty() {
        return Err(malformed("Describe or Close"));
    }
    Ok((kind, name))
}

/// A Parse of `rest` (query and types, as a client sent them) as `name`.
pub fn put_parse(out: &mut BytesMut, name: &str, rest: &[u8]) {
    put(out, b'P', &[name.as_bytes(), b"\0", rest]);
}

/// A Bind of `statement` (a server-side name) with the client's portal
/// and values.
pub fn put_bind(out: &mut BytesMut, portal: &[u8], statement: &str, rest: &[u8]) {
    put(
        out,
        b'B',
        &[portal, b"\0", statement.as_bytes(), b"\0", rest],
    );
}

/// A Describe (`tag` `D`) or Close (`C`) of statement `name`.
pub fn put_statement_target(out: &mut BytesMut, tag: u8, name: &str) {
    put(out, tag, &[b"S", name.as_bytes(), b"\0"]);
}

fn put(out: &mut BytesMut, tag: u8, parts: &[&[u8]]) {
    let len: usize = parts.iter().map(|p| p.len()).sum::<usize>() + 4;
    out.reserve(len + 1);
    out.put_u8(tag);
    // The parts come from a message that fit in a u32 length, with a
    // name of rolegate's (a few bytes) in place of the client's.
    out.put_u32(u32::try_from(len).unwrap_or(u32::MAX));
    for part in parts {
        out.extend_from_slice(part);
    }
}

fn body(message: &[u8]) -> &[u8] {
    message.get(HEADER_LEN..).unwrap_or_default()
}

/// A NUL-terminated string and what follows it.
fn cstring<'a>(bytes: &'a [u8], what: &str) -> Result<(&'a [u8], &'a [u8]), ProtocolError> {
    let end = bytes
        .iter()
        .position(|&b| b == 0)
        .ok_or_else(|| malformed(what))?;
    Ok((&bytes[..end], &bytes[end + 1..]))
}

fn malformed(what: &str) -> ProtocolError {
    ProtocolError::new(
        SqlState::PROTOCOL_VIOLATION,
        format!("malformed {what} message from the client"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::message::encode as msg;

    #[test]
    fn names_are_read_and_replaced_and_the_rest_is_kept() {
        let parse_message = msg(b'P', b"s1\0select $1\0\0\x01\0\0\0\x17");
        let (name, rest) = parse(&parse_message).expect("parse");
        assert_eq!(name, b"s1");
        let mut out = BytesMut::new();
        put_parse(&mut out, "rolegate_7", rest);
        assert_eq!(
            &out[..],
            &msg(b'P', b"rolegate_7\0select $1\0\0\x01\0\0\0\x17")[..]
        );

        let bind_message = msg(b'B', b"p\0s1\0\0\0\0\x01\0\0\0\x01x\0\0");
        let (portal, statement, rest) = bind(&bind_message).expect("bind");
        assert_eq!((portal, statement), (&b"p"[..], &b"s1"[..]));
        out.clear();
        put_bind(&mut out, portal, "rolegate_7", rest);
        assert_eq!(
            &out[..],
            &msg(b'B', b"p\0rolegate_7\0\0\0\0\x01\0\0\0\x01x\0\0")[..]
        );

        assert_eq!(
            target(&msg(b'D', b"Ss1\0")).expect("describe"),
            (b'S', &b"s1"[..])
        );
        out.clear();
        put_statement_target(&mut out, b'C', "rolegate_7");
        assert_eq!(&out[..], &msg(b'C', b"Srolegate_7\0")[..]);
    }

    #[test]
    fn malformed_messages_are_refused() {
        assert!(parse(&msg(b'P', b"no terminator")).is_err());
        assert!(bind(&msg(b'B', b"portal\0")).is_err());
        assert!(target(&msg(b'D', b"")).is_err());
        assert!(target(&msg(b'D', b"Xname\0")).is_err());
        assert!(target(&msg(b'C', b"Sname\0extra")).is_err());
        assert!(parse(b"P").is_err());
    }
}
