//! Multi-row writes: a group of persistence points in one transaction with a few statements
//! per group, and starts in batches.
//!
//! A statement is a round trip to the server, so a group of 256 points written one statement
//! per row was ~1,300 round trips. Here the parts every point has (the fenced state update,
//! consumed messages, sends, replies taken, history, the read of its subscriptions) are one
//! statement for the whole group ([`write_common`]), and the less common ones (subscription
//! changes, children, timers, releases) one statement each; rows are passed as arrays and
//! expanded with `UNNEST` (one fixed text per statement, so each is prepared once per
//! connection). Publishes are left to the caller, which takes the routing locks first. Each
//! point is still all-or-nothing and fenced: its rows are written only if the fenced update of
//! its instance row matched, and the whole group is one transaction.

use std::collections::{HashMap, HashSet};
use std::sync::OnceLock;

use chrono::{DateTime, Utc};
use sqlx::PgExecutor;
use uuid::Uuid;

use crate::store::common;
use crate::store::model::SubscriptionChanges;
use crate::store::plan::{not_routed, CommitPlan, RunPlan, StoredSubscription, Written};
use crate::store::routing::{sent_to_ports, Route, RouteCache};
use crate::store::{HeldStart, Holder, FIRST_EPOCH};

use super::routing::{find_route, subscribe_convoy, unroute, Reroute};
use super::{
    int4, map_err, CommitOutcome, MessageKind, NewInstance, NewMessage, NewSubscription,
    PersistencePoint, PublishOutcome, StoreError, StoreResult, Tx, WORK_CHANNEL,
};

/// Writes `points` in order (all but their publishes, which the caller makes under the routing
/// locks); a point whose epoch or owner moved is `Fenced` and writes nothing.
pub(super) async fn write_points(
    tx: &mut Tx,
    points: &[PersistencePoint],
    changes: &mut Reroute,
) -> StoreResult<Vec<CommitOutcome>> {
    let mut outcomes = Vec::with_capacity(points.len());
    for plan in CommitPlan::of(points).runs {
        let Fenced {
            committed,
            stored,
            marked,
        } = write_common(&mut **tx, &plan, false).await?;
        if !committed.is_empty() {
            let written = plan.written(&committed);
            consume_reply_copies(tx, &written, &marked).await?;
            sync_subscriptions(tx, &written, stored, changes).await?;
            start_instances(&mut **tx, &written.children, None).await?;
            write_timers(tx, &written).await?;
        }
        outcomes.extend(plan.outcomes(&committed));
    }
    Ok(outcomes)
}

/// Writes `points` as one statement outside a transaction (one round trip; a statement is
/// all-or-nothing on its own), if they can be: at most one point per instance, writing only the
/// parts every point has and nothing another host may claim (which would need a `NOTIFY`).
/// Returns `None`, having written nothing, otherwise, and when the points need a transaction
/// after all: a request a point marks delivered was delivered already (another host may have
/// stored a copy of its reply, which only a statement after this one can see,
/// [`consume_reply_copies`]), or a point that gives an empty subscription set has some stored
/// (they are removed in the transaction).
pub(super) async fn write_alone(
    store: &super::PostgresStore,
    points: &[PersistencePoint],
) -> StoreResult<Option<Vec<CommitOutcome>>> {
    // The cheap check first: cutting the group into runs hashes every point.
    let alone = points
        .iter()
        .all(|p| p.writes_only_common_parts() && !p.makes_claimable_work());
    if !alone {
        return Ok(None);
    }
    let Some(plan) = CommitPlan::single(points) else {
        return Ok(None);
    };
    let mut conn = store.point_connection().await?;
    let written = write_common(&mut *conn, &plan, true).await;
    conn.ended(&written);
    match written {
        Ok(written) => Ok(Some(plan.outcomes(&written.committed).collect())),
        Err(StoreError::Database { source: e, .. }) if raised(&e, NEEDS_TRANSACTION_CODE) => {
            Ok(None)
        }
        Err(e) => Err(e),
    }
}

/// The SQLSTATE of [`NEEDS_TRANSACTION`]. Its class, `CN`, is one PostgreSQL leaves to users;
/// the engine's failures are told apart by these codes, never by their text ([`raised`]).
pub(super) const NEEDS_TRANSACTION_CODE: &str = "CN001";

/// The SQLSTATE of [`NOT_ROUTED`].
pub(super) const NOT_ROUTED_CODE: &str = "CN002";

/// Whether `err` is the failure with SQLSTATE `code` that [`write_common`]'s checks raise
/// (`point_check`, migration `20261205000009_point_check_codes`).
fn raised(err: &sqlx::Error, code: &str) -> bool {
    matches!(err, sqlx::Error::Database(db) if db.code().as_deref() == Some(code))
}

/// The failure [`write_common`] raises, outside a transaction, for points that need one
/// ([`write_alone`]), with SQLSTATE [`NEEDS_TRANSACTION_CODE`].
const NEEDS_TRANSACTION: &str = "cairn: a request a point marks delivered was delivered \
     already, or a point that gives an empty subscription set has some stored";

/// The failure [`write_common`] raises for a point that consumed a message not routed to its
/// instance, with SQLSTATE [`NOT_ROUTED_CODE`].
const NOT_ROUTED: &str = "cairn: persistence points consumed messages not all routed to their \
     instance (consumed twice?)";

