//! The write side of the SQLite store: one connection that every write transaction of the
//! process runs on, and the transaction type over it.
//!
//! SQLite admits one writer at a time. Writers of one process queue here, in order, rather than
//! polling the file lock through `busy_timeout`. The connection is held here rather than in a
//! pool: a pool pings a connection when it hands it out and again when it takes it back, and on
//! SQLite each ping is a round trip to the connection's worker thread.
//!
//! Transactions begin, commit and roll back through sqlx's own transaction manager, as sqlx's
//! `Transaction` does: a transaction dropped without commit queues its rollback on the
//! connection's worker thread at once, with no async runtime needed (a host whose runtime is
//! torn down mid-transaction must not leave the database locked).
//!
//! A transaction that is one script of statements, `BEGIN IMMEDIATE` first and `COMMIT` last,
//! goes to the worker in one round trip instead of four ([`Writer::alone`]: the manager's
//! `BEGIN IMMEDIATE` is two, as it checks the connection is in a transaction, and its `COMMIT`
//! one). The manager does not know of such a transaction, so [`Alone`] rolls back itself what
//! a script that failed left open, and, dropped before its script finished (its caller went
//! away, or its runtime was torn down), does so from a thread of its own that holds the
//! connection until it is done.

use std::borrow::Cow;
use std::ops::{Deref, DerefMut};
use std::sync::Arc;

use sqlx::pool::PoolConnection;
use sqlx::sqlite::SqliteTransactionManager;
use sqlx::{Connection, Executor, Sqlite, SqliteConnection, SqlitePool, TransactionManager};
use tokio::sync::{Mutex, OwnedMappedMutexGuard, OwnedMutexGuard};

use super::map_err;
use crate::store::{StoreError, StoreResult};

/// The dedicated connection; `None` once the store is closed.
type Slot = Option<SqliteConnection>;

/// Where write transactions run.
#[derive(Debug, Clone)]
pub(super) enum Writer {
    /// A connection of its own (a database file).
    Dedicated(Arc<Mutex<Slot>>),
    /// The pool's only connection (an in-memory database, which is that one connection).
    Pooled(SqlitePool),
}

/// The message of the error [`add_temp_tables`]'s check raises.
pub(super) const CHECK_FAILED: &str = "cairn: a check of this transaction failed";

/// Creates the connection's temporary tables: `fenced`, which a group commit fences its points
/// with (`batch::push_fence`), and `checks`, a row inserted into which aborts the statement
/// unless its `ok` is true (a check made in SQL, in a transaction sent as one script, where
/// there is no turn to make it in Rust before `COMMIT`). The read pool's connections get them
/// too: an in-memory database's only connection is both.
pub(super) async fn add_temp_tables(conn: &mut SqliteConnection) -> Result<(), sqlx::Error> {
    conn.execute(
        format!(
            "CREATE TEMP TABLE IF NOT EXISTS fenced (id TEXT PRIMARY KEY); \
             CREATE TEMP TABLE IF NOT EXISTS checks (ok INTEGER NOT NULL); \
             CREATE TEMP TRIGGER IF NOT EXISTS checked BEFORE INSERT ON checks BEGIN \
               SELECT CASE WHEN NEW.ok THEN RAISE(IGNORE) ELSE RAISE(ABORT, '{CHECK_FAILED}') END; \
             END"
        )
        .as_str(),
    )
    .await
    .map(drop)
}

/// A connection taken for one write transaction.
enum Held {
    Dedicated(OwnedMappedMutexGuard<Slot, SqliteConnection>),
    Pooled(PoolConnection<Sqlite>),
}

impl Deref for Held {
    type Target = SqliteConnection;

    fn deref(&self) -> &SqliteConnection {
        match self {
            Held::Dedicated(conn) => conn,
            Held::Pooled(conn) => conn,
        }
    }
}

impl DerefMut for Held {
    fn deref_mut(&mut self) -> &mut SqliteConnection {
        match self {
            Held::Dedicated(conn) => conn,
            Held::Pooled(conn) => conn,
        }
    }
}

