//! What every backend can store: the checks that turn input no database would take into a clear
//! refusal before it reaches one.
//!
//! PostgreSQL refuses a NUL character (`\u0000`) in any text value, and a message id, type,
//! property or correlation value is stored as text. So the same input is refused on every backend,
//! at the door (a publish) or at the persistence point that would write it, instead of failing a
//! statement that other messages or points share. A NUL inside a JSON body is fine: bodies are
//! stored as JSON text, where it is escaped.
//!
//! The maximum message size bounds what a door accepts (`HostConfig::max_message_bytes`,
//! [`DEFAULT_MAX_MESSAGE_BYTES`]).

use std::io::Write;

use super::{NewMessage, NewReceives, PersistencePoint, SubscriptionRow};
use crate::orchestration::Correlation;

/// The default maximum size of a message body, as JSON text: 16 MiB.
pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 16 * 1024 * 1024;

/// Checks one text value that is stored as text: `what` names it in the error.
///
/// # Errors
/// Why it cannot be stored.
pub fn check_text(what: &str, text: &str) -> Result<(), String> {
    if text.contains('\0') {
        return Err(format!(
            "{what} contains a NUL character (\\u0000), which cannot be stored as text \
             (PostgreSQL refuses it in any text column); remove it"
        ));
    }
    Ok(())
}

/// `text` made storable for a record the engine writes itself (an error, a reason): each NUL
/// becomes `\0`, so that a text from outside (a port's error) cannot make the record fail.
pub fn storable_text(text: &str) -> String {
    text.replace('\0', "\\0")
}

/// At most the first 64 characters of `text`, with `...` when there is more: for an error that
/// quotes a value (a body may be megabytes).
pub(crate) fn shorten(text: &str) -> String {
    const MAX: usize = 64;
    match text.char_indices().nth(MAX) {
        Some((at, _)) => format!("{}...", &text[..at]),
        None => text.to_owned(),
    }
}

/// The length of `value` as JSON text, counted without building the text.
pub fn json_len(value: &serde_json::Value) -> usize {
    struct Count(usize);
    impl Write for Count {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0 += buf.len();
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut count = Count(0);
    // Writing a `Value` to a writer that never fails cannot fail.
    let _ = serde_json::to_writer(&mut count, value);
    count.0
}

/// Checks a body's size against `max_bytes`.
///
/// # Errors
/// Why it is refused: its size and the limit.
pub fn check_body_size(
    what: &str,
    body: &serde_json::Value,
    max_bytes: usize,
) -> Result<(), String> {
    let len = json_len(body);
    if len > max_bytes {
        return Err(format!(
            "{what} is {len} bytes as JSON, over the maximum message size of {max_bytes} bytes \
             (HostConfig::max_message_bytes, `--max-message-bytes`)"
        ));
    }
    Ok(())
}

fn check_correlation(what: &str, correlation: &Correlation) -> Result<(), String> {
    check_text(what, &correlation.canonical())
}

fn check_subscription(row: &SubscriptionRow) -> Result<(), String> {
    check_text("a receive's message type", &row.message_type)?;
    check_correlation(
        &format!("the correlation of a receive of {}", row.message_type),
        &row.correlation,
    )
}

impl NewMessage {
    /// Checks that the message can be stored on every backend and is within `max_bytes`.
    ///
    /// # Errors
    /// Why not, naming the part at fault.
    pub fn check_storable(&self, max_bytes: usize) -> Result<(), String> {
        check_text("the message id", &self.id)?;
        check_text("the message type", &self.message_type)?;
        for (key, value) in &self.properties {
            check_text("a property name", key)?;
            check_text(&format!("property {key:?}"), value)?;
        }
        check_body_size("the body", &self.body, max_bytes)
    }
}

impl NewReceives {
    /// Checks that the subscriptions can be stored on every backend.
    ///
    /// # Errors
    /// Why not.
    pub fn check_storable(&self) -> Result<(), String> {
        self.rows.iter().try_for_each(check_subscription)
    }
}

impl PersistencePoint {
    /// Checks that every text the point writes can be stored on every backend. A point that
    /// fails is refused before it reaches the database, the same way on every backend.
    ///
    /// # Errors
    /// Why not, naming the part at fault.
    pub fn check_storable(&self) -> Result<(), String> {
        check_text("the step", &self.step)?;
        check_text("waiting_for", &self.waiting_for)?;
        if let Some(error) = &self.last_error {
            check_text("the error", error)?;
        }
        if let Some(detail) = &self.detail {
            check_text("the history detail", detail)?;
        }
        if let Some(rows) = &self.subscriptions {
            rows.iter().try_for_each(check_subscription)?;
        }
        for name in self
            .cancel_timers
            .iter()
            .chain(self.set_timers.iter().map(|(n, _)| n))
        {
            check_text("a timer name", name)?;
        }
        for row in &self.outbox {
            check_text("a send's id", &row.id)?;
            check_text("a send's port", &row.port)?;
            check_text("a send's message type", &row.message_type)?;
        }
        for id in &self.delivered {
            check_text("a request id", id)?;
        }
        for message in &self.messages {
            message.check_storable(usize::MAX)?;
        }
        for child in &self.children {
            check_text("a child's orchestration", &child.orchestration)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    #[test]
    fn a_nul_in_a_property_is_refused_and_in_a_body_is_not() {
        let body = serde_json::json!({ "nested": { "text": "a\u{0}b" } });
        let msg = NewMessage::published("m-1", "t", body, BTreeMap::new());
        assert_eq!(msg.check_storable(DEFAULT_MAX_MESSAGE_BYTES), Ok(()));

        let promoted = serde_json::json!({ "request_id": "r\u{0}x" });
        let msg = NewMessage::published("m-2", "t", promoted, BTreeMap::new());
        let err = msg
            .check_storable(DEFAULT_MAX_MESSAGE_BYTES)
            .expect_err("refused");
        assert!(err.contains("property \"request_id\""), "{err}");
        assert!(err.contains("NUL"), "{err}");
    }

    #[test]
    fn storable_text_spells_out_nul() {
        assert_eq!(storable_text("a\u{0}b"), "a\\0b");
        assert_eq!(check_text("x", &storable_text("a\u{0}b")), Ok(()));
    }

    #[test]
    fn a_body_over_the_limit_is_refused_with_its_size() {
        let body = serde_json::json!({ "text": "x".repeat(100) });
        let msg = NewMessage::published("m", "t", body.clone(), BTreeMap::new());
        let len = json_len(&body);
        assert_eq!(len, serde_json::to_vec(&body).expect("json").len());
        assert_eq!(msg.check_storable(len), Ok(()));
        let err = msg.check_storable(len - 1).expect_err("refused");
        assert!(err.contains(&len.to_string()), "{err}");
    }
}
