//! The operators' verbs, once for both backends: control of an instance (suspend, resume,
//! terminate; also for the `control` rows maintenance carries out), giving up and resuming sends,
//! dead letters (list, show, resubmit, purge), and the listings of instances and activity.

use chrono::{DateTime, Utc};
use sqlx::{Database, Encode, Executor, FromRow, IntoArguments, Type};
use uuid::Uuid;

use super::console::instance_list;
use super::{Backend, Bind, Outbox, RowOf};
use crate::store::console::InstanceFilter;
use crate::store::*;

/// The `history.host` of points written by an operator's action (suspend, terminate).
const OPERATOR: &str = "operator";

/// The columns of an [`InstanceSummary`].
pub(in crate::store) const SUMMARY_COLUMNS: &str =
    "id, orchestration, version, status, step, waiting_for, updated_at, last_error";

/// Reads an [`InstanceSummary`] selected with [`SUMMARY_COLUMNS`].
pub(in crate::store) fn summary_row<B: Backend>(row: &RowOf<B>) -> StoreResult<InstanceSummary> {
    Ok(InstanceSummary {
        id: B::col_uuid(row, "id")?,
        orchestration: B::col_text(row, "orchestration")?,
        version: B::col_u32(row, "instances", "version")?,
        status: B::col_word(row, "status")?,
        step: B::col_text(row, "step")?,
        waiting_for: B::col_text(row, "waiting_for")?,
        updated_at: B::col_time(row, "updated_at")?,
        last_error: B::col_text_opt(row, "last_error")?,
    })
}

fn dead_letter_row<B: Backend>(row: &RowOf<B>) -> StoreResult<DeadLetter> {
    Ok(DeadLetter {
        id: B::col_text(row, "id")?,
        instance_id: B::col_uuid_opt(row, "instance_id")?,
        port: B::col_text_opt(row, "port")?,
        message_type: B::col_text(row, "message_type")?,
        body: crate::store::dead_letter_body(&B::col_body(row, "body")?),
        reason: B::col_text(row, "reason")?,
        attempts: B::col_u32(row, "dead_letters", "attempts")?,
        dead_at: B::col_time(row, "dead_at")?,
    })
}

