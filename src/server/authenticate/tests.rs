use super::*;
use tokio::io::duplex;

use crate::protocol::message::encode as msg;

const PLAIN_PG1: LoginTarget<'static> = LoginTarget {
    member: "pg1",
    tls: false,
    for_writes: false,
};

/// Relays a login over plaintext, passing the server's key through.
async fn relay_plain<C, B>(client: &mut C, backend: &mut B) -> Result<Authenticated, AuthError>
where
    C: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    relay_authentication(
        client,
        backend,
        BytesMut::new(),
        &PLAIN_PG1,
        &mut |k| k,
        &mut LoginSlot::default(),
    )
    .await
}

#[tokio::test]
async fn md5_exchange_captures_the_key() {
    let (mut client_app, mut client) = duplex(1 << 16);
    let (mut backend, mut server_app) = duplex(1 << 16);
    let server = tokio::spawn(async move {
        server_app
            .write_all(&msg(b'R', b"\0\0\0\x05salt"))
            .await
            .expect("write");
        let mut answer = vec![0u8; 5 + 4];
        server_app.read_exact(&mut answer).await.expect("read");
        assert_eq!(answer, msg(b'p', b"md5\0"));
        let mut rest = msg(b'R', b"\0\0\0\0");
        rest.extend(msg(b'K', b"\0\0\0\x2aKEY!"));
        rest.extend(msg(b'Z', b"I"));
        server_app.write_all(&rest).await.expect("write");
        server_app
    });
    client_app
        .write_all(&msg(b'p', b"md5\0"))
        .await
        .expect("write");
    // The client gets the key `issue_key` returns, not the server's.
    let mut seen = None;
    let mut issue_key = |key: CancelKey| {
        seen = Some(key);
        CancelKey {
            pid: 99,
            secret: bytes::Bytes::from_static(b"NEW!"),
        }
    };
    relay_authentication(
        &mut client,
        &mut backend,
        BytesMut::new(),
        &PLAIN_PG1,
        &mut issue_key,
        &mut LoginSlot::default(),
    )
    .await
    .expect("authenticated");
    let key = seen.expect("key");
    assert_eq!(key.pid, 42);
    assert_eq!(&key.secret[..], b"KEY!");
    drop(client);
    let mut got = Vec::new();
    client_app.read_to_end(&mut got).await.expect("read");
    let issued = msg(b'K', b"\0\0\0\x63NEW!");
    assert!(got.windows(issued.len()).any(|w| w == issued), "{got:?}");
    assert!(!got.windows(4).any(|w| w == b"KEY!"));
    drop(server.await.expect("server"));
}

/// GSSAPI's last round: the server sends its final mutual-
/// authentication token in an AuthenticationGSSContinue and goes on to
/// AuthenticationOk without waiting; the client sends nothing more.
#[tokio::test]
async fn gss_final_continue_is_followed_by_the_server() {
    let (mut client_app, mut client) = duplex(1 << 16);
    let (mut backend, mut server_app) = duplex(1 << 16);
    let server = tokio::spawn(async move {
        server_app
            .write_all(&msg(b'R', b"\0\0\0\x07"))
            .await
            .expect("write");
        let mut token = vec![0u8; 5 + 6];
        server_app.read_exact(&mut token).await.expect("read");
        assert_eq!(token, msg(b'p', b"token1"));
        let mut rest = msg(b'R', b"\0\0\0\x08final");
        rest.extend(msg(b'R', b"\0\0\0\0"));
        rest.extend(msg(b'K', b"\0\0\0\x07KEY!"));
        rest.extend(msg(b'Z', b"I"));
        server_app.write_all(&rest).await.expect("write");
        server_app
    });
    client_app
        .write_all(&msg(b'p', b"token1"))
        .await
        .expect("write");
    let mut pid = None;
    let mut issue_key = |key: CancelKey| {
        pid = Some(key.pid);
        key
    };
    tokio::time::timeout(
        std::time::Duration::from_secs(5),
        relay_authentication(
            &mut client,
            &mut backend,
            BytesMut::new(),
            &PLAIN_PG1,
            &mut issue_key,
            &mut LoginSlot::default(),
        ),
    )
    .await
    .expect("no deadlock after the final GSS token")
    .expect("authenticated");
    assert_eq!(pid, Some(7));
    let mut expected = msg(b'R', b"\0\0\0\x07");
    expected.extend(msg(b'R', b"\0\0\0\x08final"));
    expected.extend(msg(b'R', b"\0\0\0\0"));
    let mut got = vec![0u8; expected.len()];
    client_app.read_exact(&mut got).await.expect("read");
    assert_eq!(got, expected);
    drop(server.await.expect("server"));
}

