//! Keeping the store in shape, the parts both backends do alike: reading the rows people write
//! by hand (`control`, `inbox`), publishing an inbox row under a savepoint, and housekeeping.
//! Taking the inbox, reading the applied migrations, and the `impl Maintenance` itself
//! ([`maintenance!`]). Migrations, recovery at start and activations stay with each backend:
//! PostgreSQL shares its database with other hosts, SQLite has one host a file.

use chrono::{DateTime, Utc};
use sqlx::{Database, Encode, Executor, FromRow, IntoArguments, Type};
use uuid::Uuid;

use super::{Backend, Bind, Operator, RowOf};
use crate::store::*;

/// The name of this machine, for the `hosts` row.
pub(in crate::store) fn hostname() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".to_owned())
}

/// Reads a pending `control` row, checked: a column the backend cannot read, a NULL or an
/// unknown action is reported (the column and what it holds) for the row's `result`.
pub(in crate::store) fn control_request<B: Backend>(
    row: &RowOf<B>,
    id: i64,
) -> StoreResult<ControlRequest> {
    let read = || -> StoreResult<ControlRequest> {
        Ok(ControlRequest {
            id,
            instance_id: B::col_uuid(row, "instance_id")?,
            action: control_action(
                &B::col_text(row, "action")?,
                B::col_text(row, "reason")?,
                B::col_bool(row, "force")?,
            )
            .map_err(StoreError::Corrupt)?,
        })
    };
    read().map_err(|e| match e {
        StoreError::Corrupt(why) => {
            StoreError::Corrupt(format!("control row {id} cannot be read: {why}"))
        }
        other => other,
    })
}

/// Reads an `inbox` row, checked, and checks that its message can be stored
/// ([`NewMessage::check_storable`]).
///
/// # Errors
/// Why not, for its dead letter: a column and what it holds, a body that is not JSON, a NUL, a
/// body over `max_bytes`.
pub(in crate::store) fn inbox_row<B: Backend>(
    row: &RowOf<B>,
    id: i64,
    max_bytes: usize,
) -> Result<NewMessage, String> {
    let text = |name| B::read_text(row, name).map_err(|e| format!("inbox row {id}: {e}"));
    let message_id =
        B::read_text_opt(row, "message_id").map_err(|e| format!("inbox row {id}: {e}"))?;
    let msg = inbox_message(
        id,
        message_id,
        text("message_type")?,
        &text("properties")?,
        &text("body")?,
    )?;
    msg.check_storable(max_bytes)
        .map_err(|e| format!("inbox row {id}: {e}"))?;
    Ok(msg)
}

