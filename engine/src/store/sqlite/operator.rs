//! The operators' verbs (`impl OperatorVerbs`): each hands over to the shared room
//! ([`common::operator`](crate::store::common::operator)), but for the summaries of many
//! instances, read the way this database takes a list of uuids.

use chrono::{DateTime, Utc};
use uuid::Uuid;

use super::SqliteStore;
use crate::store::common::operator::{summary_row, SUMMARY_COLUMNS};
use crate::store::common::{Operator, Versioning};
use crate::store::*;

crate::store::common::operator::operator_verbs!(SqliteStore);
crate::store::common::versions::versions!(SqliteStore);

impl SqliteStore {
    /// The summaries of these instances, read the way this database takes a list of uuids.
    async fn summaries(&self, ids: &[Uuid]) -> StoreResult<Vec<InstanceSummary>> {
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
}
