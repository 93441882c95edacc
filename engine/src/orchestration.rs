//! The authoring model: what an orchestration is and what it receives.
//!
//! An orchestration is an explicit state machine. The engine calls [`Orchestration::start`] once
//! with the instance's input, then [`Orchestration::on_event`] for every event delivered to the
//! instance. Both are plain synchronous functions of `(state, event, now)`: they return what comes
//! next ([`Next`]) and ask for effects (sends, waits, timers, children) through the
//! [`Context`]. Nothing they do leaves the engine until the persistence point that
//! follows has committed, so orchestration code needs no determinism discipline.
//!
//! ```
//! use cairn::{Context, Event, Next, Orchestration, Fault, Correlation};
//! use serde::{Deserialize, Serialize};
//!
//! struct Greeter;
//!
//! #[derive(Clone, Serialize, Deserialize)]
//! enum State { AwaitingName }
//!
//! impl Orchestration for Greeter {
//!     const NAME: &'static str = "greeter";
//!     const VERSION: u32 = 1;
//!     type Input = ();
//!     type State = State;
//!     type Output = String;
//!
//!     fn start(ctx: &mut Context, _input: ()) -> Result<Next<Self>, Fault> {
//!         ctx.receive("name.given", Correlation::none());
//!         Ok(Next::Continue(State::AwaitingName))
//!     }
//!
//!     fn on_event(_ctx: &mut Context, _state: State, event: Event) -> Result<Next<Self>, Fault> {
//!         let name: String = event.message()?.body()?;
//!         Ok(Next::Complete(format!("hello {name}")))
//!     }
//! }
//! ```

use std::collections::BTreeMap;
use std::fmt;

use chrono::{DateTime, Utc};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::context::Context;

/// The error a transition returns (the BizTalk Throw shape). Inside a scope, the innermost scope's
/// exception handler ([`Orchestration::on_fault`]) receives it; outside every scope,
/// [`Orchestration::ON_UNHANDLED_FAULT`] decides what happens to the instance.
///
/// Any error type converts into it with `?`; a handler gets the typed error back with
/// [`ScopeFault::downcast_ref`].
pub type Fault = Box<dyn std::error::Error + Send + Sync + 'static>;

/// What happens to an instance when a transition fails and no scope handles the fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnFault {
    /// Suspend at the last persistence point (resumable): the messages consumed since are
    /// delivered again on resume. The default: an operator can fix the cause and resume.
    Suspend,
    /// End the instance as `failed` with the fault's text (a `complete` persistence point).
    Fail,
}

/// A fault raised inside a scope, handed to the scope's exception handler.
#[derive(Debug)]
pub struct ScopeFault {
    /// The name of the scope whose handler runs (the innermost scope open at the fault).
    pub scope: String,
    /// Whether that scope was atomic (its state was rolled back and its buffered sends dropped).
    pub atomic: bool,
    /// The error the transition returned.
    pub error: Fault,
}

impl ScopeFault {
    /// The error as the type the transition raised, if it is a `T`.
    pub fn downcast_ref<T: std::error::Error + 'static>(&self) -> Option<&T> {
        self.error.downcast_ref::<T>()
    }
}

