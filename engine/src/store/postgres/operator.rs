//! The operators' verbs ([`OperatorVerbs`]): control an instance (also for the `control` rows
//! [`Maintenance::apply_controls`](crate::store::Maintenance::apply_controls) carries out), give
//! up or resume a send, dead letters, list and show.

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use sqlx::postgres::PgRow;
use uuid::Uuid;

use super::batch;
use super::claims::{NEXT_TIMER, READY_MESSAGES};
use super::connect::commit;
use super::listen::notify;
use super::outbox::{dead_letter_send, outbox_row};
use super::routing::publish_one;
use super::{col, col_word, map_err, parse_json, uint, PostgresStore, Tx};
use crate::store::*;

async fn next_history_seq(tx: &mut Tx, id: Uuid) -> StoreResult<i64> {
    let seq: i64 = sqlx::query_scalar("SELECT history_seq FROM instances WHERE id = $1")
        .bind(id)
        .fetch_one(&mut **tx)
        .await
        .map_err(|e| map_err("next history seq", e))?;
    Ok(seq + 1)
}

async fn insert_history(tx: &mut Tx, id: Uuid, e: HistoryEntry<'_>) -> StoreResult<()> {
    // The epoch is the instance's current one: the writer's, checked by the fenced update
    // before it, or the new one an operator action just took.
    sqlx::query(
        "INSERT INTO history (instance_id, seq, reason, step, status, at, host, epoch, detail) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, (SELECT epoch FROM instances WHERE id = $1), $8)",
    )
    .bind(id)
    .bind(e.seq)
    .bind(e.reason.as_str())
    .bind(e.step)
    .bind(e.status.as_str())
    .bind(e.at)
    .bind(e.host)
    .bind(e.detail)
    .execute(&mut **tx)
    .await
    .map_err(|e| map_err("insert history", e))?;
    Ok(())
}

/// Carries out an operator's action inside `tx`. Bumps the epoch so that a host holding the
/// instance in memory is fenced and drops it.
pub(super) async fn control_in(
    tx: &mut Tx,
    id: Uuid,
    action: &ControlAction,
    now: DateTime<Utc>,
) -> StoreResult<InstanceStatus> {
    let row =
            sqlx::query("SELECT status, step, parent_id, resumable, last_error FROM instances WHERE id = $1 FOR UPDATE")
                .bind(id)
                .fetch_optional(&mut **tx)
                .await
                .map_err(|e| map_err("control in", e))?
                .ok_or(StoreError::NoSuchInstance(id))?;
    let status: InstanceStatus = col_word(&row, "status")?;
    let step: String = col(&row, "step")?;
    let parent: Option<Uuid> = col(&row, "parent_id")?;
    action.check(
        id,
        status,
        col::<bool>(&row, "resumable")?,
        col::<Option<String>>(&row, "last_error")?,
    )?;
    let new_status = match &action {
        ControlAction::Suspend { reason } => {
            let seq = next_history_seq(tx, id).await?;
            sqlx::query(
                    "UPDATE instances SET status = 'suspended', last_error = $2, epoch = epoch + 1, \
                     owner = NULL, lease_expires_at = NULL, updated_at = $3, history_seq = $4 WHERE id = $1",
                )
                .bind(id)
                .bind(format!("suspended by operator: {reason}"))
                .bind(now)
                .bind(seq)
                .execute(&mut **tx)
                .await
                .map_err(|e| map_err("control in", e))?;
            insert_history(
                tx,
                id,
                HistoryEntry {
                    seq,
                    reason: Reason::Suspend,
                    step: &step,
                    status: InstanceStatus::Suspended,
                    at: now,
                    host: OPERATOR,
                    detail: Some(reason),
                },
            )
            .await?;
            InstanceStatus::Suspended
        }
        ControlAction::Resume { .. } => {
            sqlx::query(
                    "UPDATE instances SET status = 'dehydrated', last_error = NULL, epoch = epoch + 1, \
                     owner = NULL, lease_expires_at = NULL, updated_at = $2, resumable = TRUE WHERE id = $1",
                )
                .bind(id)
                .bind(now)
                .execute(&mut **tx)
                .await
                .map_err(|e| map_err("control in", e))?;
            // Its messages are delivered again from scratch: poison counting starts over.
            sqlx::query("UPDATE messages SET delivery_count = 0 WHERE instance_id = $1 AND status = 'routed'")
                    .bind(id)
                    .execute(&mut **tx)
                    .await
                    .map_err(|e| map_err("control in", e))?;
            notify(tx).await?;
            InstanceStatus::Dehydrated
        }
        ControlAction::Terminate { reason } => {
            let seq = next_history_seq(tx, id).await?;
            sqlx::query(
                    "UPDATE instances SET status = 'terminated', last_error = $2, epoch = epoch + 1, \
                     owner = NULL, lease_expires_at = NULL, waiting_for = '', next_timer_at = NULL, \
                     updated_at = $3, history_seq = $4 WHERE id = $1",
                )
                .bind(id)
                .bind(format!("terminated by operator: {reason}"))
                .bind(now)
                .bind(seq)
                .execute(&mut **tx)
                .await
                .map_err(|e| map_err("control in", e))?;
            for sql in [
                "DELETE FROM subscriptions WHERE instance_id = $1",
                "DELETE FROM timers WHERE instance_id = $1",
            ] {
                sqlx::query(sql)
                    .bind(id)
                    .execute(&mut **tx)
                    .await
                    .map_err(|e| map_err("control in", e))?;
            }
            insert_history(
                tx,
                id,
                HistoryEntry {
                    seq,
                    reason: Reason::Complete,
                    step: &step,
                    status: InstanceStatus::Terminated,
                    at: now,
                    host: OPERATOR,
                    detail: Some(reason),
                },
            )
            .await?;
            if let Some(parent) = parent {
                let msg = NewMessage::to_instance(
                    format!("{id}:ended"),
                    "child.failed",
                    MessageKind::ChildFailed,
                    serde_json::json!({ "child": id, "error": format!("terminated: {reason}") }),
                    parent,
                );
                publish_one(tx, &msg, now).await?;
                notify(tx).await?;
            }
            InstanceStatus::Terminated
        }
    };
    batch::unlock_instances(tx, &[id], &[]).await?;
    Ok(new_status)
}

