//! Retention and the store's side of monitoring: deleting ended instances with everything that
//! belonged to them, reading the gauges an operator watches, and the database's size.
//!
//! An ended instance (completed, failed, terminated) is *purgeable* once it ended before a
//! cut-off and nothing still depends on it: no send of it waits in the outbox (pending, held or
//! given up: G2 keeps delivering those), no message is routed to it unconsumed (housekeeping
//! turns those into zombies first), and no child of it still runs (the child's end is reported
//! to it). Purging one deletes its row, its history, its messages (consumed, zombies), its sends
//! (delivered, dead), its subscriptions and timers, and its finished `control` rows, in one
//! transaction: an instance is there whole or gone whole. Dead letters stay: they are the
//! operator's record, purged with `cairn dead-letters purge`. Nothing of an instance that is not
//! ended is ever touched.
//!
//! A purge goes in two steps so that an archive can be written between them:
//! [`Retention::purgeable`] reads a bounded batch (with its history, for the archive), and
//! [`Retention::purge`] deletes those of them that are still purgeable, checking again inside its
//! transaction. On PostgreSQL one host at a time deletes (a transaction-scoped advisory lock;
//! another host's batch is skipped, not waited for); SQLite has one host.

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde::Serialize;
use uuid::Uuid;

use super::StoreResult;

/// The gauges read from the store for the metrics (`cairn_instances`,
/// `cairn_messages_unrouted`, `cairn_dead_letters`, `cairn_outbox_*`).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StoreGauges {
    /// Instances by `(orchestration, status)`.
    pub instances: Vec<(String, String, i64)>,
    /// Messages that matched no subscription.
    pub unrouted: i64,
    /// Rows in `dead_letters`.
    pub dead_letters: i64,
    /// Sends waiting, by port.
    pub outbox: Vec<OutboxGauge>,
}

/// The sends waiting for one port.
#[derive(Debug, Clone, PartialEq)]
pub struct OutboxGauge {
    /// The port.
    pub port: String,
    /// Sends pending, held or given up.
    pub pending: i64,
    /// Age of the oldest of them, in seconds.
    pub oldest_seconds: f64,
}

/// Which ended instances a purge takes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PurgeFilter {
    /// Only instances that ended before this time (`instances.updated_at`).
    pub ended_before: DateTime<Utc>,
    /// Only instances of this orchestration.
    pub orchestration: Option<String>,
    /// At most this many per batch.
    pub limit: u32,
}

/// One history row of a purged instance, as archived.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ArchivedPoint {
    /// Its number.
    pub seq: i64,
    /// The persistence point's reason.
    pub reason: String,
    /// The step after it.
    pub step: String,
    /// The status after it.
    pub status: String,
    /// When.
    pub at: DateTime<Utc>,
    /// The host that wrote it.
    pub host: String,
    /// The lease epoch it was written under.
    pub epoch: i64,
    /// What else happened (a fault handled, a scope compensated).
    pub detail: Option<String>,
}

/// An ended instance a purge may delete: what the archive keeps of it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct EndedInstance {
    /// The instance id.
    pub id: Uuid,
    /// Its orchestration.
    pub orchestration: String,
    /// Its version.
    pub version: i64,
    /// `completed`, `failed` or `terminated`.
    pub status: String,
    /// Its last step.
    pub step: String,
    /// When it started.
    pub created_at: DateTime<Utc>,
    /// When it ended.
    pub ended_at: DateTime<Utc>,
    /// Why it failed or was terminated.
    pub last_error: Option<String>,
    /// Its output, as JSON text.
    pub output: Option<String>,
    /// The instance that started it.
    pub parent_id: Option<Uuid>,
    /// Its history, in order (empty unless asked for).
    pub history: Vec<ArchivedPoint>,
}

/// What a purge deleted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Purged {
    /// Instances deleted.
    pub instances: u64,
    /// Rows deleted in all tables, the instances' own included.
    pub rows: u64,
    /// Whether another host held the turn, so nothing was deleted (PostgreSQL).
    pub not_our_turn: bool,
}

/// Retention and the store's monitoring reads; see the module docs.
#[async_trait]
pub trait Retention: Send + Sync {
    /// Counts for the gauges, read at `now`.
    async fn gauges(&self, now: DateTime<Utc>) -> StoreResult<StoreGauges>;

    /// Up to `filter.limit` purgeable instances, oldest end first, with their history when
    /// `with_history` (for an archive). Reads only.
    async fn purgeable(
        &self,
        filter: &PurgeFilter,
        with_history: bool,
    ) -> StoreResult<Vec<EndedInstance>>;

    /// Deletes the instances `ids` that are still purgeable under `filter` (checked again in
    /// the transaction), with everything that belonged to them, in one transaction. Returns what
    /// it deleted; on PostgreSQL, nothing when another host is purging (`not_our_turn`).
    async fn purge(&self, ids: &[Uuid], filter: &PurgeFilter) -> StoreResult<Purged>;

    /// Gives freed space back to the file system where the backend can do it in small steps
    /// (SQLite with `auto_vacuum = INCREMENTAL`: at most `pages` pages, once more than an eighth
    /// of the file is free); nothing on PostgreSQL, whose autovacuum reuses it.
    async fn reclaim_space(&self, pages: u32) -> StoreResult<()>;

    /// Whether a host can work on this database, for `/readyz`: it answers, its schema is this
    /// build's ([`Maintenance::check_schema`](super::Maintenance::check_schema)), and it takes a
    /// write (an empty write transaction begun and committed: on SQLite, no other process
    /// holds the write lock).
    ///
    /// # Errors
    /// Why not.
    async fn ready(&self) -> StoreResult<()>;

    /// How many instances are purgeable under `filter` (its `limit` ignored), for a dry run.
    async fn count_purgeable(&self, filter: &PurgeFilter) -> StoreResult<u64>;

    /// Which of `ids` another host than `host` holds under a lease expired at `now`: the
    /// instances `host` takes over if it acquires them (`cairn_lease_takeovers_total`). Always
    /// none on SQLite, where one host runs and a start releases what the last one held.
    async fn expired_elsewhere(
        &self,
        host: &str,
        ids: &[Uuid],
        now: DateTime<Utc>,
    ) -> StoreResult<Vec<Uuid>>;

    /// The database's size in bytes (SQLite: the file and its write-ahead log; PostgreSQL:
    /// `pg_database_size`).
    async fn database_bytes(&self) -> StoreResult<u64>;
}
