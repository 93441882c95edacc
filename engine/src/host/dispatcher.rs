//! The dispatcher: delivers committed sends to their ports, with leases, retry, backoff, a backup
//! transport, ordered delivery and dead letters.
//!
//! It takes outbox rows two ways: straight from the host loop right after the persistence point
//! that wrote them has committed (they are already locked to this host), and by polling the outbox
//! for rows whose retry is due or whose lock expired (a host died mid-delivery: the row is
//! delivered again under the same id). A row's lock is a lease: while its delivery runs, the
//! dispatcher renews it every third of `outbox_lock`, so that a slow target is not given the same
//! message twice by another host (or by this one's poll).
//!
//! An attempt that fails is rescheduled with the port's exponential backoff, counting attempts.
//! Once the port's attempts are spent, its backup transport (if any) gets as many again; after
//! that the message is dead-lettered and its instance told, in one transaction. Outcomes are
//! recorded in batches; a reply to a request is published in the same transaction that marks the
//! request delivered, so that a reply is never lost nor doubled.
//!
//! An ordered port has a task of its own that delivers the head of the port (its oldest open row
//! by commit order, `outbox.seq`) one at a time; a head whose attempts are spent is `held`, and
//! the port stops behind it until an operator resumes or dead-letters it.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::Utc;
use tokio::sync::{mpsc, Notify, Semaphore};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::ports::{OutboundMessage, PortConfig, PortKind, Ports};
use crate::clock::SharedClock;
use crate::store::{storable_text, DeliveryOutcome, NewMessage, OutboxRow, PublishOutcome, Store};

/// How often the dispatcher carries out dead-lettering operators asked for with SQL.
const GIVE_UP_EVERY: Duration = Duration::from_secs(1);

/// Settings the dispatcher needs from the host.
#[derive(Debug, Clone)]
pub(crate) struct DispatchSettings {
    pub host: String,
    pub poll_interval: Duration,
    pub outbox_lock: Duration,
    pub concurrency: usize,
    pub drain_timeout: Duration,
    /// When the host must be done stopping, once it is asked to: the drain ends a tenth of
    /// `drain_timeout` before, leaving that to record what finished.
    pub drain_until: Arc<std::sync::OnceLock<tokio::time::Instant>>,
}

pub(crate) struct Dispatcher {
    pub store: Arc<dyn Store>,
    pub ports: Ports,
    pub clock: SharedClock,
    pub settings: DispatchSettings,
    /// Woken after replies or failures were recorded, so that the host loop claims them.
    pub wake_host: Arc<Notify>,
    /// Rows taken and not yet recorded.
    pub in_flight: Arc<AtomicUsize>,
    /// Replies handed to the host loop rather than recorded: an instance it holds takes the
    /// reply in memory, and its next persistence point marks the request delivered.
    pub replies: mpsc::UnboundedSender<(OutboxRow, serde_json::Value)>,
    /// Where attempts are counted, when the host keeps metrics.
    pub metrics: Option<Arc<super::Metrics>>,
}

/// Ids of the rows whose delivery is running: their locks are renewed.
type Running = Arc<Mutex<BTreeSet<String>>>;