/// What every point of a run writes, in one statement (one round trip): the fenced update of
/// its instance row and, for the points it matched, consumed messages, sends, replies taken,
/// history and releases; and the subscriptions stored for the points that give their set.
///
/// The parts are data-modifying `WITH` queries, each conditioned on the fence (`f`) and each
/// writing rows no other part writes (a release leaves alone the messages the point consumes).
/// Each starts from its rows' arrays (`UNNEST`), so that the server's plan, prepared once for any
/// arrays, looks rows up by key: a release written as `instance_id = ANY($34)` was planned as
/// a scan of every routed message.
///
/// They all read the database as it was when the statement began, so the copies of replies
/// taken that another host stored are consumed by a statement of their own, after this one,
/// where there can be any ([`consume_reply_copies`]); `alone` (a statement outside a
/// transaction, where there is no after) fails instead where there can be any, and where a
/// point that gives an empty subscription set has some stored (removing them takes more
/// statements).
///
/// The statement checks that every message a fenced point consumed was routed to its instance
/// (`point_check`, migration `20261205000009_point_check_codes`): a failed check undoes it
/// all.
async fn write_common(
    conn: impl PgExecutor<'_>,
    plan: &RunPlan<'_>,
    alone: bool,
) -> StoreResult<Fenced> {
    let (points, sends, delivered) = (&plan.points, &plan.sends, &plan.delivered);
    let shape = Shape::of(plan, alone);
    let mut query = sqlx::query_as(common_statement(shape))
        .bind(column(points, |p| p.instance_id))
        .bind(column(points, |p| p.epoch))
        .bind(column(points, |p| p.host.as_str()))
        .bind(column(points, |p| p.status.as_str()))
        .bind(column(points, |p| p.step.as_str()))
        .bind(column(points, |p| p.waiting_for.as_str()))
        .bind(column(points, |p| p.next_timer_at))
        .bind(column(points, |p| p.at))
        .bind(column(points, |p| p.last_error.as_deref()))
        .bind(column(points, |p| p.state.as_deref()))
        .bind(column(points, |p| p.engine_state.as_deref()))
        .bind(column(points, |p| p.output.as_ref().map(|o| o.to_string())))
        .bind(column(points, |p| p.history_seq))
        .bind(column(points, |p| p.release))
        .bind(column(points, |p| p.resumable))
        .bind(column(&plan.consumed, |r| r.instance()))
        .bind(column(&plan.consumed, |r| r.row))
        .bind(column(&plan.consumed, |r| r.at()))
        .bind(column(sends, |r| r.row.id.as_str()))
        .bind(column(sends, |r| r.instance()))
        .bind(column(sends, |r| r.row.port.as_str()))
        .bind(column(sends, |r| r.row.message_type.as_str()))
        .bind(column(sends, |r| r.row.body.to_string()))
        .bind(column(sends, |r| r.row.expects_reply))
        .bind(column(sends, |r| r.at()))
        .bind(column(sends, |r| r.point.host.as_str()))
        .bind(column(sends, |r| r.point.outbox_lock_until))
        .bind(column(delivered, |r| r.row))
        .bind(column(delivered, |r| r.at()))
        .bind(column(delivered, |r| r.instance()))
        .bind(column(points, |p| p.reason.as_str()))
        .bind(column(points, |p| p.detail.as_deref()))
        .bind(column(&plan.giving, |p| p.instance_id))
        .bind(column(&plan.released, |p| p.instance_id))
        .bind(column(&plan.failed, |r| r.row))
        .bind(NOT_ROUTED)
        .bind(NEEDS_TRANSACTION);
    if shape.has(Shape::FIRST) {
        // One entry per point, as the point's own arrays: NULL for a point that starts nothing.
        fn first<'p>(p: &&'p PersistencePoint) -> Option<&'p NewInstance> {
            p.start.as_deref().map(|f| &f.instance)
        }
        query = query
            .bind(column(points, |p| {
                first(p).map(|i| i.orchestration.as_str())
            }))
            .bind(column(points, |p| first(p).map(|i| int4(i.version))))
            .bind(column(points, |p| first(p).and_then(|i| i.parent)))
            .bind(column(points, |p| {
                p.start.as_deref().map(|f| f.lease_until)
            }))
            .bind(column(points, |p| {
                first(p).map(NewInstance::start_message_id)
            }))
            .bind(column(points, |p| {
                first(p).map(NewInstance::start_message_type)
            }))
            .bind(column(points, |p| first(p).map(|i| i.input.to_string())));
    }
    let rows: Vec<WrittenRow> =
        query
            .fetch_all(conn)
            .await
            .map_err(|e| match map_err("write common", e) {
                StoreError::Database { source: e, .. } if raised(&e, NOT_ROUTED_CODE) => {
                    not_routed(&plan.consumed)
                }
                other => other,
            })?;

    let mut committed = HashSet::with_capacity(points.len());
    let mut stored = Vec::new();
    let mut marked = HashSet::new();
    for (part, instance, sub, text) in rows {
        match (part.as_str(), instance, sub, text) {
            ("fenced", Some(id), _, _) => {
                committed.insert(id);
            }
            ("checked", ..) => {}
            ("delivered", _, _, Some(request)) => {
                marked.insert(request);
            }
            ("subscription", Some(id), Some(sub), Some(message_type)) => {
                stored.push((id, sub, message_type));
            }
            _ => {
                return Err(StoreError::Corrupt(format!(
                    "a persistence point's write returned an unexpected row ({part})"
                )))
            }
        }
    }
    Ok(Fenced {
        committed,
        stored,
        marked,
    })
}

/// One column of `rows`, to bind as an array.
fn column<'r, R, T>(rows: &'r [R], f: impl Fn(&'r R) -> T) -> Vec<T> {
    rows.iter().map(f).collect()
}

/// The optional parts of [`write_common`]'s statement. A run's statement carries only the parts
/// some point of it writes: a part with nothing to write still costs the server a plan node,
/// subplans and a scan of its empty arrays on every execution. Each shape has its own text,
/// prepared once per connection like any statement; every text takes all the parameters (their
/// types are declared when it is prepared), so the binds do not depend on the shape.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(super) struct Shape(u8);

impl Shape {
    /// Points that start their instance ([`FirstPoint`](crate::store::FirstPoint)): `n`, `sm` and `fa`.
    const FIRST: u8 = 1;
    /// Consumed messages: `c` and its check.
    const CONSUMES: u8 = 1 << 1;
    /// Sends: `s`.
    const SENDS: u8 = 1 << 2;
    /// Requests marked delivered: `d`.
    const DELIVERS: u8 = 1 << 3;
    /// Releases: `r` and `t`.
    const RELEASES: u8 = 1 << 4;
    /// Points that give their subscription set: the stored subscriptions read back.
    const GIVES: u8 = 1 << 5;
    /// A statement outside a transaction ([`write_alone`]): the checks that it needs none.
    const ALONE: u8 = 1 << 6;
    /// How many shapes there are.
    const COUNT: usize = 1 << 7;

    /// The shape of a run's statement: the parts its `plan` writes, and whether it is written
    /// `alone`.
    pub(super) fn of(plan: &RunPlan<'_>, alone: bool) -> Self {
        [
            (!plan.firsts.is_empty(), Shape::FIRST),
            (!plan.consumed.is_empty(), Shape::CONSUMES),
            (!plan.sends.is_empty(), Shape::SENDS),
            (!plan.delivered.is_empty(), Shape::DELIVERS),
            (!plan.released.is_empty(), Shape::RELEASES),
            (!plan.giving.is_empty(), Shape::GIVES),
            (alone, Shape::ALONE),
        ]
        .into_iter()
        .filter(|(present, _)| *present)
        .fold(Shape(0), |shape, (_, part)| Shape(shape.0 | part))
    }

