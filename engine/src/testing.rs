//! The test kit for orchestration authors.
//!
//! Two tools, for two kinds of test:
//!
//! * [`Scenario`] runs an orchestration's transitions with no engine and no database: feed it
//!   events, then assert on its state, its step, the effects it asked for and its outcome. It uses
//!   the engine's own event handling, so what a scenario accepts the host accepts too (a message
//!   the instance does not wait for is refused, as the host would hold it back).
//! * [`CrashTest`] runs one instance under the real engine on a temporary SQLite database, or on
//!   a fresh PostgreSQL database per run ([`CrashTest::database`]), once cleanly and then with a
//!   crash injected at every persistence point in turn (just before its commit, and just after
//!   it), restarting a fresh host each time. It can publish messages and move the engine's clock
//!   when the instance reaches a step ([`CrashTest::publish_at`], [`CrashTest::advance_at`]). It checks G1-G3 and G5 for
//!   the orchestration: the instance ends as in the clean run, every message addressed to it is
//!   consumed exactly once, its history is the clean run's history, every committed send was
//!   delivered and no uncommitted one was. With [`CrashTest::upgrade_to`] the instance is moved
//!   to a newer version while it waits, and the crashes cover that upgrade point too.
//! * [`Scenario::upgraded`] checks a migration against real stored states: it loads a state of an
//!   older version ([`Fixture`], exported with `cairn export ID` or read from a database with
//!   [`Fixture::from_database`]), migrates it as `cairn upgrade` would, and runs it on.
//!
//! ```
//! use cairn::testing::Scenario;
//! # use cairn::{Context, Event, Fault, Next, Orchestration, Correlation};
//! # use serde::{Deserialize, Serialize};
//! # struct Greeter;
//! # #[derive(Clone, Serialize, Deserialize)] enum State { AwaitingName }
//! # impl Orchestration for Greeter {
//! #     const NAME: &'static str = "greeter"; const VERSION: u32 = 1;
//! #     type Input = (); type State = State; type Output = String;
//! #     fn start(ctx: &mut Context, _: ()) -> Result<Next<Self>, Fault> {
//! #         ctx.receive("name.given", Correlation::none()); Ok(Next::Continue(State::AwaitingName)) }
//! #     fn on_event(_: &mut Context, _: State, e: Event) -> Result<Next<Self>, Fault> {
//! #         Ok(Next::Complete(format!("hello {}", e.message()?.body::<String>()?))) }
//! # }
//! let mut s = Scenario::<Greeter>::start(()).unwrap();
//! assert_eq!(s.step(), "AwaitingName");
//! s.message("name.given", serde_json::json!("ada")).unwrap();
//! assert_eq!(s.output(), Some(&"hello ada".to_owned()));
//! ```

use std::collections::BTreeMap;
use std::marker::PhantomData;

use chrono::{DateTime, Utc};
use uuid::Uuid;

use crate::codec;
use crate::context::Effect;
use crate::host::instance::{Delivery, LiveInstance, Waits};
use crate::orchestration::Orchestration;
use crate::registry::Registry;
use crate::store::{
    InstanceRecord, InstanceStatus, MessageKind, NewMessage, Reason, StoredMessage,
};

mod crash;

pub use crash::{CrashReport, CrashTest, CrashTestFailure, PortFactory, Recorder};

mod upgrade;
pub use crate::upgrade::Fixture;

/// A scenario step that could not be taken.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ScenarioError {
    /// The transition failed or panicked; the engine would suspend the instance.
    #[error("the instance would be suspended: {0}")]
    Faulted(String),
    /// The instance does not wait for this event.
    #[error("the instance does not wait for {0}; it waits for: {1}")]
    NotWaiting(String, String),
    /// The instance has ended.
    #[error("the instance has ended")]
    Ended,
    /// The orchestration is not in the scenario's registry.
    #[error("orchestration {0} is not registered")]
    Unregistered(&'static str),
    /// The instance moved between steps along a transition its orchestration does not declare
    /// ([`Orchestration::TRANSITIONS`](crate::Orchestration::TRANSITIONS), or a step not in
    /// [`Orchestration::STEPS`](crate::Orchestration::STEPS)).
    #[error("undeclared transition {from} -> {to}: add it to the orchestration's TRANSITIONS (and STEPS), or fix the transition")]
    UndeclaredTransition {
        /// The step it left (`(start)` for its first).
        from: String,
        /// The step it reached.
        to: String,
    },
    /// A stored state did not load or migrate ([`Scenario::upgraded`]).
    #[error("the stored state does not move to this version: {0}")]
    Upgrade(String),
}

/// How a scenario's instance stands.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome<T> {
    /// Still running.
    Running,
    /// Completed with this output.
    Completed(T),
    /// Failed with this reason.
    Failed(String),
    /// Suspended itself with this reason.
    Suspended(String),
}

