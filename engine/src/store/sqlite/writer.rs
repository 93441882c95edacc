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
//!
//! Whatever way a transaction ends, the next one finds the connection with no transaction open
//! ([`Slot::ready`]). A transaction that failed may have left one open behind sqlx's back, or
//! sqlx counting one that SQLite had already rolled back by itself (as it does on a full disk):
//! the next transaction evens both up first ([`reset`]), or, if that fails, closes the connection
//! and opens a new one with the same options. A host writing to a disk that filled up resumes
//! on its own once space is freed.

use std::borrow::Cow;
use std::ops::{Deref, DerefMut};
use std::sync::Arc;

use sqlx::pool::PoolConnection;
use sqlx::sqlite::{SqliteConnectOptions, SqliteTransactionManager};
use sqlx::{Connection, Executor, Sqlite, SqliteConnection, SqlitePool, TransactionManager};
use tokio::sync::{Mutex, OwnedMutexGuard};

use super::map_err;
use crate::store::{StoreError, StoreResult};

/// The dedicated connection, and what it takes to open it again.
#[derive(Debug)]
pub(super) struct Slot {
    /// `None` once the store is closed, or after the connection was found unusable and could
    /// not be opened again yet (the next transaction tries).
    conn: Option<SqliteConnection>,
    options: SqliteConnectOptions,
    /// The store is closed: no new transactions.
    closed: bool,
    /// A transaction on `conn` failed in a way that may have left SQLite in a transaction the
    /// manager does not know of (a script whose rollback failed, a `BEGIN` or `COMMIT` that
    /// failed): the next transaction checks the connection first.
    suspect: bool,
    /// `conn` runs with `synchronous=NORMAL` (a soft transaction was last: see
    /// [`Writer::begin_soft`]); every other transaction sets `FULL` back first.
    soft: bool,
}

/// Where write transactions run.
#[derive(Debug, Clone)]
pub(super) enum Writer {
    /// A connection of its own (a database file).
    Dedicated(Arc<Mutex<Slot>>),
    /// The pool's only connection (an in-memory database, which is that one connection).
    Pooled(SqlitePool),
}

/// The message of the error [`add_temp_tables`]'s check raises. Kept for people; the engine
/// tells the failure apart by its code ([`failed_check`]).
pub(super) const CHECK_FAILED: &str = "cairn: a check of this transaction failed";

/// SQLite's extended result code for a trigger's `RAISE(ABORT, ...)`: `SQLITE_CONSTRAINT_TRIGGER`
/// (`SQLITE_CONSTRAINT | 7 << 8`). The schema has no trigger of its own, so the only trigger
/// that raises it is [`add_temp_tables`]'s check.
pub(super) const CONSTRAINT_TRIGGER: &str = "1811";

/// Whether `err` is the check made in SQL (the temporary table `checks`) failing, told by its
/// extended result code, not its text.
pub(super) fn failed_check(err: &sqlx::Error) -> bool {
    matches!(err, sqlx::Error::Database(db) if db.code().as_deref() == Some(CONSTRAINT_TRIGGER))
}

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

/// Opens the dedicated connection.
async fn open(options: &SqliteConnectOptions) -> Result<SqliteConnection, sqlx::Error> {
    let mut conn = SqliteConnection::connect_with(options).await?;
    add_temp_tables(&mut conn).await?;
    Ok(conn)
}

/// How many transactions sqlx's manager counts as open on `conn`.
fn depth(conn: &SqliteConnection) -> usize {
    SqliteTransactionManager::get_transaction_depth(conn)
}

/// Whether `e` is SQLite's answer to a `ROLLBACK` with no transaction open. Told by its text:
/// SQLite gives it the generic `SQLITE_ERROR` (1), with no extended code of its own, and
/// `SQLITE_ERROR` is also a syntax error, a missing table, and much else.
fn no_transaction(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(db) if db.message().contains("no transaction is active"))
}

