//! Keeping the store in shape (`impl Maintenance`): migrations and the schema check, a host's
//! start (recovery, activating subscriptions), the rows people write by hand (`control` and
//! `inbox`), housekeeping, and closing.

use std::collections::BTreeSet;

use chrono::{DateTime, Utc};
use sqlx::sqlite::SqliteRow;
use sqlx::SqlitePool;
use uuid::Uuid;

use super::routing::{publish_one, reroute};
use super::WriteTx;
use super::{as_text, col, col_uuid, commit, map_err, read, ts, SqliteStore, Tx};
use crate::store::common::Operator;
use crate::store::*;

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../migrations/sqlite");

/// Whether a query's single boolean answer is true.
async fn exists(pool: &SqlitePool, sql: &str) -> StoreResult<bool> {
    sqlx::query_scalar(sql)
        .fetch_one(pool)
        .await
        .map_err(|e| map_err("exists", e))
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
            let mut tx = WriteTx(self.write().await?);
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
                    <SqliteStore as Operator>::control_in(
                        &mut tx,
                        request.instance_id,
                        &request.action,
                        now,
                    )
                    .await,
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
                    (WriteTx(self.write().await?), "rejected", e.to_string())
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
            commit(tx.0).await?;
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

#[cfg(test)]
mod tests {
    use sqlx::Sqlite;

    use super::*;
    use crate::store::sqlite::parse_uuid;
    use crate::store::sqlite::routing::insert_instance;

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
