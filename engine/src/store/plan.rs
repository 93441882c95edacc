//! What a group of persistence points writes, as data: built once here, executed by each
//! backend.
//!
//! A group commit writes, for each point, its instance row (fenced on the epoch and owner the
//! point was made under), the messages it consumed, its sends, the requests it marks delivered,
//! its history row, a release, its subscription set, children, timers and messages. Which rows
//! go to which table, and which point each row belongs to, is the same for every backend; how
//! they are written (arrays and `UNNEST` on PostgreSQL, multi-row `VALUES` in one script on
//! SQLite, fenced in SQL or read first) is not. So the rows are gathered here, as plain data
//! borrowed from the points (no row is copied), and a backend's `batch.rs` only turns a plan
//! into statements. A plan is pure: its tests give points and look at the rows.
//!
//! A plan comes in two steps, as a commit does. [`CommitPlan::of`] cuts the group into runs of
//! distinct instances (one fence each) and gives each run's [`RunPlan`]: the parts every point
//! has, each row conditioned on its point's fence. Once the backend knows which points the
//! fence matched, [`RunPlan::written`] gives what those points write after it: subscription
//! changes, children, timers and messages ([`Written`]).

use std::collections::HashSet;

use chrono::{DateTime, Utc};
use uuid::Uuid;

use super::model::{
    distinct_runs, run_outcomes, timer_writes, CommitOutcome, FirstPoint, NewInstance, NewMessage,
    OutboxRow, PersistencePoint, SubscriptionChanges, TimerDue, TimerName,
};
use super::StoreError;

/// A subscription row stored for an instance, as read back: (instance, subscription, message
/// type).
pub(crate) type StoredSubscription = (Uuid, Uuid, String);

/// A row to write and the point it belongs to: the point gives the instance, the time, the
/// host and the fence the row is written under.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Row<'a, T> {
    /// The point.
    pub point: &'a PersistencePoint,
    /// The row's own data.
    pub row: T,
}

impl<T> Row<'_, T> {
    /// The instance the row belongs to.
    pub(crate) fn instance(&self) -> Uuid {
        self.point.instance_id
    }

    /// When its point was made.
    pub(crate) fn at(&self) -> DateTime<Utc> {
        self.point.at
    }
}

/// What a group of points writes: a plan per run of distinct instances, in order.
#[derive(Debug)]
pub(crate) struct CommitPlan<'a> {
    /// The runs. An instance's later point is fenced against the row its earlier point wrote,
    /// so it starts the next run.
    pub runs: Vec<RunPlan<'a>>,
}

impl<'a> CommitPlan<'a> {
    /// The plan of `points`, written in order.
    pub(crate) fn of(points: &'a [PersistencePoint]) -> Self {
        CommitPlan {
            runs: distinct_runs(points).into_iter().map(RunPlan::of).collect(),
        }
    }

    /// The plan of `points` if they make one run (at most one point per instance), for a
    /// backend that writes such a group in one round trip; `None` otherwise.
    pub(crate) fn single(points: &'a [PersistencePoint]) -> Option<RunPlan<'a>> {
        let mut runs = distinct_runs(points);
        (runs.len() == 1).then(|| RunPlan::of(runs.remove(0)))
    }
}

/// What every point of a run of distinct instances writes, each row conditioned on its point's
/// fence: the instance row is updated only where it still holds the point's epoch and host, and
/// the point's other rows are written only if that update matched.
#[derive(Debug, Clone)]
pub(crate) struct RunPlan<'a> {
    /// The run, in order: the fences and the outcomes are the run's.
    pub run: &'a [PersistencePoint],
    /// The points whose rows the plan writes: each one's fenced update of its instance row and
    /// its history row. All of the run's, or those its fence matched ([`RunPlan::fenced_to`]).
    pub points: Vec<&'a PersistencePoint>,
    /// Instances the points create ([`FirstPoint`]): inserted held by the point's host under
    /// its epoch, with their start messages consumed, before the fence (which then finds them).
    pub firsts: Vec<Row<'a, &'a FirstPoint>>,
    /// Messages consumed, by `seq`: each must be routed to its point's instance.
    pub consumed: Vec<Row<'a, i64>>,
    /// Sends: outbox rows locked to the point's host until its `outbox_lock_until`.
    pub sends: Vec<Row<'a, &'a OutboxRow>>,
    /// Requests whose replies the points took: marked delivered.
    pub delivered: Vec<Row<'a, &'a str>>,
    /// The points that give up their instance: its messages and timers are released.
    pub released: Vec<&'a PersistencePoint>,
    /// Messages whose delivery failed a released instance: released with their count kept.
    pub failed: Vec<Row<'a, i64>>,
    /// The points that give their subscription set: the rows stored for their instances are
    /// read, to be compared with it ([`Written::subscription_changes`]).
    pub giving: Vec<&'a PersistencePoint>,
}

impl<'a> RunPlan<'a> {
    /// The plan of `run`, a run of distinct instances ([`CommitPlan::of`]).
    pub(crate) fn of(run: &'a [PersistencePoint]) -> Self {
        let mut plan = RunPlan::empty(run, Vec::with_capacity(run.len()));
        for point in run {
            plan.points.push(point);
            if let Some(first) = point.start.as_deref() {
                plan.firsts.push(Row { point, row: first });
            }
        }
        plan.fill(run);
        plan
    }

