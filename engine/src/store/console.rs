//! What the operations console reads: the rows of its pages, and [`ConsoleReads`], the read-only
//! queries behind them.
//!
//! The console (`cairn console`, `cairn host --console`; `docs/console.md`) shows an operator
//! where a million instances stand. Each query here answers from an index (migration
//! `console_indexes`) and returns at most a page of rows, so that every page stays fast however
//! many instances the database holds. Nothing here writes: the console's actions go through
//! [`OperatorVerbs`](super::OperatorVerbs), the same verbs as the command line.

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use uuid::Uuid;

use super::{InstanceStatus, InstanceSummary, StoreResult};

/// How many rows a list of the console shows at most.
pub const LIST_LIMIT: u32 = 200;

/// How many completions the overview's percentiles are taken over at most (the latest ones).
pub const DURATION_SAMPLE: u32 = 10_000;

/// How many of the latest changed instances (of every orchestration) the map reads its
/// transitions from, in their history.
pub const MAP_SAMPLE: u32 = 1_000;

/// The overview: instances by definition and status, the last hour's activity, and what waits
/// for an operator.
#[derive(Debug, Clone, Default)]
pub struct Overview {
    /// Suspended instances.
    pub suspended: i64,
    /// Persistence points per minute over the last hour (`YYYY-MM-DDTHH:MM`, count).
    pub points_per_minute: Vec<(String, i64)>,
    /// Completions per minute over the last hour.
    pub completions_per_minute: Vec<(String, i64)>,
    /// Start-to-completion times of the last hour's completions (at most [`DURATION_SAMPLE`],
    /// the latest), in milliseconds, sorted.
    pub durations_ms: Vec<i64>,
    /// Dead letters.
    pub dead_letters: i64,
    /// Messages no subscription matched yet.
    pub unrouted: i64,
    /// Messages that arrived for instances that had ended.
    pub zombies: i64,
    /// Sends an ordered port holds.
    pub held_sends: i64,
    /// Hosts that have not stopped and beat within the last two minutes.
    pub live_hosts: i64,
}

/// Instances of one definition with one status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DefinitionCount {
    /// `instances.orchestration`.
    pub orchestration: String,
    /// `instances.version`.
    pub version: u32,
    /// The status.
    pub status: InstanceStatus,
    /// How many.
    pub count: i64,
}

/// What the instance list is filtered on; every field optional.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct InstanceFilter {
    /// `instances.orchestration`.
    pub orchestration: Option<String>,
    /// `instances.version`.
    pub version: Option<u32>,
    /// The status.
    pub status: Option<InstanceStatus>,
    /// The step (`instances.step`).
    pub step: Option<String>,
    /// A correlation the instance waits on: key and value (`subscriptions.correlation` is
    /// `key=value`).
    pub correlation: Option<(String, String)>,
    /// Changed at or after.
    pub from: Option<DateTime<Utc>>,
    /// Changed before.
    pub to: Option<DateTime<Utc>>,
    /// Text its `last_error` contains (case-insensitive).
    pub error: Option<String>,
}

/// Where a page of the instance list starts: after this row (keyset pagination, newest change
/// first).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cursor {
    /// The last row's `updated_at`.
    pub updated_at: DateTime<Utc>,
    /// The last row's id.
    pub id: Uuid,
}

/// A page of instances.
#[derive(Debug, Clone, Default)]
pub struct InstancePage {
    /// The rows, newest change first.
    pub rows: Vec<InstanceSummary>,
    /// Where the next page starts, if there are more rows.
    pub next: Option<Cursor>,
}

/// What the instance page shows besides [`InstanceDetail`](super::InstanceDetail).
#[derive(Debug, Clone, Default)]
pub struct InstanceWaits {
    /// Its parent, if another instance started it.
    pub parent: Option<Uuid>,
    /// Its subscriptions: message type and correlation (`key=value`, empty for none).
    pub subscriptions: Vec<(String, String)>,
    /// Its timers: name and when due.
    pub timers: Vec<(String, DateTime<Utc>)>,
    /// The messages routed to it (consumed, waiting, zombie), oldest first.
    pub messages: Vec<MessageRow>,
    /// The sends it made, oldest first.
    pub sends: Vec<SendRow>,
    /// The instances it started.
    pub children: Vec<InstanceSummary>,
}

