//! The PostgreSQL MessageBox: one database shared by many hosts on many machines.
//!
//! The tables, their columns and the semantics are those of the SQLite backend; what changes is
//! that several hosts write at once, so the database has to be the coordinator:
//!
//! * **Claims** (`claim_messages`, `claim_timers`, `claim_outbox`) pick rows with
//!   `FOR UPDATE SKIP LOCKED`, so hosts polling together never wait on, nor take, each other's
//!   rows.
//! * **Ownership** is a lease (`instances.owner`, `lease_expires_at`) with a fencing `epoch`,
//!   renewed by [`MessageBox::heartbeat`]. A host that is gone is never "released" by another:
//!   its leases run out, and the next host to [`MessageBox::acquire`] the instance bumps the epoch (the
//!   old owner's commits are then fenced, G4) and clears the message and timer locks other hosts
//!   hold on it, so that what the old owner had claimed is delivered again (G3).
//! * **Stale locks.** A message or timer locked by a host is claimable again when that host cannot
//!   be delivering it any more: it is the instance's owner and its lease ran out, or it is gone
//!   (stopped, or no heartbeat for two lease durations). A live host that is not the owner is
//!   between its claim and its acquire, and keeps its lock; a host never claims again what it
//!   already holds, even when its own lease has lapsed: the message is in its memory.
//! * **Routing** reads subscriptions and writes messages; subscription changes read unrouted
//!   messages and route them. Under `READ COMMITTED` a message published while a subscription for
//!   it is being written could miss both, and stay unrouted. Each message type therefore has a
//!   transaction-scoped advisory lock: publishing takes it shared, writing or removing
//!   subscriptions of the type takes it exclusive, always in one sorted pass. A commit takes them
//!   after writing its points, so that they are held briefly, then unroutes what a concurrent
//!   publisher routed to a subscription it removed; rerouting looks only at the unrouted messages
//!   the new subscriptions match.
//! * **Wake-ups.** Transactions that make work (publish, start, commit, deliveries, resume) end with
//!   `pg_notify('cairn_work', '')`, delivered at commit.
//!
//! Everything lives in the schema `cairn` (the connection's `search_path`), including sqlx's
//! migration table. Times are `TIMESTAMPTZ` written from the engine's clock, never the database's.

use std::collections::{BTreeMap, BTreeSet};
use std::str::FromStr;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions, PgRow};
use sqlx::{PgPool, Postgres, Row, Transaction};
use uuid::Uuid;

use super::routing::Route;
use super::*;
use crate::orchestration::Correlation;

mod batch;
mod kept;

use kept::{KeptConnection, PointConnection};

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../migrations/postgres");

/// The schema every table lives in.
pub const SCHEMA: &str = "cairn";

/// The channel notified when a transaction made work for hosts.
pub const WORK_CHANNEL: &str = "cairn_work";

/// Advisory lock class of the per-message-type routing locks ("cair").
const ROUTE_LOCK_CLASS: i32 = 0x6361_6972;
/// Advisory lock class of convoy activations, one lock per orchestration and values ("caic").
const CONVOY_LOCK_CLASS: i32 = 0x6361_6963;
/// Advisory lock class of schema creation ("cais").
const SCHEMA_LOCK_CLASS: i32 = 0x6361_6973;

/// The lease duration assumed until a host tells the store its own (HostConfig's default).
const DEFAULT_LEASE_MS: i64 = 30_000;

/// How long a transaction may sit idle before the server aborts it (a paused host's).
const IDLE_IN_TRANSACTION_TIMEOUT: &str = "5s";

/// Maps a sqlx error from `operation` (what the store was doing, named in the error) to a
/// [`StoreError`], deciding what is worth retrying. The one place that decides it for this
/// backend.
fn map_err(operation: &'static str, err: sqlx::Error) -> StoreError {
    if matches!(
        err,
        sqlx::Error::ColumnDecode { .. } | sqlx::Error::Decode(_) | sqlx::Error::ColumnNotFound(_)
    ) {
        // A row holds what its column's type does not admit: the row's fault, not the
        // database's, and never cured by retrying.
        return StoreError::Corrupt(err.to_string());
    }
    let retryable = match &err {
        sqlx::Error::Io(_) | sqlx::Error::PoolTimedOut => true,
        sqlx::Error::Database(db) => db.code().is_some_and(|code| {
            matches!(
                code.as_ref(),
                // serialization_failure, deadlock_detected
                "40001" | "40P01"
                // admin_shutdown, crash_shutdown, cannot_connect_now
                | "57P01" | "57P02" | "57P03"
                // too_many_connections
                | "53300"
            ) || code.starts_with("08") // connection_exception and its subclasses
        }),
        _ => false,
    };
    if retryable {
        StoreError::Unavailable(err)
    } else {
        StoreError::Database {
            operation,
            source: err,
        }
    }
}

/// Reads a column, reporting a value of the wrong type as corrupt rather than panicking.
fn col<'r, T>(row: &'r PgRow, name: &str) -> StoreResult<T>
where
    T: sqlx::Decode<'r, Postgres> + sqlx::Type<Postgres>,
{
    row.try_get(name)
        .map_err(|e| StoreError::Corrupt(format!("column {name}: {e}")))
}

fn parse_json<T: serde::de::DeserializeOwned>(text: &str) -> StoreResult<T> {
    serde_json::from_str(text).map_err(|e| {
        StoreError::Corrupt(format!(
            "not JSON ({e}): {:?}",
            super::storable::shorten(text)
        ))
    })
}

/// A JSON text column, checked; an error names the column.
fn col_json<T: serde::de::DeserializeOwned>(row: &PgRow, name: &str) -> StoreResult<T> {
    let text: String = col(row, name)?;
    serde_json::from_str(&text).map_err(|e| {
        StoreError::Corrupt(format!(
            "column {name} is not JSON ({e}): {:?}",
            super::storable::shorten(&text)
        ))
    })
}

/// A status or kind word column, checked; an error names the column.
fn col_word<T: FromStr<Err = String>>(row: &PgRow, name: &str) -> StoreResult<T> {
    col::<String>(row, name)?
        .parse()
        .map_err(|e: String| StoreError::Corrupt(format!("column {name}: {e}")))
}

/// A `u32` as an `INTEGER` column.
fn int4(value: u32) -> i32 {
    i32::try_from(value).unwrap_or(i32::MAX)
}

/// An `INTEGER` column as a `u32`.
fn uint(value: i32, what: &str) -> StoreResult<u32> {
    u32::try_from(value).map_err(|_| StoreError::Corrupt(format!("{what} is negative: {value}")))
}

/// The PostgreSQL store.
#[derive(Clone)]
pub struct PostgresStore {
    pool: PgPool,
    /// How to connect: for the kept connection, which is not the pool's.
    options: PgConnectOptions,
    /// The connection kept for persistence points written as one statement
    /// ([`Self::point_connection`]).
    points: KeptConnection,
    /// The lease duration this store's host uses, in milliseconds, learnt from `acquire` and
    /// `heartbeat`; a host whose heartbeat is older than two of them is presumed gone.
    lease_ms: Arc<AtomicI64>,
}

/// Without the connect options: their `Debug` shows the password.
impl std::fmt::Debug for PostgresStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresStore")
            .field("pool", &self.pool)
            .field("host", &self.options.get_host())
            .field("port", &self.options.get_port())
            .field("database", &self.options.get_database())
            .field("username", &self.options.get_username())
            .finish_non_exhaustive()
    }
}

type Tx = Transaction<'static, Postgres>;

impl PostgresStore {
    /// Connects to the database at `url` (`postgres://USER[:PASSWORD]@HOST[:PORT]/DB`), with the
    /// schema `cairn` as the search path. The schema and tables are created by
    /// [`Maintenance::migrate`].
    ///
    /// # Errors
    /// The URL is malformed, or the database cannot be reached within the pool's acquire timeout.
    pub async fn open(url: &str) -> StoreResult<Self> {
        let (url, dropped) = super::url::without_unread_secrets(url);
        if !dropped.is_empty() {
            tracing::warn!(parameters = ?dropped, "ignoring database URL parameters that are not supported");
        }
        let options = PgConnectOptions::from_str(&url)
            .map_err(|source| StoreError::Database {
                operation: "open",
                source,
            })?
            .application_name("cairn")
            // A host that stops mid-transaction (paused, partitioned) must not hold its row and
            // route locks for everyone: the server aborts its transaction, and whatever that
            // host tries next is fenced. Cairn's own transactions never wait on anything but
            // the database.
            .options([
                ("search_path", SCHEMA),
                (
                    "idle_in_transaction_session_timeout",
                    IDLE_IN_TRANSACTION_TIMEOUT,
                ),
            ]);
        let pool = PgPoolOptions::new()
            .max_connections(8)
            .acquire_timeout(Duration::from_secs(10))
            .connect_with(options.clone())
            .await
            .map_err(|e| map_err("open", e))?;
        Ok(Self {
            pool,
            options,
            points: KeptConnection::default(),
            lease_ms: Arc::new(AtomicI64::new(DEFAULT_LEASE_MS)),
        })
    }

    /// The connection pool, for tests and tools that read the database directly.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// A connection for a persistence point's one statement: the one the store keeps for
    /// them ([`kept`]), or one of the pool's while that one is busy or not connected.
    async fn point_connection(&self) -> StoreResult<PointConnection> {
        self.points.acquire(&self.options, &self.pool).await
    }

    async fn write(&self) -> StoreResult<Tx> {
        self.pool.begin().await.map_err(|e| map_err("begin", e))
    }

    fn learn_lease(&self, now: DateTime<Utc>, lease_until: DateTime<Utc>) {
        let ms = (lease_until - now).num_milliseconds();
        if ms > 0 {
            self.lease_ms.store(ms, Ordering::Relaxed);
        }
    }

    /// Hosts whose last heartbeat is older than this are presumed gone.
    fn host_cutoff(&self, now: DateTime<Utc>) -> DateTime<Utc> {
        now - chrono::Duration::milliseconds(2 * self.lease_ms.load(Ordering::Relaxed))
    }

    /// Runs claim `sql` ([`CLAIM_MESSAGES`] or [`CLAIM_TIMERS`]) for `host` at `now`, in a
    /// transaction of its own.
    async fn claim(
        &self,
        sql: &str,
        host: &str,
        now: DateTime<Utc>,
        limit: u32,
    ) -> StoreResult<Vec<PgRow>> {
        let mut tx = self.write().await?;
        let rows = sqlx::query(sql)
            .bind(host)
            .bind(now)
            .bind(i64::from(limit))
            .bind(self.host_cutoff(now))
            .fetch_all(&mut *tx)
            .await
            .map_err(|e| map_err("claim", e))?;
        commit(tx).await?;
        Ok(rows)
    }
}

async fn commit(tx: Tx) -> StoreResult<()> {
    tx.commit().await.map_err(|e| map_err("commit", e))
}

/// Tells listening hosts that there is work; delivered when the transaction commits.
async fn notify(tx: &mut Tx) -> StoreResult<()> {
    sqlx::query("SELECT pg_notify($1, '')")
        .bind(WORK_CHANNEL)
        .execute(&mut **tx)
        .await
        .map_err(|e| map_err("notify", e))?;
    Ok(())
}

/// The routing lock key of a message type (FNV-1a, folded to 32 bits).
fn route_key(message_type: &str) -> i32 {
    let mut hash: u32 = 0x811c_9dc5;
    for byte in message_type.bytes() {
        hash ^= u32::from(byte);
        hash = hash.wrapping_mul(0x0100_0193);
    }
    i32::from_ne_bytes(hash.to_ne_bytes())
}

/// Takes the routing locks of these message types for the rest of the transaction: shared to
/// route messages of a type, exclusive to change its subscriptions and route its unrouted messages
/// again. Always in key order, each key once, so that two transactions never wait on each other in
/// a cycle.
async fn lock_routes<'a>(
    tx: &mut Tx,
    shared: impl IntoIterator<Item = &'a str>,
    exclusive: impl IntoIterator<Item = &'a str>,
) -> StoreResult<()> {
    let mut keys: BTreeMap<i32, bool> = BTreeMap::new();
    for t in shared {
        keys.entry(route_key(t)).or_insert(false);
    }
    for t in exclusive {
        keys.insert(route_key(t), true);
    }
    for (key, exclusive) in keys {
        let sql = if exclusive {
            "SELECT pg_advisory_xact_lock($1, $2)"
        } else {
            "SELECT pg_advisory_xact_lock_shared($1, $2)"
        };
        sqlx::query(sql)
            .bind(ROUTE_LOCK_CLASS)
            .bind(key)
            .execute(&mut **tx)
            .await
            .map_err(|e| map_err("lock routes", e))?;
    }
    Ok(())
}