    /// The plan of the points of `self` whose fence matched (`committed`), for a backend that
    /// reads the fence before it writes the rest: the same rows, of those points only.
    pub(crate) fn fenced_to(&self, committed: &HashSet<Uuid>) -> RunPlan<'a> {
        let points: Vec<&'a PersistencePoint> = self
            .points
            .iter()
            .copied()
            .filter(|p| committed.contains(&p.instance_id))
            .collect();
        let mut plan = RunPlan::empty(self.run, Vec::new());
        plan.fill(points.iter().copied());
        plan.points = points;
        plan
    }

    /// A plan of `run` with `points` and no rows yet.
    fn empty(run: &'a [PersistencePoint], points: Vec<&'a PersistencePoint>) -> Self {
        RunPlan {
            run,
            points,
            firsts: Vec::new(),
            consumed: Vec::new(),
            sends: Vec::new(),
            delivered: Vec::new(),
            released: Vec::new(),
            failed: Vec::new(),
            giving: Vec::new(),
        }
    }

    /// Adds the rows of `points` but their instance and history rows.
    fn fill(&mut self, points: impl IntoIterator<Item = &'a PersistencePoint>) {
        for point in points {
            let rows = |seqs: &'a [i64]| seqs.iter().map(move |seq| Row { point, row: *seq });
            self.consumed.extend(rows(&point.consumed));
            self.sends
                .extend(point.outbox.iter().map(|row| Row { point, row }));
            self.delivered.extend(point.delivered.iter().map(|id| Row {
                point,
                row: id.as_str(),
            }));
            if point.release {
                self.released.push(point);
                self.failed.extend(rows(&point.failed));
            }
            if point.subscriptions.is_some() {
                self.giving.push(point);
            }
        }
    }

    /// What became of each point of the run, in order, when its fence matched the instances
    /// `committed`.
    pub(crate) fn outcomes<'s>(
        &'s self,
        committed: &'s HashSet<Uuid>,
    ) -> impl Iterator<Item = CommitOutcome> + 's {
        run_outcomes(self.run, committed)
    }

    /// What the points whose fence matched (`committed`) write after it.
    pub(crate) fn written(&self, committed: &HashSet<Uuid>) -> Written<'a> {
        let points: Vec<&'a PersistencePoint> = self
            .run
            .iter()
            .filter(|p| committed.contains(&p.instance_id))
            .collect();
        let (cancelled_timers, set_timers) = timer_writes(&points);
        let mut written = Written {
            children: Vec::new(),
            cancelled_timers,
            set_timers,
            messages: Vec::new(),
            giving: Vec::new(),
            delivered: Vec::new(),
        };
        for &point in &points {
            let at = point.at;
            written
                .children
                .extend(point.children.iter().map(|c| (c, at)));
            written
                .messages
                .extend(point.messages.iter().map(|m| (m, at)));
            if point.subscriptions.is_some() {
                written.giving.push(point);
            }
            written
                .delivered
                .extend(point.delivered.iter().map(|id| Row {
                    point,
                    row: id.as_str(),
                }));
        }
        written
    }
}

/// What the points of a run whose fence matched write after it.
#[derive(Debug, Clone)]
pub(crate) struct Written<'a> {
    /// Children to start, each at its point's time.
    pub children: Vec<(&'a NewInstance, DateTime<Utc>)>,
    /// Timers cancelled or fired: deleted first.
    pub cancelled_timers: Vec<TimerName<'a>>,
    /// Timers set, one per timer (a point's last due time for it wins).
    pub set_timers: Vec<TimerDue<'a>>,
    /// Messages to publish, each at its point's time.
    pub messages: Vec<(&'a NewMessage, DateTime<Utc>)>,
    /// The points that give their subscription set.
    pub giving: Vec<&'a PersistencePoint>,
    /// Requests the points marked delivered (a copy of a reply another host stored for one is
    /// consumed).
    pub delivered: Vec<Row<'a, &'a str>>,
}

impl<'a> Written<'a> {
    /// The subscription rows to remove and to add, so that each giving point's instance has
    /// exactly its set, given those `stored` for them (read with the fence).
    pub(crate) fn subscription_changes(
        &self,
        stored: impl IntoIterator<Item = StoredSubscription>,
    ) -> SubscriptionChanges<'a> {
        SubscriptionChanges::between(&self.giving, stored)
    }
}

/// The error for points that consumed messages (`consumed`, or a statement's share of them)
/// not all routed to their instance: the store holds what the engine cannot have written.
pub(crate) fn not_routed(consumed: &[Row<'_, i64>]) -> StoreError {
    let consumed: Vec<(Uuid, i64)> = consumed.iter().map(|r| (r.instance(), r.row)).collect();
    StoreError::NotRouted(format!(
        "persistence points consumed messages {consumed:?} (instance, seq), not all routed to \
         their instance (consumed twice?)"
    ))
}

#[cfg(test)]
mod tests;
