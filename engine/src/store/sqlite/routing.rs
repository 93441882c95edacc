//! Where messages go: publishing and starting instances, the route of a message (an instance's
//! subscription, an activation that creates an instance, or none: unrouted), routing unrouted
//! messages again when subscriptions change, subscribing, and a convoy's subscriptions.

use std::collections::{BTreeMap, BTreeSet};

use chrono::{DateTime, Utc};
use uuid::Uuid;

use super::{batch, col, col_json, commit, map_err, publish, SqliteStore, Tx};
use crate::orchestration::Correlation;
use crate::store::common;
use crate::store::common::late;
use crate::store::routing::{sent_to_ports, Route};
use crate::store::{
    committed_subscriptions, convoy_subscriptions, held_receives, CommitOutcome, HeldStart, Holder,
    MessageKind, NewInstance, NewMessage, NewReceives, PersistencePoint, StoreResult,
};

/// Creates the instance an activating message starts. For a convoy, also subscribes it to every
/// activating type of its definition with the convoy's values, in the same transaction as the
/// routing decision, so that no second instance can start for those values while it runs.
pub(super) async fn activate(
    tx: &mut Tx,
    orchestration: &str,
    version: u32,
    convoy: Option<Correlation>,
    now: DateTime<Utc>,
) -> StoreResult<Uuid> {
    let id = Uuid::now_v7();
    common::routing::insert_instance::<SqliteStore>(tx, id, orchestration, version, None, now)
        .await?;
    if let Some(values) = convoy {
        let types = common::routing::activating_types::<SqliteStore>(tx, orchestration).await?;
        let subs = convoy_subscriptions(id, types, &values);
        let rows: Vec<_> = subs.iter().map(|sub| (id, sub, now)).collect();
        batch::insert_subscriptions(tx, &rows).await?;
    }
    Ok(id)
}

/// Routes the unrouted messages of these types again (a subscription appeared or went away), as
/// a publish would: to its route, a copy to every other orchestration that subscribes to it, and
/// to the send ports that do.
pub(super) async fn reroute(tx: &mut Tx, types: &BTreeSet<String>) -> StoreResult<()> {
    for message_type in types {
        let rows = sqlx::query(
            "SELECT seq, id, properties, published_at FROM messages WHERE status = 'unrouted' \
             AND message_type = $1 ORDER BY seq",
        )
        .bind(message_type)
        .fetch_all(&mut **tx)
        .await
        .map_err(|e| map_err("reroute", e))?;
        for row in rows {
            let seq: i64 = col(&row, "seq")?;
            // An unrouted message whose properties cannot be read stays unrouted (and is
            // dead-lettered after its time to live): it must not stop the others routing.
            let read = col_json::<BTreeMap<String, String>>(&row, "properties")
                .and_then(|properties| Ok((col::<String>(&row, "id")?, properties)));
            let (id, properties) = match read {
                Ok(read) => read,
                Err(e) => {
                    tracing::warn!(message.seq = seq, error = %e, "an unrouted message cannot be read; left unrouted");
                    continue;
                }
            };
            let mut msg = NewMessage {
                id,
                message_type: message_type.clone(),
                kind: MessageKind::Published,
                properties,
                body: serde_json::Value::Null,
                target: None,
            };
            let published_at =
                <SqliteStore as common::Backend>::col_time(&row, "published_at").ok();
            reroute_one(tx, seq, &mut msg, published_at).await?;
        }
    }
    Ok(())
}

