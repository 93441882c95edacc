//! Multi-row writes: a group of persistence points in one transaction with a few statements
//! per group, and starts in batches.
//!
//! sqlx runs each SQLite query on the connection's worker thread, so every query costs two
//! thread hand-offs: a group of 256 points written one statement per row was ~1,300 of them.
//! Here the parts every point has (the fenced state update, consumed messages, sends, replies
//! taken, history, subscriptions, children, releases) are one multi-row statement each for the
//! whole group; only the rare parts (a removed subscription, timers, publishes) go point by
//! point. The common parts of a run of points go to the worker together, as one [`Script`]
//! (statements in one query, each one's result read back). Each point is still all-or-nothing
//! and fenced: its rows are written only if its instance row is still held under its epoch
//! (checked in SQL for a small run, read first for a large one), and the whole group is one
//! transaction.

use std::collections::{BTreeSet, HashSet};
use std::ops::Range;

use chrono::{DateTime, Utc};
use futures_util::TryStreamExt;
use sqlx::query_builder::Separated;
use sqlx::sqlite::{SqliteQueryResult, SqliteRow};
use sqlx::{Either, Executor, QueryBuilder, Sqlite, SqliteConnection};

use uuid::Uuid;

use crate::store::plan::{not_routed, CommitPlan, Row, RunPlan, StoredSubscription, Written};
use crate::store::{HeldStart, Holder, OutboxRow, FIRST_EPOCH};

use super::writer::Alone;
use super::SqliteStore;
use super::{
    map_err, parse_uuid, ts, CommitOutcome, MessageKind, NewInstance, NewSubscription,
    PersistencePoint, StoreError, StoreResult, Tx, Writer,
};
use crate::store::common::Backend as _;

/// Whether to keep a multi-row statement prepared: small groups (one point, a few) recur with
/// the same text, so preparing each once saves a parse per commit on the latency path; large
/// groups vary in size and would only churn the statement cache.
pub(super) fn reuse(rows: usize) -> bool {
    rows <= 8
}

/// Runs a multi-row statement, kept prepared when small ([`reuse`]).
pub(super) async fn execute(
    tx: &mut Tx,
    mut q: QueryBuilder<'_, Sqlite>,
    rows: usize,
) -> StoreResult<SqliteQueryResult> {
    q.build()
        .persistent(reuse(rows))
        .execute(&mut **tx)
        .await
        .map_err(|e| map_err("execute", e))
}

/// Runs `q` (kept prepared as [`execute`] does) and returns its one text column.
pub(super) async fn fetch_texts(
    tx: &mut Tx,
    mut q: QueryBuilder<'_, Sqlite>,
    rows: usize,
) -> StoreResult<Vec<String>> {
    q.build_query_scalar()
        .persistent(reuse(rows))
        .fetch_all(&mut **tx)
        .await
        .map_err(|e| map_err("fetch texts", e))
}

/// Rows per multi-row statement: well under SQLite's 32,766 bound parameters at 16 a row.
pub(super) const ROWS_PER_STATEMENT: usize = 1_000;

/// Points per run of a group commit: a large group is written as runs of this many points, in
/// the same transaction. A busy host's points mostly have the same shape (a send, a reply taken,
/// a history row), so its full runs have the same statements, which stay prepared
/// ([`keep_run`]). Written as one run, a group of 1,500 points was one set of
/// statements parsed anew at every commit: 17 % of the writer's time in W1.
const POINTS_PER_RUN: usize = 64;

/// Whether a script of a run of `points` points, whose largest statement has `rows` rows, stays
/// prepared: small ones ([`reuse`]), and full runs of points of a few rows each (their text
/// recurs; a run of larger points varies too much to be worth the statement cache's memory).
fn keep_run(points: usize, rows: usize) -> bool {
    reuse(rows) || (points == POINTS_PER_RUN && rows <= 4 * POINTS_PER_RUN)
}

/// Statements sent to the connection's worker as one query, one round trip for all of them, for
/// writes that need nothing read back. (sqlx 0.8 runs every statement of a SQLite query in turn,
/// binding the parameters in order; its issue 3108 discusses dropping that in a later version,
/// where `run` would send them one by one.)
struct Script<'a> {
    q: QueryBuilder<'a, Sqlite>,
    statements: usize,
    /// The most rows of any statement: a script of small ones is kept prepared ([`reuse`]).
    rows: usize,
    /// The points of the run it writes, if it writes one ([`keep_run`]).
    points: usize,
}

impl<'a> Script<'a> {
    fn new() -> Self {
        Script {
            q: QueryBuilder::new(""),
            statements: 0,
            rows: 0,
            points: 0,
        }
    }

    /// Says the script writes a run of `points` points: kept prepared if [`keep_run`] says so.
    fn of_run(mut self, points: usize) -> Self {
        self.points = points;
        self
    }

