//! The dispatcher: delivers committed sends to their ports, with retry, backoff and dead letters.
//!
//! It takes outbox rows two ways: straight from the host loop right after the persistence point
//! that wrote them has committed (they are already locked to this host), and by polling the outbox
//! for rows whose retry is due or whose lock expired (a host died mid-delivery). Outcomes are
//! recorded in batches; a reply to a request is published in the same transaction that marks the
//! request delivered, so that a reply is never lost nor doubled.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use tokio::sync::{mpsc, Notify, Semaphore};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::ports::{OutboundMessage, PortKind, Ports};
use crate::clock::SharedClock;
use crate::store::{DeliveryOutcome, NewMessage, OutboxRow, PublishOutcome, Store};

/// Settings the dispatcher needs from the host.
#[derive(Debug, Clone)]
pub(crate) struct DispatchSettings {
    pub host: String,
    pub poll_interval: Duration,
    pub outbox_lock: Duration,
    pub concurrency: usize,
    pub drain_timeout: Duration,
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
}

impl Dispatcher {
    pub async fn run(self, mut rows: mpsc::UnboundedReceiver<OutboxRow>, stop: CancellationToken) {
        let limit = Arc::new(Semaphore::new(self.settings.concurrency));
        let mut deliveries: JoinSet<DeliveryOutcome> = JoinSet::new();
        let mut done: Vec<DeliveryOutcome> = Vec::new();
        let mut poll = tokio::time::interval(self.settings.poll_interval);
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
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
                    self.record(&mut done).await;
                }
                Some(row) = rows.recv() => {
                    self.in_flight.fetch_add(1, Ordering::SeqCst);
                    self.spawn(&mut deliveries, &limit, row);
                    while let Ok(row) = rows.try_recv() {
                        self.in_flight.fetch_add(1, Ordering::SeqCst);
                        self.spawn(&mut deliveries, &limit, row);
                    }
                }
                _ = poll.tick() => {
                    let now = self.clock.now();
                    let lock_until = now + chrono::Duration::from_std(self.settings.outbox_lock).unwrap_or_default();
                    match self.store.claim_outbox(&self.settings.host, now, lock_until, 256).await {
                        Ok(claimed) => {
                            for row in claimed {
                                self.in_flight.fetch_add(1, Ordering::SeqCst);
                                self.spawn(&mut deliveries, &limit, row);
                            }
                        }
                        Err(e) => tracing::warn!(error = %e, "claiming due sends failed; will retry"),
                    }
                }
            }
        }
        // Drain: let running deliveries finish for a while and record them; whatever is left
        // stays locked in the outbox and is delivered again after the lock expires.
        let deadline = tokio::time::sleep(self.settings.drain_timeout);
        tokio::pin!(deadline);
        while !deliveries.is_empty() {
            tokio::select! {
                _ = &mut deadline => break,
                Some(result) = deliveries.join_next() => {
                    if let Ok(outcome) = result {
                        done.push(outcome);
                    }
                }
            }
        }
        self.record(&mut done).await;
        deliveries.abort_all();
    }

    fn spawn(&self, set: &mut JoinSet<DeliveryOutcome>, limit: &Arc<Semaphore>, row: OutboxRow) {
        let Some(port) = self.ports.by_name.get(&row.port).cloned() else {
            let error = format!("send port {:?} is not configured in this host", row.port);
            set.spawn(async move { DeliveryOutcome::Dead { row, error } });
            return;
        };
        let store = self.store.clone();
        let clock = self.clock.clone();
        let limit = limit.clone();
        set.spawn(async move {
            let _permit = limit.acquire_owned().await;
            let message = OutboundMessage {
                id: row.id.clone(),
                instance_id: row.instance_id,
                port: row.port.clone(),
                message_type: row.message_type.clone(),
                body: row.body.clone(),
                expects_reply: row.expects_reply,
                attempt: row.attempts,
            };
            let result = match &port.kind {
                PortKind::Adapter(adapter) => adapter.deliver(message).await,
                PortKind::Loopback => loopback(store.as_ref(), &message, clock.now()).await,
            };
            match result {
                Ok(reply) => DeliveryOutcome::Delivered {
                    reply: if row.expects_reply {
                        Some(reply.unwrap_or(serde_json::Value::Null))
                    } else {
                        None
                    },
                    row,
                },
                Err(e) if e.retryable && row.attempts + 1 < port.retry.max_attempts => {
                    let wait = port.retry.backoff(row.attempts + 1);
                    let retry_at = clock.now() + chrono::Duration::from_std(wait).unwrap_or_default();
                    tracing::debug!(message.id = %row.id, port = %row.port, error = %e, "send failed; retrying");
                    DeliveryOutcome::Retry {
                        error: e.message,
                        retry_at,
                        row,
                    }
                }
                Err(e) => {
                    tracing::warn!(message.id = %row.id, port = %row.port, instance.id = %row.instance_id,
                        error = %e, "send dead-lettered");
                    DeliveryOutcome::Dead {
                        error: format!("after {} attempt(s): {}", row.attempts + 1, e.message),
                        row,
                    }
                }
            }
        });
    }

    async fn record(&self, done: &mut Vec<DeliveryOutcome>) {
        if done.is_empty() {
            return;
        }
        let batch = std::mem::take(done);
        let count = batch.len();
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
                .map(|o| !matches!(o, PublishOutcome::Unrouted));
            Ok(Some(
                serde_json::json!({ "published": message.id, "routed": routed }),
            ))
        }
        Err(e) => Err(super::ports::PortError::transient(e.to_string())),
    }
}