/// A long-running business process written as an explicit state machine.
///
/// `NAME` and `VERSION` identify the definition in the database (`instances.orchestration`,
/// `instances.version`); keep them stable. `State` is saved with MessagePack (rmp-serde) at every
/// persistence point; make it an enum with one variant per step, and the variant's name becomes
/// the instance's `step` column.
pub trait Orchestration: Send + Sync + 'static {
    /// Stable name, as stored in `instances.orchestration`.
    const NAME: &'static str;
    /// Version of this definition, as stored in `instances.version`.
    const VERSION: u32;
    /// Message types that start a new instance of this orchestration when published
    /// (activating subscriptions). The message body is decoded as [`Orchestration::Input`].
    const ACTIVATED_BY: &'static [&'static str] = &[];
    /// Convoy properties. Empty (the default): every activating message starts a new instance.
    /// Set (for example `&["order_id"]`): a **convoy**. The first message with a value starts an
    /// instance, which is at once subscribed to every `ACTIVATED_BY` type with that value, so
    /// every later message with the same value goes to it, in order, and never starts a second
    /// instance while it runs (a sequential convoy; with several types, a parallel one). The
    /// instance starts waiting for them (cancel with [`Context::cancel_waits`]); after it ends,
    /// the next message with the value starts a new instance.
    const CONVOY: &'static [&'static str] = &[];
    /// A filter on the activating message's properties ([`crate::filter`]), for every type in
    /// `ACTIVATED_BY`: a message starts an instance only if it passes, for example
    /// `"amount >= 1000 AND region = 'EU'"`. Empty (the default): every message of the types.
    /// Stored in `subscriptions.filter`; a message that passes the activating subscriptions of
    /// several orchestrations starts one instance of each (a copy of it for each).
    const FILTER: &'static str = "";
    /// What a fault no scope handles does to an instance: suspend it (the default) or end it
    /// as `failed`.
    const ON_UNHANDLED_FAULT: OnFault = OnFault::Suspend;
    /// Its steps (the `State` variants' names), declared for the console's map, which draws
    /// them even before an instance reaches them. Empty (the default): the map shows the steps
    /// seen in the database.
    const STEPS: &'static [&'static str] = &[];
    /// Its transitions from step to step, declared: the console's map draws them, and when the
    /// table is not empty the test kit ([`Scenario`](crate::testing)) fails a transition
    /// outside it. An instance's first step comes from `"(start)"`; a step it stays at is no
    /// transition. Empty (the default): not checked.
    const TRANSITIONS: &'static [(&'static str, &'static str)] = &[];

    /// What an instance starts from.
    type Input: Serialize + DeserializeOwned;
    /// What is saved at each persistence point; usually an enum, one variant per step. It is
    /// `Clone` so that a scope can roll back to the state it started from.
    type State: Serialize + DeserializeOwned + Clone + Send + Sync + 'static;
    /// What a completed instance returns (stored as JSON in `instances.output`).
    type Output: Serialize + DeserializeOwned;

    /// The start transition.
    ///
    /// # Errors
    /// Any error suspends the instance with the error's text in `last_error`.
    fn start(ctx: &mut Context, input: Self::Input) -> Result<Next<Self>, Fault>;

    /// The event transition, called for every event delivered to the instance.
    ///
    /// # Errors
    /// Any error suspends the instance at its last persistence point; the event is delivered again
    /// when the instance is resumed.
    fn on_event(ctx: &mut Context, state: Self::State, event: Event) -> Result<Next<Self>, Fault>;

    /// Reads the state of an instance of an older version of this orchestration, for `cairn
    /// upgrade` ([`docs/versioning.md`](https://github.com/cairn/cairn/blob/main/docs/versioning.md)).
    /// `stored` carries the old version and the stored bytes; decode them as that version's
    /// state with [`StoredState::decode_as`] (or [`StoredState::decode`]) and return this
    /// version's state. A chain of steps is a match on [`StoredState::version`] calling the
    /// previous version's `upgrade` first. The default migrates nothing: every instance of an
    /// older version stays on it, with this error.
    ///
    /// # Errors
    /// A state this version cannot take over: the instance stays on its version, unchanged,
    /// and `cairn upgrade` lists it with this error.
    fn upgrade(stored: StoredState<'_>) -> Result<Self::State, Fault> {
        Err(format!(
            "{} version {} declares no migration (Orchestration::upgrade) from version {}",
            Self::NAME,
            Self::VERSION,
            stored.version
        )
        .into())
    }

    /// The exception handler of the scope named in `fault.scope`: called when a transition inside
    /// it failed. `state` is the state before the failing transition, or for an atomic scope the
    /// state before the scope began. The scope has ended; whatever this returns continues after
    /// it. The default re-raises the fault to the enclosing scope.
    ///
    /// # Errors
    /// A fault the handler does not handle, raised to the enclosing scope's handler.
    fn on_fault(
        ctx: &mut Context,
        state: Self::State,
        fault: ScopeFault,
    ) -> Result<Next<Self>, Fault> {
        let _ = (ctx, state);
        Err(fault.error)
    }
}