    /// Starts the next statement, of `rows` rows, and returns the builder to write it with.
    fn next(&mut self, rows: usize) -> &mut QueryBuilder<'a, Sqlite> {
        if self.statements > 0 {
            self.q.push("; ");
        }
        self.statements += 1;
        self.rows = self.rows.max(rows);
        &mut self.q
    }

    /// The position of the next statement among the script's results ([`Script::run_each`]).
    fn position(&self) -> usize {
        self.statements
    }

    /// Runs the statements in order.
    async fn run(self, tx: &mut Tx) -> StoreResult<()> {
        if self.statements == 0 {
            return Ok(());
        }
        let rows = self.rows;
        execute(tx, self.q, rows).await.map(drop)
    }

    /// A script that is a whole write transaction: `BEGIN IMMEDIATE` first, and run by
    /// [`Script::run_alone`], which ends it with `COMMIT`.
    fn transaction() -> Self {
        let mut script = Script::new();
        script.next(0).push("BEGIN IMMEDIATE");
        script
    }

    /// Runs a [`Script::transaction`] on `conn` and commits it, in one round trip to the
    /// worker; returns each statement's result, in order (`BEGIN` first). A script that fails
    /// is rolled back.
    async fn run_alone(mut self, mut conn: Alone) -> StoreResult<Vec<Ran>> {
        self.next(0).push("COMMIT");
        match self.run_each(&mut conn).await {
            Ok(results) => {
                conn.finished();
                Ok(results)
            }
            Err(e) => {
                if let Err(rollback) = conn.failed().await {
                    tracing::warn!(error = %rollback, "rolling back a failed write failed");
                }
                Err(e)
            }
        }
    }

    /// Runs the statements in order; returns each one's result, in order.
    async fn run_each(mut self, conn: &mut SqliteConnection) -> StoreResult<Vec<Ran>> {
        let mut results = Vec::with_capacity(self.statements);
        let mut rows = Vec::new();
        let keep = keep_run(self.points, self.rows);
        let query = self.q.build().persistent(keep);
        let mut stream = conn.fetch_many(query);
        while let Some(item) = stream
            .try_next()
            .await
            .map_err(|e| map_err("run each", e))?
        {
            match item {
                Either::Left(done) => results.push(Ran {
                    rows: std::mem::take(&mut rows),
                    affected: done.rows_affected(),
                }),
                Either::Right(row) => rows.push(row),
            }
        }
        if results.len() != self.statements {
            return Err(StoreError::Corrupt(format!(
                "a script of {} statements reported {} results",
                self.statements,
                results.len()
            )));
        }
        Ok(results)
    }
}

/// What one statement of a [`Script`] did.
struct Ran {
    rows: Vec<SqliteRow>,
    affected: u64,
}

impl Ran {
    /// The rows, each decoded as `T`.
    fn decode<T>(&self) -> StoreResult<Vec<T>>
    where
        T: for<'r> sqlx::FromRow<'r, SqliteRow>,
    {
        self.rows
            .iter()
            .map(|row| T::from_row(row).map_err(|e| map_err("decode", e)))
            .collect()
    }
}

/// Writes `points` in order; a point whose epoch or owner moved is `Fenced` and writes nothing.
pub(super) async fn write_points(
    tx: &mut Tx,
    points: &[PersistencePoint],
    reroute_types: &mut BTreeSet<String>,
) -> StoreResult<Vec<CommitOutcome>> {
    let mut outcomes = Vec::with_capacity(points.len());
    let runs = points
        .chunks(POINTS_PER_RUN)
        .flat_map(|chunk| CommitPlan::of(chunk).runs);
    for plan in runs {
        let (committed, stored) = write_common(tx, &plan).await?;
        let written = plan.written(&committed);
        sync_subscriptions(tx, &written, stored, reroute_types).await?;
        start_instances(tx, &written.children, None).await?;
        write_timers(tx, &written).await?;
        super::publish::publish_all(tx, &written.messages).await?;
        outcomes.extend(plan.outcomes(&committed));
    }
    Ok(outcomes)
}

/// Writes `points` as one transaction sent in one round trip ([`Script::run_alone`]), if they
/// can be: a small run (at most one point per instance, fenced in SQL) that writes only the
/// parts every point has, on a database file. Returns `None`, having done nothing, otherwise,
/// and when a check of the script failed: the points then go through a transaction, which
/// makes every check again and reports what failed (a subscription stored for a point that
/// gives an empty set is no failure there: it is removed).
pub(super) async fn write_alone(
    writer: &Writer,
    points: &[PersistencePoint],
) -> StoreResult<Option<Vec<CommitOutcome>>> {
    // The cheap checks first: a large group commit is never sent alone.
    let alone = fenced_in_sql(points)
        && points
            .iter()
            .all(PersistencePoint::writes_only_common_parts);
    if !alone {
        return Ok(None);
    }
    let Some(plan) = CommitPlan::single(points) else {
        return Ok(None);
    };
    let Some(conn) = writer.alone().await? else {
        return Ok(None);
    };
    let mut script = Script::transaction();
    push_first_points(&mut script, &plan);
    let common = push_common(&mut script, &plan, Fenced::Alone);
    let results = match script.run_alone(conn).await {
        Ok(results) => results,
        Err(e) if failed_check(&e) => return Ok(None),
        Err(e) => return Err(e),
    };
    let (committed, _) = common.read(&results)?;
    Ok(Some(plan.outcomes(&committed).collect()))
}

