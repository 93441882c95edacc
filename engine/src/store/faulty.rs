//! A fault-injecting wrapper around any store, for tests.
//!
//! It can fail the next commits with a retryable error, or "crash" at a chosen commit: before it
//! (nothing of it is written) or after it (written, but the host never hears). A crash makes every
//! later call on the store hang forever, so the host that was using it makes no more progress,
//! just as a killed process would not; the test then drops that host's runtime and starts another
//! host on the same database.
//!
//! It can hold commits until the test lets them go, as a slow disk would.
//!
//! It can also refuse, as a database refuses a value it cannot hold, every commit that carries a
//! point whose `waiting_for` contains a marker: a data error, not retryable, that fails the whole
//! group commit the point is in.

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use tokio::sync::Notify;
use uuid::Uuid;

use super::*;

/// Where a planned crash happens relative to a commit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CrashPoint {
    /// The commit is not written.
    BeforeCommit,
    /// The commit is written; the caller never hears.
    AfterCommit,
}

/// The faults to inject; shared with the test that planned them.
#[derive(Debug, Default)]
pub struct FaultPlan {
    fail_commits: AtomicU32,
    lose_replies: AtomicU32,
    crash_at: AtomicI64,
    crash_after: AtomicBool,
    commits: AtomicU64,
    crashed: AtomicBool,
    crash_signal: Notify,
    refuse_waiting_for: std::sync::Mutex<Option<String>>,
    hold: AtomicBool,
    held: AtomicU64,
    released: Notify,
}

impl FaultPlan {
    /// A plan with no faults.
    pub fn new() -> Arc<Self> {
        let plan = Self::default();
        plan.crash_at.store(-1, Ordering::SeqCst);
        Arc::new(plan)
    }

    /// Fails the next `n` commits with a retryable error (nothing written).
    pub fn fail_next_commits(&self, n: u32) {
        self.fail_commits.store(n, Ordering::SeqCst);
    }

    /// Writes the next `n` commits and then fails them as a lost connection would: the points
    /// are stored, but the caller hears an error worth retrying (a commit whose reply was lost).
    pub fn lose_next_commit_replies(&self, n: u32) {
        self.lose_replies.store(n, Ordering::SeqCst);
    }

    /// Crashes at the `n`-th commit from now on (1 is the next one).
    pub fn crash_at_commit(&self, n: u64, point: CrashPoint) {
        let at = self.commits.load(Ordering::SeqCst) + n;
        self.crash_after
            .store(point == CrashPoint::AfterCommit, Ordering::SeqCst);
        self.crash_at.store(at as i64, Ordering::SeqCst);
    }

    /// Refuses, with a non-retryable error, every commit that carries a point whose
    /// `waiting_for` contains `marker`.
    pub fn refuse_points_waiting_for(&self, marker: &str) {
        *self.refusal() = Some(marker.to_owned());
    }

    fn refusal(&self) -> std::sync::MutexGuard<'_, Option<String>> {
        self.refuse_waiting_for
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Whether `points` carry one that the plan refuses.
    fn refuses(&self, points: &[PersistencePoint]) -> bool {
        let marker = self.refusal();
        marker
            .as_deref()
            .is_some_and(|m| points.iter().any(|p| p.waiting_for.contains(m)))
    }

    /// Holds every commit from now on, before it is written, until [`FaultPlan::release_commits`].
    pub fn hold_commits(&self) {
        self.hold.store(true, Ordering::SeqCst);
    }

    /// Lets the held commits, and every later one, go on.
    pub fn release_commits(&self) {
        self.hold.store(false, Ordering::SeqCst);
        self.released.notify_waiters();
    }

    /// Commits waiting to be released now.
    pub fn held_commits(&self) -> u64 {
        self.held.load(Ordering::SeqCst)
    }

    async fn wait_while_held(&self) {
        loop {
            let released = self.released.notified();
            if !self.hold.load(Ordering::SeqCst) {
                return;
            }
            self.held.fetch_add(1, Ordering::SeqCst);
            released.await;
            self.held.fetch_sub(1, Ordering::SeqCst);
        }
    }

    /// Commits attempted so far.
    pub fn commits(&self) -> u64 {
        self.commits.load(Ordering::SeqCst)
    }

    /// Whether the planned crash happened.
    pub fn has_crashed(&self) -> bool {
        self.crashed.load(Ordering::SeqCst)
    }