/// Brings `conn` back to no transaction open, for SQLite and for sqlx's transaction manager
/// alike, after a transaction that failed or was dropped; with `suspect`, also rolls back what
/// a failed script may have left open behind the manager's back.
///
/// The manager counts the transactions it began (its *depth*) and only counts one down when its
/// `ROLLBACK` or `COMMIT` succeeds. But SQLite rolls a transaction back by itself when a
/// statement or the `COMMIT` fails with `SQLITE_FULL`, `SQLITE_IOERR`, `SQLITE_NOMEM` (and a
/// `COMMIT` with `SQLITE_BUSY`): the manager's `ROLLBACK` then fails with "no transaction is
/// active" and its count stays at one, and every `BEGIN IMMEDIATE` after that is refused
/// ("attempted to call begin_with at non-zero transaction depth"), for good. Here a plain
/// `BEGIN` gives the manager a transaction to roll back, which brings its count down.
async fn reset(conn: &mut SqliteConnection, suspect: bool) -> Result<(), sqlx::Error> {
    // The manager's own rollback first, acknowledged: it runs after whatever rollback a dropped
    // transaction queued on the worker.
    for _ in 0..4 {
        if depth(conn) == 0 {
            break;
        }
        match SqliteTransactionManager::rollback(conn).await {
            Ok(()) => {}
            Err(e) if no_transaction(&e) => {
                tracing::debug!(
                    "SQLite ended the failed transaction itself; evening up sqlx's count"
                );
                conn.execute("BEGIN").await?;
                SqliteTransactionManager::rollback(conn).await?;
            }
            Err(e) => return Err(e),
        }
    }
    if depth(conn) > 0 {
        return Err(sqlx::Error::Protocol(format!(
            "the write connection still counts {} open transaction(s)",
            depth(conn)
        )));
    }
    if suspect {
        match conn.execute("ROLLBACK").await {
            Err(e) if no_transaction(&e) => {}
            other => other.map(drop)?,
        }
    }
    Ok(())
}

impl Slot {
    fn conn(&self) -> &SqliteConnection {
        self.conn.as_ref().expect("a connection is taken ready")
    }

    fn conn_mut(&mut self) -> &mut SqliteConnection {
        self.conn.as_mut().expect("a connection is taken ready")
    }

    /// Makes the connection ready for a new transaction: none open (see [`reset`]), or, if
    /// that cannot be made so, a new connection in place of the old. A connection that cannot
    /// be opened (the file unreadable for now) is an [`StoreError::Unavailable`] error, and the
    /// next transaction tries again.
    ///
    /// # Cancel safety
    /// Cancelled part way, it leaves the slot for the next caller to make ready.
    async fn ready(&mut self) -> StoreResult<()> {
        if self.closed {
            return Err(StoreError::Unavailable(sqlx::Error::PoolClosed));
        }
        if let Some(conn) = self.conn.as_mut() {
            if self.suspect || depth(conn) > 0 {
                // Stays set until the connection is known to be clean.
                self.suspect = true;
                match reset(conn, true).await {
                    Ok(()) => self.suspect = false,
                    Err(e) => {
                        tracing::warn!(error = %e,
                            "the SQLite write connection cannot be brought back out of a failed transaction; opening it again");
                        if let Some(old) = self.conn.take() {
                            // Closing rolls back whatever SQLite still has open on it.
                            if let Err(e) = old.close().await {
                                tracing::debug!(error = %e, "closing the unusable write connection failed");
                            }
                        }
                    }
                }
            }
        }
        if self.conn.is_none() {
            let conn = open(&self.options).await.map_err(StoreError::Unavailable)?;
            tracing::info!("the SQLite write connection is open again");
            self.conn = Some(conn);
            self.suspect = false;
            // Opened with the store's options: `synchronous=FULL`.
            self.soft = false;
        }
        Ok(())
    }

    /// Sets the connection's `synchronous` for the next transaction: `FULL` for a durable one
    /// (the store's default), `NORMAL` for a soft one. Outside any transaction, so it takes.
    async fn durable(&mut self, durable: bool) -> StoreResult<()> {
        if self.soft != durable {
            return Ok(());
        }
        let level = if durable { "FULL" } else { "NORMAL" };
        if let Err(e) = self
            .conn_mut()
            .execute(format!("PRAGMA synchronous = {level}").as_str())
            .await
        {
            // Which level the connection is at is now unknown: open it again (FULL).
            self.conn = None;
            return Err(map_err("set synchronous", e));
        }
        self.soft = !durable;
        Ok(())
    }
}