/// What a transition decides.
pub enum Next<O: Orchestration + ?Sized> {
    /// Keep going with this state and wait for the next event.
    Continue(O::State),
    /// The instance completed with this output (a `complete` persistence point).
    Complete(O::Output),
    /// The instance failed for a business reason (status `failed`, a `complete` persistence point).
    Fail(String),
}

impl<O: Orchestration + ?Sized> fmt::Debug for Next<O> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Next::Continue(_) => f.write_str("Continue(..)"),
            Next::Complete(_) => f.write_str("Complete(..)"),
            Next::Fail(reason) => write!(f, "Fail({reason:?})"),
        }
    }
}

/// Something delivered to an instance.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Event {
    /// A published message that matched one of the instance's receives.
    Message(Message),
    /// The reply to a request this instance sent with [`Context::request`].
    Reply {
        /// The id [`Context::request`] returned.
        request_id: String,
        /// The send port that answered.
        port: String,
        /// The reply.
        message: Message,
    },
    /// A delay set with [`Context::delay_until`] is due.
    Timer {
        /// The name given to the delay.
        name: String,
    },
    /// A child started with [`Context::start`] completed.
    ChildCompleted {
        /// The child's instance id.
        child: Uuid,
        /// The child's output, as JSON.
        output: serde_json::Value,
    },
    /// A child started with [`Context::start`] failed or was terminated.
    ChildFailed {
        /// The child's instance id.
        child: Uuid,
        /// Why.
        error: String,
    },
    /// A send could not be delivered after all retries; the message is in `dead_letters`.
    SendFailed {
        /// The id the send was given.
        message_id: String,
        /// The port it was sent to.
        port: String,
        /// The last delivery error.
        error: String,
    },
    /// Compensate one completed scope (asked for with [`Context::compensate`]): undo what it did,
    /// using the data it recorded when it ended. One event per scope, newest first, each its
    /// own persistence point.
    Compensate {
        /// The completed scope's name.
        scope: String,
        /// What [`Context::end_scope_with`] recorded for it.
        data: serde_json::Value,
        /// Compensations still to come after this one.
        remaining: usize,
    },
    /// Every compensation asked for by [`Context::compensate`] has run (also sent when there was
    /// nothing to compensate).
    Compensated {
        /// The scope name given to [`Context::compensate`] (empty for
        /// [`Context::compensate_all`]).
        scope: String,
        /// How many scopes were compensated.
        count: usize,
    },
}

impl Event {
    /// The message carried by a [`Event::Message`] or [`Event::Reply`].
    ///
    /// # Errors
    /// [`UnexpectedEvent`] for any other event.
    pub fn message(&self) -> Result<&Message, UnexpectedEvent> {
        match self {
            Event::Message(m) | Event::Reply { message: m, .. } => Ok(m),
            other => Err(UnexpectedEvent(other.label())),
        }
    }

    /// A short readable label, used in errors and logs.
    pub fn label(&self) -> String {
        match self {
            Event::Message(m) => format!("message {} ({})", m.message_type, m.id),
            Event::Reply { port, .. } => format!("reply from port {port}"),
            Event::Timer { name } => format!("timer {name}"),
            Event::ChildCompleted { child, .. } => format!("child {child} completed"),
            Event::ChildFailed { child, .. } => format!("child {child} failed"),
            Event::SendFailed { port, .. } => format!("send to port {port} failed"),
            Event::Compensate { scope, .. } => format!("compensate scope {scope}"),
            Event::Compensated { scope, .. } => format!("compensation of {scope:?} done"),
        }
    }
}

/// A transition got an event it has no use for in its current step.
#[derive(Debug, thiserror::Error)]
#[error("unexpected event: {0}")]
pub struct UnexpectedEvent(pub String);

/// A message as an instance sees it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Message {
    /// The message id (unique; a second publish with the same id is stored once).
    pub id: String,
    /// The message type subscriptions match on.
    pub message_type: String,
    /// Routing properties (set by the publisher or promoted from the body's top-level fields).
    pub properties: BTreeMap<String, String>,
    /// The body, as JSON.
    pub body: serde_json::Value,
    /// When it was published.
    pub published_at: DateTime<Utc>,
}