    /// Every shape, by its bits (for the test that writes a point of each).
    #[cfg(test)]
    pub(super) fn all() -> impl Iterator<Item = Self> {
        (0..=u8::MAX).map(Shape).take(Self::COUNT)
    }

    fn has(self, part: u8) -> bool {
        self.0 & part != 0
    }
}

/// The text of [`write_common`]'s statement for `shape`.
fn common_statement(shape: Shape) -> &'static str {
    static TEXTS: [OnceLock<String>; Shape::COUNT] = [const { OnceLock::new() }; Shape::COUNT];
    TEXTS[usize::from(shape.0)].get_or_init(|| common_text(shape))
}

/// Builds the text of [`write_common`]'s statement for `shape`. With first points, their
/// instances are inserted (`n`) as the points leave them and count as fenced (`fa`): the fenced
/// update cannot see rows inserted by the same statement. Their start messages are inserted
/// consumed (`sm`).
fn common_text(shape: Shape) -> String {
    let fenced = if shape.has(Shape::FIRST) { "fa" } else { "f" };
    let part = |flag: u8, text: &str| {
        if shape.has(flag) {
            text.replace("{fenced}", fenced)
        } else {
            String::new()
        }
    };
    let first = part(Shape::FIRST, FIRST_PARTS);
    let union = part(
        Shape::FIRST,
        ", fa AS (SELECT id FROM f UNION ALL SELECT id FROM n)",
    );
    let consumes = part(Shape::CONSUMES, CONSUMED_PART);
    let sends = part(Shape::SENDS, SENT_PART);
    let delivers = part(Shape::DELIVERS, DELIVERED_PART);
    let releases = part(Shape::RELEASES, RELEASED_PARTS);
    let delivered_rows = part(
        Shape::DELIVERS,
        " UNION ALL SELECT 'delivered', NULL, NULL, id FROM d",
    );
    let subscription_rows = part(
        Shape::GIVES,
        " UNION ALL SELECT 'subscription', instance_id, id, message_type FROM subscriptions \
           WHERE instance_id = ANY($33) AND instance_id IN (SELECT id FROM {fenced})",
    );
    let mut checks = Vec::new();
    if shape.has(Shape::CONSUMES) {
        checks.push(format!(
            "point_check((SELECT count(*) FROM c) = (SELECT count(*) FROM UNNEST($16) AS x(id) \
               WHERE x.id IN (SELECT id FROM {fenced})), '{NOT_ROUTED_CODE}', $36)"
        ));
    }
    if shape.has(Shape::ALONE) && shape.has(Shape::DELIVERS) {
        checks.push(format!(
            "point_check((SELECT count(*) FROM d) = (SELECT count(*) FROM UNNEST($30) AS x(id) \
               WHERE x.id IN (SELECT id FROM {fenced})), '{NEEDS_TRANSACTION_CODE}', $37)"
        ));
    }
    if shape.has(Shape::ALONE) && shape.has(Shape::GIVES) {
        checks.push(format!(
            "point_check(NOT EXISTS (SELECT 1 FROM subscriptions WHERE instance_id = ANY($33) \
               AND instance_id IN (SELECT id FROM {fenced})), '{NEEDS_TRANSACTION_CODE}', $37)"
        ));
    }
    let checked_row = if checks.is_empty() {
        String::new()
    } else {
        format!(
            " UNION ALL SELECT 'checked', NULL, NULL, NULL WHERE {}",
            checks.join(" AND ")
        )
    };
    format!(
        "WITH {first} f AS ( \
           UPDATE instances i SET status = p.status, step = p.step, waiting_for = p.waiting_for, \
           next_timer_at = p.next_timer_at, updated_at = p.at, last_error = p.last_error, \
           state = COALESCE(p.state, i.state), engine_state = COALESCE(p.engine_state, i.engine_state), \
           output = COALESCE(p.output, i.output), history_seq = p.history_seq, \
           owner = CASE WHEN p.release THEN NULL ELSE i.owner END, \
           lease_expires_at = CASE WHEN p.release THEN NULL ELSE i.lease_expires_at END, \
           resumable = p.resumable \
           FROM UNNEST($1::uuid[], $2::int8[], $3::text[], $4::text[], $5::text[], $6::text[], \
             $7::timestamptz[], $8::timestamptz[], $9::text[], $10::bytea[], $11::bytea[], \
             $12::text[], $13::int8[], $14::bool[], $15::bool[]) \
             AS p(id, epoch, host, status, step, waiting_for, next_timer_at, at, last_error, \
                  state, engine_state, output, history_seq, release, resumable) \
           WHERE i.id = p.id AND i.epoch = p.epoch AND i.owner = p.host \
           RETURNING i.id){union}{consumes}{sends}{delivers}, \
         h AS ( \
           INSERT INTO history (instance_id, seq, reason, step, status, at, host, epoch, detail) \
           SELECT * FROM UNNEST($1::uuid[], $13::int8[], $31::text[], $5::text[], $4::text[], \
             $8::timestamptz[], $3::text[], $2::int8[], $32::text[]) \
             AS h(instance_id, seq, reason, step, status, at, host, epoch, detail) \
           WHERE h.instance_id IN (SELECT id FROM {fenced})){releases} \
         SELECT 'fenced', id, NULL::uuid, NULL::text FROM {fenced}\
         {delivered_rows}{subscription_rows}{checked_row}",
    )
}

/// The consumed messages of [`common_text`].
const CONSUMED_PART: &str = ", c AS ( \
       UPDATE messages m SET status = 'consumed', consumed_at = c.at, locked_by = NULL \
       FROM UNNEST($16::uuid[], $17::int8[], $18::timestamptz[]) AS c(instance_id, seq, at) \
       WHERE m.seq = c.seq AND m.instance_id = c.instance_id AND m.status = 'routed' \
         AND c.instance_id IN (SELECT id FROM {fenced}) \
       RETURNING m.seq)";

/// The sends of [`common_text`].
const SENT_PART: &str = ", s AS ( \
       INSERT INTO outbox (id, instance_id, port, message_type, body, expects_reply, status, \
         next_attempt_at, locked_by, locked_until, created_at) \
       SELECT id, instance_id, port, message_type, body, expects_reply, 'pending', at, host, \
         lock_until, at \
       FROM UNNEST($19::text[], $20::uuid[], $21::text[], $22::text[], $23::text[], \
         $24::bool[], $25::timestamptz[], $26::text[], $27::timestamptz[]) \
         AS s(id, instance_id, port, message_type, body, expects_reply, at, host, lock_until) \
       WHERE s.instance_id IN (SELECT id FROM {fenced}))";

