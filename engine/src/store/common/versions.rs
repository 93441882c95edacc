//! Versions side by side, once for both backends: the claim condition that keeps a host to the
//! versions it registers, the registrations written, the instances `cairn upgrade` reads and the
//! fenced point that moves one, and the reports (`cairn versions`, the instances that need an
//! operator).

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use sqlx::{Database, Encode, Executor, FromRow, IntoArguments, Type};

use super::{Bind, Operator, RowOf};
use crate::store::versions::*;
use crate::store::*;

/// Whether instance `i` may be worked on by host `$1` at time `$2`: waiting, not leased to
/// another host (or its lease ran out), and of a version the host registers, its registrations
/// bound as `registrations` and searched with the backend's `position` function (`instr`,
/// `strpos`). A host that did not say (NULL) runs every version. A row whose version is no
/// version at all (written by hand: text, a negative number) is claimed all the same, so that
/// the host that reads it suspends it with the reason (G6). The claims of both backends use it.
///
/// The registrations are bound from what the host recorded through this store ([`Registered`])
/// rather than read from `hosts` row by row: a subquery per claimed row cost W4 7 % of its CPU
/// on SQLite and 9 % on PostgreSQL.
pub(in crate::store) fn claimable(position: &str, registrations: &str) -> String {
    format!(
        "i.status IN ('running', 'dehydrated') \
         AND (i.owner IS NULL OR i.owner = $1 OR i.lease_expires_at < $2) \
         AND ({registrations} IS NULL OR NOT (i.version BETWEEN 0 AND 4294967295) \
           OR {position}({registrations}, ',' || i.orchestration || '@' || CAST(i.version AS TEXT) || ',') > 0)"
    )
}

/// The registrations each host recorded through this store ([`Versions::record_registrations`]),
/// which its claims bind.
#[derive(Debug, Default)]
pub(in crate::store) struct Registered(std::sync::RwLock<HashMap<String, String>>);

impl Registered {
    /// What `host` recorded, as stored in `hosts.registrations`; `None` if it did not say.
    pub(in crate::store) fn of(&self, host: &str) -> Option<String> {
        self.0
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(host)
            .cloned()
    }

    fn record(&self, host: &str, text: String) {
        self.0
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(host.to_owned(), text);
    }
}

/// The statuses of an instance that waits: what `cairn upgrade` moves.
const STATUSES_WAITING: &str = "('running', 'dehydrated', 'suspended')";

