//! Routing: publishing and starting, the group commit around the points `batch.rs` writes, new
//! subscriptions, and routing again what they make routable (reroute, unroute, convoys); the
//! per-message-type advisory locks that keep a publish and a subscription change from missing
//! each other (see the module docs of [`super`]).

use std::collections::{BTreeMap, BTreeSet};

use chrono::{DateTime, Utc};
use uuid::Uuid;

use super::batch;
use super::connect::commit;
use super::listen::notify;
use super::{col, col_json, map_err, PostgresStore, Tx};
use crate::orchestration::Correlation;
use crate::store::common;
use crate::store::routing::{sent_to_ports, Route, RouteCache};
use crate::store::*;

/// Advisory lock class of the per-message-type routing locks ("cair").
const ROUTE_LOCK_CLASS: i32 = 0x6361_6972;
/// Advisory lock class of convoy activations, one lock per orchestration and values ("caic").
const CONVOY_LOCK_CLASS: i32 = 0x6361_6963;

/// The routing lock key of a message type (FNV-1a, folded to 32 bits).
fn route_key(message_type: &str) -> i32 {
    let mut hash: u32 = 0x811c_9dc5;
    for byte in message_type.bytes() {
        hash ^= u32::from(byte);
        hash = hash.wrapping_mul(0x0100_0193);
    }
    i32::from_ne_bytes(hash.to_ne_bytes())
}

/// Takes the routing locks of these message types for the rest of the transaction: shared to
/// route messages of a type, exclusive to change its subscriptions and route its unrouted messages
/// again. Always in key order, each key once, so that two transactions never wait on each other in
/// a cycle.
pub(super) async fn lock_routes<'a>(
    tx: &mut Tx,
    shared: impl IntoIterator<Item = &'a str>,
    exclusive: impl IntoIterator<Item = &'a str>,
) -> StoreResult<()> {
    let mut keys: BTreeMap<i32, bool> = BTreeMap::new();
    for t in shared {
        keys.entry(route_key(t)).or_insert(false);
    }
    for t in exclusive {
        keys.insert(route_key(t), true);
    }
    for (key, exclusive) in keys {
        let sql = if exclusive {
            "SELECT pg_advisory_xact_lock($1, $2)"
        } else {
            "SELECT pg_advisory_xact_lock_shared($1, $2)"
        };
        sqlx::query(sql)
            .bind(ROUTE_LOCK_CLASS)
            .bind(key)
            .execute(&mut **tx)
            .await
            .map_err(|e| map_err("lock routes", e))?;
    }
    Ok(())
}

/// The types of untargeted messages, which routing by subscription will read.
pub(super) fn routed_types(messages: &[NewMessage]) -> impl Iterator<Item = &str> {
    messages
        .iter()
        .filter(|m| m.target.is_none())
        .map(|m| m.message_type.as_str())
}

/// Where `msg` goes. A convoy's activation is decided under the convoy's lock: publishers of
/// one type route side by side (shared route locks), so the activations of one convoy are
/// serialised, and the convoy's instance is looked for again once the lock is ours.
pub(super) async fn find_route(tx: &mut Tx, msg: &NewMessage) -> StoreResult<Route> {
    let cache = batch::read_routes(tx, &[msg]).await?;
    decide(tx, &cache, msg, &[]).await
}

/// Where `msg` goes, from the routing rows read in `cache`: a convoy's activation decided again
/// under the convoy's lock ([`find_route`]).
/// The activations of the orchestrations in `copied` are passed over
/// ([`RouteCache::route_without`]).
async fn decide(
    tx: &mut Tx,
    cache: &RouteCache,
    msg: &NewMessage,
    copied: &[String],
) -> StoreResult<Route> {
    let route = cache.route_without(msg, copied);
    let Route::Activate {
        orchestration,
        convoy: Some(values),
        ..
    } = &route
    else {
        return Ok(route);
    };
    lock_convoy(tx, orchestration, &values.canonical()).await?;
    let owner: Option<(Uuid, Uuid)> = sqlx::query_as(
        "SELECT id, instance_id FROM subscriptions \
         WHERE message_type = $1 AND correlation = $2 AND instance_id IS NOT NULL \
         ORDER BY created_at, id LIMIT 1",
    )
    .bind(&msg.message_type)
    .bind(values.canonical())
    .fetch_optional(&mut **tx)
    .await
    .map_err(|e| map_err("find route", e))?;
    Ok(match owner {
        Some((sub, instance)) => Route::Instance(instance, Some(sub)),
        None => route,
    })
}

