//! One instance held in a host's memory: it takes events, runs transitions, and says when a
//! persistence point is due and what it holds.
//!
//! Everything here is synchronous and free of I/O. The instance keeps two pictures of itself: the
//! one at its last persistence point (`saved`) and the current one. Between the two lie the
//! messages it consumed since (`consumed`), which the next point marks consumed for good, or
//! which are delivered again if the host dies first (G3).
//!
//! A transition's decision is applied in `accept`'s named steps, one per effect;
//! the points it makes due are built in `instance/point.rs`, and `instance/tests.rs` tests the
//! whole as a state machine: an event in, a point out.

use std::collections::{BTreeMap, BTreeSet};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;
use std::time::Instant;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

mod point;
#[cfg(test)]
mod tests;

use super::metrics::{Metrics, TransitionOutcome};
use super::scopes::Scopes;
use crate::codec;
use crate::context::{Context, Delay, Effect, Receive, ScopeKind, StartedBy};
use crate::orchestration::{Correlation, Event, Message, OnFault, ScopeFault};
use crate::registry::{AnyNext, AnyState, Definition, Registry};
use crate::store::{
    convoy_subscription_id, InstanceRecord, MessageKind, NewInstance, NewMessage, OutboxRow,
    Reason, StoredMessage, SubscriptionRow,
};

/// The engine's own bookkeeping for an instance, saved beside its state (`engine_state`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Waits {
    /// Receives, each with the id of its subscription row.
    pub receives: Vec<(Uuid, Receive)>,
    /// Delays, by name.
    pub delays: Vec<Delay>,
    /// Requests sent and not answered: (request id, port).
    pub requests: Vec<(String, String)>,
    /// Children started and not ended.
    pub children: Vec<Uuid>,
    /// Transactional scopes and compensation.
    #[serde(default)]
    pub scopes: Scopes,
    /// For an instance a convoy started: the convoy's values.
    #[serde(default)]
    pub convoy: Option<Correlation>,
}

/// Where an atomic scope started: what a fault inside it rolls back to. In memory only: an
/// atomic scope never spans a persistence point.
struct AtomicStart {
    state: Option<AnyState>,
    waits: Waits,
    outbox: usize,
    children: usize,
    messages: usize,
}

impl Waits {
    fn cancel(&mut self) {
        self.receives.clear();
        self.delays.clear();
    }

    /// The readable `waiting_for` column.
    pub fn describe(&self) -> String {
        let mut parts = Vec::new();
        for (_, r) in &self.receives {
            if r.correlation.is_empty() {
                parts.push(format!("message {}", r.message_type));
            } else {
                parts.push(format!(
                    "message {} {{{}}}",
                    r.message_type,
                    r.correlation.canonical()
                ));
            }
        }
        for d in &self.delays {
            parts.push(format!(
                "timer {} at {}",
                d.name,
                d.at.format("%Y-%m-%dT%H:%M:%SZ")
            ));
        }
        for (_, port) in &self.requests {
            parts.push(format!("reply from {port}"));
        }
        for child in &self.children {
            parts.push(format!("child {child}"));
        }
        parts.join("; ")
    }

    fn next_timer(&self) -> Option<DateTime<Utc>> {
        self.delays.iter().map(|d| d.at).min()
    }
}

/// Why an instance cannot go on; it is suspended at its last persistence point with this text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FaultText(pub String);

/// What happened to one event.
#[derive(Debug, PartialEq, Eq)]
pub enum Delivery {
    /// The transition ran; a persistence point is due if `Some`.
    Ran(Option<Reason>),
    /// The event matched no current wait and is held until the waits change.
    Held,
    /// The transition failed: suspend at the last persistence point.
    Faulted(FaultText),
    /// The transition panicked on a message: drop the instance from memory (back to its last
    /// persistence point) and deliver the message again, counting the attempt (poison
    /// protection).
    Panicked {
        /// The panic's text.
        error: FaultText,
        /// The message whose delivery panicked.
        seq: i64,
    },
}

/// How a transition ended, for building the point.
enum Ending {
    Running,
    Completed(serde_json::Value),
    Failed(String),
    Suspended(String),
}