    /// Waits until the planned crash happens.
    pub async fn crashed(&self) {
        loop {
            let notified = self.crash_signal.notified();
            if self.has_crashed() {
                return;
            }
            notified.await;
        }
    }

    fn crash(&self) {
        self.crashed.store(true, Ordering::SeqCst);
        self.crash_signal.notify_waiters();
    }
}

/// A store that injects the faults of a [`FaultPlan`].
#[derive(Debug, Clone)]
pub struct FaultyStore {
    inner: Arc<dyn Store>,
    plan: Arc<FaultPlan>,
}

impl FaultyStore {
    /// Wraps `inner`.
    pub fn new(inner: Arc<dyn Store>, plan: Arc<FaultPlan>) -> Self {
        Self { inner, plan }
    }

    async fn gate(&self) {
        if self.plan.has_crashed() {
            std::future::pending::<()>().await;
        }
    }
}

#[async_trait]
impl MessageBox for FaultyStore {
    async fn publish(
        &self,
        m: Vec<NewMessage>,
        now: DateTime<Utc>,
    ) -> StoreResult<Vec<PublishOutcome>> {
        self.gate().await;
        self.inner.publish(m, now).await
    }

    async fn start_instances(
        &self,
        i: Vec<NewInstance>,
        holder: Option<Holder<'_>>,
        now: DateTime<Utc>,
    ) -> StoreResult<Vec<HeldStart>> {
        self.gate().await;
        self.inner.start_instances(i, holder, now).await
    }

    async fn claim_messages(
        &self,
        host: &str,
        now: DateTime<Utc>,
        limit: u32,
    ) -> StoreResult<Claimed<StoredMessage>> {
        self.gate().await;
        self.inner.claim_messages(host, now, limit).await
    }

    async fn claim_timers(
        &self,
        host: &str,
        now: DateTime<Utc>,
        limit: u32,
    ) -> StoreResult<Claimed<DueTimer>> {
        self.gate().await;
        self.inner.claim_timers(host, now, limit).await
    }

    async fn acquire(
        &self,
        host: &str,
        ids: &[Uuid],
        now: DateTime<Utc>,
        lease_until: DateTime<Utc>,
    ) -> StoreResult<Vec<InstanceRecord>> {
        self.gate().await;
        self.inner.acquire(host, ids, now, lease_until).await
    }

    async fn heartbeat(
        &self,
        host: &str,
        now: DateTime<Utc>,
        lease_until: DateTime<Utc>,
    ) -> StoreResult<()> {
        self.gate().await;
        self.inner.heartbeat(host, now, lease_until).await
    }

    async fn release(&self, host: &str, now: DateTime<Utc>) -> StoreResult<()> {
        self.gate().await;
        self.inner.release(host, now).await
    }

    async fn unlock(&self, host: &str, ids: &[Uuid], failed: &[i64]) -> StoreResult<()> {
        self.gate().await;
        self.inner.unlock(host, ids, failed).await
    }

    async fn commit(&self, points: &[PersistencePoint]) -> StoreResult<Vec<CommitOutcome>> {
        self.gate().await;
        self.plan.wait_while_held().await;
        let n = self.plan.commits.fetch_add(1, Ordering::SeqCst) + 1;
        if self.plan.crash_at.load(Ordering::SeqCst) == n as i64 {
            if self.plan.crash_after.load(Ordering::SeqCst) {
                let _ = self.inner.commit(points).await;
            }
            self.plan.crash();
            std::future::pending::<()>().await;
        }
        let failing = self.plan.fail_commits.load(Ordering::SeqCst);
        if failing > 0 {
            self.plan.fail_commits.store(failing - 1, Ordering::SeqCst);
            return Err(StoreError::Injected("commit"));
        }
        if self.plan.refuses(points) {
            return Err(StoreError::Database {
                operation: "commit",
                source: sqlx::Error::Protocol(
                    "injected refusal: a value in this commit cannot be stored".to_owned(),
                ),
            });
        }
        let outcomes = self.inner.commit(points).await?;
        let losing = self.plan.lose_replies.load(Ordering::SeqCst);
        if losing > 0 && outcomes.contains(&CommitOutcome::Committed) {
            self.plan.lose_replies.store(losing - 1, Ordering::SeqCst);
            return Err(StoreError::Injected("commit (written, its reply lost)"));
        }
        Ok(outcomes)
    }

    async fn subscribe(
        &self,
        host: &str,
        r: &[NewReceives],
        now: DateTime<Utc>,
    ) -> StoreResult<Vec<CommitOutcome>> {
        self.gate().await;
        self.inner.subscribe(host, r, now).await
    }