/// Whether a run is fenced in SQL, in the same round trip as its writes: a small one (the
/// latency path: a few points of a few rows each). A large one reads its fence first and
/// writes only the points it matched: conditioning every row on the table costs SQLite more
/// than the round trip saves (~20% more work for a group of 256 points; W3's points of 100
/// sends each took 0.7 ms longer).
fn fenced_in_sql(run: &[PersistencePoint]) -> bool {
    let rows: usize = run
        .iter()
        .map(|p| p.consumed.len() + p.outbox.len() + p.delivered.len())
        .sum();
    reuse(run.len()) && reuse(rows)
}

/// What every point of a run writes: the fenced update of its instance row, consumed messages,
/// sends, replies taken, history and releases, and a read of the subscriptions stored for the
/// points that give their set, as one script (one round trip to the worker; a large run reads
/// its fence in one before). Returns the instances whose points were written and those
/// subscriptions. Releasing comes last in a point's writes but touches nothing the later parts
/// write (their timers and messages are new and unlocked), so it goes with the rest.
async fn write_common(
    tx: &mut Tx,
    plan: &RunPlan<'_>,
) -> StoreResult<(HashSet<Uuid>, Vec<StoredSubscription>)> {
    let in_sql = fenced_in_sql(plan.run);
    let mut committed = HashSet::with_capacity(plan.run.len());
    let mut script = Script::new().of_run(plan.run.len());
    let matched;
    let (points, fenced) = if in_sql {
        push_first_points(&mut script, plan);
        (plan, Fenced::InSql)
    } else {
        let mut fence = Script::new().of_run(plan.run.len());
        push_first_points(&mut fence, plan);
        let positions = push_update(&mut fence, plan.run);
        collect_ids(&fence.run_each(tx).await?, &positions, &mut committed)?;
        matched = plan.fenced_to(&committed);
        (&matched, Fenced::Before)
    };
    let common = push_common(&mut script, points, fenced);
    let results = script
        .run_each(tx)
        .await
        .map_err(|e| consumed_not_routed(e, &plan.consumed))?;
    let (fenced, stored) = common.read(&results)?;
    committed.extend(fenced);
    if !in_sql {
        check_consumed(&results, &common.consumes, &points.consumed)?;
    }
    Ok((committed, stored))
}

/// How a run's common parts are fenced.
#[derive(Clone, Copy, PartialEq)]
enum Fenced {
    /// Its fence was read before; `points` are those it matched.
    Before,
    /// In SQL, in the same script (the fence and the fenced update first).
    InSql,
    /// In SQL, in a script that is the whole transaction ([`write_alone`]): its points give no
    /// subscription set but an empty one, and the script checks that none is stored for them
    /// instead of reading them.
    Alone,
}

/// Adds the common parts of `plan` to `script`, fenced as `fenced` says.
fn push_common<'a>(script: &mut Script<'a>, plan: &RunPlan<'a>, fenced: Fenced) -> Common {
    let in_sql = fenced != Fenced::Before;
    let mut updates = Vec::new();
    if in_sql {
        push_fence(script, plan.run);
        updates = push_update(script, plan.run);
    }
    let consumes = push_consume(script, &plan.consumed, in_sql);
    insert_sends(script, &plan.sends, in_sql);
    mark_delivered(script, &plan.delivered, in_sql);
    insert_history(script, &plan.points, in_sql);
    release(script, plan, in_sql);
    let reads = push_read_subscriptions(script, &plan.giving, fenced);
    if in_sql {
        script.next(0).push("DELETE FROM fenced");
    }
    Common {
        updates,
        consumes,
        reads,
    }
}

/// Where the common parts of a run are among a script's results ([`push_common`]).
struct Common {
    /// The fenced updates (fenced in SQL only).
    updates: Vec<usize>,
    /// The consumed messages' statements, with the range of their rows in the plan.
    consumes: Vec<(usize, Range<usize>)>,
    /// The reads of stored subscriptions.
    reads: Vec<usize>,
}

impl Common {
    /// The instances the fenced updates matched, and the subscriptions read.
    fn read(&self, results: &[Ran]) -> StoreResult<(HashSet<Uuid>, Vec<StoredSubscription>)> {
        let mut committed = HashSet::new();
        collect_ids(results, &self.updates, &mut committed)?;
        let mut stored = Vec::new();
        for at in &self.reads {
            for (instance, sub, message_type) in
                results[*at].decode::<(String, String, String)>()?
            {
                stored.push((parse_uuid(&instance)?, parse_uuid(&sub)?, message_type));
            }
        }
        Ok((committed, stored))
    }
}

