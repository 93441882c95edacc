//! Committing a round's persistence points, and keeping one instance's bad point from holding
//! back the others (G6).
//!
//! A round's points go to the store as one group commit: waited for when it is small (the
//! latency path), run in a task of its own otherwise while the host loop takes the next work
//! ([`Committing`], settled by [`Runner::settle`]). A transient failure (the database away,
//! a serialization failure) is retried with backoff, and if it persists the instances go back to
//! their last persistence points, their messages delivered again. Any other failure may be one
//! point's data (text the database cannot hold, a constraint, a size): the group is split in
//! halves, and the halves committed apart, until every point that still fails stands alone. Such
//! a point is *refused*: its instance is loaded again from its last persistence point and
//! suspended there, with the database's error in `last_error` and a `suspend` row in its history.
//! The messages the refused point had consumed are delivered again on resume and count toward
//! poison protection. A point that can never be stored on any backend
//! ([`PersistencePoint::check_storable`]) is refused the same way without being sent.
//!
//! Two failures are not the data's fault, and refuse nothing: a point that consumed messages
//! the store no longer routes to its instance ([`StoreError::NotRouted`]: the copy in memory is
//! behind what is stored, after a database restart with several hosts, say), and any failure of a
//! commit retried after a lost connection (the lost attempt may have been written). Their
//! instances go back and resume from what is stored.

use std::collections::HashSet;
use std::time::Duration;

use tokio::task::JoinHandle;
use tracing::Instrument;
use uuid::Uuid;

use super::instance::{FaultText, LiveInstance};
use super::runner::Runner;
use super::Ended;
use crate::store::{
    storable_text, CommitOutcome, InstanceStatus, PersistencePoint, Store, StoreError,
};

/// How one point of a group commit ended.
#[derive(Debug)]
pub(super) enum Written {
    /// Committed or fenced.
    Outcome(CommitOutcome),
    /// Refused by the database when committed alone, or never storable: why.
    Refused(String),
    /// Not written: the database stayed unavailable.
    Unwritten,
}

/// How many times a transient failure is retried before the points go back.
const ATTEMPTS: u32 = 8;

/// Commits `points`, retrying transient failures; see the module docs. Also says whether an
/// attempt failed transiently: such an attempt may have been written all the same (the
/// connection was lost after the database committed, before its reply came back).
async fn commit_retrying(
    store: &dyn Store,
    points: &[PersistencePoint],
) -> (Result<Vec<CommitOutcome>, StoreError>, bool) {
    let mut wait = Duration::from_millis(50);
    let mut attempt = 0;
    loop {
        attempt += 1;
        match store.commit(points).await {
            Err(e) if e.is_retryable() && attempt < ATTEMPTS => {
                tracing::warn!(error = %e, attempt, points = points.len(), "commit failed; retrying");
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(Duration::from_secs(2));
            }
            other => return (other, attempt > 1),
        }
    }
}

