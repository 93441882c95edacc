//! The runtime's side (`impl MessageBox`), one method a line or so: each hands over to the room
//! that holds its body (`routing`, `claims`, `outbox`), and a commit to `batch`.

use std::collections::BTreeSet;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use uuid::Uuid;

use super::routing::reroute;
use super::{batch, claims, commit, outbox, routing, SqliteStore};
use crate::store::common::Outbox;
use crate::store::*;

#[async_trait]
impl MessageBox for SqliteStore {
    async fn publish(
        &self,
        messages: Vec<NewMessage>,
        now: DateTime<Utc>,
    ) -> StoreResult<Vec<PublishOutcome>> {
        routing::publish(self, messages, now).await
    }

    async fn start_instances(
        &self,
        instances: Vec<NewInstance>,
        holder: Option<Holder<'_>>,
        now: DateTime<Utc>,
    ) -> StoreResult<Vec<HeldStart>> {
        routing::start_instances(self, instances, holder, now).await
    }

    async fn claim_messages(
        &self,
        host: &str,
        now: DateTime<Utc>,
        limit: u32,
    ) -> StoreResult<Claimed<StoredMessage>> {
        claims::claim_messages(self, host, now, limit).await
    }

    async fn claim_timers(
        &self,
        host: &str,
        now: DateTime<Utc>,
        limit: u32,
    ) -> StoreResult<Claimed<DueTimer>> {
        claims::claim_timers(self, host, now, limit).await
    }

    async fn acquire(
        &self,
        host: &str,
        ids: &[Uuid],
        now: DateTime<Utc>,
        lease_until: DateTime<Utc>,
    ) -> StoreResult<Vec<InstanceRecord>> {
        claims::acquire(self, host, ids, now, lease_until).await
    }

    async fn heartbeat(
        &self,
        host: &str,
        now: DateTime<Utc>,
        lease_until: DateTime<Utc>,
    ) -> StoreResult<()> {
        claims::heartbeat(self, host, now, lease_until).await
    }

    async fn release(&self, host: &str, now: DateTime<Utc>) -> StoreResult<()> {
        claims::release(self, host, now).await
    }

    async fn unlock(&self, host: &str, ids: &[Uuid], failed: &[i64]) -> StoreResult<()> {
        claims::unlock(self, host, ids, failed).await
    }

    async fn commit(&self, points: &[PersistencePoint]) -> StoreResult<Vec<CommitOutcome>> {
        if let Some(out) = batch::write_alone(&self.writer, points).await? {
            return Ok(out);
        }
        let mut tx = self.write().await?;
        let mut reroute_types = BTreeSet::new();
        let out = batch::write_points(&mut tx, points, &mut reroute_types).await?;
        reroute(&mut tx, &reroute_types).await?;
        commit(tx).await?;
        Ok(out)
    }

    async fn subscribe(
        &self,
        host: &str,
        receives: &[NewReceives],
        now: DateTime<Utc>,
    ) -> StoreResult<Vec<CommitOutcome>> {
        routing::subscribe(self, host, receives, now).await
    }

    async fn note_unrunnable(&self, id: Uuid, error: &str, now: DateTime<Utc>) -> StoreResult<()> {
        claims::note_unrunnable(self, id, error, now).await
    }

    async fn claim_outbox(
        &self,
        host: &str,
        now: DateTime<Utc>,
        lock_until: DateTime<Utc>,
        limit: u32,
        ordered: &[String],
    ) -> StoreResult<Vec<OutboxRow>> {
        outbox::claim_outbox(self, host, now, lock_until, limit, ordered).await
    }

    async fn claim_ordered(
        &self,
        host: &str,
        port: &str,
        now: DateTime<Utc>,
        lock_until: DateTime<Utc>,
    ) -> StoreResult<Option<OutboxRow>> {
        outbox::claim_ordered(self, host, port, now, lock_until).await
    }

    async fn renew_outbox(
        &self,
        host: &str,
        ids: &[String],
        lock_until: DateTime<Utc>,
    ) -> StoreResult<()> {
        Outbox::renew_outbox(self, host, ids, lock_until).await
    }

    async fn record_deliveries(
        &self,
        outcomes: Vec<DeliveryOutcome>,
        now: DateTime<Utc>,
    ) -> StoreResult<()> {
        Outbox::record_deliveries(self, outcomes, now).await
    }
}
