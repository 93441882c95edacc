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
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteRow, SqliteSynchronous,
};
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

/// What a column of `row` holds, in words, for an error: `holds BLOB x'00ff'`, `holds NULL`,
/// `holds TEXT "true"`.
fn holds(row: &SqliteRow, name: &str) -> String {
    use sqlx::{TypeInfo, ValueRef};
    let Ok(raw) = row.try_get_raw(name) else {
        return "is missing".to_owned();
    };
    if raw.is_null() {
        return "holds NULL".to_owned();
    }
    let kind = raw.type_info().name().to_owned();
    let shown = match kind.as_str() {
        "TEXT" => row
            .try_get::<&str, _>(name)
            .map(|t| format!("{:?}", super::storable::shorten(t)))
            .unwrap_or_else(|_| "that is not UTF-8".to_owned()),
        "BLOB" => row
            .try_get::<&[u8], _>(name)
            .map(|b| {
                let hex: String = b.iter().take(16).map(|x| format!("{x:02x}")).collect();
                let more = if b.len() > 16 { "..." } else { "" };
                format!("x'{hex}'{more}")
            })
            .unwrap_or_default(),
        "INTEGER" => row
            .try_get::<i64, _>(name)
            .map(|i| i.to_string())
            .unwrap_or_default(),
        "REAL" => row
            .try_get::<f64, _>(name)
            .map(|f| f.to_string())
            .unwrap_or_default(),
        _ => String::new(),
    };
    format!("holds {kind} {shown}").trim_end().to_owned()
}

/// Reads a column of a row an operator or a tool may have written, checked: a value of the
/// wrong storage class, a NULL where none may be, or text that is not UTF-8 is described (the
/// column and what it holds) instead of panicking, as `Row::get` would.
///
/// # Errors
/// What the column holds and what was expected.
fn read<'r, T>(row: &'r SqliteRow, name: &str) -> Result<T, String>
where
    T: sqlx::Decode<'r, Sqlite> + sqlx::Type<Sqlite>,
{
    use sqlx::TypeInfo;
    row.try_get(name).map_err(|_| {
        format!(
            "column {name} {}, where {} is expected",
            holds(row, name),
            T::type_info().name()
        )
    })
}

/// [`read`], reporting a value that cannot be read as [`StoreError::Corrupt`].
fn col<'r, T>(row: &'r SqliteRow, name: &str) -> StoreResult<T>
where
    T: sqlx::Decode<'r, Sqlite> + sqlx::Type<Sqlite>,
{
    read(row, name).map_err(StoreError::Corrupt)
}

/// An error about a value, said of column `name`.
fn in_column(name: &str, err: StoreError) -> StoreError {
    match err {
        StoreError::Corrupt(why) => StoreError::Corrupt(format!("column {name}: {why}")),
        other => other,
    }
}

/// A text column parsed as a uuid, checked.
fn col_uuid(row: &SqliteRow, name: &str) -> StoreResult<Uuid> {
    parse_uuid(&col::<String>(row, name)?).map_err(|e| in_column(name, e))
}

/// A nullable text column parsed as a uuid, checked.
fn col_uuid_opt(row: &SqliteRow, name: &str) -> StoreResult<Option<Uuid>> {
    col::<Option<String>>(row, name)?
        .map(|t| parse_uuid(&t).map_err(|e| in_column(name, e)))
        .transpose()
}

/// A time column, checked.
fn col_ts(row: &SqliteRow, name: &str) -> StoreResult<DateTime<Utc>> {
    parse_ts(&col::<String>(row, name)?).map_err(|e| in_column(name, e))
}

/// A nullable time column, checked.
fn col_ts_opt(row: &SqliteRow, name: &str) -> StoreResult<Option<DateTime<Utc>>> {
    col::<Option<String>>(row, name)?
        .map(|t| parse_ts(&t).map_err(|e| in_column(name, e)))
        .transpose()
}

/// A status or kind word column, checked.
fn col_word<T: FromStr<Err = String>>(row: &SqliteRow, name: &str) -> StoreResult<T> {
    col::<String>(row, name)?
        .parse()
        .map_err(|e: String| StoreError::Corrupt(format!("column {name}: {e}")))
}

/// A JSON text column, checked.
fn col_json<T: serde::de::DeserializeOwned>(row: &SqliteRow, name: &str) -> StoreResult<T> {
    parse_json(&col::<String>(row, name)?).map_err(|e| in_column(name, e))
}

