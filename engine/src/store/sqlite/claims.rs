//! Claims and leases on SQLite: the statements that take routed messages and due timers (and the
//! plans that keep a claim's cost independent of how many instances wait), acquiring instances,
//! the heartbeat and unlock. Running a claim, reading its rows, release and the rest are shared
//! ([`common::claims`](crate::store::common::claims)).

use std::sync::LazyLock;

use chrono::{DateTime, Utc};
use sqlx::sqlite::SqliteRow;
use sqlx::{QueryBuilder, Sqlite};
use uuid::Uuid;

use super::{batch, commit, map_err, ts, writer, SqliteStore};
use crate::store::common::versions::claimable;
use crate::store::common::{Backend, Claim, Claims};
use crate::store::{Claimed, InstanceRecord, StoreResult, StoredMessage};

// Queries that look for ready messages or due timers of such instances join them with `CROSS
// JOIN`, which SQLite takes as an order: from the few ready messages (`messages_ready`) or due
// timers (`timers_due`) to their instances. Left to choose, the planner starts from
// `instances_by_status`, every waiting instance, and a claim costs time in proportion to how
// many instances wait (35 ms at 20,000 dehydrated, against 0.1 ms).
//
// `claimable` (shared with PostgreSQL) says whether instance `i` may be worked on by host
// `$1` at time `$2`, its version one the host registers (`$4`) included.

/// Claims up to `$3` messages for host `$1` at `$2`: those of instances it holds first (they
/// are in memory, and finishing work in flight keeps it from going idle and being dehydrated
/// only to be loaded again); the rest in publication order. One instance's messages keep their
/// order.
static CLAIM_MESSAGES: LazyLock<String> = LazyLock::new(|| {
    let claimable = claimable("instr", "$4");
    format!(
        "UPDATE messages SET locked_by = $1, delivery_count = delivery_count + 1 WHERE seq IN ( \
           SELECT seq FROM ( \
             SELECT * FROM (SELECT m.seq, 0 AS cold FROM instances i \
               JOIN messages m ON m.instance_id = i.id \
               WHERE i.owner = $1 AND m.status = 'routed' AND m.locked_by IS NULL AND {claimable} \
               ORDER BY m.seq LIMIT $3) \
             UNION ALL \
             SELECT * FROM (SELECT m.seq, 1 AS cold FROM messages m \
               CROSS JOIN instances i ON i.id = m.instance_id \
               WHERE m.status = 'routed' AND m.locked_by IS NULL AND {claimable} \
               ORDER BY m.seq LIMIT $3)) \
           GROUP BY seq ORDER BY min(cold), seq LIMIT $3) \
         RETURNING seq, id, message_type, kind, properties, body, instance_id, subscription_id, published_at, delivery_count"
    )
});

/// Claims up to `$3` timers due at `$2` for host `$1`, the earliest first.
pub(super) static CLAIM_TIMERS: LazyLock<String> = LazyLock::new(|| {
    let claimable = claimable("instr", "$4");
    format!(
        "UPDATE timers SET locked_by = $1 WHERE rowid IN ( \
           SELECT t.rowid FROM timers t CROSS JOIN instances i ON i.id = t.instance_id \
           WHERE t.due_at <= $2 AND t.locked_by IS NULL AND {claimable} \
           ORDER BY t.due_at LIMIT $3) \
         RETURNING instance_id, name, due_at"
    )
});

/// How many messages wait, unclaimed, for instances that can run.
pub(super) const READY_MESSAGES: &str = "SELECT COUNT(*) FROM messages m \
     CROSS JOIN instances i ON i.id = m.instance_id \
     WHERE m.status = 'routed' AND m.locked_by IS NULL AND i.status IN ('running', 'dehydrated')";

/// When the earliest unclaimed timer of an instance that can run is due.
pub(super) const NEXT_TIMER: &str = "SELECT t.due_at FROM timers t \
     CROSS JOIN instances i ON i.id = t.instance_id \
     WHERE t.locked_by IS NULL AND i.status IN ('running', 'dehydrated') \
     ORDER BY t.due_at LIMIT 1";

/// [`Claims::claim_rows`] on SQLite: the claim as a soft transaction sent to the connection's
/// worker in one round trip ([`writer::SOFT_BEGIN`]) rather than five.
pub(super) async fn claim_rows(
    store: &SqliteStore,
    claim: Claim<'_>,
) -> StoreResult<Vec<SqliteRow>> {
    let Some(conn) = store.writer.alone().await? else {
        return store.claim_rows_in_transaction(claim).await;
    };
    let script = format!("{}{}{}", writer::SOFT_BEGIN, claim.sql, writer::SOFT_END);
    conn.run_soft(store.claim_query(&script, &claim)).await
}

