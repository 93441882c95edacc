//! Plain data that crosses the store boundary: rows read and points written.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::orchestration::Correlation;

macro_rules! word_enum {
    ($(#[$meta:meta])* $name:ident { $($(#[$vmeta:meta])* $variant:ident => $word:literal),+ $(,)? }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
        #[serde(rename_all = "snake_case")]
        pub enum $name { $($(#[$vmeta])* $variant),+ }

        impl $name {
            /// Every value, in declaration order.
            pub const ALL: &'static [$name] = &[$($name::$variant),+];

            /// The word stored in the database.
            pub fn as_str(self) -> &'static str {
                match self { $($name::$variant => $word),+ }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.pad(self.as_str())
            }
        }

        impl FromStr for $name {
            type Err = String;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                match s {
                    $($word => Ok($name::$variant),)+
                    other => Err(format!(
                        "unknown {} {other:?}; expected one of: {}",
                        stringify!($name),
                        [$($word),+].join(", ")
                    )),
                }
            }
        }
    };
}

word_enum! {
    /// `instances.status`.
    InstanceStatus {
        /// Held in memory by a host, or ready to be picked up.
        Running => "running",
        /// Saved and out of memory, waiting for a message or a timer.
        Dehydrated => "dehydrated",
        /// Stopped until an operator resumes or terminates it.
        Suspended => "suspended",
        /// Finished with an output.
        Completed => "completed",
        /// Finished with a business failure.
        Failed => "failed",
        /// Ended by an operator.
        Terminated => "terminated",
    }
}

impl InstanceStatus {
    /// Completed, failed or terminated.
    pub fn is_final(self) -> bool {
        matches!(
            self,
            InstanceStatus::Completed | InstanceStatus::Failed | InstanceStatus::Terminated
        )
    }
}

word_enum! {
    /// `history.reason`: why a persistence point was written.
    Reason {
        /// A transition sent a message.
        Send => "send",
        /// A transition started another orchestration.
        Start => "start",
        /// A transactional scope ended (committed, completed, or handled its fault).
        ScopeEnd => "scope_end",
        /// A completed scope was compensated.
        Compensate => "compensate",
        /// The instance was suspended.
        Suspend => "suspend",
        /// The instance was idle and saved out of memory.
        Dehydrate => "dehydrate",
        /// The host was asked to stop.
        Shutdown => "shutdown",
        /// The instance completed, failed or was terminated.
        Complete => "complete",
        /// `cairn upgrade` moved the instance to another version of its orchestration.
        Upgrade => "upgrade",
    }
}

word_enum! {
    /// `messages.kind`: how a message reaches an instance.
    MessageKind {
        /// Published, routed by subscription.
        Published => "published",
        /// The input of a new instance.
        Start => "start",
        /// A send port's reply to a request.
        Reply => "reply",
        /// A child instance completed.
        ChildCompleted => "child_completed",
        /// A child instance failed or was terminated.
        ChildFailed => "child_failed",
        /// A send was dead-lettered.
        SendFailed => "send_failed",
        /// The engine asks the instance to compensate a completed scope.
        Compensate => "compensate",
    }
}

word_enum! {
    /// `messages.status`.
    MessageStatus {
        /// No subscription matched (yet); `reason` says why.
        Unrouted => "unrouted",
        /// Addressed to an instance and waiting to be consumed.
        Routed => "routed",
        /// Consumed by a committed persistence point.
        Consumed => "consumed",
        /// Routed to an instance that ended before consuming it; kept, with the instance named.
        Zombie => "zombie",
        /// Unrouted for longer than the time to live; a copy is in `dead_letters`.
        Dead => "dead",
    }
}

/// The message an `inbox` row stands for: its own `message_id`, or `inbox-<id>`; the body and
/// properties parsed from JSON (property values that are not text are written as text).
///
/// # Errors
/// Why the row cannot be read, for its dead letter.
pub fn inbox_message(
    row_id: i64,
    message_id: Option<String>,
    message_type: String,
    properties: &str,
    body: &str,
) -> Result<NewMessage, String> {
    let body: serde_json::Value = serde_json::from_str(body)
        .map_err(|e| format!("inbox row {row_id}: the body is not JSON: {e}"))?;
    let given: BTreeMap<String, serde_json::Value> = serde_json::from_str(properties)
        .map_err(|e| format!("inbox row {row_id}: properties are not a JSON object: {e}"))?;
    Ok(NewMessage::published(
        message_id.unwrap_or_else(|| format!("inbox-{row_id}")),
        message_type,
        body,
        text_properties(given),
    ))
}

/// A dead letter's body as shown: its JSON, or, for a body that never was JSON (an `inbox` row
/// dead-lettered because it was not), its text as a JSON string.
pub(crate) fn dead_letter_body(text: &str) -> serde_json::Value {
    serde_json::from_str(text).unwrap_or_else(|_| serde_json::Value::String(text.to_owned()))
}

/// Routing properties given as JSON values (an inbox row, a file or HTTP envelope), as text:
/// strings as they are, anything else as its JSON text.
pub fn text_properties(given: BTreeMap<String, serde_json::Value>) -> BTreeMap<String, String> {
    given
        .into_iter()
        .map(|(k, v)| match v {
            serde_json::Value::String(s) => (k, s),
            other => (k, other.to_string()),
        })
        .collect()
}

/// What a housekeeping pass did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Housekeeping {
    /// Messages marked `zombie`.
    pub zombies: u64,
    /// Unrouted messages dead-lettered after their time to live.
    pub expired: u64,
}

word_enum! {
    /// `outbox.status`.
    OutboxStatus {
        /// Waiting for (another) delivery attempt.
        Pending => "pending",
        /// Delivered.
        Delivered => "delivered",
        /// Given up on, and moved to `dead_letters`.
        Dead => "dead",
        /// An ordered port stopped on it after its retries; waits for an operator.
        Held => "held",
        /// An operator asked that it be dead-lettered; a running host does it.
        GiveUp => "give_up",
    }
}

/// An operator's action on an instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ControlAction {
    /// Stop the instance at its last persistence point.
    Suspend {
        /// Shown in `last_error`.
        reason: String,
    },
    /// Let a suspended instance run again from its last persistence point. A suspension marked
    /// not resumable (state this build could not read) needs `force`.
    Resume {
        /// Resume even a suspension marked not resumable.
        force: bool,
    },
    /// End the instance, cancelling its waits.
    Terminate {
        /// Shown in `last_error`.
        reason: String,
    },
}

