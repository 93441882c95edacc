//! Keeping the store in shape ([`Maintenance`]): the schema (migrate, check), a host's start
//! (recover, activations), the rows people write by hand (`control`, `inbox`), housekeeping and
//! closing.

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use uuid::Uuid;

use super::connect::commit;
use super::listen::notify;
use super::routing::{lock_routes, reroute, routed_types, Reroute};
use super::{col, int4, map_err, PostgresStore, MIGRATOR, SCHEMA};
use crate::store::common::{self, maintenance};
use crate::store::*;

/// Advisory lock class of schema creation ("cais").
const SCHEMA_LOCK_CLASS: i32 = 0x6361_6973;

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
        .bind(maintenance::hostname())
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
        common::Upkeep::apply_controls(self, host, now, limit).await
    }

    async fn housekeeping(
        &self,
        now: DateTime<Utc>,
        unrouted_before: DateTime<Utc>,
    ) -> StoreResult<Housekeeping> {
        common::Upkeep::housekeeping(self, now, unrouted_before).await
    }

    async fn take_inbox(
        &self,
        now: DateTime<Utc>,
        limit: u32,
        max_message_bytes: usize,
    ) -> StoreResult<usize> {
        if !common::Upkeep::exists(self, "SELECT EXISTS (SELECT 1 FROM inbox)").await? {
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
            parsed.push((
                id,
                maintenance::inbox_row::<Self>(row, id, max_message_bytes),
            ));
        }
        let good: Vec<NewMessage> = parsed
            .iter()
            .filter_map(|(_, m)| m.as_ref().ok().cloned())
            .collect();
        lock_routes(&mut tx, routed_types(&good), []).await?;
        for (id, message) in parsed {
            <Self as common::Upkeep>::take_inbox_row(&mut tx, id, message, now).await?;
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