/// [`MessageBox::claim_messages`](crate::store::MessageBox::claim_messages) on SQLite.
pub(super) async fn claim_messages(
    store: &SqliteStore,
    host: &str,
    now: DateTime<Utc>,
    limit: u32,
) -> StoreResult<Claimed<StoredMessage>> {
    store
        .claim_messages_by(
            Claim::new(&CLAIM_MESSAGES, host, now, limit),
            limit as usize,
        )
        .await
}

pub(super) async fn acquire(
    store: &SqliteStore,
    host: &str,
    ids: &[Uuid],
    now: DateTime<Utc>,
    lease_until: DateTime<Utc>,
) -> StoreResult<Vec<InstanceRecord>> {
    if ids.len() <= batch::ROWS_PER_STATEMENT {
        if let Some(conn) = store.writer.alone().await? {
            // One round trip to the worker, as a claim's (see `claim_rows`).
            let mut q = QueryBuilder::new(writer::SOFT_BEGIN);
            push_acquire(&mut q, host, ids, now, lease_until);
            q.push(writer::SOFT_END);
            let query = q.build().persistent(batch::reuse(ids.len()));
            let rows = conn.run_soft(query).await?;
            return store.acquired_committed(&rows, now).await;
        }
    }
    let mut tx = store.begin_soft().await?;
    let mut out = Vec::with_capacity(ids.len());
    for chunk in ids.chunks(batch::ROWS_PER_STATEMENT) {
        let mut q = QueryBuilder::new("");
        push_acquire(&mut q, host, chunk, now, lease_until);
        let rows = q
            .build()
            .persistent(batch::reuse(chunk.len()))
            .fetch_all(&mut *tx)
            .await
            .map_err(|e| map_err("acquire", e))?;
        out.extend(SqliteStore::acquired(&mut tx, rows, now).await?);
    }
    SqliteStore::commit(tx).await?;
    Ok(out)
}

/// The statement that leases instances `ids` to `host` until `lease_until` and returns their
/// rows: those no live host holds.
fn push_acquire<'a>(
    q: &mut QueryBuilder<'a, Sqlite>,
    host: &'a str,
    ids: &[Uuid],
    now: DateTime<Utc>,
    lease_until: DateTime<Utc>,
) {
    q.push("UPDATE instances SET owner = ")
        .push_bind(host)
        .push(", lease_expires_at = ")
        .push_bind(ts(lease_until))
        .push(
            ", epoch = epoch + 1, status = 'running' \
             WHERE status IN ('running', 'dehydrated') AND (owner IS NULL OR owner = ",
        )
        .push_bind(host)
        .push(" OR lease_expires_at < ")
        .push_bind(ts(now))
        .push(") AND id IN (");
    let mut list = q.separated(", ");
    for id in ids {
        list.push_bind(id.to_string());
    }
    q.push(
        ") RETURNING id, orchestration, version, status, state, engine_state, epoch, \
         history_seq, parent_id",
    );
}

pub(super) async fn unlock(
    store: &SqliteStore,
    host: &str,
    ids: &[Uuid],
    failed: &[i64],
) -> StoreResult<()> {
    let mut tx = store.write().await?;
    let ids: Vec<String> = ids.iter().map(Uuid::to_string).collect();
    batch::unlock_instances(&mut tx, Some(host), &ids, failed).await?;
    commit(tx).await
}

#[cfg(test)]
mod tests {
    use sqlx::Row;

    use super::*;
    use crate::store::Maintenance;

    /// The steps of SQLite's plan for `sql`.
    async fn plan(store: &SqliteStore, sql: &str) -> Vec<String> {
        sqlx::query(&format!("EXPLAIN QUERY PLAN {sql}"))
            .bind("host")
            .bind("2026-12-04T00:00:00Z")
            .bind(256_i64)
            .fetch_all(&store.pool)
            .await
            .unwrap()
            .iter()
            .map(|row| row.get::<String, _>("detail"))
            .collect()
    }

    /// A claim's cost must not grow with how many instances wait (W5: 100,000 dehydrated):
    /// the statements that look for ready messages and due timers start from those rows'
    /// indexes, never from every waiting instance (`instances_by_status`). SQLite plans without
    /// statistics the same on an empty database as on a full one, so an empty one shows it.
    #[tokio::test]
    async fn claims_start_from_ready_messages_and_due_timers_not_from_waiting_instances() {
        let store = SqliteStore::open("sqlite::memory:").await.unwrap();
        store.migrate().await.unwrap();
        for (sql, index) in [
            (CLAIM_MESSAGES.as_str(), "messages_ready"),
            (CLAIM_TIMERS.as_str(), "timers_due"),
            (READY_MESSAGES, "messages_ready"),
            (NEXT_TIMER, "timers_due"),
        ] {
            let steps = plan(&store, sql).await;
            assert!(
                steps.iter().any(|s| s.contains(index)),
                "{sql}\nshould read {index}: {steps:#?}"
            );
            assert!(
                !steps.iter().any(|s| s.contains("instances_by_status")),
                "{sql}\nreads every waiting instance: {steps:#?}"
            );
        }
    }
}
