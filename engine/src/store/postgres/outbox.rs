//! The outbox the send ports deliver: claiming sends (and the head of an ordered port), renewing
//! their locks, recording how deliveries ended, and dead-lettering sends.

use chrono::{DateTime, Utc};
use sqlx::postgres::PgRow;
use uuid::Uuid;

use super::connect::commit;
use super::routing::publish_one;
use super::{col, map_err, PostgresStore, Tx};
use crate::store::common::Outbox;
use crate::store::{MessageKind, NewMessage, OutboxRow, StoreResult};

/// Dead-letters a claimed outbox row that cannot be read: a copy goes to `dead_letters` with
/// the reason, the row is marked `dead`, and its instance is told (`Event::SendFailed`).
async fn bury_send(tx: &mut Tx, row: &PgRow, why: &str, now: DateTime<Utc>) -> StoreResult<()> {
    let id: String = col(row, "id")?;
    let reason = format!("send {id} cannot be read: {why}");
    tracing::error!(send.id = %id, error = %reason, "a send cannot be read; dead-lettered");
    sqlx::query(
        "INSERT INTO dead_letters (id, instance_id, port, message_type, body, reason, attempts, dead_at) \
         SELECT id, instance_id, port, message_type, body, $2, GREATEST(attempts, 0), $3 \
         FROM outbox WHERE id = $1 \
         ON CONFLICT (id) DO UPDATE SET reason = excluded.reason, dead_at = excluded.dead_at",
    )
    .bind(&id)
    .bind(&reason)
    .bind(now)
    .execute(&mut **tx)
    .await
    .map_err(|e| map_err("bury send", e))?;
    sqlx::query(
        "UPDATE outbox SET status = 'dead', last_error = $2, locked_by = NULL, locked_until = NULL \
         WHERE id = $1",
    )
    .bind(&id)
    .bind(&reason)
    .execute(&mut **tx)
    .await
    .map_err(|e| map_err("bury send", e))?;
    let instance: Uuid = col(row, "instance_id")?;
    let message_type: String = col(row, "message_type")?;
    let msg = NewMessage::to_instance(
        format!("{id}:failed"),
        format!("{message_type}.failed"),
        MessageKind::SendFailed,
        serde_json::json!({ "message_id": id, "error": reason }),
        instance,
    );
    publish_one(tx, &msg, now).await?;
    Ok(())
}

/// [`MessageBox::claim_outbox`](crate::store::MessageBox::claim_outbox) on PostgreSQL.
pub(super) async fn claim_outbox(
    store: &PostgresStore,
    host: &str,
    now: DateTime<Utc>,
    lock_until: DateTime<Utc>,
    limit: u32,
    ordered: &[String],
) -> StoreResult<Vec<OutboxRow>> {
    let mut tx = store.write().await?;
    let rows = sqlx::query(
        "UPDATE outbox SET locked_by = $1, locked_until = $3 WHERE id IN ( \
           SELECT o.id FROM outbox o WHERE o.status = 'pending' AND o.next_attempt_at <= $2 \
             AND (o.locked_until IS NULL OR o.locked_until < $2 OR (o.locked_by <> $1 AND NOT EXISTS ( \
               SELECT 1 FROM hosts h WHERE h.id = o.locked_by AND h.stopped_at IS NULL \
                 AND h.heartbeat_at >= $5))) \
             AND NOT (o.port = ANY($6)) \
           ORDER BY o.next_attempt_at LIMIT $4 \
           FOR UPDATE OF o SKIP LOCKED) \
         RETURNING id, instance_id, port, message_type, body, expects_reply, attempts",
    )
    .bind(host)
    .bind(now)
    .bind(lock_until)
    .bind(i64::from(limit))
    .bind(store.host_cutoff(now))
    .bind(ordered)
    .fetch_all(&mut *tx)
    .await
    .map_err(|e| map_err("claim outbox", e))?;
    let mut out = Vec::with_capacity(rows.len());
    for row in &rows {
        match <PostgresStore as Outbox>::outbox_row(row) {
            Ok(send) => out.push(send),
            // Dead-lettered in the claim's transaction: never claimed again, never a stop
            // for the sends beside it.
            Err(e) => bury_send(&mut tx, row, &e.to_string(), now).await?,
        }
    }
    commit(tx).await?;
    Ok(out)
}

/// [`MessageBox::claim_ordered`](crate::store::MessageBox::claim_ordered) on PostgreSQL.
pub(super) async fn claim_ordered(
    store: &PostgresStore,
    host: &str,
    port: &str,
    now: DateTime<Utc>,
    lock_until: DateTime<Utc>,
) -> StoreResult<Option<OutboxRow>> {
    let mut tx = store.write().await?;
    let head = sqlx::query(
        "SELECT o.id, o.instance_id, o.port, o.message_type, o.body, o.expects_reply, o.attempts, \
         o.status, o.next_attempt_at, o.locked_by, o.locked_until, EXISTS (SELECT 1 FROM hosts h \
           WHERE h.id = o.locked_by AND h.stopped_at IS NULL AND h.heartbeat_at >= $2) AS holder_alive \
         FROM outbox o WHERE o.port = $1 AND o.status IN ('pending', 'held', 'give_up') \
         ORDER BY o.seq LIMIT 1 FOR UPDATE",
    )
    .bind(port)
    .bind(store.host_cutoff(now))
    .fetch_optional(&mut *tx)
    .await
    .map_err(|e| map_err("claim ordered", e))?;
    let Some(head) = head else { return Ok(None) };
    let status: String = col(&head, "status")?;
    let due = col::<DateTime<Utc>>(&head, "next_attempt_at")? <= now;
    let locked_by: Option<String> = col(&head, "locked_by")?;
    let locked_until: Option<DateTime<Utc>> = col(&head, "locked_until")?;
    let alive: bool = col(&head, "holder_alive")?;
    let locked_elsewhere = locked_by.is_some_and(|by| by != host)
        && alive
        && locked_until.is_some_and(|until| until >= now);
    if status != "pending" || !due || locked_elsewhere {
        return Ok(None);
    }
    let row = <PostgresStore as Outbox>::outbox_row(&head)?;
    sqlx::query("UPDATE outbox SET locked_by = $2, locked_until = $3 WHERE id = $1")
        .bind(&row.id)
        .bind(host)
        .bind(lock_until)
        .execute(&mut *tx)
        .await
        .map_err(|e| map_err("claim ordered", e))?;
    commit(tx).await?;
    Ok(Some(row))
}