/// Every message `consumed` (by the points the fence read first matched) was routed to its
/// instance; checked in Rust for a run fenced before its writes (in SQL otherwise,
/// [`push_consume`]).
fn check_consumed(
    results: &[Ran],
    consumes: &[(usize, Range<usize>)],
    consumed: &[Row<'_, i64>],
) -> StoreResult<()> {
    for (at, rows) in consumes {
        if results[*at].affected != rows.len() as u64 {
            return Err(not_routed(&consumed[rows.clone()]));
        }
    }
    Ok(())
}

/// Whether `err` is a check made in SQL failing (the temporary table `checks`).
fn failed_check(err: &StoreError) -> bool {
    matches!(err, StoreError::Database { source, .. } if super::writer::failed_check(source))
}

/// `err`, or, if it is the check in SQL of [`push_consume`] failing, the error saying so.
fn consumed_not_routed(err: StoreError, consumed: &[Row<'_, i64>]) -> StoreError {
    if !failed_check(&err) {
        return err;
    }
    not_routed(consumed)
}

/// Adds the instance ids the statements at `positions` returned to `into`.
fn collect_ids(results: &[Ran], positions: &[usize], into: &mut HashSet<Uuid>) -> StoreResult<()> {
    for at in positions {
        for (id,) in results[*at].decode::<(String,)>()? {
            into.insert(parse_uuid(&id)?);
        }
    }
    Ok(())
}

/// The condition that keeps a statement's rows to the fenced points (the temporary table
/// `fenced`, [`push_fence`]) when the run is fenced in SQL; nothing when its points are known
/// to be fenced already.
fn only_fenced(in_sql: bool, column: &str) -> String {
    if in_sql {
        format!(" AND {column} IN (SELECT id FROM fenced)")
    } else {
        String::new()
    }
}

/// Fills the temporary table `fenced` with the run's instances whose rows still hold the
/// points' epochs and hosts (`CROSS JOIN` keeps the points as the outer loop). Every other
/// write of the run is conditioned on it, so the run's writes go to the worker as one script
/// and each point stays all-or-nothing.
fn push_fence<'a>(script: &mut Script<'a>, run: &'a [PersistencePoint]) {
    for chunk in run.chunks(ROWS_PER_STATEMENT) {
        let q = script.next(chunk.len());
        q.push("WITH p (id, epoch, host) AS (");
        q.push_values(chunk, |mut row, p| {
            row.push_bind(p.instance_id.to_string())
                .push_bind(p.epoch)
                .push_bind(&p.host);
        });
        q.push(
            ") INSERT INTO fenced (id) SELECT p.id FROM p CROSS JOIN instances \
             WHERE instances.id = p.id AND instances.epoch = p.epoch \
             AND instances.owner = p.host",
        );
    }
}

/// Inserts the instances the run's first points create ([`crate::store::FirstPoint`]), started and held by
/// each point's host under its epoch, and their start messages, consumed by the points: the
/// fence and the fenced update then find them as any instance held. An instance that is stored
/// already fails the script (its id is the key).
fn push_first_points<'a>(script: &mut Script<'a>, plan: &RunPlan<'a>) {
    let rows: Vec<StartRow<'a>> = plan
        .firsts
        .iter()
        .map(|&Row { point, row: first }| StartRow {
            instance: &first.instance,
            at: point.at,
            owner: Some(&point.host),
            lease_until: Some(first.lease_until),
            epoch: point.epoch,
            message: StartMessage::Consumed,
        })
        .collect();
    for chunk in rows.chunks(ROWS_PER_STATEMENT) {
        push_start_rows(script, chunk, "");
    }
}

/// The update of every fenced instance row of the run, returning the ids it matched: the
/// positions of its statements. It checks the fence itself (the same condition as
/// [`push_fence`], on the rows as they still are) rather than reading `fenced`: joined to the
/// temporary table, SQLite's planner scanned the points once per row.
fn push_update<'a>(script: &mut Script<'a>, run: &'a [PersistencePoint]) -> Vec<usize> {
    let mut positions = Vec::new();
    for chunk in run.chunks(ROWS_PER_STATEMENT) {
        positions.push(script.position());
        let q = script.next(chunk.len());
        q.push(
            "WITH p (id, epoch, host, status, step, waiting_for, next_timer_at, at, last_error, \
             state, engine_state, output, history_seq, release, resumable) AS (",
        );
        q.push_values(chunk, |mut row, p| {
            row.push_bind(p.instance_id.to_string())
                .push_bind(p.epoch)
                .push_bind(&p.host)
                .push_bind(p.status.as_str())
                .push_bind(&p.step)
                .push_bind(&p.waiting_for)
                .push_bind(p.next_timer_at.map(ts))
                .push_bind(ts(p.at))
                .push_bind(&p.last_error)
                .push_bind(&p.state)
                .push_bind(&p.engine_state)
                .push_bind(p.output.as_ref().map(|o| o.to_string()))
                .push_bind(p.history_seq)
                .push_bind(p.release)
                .push_bind(p.resumable);
        });
        q.push(
            ") UPDATE instances SET status = p.status, step = p.step, waiting_for = p.waiting_for, \
             next_timer_at = p.next_timer_at, updated_at = p.at, last_error = p.last_error, \
             state = COALESCE(p.state, instances.state), \
             engine_state = COALESCE(p.engine_state, instances.engine_state), \
             output = COALESCE(p.output, instances.output), history_seq = p.history_seq, \
             owner = CASE WHEN p.release THEN NULL ELSE instances.owner END, \
             lease_expires_at = CASE WHEN p.release THEN NULL ELSE instances.lease_expires_at END, \
             resumable = p.resumable \
             FROM p WHERE instances.id = p.id AND instances.epoch = p.epoch \
             AND instances.owner = p.host RETURNING id",
        );
    }
    positions
}

