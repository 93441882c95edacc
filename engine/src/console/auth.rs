//! Who may act: the console token, sign-in sessions, and the checks every action (a POST) passes.
//!
//! Reading needs nothing. Acting needs the token the console was started with
//! (`--console-token` / `CAIRN_CONSOLE_TOKEN`): the operator signs in once with it, and gets a
//! session cookie (`HttpOnly`, `SameSite=Strict`) and a per-session CSRF token that every action
//! form carries. An action is refused (403, with the reason) when:
//!
//! * it comes from another site: `Sec-Fetch-Site` is neither `same-origin` nor `none`, or
//!   `Origin` names another host than the request's `Host`;
//! * the console has no token (read-only);
//! * the request has no live session, or its CSRF token is not the session's.
//!
//! The token is never logged, shown or kept in a cookie: a session is a random id, which lasts
//! [`SESSION_LASTS`] (12 hours) or until the operator signs out or the console restarts.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Instant;

use axum::http::header::{HOST, ORIGIN};
use axum::http::HeaderMap;
use rand::RngCore;
use sha2::{Digest, Sha256};

/// The name of the session cookie.
pub const COOKIE: &str = "cairn_console";

/// Sessions kept at most; signing in beyond this forgets the others (they sign in again).
const MAX_SESSIONS: usize = 10_000;

/// How long a session lasts after signing in; then the operator signs in again.
pub const SESSION_LASTS: std::time::Duration = std::time::Duration::from_secs(12 * 3600);

/// The token actions need; its `Debug` never shows it.
#[derive(Clone, PartialEq, Eq)]
pub struct ConsoleToken(String);

impl ConsoleToken {
    /// A token.
    pub fn new(token: impl Into<String>) -> Self {
        Self(token.into())
    }

    /// Whether `given` is this token, compared through their digests so that the time taken
    /// says nothing about how much of it matched.
    fn matches(&self, given: &str) -> bool {
        Sha256::digest(self.0.as_bytes()) == Sha256::digest(given.as_bytes())
    }
}

impl std::fmt::Debug for ConsoleToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ConsoleToken(<redacted>)")
    }
}

impl std::str::FromStr for ConsoleToken {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.is_empty() {
            return Err("the console token is empty".to_owned());
        }
        Ok(Self(s.to_owned()))
    }
}

/// Why an action was refused, in words for the operator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused(pub String);

/// The console's sessions: session id to its CSRF token and when it was signed in.
#[derive(Debug, Default)]
pub struct Sessions {
    token: Option<ConsoleToken>,
    live: Mutex<HashMap<String, (String, Instant)>>,
}