/// Routes unrouted message `seq` again: `msg` holds its id, type and properties, and is read
/// whole once it routes. Orchestrations that have their copy already (it was routed before,
/// then its receive was cancelled) get nothing more.
async fn reroute_one(
    tx: &mut Tx,
    seq: i64,
    msg: &mut NewMessage,
    published_at: Option<DateTime<Utc>>,
) -> StoreResult<()> {
    let cache = publish::read_routes(tx, &[&*msg]).await?;
    let copied = common::routing::copied::<SqliteStore>(tx, &cache, msg).await?;
    let route = cache.route_without(msg, &copied);
    let ports = cache.ports_for(msg);
    // Copies, instances and sends are made now.
    let at = Utc::now();
    if late::settled_by_reroute::<SqliteStore>(
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
    if !common::routing::read_body::<SqliteStore>(tx, seq, msg).await? {
        return Ok(());
    }
    let msg = &*msg;
    let (copies, _) = publish::copies(tx, &cache, msg, &route, at).await?;
    let (status, instance, sub, kind, reason) = match route {
        Route::Instance(id, sub) => ("routed", Some(id), sub, MessageKind::Published, None),
        Route::Activate {
            orchestration,
            version,
            convoy,
        } => {
            let id = activate(tx, &orchestration, version, convoy, at).await?;
            ("routed", Some(id), None, MessageKind::Start, None)
        }
        Route::Unrouted(_) => (
            "consumed",
            None,
            None,
            MessageKind::Published,
            Some(sent_to_ports(&ports)),
        ),
    };
    sqlx::query(
        "UPDATE messages SET status = $2, instance_id = $3, subscription_id = $4, kind = $5, \
         reason = $6 WHERE seq = $1",
    )
    .bind(seq)
    .bind(status)
    .bind(instance.map(|i| i.to_string()))
    .bind(sub.map(|s| s.to_string()))
    .bind(kind.as_str())
    .bind(reason)
    .execute(&mut **tx)
    .await
    .map_err(|e| map_err("reroute", e))?;
    let copies: Vec<_> = copies.iter().map(|copy| (copy, at)).collect();
    publish::publish_all(tx, &copies).await?;
    let sends: Vec<_> = ports.into_iter().map(|port| (msg, port, at)).collect();
    common::routing::send_to_ports::<SqliteStore>(tx, &sends).await
}

pub(super) async fn start_instances(
    store: &SqliteStore,
    instances: Vec<NewInstance>,
    holder: Option<Holder<'_>>,
    now: DateTime<Utc>,
) -> StoreResult<Vec<HeldStart>> {
    let starts: Vec<_> = instances.iter().map(|inst| (inst, now)).collect();
    let held = match batch::start_alone(&store.writer, &starts, holder).await? {
        Some(held) => held,
        None => {
            let mut tx = store.write().await?;
            let held = batch::start_instances(&mut tx, &starts, holder).await?;
            commit(tx).await?;
            held
        }
    };
    // Starts no host holds are work for the file's host, which may be in another process.
    if holder.is_none() && !instances.is_empty() {
        store.wake.others();
    }
    Ok(held)
}

/// [`MessageBox::commit`](crate::store::MessageBox::commit) on SQLite: a point alone in one
/// script when it can be, else the group in one transaction, rerouting what its subscription
/// changes freed.
pub(super) async fn commit_points(
    store: &SqliteStore,
    points: &[PersistencePoint],
) -> StoreResult<Vec<CommitOutcome>> {
    if let Some(out) = batch::write_alone(&store.writer, points).await? {
        return Ok(out);
    }
    let mut tx = store.write().await?;
    let mut reroute_types = BTreeSet::new();
    let out = batch::write_points(&mut tx, points, &mut reroute_types).await?;
    reroute(&mut tx, &reroute_types).await?;
    let earlier = committed_subscriptions(points, &out).collect();
    late::adopt_all_earlier::<SqliteStore>(&mut tx, earlier).await?;
    commit(tx).await?;
    Ok(out)
}

pub(super) async fn subscribe(
    store: &SqliteStore,
    host: &str,
    receives: &[NewReceives],
    now: DateTime<Utc>,
) -> StoreResult<Vec<CommitOutcome>> {
    let mut tx = store.write().await?;
    let asked: Vec<(Uuid, i64)> = receives.iter().map(|r| (r.instance_id, r.epoch)).collect();
    let held = batch::still_held(&mut tx, host, &asked).await?;
    let (rows, out) = held_receives(receives, &held, now);
    batch::insert_subscriptions(&mut tx, &rows).await?;
    let types: BTreeSet<String> = rows
        .iter()
        .map(|(_, sub, _)| sub.message_type.clone())
        .collect();
    reroute(&mut tx, &types).await?;
    let earlier = rows.iter().map(|(i, sub, _)| (*i, *sub)).collect();
    late::adopt_all_earlier::<SqliteStore>(&mut tx, earlier).await?;
    commit(tx).await?;
    Ok(out)
}
