//! Retention and the gauges, once for both backends ([`crate::store::retention`] says what is
//! purgeable and what a purge deletes). A backend adds how it binds a list of instance ids and
//! how it takes its turn to purge ([`Retain`]'s required items, in its own `retention.rs`).

use chrono::{DateTime, Utc};
use sqlx::{Database, Encode, Executor, FromRow, IntoArguments, Type};
use uuid::Uuid;

use super::{Backend, Bind, RowOf};
use crate::store::retention::*;
use crate::store::StoreResult;

/// What makes ended instance `i` purgeable, besides its status and age: nothing of it left to
/// deliver, nothing routed to it unconsumed, no child of it still running.
const NOTHING_DEPENDS: &str = "NOT EXISTS (SELECT 1 FROM outbox o WHERE o.instance_id = i.id \
       AND o.status IN ('pending', 'held', 'give_up')) \
     AND NOT EXISTS (SELECT 1 FROM messages m WHERE m.instance_id = i.id \
       AND m.status IN ('routed', 'unrouted')) \
     AND NOT EXISTS (SELECT 1 FROM instances c WHERE c.parent_id = i.id \
       AND c.status NOT IN ('completed', 'failed', 'terminated'))";

/// The statements a purge runs on the confirmed ids bound as `$1`, dependents first.
const DELETES: [&str; 7] = [
    "DELETE FROM history WHERE instance_id ",
    "DELETE FROM messages WHERE instance_id ",
    "DELETE FROM outbox WHERE instance_id ",
    "DELETE FROM subscriptions WHERE instance_id ",
    "DELETE FROM waited_keys WHERE instance_id ",
    "DELETE FROM timers WHERE instance_id ",
    "DELETE FROM control WHERE status <> 'pending' AND instance_id ",
];