/// The operators' verbs over a [`Backend`]; a backend's `impl OperatorVerbs` hands over here.
pub(in crate::store) trait Operator: Outbox
where
    for<'c> &'c mut <Self::Db as Database>::Connection: Executor<'c, Database = Self::Db>,
    for<'q> <Self::Db as Database>::Arguments<'q>: IntoArguments<'q, Self::Db>,
    for<'q> &'q str: Encode<'q, Self::Db> + Type<Self::Db>,
    for<'q> Option<&'q str>: Encode<'q, Self::Db> + Type<Self::Db>,
    String: Bind<Self::Db>,
    i64: Bind<Self::Db>,
    (i64,): for<'r> FromRow<'r, RowOf<Self>>,
{
    /// The `history_seq` the next point of instance `id` takes.
    async fn next_history_seq(tx: &mut Self::Tx, id: Uuid) -> StoreResult<i64> {
        let (seq,): (i64,) = sqlx::query_as("SELECT history_seq FROM instances WHERE id = $1")
            .bind(Self::uuid(id))
            .fetch_one(&mut **tx)
            .await
            .map_err(|e| Self::map_err("next history seq", e))?;
        Ok(seq + 1)
    }

    /// Writes a history row of instance `id`.
    async fn insert_history(tx: &mut Self::Tx, id: Uuid, e: HistoryEntry<'_>) -> StoreResult<()> {
        // The epoch is the instance's current one: the writer's, checked by the fenced update
        // before it, or the new one an operator action just took.
        sqlx::query(
            "INSERT INTO history (instance_id, seq, reason, step, status, at, host, epoch, detail) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, (SELECT epoch FROM instances WHERE id = $1), $8)",
        )
        .bind(Self::uuid(id))
        .bind(e.seq)
        .bind(e.reason.as_str())
        .bind(e.step)
        .bind(e.status.as_str())
        .bind(Self::time(e.at))
        .bind(e.host)
        .bind(e.detail)
        .execute(&mut **tx)
        .await
        .map_err(|e| Self::map_err("insert history", e))?;
        Ok(())
    }

    /// Carries out an operator's action inside `tx`. Bumps the epoch so that a host holding the
    /// instance in memory is fenced and drops it.
    async fn control_in(
        tx: &mut Self::Tx,
        id: Uuid,
        action: &ControlAction,
        now: DateTime<Utc>,
    ) -> StoreResult<InstanceStatus> {
        let e = |e| Self::map_err("control in", e);
        let row = sqlx::query(&format!(
            "SELECT status, step, parent_id, resumable, last_error FROM instances WHERE id = $1{}",
            Self::FOR_UPDATE
        ))
        .bind(Self::uuid(id))
        .fetch_optional(&mut **tx)
        .await
        .map_err(e)?
        .ok_or(StoreError::NoSuchInstance(id))?;
        let status: InstanceStatus = Self::col_word(&row, "status")?;
        let step = Self::col_text(&row, "step")?;
        action.check(
            id,
            status,
            Self::col_bool(&row, "resumable")?,
            Self::col_text_opt(&row, "last_error")?,
        )?;
        let (status, reason, update) = match &action {
            ControlAction::Suspend { reason } => (
                InstanceStatus::Suspended,
                reason,
                "owner = NULL, lease_expires_at = NULL,",
            ),
            ControlAction::Terminate { reason } => (
                InstanceStatus::Terminated,
                reason,
                "owner = NULL, lease_expires_at = NULL, waiting_for = '', next_timer_at = NULL,",
            ),
            ControlAction::Resume { .. } => {
                sqlx::query(&format!(
                    "UPDATE instances SET status = 'dehydrated', last_error = NULL, epoch = epoch + 1, \
                     owner = NULL, lease_expires_at = NULL, updated_at = $2, resumable = {} WHERE id = $1",
                    Self::TRUE
                ))
                .bind(Self::uuid(id))
                .bind(Self::time(now))
                .execute(&mut **tx)
                .await
                .map_err(e)?;
                // Its messages are delivered again from scratch: poison counting starts over.
                sqlx::query(
                    "UPDATE messages SET delivery_count = 0 WHERE instance_id = $1 AND status = 'routed'",
                )
                .bind(Self::uuid(id))
                .execute(&mut **tx)
                .await
                .map_err(e)?;
                Self::notify(tx).await?;
                Self::unlock_instance(tx, id).await?;
                return Ok(InstanceStatus::Dehydrated);
            }
        };
        let seq = Self::next_history_seq(tx, id).await?;
        let verb = status.as_str();
        sqlx::query(&format!(
            "UPDATE instances SET status = '{verb}', last_error = $2, epoch = epoch + 1, \
             {update} updated_at = $3, history_seq = $4 WHERE id = $1"
        ))
        .bind(Self::uuid(id))
        .bind(format!("{verb} by operator: {reason}"))
        .bind(Self::time(now))
        .bind(seq)
        .execute(&mut **tx)
        .await
        .map_err(e)?;
        if status == InstanceStatus::Terminated {
            for sql in [
                "DELETE FROM subscriptions WHERE instance_id = $1",
                "DELETE FROM timers WHERE instance_id = $1",
            ] {
                sqlx::query(sql)
                    .bind(Self::uuid(id))
                    .execute(&mut **tx)
                    .await
                    .map_err(e)?;
            }
        }
        let entry = HistoryEntry {
            seq,
            reason: match status {
                InstanceStatus::Suspended => Reason::Suspend,
                _ => Reason::Complete,
            },
            step: &step,
            status,
            at: now,
            host: OPERATOR,
            detail: Some(reason),
        };
        Self::insert_history(tx, id, entry).await?;
        if status == InstanceStatus::Terminated {
            if let Some(parent) = Self::col_uuid_opt(&row, "parent_id")? {
                let msg = NewMessage::to_instance(
                    format!("{id}:ended"),
                    "child.failed",
                    MessageKind::ChildFailed,
                    serde_json::json!({ "child": id, "error": format!("terminated: {reason}") }),
                    parent,
                );
                Self::publish_one(tx, &msg, now).await?;
                Self::notify(tx).await?;
            }
        }
        Self::unlock_instance(tx, id).await?;
        Ok(status)
    }

    /// [`OperatorVerbs::control`].
    async fn control(
        &self,
        id: Uuid,
        action: ControlAction,
        now: DateTime<Utc>,
    ) -> StoreResult<InstanceStatus> {
        let mut tx = self.begin().await?;
        let status = Self::control_in(&mut tx, id, &action, now).await?;
        Self::commit(tx).await?;
        Ok(status)
    }

    /// [`OperatorVerbs::give_up_sends`].
    async fn give_up_sends(
        &self,
        ids: &[String],
        reason: &str,
        now: DateTime<Utc>,
    ) -> StoreResult<u64> {
        let e = |e| Self::map_err("give up sends", e);
        let mut tx = self.begin().await?;
        sqlx::query(&format!(
            "UPDATE outbox SET status = 'give_up', last_error = $2, locked_by = NULL, locked_until = NULL \
             WHERE status IN ('pending', 'held') AND id {}",
            Self::IN_LIST_1
        ))
        .bind(Self::list(ids))
        .bind(reason)
        .execute(&mut *tx)
        .await
        .map_err(e)?;
        let rows = sqlx::query(
            "UPDATE outbox SET status = 'dead', locked_by = NULL, locked_until = NULL \
             WHERE status = 'give_up' \
             RETURNING id, instance_id, port, message_type, body, expects_reply, attempts, last_error",
        )
        .fetch_all(&mut *tx)
        .await
        .map_err(e)?;
        for r in &rows {
            let row = Self::outbox_row(r)?;
            let why = Self::col_text_opt(r, "last_error")?
                .unwrap_or_else(|| "dead-lettered by an operator".to_owned());
            let attempts = row.attempts;
            Self::dead_letter_send(&mut tx, &row, &why, attempts, now).await?;
        }
        Self::commit(tx).await?;
        Ok(rows.len() as u64)
    }

    /// [`OperatorVerbs::resume_send`].
    async fn resume_send(&self, id: &str, now: DateTime<Utc>) -> StoreResult<bool> {
        let mut tx = self.begin().await?;
        let done = sqlx::query(
            "UPDATE outbox SET status = 'pending', attempts = 0, next_attempt_at = $2, \
             locked_by = NULL, locked_until = NULL WHERE id = $1 AND status = 'held'",
        )
        .bind(id)
        .bind(Self::time(now))
        .execute(&mut *tx)
        .await
        .map_err(|e| Self::map_err("resume send", e))?;
        Self::commit(tx).await?;
        Ok(Self::rows_affected(&done) == 1)
    }

    /// [`OperatorVerbs::dead_letters`].
    async fn dead_letters(&self, limit: u32) -> StoreResult<Vec<DeadLetter>> {
        let rows = sqlx::query(&dead_letters_where::<Self>(
            "ORDER BY dead_at DESC, id LIMIT $1",
        ))
        .bind(i64::from(limit))
        .fetch_all(self.reads())
        .await
        .map_err(|e| Self::map_err("dead letters", e))?;
        Ok(readable(
            rows.iter().map(dead_letter_row::<Self>),
            "listing dead letters",
        ))
    }

    /// [`OperatorVerbs::dead_letter`].
    async fn dead_letter(&self, id: &str) -> StoreResult<Option<DeadLetter>> {
        let row = sqlx::query(&dead_letters_where::<Self>("WHERE id = $1"))
            .bind(id)
            .fetch_optional(self.reads())
            .await
            .map_err(|e| Self::map_err("dead letter", e))?;
        row.as_ref().map(dead_letter_row::<Self>).transpose()
    }

    /// [`OperatorVerbs::resubmit_dead_letter`].
    async fn resubmit_dead_letter(&self, id: &str, now: DateTime<Utc>) -> StoreResult<bool> {
        let e = |e| Self::map_err("resubmit dead letter", e);
        let mut tx = self.begin().await?;
        let done = sqlx::query(
            "UPDATE outbox SET status = 'pending', attempts = 0, next_attempt_at = $2, \
             locked_by = NULL, locked_until = NULL, delivered_via = NULL \
             WHERE id = $1 AND status = 'dead'",
        )
        .bind(id)
        .bind(Self::time(now))
        .execute(&mut *tx)
        .await
        .map_err(e)?;
        let done = Self::rows_affected(&done) == 1;
        if done {
            sqlx::query("DELETE FROM dead_letters WHERE id = $1")
                .bind(id)
                .execute(&mut *tx)
                .await
                .map_err(e)?;
        }
        Self::commit(tx).await?;
        Ok(done)
    }

    /// [`OperatorVerbs::purge_dead_letters`].
    async fn purge_dead_letters(
        &self,
        ids: &[String],
        before: Option<DateTime<Utc>>,
    ) -> StoreResult<u64> {
        let mut tx = self.begin().await?;
        let in_list = format!("DELETE FROM dead_letters WHERE id {}", Self::IN_LIST_1);
        let query = if !ids.is_empty() {
            sqlx::query(&in_list).bind(Self::list(ids))
        } else if let Some(before) = before {
            sqlx::query("DELETE FROM dead_letters WHERE dead_at < $1").bind(Self::time(before))
        } else {
            sqlx::query("DELETE FROM dead_letters")
        };
        let done = query
            .execute(&mut *tx)
            .await
            .map_err(|e| Self::map_err("purge dead letters", e))?;
        Self::commit(tx).await?;
        Ok(Self::rows_affected(&done))
    }

    /// [`OperatorVerbs::list_instances`].
    async fn list_instances(
        &self,
        status: Option<InstanceStatus>,
        limit: u32,
    ) -> StoreResult<Vec<InstanceSummary>> {
        // The console's list: read per status, newest change first.
        let filter = InstanceFilter {
            status,
            ..InstanceFilter::default()
        };
        let (sql, _) = instance_list::<Self>(&filter, None, u64::from(limit));
        let rows = sqlx::query(&sql)
            .fetch_all(self.reads())
            .await
            .map_err(|e| Self::map_err("list instances", e))?;
        Ok(readable(
            rows.iter().map(summary_row::<Self>),
            "listing instances",
        ))
    }

    /// [`OperatorVerbs::instance_detail`].
    async fn instance_detail(&self, id: Uuid) -> StoreResult<Option<InstanceDetail>> {
        let e = |e| Self::map_err("instance detail", e);
        let Some(row) = sqlx::query(&format!(
            "SELECT {SUMMARY_COLUMNS}, state, engine_state, output, next_timer_at, created_at FROM instances WHERE id = $1"
        ))
        .bind(Self::uuid(id))
        .fetch_optional(self.reads())
        .await
        .map_err(e)?
        else {
            return Ok(None);
        };
        let history = sqlx::query(
            "SELECT seq, reason, step, status, at, detail FROM history WHERE instance_id = $1 ORDER BY seq",
        )
        .bind(Self::uuid(id))
        .fetch_all(self.reads())
        .await
        .map_err(e)?
        .iter()
        .map(|h| {
            Ok(HistoryRow {
                seq: Self::col_i64(h, "seq")?,
                reason: Self::col_word(h, "reason")?,
                step: Self::col_text(h, "step")?,
                status: Self::col_word(h, "status")?,
                at: Self::col_time(h, "at")?,
                detail: Self::col_text_opt(h, "detail")?,
            })
        })
        .collect::<StoreResult<Vec<_>>>()?;
        let (pending, zombies): (Vec<_>, Vec<_>) = sqlx::query(
            "SELECT id, message_type, status FROM messages \
             WHERE instance_id = $1 AND status IN ('routed', 'zombie') ORDER BY seq",
        )
        .bind(Self::uuid(id))
        .fetch_all(self.reads())
        .await
        .map_err(e)?
        .iter()
        .map(|m| {
            Ok((
                Self::col_text(m, "id")?,
                Self::col_text(m, "message_type")?,
                Self::col_text(m, "status")?,
            ))
        })
        .collect::<StoreResult<Vec<_>>>()?
        .into_iter()
        .partition(|(_, _, status)| status == "routed");
        Ok(Some(InstanceDetail {
            summary: summary_row::<Self>(&row)?,
            state: Self::col_bytes_opt(&row, "state")?,
            engine_state: Self::col_bytes_opt(&row, "engine_state")?,
            output: Self::col_json_opt(&row, "output")?,
            next_timer_at: Self::col_time_opt(&row, "next_timer_at")?,
            created_at: Self::col_time(&row, "created_at")?,
            history,
            pending_messages: pending.into_iter().map(|(id, ty, _)| (id, ty)).collect(),
            zombies: zombies.into_iter().map(|(id, ty, _)| (id, ty)).collect(),
        }))
    }

    /// [`OperatorVerbs::activity`].
    async fn activity(&self, now: DateTime<Utc>) -> StoreResult<Activity> {
        let e = |e| Self::map_err("activity", e);
        let mut activity = Activity::default();
        let by_status = format!(
            "SELECT status, COUNT(*) AS {} FROM instances GROUP BY status",
            Self::COUNT_AS
        );
        for row in sqlx::query(&by_status)
            .fetch_all(self.reads())
            .await
            .map_err(e)?
        {
            activity.by_status.insert(
                Self::col_text(&row, "status")?,
                Self::col_i64(&row, Self::COUNT_AS)?,
            );
        }
        activity.ready_messages = self.ready_messages(now).await?;
        let (pending,): (i64,) =
            sqlx::query_as("SELECT COUNT(*) FROM outbox WHERE status = 'pending'")
                .fetch_one(self.reads())
                .await
                .map_err(e)?;
        activity.pending_sends = pending;
        activity.next_timer_at = self.next_timer_at(now).await?;
        Ok(activity)
    }
}