/// A connection taken for one write transaction.
enum Held {
    Dedicated(OwnedMutexGuard<Slot>),
    Pooled(PoolConnection<Sqlite>),
}

impl Held {
    /// Marks the dedicated connection for a check before its next transaction.
    fn suspect(&mut self) {
        if let Held::Dedicated(slot) = self {
            slot.suspect = true;
        }
    }
}

impl Deref for Held {
    type Target = SqliteConnection;

    fn deref(&self) -> &SqliteConnection {
        match self {
            Held::Dedicated(slot) => slot.conn(),
            Held::Pooled(conn) => conn,
        }
    }
}

impl DerefMut for Held {
    fn deref_mut(&mut self) -> &mut SqliteConnection {
        match self {
            Held::Dedicated(slot) => slot.conn_mut(),
            Held::Pooled(conn) => conn,
        }
    }
}

impl Writer {
    /// Opens the dedicated connection.
    pub(super) async fn connect(options: &SqliteConnectOptions) -> Result<Self, sqlx::Error> {
        let conn = open(options).await?;
        Ok(Writer::Dedicated(Arc::new(Mutex::new(Slot {
            conn: Some(conn),
            options: options.clone(),
            closed: false,
            suspect: false,
            soft: false,
        }))))
    }

    /// Waits for the dedicated connection, ready for a new transaction ([`Slot::ready`]),
    /// durable or soft ([`Writer::begin_soft`]).
    async fn dedicated(
        slot: &Arc<Mutex<Slot>>,
        durable: bool,
    ) -> StoreResult<OwnedMutexGuard<Slot>> {
        let mut slot = slot.clone().lock_owned().await;
        slot.ready().await?;
        slot.durable(durable).await?;
        Ok(slot)
    }

    /// Waits for the connection and starts a write transaction (`BEGIN IMMEDIATE`: it takes the
    /// database's write lock now, so it cannot fail later for want of it).
    pub(super) async fn begin(&self) -> StoreResult<Tx> {
        self.begin_with(true).await
    }

    /// [`Writer::begin`] for a soft transaction: one whose loss in a power cut or an operating
    /// system crash harms nothing, as it writes only what the engine makes again (claim locks
    /// and their delivery counts, leases, epochs taken by the host that would die with it). Its
    /// commit does not wait for the disk (`synchronous=NORMAL`); the next durable commit's sync
    /// takes it along, as the WAL is written in order. A process that is killed loses nothing
    /// either way: what is committed is in the operating system's hands.
    pub(super) async fn begin_soft(&self) -> StoreResult<Tx> {
        self.begin_with(false).await
    }