/// Commits `points`, splitting a group the database refuses until the refused points stand
/// alone. Returns how each point ended, in order.
async fn commit_isolating(store: &dyn Store, points: &[PersistencePoint]) -> Vec<Written> {
    let mut written: Vec<Option<Written>> = points
        .iter()
        .map(|p| p.check_storable().err().map(Written::Refused))
        .collect();
    // Ranges of storable points, split apart where a refused point stands.
    let mut ranges = Vec::new();
    let mut start = 0;
    for (i, w) in written.iter().enumerate() {
        if w.is_some() {
            if start < i {
                ranges.push((start, i));
            }
            start = i + 1;
        }
    }
    if start < points.len() {
        ranges.push((start, points.len()));
    }
    ranges.reverse();
    while let Some((from, to)) = ranges.pop() {
        let (result, uncertain) = commit_retrying(store, &points[from..to]).await;
        match result {
            Ok(outcomes) => {
                for (slot, outcome) in written[from..to].iter_mut().zip(outcomes) {
                    *slot = Some(Written::Outcome(outcome));
                }
            }
            Err(e) if e.is_retryable() => {
                tracing::error!(error = %e, points = points.len(),
                    "commit failed; the instances resume from their last persistence point");
                break;
            }
            Err(e) if uncertain => {
                // An earlier attempt was cut off and may have been written: what the database
                // refuses now may be these very points, stored already (their messages consumed,
                // their history written). Nothing is refused on that evidence; the instances
                // resume from what is stored, whichever it is.
                tracing::warn!(error = %e, points = to - from,
                    "a commit retried after a lost connection failed; an earlier attempt may have been written, so the instances resume from what is stored");
            }
            Err(e) if to - from > 1 => {
                tracing::warn!(error = %e, points = to - from,
                    "the database refused a group commit; committing its halves apart to find the refused points");
                let middle = from + (to - from) / 2;
                ranges.push((middle, to));
                ranges.push((from, middle));
            }
            Err(e @ StoreError::NotRouted(_)) => {
                // Made from a copy in memory the store has moved past: nothing to refuse, the
                // instance is loaded again from what is stored (G5 kept: nothing consumed twice).
                tracing::warn!(error = %e, instance.id = %points[from].instance_id,
                    "a persistence point consumed messages no longer routed to its instance; the instance resumes from what is stored");
            }
            Err(e) => written[from] = Some(Written::Refused(e.to_string())),
        }
    }
    written
        .into_iter()
        .map(|w| w.unwrap_or(Written::Unwritten))
        .collect()
}

/// The `last_error` of an instance whose point was refused.
fn refusal_text(point: &PersistencePoint, error: &str) -> String {
    format!(
        "the database refused this instance's {} persistence point: {}. The instance is \
         suspended at its last persistence point; the messages it consumed since are delivered \
         again when it is resumed, and each attempt counts toward poison protection. Fix what \
         produced the data (the message or the orchestration's code), then resume or terminate \
         the instance",
        point.reason,
        storable_text(error)
    )
}

/// A group commit under way while the host loop builds the next group: the instances whose
/// points it writes get no work until it is done (an instance has at most one point in flight,
/// so a point that ends fenced, refused or unwritten has nothing after it to undo).
pub(super) struct Committing {
    ids: HashSet<Uuid>,
    task: JoinHandle<Done>,
}

/// A group commit's points and how each ended.
type Done = (Vec<PersistencePoint>, Vec<Written>);

/// How a group commit's task ended: done, or panicked (nothing known of what it wrote).
pub(super) type Finished = Result<Done, tokio::task::JoinError>;

impl Committing {
    /// Whether `id`'s point is in this commit.
    pub(super) fn holds(&self, id: &Uuid) -> bool {
        self.ids.contains(id)
    }

    /// Whether the commit has ended (settling it then waits for nothing).
    pub(super) fn has_ended(&self) -> bool {
        self.task.is_finished()
    }

    /// Waits until the commit under way in `committing`, if any, is done (forever if none).
    /// Cancel-safe: the commit goes on, and [`Runner::settle_finished`] takes what it returns.
    pub(super) async fn finished(committing: &mut Option<Committing>) -> Finished {
        match committing {
            Some(c) => (&mut c.task).await,
            None => std::future::pending().await,
        }
    }
}

impl Runner {
    /// Commits a group of points and waits for it; see the module docs. Instances whose points
    /// were not written are forgotten, so that they are rehydrated from their last persistence
    /// point and their messages delivered again.
    pub(super) async fn commit(&mut self, points: Vec<PersistencePoint>) {
        self.begin_commit(points).await;
        self.settle().await;
    }

