//! A host's Prometheus metrics: what it counts and measures on its own paths (points
//! committed, transitions, publishes, send attempts, claims), and the gauges read from the store
//! at a bounded rate (instances by status, unrouted messages, dead letters, the outbox by port).
//!
//! Every host that serves metrics ([`Host::with_operations`](super::Host::with_operations)) has a
//! [`Metrics`] of its own, not a process-wide one, so that two hosts in one process (tests,
//! benchmarks) never count each other's work. A host without it pays one `Option` check per
//! place it would count. The counters are updated where the host already has the numbers: the
//! hot path takes no lock but the metric family's read lock, and allocates nothing for its
//! labels (orchestration names and reasons are `&'static str`).
//!
//! The names, their labels and the alert an operator sets on each are in `docs/operations.md`.

use std::sync::atomic::AtomicU64;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use crate::store::{StoreGauges, StoreResult};

/// `{reason}`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: &'static str,
}

/// `{orchestration,outcome}`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TransitionLabels {
    orchestration: &'static str,
    outcome: &'static str,
}

/// `{orchestration}`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OrchestrationLabel {
    orchestration: &'static str,
}

/// `{door}`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DoorLabel {
    door: &'static str,
}

/// `{orchestration,status}`, as read from the store.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct InstanceLabels {
    orchestration: String,
    status: String,
}

/// `{port}`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PortLabel {
    port: String,
}

/// `{port,outcome}`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SendLabels {
    port: String,
    outcome: &'static str,
}

/// How a transition ended, for `cairn_transitions_total{outcome}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TransitionOutcome {
    /// It ran (a fault a scope handled included).
    Ok,
    /// It failed with a fault no scope handled: the instance is suspended.
    Fault,
    /// It panicked.
    Panic,
}

impl TransitionOutcome {
    fn as_str(self) -> &'static str {
        match self {
            Self::Ok => "ok",
            Self::Fault => "fault",
            Self::Panic => "panic",
        }
    }
}

/// Where a message came in, for `cairn_messages_published_total{door}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Door {
    /// The publish API (a host's [`Client`](super::Client)).
    Api,
    /// The file drop receive location.
    File,
    /// The HTTP receive location.
    Http,
    /// The `inbox` table.
    Inbox,
    /// A send through the loopback port.
    Loopback,
}

impl Door {
    fn as_str(self) -> &'static str {
        match self {
            Self::Api => "api",
            Self::File => "file",
            Self::Http => "http",
            Self::Inbox => "inbox",
            Self::Loopback => "loopback",
        }
    }
}

fn seconds_buckets() -> Histogram {
    // 100 µs to about 52 s.
    Histogram::new(exponential_buckets(0.0001, 2.0, 20))
}

