//! The operators' verbs (`impl OperatorVerbs`): each hands over to the shared room
//! ([`common::operator`](crate::store::common::operator)), but for the summaries of many
//! instances, read the way this database takes a list of uuids.

use chrono::{DateTime, Utc};
use uuid::Uuid;

use super::SqliteStore;
use crate::store::common::operator::{summary_row, SUMMARY_COLUMNS};
use crate::store::common::Operator;
use crate::store::*;

#[async_trait]
impl OperatorVerbs for SqliteStore {
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

    async fn resubmit_dead_letter(&self, id: &str, now: DateTime<Utc>) -> StoreResult<bool> {
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
        let mut out = Vec::with_capacity(ids.len());
        for chunk in ids.chunks(500) {
            let mut query = sqlx::QueryBuilder::<sqlx::Sqlite>::new(format!(
                "SELECT {SUMMARY_COLUMNS} FROM instances WHERE id IN ("
            ));
            let mut list = query.separated(", ");
            for id in chunk {
                list.push_bind(id.to_string());
            }
            query.push(")");
            let rows = query
                .build()
                .fetch_all(&self.pool)
                .await
                .map_err(|e| super::map_err("instance summaries", e))?;
            for row in &rows {
                out.push(summary_row::<Self>(row)?);
            }
        }
        Ok(out)
    }

    async fn instance_detail(&self, id: Uuid) -> StoreResult<Option<InstanceDetail>> {
        Operator::instance_detail(self, id).await
    }

    async fn activity(&self, now: DateTime<Utc>) -> StoreResult<Activity> {
        Operator::activity(self, now).await
    }
}
