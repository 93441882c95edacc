//! The MessageBox: the storage boundary every backend implements.
//!
//! A [`Store`] holds instances, messages, subscriptions, timers, the outbox, history and dead
//! letters. It has three sides, one trait each, split by who calls them:
//!
//! * [`MessageBox`]: the runtime. Publish and start, claims and leases, persistence points,
//!   the outbox the send ports deliver, wake-ups.
//! * [`OperatorVerbs`]: people. Control an instance, give up or resume a send, dead letters,
//!   list and show.
//! * [`Maintenance`]: keeping the store in shape. Schema, a host's start, the rows people write
//!   by hand (`control`, `inbox`), housekeeping.
//! * [`Retention`]: deleting ended instances after a retention period, and the counts the
//!   metrics' gauges show ([`retention`]).
//! * [`Versions`]: versions side by side: what each host registers, `cairn upgrade`'s reads and
//!   fenced points, `cairn versions`, the instances that need an operator ([`versions`]).
//!
//! A backend implements the five; [`Store`] comes with them. Its contract, which the
//! conformance suite (`tests/conformance.rs`) checks on every backend, is written on each method;
//! the heart of it:
//!
//! * [`MessageBox::publish`] returns only after the message is durable (G1). A message id seen
//!   before is not stored again (G5). Routing happens in the same transaction: a correlated
//!   subscription wins over an activating one; a message nothing subscribes to is kept as
//!   `unrouted`, with the reason, and routed as soon as a matching subscription is written.
//! * [`MessageBox::commit`] writes persistence points. Each point is all-or-nothing: the instance
//!   row, the consumed messages, subscription and timer changes, outbox rows, new messages,
//!   children and the history row are written together or not at all. Each point is fenced: it
//!   is written only if the instance's `epoch` still equals the point's, and is otherwise
//!   reported as [`CommitOutcome::Fenced`] with nothing written (G4). Many points may share one
//!   database transaction (group commit).
//! * Messages consumed by a committed point move to `consumed` and are never delivered again (G5);
//!   messages merely claimed stay `routed`, locked to the host, and are delivered again once the
//!   lock is released (G3).
//!
//! A new backend implements the three traits and passes `cargo test --test conformance` (see
//! CONTRIBUTING.md).

mod common;
pub mod console;
pub mod faulty;
mod model;
mod plan;
pub mod postgres;
pub mod retention;
mod routing;
pub mod sqlite;
mod storable;
mod url;
pub mod versions;

pub use model::*;
pub use retention::{Retention, StoreGauges};
pub use storable::{
    check_body_size, check_text, json_len, storable_text, DEFAULT_MAX_MESSAGE_BYTES,
};
pub use url::{redact as redact_url, without_password as url_without_password};
pub use versions::{
    Attention, HostRegistrations, UpgradeCandidate, UpgradeFilter, UpgradeOutcome, UpgradePoint,
    VersionCount, Versions,
};

use std::sync::Arc;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// Errors from a store. [`StoreError::is_retryable`] decides whether the host backs off and
/// retries.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The database cannot be reached or is busy; retry later.
    #[error("database unavailable: {0}")]
    Unavailable(#[source] sqlx::Error),
    /// The database rejected a statement of `operation`.
    #[error("database error in {operation}: {source}")]
    Database {
        /// What the store was doing (`publish`, `commit`, `claim messages`, ...).
        operation: &'static str,
        /// The database's error.
        #[source]
        source: sqlx::Error,
    },
    /// Applying migrations failed.
    #[error("migrating the database failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// A row holds something the engine cannot read.
    #[error("corrupt row: {0}")]
    Corrupt(String),
    /// Persistence points consumed messages that are no longer routed to their instance: the
    /// points were made from an instance in memory that the store has moved past (another host,
    /// or an earlier point, consumed them). Nothing is written; the instance is to be loaded
    /// again from what is stored.
    #[error("{0}")]
    NotRouted(String),
    /// Input that can never be stored (a NUL in text, over the maximum message size): refused,
    /// never retried. The text says what is wrong and what to do.
    #[error("refused: {0}")]
    Refused(String),
    /// A fault injected by a test.
    #[error("injected fault at {0}")]
    Injected(&'static str),
    /// The database URL names no supported backend. It holds the URL as shown, redacted
    /// ([`redact_url`]).
    #[error("unsupported database URL {0:?}: use sqlite://PATH or postgres://USER@HOST/DB")]
    UnsupportedUrl(String),
    /// The database's schema is not the one this build carries: no schema, migrations not
    /// applied yet, or applied by a newer build. Only `cairn migrate` (or `cairn host
    /// --migrate`) changes the schema; other commands refuse until it matches.
    #[error("{0}")]
    Schema(SchemaMismatch),
    /// No such instance.
    #[error("no instance {0}")]
    NoSuchInstance(Uuid),
    /// Another host process is running on this SQLite database.
    #[error(
        "another host ({host}, pid {pid}) is running on this SQLite database; SQLite serves one \
         host: stop that one first, or use PostgreSQL to run many hosts"
    )]
    HostAlreadyRunning {
        /// Its id.
        host: String,
        /// Its process id.
        pid: i64,
    },
    /// The instance is not in a status the operation applies to.
    #[error("instance {id} is {status}: {hint}")]
    WrongStatus {
        /// The instance.
        id: Uuid,
        /// Its status.
        status: InstanceStatus,
        /// What can be done.
        hint: &'static str,
    },
    /// The instance was suspended as not resumable.
    #[error(
        "instance {id} is suspended as not resumable ({why}). `cairn resume {id}` resumes it once \
         the build it runs with reads its state (deploy that build, or move the instance with \
         `cairn upgrade`); `cairn resume --force {id}` resumes it regardless; or `cairn terminate {id}`"
    )]
    NotResumable {
        /// The instance.
        id: Uuid,
        /// Why it was suspended.
        why: String,
    },
}