/// The dead letters' columns selected, then `tail`.
fn dead_letters_where<B: Backend>(tail: &str) -> String {
    format!(
        "SELECT id, instance_id, port, message_type, {}, reason, attempts, dead_at \
         FROM dead_letters {tail}",
        B::DEAD_LETTER_BODY
    )
}

/// `impl OperatorVerbs for $store`: every verb handed over to [`Operator`], but the summaries of
/// many instances, which the store reads its own way (an inherent `summaries(&self, ids)`: the
/// way its database takes a list of uuids).
macro_rules! operator_verbs {
    ($store:ty) => {
        #[async_trait::async_trait]
        impl $crate::store::OperatorVerbs for $store {
            async fn control(
                &self,
                id: Uuid,
                action: ControlAction,
                now: DateTime<Utc>,
            ) -> StoreResult<InstanceStatus> {
                Operator::control(self, id, action, now).await
            }

            async fn give_up_sends(
                &self,
                ids: &[String],
                reason: &str,
                now: DateTime<Utc>,
            ) -> StoreResult<u64> {
                Operator::give_up_sends(self, ids, reason, now).await
            }

            async fn resume_send(&self, id: &str, now: DateTime<Utc>) -> StoreResult<bool> {
                Operator::resume_send(self, id, now).await
            }

            async fn dead_letters(&self, limit: u32) -> StoreResult<Vec<DeadLetter>> {
                Operator::dead_letters(self, limit).await
            }

            async fn dead_letter(&self, id: &str) -> StoreResult<Option<DeadLetter>> {
                Operator::dead_letter(self, id).await
            }

            async fn resubmit_dead_letter(
                &self,
                id: &str,
                now: DateTime<Utc>,
            ) -> StoreResult<bool> {
                Operator::resubmit_dead_letter(self, id, now).await
            }

            async fn purge_dead_letters(
                &self,
                ids: &[String],
                before: Option<DateTime<Utc>>,
            ) -> StoreResult<u64> {
                Operator::purge_dead_letters(self, ids, before).await
            }

            async fn list_instances(
                &self,
                status: Option<InstanceStatus>,
                limit: u32,
            ) -> StoreResult<Vec<InstanceSummary>> {
                Operator::list_instances(self, status, limit).await
            }

            async fn instance_summaries(&self, ids: &[Uuid]) -> StoreResult<Vec<InstanceSummary>> {
                self.summaries(ids).await
            }

            async fn instance_detail(&self, id: Uuid) -> StoreResult<Option<InstanceDetail>> {
                Operator::instance_detail(self, id).await
            }

            async fn activity(&self, now: DateTime<Utc>) -> StoreResult<Activity> {
                Operator::activity(self, now).await
            }

            fn console(&self) -> Option<&dyn $crate::store::console::ConsoleReads> {
                Some(self)
            }
        }
    };
}
pub(in crate::store) use operator_verbs;