/// A message, as the console lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MessageRow {
    /// `messages.id`.
    pub id: String,
    /// The message type.
    pub message_type: String,
    /// `unrouted`, `routed`, `consumed`, `zombie`, `dead`.
    pub status: String,
    /// The instance it is routed to.
    pub instance_id: Option<Uuid>,
    /// Why it is unrouted or a zombie.
    pub reason: Option<String>,
    /// Its routing properties, as stored (JSON).
    pub properties: String,
    /// When it was published.
    pub published_at: DateTime<Utc>,
    /// When a persistence point consumed it.
    pub consumed_at: Option<DateTime<Utc>>,
}

/// A send in the outbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SendRow {
    /// The send's id (the receiver's idempotency key).
    pub id: String,
    /// The instance that sent it.
    pub instance_id: Uuid,
    /// The send port.
    pub port: String,
    /// The message type.
    pub message_type: String,
    /// `pending`, `delivered`, `dead`, `held`, `give_up`.
    pub status: String,
    /// Delivery attempts so far.
    pub attempts: i64,
    /// The last attempt's error.
    pub last_error: Option<String>,
    /// When it was delivered.
    pub delivered_at: Option<DateTime<Utc>>,
}

/// What the map of one orchestration version is drawn from.
#[derive(Debug, Clone, Default)]
pub struct MapData {
    /// Instances that have not ended, by step and status.
    pub by_step: Vec<(String, InstanceStatus, i64)>,
    /// Transitions seen in the latest [`MAP_SAMPLE`] persistence points: from step, to step,
    /// how many times. The first point of an instance comes from [`MAP_START`]; a final point
    /// goes to its status (`completed`, `failed`, `terminated`).
    pub transitions: Vec<(String, String, i64)>,
}

/// The map's pseudo-step an instance starts from.
pub const MAP_START: &str = "(start)";

/// A host, as the console lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostRow {
    /// `hosts.id`.
    pub id: String,
    /// Its name (machine).
    pub name: String,
    /// Its process id.
    pub pid: i64,
    /// When it started.
    pub started_at: DateTime<Utc>,
    /// Its last heartbeat.
    pub heartbeat_at: DateTime<Utc>,
    /// When it stopped, if it did.
    pub stopped_at: Option<DateTime<Utc>>,
    /// How many instances it owns now.
    pub owned: i64,
}

/// The console's read-only queries. Every backend has them; a store hands them out with
/// [`OperatorVerbs::console`](super::OperatorVerbs::console).
#[async_trait]
pub trait ConsoleReads: Send + Sync {
    /// The overview at `now`.
    async fn overview(&self, now: DateTime<Utc>) -> StoreResult<Overview>;
    /// Instance counts by orchestration, version and status: a read of a whole index (about
    /// 200 ms for a million instances), which the console caches.
    async fn definition_counts(&self) -> StoreResult<Vec<DefinitionCount>>;
    /// A page of at most `limit` instances matching `filter`, after `after`, newest change first.
    async fn instances(
        &self,
        filter: &InstanceFilter,
        after: Option<Cursor>,
        limit: u32,
    ) -> StoreResult<InstancePage>;
    /// An instance's waits, messages, sends, parent and children.
    async fn instance_waits(&self, id: Uuid) -> StoreResult<InstanceWaits>;
    /// The map of one orchestration version.
    async fn map(&self, orchestration: &str, version: u32) -> StoreResult<MapData>;
    /// The orchestration versions that can start (their activating subscriptions).
    async fn activations(&self) -> StoreResult<Vec<(String, u32)>>;
    /// Messages with this status (`unrouted` or `zombie`), newest first, at most [`LIST_LIMIT`].
    async fn messages(&self, status: &str) -> StoreResult<Vec<MessageRow>>;
    /// Sends an ordered port holds, oldest first, at most [`LIST_LIMIT`].
    async fn held_sends(&self) -> StoreResult<Vec<SendRow>>;
    /// The hosts, latest heartbeat first, at most [`LIST_LIMIT`].
    async fn hosts(&self) -> StoreResult<Vec<HostRow>>;
}
