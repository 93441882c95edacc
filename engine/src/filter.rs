//! Filters on message properties: who receives what, as BizTalk's subscriptions say it.
//!
//! An orchestration's activating subscriptions may carry a filter
//! ([`Orchestration::FILTER`](crate::Orchestration::FILTER)): a published message starts an
//! instance only if its properties pass it. The filter is stored as text in
//! `subscriptions.filter`, so SQL shows who receives what, and evaluated when a message is routed.
//!
//! ```text
//! filter     := or
//! or         := and ("OR" and)*
//! and        := not ("AND" not)*
//! not        := "NOT" not | "(" or ")" | comparison | "EXISTS" name
//! comparison := name op value
//! op         := "=" | "!=" | "<>" | "<" | "<=" | ">" | ">="
//! value      := 'text' (a quote doubled inside: 'O''Brien') | number
//! name       := letters, digits, '_', '.', '-' (a property name)
//! ```
//!
//! Keywords are case-insensitive. A comparison with a property the message does not carry is
//! false. Values compare as numbers when both sides read as numbers (`amount >= 1000` holds for
//! `amount=1500.0`), else as text.
//!
//! ```
//! use std::collections::BTreeMap;
//! use cairn::filter::Filter;
//!
//! let f = Filter::parse("amount >= 1000 AND (region = 'EU' OR region = 'UK')").unwrap();
//! let props = BTreeMap::from([("amount".to_owned(), "1500".to_owned()), ("region".to_owned(), "EU".to_owned())]);
//! assert!(f.matches(&props));
//! assert!(Filter::parse("amount >=").is_err());
//! ```

use std::cmp::Ordering;
use std::collections::BTreeMap;
use std::fmt;

/// A filter that does not parse, with where and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("filter {text:?} does not parse at byte {at}: {why}")]
pub struct FilterError {
    /// The filter's text.
    pub text: String,
    /// The byte where parsing stopped.
    pub at: usize,
    /// What was expected.
    pub why: String,
}

/// A comparison operator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
}

/// A parsed filter; see the module docs.
#[derive(Debug, Clone, PartialEq)]
pub enum Filter {
    /// Every message passes (the empty filter).
    All,
    /// Both pass.
    And(Box<Filter>, Box<Filter>),
    /// Either passes.
    Or(Box<Filter>, Box<Filter>),
    /// It does not pass.
    Not(Box<Filter>),
    /// The message carries the property.
    Exists(String),
    /// A property compared with a value.
    Compare {
        /// The property.
        name: String,
        /// The operator, as written.
        op: String,
        /// The value, as text.
        value: String,
    },
}

impl Filter {
    /// Parses `text`; an empty (or blank) text is [`Filter::All`].
    ///
    /// # Errors
    /// [`FilterError`] naming where and what was expected.
    pub fn parse(text: &str) -> Result<Self, FilterError> {
        if text.trim().is_empty() {
            return Ok(Filter::All);
        }
        let mut p = Parser {
            text,
            tokens: tokenize(text)?,
            pos: 0,
        };
        let filter = p.or()?;
        match p.tokens.get(p.pos) {
            None => Ok(filter),
            Some((at, t)) => Err(p.error(*at, format!("unexpected {t}"))),
        }
    }

    /// Whether a message with these properties passes.
    pub fn matches(&self, properties: &BTreeMap<String, String>) -> bool {
        match self {
            Filter::All => true,
            Filter::And(a, b) => a.matches(properties) && b.matches(properties),
            Filter::Or(a, b) => a.matches(properties) || b.matches(properties),
            Filter::Not(a) => !a.matches(properties),
            Filter::Exists(name) => properties.contains_key(name),
            Filter::Compare { name, op, value } => {
                let Some(have) = properties.get(name) else {
                    return false;
                };
                let Some(op) = op_of(op) else { return false };
                let ordering = match (have.trim().parse::<f64>(), value.parse::<f64>()) {
                    (Ok(a), Ok(b)) => a.partial_cmp(&b),
                    _ => Some(have.as_str().cmp(value.as_str())),
                };
                let Some(ordering) = ordering else {
                    return false;
                };
                match op {
                    Op::Eq => ordering == Ordering::Equal,
                    Op::Ne => ordering != Ordering::Equal,
                    Op::Lt => ordering == Ordering::Less,
                    Op::Le => ordering != Ordering::Greater,
                    Op::Gt => ordering == Ordering::Greater,
                    Op::Ge => ordering != Ordering::Less,
                }
            }
        }
    }
}