/// Takes the lock of one convoy's activations (`orchestration`, `values` canonical) until the
/// transaction ends.
pub(super) async fn lock_convoy(
    conn: &mut sqlx::PgConnection,
    orchestration: &str,
    values: &str,
) -> StoreResult<()> {
    sqlx::query("SELECT pg_advisory_xact_lock($1, hashtext($2))")
        .bind(CONVOY_LOCK_CLASS)
        .bind(format!("{orchestration}|{values}"))
        .execute(conn)
        .await
        .map_err(|e| map_err("lock a convoy", e))?;
    Ok(())
}

/// What a transaction changed that may route unrouted messages.
#[derive(Default)]
pub(super) struct Reroute {
    /// Activating subscriptions of these types were written: any unrouted message of the type may
    /// route now.
    pub(super) types: BTreeSet<String>,
    /// Instance subscriptions were written: unrouted messages of the type that match the
    /// correlation may route now. (No other can: an unrouted message matches no subscription
    /// that existed before, since every subscription write reroutes under the routing lock.)
    pub(super) subscriptions: Vec<(String, Correlation)>,
    /// Messages unrouted because the receive they were routed to was cancelled.
    pub(super) seqs: BTreeSet<i64>,
    /// Subscriptions removed, and their types.
    pub(super) cancelled: Vec<Uuid>,
    pub(super) cancelled_types: BTreeSet<String>,
}

impl Reroute {
    /// The types whose routing this changes, to lock exclusively.
    pub(super) fn lock_types(&self) -> BTreeSet<&str> {
        self.types
            .iter()
            .chain(&self.cancelled_types)
            .map(String::as_str)
            .chain(self.subscriptions.iter().map(|(t, _)| t.as_str()))
            .collect()
    }
}

/// Routes again the unrouted messages that `changes` may have made routable, oldest first (the
/// same routing as [`publish_one`]). The types must be locked exclusively for routing
/// ([`lock_routes`]).
pub(super) async fn reroute(tx: &mut Tx, changes: &Reroute, now: DateTime<Utc>) -> StoreResult<()> {
    /// (id, type, properties, published at)
    type Candidate = (
        String,
        String,
        BTreeMap<String, String>,
        Option<DateTime<Utc>>,
    );
    let mut candidates: BTreeMap<i64, Candidate> = BTreeMap::new();
    let scanned: BTreeSet<&str> = changes
        .types
        .iter()
        .map(String::as_str)
        .chain(changes.subscriptions.iter().map(|(t, _)| t.as_str()))
        .collect();
    for message_type in scanned {
        let rows = sqlx::query(
            "SELECT seq, id, properties, published_at FROM messages \
             WHERE status = 'unrouted' AND message_type = $1",
        )
        .bind(message_type)
        .fetch_all(&mut **tx)
        .await
        .map_err(|e| map_err("reroute", e))?;
        let every = changes.types.contains(message_type);
        for row in rows {
            // An unrouted message whose properties cannot be read stays unrouted (and is
            // dead-lettered after its time to live): it must not stop the others routing.
            let properties: BTreeMap<String, String> = match col_json(&row, "properties") {
                Ok(properties) => properties,
                Err(e) => {
                    tracing::warn!(error = %e, "an unrouted message cannot be read; left unrouted");
                    continue;
                }
            };
            let matches = every
                || changes
                    .subscriptions
                    .iter()
                    .any(|(t, corr)| t == message_type && corr.matches(&properties));
            if matches {
                let at = col(&row, "published_at").ok();
                let candidate = (col(&row, "id")?, message_type.to_owned(), properties, at);
                candidates.insert(col(&row, "seq")?, candidate);
            }
        }
    }
    if !changes.seqs.is_empty() {
        let seqs: Vec<i64> = changes.seqs.iter().copied().collect();
        let rows = sqlx::query(
            "SELECT seq, id, message_type, properties, published_at FROM messages \
             WHERE seq = ANY($1) AND status = 'unrouted'",
        )
        .bind(&seqs)
        .fetch_all(&mut **tx)
        .await
        .map_err(|e| map_err("reroute", e))?;
        for row in rows {
            match col_json(&row, "properties") {
                Ok(properties) => {
                    let at = col(&row, "published_at").ok();
                    candidates.insert(
                        col(&row, "seq")?,
                        (col(&row, "id")?, col(&row, "message_type")?, properties, at),
                    );
                }
                Err(e) => {
                    tracing::warn!(error = %e, "an unrouted message cannot be read; left unrouted");
                }
            }
        }
    }
    for (seq, (id, message_type, properties, published_at)) in candidates {
        let mut msg = NewMessage {
            id,
            message_type,
            kind: MessageKind::Published,
            properties,
            body: serde_json::Value::Null,
            target: None,
        };
        reroute_one(tx, seq, &mut msg, published_at, now).await?;
    }
    Ok(())
}