impl Writer {
    /// Opens the dedicated connection.
    pub(super) async fn connect(
        options: &sqlx::sqlite::SqliteConnectOptions,
    ) -> Result<Self, sqlx::Error> {
        let mut conn = SqliteConnection::connect_with(options).await?;
        add_temp_tables(&mut conn).await?;
        Ok(Writer::Dedicated(Arc::new(Mutex::new(Some(conn)))))
    }

    /// Waits for the dedicated connection.
    async fn dedicated(
        slot: &Arc<Mutex<Slot>>,
    ) -> StoreResult<OwnedMappedMutexGuard<Slot, SqliteConnection>> {
        let slot = slot.clone().lock_owned().await;
        OwnedMutexGuard::try_map(slot, Option::as_mut)
            .map_err(|_| StoreError::Unavailable(sqlx::Error::PoolClosed))
    }

    /// Waits for the connection and starts a write transaction (`BEGIN IMMEDIATE`: it takes the
    /// database's write lock now, so it cannot fail later for want of it).
    pub(super) async fn begin(&self) -> StoreResult<Tx> {
        let conn = match self {
            Writer::Dedicated(slot) => Held::Dedicated(Self::dedicated(slot).await?),
            Writer::Pooled(pool) => Held::Pooled(pool.acquire().await.map_err(map_err)?),
        };
        // Open from before the `BEGIN`: a caller that goes away while it runs (its task
        // cancelled, its runtime torn down) may do so after the worker ran it and answered, and
        // the dedicated connection would stay in a transaction, holding the database's write
        // lock for every other writer. The rollback queued on drop does nothing where no
        // transaction is open (sqlx's worker counts them).
        let mut tx = Tx {
            conn: Some(conn),
            open: true,
        };
        SqliteTransactionManager::begin(&mut tx, Some(Cow::Borrowed("BEGIN IMMEDIATE")))
            .await
            .map_err(map_err)?;
        Ok(tx)
    }

    /// Waits for the dedicated connection, for a transaction sent as one script that begins
    /// with `BEGIN IMMEDIATE` and ends with `COMMIT` (see the module's docs). `None` for an
    /// in-memory database, whose one connection is the read pool's too: its transactions go
    /// through [`Writer::begin`].
    pub(super) async fn alone(&self) -> StoreResult<Option<Alone>> {
        match self {
            Writer::Dedicated(slot) => Ok(Some(Alone {
                conn: Some(Self::dedicated(slot).await?),
            })),
            Writer::Pooled(_) => Ok(None),
        }
    }

    /// Closes the connection (the store is closing).
    pub(super) async fn close(&self) {
        match self {
            Writer::Dedicated(slot) => {
                if let Some(conn) = slot.lock().await.take() {
                    if let Err(e) = conn.close().await {
                        tracing::warn!(error = %e, "closing the SQLite write connection failed");
                    }
                }
            }
            Writer::Pooled(pool) => pool.close().await,
        }
    }
}

/// Rolls back the transaction open on `conn`, if there is one.
async fn roll_back_if_open(conn: &mut SqliteConnection) -> StoreResult<()> {
    match conn.execute("ROLLBACK").await {
        Err(sqlx::Error::Database(e)) if e.message().contains("no transaction is active") => Ok(()),
        other => other.map(drop).map_err(map_err),
    }
}

/// The dedicated connection, taken for a transaction sent as one script ([`Writer::alone`]).
/// Dropped before [`Alone::finished`] or [`Alone::failed`], it rolls back whatever the script
/// left open.
pub(super) struct Alone {
    conn: Option<OwnedMappedMutexGuard<Slot, SqliteConnection>>,
}

impl Alone {
    /// The script ran to its end: committed, nothing left open.
    pub(super) fn finished(mut self) {
        self.conn = None;
    }

    /// The script failed part way: rolls back what it left open.
    pub(super) async fn failed(mut self) -> StoreResult<()> {
        match self.conn.take() {
            Some(mut conn) => roll_back_if_open(&mut conn).await,
            None => Ok(()),
        }
    }
}

