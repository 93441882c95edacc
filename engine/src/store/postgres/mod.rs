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

use std::future::Future;
use std::sync::atomic::AtomicI64;
use std::sync::Arc;

use sqlx::postgres::{PgConnectOptions, PgRow};
use sqlx::{PgPool, Postgres, Row, Transaction};

use super::*;

mod batch;
mod claims;
mod connect;
mod kept;
mod listen;
mod maintenance;
mod message_box;
mod operator;
mod outbox;
mod retention;
mod routing;

use kept::KeptConnection;

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../migrations/postgres");

/// The schema every table lives in.
pub const SCHEMA: &str = "cairn";

/// The channel notified when a transaction made work for hosts.
pub const WORK_CHANNEL: &str = "cairn_work";

/// Maps a sqlx error from `operation` to a [`StoreError`]
/// ([`Backend::map_err`](common::Backend::map_err)).
fn map_err(operation: &'static str, err: sqlx::Error) -> StoreError {
    <PostgresStore as common::Backend>::map_err(operation, err)
}

/// Whether an error is worth retrying ([`Backend::retryable`](common::Backend::retryable)).
fn retryable(err: &sqlx::Error) -> bool {
    match err {
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
    /// How to connect the kept soft connection: `synchronous_commit` off.
    soft_options: PgConnectOptions,
    /// The connection kept for persistence points written as one statement
    /// ([`Self::point_connection`]).
    points: KeptConnection,
    /// The connection kept for soft writes of one statement ([`Self::soft_connection`]).
    soft: KeptConnection,
    /// The lease duration this store's host uses, in milliseconds, learnt from `acquire` and
    /// `heartbeat`; a host whose heartbeat is older than two of them is presumed gone.
    lease_ms: Arc<AtomicI64>,
    /// What hosts registered through this store, for their claims.
    registered: Arc<common::versions::Registered>,
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

/// What the shared rooms ([`common`](super::common)) need of PostgreSQL: uuids, times and
/// lists bound as themselves, rows locked when read to write, other hosts woken.
impl common::Backend for PostgresStore {
    type Db = Postgres;
    type Tx = Tx;
    type Id = Uuid;
    type Time = DateTime<Utc>;
    type Count = i32;
    type List = Vec<String>;

    const FOR_UPDATE: &'static str = " FOR UPDATE";
    const TRUE: &'static str = "TRUE";
    const IN_LIST_1: &'static str = "= ANY($1)";
    const IN_LIST_3: &'static str = "= ANY($3)";
    const ILIKE: &'static str = "ILIKE";
    const DEAD_LETTER_BODY: &'static str = "body";
    const COUNT_AS: &'static str = "n";
    const SKIP_LOCKED: &'static str = " FOR UPDATE SKIP LOCKED";
    const ZOMBIES: &'static str = "UPDATE messages m SET status = 'zombie', locked_by = NULL, \
           reason = 'its instance ended (' || i.status || ') before consuming it' \
         FROM instances i WHERE i.id = m.instance_id AND m.status = 'routed' \
           AND i.status IN ('completed', 'failed', 'terminated')";
    const GIVE_BACK: &'static str = "delivery_count = GREATEST(delivery_count - 1, 0)";
    // Rows a commit of this host holds right now are skipped (renewed at the next beat); taking
    // them in id order keeps the beat from deadlocking with commits.
    const RENEW_LEASES: &'static str = "UPDATE instances SET lease_expires_at = $2 WHERE id IN ( \
           SELECT id FROM instances WHERE owner = $1 ORDER BY id FOR UPDATE SKIP LOCKED)";

    fn uuid(id: Uuid) -> Uuid {
        id
    }
    fn time(at: DateTime<Utc>) -> DateTime<Utc> {
        at
    }
    fn count(n: u32) -> i32 {
        int4(n)
    }
    fn learn_lease(&self, now: DateTime<Utc>, lease_until: DateTime<Utc>) {
        let ms = (lease_until - now).num_milliseconds();
        if ms > 0 {
            self.lease_ms
                .store(ms, std::sync::atomic::Ordering::Relaxed);
        }
    }
    fn claim_cutoff(&self, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
        Some(self.host_cutoff(now))
    }
    fn registered(&self) -> &common::versions::Registered {
        &self.registered
    }
    fn list(ids: &[String]) -> Vec<String> {
        ids.to_vec()
    }
    fn retryable(err: &sqlx::Error) -> bool {
        retryable(err)
    }
    fn rows_affected(done: &sqlx::postgres::PgQueryResult) -> u64 {
        done.rows_affected()
    }

    fn reads(&self) -> &PgPool {
        &self.pool
    }
    fn begin(&self) -> impl Future<Output = StoreResult<Tx>> + Send {
        self.write()
    }
    async fn begin_soft(&self) -> StoreResult<Tx> {
        // Committed without waiting for the WAL's flush: a server crash may lose it, which
        // harms nothing (claim locks, leases, epochs: the fence checks the owner too), and the
        // next synchronous commit flushes it along.
        let mut tx = self.write().await?;
        sqlx::query("SET LOCAL synchronous_commit = off")
            .execute(&mut *tx)
            .await
            .map_err(|e| map_err("begin", e))?;
        Ok(tx)
    }
    fn commit(tx: Tx) -> impl Future<Output = StoreResult<()>> + Send {
        connect::commit(tx)
    }
    async fn publish_all(
        tx: &mut Tx,
        messages: &[(&NewMessage, DateTime<Utc>)],
    ) -> StoreResult<Vec<PublishOutcome>> {
        batch::publish_all(tx, messages).await
    }
    async fn notify(tx: &mut Tx) -> StoreResult<()> {
        listen::notify(tx).await
    }
    async fn lock_to_publish(tx: &mut Tx, messages: &[NewMessage]) -> StoreResult<()> {
        routing::lock_routes(tx, routing::routed_types(messages), []).await
    }
    async fn lock_convoy(
        conn: &mut sqlx::PgConnection,
        orchestration: &str,
        values: &str,
    ) -> StoreResult<()> {
        routing::lock_convoy(conn, orchestration, values).await
    }
    async fn unlock_instance(tx: &mut Tx, id: Uuid) -> StoreResult<()> {
        batch::unlock_instances(tx, &[id], &[]).await
    }
    async fn begin_again(&self, tx: Tx, request_id: i64) -> StoreResult<Option<Tx>> {
        tx.rollback()
            .await
            .map_err(|e| map_err("apply controls", e))?;
        // Locked again: another host may look at it meanwhile.
        let mut tx = self.write().await?;
        let still_pending: Option<i64> = sqlx::query_scalar(
            "SELECT id FROM control WHERE id = $1 AND status = 'pending' FOR UPDATE SKIP LOCKED",
        )
        .bind(request_id)
        .fetch_optional(&mut *tx)
        .await
        .map_err(|e| map_err("apply controls", e))?;
        Ok(still_pending.map(|_| tx))
    }
    async fn ready_messages(&self, now: DateTime<Utc>) -> StoreResult<i64> {
        // Locks of hosts that are gone do not hide work: another host will take it over.
        sqlx::query_scalar(&claims::READY_MESSAGES)
            .bind(now)
            .bind(self.host_cutoff(now))
            .fetch_one(&self.pool)
            .await
            .map_err(|e| map_err("activity", e))
    }
    async fn next_timer_at(&self, now: DateTime<Utc>) -> StoreResult<Option<DateTime<Utc>>> {
        sqlx::query_scalar(&claims::NEXT_TIMER)
            .bind(now)
            .bind(self.host_cutoff(now))
            .fetch_optional(&self.pool)
            .await
            .map_err(|e| map_err("activity", e))
    }

    common::column_readers!(PgRow, uuid: col, uuid_opt: col, time: col, time_opt: col, json: col_json);
    fn col_u32(row: &PgRow, table: &str, name: &str) -> StoreResult<u32> {
        uint(col(row, name)?, &format!("{table}.{name}"))
    }
    fn col_json_opt<T: serde::de::DeserializeOwned>(
        row: &PgRow,
        name: &str,
    ) -> StoreResult<Option<T>> {
        col::<Option<String>>(row, name)?
            .as_deref()
            .map(parse_json)
            .transpose()
    }
    fn as_text(column: &str) -> String {
        column.to_owned()
    }
    fn count_or_zero(column: &str) -> String {
        format!("GREATEST({column}, 0)")
    }
    fn uuid_or_null(column: &str) -> String {
        column.to_owned()
    }
    fn read_text(row: &PgRow, name: &str) -> Result<String, String> {
        col(row, name).map_err(|e| e.to_string())
    }
    fn read_text_opt(row: &PgRow, name: &str) -> Result<Option<String>, String> {
        col(row, name).map_err(|e| e.to_string())
    }
    fn col_body(row: &PgRow, name: &str) -> StoreResult<String> {
        col(row, name)
    }
}

impl common::Claims for PostgresStore {
    async fn claim_rows(
        &self,
        claim: common::Claim<'_>,
    ) -> StoreResult<Vec<sqlx::postgres::PgRow>> {
        claims::claim_rows(self, claim).await
    }
}
impl common::Outbox for PostgresStore {}
impl common::Operator for PostgresStore {}
impl common::Versioning for PostgresStore {}
impl common::Upkeep for PostgresStore {}

/// The throwaway-cluster harness of the integration tests, shared with this module's tests.
#[cfg(test)]
#[path = "../../../../tests/support/pg.rs"]
#[allow(dead_code)]
mod pg_harness;

#[cfg(test)]
mod tests;