/// The `history.host` of points written by an operator's action (suspend, terminate).
const OPERATOR: &str = "operator";

fn summary_from_row(row: &PgRow) -> StoreResult<InstanceSummary> {
    Ok(InstanceSummary {
        id: col(row, "id")?,
        orchestration: col(row, "orchestration")?,
        version: uint(col(row, "version")?, "instances.version")?,
        status: col_word(row, "status")?,
        step: col(row, "step")?,
        waiting_for: col(row, "waiting_for")?,
        updated_at: col(row, "updated_at")?,
        last_error: col(row, "last_error")?,
    })
}

const SUMMARY_COLUMNS: &str =
    "id, orchestration, version, status, step, waiting_for, updated_at, last_error";

fn dead_letter_row(row: &PgRow) -> StoreResult<DeadLetter> {
    Ok(DeadLetter {
        id: col(row, "id")?,
        instance_id: col(row, "instance_id")?,
        port: col(row, "port")?,
        message_type: col(row, "message_type")?,
        body: crate::store::dead_letter_body(&col::<String>(row, "body")?),
        reason: col(row, "reason")?,
        attempts: uint(col(row, "attempts")?, "dead_letters.attempts")?,
        dead_at: col(row, "dead_at")?,
    })
}

#[async_trait]
impl OperatorVerbs for PostgresStore {
    async fn control(
        &self,
        id: Uuid,
        action: ControlAction,
        now: DateTime<Utc>,
    ) -> StoreResult<InstanceStatus> {
        let mut tx = self.write().await?;
        let status = control_in(&mut tx, id, &action, now).await?;
        commit(tx).await?;
        Ok(status)
    }