/// The shared room behind [`Versions`]; a backend says `impl Versioning for MyStore {}` and
/// `versions!(MyStore)`.
pub(in crate::store) trait Versioning: Operator
where
    for<'c> &'c mut <Self::Db as Database>::Connection: Executor<'c, Database = Self::Db>,
    for<'q> <Self::Db as Database>::Arguments<'q>: IntoArguments<'q, Self::Db>,
    for<'q> &'q str: Encode<'q, Self::Db> + Type<Self::Db>,
    for<'q> Option<&'q str>: Encode<'q, Self::Db> + Type<Self::Db>,
    String: Bind<Self::Db>,
    Vec<u8>: Bind<Self::Db>,
    i64: Bind<Self::Db>,
    (i64,): for<'r> FromRow<'r, RowOf<Self>>,
{
    /// [`Versions::record_registrations`].
    async fn record_registrations(
        &self,
        host: &str,
        definitions: &[(String, u32)],
    ) -> StoreResult<()> {
        let mut tx = self.begin().await?;
        let text = registrations_text(definitions);
        sqlx::query("UPDATE hosts SET registrations = $2 WHERE id = $1")
            .bind(host.to_owned())
            .bind(text.clone())
            .execute(&mut *tx)
            .await
            .map_err(|e| Self::map_err("record registrations", e))?;
        Self::commit(tx).await?;
        self.registered().record(host, text);
        Ok(())
    }

    /// [`Versions::upgrade_candidates`].
    async fn upgrade_candidates(
        &self,
        filter: &UpgradeFilter,
        now: DateTime<Utc>,
    ) -> StoreResult<Vec<UpgradeCandidate>> {
        let version = if filter.from.is_some() {
            "version = $2"
        } else {
            "version < $2"
        };
        let after = if filter.after.is_some() {
            "AND id > $4"
        } else {
            ""
        };
        let sql = format!(
            "SELECT id, version, status, state, epoch, owner, lease_expires_at FROM instances \
             WHERE orchestration = $1 AND {version} AND status IN {STATUSES_WAITING} {after} \
             ORDER BY id LIMIT $3"
        );
        let mut query = sqlx::query(&sql)
            .bind(filter.orchestration.clone())
            .bind(Self::count(filter.from.unwrap_or(filter.to)))
            .bind(i64::from(filter.limit));
        if let Some(after) = filter.after {
            query = query.bind(Self::uuid(after));
        }
        let rows = query
            .fetch_all(self.reads())
            .await
            .map_err(|e| Self::map_err("upgrade candidates", e))?;
        let candidates = rows.iter().map(|row| {
            let owner = Self::col_text_opt(row, "owner")?;
            let lease = Self::col_time_opt(row, "lease_expires_at")?;
            Ok(UpgradeCandidate {
                id: Self::col_uuid(row, "id")?,
                version: Self::col_u32(row, "instances", "version")?,
                status: Self::col_word(row, "status")?,
                state: Self::col_bytes_opt(row, "state")?,
                epoch: Self::col_i64(row, "epoch")?,
                held_by: owner.filter(|_| lease.is_some_and(|until| until >= now)),
            })
        });
        Ok(readable(candidates, "upgrade candidates"))
    }

    /// [`Versions::upgrade`].
    async fn upgrade(
        &self,
        point: &UpgradePoint,
        now: DateTime<Utc>,
    ) -> StoreResult<UpgradeOutcome> {
        let e = |e| Self::map_err("upgrade", e);
        let mut tx = self.begin().await?;
        // The owner and its expired lease stay: a message the gone owner had claimed is free
        // once its lease ran out (`locked_by = owner`), so it is taken again in its order, not
        // after the messages behind it. The new epoch fences that owner all the same.
        let done = sqlx::query(&format!(
            "UPDATE instances SET version = $2, state = $3, step = $4, epoch = epoch + 1, \
               history_seq = history_seq + 1, updated_at = $5, resumable = {}, \
               last_error = CASE WHEN status = 'suspended' THEN last_error ELSE NULL END \
             WHERE id = $1 AND version = $6 AND epoch = $7 AND status IN {STATUSES_WAITING} \
               AND (owner IS NULL OR lease_expires_at < $5)",
            Self::TRUE
        ))
        .bind(Self::uuid(point.id))
        .bind(Self::count(point.to))
        .bind(point.state.clone())
        .bind(point.step.clone())
        .bind(Self::time(now))
        .bind(Self::count(point.from))
        .bind(point.epoch)
        .execute(&mut *tx)
        .await
        .map_err(e)?;
        if Self::rows_affected(&done) != 1 {
            return Ok(UpgradeOutcome::Changed);
        }
        let row = sqlx::query("SELECT history_seq, status FROM instances WHERE id = $1")
            .bind(Self::uuid(point.id))
            .fetch_one(&mut *tx)
            .await
            .map_err(e)?;
        let detail = format!(
            "upgraded from version {} to version {}",
            point.from, point.to
        );
        Self::insert_history(
            &mut tx,
            point.id,
            HistoryEntry {
                seq: Self::col_i64(&row, "history_seq")?,
                reason: Reason::Upgrade,
                step: &point.step,
                status: Self::col_word(&row, "status")?,
                at: now,
                host: &point.by,
                detail: Some(&detail),
            },
        )
        .await?;
        // Hosts that have the new version may have work waiting for it.
        Self::notify(&mut tx).await?;
        Self::commit(tx).await?;
        Ok(UpgradeOutcome::Moved)
    }

    /// [`Versions::version_counts`].
    async fn version_counts(&self) -> StoreResult<Vec<VersionCount>> {
        let rows = sqlx::query(
            "SELECT orchestration, version, status, COUNT(*) AS n FROM instances \
             GROUP BY orchestration, version, status ORDER BY orchestration, version, status",
        )
        .fetch_all(self.reads())
        .await
        .map_err(|e| Self::map_err("version counts", e))?;
        let counts = rows.iter().map(|row| {
            Ok(VersionCount {
                orchestration: Self::col_text(row, "orchestration")?,
                version: Self::col_u32(row, "instances", "version")?,
                status: Self::col_text(row, "status")?,
                count: u64::try_from(Self::col_i64(row, "n")?).unwrap_or(0),
            })
        });
        Ok(readable(counts, "version counts"))
    }

    /// [`Versions::running_hosts`].
    async fn running_hosts(&self, now: DateTime<Utc>) -> StoreResult<Vec<HostRegistrations>> {
        let rows = sqlx::query(
            "SELECT id, name, registrations FROM hosts \
             WHERE stopped_at IS NULL AND heartbeat_at >= $1 ORDER BY id",
        )
        .bind(Self::time(now - HOST_SILENT_AFTER))
        .fetch_all(self.reads())
        .await
        .map_err(|e| Self::map_err("running hosts", e))?;
        let hosts = rows.iter().map(|row| {
            Ok(HostRegistrations {
                id: Self::col_text(row, "id")?,
                name: Self::col_text(row, "name")?,
                registrations: Self::col_text_opt(row, "registrations")?
                    .map(|text| parse_registrations(&text)),
            })
        });
        Ok(readable(hosts, "running hosts"))
    }

    /// [`Versions::needing_attention`]: the query of docs/sql.md ("needs attention"), with the
    /// cutoff bound.
    async fn needing_attention(
        &self,
        now: DateTime<Utc>,
        limit: u32,
    ) -> StoreResult<Vec<Attention>> {
        let rows = sqlx::query(
            "SELECT i.id, i.orchestration, i.version, i.status, \
               CASE WHEN i.status = 'suspended' THEN COALESCE(i.last_error, 'suspended') \
                 ELSE 'no running host has orchestration ' || i.orchestration || ' version ' \
                   || CAST(i.version AS TEXT) || ': start a host whose build registers it, or move the \
                   instance with cairn upgrade ' || i.orchestration || ' --to VERSION' END AS reason \
             FROM instances i \
             WHERE i.status = 'suspended' \
                OR (i.status IN ('running', 'dehydrated') AND NOT EXISTS ( \
                     SELECT 1 FROM hosts h WHERE h.stopped_at IS NULL AND h.heartbeat_at >= $1 \
                       AND (h.registrations IS NULL OR h.registrations LIKE \
                            '%,' || i.orchestration || '@' || CAST(i.version AS TEXT) || ',%'))) \
             ORDER BY i.updated_at, i.id LIMIT $2",
        )
        .bind(Self::time(now - HOST_SILENT_AFTER))
        .bind(i64::from(limit))
        .fetch_all(self.reads())
        .await
        .map_err(|e| Self::map_err("needing attention", e))?;
        let found = rows.iter().map(|row| {
            Ok(Attention {
                id: Self::col_uuid(row, "id")?,
                orchestration: Self::col_text(row, "orchestration")?,
                version: Self::col_u32(row, "instances", "version")?,
                status: Self::col_word(row, "status")?,
                reason: Self::col_text(row, "reason")?,
            })
        });
        Ok(readable(found, "needing attention"))
    }
}