impl Message {
    /// Decodes the body into `T`.
    ///
    /// # Errors
    /// [`BodyError`] naming the message and what did not match.
    pub fn body<T: DeserializeOwned>(&self) -> Result<T, BodyError> {
        serde_json::from_value(self.body.clone()).map_err(|source| BodyError {
            message_id: self.id.clone(),
            message_type: self.message_type.clone(),
            target: std::any::type_name::<T>(),
            source,
        })
    }

    /// A routing property.
    pub fn property(&self, key: &str) -> Option<&str> {
        self.properties.get(key).map(String::as_str)
    }
}

/// A message body that does not decode into the type the transition asked for.
#[derive(Debug, thiserror::Error)]
#[error("message {message_id} of type {message_type} does not decode as {target}: {source}")]
pub struct BodyError {
    /// The message id.
    pub message_id: String,
    /// The message type.
    pub message_type: String,
    /// The Rust type asked for.
    pub target: &'static str,
    /// What serde said.
    #[source]
    pub source: serde_json::Error,
}

/// Correlation values a receive waits for: the message's properties must carry each of them.
#[derive(Debug, Clone, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Correlation(BTreeMap<String, String>);

impl Correlation {
    /// No correlation: any message of the type matches.
    pub fn none() -> Self {
        Self::default()
    }

    /// Correlate on one property.
    pub fn on(key: impl Into<String>, value: impl ToString) -> Self {
        Self::none().and(key, value)
    }

    /// Add one more property.
    pub fn and(mut self, key: impl Into<String>, value: impl ToString) -> Self {
        self.0.insert(key.into(), value.to_string());
        self
    }

    /// The property names, sorted and comma-separated (`subscriptions.correlation_keys`).
    pub fn keys(&self) -> String {
        self.0.keys().cloned().collect::<Vec<_>>().join(",")
    }

    /// The canonical text form `k=v,k2=v2` (`subscriptions.correlation`).
    pub fn canonical(&self) -> String {
        self.0
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The same correlation taken from a message's properties for the keys in `keys`
    /// (`k1,k2`), if it carries all of them.
    pub fn from_properties(keys: &str, properties: &BTreeMap<String, String>) -> Option<Self> {
        let mut out = Self::none();
        for key in keys.split(',').filter(|k| !k.is_empty()) {
            out.0.insert(key.to_owned(), properties.get(key)?.clone());
        }
        Some(out)
    }

    /// Whether a message with these properties matches.
    pub fn matches(&self, properties: &BTreeMap<String, String>) -> bool {
        self.0.iter().all(|(k, v)| properties.get(k) == Some(v))
    }

    /// True when nothing is correlated.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// The stored state of an instance of an older version, handed to [`Orchestration::upgrade`].
#[derive(Debug, Clone, Copy)]
pub struct StoredState<'a> {
    /// The version the instance is on.
    pub version: u32,
    /// Its state as stored (`instances.state`, MessagePack).
    pub bytes: &'a [u8],
}

/// A stored state handed to [`StoredState::decode_as`] with the definition of another version.
#[derive(Debug, thiserror::Error)]
#[error("the stored state is of version {stored}, not of {name} version {asked}")]
pub struct WrongVersion {
    name: &'static str,
    asked: u32,
    stored: u32,
}

impl StoredState<'_> {
    /// The state decoded as `T`.
    ///
    /// # Errors
    /// The bytes do not decode as `T`.
    pub fn decode<T: DeserializeOwned>(&self) -> Result<T, crate::codec::CodecError> {
        crate::codec::decode(self.bytes)
    }

    /// The state decoded as the state of `Old`, which must be the version it was stored by.
    ///
    /// # Errors
    /// [`WrongVersion`] when `Old::VERSION` is not [`StoredState::version`]; the bytes do not
    /// decode as `Old::State`.
    pub fn decode_as<Old: Orchestration>(&self) -> Result<Old::State, Fault> {
        if Old::VERSION != self.version {
            return Err(Box::new(WrongVersion {
                name: Old::NAME,
                asked: Old::VERSION,
                stored: self.version,
            }));
        }
        Ok(self.decode::<Old::State>()?)
    }
}