/// Routes unrouted message `seq` again, as a publish would (its route, its copies, its send
/// ports): `msg` holds its id, type and properties, and is read whole once it routes.
/// Orchestrations that have their copy already (it was routed before, then its receive was
/// cancelled) get nothing more.
async fn reroute_one(
    tx: &mut Tx,
    seq: i64,
    msg: &mut NewMessage,
    published_at: Option<DateTime<Utc>>,
    now: DateTime<Utc>,
) -> StoreResult<()> {
    let cache = batch::read_routes(tx, &[&*msg]).await?;
    let copied = common::routing::copied::<PostgresStore>(tx, &cache, msg).await?;
    let route = decide(tx, &cache, msg, &copied).await?;
    let ports = cache.ports_for(msg);
    if common::late::settled_by_reroute::<PostgresStore>(
        tx,
        seq,
        msg,
        &route,
        published_at,
        !ports.is_empty(),
    )
    .await?
    {
        return Ok(());
    }
    let (status, instance, sub, kind) = match &route {
        Route::Instance(id, sub) => ("routed", Some(*id), *sub, MessageKind::Published),
        Route::Activate { .. } => ("routed", Some(Uuid::now_v7()), None, MessageKind::Start),
        Route::Unrouted(_) => ("consumed", None, None, MessageKind::Published),
    };
    if !common::routing::read_body::<PostgresStore>(tx, seq, msg).await? {
        return Ok(());
    }
    let msg = &*msg;
    let reason = instance.is_none().then(|| sent_to_ports(&ports));
    let routed = sqlx::query(
        "UPDATE messages SET status = $2, instance_id = $3, subscription_id = $4, kind = $5, \
         reason = $6 WHERE seq = $1 AND status = 'unrouted'",
    )
    .bind(seq)
    .bind(status)
    .bind(instance)
    .bind(sub)
    .bind(kind.as_str())
    .bind(reason)
    .execute(&mut **tx)
    .await
    .map_err(|e| map_err("reroute", e))?;
    if routed.rows_affected() != 1 {
        return Ok(());
    }
    if let (
        Route::Activate {
            orchestration,
            version,
            convoy,
        },
        Some(id),
    ) = (&route, instance)
    {
        common::routing::insert_instance::<PostgresStore>(
            tx,
            id,
            orchestration,
            *version,
            None,
            now,
        )
        .await?;
        subscribe_convoy(tx, id, orchestration, convoy.clone(), now).await?;
    }
    let (copies, _) = batch::copies(tx, &cache, msg, &route, now).await?;
    let copies: Vec<_> = copies.iter().map(|copy| (copy, now)).collect();
    batch::publish_all(tx, &copies).await?;
    let sends: Vec<_> = ports.into_iter().map(|port| (msg, port, now)).collect();
    common::routing::send_to_ports::<PostgresStore>(tx, &sends).await
}

/// Moves the routed, unconsumed messages of cancelled subscriptions back to unrouted, and
/// notes them for [`reroute`].
pub(super) async fn unroute(
    tx: &mut Tx,
    subscriptions: &[Uuid],
    changes: &mut Reroute,
) -> StoreResult<()> {
    let seqs: Vec<i64> = sqlx::query_scalar(
        "UPDATE messages SET status = 'unrouted', instance_id = NULL, subscription_id = NULL, \
         locked_by = NULL, reason = 'the receive it was routed to was cancelled' \
         WHERE subscription_id = ANY($1) AND status = 'routed' RETURNING seq",
    )
    .bind(subscriptions)
    .fetch_all(&mut **tx)
    .await
    .map_err(|e| map_err("unroute", e))?;
    changes.seqs.extend(seqs);
    Ok(())
}

/// For a convoy activation: subscribes the new instance to every activating type of its
/// definition with the convoy's values, so that no second instance starts for them while it runs.
pub(super) async fn subscribe_convoy(
    tx: &mut Tx,
    instance: Uuid,
    orchestration: &str,
    convoy: Option<Correlation>,
    now: DateTime<Utc>,
) -> StoreResult<()> {
    let Some(values) = convoy else {
        return Ok(());
    };
    let types = common::routing::activating_types::<PostgresStore>(tx, orchestration).await?;
    let subs = convoy_subscriptions(instance, types, &values);
    let rows: Vec<_> = subs.iter().map(|sub| (instance, sub, now)).collect();
    batch::insert_subscriptions(tx, &rows).await
}