/// Runs a statement that returns instance ids, kept prepared when small ([`reuse`]), and adds
/// them to `into`.
async fn fetch_ids(
    tx: &mut Tx,
    q: QueryBuilder<'_, Sqlite>,
    rows: usize,
    into: &mut HashSet<Uuid>,
) -> StoreResult<()> {
    for id in fetch_texts(tx, q, rows).await? {
        into.insert(parse_uuid(&id)?);
    }
    Ok(())
}

/// Marks the messages the fenced points consumed; each must have been routed to its
/// instance. Returns each statement's position and the range of its rows, to check that every
/// one was marked: fenced in SQL, the script checks it itself (each statement is followed by a
/// check, through the temporary table `checks`, that fails the script unless it marked every
/// message of the points in `fenced`).
fn push_consume(
    script: &mut Script<'_>,
    rows: &[Row<'_, i64>],
    in_sql: bool,
) -> Vec<(usize, Range<usize>)> {
    let mut statements = Vec::new();
    for (n, chunk) in rows.chunks(ROWS_PER_STATEMENT).enumerate() {
        let at = script.position();
        let q = script.next(chunk.len());
        q.push("WITH c (instance_id, seq, at) AS (");
        q.push_values(chunk, |mut row, r| {
            row.push_bind(r.instance().to_string())
                .push_bind(r.row)
                .push_bind(ts(r.at()));
        });
        q.push(
            ") UPDATE messages SET status = 'consumed', consumed_at = c.at, locked_by = NULL \
             FROM c WHERE messages.seq = c.seq AND messages.instance_id = c.instance_id \
             AND messages.status = 'routed'",
        )
        .push(only_fenced(in_sql, "c.instance_id"));
        if in_sql {
            let q = script.next(chunk.len());
            q.push("WITH c (instance_id) AS (");
            q.push_values(chunk, |mut row, r| {
                row.push_bind(r.instance().to_string());
            });
            q.push(
                ") INSERT INTO checks (ok) SELECT changes() = (SELECT COUNT(*) FROM c \
                 WHERE instance_id IN (SELECT id FROM fenced))",
            );
        }
        let first = n * ROWS_PER_STATEMENT;
        statements.push((at, first..first + chunk.len()));
    }
    statements
}

/// The points' sends, locked to the writing host for delivery right after commit.
fn insert_sends<'a>(script: &mut Script<'a>, rows: &[Row<'a, &'a OutboxRow>], in_sql: bool) {
    let columns = "(id, instance_id, port, message_type, body, expects_reply, status, \
         next_attempt_at, locked_by, locked_until, created_at)";
    for chunk in rows.chunks(ROWS_PER_STATEMENT) {
        push_insert(
            script,
            "outbox",
            columns,
            chunk,
            in_sql,
            |mut b, Row { point: p, row }| {
                let at = ts(p.at);
                b.push_bind(&row.id)
                    .push_bind(p.instance_id.to_string())
                    .push_bind(&row.port)
                    .push_bind(&row.message_type)
                    .push_bind(row.body.to_string())
                    .push_bind(row.expects_reply)
                    .push_bind("pending")
                    .push_bind(at.clone())
                    .push_bind(&p.host)
                    .push_bind(ts(p.outbox_lock_until))
                    .push_bind(at);
            },
        );
    }
}

/// One multi-row insert of `rows` into `table`; when the run is fenced in SQL, of the rows of
/// fenced points only ([`only_fenced`] on their `instance_id`).
fn push_insert<'a, T: Copy>(
    script: &mut Script<'a>,
    table: &str,
    columns: &str,
    rows: &[T],
    in_sql: bool,
    bind: impl FnMut(Separated<'_, 'a, Sqlite, &'static str>, T),
) {
    let q = script.next(rows.len());
    match in_sql {
        true => q.push(format_args!("WITH v {columns} AS (")),
        false => q.push(format_args!("INSERT INTO {table} {columns} ")),
    };
    q.push_values(rows.iter().copied(), bind);
    if in_sql {
        q.push(format_args!(
            ") INSERT INTO {table} {columns} SELECT * FROM v WHERE true{}",
            only_fenced(in_sql, "instance_id")
        ));
    }
}

/// Requests whose replies the instances took in memory: delivered, and any copy of a reply
/// another host stored is consumed (the instance has its answer).
fn mark_delivered<'a>(script: &mut Script<'a>, rows: &[Row<'a, &'a str>], in_sql: bool) {
    for chunk in rows.chunks(ROWS_PER_STATEMENT) {
        for update in [
            "UPDATE outbox SET status = 'delivered', attempts = attempts + 1, delivered_at = d.at, \
             last_attempt_at = d.at, delivered_via = 'primary', locked_by = NULL, \
             locked_until = NULL, last_error = NULL \
             FROM d WHERE outbox.id = d.id AND outbox.status IN ('pending', 'held', 'give_up')",
            "UPDATE messages SET status = 'consumed', consumed_at = d.at, locked_by = NULL \
             FROM d WHERE messages.id = d.id || ':reply' AND messages.status = 'routed'",
        ] {
            let q = script.next(chunk.len());
            q.push("WITH d (id, at, instance_id) AS (");
            q.push_values(chunk, |mut row, r| {
                row.push_bind(r.row)
                    .push_bind(ts(r.at()))
                    .push_bind(r.instance().to_string());
            });
            q.push(") ")
                .push(update)
                .push(only_fenced(in_sql, "d.instance_id"));
        }
    }
}