/// An instance in memory.
pub struct LiveInstance {
    /// The instance id.
    pub id: Uuid,
    def: Arc<dyn Definition>,
    /// The epoch this host holds.
    pub epoch: i64,
    history_seq: i64,
    parent: Option<Uuid>,
    state: Option<AnyState>,
    saved_waits: Waits,
    /// Subscription ids known to be in the database.
    written_receives: BTreeSet<Uuid>,
    /// Whether `written_receives` is exactly the database's set (true after this host wrote a
    /// point; false after loading, as a host that died may have added rows since).
    receives_exact: bool,
    saved_step: String,
    /// The step of the state the last transition before a fault reached, when it differs from
    /// the saved one: what a fault point shows (`instances.step`), also before the first point.
    reached_step: Option<String>,
    /// What started it, for its start transition's context (set just before it runs).
    starting: Option<StartedBy>,
    waits: Waits,
    consumed: Vec<i64>,
    fired_timers: BTreeSet<String>,
    held: Vec<StoredMessage>,
    outbox: Vec<OutboxRow>,
    children: Vec<NewInstance>,
    messages: Vec<NewMessage>,
    atomic: Option<AtomicStart>,
    detail: Option<String>,
    failed: Vec<i64>,
    compensating_now: Option<String>,
    /// Requests whose replies were handed over in memory: the next point marks them delivered.
    delivered: Vec<String>,
    ending: Ending,
    dirty: bool,
    last_effects: Vec<Effect>,
    /// When it last handled an event (for dehydration).
    pub last_active: Instant,
    /// Where its transitions are counted, when the host keeps metrics.
    metrics: Option<Arc<Metrics>>,
}

impl std::fmt::Debug for LiveInstance {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LiveInstance")
            .field("id", &self.id)
            .field("orchestration", &self.def.name())
            .field("epoch", &self.epoch)
            .field("waits", &self.waits)
            .finish_non_exhaustive()
    }
}

/// Loading an instance failed in a way that suspends it (corrupt state or bookkeeping).
#[derive(Debug)]
pub struct LoadFault {
    /// The instance, with no state, so that a suspend point can be written for it.
    pub instance: LiveInstance,
    /// Why.
    pub error: FaultText,
}

impl LiveInstance {
    /// Rehydrates an instance from its record.
    ///
    /// # Errors
    /// [`LoadFault`] if the state or the bookkeeping does not decode.
    pub fn load(record: InstanceRecord, def: Arc<dyn Definition>) -> Result<Self, Box<LoadFault>> {
        let mut instance = LiveInstance {
            id: record.id,
            def,
            epoch: record.epoch,
            history_seq: record.history_seq,
            parent: record.parent_id,
            state: None,
            saved_waits: Waits::default(),
            written_receives: BTreeSet::new(),
            receives_exact: false,
            saved_step: "created".to_owned(),
            reached_step: None,
            starting: None,
            waits: Waits::default(),
            consumed: Vec::new(),
            fired_timers: BTreeSet::new(),
            held: Vec::new(),
            outbox: Vec::new(),
            children: Vec::new(),
            messages: Vec::new(),
            atomic: None,
            detail: None,
            failed: Vec::new(),
            compensating_now: None,
            delivered: Vec::new(),
            ending: Ending::Running,
            dirty: false,
            last_effects: Vec::new(),
            last_active: Instant::now(),
            metrics: None,
        };
        if let Some(bytes) = &record.state {
            instance.saved_step = codec::step_name(bytes, "state");
            match instance.def.decode_state(bytes) {
                Ok(state) => instance.state = Some(state),
                Err(e) => {
                    let (name, version, id) =
                        (instance.def.name(), instance.def.version(), record.id);
                    return Err(Box::new(LoadFault {
                        error: FaultText(format!(
                            "{e}; this build's {name} version {version} cannot read the state \
                             (incompatible or corrupt). If a newer version migrates it: `cairn \
                             upgrade {name} --to NEWER --from {version}`, then `cairn resume {id}`; \
                             or deploy a build whose {name} version {version} reads it, then `cairn \
                             resume {id}`; or `cairn terminate {id}`"
                        )),
                        instance,
                    }));
                }
            }
        }
        if let Some(bytes) = &record.engine_state {
            match codec::decode::<Waits>(bytes) {
                Ok(waits) => {
                    instance.written_receives = waits.receives.iter().map(|(id, _)| *id).collect();
                    instance.saved_waits = waits.clone();
                    instance.waits = waits;
                }
                Err(e) => {
                    return Err(Box::new(LoadFault {
                        error: FaultText(format!("engine bookkeeping does not decode: {e}")),
                        instance,
                    }))
                }
            }
        }
        Ok(instance)
    }

    /// Counts its transitions in `metrics` from now on (`cairn_transitions_total`,
    /// `cairn_transition_duration_seconds`).
    pub(crate) fn count_in(&mut self, metrics: Option<&Arc<Metrics>>) {
        self.metrics = metrics.cloned();
    }