/// `impl Versions for $store`: every method handed over to [`Versioning`].
macro_rules! versions {
    ($store:ty) => {
        #[async_trait::async_trait]
        impl $crate::store::Versions for $store {
            async fn record_registrations(
                &self,
                host: &str,
                definitions: &[(String, u32)],
            ) -> StoreResult<()> {
                Versioning::record_registrations(self, host, definitions).await
            }

            async fn upgrade_candidates(
                &self,
                filter: &UpgradeFilter,
                now: DateTime<Utc>,
            ) -> StoreResult<Vec<UpgradeCandidate>> {
                Versioning::upgrade_candidates(self, filter, now).await
            }

            async fn upgrade(
                &self,
                point: &UpgradePoint,
                now: DateTime<Utc>,
            ) -> StoreResult<UpgradeOutcome> {
                Versioning::upgrade(self, point, now).await
            }

            async fn version_counts(&self) -> StoreResult<Vec<VersionCount>> {
                Versioning::version_counts(self).await
            }

            async fn running_hosts(
                &self,
                now: DateTime<Utc>,
            ) -> StoreResult<Vec<HostRegistrations>> {
                Versioning::running_hosts(self, now).await
            }

            async fn needing_attention(
                &self,
                now: DateTime<Utc>,
                limit: u32,
            ) -> StoreResult<Vec<Attention>> {
                Versioning::needing_attention(self, now, limit).await
            }
        }
    };
}
pub(in crate::store) use versions;