/// The types of untargeted messages, which routing by subscription will read.
fn routed_types(messages: &[NewMessage]) -> impl Iterator<Item = &str> {
    messages
        .iter()
        .filter(|m| m.target.is_none())
        .map(|m| m.message_type.as_str())
}

/// Where `msg` goes. A convoy's activation is decided under the convoy's lock: publishers of
/// one type route side by side (shared route locks), so the activations of one convoy are
/// serialised, and the convoy's instance is looked for again once the lock is ours.
async fn find_route(tx: &mut Tx, msg: &NewMessage) -> StoreResult<Route> {
    let route = batch::read_routes(tx, &[msg]).await?.route(msg);
    let Route::Activate {
        orchestration,
        convoy: Some(values),
        ..
    } = &route
    else {
        return Ok(route);
    };
    sqlx::query("SELECT pg_advisory_xact_lock($1, hashtext($2))")
        .bind(CONVOY_LOCK_CLASS)
        .bind(format!("{orchestration}|{}", values.canonical()))
        .execute(&mut **tx)
        .await
        .map_err(|e| map_err("find route", e))?;
    let owner: Option<(Uuid, Uuid)> = sqlx::query_as(
        "SELECT id, instance_id FROM subscriptions \
         WHERE message_type = $1 AND correlation = $2 AND instance_id IS NOT NULL \
         ORDER BY created_at, id LIMIT 1",
    )
    .bind(&msg.message_type)
    .bind(values.canonical())
    .fetch_optional(&mut **tx)
    .await
    .map_err(|e| map_err("find route", e))?;
    Ok(match owner {
        Some((sub, instance)) => Route::Instance(instance, Some(sub)),
        None => route,
    })
}

async fn insert_instance(
    tx: &mut Tx,
    id: Uuid,
    orchestration: &str,
    version: u32,
    parent: Option<Uuid>,
    now: DateTime<Utc>,
) -> StoreResult<()> {
    sqlx::query(
        "INSERT INTO instances (id, orchestration, version, status, step, created_at, updated_at, parent_id) \
         VALUES ($1, $2, $3, 'running', 'created', $4, $4, $5)",
    )
    .bind(id)
    .bind(orchestration)
    .bind(int4(version))
    .bind(now)
    .bind(parent)
    .execute(&mut **tx)
    .await
    .map_err(|e| map_err("insert instance", e))?;
    Ok(())
}

/// Stores and routes one message inside `tx`; see [`batch::publish_all`].
async fn publish_one(
    tx: &mut Tx,
    msg: &NewMessage,
    now: DateTime<Utc>,
) -> StoreResult<PublishOutcome> {
    let mut out = batch::publish_all(tx, &[(msg, now)]).await?;
    Ok(out.pop().unwrap_or(PublishOutcome::Duplicate))
}

/// What a transaction changed that may route unrouted messages.
#[derive(Default)]
struct Reroute {
    /// Activating subscriptions of these types were written: any unrouted message of the type may
    /// route now.
    types: BTreeSet<String>,
    /// Instance subscriptions were written: unrouted messages of the type that match the
    /// correlation may route now. (No other can: an unrouted message matches no subscription
    /// that existed before, since every subscription write reroutes under the routing lock.)
    subscriptions: Vec<(String, Correlation)>,
    /// Messages unrouted because the receive they were routed to was cancelled.
    seqs: BTreeSet<i64>,
    /// Subscriptions removed, and their types.
    cancelled: Vec<Uuid>,
    cancelled_types: BTreeSet<String>,
}

impl Reroute {
    /// The types whose routing this changes, to lock exclusively.
    fn lock_types(&self) -> BTreeSet<&str> {
        self.types
            .iter()
            .chain(&self.cancelled_types)
            .map(String::as_str)
            .chain(self.subscriptions.iter().map(|(t, _)| t.as_str()))
            .collect()
    }
}

/// Routes again the unrouted messages that `changes` may have made routable, oldest first (the
/// same routing as [`publish_one`]). The types must be locked exclusively for routing
/// ([`lock_routes`]).
async fn reroute(tx: &mut Tx, changes: &Reroute, now: DateTime<Utc>) -> StoreResult<()> {
    let mut candidates: BTreeMap<i64, (String, BTreeMap<String, String>)> = BTreeMap::new();
    let scanned: BTreeSet<&str> = changes
        .types
        .iter()
        .map(String::as_str)
        .chain(changes.subscriptions.iter().map(|(t, _)| t.as_str()))
        .collect();
    for message_type in scanned {
        let rows = sqlx::query(
            "SELECT seq, properties FROM messages WHERE status = 'unrouted' AND message_type = $1",
        )
        .bind(message_type)
        .fetch_all(&mut **tx)
        .await
        .map_err(|e| map_err("reroute", e))?;
        let every = changes.types.contains(message_type);
        for row in rows {
            // An unrouted message whose properties cannot be read stays unrouted (and is
            // dead-lettered after its time to live): it must not stop the others routing.
            let properties: BTreeMap<String, String> = match col_json(&row, "properties") {
                Ok(properties) => properties,
                Err(e) => {
                    tracing::warn!(error = %e, "an unrouted message cannot be read; left unrouted");
                    continue;
                }
            };
            let matches = every
                || changes
                    .subscriptions
                    .iter()
                    .any(|(t, corr)| t == message_type && corr.matches(&properties));
            if matches {
                candidates.insert(col(&row, "seq")?, (message_type.to_owned(), properties));
            }
        }
    }
    if !changes.seqs.is_empty() {
        let seqs: Vec<i64> = changes.seqs.iter().copied().collect();
        let rows = sqlx::query(
            "SELECT seq, message_type, properties FROM messages \
             WHERE seq = ANY($1) AND status = 'unrouted'",
        )
        .bind(&seqs)
        .fetch_all(&mut **tx)
        .await
        .map_err(|e| map_err("reroute", e))?;
        for row in rows {
            match col_json(&row, "properties") {
                Ok(properties) => {
                    candidates.insert(col(&row, "seq")?, (col(&row, "message_type")?, properties));
                }
                Err(e) => {
                    tracing::warn!(error = %e, "an unrouted message cannot be read; left unrouted");
                }
            }
        }
    }
    for (seq, (message_type, properties)) in candidates {
        let probe = NewMessage {
            id: String::new(),
            message_type,
            kind: MessageKind::Published,
            properties,
            body: serde_json::Value::Null,
            target: None,
        };
        let (instance, sub, kind, activate) = match find_route(tx, &probe).await? {
            Route::Instance(id, sub) => (id, sub, MessageKind::Published, None),
            Route::Activate {
                orchestration,
                version,
                convoy,
            } => (
                Uuid::now_v7(),
                None,
                MessageKind::Start,
                Some((orchestration, version, convoy)),
            ),
            Route::Unrouted(_) => continue,
        };
        let routed = sqlx::query(
            "UPDATE messages SET status = 'routed', instance_id = $2, subscription_id = $3, \
             kind = $4, reason = NULL WHERE seq = $1 AND status = 'unrouted'",
        )
        .bind(seq)
        .bind(instance)
        .bind(sub)
        .bind(kind.as_str())
        .execute(&mut **tx)
        .await
        .map_err(|e| map_err("reroute", e))?;
        if let (1, Some((orchestration, version, convoy))) = (routed.rows_affected(), activate) {
            insert_instance(tx, instance, &orchestration, version, None, now).await?;
            subscribe_convoy(tx, instance, &orchestration, convoy, now).await?;
        }
    }
    Ok(())
}

/// Moves the routed, unconsumed messages of cancelled subscriptions back to unrouted, and
/// notes them for [`reroute`].
async fn unroute(tx: &mut Tx, subscriptions: &[Uuid], changes: &mut Reroute) -> StoreResult<()> {
    let seqs: Vec<i64> = sqlx::query_scalar(
        "UPDATE messages SET status = 'unrouted', instance_id = NULL, subscription_id = NULL, \
         locked_by = NULL, reason = 'the receive it was routed to was cancelled' \
         WHERE subscription_id = ANY($1) AND status = 'routed' RETURNING seq",
    )
    .bind(subscriptions)
    .fetch_all(&mut **tx)
    .await
    .map_err(|e| map_err("unroute", e))?;
    changes.seqs.extend(seqs);
    Ok(())
}

/// For a convoy activation: subscribes the new instance to every activating type of its
/// definition with the convoy's values, so that no second instance starts for them while it runs.
async fn subscribe_convoy(
    tx: &mut Tx,
    instance: Uuid,
    orchestration: &str,
    convoy: Option<Correlation>,
    now: DateTime<Utc>,
) -> StoreResult<()> {
    let Some(values) = convoy else {
        return Ok(());
    };
    let types: Vec<String> = sqlx::query_scalar(
        "SELECT message_type FROM subscriptions WHERE orchestration = $1 AND instance_id IS NULL",
    )
    .bind(orchestration)
    .fetch_all(&mut **tx)
    .await
    .map_err(|e| map_err("subscribe convoy", e))?;
    let subs = convoy_subscriptions(instance, types, &values);
    let rows: Vec<_> = subs.iter().map(|sub| (instance, sub, now)).collect();
    batch::insert_subscriptions(tx, &rows).await
}

/// Whether a query's single boolean answer is true.
async fn exists(pool: &PgPool, sql: &str) -> StoreResult<bool> {
    sqlx::query_scalar(sql)
        .fetch_one(pool)
        .await
        .map_err(|e| map_err("exists", e))
}

async fn next_history_seq(tx: &mut Tx, id: Uuid) -> StoreResult<i64> {
    let seq: i64 = sqlx::query_scalar("SELECT history_seq FROM instances WHERE id = $1")
        .bind(id)
        .fetch_one(&mut **tx)
        .await
        .map_err(|e| map_err("next history seq", e))?;
    Ok(seq + 1)
}

async fn insert_history(tx: &mut Tx, id: Uuid, e: HistoryEntry<'_>) -> StoreResult<()> {
    // The epoch is the instance's current one: the writer's, checked by the fenced update
    // before it, or the new one an operator action just took.
    sqlx::query(
        "INSERT INTO history (instance_id, seq, reason, step, status, at, host, epoch, detail) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, (SELECT epoch FROM instances WHERE id = $1), $8)",
    )
    .bind(id)
    .bind(e.seq)
    .bind(e.reason.as_str())
    .bind(e.step)
    .bind(e.status.as_str())
    .bind(e.at)
    .bind(e.host)
    .bind(e.detail)
    .execute(&mut **tx)
    .await
    .map_err(|e| map_err("insert history", e))?;
    Ok(())
}