    async fn begin_with(&self, durable: bool) -> StoreResult<Tx> {
        let conn = match self {
            Writer::Dedicated(slot) => Held::Dedicated(Self::dedicated(slot, durable).await?),
            Writer::Pooled(pool) => {
                let mut conn = pool.acquire().await.map_err(|e| map_err("begin", e))?;
                if depth(&conn) > 0 {
                    reset(&mut conn, false)
                        .await
                        .map_err(|e| map_err("begin", e))?;
                }
                Held::Pooled(conn)
            }
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
        if let Err(e) =
            SqliteTransactionManager::begin(&mut tx, Some(Cow::Borrowed("BEGIN IMMEDIATE"))).await
        {
            tx.suspect();
            return Err(map_err("begin", e));
        }
        Ok(tx)
    }

    /// Waits for the dedicated connection, for a transaction sent as one script that begins
    /// with `BEGIN IMMEDIATE` and ends with `COMMIT` (see the module's docs). `None` for an
    /// in-memory database, whose one connection is the read pool's too: its transactions go
    /// through [`Writer::begin`].
    pub(super) async fn alone(&self) -> StoreResult<Option<Alone>> {
        match self {
            Writer::Dedicated(slot) => Ok(Some(Alone {
                conn: Some(Self::dedicated(slot, true).await?),
            })),
            Writer::Pooled(_) => Ok(None),
        }
    }

    /// Closes the connection (the store is closing).
    pub(super) async fn close(&self) {
        match self {
            Writer::Dedicated(slot) => {
                let mut slot = slot.lock().await;
                slot.closed = true;
                if let Some(conn) = slot.conn.take() {
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
        Err(e) if no_transaction(&e) => Ok(()),
        other => other.map(drop).map_err(|e| map_err("roll back if open", e)),
    }
}

/// The dedicated connection, taken for a transaction sent as one script ([`Writer::alone`]).
/// Dropped before [`Alone::finished`] or [`Alone::failed`], it rolls back whatever the script
/// left open. A rollback that fails leaves the connection marked, to be checked (or opened
/// again) before the next transaction.
pub(super) struct Alone {
    conn: Option<OwnedMutexGuard<Slot>>,
}

/// What a soft transaction sent as one script starts with, its statement between this and
/// [`SOFT_END`], for [`Alone::run_soft`]: what [`Writer::begin_soft`] does in five round trips
/// to the worker (set `NORMAL`, the manager's `BEGIN IMMEDIATE`, the statement, `COMMIT`), and
/// the next durable transaction's sixth (set `FULL` back), in one. `synchronous` cannot change
/// inside a transaction, hence its place.
pub(super) const SOFT_BEGIN: &str = "PRAGMA synchronous = NORMAL; BEGIN IMMEDIATE; ";

/// What a soft transaction sent as one script ends with (see [`SOFT_BEGIN`]).
pub(super) const SOFT_END: &str = "; COMMIT; PRAGMA synchronous = FULL";

/// How many statements a soft script holds.
const SOFT_SCRIPT_STATEMENTS: usize = 5;

impl Alone {
    /// The script ran to its end: committed, nothing left open.
    pub(super) fn finished(mut self) {
        self.conn = None;
    }

    /// Runs `query`, a soft transaction of one statement ([`SOFT_BEGIN`]), and returns the rows
    /// its statement returned. A script that fails before its `COMMIT` is rolled back; one that
    /// fails after it has committed and answers its rows. Either way the next durable
    /// transaction sets `FULL` first.
    pub(super) async fn run_soft<'q>(
        mut self,
        query: sqlx::query::Query<'q, Sqlite, sqlx::sqlite::SqliteArguments<'q>>,
    ) -> StoreResult<Vec<sqlx::sqlite::SqliteRow>> {
        use futures_util::TryStreamExt;
        let mut rows = Vec::new();
        let mut done = 0;
        let ran = {
            let mut stream = self.fetch_many(query);
            loop {
                match stream.try_next().await {
                    Ok(Some(sqlx::Either::Left(_))) => done += 1,
                    Ok(Some(sqlx::Either::Right(row))) => rows.push(row),
                    Ok(None) => break Ok(()),
                    Err(e) => break Err(map_err("run a soft script", e)),
                }
            }
        };
        match ran {
            Ok(()) if done == SOFT_SCRIPT_STATEMENTS => {
                self.finished();
                Ok(rows)
            }
            // Its `COMMIT` ran (the fourth statement), not the `PRAGMA` after it.
            _ if done == SOFT_SCRIPT_STATEMENTS - 1 => {
                self.failed().await?;
                Ok(rows)
            }
            Ok(()) => {
                let e = StoreError::Corrupt(format!(
                    "a soft script of {SOFT_SCRIPT_STATEMENTS} statements reported {done} results"
                ));
                self.failed().await?;
                Err(e)
            }
            Err(e) => {
                if let Err(rollback) = self.failed().await {
                    tracing::warn!(error = %rollback, "rolling back a failed write failed");
                }
                Err(e)
            }
        }
    }

    /// The script failed part way: rolls back what it left open.
    pub(super) async fn failed(mut self) -> StoreResult<()> {
        match self.conn.take() {
            Some(mut slot) => {
                // The script may have stopped between setting `NORMAL` and setting `FULL`
                // back: the next durable transaction sets `FULL` first.
                slot.soft = true;
                let rolled_back = roll_back_if_open(slot.conn_mut()).await;
                if rolled_back.is_err() {
                    slot.suspect = true;
                }
                rolled_back
            }
            None => Ok(()),
        }
    }
}

impl Drop for Alone {
    fn drop(&mut self) {
        let Some(mut slot) = self.conn.take() else {
            return;
        };
        slot.soft = true;
        // The caller went away mid-script; there may be no runtime left to roll back on (a host
        // torn down mid-transaction), so a thread of its own does it, holding the connection
        // (the next transaction waits for it) until done.
        std::thread::spawn(move || {
            let rolled_back = tokio::runtime::Builder::new_current_thread()
                .build()
                .map_err(|e| StoreError::Unavailable(sqlx::Error::Io(e)))
                .and_then(|runtime| runtime.block_on(roll_back_if_open(slot.conn_mut())));
            if let Err(e) = rolled_back {
                slot.suspect = true;
                tracing::error!(error = %e, "rolling back an abandoned SQLite write failed");
            }
        });
    }
}

impl Deref for Alone {
    type Target = SqliteConnection;

    fn deref(&self) -> &SqliteConnection {
        self.conn.as_deref().expect("held until finished").conn()
    }
}

impl DerefMut for Alone {
    fn deref_mut(&mut self) -> &mut SqliteConnection {
        self.conn
            .as_deref_mut()
            .expect("held until finished")
            .conn_mut()
    }
}

/// A write transaction. Statements run on it as on a connection (`&mut **tx`); it is committed
/// by [`Tx::commit`] and rolled back when dropped without. Whatever way it ends, the next
/// transaction finds the connection with no transaction open ([`Slot::ready`]).
pub(super) struct Tx {
    conn: Option<Held>,
    /// A transaction is open on the connection: dropping rolls it back.
    open: bool,
}

impl Tx {
    /// Commits the transaction.
    pub(super) async fn commit(mut self) -> StoreResult<()> {
        if let Err(e) = SqliteTransactionManager::commit(&mut self).await {
            // SQLite may have rolled it back itself, or kept it open: dropping queues the
            // manager's rollback, and the next transaction checks.
            self.suspect();
            return Err(map_err("commit", e));
        }
        self.open = false;
        Ok(())
    }

    fn suspect(&mut self) {
        if let Some(conn) = self.conn.as_mut() {
            conn.suspect();
        }
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
            // Queued on the worker now; it runs before the connection's next command. If it
            // fails (SQLite already ended the transaction), the next transaction evens up.
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

    /// The `synchronous` level a transaction on `writer` runs at (1 NORMAL, 2 FULL).
    async fn level(tx: &mut Tx) -> i64 {
        sqlx::query_scalar("PRAGMA synchronous")
            .fetch_one(&mut **tx)
            .await
            .expect("read")
    }

    /// A soft transaction commits without waiting for the disk, and every transaction after it
    /// that is not soft waits again: a durable commit is never left at `NORMAL`, whether it
    /// begins through the manager or as one script.
    #[tokio::test]
    async fn a_soft_transaction_leaves_the_next_durable_one_durable() {
        let dir = tempfile::tempdir().expect("a temp dir");
        let writer = writer(&dir).await;
        let mut tx = writer.begin_soft().await.expect("a soft transaction");
        assert_eq!(level(&mut tx).await, 1, "a soft transaction runs at NORMAL");
        tx.commit().await.expect("committed");
        let mut tx = writer.begin().await.expect("a durable transaction");
        assert_eq!(
            level(&mut tx).await,
            2,
            "a durable transaction after a soft one"
        );
        tx.commit().await.expect("committed");
        let tx = writer.begin_soft().await.expect("a soft transaction");
        tx.commit().await.expect("committed");
        let mut alone = writer
            .alone()
            .await
            .expect("taken")
            .expect("a dedicated connection");
        let level: i64 = sqlx::query_scalar("PRAGMA synchronous")
            .fetch_one(alone.conn.as_mut().expect("held").conn_mut())
            .await
            .expect("read");
        alone.finished();
        assert_eq!(level, 2, "a script after a soft transaction");
    }

    /// A soft transaction sent as one script runs its statement at `NORMAL` and leaves the
    /// connection at `FULL`, whether it succeeds or fails part way (before its `COMMIT`: rolled
    /// back, nothing kept; after: committed, its rows answered).
    #[tokio::test]
    async fn a_soft_script_runs_at_normal_and_leaves_the_connection_at_full() {
        let dir = tempfile::tempdir().expect("a temp dir");
        let writer = writer(&dir).await;
        let soft = |statement: &str| format!("{SOFT_BEGIN}{statement}{SOFT_END}");
        let alone = writer.alone().await.expect("taken").expect("dedicated");
        let script = soft("INSERT INTO t SELECT synchronous FROM pragma_synchronous RETURNING x");
        let rows = alone
            .run_soft(sqlx::query(&script))
            .await
            .expect("the script runs");
        let levels: Vec<i64> = rows.iter().map(|r| sqlx::Row::get(r, "x")).collect();
        assert_eq!(levels, [1], "its statement ran at NORMAL");
        let mut tx = writer.begin().await.expect("a durable transaction");
        assert_eq!(level(&mut tx).await, 2, "a durable transaction after it");
        tx.commit().await.expect("committed");

        let alone = writer.alone().await.expect("taken").expect("dedicated");
        let script = soft("INSERT INTO t VALUES (7); INSERT INTO no_such_table VALUES (1)");
        assert!(
            alone.run_soft(sqlx::query(&script)).await.is_err(),
            "a statement that cannot run fails the script"
        );
        let mut tx = writer
            .begin()
            .await
            .expect("a transaction after a failed script");
        assert_eq!(
            level(&mut tx).await,
            2,
            "a durable transaction after a failed one"
        );
        tx.commit().await.expect("committed");
        assert_eq!(count(&writer).await, 1, "the failed script kept nothing");

        // One that fails after its `COMMIT`, before `FULL` is set back: committed, its rows
        // answered, and the next durable transaction at `FULL`.
        let alone = writer.alone().await.expect("taken").expect("dedicated");
        let script = format!(
            "{SOFT_BEGIN}INSERT INTO t VALUES (8) RETURNING x; COMMIT; SELECT * FROM no_such_table"
        );
        let rows = alone
            .run_soft(sqlx::query(&script))
            .await
            .expect("a script that committed answers");
        assert_eq!(rows.len(), 1);
        let mut tx = writer.begin().await.expect("a durable transaction");
        assert_eq!(level(&mut tx).await, 2, "a durable transaction after it");
        tx.commit().await.expect("committed");
        assert_eq!(count(&writer).await, 2, "what it committed is kept");
    }

    /// The check made in SQL (a row inserted into `checks` that is not ok) is told apart by
    /// SQLite's code for a trigger's `RAISE(ABORT)`, not by its text; other failures are not it.
    #[tokio::test]
    async fn a_failed_check_is_told_apart_by_its_code() {
        let dir = tempfile::tempdir().expect("a temp dir");
        let writer = writer(&dir).await;
        let mut tx = writer.begin().await.expect("a transaction starts");
        sqlx::query("INSERT INTO checks (ok) VALUES (1)")
            .execute(&mut *tx)
            .await
            .expect("a check that holds raises nothing");
        let failed = sqlx::query("INSERT INTO checks (ok) VALUES (0)")
            .execute(&mut *tx)
            .await
            .expect_err("a check that fails aborts the statement");
        assert!(failed_check(&failed), "{failed}");
        let sqlx::Error::Database(db) = &failed else {
            panic!("a database error: {failed}")
        };
        assert_eq!(db.code().as_deref(), Some(CONSTRAINT_TRIGGER));
        // Another constraint, which SQLite reports as SQLITE_CONSTRAINT too (extended 1299).
        tx.execute("CREATE TEMP TABLE u (x INTEGER NOT NULL)")
            .await
            .expect("created");
        let other = sqlx::query("INSERT INTO u (x) VALUES (NULL)")
            .execute(&mut *tx)
            .await
            .expect_err("a NOT NULL constraint fails");
        assert!(!failed_check(&other), "{other}");
        let other = sqlx::query("INSERT INTO no_such_table VALUES (1)")
            .execute(&mut *tx)
            .await
            .expect_err("a missing table fails");
        assert!(!failed_check(&other), "{other}");
        drop(tx);
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

    /// A writer on `dir`'s database whose size is capped at what it is now: a write that needs
    /// a new page fails with `SQLITE_FULL`, as on a full disk.
    async fn full_writer(dir: &tempfile::TempDir) -> Writer {
        let url = format!("sqlite://{}", dir.path().join("w.db").display());
        let options = SqliteConnectOptions::from_str(&url)
            .expect("a SQLite URL")
            .journal_mode(sqlx::sqlite::SqliteJournalMode::Wal)
            .pragma("max_page_count", "1");
        Writer::connect(&options)
            .await
            .expect("the connection opens")
    }

    /// Inserts a row too large for a full database, in a transaction of each kind.
    async fn fill(writer: &Writer) {
        let mut tx = writer.begin().await.expect("a transaction starts");
        let err = tx
            .execute("INSERT INTO t VALUES (zeroblob(1000000))")
            .await
            .expect_err("the database is full");
        assert!(err.to_string().contains("full"), "{err}");
        drop(tx);
        let mut conn = writer.alone().await.expect("the connection").unwrap();
        let err = conn
            .execute("BEGIN IMMEDIATE; INSERT INTO t VALUES (zeroblob(1000000)); COMMIT")
            .await
            .expect_err("the database is full");
        assert!(err.to_string().contains("full"), "{err}");
        conn.failed().await.expect("nothing left open");
    }

    #[tokio::test]
    async fn a_transaction_a_full_disk_ended_leaves_the_connection_usable() {
        // SQLite rolls a transaction back by itself when a statement fails with SQLITE_FULL;
        // sqlx's manager, whose ROLLBACK then fails, kept counting it open and refused every
        // BEGIN after it ("begin_with at non-zero transaction depth"), for good.
        let dir = tempfile::tempdir().expect("a temp dir");
        drop(writer(&dir).await);
        let writer = full_writer(&dir).await;
        for _ in 0..3 {
            fill(&writer).await;
            // Small rows still fit in the table's page: the connection writes again.
            let mut tx = writer
                .begin()
                .await
                .expect("a transaction starts after SQLITE_FULL");
            tx.execute("INSERT INTO t VALUES (1)")
                .await
                .expect("inserted");
            tx.commit().await.expect("committed");
        }
        assert_eq!(count(&writer).await, 3);
    }

    #[tokio::test]
    async fn a_commit_that_fails_leaves_the_connection_usable() {
        // A COMMIT refused with the transaction still open (here by a deferred foreign key, which
        // sqlx's options enforce by default): the drop's rollback ends it.
        let dir = tempfile::tempdir().expect("a temp dir");
        let writer = writer(&dir).await;
        let mut tx = writer.begin().await.expect("a transaction starts");
        tx.execute(
            "CREATE TABLE p (id INTEGER PRIMARY KEY); \
             CREATE TABLE c (p INTEGER REFERENCES p (id) DEFERRABLE INITIALLY DEFERRED)",
        )
        .await
        .expect("created");
        tx.commit().await.expect("committed");
        let mut tx = writer.begin().await.expect("a transaction starts");
        tx.execute("INSERT INTO c VALUES (42)")
            .await
            .expect("deferred");
        tx.commit()
            .await
            .expect_err("the foreign key fails at COMMIT");
        let mut tx = writer
            .begin()
            .await
            .expect("a transaction starts after a failed COMMIT");
        let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM c")
            .fetch_one(&mut *tx)
            .await
            .expect("counted");
        assert_eq!(n, 0, "the refused transaction was rolled back");
        tx.commit().await.expect("committed");
    }

    #[tokio::test]
    async fn a_connection_whose_state_cannot_be_evened_up_is_opened_again() {
        let dir = tempfile::tempdir().expect("a temp dir");
        let writer = writer(&dir).await;
        // A script that left SQLite in a transaction, and a rollback that failed: marked.
        {
            let mut conn = writer.alone().await.expect("the connection").unwrap();
            conn.execute("BEGIN IMMEDIATE; INSERT INTO t VALUES (1)")
                .await
                .expect("inserted");
            let Some(slot) = conn.conn.as_mut() else {
                unreachable!("held")
            };
            slot.suspect = true;
            conn.finished();
        }
        // The next transaction rolls it back first.
        assert_eq!(count(&writer).await, 0);
        // A connection gone bad (closed under the slot): opened again.
        {
            let Writer::Dedicated(slot) = &writer else {
                unreachable!("a file")
            };
            let mut slot = slot.lock().await;
            let conn = slot.conn.take().expect("open");
            conn.close().await.expect("closed");
            slot.conn = None;
        }
        let mut tx = writer.begin().await.expect("a new connection");
        tx.execute("INSERT INTO t VALUES (2)")
            .await
            .expect("inserted");
        tx.commit().await.expect("committed");
        assert_eq!(count(&writer).await, 1);
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