impl Dispatcher {
    pub async fn run(self, mut rows: mpsc::UnboundedReceiver<OutboxRow>, stop: CancellationToken) {
        let this = Arc::new(self);
        let running: Running = Arc::default();
        let ordered = this.ports.ordered_names();
        let mut wake_ordered: BTreeMap<String, Arc<Notify>> = BTreeMap::new();
        let mut ordered_tasks = JoinSet::new();
        for port in &ordered {
            let wake = Arc::new(Notify::new());
            wake_ordered.insert(port.clone(), wake.clone());
            ordered_tasks.spawn(this.clone().ordered_loop(
                port.clone(),
                wake,
                running.clone(),
                stop.clone(),
            ));
        }
        let limit = Arc::new(Semaphore::new(this.settings.concurrency));
        let mut deliveries: JoinSet<DeliveryOutcome> = JoinSet::new();
        let mut done: Vec<DeliveryOutcome> = Vec::new();
        let mut poll = tokio::time::interval(this.settings.poll_interval);
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut renew = tokio::time::interval(this.settings.outbox_lock / 3);
        renew.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_give_up = tokio::time::Instant::now();
        loop {
            tokio::select! {
                biased;
                _ = stop.cancelled() => break,
                Some(result) = deliveries.join_next(), if !deliveries.is_empty() => {
                    if let Ok(outcome) = result {
                        done.push(outcome);
                    }
                    while let Some(Ok(outcome)) = deliveries.try_join_next() {
                        done.push(outcome);
                    }
                    this.record(&mut done).await;
                }
                Some(row) = rows.recv() => {
                    let mut batch = vec![row];
                    while let Ok(row) = rows.try_recv() {
                        batch.push(row);
                    }
                    for row in batch {
                        if let Some(wake) = wake_ordered.get(&row.port) {
                            // Locked to this host; the port's own task delivers it in order.
                            wake.notify_one();
                        } else {
                            this.in_flight.fetch_add(1, Ordering::SeqCst);
                            this.spawn(&mut deliveries, &limit, &running, row);
                        }
                    }
                }
                _ = renew.tick() => this.renew(&running).await,
                _ = poll.tick() => {
                    let now = this.clock.now();
                    match this.store.claim_outbox(&this.settings.host, now, this.lock_until(), 256, &ordered).await {
                        Ok(claimed) => {
                            for row in claimed {
                                this.in_flight.fetch_add(1, Ordering::SeqCst);
                                this.spawn(&mut deliveries, &limit, &running, row);
                            }
                        }
                        Err(e) => tracing::warn!(error = %e, "claiming due sends failed; will retry"),
                    }
                    if last_give_up.elapsed() >= GIVE_UP_EVERY {
                        last_give_up = tokio::time::Instant::now();
                        match this.store.give_up_sends(&[], "", now).await {
                            Ok(0) => {}
                            Ok(n) => {
                                tracing::info!(count = n, "sends dead-lettered at an operator's request");
                                this.wake_host.notify_one();
                            }
                            Err(e) => tracing::warn!(error = %e, "dead-lettering sends failed; will retry"),
                        }
                    }
                }
            }
        }
        // Drain: let running deliveries finish for a while and record them; whatever is left
        // stays locked in the outbox and is delivered again after the lock expires.
        let deadline = match this.settings.drain_until.get() {
            Some(until) => tokio::time::sleep_until(
                until
                    .checked_sub(this.settings.drain_timeout / 10)
                    .unwrap_or(*until),
            ),
            None => tokio::time::sleep(this.settings.drain_timeout),
        };
        tokio::pin!(deadline);
        while !deliveries.is_empty() || !ordered_tasks.is_empty() {
            tokio::select! {
                _ = &mut deadline => break,
                Some(result) = deliveries.join_next(), if !deliveries.is_empty() => {
                    if let Ok(outcome) = result {
                        done.push(outcome);
                    }
                }
                Some(_) = ordered_tasks.join_next(), if !ordered_tasks.is_empty() => {}
            }
        }
        this.record(&mut done).await;
        deliveries.abort_all();
        ordered_tasks.abort_all();
    }

    fn lock_until(&self) -> chrono::DateTime<Utc> {
        self.clock.now() + chrono::Duration::from_std(self.settings.outbox_lock).unwrap_or_default()
    }

    /// Extends the leases of the deliveries still running.
    async fn renew(&self, running: &Running) {
        let ids: Vec<String> = match running.lock() {
            Ok(set) => set.iter().cloned().collect(),
            Err(_) => return,
        };
        if ids.is_empty() {
            return;
        }
        if let Err(e) = self
            .store
            .renew_outbox(&self.settings.host, &ids, self.lock_until())
            .await
        {
            tracing::warn!(error = %e, count = ids.len(), "renewing delivery leases failed; will retry");
        }
    }

    fn spawn(
        &self,
        set: &mut JoinSet<DeliveryOutcome>,
        limit: &Arc<Semaphore>,
        running: &Running,
        row: OutboxRow,
    ) {
        let Some(port) = self.ports.by_name.get(&row.port).cloned() else {
            let error = format!("send port {:?} is not configured in this host", row.port);
            set.spawn(async move { DeliveryOutcome::Dead { row, error } });
            return;
        };
        let store = self.store.clone();
        let clock = self.clock.clone();
        let limit = limit.clone();
        let running = running.clone();
        set.spawn(async move {
            let _permit = limit.acquire_owned().await;
            attempt(&port, row, store.as_ref(), &clock, &running).await
        });
    }