    /// Starts committing a group of points, once the group before it is settled, and returns
    /// without waiting: the host loop takes the next group's work meanwhile (the pipeline).
    /// [`Runner::settle`] acts on how it ended.
    pub(super) async fn begin_commit(&mut self, points: Vec<PersistencePoint>) {
        self.settle().await;
        // What the points write that a claim may find: claim at the next round, or when the
        // earliest timer they set is due.
        if points.iter().any(PersistencePoint::makes_claimable_work) {
            self.claim = true;
        }
        if let Some(due) = points
            .iter()
            .flat_map(|p| p.set_timers.iter().map(|(_, at)| *at))
            .min()
        {
            self.timer_due = Some(self.timer_due.map_or(due, |t| t.min(due)));
        }
        let store = self.host.store.clone();
        let metrics = self.host.metrics.clone();
        let ids = points.iter().map(|p| p.instance_id).collect();
        let span = tracing::debug_span!("group_commit", points = points.len());
        let task = tokio::spawn(
            async move {
                let started = std::time::Instant::now();
                let written = commit_isolating(store.as_ref(), &points).await;
                if let Some(metrics) = &metrics {
                    metrics.commit(points.len(), started.elapsed());
                }
                (points, written)
            }
            .instrument(span),
        );
        self.committing = Some(Committing { ids, task });
    }

    /// Waits for the group commit under way, if any, and acts on how each of its points ended:
    /// sends of committed points go to the dispatcher; instances whose points were fenced,
    /// refused or not written are forgotten (see the module docs).
    pub(super) async fn settle(&mut self) {
        if self.committing.is_some() {
            let finished = Committing::finished(&mut self.committing).await;
            self.settle_finished(finished).await;
        }
    }

    /// Acts on how the group commit under way ended, once [`Committing::finished`] said.
    pub(super) async fn settle_finished(&mut self, finished: Finished) {
        let Some(Committing { ids, .. }) = self.committing.take() else {
            return;
        };
        let (points, written) = match finished {
            Ok(done) => done,
            Err(e) => {
                // The commit's task panicked: whether it wrote is unknown, so the instances
                // resume from what is stored.
                tracing::error!(error = %e, "a group commit's task failed; its instances resume from their last persistence point");
                let ids: Vec<Uuid> = ids.into_iter().collect();
                for id in &ids {
                    self.cache.remove(id);
                }
                self.claim = true;
                self.release_after_failure(&ids, &[]).await;
                return;
            }
        };
        let mut unwritten = Vec::new();
        let mut fenced = Vec::new();
        let mut refused = Vec::new();
        for (point, written) in points.into_iter().zip(written) {
            match written {
                Written::Outcome(CommitOutcome::Committed) => self.committed(point),
                Written::Outcome(CommitOutcome::Fenced) => {
                    tracing::debug!(instance.id = %point.instance_id, "fenced: another writer holds the instance; dropping it");
                    self.stats.fenced += 1;
                    if let Some(metrics) = &self.host.metrics {
                        metrics.fenced(1);
                    }
                    self.cache.remove(&point.instance_id);
                    fenced.push(point.instance_id);
                }
                Written::Refused(error) => {
                    self.cache.remove(&point.instance_id);
                    refused.push((point, error));
                }
                Written::Unwritten => {
                    self.cache.remove(&point.instance_id);
                    unwritten.push(point.instance_id);
                }
            }
        }
        if !unwritten.is_empty() || !fenced.is_empty() {
            // Whatever this host claimed for them goes back: for their current owner if
            // fenced, to be claimed again otherwise.
            self.claim = true;
            unwritten.extend(fenced);
            self.release_after_failure(&unwritten, &[]).await;
        }
        if !refused.is_empty() {
            self.suspend_refused(refused).await;
        }
    }

