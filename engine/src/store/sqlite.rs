//! The SQLite MessageBox: the embedded default, for one host process.
//!
//! WAL journal with `synchronous=FULL`: a commit is on disk when it returns. Every write runs in a
//! `BEGIN IMMEDIATE` transaction so that a read followed by a write never fails on a stale
//! snapshot, and `busy_timeout` lets a second process (the CLI beside a running host) wait its turn.
//! Times are stored as fixed-width ISO-8601 UTC text so that they compare correctly as text.

use std::collections::{BTreeMap, BTreeSet};
use std::str::FromStr;
use std::sync::LazyLock;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, NaiveDateTime, Utc};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{QueryBuilder, Row, Sqlite, SqlitePool};
use uuid::Uuid;

use super::routing::Route;
use super::*;
use crate::orchestration::Correlation;

mod batch;
mod writer;

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../migrations/sqlite");

const TS_FORMAT: &str = "%Y-%m-%dT%H:%M:%S%.6fZ";

/// Formats a time the way this backend stores it.
pub fn ts(at: DateTime<Utc>) -> String {
    at.format(TS_FORMAT).to_string()
}

fn parse_ts(text: &str) -> StoreResult<DateTime<Utc>> {
    NaiveDateTime::parse_from_str(text, TS_FORMAT)
        .map(|n| n.and_utc())
        .map_err(|e| StoreError::Corrupt(format!("time {text:?}: {e}")))
}

fn parse_uuid(text: &str) -> StoreResult<Uuid> {
    Uuid::parse_str(text).map_err(|e| StoreError::Corrupt(format!("uuid {text:?}: {e}")))
}

fn parse_word<T: FromStr<Err = String>>(text: &str) -> StoreResult<T> {
    text.parse().map_err(StoreError::Corrupt)
}

fn parse_json<T: serde::de::DeserializeOwned>(text: &str) -> StoreResult<T> {
    serde_json::from_str(text).map_err(|e| StoreError::Corrupt(format!("json {text:?}: {e}")))
}

