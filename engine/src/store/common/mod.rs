//! What the two backends share: the SQL and logic that is the same on SQLite and PostgreSQL,
//! written once over the little that differs.
//!
//! The backends store the same tables with other column types (a uuid as TEXT or UUID, a time as
//! ISO-8601 text or TIMESTAMPTZ), take a list of ids another way (`json_each` or `ANY`), and read
//! a row each its own way (SQLite checks and describes what a column holds). [`Backend`] names
//! those differences: the converters a bound value goes through, the fragments of SQL that differ,
//! the column readers, the transaction, `map_err`, and the few hooks into a backend's own rooms
//! (publishing one message, waking other hosts, unlocking an instance).
//!
//! The shared rooms are traits with provided methods, one per room of the backends: a backend
//! implements [`Backend`], then says `impl Operator for MyStore {}` (and so on), and its
//! `impl OperatorVerbs` hands over to them. Each room trait repeats sqlx's bounds for a
//! database generic code can run statements on ([`Backend`]'s docs say why).
//!
//! | room | what is in it |
//! |---|---|
//! | [`console`] | the operations console's read-only queries: overview, instance list and filters, waits, map, lists |
//! | [`operator`] | control of an instance, give up and resume sends, dead letters, list, show, activity |
//! | [`outbox`] | an outbox row read, dead-lettering a send, renewing locks, recording deliveries |
//! | [`maintenance`] | `control` and `inbox` rows read, an inbox row published or dead-lettered, housekeeping |
//! | [`retention`] | ended instances purged with all that was theirs, the gauges the metrics read |
//! | [`versions`] | the claim condition on registered versions, upgrade points, `cairn versions`, instances needing attention |

use std::future::Future;
use std::ops::DerefMut;

use chrono::{DateTime, Utc};
use serde::de::DeserializeOwned;
use sqlx::{Database, Encode, Pool, Type};
use uuid::Uuid;

use super::{NewMessage, PublishOutcome, StoreError, StoreResult};

pub(super) mod claims;
pub(super) mod console;
pub(super) mod late;
pub(super) mod maintenance;
pub(super) mod message_box;
pub(super) mod operator;
pub(super) mod outbox;
pub(super) mod retention;
pub(super) mod routing;
pub(super) mod versions;

pub(super) use claims::{Claim, Claims};
pub(super) use maintenance::Upkeep;
pub(super) use operator::Operator;
pub(super) use outbox::Outbox;
pub(super) use retention::Retain;
pub(super) use versions::Versioning;

/// The column readers of an `impl Backend` with `$row` its row type: a text, an integer, a
/// boolean, bytes and an id through the backend's checked `col`; uuids, times and JSON through the
/// functions named.
macro_rules! column_readers {
    ($row:ty, uuid: $uuid:path, uuid_opt: $uuid_opt:path, time: $time:path, time_opt: $time_opt:path, json: $json:path) => {
        fn col_text(row: &$row, name: &str) -> StoreResult<String> {
            col(row, name)
        }
        fn col_text_opt(row: &$row, name: &str) -> StoreResult<Option<String>> {
            col(row, name)
        }
        fn col_i64(row: &$row, name: &str) -> StoreResult<i64> {
            col(row, name)
        }
        fn col_bool(row: &$row, name: &str) -> StoreResult<bool> {
            col(row, name)
        }
        fn col_bytes_opt(row: &$row, name: &str) -> StoreResult<Option<Vec<u8>>> {
            col(row, name)
        }
        fn col_id(row: &$row, name: &str) -> StoreResult<Self::Id> {
            col(row, name)
        }
        fn col_uuid(row: &$row, name: &str) -> StoreResult<Uuid> {
            $uuid(row, name)
        }
        fn col_uuid_opt(row: &$row, name: &str) -> StoreResult<Option<Uuid>> {
            $uuid_opt(row, name)
        }
        fn col_time(row: &$row, name: &str) -> StoreResult<DateTime<Utc>> {
            $time(row, name)
        }
        fn col_time_opt(row: &$row, name: &str) -> StoreResult<Option<DateTime<Utc>>> {
            $time_opt(row, name)
        }
        fn col_json<T: serde::de::DeserializeOwned>(row: &$row, name: &str) -> StoreResult<T> {
            $json(row, name)
        }
    };
}
pub(super) use column_readers;

