//! The host loop: the [`Runner`] owns the instances in memory and runs one round after another
//! (apply controls, claim messages and timers, rehydrate, deliver, group commit), waits for work
//! between rounds, and writes the shutdown points when the host stops.
//!
//! Its parts, by concern: `runner/deliver.rs` takes work to the instances in memory (rehydration,
//! eager starts, replies and timers in memory, poison protection, dehydration, new receives),
//! `runner/controls.rs` polls the `control` and `inbox` tables and does the housekeeping, and
//! `host/commit.rs` commits a round's points. How the loop is started and stopped is
//! [`Host::run`](super::Host::run).

mod controls;
mod deliver;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use tokio::sync::{mpsc, Notify};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::commit::Committing;
use super::eager::Handed;
use super::instance::LiveInstance;
use super::ports::Ports;
use super::{Host, HostError, HostStats};
use crate::store::{Claimed, DueTimer, OutboxRow, Reason, StoreError, StoredMessage};

/// A group of at most this many points is waited for before the loop goes on: the latency path
/// (a lone caller's instance), where going on to another round first cost W2 more (5 %) than the
/// pipeline gains.
const INLINE_POINTS: usize = 8;

/// The host loop's state: the instances in memory and what it keeps between rounds.
pub(super) struct Runner {
    pub(super) host: Host,
    ports: Ports,
    pub(super) cache: HashMap<Uuid, LiveInstance>,
    unrunnable: HashSet<Uuid>,
    /// Instances that may hold receives not yet written to the database.
    unwritten: HashSet<Uuid>,
    pub(super) to_dispatch: mpsc::UnboundedSender<OutboxRow>,
    /// Replies of requests delivered by this host's dispatcher, for the instances in memory.
    replies: mpsc::UnboundedReceiver<(OutboxRow, serde_json::Value)>,
    /// A reply taken off `replies` while waiting for work, handed over first next round.
    early_reply: Option<(OutboxRow, serde_json::Value)>,
    /// Instances this host's clients started for it, leased to it, start messages claimed.
    pub(super) held_starts: mpsc::UnboundedReceiver<Vec<Handed>>,
    /// How many wait in `held_starts` (its clients stop handing over more past a batch).
    held_waiting: Arc<AtomicUsize>,
    /// Held starts taken off `held_starts` while waiting for work, run first next round.
    early_starts: Vec<Handed>,
    in_flight: Arc<AtomicUsize>,
    pub(super) stats: HostStats,
    last_report: Instant,
    last_control: Option<Instant>,
    last_inbox: Option<Instant>,
    last_housekeeping: Option<Instant>,
    /// When messages were last claimed from the store: at least every poll interval, whatever
    /// else keeps the host busy.
    last_claim: Option<Instant>,
    /// When timers were last claimed from the store.
    last_timer_claim: Option<Instant>,
    /// The earliest timer this host wrote to the store since it last claimed timers.
    pub(super) timer_due: Option<DateTime<Utc>>,
    /// Whether the store may hold work for this host that the next round must claim: set by a
    /// wake-up (a publish, a start, a recorded delivery, a NOTIFY), by a round that claimed
    /// something or wrote something a claim could find, and by the poll interval.
    pub(super) claim: bool,
    /// Whether timers must be claimed at the next claim (an operator's request applied, or
    /// instances given back).
    claim_timers: bool,
    /// Instances dropped from memory this round because a transition panicked on a message:
    /// their locks go back, the message keeping its delivery count.
    panicked: Vec<(Uuid, i64)>,
    /// The last panic of each message that panicked, named when it is suspended as poison.
    last_panic: HashMap<i64, String>,
    /// The group commit under way while this round takes the next group's work.
    pub(super) committing: Option<Committing>,
}

/// Work claimed for one instance in one round, in arrival order.
pub(super) enum Work {
    Message(StoredMessage),
    Timer(DueTimer),
    /// A reply the dispatcher handed over, not stored as a message.
    Reply(OutboxRow, serde_json::Value),
}

impl Runner {
    /// The loop of `host`, which sends committed sends to `to_dispatch`, takes replies from
    /// `replies` and its clients' starts from `held_starts` (`held_waiting` of them waiting),
    /// and counts deliveries under way in `in_flight`.
    pub(super) fn new(
        host: Host,
        to_dispatch: mpsc::UnboundedSender<OutboxRow>,
        replies: mpsc::UnboundedReceiver<(OutboxRow, serde_json::Value)>,
        held_starts: mpsc::UnboundedReceiver<Vec<Handed>>,
        held_waiting: Arc<AtomicUsize>,
        in_flight: Arc<AtomicUsize>,
    ) -> Self {
        Runner {
            ports: host.ports.clone(),
            host,
            cache: HashMap::new(),
            unrunnable: HashSet::new(),
            unwritten: HashSet::new(),
            to_dispatch,
            replies,
            early_reply: None,
            held_starts,
            held_waiting,
            early_starts: Vec::new(),
            in_flight,
            stats: HostStats::default(),
            last_report: Instant::now(),
            last_control: None,
            last_inbox: None,
            last_housekeeping: None,
            last_claim: None,
            last_timer_claim: None,
            timer_due: None,
            claim: true,
            claim_timers: true,
            panicked: Vec::new(),
            last_panic: HashMap::new(),
            committing: None,
        }
    }