/// Carries out an operator's action inside `tx`. Bumps the epoch so that a host holding the
/// instance in memory is fenced and drops it.
async fn control_in(
    tx: &mut Tx,
    id: Uuid,
    action: &ControlAction,
    now: DateTime<Utc>,
) -> StoreResult<InstanceStatus> {
    let row =
            sqlx::query("SELECT status, step, parent_id, resumable, last_error FROM instances WHERE id = $1 FOR UPDATE")
                .bind(id)
                .fetch_optional(&mut **tx)
                .await
                .map_err(|e| map_err("control in", e))?
                .ok_or(StoreError::NoSuchInstance(id))?;
    let status: InstanceStatus = col_word(&row, "status")?;
    let step: String = col(&row, "step")?;
    let parent: Option<Uuid> = col(&row, "parent_id")?;
    action.check(
        id,
        status,
        col::<bool>(&row, "resumable")?,
        col::<Option<String>>(&row, "last_error")?,
    )?;
    let new_status = match &action {
        ControlAction::Suspend { reason } => {
            let seq = next_history_seq(tx, id).await?;
            sqlx::query(
                    "UPDATE instances SET status = 'suspended', last_error = $2, epoch = epoch + 1, \
                     owner = NULL, lease_expires_at = NULL, updated_at = $3, history_seq = $4 WHERE id = $1",
                )
                .bind(id)
                .bind(format!("suspended by operator: {reason}"))
                .bind(now)
                .bind(seq)
                .execute(&mut **tx)
                .await
                .map_err(|e| map_err("control in", e))?;
            insert_history(
                tx,
                id,
                HistoryEntry {
                    seq,
                    reason: Reason::Suspend,
                    step: &step,
                    status: InstanceStatus::Suspended,
                    at: now,
                    host: OPERATOR,
                    detail: Some(reason),
                },
            )
            .await?;
            InstanceStatus::Suspended
        }
        ControlAction::Resume { .. } => {
            sqlx::query(
                    "UPDATE instances SET status = 'dehydrated', last_error = NULL, epoch = epoch + 1, \
                     owner = NULL, lease_expires_at = NULL, updated_at = $2, resumable = TRUE WHERE id = $1",
                )
                .bind(id)
                .bind(now)
                .execute(&mut **tx)
                .await
                .map_err(|e| map_err("control in", e))?;
            // Its messages are delivered again from scratch: poison counting starts over.
            sqlx::query("UPDATE messages SET delivery_count = 0 WHERE instance_id = $1 AND status = 'routed'")
                    .bind(id)
                    .execute(&mut **tx)
                    .await
                    .map_err(|e| map_err("control in", e))?;
            notify(tx).await?;
            InstanceStatus::Dehydrated
        }
        ControlAction::Terminate { reason } => {
            let seq = next_history_seq(tx, id).await?;
            sqlx::query(
                    "UPDATE instances SET status = 'terminated', last_error = $2, epoch = epoch + 1, \
                     owner = NULL, lease_expires_at = NULL, waiting_for = '', next_timer_at = NULL, \
                     updated_at = $3, history_seq = $4 WHERE id = $1",
                )
                .bind(id)
                .bind(format!("terminated by operator: {reason}"))
                .bind(now)
                .bind(seq)
                .execute(&mut **tx)
                .await
                .map_err(|e| map_err("control in", e))?;
            for sql in [
                "DELETE FROM subscriptions WHERE instance_id = $1",
                "DELETE FROM timers WHERE instance_id = $1",
            ] {
                sqlx::query(sql)
                    .bind(id)
                    .execute(&mut **tx)
                    .await
                    .map_err(|e| map_err("control in", e))?;
            }
            insert_history(
                tx,
                id,
                HistoryEntry {
                    seq,
                    reason: Reason::Complete,
                    step: &step,
                    status: InstanceStatus::Terminated,
                    at: now,
                    host: OPERATOR,
                    detail: Some(reason),
                },
            )
            .await?;
            if let Some(parent) = parent {
                let msg = NewMessage::to_instance(
                    format!("{id}:ended"),
                    "child.failed",
                    MessageKind::ChildFailed,
                    serde_json::json!({ "child": id, "error": format!("terminated: {reason}") }),
                    parent,
                );
                publish_one(tx, &msg, now).await?;
                notify(tx).await?;
            }
            InstanceStatus::Terminated
        }
    };
    batch::unlock_instances(tx, &[id], &[]).await?;
    Ok(new_status)
}

/// The `history.host` of points written by an operator's action (suspend, terminate).
const OPERATOR: &str = "operator";

/// Reads a pending `control` row, checked: a NULL or an unknown action is reported (the column
/// and what it holds) for the row's `result`.
fn control_request(row: &PgRow, id: i64) -> StoreResult<ControlRequest> {
    let read = || -> StoreResult<ControlRequest> {
        Ok(ControlRequest {
            id,
            instance_id: col(row, "instance_id")?,
            action: control_action(
                &col::<String>(row, "action")?,
                col(row, "reason")?,
                col(row, "force")?,
            )
            .map_err(StoreError::Corrupt)?,
        })
    };
    read().map_err(|e| match e {
        StoreError::Corrupt(why) => {
            StoreError::Corrupt(format!("control row {id} cannot be read: {why}"))
        }
        other => other,
    })
}

/// Reads an `inbox` row, checked, and checks that its message can be stored
/// ([`NewMessage::check_storable`]).
///
/// # Errors
/// Why not, for its dead letter.
fn inbox_row(row: &PgRow, id: i64, max_bytes: usize) -> Result<NewMessage, String> {
    let text = |name| col::<String>(row, name).map_err(|e| format!("inbox row {id}: {e}"));
    let message_id =
        col::<Option<String>>(row, "message_id").map_err(|e| format!("inbox row {id}: {e}"))?;
    let msg = inbox_message(
        id,
        message_id,
        text("message_type")?,
        &text("properties")?,
        &text("body")?,
    )?;
    msg.check_storable(max_bytes)
        .map_err(|e| format!("inbox row {id}: {e}"))?;
    Ok(msg)
}

/// Publishes an inbox row's message inside `tx`, under a savepoint: a refusal by the database
/// that retrying cannot cure is rolled back to it and returned (`Some(reason)`, for the row's
/// dead letter), so that the rows beside it are still published.
///
/// # Errors
/// A retryable error: the whole transaction is tried again later.
async fn publish_or_refuse(
    tx: &mut Tx,
    id: i64,
    msg: &NewMessage,
    now: DateTime<Utc>,
) -> StoreResult<Option<String>> {
    savepoint(tx, "SAVEPOINT inbox_row").await?;
    match publish_one(tx, msg, now).await {
        Ok(_) => {
            savepoint(tx, "RELEASE SAVEPOINT inbox_row").await?;
            Ok(None)
        }
        Err(e) if e.is_retryable() => Err(e),
        Err(e) => {
            savepoint(tx, "ROLLBACK TO SAVEPOINT inbox_row").await?;
            savepoint(tx, "RELEASE SAVEPOINT inbox_row").await?;
            Ok(Some(format!(
                "inbox row {id}: the database refused it: {e}"
            )))
        }
    }
}

/// Runs a savepoint statement.
async fn savepoint(tx: &mut Tx, sql: &str) -> StoreResult<()> {
    sqlx::query(sql)
        .execute(&mut **tx)
        .await
        .map_err(|e| map_err("savepoint", e))
        .map(drop)
}

/// An acquired instance row, checked.
fn instance_record(row: &PgRow) -> StoreResult<InstanceRecord> {
    Ok(InstanceRecord {
        id: col(row, "id")?,
        orchestration: col(row, "orchestration")?,
        version: uint(col(row, "version")?, "instances.version")?,
        status: col_word(row, "status")?,
        state: col(row, "state")?,
        engine_state: col(row, "engine_state")?,
        epoch: col(row, "epoch")?,
        history_seq: col(row, "history_seq")?,
        parent_id: col(row, "parent_id")?,
    })
}

/// Dead-letters claimed messages that cannot be read, `(seq, why)`: a copy of each goes to
/// `dead_letters` with the reason, and the message is marked `dead`, so that it is never
/// claimed again and holds back nothing.
async fn bury_messages(tx: &mut Tx, rows: &[(i64, String)], now: DateTime<Utc>) -> StoreResult<()> {
    for (seq, why) in rows {
        let reason = format!("message {seq} cannot be read: {why}");
        tracing::error!(message.seq = seq, error = %reason, "a message cannot be read; dead-lettered");
        sqlx::query(
            "INSERT INTO dead_letters (id, instance_id, port, message_type, body, reason, attempts, dead_at) \
             SELECT id, instance_id, NULL, message_type, body, $2, 0, $3 FROM messages WHERE seq = $1 \
             ON CONFLICT (id) DO NOTHING",
        )
        .bind(seq)
        .bind(&reason)
        .bind(now)
        .execute(&mut **tx)
        .await
        .map_err(|e| map_err("bury messages", e))?;
        sqlx::query(
            "UPDATE messages SET status = 'dead', locked_by = NULL, reason = $2 WHERE seq = $1",
        )
        .bind(seq)
        .bind(&reason)
        .execute(&mut **tx)
        .await
        .map_err(|e| map_err("bury messages", e))?;
    }
    Ok(())
}

/// Dead-letters a claimed outbox row that cannot be read: a copy goes to `dead_letters` with
/// the reason, the row is marked `dead`, and its instance is told (`Event::SendFailed`).
async fn bury_send(tx: &mut Tx, row: &PgRow, why: &str, now: DateTime<Utc>) -> StoreResult<()> {
    let id: String = col(row, "id")?;
    let reason = format!("send {id} cannot be read: {why}");
    tracing::error!(send.id = %id, error = %reason, "a send cannot be read; dead-lettered");
    sqlx::query(
        "INSERT INTO dead_letters (id, instance_id, port, message_type, body, reason, attempts, dead_at) \
         SELECT id, instance_id, port, message_type, body, $2, GREATEST(attempts, 0), $3 \
         FROM outbox WHERE id = $1 \
         ON CONFLICT (id) DO UPDATE SET reason = excluded.reason, dead_at = excluded.dead_at",
    )
    .bind(&id)
    .bind(&reason)
    .bind(now)
    .execute(&mut **tx)
    .await
    .map_err(|e| map_err("bury send", e))?;
    sqlx::query(
        "UPDATE outbox SET status = 'dead', last_error = $2, locked_by = NULL, locked_until = NULL \
         WHERE id = $1",
    )
    .bind(&id)
    .bind(&reason)
    .execute(&mut **tx)
    .await
    .map_err(|e| map_err("bury send", e))?;
    let instance: Uuid = col(row, "instance_id")?;
    let message_type: String = col(row, "message_type")?;
    let msg = NewMessage::to_instance(
        format!("{id}:failed"),
        format!("{message_type}.failed"),
        MessageKind::SendFailed,
        serde_json::json!({ "message_id": id, "error": reason }),
        instance,
    );
    publish_one(tx, &msg, now).await?;
    Ok(())
}

fn summary_from_row(row: &PgRow) -> StoreResult<InstanceSummary> {
    Ok(InstanceSummary {
        id: col(row, "id")?,
        orchestration: col(row, "orchestration")?,
        version: uint(col(row, "version")?, "instances.version")?,
        status: col_word(row, "status")?,
        step: col(row, "step")?,
        waiting_for: col(row, "waiting_for")?,
        updated_at: col(row, "updated_at")?,
        last_error: col(row, "last_error")?,
    })
}

/// A host's claim of ready messages (`$1` the host, `$2` now, `$3` the limit, `$4` the heartbeat
/// cutoff). Half the batch at most for instances this host holds, so that a busy host still takes
/// its share of new work and hosts keep splitting it; the rest of the batch is the oldest
/// claimable messages. An instance the host holds has started, so the first part reads no start
/// messages (`messages_routed_after_start`).
static CLAIM_MESSAGES: LazyLock<String> = LazyLock::new(|| {
    format!(
        "WITH hot AS ( \
           SELECT m.seq FROM messages m JOIN instances i ON i.id = m.instance_id \
           WHERE m.status = 'routed' AND m.kind <> 'start' AND {CLAIMABLE} AND {lock_free} \
             AND i.owner = $1 \
           ORDER BY m.seq LIMIT ($3 + 1) / 2 \
           FOR UPDATE OF m SKIP LOCKED), \
         cold AS ( \
           SELECT m.seq FROM messages m \
           WHERE m.status = 'routed' AND m.seq NOT IN (SELECT seq FROM hot) AND {claimable} \
           ORDER BY m.seq LIMIT $3 - (SELECT count(*) FROM hot) \
           FOR UPDATE SKIP LOCKED) \
         UPDATE messages SET locked_by = $1, delivery_count = delivery_count + 1 \
         WHERE seq = ANY(ARRAY(SELECT seq FROM hot UNION ALL SELECT seq FROM cold)) \
         RETURNING seq, id, message_type, kind, properties, body, instance_id, subscription_id, published_at, delivery_count",
        lock_free = lock_free("m"),
        claimable = of_its_instance("m", &format!("{CLAIMABLE} AND {}", lock_free("m"))),
    )
});

/// A host's claim of due timers (parameters as for [`CLAIM_MESSAGES`]), the earliest first.
static CLAIM_TIMERS: LazyLock<String> = LazyLock::new(|| {
    format!(
        "UPDATE timers SET locked_by = $1 WHERE (instance_id, name) IN ( \
           SELECT t.instance_id, t.name FROM timers t \
           WHERE t.due_at <= $2 AND {claimable} \
           ORDER BY t.due_at LIMIT $3 \
           FOR UPDATE SKIP LOCKED) \
         RETURNING instance_id, name, due_at",
        claimable = of_its_instance("t", &format!("{CLAIMABLE} AND {}", lock_free("t"))),
    )
});

