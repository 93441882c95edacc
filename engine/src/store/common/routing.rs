//! Where messages go, the parts both backends write alike: publishing, an instance row created
//! for a start, and the types a convoy's new instance subscribes to. Route lookups, reroutes and the routing
//! locks stay with each backend: PostgreSQL serializes publishers and subscription changes with
//! advisory locks, SQLite has one writer.

use chrono::{DateTime, Utc};
use sqlx::{Database, Encode, Executor, IntoArguments, Type};
use uuid::Uuid;

use super::{Backend, Bind};
use crate::filter::Filter;
use crate::store::routing::{ActivationRow, Route, RouteCache, Subscriber};
use crate::store::{NewMessage, PublishOutcome, StoreResult};

/// A connection of backend `B`, inside its transaction.
type Conn<B> = <<B as Backend>::Db as Database>::Connection;

/// Creates the row of instance `id`, `running` at step `created`, inside the caller's
/// transaction.
pub(in crate::store) async fn insert_instance<B: Backend>(
    conn: &mut Conn<B>,
    id: Uuid,
    orchestration: &str,
    version: u32,
    parent: Option<Uuid>,
    now: DateTime<Utc>,
) -> StoreResult<()>
where
    for<'c> &'c mut Conn<B>: Executor<'c, Database = B::Db>,
    for<'q> <B::Db as Database>::Arguments<'q>: IntoArguments<'q, B::Db>,
    for<'q> &'q str: Encode<'q, B::Db> + Type<B::Db>,
    Option<B::Id>: Bind<B::Db>,
{
    sqlx::query(
        "INSERT INTO instances (id, orchestration, version, status, step, created_at, updated_at, parent_id) \
         VALUES ($1, $2, $3, 'running', 'created', $4, $4, $5)",
    )
    .bind(B::uuid(id))
    .bind(orchestration)
    .bind(B::count(version))
    .bind(B::time(now))
    .bind(parent.map(B::uuid))
    .execute(conn)
    .await
    .map_err(|e| B::map_err("insert instance", e))?;
    Ok(())
}

/// The message types that activate `orchestration`: a convoy's new instance subscribes to each
/// with the convoy's values, so that no second instance starts for them while it runs.
pub(in crate::store) async fn activating_types<B: Backend>(
    conn: &mut Conn<B>,
    orchestration: &str,
) -> StoreResult<Vec<String>>
where
    for<'c> &'c mut Conn<B>: Executor<'c, Database = B::Db>,
    for<'q> <B::Db as Database>::Arguments<'q>: IntoArguments<'q, B::Db>,
    for<'q> &'q str: Encode<'q, B::Db> + Type<B::Db>,
    (String,): for<'r> sqlx::FromRow<'r, <B::Db as Database>::Row>,
{
    let rows: Vec<(String,)> = sqlx::query_as(
        "SELECT message_type FROM subscriptions WHERE orchestration = $1 AND instance_id IS NULL",
    )
    .bind(orchestration)
    .fetch_all(conn)
    .await
    .map_err(|e| B::map_err("subscribe convoy", e))?;
    Ok(rows.into_iter().map(|(t,)| t).collect())
}

/// [`MessageBox::publish`](crate::store::MessageBox::publish): `messages` stored and routed in
/// one transaction, under the routing locks of their types; other hosts are woken when any was
/// new.
pub(in crate::store) async fn publish<B: Backend>(
    store: &B,
    messages: Vec<NewMessage>,
    now: DateTime<Utc>,
) -> StoreResult<Vec<PublishOutcome>> {
    let mut tx = store.begin().await?;
    B::lock_to_publish(&mut tx, &messages).await?;
    let batch: Vec<_> = messages.iter().map(|msg| (msg, now)).collect();
    let out = B::publish_all(&mut tx, &batch).await?;
    if out.iter().any(|o| !matches!(o, PublishOutcome::Duplicate)) {
        B::notify(&mut tx).await?;
    }
    B::commit(tx).await?;
    Ok(out)
}

