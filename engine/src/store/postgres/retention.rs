//! Retention on PostgreSQL: the shared purge and gauges ([`common::Retain`]) with instance ids
//! bound as a `uuid[]`, one host at a time through a transaction-scoped advisory lock taken
//! without waiting (a host that does not get it skips its batch; the lock goes with the
//! transaction, so a host killed mid-purge holds nothing), and `pg_database_size`. Deletes come
//! in bounded batches, which autovacuum keeps up with; nothing to give back by hand.

use chrono::{DateTime, Utc};
use uuid::Uuid;

use super::{map_err, PostgresStore, Tx};
use crate::store::common;
use crate::store::StoreResult;

/// The advisory lock key of the purge: `cairnpur` in ASCII, so that it names itself in
/// `pg_locks` (classid 1667328370, objid 1852863858).
const PURGE_LOCK: i64 = 0x6361_6972_6e70_7572;

impl common::Retain for PostgresStore {
    type Ids = Vec<Uuid>;
    const IDS_1: &'static str = "= ANY($1)";

    fn ids(ids: &[Uuid]) -> Vec<Uuid> {
        ids.to_vec()
    }

    async fn take_turn(tx: &mut Tx) -> StoreResult<bool> {
        let (ours,): (bool,) = sqlx::query_as("SELECT pg_try_advisory_xact_lock($1)")
            .bind(PURGE_LOCK)
            .fetch_one(&mut **tx)
            .await
            .map_err(|e| map_err("take the purge's turn", e))?;
        Ok(ours)
    }

    async fn reclaim_space(&self, _pages: u32) -> StoreResult<()> {
        Ok(())
    }

    async fn expired_elsewhere(
        &self,
        host: &str,
        ids: &[Uuid],
        now: DateTime<Utc>,
    ) -> StoreResult<Vec<Uuid>> {
        sqlx::query_as::<_, (Uuid,)>(
            "SELECT id FROM instances WHERE id = ANY($1) AND owner IS NOT NULL AND owner <> $2 \
               AND lease_expires_at < $3",
        )
        .bind(ids)
        .bind(host)
        .bind(now)
        .fetch_all(&self.pool)
        .await
        .map(|rows| rows.into_iter().map(|(id,)| id).collect())
        .map_err(|e| map_err("expired leases", e))
    }

    async fn database_bytes(&self) -> StoreResult<u64> {
        let (bytes,): (i64,) = sqlx::query_as("SELECT pg_database_size(current_database())")
            .fetch_one(&self.pool)
            .await
            .map_err(|e| map_err("database size", e))?;
        Ok(u64::try_from(bytes).unwrap_or(0))
    }
}

common::retention::retention_verbs!(PostgresStore);
