//! Late messages, once for both backends: a message for a key (a message type with correlation
//! values) whose instance has ended is a zombie naming that instance, not held for a later one.
//!
//! The rule ([docs/messaging.md](../../../../docs/messaging.md#late-messages)):
//!
//! * a message that matches no subscription and activates nothing, whose key was last waited on
//!   by an instance that has ended, is a `zombie` with that instance named ([`Late::zombie`]);
//! * an unrouted message goes to a new subscription unless another instance waited on its key
//!   before it was published and has ended ([`waited_before`]; it is that instance's zombie): a
//!   later instance of the key receives only messages published after it subscribed, unless its
//!   receive asks for earlier ones ([`adopt_all_earlier`]);
//! * a message published before any instance ever waited on its key stays unrouted, as before,
//!   and is routed to the first instance that waits on it.
//!
//! Who waited on what, and since when, is the `waited_keys` table (migration `late_messages`),
//! written by a trigger on `subscriptions`. Routing reads it only for messages that found no
//! subscription, never on the path of a routed message.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use sqlx::{Database, Encode, Executor, IntoArguments, Type};
use uuid::Uuid;

use super::{Backend, Bind};
use crate::orchestration::Correlation;
use crate::store::{InstanceStatus, NewMessage, StoreResult, SubscriptionRow};

/// A connection of backend `B`, inside its transaction.
type Conn<B> = <<B as Backend>::Db as Database>::Connection;

/// An instance that waited on a message's key: who, and how it stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(in crate::store) struct Late {
    /// The instance.
    pub(in crate::store) instance: Uuid,
    /// Its status, as the `instances` row says (`None`: a word this build does not know).
    pub(in crate::store) status: Option<InstanceStatus>,
}

impl Late {
    /// The zombie reason, if the instance has ended: the message is late for it.
    pub(in crate::store) fn zombie(&self) -> Option<String> {
        let status = self.status.filter(|s| s.is_final())?;
        Some(format!(
            "late: the instance that waited on its key ({}) had ended ({status}) when it \
             arrived; a later instance of the key receives only messages published after it \
             waits (docs/messaging.md#late-messages)",
            self.instance
        ))
    }
}

/// The newest instance that waited on a key `properties` carry for `message_type` (any of the
/// type's correlation key sets), other than `except`, subscribed at or before `before` when
/// given. `None` when no instance ever did, or when the type activates an orchestration
/// (convoys keep their routing): the message keeps today's routing.
///
/// # Errors
/// The database failed.
pub(in crate::store) async fn waited_before<B: Backend>(
    conn: &mut Conn<B>,
    message_type: &str,
    properties: &BTreeMap<String, String>,
    before: Option<DateTime<Utc>>,
    except: Option<Uuid>,
) -> StoreResult<Option<Late>>
where
    for<'c> &'c mut Conn<B>: Executor<'c, Database = B::Db>,
    for<'q> <B::Db as Database>::Arguments<'q>: IntoArguments<'q, B::Db>,
    for<'q> &'q str: Encode<'q, B::Db> + Type<B::Db>,
    String: Bind<B::Db>,
{
    // A type that activates an orchestration is not late for anyone: its message starts an
    // instance or goes to its convoy's next one.
    let activates = sqlx::query(
        "SELECT message_type FROM subscriptions \
         WHERE message_type = $1 AND instance_id IS NULL AND port IS NULL",
    )
    .bind(message_type)
    .fetch_optional(&mut *conn)
    .await
    .map_err(|e| B::map_err("late messages", e))?;
    if activates.is_some() {
        return Ok(None);
    }
    let key_sets: Vec<String> = {
        let rows =
            sqlx::query("SELECT correlation_keys FROM subscription_keys WHERE message_type = $1")
                .bind(message_type)
                .fetch_all(&mut *conn)
                .await
                .map_err(|e| B::map_err("late messages", e))?;
        rows.iter()
            .filter_map(|row| B::col_text(row, "correlation_keys").ok())
            .collect()
    };
    let mut sql = String::from(
        "SELECT w.instance_id, w.subscribed_at, i.status FROM waited_keys w \
         JOIN instances i ON i.id = w.instance_id \
         WHERE w.message_type = $1 AND w.correlation = $2",
    );
    if before.is_some() {
        sql.push_str(" AND w.subscribed_at <= $3");
    }
    if except.is_some() {
        sql.push_str(if before.is_some() {
            " AND w.instance_id <> $4"
        } else {
            " AND w.instance_id <> $3"
        });
    }
    sql.push_str(" ORDER BY w.subscribed_at DESC LIMIT 1");
    let mut newest: Option<(DateTime<Utc>, Late)> = None;
    for keys in key_sets.iter().filter(|k| !k.is_empty()) {
        let Some(correlation) = Correlation::from_properties(keys, properties) else {
            continue;
        };
        let mut q = sqlx::query(&sql)
            .bind(message_type)
            .bind(correlation.canonical());
        if let Some(before) = before {
            q = q.bind(B::time(before));
        }
        if let Some(except) = except {
            q = q.bind(B::uuid(except));
        }
        let row = q
            .fetch_optional(&mut *conn)
            .await
            .map_err(|e| B::map_err("late messages", e))?;
        let Some(row) = row else { continue };
        // A row a tool wrote that cannot be read routes as if it were not there.
        let read = (|| {
            Ok::<_, crate::store::StoreError>((
                B::col_uuid(&row, "instance_id")?,
                B::col_time(&row, "subscribed_at")?,
                B::col_text(&row, "status")?,
            ))
        })();
        let (instance, at, status) = match read {
            Ok(read) => read,
            Err(e) => {
                tracing::warn!(error = %e, "a waited_keys row cannot be read; left out of routing");
                continue;
            }
        };
        if newest.as_ref().is_none_or(|(t, _)| at > *t) {
            let status = status.parse::<InstanceStatus>().ok();
            newest = Some((at, Late { instance, status }));
        }
    }
    Ok(newest.map(|(_, late)| late))
}