/// A message to publish.
#[derive(Debug, Clone, PartialEq)]
pub struct NewMessage {
    /// Unique id; publishing the same id again stores nothing (G5).
    pub id: String,
    /// The message type.
    pub message_type: String,
    /// How it reaches an instance.
    pub kind: MessageKind,
    /// Routing properties.
    pub properties: BTreeMap<String, String>,
    /// The body, as JSON.
    pub body: serde_json::Value,
    /// Addressed to this instance rather than routed by subscription.
    pub target: Option<Uuid>,
}

/// The longest top-level body field (its name, or its value as text) that is promoted to a
/// property, in bytes: longer ones stay in the body only, so that a large body is stored once.
/// A routing value is short; a publisher that routes on a longer one sets it as an explicit
/// property.
pub const MAX_PROMOTED_BYTES: usize = 256;

impl NewMessage {
    /// A published message, with the body's top-level scalar fields promoted to properties
    /// (explicit properties win). A field whose name or text is longer than
    /// [`MAX_PROMOTED_BYTES`] is not promoted.
    pub fn published(
        id: impl Into<String>,
        message_type: impl Into<String>,
        body: serde_json::Value,
        explicit: BTreeMap<String, String>,
    ) -> Self {
        let mut properties = BTreeMap::new();
        if let serde_json::Value::Object(fields) = &body {
            for (key, value) in fields {
                let text = match value {
                    serde_json::Value::String(s) => s.clone(),
                    serde_json::Value::Number(n) => n.to_string(),
                    serde_json::Value::Bool(b) => b.to_string(),
                    _ => continue,
                };
                if key.len() > MAX_PROMOTED_BYTES || text.len() > MAX_PROMOTED_BYTES {
                    continue;
                }
                properties.insert(key.clone(), text);
            }
        }
        properties.extend(explicit);
        Self {
            id: id.into(),
            message_type: message_type.into(),
            kind: MessageKind::Published,
            properties,
            body,
            target: None,
        }
    }

    /// A message addressed to one instance.
    pub fn to_instance(
        id: impl Into<String>,
        message_type: impl Into<String>,
        kind: MessageKind,
        body: serde_json::Value,
        target: Uuid,
    ) -> Self {
        Self {
            id: id.into(),
            message_type: message_type.into(),
            kind,
            properties: BTreeMap::new(),
            body,
            target: Some(target),
        }
    }
}

/// What became of one published message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PublishOutcome {
    /// Stored and routed to this instance (new, for an activating subscription).
    Routed(Uuid),
    /// Stored, but nothing subscribes to it yet.
    Unrouted,
    /// A message with this id was already stored; nothing was written.
    Duplicate,
    /// Stored as a zombie of this ended instance: the newest instance that waited on the
    /// message's key had ended when it arrived, and nothing else subscribes to it (a late
    /// message, docs/messaging.md#late-messages).
    Zombie(Uuid),
    /// Stored and sent to the send ports that subscribe to it (`Ports::subscribe`); no instance
    /// or activation takes it, so it is `consumed` at once.
    ToPorts,
}