impl Drop for Alone {
    fn drop(&mut self) {
        let Some(mut conn) = self.conn.take() else {
            return;
        };
        // The caller went away mid-script; there may be no runtime left to roll back on (a host
        // torn down mid-transaction), so a thread of its own does it, holding the connection
        // (the next transaction waits for it) until done.
        std::thread::spawn(move || {
            let rolled_back = tokio::runtime::Builder::new_current_thread()
                .build()
                .map_err(|e| StoreError::Unavailable(sqlx::Error::Io(e)))
                .and_then(|runtime| runtime.block_on(roll_back_if_open(&mut conn)));
            if let Err(e) = rolled_back {
                tracing::error!(error = %e, "rolling back an abandoned SQLite write failed");
            }
        });
    }
}

impl Deref for Alone {
    type Target = SqliteConnection;

    fn deref(&self) -> &SqliteConnection {
        self.conn.as_deref().expect("held until finished")
    }
}

impl DerefMut for Alone {
    fn deref_mut(&mut self) -> &mut SqliteConnection {
        self.conn.as_deref_mut().expect("held until finished")
    }
}

/// A write transaction. Statements run on it as on a connection (`&mut **tx`); it is committed
/// by [`Tx::commit`] and rolled back when dropped without.
pub(super) struct Tx {
    conn: Option<Held>,
    /// A transaction is open on the connection: dropping rolls it back.
    open: bool,
}

impl Tx {
    /// Commits the transaction.
    pub(super) async fn commit(mut self) -> StoreResult<()> {
        SqliteTransactionManager::commit(&mut self)
            .await
            .map_err(map_err)?;
        self.open = false;
        Ok(())
    }
}

impl Deref for Tx {
    type Target = SqliteConnection;

    fn deref(&self) -> &SqliteConnection {
        self.conn
            .as_deref()
            .expect("a transaction holds its connection until dropped")
    }
}

impl DerefMut for Tx {
    fn deref_mut(&mut self) -> &mut SqliteConnection {
        self.conn
            .as_deref_mut()
            .expect("a transaction holds its connection until dropped")
    }
}

