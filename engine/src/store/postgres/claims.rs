//! Claims and leases on PostgreSQL: the statements that claim messages and timers (`FOR UPDATE
//! SKIP LOCKED`), acquiring instances under a new epoch, the heartbeat and unlock, and the SQL
//! that decides when another host's lock is stale ([`lock_free`]). Running a claim, reading its
//! rows, release and the rest are shared ([`common::claims`](crate::store::common::claims)).

use std::sync::atomic::Ordering;
use std::sync::LazyLock;

use chrono::{DateTime, Utc};
use sqlx::postgres::PgRow;
use uuid::Uuid;

use super::connect::commit;
use super::{map_err, PostgresStore};
use crate::store::common::versions::claimable;
use crate::store::common::{Backend, Claim, Claims};
use crate::store::{Claimed, InstanceRecord, StoreResult, StoredMessage};

impl PostgresStore {
    /// Hosts whose last heartbeat is older than this are presumed gone.
    pub(super) fn host_cutoff(&self, now: DateTime<Utc>) -> DateTime<Utc> {
        now - chrono::Duration::milliseconds(2 * self.lease_ms.load(Ordering::Relaxed))
    }
}

/// A host's claim of ready messages (`$1` the host, `$2` now, `$3` the limit, `$4` the heartbeat
/// cutoff, `$5` its registrations). Half the batch at most for instances this host holds, so that a busy host still takes
/// its share of new work and hosts keep splitting it; the rest of the batch is the oldest
/// claimable messages. An instance the host holds has started, so the first part reads no start
/// messages (`messages_routed_after_start`).
pub(super) static CLAIM_MESSAGES: LazyLock<String> = LazyLock::new(|| {
    format!(
        "WITH hot AS ( \
           SELECT m.seq FROM messages m JOIN instances i ON i.id = m.instance_id \
           WHERE m.status = 'routed' AND m.kind <> 'start' AND {mine} AND {lock_free} \
             AND i.owner = $1 \
           ORDER BY m.seq LIMIT ($3 + 1) / 2 \
           FOR UPDATE OF m SKIP LOCKED), \
         cold AS ( \
           SELECT m.seq FROM messages m \
           WHERE m.status = 'routed' AND m.seq NOT IN (SELECT seq FROM hot) AND {claimable} \
           ORDER BY m.seq LIMIT $3 - (SELECT count(*) FROM hot) \
           FOR UPDATE SKIP LOCKED) \
         UPDATE messages SET locked_by = $1, delivery_count = delivery_count + 1 \
         WHERE seq = ANY(ARRAY(SELECT seq FROM hot UNION ALL SELECT seq FROM cold)) \
         RETURNING seq, id, message_type, kind, properties, body, instance_id, subscription_id, published_at, delivery_count",
        lock_free = lock_free("m"),
        mine = claimable("strpos", "$5"),
        claimable = of_its_instance("m", &format!("{} AND {}", claimable("strpos", "$5"), lock_free("m"))),
    )
});

/// A host's claim of due timers (parameters as for [`CLAIM_MESSAGES`]), the earliest first.
pub(super) static CLAIM_TIMERS: LazyLock<String> = LazyLock::new(|| {
    format!(
        "UPDATE timers SET locked_by = $1 WHERE (instance_id, name) IN ( \
           SELECT t.instance_id, t.name FROM timers t \
           WHERE t.due_at <= $2 AND {claimable} \
           ORDER BY t.due_at LIMIT $3 \
           FOR UPDATE SKIP LOCKED) \
         RETURNING instance_id, name, due_at",
        claimable = of_its_instance(
            "t",
            &format!("{} AND {}", claimable("strpos", "$5"), lock_free("t"))
        ),
    )
});

/// How many routed messages some host may take (`$1` now, `$2` the heartbeat cutoff), for
/// [`OperatorVerbs::activity`](crate::store::OperatorVerbs::activity).
pub(super) static READY_MESSAGES: LazyLock<String> = LazyLock::new(|| {
    format!(
        "SELECT COUNT(*) FROM messages m WHERE m.status = 'routed' AND {}",
        of_its_instance("m", &format!("{RUNNABLE} AND {}", lock_stale("m")))
    )
});