    /// Delivers one ordered port's messages one at a time, in commit order.
    async fn ordered_loop(
        self: Arc<Self>,
        port_name: String,
        wake: Arc<Notify>,
        running: Running,
        stop: CancellationToken,
    ) {
        let Some(port) = self.ports.by_name.get(&port_name).cloned() else {
            return;
        };
        loop {
            let claimed = self
                .store
                .claim_ordered(
                    &self.settings.host,
                    &port_name,
                    self.clock.now(),
                    self.lock_until(),
                )
                .await;
            let delivered = match claimed {
                Ok(Some(row)) => {
                    self.in_flight.fetch_add(1, Ordering::SeqCst);
                    let outcome = tokio::select! {
                        _ = stop.cancelled() => {
                            // The row stays locked and is delivered again after the lock expires.
                            self.in_flight.fetch_sub(1, Ordering::SeqCst);
                            return;
                        }
                        outcome = attempt(&port, row, self.store.as_ref(), &self.clock, &running) => outcome,
                    };
                    let delivered = matches!(outcome, DeliveryOutcome::Delivered { .. });
                    self.record(&mut vec![outcome]).await;
                    delivered
                }
                Ok(None) => false,
                Err(e) => {
                    tracing::warn!(error = %e, port = %port_name, "claiming an ordered send failed; will retry");
                    false
                }
            };
            if delivered {
                if stop.is_cancelled() {
                    return;
                }
                continue;
            }
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = wake.notified() => {}
                _ = tokio::time::sleep(self.settings.poll_interval) => {}
            }
        }
    }

    /// Counts finished attempts (`cairn_send_attempts_total`), and the messages the loopback
    /// port published.
    fn count(&self, metrics: &super::Metrics, done: &[DeliveryOutcome]) {
        for outcome in done {
            let (row, word) = match outcome {
                DeliveryOutcome::Delivered { row, .. } => (row, "delivered"),
                DeliveryOutcome::Retry { row, .. } => (row, "retry"),
                DeliveryOutcome::Held { row, .. } => (row, "held"),
                DeliveryOutcome::Dead { row, .. } => (row, "dead"),
            };
            metrics.send_attempt(&row.port, word);
            if word == "delivered"
                && self
                    .ports
                    .by_name
                    .get(&row.port)
                    .is_some_and(|p| matches!(p.kind, PortKind::Loopback))
            {
                metrics.published(super::metrics::Door::Loopback, 1);
            }
        }
    }

    async fn record(&self, done: &mut Vec<DeliveryOutcome>) {
        if done.is_empty() {
            return;
        }
        let count = done.len();
        if let Some(metrics) = &self.metrics {
            self.count(metrics, done);
        }
        // A reply goes straight to the host loop: one transaction less per call. Until the
        // instance's next point commits, the request stays pending under its lock; if the host
        // dies first, it is delivered again under the same id (G2).
        let mut batch = Vec::with_capacity(count);
        for outcome in std::mem::take(done) {
            match outcome {
                DeliveryOutcome::Delivered {
                    row,
                    reply: Some(reply),
                    via_backup,
                } if !via_backup && !self.replies.is_closed() => {
                    if let Err(returned) = self.replies.send((row, reply)) {
                        let (row, reply) = returned.0;
                        batch.push(DeliveryOutcome::Delivered {
                            row,
                            reply: Some(reply),
                            via_backup,
                        });
                    }
                }
                other => batch.push(other),
            }
        }
        if batch.is_empty() {
            // Only replies handed over: their channel wakes the host, with nothing to claim.
            self.in_flight.fetch_sub(count, Ordering::SeqCst);
            return;
        }
        let mut wait = Duration::from_millis(50);
        for attempt in 1.. {
            match self
                .store
                .record_deliveries(batch.clone(), self.clock.now())
                .await
            {
                Ok(()) => break,
                Err(e) if e.is_retryable() && attempt < 20 => {
                    tracing::warn!(error = %e, attempt, "recording deliveries failed; retrying");
                    tokio::time::sleep(wait).await;
                    wait = (wait * 2).min(Duration::from_secs(5));
                }
                Err(e) => {
                    // The rows stay locked in the outbox and are delivered again once the lock
                    // expires: at least once, under the same id.
                    tracing::error!(error = %e, "recording deliveries failed; they will be redelivered");
                    break;
                }
            }
        }
        self.in_flight.fetch_sub(count, Ordering::SeqCst);
        self.wake_host.notify_one();
    }
}