impl StoreError {
    /// Whether retrying the same call later may succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(self, StoreError::Unavailable(_) | StoreError::Injected(_))
    }

    /// Whether this is the store refusing an operator's request (wrong status, no such instance,
    /// unreadable request) rather than failing.
    pub fn is_refusal(&self) -> bool {
        matches!(
            self,
            StoreError::WrongStatus { .. }
                | StoreError::NoSuchInstance(_)
                | StoreError::NotResumable { .. }
                | StoreError::Corrupt(_)
                | StoreError::NotRouted(_)
                | StoreError::Refused(_)
        )
    }
}

/// Result of a store call.
pub type StoreResult<T> = Result<T, StoreError>;

impl ControlAction {
    /// Whether this action applies to instance `id` as it stands: its status, whether a
    /// suspension is resumable, and the error it was suspended with. The same rules on every
    /// backend.
    ///
    /// # Errors
    /// [`StoreError::WrongStatus`] or [`StoreError::NotResumable`], saying what can be done.
    pub fn check(
        &self,
        id: Uuid,
        status: InstanceStatus,
        resumable: bool,
        last_error: Option<String>,
    ) -> StoreResult<()> {
        let wrong = |hint| Err(StoreError::WrongStatus { id, status, hint });
        match self {
            ControlAction::Suspend { .. }
                if !matches!(status, InstanceStatus::Running | InstanceStatus::Dehydrated) =>
            {
                wrong("only a running or dehydrated instance can be suspended")
            }
            ControlAction::Resume { .. } if status != InstanceStatus::Suspended => {
                wrong("only a suspended instance can be resumed")
            }
            ControlAction::Resume { force: false } if !resumable => Err(StoreError::NotResumable {
                id,
                why: last_error.unwrap_or_default(),
            }),
            ControlAction::Terminate { .. } if status.is_final() => {
                wrong("the instance has already ended")
            }
            _ => Ok(()),
        }
    }
}

/// The runtime's side of the store: what a host does to run instances. Messages in (publish,
/// start), claims and leases, persistence points (commit, subscribe), the outbox the send ports
/// deliver, and wake-ups. The guarantees each method keeps are named on it; the conformance suite
/// (`tests/conformance.rs`) checks them on every backend.
#[async_trait]
pub trait MessageBox: Send + Sync + std::fmt::Debug {
    /// Publishes messages durably and routes them, in one transaction: returns only once they
    /// are durable (G1); a message id seen before is reported as a duplicate and not stored again
    /// (G5). A call the database refuses for a reason retrying cannot cure
    /// ([`StoreError::is_refusal`]) writes nothing; callers check [`NewMessage::check_storable`]
    /// first.
    async fn publish(
        &self,
        messages: Vec<NewMessage>,
        now: DateTime<Utc>,
    ) -> StoreResult<Vec<PublishOutcome>>;