/// One history row per point, under the epoch its fenced update matched.
fn insert_history<'a>(script: &mut Script<'a>, written: &[&'a PersistencePoint], in_sql: bool) {
    let columns = "(instance_id, seq, reason, step, status, at, host, epoch, detail)";
    for chunk in written.chunks(ROWS_PER_STATEMENT) {
        push_insert(script, "history", columns, chunk, in_sql, |mut row, p| {
            row.push_bind(p.instance_id.to_string())
                .push_bind(p.history_seq)
                .push_bind(p.reason.as_str())
                .push_bind(&p.step)
                .push_bind(p.status.as_str())
                .push_bind(ts(p.at))
                .push_bind(&p.host)
                .push_bind(p.epoch)
                .push_bind(p.detail.as_deref());
        });
    }
}

/// Timers the points cancelled, fired or set.
async fn write_timers(tx: &mut Tx, written: &Written<'_>) -> StoreResult<()> {
    let (cancelled, set) = (&written.cancelled_timers, &written.set_timers);
    for chunk in cancelled.chunks(ROWS_PER_STATEMENT) {
        let mut q = QueryBuilder::new("WITH c (instance_id, name) AS (");
        q.push_values(chunk, |mut row, (id, name)| {
            row.push_bind(id.to_string()).push_bind(*name);
        });
        q.push(
            ") DELETE FROM timers WHERE (instance_id, name) IN (SELECT instance_id, name FROM c)",
        );
        execute(tx, q, chunk.len()).await?;
    }
    for chunk in set.chunks(ROWS_PER_STATEMENT) {
        let mut q = QueryBuilder::new("INSERT INTO timers (instance_id, name, due_at) ");
        q.push_values(chunk, |mut row, (id, name, at)| {
            row.push_bind(id.to_string())
                .push_bind(*name)
                .push_bind(ts(*at));
        });
        q.push(
            " ON CONFLICT (instance_id, name) DO UPDATE SET due_at = excluded.due_at, \
             locked_by = NULL",
        );
        execute(tx, q, chunk.len()).await?;
    }
    Ok(())
}

/// Releases what the points giving up their instances held. Messages are given back
/// uncounted (their claim was not a failed delivery), except the points' `failed` ones, whose
/// delivery failed the instance: they keep their count (poison protection).
fn release(script: &mut Script<'_>, plan: &RunPlan<'_>, in_sql: bool) {
    let ids: Vec<String> = plan
        .released
        .iter()
        .map(|p| p.instance_id.to_string())
        .collect();
    let failed: Vec<i64> = plan.failed.iter().map(|r| r.row).collect();
    push_unlock(script, None, &ids, &failed, in_sql);
}

/// Releases what instances hold (with a `holder`, only what it holds; others' locks stay).
/// Messages are given back uncounted (their claim was not a failed delivery), except `failed`,
/// whose delivery failed the instance: they keep their count (poison protection).
pub(super) async fn unlock_instances(
    tx: &mut Tx,
    holder: Option<&str>,
    ids: &[String],
    failed: &[i64],
) -> StoreResult<()> {
    let mut script = Script::new();
    push_unlock(&mut script, holder, ids, failed, false);
    script.run(tx).await
}

/// The statements of [`unlock_instances`]; with `fenced`, only for the instances in the
/// temporary table `fenced` ([`push_fence`]).
fn push_unlock(
    script: &mut Script<'_>,
    holder: Option<&str>,
    ids: &[String],
    failed: &[i64],
    fenced: bool,
) {
    let only_fenced = only_fenced(fenced, "instance_id");
    for chunk in failed.chunks(ROWS_PER_STATEMENT) {
        let q = script.next(chunk.len());
        q.push("UPDATE messages SET locked_by = NULL WHERE seq IN (");
        let mut list = q.separated(", ");
        for seq in chunk {
            list.push_bind(*seq);
        }
        q.push(") AND status = 'routed'").push(&only_fenced);
    }
    for chunk in ids.chunks(ROWS_PER_STATEMENT) {
        for update in [
            format!(
                "UPDATE messages SET locked_by = NULL, {} WHERE status = 'routed' AND ",
                SqliteStore::GIVE_BACK
            ),
            "UPDATE timers SET locked_by = NULL WHERE ".to_string(),
        ] {
            let q = script.next(chunk.len());
            q.push(update);
            match holder {
                Some(holder) => q.push("locked_by = ").push_bind(holder.to_owned()),
                None => q.push("locked_by IS NOT NULL"),
            };
            q.push(" AND instance_id IN (");
            let mut list = q.separated(", ");
            for id in chunk {
                list.push_bind(id.clone());
            }
            q.push(")").push(&only_fenced);
        }
    }
}

