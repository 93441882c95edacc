//! Eager starts: the instances a host's own [`Client`](super::Client) starts, handed to that
//! host in memory rather than left for a claim.
//!
//! The client runs each new instance's first transition itself, and writes the instance with its
//! first persistence point in one transaction ([`FirstPoint`]): the start and the first point
//! cost one commit. The host then takes the instance into memory and delivers the point's sends
//! (G2: they leave only after that commit).
//!
//! A start whose first transition makes no point (it only waits), faults or panics, or whose
//! write fails, is written on its own instead, leased to the host with its start message claimed
//! for it ([`HeldStart`]), and the host runs the first transition as it runs any other. That
//! runs it a second time, which is safe: nothing of the client's run escaped (G3).

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio::sync::mpsc;
use uuid::Uuid;

use super::instance::{Delivery, LiveInstance};
use super::ports::Ports;
use crate::registry::Registry;
use crate::store::{
    CommitOutcome, FirstPoint, HeldStart, Holder, InstanceRecord, NewInstance, PersistencePoint,
    Store, StoreError,
};

/// An instance a host's client started for the host.
#[derive(Debug)]
pub(super) enum Handed {
    /// Stored leased to the host, its start message claimed for it: the host runs its first
    /// transition.
    Held(Box<HeldStart>),
    /// Stored with its first persistence point, which the client wrote.
    Written(Box<Written>),
}

/// An instance stored with its first persistence point: the host delivers the point's sends and
/// holds the instance, unless the point gave it up (`None`).
#[derive(Debug)]
pub(super) struct Written {
    pub(super) instance: Option<LiveInstance>,
    pub(super) point: PersistencePoint,
}

/// How a host's own client hands the instances it starts to the host.
#[derive(Clone, Debug)]
pub(super) struct Eager {
    pub(super) host: String,
    pub(super) lease: Duration,
    /// How long the sends of a first point stay locked to the host ([`super::HostConfig::outbox_lock`]).
    pub(super) outbox_lock: Duration,
    /// The host's send ports, which its transitions may name; set when the host runs.
    pub(super) ports: Arc<OnceLock<Ports>>,
    pub(super) to_host: mpsc::UnboundedSender<Vec<Handed>>,
    /// Set once the host has recovered and runs (a SQLite host's recovery releases every lease).
    pub(super) running: Arc<AtomicBool>,
    /// Instances handed over that the host has not taken yet (see [`super::Client`]).
    pub(super) waiting: Arc<AtomicUsize>,
    /// Up to how many may wait before starts are left to the claims.
    pub(super) most_waiting: usize,
    /// Where the first transitions are counted, when the host keeps metrics.
    pub(super) metrics: Option<Arc<super::Metrics>>,
}

/// New instances after their first transitions, each with its first point.
struct FirstPoints {
    instances: Vec<Option<LiveInstance>>,
    points: Vec<PersistencePoint>,
}

impl Eager {
    /// Whether the host runs and can take `count` more instances without more than
    /// `most_waiting` waiting.
    pub(super) fn takes(&self, count: usize) -> bool {
        self.running.load(Ordering::SeqCst)
            && !self.to_host.is_closed()
            && self.waiting.load(Ordering::SeqCst) + count <= self.most_waiting
    }

    /// Stores `instances` for the host and hands them over: with their first points where each
    /// makes one and they commit, otherwise held.
    pub(super) async fn start(
        &self,
        store: &Arc<dyn Store>,
        registry: &Registry,
        instances: Vec<NewInstance>,
        now: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        let written = match self.first_points(registry, &instances, now) {
            Some(firsts) => self.write(store, firsts).await?,
            None => None,
        };
        let handed = match written {
            Some(handed) => handed,
            None => {
                let holder = Holder {
                    host: &self.host,
                    lease_until: now + chrono::Duration::from_std(self.lease).unwrap_or_default(),
                };
                let held = store.start_instances(instances, Some(holder), now).await?;
                held.into_iter()
                    .map(|h| Handed::Held(Box::new(h)))
                    .collect()
            }
        };
        self.hand_over(store, handed).await
    }