/// An orchestration run by hand, with no engine and no database. See the module docs.
pub struct Scenario<O: Orchestration> {
    instance: LiveInstance,
    registry: Registry,
    now: DateTime<Utc>,
    seq: i64,
    points: Vec<Reason>,
    details: Vec<String>,
    outcome: Outcome<O::Output>,
    /// The step after the last transition (`None` before the first), for the declared map.
    last_step: Option<String>,
    _o: PhantomData<fn() -> O>,
}

impl<O: Orchestration> std::fmt::Debug for Scenario<O> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Scenario")
            .field("instance", &self.instance)
            .field("points", &self.points)
            .finish_non_exhaustive()
    }
}

impl<O: Orchestration> Scenario<O> {
    /// Starts an instance with `input`, at the current time.
    ///
    /// # Errors
    /// The start transition failed.
    pub fn start(input: O::Input) -> Result<Self, ScenarioError> {
        Self::start_with(Registry::new().register::<O>(), Utc::now(), input)
    }

    /// Starts an instance with a registry (holding the children it starts) at a given time.
    ///
    /// # Errors
    /// The start transition failed.
    pub fn start_with(
        registry: Registry,
        now: DateTime<Utc>,
        input: O::Input,
    ) -> Result<Self, ScenarioError> {
        let input =
            serde_json::to_value(input).map_err(|e| ScenarioError::Faulted(e.to_string()))?;
        Self::begin(registry, now, None, input, BTreeMap::new())
    }

    /// Starts an instance as a published message of `message_type` would activate it: `body` is
    /// its input, its top-level fields are promoted to properties (as on publish), and the start
    /// transition sees the message in [`Context::started_by`](crate::Context::started_by).
    ///
    /// # Errors
    /// The start transition failed.
    pub fn activate(message_type: &str, body: serde_json::Value) -> Result<Self, ScenarioError> {
        Self::activate_with(
            Registry::new(),
            Utc::now(),
            message_type,
            body,
            BTreeMap::new(),
        )
    }

    /// [`Scenario::activate`] with a registry, a time and properties set by the publisher (which
    /// win over promoted ones).
    ///
    /// # Errors
    /// The start transition failed.
    pub fn activate_with(
        registry: Registry,
        now: DateTime<Utc>,
        message_type: &str,
        body: serde_json::Value,
        properties: BTreeMap<String, String>,
    ) -> Result<Self, ScenarioError> {
        let properties =
            NewMessage::published("", message_type, body.clone(), properties).properties;
        Self::begin(registry, now, Some(message_type), body, properties)
    }

    /// Starts the instance: by a start (`activating` is `None`) or by a message of that type.
    fn begin(
        registry: Registry,
        now: DateTime<Utc>,
        activating: Option<&str>,
        input: serde_json::Value,
        properties: BTreeMap<String, String>,
    ) -> Result<Self, ScenarioError> {
        let registry = registry.register::<O>();
        let def = registry
            .get(O::NAME, O::VERSION)
            .cloned()
            .ok_or(ScenarioError::Unregistered(O::NAME))?;
        let record = InstanceRecord {
            id: Uuid::new_v4(),
            orchestration: O::NAME.to_owned(),
            version: O::VERSION,
            status: InstanceStatus::Running,
            state: None,
            engine_state: None,
            epoch: 1,
            history_seq: 0,
            parent_id: None,
        };
        let instance =
            LiveInstance::load(record, def).map_err(|f| ScenarioError::Faulted(f.error.0))?;
        let mut scenario = Self::of(instance, registry, now);
        let id = scenario.instance.id;
        let (message_id, message_type) = match activating {
            Some(ty) => ("scenario-activation".to_owned(), ty.to_owned()),
            None => (format!("{id}:start"), format!("{}.start", O::NAME)),
        };
        scenario.deliver_as(
            message_id,
            MessageKind::Start,
            &message_type,
            input,
            properties,
        )?;
        Ok(scenario)
    }

    /// A scenario of an instance loaded, before any event.
    fn of(instance: LiveInstance, registry: Registry, now: DateTime<Utc>) -> Self {
        Self {
            instance,
            registry,
            now,
            seq: 0,
            points: Vec::new(),
            details: Vec::new(),
            outcome: Outcome::Running,
            last_step: None,
            _o: PhantomData,
        }
    }

    /// Moves the scenario's clock forward.
    pub fn advance(&mut self, by: chrono::Duration) -> &mut Self {
        self.now += by;
        self
    }

    /// The scenario's clock.
    pub fn now(&self) -> DateTime<Utc> {
        self.now
    }

