//! Taking work to the instances in memory: rehydrating the instances claimed work is for (taking
//! their leases), taking the instances this host's clients started for it, delivering messages,
//! timers and replies to them (with poison protection), firing timers and handing over replies
//! that exist only in memory, dehydrating idle instances, and writing the subscriptions of
//! receives declared between persistence points.

use std::collections::HashSet;
use std::sync::atomic::Ordering;

use chrono::{DateTime, Utc};
use uuid::Uuid;

use super::{Runner, Work};
use crate::host::eager::{Handed, Written};
use crate::host::instance::{Delivery, FaultText, LiveInstance};
use crate::store::{
    CommitOutcome, DueTimer, HeldStart, InstanceRecord, NewReceives, PersistencePoint, Reason,
    StoreError,
};

impl Runner {
    /// Takes the instances this host's clients started for it (they are leased to it, their
    /// start messages claimed) into memory; returns their start messages, to be delivered. At
    /// most a batch ([`HostConfig::batch_size`](crate::HostConfig::batch_size)) a round, as claims, so that one `start_many`
    /// of many instances does not make one huge group commit; the rest wait for the next round.
    pub(super) fn take_held_starts(
        &mut self,
        now: DateTime<Utc>,
        points: &mut Vec<PersistencePoint>,
    ) -> Vec<(Uuid, Work)> {
        let limit = (self.host.config.batch_size as usize).max(1);
        while self.early_starts.len() < limit {
            match self.held_starts.try_recv() {
                Ok(more) => self.took_starts(more),
                Err(_) => break,
            }
        }
        let mut starts = std::mem::take(&mut self.early_starts);
        if starts.len() > limit {
            self.early_starts = starts.split_off(limit);
        }
        let mut work = Vec::with_capacity(starts.len());
        for handed in starts {
            match handed {
                Handed::Held(held) => {
                    let HeldStart { record, message } = *held;
                    let id = record.id;
                    match self.adopt(record, now, points) {
                        Ok(()) => work.push((id, Work::Message(message))),
                        // The client resolved the definition in this host's registry.
                        Err((id, error)) => tracing::warn!(instance.id = %id, "{error}"),
                    }
                }
                Handed::Written(written) => {
                    let Written { instance, point } = *written;
                    self.stats.events += 1;
                    if let Some(instance) = instance {
                        self.cache.insert(instance.id, instance);
                    }
                    self.committed(point);
                }
            }
        }
        work
    }

    /// Keeps held starts taken off the channel for the next round; its clients may hand over
    /// as many more.
    pub(super) fn took_starts(&mut self, starts: Vec<Handed>) {
        self.held_waiting.fetch_sub(starts.len(), Ordering::SeqCst);
        self.early_starts.extend(starts);
    }

    /// Takes the leases of instances that have work and are not in memory, and loads them.
    pub(super) async fn rehydrate(
        &mut self,
        work: &[(Uuid, Work)],
        now: DateTime<Utc>,
        points: &mut Vec<PersistencePoint>,
    ) -> Result<(), StoreError> {
        let mut missing: Vec<Uuid> = work
            .iter()
            .map(|(id, _)| *id)
            .filter(|id| !self.cache.contains_key(id) && !self.unrunnable.contains(id))
            .collect();
        missing.sort();
        missing.dedup();
        if missing.is_empty() {
            return Ok(());
        }
        let store = self.host.store.clone();
        // Only counted when metrics are kept: a read more per rehydration (none on SQLite).
        let expired = match &self.host.metrics {
            Some(_) => store
                .expired_elsewhere(&self.host.id, &missing, now)
                .await
                .unwrap_or_default(),
            None => Vec::new(),
        };
        let records = store
            .acquire(&self.host.id, &missing, now, self.lease_until(now))
            .await?;
        let acquired: HashSet<Uuid> = records.iter().map(|r| r.id).collect();
        if let Some(metrics) = &self.host.metrics {
            let taken = expired.iter().filter(|id| acquired.contains(id)).count();
            if taken > 0 {
                metrics.takeovers(taken as u64);
            }
        }
        let not_ours: Vec<Uuid> = missing
            .into_iter()
            .filter(|id| !acquired.contains(id))
            .collect();
        if !not_ours.is_empty() {
            store.unlock(&self.host.id, &not_ours, &[]).await?;
        }
        for record in records {
            if let Err(error) = self.adopt(record, now, points) {
                store.note_unrunnable(error.0, &error.1, now).await?;
                self.unrunnable.insert(error.0);
            }
        }
        Ok(())
    }