/// For a message just published that found no route: the ended instance it is late for and the
/// zombie reason, if its key's newest instance has ended; `None` keeps it unrouted.
///
/// # Errors
/// The database failed.
pub(in crate::store) async fn late_for<B: Backend>(
    conn: &mut Conn<B>,
    msg: &NewMessage,
) -> StoreResult<Option<(Uuid, String)>>
where
    for<'c> &'c mut Conn<B>: Executor<'c, Database = B::Db>,
    for<'q> <B::Db as Database>::Arguments<'q>: IntoArguments<'q, B::Db>,
    for<'q> &'q str: Encode<'q, B::Db> + Type<B::Db>,
    String: Bind<B::Db>,
{
    let late = waited_before::<B>(conn, &msg.message_type, &msg.properties, None, None).await?;
    Ok(late.and_then(|l| Some((l.instance, l.zombie()?))))
}

/// Turns unrouted message `seq` into a zombie of `late`'s instance, if that instance has ended
/// (else it stays unrouted: a running instance may wait on its key again).
///
/// # Errors
/// The database failed.
pub(in crate::store) async fn make_zombie<B: Backend>(
    conn: &mut Conn<B>,
    seq: i64,
    late: &Late,
) -> StoreResult<()>
where
    for<'c> &'c mut Conn<B>: Executor<'c, Database = B::Db>,
    for<'q> <B::Db as Database>::Arguments<'q>: IntoArguments<'q, B::Db>,
    String: Bind<B::Db>,
    i64: Bind<B::Db>,
{
    let Some(reason) = late.zombie() else {
        return Ok(());
    };
    sqlx::query(
        "UPDATE messages SET status = 'zombie', instance_id = $2, subscription_id = NULL, \
         reason = $3 WHERE seq = $1 AND status = 'unrouted'",
    )
    .bind(seq)
    .bind(B::uuid(late.instance))
    .bind(reason)
    .execute(conn)
    .await
    .map_err(|e| B::map_err("late message", e))?;
    Ok(())
}

/// [`adopt_earlier`] for each subscription of `rows` (instance, row) that asks for earlier
/// messages; nothing for the others.
///
/// # Errors
/// The database failed.
pub(in crate::store) async fn adopt_all_earlier<B: Backend>(
    conn: &mut Conn<B>,
    rows: Vec<(Uuid, &SubscriptionRow)>,
) -> StoreResult<()>
where
    for<'c> &'c mut Conn<B>: Executor<'c, Database = B::Db>,
    for<'q> <B::Db as Database>::Arguments<'q>: IntoArguments<'q, B::Db>,
    for<'q> &'q str: Encode<'q, B::Db> + Type<B::Db>,
    i64: Bind<B::Db>,
{
    for (instance, row) in rows {
        if !row.earlier {
            continue;
        }
        adopt_earlier::<B>(conn, instance, row.id, &row.message_type, &row.correlation).await?;
    }
    Ok(())
}

