//! The send side, once for both backends: an outbox row read (one that cannot be read is
//! dead-lettered), an ordered port's head taken, a send moved to the dead letters, locks renewed
//! while deliveries run, and what became of each delivery. The claim statements stay with each
//! backend: PostgreSQL skips rows other hosts lock and knows which hosts are gone.

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

    /// [`MessageBox::claim_outbox`](crate::store::MessageBox::claim_outbox) with the backend's
    /// claim `sql`: `$1` the host, `$2` now, `$3` the lock's end, `$4` the limit, `$5` the
    /// ordered ports (claimed by [`Outbox::claim_ordered_by`] instead), and `$6` the
    /// [`claim_cutoff`](Backend::claim_cutoff) where the backend has one.
    async fn claim_outbox_by(
        &self,
        sql: &str,
        host: &str,
        now: DateTime<Utc>,
        lock_until: DateTime<Utc>,
        limit: u32,
        ordered: &[String],
    ) -> StoreResult<Vec<OutboxRow>> {
        let mut tx = self.begin_soft().await?;
        let mut query = sqlx::query(sql)
            .bind(host)
            .bind(Self::time(now))
            .bind(Self::time(lock_until))
            .bind(i64::from(limit))
            .bind(Self::list(ordered));
        if let Some(cutoff) = self.claim_cutoff(now) {
            query = query.bind(cutoff);
        }
        let rows = query
            .fetch_all(&mut *tx)
            .await
            .map_err(|e| Self::map_err("claim outbox", e))?;
        let out = Self::claimed_sends(&mut tx, &rows, now).await?;
        Self::commit(tx).await?;
        Ok(out)
    }

    /// [`MessageBox::claim_ordered`](crate::store::MessageBox::claim_ordered) with the backend's
    /// `sql` that reads a port's head (`$1` the port, `$2` the
    /// [`claim_cutoff`](Backend::claim_cutoff) where the backend has one), locked for the
    /// transaction where the database locks rows.
    async fn claim_ordered_by(
        &self,
        sql: &str,
        host: &str,
        port: &str,
        now: DateTime<Utc>,
        lock_until: DateTime<Utc>,
    ) -> StoreResult<Option<OutboxRow>> {
        let mut tx = self.begin_soft().await?;
        let mut query = sqlx::query(sql).bind(port);
        if let Some(cutoff) = self.claim_cutoff(now) {
            query = query.bind(cutoff);
        }
        let head = query
            .fetch_optional(&mut *tx)
            .await
            .map_err(|e| Self::map_err("claim ordered", e))?;
        Self::take_head(tx, head, host, now, lock_until).await
    }

    /// The sends a claim's `rows` hold. A row that cannot be read is dead-lettered in the
    /// claim's transaction: never claimed again, never a stop for the sends beside it.
    async fn claimed_sends(
        tx: &mut Self::Tx,
        rows: &[RowOf<Self>],
        now: DateTime<Utc>,
    ) -> StoreResult<Vec<OutboxRow>> {
        let mut out = Vec::with_capacity(rows.len());
        for row in rows {
            match Self::outbox_row(row) {
                Ok(send) => out.push(send),
                Err(e) => Self::bury_send(tx, row, &e.to_string(), now).await?,
            }
        }
        Ok(out)
    }

    /// Dead-letters a claimed outbox row that cannot be read: a copy goes to `dead_letters` with
    /// the reason (its columns as text, whatever they hold), the row is marked `dead`, and its
    /// instance, if the row names one that can be read, is told (`Event::SendFailed`).
    async fn bury_send(
        tx: &mut Self::Tx,
        row: &RowOf<Self>,
        why: &str,
        now: DateTime<Utc>,
    ) -> StoreResult<()> {
        let e = |e| Self::map_err("bury send", e);
        let Ok(id) = Self::col_text(row, "id") else {
            tracing::error!(error = %why, "an outbox row cannot be read, nor its id; left locked");
            return Ok(());
        };
        let reason = format!("send {id} cannot be read: {why}");
        tracing::error!(send.id = %id, error = %reason, "a send cannot be read; dead-lettered");
        sqlx::query(&format!(
            "INSERT INTO dead_letters (id, instance_id, port, message_type, body, reason, attempts, dead_at) \
             SELECT id, {}, {}, {}, {}, $2, {}, $3 FROM outbox WHERE id = $1 \
             ON CONFLICT (id) DO UPDATE SET reason = excluded.reason, dead_at = excluded.dead_at",
            Self::uuid_or_null("instance_id"),
            Self::as_text("port"),
            Self::as_text("message_type"),
            Self::as_text("body"),
            Self::count_or_zero("attempts"),
        ))
        .bind(id.as_str())
        .bind(reason.as_str())
        .bind(Self::time(now))
        .execute(&mut **tx)
        .await
        .map_err(e)?;
        sqlx::query(
            "UPDATE outbox SET status = 'dead', last_error = $2, locked_by = NULL, locked_until = NULL \
             WHERE id = $1",
        )
        .bind(id.as_str())
        .bind(reason.as_str())
        .execute(&mut **tx)
        .await
        .map_err(e)?;
        if let (Ok(instance), Ok(message_type)) = (
            Self::col_uuid(row, "instance_id").and_then(|i| {
                // A port subscription's send (the nil id) has no instance to tell.
                if i.is_nil() {
                    Err(crate::store::StoreError::Corrupt("no instance".into()))
                } else {
                    Ok(i)
                }
            }),
            Self::col_text(row, "message_type"),
        ) {
            let msg = NewMessage::to_instance(
                format!("{id}:failed"),
                format!("{message_type}.failed"),
                MessageKind::SendFailed,
                serde_json::json!({ "message_id": id, "error": reason }),
                instance,
            );
            Self::publish_one(tx, &msg, now).await?;
        }
        Ok(())
    }

    /// Takes an ordered port's `head` (its oldest open send, read with `holder_alive`, whether
    /// the host holding it beats) for `host`, if it is pending, due and not locked by another
    /// live host; commits `tx` either way.
    async fn take_head(
        mut tx: Self::Tx,
        head: Option<RowOf<Self>>,
        host: &str,
        now: DateTime<Utc>,
        lock_until: DateTime<Utc>,
    ) -> StoreResult<Option<OutboxRow>> {
        let Some(head) = head else {
            Self::commit(tx).await?;
            return Ok(None);
        };
        let status = Self::col_text(&head, "status")?;
        let due = Self::col_time(&head, "next_attempt_at")? <= now;
        let locked_by = Self::col_text_opt(&head, "locked_by")?;
        let locked_until = Self::col_time_opt(&head, "locked_until")?;
        let locked_elsewhere = locked_by.is_some_and(|by| by != host)
            && Self::col_bool(&head, "holder_alive")?
            && locked_until.is_some_and(|until| until >= now);
        if status != "pending" || !due || locked_elsewhere {
            Self::commit(tx).await?;
            return Ok(None);
        }
        let row = Self::outbox_row(&head)?;
        sqlx::query("UPDATE outbox SET locked_by = $2, locked_until = $3 WHERE id = $1")
            .bind(row.id.as_str())
            .bind(host)
            .bind(Self::time(lock_until))
            .execute(&mut *tx)
            .await
            .map_err(|e| Self::map_err("claim ordered", e))?;
        Self::commit(tx).await?;
        Ok(Some(row))
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
        // A port subscription's send (the nil id) has no instance to tell.
        if !row.instance_id.is_nil() {
            let msg = NewMessage::to_instance(
                format!("{}:failed", row.id),
                format!("{}.failed", row.message_type),
                MessageKind::SendFailed,
                serde_json::json!({ "message_id": row.id, "port": row.port, "error": error }),
                row.instance_id,
            );
            Self::publish_one(tx, &msg, now).await?;
        }
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

    /// Ends the attempts of pending send `row` with `status` (`held` or `dead`) and `error`;
    /// how many rows changed (none when it is no longer pending).
    async fn stop_sending(
        tx: &mut Self::Tx,
        row: &OutboxRow,
        status: &'static str,
        error: &str,
        now: DateTime<Utc>,
    ) -> StoreResult<u64> {
        let done = sqlx::query(&format!(
            "UPDATE outbox SET status = '{status}', attempts = attempts + 1, last_error = $2, \
             last_attempt_at = $3, locked_by = NULL, locked_until = NULL \
             WHERE id = $1 AND status = 'pending'"
        ))
        .bind(row.id.as_str())
        .bind(error)
        .bind(Self::time(now))
        .execute(&mut **tx)
        .await
        .map_err(|e| Self::map_err("record deliveries", e))?;
        Ok(Self::rows_affected(&done))
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
                    Self::stop_sending(&mut tx, row, "held", error, now).await?;
                }
                DeliveryOutcome::Dead { row, error } => {
                    if Self::stop_sending(&mut tx, row, "dead", error, now).await? == 1 {
                        Self::dead_letter_send(&mut tx, row, error, row.attempts + 1, now).await?;
                    }
                }
            }
        }
        Self::commit(tx).await
    }
}