    async fn note_unrunnable(&self, id: Uuid, error: &str, now: DateTime<Utc>) -> StoreResult<()> {
        self.gate().await;
        self.inner.note_unrunnable(id, error, now).await
    }

    async fn claim_outbox(
        &self,
        host: &str,
        now: DateTime<Utc>,
        lock_until: DateTime<Utc>,
        limit: u32,
        ordered: &[String],
    ) -> StoreResult<Vec<OutboxRow>> {
        self.gate().await;
        self.inner
            .claim_outbox(host, now, lock_until, limit, ordered)
            .await
    }

    async fn claim_ordered(
        &self,
        host: &str,
        port: &str,
        now: DateTime<Utc>,
        lock_until: DateTime<Utc>,
    ) -> StoreResult<Option<OutboxRow>> {
        self.gate().await;
        self.inner.claim_ordered(host, port, now, lock_until).await
    }

    async fn renew_outbox(
        &self,
        host: &str,
        ids: &[String],
        lock_until: DateTime<Utc>,
    ) -> StoreResult<()> {
        self.gate().await;
        self.inner.renew_outbox(host, ids, lock_until).await
    }

    async fn record_deliveries(
        &self,
        o: Vec<DeliveryOutcome>,
        now: DateTime<Utc>,
    ) -> StoreResult<()> {
        self.gate().await;
        self.inner.record_deliveries(o, now).await
    }

    async fn listen(&self, wake: Arc<Notify>, stop: tokio_util::sync::CancellationToken) {
        self.inner.listen(wake, stop).await;
    }
}

#[async_trait]
impl OperatorVerbs for FaultyStore {
    async fn control(
        &self,
        id: Uuid,
        action: ControlAction,
        now: DateTime<Utc>,
    ) -> StoreResult<InstanceStatus> {
        self.gate().await;
        self.inner.control(id, action, now).await
    }

    async fn give_up_sends(
        &self,
        ids: &[String],
        reason: &str,
        now: DateTime<Utc>,
    ) -> StoreResult<u64> {
        self.gate().await;
        self.inner.give_up_sends(ids, reason, now).await
    }

    async fn resume_send(&self, id: &str, now: DateTime<Utc>) -> StoreResult<bool> {
        self.gate().await;
        self.inner.resume_send(id, now).await
    }

    async fn dead_letters(&self, limit: u32) -> StoreResult<Vec<DeadLetter>> {
        self.gate().await;
        self.inner.dead_letters(limit).await
    }

    async fn dead_letter(&self, id: &str) -> StoreResult<Option<DeadLetter>> {
        self.gate().await;
        self.inner.dead_letter(id).await
    }

    async fn resubmit_dead_letter(&self, id: &str, now: DateTime<Utc>) -> StoreResult<bool> {
        self.gate().await;
        self.inner.resubmit_dead_letter(id, now).await
    }

    async fn purge_dead_letters(
        &self,
        ids: &[String],
        before: Option<DateTime<Utc>>,
    ) -> StoreResult<u64> {
        self.gate().await;
        self.inner.purge_dead_letters(ids, before).await
    }

    async fn list_instances(
        &self,
        status: Option<InstanceStatus>,
        limit: u32,
    ) -> StoreResult<Vec<InstanceSummary>> {
        self.gate().await;
        self.inner.list_instances(status, limit).await
    }

    async fn instance_summaries(&self, ids: &[Uuid]) -> StoreResult<Vec<InstanceSummary>> {
        self.gate().await;
        self.inner.instance_summaries(ids).await
    }

    async fn instance_detail(&self, id: Uuid) -> StoreResult<Option<InstanceDetail>> {
        self.gate().await;
        self.inner.instance_detail(id).await
    }

    async fn activity(&self, now: DateTime<Utc>) -> StoreResult<Activity> {
        self.gate().await;
        self.inner.activity(now).await
    }

    fn console(&self) -> Option<&dyn super::console::ConsoleReads> {
        self.inner.console()
    }
}