/// A count column (`version`, `attempts`) as a `u32`, checked.
fn col_u32(row: &SqliteRow, name: &str) -> StoreResult<u32> {
    let value: i64 = col(row, name)?;
    u32::try_from(value)
        .map_err(|_| StoreError::Corrupt(format!("column {name} holds {value}, out of range")))
}

fn parse_ts(text: &str) -> StoreResult<DateTime<Utc>> {
    NaiveDateTime::parse_from_str(text, TS_FORMAT)
        .map(|n| n.and_utc())
        .map_err(|e| StoreError::Corrupt(format!("time {:?}: {e}", super::storable::shorten(text))))
}

fn parse_uuid(text: &str) -> StoreResult<Uuid> {
    Uuid::parse_str(text)
        .map_err(|e| StoreError::Corrupt(format!("uuid {:?}: {e}", super::storable::shorten(text))))
}

fn parse_json<T: serde::de::DeserializeOwned>(text: &str) -> StoreResult<T> {
    serde_json::from_str(text).map_err(|e| {
        StoreError::Corrupt(format!(
            "not JSON ({e}): {:?}",
            super::storable::shorten(text)
        ))
    })
}

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
        StoreError::Database {
            operation,
            source: err,
        }
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
            .map_err(|e| map_err("claim", e))?;
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
            .map_err(|source| StoreError::Database {
                operation: "open",
                source,
            })?
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
            let pool = connect(1).await.map_err(|e| map_err("open", e))?;
            return Ok(Self {
                writer: Writer::Pooled(pool.clone()),
                pool,
            });
        }
        let writer = Writer::connect(&options)
            .await
            .map_err(|e| map_err("open", e))?;
        let pool = connect(3).await.map_err(|e| map_err("open", e))?;
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
        .map_err(|e| map_err("activate", e))?;
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
    .map_err(|e| map_err("insert instance", e))?;
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
        .map_err(|e| map_err("reroute", e))?;
        for row in rows {
            let seq: i64 = col(&row, "seq")?;
            // An unrouted message whose properties cannot be read stays unrouted (and is
            // dead-lettered after its time to live): it must not stop the others routing.
            let properties: BTreeMap<String, String> = match col_json(&row, "properties") {
                Ok(properties) => properties,
                Err(e) => {
                    tracing::warn!(message.seq = seq, error = %e, "an unrouted message cannot be read; left unrouted");
                    continue;
                }
            };
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
            .map_err(|e| map_err("reroute", e))?;
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
        .map_err(|e| map_err("exists", e))
}