    /// The definition's name.
    pub fn orchestration(&self) -> &'static str {
        self.def.name()
    }

    /// The definition's version.
    pub fn version(&self) -> u32 {
        self.def.version()
    }

    /// Whether it changed since its last persistence point.
    pub fn is_dirty(&self) -> bool {
        self.dirty
    }

    /// Whether it ended (a `complete` point is due or written).
    pub fn has_ended(&self) -> bool {
        !matches!(self.ending, Ending::Running)
    }

    /// Its earliest timer, in memory.
    pub fn next_timer(&self) -> Option<DateTime<Utc>> {
        self.waits.next_timer()
    }

    /// Runs the first transition of an instance not stored yet (an eager start, whose first
    /// point writes it: [`FirstPoint`](crate::store::FirstPoint)), given its input. It consumes
    /// no stored message: the point stores the start message consumed.
    pub fn start_new(
        &mut self,
        input: serde_json::Value,
        registry: &Registry,
        ports: &dyn Fn(&str) -> bool,
        now: DateTime<Utc>,
    ) -> Delivery {
        self.starting = Some(StartedBy {
            id: format!("{}:start", self.id),
            message_type: format!("{}.start", self.def.name()),
            properties: BTreeMap::new(),
            received_at: now,
            by_message: false,
        });
        self.run(None, None, registry, ports, now, |def, ctx| {
            def.start(ctx, input)
        })
    }

    /// Delivers a message claimed for this instance.
    pub fn deliver_message(
        &mut self,
        msg: StoredMessage,
        registry: &Registry,
        ports: &dyn Fn(&str) -> bool,
        now: DateTime<Utc>,
    ) -> Delivery {
        if self.consumed.contains(&msg.seq) || self.held.iter().any(|h| h.seq == msg.seq) {
            // Claimed twice (a lock handed over between hosts): this instance already has it.
            return Delivery::Held;
        }
        let event = match msg.kind {
            MessageKind::Start => {
                if self.state.is_some() {
                    // The first persistence point consumed the start message with the first
                    // state, so this is a stale copy: a claim another host also made (it took
                    // the lock as stale, started the instance) before this one acquired it.
                    tracing::debug!(instance.id = %self.id, message.id = %msg.id,
                        "start message for an instance that has started: a stale copy, dropped");
                    return Delivery::Held;
                }
                self.join_convoy(&msg);
                let seq = msg.seq;
                self.starting = Some(StartedBy {
                    // A start's message is `<instance id>:start` (NewInstance::start_message_id);
                    // any other start message is the published message that activated it.
                    by_message: msg.id != format!("{}:start", self.id),
                    id: msg.id.clone(),
                    message_type: msg.message_type.clone(),
                    properties: msg.properties.clone(),
                    received_at: msg.published_at,
                });
                return self.run(Some(seq), None, registry, ports, now, |def, ctx| {
                    def.start(ctx, msg.body)
                });
            }
            MessageKind::Published => {
                let matches = |r: &Receive| {
                    r.message_type == msg.message_type && r.correlation.matches(&msg.properties)
                };
                let routed_by_current = msg
                    .subscription_id
                    .is_some_and(|s| self.waits.receives.iter().any(|(id, _)| *id == s));
                if !routed_by_current && !self.waits.receives.iter().any(|(_, r)| matches(r)) {
                    self.held.push(msg);
                    return Delivery::Held;
                }
                self.waits.cancel();
                Event::Message(to_message(&msg))
            }
            MessageKind::Reply => {
                let request_id = msg
                    .properties
                    .get("request_id")
                    .cloned()
                    .unwrap_or_default();
                let port = msg.properties.get("port").cloned().unwrap_or_default();
                if !self.waits.requests.iter().any(|(id, _)| *id == request_id) {
                    // Answered already (the reply was handed over in memory, then the request
                    // was sent again): nothing left to do with this copy.
                    self.consumed.push(msg.seq);
                    self.dirty = true;
                    return Delivery::Ran(None);
                }
                self.waits.requests.retain(|(id, _)| *id != request_id);
                Event::Reply {
                    request_id,
                    port,
                    message: to_message(&msg),
                }
            }
            MessageKind::ChildCompleted | MessageKind::ChildFailed => {
                let child = msg
                    .body
                    .get("child")
                    .and_then(|c| c.as_str())
                    .and_then(|c| Uuid::parse_str(c).ok())
                    .unwrap_or_default();
                self.waits.children.retain(|c| *c != child);
                if msg.kind == MessageKind::ChildCompleted {
                    Event::ChildCompleted {
                        child,
                        output: msg.body.get("output").cloned().unwrap_or_default(),
                    }
                } else {
                    Event::ChildFailed {
                        child,
                        error: text_field(&msg.body, "error"),
                    }
                }
            }
            MessageKind::Compensate => match self.waits.scopes.take_event(&msg.body) {
                Some(event) => {
                    if let Event::Compensate { scope, .. } = &event {
                        self.compensating_now = Some(scope.clone());
                    }
                    event
                }
                None => {
                    // Already handled (a message delivered twice): nothing left to do.
                    self.consumed.push(msg.seq);
                    self.dirty = true;
                    return Delivery::Ran(None);
                }
            },
            MessageKind::SendFailed => {
                let message_id = text_field(&msg.body, "message_id");
                self.waits.requests.retain(|(id, _)| *id != message_id);
                Event::SendFailed {
                    message_id,
                    port: text_field(&msg.body, "port"),
                    error: text_field(&msg.body, "error"),
                }
            }
        };
        self.deliver_event(Some(msg.seq), event, registry, ports, now)
    }

    /// Delivers the reply to request `row`, handed over by this host's dispatcher rather than
    /// stored as a message. The next persistence point marks the request delivered; until then,
    /// a crash leaves it pending, and it is sent again under the same id (G2). A second reply
    /// to a request already answered is dropped.
    pub fn deliver_reply(
        &mut self,
        row: &OutboxRow,
        body: serde_json::Value,
        registry: &Registry,
        ports: &dyn Fn(&str) -> bool,
        now: DateTime<Utc>,
    ) -> Delivery {
        self.delivered.push(row.id.clone());
        self.dirty = true;
        if !self.waits.requests.iter().any(|(id, _)| *id == row.id) {
            return Delivery::Ran(None);
        }
        self.waits.requests.retain(|(id, _)| *id != row.id);
        let message = Message {
            id: row.reply_id(),
            message_type: format!("{}.reply", row.message_type),
            properties: [
                ("request_id".to_owned(), row.id.clone()),
                ("port".to_owned(), row.port.clone()),
            ]
            .into(),
            body,
            published_at: now,
        };
        let event = Event::Reply {
            request_id: row.id.clone(),
            port: row.port.clone(),
            message,
        };
        self.deliver_event(None, event, registry, ports, now)
    }

    /// A convoy's first message: the store subscribed the new instance to every activating type
    /// with the message's convoy values; the instance waits for them under the same ids.
    fn join_convoy(&mut self, start: &StoredMessage) {
        let keys = self.def.convoy_keys();
        if keys.is_empty()
            || !self
                .def
                .activated_by()
                .contains(&start.message_type.as_str())
        {
            return;
        }
        let Some(values) = Correlation::from_properties(&keys, &start.properties) else {
            return;
        };
        self.waits.convoy = Some(values.clone());
        for message_type in self.def.activated_by() {
            let id = convoy_subscription_id(self.id, message_type);
            self.written_receives.insert(id);
            self.waits.receives.push((
                id,
                Receive {
                    message_type: (*message_type).to_owned(),
                    correlation: values.clone(),
                    earlier: false,
                },
            ));
        }
    }

    /// The id a convoy receive keeps across Listen cancellations: the one the store gave it.
    fn convoy_id(&self, receive: &Receive) -> Option<Uuid> {
        (self.waits.convoy.as_ref() == Some(&receive.correlation)
            && self
                .def
                .activated_by()
                .contains(&receive.message_type.as_str()))
        .then(|| convoy_subscription_id(self.id, &receive.message_type))
    }

    /// Delivers a due timer. A timer the instance no longer waits for is dropped.
    pub fn deliver_timer(
        &mut self,
        name: &str,
        registry: &Registry,
        ports: &dyn Fn(&str) -> bool,
        now: DateTime<Utc>,
    ) -> Delivery {
        self.fired_timers.insert(name.to_owned());
        if !self.waits.delays.iter().any(|d| d.name == name) {
            self.dirty = true;
            return Delivery::Ran(None);
        }
        self.waits.cancel();
        self.deliver_event(
            None,
            Event::Timer {
                name: name.to_owned(),
            },
            registry,
            ports,
            now,
        )
    }

    fn deliver_event(
        &mut self,
        seq: Option<i64>,
        event: Event,
        registry: &Registry,
        ports: &dyn Fn(&str) -> bool,
        now: DateTime<Utc>,
    ) -> Delivery {
        let Some(state) = self.state.take() else {
            return self.fault(format!(
                "{} arrived before the instance started",
                event.label()
            ));
        };
        let before = match self.def.clone_state(&state) {
            Ok(copy) => Some(copy),
            Err(e) => return self.fault(e.to_string()),
        };
        self.run(seq, before, registry, ports, now, move |def, ctx| {
            def.on_event(ctx, state, event)
        })
    }

    /// Runs a transition given `before` (a copy of the state it was given, the rollback point of
    /// a scope it opens) and applies what it decided; a fault goes to the scopes' handlers.
    fn run(
        &mut self,
        seq: Option<i64>,
        before: Option<AnyState>,
        registry: &Registry,
        ports: &dyn Fn(&str) -> bool,
        now: DateTime<Utc>,
        transition: impl FnOnce(&dyn Definition, &mut Context) -> Result<AnyNext, crate::Fault>,
    ) -> Delivery {
        let started = Instant::now();
        self.last_active = started;
        let span = tracing::debug_span!("transition", instance.id = %self.id,
            orchestration.name = self.def.name(), orchestration.version = self.def.version(),
            step = %self.saved_step, message.seq = seq);
        let _entered = span.enter();
        let compensating = self.compensating_now.take();
        self.reached_step = None;
        let mut ctx = Context::new(self.id, now);
        if let Some(started_by) = self.starting.take() {
            ctx = ctx.starting(started_by);
        }
        let def = self.def.clone();
        let outcome = catch_unwind(AssertUnwindSafe(|| transition(def.as_ref(), &mut ctx)));
        let mut counted = TransitionOutcome::Ok;
        let delivery = match outcome {
            Ok(Ok(next)) => self.accept(
                seq,
                next,
                ctx.into_effects(),
                before,
                compensating,
                registry,
                ports,
            ),
            Ok(Err(error)) => match self.handle_fault(error, before, now) {
                Handled::Yes {
                    next,
                    effects,
                    before,
                    detail,
                } => {
                    self.note(detail);
                    let delivery =
                        self.accept(seq, next, effects, before, compensating, registry, ports);
                    match delivery {
                        Delivery::Ran(reason) => Delivery::Ran(Some(
                            reason.map_or(Reason::ScopeEnd, |r| most_telling(r, Reason::ScopeEnd)),
                        )),
                        other => other,
                    }
                }
                Handled::No(text) => {
                    counted = TransitionOutcome::Fault;
                    self.unhandled(seq, text)
                }
                Handled::Panicked(text) => {
                    counted = TransitionOutcome::Panic;
                    self.panicked(seq, text)
                }
            },
            Err(panic) => {
                counted = TransitionOutcome::Panic;
                self.note_reached(before.as_ref());
                self.panicked(seq, format!("transition panicked: {}", panic_text(&panic)))
            }
        };
        if let Some(metrics) = &self.metrics {
            metrics.transition(self.def.name(), counted, started.elapsed());
        }
        if let (Delivery::Faulted(_), Some(seq)) = (&delivery, seq) {
            self.failed.push(seq);
        }
        delivery
    }

    /// Notes the step of `state`, the state the failing transition was given (the one the
    /// transition before it reached), for the fault point to show. Runs on faults only: it
    /// encodes the state.
    fn note_reached(&mut self, state: Option<&AnyState>) {
        self.reached_step = state
            .and_then(|s| self.def.encode_state(s).ok())
            .map(|bytes| codec::step_name(&bytes, "state"));
    }

    /// Offers a fault to the open scopes' handlers, innermost first. Each scope it passes
    /// ends; an atomic one rolls the instance back to where it began.
    fn handle_fault(
        &mut self,
        mut error: crate::Fault,
        mut before: Option<AnyState>,
        now: DateTime<Utc>,
    ) -> Handled {
        self.note_reached(before.as_ref());
        let mut details = Vec::new();
        loop {
            let Some(scope) = self.waits.scopes.open.pop() else {
                details.push(format!("transition failed: {error}"));
                return Handled::No(details.join("; "));
            };
            let atomic = scope.kind == ScopeKind::Atomic;
            let state = match (atomic, self.atomic.take()) {
                (true, Some(start)) => {
                    self.waits = start.waits;
                    self.outbox.truncate(start.outbox);
                    self.children.truncate(start.children);
                    self.messages.truncate(start.messages);
                    details.push(format!(
                        "atomic scope {} rolled back: {error}; its handler ran",
                        scope.name
                    ));
                    start.state
                }
                _ => {
                    details.push(format!(
                        "scope {} failed: {error}; its handler ran",
                        scope.name
                    ));
                    before.take()
                }
            };
            let Some(state) = state else {
                details.push("no state to hand to the handler (the fault came before the start transition ended)".to_owned());
                return Handled::No(details.join("; "));
            };
            let copy = match self.def.clone_state(&state) {
                Ok(copy) => copy,
                Err(e) => return Handled::No(e.to_string()),
            };
            let mut ctx = Context::new(self.id, now);
            let fault = ScopeFault {
                scope: scope.name,
                atomic,
                error,
            };
            let def = self.def.clone();
            match catch_unwind(AssertUnwindSafe(|| def.on_fault(&mut ctx, state, fault))) {
                Ok(Ok(next)) => {
                    return Handled::Yes {
                        next,
                        effects: ctx.into_effects(),
                        before: Some(copy),
                        detail: details.join("; "),
                    }
                }
                Ok(Err(raised)) => {
                    error = raised;
                    before = Some(copy);
                }
                Err(panic) => {
                    return Handled::Panicked(format!(
                        "exception handler panicked: {}",
                        panic_text(&panic)
                    ))
                }
            }
        }
    }

    /// A fault no scope handled: suspend, or end as `failed`, as the orchestration declares.
    fn unhandled(&mut self, seq: Option<i64>, text: String) -> Delivery {
        match self.def.on_unhandled_fault() {
            OnFault::Suspend => self.fault(text),
            OnFault::Fail => {
                if let Some(seq) = seq {
                    self.consumed.push(seq);
                }
                self.dirty = true;
                self.outbox.clear();
                self.children.clear();
                self.messages.clear();
                self.atomic = None;
                self.ending = Ending::Failed(text);
                Delivery::Ran(Some(Reason::Complete))
            }
        }
    }

    fn panicked(&mut self, seq: Option<i64>, text: String) -> Delivery {
        match seq {
            Some(seq) => Delivery::Panicked {
                error: FaultText(text),
                seq,
            },
            None => self.fault(text),
        }
    }

    fn note(&mut self, detail: String) {
        self.detail = Some(match self.detail.take() {
            Some(earlier) => format!("{earlier}; {detail}"),
            None => detail,
        });
    }

    /// Applies what a transition (or a handler) decided: its effects, then its next state.
    #[allow(clippy::too_many_arguments)]
    fn accept(
        &mut self,
        seq: Option<i64>,
        next: AnyNext,
        effects: Vec<Effect>,
        before: Option<AnyState>,
        compensating: Option<String>,
        registry: &Registry,
        ports: &dyn Fn(&str) -> bool,
    ) -> Delivery {
        if let Some(seq) = seq {
            self.consumed.push(seq);
        }
        self.dirty = true;
        let mut reason: Option<Reason> = None;
        let opens_atomic = effects.iter().any(|e| {
            matches!(
                e,
                Effect::BeginScope {
                    kind: ScopeKind::Atomic,
                    ..
                }
            )
        });
        let atomic_here = opens_atomic || self.in_atomic_scope();
        let mut atomic_start = opens_atomic.then(|| self.atomic_start(before));
        self.last_effects = effects.clone();
        for effect in effects {
            match self.apply_effect(effect, atomic_here, &mut atomic_start, registry, ports) {
                Ok(raised) => raise(&mut reason, raised),
                Err(text) => return self.fault(text),
            }
        }
        if let Some(name) = compensating {
            raise(&mut reason, Some(self.compensated(&name)));
        }
        raise(&mut reason, self.take_next(next));
        // An atomic scope never spans a persistence point: whatever this transition did waits for
        // the scope's end (or is dropped with it), unless the instance ended.
        if self.in_atomic_scope() && reason != Some(Reason::Complete) {
            reason = None;
        }
        Delivery::Ran(reason)
    }

    /// Where an atomic scope opened now rolls back to: `before`, and the instance as it is.
    fn atomic_start(&self, before: Option<AnyState>) -> AtomicStart {
        AtomicStart {
            state: before,
            waits: self.waits.clone(),
            outbox: self.outbox.len(),
            children: self.children.len(),
            messages: self.messages.len(),
        }
    }

    /// Applies one effect. Returns the point it makes due, if any, or why it faults the
    /// instance (`atomic_here`: the transition runs inside an atomic scope, or opens one that
    /// rolls back to `atomic_start`).
    fn apply_effect(
        &mut self,
        effect: Effect,
        atomic_here: bool,
        atomic_start: &mut Option<AtomicStart>,
        registry: &Registry,
        ports: &dyn Fn(&str) -> bool,
    ) -> Result<Option<Reason>, String> {
        match effect {
            Effect::Send {
                id,
                port,
                message_type,
                body,
                expects_reply,
            } => {
                let row = OutboxRow {
                    id,
                    instance_id: self.id,
                    port,
                    message_type,
                    body,
                    expects_reply,
                    attempts: 0,
                };
                self.send(row, atomic_here, ports)?;
                Ok(Some(Reason::Send))
            }
            Effect::Start {
                child,
                orchestration,
                input,
            } => {
                self.start_child(child, orchestration, input, registry)?;
                Ok(Some(Reason::Start))
            }
            Effect::Receive(receive) => {
                self.receive(receive);
                Ok(None)
            }
            Effect::Delay(delay) => {
                self.waits.delays.retain(|d| d.name != delay.name);
                self.waits.delays.push(delay);
                Ok(None)
            }
            Effect::CancelWaits => {
                self.waits.cancel();
                Ok(None)
            }
            Effect::Suspend { reason: why } => {
                if atomic_here {
                    return Err(format!(
                        "suspend inside an atomic scope ({why}): end the scope first"
                    ));
                }
                self.ending = Ending::Suspended(why);
                Ok(None)
            }
            Effect::BeginScope { name, kind } => {
                self.begin_scope(name, kind, atomic_start)?;
                Ok(None)
            }
            Effect::EndScope { compensation } => {
                self.end_scope(compensation)?;
                Ok(Some(Reason::ScopeEnd))
            }
            Effect::Compensate { scope } => {
                self.messages
                    .extend(self.waits.scopes.request_compensation(scope, self.id));
                Ok(Some(Reason::Compensate))
            }
        }
    }

    /// A send: to the outbox, and for a request, a wait for its reply.
    fn send(
        &mut self,
        row: OutboxRow,
        atomic_here: bool,
        ports: &dyn Fn(&str) -> bool,
    ) -> Result<(), String> {
        let port = &row.port;
        if !ports(port) {
            return Err(format!(
                "send port {port:?} is not configured in this host; add it to the host's ports and resume"
            ));
        }
        if row.expects_reply {
            if atomic_here {
                return Err(format!(
                    "request to port {port:?} inside an atomic scope: its reply could never arrive \
                     before the scope commits; send one-way, or use a long-running scope"
                ));
            }
            self.waits.requests.push((row.id.clone(), port.clone()));
        }
        self.outbox.push(row);
        Ok(())
    }

    /// A child start, of the newest registered version of `orchestration`, and a wait for its end.
    fn start_child(
        &mut self,
        child: Uuid,
        orchestration: String,
        input: serde_json::Value,
        registry: &Registry,
    ) -> Result<(), String> {
        let Some(def) = registry.current(&orchestration) else {
            return Err(format!(
                "cannot start orchestration {orchestration:?}: it is not registered in this host"
            ));
        };
        self.waits.children.push(child);
        self.children.push(NewInstance {
            id: child,
            orchestration,
            version: def.version(),
            parent: Some(self.id),
            input,
        });
        Ok(())
    }

    /// A wait for a message, unless the instance waits for it already. A receive it waited for
    /// at its last point (or a convoy's) keeps its subscription id; a new one gets a new id.
    fn receive(&mut self, receive: Receive) {
        if self.waits.receives.iter().any(|(_, r)| *r == receive) {
            return;
        }
        let id = self
            .saved_waits
            .receives
            .iter()
            .find(|(_, r)| *r == receive)
            .map(|(id, _)| *id)
            .or_else(|| self.convoy_id(&receive))
            .unwrap_or_else(Uuid::now_v7);
        self.waits.receives.push((id, receive));
    }

    /// Opens a scope; an atomic one keeps where it rolls back to. Atomic scopes do not nest.
    fn begin_scope(
        &mut self,
        name: String,
        kind: ScopeKind,
        atomic_start: &mut Option<AtomicStart>,
    ) -> Result<(), String> {
        if let Some(outer) = self.innermost_atomic() {
            return Err(format!(
                "scope {name:?} cannot begin inside atomic scope {outer:?}: atomic scopes do not nest"
            ));
        }
        self.waits.scopes.begin(name, kind);
        if kind == ScopeKind::Atomic {
            self.atomic = atomic_start.take();
        }
        Ok(())
    }

    /// Ends the innermost open scope, recording `compensation` with it.
    fn end_scope(&mut self, compensation: serde_json::Value) -> Result<(), String> {
        let Some(ended) = self.waits.scopes.end(compensation) else {
            return Err("end_scope with no scope open".to_owned());
        };
        let detail = if ended.kind == ScopeKind::Atomic {
            self.atomic = None;
            format!("atomic scope {} committed", ended.name)
        } else {
            format!("scope {} completed", ended.name)
        };
        self.note(detail);
        Ok(())
    }

    /// A compensation handler ran for scope `name`: on to the next scope to compensate.
    fn compensated(&mut self, name: &str) -> Reason {
        self.messages.extend(self.waits.scopes.compensated(self.id));
        self.note(format!("scope {name} compensated"));
        Reason::Compensate
    }

    /// Takes the transition's decision: the next state, or the instance's end.
    fn take_next(&mut self, next: AnyNext) -> Option<Reason> {
        match next {
            AnyNext::Continue(state) => {
                self.state = Some(state);
                matches!(self.ending, Ending::Suspended(_)).then_some(Reason::Suspend)
            }
            AnyNext::Complete(output) => {
                self.ending = Ending::Completed(output);
                Some(Reason::Complete)
            }
            AnyNext::Fail(why) => {
                self.ending = Ending::Failed(why);
                Some(Reason::Complete)
            }
        }
    }

    /// Whether the innermost open scope is atomic (its sends are buffered; it is never
    /// dehydrated).
    pub fn in_atomic_scope(&self) -> bool {
        self.innermost_atomic().is_some()
    }

    fn innermost_atomic(&self) -> Option<&str> {
        self.waits.scopes.innermost_atomic()
    }

    /// The effects the last transition asked for.
    pub fn last_effects(&self) -> &[Effect] {
        &self.last_effects
    }

    /// The current state, if it is of type `S` (the test kit reads it).
    pub fn state<S: 'static>(&self) -> Option<&S> {
        self.state.as_ref().and_then(|s| s.downcast_ref::<S>())
    }

    /// What it waits for now.
    pub fn waits(&self) -> &Waits {
        &self.waits
    }

    /// Receives declared since the last persistence point whose subscriptions are not yet in the
    /// database.
    pub fn unwritten_receives(&self) -> Vec<SubscriptionRow> {
        self.waits
            .receives
            .iter()
            .filter(|(id, _)| !self.written_receives.contains(id))
            .map(|(id, r)| subscription_row(*id, r))
            .collect()
    }

    /// Records that these subscriptions are in the database.
    pub fn receives_written(&mut self, rows: &[SubscriptionRow]) {
        self.written_receives.extend(rows.iter().map(|r| r.id));
    }

    /// Messages held back because they matched no wait; they are offered again after a
    /// transition, since the waits may have changed.
    pub fn take_held(&mut self) -> Vec<StoredMessage> {
        std::mem::take(&mut self.held)
    }

    /// Records that delivering message `seq` failed the instance: the suspension that follows
    /// keeps its delivery count (poison protection).
    pub fn mark_failed(&mut self, seq: i64) {
        self.failed.push(seq);
    }

    fn fault(&mut self, text: String) -> Delivery {
        Delivery::Faulted(FaultText(text))
    }
}