impl Drop for Tx {
    fn drop(&mut self) {
        if let (Some(conn), true) = (self.conn.as_deref_mut(), self.open) {
            // Queued on the worker now; it runs before the connection's next command.
            SqliteTransactionManager::start_rollback(conn);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::str::FromStr;

    use sqlx::sqlite::SqliteConnectOptions;
    use sqlx::Executor;

    use super::*;

    async fn writer(dir: &tempfile::TempDir) -> Writer {
        let url = format!("sqlite://{}", dir.path().join("w.db").display());
        let options = SqliteConnectOptions::from_str(&url)
            .expect("a SQLite URL")
            .create_if_missing(true);
        let writer = Writer::connect(&options)
            .await
            .expect("the connection opens");
        let mut tx = writer.begin().await.expect("a transaction starts");
        tx.execute("CREATE TABLE t (x INTEGER)")
            .await
            .expect("created");
        tx.commit().await.expect("committed");
        writer
    }

    async fn count(writer: &Writer) -> i64 {
        let mut tx = writer.begin().await.expect("a transaction starts");
        let n = sqlx::query_scalar("SELECT COUNT(*) FROM t")
            .fetch_one(&mut *tx)
            .await
            .expect("counted");
        tx.commit().await.expect("committed");
        n
    }

    #[tokio::test]
    async fn a_transaction_dropped_without_commit_is_rolled_back_before_the_next_one() {
        let dir = tempfile::tempdir().expect("a temp dir");
        let writer = writer(&dir).await;
        {
            let mut tx = writer.begin().await.expect("a transaction starts");
            tx.execute("INSERT INTO t VALUES (1)")
                .await
                .expect("inserted");
        }
        // The next transaction waits for the rollback, then starts on a clean connection.
        assert_eq!(count(&writer).await, 0);
        let mut tx = writer.begin().await.expect("a transaction starts");
        tx.execute("INSERT INTO t VALUES (2)")
            .await
            .expect("inserted");
        tx.commit().await.expect("committed");
        assert_eq!(count(&writer).await, 1);
    }

    #[test]
    fn a_transaction_dropped_after_its_runtime_is_gone_is_rolled_back_too() {
        // A host torn down mid-transaction (its runtime dropped, as in a crash test) must not
        // leave the database locked for the next host.
        let dir = tempfile::tempdir().expect("a temp dir");
        let runtime = tokio::runtime::Runtime::new().expect("a runtime");
        let (writer, tx) = runtime.block_on(async {
            let writer = writer(&dir).await;
            let mut tx = writer.begin().await.expect("a transaction starts");
            tx.execute("INSERT INTO t VALUES (1)")
                .await
                .expect("inserted");
            (writer, tx)
        });
        drop(runtime);
        drop(tx);
        let runtime = tokio::runtime::Runtime::new().expect("a runtime");
        assert_eq!(runtime.block_on(count(&writer)), 0);
    }

    #[tokio::test]
    async fn a_script_left_open_by_a_caller_that_went_away_is_rolled_back() {
        // A transaction sent as one script whose caller was dropped before its `COMMIT` ran
        // (here: the script stops short of it) must not stay open on the connection.
        let dir = tempfile::tempdir().expect("a temp dir");
        let writer = writer(&dir).await;
        {
            let mut conn = writer.alone().await.expect("the connection").unwrap();
            conn.execute("BEGIN IMMEDIATE; INSERT INTO t VALUES (1)")
                .await
                .expect("inserted");
        }
        assert_eq!(count(&writer).await, 0);
        // And the next script runs on a clean connection.
        let mut conn = writer.alone().await.expect("the connection").unwrap();
        conn.execute("BEGIN IMMEDIATE; INSERT INTO t VALUES (2); COMMIT")
            .await
            .expect("committed");
        conn.finished();
        assert_eq!(count(&writer).await, 1);
    }

    #[test]
    fn a_script_left_open_when_its_runtime_is_gone_is_rolled_back_too() {
        let dir = tempfile::tempdir().expect("a temp dir");
        let runtime = tokio::runtime::Runtime::new().expect("a runtime");
        let (writer, conn) = runtime.block_on(async {
            let writer = writer(&dir).await;
            let mut conn = writer.alone().await.expect("the connection").unwrap();
            conn.execute("BEGIN IMMEDIATE; INSERT INTO t VALUES (1)")
                .await
                .expect("inserted");
            (writer, conn)
        });
        drop(runtime);
        drop(conn);
        let runtime = tokio::runtime::Runtime::new().expect("a runtime");
        assert_eq!(runtime.block_on(count(&writer)), 0);
    }

    #[tokio::test]
    async fn a_script_that_fails_part_way_is_rolled_back() {
        let dir = tempfile::tempdir().expect("a temp dir");
        let writer = writer(&dir).await;
        let mut conn = writer.alone().await.expect("the connection").unwrap();
        let err = conn
            .execute(
                "BEGIN IMMEDIATE; INSERT INTO t VALUES (1); INSERT INTO missing VALUES (1); COMMIT",
            )
            .await;
        assert!(err.is_err(), "the script fails at its third statement");
        conn.failed().await.expect("rolled back");
        // Another connection can write: the file is not left locked.
        let other = SqlitePool::connect(&format!("sqlite://{}", dir.path().join("w.db").display()))
            .await
            .expect("a second connection");
        sqlx::query("INSERT INTO t VALUES (3)")
            .execute(&other)
            .await
            .expect("the second connection writes");
        assert_eq!(count(&writer).await, 1, "only the second connection's row");
    }

    #[tokio::test]
    async fn a_script_that_failed_before_its_begin_has_nothing_to_roll_back() {
        // A script whose `BEGIN IMMEDIATE` itself failed (the database busy past the timeout)
        // left no transaction: rolling back is not an error.
        let dir = tempfile::tempdir().expect("a temp dir");
        let writer = writer(&dir).await;
        let conn = writer.alone().await.expect("the connection").unwrap();
        conn.failed()
            .await
            .expect("nothing to roll back is no error");
        assert_eq!(count(&writer).await, 0);
    }

    #[tokio::test]
    async fn a_closed_writer_refuses_new_transactions() {
        let dir = tempfile::tempdir().expect("a temp dir");
        let writer = writer(&dir).await;
        writer.close().await;
        assert!(matches!(
            writer.begin().await,
            Err(StoreError::Unavailable(sqlx::Error::PoolClosed))
        ));
    }
}
