//! Keeping the store in shape (`impl Maintenance`): migrations and the schema check, a host's
//! start (recovery, activating subscriptions), the rows people write by hand (`control` and
//! `inbox`), housekeeping, and closing.

use std::collections::BTreeSet;

use chrono::{DateTime, Utc};

use super::routing::reroute;
use super::{col, commit, map_err, ts, SqliteStore};
use crate::store::common::{self, maintenance};
use crate::store::*;

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../migrations/sqlite");

common::maintenance::maintenance! {
    SqliteStore,
    "sqlite",
    MIGRATOR,
    "SELECT EXISTS (SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = '_sqlx_migrations')",
    async fn migrate(&self) -> StoreResult<()> {
        MIGRATOR.run(&self.pool).await?;
        Ok(())
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
        let me = maintenance::hostname();
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
        .bind(maintenance::hostname())
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
        let mut tx = common::Backend::begin(self).await?;
        <Self as common::Upkeep>::upsert_activations(&mut tx, activations, now).await?;
        let types: BTreeSet<String> = activations.iter().map(|a| a.message_type.clone()).collect();
        reroute(&mut tx.tx, &types).await?;
        <Self as common::Backend>::commit(tx).await
    }

    async fn close(&self) {
        self.writer.close().await;
        self.pool.close().await;
    }
}

#[cfg(test)]
mod tests {
    use sqlx::Sqlite;

    use super::*;
    use crate::store::sqlite::parse_uuid;

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
        common::routing::insert_instance::<SqliteStore>(
            &mut tx,
            parse_uuid(TARGET).unwrap(),
            "o",
            1,
            None,
            now,
        )
        .await
        .unwrap();
        commit(tx).await.unwrap();
    }
}