fn subscription_row(id: Uuid, r: &Receive) -> SubscriptionRow {
    SubscriptionRow {
        id,
        message_type: r.message_type.clone(),
        correlation: r.correlation.clone(),
        earlier: r.earlier,
    }
}

fn to_message(msg: &StoredMessage) -> Message {
    Message {
        id: msg.id.clone(),
        message_type: msg.message_type.clone(),
        properties: msg.properties.clone(),
        body: msg.body.clone(),
        published_at: msg.published_at,
    }
}

fn text_field(body: &serde_json::Value, key: &str) -> String {
    body.get(key)
        .and_then(|v| v.as_str())
        .unwrap_or_default()
        .to_owned()
}

fn panic_text(panic: &Box<dyn std::any::Any + Send>) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic with no message".to_owned())
}

/// What the scopes' handlers made of a fault.
enum Handled {
    /// A handler took it: apply what it decided.
    Yes {
        next: AnyNext,
        effects: Vec<Effect>,
        before: Option<AnyState>,
        detail: String,
    },
    /// No scope handled it; the text says what happened on the way out.
    No(String),
    /// A handler panicked.
    Panicked(String),
}

/// Raises the reason for the point due to `raised`, if it is more telling.
fn raise(reason: &mut Option<Reason>, raised: Option<Reason>) {
    if let Some(r) = raised {
        *reason = Some(reason.map_or(r, |old| most_telling(old, r)));
    }
}

/// Of two reasons for one point, the one history should show.
fn most_telling(a: Reason, b: Reason) -> Reason {
    fn rank(r: Reason) -> u8 {
        match r {
            Reason::Complete => 6,
            Reason::Suspend => 5,
            Reason::Compensate => 4,
            Reason::ScopeEnd => 3,
            Reason::Send => 2,
            Reason::Start => 1,
            Reason::Dehydrate | Reason::Shutdown | Reason::Upgrade => 0,
        }
    }
    if rank(b) > rank(a) {
        b
    } else {
        a
    }
}
