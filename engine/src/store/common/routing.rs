//! Where messages go, the parts both backends write alike: publishing, an instance row created
//! for a start, and the types a convoy's new instance subscribes to. Route lookups, reroutes and the routing
//! locks stay with each backend: PostgreSQL serializes publishers and subscription changes with
//! advisory locks, SQLite has one writer.

use chrono::{DateTime, Utc};
use sqlx::{Database, Encode, Executor, IntoArguments, Type};
use uuid::Uuid;

use super::{Backend, Bind};
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
