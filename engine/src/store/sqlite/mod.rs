//! The SQLite MessageBox: the embedded default, for one host process.
//!
//! WAL journal with `synchronous=FULL`: a commit is on disk when it returns. Every write runs in a
//! `BEGIN IMMEDIATE` transaction so that a read followed by a write never fails on a stale
//! snapshot, and `busy_timeout` lets a second process (the CLI beside a running host) wait its turn.
//! Times are stored as fixed-width ISO-8601 UTC text so that they compare correctly as text.
//!
//! This file holds [`SqliteStore`], the helpers every room shares (times, ids and columns read
//! checked, `map_err`), the way into a write transaction, and what the rooms shared with
//! PostgreSQL (`store::common`) need of this backend (`impl Backend`). The rest is in rooms by
//! concern; the PostgreSQL backend has rooms of the same names:
//!
//! | room | what is in it |
//! |---|---|
//! | `connect` | opening the database: connection options, the read pool and the write connection |
//! | `message_box` | `impl MessageBox`: each method hands over to its room |
//! | `routing` | publish and start, routes, reroutes, subscriptions, new instances, convoys |
//! | `claims` | claims of messages and timers, leases (acquire, heartbeat, release), unlock |
//! | `batch` | multi-row writes: a group commit (persistence points), starts, publish batches |
//! | `outbox` | the send side's claims (ordered ports too); renewals and delivery outcomes are `common::Outbox` |
//! | `operator` | `impl OperatorVerbs`, handing over to `common::Operator`; summaries of many instances |
//! | `maintenance` | `impl Maintenance`: migrations, the schema check, recovery at start, activations, `inbox` rows; `control` rows and housekeeping are `common::Upkeep` |
//! | `writer` | the one write connection and the transaction over it |

use std::future::Future;
use std::sync::Arc;

use chrono::{DateTime, NaiveDateTime, Utc};
use sqlx::sqlite::SqliteRow;
use sqlx::{Row, Sqlite, SqlitePool};
use uuid::Uuid;

use super::*;

mod batch;
mod claims;
mod connect;
mod maintenance;
mod message_box;
mod operator;
mod outbox;
mod publish;
mod retention;
mod routing;
mod wake;
mod writer;

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

/// A column as text whatever it holds, in SQL: a BLOB as `x'..'` hex, a NULL as ''.
fn as_text(column: &str) -> String {
    format!(
        "CASE typeof({column}) WHEN 'blob' THEN 'x''' || hex({column}) || '''' \
         WHEN 'null' THEN '' ELSE CAST({column} AS TEXT) END"
    )
}

/// Maps a sqlx error from `operation` to a [`StoreError`]
/// ([`Backend::map_err`](common::Backend::map_err)).
fn map_err(operation: &'static str, err: sqlx::Error) -> StoreError {
    <SqliteStore as common::Backend>::map_err(operation, err)
}