/// Maps a sqlx error to a [`StoreError`], deciding what is worth retrying. The one place that
/// decides it for this backend.
fn map_err(err: sqlx::Error) -> StoreError {
    let retryable = match &err {
        // A connection whose worker thread stopped is opened again by the next write
        // (`writer::Slot::ready`).
        sqlx::Error::Io(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed => true,
        sqlx::Error::Database(db) => {
            // SQLITE_BUSY (5), SQLITE_LOCKED (6), SQLITE_IOERR (10), SQLITE_FULL (13),
            // SQLITE_CANTOPEN (14), and their extended codes.
            let code = db.code().and_then(|c| c.parse::<i32>().ok()).unwrap_or(0) & 0xff;
            matches!(code, 5 | 6 | 10 | 13 | 14)
        }
        _ => false,
    };
    if retryable {
        StoreError::Unavailable(err)
    } else {
        StoreError::Database(err)
    }
}

/// The SQLite store.
#[derive(Debug, Clone)]
pub struct SqliteStore {
    /// Reads (and migrations).
    pool: SqlitePool,
    /// Every write transaction, on one connection: SQLite admits one writer at a time, and
    /// writers of this process queue here in order instead of polling the file lock through
    /// the busy handler (which sleeps up to 100 ms a try).
    writer: Writer,
}

use writer::{Tx, Writer};

impl SqliteStore {
    /// Runs a claim (`CLAIM_MESSAGES`, `CLAIM_TIMERS`) for `host` at `now`, of at most `limit`
    /// rows, in a write transaction of its own.
    async fn claim(
        &self,
        sql: &str,
        host: &str,
        now: DateTime<Utc>,
        limit: u32,
    ) -> StoreResult<Vec<sqlx::sqlite::SqliteRow>> {
        let mut tx = self.write().await?;
        let rows = sqlx::query(sql)
            .bind(host)
            .bind(ts(now))
            .bind(i64::from(limit))
            .fetch_all(&mut *tx)
            .await
            .map_err(map_err)?;
        commit(tx).await?;
        Ok(rows)
    }

    /// Opens (creating if needed) the database at `url` (`sqlite://PATH` or `sqlite::memory:`).
    ///
    /// # Errors
    /// The file cannot be opened or created.
    pub async fn open(url: &str) -> StoreResult<Self> {
        Self::open_with(url, None).await
    }

    /// [`SqliteStore::open`] with a cap on the database's size, in pages (`PRAGMA
    /// max_page_count` on every connection of this store, the write connection included when
    /// it is opened again): a write that needs a page past it fails with `SQLITE_FULL`, as on a
    /// full disk. A cap below the database's current size is raised to it. For tests of a full
    /// disk: fill the database from another connection, and free space by deleting from it.
    ///
    /// # Errors
    /// The file cannot be opened or created.
    pub async fn open_with_max_pages(url: &str, max_pages: u64) -> StoreResult<Self> {
        Self::open_with(url, Some(max_pages)).await
    }

    async fn open_with(url: &str, max_pages: Option<u64>) -> StoreResult<Self> {
        let memory = url.contains(":memory:") || url.contains("mode=memory");
        let options = SqliteConnectOptions::from_str(url)
            .map_err(StoreError::Database)?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .busy_timeout(Duration::from_secs(10))
            // Room for the multi-row statements of small groups (`batch::reuse`).
            .statement_cache_capacity(512)
            .foreign_keys(false)
            // The temporary table a group commit fences its points with (`batch::push_fence`)
            // stays in memory.
            .pragma("temp_store", "memory");
        let options = match max_pages {
            Some(pages) => options.pragma("max_page_count", pages.to_string()),
            None => options,
        };
        // Every connection is opened here, before any load: opening one later, while another
        // writes, can fail at once with SQLITE_BUSY on the journal-mode pragma.
        let connect = |connections: u32| {
            SqlitePoolOptions::new()
                .max_connections(connections)
                .min_connections(connections)
                .idle_timeout(None)
                .max_lifetime(None)
                .test_before_acquire(false)
                .after_connect(|conn, _| Box::pin(writer::add_temp_tables(conn)))
                .connect_with(options.clone())
        };
        if memory {
            // One connection is the whole database.
            let pool = connect(1).await.map_err(map_err)?;
            return Ok(Self {
                writer: Writer::Pooled(pool.clone()),
                pool,
            });
        }
        let writer = Writer::connect(&options).await.map_err(map_err)?;
        let pool = connect(3).await.map_err(map_err)?;
        Ok(Self { pool, writer })
    }

    /// The connection pool, for tests and tools that read the database directly.
    pub fn pool(&self) -> &SqlitePool {
        &self.pool
    }

    async fn write(&self) -> StoreResult<Tx> {
        self.writer.begin().await
    }
}

async fn commit(tx: Tx) -> StoreResult<()> {
    tx.commit().await
}

/// Where `msg` goes.
async fn find_route(tx: &mut Tx, msg: &NewMessage) -> StoreResult<Route> {
    Ok(batch::read_routes(tx, &[msg]).await?.route(msg))
}

/// Creates the instance an activating message starts. For a convoy, also subscribes it to every
/// activating type of its definition with the convoy's values, in the same transaction as the
/// routing decision, so that no second instance can start for those values while it runs.
async fn activate(
    tx: &mut Tx,
    orchestration: &str,
    version: u32,
    convoy: Option<Correlation>,
    now: DateTime<Utc>,
) -> StoreResult<Uuid> {
    let id = Uuid::now_v7();
    insert_instance(tx, id, orchestration, version, None, now).await?;
    if let Some(values) = convoy {
        let types: Vec<String> = sqlx::query_scalar(
            "SELECT message_type FROM subscriptions WHERE orchestration = $1 AND instance_id IS NULL",
        )
        .bind(orchestration)
        .fetch_all(&mut **tx)
        .await
        .map_err(map_err)?;
        let subs = convoy_subscriptions(id, types, &values);
        let rows: Vec<_> = subs.iter().map(|sub| (id, sub, now)).collect();
        batch::insert_subscriptions(tx, &rows).await?;
    }
    Ok(id)
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
    .bind(id.to_string())
    .bind(orchestration)
    .bind(i64::from(version))
    .bind(ts(now))
    .bind(parent.map(|p| p.to_string()))
    .execute(&mut **tx)
    .await
    .map_err(map_err)?;
    Ok(())
}

/// Stores and routes one message inside `tx`.
async fn publish_one(
    tx: &mut Tx,
    msg: &NewMessage,
    now: DateTime<Utc>,
) -> StoreResult<PublishOutcome> {
    let mut out = batch::publish_all(tx, &[(msg, now)]).await?;
    Ok(out.pop().unwrap_or(PublishOutcome::Duplicate))
}

/// Routes the unrouted messages of these types again (a subscription appeared or went away).
async fn reroute(tx: &mut Tx, types: &BTreeSet<String>) -> StoreResult<()> {
    for message_type in types {
        let rows = sqlx::query(
            "SELECT seq, properties FROM messages WHERE status = 'unrouted' AND message_type = $1 \
             ORDER BY seq",
        )
        .bind(message_type)
        .fetch_all(&mut **tx)
        .await
        .map_err(map_err)?;
        for row in rows {
            let seq: i64 = row.get(0);
            let properties: BTreeMap<String, String> = parse_json(row.get::<&str, _>(1))?;
            let probe = NewMessage {
                id: String::new(),
                message_type: message_type.clone(),
                kind: MessageKind::Published,
                properties,
                body: serde_json::Value::Null,
                target: None,
            };
            let (instance, sub, kind) = match find_route(tx, &probe).await? {
                Route::Instance(id, sub) => (id, sub, MessageKind::Published),
                Route::Activate {
                    orchestration,
                    version,
                    convoy,
                } => {
                    let id = activate(tx, &orchestration, version, convoy, Utc::now()).await?;
                    (id, None, MessageKind::Start)
                }
                Route::Unrouted(_) => continue,
            };
            sqlx::query(
                "UPDATE messages SET status = 'routed', instance_id = $2, subscription_id = $3, \
                 kind = $4, reason = NULL WHERE seq = $1",
            )
            .bind(seq)
            .bind(instance.to_string())
            .bind(sub.map(|s| s.to_string()))
            .bind(kind.as_str())
            .execute(&mut **tx)
            .await
            .map_err(map_err)?;
        }
    }
    Ok(())
}

/// Gives a claim back: the delivery did not fail, so it does not count.
const GIVE_BACK: &str = "delivery_count = max(delivery_count - 1, 0)";

/// Whether a query's single boolean answer is true.
async fn exists(pool: &SqlitePool, sql: &str) -> StoreResult<bool> {
    sqlx::query_scalar(sql)
        .fetch_one(pool)
        .await
        .map_err(map_err)
}

async fn next_history_seq(tx: &mut Tx, id: &str) -> StoreResult<i64> {
    let seq: i64 = sqlx::query_scalar("SELECT history_seq FROM instances WHERE id = $1")
        .bind(id)
        .fetch_one(&mut **tx)
        .await
        .map_err(map_err)?;
    Ok(seq + 1)
}

async fn insert_history(tx: &mut Tx, id: &str, e: HistoryEntry<'_>) -> StoreResult<()> {
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
    .bind(ts(e.at))
    .bind(e.host)
    .bind(e.detail)
    .execute(&mut **tx)
    .await
    .map_err(map_err)?;
    Ok(())
}

/// The `history.host` of points written by an operator's action (suspend, terminate).
const OPERATOR: &str = "operator";

/// Carries out an operator's action inside `tx`. Bumps the epoch so that a host holding the
/// instance in memory is fenced and drops it.
async fn control_in(
    tx: &mut Tx,
    id: Uuid,
    action: &ControlAction,
    now: DateTime<Utc>,
) -> StoreResult<InstanceStatus> {
    let key = id.to_string();
    let row = sqlx::query(
        "SELECT status, step, parent_id, resumable, last_error FROM instances WHERE id = $1",
    )
    .bind(&key)
    .fetch_optional(&mut **tx)
    .await
    .map_err(map_err)?
    .ok_or(StoreError::NoSuchInstance(id))?;
    let status: InstanceStatus = parse_word(row.get::<&str, _>(0))?;
    let step: String = row.get(1);
    let parent: Option<String> = row.get(2);
    action.check(
        id,
        status,
        row.get::<bool, _>(3),
        row.get::<Option<String>, _>(4),
    )?;
    let new_status = match &action {
        ControlAction::Suspend { reason } => {
            let seq = next_history_seq(tx, &key).await?;
            sqlx::query(
                    "UPDATE instances SET status = 'suspended', last_error = $2, epoch = epoch + 1, \
                     owner = NULL, lease_expires_at = NULL, updated_at = $3, history_seq = $4 WHERE id = $1",
                )
                .bind(&key)
                .bind(format!("suspended by operator: {reason}"))
                .bind(ts(now))
                .bind(seq)
                .execute(&mut **tx)
                .await
                .map_err(map_err)?;
            insert_history(
                tx,
                &key,
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
                     owner = NULL, lease_expires_at = NULL, updated_at = $2, resumable = 1 WHERE id = $1",
                )
                .bind(&key)
                .bind(ts(now))
                .execute(&mut **tx)
                .await
                .map_err(map_err)?;
            // Its messages are delivered again from scratch: poison counting starts over.
            sqlx::query("UPDATE messages SET delivery_count = 0 WHERE instance_id = $1 AND status = 'routed'")
                    .bind(&key)
                    .execute(&mut **tx)
                    .await
                    .map_err(map_err)?;
            InstanceStatus::Dehydrated
        }
        ControlAction::Terminate { reason } => {
            let seq = next_history_seq(tx, &key).await?;
            sqlx::query(
                    "UPDATE instances SET status = 'terminated', last_error = $2, epoch = epoch + 1, \
                     owner = NULL, lease_expires_at = NULL, waiting_for = '', next_timer_at = NULL, \
                     updated_at = $3, history_seq = $4 WHERE id = $1",
                )
                .bind(&key)
                .bind(format!("terminated by operator: {reason}"))
                .bind(ts(now))
                .bind(seq)
                .execute(&mut **tx)
                .await
                .map_err(map_err)?;
            for sql in [
                "DELETE FROM subscriptions WHERE instance_id = $1",
                "DELETE FROM timers WHERE instance_id = $1",
            ] {
                sqlx::query(sql)
                    .bind(&key)
                    .execute(&mut **tx)
                    .await
                    .map_err(map_err)?;
            }
            insert_history(
                tx,
                &key,
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
                    parse_uuid(&parent)?,
                );
                publish_one(tx, &msg, now).await?;
            }
            InstanceStatus::Terminated
        }
    };
    batch::unlock_instances(tx, None, &[key], &[]).await?;
    Ok(new_status)
}