/// For a receive that asks for earlier messages ([`Context::receive_earlier`]): routes to
/// `subscription` of `instance` the messages of its key that wait as zombies of an ended
/// instance, or unrouted, oldest first. Returns how many.
///
/// [`Context::receive_earlier`]: crate::Context::receive_earlier
///
/// # Errors
/// The database failed.
async fn adopt_earlier<B: Backend>(
    conn: &mut Conn<B>,
    instance: Uuid,
    subscription: Uuid,
    message_type: &str,
    correlation: &Correlation,
) -> StoreResult<u64>
where
    for<'c> &'c mut Conn<B>: Executor<'c, Database = B::Db>,
    for<'q> <B::Db as Database>::Arguments<'q>: IntoArguments<'q, B::Db>,
    for<'q> &'q str: Encode<'q, B::Db> + Type<B::Db>,
    i64: Bind<B::Db>,
{
    let rows = sqlx::query(
        "SELECT seq, properties FROM messages WHERE message_type = $1 AND kind = 'published' \
         AND (status = 'unrouted' OR (status = 'zombie' AND reason LIKE 'late:%')) ORDER BY seq",
    )
    .bind(message_type)
    .fetch_all(&mut *conn)
    .await
    .map_err(|e| B::map_err("adopt earlier messages", e))?;
    let mut adopted = 0;
    for row in rows {
        let Ok(seq) = B::col_i64(&row, "seq") else {
            continue;
        };
        let Ok(properties) = B::col_json::<BTreeMap<String, String>>(&row, "properties") else {
            continue;
        };
        if !correlation.matches(&properties) {
            continue;
        }
        let done = sqlx::query(
            "UPDATE messages SET status = 'routed', instance_id = $2, subscription_id = $3, \
             reason = NULL WHERE seq = $1 AND status IN ('unrouted', 'zombie')",
        )
        .bind(seq)
        .bind(B::uuid(instance))
        .bind(B::uuid(subscription))
        .execute(&mut *conn)
        .await
        .map_err(|e| B::map_err("adopt earlier messages", e))?;
        adopted += B::rows_affected(&done);
    }
    Ok(adopted)
}

/// Routing unrouted message `seq` (`msg`, published at `published_at`) again, to `route`:
/// whether it stays as it is or becomes a zombie instead (`true`: nothing more to do). It is
/// late for the instance subscription `route` found if another instance waited on its key
/// before it was published and has ended (a running one may share it, as before); a message
/// still unrouted, which no send port takes either (`to_ports` false), is late if the instance
/// that last waited on its key has ended, else stays unrouted.
///
/// # Errors
/// The database failed.
pub(in crate::store) async fn settled_by_reroute<B: Backend>(
    conn: &mut Conn<B>,
    seq: i64,
    msg: &NewMessage,
    route: &crate::store::routing::Route,
    published_at: Option<DateTime<Utc>>,
    to_ports: bool,
) -> StoreResult<bool>
where
    for<'c> &'c mut Conn<B>: Executor<'c, Database = B::Db>,
    for<'q> <B::Db as Database>::Arguments<'q>: IntoArguments<'q, B::Db>,
    for<'q> &'q str: Encode<'q, B::Db> + Type<B::Db>,
    String: Bind<B::Db>,
    i64: Bind<B::Db>,
{
    use crate::store::routing::Route;
    let (before, except) = match route {
        Route::Instance(id, Some(_)) => (published_at, Some(*id)),
        Route::Unrouted(_) if !to_ports => (None, None),
        _ => return Ok(false),
    };
    let waiter =
        waited_before::<B>(conn, &msg.message_type, &msg.properties, before, except).await?;
    match waiter {
        Some(late) if except.is_none() || late.zombie().is_some() => {
            make_zombie::<B>(conn, seq, &late).await?;
            Ok(true)
        }
        // Unrouted it stays.
        _ => Ok(except.is_none()),
    }
}