/// How many routed messages some host may take (`$1` now, `$2` the heartbeat cutoff), for
/// [`OperatorVerbs::activity`].
static READY_MESSAGES: LazyLock<String> = LazyLock::new(|| {
    format!(
        "SELECT COUNT(*) FROM messages m WHERE m.status = 'routed' AND {}",
        of_its_instance("m", &format!("{RUNNABLE} AND {}", lock_stale("m")))
    )
});

/// When the next timer some host may take is due (parameters as for [`READY_MESSAGES`]).
static NEXT_TIMER: LazyLock<String> = LazyLock::new(|| {
    format!(
        "SELECT t.due_at FROM timers t WHERE {} ORDER BY t.due_at LIMIT 1",
        of_its_instance("t", &format!("{RUNNABLE} AND {}", lock_stale("t")))
    )
});

const SUMMARY_COLUMNS: &str =
    "id, orchestration, version, status, step, waiting_for, updated_at, last_error";

/// Instances some host may run.
const RUNNABLE: &str = "i.status IN ('running', 'dehydrated')";

/// Instances host `$1` may run at `$2`: runnable, and unowned, owned by it, or with a lease
/// that ran out.
const CLAIMABLE: &str = "i.status IN ('running', 'dehydrated') \
     AND (i.owner IS NULL OR i.owner = $1 OR i.lease_expires_at < $2)";

/// Whether the lock on row `x` (a message or timer of instance `i`) leaves it to host `$1`, given
/// [`CLAIMABLE`]; `$2` is the current time, `$4` the heartbeat cutoff below which a host is
/// presumed gone. A lock is stale when:
///
/// * its holder is the instance's owner and the lease ran out (the owner is gone or too slow: its
///   commits will be fenced once another host acquires the instance); or
/// * its holder is gone (stopped, or no heartbeat since the cutoff).
///
/// Any other live holder may have the row in memory, about to deliver it: a host that claimed and
/// has not yet acquired (it then acquires the instance, or fails to and unlocks). Taking the row
/// from it would deliver it twice. A host never takes its own locked rows again either.
fn lock_free(x: &str) -> String {
    format!(
        "({x}.locked_by IS NULL OR ({x}.locked_by <> $1 AND {stale}))",
        stale = stale(x, "$2", "$4")
    )
}

/// Whether the lock on row `x` of instance `i` is stale (see [`lock_free`]), the current time and
/// the heartbeat cutoff being the parameters `now` and `cutoff`.
fn stale(x: &str, now: &str, cutoff: &str) -> String {
    format!(
        "(({x}.locked_by = i.owner AND i.lease_expires_at < {now}) \
          OR NOT EXISTS (SELECT 1 FROM hosts h WHERE h.id = {x}.locked_by \
                           AND h.stopped_at IS NULL AND h.heartbeat_at >= {cutoff}))"
    )
}

/// Whether row `x` of instance `i` is free for some host (`$1` is the current time, `$2` the
/// heartbeat cutoff): the host-independent version of [`lock_free`], for [`OperatorVerbs::activity`].
fn lock_stale(x: &str) -> String {
    format!(
        "({x}.locked_by IS NULL OR {stale})",
        stale = stale(x, "$1", "$2")
    )
}

/// `condition` on the instance `i` of row `x` (a message or a timer), as a scalar subquery: null,
/// so false, when there is no such instance.
///
/// PostgreSQL never turns a scalar subquery into a join. A query that filters its rows with one
/// reads them in the order of their index (`messages_routed` by `seq`, `timers_due` by due time),
/// looks up each row's instance by key and stops at its limit, whatever the statistics say. With
/// a join the planner chose by its statistics, and statistics taken while the tables were small
/// (autovacuum analyses them up to a minute late) made it hash every waiting instance and sort
/// every routed message: a claim took 200 ms with 100,000 instances waiting, 5 ms this way.
fn of_its_instance(x: &str, condition: &str) -> String {
    format!("(SELECT {condition} FROM instances i WHERE i.id = {x}.instance_id)")
}

fn stored_message(row: &PgRow) -> StoreResult<StoredMessage> {
    Ok(StoredMessage {
        seq: col(row, "seq")?,
        id: col(row, "id")?,
        message_type: col(row, "message_type")?,
        kind: col_word(row, "kind")?,
        properties: col_json(row, "properties")?,
        body: col_json(row, "body")?,
        instance_id: col(row, "instance_id")?,
        subscription_id: col(row, "subscription_id")?,
        published_at: col(row, "published_at")?,
        delivery_count: i64::from(col::<i32>(row, "delivery_count")?),
    })
}

#[async_trait]
impl MessageBox for PostgresStore {
    async fn publish(
        &self,
        messages: Vec<NewMessage>,
        now: DateTime<Utc>,
    ) -> StoreResult<Vec<PublishOutcome>> {
        let mut tx = self.write().await?;
        lock_routes(&mut tx, routed_types(&messages), []).await?;
        let batch: Vec<_> = messages.iter().map(|msg| (msg, now)).collect();
        let out = batch::publish_all(&mut tx, &batch).await?;
        if out.iter().any(|o| !matches!(o, PublishOutcome::Duplicate)) {
            notify(&mut tx).await?;
        }
        commit(tx).await?;
        Ok(out)
    }

    async fn start_instances(
        &self,
        instances: Vec<NewInstance>,
        holder: Option<Holder<'_>>,
        now: DateTime<Utc>,
    ) -> StoreResult<Vec<HeldStart>> {
        let starts: Vec<_> = instances.iter().map(|inst| (inst, now)).collect();
        // Held starts leave nothing for other hosts to claim: no `NOTIFY`, so the one statement
        // needs no transaction.
        if instances.is_empty() || holder.is_some() {
            return batch::start_instances(&self.pool, &starts, holder).await;
        }
        let mut tx = self.write().await?;
        let held = batch::start_instances(&mut *tx, &starts, holder).await?;
        notify(&mut tx).await?;
        commit(tx).await?;
        Ok(held)
    }

    // Up to half the batch: messages for instances this host already holds (they are in memory,
    // and finishing work in flight keeps it from going idle and being dehydrated only to be
    // loaded again); the rest in publication order. One instance's messages keep their order.
    async fn claim_messages(
        &self,
        host: &str,
        now: DateTime<Utc>,
        limit: u32,
    ) -> StoreResult<Vec<StoredMessage>> {
        let rows = self.claim(&CLAIM_MESSAGES, host, now, limit).await?;
        let mut out = Vec::with_capacity(rows.len());
        let mut unreadable = Vec::new();
        for row in &rows {
            match stored_message(row) {
                Ok(message) => out.push(message),
                Err(e) => unreadable.push((col::<i64>(row, "seq")?, e.to_string())),
            }
        }
        if !unreadable.is_empty() {
            let mut tx = self.write().await?;
            bury_messages(&mut tx, &unreadable, now).await?;
            commit(tx).await?;
        }
        out.sort_by_key(|m| m.seq);
        Ok(out)
    }

    async fn claim_timers(
        &self,
        host: &str,
        now: DateTime<Utc>,
        limit: u32,
    ) -> StoreResult<Vec<DueTimer>> {
        let rows = self.claim(&CLAIM_TIMERS, host, now, limit).await?;
        let mut out = rows
            .iter()
            .map(|row| {
                Ok(DueTimer {
                    instance_id: col(row, "instance_id")?,
                    name: col(row, "name")?,
                    due_at: col(row, "due_at")?,
                })
            })
            .collect::<StoreResult<Vec<_>>>()?;
        out.sort_by_key(|t| t.due_at);
        Ok(out)
    }

    async fn acquire(
        &self,
        host: &str,
        ids: &[Uuid],
        now: DateTime<Utc>,
        lease_until: DateTime<Utc>,
    ) -> StoreResult<Vec<InstanceRecord>> {
        self.learn_lease(now, lease_until);
        let mut tx = self.write().await?;
        let mut out = Vec::with_capacity(ids.len());
        // One statement; its rows are locked in index order, the same in every host.
        let rows = sqlx::query(
            "UPDATE instances SET owner = $1, lease_expires_at = $3, epoch = epoch + 1, \
             status = 'running' \
             WHERE id = ANY($4) AND status IN ('running', 'dehydrated') \
               AND (owner IS NULL OR owner = $1 OR lease_expires_at < $2) \
             RETURNING id, orchestration, version, status, state, engine_state, epoch, history_seq, parent_id",
        )
        .bind(host)
        .bind(now)
        .bind(lease_until)
        .bind(ids)
        .fetch_all(&mut *tx)
        .await
        .map_err(|e| map_err("acquire", e))?;
        for row in rows {
            match instance_record(&row) {
                Ok(record) => out.push(record),
                Err(e) => {
                    // Left out of the answer, as if another host held it: suspended with the
                    // reason, so that it is not claimed again until an operator fixes the row
                    // and resumes it.
                    let id: Uuid = col(&row, "id")?;
                    let why = format!("its instances row cannot be read: {e}");
                    tracing::error!(instance.id = %id, error = %why, "an instance cannot be loaded; suspended");
                    sqlx::query(
                        "UPDATE instances SET status = 'suspended', last_error = $2, \
                         epoch = epoch + 1, owner = NULL, lease_expires_at = NULL, updated_at = $3 \
                         WHERE id = $1",
                    )
                    .bind(id)
                    .bind(&why)
                    .bind(now)
                    .execute(&mut *tx)
                    .await
                    .map_err(|e| map_err("acquire", e))?;
                }
            }
        }
        if !out.is_empty() {
            // Whatever other hosts hold of these instances they cannot commit any more (the epoch
            // moved): a previous owner whose lease ran out, or a host that claimed but lost the
            // race to acquire. Release it so that it is delivered again, here (G3).
            let acquired: Vec<Uuid> = out.iter().map(|r| r.id).collect();
            sqlx::query(
                "UPDATE messages SET locked_by = NULL \
                 WHERE instance_id = ANY($1) AND status = 'routed' AND locked_by <> $2",
            )
            .bind(&acquired)
            .bind(host)
            .execute(&mut *tx)
            .await
            .map_err(|e| map_err("acquire", e))?;
            sqlx::query(
                "UPDATE timers SET locked_by = NULL WHERE instance_id = ANY($1) AND locked_by <> $2",
            )
            .bind(&acquired)
            .bind(host)
            .execute(&mut *tx)
            .await
            .map_err(|e| map_err("acquire", e))?;
        }
        commit(tx).await?;
        Ok(out)
    }

    async fn heartbeat(
        &self,
        host: &str,
        now: DateTime<Utc>,
        lease_until: DateTime<Utc>,
    ) -> StoreResult<()> {
        self.learn_lease(now, lease_until);
        let mut tx = self.write().await?;
        // Rows a commit of ours holds right now are skipped (renewed at the next beat); taking
        // them in id order keeps the beat from deadlocking with commits.
        sqlx::query(
            "UPDATE instances SET lease_expires_at = $2 WHERE id IN ( \
               SELECT id FROM instances WHERE owner = $1 ORDER BY id FOR UPDATE SKIP LOCKED)",
        )
        .bind(host)
        .bind(lease_until)
        .execute(&mut *tx)
        .await
        .map_err(|e| map_err("heartbeat", e))?;
        // A host another one marked stopped while it was slow is back.
        sqlx::query("UPDATE hosts SET heartbeat_at = $2, stopped_at = NULL WHERE id = $1")
            .bind(host)
            .bind(now)
            .execute(&mut *tx)
            .await
            .map_err(|e| map_err("heartbeat", e))?;
        commit(tx).await
    }

    async fn release(&self, host: &str, now: DateTime<Utc>) -> StoreResult<()> {
        let mut tx = self.write().await?;
        for sql in [
            "UPDATE messages SET locked_by = NULL, delivery_count = GREATEST(delivery_count - 1, 0) \
             WHERE locked_by = $1 AND status = 'routed'",
            "UPDATE timers SET locked_by = NULL WHERE locked_by = $1",
            "UPDATE outbox SET locked_by = NULL, locked_until = NULL WHERE locked_by = $1",
            "UPDATE instances SET owner = NULL, lease_expires_at = NULL, \
               status = CASE WHEN status = 'running' AND state IS NOT NULL THEN 'dehydrated' ELSE status END \
             WHERE owner = $1",
        ] {
            sqlx::query(sql)
                .bind(host)
                .execute(&mut *tx)
                .await
                .map_err(|e| map_err("release", e))?;
        }
        sqlx::query("UPDATE hosts SET stopped_at = $2, heartbeat_at = $2 WHERE id = $1")
            .bind(host)
            .bind(now)
            .execute(&mut *tx)
            .await
            .map_err(|e| map_err("release", e))?;
        commit(tx).await
    }

