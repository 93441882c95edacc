//! The send side: claiming outbox rows for the send ports (an ordered port's head alone),
//! renewing their locks while deliveries run, recording what became of each delivery, and moving
//! a send that will not be delivered to the dead letters.

use chrono::{DateTime, Utc};
use sqlx::sqlite::SqliteRow;

use super::routing::publish_one;
use super::{as_text, col, col_ts, col_ts_opt, col_uuid, commit, map_err, ts, SqliteStore, Tx};
use crate::store::common::Outbox;
use crate::store::{MessageKind, NewMessage, OutboxRow, StoreResult};

/// Dead-letters a claimed outbox row that cannot be read: a copy goes to `dead_letters` with
/// the reason (its columns as text, whatever they hold), the row is marked `dead`, and its
/// instance, if the row names one that can be read, is told (`Event::SendFailed`).
async fn bury_send(tx: &mut Tx, row: &SqliteRow, why: &str, now: DateTime<Utc>) -> StoreResult<()> {
    let Ok(id) = col::<String>(row, "id") else {
        tracing::error!(error = %why, "an outbox row cannot be read, nor its id; left locked");
        return Ok(());
    };
    let reason = format!("send {id} cannot be read: {why}");
    tracing::error!(send.id = %id, error = %reason, "a send cannot be read; dead-lettered");
    sqlx::query(&format!(
        "INSERT INTO dead_letters (id, instance_id, port, message_type, body, reason, attempts, dead_at) \
         SELECT id, CASE typeof(instance_id) WHEN 'text' THEN instance_id END, {}, {}, {}, $2, \
           CASE typeof(attempts) WHEN 'integer' THEN attempts ELSE 0 END, $3 FROM outbox WHERE id = $1 \
         ON CONFLICT (id) DO UPDATE SET reason = excluded.reason, dead_at = excluded.dead_at",
        as_text("port"),
        as_text("message_type"),
        as_text("body"),
    ))
    .bind(&id)
    .bind(&reason)
    .bind(ts(now))
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
    if let (Ok(instance), Ok(message_type)) = (
        col_uuid(row, "instance_id"),
        col::<String>(row, "message_type"),
    ) {
        let msg = NewMessage::to_instance(
            format!("{id}:failed"),
            format!("{message_type}.failed"),
            MessageKind::SendFailed,
            serde_json::json!({ "message_id": id, "error": reason }),
            instance,
        );
        publish_one(tx, &msg, now).await?;
    }
    Ok(())
}

pub(super) async fn claim_outbox(
    store: &SqliteStore,
    host: &str,
    now: DateTime<Utc>,
    lock_until: DateTime<Utc>,
    limit: u32,
    ordered: &[String],
) -> StoreResult<Vec<OutboxRow>> {
    let mut tx = store.write().await?;
    let rows = sqlx::query(
        "UPDATE outbox SET locked_by = $1, locked_until = $3 WHERE id IN ( \
           SELECT id FROM outbox WHERE status = 'pending' AND next_attempt_at <= $2 \
             AND (locked_until IS NULL OR locked_until < $2) \
             AND port NOT IN (SELECT value FROM json_each($5)) \
           ORDER BY next_attempt_at LIMIT $4) \
         RETURNING id, instance_id, port, message_type, body, expects_reply, attempts",
    )
    .bind(host)
    .bind(ts(now))
    .bind(ts(lock_until))
    .bind(i64::from(limit))
    .bind(serde_json::json!(ordered).to_string())
    .fetch_all(&mut *tx)
    .await
    .map_err(|e| map_err("claim outbox", e))?;
    let mut out = Vec::with_capacity(rows.len());
    let mut unreadable = Vec::new();
    for row in &rows {
        match <SqliteStore as Outbox>::outbox_row(row) {
            Ok(send) => out.push(send),
            Err(e) => unreadable.push((row, e.to_string())),
        }
    }
    if !unreadable.is_empty() {
        // Dead-lettered in the claim's transaction: never claimed again, never a stop for
        // the sends beside them.
        for (row, why) in unreadable {
            bury_send(&mut tx, row, &why, now).await?;
        }
    }
    commit(tx).await?;
    Ok(out)
}

pub(super) async fn claim_ordered(
    store: &SqliteStore,
    host: &str,
    port: &str,
    now: DateTime<Utc>,
    lock_until: DateTime<Utc>,
) -> StoreResult<Option<OutboxRow>> {
    let mut tx = store.write().await?;
    let head = sqlx::query(
        "SELECT id, instance_id, port, message_type, body, expects_reply, attempts, status, \
         next_attempt_at, locked_by, locked_until FROM outbox \
         WHERE port = $1 AND status IN ('pending', 'held', 'give_up') ORDER BY seq LIMIT 1",
    )
    .bind(port)
    .fetch_optional(&mut *tx)
    .await
    .map_err(|e| map_err("claim ordered", e))?;
    let Some(head) = head else { return Ok(None) };
    let status: String = col(&head, "status")?;
    let due = col_ts(&head, "next_attempt_at")? <= now;
    let locked_by: Option<String> = col(&head, "locked_by")?;
    let locked_until = col_ts_opt(&head, "locked_until")?;
    let locked_elsewhere =
        locked_by.is_some_and(|by| by != host) && locked_until.is_some_and(|until| until >= now);
    if status != "pending" || !due || locked_elsewhere {
        return Ok(None);
    }
    let row = <SqliteStore as Outbox>::outbox_row(&head)?;
    sqlx::query("UPDATE outbox SET locked_by = $2, locked_until = $3 WHERE id = $1")
        .bind(&row.id)
        .bind(host)
        .bind(ts(lock_until))
        .execute(&mut *tx)
        .await
        .map_err(|e| map_err("claim ordered", e))?;
    commit(tx).await?;
    Ok(Some(row))
}