/// The requests marked delivered of [`common_text`].
const DELIVERED_PART: &str = ", d AS ( \
       UPDATE outbox o SET status = 'delivered', attempts = attempts + 1, delivered_at = d.at, \
         last_attempt_at = d.at, delivered_via = 'primary', locked_by = NULL, \
         locked_until = NULL, last_error = NULL \
       FROM UNNEST($28::text[], $29::timestamptz[], $30::uuid[]) AS d(id, at, instance_id) \
       WHERE o.id = d.id AND o.status IN ('pending', 'held', 'give_up') \
         AND d.instance_id IN (SELECT id FROM {fenced}) \
       RETURNING o.id)";

/// The releases of [`common_text`]: the messages and timers the instances held.
const RELEASED_PARTS: &str = ", r AS ( \
       UPDATE messages m SET locked_by = NULL, \
         delivery_count = CASE WHEN m.seq = ANY($35) THEN m.delivery_count \
                               ELSE GREATEST(m.delivery_count - 1, 0) END \
       FROM UNNEST($34::uuid[]) AS r(id) \
       WHERE m.instance_id = r.id AND m.status = 'routed' AND m.locked_by IS NOT NULL \
         AND m.seq <> ALL($17) AND r.id IN (SELECT id FROM {fenced})), \
     t AS ( \
       UPDATE timers SET locked_by = NULL FROM UNNEST($34::uuid[]) AS t(id) \
       WHERE timers.instance_id = t.id AND timers.locked_by IS NOT NULL \
         AND t.id IN (SELECT id FROM {fenced}))";

/// The parts of [`write_common`]'s statement that insert the instances of first points and
/// their start messages ([`common_statement`]).
const FIRST_PARTS: &str = "n AS ( \
       INSERT INTO instances (id, orchestration, version, status, step, waiting_for, \
         next_timer_at, created_at, updated_at, last_error, state, engine_state, output, \
         history_seq, parent_id, owner, lease_expires_at, epoch, resumable) \
       SELECT id, orchestration, version, status, step, waiting_for, next_timer_at, at, at, \
         last_error, state, engine_state, output, history_seq, parent_id, \
         CASE WHEN release THEN NULL ELSE host END, \
         CASE WHEN release THEN NULL ELSE lease_until END, epoch, resumable \
       FROM UNNEST($1::uuid[], $2::int8[], $3::text[], $4::text[], $5::text[], $6::text[], \
         $7::timestamptz[], $8::timestamptz[], $9::text[], $10::bytea[], $11::bytea[], \
         $12::text[], $13::int8[], $14::bool[], $15::bool[], $38::text[], $39::int4[], \
         $40::uuid[], $41::timestamptz[]) \
         AS p(id, epoch, host, status, step, waiting_for, next_timer_at, at, last_error, \
              state, engine_state, output, history_seq, release, resumable, orchestration, \
              version, parent_id, lease_until) \
       WHERE orchestration IS NOT NULL \
       RETURNING id), \
     sm AS ( \
       INSERT INTO messages (id, message_type, kind, properties, body, status, instance_id, \
         published_at, consumed_at, delivery_count) \
       SELECT message_id, message_type, 'start', '{}', body, 'consumed', id, at, at, 1 \
       FROM UNNEST($1::uuid[], $8::timestamptz[], $42::text[], $43::text[], $44::text[]) \
         AS s(id, at, message_id, message_type, body) \
       WHERE id IN (SELECT id FROM n)), ";

/// A row of [`write_common`]'s result: (part, instance, subscription, text).
type WrittenRow = (String, Option<Uuid>, Option<Uuid>, Option<String>);

/// What [`write_common`] wrote and read.
struct Fenced {
    /// The instances whose points were written.
    committed: HashSet<Uuid>,
    /// The subscriptions stored for the points that give their set.
    stored: Vec<StoredSubscription>,
    /// The requests whose outbox rows the points marked delivered (the others were delivered
    /// already, by another host, which may have stored a copy of the reply).
    marked: HashSet<String>,
}

/// Consumes the copies of replies the points took in memory that another host stored when it
/// delivered the same request (the instance has its answer). Only a host that marks a request
/// delivered stores a copy, so only requests the points did not mark (`marked`) can have one.
/// A statement of its own, after the points' outbox rows are marked: a host that marked one
/// first and stored its copy has committed by then (the mark waited for its row lock), and a
/// statement sees what was committed before it began.
async fn consume_reply_copies(
    tx: &mut Tx,
    written: &Written<'_>,
    marked: &HashSet<String>,
) -> StoreResult<()> {
    let (mut ids, mut ats) = (Vec::new(), Vec::new());
    for r in written.delivered.iter().filter(|r| !marked.contains(r.row)) {
        ids.push(r.row);
        ats.push(r.at());
    }
    if ids.is_empty() {
        return Ok(());
    }
    sqlx::query(
        "UPDATE messages m SET status = 'consumed', consumed_at = d.at, locked_by = NULL \
         FROM UNNEST($1::text[], $2::timestamptz[]) AS d(id, at) \
         WHERE m.id = d.id || ':reply' AND m.status = 'routed'",
    )
    .bind(&ids)
    .bind(&ats)
    .execute(&mut **tx)
    .await
    .map_err(|e| map_err("consume reply copies", e))?;
    Ok(())
}

/// Timers the points cancelled, fired or set.
async fn write_timers(tx: &mut Tx, written: &Written<'_>) -> StoreResult<()> {
    let (cancelled, set) = (&written.cancelled_timers, &written.set_timers);
    if !cancelled.is_empty() {
        sqlx::query(
            "DELETE FROM timers t USING UNNEST($1::uuid[], $2::text[]) AS c(instance_id, name) \
             WHERE t.instance_id = c.instance_id AND t.name = c.name",
        )
        .bind(cancelled.iter().map(|(id, _)| *id).collect::<Vec<_>>())
        .bind(cancelled.iter().map(|(_, name)| *name).collect::<Vec<_>>())
        .execute(&mut **tx)
        .await
        .map_err(|e| map_err("write timers", e))?;
    }
    if !set.is_empty() {
        sqlx::query(
            "INSERT INTO timers (instance_id, name, due_at) \
             SELECT * FROM UNNEST($1::uuid[], $2::text[], $3::timestamptz[]) \
             ON CONFLICT (instance_id, name) DO UPDATE SET due_at = excluded.due_at, locked_by = NULL",
        )
        .bind(set.iter().map(|(id, _, _)| *id).collect::<Vec<_>>())
        .bind(set.iter().map(|(_, name, _)| *name).collect::<Vec<_>>())
        .bind(set.iter().map(|(_, _, at)| *at).collect::<Vec<_>>())
        .execute(&mut **tx)
        .await
        .map_err(|e| map_err("write timers", e))?;
    }
    Ok(())
}