/// Sends each (message, port, time) to its port through the outbox: a pending send no host
/// holds yet (any host's dispatcher claims it), id `<message id>@<port>`, of no instance (the
/// nil id: no instance hears of its failure). A message sent twice is sent once.
///
/// # Errors
/// The database failed.
pub(in crate::store) async fn send_to_ports<B: Backend>(
    conn: &mut Conn<B>,
    sends: &[(&NewMessage, String, DateTime<Utc>)],
) -> StoreResult<()>
where
    for<'c> &'c mut Conn<B>: Executor<'c, Database = B::Db>,
    for<'q> <B::Db as Database>::Arguments<'q>: IntoArguments<'q, B::Db>,
    for<'q> &'q str: Encode<'q, B::Db> + Type<B::Db>,
    String: Bind<B::Db>,
    bool: Bind<B::Db>,
{
    for (msg, port, at) in sends {
        sqlx::query(
            "INSERT INTO outbox (id, instance_id, port, message_type, body, expects_reply, status, \
               next_attempt_at, created_at) \
             VALUES ($1, $2, $3, $4, $5, $6, 'pending', $7, $7) ON CONFLICT (id) DO NOTHING",
        )
        .bind(format!("{}@{port}", msg.id))
        .bind(B::uuid(Uuid::nil()))
        .bind(port.as_str())
        .bind(msg.message_type.as_str())
        .bind(msg.body.to_string())
        .bind(false)
        .bind(B::time(*at))
        .execute(&mut *conn)
        .await
        .map_err(|e| B::map_err("send to a subscribed port", e))?;
    }
    Ok(())
}

/// The activating subscriptions of `message_type`, by orchestration name, their filters parsed.
/// A row that cannot be read (a tool wrote it) is left out with a warning; a filter that does not
/// parse routes nothing, and the row says why in `filter_error` (written once): neither stops
/// the routing of the type for the other subscriptions.
///
/// # Errors
/// The database failed.
pub(in crate::store) async fn read_activations<B: Backend>(
    conn: &mut Conn<B>,
    message_type: &str,
) -> StoreResult<Vec<ActivationRow>>
where
    for<'c> &'c mut Conn<B>: Executor<'c, Database = B::Db>,
    for<'q> <B::Db as Database>::Arguments<'q>: IntoArguments<'q, B::Db>,
    for<'q> &'q str: Encode<'q, B::Db> + Type<B::Db>,
    String: Bind<B::Db>,
{
    let rows = sqlx::query(
        "SELECT id, COALESCE(orchestration, '') AS orchestration, COALESCE(version, 0) AS version, \
           correlation_keys, filter, filter_error, port \
         FROM subscriptions WHERE message_type = $1 AND instance_id IS NULL ORDER BY orchestration, port",
    )
    .bind(message_type)
    .fetch_all(&mut *conn)
    .await
    .map_err(|e| B::map_err("read routes", e))?;
    let mut out = Vec::with_capacity(rows.len());
    let mut bad = Vec::new();
    for row in &rows {
        let read = (|| {
            Ok::<_, crate::store::StoreError>((
                B::col_uuid(row, "id")?,
                B::col_text(row, "orchestration")?,
                B::col_u32(row, "subscriptions", "version")?,
                B::col_text(row, "correlation_keys")?,
                B::col_text(row, "filter")?,
                B::col_text_opt(row, "filter_error")?,
                B::col_text_opt(row, "port")?,
            ))
        })();
        let (id, orchestration, version, convoy, filter, noted, port) = match read {
            Ok(read) => read,
            Err(e) => {
                tracing::warn!(error = %e, message.r#type = message_type,
                    "an activating subscription row cannot be read; left out of routing");
                continue;
            }
        };
        let filter = Filter::parse(&filter).map_err(|e| e.to_string());
        if let Err(why) = &filter {
            if noted.as_deref() != Some(why.as_str()) {
                tracing::warn!(%orchestration, message.r#type = message_type, error = %why,
                    "an activating subscription's filter does not parse; it routes nothing until fixed");
                bad.push((id, why.clone()));
            }
        }
        out.push(ActivationRow {
            orchestration,
            version,
            convoy,
            filter,
            port,
        });
    }
    for (id, why) in bad {
        sqlx::query("UPDATE subscriptions SET filter_error = $2 WHERE id = $1")
            .bind(B::uuid(id))
            .bind(why)
            .execute(&mut *conn)
            .await
            .map_err(|e| B::map_err("note a filter that does not parse", e))?;
    }
    Ok(out)
}