impl NewMessage {
    /// The copy of this published message for `orchestration`, when the message passes the
    /// activating subscriptions of several orchestrations (publish-subscribe: one copy a
    /// subscriber, each consumed once): id [`copy_id`](Self::copy_id), addressed to `instance`,
    /// the new instance it starts (`kind` start) or the running one whose receive it matches
    /// (`kind` published).
    pub(crate) fn copy_for(
        &self,
        orchestration: &str,
        instance: Uuid,
        kind: MessageKind,
    ) -> NewMessage {
        NewMessage {
            id: self.copy_id(orchestration),
            message_type: self.message_type.clone(),
            kind,
            properties: self.properties.clone(),
            body: self.body.clone(),
            target: Some(instance),
        }
    }

    /// The id of this message's copy for `orchestration`: `<id>/<orchestration>`.
    pub(crate) fn copy_id(&self, orchestration: &str) -> String {
        format!("{}/{orchestration}", self.id)
    }
}

/// An instance to create, with its start message.
#[derive(Debug, Clone, PartialEq)]
pub struct NewInstance {
    /// The new instance's id.
    pub id: Uuid,
    /// The definition's name.
    pub orchestration: String,
    /// The definition's version.
    pub version: u32,
    /// The instance that started it, which hears of its end.
    pub parent: Option<Uuid>,
    /// The input, as JSON.
    pub input: serde_json::Value,
}

impl NewInstance {
    /// The id of this instance's start message.
    pub fn start_message_id(&self) -> String {
        format!("{}:start", self.id)
    }

    /// The type of this instance's start message.
    pub fn start_message_type(&self) -> String {
        format!("{}.start", self.orchestration)
    }
}

/// The host that runs the instances it starts itself (an eager start): the start transaction
/// leases each new instance to it and claims its start message for it.
#[derive(Debug, Clone, Copy)]
pub struct Holder<'a> {
    /// The host.
    pub host: &'a str,
    /// Until when it holds the new instances' leases (its heartbeat renews them).
    pub lease_until: DateTime<Utc>,
}

/// The epoch of an instance started held: the one an [`InstanceRecord`] acquired first has.
pub const FIRST_EPOCH: i64 = 1;

/// An instance started held by its host, ready to run: what acquiring it and claiming its start
/// message would have returned.
#[derive(Debug, Clone, PartialEq)]
pub struct HeldStart {
    /// The instance, leased to the host.
    pub record: InstanceRecord,
    /// Its start message, claimed by the host.
    pub message: StoredMessage,
}

impl HeldStart {
    /// The instances `starts` (each with its start time), their start messages stored at the
    /// `seqs` the insert returned as `(instance id, seq)` pairs.
    ///
    /// # Errors
    /// [`StoreError::Corrupt`](super::StoreError::Corrupt) if an instance's start message was
    /// not stored.
    pub fn all(
        starts: &[(&NewInstance, DateTime<Utc>)],
        seqs: impl IntoIterator<Item = (Uuid, i64)>,
    ) -> super::StoreResult<Vec<Self>> {
        let seqs: std::collections::HashMap<Uuid, i64> = seqs.into_iter().collect();
        starts
            .iter()
            .map(|(inst, at)| {
                let seq = seqs.get(&inst.id).ok_or_else(|| {
                    super::StoreError::Corrupt(format!(
                        "the start message of new instance {} was not stored",
                        inst.id
                    ))
                })?;
                Ok(Self::new(inst, *seq, *at))
            })
            .collect()
    }

    /// The instance `inst` started at `now`, its start message stored at `seq`.
    pub fn new(inst: &NewInstance, seq: i64, now: DateTime<Utc>) -> Self {
        Self {
            record: InstanceRecord::started(inst),
            message: StoredMessage {
                seq,
                id: inst.start_message_id(),
                message_type: inst.start_message_type(),
                kind: MessageKind::Start,
                properties: BTreeMap::new(),
                body: inst.input.clone(),
                instance_id: inst.id,
                subscription_id: None,
                published_at: now,
                delivery_count: 1,
            },
        }
    }
}

impl InstanceRecord {
    /// The record of `inst` just started, held under [`FIRST_EPOCH`], before its first
    /// transition.
    pub fn started(inst: &NewInstance) -> Self {
        Self {
            id: inst.id,
            orchestration: inst.orchestration.clone(),
            version: inst.version,
            status: InstanceStatus::Running,
            state: None,
            engine_state: None,
            epoch: FIRST_EPOCH,
            history_seq: 0,
            parent_id: inst.parent,
        }
    }
}

/// An instance written by its own first persistence point ([`PersistencePoint::start`]): an
/// eager start whose first transition ran before anything was stored, so that the start and
/// the point are one transaction. The instance is leased to the point's host under
/// [`FIRST_EPOCH`], and its start message is stored consumed.
#[derive(Debug, Clone, PartialEq)]
pub struct FirstPoint {
    /// The instance and its input.
    pub instance: NewInstance,
    /// Until when the point's host holds the lease (its heartbeat renews it).
    pub lease_until: DateTime<Utc>,
}