    async fn give_up_sends(
        &self,
        ids: &[String],
        reason: &str,
        now: DateTime<Utc>,
    ) -> StoreResult<u64> {
        let mut tx = self.write().await?;
        sqlx::query(
            "UPDATE outbox SET status = 'give_up', last_error = $2, locked_by = NULL, locked_until = NULL \
             WHERE status IN ('pending', 'held') AND id = ANY($1)",
        )
        .bind(ids)
        .bind(reason)
        .execute(&mut *tx)
        .await
        .map_err(|e| map_err("give up sends", e))?;
        let rows = sqlx::query(
            "UPDATE outbox SET status = 'dead', locked_by = NULL, locked_until = NULL \
             WHERE status = 'give_up' \
             RETURNING id, instance_id, port, message_type, body, expects_reply, attempts, last_error",
        )
        .fetch_all(&mut *tx)
        .await
        .map_err(|e| map_err("give up sends", e))?;
        for r in &rows {
            let row = outbox_row(r)?;
            let why: Option<String> = col(r, "last_error")?;
            let why = why.unwrap_or_else(|| "dead-lettered by an operator".to_owned());
            let attempts = row.attempts;
            dead_letter_send(&mut tx, &row, &why, attempts, now).await?;
        }
        commit(tx).await?;
        Ok(rows.len() as u64)
    }

    async fn resume_send(&self, id: &str, now: DateTime<Utc>) -> StoreResult<bool> {
        let mut tx = self.write().await?;
        let done = sqlx::query(
            "UPDATE outbox SET status = 'pending', attempts = 0, next_attempt_at = $2, \
             locked_by = NULL, locked_until = NULL WHERE id = $1 AND status = 'held'",
        )
        .bind(id)
        .bind(now)
        .execute(&mut *tx)
        .await
        .map_err(|e| map_err("resume send", e))?
        .rows_affected();
        commit(tx).await?;
        Ok(done == 1)
    }

    async fn dead_letters(&self, limit: u32) -> StoreResult<Vec<DeadLetter>> {
        let rows = sqlx::query(
            "SELECT id, instance_id, port, message_type, body, reason, attempts, dead_at \
             FROM dead_letters ORDER BY dead_at DESC, id LIMIT $1",
        )
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await
        .map_err(|e| map_err("dead letters", e))?;
        Ok(crate::store::readable(
            rows.iter().map(dead_letter_row),
            "listing dead letters",
        ))
    }

    async fn dead_letter(&self, id: &str) -> StoreResult<Option<DeadLetter>> {
        let row = sqlx::query(
            "SELECT id, instance_id, port, message_type, body, reason, attempts, dead_at \
             FROM dead_letters WHERE id = $1",
        )
        .bind(id)
        .fetch_optional(&self.pool)
        .await
        .map_err(|e| map_err("dead letter", e))?;
        row.as_ref().map(dead_letter_row).transpose()
    }

    async fn resubmit_dead_letter(&self, id: &str, now: DateTime<Utc>) -> StoreResult<bool> {
        let mut tx = self.write().await?;
        let done = sqlx::query(
            "UPDATE outbox SET status = 'pending', attempts = 0, next_attempt_at = $2, \
             locked_by = NULL, locked_until = NULL, delivered_via = NULL \
             WHERE id = $1 AND status = 'dead'",
        )
        .bind(id)
        .bind(now)
        .execute(&mut *tx)
        .await
        .map_err(|e| map_err("resubmit dead letter", e))?
        .rows_affected();
        if done == 1 {
            sqlx::query("DELETE FROM dead_letters WHERE id = $1")
                .bind(id)
                .execute(&mut *tx)
                .await
                .map_err(|e| map_err("resubmit dead letter", e))?;
        }
        commit(tx).await?;
        Ok(done == 1)
    }

    async fn purge_dead_letters(
        &self,
        ids: &[String],
        before: Option<DateTime<Utc>>,
    ) -> StoreResult<u64> {
        let mut tx = self.write().await?;
        let query = if !ids.is_empty() {
            sqlx::query("DELETE FROM dead_letters WHERE id = ANY($1)").bind(ids)
        } else if let Some(before) = before {
            sqlx::query("DELETE FROM dead_letters WHERE dead_at < $1").bind(before)
        } else {
            sqlx::query("DELETE FROM dead_letters")
        };
        let done = query
            .execute(&mut *tx)
            .await
            .map_err(|e| map_err("purge dead letters", e))?
            .rows_affected();
        commit(tx).await?;
        Ok(done)
    }

    async fn list_instances(
        &self,
        status: Option<InstanceStatus>,
        limit: u32,
    ) -> StoreResult<Vec<InstanceSummary>> {
        let rows = sqlx::query(&format!(
            "SELECT {SUMMARY_COLUMNS} FROM instances WHERE ($1::text IS NULL OR status = $1) \
             ORDER BY updated_at DESC, id LIMIT $2"
        ))
        .bind(status.map(InstanceStatus::as_str))
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await
        .map_err(|e| map_err("list instances", e))?;
        Ok(crate::store::readable(
            rows.iter().map(summary_from_row),
            "listing instances",
        ))
    }