    /// Creates instances with their start messages. With a `holder` (an eager start), the same
    /// transaction leases each instance to that host ([`FIRST_EPOCH`]) and claims its start
    /// message for it, and the instances are returned ready to run: the host neither claims nor
    /// acquires them. Without one, nothing is returned and any host may claim them.
    async fn start_instances(
        &self,
        instances: Vec<NewInstance>,
        holder: Option<Holder<'_>>,
        now: DateTime<Utc>,
    ) -> StoreResult<Vec<HeldStart>>;

    /// Claims up to `limit` routed messages, oldest first, for instances this host may run, and
    /// locks them to `host`. A backend that serves many hosts at once (PostgreSQL) also takes
    /// messages locked by a host whose heartbeat stopped, for instances whose lease expired; a
    /// backend that serves one host (SQLite) releases every lock at [`Maintenance::recover`] instead.
    async fn claim_messages(
        &self,
        host: &str,
        now: DateTime<Utc>,
        limit: u32,
    ) -> StoreResult<Claimed<StoredMessage>>;

    /// Claims up to `limit` timers due at `now` and locks them to `host`. A timer is claimed by
    /// one host at a time, and fires again after a crash until a point consumes it (G3).
    async fn claim_timers(
        &self,
        host: &str,
        now: DateTime<Utc>,
        limit: u32,
    ) -> StoreResult<Claimed<DueTimer>>;

    /// Takes the lease of each instance (owner, expiry, a new epoch) and loads it at its last
    /// persistence point. Instances another host holds are left out of the answer. The new epoch
    /// fences every point an earlier holder still writes (G4).
    async fn acquire(
        &self,
        host: &str,
        ids: &[Uuid],
        now: DateTime<Utc>,
        lease_until: DateTime<Utc>,
    ) -> StoreResult<Vec<InstanceRecord>>;

    /// Renews the leases of every instance `host` holds, and its row in `hosts`.
    async fn heartbeat(
        &self,
        host: &str,
        now: DateTime<Utc>,
        lease_until: DateTime<Utc>,
    ) -> StoreResult<()>;

    /// Gives up everything `host` holds at shutdown: leases (instances in memory become
    /// `dehydrated`), message, timer and outbox locks; marks the host stopped.
    async fn release(&self, host: &str, now: DateTime<Utc>) -> StoreResult<()>;

    /// Releases message and timer locks held by `host` for these instances (they are delivered
    /// again). Their claims are given back uncounted, except the messages in `failed`, whose
    /// delivery failed (panicked) the instance: they keep their delivery count.
    async fn unlock(&self, host: &str, ids: &[Uuid], failed: &[i64]) -> StoreResult<()>;

    /// Writes persistence points, many in one transaction (group commit). Each is all or nothing
    /// and fenced on its epoch: written, or reported [`CommitOutcome::Fenced`] with nothing
    /// written (G4); its consumed messages are never delivered again (G5), its sends are in the
    /// outbox when it is (G2). A point the database refuses for a reason retrying cannot cure
    /// fails the call with an error [`StoreError::is_refusal`] says so of; the caller isolates it.
    async fn commit(&self, points: &[PersistencePoint]) -> StoreResult<Vec<CommitOutcome>>;

    /// Adds subscriptions for receives instances declared since their last persistence point, so
    /// that matching messages route to them at once (unrouted ones included). Fenced per instance
    /// like [`commit`](Self::commit); adds rows only: the next persistence point sets the exact set.
    async fn subscribe(
        &self,
        host: &str,
        receives: &[NewReceives],
        now: DateTime<Utc>,
    ) -> StoreResult<Vec<CommitOutcome>>;

    /// Records that this host cannot run an instance (unknown definition), leaving it otherwise
    /// untouched.
    async fn note_unrunnable(&self, id: Uuid, error: &str, now: DateTime<Utc>) -> StoreResult<()>;

    /// Claims up to `limit` outbox rows due for delivery and locks them to `host` until
    /// `lock_until`: pending rows whose next attempt is due and that are not locked, or whose
    /// lock expired (its holder died mid-delivery: the row is delivered again under the same id).
    /// Rows of the `ordered` ports are left to [`claim_ordered`](Self::claim_ordered).
    async fn claim_outbox(
        &self,
        host: &str,
        now: DateTime<Utc>,
        lock_until: DateTime<Utc>,
        limit: u32,
        ordered: &[String],
    ) -> StoreResult<Vec<OutboxRow>>;

    /// Claims the head of an ordered port: its oldest (by `outbox.seq`) row that is neither
    /// delivered nor dead, if that row is pending, due, and not locked by another live host.
    /// A held head (or one another host delivers, or one waiting for its retry) yields `None`:
    /// the port delivers nothing past it.
    async fn claim_ordered(
        &self,
        host: &str,
        port: &str,
        now: DateTime<Utc>,
        lock_until: DateTime<Utc>,
    ) -> StoreResult<Option<OutboxRow>>;

