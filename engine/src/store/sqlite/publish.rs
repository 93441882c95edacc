//! Publishing on SQLite: messages stored and routed in batches, with the routing rows read
//! once per message type for a batch (split from `batch.rs`). A message that matches no
//! subscription and activates nothing is checked against the keys instances waited on
//! ([`common::late`]): late for an ended instance, it is a zombie naming it.

use std::collections::HashSet;

use chrono::{DateTime, Utc};
use sqlx::QueryBuilder;

use crate::store::common::{self, late};
use crate::store::routing::{sent_to_ports, Route, RouteCache};

use super::batch::{execute, fetch_texts, reuse, ROWS_PER_STATEMENT};
use super::routing::activate;
use super::{
    map_err, ts, MessageKind, NewMessage, PublishOutcome, SqliteStore, StoreError, StoreResult, Tx,
};

/// Stores and routes messages in order, each published at its time: duplicates (of a stored
/// message or of one earlier in the batch) are reported and not written.
///
/// The routing reads are made per message type for the whole batch: the key sets the type is
/// correlated on, then every subscription matching one of the batch's values. A convoy's
/// activation subscribes its new instance at once, which can change where the next messages go,
/// so after one the rest of the batch is routed message by message.
pub(super) async fn publish_all(
    tx: &mut Tx,
    messages: &[(&NewMessage, DateTime<Utc>)],
) -> StoreResult<Vec<PublishOutcome>> {
    let stored = stored_ids(tx, messages).await?;
    let published: Vec<&NewMessage> = messages.iter().map(|(m, _)| *m).collect();
    let mut routes = Some(read_routes(tx, &published).await?);
    let mut seen = HashSet::new();
    // The copies of messages for the other orchestrations that subscribe to them (fan_out),
    // each addressed to its instance: written after the loop, with the rest.
    let mut copied: Vec<(NewMessage, DateTime<Utc>)> = Vec::new();
    // What send ports' subscriptions take: (message, port, time), sent after the loop.
    let mut to_ports: Vec<(&NewMessage, String, DateTime<Utc>)> = Vec::new();
    let mut rows = Vec::with_capacity(messages.len());
    let mut out = Vec::with_capacity(messages.len());
    for (msg, at) in messages {
        if stored.contains(msg.id.as_str()) || !seen.insert(msg.id.as_str()) {
            out.push(PublishOutcome::Duplicate);
            continue;
        }
        let single;
        let cache = match routes.as_ref() {
            Some(cache) => cache,
            None => {
                single = read_routes(tx, &[msg]).await?;
                &single
            }
        };
        let route = cache.route(msg);
        let ports = cache.ports_for(msg);
        let (extra, convoy) = copies(tx, cache, msg, &route, *at).await?;
        if convoy {
            // Its subscriptions change where the batch's next messages go.
            routes = None;
        }
        copied.extend(extra.into_iter().map(|copy| (copy, *at)));
        let sent = (!ports.is_empty()).then(|| sent_to_ports(&ports));
        to_ports.extend(ports.into_iter().map(|port| (*msg, port, *at)));
        let (instance, subscription, reason, outcome) = match route {
            Route::Unrouted(_) if sent.is_some() => (None, None, sent, PublishOutcome::ToPorts),
            Route::Instance(id, sub) => (Some(id), sub, None, PublishOutcome::Routed(id)),
            Route::Activate {
                orchestration,
                version,
                convoy,
            } => {
                if convoy.is_some() {
                    routes = None;
                }
                let id = activate(tx, &orchestration, version, convoy, *at).await?;
                (Some(id), None, None, PublishOutcome::Routed(id))
            }
            Route::Unrouted(reason) => match late_for(tx, routes.as_ref(), msg).await? {
                Some((instance, zombie)) => (
                    Some(instance),
                    None,
                    Some(zombie),
                    PublishOutcome::Zombie(instance),
                ),
                None => (None, None, Some(reason), PublishOutcome::Unrouted),
            },
        };
        // An activating message is the new instance's start message.
        // (A zombie names its instance and has a reason: it is no start.)
        let kind = if msg.target.is_none()
            && subscription.is_none()
            && instance.is_some()
            && reason.is_none()
        {
            MessageKind::Start
        } else {
            msg.kind
        };
        let status = match (&outcome, instance, &reason) {
            (PublishOutcome::ToPorts, _, _) => "consumed",
            (_, Some(_), Some(_)) => "zombie",
            (_, Some(_), None) => "routed",
            (_, None, _) => "unrouted",
        };
        rows.push((*msg, kind, status, instance, subscription, reason, *at));
        out.push(outcome);
    }
    for (copy, at) in &copied {
        rows.push((copy, copy.kind, "routed", copy.target, None, None, *at));
    }
    common::routing::send_to_ports::<SqliteStore>(tx, &to_ports).await?;
    for chunk in rows.chunks(ROWS_PER_STATEMENT) {
        let mut q = QueryBuilder::new(
            "INSERT INTO messages (id, message_type, kind, properties, body, status, \
             instance_id, subscription_id, reason, published_at) ",
        );
        q.push_values(
            chunk,
            |mut row, (msg, kind, status, instance, sub, reason, at)| {
                row.push_bind(&msg.id)
                    .push_bind(&msg.message_type)
                    .push_bind(kind.as_str())
                    .push_bind(serde_json::to_string(&msg.properties).unwrap_or_default())
                    .push_bind(msg.body.to_string())
                    .push_bind(*status)
                    .push_bind(instance.map(|i| i.to_string()))
                    .push_bind(sub.map(|s| s.to_string()))
                    .push_bind(reason.as_deref())
                    .push_bind(ts(*at));
            },
        );
        execute(tx, q, chunk.len()).await?;
    }
    Ok(out)
}