/// A row of backend `B`.
pub(super) type RowOf<B> = <<B as Backend>::Db as Database>::Row;

/// A value bound to a statement of database `Db`, whatever the statement's lifetime.
pub(super) trait Bind<Db: Database>:
    for<'q> Encode<'q, Db> + Type<Db> + Send + 'static
{
}
impl<Db: Database, T> Bind<Db> for T where T: for<'q> Encode<'q, Db> + Type<Db> + Send + 'static {}

/// What one backend is made of, as far as the shared rooms care: its database, how it binds
/// the portable types, the fragments of SQL in which it differs, how it reads a column, and the
/// hooks into its own rooms.
///
/// The bounds sqlx needs to run a statement on a generic database (`&mut Connection` is an
/// `Executor`, `Arguments` are `IntoArguments`, `&str` and `i64` bind) are where clauses, which
/// Rust does not carry from a trait to its users: each room trait states them again.
pub(super) trait Backend: Send + Sync + Sized + 'static {
    /// The sqlx database.
    type Db: Database;
    /// A write transaction; statements run on `&mut **tx`.
    type Tx: DerefMut<Target = <Self::Db as Database>::Connection> + Send;
    /// A uuid as bound (TEXT on SQLite, UUID on PostgreSQL).
    type Id: Bind<Self::Db>;
    /// A time as bound (ISO-8601 text on SQLite, TIMESTAMPTZ on PostgreSQL).
    type Time: Bind<Self::Db>;
    /// A count (`attempts`) as bound (INTEGER on SQLite, INT4 on PostgreSQL).
    type Count: Bind<Self::Db>;
    /// A list of text ids as bound for [`Backend::IN_LIST`].
    type List: Bind<Self::Db>;

    /// ` FOR UPDATE` where the database locks a row read to write it, else empty.
    const FOR_UPDATE: &'static str;
    /// Boolean true.
    const TRUE: &'static str;
    /// Membership in the list bound as `$1`: `IN (..)` or `= ANY($1)`, after a column.
    const IN_LIST_1: &'static str;
    /// Membership in the list bound as `$3`.
    const IN_LIST_3: &'static str;
    /// Case-insensitive `LIKE`.
    const ILIKE: &'static str;
    /// The `dead_letters.body` column as selected: bytes on SQLite, where a hand-written row
    /// may hold text that is not UTF-8.
    const DEAD_LETTER_BODY: &'static str;
    /// The name `COUNT(*)` is selected as by `activity`.
    const COUNT_AS: &'static str;
    /// How a pending `control` row is read to be carried out: locked, and skipped while
    /// another host holds it (PostgreSQL); plainly where one host runs.
    const SKIP_LOCKED: &'static str;
    /// The statement that turns the messages of instances that ended into zombies.
    const ZOMBIES: &'static str;
    /// Renews the leases of the instances host `$1` owns to `$2`.
    const RENEW_LEASES: &'static str;
    /// Gives a claimed message back, in an `UPDATE messages SET`: the delivery did not fail, so
    /// it does not count.
    const GIVE_BACK: &'static str;

    /// A uuid, to bind.
    fn uuid(id: Uuid) -> Self::Id;
    /// A time, to bind.
    fn time(at: DateTime<Utc>) -> Self::Time;
    /// A count, to bind.
    fn count(n: u32) -> Self::Count;
    /// Text ids, to bind as a list.
    fn list(ids: &[String]) -> Self::List;
    /// Notes the lease a host takes (`lease_until` at `now`), where the backend judges other
    /// hosts by it.
    fn learn_lease(&self, now: DateTime<Utc>, lease_until: DateTime<Utc>) {
        let _ = (now, lease_until);
    }
    /// The heartbeat cutoff a claim binds as `$4` (hosts silent since are presumed gone), where
    /// the backend's claims ask for one.
    fn claim_cutoff(&self, now: DateTime<Utc>) -> Option<Self::Time>;
    /// The registrations hosts recorded through this store, which claims bind after the
    /// cutoff ([`versions::claimable`]).
    fn registered(&self) -> &versions::Registered;
    /// Whether an error of the database is worth retrying: the connection or the database is
    /// away for a while, or the transaction lost a race. The one place that decides it for this
    /// backend.
    fn retryable(err: &sqlx::Error) -> bool;

    /// Maps a sqlx error from `operation` (what the store was doing, named in the error) to a
    /// [`StoreError`]: a row holding what its column's type does not admit is the row's fault,
    /// not the database's, and never cured by retrying ([`StoreError::Corrupt`]); what is
    /// [`retryable`](Backend::retryable) is [`StoreError::Unavailable`]; the rest names the
    /// operation.
    fn map_err(operation: &'static str, err: sqlx::Error) -> StoreError {
        if matches!(
            err,
            sqlx::Error::ColumnDecode { .. }
                | sqlx::Error::Decode(_)
                | sqlx::Error::ColumnNotFound(_)
        ) {
            StoreError::Corrupt(err.to_string())
        } else if Self::retryable(&err) {
            StoreError::Unavailable(err)
        } else {
            StoreError::Database {
                operation,
                source: err,
            }
        }
    }
    /// Rows a statement changed.
    fn rows_affected(done: &<Self::Db as Database>::QueryResult) -> u64;

    /// The pool reads go to.
    fn reads(&self) -> &Pool<Self::Db>;
    /// Begins a write transaction.
    fn begin(&self) -> impl Future<Output = StoreResult<Self::Tx>> + Send;
    /// Begins a soft write transaction: one that writes only what the engine makes again if it
    /// is lost in a power cut (claim locks, leases), which a backend may commit without waiting
    /// for the disk. A plain [`Backend::begin`] where it makes no difference.
    fn begin_soft(&self) -> impl Future<Output = StoreResult<Self::Tx>> + Send {
        self.begin()
    }
    /// Commits it.
    fn commit(tx: Self::Tx) -> impl Future<Output = StoreResult<()>> + Send;
    /// Stores and routes `messages` inside `tx`, each published at its time, a message whose id
    /// is stored already a duplicate.
    fn publish_all<'a>(
        tx: &'a mut Self::Tx,
        messages: &'a [(&'a NewMessage, DateTime<Utc>)],
    ) -> impl Future<Output = StoreResult<Vec<PublishOutcome>>> + Send + 'a;
    /// Publishes one message inside `tx`, routed.
    fn publish_one<'a>(
        tx: &'a mut Self::Tx,
        msg: &'a NewMessage,
        now: DateTime<Utc>,
    ) -> impl Future<Output = StoreResult<()>> + Send + 'a {
        async move { Self::publish_all(tx, &[(msg, now)]).await.map(drop) }
    }
    /// Wakes other hosts when `tx` commits (PostgreSQL); nothing where one host runs.
    fn notify(tx: &mut Self::Tx) -> impl Future<Output = StoreResult<()>> + Send;
    /// Takes inside `tx` the locks that publishing `messages` needs (PostgreSQL: the routing
    /// locks of their types); nothing where one writer runs.
    fn lock_to_publish<'a>(
        tx: &'a mut Self::Tx,
        messages: &'a [NewMessage],
    ) -> impl Future<Output = StoreResult<()>> + Send + 'a;
    /// Takes, until the transaction ends, the lock that serialises the activations of one
    /// convoy (`orchestration`, `values` canonical): PostgreSQL's publishers of a type route side
    /// by side; nothing where one writer runs.
    fn lock_convoy<'a>(
        conn: &'a mut <Self::Db as Database>::Connection,
        orchestration: &'a str,
        values: &'a str,
    ) -> impl Future<Output = StoreResult<()>> + Send + 'a;
    /// Clears the message and timer locks on instance `id`.
    fn unlock_instance(tx: &mut Self::Tx, id: Uuid)
        -> impl Future<Output = StoreResult<()>> + Send;
    /// Rolls `tx` back and begins another, to mark `control` row `request_id` rejected; `None`
    /// when another host took the row meanwhile.
    fn begin_again(
        &self,
        tx: Self::Tx,
        request_id: i64,
    ) -> impl Future<Output = StoreResult<Option<Self::Tx>>> + Send;
    /// How many messages are ready to be claimed at `now`.
    fn ready_messages(&self, now: DateTime<Utc>) -> impl Future<Output = StoreResult<i64>> + Send;
    /// When the next timer that can be claimed is due.
    fn next_timer_at(
        &self,
        now: DateTime<Utc>,
    ) -> impl Future<Output = StoreResult<Option<DateTime<Utc>>>> + Send;

    /// A text column.
    fn col_text(row: &RowOf<Self>, name: &str) -> StoreResult<String>;
    /// A nullable text column.
    fn col_text_opt(row: &RowOf<Self>, name: &str) -> StoreResult<Option<String>>;
    /// An integer column.
    fn col_i64(row: &RowOf<Self>, name: &str) -> StoreResult<i64>;
    /// A boolean column.
    fn col_bool(row: &RowOf<Self>, name: &str) -> StoreResult<bool>;
    /// A nullable bytes column.
    fn col_bytes_opt(row: &RowOf<Self>, name: &str) -> StoreResult<Option<Vec<u8>>>;
    /// A uuid column.
    fn col_uuid(row: &RowOf<Self>, name: &str) -> StoreResult<Uuid>;
    /// A nullable uuid column.
    fn col_uuid_opt(row: &RowOf<Self>, name: &str) -> StoreResult<Option<Uuid>>;
    /// A time column.
    fn col_time(row: &RowOf<Self>, name: &str) -> StoreResult<DateTime<Utc>>;
    /// A nullable time column.
    fn col_time_opt(row: &RowOf<Self>, name: &str) -> StoreResult<Option<DateTime<Utc>>>;
    /// A count column of `table` (`version`, `attempts`) as a `u32`.
    fn col_u32(row: &RowOf<Self>, table: &str, name: &str) -> StoreResult<u32>;
    /// A JSON column.
    fn col_json<T: DeserializeOwned>(row: &RowOf<Self>, name: &str) -> StoreResult<T>;
    /// A nullable JSON column.
    fn col_json_opt<T: DeserializeOwned>(row: &RowOf<Self>, name: &str) -> StoreResult<Option<T>>;
    /// A column in SQL, as text whatever it holds (SQLite: a BLOB as hex).
    fn as_text(column: &str) -> String;
    /// A count column in SQL, or 0 where it holds something else or less (a row written by hand).
    fn count_or_zero(column: &str) -> String;
    /// A uuid column in SQL, or NULL where it holds something else (a row written by hand).
    fn uuid_or_null(column: &str) -> String;
    /// An id column as stored, to bind it again, even where it does not hold a uuid.
    fn col_id(row: &RowOf<Self>, name: &str) -> StoreResult<Self::Id>;
    /// A text column of a row someone wrote by hand, or what it holds instead, in words.
    fn read_text(row: &RowOf<Self>, name: &str) -> Result<String, String>;
    /// A nullable text column of a row someone wrote by hand, or what it holds instead.
    fn read_text_opt(row: &RowOf<Self>, name: &str) -> Result<Option<String>, String>;
    /// A dead letter's body, selected as [`Backend::DEAD_LETTER_BODY`], as text.
    fn col_body(row: &RowOf<Self>, name: &str) -> StoreResult<String>;

    /// A status or kind word column, checked.
    fn col_word<T: std::str::FromStr<Err = String>>(
        row: &RowOf<Self>,
        name: &str,
    ) -> StoreResult<T> {
        Self::col_text(row, name)?
            .parse()
            .map_err(|e: String| StoreError::Corrupt(format!("column {name}: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::postgres::PostgresStore;
    use crate::store::sqlite::SqliteStore;

    /// A database error says which operation failed, and stays as retryable as before, on
    /// either backend.
    fn names_the_operation<B: Backend>() {
        let err = B::map_err(
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

    #[test]
    fn a_database_error_names_the_operation_that_failed() {
        names_the_operation::<SqliteStore>();
        names_the_operation::<PostgresStore>();
    }
}