/// One host's metrics; see the module docs.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    points: Family<ReasonLabel, Counter>,
    commit_duration: Histogram,
    commit_points: Histogram,
    transitions: Family<TransitionLabels, Counter>,
    transition_duration: Family<OrchestrationLabel, Histogram, fn() -> Histogram>,
    published: Family<DoorLabel, Counter>,
    unrouted: Gauge,
    dead_letters: Gauge,
    instances: Family<InstanceLabels, Gauge>,
    in_memory: Gauge,
    outbox_pending: Family<PortLabel, Gauge>,
    outbox_oldest: Family<PortLabel, Gauge<f64, AtomicU64>>,
    send_attempts: Family<SendLabels, Counter>,
    fenced: Counter,
    takeovers: Counter,
    claim_duration: Histogram,
    purged: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Every metric, registered, at zero.
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let points = Family::default();
        registry.register(
            "cairn_persistence_points",
            "Persistence points committed, by reason",
            Family::clone(&points),
        );
        let commit_duration = seconds_buckets();
        registry.register(
            "cairn_commit_duration_seconds",
            "Time a group commit took, retries included",
            commit_duration.clone(),
        );
        let commit_points = Histogram::new(exponential_buckets(1.0, 2.0, 12));
        registry.register(
            "cairn_commit_points",
            "Persistence points per group commit",
            commit_points.clone(),
        );
        let transitions = Family::default();
        registry.register(
            "cairn_transitions",
            "Transitions run, by orchestration and outcome (ok, fault, panic)",
            Family::clone(&transitions),
        );
        let transition_duration: Family<OrchestrationLabel, Histogram, fn() -> Histogram> =
            Family::new_with_constructor(seconds_buckets);
        registry.register(
            "cairn_transition_duration_seconds",
            "Time a transition took, applying its effects included",
            transition_duration.clone(),
        );
        let published = Family::default();
        registry.register(
            "cairn_messages_published",
            "Messages this host published, by door (api, file, http, inbox, loopback)",
            Family::clone(&published),
        );
        let unrouted = Gauge::default();
        registry.register(
            "cairn_messages_unrouted",
            "Messages that matched no subscription, waiting for one or for their time to live",
            unrouted.clone(),
        );
        let dead_letters = Gauge::default();
        registry.register(
            "cairn_dead_letters",
            "Rows in the dead_letters table",
            dead_letters.clone(),
        );
        let instances = Family::default();
        registry.register(
            "cairn_instances",
            "Instances in the database, by orchestration and status",
            Family::clone(&instances),
        );
        let in_memory = Gauge::default();
        registry.register(
            "cairn_instances_in_memory",
            "Instances this host holds in memory",
            in_memory.clone(),
        );
        let outbox_pending = Family::default();
        registry.register(
            "cairn_outbox_pending",
            "Sends waiting in the outbox (pending, held or given up), by port",
            Family::clone(&outbox_pending),
        );
        let outbox_oldest = Family::default();
        registry.register(
            "cairn_outbox_oldest_seconds",
            "Age of the oldest send waiting in the outbox, by port",
            Family::clone(&outbox_oldest),
        );
        let send_attempts = Family::default();
        registry.register(
            "cairn_send_attempts",
            "Delivery attempts, by port and outcome (delivered, retry, held, dead)",
            Family::clone(&send_attempts),
        );
        let fenced = Counter::default();
        registry.register(
            "cairn_commits_fenced",
            "Persistence points refused because another host holds a newer lease epoch",
            fenced.clone(),
        );
        let takeovers = Counter::default();
        registry.register(
            "cairn_lease_takeovers",
            "Instances this host took over from a host whose lease had expired",
            takeovers.clone(),
        );
        let claim_duration = seconds_buckets();
        registry.register(
            "cairn_claim_duration_seconds",
            "Time a claim of messages or timers took",
            claim_duration.clone(),
        );
        let purged = Counter::default();
        registry.register(
            "cairn_instances_purged",
            "Ended instances this host deleted after the retention period",
            purged.clone(),
        );
        Self {
            registry,
            points,
            commit_duration,
            commit_points,
            transitions,
            transition_duration,
            published,
            unrouted,
            dead_letters,
            instances,
            in_memory,
            outbox_pending,
            outbox_oldest,
            send_attempts,
            fenced,
            takeovers,
            claim_duration,
            purged,
        }
    }

    /// The metrics in the text format Prometheus scrapes (OpenMetrics).
    pub fn render(&self) -> String {
        let mut out = String::with_capacity(8192);
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }

    /// A persistence point committed.
    pub fn point(&self, reason: &'static str) {
        self.points.get_or_create(&ReasonLabel { reason }).inc();
    }

    /// A group commit of `points` points took `took`.
    pub fn commit(&self, points: usize, took: Duration) {
        self.commit_duration.observe(took.as_secs_f64());
        self.commit_points.observe(points as f64);
    }

    /// A transition of `orchestration` ran for `took`.
    pub fn transition(
        &self,
        orchestration: &'static str,
        outcome: TransitionOutcome,
        took: Duration,
    ) {
        self.transitions
            .get_or_create(&TransitionLabels {
                orchestration,
                outcome: outcome.as_str(),
            })
            .inc();
        self.transition_duration
            .get_or_create(&OrchestrationLabel { orchestration })
            .observe(took.as_secs_f64());
    }

    /// `count` messages were published through `door`.
    pub(crate) fn published(&self, door: Door, count: usize) {
        self.published
            .get_or_create(&DoorLabel {
                door: door.as_str(),
            })
            .inc_by(count as u64);
    }

    /// A delivery attempt through `port` ended with `outcome`.
    pub fn send_attempt(&self, port: &str, outcome: &'static str) {
        self.send_attempts
            .get_or_create(&SendLabels {
                port: port.to_owned(),
                outcome,
            })
            .inc();
    }

    /// `n` points were fenced.
    pub(crate) fn fenced(&self, n: u64) {
        self.fenced.inc_by(n);
    }

    /// `n` instances were taken over from an expired lease.
    pub(crate) fn takeovers(&self, n: u64) {
        self.takeovers.inc_by(n);
    }

    /// A claim took `took`.
    pub fn claim(&self, took: Duration) {
        self.claim_duration.observe(took.as_secs_f64());
    }

    /// The host holds `n` instances in memory.
    pub fn in_memory(&self, n: usize) {
        self.in_memory.set(i64::try_from(n).unwrap_or(i64::MAX));
    }

    /// `n` ended instances were purged.
    pub(crate) fn purged(&self, n: u64) {
        self.purged.inc_by(n);
    }

    /// Sets the gauges read from the store. Label sets that are gone (an orchestration with no
    /// instance left in a status, a port with nothing waiting) are dropped.
    pub(crate) fn set_store_gauges(&self, gauges: &StoreGauges) {
        self.unrouted.set(gauges.unrouted);
        self.dead_letters.set(gauges.dead_letters);
        self.instances.clear();
        for (orchestration, status, n) in &gauges.instances {
            self.instances
                .get_or_create(&InstanceLabels {
                    orchestration: orchestration.clone(),
                    status: status.clone(),
                })
                .set(*n);
        }
        self.outbox_pending.clear();
        self.outbox_oldest.clear();
        for port in &gauges.outbox {
            let label = PortLabel {
                port: port.port.clone(),
            };
            self.outbox_pending.get_or_create(&label).set(port.pending);
            self.outbox_oldest
                .get_or_create(&label)
                .set(port.oldest_seconds);
        }
    }

    /// Reads the gauges from `store` and sets them.
    ///
    /// # Errors
    /// The store failed; the gauges keep their last values.
    pub(crate) async fn refresh(
        &self,
        store: &dyn crate::store::Store,
        now: chrono::DateTime<chrono::Utc>,
    ) -> StoreResult<()> {
        let gauges = store.gauges(now).await?;
        self.set_store_gauges(&gauges);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rendered_text_names_every_metric_of_the_issue() {
        let m = Metrics::new();
        m.point("complete");
        m.transition("order", TransitionOutcome::Ok, Duration::from_millis(1));
        m.published(Door::Api, 2);
        m.send_attempt("email", "delivered");
        // A family with no label set yet is not rendered: the store's gauges, once read.
        m.set_store_gauges(&StoreGauges {
            instances: vec![("order".into(), "running".into(), 3)],
            outbox: vec![crate::store::retention::OutboxGauge {
                port: "email".into(),
                pending: 2,
                oldest_seconds: 1.5,
            }],
            ..StoreGauges::default()
        });
        let text = m.render();
        for name in [
            "cairn_persistence_points_total{reason=\"complete\"} 1",
            "cairn_commit_duration_seconds",
            "cairn_commit_points",
            "cairn_transitions_total{orchestration=\"order\",outcome=\"ok\"} 1",
            "cairn_transition_duration_seconds",
            "cairn_messages_published_total{door=\"api\"} 2",
            "cairn_messages_unrouted",
            "cairn_dead_letters",
            "cairn_instances",
            "cairn_instances_in_memory",
            "cairn_instances{orchestration=\"order\",status=\"running\"} 3",
            "cairn_outbox_pending{port=\"email\"} 2",
            "cairn_outbox_oldest_seconds{port=\"email\"} 1.5",
            "cairn_send_attempts_total{port=\"email\",outcome=\"delivered\"} 1",
            "cairn_commits_fenced_total",
            "cairn_lease_takeovers_total",
            "cairn_claim_duration_seconds",
        ] {
            assert!(text.contains(name), "{name} missing from:\n{text}");
        }
    }
}