    async fn instance_summaries(&self, ids: &[Uuid]) -> StoreResult<Vec<InstanceSummary>> {
        let rows = sqlx::query(&format!(
            "SELECT {SUMMARY_COLUMNS} FROM instances WHERE id = ANY($1)"
        ))
        .bind(ids)
        .fetch_all(&self.pool)
        .await
        .map_err(|e| map_err("instance summaries", e))?;
        rows.iter().map(summary_from_row).collect()
    }

    async fn instance_detail(&self, id: Uuid) -> StoreResult<Option<InstanceDetail>> {
        let Some(row) = sqlx::query(&format!(
            "SELECT {SUMMARY_COLUMNS}, state, output, next_timer_at, created_at FROM instances WHERE id = $1"
        ))
        .bind(id)
        .fetch_optional(&self.pool)
        .await
        .map_err(|e| map_err("instance detail", e))?
        else {
            return Ok(None);
        };
        let history = sqlx::query(
            "SELECT seq, reason, step, status, at, detail FROM history WHERE instance_id = $1 ORDER BY seq",
        )
        .bind(id)
        .fetch_all(&self.pool)
        .await
        .map_err(|e| map_err("instance detail", e))?
        .iter()
        .map(|h| {
            Ok(HistoryRow {
                seq: col(h, "seq")?,
                reason: col_word(h, "reason")?,
                step: col(h, "step")?,
                status: col_word(h, "status")?,
                at: col(h, "at")?,
                detail: col(h, "detail")?,
            })
        })
        .collect::<StoreResult<Vec<_>>>()?;
        let (pending, zombies): (Vec<_>, Vec<_>) = sqlx::query(
            "SELECT id, message_type, status FROM messages \
             WHERE instance_id = $1 AND status IN ('routed', 'zombie') ORDER BY seq",
        )
        .bind(id)
        .fetch_all(&self.pool)
        .await
        .map_err(|e| map_err("instance detail", e))?
        .iter()
        .map(|m| {
            Ok((
                col::<String>(m, "id")?,
                col::<String>(m, "message_type")?,
                col::<String>(m, "status")?,
            ))
        })
        .collect::<StoreResult<Vec<_>>>()?
        .into_iter()
        .partition(|(_, _, status)| status == "routed");
        Ok(Some(InstanceDetail {
            summary: summary_from_row(&row)?,
            state: col(&row, "state")?,
            output: col::<Option<String>>(&row, "output")?
                .as_deref()
                .map(parse_json)
                .transpose()?,
            next_timer_at: col(&row, "next_timer_at")?,
            created_at: col(&row, "created_at")?,
            history,
            pending_messages: pending.into_iter().map(|(id, ty, _)| (id, ty)).collect(),
            zombies: zombies.into_iter().map(|(id, ty, _)| (id, ty)).collect(),
        }))
    }

    async fn activity(&self, now: DateTime<Utc>) -> StoreResult<Activity> {
        let mut activity = Activity::default();
        for row in sqlx::query("SELECT status, COUNT(*) AS n FROM instances GROUP BY status")
            .fetch_all(&self.pool)
            .await
            .map_err(|e| map_err("activity", e))?
        {
            activity
                .by_status
                .insert(col(&row, "status")?, col(&row, "n")?);
        }
        // Locks of hosts that are gone do not hide work: another host will take it over.
        activity.ready_messages = sqlx::query_scalar(&READY_MESSAGES)
            .bind(now)
            .bind(self.host_cutoff(now))
            .fetch_one(&self.pool)
            .await
            .map_err(|e| map_err("activity", e))?;
        activity.pending_sends =
            sqlx::query_scalar("SELECT COUNT(*) FROM outbox WHERE status = 'pending'")
                .fetch_one(&self.pool)
                .await
                .map_err(|e| map_err("activity", e))?;
        activity.next_timer_at = sqlx::query_scalar(&NEXT_TIMER)
            .bind(now)
            .bind(self.host_cutoff(now))
            .fetch_optional(&self.pool)
            .await
            .map_err(|e| map_err("activity", e))?;
        Ok(activity)
    }
}