    /// Suspends each instance whose point was refused at its last persistence point: loaded
    /// again from the store (the one in memory is past it), with the refusal as its error. The
    /// messages the refused point consumed keep their delivery count.
    async fn suspend_refused(&mut self, refused: Vec<(PersistencePoint, String)>) {
        self.claim = true;
        let now = self.host.clock.now();
        let store = self.host.store.clone();
        let ids: Vec<Uuid> = refused.iter().map(|(p, _)| p.instance_id).collect();
        let failed: Vec<i64> = refused
            .iter()
            .flat_map(|(p, _)| p.consumed.iter().chain(&p.failed).copied())
            .collect();
        let records = match store
            .acquire(&self.host.id, &ids, now, self.lease_until(now))
            .await
        {
            Ok(records) => records,
            Err(e) => {
                tracing::warn!(error = %e, "loading instances whose points were refused failed; they are delivered again");
                self.release_after_failure(&ids, &failed).await;
                return;
            }
        };
        let mut suspends = Vec::with_capacity(records.len());
        let mut loaded = HashSet::new();
        for record in records {
            let Some((point, error)) = refused.iter().find(|(p, _)| p.instance_id == record.id)
            else {
                continue;
            };
            let text = FaultText(refusal_text(point, error));
            tracing::warn!(instance.id = %record.id, orchestration.name = %record.orchestration,
                error = %text.0, "persistence point refused; suspending the instance at its last one");
            self.stats.faults += 1;
            let Some(def) = self
                .host
                .registry
                .get(&record.orchestration, record.version)
                .cloned()
            else {
                continue;
            };
            let mut suspend = match LiveInstance::load(record, def) {
                Ok(mut instance) => instance.fault_point(&text, &self.host.id, now),
                Err(fault) => {
                    let mut fault = *fault;
                    let mut point = fault.instance.fault_point(&fault.error, &self.host.id, now);
                    point.resumable = false;
                    point
                }
            };
            suspend
                .failed
                .extend(point.consumed.iter().chain(&point.failed).copied());
            loaded.insert(suspend.instance_id);
            suspends.push(suspend);
        }
        let unloaded: Vec<Uuid> = ids.into_iter().filter(|id| !loaded.contains(id)).collect();
        if !unloaded.is_empty() {
            self.release_after_failure(&unloaded, &failed).await;
        }
        if suspends.is_empty() {
            return;
        }
        let written = commit_isolating(store.as_ref(), &suspends).await;
        let mut back = Vec::new();
        let mut back_failed = Vec::new();
        for (suspend, written) in suspends.into_iter().zip(written) {
            match written {
                Written::Outcome(CommitOutcome::Committed) => self.committed(suspend),
                Written::Outcome(CommitOutcome::Fenced) => back.push(suspend.instance_id),
                Written::Refused(error) => {
                    tracing::error!(instance.id = %suspend.instance_id, %error,
                        "the suspension of an instance whose point was refused was refused too; its messages are delivered again");
                    back.push(suspend.instance_id);
                    back_failed.extend(suspend.failed);
                }
                Written::Unwritten => {
                    back.push(suspend.instance_id);
                    back_failed.extend(suspend.failed);
                }
            }
        }
        if !back.is_empty() {
            self.release_after_failure(&back, &back_failed).await;
        }
    }

    /// Counts a committed point, reports its instance's end, and hands its sends to the
    /// dispatcher.
    pub(super) fn committed(&mut self, point: PersistencePoint) {
        *self.stats.points.entry(point.reason.as_str()).or_default() += 1;
        if let Some(metrics) = &self.host.metrics {
            metrics.point(point.reason.as_str());
        }
        if let Some(endings) = &self.host.endings {
            if point.status.is_final() || point.status == InstanceStatus::Suspended {
                let _ = endings.send(Ended {
                    instance_id: point.instance_id,
                    status: point.status,
                });
            }
        }
        for row in point.outbox {
            // The dispatcher only goes away at shutdown; the row stays in the outbox.
            let _ = self.to_dispatch.send(row);
        }
    }

    /// Gives back what this host claimed for `ids`; the messages in `failed` keep their
    /// delivery count.
    pub(super) async fn release_after_failure(&self, ids: &[Uuid], failed: &[i64]) {
        let mut wait = Duration::from_millis(100);
        for _ in 0..20 {
            match self.host.store.unlock(&self.host.id, ids, failed).await {
                Ok(()) => return,
                Err(e) => {
                    tracing::warn!(error = %e, "releasing claimed messages failed; retrying");
                    tokio::time::sleep(wait).await;
                    wait = (wait * 2).min(Duration::from_secs(5));
                }
            }
        }
        tracing::error!(
            "could not release claimed messages; they are released at the next host start"
        );
    }
}