fn summary_from_row(row: &sqlx::sqlite::SqliteRow) -> StoreResult<InstanceSummary> {
    Ok(InstanceSummary {
        id: parse_uuid(row.get::<&str, _>("id"))?,
        orchestration: row.get("orchestration"),
        version: row.get::<i64, _>("version") as u32,
        status: parse_word(row.get::<&str, _>("status"))?,
        step: row.get("step"),
        waiting_for: row.get("waiting_for"),
        updated_at: parse_ts(row.get::<&str, _>("updated_at"))?,
        last_error: row.get("last_error"),
    })
}

const SUMMARY_COLUMNS: &str =
    "id, orchestration, version, status, step, waiting_for, updated_at, last_error";

/// Whether instance `i` may be worked on by host `$1` at time `$2`.
///
/// Queries that look for ready messages or due timers of such instances join them with `CROSS
/// JOIN`, which SQLite takes as an order: from the few ready messages (`messages_ready`) or due
/// timers (`timers_due`) to their instances. Left to choose, the planner starts from
/// `instances_by_status`, every waiting instance, and a claim costs time in proportion to how
/// many instances wait (35 ms at 20,000 dehydrated, against 0.1 ms).
const CLAIMABLE: &str = "i.status IN ('running', 'dehydrated') \
     AND (i.owner IS NULL OR i.owner = $1 OR i.lease_expires_at < $2)";

/// Claims up to `$3` messages for host `$1` at `$2`: those of instances it holds first (they
/// are in memory, and finishing work in flight keeps it from going idle and being dehydrated
/// only to be loaded again); the rest in publication order. One instance's messages keep their
/// order.
static CLAIM_MESSAGES: LazyLock<String> = LazyLock::new(|| {
    format!(
        "UPDATE messages SET locked_by = $1, delivery_count = delivery_count + 1 WHERE seq IN ( \
           SELECT seq FROM ( \
             SELECT * FROM (SELECT m.seq, 0 AS cold FROM instances i \
               JOIN messages m ON m.instance_id = i.id \
               WHERE i.owner = $1 AND m.status = 'routed' AND m.locked_by IS NULL AND {CLAIMABLE} \
               ORDER BY m.seq LIMIT $3) \
             UNION ALL \
             SELECT * FROM (SELECT m.seq, 1 AS cold FROM messages m \
               CROSS JOIN instances i ON i.id = m.instance_id \
               WHERE m.status = 'routed' AND m.locked_by IS NULL AND {CLAIMABLE} \
               ORDER BY m.seq LIMIT $3)) \
           GROUP BY seq ORDER BY min(cold), seq LIMIT $3) \
         RETURNING seq, id, message_type, kind, properties, body, instance_id, subscription_id, published_at, delivery_count"
    )
});