    /// Loads an instance this host holds into memory, or, if it cannot be read, makes the point
    /// that suspends it. An instance of a definition this host does not have is returned with
    /// the error to record.
    fn adopt(
        &mut self,
        record: InstanceRecord,
        now: DateTime<Utc>,
        points: &mut Vec<PersistencePoint>,
    ) -> Result<(), (Uuid, String)> {
        let Some(def) = self
            .host
            .registry
            .get(&record.orchestration, record.version)
            .cloned()
        else {
            let error = format!(
                "orchestration {:?} version {} is not registered in host {}; start a host whose build \
                 registers it (`cairn versions` shows which do), move the instance with `cairn upgrade \
                 {} --to VERSION`, or `cairn terminate {}`",
                record.orchestration, record.version, self.host.id, record.orchestration, record.id
            );
            tracing::warn!(instance.id = %record.id, orchestration.name = %record.orchestration,
                orchestration.version = record.version, "{error}");
            return Err((record.id, error));
        };
        match LiveInstance::load(record, def) {
            Ok(mut instance) => {
                instance.count_in(self.host.metrics.as_ref());
                self.cache.insert(instance.id, instance);
            }
            Err(fault) => {
                let mut fault = *fault;
                tracing::warn!(instance.id = %fault.instance.id, error = %fault.error.0, "instance cannot be loaded; suspending it");
                self.stats.faults += 1;
                let mut point = fault.instance.fault_point(&fault.error, &self.host.id, now);
                point.resumable = false;
                points.push(point);
            }
        }
        Ok(())
    }

    /// Delivers one item of work to instance `id` if it is in memory, then the messages it held
    /// back, as long as the instance stays: the points due go to `points`.
    pub(super) fn deliver(
        &mut self,
        id: Uuid,
        item: Work,
        now: DateTime<Utc>,
        points: &mut Vec<PersistencePoint>,
    ) {
        let Some(mut instance) = self.cache.remove(&id) else {
            return; // not ours, unrunnable, or ended earlier in this round
        };
        let registry = &self.host.registry;
        let ports = &self.ports;
        let has_port = |name: &str| ports.contains(name);
        let mut queue = vec![item];
        let mut keep = true;
        while let Some(item) = queue.pop() {
            self.stats.events += 1;
            let max_deliveries = i64::from(self.host.config.max_deliveries);
            let delivery = match item {
                Work::Message(msg) if msg.delivery_count > max_deliveries => {
                    instance.mark_failed(msg.seq);
                    let last = self
                        .last_panic
                        .remove(&msg.seq)
                        .map(|p| format!(" The last attempt: {p}."))
                        .unwrap_or_default();
                    Delivery::Faulted(FaultText(format!(
                        "poison message: message {} ({}) was delivered {} times without being consumed; each \
                         delivery crashed the host, panicked or failed the instance (the limit is {max_deliveries}).{last} \
                         Fix the cause and resume the instance, or terminate it",
                        msg.id, msg.message_type, msg.delivery_count - 1
                    )))
                }
                Work::Message(msg) => instance.deliver_message(msg, registry, &has_port, now),
                Work::Timer(t) => instance.deliver_timer(&t.name, registry, &has_port, now),
                Work::Reply(row, body) => {
                    instance.deliver_reply(&row, body, registry, &has_port, now)
                }
            };
            let point = match delivery {
                Delivery::Held => continue,
                Delivery::Ran(None) => None,
                Delivery::Ran(Some(reason)) => Some(self.point(&mut instance, reason, now)),
                Delivery::Faulted(text) => Some(Err(text)),
                Delivery::Panicked { error, seq } => {
                    tracing::warn!(instance.id = %instance.id, orchestration.name = instance.orchestration(),
                        error = %error.0, "transition panicked; the message is delivered again from the last persistence point");
                    self.stats.faults += 1;
                    self.panicked.push((instance.id, seq));
                    if self.last_panic.len() < 10_000 {
                        self.last_panic.insert(seq, error.0);
                    }
                    keep = false;
                    break;
                }
            };
            match point {
                None => {}
                Some(Ok(point)) => {
                    keep = !point.release;
                    points.push(point);
                }
                Some(Err(text)) => {
                    tracing::warn!(instance.id = %instance.id, orchestration.name = instance.orchestration(),
                        error = %text.0, "transition failed; suspending the instance at its last persistence point");
                    self.stats.faults += 1;
                    points.push(instance.fault_point(&text, &self.host.id, now));
                    keep = false;
                }
            }
            if !keep {
                break;
            }
            // The waits may have changed: offer held messages again, oldest first.
            let mut held = instance.take_held();
            held.reverse();
            queue.extend(held.into_iter().map(Work::Message));
        }
        if keep {
            self.cache.insert(id, instance);
        }
    }

