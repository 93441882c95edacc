//! Keeping the store in shape ([`Maintenance`]): the schema (migrate, check), a host's start
//! (recover, activations), the rows people write by hand (`control`, `inbox`), housekeeping and
//! closing.

use chrono::{DateTime, Utc};

use super::connect::commit;
use super::routing::{lock_routes, reroute, Reroute};
use super::{map_err, PostgresStore, MIGRATOR, SCHEMA};
use crate::store::common::{self, maintenance};
use crate::store::*;

/// Advisory lock class of schema creation ("cais").
const SCHEMA_LOCK_CLASS: i32 = 0x6361_6973;

common::maintenance::maintenance! {
    PostgresStore,
    "postgres",
    MIGRATOR,
    // `to_regclass` looks along the search path (the schema `cairn`): NULL when there is no
    // such table, or the role may not use the schema.
    "SELECT to_regclass('_sqlx_migrations') IS NOT NULL",
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
        <Self as common::Upkeep>::upsert_activations(&mut tx, activations, now).await?;
        reroute(&mut tx, &changes, now).await?;
        commit(tx).await
    }

    async fn close(&self) {
        self.points.close().await;
        self.soft.close().await;
        self.pool.close().await;
    }
}