fn op_of(text: &str) -> Option<Op> {
    Some(match text {
        "=" => Op::Eq,
        "!=" | "<>" => Op::Ne,
        "<" => Op::Lt,
        "<=" => Op::Le,
        ">" => Op::Gt,
        ">=" => Op::Ge,
        _ => return None,
    })
}

/// A token: a word (name, keyword or number), a quoted text, an operator or a parenthesis.
#[derive(Debug, Clone, PartialEq)]
enum Token {
    Word(String),
    Text(String),
    Op(String),
    Open,
    Close,
}

impl fmt::Display for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Token::Word(w) => write!(f, "{w:?}"),
            Token::Text(t) => write!(f, "'{t}'"),
            Token::Op(o) => write!(f, "{o:?}"),
            Token::Open => f.write_str("\"(\""),
            Token::Close => f.write_str("\")\""),
        }
    }
}

fn tokenize(text: &str) -> Result<Vec<(usize, Token)>, FilterError> {
    let err = |at: usize, why: &str| FilterError {
        text: text.to_owned(),
        at,
        why: why.to_owned(),
    };
    let mut out = Vec::new();
    let mut chars = text.char_indices().peekable();
    while let Some(&(at, c)) = chars.peek() {
        if c.is_whitespace() {
            chars.next();
        } else if c == '(' {
            chars.next();
            out.push((at, Token::Open));
        } else if c == ')' {
            chars.next();
            out.push((at, Token::Close));
        } else if c == '\'' {
            chars.next();
            let mut value = String::new();
            loop {
                match chars.next() {
                    Some((_, '\'')) if chars.peek().is_some_and(|(_, n)| *n == '\'') => {
                        chars.next();
                        value.push('\'');
                    }
                    Some((_, '\'')) => break,
                    Some((_, ch)) => value.push(ch),
                    None => return Err(err(at, "a closing quote")),
                }
            }
            out.push((at, Token::Text(value)));
        } else if "=!<>".contains(c) {
            chars.next();
            let mut op = c.to_string();
            if let Some(&(_, n)) = chars.peek() {
                if (n == '=' && c != '=') || (c == '<' && n == '>') {
                    op.push(n);
                    chars.next();
                }
            }
            if op == "!" {
                return Err(err(at, "\"!=\""));
            }
            out.push((at, Token::Op(op)));
        } else if c.is_alphanumeric() || "_.-+".contains(c) {
            let mut word = String::new();
            while let Some(&(_, ch)) = chars.peek() {
                if ch.is_alphanumeric() || "_.-+".contains(ch) {
                    word.push(ch);
                    chars.next();
                } else {
                    break;
                }
            }
            out.push((at, Token::Word(word)));
        } else {
            return Err(err(
                at,
                &format!("a name, a value or an operator, not {c:?}"),
            ));
        }
    }
    Ok(out)
}

struct Parser<'t> {
    text: &'t str,
    tokens: Vec<(usize, Token)>,
    pos: usize,
}