    pub(super) fn point(
        &self,
        instance: &mut LiveInstance,
        reason: Reason,
        now: DateTime<Utc>,
    ) -> Result<PersistencePoint, FaultText> {
        let lock_until =
            now + chrono::Duration::from_std(self.host.config.outbox_lock).unwrap_or_default();
        instance.persistence_point(reason, &self.host.id, now, lock_until)
    }

    pub(super) fn dehydrate_idle(
        &mut self,
        now: DateTime<Utc>,
        points: &mut Vec<PersistencePoint>,
    ) {
        let threshold = self.host.config.dehydrate_after;
        let idle: Vec<Uuid> = self
            .cache
            .values()
            // An instance inside an atomic scope is never saved halfway through it; one whose
            // point is being committed waits for that commit.
            .filter(|i| {
                i.last_active.elapsed() >= threshold
                    && !i.in_atomic_scope()
                    && !self.is_committing(&i.id)
            })
            .map(|i| i.id)
            .collect();
        for id in idle {
            if let Some(mut instance) = self.cache.remove(&id) {
                match self.point(&mut instance, Reason::Dehydrate, now) {
                    Ok(point) => points.push(point),
                    Err(text) => points.push(instance.fault_point(&text, &self.host.id, now)),
                }
            }
        }
    }

    /// Hands replies the dispatcher took to the instances in memory; a reply for an instance
    /// this host does not hold is recorded as a message, as any reply used to be.
    pub(super) async fn take_replies(
        &mut self,
        now: DateTime<Utc>,
        points: &mut Vec<PersistencePoint>,
    ) -> bool {
        let mut elsewhere = Vec::new();
        let mut any = false;
        while let Some((row, reply)) = self
            .early_reply
            .take()
            .or_else(|| self.replies.try_recv().ok())
        {
            any = true;
            if self.is_committing(&row.instance_id) {
                self.settle().await;
            }
            if self.cache.contains_key(&row.instance_id) {
                self.unwritten.insert(row.instance_id);
                self.deliver(row.instance_id, Work::Reply(row, reply), now, points);
            } else {
                elsewhere.push(crate::store::DeliveryOutcome::Delivered {
                    row,
                    reply: Some(reply),
                    via_backup: false,
                });
            }
        }
        if !elsewhere.is_empty() {
            // Recorded as messages, to be claimed.
            self.claim = true;
            if let Err(e) = self.host.store.record_deliveries(elsewhere, now).await {
                // The requests stay pending under their locks and are delivered again.
                tracing::warn!(error = %e, "recording replies failed; the requests will be sent again");
            }
        }
        any
    }