    /// Extends the locks `host` holds on these outbox rows (deliveries still running).
    async fn renew_outbox(
        &self,
        host: &str,
        ids: &[String],
        lock_until: DateTime<Utc>,
    ) -> StoreResult<()>;

    /// Records the outcome of delivery attempts: delivered (publishing replies in the same
    /// transaction), rescheduled, held (an ordered port), or dead-lettered (telling the
    /// instance). An outcome for a row that is no longer pending (another host finished it after
    /// this one's lock expired) changes nothing.
    async fn record_deliveries(
        &self,
        outcomes: Vec<DeliveryOutcome>,
        now: DateTime<Utc>,
    ) -> StoreResult<()>;

    /// Wakes `wake` whenever any process commits new work, until `stop` is cancelled
    /// (PostgreSQL: LISTEN/NOTIFY). Stores that cannot tell return at once, and hosts find new
    /// work by polling.
    async fn listen(&self, wake: Arc<Notify>, stop: CancellationToken) {
        let _ = (wake, stop);
    }
}

/// The operators' side of the store: the verbs of the `cairn` command line and of the SQL pages
/// (control an instance, give up or resume a send, dead letters, list and show). Each verb is one
/// transaction; a verb that changes an instance bumps its epoch so that a host holding it is
/// fenced (G4).
#[async_trait]
pub trait OperatorVerbs: Send + Sync + std::fmt::Debug {
    /// Operator control of an instance: suspend, resume or terminate. Bumps the epoch so that a
    /// host holding the instance in memory is fenced and drops it.
    async fn control(
        &self,
        id: Uuid,
        action: ControlAction,
        now: DateTime<Utc>,
    ) -> StoreResult<InstanceStatus>;

    /// Dead-letters sends for an operator: first marks these pending or held rows `give_up`
    /// with `reason`, then moves every `give_up` row (those marked here and those an operator
    /// marked with SQL) to `dead_letters` and tells its instance, in one transaction. Returns
    /// the number of rows dead-lettered.
    async fn give_up_sends(
        &self,
        ids: &[String],
        reason: &str,
        now: DateTime<Utc>,
    ) -> StoreResult<u64>;

    /// Lets a held send (an ordered port stopped on it) be delivered again, its attempts reset.
    /// Returns whether it was held.
    async fn resume_send(&self, id: &str, now: DateTime<Utc>) -> StoreResult<bool>;

    /// Dead letters, newest first.
    async fn dead_letters(&self, limit: u32) -> StoreResult<Vec<DeadLetter>>;

    /// One dead letter.
    async fn dead_letter(&self, id: &str) -> StoreResult<Option<DeadLetter>>;

    /// Puts a dead-lettered send back into the outbox under the same id, its attempts reset, and
    /// removes the dead letter. Returns whether there was such a send.
    async fn resubmit_dead_letter(&self, id: &str, now: DateTime<Utc>) -> StoreResult<bool>;

    /// Deletes dead letters: these ids, or (with no ids) those dead before `before`, or all.
    async fn purge_dead_letters(
        &self,
        ids: &[String],
        before: Option<DateTime<Utc>>,
    ) -> StoreResult<u64>;

    /// Instances, newest first, optionally of one status.
    async fn list_instances(
        &self,
        status: Option<InstanceStatus>,
        limit: u32,
    ) -> StoreResult<Vec<InstanceSummary>>;

    /// The summaries of these instances (those that exist), in no particular order.
    async fn instance_summaries(&self, ids: &[Uuid]) -> StoreResult<Vec<InstanceSummary>>;

    /// Everything about one instance.
    async fn instance_detail(&self, id: Uuid) -> StoreResult<Option<InstanceDetail>>;

    /// Instance counts by status, and what is left to do.
    async fn activity(&self, now: DateTime<Utc>) -> StoreResult<Activity>;

    /// The operations console's read-only queries, where the store has them (every backend
    /// does; a wrapper such as the fault-injecting store may not).
    fn console(&self) -> Option<&dyn console::ConsoleReads> {
        None
    }
}

/// Keeping the store in shape: schema (migrate, check), a host's start (recover, activations),
/// the rows people write by hand (`control`, `inbox`), and housekeeping. Nothing here is on the
/// path of a persistence point.
#[async_trait]
pub trait Maintenance: Send + Sync + std::fmt::Debug {
    /// Which backend this is (`sqlite`, `postgres`).
    fn backend(&self) -> &'static str;