impl Parser<'_> {
    fn error(&self, at: usize, why: String) -> FilterError {
        FilterError {
            text: self.text.to_owned(),
            at,
            why,
        }
    }

    fn here(&self) -> usize {
        self.tokens
            .get(self.pos)
            .map_or(self.text.len(), |(at, _)| *at)
    }

    fn keyword(&mut self, word: &str) -> bool {
        match self.tokens.get(self.pos) {
            Some((_, Token::Word(w))) if w.eq_ignore_ascii_case(word) => {
                self.pos += 1;
                true
            }
            _ => false,
        }
    }

    fn or(&mut self) -> Result<Filter, FilterError> {
        let mut left = self.and()?;
        while self.keyword("OR") {
            left = Filter::Or(Box::new(left), Box::new(self.and()?));
        }
        Ok(left)
    }

    fn and(&mut self) -> Result<Filter, FilterError> {
        let mut left = self.not()?;
        while self.keyword("AND") {
            left = Filter::And(Box::new(left), Box::new(self.not()?));
        }
        Ok(left)
    }

    fn not(&mut self) -> Result<Filter, FilterError> {
        if self.keyword("NOT") {
            return Ok(Filter::Not(Box::new(self.not()?)));
        }
        if self.keyword("EXISTS") {
            return match self.tokens.get(self.pos).cloned() {
                Some((_, Token::Word(name))) => {
                    self.pos += 1;
                    Ok(Filter::Exists(name))
                }
                _ => Err(self.error(self.here(), "a property name after EXISTS".into())),
            };
        }
        match self.tokens.get(self.pos).cloned() {
            Some((_, Token::Open)) => {
                self.pos += 1;
                let inner = self.or()?;
                match self.tokens.get(self.pos) {
                    Some((_, Token::Close)) => {
                        self.pos += 1;
                        Ok(inner)
                    }
                    _ => Err(self.error(self.here(), "\")\"".into())),
                }
            }
            Some((_, Token::Word(name))) => {
                self.pos += 1;
                let op = match self.tokens.get(self.pos).cloned() {
                    Some((_, Token::Op(op))) => op,
                    _ => {
                        return Err(self.error(
                            self.here(),
                            format!("an operator (= != < <= > >=) after {name:?}"),
                        ))
                    }
                };
                self.pos += 1;
                let value = match self.tokens.get(self.pos).cloned() {
                    Some((_, Token::Text(v))) => v,
                    Some((_, Token::Word(v))) if v.parse::<f64>().is_ok() => v,
                    _ => return Err(self.error(self.here(), "a value: 'text' or a number".into())),
                };
                self.pos += 1;
                Ok(Filter::Compare { name, op, value })
            }
            _ => Err(self.error(self.here(), "a comparison, NOT, EXISTS or \"(\"".into())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn props(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn comparisons_and_or_not_and_parentheses_evaluate_on_properties() {
        let f = Filter::parse("amount >= 1000 AND region = 'EU'").unwrap();
        assert!(f.matches(&props(&[("amount", "1500.0"), ("region", "EU")])));
        assert!(!f.matches(&props(&[("amount", "999"), ("region", "EU")])));
        assert!(!f.matches(&props(&[("amount", "1500")])));
        let f = Filter::parse("NOT (kind = 'test') and (a < 2 or b <> 'x')").unwrap();
        assert!(f.matches(&props(&[("kind", "real"), ("a", "1")])));
        assert!(!f.matches(&props(&[("kind", "test"), ("a", "1")])));
        assert!(f.matches(&props(&[("b", "y")])));
        let f = Filter::parse("name = 'O''Brien' OR EXISTS vip").unwrap();
        assert!(f.matches(&props(&[("name", "O'Brien")])));
        assert!(f.matches(&props(&[("vip", "")])));
        assert_eq!(Filter::parse("  ").unwrap(), Filter::All);
        // Text compares as text when either side is not a number.
        assert!(Filter::parse("code > 'B'")
            .unwrap()
            .matches(&props(&[("code", "C")])));
    }

    #[test]
    fn a_filter_that_does_not_parse_says_where_and_what_was_expected() {
        for bad in [
            "amount >=",
            "amount 5",
            "(a = 1",
            "a = 1 b = 2",
            "a ! 1",
            "'open",
            "a = 1 AND",
            "§",
        ] {
            let e = Filter::parse(bad).unwrap_err();
            assert!(
                e.to_string().contains("does not parse at byte"),
                "{bad}: {e}"
            );
        }
    }
}