/// An activating subscription: a message type that starts instances of a definition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Activation {
    /// The message type.
    pub message_type: String,
    /// The definition's name.
    pub orchestration: String,
    /// The version new instances start on.
    pub version: u32,
    /// Convoy properties (sorted, comma-separated, `subscriptions.correlation_keys`): when set,
    /// activation also subscribes the new instance to every activating type of its definition
    /// with the activating message's values, so that later messages with the same values go to
    /// it rather than starting another instance.
    pub convoy: String,
    /// The filter on the message's properties (`subscriptions.filter`, [`crate::filter`]): a
    /// message starts an instance only if it passes. Empty: every message of the type.
    pub filter: String,
    /// For a send port's subscription: the port (then `orchestration` and `version` are not
    /// used). Every message of the type that passes `filter` is sent to it through the outbox.
    pub port: Option<String>,
}

/// The id of the subscription a convoy activation gives `instance` for `message_type`; the
/// instance's own bookkeeping uses the same id.
pub fn convoy_subscription_id(instance: Uuid, message_type: &str) -> Uuid {
    Uuid::new_v5(&instance, message_type.as_bytes())
}

/// The subscriptions a convoy's new instance takes: each of its definition's activating
/// `types`, with the convoy's `values`.
pub(crate) fn convoy_subscriptions(
    instance: Uuid,
    types: Vec<String>,
    values: &Correlation,
) -> Vec<SubscriptionRow> {
    types
        .into_iter()
        .map(|message_type| SubscriptionRow {
            id: convoy_subscription_id(instance, &message_type),
            message_type,
            correlation: values.clone(),
            earlier: false,
        })
        .collect()
}

/// A message as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredMessage {
    /// Position in the box; instances see their messages in this order.
    pub seq: i64,
    /// The message id.
    pub id: String,
    /// The message type.
    pub message_type: String,
    /// How it reaches its instance.
    pub kind: MessageKind,
    /// Routing properties.
    pub properties: BTreeMap<String, String>,
    /// The body, as JSON.
    pub body: serde_json::Value,
    /// The instance it is addressed to.
    pub instance_id: Uuid,
    /// The subscription that routed it, if any.
    pub subscription_id: Option<Uuid>,
    /// When it was published.
    pub published_at: DateTime<Utc>,
    /// How many times it has been claimed for delivery without being consumed, this claim
    /// included (poison protection).
    pub delivery_count: i64,
}

/// What a claim took, and whether there may be more: the claim was as large as the backend
/// takes at once, so the host claims again at once rather than waiting for a wake-up or its
/// poll. How a backend fills a claim (PostgreSQL takes at most half for instances the host
/// already holds) is its own business; the host goes by [`Claimed::more`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claimed<T> {
    /// The rows claimed, locked to the host.
    pub items: Vec<T>,
    /// Whether the store may hold more to claim now.
    pub more: bool,
}

impl<T> Claimed<T> {
    /// A claim of `items`; `more` when the backend's claim was full.
    pub fn new(items: Vec<T>, more: bool) -> Self {
        Self { items, more }
    }
}

impl<T> Default for Claimed<T> {
    /// Nothing claimed, nothing more.
    fn default() -> Self {
        Self::new(Vec::new(), false)
    }
}

impl<T> std::ops::Deref for Claimed<T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        &self.items
    }
}

impl<T> IntoIterator for Claimed<T> {
    type Item = T;
    type IntoIter = std::vec::IntoIter<T>;
    fn into_iter(self) -> Self::IntoIter {
        self.items.into_iter()
    }
}

/// A timer that is due.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DueTimer {
    /// The instance.
    pub instance_id: Uuid,
    /// The timer's name.
    pub name: String,
    /// When it was due.
    pub due_at: DateTime<Utc>,
}

/// An instance as loaded by [`MessageBox::acquire`](super::MessageBox::acquire).
#[derive(Debug, Clone, PartialEq)]
pub struct InstanceRecord {
    /// The instance id.
    pub id: Uuid,
    /// The definition's name.
    pub orchestration: String,
    /// The definition's version.
    pub version: u32,
    /// Its status now that it is acquired (`running`).
    pub status: InstanceStatus,
    /// The state at the last persistence point; `None` before the start transition committed.
    pub state: Option<Vec<u8>>,
    /// The engine's own bookkeeping (waits, pending requests) at the last persistence point.
    pub engine_state: Option<Vec<u8>>,
    /// The fencing epoch this host now holds.
    pub epoch: i64,
    /// The number of persistence points written so far.
    pub history_seq: i64,
    /// The instance that started it.
    pub parent_id: Option<Uuid>,
}