    /// Applies pending migrations.
    async fn migrate(&self) -> StoreResult<()>;

    /// Checks that the database's schema is the one this build carries, changing nothing: the
    /// check a command makes instead of migrating, so that it runs under a role that cannot
    /// change the schema.
    ///
    /// # Errors
    /// [`StoreError::Schema`] saying how it differs and what to do, or the database's error.
    async fn check_schema(&self) -> StoreResult<()>;

    /// Registers `host` in `hosts` at start. SQLite (one host per file) also releases every
    /// lock and lease a previous process left, so that its claimed messages are delivered again;
    /// PostgreSQL releases nothing here, as other hosts may be alive: their leases expire and
    /// their locks go stale on their own.
    async fn recover(&self, host: &str, now: DateTime<Utc>) -> StoreResult<()>;

    /// Writes the activating subscriptions of the registered definitions.
    async fn sync_activations(
        &self,
        activations: &[Activation],
        now: DateTime<Utc>,
    ) -> StoreResult<()>;

    /// Carries out up to `limit` pending rows of the `control` table, oldest first, each in its
    /// own transaction with [`OperatorVerbs::control`]'s rules, and marks them `done` or `rejected`. A
    /// row that cannot be read (a column of the wrong type or NULL, an unknown action) or that
    /// fails for a reason retrying cannot cure is `rejected`, its `result` naming the column and
    /// what it holds, or the error: never a stop for the rows behind it.
    ///
    /// # Errors
    /// Only errors worth retrying ([`StoreError::is_retryable`]) leave a row pending.
    async fn apply_controls(
        &self,
        host: &str,
        now: DateTime<Utc>,
        limit: u32,
    ) -> StoreResult<Vec<ControlApplied>>;

    /// Marks as `zombie` the messages routed to instances that have ended, and dead-letters the
    /// messages unrouted since before `unrouted_before`.
    async fn housekeeping(
        &self,
        now: DateTime<Utc>,
        unrouted_before: DateTime<Utc>,
    ) -> StoreResult<Housekeeping>;

    /// Takes up to `limit` rows of the `inbox` table, oldest first, and publishes each like any
    /// other message, in the transaction that deletes it. Every row gets a final answer: it is
    /// published, or dead-lettered (`dead_letters`, id `inbox-<id>`) with the reason and deleted.
    /// A row is dead-lettered when it cannot be read (a column of the wrong type or NULL, a body
    /// or properties that are not JSON), cannot be stored
    /// ([`NewMessage::check_storable`] with `max_message_bytes`: a NUL in its id, type or
    /// properties, a body over the maximum size), or when the database refuses its publish for
    /// a reason retrying cannot cure. One row never holds back the rows behind it. Returns how
    /// many it took.
    ///
    /// # Errors
    /// Only errors worth retrying ([`StoreError::is_retryable`]) leave rows in the inbox.
    async fn take_inbox(
        &self,
        now: DateTime<Utc>,
        limit: u32,
        max_message_bytes: usize,
    ) -> StoreResult<usize>;

    /// Closes the connection pool.
    async fn close(&self);
}

/// The storage boundary: the three sides of a store together, as the host and the command line
/// hold it (`Arc<dyn Store>`). A backend implements [`MessageBox`], [`OperatorVerbs`] and
/// [`Maintenance`]; this trait comes with them. See the module docs for the contract.
pub trait Store: MessageBox + OperatorVerbs + Maintenance + Retention + Versions {}

impl<T: MessageBox + OperatorVerbs + Maintenance + Retention + Versions + ?Sized> Store for T {}

/// The rows that decode, for a listing: a row that cannot be read (written by hand, say) is left
/// out with a warning naming it, so that one bad row never hides the others from an operator.
pub(crate) fn readable<T>(rows: impl IntoIterator<Item = StoreResult<T>>, what: &str) -> Vec<T> {
    rows.into_iter()
        .filter_map(|row| {
            row.map_err(|e| tracing::warn!(error = %e, "{what}: a row cannot be read; left out"))
                .ok()
        })
        .collect()
}