    async fn unlock(&self, host: &str, ids: &[Uuid], failed: &[i64]) -> StoreResult<()> {
        let mut tx = self.write().await?;
        sqlx::query(
            "UPDATE messages SET locked_by = NULL, \
               delivery_count = CASE WHEN seq = ANY($3) THEN delivery_count ELSE GREATEST(delivery_count - 1, 0) END \
             WHERE instance_id = ANY($1) AND locked_by = $2 AND status = 'routed'",
        )
        .bind(ids)
        .bind(host)
        .bind(failed)
        .execute(&mut *tx)
        .await
        .map_err(|e| map_err("unlock", e))?;
        sqlx::query(
            "UPDATE timers SET locked_by = NULL WHERE instance_id = ANY($1) AND locked_by = $2",
        )
        .bind(ids)
        .bind(host)
        .execute(&mut *tx)
        .await
        .map_err(|e| map_err("unlock", e))?;
        commit(tx).await
    }

    async fn commit(&self, points: &[PersistencePoint]) -> StoreResult<Vec<CommitOutcome>> {
        if let Some(out) = batch::write_alone(self, points).await? {
            return Ok(out);
        }
        let mut tx = self.write().await?;
        let mut changes = Reroute::default();
        let out = batch::write_points(&mut tx, points, &mut changes).await?;
        // Published once the group holds its routing locks (below).
        let messages: Vec<(&NewMessage, DateTime<Utc>)> = points
            .iter()
            .zip(&out)
            .filter(|(_, outcome)| **outcome == CommitOutcome::Committed)
            .flat_map(|(p, _)| p.messages.iter().map(|m| (m, p.at)))
            .collect();
        // The routing locks, taken last so that they are held briefly: shared for the messages
        // the points publish, exclusive for the types whose subscriptions they added or removed.
        // Taken in one sorted pass, after the rows: every writer orders them the same way.
        lock_routes(
            &mut tx,
            messages
                .iter()
                .filter(|(m, _)| m.target.is_none())
                .map(|(m, _)| m.message_type.as_str()),
            changes.lock_types(),
        )
        .await?;
        // A publisher that read a removed subscription before it was removed has committed by
        // now: unroute what it routed there.
        if !changes.cancelled.is_empty() {
            let cancelled = std::mem::take(&mut changes.cancelled);
            unroute(&mut tx, &cancelled, &mut changes).await?;
        }
        batch::publish_all(&mut tx, &messages).await?;
        let now = points.iter().map(|p| p.at).max().unwrap_or_default();
        reroute(&mut tx, &changes, now).await?;
        // Other hosts are woken only for work they may claim; the committing host follows its
        // own (a NOTIFY for every commit woke it for an empty claim after each point).
        let claimable = points
            .iter()
            .zip(&out)
            .any(|(p, o)| *o == CommitOutcome::Committed && p.makes_claimable_work());
        if claimable || !changes.seqs.is_empty() {
            notify(&mut tx).await?;
        }
        commit(tx).await?;
        Ok(out)
    }

    async fn subscribe(
        &self,
        host: &str,
        receives: &[NewReceives],
        now: DateTime<Utc>,
    ) -> StoreResult<Vec<CommitOutcome>> {
        let mut tx = self.write().await?;
        let mut changes = Reroute::default();
        let asked: Vec<(Uuid, i64)> = receives.iter().map(|r| (r.instance_id, r.epoch)).collect();
        let held = batch::still_held(&mut tx, host, &asked).await?;
        let (rows, out) = held_receives(receives, &held, now);
        batch::insert_subscriptions(&mut tx, &rows).await?;
        changes.subscriptions.extend(
            rows.iter()
                .map(|(_, sub, _)| (sub.message_type.clone(), sub.correlation.clone())),
        );
        // As in `commit`: the routing locks after the rows.
        lock_routes(&mut tx, [], changes.lock_types()).await?;
        reroute(&mut tx, &changes, now).await?;
        notify(&mut tx).await?;
        commit(tx).await?;
        Ok(out)
    }

    async fn note_unrunnable(&self, id: Uuid, error: &str, now: DateTime<Utc>) -> StoreResult<()> {
        let mut tx = self.write().await?;
        // The lease goes (another host may have the definition); the claimed messages stay locked
        // to this host so that it does not pick them up again and again.
        sqlx::query(
            "UPDATE instances SET last_error = $2, updated_at = $3, owner = NULL, lease_expires_at = NULL \
             WHERE id = $1",
        )
            .bind(id)
            .bind(error)
            .bind(now)
            .execute(&mut *tx)
            .await
            .map_err(|e| map_err("note unrunnable", e))?;
        commit(tx).await
    }

    async fn claim_outbox(
        &self,
        host: &str,
        now: DateTime<Utc>,
        lock_until: DateTime<Utc>,
        limit: u32,
        ordered: &[String],
    ) -> StoreResult<Vec<OutboxRow>> {
        let mut tx = self.write().await?;
        let rows = sqlx::query(
            "UPDATE outbox SET locked_by = $1, locked_until = $3 WHERE id IN ( \
               SELECT o.id FROM outbox o WHERE o.status = 'pending' AND o.next_attempt_at <= $2 \
                 AND (o.locked_until IS NULL OR o.locked_until < $2 OR (o.locked_by <> $1 AND NOT EXISTS ( \
                   SELECT 1 FROM hosts h WHERE h.id = o.locked_by AND h.stopped_at IS NULL \
                     AND h.heartbeat_at >= $5))) \
                 AND NOT (o.port = ANY($6)) \
               ORDER BY o.next_attempt_at LIMIT $4 \
               FOR UPDATE OF o SKIP LOCKED) \
             RETURNING id, instance_id, port, message_type, body, expects_reply, attempts",
        )
        .bind(host)
        .bind(now)
        .bind(lock_until)
        .bind(i64::from(limit))
        .bind(self.host_cutoff(now))
        .bind(ordered)
        .fetch_all(&mut *tx)
        .await
        .map_err(|e| map_err("claim outbox", e))?;
        let mut out = Vec::with_capacity(rows.len());
        for row in &rows {
            match outbox_row(row) {
                Ok(send) => out.push(send),
                // Dead-lettered in the claim's transaction: never claimed again, never a stop
                // for the sends beside it.
                Err(e) => bury_send(&mut tx, row, &e.to_string(), now).await?,
            }
        }
        commit(tx).await?;
        Ok(out)
    }

    async fn claim_ordered(
        &self,
        host: &str,
        port: &str,
        now: DateTime<Utc>,
        lock_until: DateTime<Utc>,
    ) -> StoreResult<Option<OutboxRow>> {
        let mut tx = self.write().await?;
        let head = sqlx::query(
            "SELECT o.id, o.instance_id, o.port, o.message_type, o.body, o.expects_reply, o.attempts, \
             o.status, o.next_attempt_at, o.locked_by, o.locked_until, EXISTS (SELECT 1 FROM hosts h \
               WHERE h.id = o.locked_by AND h.stopped_at IS NULL AND h.heartbeat_at >= $2) AS holder_alive \
             FROM outbox o WHERE o.port = $1 AND o.status IN ('pending', 'held', 'give_up') \
             ORDER BY o.seq LIMIT 1 FOR UPDATE",
        )
        .bind(port)
        .bind(self.host_cutoff(now))
        .fetch_optional(&mut *tx)
        .await
        .map_err(|e| map_err("claim ordered", e))?;
        let Some(head) = head else { return Ok(None) };
        let status: String = col(&head, "status")?;
        let due = col::<DateTime<Utc>>(&head, "next_attempt_at")? <= now;
        let locked_by: Option<String> = col(&head, "locked_by")?;
        let locked_until: Option<DateTime<Utc>> = col(&head, "locked_until")?;
        let alive: bool = col(&head, "holder_alive")?;
        let locked_elsewhere = locked_by.is_some_and(|by| by != host)
            && alive
            && locked_until.is_some_and(|until| until >= now);
        if status != "pending" || !due || locked_elsewhere {
            return Ok(None);
        }
        let row = outbox_row(&head)?;
        sqlx::query("UPDATE outbox SET locked_by = $2, locked_until = $3 WHERE id = $1")
            .bind(&row.id)
            .bind(host)
            .bind(lock_until)
            .execute(&mut *tx)
            .await
            .map_err(|e| map_err("claim ordered", e))?;
        commit(tx).await?;
        Ok(Some(row))
    }

    async fn renew_outbox(
        &self,
        host: &str,
        ids: &[String],
        lock_until: DateTime<Utc>,
    ) -> StoreResult<()> {
        let mut tx = self.write().await?;
        sqlx::query(
            "UPDATE outbox SET locked_until = $2 WHERE locked_by = $1 AND status = 'pending' \
             AND id = ANY($3)",
        )
        .bind(host)
        .bind(lock_until)
        .bind(ids)
        .execute(&mut *tx)
        .await
        .map_err(|e| map_err("renew outbox", e))?;
        commit(tx).await
    }

    async fn record_deliveries(
        &self,
        outcomes: Vec<DeliveryOutcome>,
        now: DateTime<Utc>,
    ) -> StoreResult<()> {
        let mut tx = self.write().await?;
        for outcome in &outcomes {
            match outcome {
                DeliveryOutcome::Delivered {
                    row,
                    reply,
                    via_backup,
                } => {
                    let done = sqlx::query(
                        "UPDATE outbox SET status = 'delivered', attempts = attempts + 1, delivered_at = $2, \
                         last_attempt_at = $2, delivered_via = $3, locked_by = NULL, locked_until = NULL, \
                         last_error = NULL WHERE id = $1 AND status IN ('pending', 'held', 'give_up')",
                    )
                    .bind(&row.id)
                    .bind(now)
                    .bind(if *via_backup { "backup" } else { "primary" })
                    .execute(&mut *tx)
                    .await
                    .map_err(|e| map_err("record deliveries", e))?
                    .rows_affected();
                    if let (Some(reply), 1) = (reply, done) {
                        let mut msg = NewMessage::to_instance(
                            row.reply_id(),
                            format!("{}.reply", row.message_type),
                            MessageKind::Reply,
                            reply.clone(),
                            row.instance_id,
                        );
                        msg.properties.insert("request_id".into(), row.id.clone());
                        msg.properties.insert("port".into(), row.port.clone());
                        publish_one(&mut tx, &msg, now).await?;
                        notify(&mut tx).await?;
                    }
                }
                DeliveryOutcome::Retry {
                    row,
                    error,
                    retry_at,
                } => {
                    sqlx::query(
                        "UPDATE outbox SET attempts = attempts + 1, next_attempt_at = $2, last_error = $3, \
                         last_attempt_at = $4, locked_by = NULL, locked_until = NULL \
                         WHERE id = $1 AND status = 'pending'",
                    )
                    .bind(&row.id)
                    .bind(retry_at)
                    .bind(error)
                    .bind(now)
                    .execute(&mut *tx)
                    .await
                    .map_err(|e| map_err("record deliveries", e))?;
                }
                DeliveryOutcome::Held { row, error } => {
                    sqlx::query(
                        "UPDATE outbox SET status = 'held', attempts = attempts + 1, last_error = $2, \
                         last_attempt_at = $3, locked_by = NULL, locked_until = NULL \
                         WHERE id = $1 AND status = 'pending'",
                    )
                    .bind(&row.id)
                    .bind(error)
                    .bind(now)
                    .execute(&mut *tx)
                    .await
                    .map_err(|e| map_err("record deliveries", e))?;
                }
                DeliveryOutcome::Dead { row, error } => {
                    let done = sqlx::query(
                        "UPDATE outbox SET status = 'dead', attempts = attempts + 1, last_error = $2, \
                         last_attempt_at = $3, locked_by = NULL, locked_until = NULL \
                         WHERE id = $1 AND status = 'pending'",
                    )
                    .bind(&row.id)
                    .bind(error)
                    .bind(now)
                    .execute(&mut *tx)
                    .await
                    .map_err(|e| map_err("record deliveries", e))?
                    .rows_affected();
                    if done == 1 {
                        dead_letter_send(&mut tx, row, error, row.attempts + 1, now).await?;
                    }
                }
            }
        }
        commit(tx).await
    }