fn random_hex() -> String {
    let mut bytes = [0u8; 32];
    rand::thread_rng().fill_bytes(&mut bytes);
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The value of cookie `name` in the request.
fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(axum::http::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

impl Sessions {
    /// Sessions for a console with this token (read-only without one).
    pub fn new(token: Option<ConsoleToken>) -> Self {
        Self {
            token,
            live: Mutex::default(),
        }
    }

    /// Whether the console takes actions at all.
    pub fn has_token(&self) -> bool {
        self.token.is_some()
    }

    /// The CSRF token of the request's session, if it has a live one.
    pub fn csrf(&self, headers: &HeaderMap) -> Option<String> {
        let session = cookie(headers, COOKIE)?;
        let live = self.live.lock().unwrap_or_else(|e| e.into_inner());
        live.get(session)
            .filter(|(_, since)| since.elapsed() < SESSION_LASTS)
            .map(|(csrf, _)| csrf.clone())
    }

    /// Signs in with `given`: the new session's `Set-Cookie` value, or why not.
    ///
    /// # Errors
    /// [`Refused`] when the console has no token, or `given` is not it.
    pub fn sign_in(&self, given: &str) -> Result<String, Refused> {
        let Some(token) = &self.token else {
            return Err(read_only());
        };
        if !token.matches(given) {
            // The attempt is worth a line; what was typed is not.
            tracing::warn!("console: a sign-in with a wrong token was refused");
            return Err(Refused("that is not the console token".to_owned()));
        }
        let session = random_hex();
        let mut live = self.live.lock().unwrap_or_else(|e| e.into_inner());
        live.retain(|_, (_, since)| since.elapsed() < SESSION_LASTS);
        if live.len() >= MAX_SESSIONS {
            live.clear();
        }
        live.insert(session.clone(), (random_hex(), Instant::now()));
        Ok(format!(
            "{COOKIE}={session}; HttpOnly; SameSite=Strict; Path=/; Max-Age={}",
            SESSION_LASTS.as_secs()
        ))
    }

    /// Ends the request's session.
    pub fn sign_out(&self, headers: &HeaderMap) {
        if let Some(session) = cookie(headers, COOKIE) {
            let mut live = self.live.lock().unwrap_or_else(|e| e.into_inner());
            live.remove(session);
        }
    }

    /// Checks an action: same site, a token configured, a live session, its CSRF token.
    ///
    /// # Errors
    /// [`Refused`] naming the first check that failed.
    pub fn check_action(&self, headers: &HeaderMap, csrf: Option<&str>) -> Result<(), Refused> {
        same_site(headers)?;
        if !self.has_token() {
            return Err(read_only());
        }
        let Some(expected) = self.csrf(headers) else {
            return Err(Refused(
                "actions need the console token: sign in first".to_owned(),
            ));
        };
        match csrf {
            Some(given) if Sha256::digest(given) == Sha256::digest(&expected) => Ok(()),
            _ => Err(Refused(
                "the form's CSRF token is not this session's: reload the page and try again"
                    .to_owned(),
            )),
        }
    }
}

fn read_only() -> Refused {
    Refused(
        "this console is read-only: start it with --console-token (or CAIRN_CONSOLE_TOKEN) to allow actions"
            .to_owned(),
    )
}

/// Refuses a request another site made the browser send.
///
/// # Errors
/// [`Refused`] when `Sec-Fetch-Site` or `Origin` says it came from elsewhere.
pub fn same_site(headers: &HeaderMap) -> Result<(), Refused> {
    if let Some(site) = headers.get("sec-fetch-site") {
        let site = site.to_str().unwrap_or_default();
        if site != "same-origin" && site != "none" {
            return Err(Refused(format!(
                "a request from another site ({site}) is refused"
            )));
        }
    }
    if let Some(origin) = headers.get(ORIGIN) {
        let origin = origin.to_str().unwrap_or_default();
        let host = headers
            .get(HOST)
            .and_then(|h| h.to_str().ok())
            .unwrap_or_default();
        let origin_host = origin.split_once("://").map_or(origin, |(_, rest)| rest);
        if origin_host != host {
            return Err(Refused(format!(
                "a request from origin {origin} is refused (this console is {host})"
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn signed_in(sessions: &Sessions) -> (HeaderMap, String) {
        let set = sessions.sign_in("secret").expect("signs in");
        let pair = set.split(';').next().expect("cookie").to_owned();
        let mut headers = HeaderMap::new();
        headers.insert(
            axum::http::header::COOKIE,
            HeaderValue::from_str(&pair).expect("header"),
        );
        headers.insert(HOST, HeaderValue::from_static("127.0.0.1:8080"));
        let csrf = sessions.csrf(&headers).expect("csrf");
        (headers, csrf)
    }

    #[test]
    fn an_action_needs_a_session_and_its_csrf_token() {
        let sessions = Sessions::new(Some(ConsoleToken::new("secret")));
        let (headers, csrf) = signed_in(&sessions);
        assert_eq!(sessions.check_action(&headers, Some(&csrf)), Ok(()));
        assert!(sessions.check_action(&headers, Some("forged")).is_err());
        assert!(sessions.check_action(&headers, None).is_err());
        assert!(sessions
            .check_action(&HeaderMap::new(), Some(&csrf))
            .is_err());
    }

    #[test]
    fn a_cross_site_action_is_refused_even_with_a_session() {
        let sessions = Sessions::new(Some(ConsoleToken::new("secret")));
        let (mut headers, csrf) = signed_in(&sessions);
        headers.insert(ORIGIN, HeaderValue::from_static("http://evil.example"));
        assert!(sessions.check_action(&headers, Some(&csrf)).is_err());
        headers.remove(ORIGIN);
        headers.insert("sec-fetch-site", HeaderValue::from_static("cross-site"));
        assert!(sessions.check_action(&headers, Some(&csrf)).is_err());
    }

    #[test]
    fn a_session_signed_out_acts_no_more() {
        let sessions = Sessions::new(Some(ConsoleToken::new("secret")));
        let (headers, csrf) = signed_in(&sessions);
        sessions.sign_out(&headers);
        assert_eq!(sessions.csrf(&headers), None);
        assert!(sessions.check_action(&headers, Some(&csrf)).is_err());
    }

    #[test]
    fn a_wrong_token_or_no_token_signs_nobody_in() {
        assert!(Sessions::new(Some(ConsoleToken::new("secret")))
            .sign_in("guess")
            .is_err());
        assert!(Sessions::new(None).sign_in("anything").is_err());
        assert_eq!(
            format!("{:?}", ConsoleToken::new("secret")),
            "ConsoleToken(<redacted>)"
        );
    }
}