/// Retention over a [`Backend`]; see the module docs.
pub(in crate::store) trait Retain: Backend
where
    for<'c> &'c mut <Self::Db as Database>::Connection: Executor<'c, Database = Self::Db>,
    for<'q> <Self::Db as Database>::Arguments<'q>: IntoArguments<'q, Self::Db>,
    for<'q> &'q str: Encode<'q, Self::Db> + Type<Self::Db>,
    String: Bind<Self::Db>,
    i64: Bind<Self::Db>,
    (i64,): for<'r> FromRow<'r, RowOf<Self>>,
{
    /// A list of instance ids as bound for [`Retain::IDS_1`].
    type Ids: Bind<Self::Db>;
    /// Membership of a uuid column in the list bound as `$1`.
    const IDS_1: &'static str;
    /// Instance ids, to bind as a list.
    fn ids(ids: &[Uuid]) -> Self::Ids;
    /// Whether this host may purge now, inside `tx`: PostgreSQL takes a transaction-scoped
    /// advisory lock without waiting (one host at a time); SQLite has one host.
    fn take_turn(tx: &mut Self::Tx) -> impl std::future::Future<Output = StoreResult<bool>> + Send;
    /// [`Retention::reclaim_space`].
    fn reclaim_space(
        &self,
        pages: u32,
    ) -> impl std::future::Future<Output = StoreResult<()>> + Send;
    /// [`Retention::database_bytes`].
    fn database_bytes(&self) -> impl std::future::Future<Output = StoreResult<u64>> + Send;
    /// [`Retention::expired_elsewhere`].
    fn expired_elsewhere(
        &self,
        host: &str,
        ids: &[Uuid],
        now: DateTime<Utc>,
    ) -> impl std::future::Future<Output = StoreResult<Vec<Uuid>>> + Send;

    /// [`Retention::gauges`].
    async fn gauges(&self, now: DateTime<Utc>) -> StoreResult<StoreGauges> {
        let e = |e| Self::map_err("read gauges", e);
        let n = Self::COUNT_AS;
        let mut gauges = StoreGauges::default();
        for row in sqlx::query(&format!(
            "SELECT orchestration, status, COUNT(*) AS {n} FROM instances \
             GROUP BY orchestration, status"
        ))
        .fetch_all(self.reads())
        .await
        .map_err(e)?
        {
            gauges.instances.push((
                Self::col_text(&row, "orchestration")?,
                Self::col_text(&row, "status")?,
                Self::col_i64(&row, n)?,
            ));
        }
        (gauges.unrouted,) =
            sqlx::query_as("SELECT COUNT(*) FROM messages WHERE status = 'unrouted'")
                .fetch_one(self.reads())
                .await
                .map_err(e)?;
        (gauges.dead_letters,) = sqlx::query_as("SELECT COUNT(*) FROM dead_letters")
            .fetch_one(self.reads())
            .await
            .map_err(e)?;
        for row in sqlx::query(&format!(
            "SELECT port, COUNT(*) AS {n}, MIN(created_at) AS oldest FROM outbox \
             WHERE status IN ('pending', 'held', 'give_up') GROUP BY port"
        ))
        .fetch_all(self.reads())
        .await
        .map_err(e)?
        {
            let oldest = Self::col_time_opt(&row, "oldest")?;
            gauges.outbox.push(OutboxGauge {
                port: Self::col_text(&row, "port")?,
                pending: Self::col_i64(&row, n)?,
                oldest_seconds: oldest.map_or(0.0, |at| {
                    (now - at).num_milliseconds().max(0) as f64 / 1000.0
                }),
            });
        }
        Ok(gauges)
    }

    /// An empty write transaction, begun and committed: the write half of
    /// [`Retention::ready`].
    async fn takes_a_write(&self) -> StoreResult<()> {
        let tx = self.begin().await?;
        Self::commit(tx).await
    }

    /// [`Retention::count_purgeable`].
    async fn count_purgeable(&self, filter: &PurgeFilter) -> StoreResult<u64> {
        let (n,): (i64,) = sqlx::query_as(&format!(
            "SELECT COUNT(*) FROM instances i \
             WHERE status IN ('completed', 'failed', 'terminated') AND updated_at < $1 \
               AND ($2 = '' OR orchestration = $2) AND {NOTHING_DEPENDS}"
        ))
        .bind(Self::time(filter.ended_before))
        .bind(filter.orchestration.clone().unwrap_or_default())
        .fetch_one(self.reads())
        .await
        .map_err(|e| Self::map_err("count purgeable instances", e))?;
        Ok(u64::try_from(n).unwrap_or(0))
    }

    /// [`Retention::purgeable`].
    async fn purgeable(
        &self,
        filter: &PurgeFilter,
        with_history: bool,
    ) -> StoreResult<Vec<EndedInstance>> {
        let e = |e| Self::map_err("read purgeable instances", e);
        let sql = format!(
            "SELECT id, orchestration, version, status, step, created_at, updated_at, last_error, \
               output, parent_id FROM instances i \
             WHERE status IN ('completed', 'failed', 'terminated') AND updated_at < $1 \
               AND ($2 = '' OR orchestration = $2) AND {NOTHING_DEPENDS} \
             ORDER BY updated_at LIMIT $3"
        );
        let rows = sqlx::query(&sql)
            .bind(Self::time(filter.ended_before))
            .bind(filter.orchestration.clone().unwrap_or_default())
            .bind(i64::from(filter.limit))
            .fetch_all(self.reads())
            .await
            .map_err(e)?;
        let mut out = Vec::with_capacity(rows.len());
        for row in &rows {
            out.push(EndedInstance {
                id: Self::col_uuid(row, "id")?,
                orchestration: Self::col_text(row, "orchestration")?,
                version: i64::from(Self::col_u32(row, "instances", "version")?),
                status: Self::col_text(row, "status")?,
                step: Self::col_text(row, "step")?,
                created_at: Self::col_time(row, "created_at")?,
                ended_at: Self::col_time(row, "updated_at")?,
                last_error: Self::col_text_opt(row, "last_error")?,
                output: Self::col_text_opt(row, "output")?,
                parent_id: Self::col_uuid_opt(row, "parent_id")?,
                history: Vec::new(),
            });
        }
        if with_history && !out.is_empty() {
            let ids: Vec<Uuid> = out.iter().map(|i| i.id).collect();
            let rows = sqlx::query(&format!(
                "SELECT instance_id, seq, reason, step, status, at, host, epoch, detail \
                 FROM history WHERE instance_id {} ORDER BY instance_id, seq",
                Self::IDS_1
            ))
            .bind(Self::ids(&ids))
            .fetch_all(self.reads())
            .await
            .map_err(e)?;
            let mut by_id: std::collections::HashMap<Uuid, Vec<ArchivedPoint>> =
                std::collections::HashMap::new();
            for row in &rows {
                by_id
                    .entry(Self::col_uuid(row, "instance_id")?)
                    .or_default()
                    .push(ArchivedPoint {
                        seq: Self::col_i64(row, "seq")?,
                        reason: Self::col_text(row, "reason")?,
                        step: Self::col_text(row, "step")?,
                        status: Self::col_text(row, "status")?,
                        at: Self::col_time(row, "at")?,
                        host: Self::col_text(row, "host")?,
                        epoch: Self::col_i64(row, "epoch")?,
                        detail: Self::col_text_opt(row, "detail")?,
                    });
            }
            for instance in &mut out {
                instance.history = by_id.remove(&instance.id).unwrap_or_default();
            }
        }
        Ok(out)
    }

    /// [`Retention::purge`].
    async fn purge(&self, ids: &[Uuid], filter: &PurgeFilter) -> StoreResult<Purged> {
        let e = |e| Self::map_err("purge ended instances", e);
        let mut purged = Purged::default();
        if ids.is_empty() {
            return Ok(purged);
        }
        let mut tx = self.begin().await?;
        if !Self::take_turn(&mut tx).await? {
            purged.not_our_turn = true;
            return Ok(purged);
        }
        // Checked again under the transaction (and, on PostgreSQL, the rows locked): only what is
        // still ended, old enough and depended on by nothing is deleted.
        let confirmed = sqlx::query(&format!(
            "SELECT id FROM instances i WHERE id {} \
               AND status IN ('completed', 'failed', 'terminated') AND updated_at < $2 \
               AND ($3 = '' OR orchestration = $3) AND {NOTHING_DEPENDS}{}",
            Self::IDS_1,
            Self::FOR_UPDATE
        ))
        .bind(Self::ids(ids))
        .bind(Self::time(filter.ended_before))
        .bind(filter.orchestration.clone().unwrap_or_default())
        .fetch_all(&mut *tx)
        .await
        .map_err(e)?
        .iter()
        .map(|row| Self::col_uuid(row, "id"))
        .collect::<StoreResult<Vec<Uuid>>>()?;
        if confirmed.is_empty() {
            return Ok(purged);
        }
        for delete in DELETES {
            let done = sqlx::query(&format!("{delete}{}", Self::IDS_1))
                .bind(Self::ids(&confirmed))
                .execute(&mut *tx)
                .await
                .map_err(e)?;
            purged.rows += Self::rows_affected(&done);
        }
        let done = sqlx::query(&format!("DELETE FROM instances WHERE id {}", Self::IDS_1))
            .bind(Self::ids(&confirmed))
            .execute(&mut *tx)
            .await
            .map_err(e)?;
        purged.instances = Self::rows_affected(&done);
        purged.rows += purged.instances;
        Self::commit(tx).await?;
        Ok(purged)
    }
}