    async fn listen(&self, wake: Arc<Notify>, stop: CancellationToken) {
        let mut backoff = std::time::Duration::from_millis(100);
        loop {
            let listening = async {
                let mut listener = sqlx::postgres::PgListener::connect_with(&self.pool).await?;
                listener.listen(WORK_CHANNEL).await?;
                tracing::debug!("listening for new work");
                // Work may have been committed before LISTEN took effect (at start, or while the
                // connection was down): look once.
                wake.notify_one();
                loop {
                    // `None`: the connection was lost and is re-established on the next call;
                    // wake anyway, as a notification may have been missed.
                    let _ = listener.try_recv().await?;
                    wake.notify_one();
                }
                #[allow(unreachable_code)]
                Ok::<(), sqlx::Error>(())
            };
            tokio::select! {
                _ = stop.cancelled() => return,
                result = listening => {
                    if let Err(e) = result {
                        tracing::warn!(error = %e, retry_in = ?backoff, "LISTEN connection lost; polling until it is back");
                    }
                }
            }
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(std::time::Duration::from_secs(5));
        }
    }
}

#[async_trait]
impl OperatorVerbs for PostgresStore {
    async fn control(
        &self,
        id: Uuid,
        action: ControlAction,
        now: DateTime<Utc>,
    ) -> StoreResult<InstanceStatus> {
        let mut tx = self.write().await?;
        let status = control_in(&mut tx, id, &action, now).await?;
        commit(tx).await?;
        Ok(status)
    }

    async fn give_up_sends(
        &self,
        ids: &[String],
        reason: &str,
        now: DateTime<Utc>,
    ) -> StoreResult<u64> {
        let mut tx = self.write().await?;
        sqlx::query(
            "UPDATE outbox SET status = 'give_up', last_error = $2, locked_by = NULL, locked_until = NULL \
             WHERE status IN ('pending', 'held') AND id = ANY($1)",
        )
        .bind(ids)
        .bind(reason)
        .execute(&mut *tx)
        .await
        .map_err(|e| map_err("give up sends", e))?;
        let rows = sqlx::query(
            "UPDATE outbox SET status = 'dead', locked_by = NULL, locked_until = NULL \
             WHERE status = 'give_up' \
             RETURNING id, instance_id, port, message_type, body, expects_reply, attempts, last_error",
        )
        .fetch_all(&mut *tx)
        .await
        .map_err(|e| map_err("give up sends", e))?;
        for r in &rows {
            let row = outbox_row(r)?;
            let why: Option<String> = col(r, "last_error")?;
            let why = why.unwrap_or_else(|| "dead-lettered by an operator".to_owned());
            let attempts = row.attempts;
            dead_letter_send(&mut tx, &row, &why, attempts, now).await?;
        }
        commit(tx).await?;
        Ok(rows.len() as u64)
    }

    async fn resume_send(&self, id: &str, now: DateTime<Utc>) -> StoreResult<bool> {
        let mut tx = self.write().await?;
        let done = sqlx::query(
            "UPDATE outbox SET status = 'pending', attempts = 0, next_attempt_at = $2, \
             locked_by = NULL, locked_until = NULL WHERE id = $1 AND status = 'held'",
        )
        .bind(id)
        .bind(now)
        .execute(&mut *tx)
        .await
        .map_err(|e| map_err("resume send", e))?
        .rows_affected();
        commit(tx).await?;
        Ok(done == 1)
    }

    async fn dead_letters(&self, limit: u32) -> StoreResult<Vec<DeadLetter>> {
        let rows = sqlx::query(
            "SELECT id, instance_id, port, message_type, body, reason, attempts, dead_at \
             FROM dead_letters ORDER BY dead_at DESC, id LIMIT $1",
        )
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await
        .map_err(|e| map_err("dead letters", e))?;
        Ok(super::readable(
            rows.iter().map(dead_letter_row),
            "listing dead letters",
        ))
    }

    async fn dead_letter(&self, id: &str) -> StoreResult<Option<DeadLetter>> {
        let row = sqlx::query(
            "SELECT id, instance_id, port, message_type, body, reason, attempts, dead_at \
             FROM dead_letters WHERE id = $1",
        )
        .bind(id)
        .fetch_optional(&self.pool)
        .await
        .map_err(|e| map_err("dead letter", e))?;
        row.as_ref().map(dead_letter_row).transpose()
    }

    async fn resubmit_dead_letter(&self, id: &str, now: DateTime<Utc>) -> StoreResult<bool> {
        let mut tx = self.write().await?;
        let done = sqlx::query(
            "UPDATE outbox SET status = 'pending', attempts = 0, next_attempt_at = $2, \
             locked_by = NULL, locked_until = NULL, delivered_via = NULL \
             WHERE id = $1 AND status = 'dead'",
        )
        .bind(id)
        .bind(now)
        .execute(&mut *tx)
        .await
        .map_err(|e| map_err("resubmit dead letter", e))?
        .rows_affected();
        if done == 1 {
            sqlx::query("DELETE FROM dead_letters WHERE id = $1")
                .bind(id)
                .execute(&mut *tx)
                .await
                .map_err(|e| map_err("resubmit dead letter", e))?;
        }
        commit(tx).await?;
        Ok(done == 1)
    }

    async fn purge_dead_letters(
        &self,
        ids: &[String],
        before: Option<DateTime<Utc>>,
    ) -> StoreResult<u64> {
        let mut tx = self.write().await?;
        let query = if !ids.is_empty() {
            sqlx::query("DELETE FROM dead_letters WHERE id = ANY($1)").bind(ids)
        } else if let Some(before) = before {
            sqlx::query("DELETE FROM dead_letters WHERE dead_at < $1").bind(before)
        } else {
            sqlx::query("DELETE FROM dead_letters")
        };
        let done = query
            .execute(&mut *tx)
            .await
            .map_err(|e| map_err("purge dead letters", e))?
            .rows_affected();
        commit(tx).await?;
        Ok(done)
    }

    async fn list_instances(
        &self,
        status: Option<InstanceStatus>,
        limit: u32,
    ) -> StoreResult<Vec<InstanceSummary>> {
        let rows = sqlx::query(&format!(
            "SELECT {SUMMARY_COLUMNS} FROM instances WHERE ($1::text IS NULL OR status = $1) \
             ORDER BY updated_at DESC, id LIMIT $2"
        ))
        .bind(status.map(InstanceStatus::as_str))
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await
        .map_err(|e| map_err("list instances", e))?;
        Ok(super::readable(
            rows.iter().map(summary_from_row),
            "listing instances",
        ))
    }

    async fn instance_summaries(&self, ids: &[Uuid]) -> StoreResult<Vec<InstanceSummary>> {
        let rows = sqlx::query(&format!(
            "SELECT {SUMMARY_COLUMNS} FROM instances WHERE id = ANY($1)"
        ))
        .bind(ids)
        .fetch_all(&self.pool)
        .await
        .map_err(|e| map_err("instance summaries", e))?;
        rows.iter().map(summary_from_row).collect()
    }

    async fn instance_detail(&self, id: Uuid) -> StoreResult<Option<InstanceDetail>> {
        let Some(row) = sqlx::query(&format!(
            "SELECT {SUMMARY_COLUMNS}, state, output, next_timer_at, created_at FROM instances WHERE id = $1"
        ))
        .bind(id)
        .fetch_optional(&self.pool)
        .await
        .map_err(|e| map_err("instance detail", e))?
        else {
            return Ok(None);
        };
        let history = sqlx::query(
            "SELECT seq, reason, step, status, at, detail FROM history WHERE instance_id = $1 ORDER BY seq",
        )
        .bind(id)
        .fetch_all(&self.pool)
        .await
        .map_err(|e| map_err("instance detail", e))?
        .iter()
        .map(|h| {
            Ok(HistoryRow {
                seq: col(h, "seq")?,
                reason: col_word(h, "reason")?,
                step: col(h, "step")?,
                status: col_word(h, "status")?,
                at: col(h, "at")?,
                detail: col(h, "detail")?,
            })
        })
        .collect::<StoreResult<Vec<_>>>()?;
        let (pending, zombies): (Vec<_>, Vec<_>) = sqlx::query(
            "SELECT id, message_type, status FROM messages \
             WHERE instance_id = $1 AND status IN ('routed', 'zombie') ORDER BY seq",
        )
        .bind(id)
        .fetch_all(&self.pool)
        .await
        .map_err(|e| map_err("instance detail", e))?
        .iter()
        .map(|m| {
            Ok((
                col::<String>(m, "id")?,
                col::<String>(m, "message_type")?,
                col::<String>(m, "status")?,
            ))
        })
        .collect::<StoreResult<Vec<_>>>()?
        .into_iter()
        .partition(|(_, _, status)| status == "routed");
        Ok(Some(InstanceDetail {
            summary: summary_from_row(&row)?,
            state: col(&row, "state")?,
            output: col::<Option<String>>(&row, "output")?
                .as_deref()
                .map(parse_json)
                .transpose()?,
            next_timer_at: col(&row, "next_timer_at")?,
            created_at: col(&row, "created_at")?,
            history,
            pending_messages: pending.into_iter().map(|(id, ty, _)| (id, ty)).collect(),
            zombies: zombies.into_iter().map(|(id, ty, _)| (id, ty)).collect(),
        }))
    }

    async fn activity(&self, now: DateTime<Utc>) -> StoreResult<Activity> {
        let mut activity = Activity::default();
        for row in sqlx::query("SELECT status, COUNT(*) AS n FROM instances GROUP BY status")
            .fetch_all(&self.pool)
            .await
            .map_err(|e| map_err("activity", e))?
        {
            activity
                .by_status
                .insert(col(&row, "status")?, col(&row, "n")?);
        }
        // Locks of hosts that are gone do not hide work: another host will take it over.
        activity.ready_messages = sqlx::query_scalar(&READY_MESSAGES)
            .bind(now)
            .bind(self.host_cutoff(now))
            .fetch_one(&self.pool)
            .await
            .map_err(|e| map_err("activity", e))?;
        activity.pending_sends =
            sqlx::query_scalar("SELECT COUNT(*) FROM outbox WHERE status = 'pending'")
                .fetch_one(&self.pool)
                .await
                .map_err(|e| map_err("activity", e))?;
        activity.next_timer_at = sqlx::query_scalar(&NEXT_TIMER)
            .bind(now)
            .bind(self.host_cutoff(now))
            .fetch_optional(&self.pool)
            .await
            .map_err(|e| map_err("activity", e))?;
        Ok(activity)
    }
}

