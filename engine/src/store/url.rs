//! Database URLs as they may be shown: with every password replaced by `***`.
//!
//! A database URL can carry a password twice: in its user info
//! (`postgres://user:secret@host/db`) and as a parameter (`?password=secret`, `sslpassword=`).
//! Whatever prints a URL (a CLI message, an error, a log field, a benchmark's output) prints
//! [`redact`]`(url)` instead, so that no password reaches a terminal, a log file or a ticket.
//!
//! ```
//! assert_eq!(
//!     cairn::store::redact_url("postgres://user:secret@host/db?password=x"),
//!     "postgres://user:***@host/db?password=***"
//! );
//! ```

/// What a password is replaced with.
const MASK: &str = "***";

/// `url` with its password, and the value of every parameter whose name contains `password`,
/// replaced by `***`. A URL that does not parse is redacted by hand, erring on the side of
/// hiding: everything between `://` and the last `@` after the user name is masked.
pub fn redact(url: &str) -> String {
    // Nothing that could be a secret: shown exactly as given (a SQLite path with a space in it
    // is not percent-encoded for display).
    if !url.contains('@') && !url.to_ascii_lowercase().contains("password") {
        return url.to_owned();
    }
    let Ok(mut parsed) = ::url::Url::parse(url) else {
        return by_hand(url);
    };
    // An `@` the parser did not take as the end of a user info (an unencoded `/` in a password
    // makes `user:123/ss@host` a host, a port and a path): shown by hand rather than risk
    // showing a secret the parser did not see as one.
    if parsed.username().is_empty() && parsed.password().is_none() {
        return by_hand(url);
    }
    if parsed.password().is_some() && parsed.set_password(Some(MASK)).is_err() {
        return by_hand(url);
    }
    if let Some(query) = parsed.query() {
        let masked = mask_params(query);
        parsed.set_query(Some(&masked));
    }
    parsed.to_string()
}

/// `url` with any password in it removed rather than masked, for a command line a person may
/// copy (`psql 'postgres://user@host/db'` asks for the password, or takes it from `PGPASSWORD`
/// or `~/.pgpass`).
pub fn without_password(url: &str) -> String {
    let Ok(mut parsed) = ::url::Url::parse(url) else {
        return redact(url);
    };
    // An `@` the parser did not take as the end of a user info: see [`redact`].
    if url.contains('@') && parsed.username().is_empty() && parsed.password().is_none() {
        return redact(url);
    }
    if parsed.password().is_some() && parsed.set_password(None).is_err() {
        return redact(url);
    }
    if let Some(query) = parsed.query() {
        let kept: Vec<&str> = query
            .split('&')
            .filter(|pair| !is_password_key(pair.split('=').next().unwrap_or_default()))
            .collect();
        let kept = kept.join("&");
        parsed.set_query((!kept.is_empty()).then_some(kept.as_str()));
    }
    parsed.to_string()
}

/// `url` without the parameters that carry a secret sqlx does not read (`sslpassword`, ...):
/// sqlx would log each of them, value included, as an unrecognized parameter it ignores. Returns
/// the URL to connect with and the names of the parameters left out.
pub(crate) fn without_unread_secrets(url: &str) -> (String, Vec<String>) {
    let Ok(mut parsed) = ::url::Url::parse(url) else {
        return (url.to_owned(), Vec::new());
    };
    let Some(query) = parsed.query() else {
        return (url.to_owned(), Vec::new());
    };
    let mut dropped = Vec::new();
    let kept: Vec<&str> = query
        .split('&')
        .filter(|pair| {
            let key = pair.split('=').next().unwrap_or_default();
            // sqlx reads `password` itself (and shows it nowhere).
            let unread = key != "password" && is_password_key(key);
            if unread {
                dropped.push(key.to_owned());
            }
            !unread
        })
        .collect();
    if dropped.is_empty() {
        return (url.to_owned(), dropped);
    }
    let kept = kept.join("&");
    parsed.set_query((!kept.is_empty()).then_some(kept.as_str()));
    (parsed.to_string(), dropped)
}

fn is_password_key(key: &str) -> bool {
    key.to_ascii_lowercase().contains("password")
}