    /// Fires due timers of instances in memory: a delay declared without a persistence point
    /// since exists only here. (A timer fires once: the first delivery cancels the wait, so the
    /// same timer claimed from the database later is dropped.)
    pub(super) fn fire_memory_timers(
        &mut self,
        now: DateTime<Utc>,
        points: &mut Vec<PersistencePoint>,
    ) -> bool {
        let due: Vec<DueTimer> = self
            .cache
            .values()
            .flat_map(|i| {
                i.waits()
                    .delays
                    .iter()
                    // One whose point is being committed gets its timer once that commit is
                    // settled (the loop goes on to another round then).
                    .filter(|d| d.at <= now && !self.is_committing(&i.id))
                    .map(|d| DueTimer {
                        instance_id: i.id,
                        name: d.name.clone(),
                        due_at: d.at,
                    })
            })
            .collect();
        let fired = !due.is_empty();
        for timer in due {
            self.unwritten.insert(timer.instance_id);
            self.deliver(timer.instance_id, Work::Timer(timer), now, points);
        }
        fired
    }

    /// Gives back the locks of instances dropped after a panic; the message that panicked keeps
    /// its delivery count, so that it is suspended as poison after
    /// [`HostConfig::max_deliveries`](crate::HostConfig::max_deliveries) attempts.
    pub(super) async fn retry_panicked(&mut self) {
        if self.panicked.is_empty() {
            return;
        }
        let panicked = std::mem::take(&mut self.panicked);
        // The messages go back to the store, to be claimed again.
        self.claim = true;
        let ids: Vec<Uuid> = panicked.iter().map(|(id, _)| *id).collect();
        let seqs: Vec<i64> = panicked.iter().map(|(_, seq)| *seq).collect();
        self.release_after_failure(&ids, &seqs).await;
    }

    /// Writes the subscriptions of receives declared without a persistence point, so that
    /// messages route to the instance at once rather than at its next point.
    pub(super) async fn write_receives(&mut self, now: DateTime<Utc>) {
        if self.unwritten.is_empty() {
            return;
        }
        let batch: Vec<NewReceives> = self
            .unwritten
            .iter()
            .filter_map(|id| self.cache.get(id))
            .filter_map(|i| {
                let rows = i.unwritten_receives();
                (!rows.is_empty()).then_some(NewReceives {
                    instance_id: i.id,
                    epoch: i.epoch,
                    rows,
                })
            })
            // What can never be stored waits for the instance's next point, which is refused
            // on its own (host/commit.rs).
            .filter(|receives| receives.check_storable().is_ok())
            .collect();
        if batch.is_empty() {
            self.unwritten.clear();
            return;
        }
        let store = self.host.store.clone();
        match store.subscribe(&self.host.id, &batch, now).await {
            Ok(outcomes) => {
                // New subscriptions route the unrouted messages they match.
                self.claim = true;
                self.unwritten.clear();
                let mut fenced = Vec::new();
                for (receives, outcome) in batch.iter().zip(outcomes) {
                    match outcome {
                        CommitOutcome::Committed => {
                            if let Some(i) = self.cache.get_mut(&receives.instance_id) {
                                i.receives_written(&receives.rows);
                            }
                        }
                        CommitOutcome::Fenced => {
                            self.cache.remove(&receives.instance_id);
                            fenced.push(receives.instance_id);
                        }
                    }
                }
                if !fenced.is_empty() {
                    self.release_after_failure(&fenced, &[]).await;
                }
            }
            // Kept in `unwritten`: tried again next round.
            Err(e) if e.is_retryable() => {
                tracing::warn!(error = %e, "writing new receives failed; retrying")
            }
            // Refused: the instances' next points write the same subscriptions, each alone if
            // need be.
            Err(e) => {
                tracing::warn!(error = %e, "writing new receives was refused; they are written with the instances' next points");
                self.unwritten.clear();
            }
        }
    }
}