#[async_trait]
impl Maintenance for PostgresStore {
    fn backend(&self) -> &'static str {
        "postgres"
    }

    async fn migrate(&self) -> StoreResult<()> {
        // The schema must exist before the migrator creates its table in it. Hosts starting
        // together would race on CREATE SCHEMA IF NOT EXISTS: serialize them.
        let mut tx = self.write().await?;
        sqlx::query("SELECT pg_advisory_xact_lock($1, 0)")
            .bind(SCHEMA_LOCK_CLASS)
            .execute(&mut *tx)
            .await
            .map_err(|e| map_err("migrate", e))?;
        // CREATE SCHEMA IF NOT EXISTS needs CREATE on the database even when the schema exists:
        // an owner role given the schema by an administrator (docs/operations.md) has none.
        let exists: bool =
            sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = $1)")
                .bind(SCHEMA)
                .fetch_one(&mut *tx)
                .await
                .map_err(|e| map_err("migrate", e))?;
        if !exists {
            sqlx::query(&format!("CREATE SCHEMA IF NOT EXISTS {SCHEMA}"))
                .execute(&mut *tx)
                .await
                .map_err(|e| map_err("migrate", e))?;
        }
        commit(tx).await?;
        MIGRATOR.run(&self.pool).await?;
        Ok(())
    }

    async fn check_schema(&self) -> StoreResult<()> {
        // `to_regclass` looks along the search path (the schema `cairn`): NULL when there is no
        // such table, or the role may not use the schema.
        let table: Option<String> =
            sqlx::query_scalar("SELECT CAST(to_regclass('_sqlx_migrations') AS TEXT)")
                .fetch_one(&self.pool)
                .await
                .map_err(|e| map_err("check schema", e))?;
        let applied = match table {
            None => None,
            Some(_) => Some(
                sqlx::query_as::<_, (i64, bool, Vec<u8>)>(
                    "SELECT version, success, checksum FROM _sqlx_migrations ORDER BY version",
                )
                .fetch_all(&self.pool)
                .await
                .map_err(|e| map_err("check schema", e))?,
            ),
        };
        compare_schema(&MIGRATOR, applied).map_err(StoreError::Schema)
    }

    async fn recover(&self, host: &str, now: DateTime<Utc>) -> StoreResult<()> {
        // Other hosts may be alive: nothing of theirs is released here. Their leases run out on
        // their own and their locks go stale (see the module docs); this only records who is here
        // and marks as stopped the hosts that stopped beating.
        let mut tx = self.write().await?;
        sqlx::query(
            "UPDATE hosts SET stopped_at = heartbeat_at \
             WHERE stopped_at IS NULL AND heartbeat_at < $2 AND id <> $1",
        )
        .bind(host)
        .bind(self.host_cutoff(now))
        .execute(&mut *tx)
        .await
        .map_err(|e| map_err("recover", e))?;
        sqlx::query(
            "INSERT INTO hosts (id, name, pid, started_at, heartbeat_at) VALUES ($1, $2, $3, $4, $4) \
             ON CONFLICT (id) DO UPDATE SET name = excluded.name, pid = excluded.pid, \
               started_at = excluded.started_at, heartbeat_at = excluded.heartbeat_at, stopped_at = NULL",
        )
        .bind(host)
        .bind(hostname())
        .bind(i32::try_from(std::process::id()).unwrap_or(i32::MAX))
        .bind(now)
        .execute(&mut *tx)
        .await
        .map_err(|e| map_err("recover", e))?;
        commit(tx).await
    }

    async fn sync_activations(
        &self,
        activations: &[Activation],
        now: DateTime<Utc>,
    ) -> StoreResult<()> {
        let mut tx = self.write().await?;
        let changes = Reroute {
            types: activations.iter().map(|a| a.message_type.clone()).collect(),
            ..Reroute::default()
        };
        lock_routes(&mut tx, [], changes.lock_types()).await?;
        for a in activations {
            sqlx::query(
                "INSERT INTO subscriptions (id, message_type, orchestration, version, correlation_keys, created_at) \
                 VALUES ($1, $2, $3, $4, $5, $6) \
                 ON CONFLICT (message_type, orchestration) WHERE instance_id IS NULL \
                 DO UPDATE SET version = excluded.version, correlation_keys = excluded.correlation_keys",
            )
            .bind(Uuid::new_v4())
            .bind(&a.message_type)
            .bind(&a.orchestration)
            .bind(int4(a.version))
            .bind(&a.convoy)
            .bind(now)
            .execute(&mut *tx)
            .await
            .map_err(|e| map_err("sync activations", e))?;
        }
        reroute(&mut tx, &changes, now).await?;
        commit(tx).await
    }

    async fn apply_controls(
        &self,
        host: &str,
        now: DateTime<Utc>,
        limit: u32,
    ) -> StoreResult<Vec<ControlApplied>> {
        let mut out = Vec::new();
        // A read first: most polls find nothing, and need not queue behind the writers.
        if !exists(
            &self.pool,
            "SELECT EXISTS (SELECT 1 FROM control WHERE status = 'pending')",
        )
        .await?
        {
            return Ok(out);
        }
        for _ in 0..limit {
            let mut tx = self.write().await?;
            let Some(row) = sqlx::query(
                "SELECT id, instance_id, action, reason, force FROM control WHERE status = 'pending' \
                 ORDER BY id LIMIT 1 FOR UPDATE SKIP LOCKED",
            )
            .fetch_optional(&mut *tx)
            .await
            .map_err(|e| map_err("apply controls", e))?
            else {
                break;
            };
            let request_id: i64 = col(&row, "id")?;
            let (instance_id, result) = match control_request(&row, request_id) {
                Ok(request) => (
                    Some(request.instance_id),
                    control_in(&mut tx, request.instance_id, &request.action, now).await,
                ),
                Err(e) => (None, Err(e)),
            };
            let (mut tx, status, text) = match result {
                Ok(ref status) => (tx, "done", format!("instance is now {status}")),
                // Tried again on the next poll.
                Err(e) if e.is_retryable() => return Err(e),
                // Anything else is this request's answer, never a stop for the requests behind
                // it: what the action wrote is rolled back, and the row is marked rejected
                // with the reason (locked again: another host may look at it meanwhile).
                Err(ref e) => {
                    tx.rollback()
                        .await
                        .map_err(|e| map_err("apply controls", e))?;
                    let mut tx = self.write().await?;
                    let still_pending: Option<i64> = sqlx::query_scalar(
                        "SELECT id FROM control WHERE id = $1 AND status = 'pending' \
                         FOR UPDATE SKIP LOCKED",
                    )
                    .bind(request_id)
                    .fetch_optional(&mut *tx)
                    .await
                    .map_err(|e| map_err("apply controls", e))?;
                    if still_pending.is_none() {
                        continue;
                    }
                    (tx, "rejected", e.to_string())
                }
            };
            sqlx::query(
                "UPDATE control SET status = $2, result = $3, done_at = $4, done_by = $5 WHERE id = $1",
            )
            .bind(request_id)
            .bind(status)
            .bind(&text)
            .bind(now)
            .bind(host)
            .execute(&mut *tx)
            .await
            .map_err(|e| map_err("apply controls", e))?;
            commit(tx).await?;
            out.push(ControlApplied {
                id: request_id,
                instance_id,
                result: result.map_err(|e| e.to_string()),
            });
        }
        Ok(out)
    }

    async fn housekeeping(
        &self,
        now: DateTime<Utc>,
        unrouted_before: DateTime<Utc>,
    ) -> StoreResult<Housekeeping> {
        let mut tx = self.write().await?;
        let zombies = sqlx::query(
            "UPDATE messages m SET status = 'zombie', locked_by = NULL, \
               reason = 'its instance ended (' || i.status || ') before consuming it' \
             FROM instances i WHERE i.id = m.instance_id AND m.status = 'routed' \
               AND i.status IN ('completed', 'failed', 'terminated')",
        )
        .execute(&mut *tx)
        .await
        .map_err(|e| map_err("housekeeping", e))?
        .rows_affected();
        sqlx::query(
            "INSERT INTO dead_letters (id, instance_id, port, message_type, body, reason, attempts, dead_at) \
             SELECT id, NULL, NULL, message_type, body, \
               'unrouted for longer than its time to live: ' || COALESCE(reason, ''), 0, $2 \
             FROM messages WHERE status = 'unrouted' AND published_at < $1 \
             ON CONFLICT (id) DO NOTHING",
        )
        .bind(unrouted_before)
        .bind(now)
        .execute(&mut *tx)
        .await
        .map_err(|e| map_err("housekeeping", e))?;
        let expired = sqlx::query(
            "UPDATE messages SET status = 'dead', \
               reason = 'dead-lettered after its time to live: ' || COALESCE(reason, '') \
             WHERE status = 'unrouted' AND published_at < $1",
        )
        .bind(unrouted_before)
        .execute(&mut *tx)
        .await
        .map_err(|e| map_err("housekeeping", e))?
        .rows_affected();
        commit(tx).await?;
        Ok(Housekeeping { zombies, expired })
    }

    async fn take_inbox(
        &self,
        now: DateTime<Utc>,
        limit: u32,
        max_message_bytes: usize,
    ) -> StoreResult<usize> {
        if !exists(&self.pool, "SELECT EXISTS (SELECT 1 FROM inbox)").await? {
            return Ok(0);
        }
        let mut tx = self.write().await?;
        let rows = sqlx::query(
            "SELECT id, message_id, message_type, properties, body FROM inbox \
             ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED",
        )
        .bind(i64::from(limit))
        .fetch_all(&mut *tx)
        .await
        .map_err(|e| map_err("take inbox", e))?;
        if rows.is_empty() {
            return Ok(0);
        }
        let mut parsed = Vec::with_capacity(rows.len());
        for row in &rows {
            let id: i64 = col(row, "id")?;
            parsed.push((id, inbox_row(row, id, max_message_bytes)));
        }
        let good: Vec<NewMessage> = parsed
            .iter()
            .filter_map(|(_, m)| m.as_ref().ok().cloned())
            .collect();
        lock_routes(&mut tx, routed_types(&good), []).await?;
        for (id, message) in parsed {
            let refused = match message {
                Ok(msg) => publish_or_refuse(&mut tx, id, &msg, now).await?,
                Err(reason) => Some(reason),
            };
            if let Some(reason) = refused {
                tracing::warn!(inbox.id = id, error = %reason, "an inbox row was dead-lettered");
                sqlx::query(
                    "INSERT INTO dead_letters (id, message_type, body, reason, attempts, dead_at) \
                     SELECT 'inbox-' || id, message_type, body, $2, 0, $3 FROM inbox WHERE id = $1 \
                     ON CONFLICT (id) DO NOTHING",
                )
                .bind(id)
                .bind(&reason)
                .bind(now)
                .execute(&mut *tx)
                .await
                .map_err(|e| map_err("take inbox", e))?;
            }
            sqlx::query("DELETE FROM inbox WHERE id = $1")
                .bind(id)
                .execute(&mut *tx)
                .await
                .map_err(|e| map_err("take inbox", e))?;
        }
        notify(&mut tx).await?;
        commit(tx).await?;
        Ok(rows.len())
    }

    async fn close(&self) {
        self.points.close().await;
        self.pool.close().await;
    }
}

fn hostname() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".to_owned())
}

/// An outbox row as the dispatcher sees it.
fn outbox_row(row: &PgRow) -> StoreResult<OutboxRow> {
    Ok(OutboxRow {
        id: col(row, "id")?,
        instance_id: col(row, "instance_id")?,
        port: col(row, "port")?,
        message_type: col(row, "message_type")?,
        body: col_json(row, "body")?,
        expects_reply: col(row, "expects_reply")?,
        attempts: uint(col(row, "attempts")?, "outbox.attempts")?,
    })
}

fn dead_letter_row(row: &PgRow) -> StoreResult<DeadLetter> {
    Ok(DeadLetter {
        id: col(row, "id")?,
        instance_id: col(row, "instance_id")?,
        port: col(row, "port")?,
        message_type: col(row, "message_type")?,
        body: super::dead_letter_body(&col::<String>(row, "body")?),
        reason: col(row, "reason")?,
        attempts: uint(col(row, "attempts")?, "dead_letters.attempts")?,
        dead_at: col(row, "dead_at")?,
    })
}

/// Moves a send (already marked `dead` in the outbox) to `dead_letters` and tells its instance.
async fn dead_letter_send(
    tx: &mut Tx,
    row: &OutboxRow,
    error: &str,
    attempts: u32,
    now: DateTime<Utc>,
) -> StoreResult<()> {
    sqlx::query(
        "INSERT INTO dead_letters (id, instance_id, port, message_type, body, reason, attempts, dead_at) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8) \
         ON CONFLICT (id) DO UPDATE SET reason = excluded.reason, attempts = excluded.attempts, \
         dead_at = excluded.dead_at",
    )
    .bind(&row.id)
    .bind(row.instance_id)
    .bind(&row.port)
    .bind(&row.message_type)
    .bind(row.body.to_string())
    .bind(error)
    .bind(int4(attempts))
    .bind(now)
    .execute(&mut **tx)
    .await
    .map_err(|e| map_err("dead letter send", e))?;
    let msg = NewMessage::to_instance(
        format!("{}:failed", row.id),
        format!("{}.failed", row.message_type),
        MessageKind::SendFailed,
        serde_json::json!({ "message_id": row.id, "port": row.port, "error": error }),
        row.instance_id,
    );
    publish_one(tx, &msg, now).await?;
    notify(tx).await
}

/// The throwaway-cluster harness of the integration tests, shared with this module's tests.
#[cfg(test)]
#[path = "../../../tests/support/pg.rs"]
#[allow(dead_code)]
mod pg_harness;

#[cfg(test)]
mod tests {
    //! Checks of this backend against a real server: a throwaway cluster on loopback, each test
    //! with a database of its own.

    use super::pg_harness;

    use super::*;

