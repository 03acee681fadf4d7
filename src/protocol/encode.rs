//! The messages rolegate speaks itself in pooled sessions, where it ends
//! the client's login and logs in to servers: encoded by pgwire, as
//! DEPENDENCIES.md settles (pgwire's decoders never see peer bytes).

use bytes::{Bytes, BytesMut};
use pgwire::messages::extendedquery::{Bind, CloseComplete, Execute, Parse, ParseComplete, Sync};
use pgwire::messages::response::{CommandComplete, ReadyForQuery, TransactionStatus};
use pgwire::messages::simplequery::Query;
use pgwire::messages::startup::{
    Authentication, ParameterStatus, Password, SASLInitialResponse, SASLResponse, Startup,
};
use pgwire::messages::terminate::Terminate;
use pgwire::messages::Message;

fn encode<M: Message>(message: &M) -> Bytes {
    let mut out = BytesMut::with_capacity(message.message_length() + 1);
    // Encoding into a BytesMut only appends bytes; the one failure is a
    // message over pgwire's length limit, which none of rolegate's own
    // messages comes near. An empty message then ends the login on the
    // peer's side, never with a wrong byte.
    if message.encode(&mut out).is_err() {
        out.clear();
    }
    out.freeze()
}

/// A protocol 3.0 StartupMessage with these parameters.
pub fn startup(parameters: &[(&str, &str)]) -> Bytes {
    let mut message = Startup::new();
    for (name, value) in parameters {
        message
            .parameters
            .insert((*name).to_owned(), (*value).to_owned());
    }
    encode(&message)
}

/// AuthenticationSASL offering `mechanism` only.
pub fn authentication_sasl(mechanism: &str) -> Bytes {
    encode(&Authentication::SASL(vec![mechanism.to_owned()]))
}

pub fn authentication_sasl_continue(data: &[u8]) -> Bytes {
    encode(&Authentication::SASLContinue(Bytes::copy_from_slice(data)))
}

pub fn authentication_sasl_final(data: &[u8]) -> Bytes {
    encode(&Authentication::SASLFinal(Bytes::copy_from_slice(data)))
}

pub fn authentication_md5(salt: [u8; 4]) -> Bytes {
    encode(&Authentication::MD5Password(salt.to_vec()))
}

pub fn authentication_ok() -> Bytes {
    encode(&Authentication::Ok)
}

pub fn parameter_status(name: &str, value: &str) -> Bytes {
    encode(&ParameterStatus::new(name.to_owned(), value.to_owned()))
}

/// ReadyForQuery with status `I`: the state of a session rolegate opens.
pub fn ready_for_query_idle() -> Bytes {
    encode(&ReadyForQuery::new(TransactionStatus::Idle))
}

pub fn sasl_initial_response(mechanism: &str, data: &[u8]) -> Bytes {
    encode(&SASLInitialResponse::new(
        mechanism.to_owned(),
        Some(Bytes::copy_from_slice(data)),
    ))
}

pub fn sasl_response(data: &[u8]) -> Bytes {
    encode(&SASLResponse::new(Bytes::copy_from_slice(data)))
}

pub fn password(text: &str) -> Bytes {
    encode(&Password::new(text.to_owned()))
}

/// ReadyForQuery with the status a server last reported (`I`, `T`, `E`).
pub fn ready_for_query(status: u8) -> Bytes {
    let status = match status {
        b'T' => TransactionStatus::Transaction,
        b'E' => TransactionStatus::Error,
        _ => TransactionStatus::Idle,
    };
    encode(&ReadyForQuery::new(status))
}

/// What a Parse rolegate answers itself gets: the statement is prepared
/// on the server already.
pub fn parse_complete() -> Bytes {
    encode(&ParseComplete::new())
}

/// What a Close of a client's statement gets: rolegate forgets the name,
/// the server keeps the statement for others.
pub fn close_complete() -> Bytes {
    encode(&CloseComplete::new())
}

pub fn command_complete(tag: &str) -> Bytes {
    encode(&CommandComplete::new(tag.to_owned()))
}

/// A simple Query of rolegate's own (a reset, a replayed `SET`).
pub fn query(sql: &str) -> Bytes {
    encode(&Query::new(sql.to_owned()))
}

/// One parameterised query in the extended protocol, text in and out:
/// Parse (unnamed), Bind, Execute, Sync.
pub fn extended_query(sql: &str, parameters: &[&str]) -> Bytes {
    let mut out = BytesMut::new();
    out.extend_from_slice(&encode(&Parse::new(None, sql.to_owned(), Vec::new())));
    out.extend_from_slice(&encode(&Bind::new(
        None,
        None,
        Vec::new(),
        parameters
            .iter()
            .map(|p| Some(Bytes::copy_from_slice(p.as_bytes())))
            .collect(),
        Vec::new(),
    )));
    out.extend_from_slice(&encode(&Execute::new(None, 0)));
    out.extend_from_slice(&encode(&Sync::new()));
    out.freeze()
}

pub fn terminate() -> Bytes {
    encode(&Terminate::new())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_are_what_postgresql_expects() {
        assert_eq!(&authentication_ok()[..], b"R\0\0\0\x08\0\0\0\0");
        assert_eq!(
            &authentication_sasl("SCRAM-SHA-256")[..],
            b"R\0\0\0\x17\0\0\0\x0aSCRAM-SHA-256\0\0"
        );
        assert_eq!(
            &authentication_md5(*b"salt")[..],
            b"R\0\0\0\x0c\0\0\0\x05salt"
        );
        assert_eq!(&ready_for_query_idle()[..], b"Z\0\0\0\x05I");
        assert_eq!(&query("DISCARD ALL")[..], b"Q\0\0\0\x10DISCARD ALL\0");
        assert_eq!(
            &sasl_initial_response("SCRAM-SHA-256", b"n,,n=,r=x")[..],
            b"p\0\0\0\x1fSCRAM-SHA-256\0\0\0\0\x09n,,n=,r=x"
        );
        assert_eq!(&terminate()[..], b"X\0\0\0\x04");
        assert_eq!(
            &startup(&[("user", "app")])[..],
            b"\0\0\0\x12\0\x03\0\0user\0app\0\0"
        );
    }
}