/// When the next timer some host may take is due (parameters as for [`READY_MESSAGES`]).
pub(super) static NEXT_TIMER: LazyLock<String> = LazyLock::new(|| {
    format!(
        "SELECT t.due_at FROM timers t WHERE {} ORDER BY t.due_at LIMIT 1",
        of_its_instance("t", &format!("{RUNNABLE} AND {}", lock_stale("t")))
    )
});

/// Instances some host may run.
const RUNNABLE: &str = "i.status IN ('running', 'dehydrated')";

/// Whether the lock on row `x` (a message or timer of instance `i`) leaves it to host `$1`, given
/// [`claimable`]; `$2` is the current time, `$4` the heartbeat cutoff below which a host is
/// presumed gone. A lock is stale when:
///
/// * its holder is the instance's owner and the lease ran out (the owner is gone or too slow: its
///   commits will be fenced once another host acquires the instance); or
/// * its holder is gone (stopped, or no heartbeat since the cutoff).
///
/// Any other live holder may have the row in memory, about to deliver it: a host that claimed and
/// has not yet acquired (it then acquires the instance, or fails to and unlocks). Taking the row
/// from it would deliver it twice. A host never takes its own locked rows again either.
fn lock_free(x: &str) -> String {
    format!(
        "({x}.locked_by IS NULL OR ({x}.locked_by <> $1 AND {stale}))",
        stale = stale(x, "$2", "$4")
    )
}

/// Whether the lock on row `x` of instance `i` is stale (see [`lock_free`]), the current time and
/// the heartbeat cutoff being the parameters `now` and `cutoff`.
fn stale(x: &str, now: &str, cutoff: &str) -> String {
    format!(
        "(({x}.locked_by = i.owner AND i.lease_expires_at < {now}) \
          OR NOT EXISTS (SELECT 1 FROM hosts h WHERE h.id = {x}.locked_by \
                           AND h.stopped_at IS NULL AND h.heartbeat_at >= {cutoff}))"
    )
}

/// Whether row `x` of instance `i` is free for some host (`$1` is the current time, `$2` the
/// heartbeat cutoff): the host-independent version of [`lock_free`], for [`OperatorVerbs::activity`](crate::store::OperatorVerbs::activity).
fn lock_stale(x: &str) -> String {
    format!(
        "({x}.locked_by IS NULL OR {stale})",
        stale = stale(x, "$1", "$2")
    )
}

/// `condition` on the instance `i` of row `x` (a message or a timer), as a scalar subquery: null,
/// so false, when there is no such instance.
///
/// PostgreSQL never turns a scalar subquery into a join. A query that filters its rows with one
/// reads them in the order of their index (`messages_routed` by `seq`, `timers_due` by due time),
/// looks up each row's instance by key and stops at its limit, whatever the statistics say. With
/// a join the planner chose by its statistics, and statistics taken while the tables were small
/// (autovacuum analyses them up to a minute late) made it hash every waiting instance and sort
/// every routed message: a claim took 200 ms with 100,000 instances waiting, 5 ms this way.
fn of_its_instance(x: &str, condition: &str) -> String {
    format!("(SELECT {condition} FROM instances i WHERE i.id = {x}.instance_id)")
}

/// [`MessageBox::claim_messages`](crate::store::MessageBox::claim_messages) on PostgreSQL.
// Up to half the batch: messages for instances this host already holds (they are in memory,
// and finishing work in flight keeps it from going idle and being dehydrated only to be
// loaded again); the rest in publication order. One instance's messages keep their order.
pub(super) async fn claim_messages(
    store: &PostgresStore,
    host: &str,
    now: DateTime<Utc>,
    limit: u32,
) -> StoreResult<Claimed<StoredMessage>> {
    // The claim takes at most half of `limit` for instances this host holds, and fills the
    // rest with others' only as far as there are any: half a claim may be a full one.
    let full = limit.div_ceil(2).max(1) as usize;
    store
        .claim_messages_by(Claim::new(&CLAIM_MESSAGES, host, now, limit), full)
        .await
}