/// Makes the subscription rows of each point that gives them exactly its set: removes the
/// others (their unconsumed messages go back to unrouted) and adds the missing ones, noting both
/// in `changes` for the routing locks and the reroute.
/// `stored` is what [`write_common`] read.
async fn sync_subscriptions(
    tx: &mut Tx,
    written: &Written<'_>,
    stored: Vec<StoredSubscription>,
    changes: &mut Reroute,
) -> StoreResult<()> {
    if written.giving.is_empty() {
        return Ok(());
    }
    let SubscriptionChanges { removed, added } = written.subscription_changes(stored);
    changes
        .cancelled_types
        .extend(removed.iter().map(|(_, message_type)| message_type.clone()));
    let removed: Vec<Uuid> = removed.into_iter().map(|(sub, _)| sub).collect();
    changes.subscriptions.extend(
        added
            .iter()
            .map(|(_, sub, _)| (sub.message_type.clone(), sub.correlation.clone())),
    );
    if !removed.is_empty() {
        sqlx::query("DELETE FROM subscriptions WHERE id = ANY($1)")
            .bind(&removed)
            .execute(&mut **tx)
            .await
            .map_err(|e| map_err("sync subscriptions", e))?;
        unroute(tx, &removed, changes).await?;
        changes.cancelled.extend(&removed);
    }
    insert_subscriptions(tx, &added).await
}