#[async_trait]
impl Maintenance for FaultyStore {
    fn backend(&self) -> &'static str {
        self.inner.backend()
    }

    async fn migrate(&self) -> StoreResult<()> {
        self.gate().await;
        self.inner.migrate().await
    }

    async fn check_schema(&self) -> StoreResult<()> {
        self.gate().await;
        self.inner.check_schema().await
    }

    async fn recover(&self, host: &str, now: DateTime<Utc>) -> StoreResult<()> {
        self.gate().await;
        self.inner.recover(host, now).await
    }

    async fn sync_activations(&self, a: &[Activation], now: DateTime<Utc>) -> StoreResult<()> {
        self.gate().await;
        self.inner.sync_activations(a, now).await
    }

    async fn apply_controls(
        &self,
        host: &str,
        now: DateTime<Utc>,
        limit: u32,
    ) -> StoreResult<Vec<ControlApplied>> {
        self.gate().await;
        self.inner.apply_controls(host, now, limit).await
    }

    async fn housekeeping(
        &self,
        now: DateTime<Utc>,
        unrouted_before: DateTime<Utc>,
    ) -> StoreResult<Housekeeping> {
        self.gate().await;
        self.inner.housekeeping(now, unrouted_before).await
    }

    async fn take_inbox(
        &self,
        now: DateTime<Utc>,
        limit: u32,
        max_message_bytes: usize,
    ) -> StoreResult<usize> {
        self.gate().await;
        self.inner.take_inbox(now, limit, max_message_bytes).await
    }

    async fn close(&self) {
        self.inner.close().await;
    }
}

#[async_trait]
impl Retention for FaultyStore {
    async fn gauges(&self, now: DateTime<Utc>) -> StoreResult<StoreGauges> {
        self.gate().await;
        self.inner.gauges(now).await
    }

    async fn purgeable(
        &self,
        filter: &retention::PurgeFilter,
        with_history: bool,
    ) -> StoreResult<Vec<retention::EndedInstance>> {
        self.gate().await;
        self.inner.purgeable(filter, with_history).await
    }

    async fn purge(
        &self,
        ids: &[Uuid],
        filter: &retention::PurgeFilter,
    ) -> StoreResult<retention::Purged> {
        self.gate().await;
        self.inner.purge(ids, filter).await
    }

    async fn reclaim_space(&self, pages: u32) -> StoreResult<()> {
        self.gate().await;
        self.inner.reclaim_space(pages).await
    }

    async fn ready(&self) -> StoreResult<()> {
        self.gate().await;
        self.inner.ready().await
    }

    async fn count_purgeable(&self, filter: &retention::PurgeFilter) -> StoreResult<u64> {
        self.gate().await;
        self.inner.count_purgeable(filter).await
    }

    async fn expired_elsewhere(
        &self,
        host: &str,
        ids: &[Uuid],
        now: DateTime<Utc>,
    ) -> StoreResult<Vec<Uuid>> {
        self.gate().await;
        self.inner.expired_elsewhere(host, ids, now).await
    }

    async fn database_bytes(&self) -> StoreResult<u64> {
        self.gate().await;
        self.inner.database_bytes().await
    }
}

#[async_trait]
impl Versions for FaultyStore {
    async fn record_registrations(
        &self,
        host: &str,
        definitions: &[(String, u32)],
    ) -> StoreResult<()> {
        self.gate().await;
        self.inner.record_registrations(host, definitions).await
    }

    async fn upgrade_candidates(
        &self,
        filter: &UpgradeFilter,
        now: DateTime<Utc>,
    ) -> StoreResult<Vec<UpgradeCandidate>> {
        self.gate().await;
        self.inner.upgrade_candidates(filter, now).await
    }

    /// An upgrade point counts as a commit: a crash planned at it happens before or after it.
    async fn upgrade(
        &self,
        point: &UpgradePoint,
        now: DateTime<Utc>,
    ) -> StoreResult<UpgradeOutcome> {
        self.gate().await;
        let n = self.plan.commits.fetch_add(1, Ordering::SeqCst) + 1;
        if self.plan.crash_at.load(Ordering::SeqCst) == n as i64 {
            if self.plan.crash_after.load(Ordering::SeqCst) {
                let _ = self.inner.upgrade(point, now).await;
            }
            self.plan.crash();
            std::future::pending::<()>().await;
        }
        self.inner.upgrade(point, now).await
    }

    async fn version_counts(&self) -> StoreResult<Vec<VersionCount>> {
        self.gate().await;
        self.inner.version_counts().await
    }

    async fn running_hosts(&self, now: DateTime<Utc>) -> StoreResult<Vec<HostRegistrations>> {
        self.gate().await;
        self.inner.running_hosts(now).await
    }

    async fn needing_attention(
        &self,
        now: DateTime<Utc>,
        limit: u32,
    ) -> StoreResult<Vec<Attention>> {
        self.gate().await;
        self.inner.needing_attention(now, limit).await
    }
}
