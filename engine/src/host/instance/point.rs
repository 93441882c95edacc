//! The persistence points of an instance in memory: [`LiveInstance::persistence_point`], the one
//! place a point is built from an instance (its state, waits, timers, outbox, children and the
//! messages it consumed since its last one), and [`LiveInstance::fault_point`], the point that
//! suspends it at its last one.

use std::collections::BTreeSet;

use chrono::{DateTime, Utc};

use super::{subscription_row, Ending, FaultText, LiveInstance, Waits};
use crate::codec;
use crate::store::{InstanceStatus, MessageKind, NewMessage, PersistencePoint, Reason};

impl LiveInstance {
    /// Builds the persistence point for `reason` and resets the instance to it. `release` drops
    /// the lease (the instance leaves memory).
    ///
    /// # Errors
    /// The state does not encode (a fault: suspend instead).
    pub fn persistence_point(
        &mut self,
        reason: Reason,
        host: &str,
        now: DateTime<Utc>,
        outbox_lock_until: DateTime<Utc>,
    ) -> Result<PersistencePoint, FaultText> {
        let span = tracing::debug_span!("persistence_point", instance.id = %self.id,
            orchestration.name = self.def.name(), orchestration.version = self.def.version(),
            reason = reason.as_str(), step = tracing::field::Empty,
            status = tracing::field::Empty);
        let _entered = span.enter();
        let (status, output, last_error, release) = match &self.ending {
            Ending::Completed(output) => {
                (InstanceStatus::Completed, Some(output.clone()), None, true)
            }
            Ending::Failed(why) => (InstanceStatus::Failed, None, Some(why.clone()), true),
            Ending::Suspended(why) => (InstanceStatus::Suspended, None, Some(why.clone()), true),
            Ending::Running => match reason {
                Reason::Dehydrate | Reason::Shutdown => {
                    (InstanceStatus::Dehydrated, None, None, true)
                }
                _ => (InstanceStatus::Running, None, None, false),
            },
        };
        if self.has_ended() && !matches!(self.ending, Ending::Suspended(_)) {
            self.waits = Waits::default();
        }
        let state_bytes = match &self.state {
            Some(state) => Some(
                self.def
                    .encode_state(state)
                    .map_err(|e| FaultText(e.to_string()))?,
            ),
            None => None,
        };
        let step = match (&self.ending, &state_bytes) {
            (Ending::Completed(_), _) => "completed".to_owned(),
            (Ending::Failed(_), _) => "failed".to_owned(),
            (_, Some(bytes)) => codec::step_name(bytes, "state"),
            (_, None) => self.saved_step.clone(),
        };
        span.record("step", step.as_str());
        span.record("status", status.as_str());
        let engine_state = codec::encode(&self.waits).map_err(|e| FaultText(e.to_string()))?;
        // The exact set is written only when it may differ from what the database holds.
        let unchanged = self.receives_exact
            && self.waits.receives.len() == self.written_receives.len()
            && self
                .waits
                .receives
                .iter()
                .all(|(id, _)| self.written_receives.contains(id));
        let subscriptions = (!unchanged).then(|| {
            self.waits
                .receives
                .iter()
                .map(|(id, r)| subscription_row(*id, r))
                .collect()
        });
        let mut cancel_timers: BTreeSet<String> = self
            .saved_waits
            .delays
            .iter()
            .filter(|d| !self.waits.delays.contains(d))
            .map(|d| d.name.clone())
            .collect();
        cancel_timers.extend(self.fired_timers.iter().cloned());
        let set_timers = self
            .waits
            .delays
            .iter()
            .filter(|d| !self.saved_waits.delays.contains(d) || self.fired_timers.contains(&d.name))
            .map(|d| (d.name.clone(), d.at))
            .collect();
        let mut messages = std::mem::take(&mut self.messages);
        if let Some(parent) = self.parent {
            match &self.ending {
                Ending::Completed(output) => messages.push(NewMessage::to_instance(
                    format!("{}:ended", self.id),
                    "child.completed",
                    MessageKind::ChildCompleted,
                    serde_json::json!({ "child": self.id, "output": output }),
                    parent,
                )),
                Ending::Failed(why) => messages.push(NewMessage::to_instance(
                    format!("{}:ended", self.id),
                    "child.failed",
                    MessageKind::ChildFailed,
                    serde_json::json!({ "child": self.id, "error": why }),
                    parent,
                )),
                _ => {}
            }
        }
        self.history_seq += 1;
        let point = PersistencePoint {
            instance_id: self.id,
            epoch: self.epoch,
            host: host.to_owned(),
            reason,
            detail: self.detail.take(),
            status,
            resumable: true,
            failed: Vec::new(),
            state: state_bytes,
            engine_state: Some(engine_state),
            step: step.clone(),
            waiting_for: self.waits.describe(),
            next_timer_at: self.waits.next_timer(),
            last_error,
            output,
            history_seq: self.history_seq,
            consumed: std::mem::take(&mut self.consumed),
            subscriptions,
            cancel_timers: cancel_timers.into_iter().collect(),
            set_timers,
            outbox: std::mem::take(&mut self.outbox),
            delivered: std::mem::take(&mut self.delivered),
            messages,
            children: std::mem::take(&mut self.children),
            release,
            at: now,
            outbox_lock_until,
            start: None,
        };
        self.written_receives = self.waits.receives.iter().map(|(id, _)| *id).collect();
        self.receives_exact = true;
        self.saved_waits = self.waits.clone();
        self.saved_step = step;
        self.fired_timers.clear();
        self.dirty = false;
        Ok(point)
    }

    /// The point that suspends the instance at its last persistence point after a fault: its
    /// stored state and waits stay as they were (its `step` is the step the last transition
    /// before the fault reached, also when that was before the first point), and the messages it consumed since are not
    /// consumed (they are delivered again on resume).
    pub fn fault_point(
        &mut self,
        error: &FaultText,
        host: &str,
        now: DateTime<Utc>,
    ) -> PersistencePoint {
        self.history_seq += 1;
        PersistencePoint {
            instance_id: self.id,
            epoch: self.epoch,
            host: host.to_owned(),
            reason: Reason::Suspend,
            detail: None,
            status: InstanceStatus::Suspended,
            resumable: true,
            failed: std::mem::take(&mut self.failed),
            state: None,
            engine_state: None,
            step: self
                .reached_step
                .take()
                .unwrap_or_else(|| self.saved_step.clone()),
            waiting_for: self.saved_waits.describe(),
            next_timer_at: self.saved_waits.next_timer(),
            last_error: Some(error.0.clone()),
            output: None,
            history_seq: self.history_seq,
            consumed: Vec::new(),
            subscriptions: None,
            cancel_timers: Vec::new(),
            set_timers: Vec::new(),
            outbox: Vec::new(),
            delivered: Vec::new(),
            messages: Vec::new(),
            children: Vec::new(),
            release: true,
            at: now,
            outbox_lock_until: now,
            start: None,
        }
    }
}
