//! The context a transition asks for effects through.
//!
//! Effects are recorded as data ([`Effect`]) and carried out by the engine only after the
//! persistence point that follows the transition has committed (G2). A transition that sends or
//! starts a child ends in a persistence point; one that only waits, or only changes its state,
//! changes memory only, and its consumed messages are replayed after a crash (G3).
//!
//! Waits follow BizTalk's Listen shape: every [`Context::receive`] and [`Context::delay_until`]
//! adds a wait, and when an event for one of them arrives, all of the instance's waits are
//! cancelled in the same step: the transition that handles the event declares what it waits for
//! next. Replies, child results and send failures are addressed to the instance and need no wait.

use std::collections::BTreeMap;

use chrono::{DateTime, Duration, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::orchestration::Correlation;

/// One thing a transition asked for.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Effect {
    /// Send a message through a named send port; with `expects_reply` the port's answer comes back
    /// as [`Event::Reply`](crate::Event::Reply).
    Send {
        /// The message id, stable across redeliveries (an idempotency key for the receiver).
        id: String,
        /// The send port's name.
        port: String,
        /// The message type.
        message_type: String,
        /// The body, as JSON.
        body: serde_json::Value,
        /// Request-response rather than one-way.
        expects_reply: bool,
    },
    /// Start another orchestration; its completion comes back as
    /// [`Event::ChildCompleted`](crate::Event::ChildCompleted) or `ChildFailed`.
    Start {
        /// The new instance's id.
        child: Uuid,
        /// The orchestration's name.
        orchestration: String,
        /// Its input, as JSON.
        input: serde_json::Value,
    },
    /// Wait for a published message.
    Receive(Receive),
    /// Wait until a time.
    Delay(Delay),
    /// Cancel every wait declared so far.
    CancelWaits,
    /// Suspend the instance after this transition (a `suspend` persistence point).
    Suspend {
        /// Why, shown in `last_error`.
        reason: String,
    },
    /// Begin a transactional scope (nested in the innermost open one).
    BeginScope {
        /// The scope's name, as handlers and compensation see it.
        name: String,
        /// Atomic or long-running.
        kind: ScopeKind,
    },
    /// End the innermost open scope successfully (a `scope_end` persistence point).
    EndScope {
        /// What its compensation will need, recorded with it.
        compensation: serde_json::Value,
    },
    /// Compensate completed scopes, newest first: `None` for every completed scope of the
    /// instance, `Some(name)` for the scopes of that name and the scopes nested in them.
    Compensate {
        /// The scope to compensate.
        scope: Option<String>,
    },
}

/// The two kinds of transactional scope.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ScopeKind {
    /// Everything inside commits together at the scope's end, or not at all: sends and child
    /// starts are buffered with no persistence point of their own, and a fault rolls the state
    /// back to the scope's start and drops them.
    Atomic,
    /// Ordinary persistence points inside; its end records it as completed together with the
    /// data its compensation needs.
    LongRunning,
}

/// A wait for a published message of a type, with correlation values.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Receive {
    /// The message type.
    pub message_type: String,
    /// The properties the message must carry.
    pub correlation: Correlation,
    /// Whether it also takes the messages of its key published before it waited: those late for
    /// an earlier, ended instance of the key (zombies) and those held unrouted
    /// ([`Context::receive_earlier`]). Without it, an instance receives only what is published
    /// after it waits, once another instance has waited on the key.
    #[serde(default)]
    pub earlier: bool,
}

/// A wait for a time.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Delay {
    /// The name the timer event will carry.
    pub name: String,
    /// When it is due.
    pub at: DateTime<Utc>,
}