/// `impl Retention for $store`: every method handed over to [`Retain`], `ready` being the schema
/// check and an empty write transaction.
macro_rules! retention_verbs {
    ($store:ty) => {
        #[async_trait::async_trait]
        impl $crate::store::Retention for $store {
            async fn gauges(
                &self,
                now: chrono::DateTime<chrono::Utc>,
            ) -> $crate::store::StoreResult<$crate::store::StoreGauges> {
                $crate::store::common::Retain::gauges(self, now).await
            }

            async fn purgeable(
                &self,
                filter: &$crate::store::retention::PurgeFilter,
                with_history: bool,
            ) -> $crate::store::StoreResult<Vec<$crate::store::retention::EndedInstance>> {
                $crate::store::common::Retain::purgeable(self, filter, with_history).await
            }

            async fn purge(
                &self,
                ids: &[uuid::Uuid],
                filter: &$crate::store::retention::PurgeFilter,
            ) -> $crate::store::StoreResult<$crate::store::retention::Purged> {
                $crate::store::common::Retain::purge(self, ids, filter).await
            }

            async fn reclaim_space(&self, pages: u32) -> $crate::store::StoreResult<()> {
                $crate::store::common::Retain::reclaim_space(self, pages).await
            }

            async fn ready(&self) -> $crate::store::StoreResult<()> {
                $crate::store::Maintenance::check_schema(self).await?;
                $crate::store::common::Retain::takes_a_write(self).await
            }

            async fn count_purgeable(
                &self,
                filter: &$crate::store::retention::PurgeFilter,
            ) -> $crate::store::StoreResult<u64> {
                $crate::store::common::Retain::count_purgeable(self, filter).await
            }

            async fn expired_elsewhere(
                &self,
                host: &str,
                ids: &[uuid::Uuid],
                now: chrono::DateTime<chrono::Utc>,
            ) -> $crate::store::StoreResult<Vec<uuid::Uuid>> {
                $crate::store::common::Retain::expired_elsewhere(self, host, ids, now).await
            }

            async fn database_bytes(&self) -> $crate::store::StoreResult<u64> {
                $crate::store::common::Retain::database_bytes(self).await
            }
        }
    };
}
pub(in crate::store) use retention_verbs;
