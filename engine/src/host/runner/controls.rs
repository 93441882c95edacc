//! What the host loop does every so often besides claiming: carrying out operators' requests
//! from the `control` table, publishing the rows of the `inbox` table (the SQL receive
//! location), and the housekeeping (zombies, expired unrouted messages).

use std::time::Instant;

use chrono::{DateTime, Utc};

use super::Runner;
use crate::store::StoreError;

impl Runner {
    /// Publishes the rows of the `inbox` table (the SQL receive location): at most every
    /// [`HostConfig::control_interval`](crate::HostConfig::control_interval), and at once again while it has rows.
    pub(super) async fn take_inbox(&mut self, now: DateTime<Utc>) -> Result<bool, StoreError> {
        if self
            .last_inbox
            .is_some_and(|at| at.elapsed() < self.host.config.control_interval)
        {
            return Ok(false);
        }
        let taken = self
            .host
            .store
            .take_inbox(
                now,
                self.host.config.batch_size,
                self.host.config.max_message_bytes,
            )
            .await?;
        // Rows taken: look again next round rather than after the interval.
        self.last_inbox = (taken == 0).then(Instant::now);
        if taken > 0 {
            if let Some(metrics) = &self.host.metrics {
                metrics.published(super::super::metrics::Door::Inbox, taken);
            }
            tracing::debug!(taken, "published rows of the inbox table");
        }
        Ok(taken > 0)
    }

    /// Marks zombies and dead-letters expired unrouted messages, every
    /// [`HostConfig::housekeeping_interval`](crate::HostConfig::housekeeping_interval).
    pub(super) async fn housekeeping(&mut self, now: DateTime<Utc>) -> Result<(), StoreError> {
        if self
            .last_housekeeping
            .is_some_and(|at| at.elapsed() < self.host.config.housekeeping_interval)
        {
            return Ok(());
        }
        self.last_housekeeping = Some(Instant::now());
        let ttl = chrono::Duration::from_std(self.host.config.unrouted_ttl)
            .unwrap_or(chrono::Duration::MAX);
        let done = self
            .host
            .store
            .housekeeping(
                now,
                now.checked_sub_signed(ttl)
                    .unwrap_or(DateTime::<Utc>::MIN_UTC),
            )
            .await?;
        if done.zombies > 0 {
            tracing::warn!(
                zombies = done.zombies,
                "messages arrived for instances that had ended; kept as zombies"
            );
        }
        if done.expired > 0 {
            tracing::warn!(
                expired = done.expired,
                "unrouted messages passed their time to live; dead-lettered"
            );
        }
        Ok(())
    }

    /// Carries out operators' requests from the `control` table (at most every
    /// [`HostConfig::control_interval`](crate::HostConfig::control_interval)). An instance this host holds in memory is dropped: the
    /// request moved its epoch, so it reloads from the database when it next has work.
    pub(super) async fn apply_controls(&mut self, now: DateTime<Utc>) -> Result<bool, StoreError> {
        if self
            .last_control
            .is_some_and(|at| at.elapsed() < self.host.config.control_interval)
        {
            return Ok(false);
        }
        self.last_control = Some(Instant::now());
        let applied = self
            .host
            .store
            .apply_controls(&self.host.id, now, 100)
            .await?;
        let mut dropped = Vec::new();
        for request in &applied {
            match &request.result {
                Ok(status) => {
                    tracing::info!(control.id = request.id, instance.id = ?request.instance_id,
                    %status, "carried out a control request")
                }
                Err(why) => {
                    tracing::warn!(control.id = request.id, instance.id = ?request.instance_id,
                    error = %why, "rejected a control request")
                }
            }
            if let Some(id) = request.instance_id {
                self.unrunnable.remove(&id);
                if self.cache.remove(&id).is_some() {
                    dropped.push(id);
                }
            }
        }
        if !dropped.is_empty() {
            self.release_after_failure(&dropped, &[]).await;
        }
        Ok(!applied.is_empty())
    }
}