/// A subscription to write.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SubscriptionRow {
    /// Its id (messages routed by it name it).
    pub id: Uuid,
    /// The message type.
    pub message_type: String,
    /// The correlation values.
    pub correlation: Correlation,
    /// Whether it takes the messages of its key that arrived before it: late for an ended
    /// instance (zombies) or unrouted ([`Context::receive_earlier`](crate::Context::receive_earlier)).
    #[serde(default)]
    pub earlier: bool,
}

/// Receives an instance declared since its last persistence point, written at once so that
/// messages route to it without waiting for the next point (see [`MessageBox::subscribe`]).
///
/// [`MessageBox::subscribe`]: super::MessageBox::subscribe
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewReceives {
    /// The instance.
    pub instance_id: Uuid,
    /// The epoch the writer holds.
    pub epoch: i64,
    /// The subscriptions to add.
    pub rows: Vec<SubscriptionRow>,
}

/// A send waiting in the outbox.
#[derive(Debug, Clone, PartialEq)]
pub struct OutboxRow {
    /// The message id: the receiver's idempotency key.
    pub id: String,
    /// The instance that sent it.
    pub instance_id: Uuid,
    /// The send port.
    pub port: String,
    /// The message type.
    pub message_type: String,
    /// The body.
    pub body: serde_json::Value,
    /// Request-response.
    pub expects_reply: bool,
    /// Attempts made before this one.
    pub attempts: u32,
}

/// The outcome of one delivery attempt.
#[derive(Debug, Clone, PartialEq)]
pub enum DeliveryOutcome {
    /// The port took it; for a request, with its reply.
    Delivered {
        /// The outbox row.
        row: OutboxRow,
        /// The reply, for a request.
        reply: Option<serde_json::Value>,
        /// Whether the port's backup transport took it.
        via_backup: bool,
    },
    /// Failed; try again at `retry_at`.
    Retry {
        /// The outbox row.
        row: OutboxRow,
        /// The error.
        error: String,
        /// When to try again.
        retry_at: DateTime<Utc>,
    },
    /// Failed for good: dead-letter it and tell the instance.
    Dead {
        /// The outbox row.
        row: OutboxRow,
        /// The last error.
        error: String,
    },
    /// Failed for good on an ordered port: the row is held, and the port stops behind it until
    /// an operator resumes or dead-letters it.
    Held {
        /// The outbox row.
        row: OutboxRow,
        /// The last error.
        error: String,
    },
}

/// A row of `dead_letters`.
#[derive(Debug, Clone, PartialEq)]
pub struct DeadLetter {
    /// The message id.
    pub id: String,
    /// The instance that sent it (for a send).
    pub instance_id: Option<Uuid>,
    /// The send port (for a send).
    pub port: Option<String>,
    /// The message type.
    pub message_type: String,
    /// The body.
    pub body: serde_json::Value,
    /// Why it was dead-lettered.
    pub reason: String,
    /// Delivery attempts made.
    pub attempts: u32,
    /// When.
    pub dead_at: DateTime<Utc>,
}

impl OutboxRow {
    /// The id of the reply message to a request (deduplicated if the reply is recorded twice).
    pub fn reply_id(&self) -> String {
        format!("{}:reply", self.id)
    }
}

/// One persistence point: everything a transition (or the host) decided for one instance, written
/// in one all-or-nothing, fenced step. See the [`Store`](super::Store) docs.
#[derive(Debug, Clone, PartialEq)]
pub struct PersistencePoint {
    /// The instance.
    pub instance_id: Uuid,
    /// The epoch the writer holds; the point is written only if it is still current.
    pub epoch: i64,
    /// The host writing it (the lease owner).
    pub host: String,
    /// Why.
    pub reason: Reason,
    /// What happened, in words, for `history.detail` (a scope's name, a compensation).
    pub detail: Option<String>,
    /// The instance's status after it.
    pub status: InstanceStatus,
    /// For a suspension: whether it can be resumed (`false` for state this build cannot read).
    pub resumable: bool,
    /// Messages whose delivery failed the instance: released, they keep their delivery count
    /// (every other message released is given back uncounted).
    pub failed: Vec<i64>,
    /// The new state; `None` keeps the stored one (a fault suspends at the last point).
    pub state: Option<Vec<u8>>,
    /// The engine's bookkeeping; `None` keeps the stored one.
    pub engine_state: Option<Vec<u8>>,
    /// The state's variant name.
    pub step: String,
    /// Readable list of what the instance waits for.
    pub waiting_for: String,
    /// The earliest timer.
    pub next_timer_at: Option<DateTime<Utc>>,
    /// The error to show, or `None` to clear it.
    pub last_error: Option<String>,
    /// The output, on completion.
    pub output: Option<serde_json::Value>,
    /// This point's number in the instance's history.
    pub history_seq: i64,
    /// Messages consumed since the last point (by `seq`), now consumed for good.
    pub consumed: Vec<i64>,
    /// The instance's receives after this point: its subscription rows become exactly these
    /// (rows written early and no longer wanted are removed, and the messages they had routed
    /// are routed again). `None` leaves them as they are.
    pub subscriptions: Option<Vec<SubscriptionRow>>,
    /// Timers cancelled or fired, by name.
    pub cancel_timers: Vec<String>,
    /// Timers set.
    pub set_timers: Vec<(String, DateTime<Utc>)>,
    /// Sends, locked to `host` for immediate delivery after commit.
    pub outbox: Vec<OutboxRow>,
    /// Requests whose replies the instance took in memory (handed over by the dispatcher):
    /// marked delivered with this point.
    pub delivered: Vec<String>,
    /// Messages to publish with the point (a child's end, addressed to its parent).
    pub messages: Vec<NewMessage>,
    /// Children to start.
    pub children: Vec<NewInstance>,
    /// Give up the lease (the instance leaves this host's memory).
    pub release: bool,
    /// When.
    pub at: DateTime<Utc>,
    /// Until when the sends stay locked to `host`.
    pub outbox_lock_until: DateTime<Utc>,
    /// For an instance's first point written with its start: the instance, created by the
    /// point (it is not stored before). `None` for every other point.
    pub start: Option<Box<FirstPoint>>,
}