/// The shared parts of `impl Maintenance` over a [`Backend`].
pub(in crate::store) trait Upkeep: Operator
where
    for<'c> &'c mut <Self::Db as Database>::Connection: Executor<'c, Database = Self::Db>,
    for<'q> <Self::Db as Database>::Arguments<'q>: IntoArguments<'q, Self::Db>,
    for<'q> &'q str: Encode<'q, Self::Db> + Type<Self::Db>,
    for<'q> Option<&'q str>: Encode<'q, Self::Db> + Type<Self::Db>,
    String: Bind<Self::Db>,
    i64: Bind<Self::Db>,
    (i64,): for<'r> FromRow<'r, RowOf<Self>>,
    (bool,): for<'r> FromRow<'r, RowOf<Self>>,
    (i64, bool, Vec<u8>): for<'r> FromRow<'r, RowOf<Self>>,
{
    /// [`Maintenance::apply_controls`]: the pending `control` rows, one transaction each.
    async fn apply_controls(
        &self,
        host: &str,
        now: DateTime<Utc>,
        limit: u32,
    ) -> StoreResult<Vec<ControlApplied>> {
        let e = |e| Self::map_err("apply controls", e);
        let mut out = Vec::new();
        // A read first: most polls find nothing, and need not queue behind the writers.
        if !self
            .exists("SELECT EXISTS (SELECT 1 FROM control WHERE status = 'pending')")
            .await?
        {
            return Ok(out);
        }
        for _ in 0..limit {
            let mut tx = self.begin().await?;
            let Some(row) = sqlx::query(&format!(
                "SELECT id, instance_id, action, reason, force FROM control WHERE status = 'pending' \
                 ORDER BY id LIMIT 1{}",
                Self::SKIP_LOCKED
            ))
            .fetch_optional(&mut *tx)
            .await
            .map_err(e)?
            else {
                break;
            };
            let request_id = Self::col_i64(&row, "id")?;
            let (instance_id, result) = match control_request::<Self>(&row, request_id) {
                Ok(request) => (
                    Some(request.instance_id),
                    Self::control_in(&mut tx, request.instance_id, &request.action, now).await,
                ),
                Err(e) => (None, Err(e)),
            };
            let (mut tx, status, text) = match result {
                Ok(ref status) => (tx, "done", format!("instance is now {status}")),
                // Tried again on the next poll.
                Err(e) if e.is_retryable() => return Err(e),
                // Anything else is this request's answer, never a stop for the requests behind
                // it: what the action wrote is rolled back, and the row is marked rejected
                // with the reason.
                Err(ref e) => match self.begin_again(tx, request_id).await? {
                    Some(tx) => (tx, "rejected", e.to_string()),
                    None => continue,
                },
            };
            sqlx::query(
                "UPDATE control SET status = $2, result = $3, done_at = $4, done_by = $5 WHERE id = $1",
            )
            .bind(request_id)
            .bind(status)
            .bind(text)
            .bind(Self::time(now))
            .bind(host)
            .execute(&mut *tx)
            .await
            .map_err(e)?;
            Self::commit(tx).await?;
            out.push(ControlApplied {
                id: request_id,
                instance_id,
                result: result.map_err(|e| e.to_string()),
            });
        }
        Ok(out)
    }

    /// [`Maintenance::take_inbox`]: up to `limit` inbox rows, the oldest first (skipping rows
    /// another host holds), each published or dead-lettered with its reason, in one transaction.
    async fn take_inbox(
        &self,
        now: DateTime<Utc>,
        limit: u32,
        max_message_bytes: usize,
    ) -> StoreResult<usize> {
        if !self.exists("SELECT EXISTS (SELECT 1 FROM inbox)").await? {
            return Ok(0);
        }
        let mut tx = self.begin().await?;
        let rows = sqlx::query(&format!(
            "SELECT id, message_id, message_type, properties, body FROM inbox \
             ORDER BY id LIMIT $1{}",
            Self::SKIP_LOCKED
        ))
        .bind(i64::from(limit))
        .fetch_all(&mut *tx)
        .await
        .map_err(|e| Self::map_err("take inbox", e))?;
        let mut parsed = Vec::with_capacity(rows.len());
        for row in &rows {
            // `id` is an integer key: always readable.
            let id = Self::col_i64(row, "id")?;
            parsed.push((id, inbox_row::<Self>(row, id, max_message_bytes)));
        }
        let good: Vec<NewMessage> = parsed
            .iter()
            .filter_map(|(_, m)| m.as_ref().ok().cloned())
            .collect();
        Self::lock_to_publish(&mut tx, &good).await?;
        for (id, message) in parsed {
            Self::take_inbox_row(&mut tx, id, message, now).await?;
        }
        Self::notify(&mut tx).await?;
        Self::commit(tx).await?;
        Ok(rows.len())
    }

    /// [`Maintenance::check_schema`]: the migrations the database says it applied against
    /// `migrator`'s; `table_exists` is a query whether the migrations table is there at all.
    async fn check_schema_with(
        &self,
        migrator: &sqlx::migrate::Migrator,
        table_exists: &str,
    ) -> StoreResult<()> {
        let applied = if self.exists(table_exists).await? {
            let rows: Vec<(i64, bool, Vec<u8>)> = sqlx::query_as(
                "SELECT version, success, checksum FROM _sqlx_migrations ORDER BY version",
            )
            .fetch_all(self.reads())
            .await
            .map_err(|e| Self::map_err("check schema", e))?;
            Some(rows)
        } else {
            None
        };
        compare_schema(migrator, applied).map_err(StoreError::Schema)
    }

    /// Writes the activating subscriptions of the registered orchestrations inside `tx`, a
    /// version registered again taking the newest definition's convoy keys.
    async fn upsert_activations(
        tx: &mut Self::Tx,
        activations: &[Activation],
        now: DateTime<Utc>,
    ) -> StoreResult<()> {
        for a in activations {
            if let Some(port) = &a.port {
                sqlx::query(
                    "INSERT INTO subscriptions (id, message_type, port, correlation_keys, created_at, filter) \
                     VALUES ($1, $2, $3, '', $4, $5) \
                     ON CONFLICT (message_type, port) WHERE port IS NOT NULL \
                     DO UPDATE SET filter = excluded.filter, filter_error = NULL",
                )
                .bind(Self::uuid(Uuid::new_v4()))
                .bind(a.message_type.as_str())
                .bind(port.as_str())
                .bind(Self::time(now))
                .bind(a.filter.as_str())
                .execute(&mut **tx)
                .await
                .map_err(|e| Self::map_err("sync port subscriptions", e))?;
                continue;
            }
            sqlx::query(
                "INSERT INTO subscriptions (id, message_type, orchestration, version, correlation_keys, created_at, filter) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7) \
                 ON CONFLICT (message_type, orchestration) WHERE instance_id IS NULL \
                 DO UPDATE SET version = excluded.version, correlation_keys = excluded.correlation_keys, \
                   filter = excluded.filter, filter_error = NULL",
            )
            .bind(Self::uuid(Uuid::new_v4()))
            .bind(a.message_type.as_str())
            .bind(a.orchestration.as_str())
            .bind(Self::count(a.version))
            .bind(a.convoy.as_str())
            .bind(Self::time(now))
            .bind(a.filter.as_str())
            .execute(&mut **tx)
            .await
            .map_err(|e| Self::map_err("sync activations", e))?;
        }
        Ok(())
    }

    /// Whether a query's single boolean answer is true.
    async fn exists(&self, sql: &str) -> StoreResult<bool> {
        let (answer,): (bool,) = sqlx::query_as(sql)
            .fetch_one(self.reads())
            .await
            .map_err(|e| Self::map_err("exists", e))?;
        Ok(answer)
    }

    /// Runs a savepoint statement.
    async fn savepoint(tx: &mut Self::Tx, sql: &str) -> StoreResult<()> {
        sqlx::query(sql)
            .execute(&mut **tx)
            .await
            .map_err(|e| Self::map_err("savepoint", e))
            .map(drop)
    }

    /// Publishes an inbox row's message inside `tx`, under a savepoint: a refusal by the
    /// database that retrying cannot cure is rolled back to it and returned (`Some(reason)`, for
    /// the row's dead letter), so that the rows beside it are still published.
    ///
    /// # Errors
    /// A retryable error: the whole transaction is tried again later.
    async fn publish_or_refuse(
        tx: &mut Self::Tx,
        id: i64,
        msg: &NewMessage,
        now: DateTime<Utc>,
    ) -> StoreResult<Option<String>> {
        Self::savepoint(tx, "SAVEPOINT inbox_row").await?;
        match Self::publish_one(tx, msg, now).await {
            Ok(()) => {
                Self::savepoint(tx, "RELEASE SAVEPOINT inbox_row").await?;
                Ok(None)
            }
            Err(e) if e.is_retryable() => Err(e),
            Err(e) => {
                Self::savepoint(tx, "ROLLBACK TO SAVEPOINT inbox_row").await?;
                Self::savepoint(tx, "RELEASE SAVEPOINT inbox_row").await?;
                Ok(Some(format!(
                    "inbox row {id}: the database refused it: {e}"
                )))
            }
        }
    }

    /// Takes inbox row `id` inside `tx`: publishes its message, or dead-letters the row with the
    /// reason it cannot be, then deletes it.
    async fn take_inbox_row(
        tx: &mut Self::Tx,
        id: i64,
        message: Result<NewMessage, String>,
        now: DateTime<Utc>,
    ) -> StoreResult<()> {
        let e = |e| Self::map_err("take inbox", e);
        let refused = match message {
            Ok(msg) => Self::publish_or_refuse(tx, id, &msg, now).await?,
            Err(reason) => Some(reason),
        };
        if let Some(reason) = refused {
            tracing::warn!(inbox.id = id, error = %reason, "an inbox row was dead-lettered");
            sqlx::query(&format!(
                "INSERT INTO dead_letters (id, message_type, body, reason, attempts, dead_at) \
                 SELECT 'inbox-' || id, {}, {}, $2, 0, $3 FROM inbox WHERE id = $1 \
                 ON CONFLICT (id) DO NOTHING",
                Self::as_text("message_type"),
                Self::as_text("body"),
            ))
            .bind(id)
            .bind(reason)
            .bind(Self::time(now))
            .execute(&mut **tx)
            .await
            .map_err(e)?;
        }
        sqlx::query("DELETE FROM inbox WHERE id = $1")
            .bind(id)
            .execute(&mut **tx)
            .await
            .map_err(e)?;
        Ok(())
    }

    /// [`Maintenance::housekeeping`].
    async fn housekeeping(
        &self,
        now: DateTime<Utc>,
        unrouted_before: DateTime<Utc>,
    ) -> StoreResult<Housekeeping> {
        let e = |e| Self::map_err("housekeeping", e);
        let mut tx = self.begin().await?;
        let zombies = sqlx::query(Self::ZOMBIES)
            .execute(&mut *tx)
            .await
            .map_err(e)?;
        sqlx::query(
            "INSERT INTO dead_letters (id, instance_id, port, message_type, body, reason, attempts, dead_at) \
             SELECT id, NULL, NULL, message_type, body, \
               'unrouted for longer than its time to live: ' || COALESCE(reason, ''), 0, $2 \
             FROM messages WHERE status = 'unrouted' AND published_at < $1 \
             ON CONFLICT (id) DO NOTHING",
        )
        .bind(Self::time(unrouted_before))
        .bind(Self::time(now))
        .execute(&mut *tx)
        .await
        .map_err(e)?;
        let expired = sqlx::query(
            "UPDATE messages SET status = 'dead', \
               reason = 'dead-lettered after its time to live: ' || COALESCE(reason, '') \
             WHERE status = 'unrouted' AND published_at < $1",
        )
        .bind(Self::time(unrouted_before))
        .execute(&mut *tx)
        .await
        .map_err(e)?;
        Self::commit(tx).await?;
        Ok(Housekeeping {
            zombies: Self::rows_affected(&zombies),
            expired: Self::rows_affected(&expired),
        })
    }
}