/// Makes the subscription rows of each point that gives them exactly its set: removes the
/// others (routing their unconsumed messages again) and adds the missing ones.
/// `stored` is what [`push_read_subscriptions`] read.
async fn sync_subscriptions(
    tx: &mut Tx,
    written: &Written<'_>,
    stored: Vec<StoredSubscription>,
    reroute_types: &mut BTreeSet<String>,
) -> StoreResult<()> {
    let changes = written.subscription_changes(stored);
    // Removed subscriptions: their unconsumed messages go back to unrouted, and their types
    // are routed again (a message routed through a subscription has its type).
    for chunk in changes.removed.chunks(ROWS_PER_STATEMENT) {
        let ids = |q: &mut QueryBuilder<'_, Sqlite>| {
            let mut list = q.separated(", ");
            for (sub, _) in chunk {
                list.push_bind(sub.to_string());
            }
            q.push(")");
        };
        let mut q = QueryBuilder::new("DELETE FROM subscriptions WHERE id IN (");
        ids(&mut q);
        execute(tx, q, chunk.len()).await?;
        let mut q = QueryBuilder::new(
            "UPDATE messages SET status = 'unrouted', instance_id = NULL, \
             subscription_id = NULL, locked_by = NULL, \
             reason = 'the receive it was routed to was cancelled' \
             WHERE status = 'routed' AND subscription_id IN (",
        );
        ids(&mut q);
        q.push(" RETURNING message_type");
        reroute_types.extend(fetch_texts(tx, q, chunk.len()).await?);
    }
    reroute_types.extend(
        changes
            .added
            .iter()
            .map(|(_, sub, _)| sub.message_type.clone()),
    );
    insert_subscriptions(tx, &changes.added).await
}

/// Reads the subscriptions stored for the fenced points that give their set: the positions of
/// its statements. For [`Fenced::Alone`], whose points all give an empty set, checks instead
/// that none is stored (giving it then changes nothing), and reads nothing.
fn push_read_subscriptions(
    script: &mut Script<'_>,
    giving: &[&PersistencePoint],
    fenced: Fenced,
) -> Vec<usize> {
    let (read, in_sql) = (fenced != Fenced::Alone, fenced != Fenced::Before);
    let giving: Vec<String> = giving.iter().map(|p| p.instance_id.to_string()).collect();
    let mut positions = Vec::new();
    for chunk in giving.chunks(ROWS_PER_STATEMENT) {
        positions.extend(read.then(|| script.position()));
        let q = script.next(chunk.len());
        q.push(match read {
            true => {
                "SELECT instance_id, id, message_type FROM subscriptions WHERE instance_id IN ("
            }
            false => {
                "INSERT INTO checks (ok) SELECT NOT EXISTS (SELECT 1 FROM subscriptions \
                      WHERE instance_id IN ("
            }
        });
        let mut list = q.separated(", ");
        for id in chunk {
            list.push_bind(id.clone());
        }
        q.push(")").push(only_fenced(in_sql, "instance_id"));
        if !read {
            q.push(")");
        }
    }
    positions
}

/// Inserts instances' subscription rows: (instance, row, when).
pub(super) async fn insert_subscriptions(
    tx: &mut Tx,
    rows: &[NewSubscription<'_>],
) -> StoreResult<()> {
    for chunk in rows.chunks(ROWS_PER_STATEMENT) {
        let mut q = QueryBuilder::new(
            "INSERT INTO subscriptions (id, message_type, instance_id, correlation_keys, \
             correlation, created_at) ",
        );
        q.push_values(chunk, |mut row, (instance, sub, at)| {
            row.push_bind(sub.id.to_string())
                .push_bind(&sub.message_type)
                .push_bind(instance.to_string())
                .push_bind(sub.correlation.keys())
                .push_bind(sub.correlation.canonical())
                .push_bind(ts(*at));
        });
        q.push(" ON CONFLICT (id) DO NOTHING");
        execute(tx, q, chunk.len()).await?;
    }
    Ok(())
}

/// Which of `(instance, epoch)` `host` still holds under that epoch.
pub(super) async fn still_held(
    tx: &mut Tx,
    host: &str,
    instances: &[(Uuid, i64)],
) -> StoreResult<HashSet<Uuid>> {
    let mut held = HashSet::with_capacity(instances.len());
    for chunk in instances.chunks(ROWS_PER_STATEMENT) {
        let mut q = QueryBuilder::new("WITH r (id, epoch) AS (");
        q.push_values(chunk, |mut row, (id, epoch)| {
            row.push_bind(id.to_string()).push_bind(*epoch);
        });
        q.push(
            ") SELECT instances.id FROM instances JOIN r \
             ON instances.id = r.id AND instances.epoch = r.epoch WHERE instances.owner = ",
        )
        .push_bind(host.to_owned());
        fetch_ids(tx, q, chunk.len(), &mut held).await?;
    }
    Ok(held)
}

/// Inserts instances and their start messages (addressed to them), each started at its time.
/// With a `holder`, each instance is leased to it and its start message claimed by it, and they
/// are returned ready to run (see [`MessageBox::start_instances`](crate::store::MessageBox::start_instances)).
pub(super) async fn start_instances(
    tx: &mut Tx,
    starts: &[(&NewInstance, DateTime<Utc>)],
    holder: Option<Holder<'_>>,
) -> StoreResult<Vec<HeldStart>> {
    let mut held = Vec::new();
    // Both inserts of a chunk in one round trip to the worker.
    for chunk in starts.chunks(ROWS_PER_STATEMENT) {
        let mut script = Script::new();
        let returned = push_start(&mut script, chunk, holder);
        held.extend(read_held(&script.run_each(tx).await?, returned, chunk)?);
    }
    Ok(held)
}

/// Starts instances as [`start_instances`] does, as one transaction sent in one round trip
/// ([`Script::run_alone`]), if they fit in one statement each and the database is a file.
/// Returns `None`, having done nothing, otherwise.
pub(super) async fn start_alone(
    writer: &Writer,
    starts: &[(&NewInstance, DateTime<Utc>)],
    holder: Option<Holder<'_>>,
) -> StoreResult<Option<Vec<HeldStart>>> {
    if starts.len() > ROWS_PER_STATEMENT {
        return Ok(None);
    }
    let Some(conn) = writer.alone().await? else {
        return Ok(None);
    };
    let mut script = Script::transaction();
    let returned = push_start(&mut script, starts, holder);
    let results = script.run_alone(conn).await?;
    read_held(&results, returned, starts).map(Some)
}

/// Adds the inserts of instances and their start messages to `script`; with a `holder`, the
/// position of the statement that returns the start messages' `seq`.
fn push_start<'a>(
    script: &mut Script<'a>,
    starts: &'a [(&'a NewInstance, DateTime<Utc>)],
    holder: Option<Holder<'a>>,
) -> Option<usize> {
    let rows: Vec<StartRow<'a>> = starts
        .iter()
        .map(|(instance, at)| StartRow {
            instance,
            at: *at,
            owner: holder.map(|h| h.host),
            lease_until: holder.map(|h| h.lease_until),
            epoch: if holder.is_some() { FIRST_EPOCH } else { 0 },
            message: StartMessage::Routed,
        })
        .collect();
    let suffix = match holder {
        Some(_) => " ON CONFLICT (id) DO NOTHING RETURNING instance_id, seq",
        None => " ON CONFLICT (id) DO NOTHING",
    };
    let returned = push_start_rows(script, &rows, suffix);
    holder.map(|_| returned)
}

