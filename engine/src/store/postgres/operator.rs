//! The operators' verbs (`impl OperatorVerbs`): each hands over to the shared room
//! ([`common::operator`](crate::store::common::operator)), but for the summaries of many
//! instances, read the way this database takes a list of uuids.

use chrono::{DateTime, Utc};
use uuid::Uuid;

use super::PostgresStore;
use crate::store::common::operator::{summary_row, SUMMARY_COLUMNS};
use crate::store::common::{Operator, Versioning};
use crate::store::*;

crate::store::common::operator::operator_verbs!(PostgresStore);
crate::store::common::versions::versions!(PostgresStore);

impl PostgresStore {
    /// The summaries of these instances, read the way this database takes a list of uuids.
    async fn summaries(&self, ids: &[Uuid]) -> StoreResult<Vec<InstanceSummary>> {
        let rows = sqlx::query(&format!(
            "SELECT {SUMMARY_COLUMNS} FROM instances WHERE id = ANY($1)"
        ))
        .bind(ids)
        .fetch_all(&self.pool)
        .await
        .map_err(|e| super::map_err("instance summaries", e))?;
        rows.iter().map(summary_row::<Self>).collect()
    }
}