impl PersistencePoint {
    /// Whether committing it may leave work in the store for a host to claim: messages
    /// published with it (a child's end), children started, subscriptions written (they route
    /// the unrouted messages they match), messages given back (released with a failure, or with
    /// the instance saved out of memory). A point that only sends, consumes and marks replies
    /// delivered leaves nothing to claim. Timers are followed apart, by their due time.
    pub(crate) fn makes_claimable_work(&self) -> bool {
        !self.messages.is_empty()
            || !self.children.is_empty()
            || !self.failed.is_empty()
            || self.subscriptions.as_ref().is_some_and(|s| !s.is_empty())
            || (self.release && !self.status.is_final())
    }

    /// Whether it writes only the parts every point has (its instance row, consumed messages,
    /// sends, replies taken, history, a release): no children, timers or messages, which each
    /// take statements of their own, and no subscription set but an empty one (an instance's
    /// first point gives one), which changes nothing where none is stored: a store that writes
    /// such a point in one round trip checks that, and otherwise writes it in a transaction.
    pub(crate) fn writes_only_common_parts(&self) -> bool {
        self.subscriptions.as_ref().is_none_or(Vec::is_empty)
            && self.children.is_empty()
            && self.cancel_timers.is_empty()
            && self.set_timers.is_empty()
            && self.messages.is_empty()
    }
}

/// A timer of an instance: (instance, name).
pub(crate) type TimerName<'a> = (Uuid, &'a str);

/// A timer of an instance and when it is due: (instance, name, due).
pub(crate) type TimerDue<'a> = (Uuid, &'a str, DateTime<Utc>);

/// The timers a group of points cancels (or fired) and sets: (instance, name) to delete, then
/// (instance, name, due) to write, one per timer (a point's last due time for it wins). A point
/// that re-arms a timer it fired has its name in both: deletes go first.
pub(crate) fn timer_writes<'a>(
    points: &[&'a PersistencePoint],
) -> (Vec<TimerName<'a>>, Vec<TimerDue<'a>>) {
    let cancelled = points
        .iter()
        .flat_map(|p| p.cancel_timers.iter().map(|n| (p.instance_id, n.as_str())))
        .collect();
    let set: std::collections::BTreeMap<(Uuid, &str), DateTime<Utc>> = points
        .iter()
        .flat_map(|p| {
            p.set_timers
                .iter()
                .map(|(n, at)| ((p.instance_id, n.as_str()), *at))
        })
        .collect();
    let set = set.into_iter().map(|((id, n), at)| (id, n, at)).collect();
    (cancelled, set)
}

/// A subscription row to write for an instance: (instance, row, when).
pub(crate) type NewSubscription<'a> = (Uuid, &'a SubscriptionRow, DateTime<Utc>);

/// Of `receives` (declared between points), the rows of those whose writer still holds the
/// instance (`held`), written `at`, and each receive's outcome, in order.
pub(crate) fn held_receives<'a>(
    receives: &'a [NewReceives],
    held: &std::collections::HashSet<Uuid>,
    at: DateTime<Utc>,
) -> (Vec<NewSubscription<'a>>, Vec<CommitOutcome>) {
    let rows = receives
        .iter()
        .filter(|r| held.contains(&r.instance_id))
        .flat_map(|r| r.rows.iter().map(move |sub| (r.instance_id, sub, at)))
        .collect();
    let outcomes = receives
        .iter()
        .map(|r| {
            if held.contains(&r.instance_id) {
                CommitOutcome::Committed
            } else {
                CommitOutcome::Fenced
            }
        })
        .collect();
    (rows, outcomes)
}