async fn next_history_seq(tx: &mut Tx, id: &str) -> StoreResult<i64> {
    let seq: i64 = sqlx::query_scalar("SELECT history_seq FROM instances WHERE id = $1")
        .bind(id)
        .fetch_one(&mut **tx)
        .await
        .map_err(|e| map_err("next history seq", e))?;
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
    .map_err(|e| map_err("insert history", e))?;
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
    .map_err(|e| map_err("control in", e))?
    .ok_or(StoreError::NoSuchInstance(id))?;
    let status: InstanceStatus = col_word(&row, "status")?;
    let step: String = col(&row, "step")?;
    let parent: Option<String> = col(&row, "parent_id")?;
    action.check(
        id,
        status,
        col::<bool>(&row, "resumable")?,
        col::<Option<String>>(&row, "last_error")?,
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
                .map_err(|e| map_err("control in", e))?;
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
                .map_err(|e| map_err("control in", e))?;
            // Its messages are delivered again from scratch: poison counting starts over.
            sqlx::query("UPDATE messages SET delivery_count = 0 WHERE instance_id = $1 AND status = 'routed'")
                    .bind(&key)
                    .execute(&mut **tx)
                    .await
                    .map_err(|e| map_err("control in", e))?;
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
                .map_err(|e| map_err("control in", e))?;
            for sql in [
                "DELETE FROM subscriptions WHERE instance_id = $1",
                "DELETE FROM timers WHERE instance_id = $1",
            ] {
                sqlx::query(sql)
                    .bind(&key)
                    .execute(&mut **tx)
                    .await
                    .map_err(|e| map_err("control in", e))?;
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

/// A claimed message row, checked.
fn stored_message(row: &SqliteRow) -> StoreResult<StoredMessage> {
    Ok(StoredMessage {
        seq: col(row, "seq")?,
        id: col(row, "id")?,
        message_type: col(row, "message_type")?,
        kind: col_word(row, "kind")?,
        properties: col_json(row, "properties")?,
        body: col_json(row, "body")?,
        instance_id: col_uuid(row, "instance_id")?,
        subscription_id: col_uuid_opt(row, "subscription_id")?,
        published_at: col_ts(row, "published_at")?,
        delivery_count: col(row, "delivery_count")?,
    })
}

/// An acquired instance row, checked.
fn instance_record(row: &SqliteRow) -> StoreResult<InstanceRecord> {
    Ok(InstanceRecord {
        id: col_uuid(row, "id")?,
        orchestration: col(row, "orchestration")?,
        version: col_u32(row, "version")?,
        status: col_word(row, "status")?,
        state: col(row, "state")?,
        engine_state: col(row, "engine_state")?,
        epoch: col(row, "epoch")?,
        history_seq: col(row, "history_seq")?,
        parent_id: col_uuid_opt(row, "parent_id")?,
    })
}

/// A column as text whatever it holds, in SQL: a BLOB as `x'..'` hex, a NULL as ''.
fn as_text(column: &str) -> String {
    format!(
        "CASE typeof({column}) WHEN 'blob' THEN 'x''' || hex({column}) || '''' \
         WHEN 'null' THEN '' ELSE CAST({column} AS TEXT) END"
    )
}

/// Dead-letters claimed messages that cannot be read, `(seq, why)`: a copy of each goes to
/// `dead_letters` with the reason (its columns as text, whatever they hold), and the message is
/// marked `dead`, so that it is never claimed again and holds back nothing.
async fn bury_messages(tx: &mut Tx, rows: &[(i64, String)], now: DateTime<Utc>) -> StoreResult<()> {
    for (seq, why) in rows {
        let reason = format!("message {seq} cannot be read: {why}");
        tracing::error!(message.seq = seq, error = %reason, "a message cannot be read; dead-lettered");
        sqlx::query(&format!(
            "INSERT INTO dead_letters (id, instance_id, port, message_type, body, reason, attempts, dead_at) \
             SELECT {}, CASE typeof(instance_id) WHEN 'text' THEN instance_id END, NULL, {}, {}, \
               $2, 0, $3 FROM messages WHERE seq = $1 \
             ON CONFLICT (id) DO NOTHING",
            as_text("id"),
            as_text("message_type"),
            as_text("body"),
        ))
        .bind(seq)
        .bind(&reason)
        .bind(ts(now))
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

/// Suspends instance `id` (as its text is stored) because a row of it cannot be read: its
/// status, `last_error` and a new epoch (a host holding it in memory is fenced). No history row
/// is written: the instance's own columns may be what cannot be read. An operator fixes the row,
/// then resumes it.
async fn suspend_unreadable(
    tx: &mut Tx,
    id: &str,
    why: &str,
    now: DateTime<Utc>,
) -> StoreResult<()> {
    sqlx::query(
        "UPDATE instances SET status = 'suspended', last_error = $2, epoch = epoch + 1, \
         owner = NULL, lease_expires_at = NULL, updated_at = $3 \
         WHERE id = $1 AND status IN ('running', 'dehydrated')",
    )
    .bind(id)
    .bind(why)
    .bind(ts(now))
    .execute(&mut **tx)
    .await
    .map_err(|e| map_err("suspend unreadable", e))?;
    Ok(())
}

/// Reads a pending `control` row, checked: a column of the wrong storage class, a NULL or an
/// unknown action is reported (the column and what it holds) for the row's `result`.
fn control_request(row: &SqliteRow, id: i64) -> StoreResult<ControlRequest> {
    let read = || -> StoreResult<ControlRequest> {
        Ok(ControlRequest {
            id,
            instance_id: col_uuid(row, "instance_id")?,
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
/// Why not, for its dead letter: a column and what it holds, a body that is not JSON, a NUL, a
/// body over `max_bytes`.
fn inbox_row(row: &SqliteRow, id: i64, max_bytes: usize) -> Result<NewMessage, String> {
    let text = |name| read::<String>(row, name).map_err(|e| format!("inbox row {id}: {e}"));
    let message_id =
        read::<Option<String>>(row, "message_id").map_err(|e| format!("inbox row {id}: {e}"))?;
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

/// Dead-letters a claimed outbox row that cannot be read: a copy goes to `dead_letters` with
/// the reason (its columns as text, whatever they hold), the row is marked `dead`, and its
/// instance, if the row names one that can be read, is told (`Event::SendFailed`).
async fn bury_send(tx: &mut Tx, row: &SqliteRow, why: &str, now: DateTime<Utc>) -> StoreResult<()> {
    let Ok(id) = col::<String>(row, "id") else {
        tracing::error!(error = %why, "an outbox row cannot be read, nor its id; left locked");
        return Ok(());
    };
    let reason = format!("send {id} cannot be read: {why}");
    tracing::error!(send.id = %id, error = %reason, "a send cannot be read; dead-lettered");
    sqlx::query(&format!(
        "INSERT INTO dead_letters (id, instance_id, port, message_type, body, reason, attempts, dead_at) \
         SELECT id, CASE typeof(instance_id) WHEN 'text' THEN instance_id END, {}, {}, {}, $2, \
           CASE typeof(attempts) WHEN 'integer' THEN attempts ELSE 0 END, $3 FROM outbox WHERE id = $1 \
         ON CONFLICT (id) DO UPDATE SET reason = excluded.reason, dead_at = excluded.dead_at",
        as_text("port"),
        as_text("message_type"),
        as_text("body"),
    ))
    .bind(&id)
    .bind(&reason)
    .bind(ts(now))
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
    if let (Ok(instance), Ok(message_type)) = (
        col_uuid(row, "instance_id"),
        col::<String>(row, "message_type"),
    ) {
        let msg = NewMessage::to_instance(
            format!("{id}:failed"),
            format!("{message_type}.failed"),
            MessageKind::SendFailed,
            serde_json::json!({ "message_id": id, "error": reason }),
            instance,
        );
        publish_one(tx, &msg, now).await?;
    }
    Ok(())
}

fn summary_from_row(row: &sqlx::sqlite::SqliteRow) -> StoreResult<InstanceSummary> {
    Ok(InstanceSummary {
        id: col_uuid(row, "id")?,
        orchestration: col(row, "orchestration")?,
        version: col_u32(row, "version")?,
        status: col_word(row, "status")?,
        step: col(row, "step")?,
        waiting_for: col(row, "waiting_for")?,
        updated_at: col_ts(row, "updated_at")?,
        last_error: col(row, "last_error")?,
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
impl MessageBox for SqliteStore {
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
        let mut out = Vec::with_capacity(rows.len());
        let mut unreadable = Vec::new();
        for row in &rows {
            let timer = (|| {
                Ok::<_, StoreError>(DueTimer {
                    instance_id: col_uuid(row, "instance_id")?,
                    name: col(row, "name")?,
                    due_at: col_ts(row, "due_at")?,
                })
            })();
            match timer {
                Ok(timer) => out.push(timer),
                Err(e) => unreadable.push((row, e)),
            }
        }
        if !unreadable.is_empty() {
            let mut tx = self.write().await?;
            for (row, e) in unreadable {
                // Its instance, if the row names one, is suspended with the reason (it would
                // wait for the timer forever); the row stays locked to this host, so it is not
                // claimed again while the host runs.
                let why = format!("a timer of this instance cannot be read: {e}");
                tracing::error!(error = %why, "a timer row cannot be read");
                if let Ok(id) = col::<String>(row, "instance_id") {
                    suspend_unreadable(&mut tx, &id, &why, now).await?;
                }
            }
            commit(tx).await?;
        }
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
                .map_err(|e| map_err("acquire", e))?;
            for row in rows {
                match instance_record(&row) {
                    Ok(record) => out.push(record),
                    Err(e) => {
                        // Left out of the answer, as if another host held it: suspended with
                        // the reason, so that it is not claimed again until an operator fixes
                        // the row and resumes it.
                        let id: String = col(&row, "id")?;
                        let why = format!("its instances row cannot be read: {e}");
                        tracing::error!(instance.id = %id, error = %why, "an instance cannot be loaded; suspended");
                        suspend_unreadable(&mut tx, &id, &why, now).await?;
                    }
                }
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
            .map_err(|e| map_err("heartbeat", e))?;
        sqlx::query("UPDATE hosts SET heartbeat_at = $2 WHERE id = $1")
            .bind(host)
            .bind(ts(now))
            .execute(&mut *tx)
            .await
            .map_err(|e| map_err("heartbeat", e))?;
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
            sqlx::query(sql).bind(host).execute(&mut *tx).await.map_err(|e| map_err("release", e))?;
        }
        sqlx::query("UPDATE hosts SET stopped_at = $2, heartbeat_at = $2 WHERE id = $1")
            .bind(host)
            .bind(ts(now))
            .execute(&mut *tx)
            .await
            .map_err(|e| map_err("release", e))?;
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
        .map_err(|e| map_err("claim outbox", e))?;
        let mut out = Vec::with_capacity(rows.len());
        let mut unreadable = Vec::new();
        for row in &rows {
            match outbox_row(row) {
                Ok(send) => out.push(send),
                Err(e) => unreadable.push((row, e.to_string())),
            }
        }
        if !unreadable.is_empty() {
            // Dead-lettered in the claim's transaction: never claimed again, never a stop for
            // the sends beside them.
            for (row, why) in unreadable {
                bury_send(&mut tx, row, &why, now).await?;
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
            "SELECT id, instance_id, port, message_type, body, expects_reply, attempts, status, \
             next_attempt_at, locked_by, locked_until FROM outbox \
             WHERE port = $1 AND status IN ('pending', 'held', 'give_up') ORDER BY seq LIMIT 1",
        )
        .bind(port)
        .fetch_optional(&mut *tx)
        .await
        .map_err(|e| map_err("claim ordered", e))?;
        let Some(head) = head else { return Ok(None) };
        let status: String = col(&head, "status")?;
        let due = col_ts(&head, "next_attempt_at")? <= now;
        let locked_by: Option<String> = col(&head, "locked_by")?;
        let locked_until = col_ts_opt(&head, "locked_until")?;
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
             AND id IN (SELECT value FROM json_each($3))",
        )
        .bind(host)
        .bind(ts(lock_until))
        .bind(serde_json::json!(ids).to_string())
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
                    .bind(ts(now))
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
                    .bind(ts(now))
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
                    .bind(ts(now))
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
}

#[async_trait]
impl OperatorVerbs for SqliteStore {
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
             WHERE status IN ('pending', 'held') AND id IN (SELECT value FROM json_each($1))",
        )
        .bind(serde_json::json!(ids).to_string())
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
        .bind(ts(now))
        .execute(&mut *tx)
        .await
        .map_err(|e| map_err("resume send", e))?
        .rows_affected();
        commit(tx).await?;
        Ok(done == 1)
    }

    async fn dead_letters(&self, limit: u32) -> StoreResult<Vec<DeadLetter>> {
        let rows = sqlx::query(
            "SELECT id, instance_id, port, message_type, CAST(body AS BLOB) AS body, reason, \
             attempts, dead_at FROM dead_letters ORDER BY dead_at DESC, id LIMIT $1",
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
            "SELECT id, instance_id, port, message_type, CAST(body AS BLOB) AS body, reason, \
             attempts, dead_at FROM dead_letters WHERE id = $1",
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
        .bind(ts(now))
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
            "SELECT {SUMMARY_COLUMNS} FROM instances WHERE ($1 IS NULL OR status = $1) \
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
            let rows = query
                .build()
                .fetch_all(&self.pool)
                .await
                .map_err(|e| map_err("instance summaries", e))?;
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
        .map_err(|e| map_err("instance detail", e))?
        else {
            return Ok(None);
        };
        let history = sqlx::query(
            "SELECT seq, reason, step, status, at, detail FROM history WHERE instance_id = $1 ORDER BY seq",
        )
        .bind(&key)
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
                at: col_ts(h, "at")?,
                detail: col(h, "detail")?,
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
                .map(|t| parse_json(&t).map_err(|e| in_column("output", e)))
                .transpose()?,
            next_timer_at: col_ts_opt(&row, "next_timer_at")?,
            created_at: col_ts(&row, "created_at")?,
            history,
            pending_messages: pending.into_iter().map(|(id, ty, _)| (id, ty)).collect(),
            zombies: zombies.into_iter().map(|(id, ty, _)| (id, ty)).collect(),
        }))
    }

    async fn activity(&self, _now: DateTime<Utc>) -> StoreResult<Activity> {
        let mut activity = Activity::default();
        for row in sqlx::query("SELECT status, COUNT(*) AS count FROM instances GROUP BY status")
            .fetch_all(&self.pool)
            .await
            .map_err(|e| map_err("activity", e))?
        {
            activity
                .by_status
                .insert(col(&row, "status")?, col(&row, "count")?);
        }
        activity.ready_messages = sqlx::query_scalar(READY_MESSAGES)
            .fetch_one(&self.pool)
            .await
            .map_err(|e| map_err("activity", e))?;
        activity.pending_sends =
            sqlx::query_scalar("SELECT COUNT(*) FROM outbox WHERE status = 'pending'")
                .fetch_one(&self.pool)
                .await
                .map_err(|e| map_err("activity", e))?;
        let next: Option<String> = sqlx::query_scalar(NEXT_TIMER)
            .fetch_optional(&self.pool)
            .await
            .map_err(|e| map_err("activity", e))?;
        activity.next_timer_at = next.as_deref().map(parse_ts).transpose()?;
        Ok(activity)
    }
}

#[async_trait]
impl Maintenance for SqliteStore {
    fn backend(&self) -> &'static str {
        "sqlite"
    }

    async fn migrate(&self) -> StoreResult<()> {
        MIGRATOR.run(&self.pool).await?;
        Ok(())
    }

    async fn check_schema(&self) -> StoreResult<()> {
        let tables: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM sqlite_master WHERE type = 'table' AND name = '_sqlx_migrations'",
        )
        .fetch_one(&self.pool)
        .await
        .map_err(|e| map_err("check schema", e))?;
        let applied = if tables == 0 {
            None
        } else {
            Some(
                sqlx::query_as::<_, (i64, bool, Vec<u8>)>(
                    "SELECT version, success, checksum FROM _sqlx_migrations ORDER BY version",
                )
                .fetch_all(&self.pool)
                .await
                .map_err(|e| map_err("check schema", e))?,
            )
        };
        compare_schema(&MIGRATOR, applied).map_err(StoreError::Schema)
    }

    async fn recover(&self, host: &str, now: DateTime<Utc>) -> StoreResult<()> {
        let mut tx = self.write().await?;
        // One host per file: starting releases everything a previous host held, which is only
        // safe if that host is gone. A host of this process (tests) or a dead process is.
        let rows = sqlx::query("SELECT id, pid, name FROM hosts WHERE stopped_at IS NULL")
            .fetch_all(&mut *tx)
            .await
            .map_err(|e| map_err("recover", e))?;
        let mut running = Vec::with_capacity(rows.len());
        for row in &rows {
            match (
                col::<String>(row, "id"),
                col::<i64>(row, "pid"),
                col::<String>(row, "name"),
            ) {
                (Ok(id), Ok(pid), Ok(name)) => running.push((id, pid, name)),
                // Not a host this build wrote: it names no process to wait for, and is marked
                // stopped below with the others.
                (id, pid, name) => {
                    let error: Vec<String> = [id.err(), name.err()]
                        .into_iter()
                        .flatten()
                        .chain(pid.err())
                        .map(|e| e.to_string())
                        .collect();
                    tracing::warn!(error = ?error, "a hosts row cannot be read; taken as stopped");
                }
            }
        }
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
            sqlx::query(sql).execute(&mut *tx).await.map_err(|e| map_err("recover", e))?;
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
        .map_err(|e| map_err("recover", e))?;
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
            .map_err(|e| map_err("sync activations", e))?;
            types.insert(a.message_type.clone());
        }
        reroute(&mut tx, &types).await?;
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
                "SELECT id, instance_id, action, reason, force FROM control WHERE status = 'pending' ORDER BY id LIMIT 1",
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
                // with the reason.
                Err(ref e) => {
                    drop(tx);
                    (self.write().await?, "rejected", e.to_string())
                }
            };
            sqlx::query("UPDATE control SET status = $2, result = $3, done_at = $4, done_by = $5 WHERE id = $1")
                .bind(request_id)
                .bind(status)
                .bind(&text)
                .bind(ts(now))
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
            "UPDATE messages SET status = 'zombie', locked_by = NULL, reason = 'its instance ended (' || \
               (SELECT i.status FROM instances i WHERE i.id = messages.instance_id) || ') before consuming it' \
             WHERE status = 'routed' AND instance_id IN \
               (SELECT id FROM instances WHERE status IN ('completed', 'failed', 'terminated'))",
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
        .bind(ts(unrouted_before))
        .bind(ts(now))
        .execute(&mut *tx)
        .await
        .map_err(|e| map_err("housekeeping", e))?;
        let expired = sqlx::query(
            "UPDATE messages SET status = 'dead', \
               reason = 'dead-lettered after its time to live: ' || COALESCE(reason, '') \
             WHERE status = 'unrouted' AND published_at < $1",
        )
        .bind(ts(unrouted_before))
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
            "SELECT id, message_id, message_type, properties, body FROM inbox ORDER BY id LIMIT $1",
        )
        .bind(i64::from(limit))
        .fetch_all(&mut *tx)
        .await
        .map_err(|e| map_err("take inbox", e))?;
        for row in &rows {
            // `id` is the rowid: always an integer.
            let id: i64 = col(row, "id")?;
            let refused = match inbox_row(row, id, max_message_bytes) {
                Ok(msg) => publish_or_refuse(&mut tx, id, &msg, now).await?,
                Err(reason) => Some(reason),
            };
            if let Some(reason) = refused {
                tracing::warn!(inbox.id = id, error = %reason, "an inbox row was dead-lettered");
                sqlx::query(&format!(
                    "INSERT INTO dead_letters (id, message_type, body, reason, attempts, dead_at) \
                     SELECT 'inbox-' || id, {}, {}, $2, 0, $3 FROM inbox WHERE id = $1 \
                     ON CONFLICT (id) DO NOTHING",
                    as_text("message_type"),
                    as_text("body"),
                ))
                .bind(id)
                .bind(&reason)
                .bind(ts(now))
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
        commit(tx).await?;
        Ok(rows.len())
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
        id: col(row, "id")?,
        instance_id: col_uuid(row, "instance_id")?,
        port: col(row, "port")?,
        message_type: col(row, "message_type")?,
        body: col_json(row, "body")?,
        expects_reply: col(row, "expects_reply")?,
        attempts: col_u32(row, "attempts")?,
    })
}

fn dead_letter_row(row: &sqlx::sqlite::SqliteRow) -> StoreResult<DeadLetter> {
    Ok(DeadLetter {
        id: col(row, "id")?,
        instance_id: col_uuid_opt(row, "instance_id")?,
        port: col(row, "port")?,
        message_type: col(row, "message_type")?,
        // As bytes: text that is not UTF-8 (copied from a row written by hand) is shown, not
        // refused.
        body: super::dead_letter_body(&String::from_utf8_lossy(&col::<Vec<u8>>(row, "body")?)),
        reason: col(row, "reason")?,
        attempts: col_u32(row, "attempts")?,
        dead_at: col_ts(row, "dead_at")?,
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
    .map_err(|e| map_err("dead letter send", e))?;
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

    #[tokio::test]
    async fn the_schema_check_tells_a_missing_a_behind_and_an_ahead_schema_apart() {
        let store = SqliteStore::open("sqlite::memory:").await.unwrap();
        let check = || async { store.check_schema().await.map_err(|e| e.to_string()) };
        assert!(check().await.unwrap_err().contains("no Cairn schema"));
        store.migrate().await.unwrap();
        check().await.unwrap();
        let newest = MIGRATOR.iter().map(|m| m.version).max().unwrap();
        sqlx::query("UPDATE _sqlx_migrations SET success = FALSE WHERE version = $1")
            .bind(newest)
            .execute(&store.pool)
            .await
            .unwrap();
        let failed = check().await.unwrap_err();
        assert!(failed.contains("failed part-way"), "{failed}");
        sqlx::query("DELETE FROM _sqlx_migrations WHERE version = $1")
            .bind(newest)
            .execute(&store.pool)
            .await
            .unwrap();
        let behind = check().await.unwrap_err();
        assert!(
            behind.contains("behind this build") && behind.contains(&newest.to_string()),
            "{behind}"
        );
        sqlx::query(
            "INSERT INTO _sqlx_migrations (version, description, success, checksum, execution_time) \
             VALUES ($1, 'x', TRUE, X'00', 0), (99991231000000, 'newer', TRUE, X'00', 0)",
        )
        .bind(newest)
        .execute(&store.pool)
        .await
        .unwrap();
        let damaged = check().await.unwrap_err();
        assert!(
            damaged.contains("changed after it was applied"),
            "{damaged}"
        );
        sqlx::query("DELETE FROM _sqlx_migrations WHERE version = $1")
            .bind(newest)
            .execute(&store.pool)
            .await
            .unwrap();
        let ahead = check().await.unwrap_err();
        assert!(
            ahead.contains("99991231000000") && ahead.contains("older than the schema"),
            "{ahead}"
        );
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
    /// A value of any SQLite storage class.
    #[derive(Debug, Clone)]
    enum Val {
        Null,
        Int(i64),
        Real(f64),
        Text(String),
        Blob(Vec<u8>),
    }

    /// The instance the control rows of the property test may name.
    const TARGET: &str = "018f0000-0000-7000-8000-000000000001";

    fn val() -> impl proptest::strategy::Strategy<Value = Val> {
        use proptest::prelude::*;
        prop_oneof![
            Just(Val::Null),
            any::<i64>().prop_map(Val::Int),
            any::<f64>().prop_map(Val::Real),
            prop_oneof![
                Just("suspend"),
                Just("resume"),
                Just("terminate"),
                Just("true"),
                Just(TARGET),
            ]
            .prop_map(|s| Val::Text(s.to_owned())),
            any::<String>().prop_map(Val::Text),
            proptest::collection::vec(any::<u8>(), 0..8).prop_map(Val::Blob),
        ]
    }

    /// Mostly the target instance, as text, and sometimes anything.
    fn id() -> impl proptest::strategy::Strategy<Value = Val> {
        use proptest::prelude::*;
        prop_oneof![3 => Just(Val::Text(TARGET.to_owned())), 1 => val()]
    }

    /// Mostly an action the CHECK admits, and sometimes anything (refused at the insert).
    fn action() -> impl proptest::strategy::Strategy<Value = Val> {
        use proptest::prelude::*;
        prop_oneof![
            4 => prop_oneof![Just("suspend"), Just("resume"), Just("terminate")]
                .prop_map(|s| Val::Text(s.to_owned())),
            1 => val(),
        ]
    }

    fn bind<'q>(
        q: sqlx::query::Query<'q, Sqlite, sqlx::sqlite::SqliteArguments<'q>>,
        v: &Val,
    ) -> sqlx::query::Query<'q, Sqlite, sqlx::sqlite::SqliteArguments<'q>> {
        match v {
            Val::Null => q.bind(None::<i64>),
            Val::Int(i) => q.bind(*i),
            Val::Real(f) => q.bind(*f),
            Val::Text(t) => q.bind(t.clone()),
            Val::Blob(b) => q.bind(b.clone()),
        }
    }

    /// Whatever storage class and value a hand-written `control` row holds in each column
    /// (those its constraints admit), a host's pass carries it out or rejects it with a
    /// reason: never a panic, never an error that would stop the rows behind it.
    #[test]
    fn arbitrary_control_rows_are_applied_or_rejected() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let store = rt.block_on(async {
            let store = SqliteStore::open("sqlite::memory:").await.unwrap();
            store.migrate().await.unwrap();
            store
        });
        let reached = std::sync::atomic::AtomicUsize::new(0);
        let mut runner =
            proptest::test_runner::TestRunner::new(proptest::test_runner::Config::with_cases(128));
        runner
            .run(&(id(), action(), val(), val()), |(id, action, reason, force)| {
                rt.block_on(async {
                    let now = Utc::now();
                    // The instance exists, running, before each row.
                    sqlx::query("DELETE FROM instances").execute(&store.pool).await.unwrap();
                    insert_instance_row(&store, now).await;
                    let q = sqlx::query(
                        "INSERT INTO control (instance_id, action, reason, force) VALUES ($1, $2, $3, $4)",
                    );
                    let q = bind(bind(bind(bind(q, &id), &action), &reason), &force);
                    if q.execute(&store.pool).await.is_err() {
                        // Refused by a constraint (NOT NULL, the action's CHECK): nothing to read.
                        return;
                    }
                    let applied = store.apply_controls("host", now, 10).await.unwrap();
                    assert_eq!(applied.len(), 1, "{applied:?}");
                    reached.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let pending: i64 =
                        sqlx::query_scalar("SELECT COUNT(*) FROM control WHERE status = 'pending'")
                            .fetch_one(&store.pool)
                            .await
                            .unwrap();
                    assert_eq!(pending, 0);
                });
                Ok(())
            })
            .unwrap();
        let reached = reached.into_inner();
        assert!(
            reached >= 32,
            "only {reached} of 128 rows passed the table's constraints"
        );
    }

    async fn insert_instance_row(store: &SqliteStore, now: DateTime<Utc>) {
        let mut tx = store.write().await.unwrap();
        insert_instance(&mut tx, parse_uuid(TARGET).unwrap(), "o", 1, None, now)
            .await
            .unwrap();
        commit(tx).await.unwrap();
    }
}