/// Masks the value of each `KEY=VALUE` whose key contains `password`, in a query string
/// (`&`-separated) or a keyword string (space-separated: `host=h password=p`).
fn mask_params(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while !rest.is_empty() {
        let end = rest.find(['&', ' ']).unwrap_or(rest.len());
        let (item, tail) = rest.split_at(end);
        match item.split_once('=') {
            Some((key, _)) if is_password_key(key) => {
                out.push_str(key);
                out.push('=');
                out.push_str(MASK);
            }
            _ => out.push_str(item),
        }
        // The separator itself, if any.
        let mut chars = tail.chars();
        if let Some(sep) = chars.next() {
            out.push(sep);
        }
        rest = chars.as_str();
    }
    out
}

/// Redaction of something `Url` cannot read: keeps the scheme and the user name, masks from
/// the first `:` of the user info to the last `@`, and masks password parameters.
fn by_hand(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return mask_params(url);
    };
    match rest.rfind('@') {
        Some(at) => {
            let (userinfo, host) = rest.split_at(at);
            let user = userinfo.split(':').next().unwrap_or_default();
            let masked = if userinfo.contains(':') {
                format!("{user}:{MASK}")
            } else {
                user.to_owned()
            };
            format!("{scheme}://{masked}{}", mask_params(host))
        }
        None => format!("{scheme}://{}", mask_params(rest)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_password_in_the_user_info_and_in_parameters_is_masked() {
        assert_eq!(
            redact("postgres://user:secret@host/db?password=x"),
            "postgres://user:***@host/db?password=***"
        );
        assert_eq!(
            redact("postgresql://u:S3cretPW@127.0.0.1:5432/cairn?sslmode=require&sslpassword=k"),
            "postgresql://u:***@127.0.0.1:5432/cairn?sslmode=require&sslpassword=***"
        );
        assert_eq!(
            redact("postgres://u:p%40ss@h/db?PassWord=x&application_name=a"),
            "postgres://u:***@h/db?PassWord=***&application_name=a"
        );
    }

    #[test]
    fn urls_without_a_password_are_shown_as_given() {
        for url in [
            "postgres://postgres@127.0.0.1:5432/db",
            "postgres://127.0.0.1/db?options=-c%20search_path%3Dcairn",
            "sqlite://cairn.db",
            "sqlite::memory:",
            "sqlite:///tmp/x/test.db",
        ] {
            assert_eq!(redact(url), url);
        }
    }

    #[test]
    fn what_does_not_parse_is_masked_by_hand() {
        // A `/` or `@` in an unencoded password: `Url` fails, or reads it differently.
        let shown = redact("postgres://user:pa/ss@host:5432/db");
        assert!(!shown.contains("pa/ss"), "{shown}");
        let shown = redact("postgres://user:123/ss@host/db");
        assert_eq!(shown, "postgres://user:***@host/db");
        let shown = redact("postgres://user:p@ss:word@host/db");
        assert!(
            !shown.contains("ss:word") && !shown.contains("p@ss"),
            "{shown}"
        );
        assert_eq!(
            redact("postgres://user:se cret@host:99999/db"),
            "postgres://user:***@host:99999/db"
        );
        assert_eq!(
            redact("host=h user=u password=secret dbname=d"),
            "host=h user=u password=*** dbname=d"
        );
    }

    #[test]
    fn secrets_sqlx_does_not_read_are_left_out_of_the_url_it_is_given() {
        assert_eq!(
            without_unread_secrets("postgres://u:p@h/db?sslpassword=k&password=x&sslmode=require"),
            (
                "postgres://u:p@h/db?password=x&sslmode=require".to_owned(),
                vec!["sslpassword".to_owned()]
            )
        );
        let plain = "postgres://u:p@h/db?password=x";
        assert_eq!(without_unread_secrets(plain), (plain.to_owned(), vec![]));
    }

    #[test]
    fn a_command_line_url_has_no_password_at_all() {
        assert_eq!(
            without_password("postgres://user:secret@host/db?password=x&sslmode=require"),
            "postgres://user@host/db?sslmode=require"
        );
        assert_eq!(
            without_password("postgres://user:secret@host/db?password=x"),
            "postgres://user@host/db"
        );
        assert_eq!(
            without_password("postgres://user@host/db"),
            "postgres://user@host/db"
        );
        assert_eq!(
            without_password("postgres://user:12/ss@host/db"),
            "postgres://user:***@host/db"
        );
    }
}