    /// Runs the first transition of each instance and makes its first point; `None` if one of
    /// them makes none (or the host does not run yet).
    fn first_points(
        &self,
        registry: &Registry,
        instances: &[NewInstance],
        now: DateTime<Utc>,
    ) -> Option<FirstPoints> {
        let ports = self.ports.get()?;
        let has_port = |name: &str| ports.contains(name);
        let lease_until = now + chrono::Duration::from_std(self.lease).unwrap_or_default();
        let lock_until = now + chrono::Duration::from_std(self.outbox_lock).unwrap_or_default();
        let mut firsts = FirstPoints {
            instances: Vec::with_capacity(instances.len()),
            points: Vec::with_capacity(instances.len()),
        };
        for new in instances {
            let def = registry.get(&new.orchestration, new.version)?.clone();
            let mut instance = LiveInstance::load(InstanceRecord::started(new), def).ok()?;
            instance.count_in(self.metrics.as_ref());
            let Delivery::Ran(Some(reason)) =
                instance.start_new(new.input.clone(), registry, &has_port, now)
            else {
                return None;
            };
            let mut point = instance
                .persistence_point(reason, &self.host, now, lock_until)
                .ok()?;
            // A point that can never be stored is refused by the host, alone.
            point.check_storable().ok()?;
            point.start = Some(Box::new(FirstPoint {
                instance: new.clone(),
                lease_until,
            }));
            firsts.instances.push((!point.release).then_some(instance));
            firsts.points.push(point);
        }
        Some(firsts)
    }

    /// Commits the first points. `None` if the commit failed: nothing may have been written,
    /// so the instances are then written held (an instance the commit did write makes that
    /// write fail, as its id is taken).
    async fn write(
        &self,
        store: &Arc<dyn Store>,
        firsts: FirstPoints,
    ) -> Result<Option<Vec<Handed>>, StoreError> {
        let outcomes = match store.commit(&firsts.points).await {
            Ok(outcomes) => outcomes,
            Err(e) => {
                tracing::debug!(error = %e, "writing new instances with their first points failed; writing them on their own");
                return Ok(None);
            }
        };
        let mut handed = Vec::with_capacity(outcomes.len());
        let mut fenced = Vec::new();
        for ((instance, point), outcome) in firsts
            .instances
            .into_iter()
            .zip(firsts.points)
            .zip(outcomes)
        {
            match outcome {
                CommitOutcome::Committed => {
                    handed.push(Handed::Written(Box::new(Written { instance, point })))
                }
                CommitOutcome::Fenced => fenced.push(point.instance_id),
            }
        }
        if !fenced.is_empty() {
            // A first point writes its instance's row itself, so nothing can fence it.
            self.hand_over(store, handed).await?;
            return Err(StoreError::Corrupt(format!(
                "the first points of new instances {fenced:?} were fenced"
            )));
        }
        Ok(Some(handed))
    }

    /// Hands `handed` to the host; if it stopped since, the instances wait for their leases to
    /// run out, and then any host takes them.
    async fn hand_over(
        &self,
        store: &Arc<dyn Store>,
        handed: Vec<Handed>,
    ) -> Result<(), StoreError> {
        let count = handed.len();
        self.waiting.fetch_add(count, Ordering::SeqCst);
        let Err(mpsc::error::SendError(handed)) = self.to_host.send(handed) else {
            return Ok(());
        };
        self.waiting.fetch_sub(count, Ordering::SeqCst);
        tracing::warn!(host.id = %self.host, instances = count,
            "the host stopped while starting instances for it; they run once its leases expire");
        // The start messages of held ones go back, to be claimed at once by whichever host.
        let held: Vec<Uuid> = handed
            .iter()
            .filter_map(|h| match h {
                Handed::Held(held) => Some(held.record.id),
                Handed::Written(_) => None,
            })
            .collect();
        if !held.is_empty() {
            store.unlock(&self.host, &held, &[]).await?;
        }
        Ok(())
    }
}