    /// Runs rounds until `shutdown` is cancelled (or, with `until_idle`, no work is left).
    pub(super) async fn run_loop(&mut self, shutdown: &CancellationToken) -> Result<(), HostError> {
        let mut backoff = Duration::from_millis(100);
        let wake = self.host.wake.clone();
        loop {
            if shutdown.is_cancelled() {
                return Ok(());
            }
            // A wake-up that came while the last round ran: the store may have work.
            if woken(&wake).await {
                self.claim = true;
            }
            match self.round().await {
                Ok(worked) => {
                    backoff = Duration::from_millis(100);
                    self.report();
                    if worked {
                        continue;
                    }
                    if self.committing.is_some() {
                        // The pipeline: nothing to do but a group commit on disk. Whichever
                        // comes first, the commit's end or new work, starts the next round.
                        tokio::select! {
                            biased;
                            _ = shutdown.cancelled() => return Ok(()),
                            finished = Committing::finished(&mut self.committing) => {
                                self.settle_finished(finished).await;
                            }
                            Some(reply) = self.replies.recv() => {
                                self.early_reply = Some(reply);
                            }
                            Some(starts) = self.held_starts.recv() => self.took_starts(starts),
                            _ = wake.notified() => {
                                self.claim = true;
                            }
                        }
                        continue;
                    }
                    if self.host.config.until_idle && self.is_idle().await {
                        tracing::info!("no work left; stopping (--until-idle)");
                        return Ok(());
                    }
                    // A reply handed over in memory needs no claim: it wakes the host through
                    // its channel. Anything else that may have put work in the store notifies.
                    tokio::select! {
                        biased;
                        _ = shutdown.cancelled() => return Ok(()),
                        Some(reply) = self.replies.recv() => {
                            self.early_reply = Some(reply);
                        }
                        Some(starts) = self.held_starts.recv() => self.took_starts(starts),
                        _ = wake.notified() => {
                            self.claim = true;
                        }
                        _ = tokio::time::sleep(self.host.config.poll_interval) => {
                            self.claim = true;
                        }
                    }
                }
                Err(e) if e.is_retryable() => {
                    self.claim = true;
                    tracing::warn!(error = %e, retry_in = ?backoff, "store unavailable; backing off");
                    tokio::select! {
                        _ = shutdown.cancelled() => return Ok(()),
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
                Err(e) => {
                    self.claim = true;
                    tracing::error!(error = %e, "store error; backing off");
                    tokio::select! {
                        _ = shutdown.cancelled() => return Ok(()),
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
    }

    fn report(&mut self) {
        if self.last_report.elapsed() >= Duration::from_secs(10) {
            self.last_report = Instant::now();
            tracing::info!(in_memory = self.cache.len(), events = self.stats.events,
                points = ?self.stats.points, fenced = self.stats.fenced, faults = self.stats.faults,
                sends_in_flight = self.in_flight.load(Ordering::SeqCst), "progress");
        }
    }

    pub(super) fn lease_until(&self, now: DateTime<Utc>) -> DateTime<Utc> {
        now + chrono::Duration::from_std(self.host.config.lease_duration).unwrap_or_default()
    }

    /// One round: claim, run, commit. Returns whether anything was done.
    async fn round(&mut self) -> Result<bool, StoreError> {
        let store = self.host.store.clone();
        let host = self.host.id.clone();
        let now = self.host.clock.now();
        let batch = self.host.config.batch_size;
        // A commit that ended since the last round: its sends go to the ports now.
        if self.committing.as_ref().is_some_and(Committing::has_ended) {
            self.settle().await;
        }
        let controlled = self.apply_controls(now).await?;
        let received = self.take_inbox(now).await?;
        self.housekeeping(now).await?;
        let poll = self.host.config.poll_interval;
        if controlled {
            // An instance resumed may have a timer due.
            self.claim_timers = true;
        }
        if controlled
            || received
            || self.last_claim.is_none_or(|at| at.elapsed() >= poll)
            || self.timer_due.is_some_and(|t| t <= now)
        {
            self.claim = true;
        }
        let (messages, timers) = if self.claim {
            self.claim = false;
            self.last_claim = Some(Instant::now());
            let claimed_at = Instant::now();
            let messages = match store.claim_messages(&host, now, batch).await {
                Ok(messages) => messages,
                Err(e) => {
                    self.claim = true;
                    return Err(e);
                }
            };
            if let Some(metrics) = &self.host.metrics {
                metrics.claim(claimed_at.elapsed());
            }
            let timers = if self.claim_timers
                || self.last_timer_claim.is_none_or(|at| at.elapsed() >= poll)
                || self.timer_due.is_some_and(|t| t <= now)
            {
                let timers_at = Instant::now();
                let claimed = store.claim_timers(&host, now, batch).await;
                if let Some(metrics) = &self.host.metrics {
                    metrics.claim(timers_at.elapsed());
                }
                match claimed {
                    Ok(timers) => {
                        self.claim_timers = false;
                        self.last_timer_claim = Some(Instant::now());
                        self.timer_due = self.timer_due.filter(|t| *t > now);
                        timers
                    }
                    Err(e) => {
                        self.claim = true;
                        self.give_back(messages.iter().map(|m| m.instance_id)).await;
                        return Err(e);
                    }
                }
            } else {
                Claimed::default()
            };
            (messages, timers)
        } else {
            (Claimed::default(), Claimed::default())
        };
        let mut points = Vec::new();
        let mut work: Vec<(Uuid, Work)> = self.take_held_starts(now, &mut points);
        let worked = !messages.is_empty() || !timers.is_empty() || !work.is_empty();
        // A full claim: there may be more. (Less is all there was; what is published since
        // wakes the host.)
        if messages.more || timers.more {
            self.claim = true;
        }

        work.reserve(messages.len() + timers.len());
        let held = work.len();
        work.extend(
            messages
                .into_iter()
                .map(|m| (m.instance_id, Work::Message(m))),
        );
        work.extend(timers.into_iter().map(|t| (t.instance_id, Work::Timer(t))));
        if work.iter().any(|(id, _)| self.is_committing(id)) {
            self.settle().await;
        }
        if work.len() > held {
            if let Err(e) = self.rehydrate(&work[held..], now, &mut points).await {
                self.claim = true;
                self.give_back(work.iter().map(|(id, _)| *id)).await;
                return Err(e);
            }
        }
        for (id, item) in work {
            self.unwritten.insert(id);
            self.deliver(id, item, now, &mut points);
        }
        let replied = self.take_replies(now, &mut points).await;
        let fired = self.fire_memory_timers(now, &mut points);
        self.dehydrate_idle(now, &mut points);
        // The pipeline: this group's commit runs while the next rounds take their work (the
        // loop waits for the commit's end or new work, whichever comes first).
        let committed = !points.is_empty();
        if committed && points.len() <= INLINE_POINTS {
            self.commit(points).await;
        } else if committed {
            self.begin_commit(points).await;
        }
        self.retry_panicked().await;
        self.write_receives(now).await;
        if let Some(metrics) = &self.host.metrics {
            metrics.in_memory(self.cache.len());
        }
        Ok(worked || fired || controlled || received || replied || committed)
    }

    /// Whether `id`'s last point is in the group commit under way: it gets no work until that
    /// commit is settled.
    pub(super) fn is_committing(&self, id: &Uuid) -> bool {
        self.committing.as_ref().is_some_and(|c| c.holds(id))
    }

    /// Gives back what a failed round claimed for instances not in memory, so that it is not
    /// left locked to this host.
    async fn give_back(&self, claimed: impl Iterator<Item = Uuid>) {
        let mut ids: Vec<Uuid> = claimed.filter(|id| !self.cache.contains_key(id)).collect();
        ids.sort();
        ids.dedup();
        self.release_after_failure(&ids, &[]).await;
    }

    async fn is_idle(&self) -> bool {
        if self.in_flight.load(Ordering::SeqCst) > 0
            || !self.replies.is_empty()
            || self.early_reply.is_some()
            || !self.held_starts.is_empty()
            || !self.early_starts.is_empty()
        {
            return false;
        }
        let now = self.host.clock.now();
        let horizon =
            now + chrono::Duration::from_std(self.host.config.idle_horizon).unwrap_or_default();
        if self
            .cache
            .values()
            .any(|i| i.next_timer().is_some_and(|t| t <= horizon))
        {
            return false;
        }
        match self.host.store.activity(now).await {
            Ok(a) => {
                a.ready_messages == 0
                    && a.pending_sends == 0
                    && a.next_timer_at.is_none_or(|t| t > horizon)
            }
            Err(_) => false,
        }
    }

    /// The shutdown persistence point for every instance held that changed since its last one.
    pub(super) async fn shutdown(&mut self) {
        self.settle().await;
        let now = self.host.clock.now();
        let mut points = Vec::new();
        let ids: Vec<Uuid> = self.cache.keys().copied().collect();
        for id in ids {
            let Some(mut instance) = self.cache.remove(&id) else {
                continue;
            };
            if !instance.is_dirty() || instance.in_atomic_scope() {
                // Unchanged, or halfway through an atomic scope: it resumes from its last point.
                continue;
            }
            match self.point(&mut instance, Reason::Shutdown, now) {
                Ok(point) => points.push(point),
                Err(text) => points.push(instance.fault_point(&text, &self.host.id, now)),
            }
        }
        let saved = points.len();
        if !points.is_empty() {
            self.commit(points).await;
        }
        tracing::info!(
            saved,
            "shutdown: saved the instances that changed since their last persistence point"
        );
    }
}

/// Takes a wake-up that came while the host was busy, without waiting for one.
async fn woken(wake: &Notify) -> bool {
    tokio::select! {
        biased;
        _ = wake.notified() => true,
        _ = std::future::ready(()) => false,
    }
}