    /// Delivers a published message (body fields are promoted to properties, as on publish).
    ///
    /// # Errors
    /// The instance does not wait for it, has ended, or the transition failed.
    pub fn message(
        &mut self,
        message_type: &str,
        body: serde_json::Value,
    ) -> Result<&mut Self, ScenarioError> {
        let properties =
            NewMessage::published("", message_type, body.clone(), BTreeMap::new()).properties;
        self.deliver(MessageKind::Published, message_type, body, properties)
    }

    /// Answers the oldest unanswered request sent to `port`.
    ///
    /// # Errors
    /// No request to `port` is waiting, or the transition failed.
    pub fn reply(
        &mut self,
        port: &str,
        body: serde_json::Value,
    ) -> Result<&mut Self, ScenarioError> {
        let request = self
            .instance
            .waits()
            .requests
            .iter()
            .find(|(_, p)| p == port)
            .map(|(id, _)| id.clone())
            .ok_or_else(|| {
                ScenarioError::NotWaiting(format!("a reply from {port}"), self.waiting_for())
            })?;
        let properties = BTreeMap::from([
            ("request_id".to_owned(), request),
            ("port".to_owned(), port.to_owned()),
        ]);
        self.deliver(MessageKind::Reply, "reply", body, properties)
    }

    /// Fires the timer `name`.
    ///
    /// # Errors
    /// The instance does not wait for it, or the transition failed.
    pub fn timer(&mut self, name: &str) -> Result<&mut Self, ScenarioError> {
        self.ensure_running()?;
        if !self.instance.waits().delays.iter().any(|d| d.name == name) {
            return Err(ScenarioError::NotWaiting(
                format!("timer {name}"),
                self.waiting_for(),
            ));
        }
        let delivery = self
            .instance
            .deliver_timer(name, &self.registry, &|_| true, self.now);
        self.after(delivery)
    }

    /// Reports that a child completed with `output`.
    ///
    /// # Errors
    /// The transition failed.
    pub fn child_completed(
        &mut self,
        child: Uuid,
        output: serde_json::Value,
    ) -> Result<&mut Self, ScenarioError> {
        let body = serde_json::json!({ "child": child, "output": output });
        self.deliver(
            MessageKind::ChildCompleted,
            "child.completed",
            body,
            BTreeMap::new(),
        )
    }

    /// Reports that a child failed.
    ///
    /// # Errors
    /// The transition failed.
    pub fn child_failed(&mut self, child: Uuid, error: &str) -> Result<&mut Self, ScenarioError> {
        let body = serde_json::json!({ "child": child, "error": error });
        self.deliver(
            MessageKind::ChildFailed,
            "child.failed",
            body,
            BTreeMap::new(),
        )
    }

    /// Reports that a send was dead-lettered.
    ///
    /// # Errors
    /// The transition failed.
    pub fn send_failed(
        &mut self,
        message_id: &str,
        port: &str,
        error: &str,
    ) -> Result<&mut Self, ScenarioError> {
        let body = serde_json::json!({ "message_id": message_id, "port": port, "error": error });
        self.deliver(
            MessageKind::SendFailed,
            "send.failed",
            body,
            BTreeMap::new(),
        )
    }

    fn ensure_running(&self) -> Result<(), ScenarioError> {
        match self.outcome {
            Outcome::Running => Ok(()),
            _ => Err(ScenarioError::Ended),
        }
    }

    fn deliver(
        &mut self,
        kind: MessageKind,
        message_type: &str,
        body: serde_json::Value,
        properties: BTreeMap<String, String>,
    ) -> Result<&mut Self, ScenarioError> {
        let id = format!("scenario-{}", self.seq + 1);
        self.deliver_as(id, kind, message_type, body, properties)
    }

    fn deliver_as(
        &mut self,
        id: String,
        kind: MessageKind,
        message_type: &str,
        body: serde_json::Value,
        properties: BTreeMap<String, String>,
    ) -> Result<&mut Self, ScenarioError> {
        self.ensure_running()?;
        self.seq += 1;
        let msg = StoredMessage {
            seq: self.seq,
            id,
            message_type: message_type.to_owned(),
            kind,
            properties,
            body,
            instance_id: self.instance.id,
            subscription_id: None,
            published_at: self.now,
            delivery_count: 1,
        };
        let label = format!("message {message_type}");
        let delivery = self
            .instance
            .deliver_message(msg, &self.registry, &|_| true, self.now);
        if delivery == Delivery::Held {
            self.instance.take_held();
            return Err(ScenarioError::NotWaiting(label, self.waiting_for()));
        }
        self.after(delivery)
    }