/// What started an instance, as its start transition sees it beside its input
/// ([`Context::started_by`]): the activating message's type, id, properties and the time it was
/// received, for an activation by a published message; for a start through `cairn start`,
/// [`Client::start`](crate::Client::start) or a parent's [`Context::start`], the start's own id
/// (`<instance id>:start`) and type (`<orchestration>.start`), with no properties.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StartedBy {
    /// The message id: the activating message's, or `<instance id>:start`.
    pub id: String,
    /// The message type: the activating message's, or `<orchestration>.start`.
    pub message_type: String,
    /// The activating message's routing properties (set by its publisher or promoted from its
    /// body); empty for a start.
    pub properties: BTreeMap<String, String>,
    /// When the message was received (published into the MessageBox), or the instance started.
    pub received_at: DateTime<Utc>,
    /// Whether a published message activated the instance (rather than a start).
    pub by_message: bool,
}

impl StartedBy {
    /// A routing property of the activating message.
    pub fn property(&self, key: &str) -> Option<&str> {
        self.properties.get(key).map(String::as_str)
    }
}

/// What a transition uses to ask for effects; see the module docs.
#[derive(Debug)]
pub struct Context {
    instance_id: Uuid,
    now: DateTime<Utc>,
    effects: Vec<Effect>,
    started_by: Option<StartedBy>,
}

impl Context {
    /// A context for one transition of `instance_id` at `now`.
    pub fn new(instance_id: Uuid, now: DateTime<Utc>) -> Self {
        Self {
            instance_id,
            now,
            effects: Vec::new(),
            started_by: None,
        }
    }

    /// The same context for a start transition, started by `started_by`.
    #[must_use]
    pub fn starting(mut self, started_by: StartedBy) -> Self {
        self.started_by = Some(started_by);
        self
    }

    /// In the start transition, what started the instance: the activating message's type, id,
    /// properties and received time, or the start's id ([`StartedBy`]). `None` in every other
    /// transition.
    pub fn started_by(&self) -> Option<&StartedBy> {
        self.started_by.as_ref()
    }

    /// This instance's id.
    pub fn instance_id(&self) -> Uuid {
        self.instance_id
    }

    /// The engine's clock at the start of this transition. Use it rather than the system clock.
    pub fn now(&self) -> DateTime<Utc> {
        self.now
    }

    /// Sends a one-way message through the send port `port`. Returns the message id.
    ///
    /// # Errors
    /// If `body` does not serialize to JSON.
    pub fn send(
        &mut self,
        port: &str,
        message_type: &str,
        body: &impl Serialize,
    ) -> Result<String, serde_json::Error> {
        self.push_send(port, message_type, body, false)
    }

    /// Sends a request through `port`; the reply arrives as
    /// [`Event::Reply`](crate::Event::Reply) with the returned id as `request_id`.
    ///
    /// # Errors
    /// If `body` does not serialize to JSON.
    pub fn request(
        &mut self,
        port: &str,
        message_type: &str,
        body: &impl Serialize,
    ) -> Result<String, serde_json::Error> {
        self.push_send(port, message_type, body, true)
    }

    fn push_send(
        &mut self,
        port: &str,
        message_type: &str,
        body: &impl Serialize,
        expects_reply: bool,
    ) -> Result<String, serde_json::Error> {
        let id = Uuid::now_v7().to_string();
        self.effects.push(Effect::Send {
            id: id.clone(),
            port: port.to_owned(),
            message_type: message_type.to_owned(),
            body: serde_json::to_value(body)?,
            expects_reply,
        });
        Ok(id)
    }

    /// Waits for a published message of `message_type` whose properties carry `correlation`.
    ///
    /// Once an instance has waited on a key (a type and correlation values), a message for that
    /// key published after that instance ended is a zombie naming it, and a later instance that
    /// waits on the key receives only what is published after it waits (docs/messaging.md,
    /// "Late messages"); [`Context::receive_earlier`] takes those earlier messages too.
    pub fn receive(&mut self, message_type: &str, correlation: Correlation) {
        self.effects.push(Effect::Receive(Receive {
            message_type: message_type.to_owned(),
            correlation,
            earlier: false,
        }));
    }

