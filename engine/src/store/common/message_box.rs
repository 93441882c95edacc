//! The runtime's side (`impl MessageBox`) of a backend, written once: each method hands over to
//! the backend's room that holds its body, by the same name in every backend: `routing`
//! (publish, starts, the group commit, subscriptions), `claims` (claims, leases, locks) and
//! `outbox` (the send side, its bookkeeping shared in [`Outbox`](super::Outbox)).
//!
//! A macro, as for the operator verbs: a blanket impl over [`Backend`](super::Backend) cannot
//! prove its futures `Send`. A backend that does more (PostgreSQL listens for other hosts' work)
//! adds its methods after the type.

macro_rules! message_box {
    ($store:ty $(, $($more:tt)*)?) => {
        #[async_trait::async_trait]
        impl $crate::store::MessageBox for $store {
            async fn publish(
                &self,
                messages: Vec<NewMessage>,
                now: DateTime<Utc>,
            ) -> StoreResult<Vec<PublishOutcome>> {
                $crate::store::common::routing::publish(self, messages, now).await
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
                let claim = $crate::store::common::Claim::new(&claims::CLAIM_TIMERS, host, now, limit);
                $crate::store::common::Claims::claim_timers_by(self, claim).await
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
                $crate::store::common::Claims::heartbeat(self, host, now, lease_until).await
            }

            async fn release(&self, host: &str, now: DateTime<Utc>) -> StoreResult<()> {
                $crate::store::common::Claims::release(self, host, now).await
            }

            async fn unlock(&self, host: &str, ids: &[Uuid], failed: &[i64]) -> StoreResult<()> {
                claims::unlock(self, host, ids, failed).await
            }

            async fn commit(&self, points: &[PersistencePoint]) -> StoreResult<Vec<CommitOutcome>> {
                routing::commit_points(self, points).await
            }

            async fn subscribe(
                &self,
                host: &str,
                receives: &[NewReceives],
                now: DateTime<Utc>,
            ) -> StoreResult<Vec<CommitOutcome>> {
                routing::subscribe(self, host, receives, now).await
            }

            async fn note_unrunnable(
                &self,
                id: Uuid,
                error: &str,
                now: DateTime<Utc>,
            ) -> StoreResult<()> {
                $crate::store::common::Claims::note_unrunnable(self, id, error, now).await
            }

            async fn claim_outbox(
                &self,
                host: &str,
                now: DateTime<Utc>,
                lock_until: DateTime<Utc>,
                limit: u32,
                ordered: &[String],
            ) -> StoreResult<Vec<OutboxRow>> {
                $crate::store::common::Outbox::claim_outbox_by(
                    self,
                    outbox::CLAIM_OUTBOX,
                    host,
                    now,
                    lock_until,
                    limit,
                    ordered,
                )
                .await
            }

            async fn claim_ordered(
                &self,
                host: &str,
                port: &str,
                now: DateTime<Utc>,
                lock_until: DateTime<Utc>,
            ) -> StoreResult<Option<OutboxRow>> {
                $crate::store::common::Outbox::claim_ordered_by(
                    self,
                    outbox::CLAIM_ORDERED,
                    host,
                    port,
                    now,
                    lock_until,
                )
                .await
            }

            async fn renew_outbox(
                &self,
                host: &str,
                ids: &[String],
                lock_until: DateTime<Utc>,
            ) -> StoreResult<()> {
                $crate::store::common::Outbox::renew_outbox(self, host, ids, lock_until).await
            }

            async fn record_deliveries(
                &self,
                outcomes: Vec<DeliveryOutcome>,
                now: DateTime<Utc>,
            ) -> StoreResult<()> {
                $crate::store::common::Outbox::record_deliveries(self, outcomes, now).await
            }

            $($($more)*)?
        }
    };
}
pub(in crate::store) use message_box;