/// [`Claims::claim_rows`] on PostgreSQL: the claim, one statement, on the soft connection
/// ([`PostgresStore::soft_connection`]): one round trip.
pub(super) async fn claim_rows(store: &PostgresStore, claim: Claim<'_>) -> StoreResult<Vec<PgRow>> {
    let mut conn = store.soft_connection().await?;
    let rows = store
        .claim_query(claim.sql, &claim)
        .fetch_all(&mut *conn)
        .await
        .map_err(|e| map_err("claim", e));
    conn.ended(&rows);
    rows
}

/// Leases instances `$4` to host `$1` at `$2` until `$3` and returns their rows: those no live
/// host holds. Its rows are locked in index order, the same in every host. Whatever other hosts
/// hold of the instances taken they cannot commit any more (the epoch moved): a previous owner
/// whose lease ran out, or a host that claimed but lost the race to acquire. That is released,
/// so that it is delivered again, here (G3).
const ACQUIRE: &str = "WITH acquired AS ( \
       UPDATE instances SET owner = $1, lease_expires_at = $3, epoch = epoch + 1, \
         status = 'running' \
       WHERE id = ANY($4) AND status IN ('running', 'dehydrated') \
         AND (owner IS NULL OR owner = $1 OR lease_expires_at < $2) \
       RETURNING id, orchestration, version, status, state, engine_state, epoch, history_seq, \
         parent_id), \
     messages_released AS ( \
       UPDATE messages SET locked_by = NULL \
       WHERE instance_id IN (SELECT id FROM acquired) AND status = 'routed' AND locked_by <> $1), \
     timers_released AS ( \
       UPDATE timers SET locked_by = NULL \
       WHERE instance_id IN (SELECT id FROM acquired) AND locked_by <> $1) \
     SELECT * FROM acquired";

/// [`MessageBox::acquire`](crate::store::MessageBox::acquire) on PostgreSQL: one statement, on
/// the soft connection. An instance whose row cannot be read is suspended after it.
pub(super) async fn acquire(
    store: &PostgresStore,
    host: &str,
    ids: &[Uuid],
    now: DateTime<Utc>,
    lease_until: DateTime<Utc>,
) -> StoreResult<Vec<InstanceRecord>> {
    Backend::learn_lease(store, now, lease_until);
    let mut conn = store.soft_connection().await?;
    let rows = sqlx::query(ACQUIRE)
        .bind(host)
        .bind(now)
        .bind(lease_until)
        .bind(ids)
        .fetch_all(&mut *conn)
        .await
        .map_err(|e| map_err("acquire", e));
    conn.ended(&rows);
    drop(conn);
    store.acquired_committed(&rows?, now).await
}

/// [`MessageBox::unlock`](crate::store::MessageBox::unlock) on PostgreSQL.
pub(super) async fn unlock(
    store: &PostgresStore,
    host: &str,
    ids: &[Uuid],
    failed: &[i64],
) -> StoreResult<()> {
    let mut tx = store.write().await?;
    sqlx::query(
        "UPDATE messages SET locked_by = NULL, \
           delivery_count = CASE WHEN seq = ANY($3) THEN delivery_count ELSE GREATEST(delivery_count - 1, 0) END \
         WHERE instance_id = ANY($1) AND locked_by = $2 AND status = 'routed'",
    )
    .bind(ids)
    .bind(host)
    .bind(failed)
    .execute(&mut *tx)
    .await
    .map_err(|e| map_err("unlock", e))?;
    sqlx::query(
        "UPDATE timers SET locked_by = NULL WHERE instance_id = ANY($1) AND locked_by = $2",
    )
    .bind(ids)
    .bind(host)
    .execute(&mut *tx)
    .await
    .map_err(|e| map_err("unlock", e))?;
    commit(tx).await
}