    /// Like [`Context::receive`], and also takes the messages of this key published before the
    /// receive: those late for an earlier instance of the key that ended (zombies, named by
    /// `reason LIKE 'late:%'`) and those held unrouted, oldest first. For a resubmission that
    /// must see what its predecessor missed.
    pub fn receive_earlier(&mut self, message_type: &str, correlation: Correlation) {
        self.effects.push(Effect::Receive(Receive {
            message_type: message_type.to_owned(),
            correlation,
            earlier: true,
        }));
    }

    /// Waits until `at`; the instance then gets [`Event::Timer`](crate::Event::Timer) with `name`.
    pub fn delay_until(&mut self, name: &str, at: DateTime<Utc>) {
        self.effects.push(Effect::Delay(Delay {
            name: name.to_owned(),
            at,
        }));
    }

    /// Waits for `duration` from [`Context::now`].
    pub fn delay(&mut self, name: &str, duration: Duration) {
        self.delay_until(name, self.now + duration);
    }

    /// Cancels every wait the instance has, so that the transition can declare new ones.
    pub fn cancel_waits(&mut self) {
        self.effects.push(Effect::CancelWaits);
    }

    /// Starts an instance of `orchestration` (its newest registered version) with `input`.
    /// Returns the child's id.
    ///
    /// # Errors
    /// If `input` does not serialize to JSON.
    pub fn start(
        &mut self,
        orchestration: &str,
        input: &impl Serialize,
    ) -> Result<Uuid, serde_json::Error> {
        let child = Uuid::now_v7();
        self.effects.push(Effect::Start {
            child,
            orchestration: orchestration.to_owned(),
            input: serde_json::to_value(input)?,
        });
        Ok(child)
    }

    /// Suspends the instance once this transition's state is saved. An operator resumes it.
    pub fn suspend(&mut self, reason: impl Into<String>) {
        self.effects.push(Effect::Suspend {
            reason: reason.into(),
        });
    }

    /// Begins a transactional scope named `name`, nested in the innermost open one. The scope
    /// covers this whole transition (the state it started from is the state this transition was
    /// given) and every following one up to and including the one that calls
    /// [`Context::end_scope`]. An atomic scope cannot contain other scopes or requests (the reply
    /// could never arrive before the scope commits).
    pub fn begin_scope(&mut self, name: &str, kind: ScopeKind) {
        self.effects.push(Effect::BeginScope {
            name: name.to_owned(),
            kind,
        });
    }

    /// Ends the innermost open scope successfully, with nothing recorded for its compensation.
    pub fn end_scope(&mut self) {
        self.effects.push(Effect::EndScope {
            compensation: serde_json::Value::Null,
        });
    }

    /// Ends the innermost open scope successfully and records `data` for its compensation
    /// (handed back in [`Event::Compensate`](crate::Event::Compensate)).
    ///
    /// # Errors
    /// If `data` does not serialize to JSON.
    pub fn end_scope_with(&mut self, data: &impl Serialize) -> Result<(), serde_json::Error> {
        self.effects.push(Effect::EndScope {
            compensation: serde_json::to_value(data)?,
        });
        Ok(())
    }

    /// Compensates the completed scopes named `scope` and every completed scope nested in them,
    /// newest first: the instance gets one [`Event::Compensate`](crate::Event::Compensate) per
    /// scope, each handled in its own persistence point, then
    /// [`Event::Compensated`](crate::Event::Compensated).
    pub fn compensate(&mut self, scope: &str) {
        self.effects.push(Effect::Compensate {
            scope: Some(scope.to_owned()),
        });
    }

    /// Compensates every completed scope of the instance, newest first (see
    /// [`Context::compensate`]).
    pub fn compensate_all(&mut self) {
        self.effects.push(Effect::Compensate { scope: None });
    }

    /// The effects asked for so far, in order.
    pub fn effects(&self) -> &[Effect] {
        &self.effects
    }

    /// Takes the effects out.
    pub fn into_effects(self) -> Vec<Effect> {
        self.effects
    }
}