/// The copies of `msg` for the other orchestrations that subscribe to it besides its `route`
/// ([`common::routing::fan_out`]), each addressed to its instance: the running one its receive
/// matches, or one started here (published at `at`); and whether a convoy's instance started
/// (its subscriptions change where later messages go).
pub(super) async fn copies(
    tx: &mut Tx,
    cache: &RouteCache,
    msg: &NewMessage,
    route: &Route,
    at: DateTime<Utc>,
) -> StoreResult<(Vec<NewMessage>, bool)> {
    let mut convoy = false;
    let mut out = Vec::new();
    for (sub, running) in common::routing::fan_out::<SqliteStore>(tx, cache, msg, route).await? {
        let (id, kind) = match running {
            Some(id) => (id, MessageKind::Published),
            None => {
                convoy |= sub.convoy.is_some();
                let id = activate(tx, &sub.orchestration, sub.version, sub.convoy, at).await?;
                (id, MessageKind::Start)
            }
        };
        out.push(msg.copy_for(&sub.orchestration, id, kind));
    }
    Ok((out, convoy))
}

/// [`late::late_for`], skipped when the batch's routing rows show that no instance can have
/// waited on the message's key.
async fn late_for(
    tx: &mut Tx,
    routes: Option<&RouteCache>,
    msg: &NewMessage,
) -> StoreResult<Option<(uuid::Uuid, String)>> {
    if routes.is_some_and(|r| !r.may_be_late(msg)) {
        return Ok(None);
    }
    late::late_for::<SqliteStore>(tx, msg).await
}

/// The ids of these messages already stored.
async fn stored_ids(
    tx: &mut Tx,
    messages: &[(&NewMessage, DateTime<Utc>)],
) -> StoreResult<HashSet<String>> {
    let mut stored = HashSet::new();
    for chunk in messages.chunks(ROWS_PER_STATEMENT) {
        let mut q = QueryBuilder::new("SELECT id FROM messages WHERE id IN (");
        let mut list = q.separated(", ");
        for (msg, _) in chunk {
            list.push_bind(&msg.id);
        }
        q.push(")");
        stored.extend(fetch_texts(tx, q, chunk.len()).await?);
    }
    Ok(stored)
}

/// Reads the routing rows of a batch's message types, once per type. A subscription row that
/// cannot be read (a tool wrote it) is left out, with a warning: it routes nothing, and never
/// stops the publishing of its type.
pub(super) async fn read_routes(tx: &mut Tx, messages: &[&NewMessage]) -> StoreResult<RouteCache> {
    let mut cache = RouteCache::default();
    for (message_type, msgs) in RouteCache::by_type(messages.iter().copied()) {
        let key_sets: Vec<String> =
            sqlx::query("SELECT correlation_keys FROM subscription_keys WHERE message_type = $1")
                .bind(message_type)
                .fetch_all(&mut **tx)
                .await
                .map_err(|e| map_err("read routes", e))?
                .iter()
                .filter_map(|row| readable(super::col(row, "correlation_keys")))
                .collect();
        let values = cache.key_sets(message_type, key_sets, &msgs);
        for chunk in values.chunks(ROWS_PER_STATEMENT) {
            let mut q = QueryBuilder::new(
                "SELECT correlation, id, instance_id FROM subscriptions WHERE message_type = ",
            );
            q.push_bind(message_type)
                .push(" AND instance_id IS NOT NULL AND correlation IN (");
            let mut list = q.separated(", ");
            for value in chunk {
                list.push_bind(value);
            }
            q.push(") ORDER BY created_at, id");
            let rows = q
                .build()
                .persistent(reuse(chunk.len()))
                .fetch_all(&mut **tx)
                .await
                .map_err(|e| map_err("read routes", e))?;
            for row in &rows {
                let read = (|| {
                    Ok::<_, StoreError>((
                        super::col::<String>(row, "correlation")?,
                        super::col_uuid(row, "id")?,
                        super::col_uuid(row, "instance_id")?,
                    ))
                })();
                if let Some((correlation, sub, instance)) = readable(read) {
                    cache.subscription(message_type, correlation, sub, instance);
                }
            }
        }
        let activations =
            common::routing::read_activations::<SqliteStore>(tx, message_type).await?;
        cache.activations(message_type, activations);
    }
    Ok(cache)
}

/// A subscription row read, or `None` with a warning when it cannot be read.
fn readable<T>(read: StoreResult<T>) -> Option<T> {
    read.map_err(
        |e| tracing::warn!(error = %e, "a subscription row cannot be read; left out of routing"),
    )
    .ok()
}