/// A GSSAPI context that needs another round: after the continuation
/// the client answers, and its token reaches the server.
#[tokio::test]
async fn gss_continue_that_needs_the_client_relays_its_token() {
    let (mut client_app, mut client) = duplex(1 << 16);
    let (mut backend, mut server_app) = duplex(1 << 16);
    let server = tokio::spawn(async move {
        let mut opening = msg(b'R', b"\0\0\0\x07");
        opening.extend(msg(b'R', b"\0\0\0\x08more"));
        server_app.write_all(&opening).await.expect("write");
        let mut tokens = vec![0u8; 2 * (5 + 6)];
        server_app.read_exact(&mut tokens).await.expect("read");
        let mut expected = msg(b'p', b"token1");
        expected.extend(msg(b'p', b"token2"));
        assert_eq!(tokens, expected);
        let mut rest = msg(b'R', b"\0\0\0\0");
        rest.extend(msg(b'Z', b"I"));
        server_app.write_all(&rest).await.expect("write");
        server_app
    });
    let mut answers = msg(b'p', b"token1");
    answers.extend(msg(b'p', b"token2"));
    client_app.write_all(&answers).await.expect("write");
    tokio::time::timeout(
        std::time::Duration::from_secs(5),
        relay_plain(&mut client, &mut backend),
    )
    .await
    .expect("no deadlock")
    .expect("authenticated");
    drop(server.await.expect("server"));
}

/// A trust login whose server reports `in_hot_standby` as `standby`,
/// relayed for a write or a read session: the outcome, and what
/// reached the client.
async fn login_reporting(standby: &[u8], for_writes: bool) -> (Result<(), AuthError>, Vec<u8>) {
    let (mut client_app, mut client) = duplex(1 << 16);
    let (mut backend, mut server_app) = duplex(1 << 16);
    let mut login = msg(b'R', b"\0\0\0\0");
    login.extend(msg(
        b'S',
        &[&b"in_hot_standby\0"[..], standby, b"\0"].concat(),
    ));
    login.extend(msg(b'S', b"integer_datetimes\0on\0"));
    login.extend(msg(b'Z', b"I"));
    server_app.write_all(&login).await.expect("write");
    let target = LoginTarget {
        member: "pg1",
        tls: false,
        for_writes,
    };
    let outcome = relay_authentication(
        &mut client,
        &mut backend,
        BytesMut::new(),
        &target,
        &mut |k| k,
        &mut LoginSlot::default(),
    )
    .await
    .map(drop);
    drop(client);
    let mut seen = Vec::new();
    client_app.read_to_end(&mut seen).await.expect("read");
    (outcome, seen)
}

#[tokio::test]
async fn a_write_session_on_a_server_in_recovery_never_sees_authentication_ok() {
    let (outcome, seen) = login_reporting(b"on", true).await;
    assert!(
        matches!(outcome, Err(AuthError::InRecovery(ref e)) if e.sqlstate == SqlState::CANNOT_CONNECT_NOW),
        "{outcome:?}"
    );
    assert!(seen.is_empty(), "the client saw {seen:?}");
    // A read session there, and a write session on a primary, go on.
    for (standby, for_writes) in [(&b"on"[..], false), (b"off", true)] {
        let (outcome, seen) = login_reporting(standby, for_writes).await;
        assert!(outcome.is_ok(), "{outcome:?}");
        assert!(seen.starts_with(&msg(b'R', b"\0\0\0\0")), "{seen:?}");
        assert!(seen.ends_with(&msg(b'Z', b"I")), "{seen:?}");
    }
}

#[tokio::test]
async fn wrong_client_message_is_a_violation() {
    let (mut client_app, mut client) = duplex(1 << 16);
    let (mut backend, mut server_app) = duplex(1 << 16);
    server_app
        .write_all(&msg(b'R', b"\0\0\0\x03"))
        .await
        .expect("write");
    client_app
        .write_all(&msg(b'Q', b"select 1\0"))
        .await
        .expect("write");
    let err = relay_plain(&mut client, &mut backend)
        .await
        .err()
        .expect("violation");
    assert!(matches!(err, AuthError::Client(ref e) if e.sqlstate == SqlState::PROTOCOL_VIOLATION));
}

#[tokio::test]
async fn backend_error_is_forwarded_and_ends() {
    let (mut client_app, mut client) = duplex(1 << 16);
    let (mut backend, mut server_app) = duplex(1 << 16);
    let error = msg(b'E', b"SFATAL\0C28P01\0\0");
    server_app.write_all(&error).await.expect("write");
    let err = relay_plain(&mut client, &mut backend)
        .await
        .err()
        .expect("refused");
    assert!(matches!(err, AuthError::Refused));
    let mut got = vec![0u8; error.len()];
    client_app.read_exact(&mut got).await.expect("read");
    assert_eq!(got, error);
}

#[tokio::test]
async fn backend_vanishing_is_08006() {
    let (_client_app, mut client) = duplex(1 << 16);
    let (mut backend, server_app) = duplex(1 << 16);
    drop(server_app);
    let err = relay_plain(&mut client, &mut backend)
        .await
        .err()
        .expect("gone");
    assert!(matches!(err, AuthError::Backend(ref e) if e.sqlstate == SqlState::CONNECTION_FAILURE));
}
