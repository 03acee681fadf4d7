//! Who may read `/cluster`, `/events` and the status page when
//! `[admin] token` is set: a request that carries the token as a bearer
//! header (scripts, `rolegate status`) or in the `rolegate_admin` cookie
//! (a browser, after signing in once on the status page). The token never
//! travels in a URL, so it stays out of access logs and browser history.

use hyper::header::{HeaderMap, HeaderValue, AUTHORIZATION, COOKIE};

/// The cookie the status page's sign-in sets.
pub const COOKIE_NAME: &str = "rolegate_admin";
/// The longest sign-in form body read; a token is far shorter.
pub const MAX_FORM_BYTES: usize = 4096;

/// What a request's credentials are worth.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// The token, in the bearer header or the cookie (or none is needed).
    Granted,
    /// No credential at all: a first visit, not a guess.
    Missing,
    /// A bearer header or a cookie with another token: a guess, answered
    /// late.
    WrongToken,
}

/// Whether `headers` carry `token` in the bearer header or the cookie.
pub fn access(headers: &HeaderMap, token: Option<&str>) -> Access {
    let Some(token) = token else {
        return Access::Granted;
    };
    let bearer = headers
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    if bearer.is_some_and(|given| token_matches(given, token)) {
        return Access::Granted;
    }
    let encoded = cookie_value(token);
    let mut cookies = headers
        .get_all(COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .filter(|(name, _)| *name == COOKIE_NAME)
        .peekable();
    let any_cookie = cookies.peek().is_some();
    if cookies.any(|(_, value)| constant_time_eq(value.as_bytes(), encoded.as_bytes())) {
        return Access::Granted;
    }
    if bearer.is_some() || any_cookie || headers.contains_key(AUTHORIZATION) {
        Access::WrongToken
    } else {
        Access::Missing
    }
}

/// The token from a sign-in form body (`token=...`,
/// `application/x-www-form-urlencoded`).
pub fn token_from_form(body: &[u8]) -> Option<String> {
    url::form_urlencoded::parse(body)
        .find(|(name, _)| name == "token")
        .map(|(_, value)| value.into_owned())
}

/// The `Set-Cookie` value that signs a browser in: readable by no script,
/// sent to no other site, dropped when the browser closes.
pub fn sign_in_cookie(token: &str) -> Option<HeaderValue> {
    HeaderValue::from_str(&format!(
        "{COOKIE_NAME}={}; Path=/; HttpOnly; SameSite=Strict",
        cookie_value(token)
    ))
    .ok()
}

/// The token as a cookie value: percent-encoded, so `;`, `=` or spaces in
/// a token cannot break the header.
fn cookie_value(token: &str) -> String {
    url::form_urlencoded::byte_serialize(token.as_bytes()).collect()
}

/// Whether `given` is the token.
pub fn token_matches(given: &str, token: &str) -> bool {
    constant_time_eq(given.as_bytes(), token.as_bytes())
}

/// Compares secrets without an early exit on the first differing byte.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(*name, HeaderValue::from_str(value).expect("header"));
        }
        map
    }

    #[test]
    fn token_comparison() {
        assert!(constant_time_eq(b"secret", b"secret"));
        assert!(!constant_time_eq(b"secret", b"secreT"));
        assert!(!constant_time_eq(b"secret", b"secret2"));
    }

    fn authorized(headers: &HeaderMap, token: Option<&str>) -> bool {
        access(headers, token) == Access::Granted
    }

    #[test]
    fn a_wrong_credential_is_told_from_none() {
        let token = Some("s3cret");
        assert_eq!(access(&headers(&[]), token), Access::Missing);
        assert_eq!(
            access(&headers(&[("cookie", "theme=dark")]), token),
            Access::Missing
        );
        assert_eq!(
            access(&headers(&[("authorization", "Bearer guess")]), token),
            Access::WrongToken
        );
        assert_eq!(
            access(&headers(&[("authorization", "Basic Z3Vlc3M=")]), token),
            Access::WrongToken
        );
        assert_eq!(
            access(&headers(&[("cookie", "rolegate_admin=old")]), token),
            Access::WrongToken
        );
    }

    #[test]
    fn the_token_is_taken_from_the_bearer_header_or_the_cookie() {
        let token = Some("s3cret");
        assert!(authorized(&headers(&[]), None));
        assert!(!authorized(&headers(&[]), token));
        assert!(authorized(
            &headers(&[("authorization", "Bearer s3cret")]),
            token
        ));
        assert!(!authorized(
            &headers(&[("authorization", "Bearer s3cre")]),
            token
        ));
        assert!(authorized(
            &headers(&[("cookie", "theme=dark; rolegate_admin=s3cret")]),
            token
        ));
        assert!(authorized(
            &headers(&[("cookie", "a=b"), ("cookie", "rolegate_admin=s3cret")]),
            token
        ));
        assert!(!authorized(
            &headers(&[("cookie", "rolegate_admin=wrong; other=s3cret")]),
            token
        ));
    }

    #[test]
    fn the_sign_in_form_yields_its_token() {
        assert_eq!(
            token_from_form(b"token=a%2Bb%26c&x=1").as_deref(),
            Some("a+b&c")
        );
        assert_eq!(token_from_form(b"user=x"), None);
        let cookie = sign_in_cookie("abc").expect("a header value");
        let cookie = cookie.to_str().expect("ascii");
        assert!(cookie.starts_with("rolegate_admin=abc;"));
        assert!(cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict"));
        let odd = sign_in_cookie("a;b c").expect("encoded");
        assert!(odd
            .to_str()
            .expect("ascii")
            .starts_with("rolegate_admin=a%3Bb+c;"));
        assert!(authorized(
            &headers(&[("cookie", "rolegate_admin=a%3Bb+c")]),
            Some("a;b c")
        ));
    }
}