/// One delivery attempt of `row` through `port` (its backup once the primary's attempts are
/// spent), and what to record about it. The row's lease is renewed while the attempt runs.
async fn attempt(
    port: &PortConfig,
    row: OutboxRow,
    store: &dyn Store,
    clock: &SharedClock,
    running: &Running,
) -> DeliveryOutcome {
    let max = port.retry.max_attempts.max(1);
    let backup = port.backup.as_ref().filter(|_| row.attempts >= max);
    let message = OutboundMessage {
        id: row.id.clone(),
        instance_id: row.instance_id,
        port: row.port.clone(),
        message_type: row.message_type.clone(),
        body: row.body.clone(),
        expects_reply: row.expects_reply,
        attempt: row.attempts,
    };
    if let Ok(mut set) = running.lock() {
        set.insert(row.id.clone());
    }
    let result = match (backup, &port.kind) {
        (Some(backup), _) => backup.deliver(message).await,
        (None, PortKind::Adapter(adapter)) => adapter.deliver(message).await,
        (None, PortKind::Loopback) => loopback(store, &message, clock.now()).await,
    };
    if let Ok(mut set) = running.lock() {
        set.remove(&row.id);
    }
    let transport = if backup.is_some() {
        "backup"
    } else {
        "primary"
    };
    let next = row.attempts + 1;
    let limit = if port.backup.is_some() { 2 * max } else { max };
    match result {
        Ok(reply) => DeliveryOutcome::Delivered {
            reply: if row.expects_reply {
                Some(reply.unwrap_or(serde_json::Value::Null))
            } else {
                None
            },
            via_backup: backup.is_some(),
            row,
        },
        Err(e) if e.retryable && next < limit => {
            // The backup's attempts start their backoff afresh.
            let wait = port
                .retry
                .backoff(if next > max { next - max } else { next });
            let retry_at = clock.now() + chrono::Duration::from_std(wait).unwrap_or_default();
            tracing::debug!(message.id = %row.id, port = %row.port, transport, attempt = next,
                error = %e, "send failed; retrying");
            DeliveryOutcome::Retry {
                error: storable_text(&format!("{transport}: {}", e.message)),
                retry_at,
                row,
            }
        }
        Err(e) => {
            let error = storable_text(&format!(
                "after {next} attempt(s), {transport}: {}",
                e.message
            ));
            if port.ordered {
                tracing::warn!(message.id = %row.id, port = %row.port, instance.id = %row.instance_id,
                    error = %e, "ordered send held: the port waits for an operator");
                DeliveryOutcome::Held { row, error }
            } else {
                tracing::warn!(message.id = %row.id, port = %row.port, instance.id = %row.instance_id,
                    error = %e, "send dead-lettered");
                DeliveryOutcome::Dead { row, error }
            }
        }
    }
}

async fn loopback(
    store: &dyn Store,
    message: &OutboundMessage,
    now: chrono::DateTime<Utc>,
) -> Result<Option<serde_json::Value>, super::ports::PortError> {
    let msg = NewMessage::published(
        message.id.clone(),
        message.message_type.clone(),
        message.body.clone(),
        Default::default(),
    );
    match store.publish(vec![msg], now).await {
        Ok(outcomes) => {
            let routed = outcomes
                .first()
                .map(|o| !matches!(o, PublishOutcome::Unrouted | PublishOutcome::Zombie(_)));
            Ok(Some(
                serde_json::json!({ "published": message.id, "routed": routed }),
            ))
        }
        Err(e) => Err(super::ports::PortError::transient(e.to_string())),
    }
}