/// Opens the store a database URL names (`sqlite://PATH`, `sqlite::memory:`,
/// `postgres://USER@HOST/DB` or `postgresql://...`).
///
/// # Errors
/// [`StoreError::UnsupportedUrl`], or the connection error.
pub async fn open(url: &str) -> StoreResult<std::sync::Arc<dyn Store>> {
    if url.starts_with("sqlite:") {
        Ok(std::sync::Arc::new(sqlite::SqliteStore::open(url).await?))
    } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        Ok(std::sync::Arc::new(
            postgres::PostgresStore::open(url).await?,
        ))
    } else {
        Err(StoreError::UnsupportedUrl(redact_url(url)))
    }
}

/// How a database's schema differs from the one this build carries
/// ([`StoreError::Schema`], from [`Maintenance::check_schema`]).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum SchemaMismatch {
    /// No Cairn schema at all (no migration applied).
    Missing,
    /// Migrations this build carries are not applied: their versions.
    Behind(Vec<i64>),
    /// Migrations are applied that this build does not know: a newer build migrated.
    Ahead(Vec<i64>),
    /// A migration failed part-way, or was changed after it was applied.
    Broken(String),
}

impl std::fmt::Display for SchemaMismatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let versions = |v: &[i64]| v.iter().map(i64::to_string).collect::<Vec<_>>().join(", ");
        match self {
            SchemaMismatch::Missing => write!(
                f,
                "the database has no Cairn schema yet (or this role cannot see it)\nhint: run `cairn migrate` (as the schema \
                 owner) first; only `cairn migrate` or `cairn host --migrate` change the schema"
            ),
            SchemaMismatch::Behind(v) => write!(
                f,
                "the database schema is behind this build: migration(s) {} not applied\nhint: \
                 run `cairn migrate` (as the schema owner); only `cairn migrate` or `cairn host \
                 --migrate` change the schema",
                versions(v)
            ),
            SchemaMismatch::Ahead(v) => write!(
                f,
                "the database schema is ahead of this build: migration(s) {} are unknown to \
                 it\nhint: this cairn binary is older than the schema; run the build that \
                 migrated it, or a newer one",
                versions(v)
            ),
            SchemaMismatch::Broken(why) => write!(
                f,
                "the database schema is damaged: {why}\nhint: see `_sqlx_migrations`; fix the \
                 schema by hand, then run `cairn migrate`"
            ),
        }
    }
}

/// Compares the migrations applied to a database (`version`, `success`, `checksum` rows of
/// sqlx's `_sqlx_migrations`; `None`: there is no such table) with those `migrator` carries.
pub(crate) fn compare_schema(
    migrator: &sqlx::migrate::Migrator,
    applied: Option<Vec<(i64, bool, Vec<u8>)>>,
) -> Result<(), SchemaMismatch> {
    let Some(applied) = applied else {
        return Err(SchemaMismatch::Missing);
    };
    if applied.is_empty() {
        return Err(SchemaMismatch::Missing);
    }
    if let Some((version, _, _)) = applied.iter().find(|(_, ok, _)| !ok) {
        return Err(SchemaMismatch::Broken(format!(
            "migration {version} failed part-way"
        )));
    }
    let carried: std::collections::BTreeMap<i64, &[u8]> = migrator
        .iter()
        .filter(|m| !m.migration_type.is_down_migration())
        .map(|m| (m.version, &*m.checksum))
        .collect();
    let mut ahead = Vec::new();
    for (version, _, checksum) in &applied {
        match carried.get(version) {
            None => ahead.push(*version),
            Some(ours) if *ours != checksum.as_slice() => {
                return Err(SchemaMismatch::Broken(format!(
                    "migration {version} differs from the one this build carries (it was \
                     changed after it was applied)"
                )))
            }
            Some(_) => {}
        }
    }
    if !ahead.is_empty() {
        return Err(SchemaMismatch::Ahead(ahead));
    }
    let behind: Vec<i64> = carried
        .keys()
        .filter(|v| !applied.iter().any(|(a, _, _)| a == *v))
        .copied()
        .collect();
    if behind.is_empty() {
        Ok(())
    } else {
        Err(SchemaMismatch::Behind(behind))
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    fn versions(backend: &str) -> BTreeSet<String> {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../migrations")
            .join(backend);
        std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
            .map(|e| {
                e.expect("dir entry")
                    .file_name()
                    .to_string_lossy()
                    .into_owned()
            })
            .collect()
    }

    #[test]
    fn both_backends_have_the_same_migrations() {
        let sqlite = versions("sqlite");
        assert!(!sqlite.is_empty());
        assert_eq!(
            sqlite,
            versions("postgres"),
            "migrations/sqlite and migrations/postgres must hold the same files"
        );
    }
}