    /// A database error says which operation failed, and stays as retryable as before.
    #[test]
    fn a_database_error_names_the_operation_that_failed() {
        let err = map_err(
            "claim messages",
            sqlx::Error::Protocol("refused".to_owned()),
        );
        assert!(
            matches!(
                err,
                StoreError::Database {
                    operation: "claim messages",
                    ..
                }
            ),
            "{err:?}"
        );
        assert_eq!(
            err.to_string(),
            "database error in claim messages: encountered unexpected or invalid data: refused"
        );
        assert!(!err.is_retryable() && !err.is_refusal());
    }

    pub(super) async fn fresh() -> Option<PostgresStore> {
        // A database in the throwaway cluster the integration tests use (started on first use;
        // skipped with one line when PostgreSQL is missing, unless CAIRN_REQUIRE_POSTGRES=1).
        let url = pg_harness::fresh_database().await?;
        let store = PostgresStore::open(&url).await.expect("open");
        store.migrate().await.expect("migrate");
        Some(store)
    }

    pub(super) fn at(secs: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(1_800_000_000 + secs, 0).expect("valid time")
    }

    pub(super) fn point(
        id: Uuid,
        epoch: i64,
        host: &str,
        history_seq: i64,
        now: DateTime<Utc>,
    ) -> PersistencePoint {
        PersistencePoint {
            instance_id: id,
            epoch,
            host: host.to_owned(),
            reason: Reason::Dehydrate,
            detail: None,
            status: InstanceStatus::Dehydrated,
            resumable: true,
            failed: Vec::new(),
            state: Some(vec![1, 2, 3]),
            engine_state: Some(vec![4]),
            step: "Waiting".into(),
            waiting_for: "payment".into(),
            next_timer_at: None,
            last_error: None,
            output: None,
            history_seq,
            consumed: vec![],
            subscriptions: None,
            cancel_timers: vec![],
            set_timers: vec![],
            outbox: vec![],
            delivered: vec![],
            messages: vec![],
            children: vec![],
            release: false,
            at: now,
            outbox_lock_until: now + chrono::Duration::seconds(60),
            start: None,
        }
    }

    pub(super) fn new_instance(orchestration: &str) -> NewInstance {
        NewInstance {
            id: Uuid::new_v4(),
            orchestration: orchestration.into(),
            version: 1,
            parent: None,
            input: serde_json::json!({"n": 1}),
        }
    }

    async fn scalar_i64(store: &PostgresStore, sql: &str) -> i64 {
        sqlx::query_scalar(sql)
            .fetch_one(store.pool())
            .await
            .expect(sql)
    }

    #[tokio::test]
    async fn migrations_put_everything_in_the_cairn_schema_and_run_twice() {
        let Some(store) = fresh().await else { return };
        store.migrate().await.expect("second migrate is a no-op");
        let tables: Vec<String> = sqlx::query_scalar(
            "SELECT table_name::text FROM information_schema.tables WHERE table_schema = 'cairn' ORDER BY 1",
        )
        .fetch_all(store.pool())
        .await
        .expect("tables");
        assert_eq!(
            tables,
            [
                "_sqlx_migrations",
                "control",
                "dead_letters",
                "history",
                "hosts",
                "inbox",
                "instances",
                "messages",
                "outbox",
                "subscription_keys",
                "subscriptions",
                "timers"
            ]
        );
        assert_eq!(store.backend(), "postgres");
    }

    #[tokio::test]
    async fn a_publish_wakes_a_listener() {
        let Some(store) = fresh().await else { return };
        let wake = Arc::new(tokio::sync::Notify::new());
        let stop = tokio_util::sync::CancellationToken::new();
        let listener = {
            let (store, wake, stop) = (store.clone(), wake.clone(), stop.clone());
            tokio::spawn(async move { store.listen(wake, stop).await })
        };
        tokio::time::sleep(Duration::from_millis(300)).await;
        let notified = wake.notified();
        let msg =
            NewMessage::published("w1", "nobody.cares", serde_json::json!({}), BTreeMap::new());
        store.publish(vec![msg], at(0)).await.expect("publish");
        tokio::time::timeout(Duration::from_secs(2), notified)
            .await
            .expect("woken by the notification");
        stop.cancel();
        listener.await.expect("listener");
    }

    /// An instance held by `host-a` under epoch 1, whose points are written alone (on the
    /// kept connection, once it is connected).
    async fn held_instance(store: &PostgresStore) -> Uuid {
        let now = at(0);
        store.recover("host-a", now).await.expect("recover");
        let inst = new_instance("order");
        store
            .start_instances(vec![inst.clone()], None, now)
            .await
            .expect("start");
        let lease = now + chrono::Duration::seconds(30);
        let records = store
            .acquire("host-a", &[inst.id], now, lease)
            .await
            .expect("acquire");
        assert_eq!(records[0].epoch, 1);
        inst.id
    }

    /// Commits points of `id` from `seq` on until the kept connection is connected; returns
    /// its server process and the next seq.
    async fn connect_kept(store: &PostgresStore, id: Uuid, mut seq: i64) -> (i32, i64) {
        for _ in 0..200 {
            let out = store
                .commit(&[point(id, 1, "host-a", seq, at(seq))])
                .await
                .expect("commit");
            assert_eq!(out, [CommitOutcome::Committed]);
            seq += 1;
            if let Some(pid) = store.points.backend_pid().await {
                return (pid, seq);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("the kept connection never connected");
    }

    #[tokio::test]
    async fn a_point_on_a_lost_kept_connection_fails_retryably_and_the_next_reconnects() {
        let Some(store) = fresh().await else { return };
        let id = held_instance(&store).await;
        let (pid, seq) = connect_kept(&store, id, 1).await;
        sqlx::query("SELECT pg_terminate_backend($1)")
            .bind(pid)
            .execute(store.pool())
            .await
            .expect("terminate");
        let history = scalar_i64(&store, "SELECT COUNT(*) FROM history").await;

        let err = store
            .commit(&[point(id, 1, "host-a", seq, at(seq))])
            .await
            .expect_err("the kept connection is gone");
        assert!(err.is_retryable(), "{err:?}");
        assert_eq!(
            scalar_i64(&store, "SELECT COUNT(*) FROM history").await,
            history,
            "the failed point wrote nothing"
        );
        // The host tries the point again: it is written, and the kept connection is replaced.
        let (new_pid, _) = connect_kept(&store, id, seq).await;
        assert_ne!(new_pid, pid);
        assert_eq!(
            scalar_i64(
                &store,
                &format!("SELECT COUNT(*) FROM history WHERE seq = {seq}")
            )
            .await,
            1
        );
    }

    #[tokio::test]
    async fn a_point_dropped_mid_statement_takes_the_kept_connection_with_it() {
        let Some(store) = fresh().await else { return };
        let id = held_instance(&store).await;
        let (pid, seq) = connect_kept(&store, id, 1).await;

        // Dropped before it says how its statement ended: the connection's state is unknown.
        let conn = store.point_connection().await.expect("connection");
        assert!(matches!(conn, PointConnection::Kept(_)));
        drop(conn);
        assert_eq!(store.points.backend_pid().await, None);

        // One that ends cleanly keeps it.
        let (new_pid, seq) = connect_kept(&store, id, seq).await;
        assert_ne!(new_pid, pid);
        let mut conn = store.point_connection().await.expect("connection");
        assert!(matches!(conn, PointConnection::Kept(_)));
        let refused = sqlx::query("SELECT * FROM no_such_table")
            .execute(&mut *conn)
            .await
            .map(|_| ())
            .map_err(|e| {
                map_err(
                    "a point dropped mid statement takes the kept connection with it",
                    e,
                )
            });
        conn.ended(&refused);
        drop(conn);
        assert_eq!(store.points.backend_pid().await, Some(new_pid));
        connect_kept(&store, id, seq).await;
    }

    #[tokio::test]
    async fn a_killed_connection_is_retryable() {
        let Some(store) = fresh().await else { return };
        let mut conn = store.pool().acquire().await.expect("connection");
        let pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
            .fetch_one(&mut *conn)
            .await
            .expect("pid");
        sqlx::query("SELECT pg_terminate_backend($1)")
            .bind(pid)
            .execute(store.pool())
            .await
            .expect("terminate");
        let err = sqlx::query("SELECT 1")
            .execute(&mut *conn)
            .await
            .map_err(|e| map_err("a killed connection is retryable", e))
            .expect_err("the connection is gone");
        assert!(err.is_retryable(), "{err:?}");
        let err = sqlx::query("SELECT * FROM no_such_table")
            .execute(store.pool())
            .await
            .map_err(|e| map_err("a killed connection is retryable", e))
            .expect_err("no table");
        assert!(!err.is_retryable(), "{err:?}");
    }

    /// The rows of `relation` a statement reads, by `EXPLAIN ANALYZE` (then rolled back): the
    /// actual rows of every plan node that scans it, times its loops. A claim is run for `host`
    /// (a limit of 64); a query of [`OperatorVerbs::activity`] with `host` `None`.
    async fn rows_read(
        store: &PostgresStore,
        sql: &str,
        host: Option<&str>,
        relation: &str,
        now: DateTime<Utc>,
    ) -> f64 {
        fn walk(node: &serde_json::Value, relation: &str) -> f64 {
            let own = if node["Relation Name"] == relation {
                node["Actual Rows"].as_f64().unwrap_or(0.0)
                    * node["Actual Loops"].as_f64().unwrap_or(0.0)
            } else {
                0.0
            };
            let children = node["Plans"].as_array().into_iter().flatten();
            own + children.map(|c| walk(c, relation)).sum::<f64>()
        }
        let mut tx = store.pool.begin().await.expect("begin");
        let explain = format!("EXPLAIN (ANALYZE, FORMAT JSON) {sql}");
        let query = sqlx::query_scalar::<_, serde_json::Value>(&explain);
        let query = match host {
            Some(host) => query.bind(host).bind(now).bind(64_i64).bind(now),
            None => query.bind(now).bind(now),
        };
        let plan = query.fetch_one(&mut *tx).await.expect("explain");
        tx.rollback().await.expect("rollback");
        walk(&plan[0]["Plan"], relation)
    }

    /// A claim's cost must not grow with how many instances wait, whatever the statistics say.
    /// Autovacuum analyses a table up to a minute after it grew: in W5's setup, plans made from
    /// statistics of nearly empty tables hashed every waiting instance for each claim (200 ms
    /// with 100,000 waiting). Here the tables are analysed empty and then filled with 20,000
    /// instances, each with a routed start message and a due timer: a claim of 64 reads a few
    /// instances per row it takes, not all of them.
    #[tokio::test]
    async fn claims_read_instances_by_key_even_with_statistics_of_empty_tables() {
        let Some(store) = fresh().await else { return };
        let now = at(100);
        for sql in [
            "ANALYZE instances, messages, timers",
            "ALTER TABLE instances SET (autovacuum_enabled = false)",
            "ALTER TABLE messages SET (autovacuum_enabled = false)",
            "ALTER TABLE timers SET (autovacuum_enabled = false)",
            "INSERT INTO instances (id, orchestration, version, status, step, created_at, updated_at) \
             SELECT gen_random_uuid(), 'order', 1, 'running', 'start', now(), now() \
             FROM generate_series(1, 20000)",
            "INSERT INTO messages (id, message_type, kind, properties, body, status, instance_id, published_at) \
             SELECT 'start-' || id, 'order', 'start', '{}', '{}', 'routed', id, now() FROM instances",
            "INSERT INTO timers (instance_id, name, due_at) SELECT id, 'deadline', now() FROM instances",
        ] {
            sqlx::query(sql).execute(&store.pool).await.expect(sql);
        }
        for (sql, host, reads) in [
            (CLAIM_MESSAGES.as_str(), Some("host-a"), "messages"),
            (CLAIM_TIMERS.as_str(), Some("host-a"), "timers"),
            (NEXT_TIMER.as_str(), None, "timers"),
        ] {
            let instances = rows_read(&store, sql, host, "instances", now).await;
            assert!(
                instances <= 1_000.0,
                "{sql}\nread {instances} instances to claim from {reads}"
            );
        }
        let taken = store
            .claim_messages("host-a", now, 64)
            .await
            .expect("claim");
        assert_eq!(taken.len(), 64);
        let due = store
            .claim_timers("host-a", now + chrono::Duration::hours(1), 64)
            .await
            .expect("timers");
        assert_eq!(due.len(), 64);
    }
}