/// Whether an error is worth retrying ([`Backend::retryable`](common::Backend::retryable)).
fn retryable(err: &sqlx::Error) -> bool {
    match err {
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
    /// The wake-up socket of the file's host, for work committed here.
    wake: Arc<wake::Wake>,
    /// What hosts registered through this store, for their claims.
    registered: Arc<common::versions::Registered>,
}

use writer::{Tx, Writer};

impl SqliteStore {
    async fn write(&self) -> StoreResult<Tx> {
        self.writer.begin().await
    }
}

async fn commit(tx: Tx) -> StoreResult<()> {
    tx.commit().await
}

/// A write transaction as the shared rooms hold it: [`Tx`], which stays private to this backend,
/// and whether it made work for the file's host, which [`wake::Wake`] tells after the commit.
pub(in crate::store) struct WriteTx {
    tx: Tx,
    wake: Arc<wake::Wake>,
    made_work: bool,
}

impl SqliteStore {
    /// A write transaction for the shared rooms, durable or soft ([`writer::Writer::begin_soft`]).
    async fn write_tx(&self, durable: bool) -> StoreResult<WriteTx> {
        let tx = if durable {
            self.writer.begin().await?
        } else {
            self.writer.begin_soft().await?
        };
        Ok(WriteTx {
            tx,
            wake: self.wake.clone(),
            made_work: false,
        })
    }
}

impl std::ops::Deref for WriteTx {
    type Target = sqlx::SqliteConnection;

    fn deref(&self) -> &sqlx::SqliteConnection {
        &self.tx
    }
}

impl std::ops::DerefMut for WriteTx {
    fn deref_mut(&mut self) -> &mut sqlx::SqliteConnection {
        &mut self.tx
    }
}

/// What the shared rooms ([`common`](super::common)) need of SQLite: uuids and times bound as
/// text, lists of ids as JSON text read with `json_each`, columns read checked.
impl common::Backend for SqliteStore {
    type Db = Sqlite;
    type Tx = WriteTx;
    type Id = String;
    type Time = String;
    type Count = i64;
    type List = String;

    const FOR_UPDATE: &'static str = "";
    const TRUE: &'static str = "1";
    const IN_LIST_1: &'static str = "IN (SELECT value FROM json_each($1))";
    const IN_LIST_3: &'static str = "IN (SELECT value FROM json_each($3))";
    // LIKE is case-insensitive for ASCII on SQLite.
    const ILIKE: &'static str = "LIKE";
    const DEAD_LETTER_BODY: &'static str = "CAST(body AS BLOB) AS body";
    const COUNT_AS: &'static str = "count";
    const SKIP_LOCKED: &'static str = "";
    const ZOMBIES: &'static str =
        "UPDATE messages SET status = 'zombie', locked_by = NULL, reason = 'its instance ended (' || \
           (SELECT i.status FROM instances i WHERE i.id = messages.instance_id) || ') before consuming it' \
         WHERE status = 'routed' AND instance_id IN \
           (SELECT id FROM instances WHERE status IN ('completed', 'failed', 'terminated'))";
    const GIVE_BACK: &'static str = "delivery_count = max(delivery_count - 1, 0)";
    const RENEW_LEASES: &'static str =
        "UPDATE instances SET lease_expires_at = $2 WHERE owner = $1";

    fn uuid(id: Uuid) -> String {
        id.to_string()
    }
    fn time(at: DateTime<Utc>) -> String {
        ts(at)
    }
    fn count(n: u32) -> i64 {
        i64::from(n)
    }
    fn list(ids: &[String]) -> String {
        serde_json::json!(ids).to_string()
    }
    fn claim_cutoff(&self, _now: DateTime<Utc>) -> Option<String> {
        None
    }
    fn registered(&self) -> &common::versions::Registered {
        &self.registered
    }
    fn retryable(err: &sqlx::Error) -> bool {
        retryable(err)
    }
    fn rows_affected(done: &sqlx::sqlite::SqliteQueryResult) -> u64 {
        done.rows_affected()
    }

    fn reads(&self) -> &SqlitePool {
        &self.pool
    }
    fn begin(&self) -> impl Future<Output = StoreResult<WriteTx>> + Send {
        self.write_tx(true)
    }
    fn begin_soft(&self) -> impl Future<Output = StoreResult<WriteTx>> + Send {
        self.write_tx(false)
    }
    async fn commit(tx: WriteTx) -> StoreResult<()> {
        commit(tx.tx).await?;
        if tx.made_work {
            tx.wake.others();
        }
        Ok(())
    }
    async fn publish_all(
        tx: &mut WriteTx,
        messages: &[(&NewMessage, DateTime<Utc>)],
    ) -> StoreResult<Vec<PublishOutcome>> {
        publish::publish_all(&mut tx.tx, messages).await
    }
    async fn notify(tx: &mut WriteTx) -> StoreResult<()> {
        // Told after the commit: a host woken now would wait on the write lock held here.
        tx.made_work = true;
        Ok(())
    }
    async fn lock_to_publish(_tx: &mut WriteTx, _messages: &[NewMessage]) -> StoreResult<()> {
        Ok(())
    }
    async fn lock_convoy(
        _conn: &mut sqlx::SqliteConnection,
        _orchestration: &str,
        _values: &str,
    ) -> StoreResult<()> {
        Ok(())
    }
    async fn unlock_instance(tx: &mut WriteTx, id: Uuid) -> StoreResult<()> {
        batch::unlock_instances(&mut tx.tx, None, &[id.to_string()], &[]).await
    }
    async fn begin_again(&self, tx: WriteTx, _request_id: i64) -> StoreResult<Option<WriteTx>> {
        drop(tx);
        self.write_tx(true).await.map(Some)
    }
    async fn ready_messages(&self, _now: DateTime<Utc>) -> StoreResult<i64> {
        sqlx::query_scalar(claims::READY_MESSAGES)
            .fetch_one(&self.pool)
            .await
            .map_err(|e| map_err("activity", e))
    }
    async fn next_timer_at(&self, _now: DateTime<Utc>) -> StoreResult<Option<DateTime<Utc>>> {
        let next: Option<String> = sqlx::query_scalar(claims::NEXT_TIMER)
            .fetch_optional(&self.pool)
            .await
            .map_err(|e| map_err("activity", e))?;
        next.as_deref().map(parse_ts).transpose()
    }

    common::column_readers!(SqliteRow, uuid: col_uuid, uuid_opt: col_uuid_opt, time: col_ts, time_opt: col_ts_opt, json: col_json);
    fn col_u32(row: &SqliteRow, _table: &str, name: &str) -> StoreResult<u32> {
        col_u32(row, name)
    }
    fn col_json_opt<T: serde::de::DeserializeOwned>(
        row: &SqliteRow,
        name: &str,
    ) -> StoreResult<Option<T>> {
        col::<Option<String>>(row, name)?
            .map(|t| parse_json(&t).map_err(|e| in_column(name, e)))
            .transpose()
    }
    fn as_text(column: &str) -> String {
        as_text(column)
    }
    fn count_or_zero(column: &str) -> String {
        format!("CASE typeof({column}) WHEN 'integer' THEN max({column}, 0) ELSE 0 END")
    }
    fn uuid_or_null(column: &str) -> String {
        format!("CASE typeof({column}) WHEN 'text' THEN {column} END")
    }
    fn read_text(row: &SqliteRow, name: &str) -> Result<String, String> {
        read(row, name)
    }
    fn read_text_opt(row: &SqliteRow, name: &str) -> Result<Option<String>, String> {
        read(row, name)
    }
    fn col_body(row: &SqliteRow, name: &str) -> StoreResult<String> {
        // As bytes: text that is not UTF-8 (copied from a row written by hand) is shown, not
        // refused.
        Ok(String::from_utf8_lossy(&col::<Vec<u8>>(row, name)?).into_owned())
    }
}

impl common::Claims for SqliteStore {
    async fn claim_rows(
        &self,
        claim: common::Claim<'_>,
    ) -> StoreResult<Vec<sqlx::sqlite::SqliteRow>> {
        claims::claim_rows(self, claim).await
    }
}
impl common::Outbox for SqliteStore {}
impl common::Operator for SqliteStore {}
impl common::Versioning for SqliteStore {}
impl common::Upkeep for SqliteStore {}