/// The subscriptions of the points that committed (`outcomes` in the order of `points`), with
/// their instances: what a commit's late-message adoption looks at.
pub(crate) fn committed_subscriptions<'p>(
    points: &'p [PersistencePoint],
    outcomes: &'p [CommitOutcome],
) -> impl Iterator<Item = (Uuid, &'p SubscriptionRow)> + 'p {
    points
        .iter()
        .zip(outcomes)
        .filter(|(_, o)| **o == CommitOutcome::Committed)
        .flat_map(|(p, _)| {
            p.subscriptions
                .iter()
                .flatten()
                .map(move |s| (p.instance_id, s))
        })
}

/// How the subscription rows of points that give their set (`subscriptions: Some`) differ from
/// the rows stored for their instances.
pub(crate) struct SubscriptionChanges<'p> {
    /// Stored rows no point wants any more: (subscription id, message type).
    pub removed: Vec<(Uuid, String)>,
    /// Rows to add: (instance, row, the time of the point that wants it).
    pub added: Vec<NewSubscription<'p>>,
}

impl<'p> SubscriptionChanges<'p> {
    /// Compares the sets `points` give with `stored`: (instance id, subscription id, message
    /// type) rows read for their instances.
    pub(crate) fn between(
        points: &[&'p PersistencePoint],
        stored: impl IntoIterator<Item = (Uuid, Uuid, String)>,
    ) -> Self {
        let mut present: std::collections::HashMap<Uuid, Vec<(Uuid, String)>> =
            std::collections::HashMap::new();
        for (instance, sub, message_type) in stored {
            present
                .entry(instance)
                .or_default()
                .push((sub, message_type));
        }
        let mut changes = Self {
            removed: Vec::new(),
            added: Vec::new(),
        };
        for p in points {
            let Some(wanted) = p.subscriptions.as_deref() else {
                continue;
            };
            let present = present.remove(&p.instance_id).unwrap_or_default();
            changes.removed.extend(
                present
                    .iter()
                    .filter(|(sub, _)| !wanted.iter().any(|w| w.id == *sub))
                    .cloned(),
            );
            changes.added.extend(
                wanted
                    .iter()
                    .filter(|w| !present.iter().any(|(sub, _)| *sub == w.id))
                    .map(|w| (p.instance_id, w, p.at)),
            );
        }
        changes
    }
}

/// What [`MessageBox::commit`](super::MessageBox::commit) did with one point.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CommitOutcome {
    /// Written.
    Committed,
    /// Not written: another writer holds a newer epoch (G4).
    Fenced,
}

/// Cuts a group of points into runs of distinct instances, in order. A store fences a whole
/// run with one statement; an instance's later point is fenced against the row its earlier point
/// wrote, so it starts the next run.
pub(crate) fn distinct_runs(points: &[PersistencePoint]) -> Vec<&[PersistencePoint]> {
    let mut runs = Vec::new();
    let mut rest = points;
    while !rest.is_empty() {
        let mut seen = std::collections::HashSet::new();
        let len = rest
            .iter()
            .position(|p| !seen.insert(p.instance_id))
            .unwrap_or(rest.len());
        let (run, next) = rest.split_at(len);
        runs.push(run);
        rest = next;
    }
    runs
}

/// What became of each point of a run whose fenced update matched the instances `committed`.
pub(crate) fn run_outcomes<'a>(
    run: &'a [PersistencePoint],
    committed: &'a std::collections::HashSet<Uuid>,
) -> impl Iterator<Item = CommitOutcome> + 'a {
    run.iter().map(|p| {
        if committed.contains(&p.instance_id) {
            CommitOutcome::Committed
        } else {
            CommitOutcome::Fenced
        }
    })
}

/// One line of `cairn list`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct InstanceSummary {
    /// The instance id.
    pub id: Uuid,
    /// The definition's name.
    pub orchestration: String,
    /// The definition's version.
    pub version: u32,
    /// Its status.
    pub status: InstanceStatus,
    /// The step it is at.
    pub step: String,
    /// What it waits for.
    pub waiting_for: String,
    /// When it was last saved.
    pub updated_at: DateTime<Utc>,
    /// The last error.
    pub last_error: Option<String>,
}

/// One history row.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct HistoryRow {
    /// Its number.
    pub seq: i64,
    /// Why the point was written.
    pub reason: Reason,
    /// The step after it.
    pub step: String,
    /// The status after it.
    pub status: InstanceStatus,
    /// When.
    pub at: DateTime<Utc>,
    /// What happened, in words.
    pub detail: Option<String>,
}