/// [`MessageBox::start_instances`] on PostgreSQL.
pub(super) async fn start_instances(
    store: &PostgresStore,
    instances: Vec<NewInstance>,
    holder: Option<Holder<'_>>,
    now: DateTime<Utc>,
) -> StoreResult<Vec<HeldStart>> {
    let starts: Vec<_> = instances.iter().map(|inst| (inst, now)).collect();
    // One statement, which needs no transaction, on the connection kept for such writes.
    let mut conn = store.point_connection().await?;
    let held = batch::start_instances(&mut *conn, &starts, holder).await;
    conn.ended(&held);
    held
}

/// [`MessageBox::commit`] on PostgreSQL.
pub(super) async fn commit_points(
    store: &PostgresStore,
    points: &[PersistencePoint],
) -> StoreResult<Vec<CommitOutcome>> {
    if let Some(out) = batch::write_alone(store, points).await? {
        return Ok(out);
    }
    let mut tx = store.write().await?;
    let mut changes = Reroute::default();
    let out = batch::write_points(&mut tx, points, &mut changes).await?;
    // Published once the group holds its routing locks (below).
    let messages: Vec<(&NewMessage, DateTime<Utc>)> = points
        .iter()
        .zip(&out)
        .filter(|(_, outcome)| **outcome == CommitOutcome::Committed)
        .flat_map(|(p, _)| p.messages.iter().map(|m| (m, p.at)))
        .collect();
    // The routing locks, taken last so that they are held briefly: shared for the messages
    // the points publish, exclusive for the types whose subscriptions they added or removed.
    // Taken in one sorted pass, after the rows: every writer orders them the same way.
    lock_routes(
        &mut tx,
        messages
            .iter()
            .filter(|(m, _)| m.target.is_none())
            .map(|(m, _)| m.message_type.as_str()),
        changes.lock_types(),
    )
    .await?;
    // A publisher that read a removed subscription before it was removed has committed by
    // now: unroute what it routed there.
    if !changes.cancelled.is_empty() {
        let cancelled = std::mem::take(&mut changes.cancelled);
        unroute(&mut tx, &cancelled, &mut changes).await?;
    }
    batch::publish_all(&mut tx, &messages).await?;
    let now = points.iter().map(|p| p.at).max().unwrap_or_default();
    reroute(&mut tx, &changes, now).await?;
    let earlier = committed_subscriptions(points, &out).collect();
    common::late::adopt_all_earlier::<PostgresStore>(&mut tx, earlier).await?;
    // Other hosts are woken only for work they may claim; the committing host follows its
    // own (a NOTIFY for every commit woke it for an empty claim after each point).
    let claimable = points
        .iter()
        .zip(&out)
        .any(|(p, o)| *o == CommitOutcome::Committed && p.makes_claimable_work());
    if claimable || !changes.seqs.is_empty() {
        notify(&mut tx).await?;
    }
    commit(tx).await?;
    Ok(out)
}

/// [`MessageBox::subscribe`] on PostgreSQL.
pub(super) async fn subscribe(
    store: &PostgresStore,
    host: &str,
    receives: &[NewReceives],
    now: DateTime<Utc>,
) -> StoreResult<Vec<CommitOutcome>> {
    let mut tx = store.write().await?;
    let mut changes = Reroute::default();
    let asked: Vec<(Uuid, i64)> = receives.iter().map(|r| (r.instance_id, r.epoch)).collect();
    let held = batch::still_held(&mut tx, host, &asked).await?;
    let (rows, out) = held_receives(receives, &held, now);
    batch::insert_subscriptions(&mut tx, &rows).await?;
    changes.subscriptions.extend(
        rows.iter()
            .map(|(_, sub, _)| (sub.message_type.clone(), sub.correlation.clone())),
    );
    // As in `commit`: the routing locks after the rows.
    lock_routes(&mut tx, [], changes.lock_types()).await?;
    reroute(&mut tx, &changes, now).await?;
    let earlier = rows.iter().map(|(i, sub, _)| (*i, *sub)).collect();
    common::late::adopt_all_earlier::<PostgresStore>(&mut tx, earlier).await?;
    notify(&mut tx).await?;
    commit(tx).await?;
    Ok(out)
}