/// A new instance to insert, with its start message.
struct StartRow<'a> {
    instance: &'a NewInstance,
    at: DateTime<Utc>,
    /// The host holding it (and its start message, unless consumed), until `lease_until`.
    owner: Option<&'a str>,
    lease_until: Option<DateTime<Utc>>,
    epoch: i64,
    message: StartMessage,
}

/// How a start message is stored.
#[derive(Clone, Copy, PartialEq)]
enum StartMessage {
    /// Routed to its instance; claimed by the instance's owner, if it has one.
    Routed,
    /// Consumed already, by the instance's first point.
    Consumed,
}

/// Adds the inserts of `rows` (instances, then their start messages, `suffix` ending the
/// latter) to `script`; returns the position of the start messages' insert.
fn push_start_rows<'a>(script: &mut Script<'a>, rows: &[StartRow<'a>], suffix: &str) -> usize {
    let q = script.next(rows.len());
    q.push(
        "INSERT INTO instances (id, orchestration, version, status, step, created_at, \
         updated_at, parent_id, owner, lease_expires_at, epoch) ",
    );
    q.push_values(rows, |mut row, r| {
        let inst = r.instance;
        row.push_bind(inst.id.to_string())
            .push_bind(&inst.orchestration)
            .push_bind(i64::from(inst.version))
            .push_bind("running")
            .push_bind("created")
            .push_bind(ts(r.at))
            .push_bind(ts(r.at))
            .push_bind(inst.parent.map(|p| p.to_string()))
            .push_bind(r.owner)
            .push_bind(r.lease_until.map(ts))
            .push_bind(r.epoch);
    });
    let returned = script.position();
    let q = script.next(rows.len());
    q.push(
        "INSERT INTO messages (id, message_type, kind, properties, body, status, \
         instance_id, published_at, locked_by, consumed_at, delivery_count) ",
    );
    q.push_values(rows, |mut row, r| {
        let inst = r.instance;
        let consumed = r.message == StartMessage::Consumed;
        row.push_bind(inst.start_message_id())
            .push_bind(inst.start_message_type())
            .push_bind(MessageKind::Start.as_str())
            .push_bind("{}")
            .push_bind(inst.input.to_string())
            .push_bind(if consumed { "consumed" } else { "routed" })
            .push_bind(inst.id.to_string())
            .push_bind(ts(r.at))
            .push_bind(r.owner.filter(|_| !consumed))
            .push_bind(consumed.then(|| ts(r.at)))
            .push_bind(i64::from(r.owner.is_some()));
    });
    q.push(suffix.to_owned());
    returned
}

/// The instances started held ([`push_start`] returned `returned`), ready to run.
fn read_held(
    results: &[Ran],
    returned: Option<usize>,
    starts: &[(&NewInstance, DateTime<Utc>)],
) -> StoreResult<Vec<HeldStart>> {
    let Some(at) = returned else {
        return Ok(Vec::new());
    };
    let seqs = results[at]
        .decode::<(String, i64)>()?
        .iter()
        .map(|(id, seq)| Ok((parse_uuid(id)?, *seq)))
        .collect::<StoreResult<Vec<_>>>()?;
    HeldStart::all(starts, seqs)
}
