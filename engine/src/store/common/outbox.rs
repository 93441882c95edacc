//! The send side, once for both backends: an outbox row read, a send moved to the dead letters,
//! locks renewed while deliveries run, and what became of each delivery. Claims stay with each
//! backend: PostgreSQL skips rows other hosts lock, and SQLite dead-letters rows of any shape.

use chrono::{DateTime, Utc};
use sqlx::{Database, Encode, Executor, FromRow, IntoArguments, Type};

use super::{Backend, Bind, RowOf};
use crate::store::{DeliveryOutcome, MessageKind, NewMessage, OutboxRow, StoreResult};

/// The send side over a [`Backend`].
pub(in crate::store) trait Outbox: Backend
where
    for<'c> &'c mut <Self::Db as Database>::Connection: Executor<'c, Database = Self::Db>,
    for<'q> <Self::Db as Database>::Arguments<'q>: IntoArguments<'q, Self::Db>,
    for<'q> &'q str: Encode<'q, Self::Db> + Type<Self::Db>,
    for<'q> Option<&'q str>: Encode<'q, Self::Db> + Type<Self::Db>,
    String: Bind<Self::Db>,
    i64: Bind<Self::Db>,
    (i64,): for<'r> FromRow<'r, RowOf<Self>>,
{
    /// An outbox row as the dispatcher sees it.
    fn outbox_row(row: &RowOf<Self>) -> StoreResult<OutboxRow> {
        Ok(OutboxRow {
            id: Self::col_text(row, "id")?,
            instance_id: Self::col_uuid(row, "instance_id")?,
            port: Self::col_text(row, "port")?,
            message_type: Self::col_text(row, "message_type")?,
            body: Self::col_json(row, "body")?,
            expects_reply: Self::col_bool(row, "expects_reply")?,
            attempts: Self::col_u32(row, "outbox", "attempts")?,
        })
    }

    /// Moves a send (already marked `dead` in the outbox) to `dead_letters` and tells its
    /// instance.
    async fn dead_letter_send(
        tx: &mut Self::Tx,
        row: &OutboxRow,
        error: &str,
        attempts: u32,
        now: DateTime<Utc>,
    ) -> StoreResult<()> {
        sqlx::query(
            "INSERT INTO dead_letters (id, instance_id, port, message_type, body, reason, attempts, dead_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8) \
             ON CONFLICT (id) DO UPDATE SET reason = excluded.reason, attempts = excluded.attempts, \
             dead_at = excluded.dead_at",
        )
        .bind(row.id.as_str())
        .bind(Self::uuid(row.instance_id))
        .bind(row.port.as_str())
        .bind(row.message_type.as_str())
        .bind(row.body.to_string())
        .bind(error)
        .bind(Self::count(attempts))
        .bind(Self::time(now))
        .execute(&mut **tx)
        .await
        .map_err(|e| Self::map_err("dead letter send", e))?;
        let msg = NewMessage::to_instance(
            format!("{}:failed", row.id),
            format!("{}.failed", row.message_type),
            MessageKind::SendFailed,
            serde_json::json!({ "message_id": row.id, "port": row.port, "error": error }),
            row.instance_id,
        );
        Self::publish_one(tx, &msg, now).await?;
        Self::notify(tx).await
    }

    /// [`MessageBox::renew_outbox`](crate::store::MessageBox::renew_outbox).
    async fn renew_outbox(
        &self,
        host: &str,
        ids: &[String],
        lock_until: DateTime<Utc>,
    ) -> StoreResult<()> {
        let mut tx = self.begin().await?;
        sqlx::query(&format!(
            "UPDATE outbox SET locked_until = $2 WHERE locked_by = $1 AND status = 'pending' \
             AND id {}",
            Self::IN_LIST_3
        ))
        .bind(host)
        .bind(Self::time(lock_until))
        .bind(Self::list(ids))
        .execute(&mut *tx)
        .await
        .map_err(|e| Self::map_err("renew outbox", e))?;
        Self::commit(tx).await
    }

    /// [`MessageBox::record_deliveries`](crate::store::MessageBox::record_deliveries).
    async fn record_deliveries(
        &self,
        outcomes: Vec<DeliveryOutcome>,
        now: DateTime<Utc>,
    ) -> StoreResult<()> {
        let e = |e| Self::map_err("record deliveries", e);
        let mut tx = self.begin().await?;
        for outcome in &outcomes {
            match outcome {
                DeliveryOutcome::Delivered {
                    row,
                    reply,
                    via_backup,
                } => {
                    let done = sqlx::query(
                        "UPDATE outbox SET status = 'delivered', attempts = attempts + 1, delivered_at = $2, \
                         last_attempt_at = $2, delivered_via = $3, locked_by = NULL, locked_until = NULL, \
                         last_error = NULL WHERE id = $1 AND status IN ('pending', 'held', 'give_up')",
                    )
                    .bind(row.id.as_str())
                    .bind(Self::time(now))
                    .bind(if *via_backup { "backup" } else { "primary" })
                    .execute(&mut *tx)
                    .await
                    .map_err(e)?;
                    if let (Some(reply), 1) = (reply, Self::rows_affected(&done)) {
                        let mut msg = NewMessage::to_instance(
                            row.reply_id(),
                            format!("{}.reply", row.message_type),
                            MessageKind::Reply,
                            reply.clone(),
                            row.instance_id,
                        );
                        msg.properties.insert("request_id".into(), row.id.clone());
                        msg.properties.insert("port".into(), row.port.clone());
                        Self::publish_one(&mut tx, &msg, now).await?;
                        Self::notify(&mut tx).await?;
                    }
                }
                DeliveryOutcome::Retry {
                    row,
                    error,
                    retry_at,
                } => {
                    sqlx::query(
                        "UPDATE outbox SET attempts = attempts + 1, next_attempt_at = $2, last_error = $3, \
                         last_attempt_at = $4, locked_by = NULL, locked_until = NULL \
                         WHERE id = $1 AND status = 'pending'",
                    )
                    .bind(row.id.as_str())
                    .bind(Self::time(*retry_at))
                    .bind(error.as_str())
                    .bind(Self::time(now))
                    .execute(&mut *tx)
                    .await
                    .map_err(e)?;
                }
                DeliveryOutcome::Held { row, error } => {
                    sqlx::query(
                        "UPDATE outbox SET status = 'held', attempts = attempts + 1, last_error = $2, \
                         last_attempt_at = $3, locked_by = NULL, locked_until = NULL \
                         WHERE id = $1 AND status = 'pending'",
                    )
                    .bind(row.id.as_str())
                    .bind(error.as_str())
                    .bind(Self::time(now))
                    .execute(&mut *tx)
                    .await
                    .map_err(e)?;
                }
                DeliveryOutcome::Dead { row, error } => {
                    let done = sqlx::query(
                        "UPDATE outbox SET status = 'dead', attempts = attempts + 1, last_error = $2, \
                         last_attempt_at = $3, locked_by = NULL, locked_until = NULL \
                         WHERE id = $1 AND status = 'pending'",
                    )
                    .bind(row.id.as_str())
                    .bind(error.as_str())
                    .bind(Self::time(now))
                    .execute(&mut *tx)
                    .await
                    .map_err(e)?;
                    if Self::rows_affected(&done) == 1 {
                        Self::dead_letter_send(&mut tx, row, error, row.attempts + 1, now).await?;
                    }
                }
            }
        }
        Self::commit(tx).await
    }
}