    /// Checks the step the last transition reached against the declared steps and transitions,
    /// where the orchestration declares them.
    fn check_declared(&mut self) -> Result<(), ScenarioError> {
        if !matches!(self.outcome, Outcome::Running | Outcome::Suspended(_))
            || self.state().is_none()
        {
            return Ok(());
        }
        let to = self.step();
        let from = self
            .last_step
            .replace(to.clone())
            .unwrap_or_else(|| "(start)".to_owned());
        let undeclared_step = !O::STEPS.is_empty() && !O::STEPS.contains(&to.as_str());
        let undeclared_move = !O::TRANSITIONS.is_empty()
            && from != to
            && !O::TRANSITIONS.contains(&(from.as_str(), to.as_str()));
        if undeclared_step || undeclared_move {
            return Err(ScenarioError::UndeclaredTransition { from, to });
        }
        Ok(())
    }

    fn after(&mut self, delivery: Delivery) -> Result<&mut Self, ScenarioError> {
        let ran = matches!(delivery, Delivery::Ran(_));
        self.after_delivery(delivery)?;
        if ran {
            self.check_declared()?;
        }
        Ok(self)
    }

    fn after_delivery(&mut self, delivery: Delivery) -> Result<&mut Self, ScenarioError> {
        match delivery {
            Delivery::Held | Delivery::Ran(None) => {}
            Delivery::Faulted(text) => return Err(ScenarioError::Faulted(text.0)),
            Delivery::Panicked { error, .. } => return Err(ScenarioError::Faulted(error.0)),
            Delivery::Ran(Some(reason)) => {
                let point = self
                    .instance
                    .persistence_point(reason, "scenario", self.now, self.now)
                    .map_err(|e| ScenarioError::Faulted(e.0))?;
                self.points.push(reason);
                self.details.extend(point.detail.clone());
                // The engine's own messages to the instance (compensation steps) arrive next.
                let own: Vec<_> = point
                    .messages
                    .iter()
                    .filter(|m| {
                        m.target == Some(self.instance.id) && m.kind == MessageKind::Compensate
                    })
                    .cloned()
                    .collect();
                self.outcome = match point.status {
                    InstanceStatus::Completed => {
                        let output = point.output.unwrap_or_default();
                        Outcome::Completed(
                            serde_json::from_value(output)
                                .map_err(|e| ScenarioError::Faulted(e.to_string()))?,
                        )
                    }
                    InstanceStatus::Failed => Outcome::Failed(point.last_error.unwrap_or_default()),
                    InstanceStatus::Suspended => {
                        Outcome::Suspended(point.last_error.unwrap_or_default())
                    }
                    _ => Outcome::Running,
                };
                for msg in own {
                    self.deliver(msg.kind, &msg.message_type, msg.body, msg.properties)?;
                }
            }
        }
        Ok(self)
    }

    /// What the persistence points so far said they did (`history.detail`), in order.
    pub fn details(&self) -> &[String] {
        &self.details
    }

    /// The current state.
    pub fn state(&self) -> Option<&O::State> {
        self.instance.state::<O::State>()
    }

    /// The current step: the state's variant name, as in the `step` column.
    pub fn step(&self) -> String {
        self.state()
            .and_then(|s| codec::encode(s).ok())
            .map(|bytes| codec::step_name(&bytes, "state"))
            .unwrap_or_else(|| "created".to_owned())
    }

    /// The effects the last transition asked for.
    pub fn effects(&self) -> &[Effect] {
        self.instance.last_effects()
    }

    /// The sends of the last transition: (port, message type, body).
    pub fn sends(&self) -> Vec<(&str, &str, &serde_json::Value)> {
        self.effects()
            .iter()
            .filter_map(|e| match e {
                Effect::Send {
                    port,
                    message_type,
                    body,
                    ..
                } => Some((port.as_str(), message_type.as_str(), body)),
                _ => None,
            })
            .collect()
    }

    /// The children the last transition started: (id, orchestration, input).
    pub fn started(&self) -> Vec<(Uuid, &str, &serde_json::Value)> {
        self.effects()
            .iter()
            .filter_map(|e| match e {
                Effect::Start {
                    child,
                    orchestration,
                    input,
                } => Some((*child, orchestration.as_str(), input)),
                _ => None,
            })
            .collect()
    }

    /// What the instance waits for now.
    pub fn waits(&self) -> &Waits {
        self.instance.waits()
    }

    /// What the instance waits for, as the `waiting_for` column shows it.
    pub fn waiting_for(&self) -> String {
        self.instance.waits().describe()
    }

    /// The persistence points so far, by reason.
    pub fn persistence_points(&self) -> &[Reason] {
        &self.points
    }

    /// How the instance stands.
    pub fn outcome(&self) -> &Outcome<O::Output> {
        &self.outcome
    }

    /// The output, once completed.
    pub fn output(&self) -> Option<&O::Output> {
        match &self.outcome {
            Outcome::Completed(output) => Some(output),
            _ => None,
        }
    }
}