/// `impl Maintenance` for a backend, written once: the shared parts hand over to [`Upkeep`]; the
/// backend gives its name, its migrator, a query whether its migrations table exists, and the
/// methods that are its own (migrate, recover, sync_activations, close) after them. A macro, as for the operator verbs: a blanket impl cannot
/// prove its futures `Send`.
macro_rules! maintenance {
    ($store:ty, $name:literal, $migrator:expr, $migrations_table_exists:literal, $($own:tt)*) => {
        #[async_trait::async_trait]
        impl $crate::store::Maintenance for $store {
            fn backend(&self) -> &'static str {
                $name
            }

            async fn check_schema(&self) -> StoreResult<()> {
                $crate::store::common::Upkeep::check_schema_with(
                    self,
                    &$migrator,
                    $migrations_table_exists,
                )
                .await
            }

            async fn apply_controls(
                &self,
                host: &str,
                now: DateTime<Utc>,
                limit: u32,
            ) -> StoreResult<Vec<ControlApplied>> {
                $crate::store::common::Upkeep::apply_controls(self, host, now, limit).await
            }

            async fn housekeeping(
                &self,
                now: DateTime<Utc>,
                unrouted_before: DateTime<Utc>,
            ) -> StoreResult<Housekeeping> {
                $crate::store::common::Upkeep::housekeeping(self, now, unrouted_before).await
            }

            async fn take_inbox(
                &self,
                now: DateTime<Utc>,
                limit: u32,
                max_message_bytes: usize,
            ) -> StoreResult<usize> {
                $crate::store::common::Upkeep::take_inbox(self, now, limit, max_message_bytes)
                    .await
            }

            $($own)*
        }
    };
}
pub(in crate::store) use maintenance;