/// Inserts instances' subscription rows: (instance, row, when).
pub(super) async fn insert_subscriptions(
    tx: &mut Tx,
    rows: &[NewSubscription<'_>],
) -> StoreResult<()> {
    if rows.is_empty() {
        return Ok(());
    }
    let text = |f: fn(&NewSubscription<'_>) -> String| rows.iter().map(f).collect::<Vec<_>>();
    sqlx::query(
        "INSERT INTO subscriptions (id, message_type, instance_id, correlation_keys, \
         correlation, created_at) \
         SELECT * FROM UNNEST($1::uuid[], $2::text[], $3::uuid[], $4::text[], $5::text[], \
           $6::timestamptz[]) \
         ON CONFLICT (id) DO NOTHING",
    )
    .bind(rows.iter().map(|(_, s, _)| s.id).collect::<Vec<_>>())
    .bind(text(|(_, s, _)| s.message_type.clone()))
    .bind(rows.iter().map(|(id, _, _)| *id).collect::<Vec<_>>())
    .bind(text(|(_, s, _)| s.correlation.keys()))
    .bind(text(|(_, s, _)| s.correlation.canonical()))
    .bind(rows.iter().map(|(_, _, at)| *at).collect::<Vec<_>>())
    .execute(&mut **tx)
    .await
    .map_err(|e| map_err("insert subscriptions", e))?;
    Ok(())
}

/// Which of `(instance, epoch)` `host` still holds under that epoch, their rows locked (in id
/// order, the same in every host) until the transaction ends.
pub(super) async fn still_held(
    tx: &mut Tx,
    host: &str,
    instances: &[(Uuid, i64)],
) -> StoreResult<HashSet<Uuid>> {
    let ids: Vec<Uuid> = sqlx::query_scalar(
        "SELECT i.id FROM instances i \
         JOIN UNNEST($1::uuid[], $2::int8[]) AS r(id, epoch) ON i.id = r.id AND i.epoch = r.epoch \
         WHERE i.owner = $3 ORDER BY i.id FOR UPDATE OF i",
    )
    .bind(instances.iter().map(|(id, _)| *id).collect::<Vec<_>>())
    .bind(
        instances
            .iter()
            .map(|(_, epoch)| *epoch)
            .collect::<Vec<_>>(),
    )
    .bind(host)
    .fetch_all(&mut **tx)
    .await
    .map_err(|e| map_err("still held", e))?;
    Ok(ids.into_iter().collect())
}

/// Releases what instances hold. Messages are given back uncounted (their claim was not a
/// failed delivery), except `failed`, whose delivery failed the instance: they keep their count
/// (poison protection).
pub(super) async fn unlock_instances(tx: &mut Tx, ids: &[Uuid], failed: &[i64]) -> StoreResult<()> {
    if ids.is_empty() {
        return Ok(());
    }
    sqlx::query(
        "WITH m AS ( \
           UPDATE messages SET locked_by = NULL, \
             delivery_count = CASE WHEN seq = ANY($2) THEN delivery_count \
                                   ELSE GREATEST(delivery_count - 1, 0) END \
           WHERE instance_id = ANY($1) AND status = 'routed' AND locked_by IS NOT NULL) \
         UPDATE timers SET locked_by = NULL WHERE instance_id = ANY($1) AND locked_by IS NOT NULL",
    )
    .bind(ids)
    .bind(failed)
    .execute(&mut **tx)
    .await
    .map_err(|e| map_err("unlock instances", e))?;
    Ok(())
}

/// Inserts instances and their start messages (addressed to them), each started at its time.
/// With a `holder`, each instance is leased to it and its start message claimed by it, and they
/// are returned ready to run (see [`MessageBox::start_instances`](crate::store::MessageBox::start_instances)).
/// Without, starts are work for any host: the statement notifies [`WORK_CHANNEL`] if it
/// inserted any (delivered at its commit).
pub(super) async fn start_instances(
    conn: impl PgExecutor<'_>,
    starts: &[(&NewInstance, DateTime<Utc>)],
    holder: Option<Holder<'_>>,
) -> StoreResult<Vec<HeldStart>> {
    if starts.is_empty() {
        return Ok(Vec::new());
    }
    let owner = holder.map(|h| h.host);
    let ids: Vec<Uuid> = starts.iter().map(|(inst, _)| inst.id).collect();
    let ats: Vec<DateTime<Utc>> = starts.iter().map(|(_, at)| *at).collect();
    let names: Vec<&str> = starts
        .iter()
        .map(|(inst, _)| inst.orchestration.as_str())
        .collect();
    let versions: Vec<i32> = starts.iter().map(|(inst, _)| int4(inst.version)).collect();
    let parents: Vec<Option<Uuid>> = starts.iter().map(|(inst, _)| inst.parent).collect();
    // Both inserts in one statement (one round trip).
    let rows: Vec<(Uuid, i64)> = sqlx::query_as(
        "WITH i AS ( \
           INSERT INTO instances (id, orchestration, version, status, step, created_at, \
             updated_at, parent_id, owner, lease_expires_at, epoch) \
           SELECT id, orchestration, version, 'running', 'created', at, at, parent_id, $7, $9, $10 \
           FROM UNNEST($5::uuid[], $11::text[], $12::int4[], $6::timestamptz[], $13::uuid[]) \
             AS s(id, orchestration, version, at, parent_id)) \
         , m AS ( \
           INSERT INTO messages (id, message_type, kind, properties, body, status, instance_id, \
           published_at, locked_by, delivery_count) \
           SELECT id, message_type, $3, '{}', body, 'routed', instance_id, at, $7, $8 \
           FROM UNNEST($1::text[], $2::text[], $4::text[], $5::uuid[], $6::timestamptz[]) \
             AS s(id, message_type, body, instance_id, at) \
           ON CONFLICT (id) DO NOTHING \
           RETURNING instance_id, seq) \
         SELECT instance_id, seq, CASE WHEN $7 IS NULL THEN pg_notify($14, '')::text END AS woken \
         FROM m",
    )
    .bind(
        starts
            .iter()
            .map(|(inst, _)| inst.start_message_id())
            .collect::<Vec<_>>(),
    )
    .bind(
        starts
            .iter()
            .map(|(inst, _)| inst.start_message_type())
            .collect::<Vec<_>>(),
    )
    .bind(MessageKind::Start.as_str())
    .bind(
        starts
            .iter()
            .map(|(inst, _)| inst.input.to_string())
            .collect::<Vec<_>>(),
    )
    .bind(&ids)
    .bind(&ats)
    .bind(owner)
    .bind(i32::from(holder.is_some()))
    .bind(holder.map(|h| h.lease_until))
    .bind(if holder.is_some() { FIRST_EPOCH } else { 0 })
    .bind(&names)
    .bind(&versions)
    .bind(&parents)
    .bind(WORK_CHANNEL)
    .fetch_all(conn)
    .await
    .map_err(|e| map_err("start instances", e))?;
    match holder {
        Some(_) => HeldStart::all(starts, rows),
        None => Ok(Vec::new()),
    }
}

/// Stores and routes messages in order, each published at its time. The types of the published
/// (not addressed) ones must be locked for routing ([`super::routing::lock_routes`]).
///
/// The messages are inserted first, in one statement (`ON CONFLICT (id) DO NOTHING`): the
/// unique id, not a read, is what makes a second publisher of the same id store nothing, and
/// nothing is routed (no instance is activated) for a duplicate. The routing reads are then
/// made once per type for the batch, and the routes written in one statement. A convoy's
/// activation takes the convoy's lock and looks again ([`super::routing::find_route`]), and subscribes
/// its new instance, which can change where the next messages go: after one, the rest of the
/// batch is routed message by message.
pub(super) async fn publish_all(
    tx: &mut Tx,
    messages: &[(&NewMessage, DateTime<Utc>)],
) -> StoreResult<Vec<PublishOutcome>> {
    let mut seen = HashSet::new();
    let first: Vec<bool> = messages
        .iter()
        .map(|(m, _)| seen.insert(m.id.as_str()))
        .collect();
    let fresh: Vec<&(&NewMessage, DateTime<Utc>)> = messages
        .iter()
        .zip(&first)
        .filter(|(_, first)| **first)
        .map(|(m, _)| m)
        .collect();
    let stored = insert_messages(tx, &fresh).await?;
    let published: Vec<&NewMessage> = fresh
        .iter()
        .map(|(m, _)| *m)
        .filter(|m| m.target.is_none() && stored.contains_key(&m.id))
        .collect();
    let mut cache = Some(read_routes(tx, &published).await?);
    let mut routes = RouteRows::default();
    // The copies of messages for the other orchestrations that subscribe to them (fan_out),
    // each addressed to its instance: inserted after the loop.
    let mut copied: Vec<(NewMessage, DateTime<Utc>)> = Vec::new();
    // What send ports' subscriptions take: (message, port, time), sent after the loop.
    let mut to_ports: Vec<(&NewMessage, String, DateTime<Utc>)> = Vec::new();
    let mut out = Vec::with_capacity(messages.len());
    for ((msg, at), first) in messages.iter().zip(first) {
        let Some(seq) = stored.get(&msg.id).filter(|_| first) else {
            out.push(PublishOutcome::Duplicate);
            continue;
        };
        if let Some(target) = msg.target {
            out.push(PublishOutcome::Routed(target));
            continue;
        }
        let route = match &cache {
            Some(c) => match c.route(msg) {
                Route::Activate {
                    convoy: Some(_), ..
                } => {
                    cache = None;
                    find_route(tx, msg).await?
                }
                route => route,
            },
            None => find_route(tx, msg).await?,
        };
        let single;
        let c = match &cache {
            Some(c) => c,
            None => {
                single = read_routes(tx, &[msg]).await?;
                &single
            }
        };
        let ports = c.ports_for(msg);
        let (extra, convoy) = copies(tx, c, msg, &route, *at).await?;
        if convoy {
            // Its subscriptions change where the batch's next messages go.
            cache = None;
        }
        copied.extend(extra.into_iter().map(|copy| (copy, *at)));
        let sent = (!ports.is_empty()).then(|| sent_to_ports(&ports));
        to_ports.extend(ports.into_iter().map(|port| (*msg, port, *at)));
        out.push(match route {
            Route::Unrouted(_) if sent.is_some() => {
                routes.push(*seq, "consumed", None, None, sent, msg.kind);
                PublishOutcome::ToPorts
            }
            Route::Instance(id, sub) => {
                routes.push(*seq, "routed", Some(id), sub, None, msg.kind);
                PublishOutcome::Routed(id)
            }
            Route::Activate {
                orchestration,
                version,
                convoy,
            } => {
                let id = Uuid::now_v7();
                common::routing::insert_instance::<super::PostgresStore>(
                    tx,
                    id,
                    &orchestration,
                    version,
                    None,
                    *at,
                )
                .await?;
                subscribe_convoy(tx, id, &orchestration, convoy, *at).await?;
                // An activating message is the new instance's start message.
                routes.push(*seq, "routed", Some(id), None, None, MessageKind::Start);
                PublishOutcome::Routed(id)
            }
            Route::Unrouted(reason) => {
                let may_be_late = cache.as_ref().is_none_or(|c| c.may_be_late(msg));
                let late = if may_be_late {
                    common::late::late_for::<super::PostgresStore>(tx, msg).await?
                } else {
                    None
                };
                match late {
                    Some((instance, zombie)) => {
                        routes.push(*seq, "zombie", Some(instance), None, Some(zombie), msg.kind);
                        PublishOutcome::Zombie(instance)
                    }
                    None => {
                        routes.push(*seq, "unrouted", None, None, Some(reason), msg.kind);
                        PublishOutcome::Unrouted
                    }
                }
            }
        });
    }
    routes.write(tx).await?;
    common::routing::send_to_ports::<super::PostgresStore>(tx, &to_ports).await?;
    if !copied.is_empty() {
        let copies: Vec<(&NewMessage, DateTime<Utc>)> =
            copied.iter().map(|(m, at)| (m, *at)).collect();
        let refs: Vec<&(&NewMessage, DateTime<Utc>)> = copies.iter().collect();
        insert_messages(tx, &refs).await?;
    }
    Ok(out)
}

/// The copies of `msg` for the other orchestrations that subscribe to it besides its `route`
/// ([`common::routing::fan_out`], a convoy's decided under its lock), each addressed to its
/// instance: the running one its receive matches, or one started here (at `at`); and whether a
/// convoy's instance started (its subscriptions change where later messages go).
pub(super) async fn copies(
    tx: &mut Tx,
    cache: &RouteCache,
    msg: &NewMessage,
    route: &Route,
    at: DateTime<Utc>,
) -> StoreResult<(Vec<NewMessage>, bool)> {
    let mut convoy = false;
    let mut out = Vec::new();
    for (sub, running) in
        common::routing::fan_out::<super::PostgresStore>(tx, cache, msg, route).await?
    {
        let (id, kind) = match running {
            Some(id) => (id, MessageKind::Published),
            None => {
                let id = Uuid::now_v7();
                common::routing::insert_instance::<super::PostgresStore>(
                    tx,
                    id,
                    &sub.orchestration,
                    sub.version,
                    None,
                    at,
                )
                .await?;
                convoy |= sub.convoy.is_some();
                subscribe_convoy(tx, id, &sub.orchestration, sub.convoy, at).await?;
                (id, MessageKind::Start)
            }
        };
        out.push(msg.copy_for(&sub.orchestration, id, kind));
    }
    Ok((out, convoy))
}

/// Inserts messages, addressed ones routed to their instance and the others unrouted: the
/// `seq` of each one stored (a duplicate of a stored id is not).
async fn insert_messages(
    tx: &mut Tx,
    messages: &[&(&NewMessage, DateTime<Utc>)],
) -> StoreResult<HashMap<String, i64>> {
    if messages.is_empty() {
        return Ok(HashMap::new());
    }
    let text =
        |f: fn(&NewMessage) -> String| messages.iter().map(|(m, _)| f(m)).collect::<Vec<_>>();
    let rows: Vec<(String, i64)> = sqlx::query_as(
        "INSERT INTO messages (id, message_type, kind, properties, body, status, instance_id, \
         published_at) \
         SELECT id, message_type, kind, properties, body, \
           CASE WHEN instance_id IS NULL THEN 'unrouted' ELSE 'routed' END, instance_id, at \
         FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::uuid[], \
           $7::timestamptz[]) AS s(id, message_type, kind, properties, body, instance_id, at) \
         ON CONFLICT (id) DO NOTHING RETURNING id, seq",
    )
    .bind(text(|m| m.id.clone()))
    .bind(text(|m| m.message_type.clone()))
    .bind(text(|m| m.kind.as_str().to_owned()))
    .bind(text(|m| {
        serde_json::to_string(&m.properties).unwrap_or_default()
    }))
    .bind(text(|m| m.body.to_string()))
    .bind(messages.iter().map(|(m, _)| m.target).collect::<Vec<_>>())
    .bind(messages.iter().map(|(_, at)| *at).collect::<Vec<_>>())
    .fetch_all(&mut **tx)
    .await
    .map_err(|e| map_err("insert messages", e))?;
    Ok(rows.into_iter().collect())
}

/// Reads the routing rows of the messages' types, once per type. A subscription row that
/// cannot be read (a tool wrote it) is left out, with a warning: it routes nothing, and never
/// stops the publishing of its type.
pub(super) async fn read_routes(tx: &mut Tx, messages: &[&NewMessage]) -> StoreResult<RouteCache> {
    let mut cache = RouteCache::default();
    for (message_type, msgs) in RouteCache::by_type(messages.iter().copied()) {
        let key_sets: Vec<String> = sqlx::query_scalar(
            "SELECT correlation_keys FROM subscription_keys WHERE message_type = $1",
        )
        .bind(message_type)
        .fetch_all(&mut **tx)
        .await
        .map_err(|e| map_err("read routes", e))?;
        let values = cache.key_sets(message_type, key_sets, &msgs);
        if !values.is_empty() {
            let rows: Vec<(String, Uuid, Uuid)> = sqlx::query_as(
                "SELECT correlation, id, instance_id FROM subscriptions \
                 WHERE message_type = $1 AND instance_id IS NOT NULL AND correlation = ANY($2) \
                 ORDER BY created_at, id",
            )
            .bind(message_type)
            .bind(&values)
            .fetch_all(&mut **tx)
            .await
            .map_err(|e| map_err("read routes", e))?;
            for (correlation, sub, instance) in rows {
                cache.subscription(message_type, correlation, sub, instance);
            }
        }
        let activations =
            common::routing::read_activations::<super::PostgresStore>(tx, message_type).await?;
        cache.activations(message_type, activations);
    }
    Ok(cache)
}

/// The routes of a batch's published messages, written in one statement.
#[derive(Default)]
struct RouteRows {
    seqs: Vec<i64>,
    statuses: Vec<&'static str>,
    instances: Vec<Option<Uuid>>,
    subscriptions: Vec<Option<Uuid>>,
    reasons: Vec<Option<String>>,
    kinds: Vec<&'static str>,
}

impl RouteRows {
    fn push(
        &mut self,
        seq: i64,
        status: &'static str,
        instance: Option<Uuid>,
        subscription: Option<Uuid>,
        reason: Option<String>,
        kind: MessageKind,
    ) {
        self.seqs.push(seq);
        self.statuses.push(status);
        self.instances.push(instance);
        self.subscriptions.push(subscription);
        self.reasons.push(reason);
        self.kinds.push(kind.as_str());
    }

    async fn write(self, tx: &mut Tx) -> StoreResult<()> {
        if self.seqs.is_empty() {
            return Ok(());
        }
        sqlx::query(
            "UPDATE messages m SET status = r.status, instance_id = r.instance_id, \
             subscription_id = r.subscription_id, reason = r.reason, kind = r.kind \
             FROM UNNEST($1::int8[], $2::text[], $3::uuid[], $4::uuid[], $5::text[], $6::text[]) \
               AS r(seq, status, instance_id, subscription_id, reason, kind) \
             WHERE m.seq = r.seq",
        )
        .bind(&self.seqs)
        .bind(&self.statuses)
        .bind(&self.instances)
        .bind(&self.subscriptions)
        .bind(&self.reasons)
        .bind(&self.kinds)
        .execute(&mut **tx)
        .await
        .map_err(|e| map_err("write", e))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    //! Every shape of [`write_common`]'s statement, prepared and run by a commit.

    use super::super::tests::{at, fresh, new_instance, point};
    use super::*;
    use crate::store::{
        FirstPoint, InstanceStatus, Maintenance, MessageBox, OutboxRow, SubscriptionRow,
    };
    use crate::Correlation;

    fn send(id: String, instance_id: Uuid) -> OutboxRow {
        OutboxRow {
            id,
            instance_id,
            port: "payment".into(),
            message_type: "payment.requested".into(),
            body: serde_json::json!({"amount": 5}),
            expects_reply: true,
            attempts: 0,
        }
    }

    /// Each failure the engine raises in SQL is told apart by its SQLSTATE, whatever its text:
    /// `point_check` raises the code it is given, and [`raised`] reads only that code.
    #[tokio::test]
    async fn the_engines_own_failures_are_told_apart_by_their_code() {
        let Some(store) = fresh().await else { return };
        for (code, other) in [
            (NOT_ROUTED_CODE, NEEDS_TRANSACTION_CODE),
            (NEEDS_TRANSACTION_CODE, NOT_ROUTED_CODE),
        ] {
            let err = sqlx::query("SELECT point_check(false, $1, 'a text the engine never reads')")
                .bind(code)
                .execute(&store.pool)
                .await
                .expect_err("a failed check raises");
            assert!(raised(&err, code), "{code}: {err}");
            assert!(!raised(&err, other), "{code} is not {other}: {err}");
            assert!(
                matches!(map_err("a test", err), StoreError::Database { .. }),
                "an engine failure is not retryable"
            );
        }
        sqlx::query("SELECT point_check(true, $1, 'never raised')")
            .bind(NOT_ROUTED_CODE)
            .execute(&store.pool)
            .await
            .expect("a check that holds raises nothing");
        let other = sqlx::query("SELECT 1 / 0")
            .execute(&store.pool)
            .await
            .expect_err("a division by zero fails");
        assert!(!raised(&other, NOT_ROUTED_CODE) && !raised(&other, NEEDS_TRANSACTION_CODE));
    }

    /// A group of points of each of the 128 shapes (a point of each part the shape has; a
    /// first point beside a held instance's for [`Shape::FIRST`]; alone, through
    /// [`write_alone`], or in a transaction, through [`MessageBox::commit`]) commits on a fresh
    /// database: every text is prepared by the server and writes what it should.
    #[tokio::test]
    async fn a_point_of_every_statement_shape_commits() {
        let Some(store) = fresh().await else { return };
        let now = at(0);
        store.recover("host-a", now).await.expect("recover");
        for shape in Shape::all() {
            let alone = shape.has(Shape::ALONE);
            let held = new_instance("order");
            store
                .start_instances(vec![held.clone()], None, now)
                .await
                .expect("start");
            let epoch = store
                .acquire("host-a", &[held.id], now, at(3600))
                .await
                .expect("acquire")[0]
                .epoch;
            let request = format!("request-{}", shape.0);
            let mut seq = 1;
            if shape.has(Shape::DELIVERS) {
                let mut sent = point(held.id, epoch, "host-a", seq, now);
                sent.outbox = vec![send(request.clone(), held.id)];
                let out = store.commit(&[sent]).await.expect("commit");
                assert_eq!(out, [CommitOutcome::Committed]);
                seq += 1;
            }
            let mut p = point(held.id, epoch, "host-a", seq, now);
            if shape.has(Shape::CONSUMES) {
                let start: i64 =
                    sqlx::query_scalar("SELECT seq FROM messages WHERE instance_id = $1")
                        .bind(held.id)
                        .fetch_one(store.pool())
                        .await
                        .expect("start message");
                p.consumed = vec![start];
            }
            if shape.has(Shape::SENDS) {
                p.outbox = vec![send(format!("send-{}", shape.0), held.id)];
            }
            if shape.has(Shape::DELIVERS) {
                p.delivered = vec![request];
            }
            if shape.has(Shape::RELEASES) {
                p.release = true;
                if alone {
                    // A release alone gives up a finished instance (nothing left to claim).
                    p.status = InstanceStatus::Completed;
                }
            }
            if shape.has(Shape::GIVES) {
                p.subscriptions = Some(if alone {
                    vec![]
                } else {
                    vec![SubscriptionRow {
                        id: Uuid::new_v4(),
                        message_type: "payment.received".into(),
                        correlation: Correlation::on("order", shape.0),
                        earlier: false,
                    }]
                });
            }
            if !alone {
                // A timer takes a statement of its own: the group goes through a transaction.
                p.set_timers = vec![("timeout".into(), at(3600))];
            }
            let mut group = Vec::new();
            if shape.has(Shape::FIRST) {
                let first = new_instance("order");
                let mut f = point(first.id, FIRST_EPOCH, "host-a", 1, now);
                f.start = Some(Box::new(FirstPoint {
                    instance: first,
                    lease_until: at(3600),
                }));
                group.push(f);
            }
            group.push(p);
            assert_eq!(Shape::of(&CommitPlan::of(&group).runs[0], alone), shape);
            let out = if alone {
                write_alone(&store, &group)
                    .await
                    .expect("write")
                    .unwrap_or_else(|| panic!("{shape:?} was not written alone"))
            } else {
                assert_eq!(write_alone(&store, &group).await.expect("write"), None);
                store.commit(&group).await.expect("commit")
            };
            assert!(
                out.iter().all(|o| *o == CommitOutcome::Committed),
                "{shape:?}: {out:?}"
            );
            let history: i64 =
                sqlx::query_scalar("SELECT COUNT(*) FROM history WHERE instance_id = $1")
                    .bind(held.id)
                    .fetch_one(store.pool())
                    .await
                    .expect("history");
            assert_eq!(history, seq, "{shape:?}");
        }
    }
}