/// Publish-subscribe: where the copies of `msg` go besides its `route`, one for every other
/// orchestration whose activating subscription it passes ([`RouteCache::subscribers`]): to that
/// orchestration's running instance for the message's correlation (a convoy's instance for its
/// values, under the convoy's lock), or, with none running, to a new instance (`None`). Within an
/// orchestration a message still goes to one instance: the one `route` names is its
/// orchestration's, and no orchestration has two copies (one already stored, as for a message
/// routed again after its receive was cancelled, is not made again).
///
/// # Errors
/// The database failed.
pub(in crate::store) async fn fan_out<B: Backend>(
    conn: &mut Conn<B>,
    cache: &RouteCache,
    msg: &NewMessage,
    route: &Route,
) -> StoreResult<Vec<(Subscriber, Option<Uuid>)>>
where
    for<'c> &'c mut Conn<B>: Executor<'c, Database = B::Db>,
    for<'q> <B::Db as Database>::Arguments<'q>: IntoArguments<'q, B::Db>,
    for<'q> &'q str: Encode<'q, B::Db> + Type<B::Db>,
    String: Bind<B::Db>,
{
    let subscribers = cache.subscribers(msg);
    if subscribers.is_empty() {
        return Ok(Vec::new());
    }
    let routed_to = match route {
        Route::Activate { orchestration, .. } => Some(orchestration.clone()),
        Route::Instance(id, _) => match cache.convoy_of(msg, route) {
            Some(convoy) => Some(convoy.to_owned()),
            None => orchestration_of::<B>(conn, *id).await?,
        },
        Route::Unrouted(_) => None,
    };
    let mut out = Vec::with_capacity(subscribers.len());
    for sub in subscribers {
        if routed_to.as_deref() == Some(sub.orchestration.as_str())
            || stored::<B>(conn, &msg.copy_id(&sub.orchestration)).await?
        {
            continue;
        }
        if let Some(values) = &sub.convoy {
            B::lock_convoy(conn, &sub.orchestration, &values.canonical()).await?;
        }
        let running = waiting_instance::<B>(conn, msg, &sub).await?;
        out.push((sub, running));
    }
    Ok(out)
}

/// The orchestrations among those that subscribe to `msg` that already have their copy of it
/// (a message routed again after the receive it was routed to was cancelled): its route passes
/// over them ([`RouteCache::route_without`]).
///
/// # Errors
/// The database failed.
pub(in crate::store) async fn copied<B: Backend>(
    conn: &mut Conn<B>,
    cache: &RouteCache,
    msg: &NewMessage,
) -> StoreResult<Vec<String>>
where
    for<'c> &'c mut Conn<B>: Executor<'c, Database = B::Db>,
    for<'q> <B::Db as Database>::Arguments<'q>: IntoArguments<'q, B::Db>,
    for<'q> &'q str: Encode<'q, B::Db> + Type<B::Db>,
{
    let mut copied = Vec::new();
    for sub in cache.subscribers(msg) {
        if stored::<B>(conn, &msg.copy_id(&sub.orchestration)).await? {
            copied.push(sub.orchestration);
        }
    }
    Ok(copied)
}