/// A history row to write: one persistence point.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HistoryEntry<'a> {
    /// Its number.
    pub seq: i64,
    /// Why the point was written.
    pub reason: Reason,
    /// The step after it.
    pub step: &'a str,
    /// The status after it.
    pub status: InstanceStatus,
    /// When.
    pub at: DateTime<Utc>,
    /// The host that wrote it, or `operator`.
    pub host: &'a str,
    /// What happened, in words.
    pub detail: Option<&'a str>,
}

/// What became of one `control` row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ControlApplied {
    /// `control.id`.
    pub id: i64,
    /// The instance it named, if the row could be read.
    pub instance_id: Option<Uuid>,
    /// The instance's new status, or why the request was rejected.
    pub result: Result<InstanceStatus, String>,
}

/// Parses a `control` row's action columns.
///
/// # Errors
/// An action word other than suspend, resume or terminate.
pub fn control_action(action: &str, reason: String, force: bool) -> Result<ControlAction, String> {
    match action {
        "suspend" => Ok(ControlAction::Suspend { reason }),
        "resume" => Ok(ControlAction::Resume { force }),
        "terminate" => Ok(ControlAction::Terminate { reason }),
        other => Err(format!(
            "unknown control action {other:?}; expected suspend, resume or terminate"
        )),
    }
}

/// A row of the `control` table: an operator's request, inserted with SQL or by the CLI, that a
/// host carries out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ControlRequest {
    /// `control.id`.
    pub id: i64,
    /// The instance to act on.
    pub instance_id: Uuid,
    /// What to do.
    pub action: ControlAction,
}

/// Everything `cairn show` prints.
#[derive(Debug, Clone, PartialEq)]
pub struct InstanceDetail {
    /// The summary columns.
    pub summary: InstanceSummary,
    /// The stored state.
    pub state: Option<Vec<u8>>,
    /// The engine's bookkeeping stored with it (its waits, scopes), MessagePack.
    pub engine_state: Option<Vec<u8>>,
    /// The output.
    pub output: Option<serde_json::Value>,
    /// The next timer.
    pub next_timer_at: Option<DateTime<Utc>>,
    /// When it was created.
    pub created_at: DateTime<Utc>,
    /// Its persistence points.
    pub history: Vec<HistoryRow>,
    /// Messages addressed to it and not consumed.
    pub pending_messages: Vec<(String, String)>,
    /// Messages that arrived for it after it ended (zombies): id and type.
    pub zombies: Vec<(String, String)>,
}

/// What is left to do in the database.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Activity {
    /// Instances by status.
    pub by_status: BTreeMap<String, i64>,
    /// Routed messages not yet consumed, for instances that can run.
    pub ready_messages: i64,
    /// Outbox rows still pending.
    pub pending_sends: i64,
    /// The earliest timer of an instance that can run.
    pub next_timer_at: Option<DateTime<Utc>>,
}

impl Activity {
    /// Instances with this status.
    pub fn count(&self, status: InstanceStatus) -> i64 {
        self.by_status.get(status.as_str()).copied().unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    /// JSON-ish text: fragments of JSON, escapes (a NUL among them) and anything else.
    fn jsonish() -> impl Strategy<Value = String> {
        prop_oneof![
            any::<String>(),
            "[{}\\[\\]\":,a-z0-9 ]{0,40}",
            Just("{\"request_id\":\"r\\u0000x\"}".to_owned()),
            Just("{\"a\":\"\\ud800\"}".to_owned()),
            Just("{\"a\":1e999999}".to_owned()),
            Just("[".repeat(200)),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// Whatever an `inbox` row holds: a message or a reason naming the row, never a panic;
        /// and a message is checked for storage without a panic too.
        #[test]
        fn inbox_rows_parse_to_a_message_or_a_reason(
            id in any::<i64>(),
            message_id in proptest::option::of(any::<String>()),
            message_type in any::<String>(),
            properties in jsonish(),
            body in jsonish(),
        ) {
            match inbox_message(id, message_id, message_type, &properties, &body) {
                Ok(msg) => {
                    let _ = msg.check_storable(1024);
                }
                Err(reason) => prop_assert!(reason.contains(&format!("inbox row {id}")), "{}", reason),
            }
        }

        /// Whatever a `control` row's action, reason and force hold: an action or a reason.
        #[test]
        fn control_actions_parse_or_say_why(
            action in prop_oneof![Just("suspend".to_owned()), Just("resume".to_owned()), Just("terminate".to_owned()), any::<String>()],
            reason in any::<String>(),
            force in any::<bool>(),
        ) {
            match control_action(&action, reason, force) {
                Ok(_) => prop_assert!(["suspend", "resume", "terminate"].contains(&action.as_str())),
                Err(why) => prop_assert!(why.contains("unknown control action")),
            }
        }
    }
}