/// Claims up to `$3` timers due at `$2` for host `$1`, the earliest first.
static CLAIM_TIMERS: LazyLock<String> = LazyLock::new(|| {
    format!(
        "UPDATE timers SET locked_by = $1 WHERE rowid IN ( \
           SELECT t.rowid FROM timers t CROSS JOIN instances i ON i.id = t.instance_id \
           WHERE t.due_at <= $2 AND t.locked_by IS NULL AND {CLAIMABLE} \
           ORDER BY t.due_at LIMIT $3) \
         RETURNING instance_id, name, due_at"
    )
});

/// How many messages wait, unclaimed, for instances that can run.
const READY_MESSAGES: &str = "SELECT COUNT(*) FROM messages m \
     CROSS JOIN instances i ON i.id = m.instance_id \
     WHERE m.status = 'routed' AND m.locked_by IS NULL AND i.status IN ('running', 'dehydrated')";

/// When the earliest unclaimed timer of an instance that can run is due.
const NEXT_TIMER: &str = "SELECT t.due_at FROM timers t \
     CROSS JOIN instances i ON i.id = t.instance_id \
     WHERE t.locked_by IS NULL AND i.status IN ('running', 'dehydrated') \
     ORDER BY t.due_at LIMIT 1";

#[async_trait]
impl Store for SqliteStore {
    fn backend(&self) -> &'static str {
        "sqlite"
    }

    async fn migrate(&self) -> StoreResult<()> {
        MIGRATOR.run(&self.pool).await?;
        Ok(())
    }

    async fn recover(&self, host: &str, now: DateTime<Utc>) -> StoreResult<()> {
        let mut tx = self.write().await?;
        // One host per file: starting releases everything a previous host held, which is only
        // safe if that host is gone. A host of this process (tests) or a dead process is.
        let running: Vec<(String, i64, String)> =
            sqlx::query_as("SELECT id, pid, name FROM hosts WHERE stopped_at IS NULL")
                .fetch_all(&mut *tx)
                .await
                .map_err(map_err)?;
        let me = hostname();
        for (other, pid, name) in running {
            let alive = name == me
                && pid != i64::from(std::process::id())
                && std::path::Path::new(&format!("/proc/{pid}")).exists();
            if alive {
                return Err(StoreError::HostAlreadyRunning { host: other, pid });
            }
        }
        for sql in [
            "UPDATE messages SET locked_by = NULL WHERE locked_by IS NOT NULL AND status = 'routed'",
            "UPDATE timers SET locked_by = NULL WHERE locked_by IS NOT NULL",
            "UPDATE outbox SET locked_by = NULL, locked_until = NULL WHERE locked_by IS NOT NULL",
            "UPDATE instances SET owner = NULL, lease_expires_at = NULL WHERE owner IS NOT NULL",
            "UPDATE hosts SET stopped_at = heartbeat_at WHERE stopped_at IS NULL",
        ] {
            sqlx::query(sql).execute(&mut *tx).await.map_err(map_err)?;
        }
        sqlx::query(
            "INSERT INTO hosts (id, name, pid, started_at, heartbeat_at) VALUES ($1, $2, $3, $4, $4)",
        )
        .bind(host)
        .bind(hostname())
        .bind(i64::from(std::process::id()))
        .bind(ts(now))
        .execute(&mut *tx)
        .await
        .map_err(map_err)?;
        commit(tx).await
    }

    async fn sync_activations(
        &self,
        activations: &[Activation],
        now: DateTime<Utc>,
    ) -> StoreResult<()> {
        let mut tx = self.write().await?;
        let mut types = BTreeSet::new();
        for a in activations {
            sqlx::query(
                "INSERT INTO subscriptions (id, message_type, orchestration, version, correlation_keys, created_at) \
                 VALUES ($1, $2, $3, $4, $5, $6) \
                 ON CONFLICT (message_type, orchestration) WHERE instance_id IS NULL \
                 DO UPDATE SET version = excluded.version, correlation_keys = excluded.correlation_keys",
            )
            .bind(Uuid::new_v4().to_string())
            .bind(&a.message_type)
            .bind(&a.orchestration)
            .bind(i64::from(a.version))
            .bind(&a.convoy)
            .bind(ts(now))
            .execute(&mut *tx)
            .await
            .map_err(map_err)?;
            types.insert(a.message_type.clone());
        }
        reroute(&mut tx, &types).await?;
        commit(tx).await
    }

    async fn publish(
        &self,
        messages: Vec<NewMessage>,
        now: DateTime<Utc>,
    ) -> StoreResult<Vec<PublishOutcome>> {
        let mut tx = self.write().await?;
        let batch: Vec<_> = messages.iter().map(|msg| (msg, now)).collect();
        let out = batch::publish_all(&mut tx, &batch).await?;
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
        if let Some(held) = batch::start_alone(&self.writer, &starts, holder).await? {
            return Ok(held);
        }
        let mut tx = self.write().await?;
        let held = batch::start_instances(&mut tx, &starts, holder).await?;
        commit(tx).await?;
        Ok(held)
    }

    async fn claim_messages(
        &self,
        host: &str,
        now: DateTime<Utc>,
        limit: u32,
    ) -> StoreResult<Vec<StoredMessage>> {
        let rows = self.claim(&CLAIM_MESSAGES, host, now, limit).await?;
        let mut out = rows
            .iter()
            .map(|row| {
                Ok(StoredMessage {
                    seq: row.get("seq"),
                    id: row.get("id"),
                    message_type: row.get("message_type"),
                    kind: parse_word(row.get::<&str, _>("kind"))?,
                    properties: parse_json(row.get::<&str, _>("properties"))?,
                    body: parse_json(row.get::<&str, _>("body"))?,
                    instance_id: parse_uuid(row.get::<&str, _>("instance_id"))?,
                    subscription_id: row
                        .get::<Option<&str>, _>("subscription_id")
                        .map(parse_uuid)
                        .transpose()?,
                    published_at: parse_ts(row.get::<&str, _>("published_at"))?,
                    delivery_count: row.get("delivery_count"),
                })
            })
            .collect::<StoreResult<Vec<_>>>()?;
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
                    instance_id: parse_uuid(row.get::<&str, _>(0))?,
                    name: row.get(1),
                    due_at: parse_ts(row.get::<&str, _>(2))?,
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
        let mut tx = self.write().await?;
        let mut out = Vec::with_capacity(ids.len());
        for chunk in ids.chunks(batch::ROWS_PER_STATEMENT) {
            let mut q = QueryBuilder::new("UPDATE instances SET owner = ");
            q.push_bind(host)
                .push(", lease_expires_at = ")
                .push_bind(ts(lease_until))
                .push(
                    ", epoch = epoch + 1, status = 'running' \
                     WHERE status IN ('running', 'dehydrated') AND (owner IS NULL OR owner = ",
                )
                .push_bind(host)
                .push(" OR lease_expires_at < ")
                .push_bind(ts(now))
                .push(") AND id IN (");
            let mut list = q.separated(", ");
            for id in chunk {
                list.push_bind(id.to_string());
            }
            q.push(
                ") RETURNING id, orchestration, version, status, state, engine_state, epoch, \
                 history_seq, parent_id",
            );
            let rows = q
                .build()
                .persistent(batch::reuse(chunk.len()))
                .fetch_all(&mut *tx)
                .await
                .map_err(map_err)?;
            for row in rows {
                out.push(InstanceRecord {
                    id: parse_uuid(row.get::<&str, _>("id"))?,
                    orchestration: row.get("orchestration"),
                    version: row.get::<i64, _>("version") as u32,
                    status: parse_word(row.get::<&str, _>("status"))?,
                    state: row.get("state"),
                    engine_state: row.get("engine_state"),
                    epoch: row.get("epoch"),
                    history_seq: row.get("history_seq"),
                    parent_id: row
                        .get::<Option<&str>, _>("parent_id")
                        .map(parse_uuid)
                        .transpose()?,
                });
            }
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
        let mut tx = self.write().await?;
        sqlx::query("UPDATE instances SET lease_expires_at = $2 WHERE owner = $1")
            .bind(host)
            .bind(ts(lease_until))
            .execute(&mut *tx)
            .await
            .map_err(map_err)?;
        sqlx::query("UPDATE hosts SET heartbeat_at = $2 WHERE id = $1")
            .bind(host)
            .bind(ts(now))
            .execute(&mut *tx)
            .await
            .map_err(map_err)?;
        commit(tx).await
    }

    async fn release(&self, host: &str, now: DateTime<Utc>) -> StoreResult<()> {
        let mut tx = self.write().await?;
        for sql in [
            "UPDATE messages SET locked_by = NULL, delivery_count = max(delivery_count - 1, 0) \
             WHERE locked_by = $1 AND status = 'routed'",
            "UPDATE timers SET locked_by = NULL WHERE locked_by = $1",
            "UPDATE outbox SET locked_by = NULL, locked_until = NULL WHERE locked_by = $1",
            "UPDATE instances SET owner = NULL, lease_expires_at = NULL, \
               status = CASE WHEN status = 'running' AND state IS NOT NULL THEN 'dehydrated' ELSE status END \
             WHERE owner = $1",
        ] {
            sqlx::query(sql).bind(host).execute(&mut *tx).await.map_err(map_err)?;
        }
        sqlx::query("UPDATE hosts SET stopped_at = $2, heartbeat_at = $2 WHERE id = $1")
            .bind(host)
            .bind(ts(now))
            .execute(&mut *tx)
            .await
            .map_err(map_err)?;
        commit(tx).await
    }

    async fn unlock(&self, host: &str, ids: &[Uuid], failed: &[i64]) -> StoreResult<()> {
        let mut tx = self.write().await?;
        let ids: Vec<String> = ids.iter().map(Uuid::to_string).collect();
        batch::unlock_instances(&mut tx, Some(host), &ids, failed).await?;
        commit(tx).await
    }

    async fn commit(&self, points: &[PersistencePoint]) -> StoreResult<Vec<CommitOutcome>> {
        if let Some(out) = batch::write_alone(&self.writer, points).await? {
            return Ok(out);
        }
        let mut tx = self.write().await?;
        let mut reroute_types = BTreeSet::new();
        let out = batch::write_points(&mut tx, points, &mut reroute_types).await?;
        reroute(&mut tx, &reroute_types).await?;
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
        let asked: Vec<(Uuid, i64)> = receives.iter().map(|r| (r.instance_id, r.epoch)).collect();
        let held = batch::still_held(&mut tx, host, &asked).await?;
        let (rows, out) = held_receives(receives, &held, now);
        batch::insert_subscriptions(&mut tx, &rows).await?;
        let types: BTreeSet<String> = rows
            .iter()
            .map(|(_, sub, _)| sub.message_type.clone())
            .collect();
        reroute(&mut tx, &types).await?;
        commit(tx).await?;
        Ok(out)
    }

    async fn note_unrunnable(&self, id: Uuid, error: &str, now: DateTime<Utc>) -> StoreResult<()> {
        let mut tx = self.write().await?;
        sqlx::query(
            "UPDATE instances SET last_error = $2, updated_at = $3, owner = NULL, lease_expires_at = NULL \
             WHERE id = $1",
        )
            .bind(id.to_string())
            .bind(error)
            .bind(ts(now))
            .execute(&mut *tx)
            .await
            .map_err(map_err)?;
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
               SELECT id FROM outbox WHERE status = 'pending' AND next_attempt_at <= $2 \
                 AND (locked_until IS NULL OR locked_until < $2) \
                 AND port NOT IN (SELECT value FROM json_each($5)) \
               ORDER BY next_attempt_at LIMIT $4) \
             RETURNING id, instance_id, port, message_type, body, expects_reply, attempts",
        )
        .bind(host)
        .bind(ts(now))
        .bind(ts(lock_until))
        .bind(i64::from(limit))
        .bind(serde_json::json!(ordered).to_string())
        .fetch_all(&mut *tx)
        .await
        .map_err(map_err)?;
        commit(tx).await?;
        rows.iter().map(outbox_row).collect()
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
            "SELECT id, instance_id, port, message_type, body, expects_reply, attempts, status, \
             next_attempt_at, locked_by, locked_until FROM outbox \
             WHERE port = $1 AND status IN ('pending', 'held', 'give_up') ORDER BY seq LIMIT 1",
        )
        .bind(port)
        .fetch_optional(&mut *tx)
        .await
        .map_err(map_err)?;
        let Some(head) = head else { return Ok(None) };
        let status: String = head.get("status");
        let due = parse_ts(head.get::<&str, _>("next_attempt_at"))? <= now;
        let locked_by: Option<String> = head.get("locked_by");
        let locked_until = head
            .get::<Option<&str>, _>("locked_until")
            .map(parse_ts)
            .transpose()?;
        let locked_elsewhere = locked_by.is_some_and(|by| by != host)
            && locked_until.is_some_and(|until| until >= now);
        if status != "pending" || !due || locked_elsewhere {
            return Ok(None);
        }
        let row = outbox_row(&head)?;
        sqlx::query("UPDATE outbox SET locked_by = $2, locked_until = $3 WHERE id = $1")
            .bind(&row.id)
            .bind(host)
            .bind(ts(lock_until))
            .execute(&mut *tx)
            .await
            .map_err(map_err)?;
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
             AND id IN (SELECT value FROM json_each($3))",
        )
        .bind(host)
        .bind(ts(lock_until))
        .bind(serde_json::json!(ids).to_string())
        .execute(&mut *tx)
        .await
        .map_err(map_err)?;
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
                    .bind(ts(now))
                    .bind(if *via_backup { "backup" } else { "primary" })
                    .execute(&mut *tx)
                    .await
                    .map_err(map_err)?
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
                    .bind(ts(*retry_at))
                    .bind(error)
                    .bind(ts(now))
                    .execute(&mut *tx)
                    .await
                    .map_err(map_err)?;
                }
                DeliveryOutcome::Held { row, error } => {
                    sqlx::query(
                        "UPDATE outbox SET status = 'held', attempts = attempts + 1, last_error = $2, \
                         last_attempt_at = $3, locked_by = NULL, locked_until = NULL \
                         WHERE id = $1 AND status = 'pending'",
                    )
                    .bind(&row.id)
                    .bind(error)
                    .bind(ts(now))
                    .execute(&mut *tx)
                    .await
                    .map_err(map_err)?;
                }
                DeliveryOutcome::Dead { row, error } => {
                    let done = sqlx::query(
                        "UPDATE outbox SET status = 'dead', attempts = attempts + 1, last_error = $2, \
                         last_attempt_at = $3, locked_by = NULL, locked_until = NULL \
                         WHERE id = $1 AND status = 'pending'",
                    )
                    .bind(&row.id)
                    .bind(error)
                    .bind(ts(now))
                    .execute(&mut *tx)
                    .await
                    .map_err(map_err)?
                    .rows_affected();
                    if done == 1 {
                        dead_letter_send(&mut tx, row, error, row.attempts + 1, now).await?;
                    }
                }
            }
        }
        commit(tx).await
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
             WHERE status IN ('pending', 'held') AND id IN (SELECT value FROM json_each($1))",
        )
        .bind(serde_json::json!(ids).to_string())
        .bind(reason)
        .execute(&mut *tx)
        .await
        .map_err(map_err)?;
        let rows = sqlx::query(
            "UPDATE outbox SET status = 'dead', locked_by = NULL, locked_until = NULL \
             WHERE status = 'give_up' \
             RETURNING id, instance_id, port, message_type, body, expects_reply, attempts, last_error",
        )
        .fetch_all(&mut *tx)
        .await
        .map_err(map_err)?;
        for r in &rows {
            let row = outbox_row(r)?;
            let why: Option<String> = r.get("last_error");
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
        .bind(ts(now))
        .execute(&mut *tx)
        .await
        .map_err(map_err)?
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
        .map_err(map_err)?;
        rows.iter().map(dead_letter_row).collect()
    }

    async fn dead_letter(&self, id: &str) -> StoreResult<Option<DeadLetter>> {
        let row = sqlx::query(
            "SELECT id, instance_id, port, message_type, body, reason, attempts, dead_at \
             FROM dead_letters WHERE id = $1",
        )
        .bind(id)
        .fetch_optional(&self.pool)
        .await
        .map_err(map_err)?;
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
        .bind(ts(now))
        .execute(&mut *tx)
        .await
        .map_err(map_err)?
        .rows_affected();
        if done == 1 {
            sqlx::query("DELETE FROM dead_letters WHERE id = $1")
                .bind(id)
                .execute(&mut *tx)
                .await
                .map_err(map_err)?;
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
            sqlx::query("DELETE FROM dead_letters WHERE id IN (SELECT value FROM json_each($1))")
                .bind(serde_json::json!(ids).to_string())
        } else if let Some(before) = before {
            sqlx::query("DELETE FROM dead_letters WHERE dead_at < $1").bind(ts(before))
        } else {
            sqlx::query("DELETE FROM dead_letters")
        };
        let done = query
            .execute(&mut *tx)
            .await
            .map_err(map_err)?
            .rows_affected();
        commit(tx).await?;
        Ok(done)
    }

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
                "SELECT id, instance_id, action, reason, force FROM control WHERE status = 'pending' ORDER BY id LIMIT 1",
            )
            .fetch_optional(&mut *tx)
            .await
            .map_err(map_err)?
            else {
                break;
            };
            let request_id: i64 = row.get(0);
            let parsed = parse_uuid(row.get::<&str, _>(1)).and_then(|instance_id| {
                Ok(ControlRequest {
                    id: request_id,
                    instance_id,
                    action: control_action(row.get(2), row.get(3), row.get(4))
                        .map_err(StoreError::Corrupt)?,
                })
            });
            let result = match &parsed {
                Ok(request) => control_in(&mut tx, request.instance_id, &request.action, now).await,
                Err(e) => Err(StoreError::Corrupt(e.to_string())),
            };
            let result = match result {
                Err(e) if !e.is_refusal() => return Err(e),
                other => other,
            };
            let (status, text) = match &result {
                Ok(status) => ("done", format!("instance is now {status}")),
                Err(e) => ("rejected", e.to_string()),
            };
            sqlx::query("UPDATE control SET status = $2, result = $3, done_at = $4, done_by = $5 WHERE id = $1")
                .bind(request_id)
                .bind(status)
                .bind(&text)
                .bind(ts(now))
                .bind(host)
                .execute(&mut *tx)
                .await
                .map_err(map_err)?;
            commit(tx).await?;
            out.push(ControlApplied {
                id: request_id,
                instance_id: parsed.ok().map(|r| r.instance_id),
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
            "UPDATE messages SET status = 'zombie', locked_by = NULL, reason = 'its instance ended (' || \
               (SELECT i.status FROM instances i WHERE i.id = messages.instance_id) || ') before consuming it' \
             WHERE status = 'routed' AND instance_id IN \
               (SELECT id FROM instances WHERE status IN ('completed', 'failed', 'terminated'))",
        )
        .execute(&mut *tx)
        .await
        .map_err(map_err)?
        .rows_affected();
        sqlx::query(
            "INSERT INTO dead_letters (id, instance_id, port, message_type, body, reason, attempts, dead_at) \
             SELECT id, NULL, NULL, message_type, body, \
               'unrouted for longer than its time to live: ' || COALESCE(reason, ''), 0, $2 \
             FROM messages WHERE status = 'unrouted' AND published_at < $1 \
             ON CONFLICT (id) DO NOTHING",
        )
        .bind(ts(unrouted_before))
        .bind(ts(now))
        .execute(&mut *tx)
        .await
        .map_err(map_err)?;
        let expired = sqlx::query(
            "UPDATE messages SET status = 'dead', \
               reason = 'dead-lettered after its time to live: ' || COALESCE(reason, '') \
             WHERE status = 'unrouted' AND published_at < $1",
        )
        .bind(ts(unrouted_before))
        .execute(&mut *tx)
        .await
        .map_err(map_err)?
        .rows_affected();
        commit(tx).await?;
        Ok(Housekeeping { zombies, expired })
    }

    async fn take_inbox(&self, now: DateTime<Utc>, limit: u32) -> StoreResult<usize> {
        if !exists(&self.pool, "SELECT EXISTS (SELECT 1 FROM inbox)").await? {
            return Ok(0);
        }
        let mut tx = self.write().await?;
        let rows = sqlx::query(
            "SELECT id, message_id, message_type, properties, body FROM inbox ORDER BY id LIMIT $1",
        )
        .bind(i64::from(limit))
        .fetch_all(&mut *tx)
        .await
        .map_err(map_err)?;
        for row in &rows {
            let id: i64 = row.get(0);
            let body: String = row.get(4);
            match inbox_message(id, row.get(1), row.get(2), row.get(3), &body) {
                Ok(msg) => {
                    publish_one(&mut tx, &msg, now).await?;
                }
                Err(reason) => {
                    sqlx::query(
                        "INSERT INTO dead_letters (id, message_type, body, reason, attempts, dead_at) \
                         VALUES ($1, $2, $3, $4, 0, $5) ON CONFLICT (id) DO NOTHING",
                    )
                    .bind(format!("inbox-{id}"))
                    .bind(row.get::<String, _>(2))
                    .bind(&body)
                    .bind(reason)
                    .bind(ts(now))
                    .execute(&mut *tx)
                    .await
                    .map_err(map_err)?;
                }
            }
            sqlx::query("DELETE FROM inbox WHERE id = $1")
                .bind(id)
                .execute(&mut *tx)
                .await
                .map_err(map_err)?;
        }
        commit(tx).await?;
        Ok(rows.len())
    }

    async fn list_instances(
        &self,
        status: Option<InstanceStatus>,
        limit: u32,
    ) -> StoreResult<Vec<InstanceSummary>> {
        let rows = sqlx::query(&format!(
            "SELECT {SUMMARY_COLUMNS} FROM instances WHERE ($1 IS NULL OR status = $1) \
             ORDER BY updated_at DESC, id LIMIT $2"
        ))
        .bind(status.map(InstanceStatus::as_str))
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await
        .map_err(map_err)?;
        rows.iter().map(summary_from_row).collect()
    }

    async fn instance_summaries(&self, ids: &[Uuid]) -> StoreResult<Vec<InstanceSummary>> {
        let mut out = Vec::with_capacity(ids.len());
        for chunk in ids.chunks(500) {
            let mut query = sqlx::QueryBuilder::<Sqlite>::new(format!(
                "SELECT {SUMMARY_COLUMNS} FROM instances WHERE id IN ("
            ));
            let mut list = query.separated(", ");
            for id in chunk {
                list.push_bind(id.to_string());
            }
            query.push(")");
            let rows = query.build().fetch_all(&self.pool).await.map_err(map_err)?;
            for row in &rows {
                out.push(summary_from_row(row)?);
            }
        }
        Ok(out)
    }

    async fn instance_detail(&self, id: Uuid) -> StoreResult<Option<InstanceDetail>> {
        let key = id.to_string();
        let Some(row) = sqlx::query(&format!(
            "SELECT {SUMMARY_COLUMNS}, state, output, next_timer_at, created_at FROM instances WHERE id = $1"
        ))
        .bind(&key)
        .fetch_optional(&self.pool)
        .await
        .map_err(map_err)?
        else {
            return Ok(None);
        };
        let history = sqlx::query(
            "SELECT seq, reason, step, status, at, detail FROM history WHERE instance_id = $1 ORDER BY seq",
        )
        .bind(&key)
        .fetch_all(&self.pool)
        .await
        .map_err(map_err)?
        .iter()
        .map(|h| {
            Ok(HistoryRow {
                seq: h.get(0),
                reason: parse_word(h.get::<&str, _>(1))?,
                step: h.get(2),
                status: parse_word(h.get::<&str, _>(3))?,
                at: parse_ts(h.get::<&str, _>(4))?,
                detail: h.get(5),
            })
        })
        .collect::<StoreResult<Vec<_>>>()?;
        let (pending, zombies): (Vec<_>, Vec<_>) = sqlx::query(
            "SELECT id, message_type, status FROM messages \
             WHERE instance_id = $1 AND status IN ('routed', 'zombie') ORDER BY seq",
        )
        .bind(&key)
        .fetch_all(&self.pool)
        .await
        .map_err(map_err)?
        .iter()
        .map(|m| {
            (
                m.get::<String, _>(0),
                m.get::<String, _>(1),
                m.get::<String, _>(2),
            )
        })
        .partition(|(_, _, status)| status == "routed");
        Ok(Some(InstanceDetail {
            summary: summary_from_row(&row)?,
            state: row.get("state"),
            output: row
                .get::<Option<&str>, _>("output")
                .map(parse_json)
                .transpose()?,
            next_timer_at: row
                .get::<Option<&str>, _>("next_timer_at")
                .map(parse_ts)
                .transpose()?,
            created_at: parse_ts(row.get::<&str, _>("created_at"))?,
            history,
            pending_messages: pending.into_iter().map(|(id, ty, _)| (id, ty)).collect(),
            zombies: zombies.into_iter().map(|(id, ty, _)| (id, ty)).collect(),
        }))
    }

    async fn activity(&self, _now: DateTime<Utc>) -> StoreResult<Activity> {
        let mut activity = Activity::default();
        for row in sqlx::query("SELECT status, COUNT(*) FROM instances GROUP BY status")
            .fetch_all(&self.pool)
            .await
            .map_err(map_err)?
        {
            activity.by_status.insert(row.get(0), row.get(1));
        }
        activity.ready_messages = sqlx::query_scalar(READY_MESSAGES)
            .fetch_one(&self.pool)
            .await
            .map_err(map_err)?;
        activity.pending_sends =
            sqlx::query_scalar("SELECT COUNT(*) FROM outbox WHERE status = 'pending'")
                .fetch_one(&self.pool)
                .await
                .map_err(map_err)?;
        let next: Option<String> = sqlx::query_scalar(NEXT_TIMER)
            .fetch_optional(&self.pool)
            .await
            .map_err(map_err)?;
        activity.next_timer_at = next.as_deref().map(parse_ts).transpose()?;
        Ok(activity)
    }

    async fn close(&self) {
        self.writer.close().await;
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
fn outbox_row(row: &sqlx::sqlite::SqliteRow) -> StoreResult<OutboxRow> {
    Ok(OutboxRow {
        id: row.get("id"),
        instance_id: parse_uuid(row.get::<&str, _>("instance_id"))?,
        port: row.get("port"),
        message_type: row.get("message_type"),
        body: parse_json(row.get::<&str, _>("body"))?,
        expects_reply: row.get("expects_reply"),
        attempts: u32::try_from(row.get::<i64, _>("attempts")).unwrap_or(0),
    })
}

fn dead_letter_row(row: &sqlx::sqlite::SqliteRow) -> StoreResult<DeadLetter> {
    Ok(DeadLetter {
        id: row.get("id"),
        instance_id: row
            .get::<Option<&str>, _>("instance_id")
            .map(parse_uuid)
            .transpose()?,
        port: row.get("port"),
        message_type: row.get("message_type"),
        body: parse_json(row.get::<&str, _>("body"))?,
        reason: row.get("reason"),
        attempts: u32::try_from(row.get::<i64, _>("attempts")).unwrap_or(0),
        dead_at: parse_ts(row.get::<&str, _>("dead_at"))?,
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
    .bind(row.instance_id.to_string())
    .bind(&row.port)
    .bind(&row.message_type)
    .bind(row.body.to_string())
    .bind(error)
    .bind(i64::from(attempts))
    .bind(ts(now))
    .execute(&mut **tx)
    .await
    .map_err(map_err)?;
    let msg = NewMessage::to_instance(
        format!("{}:failed", row.id),
        format!("{}.failed", row.message_type),
        MessageKind::SendFailed,
        serde_json::json!({ "message_id": row.id, "port": row.port, "error": error }),
        row.instance_id,
    );
    publish_one(tx, &msg, now).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The steps of SQLite's plan for `sql`.
    async fn plan(store: &SqliteStore, sql: &str) -> Vec<String> {
        sqlx::query(&format!("EXPLAIN QUERY PLAN {sql}"))
            .bind("host")
            .bind("2026-12-04T00:00:00Z")
            .bind(256_i64)
            .fetch_all(&store.pool)
            .await
            .unwrap()
            .iter()
            .map(|row| row.get::<String, _>("detail"))
            .collect()
    }

    /// A claim's cost must not grow with how many instances wait (W5: 100,000 dehydrated):
    /// the statements that look for ready messages and due timers start from those rows'
    /// indexes, never from every waiting instance (`instances_by_status`). SQLite plans without
    /// statistics the same on an empty database as on a full one, so an empty one shows it.
    #[tokio::test]
    async fn claims_start_from_ready_messages_and_due_timers_not_from_waiting_instances() {
        let store = SqliteStore::open("sqlite::memory:").await.unwrap();
        store.migrate().await.unwrap();
        for (sql, index) in [
            (CLAIM_MESSAGES.as_str(), "messages_ready"),
            (CLAIM_TIMERS.as_str(), "timers_due"),
            (READY_MESSAGES, "messages_ready"),
            (NEXT_TIMER, "timers_due"),
        ] {
            let steps = plan(&store, sql).await;
            assert!(
                steps.iter().any(|s| s.contains(index)),
                "{sql}\nshould read {index}: {steps:#?}"
            );
            assert!(
                !steps.iter().any(|s| s.contains("instances_by_status")),
                "{sql}\nreads every waiting instance: {steps:#?}"
            );
        }
    }
}