/// The orchestration of instance `id`.
async fn orchestration_of<B: Backend>(conn: &mut Conn<B>, id: Uuid) -> StoreResult<Option<String>>
where
    for<'c> &'c mut Conn<B>: Executor<'c, Database = B::Db>,
    for<'q> <B::Db as Database>::Arguments<'q>: IntoArguments<'q, B::Db>,
{
    let row = sqlx::query("SELECT orchestration FROM instances WHERE id = $1")
        .bind(B::uuid(id))
        .fetch_optional(&mut *conn)
        .await
        .map_err(|e| B::map_err("route a copy", e))?;
    row.map(|row| B::col_text(&row, "orchestration"))
        .transpose()
}

/// Whether a message with this id is stored.
async fn stored<B: Backend>(conn: &mut Conn<B>, id: &str) -> StoreResult<bool>
where
    for<'c> &'c mut Conn<B>: Executor<'c, Database = B::Db>,
    for<'q> <B::Db as Database>::Arguments<'q>: IntoArguments<'q, B::Db>,
    for<'q> &'q str: Encode<'q, B::Db> + Type<B::Db>,
{
    let row = sqlx::query("SELECT seq FROM messages WHERE id = $1")
        .bind(id)
        .fetch_optional(&mut *conn)
        .await
        .map_err(|e| B::map_err("route a copy", e))?;
    Ok(row.is_some())
}

/// The instance of `sub`'s orchestration whose subscription to `msg`'s type matches the
/// message (the oldest subscription, as routing takes), if one runs.
async fn waiting_instance<B: Backend>(
    conn: &mut Conn<B>,
    msg: &NewMessage,
    sub: &Subscriber,
) -> StoreResult<Option<Uuid>>
where
    for<'c> &'c mut Conn<B>: Executor<'c, Database = B::Db>,
    for<'q> <B::Db as Database>::Arguments<'q>: IntoArguments<'q, B::Db>,
    for<'q> &'q str: Encode<'q, B::Db> + Type<B::Db>,
{
    for correlation in &sub.correlations {
        let row = sqlx::query(
            "SELECT s.instance_id FROM subscriptions s JOIN instances i ON i.id = s.instance_id \
             WHERE s.message_type = $1 AND s.correlation = $2 AND i.orchestration = $3 \
             ORDER BY s.created_at, s.id LIMIT 1",
        )
        .bind(msg.message_type.as_str())
        .bind(correlation.as_str())
        .bind(sub.orchestration.as_str())
        .fetch_optional(&mut *conn)
        .await
        .map_err(|e| B::map_err("route a copy", e))?;
        if let Some(row) = row {
            return B::col_uuid(&row, "instance_id").map(Some);
        }
    }
    Ok(None)
}

/// Fills in the body of `probe`, unrouted message `seq` read for routing without it (an
/// unrouted message is read whole only once it routes): `false`, with a warning, when it cannot
/// be read (it stays unrouted, and is dead-lettered after its time to live).
///
/// # Errors
/// The database failed.
pub(in crate::store) async fn read_body<B: Backend>(
    conn: &mut Conn<B>,
    seq: i64,
    probe: &mut NewMessage,
) -> StoreResult<bool>
where
    for<'c> &'c mut Conn<B>: Executor<'c, Database = B::Db>,
    for<'q> <B::Db as Database>::Arguments<'q>: IntoArguments<'q, B::Db>,
    i64: Bind<B::Db>,
{
    let row = sqlx::query("SELECT body FROM messages WHERE seq = $1")
        .bind(seq)
        .fetch_one(&mut *conn)
        .await
        .map_err(|e| B::map_err("reroute", e))?;
    match B::col_json(&row, "body") {
        Ok(body) => {
            probe.body = body;
            Ok(true)
        }
        Err(e) => {
            tracing::warn!(message.seq = seq, error = %e, "an unrouted message cannot be read; left unrouted");
            Ok(false)
        }
    }
}
