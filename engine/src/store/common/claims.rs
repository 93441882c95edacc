//! Claims and leases, once for both backends: a claim run and its rows read (a row that cannot be
//! read is dead-lettered, or its instance suspended, and holds back nothing), the rows of an
//! acquire read the same way, a host's locks given back when it stops, and an instance no host
//! here can run noted. The claim statements and the acquire itself stay with each backend:
//! PostgreSQL skips rows other hosts lock and knows when another host's lock is stale; SQLite has
//! one writer and plans that start from the ready rows.

use chrono::{DateTime, Utc};
use sqlx::{Database, Encode, Executor, IntoArguments, Type};
use uuid::Uuid;

use super::{Backend, Bind, RowOf};
use crate::store::{Claimed, DueTimer, InstanceRecord, StoreResult, StoredMessage};

/// One claim: statement `sql` for `host` at `now`, of at most `limit` rows.
pub(in crate::store) struct Claim<'a> {
    pub(in crate::store) sql: &'a str,
    pub(in crate::store) host: &'a str,
    pub(in crate::store) now: DateTime<Utc>,
    pub(in crate::store) limit: u32,
}

impl<'a> Claim<'a> {
    pub(in crate::store) fn new(
        sql: &'a str,
        host: &'a str,
        now: DateTime<Utc>,
        limit: u32,
    ) -> Self {
        Claim {
            sql,
            host,
            now,
            limit,
        }
    }
}

/// Claims and leases over a [`Backend`].
pub(in crate::store) trait Claims: Backend
where
    for<'c> &'c mut <Self::Db as Database>::Connection: Executor<'c, Database = Self::Db>,
    for<'q> <Self::Db as Database>::Arguments<'q>: IntoArguments<'q, Self::Db>,
    for<'q> &'q str: Encode<'q, Self::Db> + Type<Self::Db>,
    String: Bind<Self::Db>,
    Option<String>: Bind<Self::Db>,
    i64: Bind<Self::Db>,
{
    /// Runs `claim` in a write transaction of its own (each backend its own way: one round
    /// trip where it can).
    async fn claim_rows(&self, claim: Claim<'_>) -> StoreResult<Vec<RowOf<Self>>>;

    /// [`Claims::claim_rows`] in a soft transaction of the backend's ([`Backend::begin_soft`]).
    async fn claim_rows_in_transaction(&self, claim: Claim<'_>) -> StoreResult<Vec<RowOf<Self>>> {
        let mut tx = self.begin_soft().await?;
        let rows = self
            .claim_query(claim.sql, &claim)
            .fetch_all(&mut *tx)
            .await
            .map_err(|e| Self::map_err("claim", e))?;
        Self::commit(tx).await?;
        Ok(rows)
    }

    /// `sql`, which holds `claim`'s statement, with `claim`'s parameters bound: `$1` the host,
    /// `$2` now, `$3` the limit, the [`claim_cutoff`](Backend::claim_cutoff) where the backend
    /// has one, then the host's registrations ([`super::versions::claimable`]).
    fn claim_query<'q>(
        &self,
        sql: &'q str,
        claim: &Claim<'q>,
    ) -> sqlx::query::Query<'q, Self::Db, <Self::Db as Database>::Arguments<'q>> {
        let mut query = sqlx::query(sql)
            .bind(claim.host)
            .bind(Self::time(claim.now))
            .bind(i64::from(claim.limit));
        if let Some(cutoff) = self.claim_cutoff(claim.now) {
            query = query.bind(cutoff);
        }
        query.bind(self.registered().of(claim.host))
    }

    /// The messages `claim` takes, in publication order; `full` rows make a full claim (one
    /// after which there may be more). A row that cannot be read is dead-lettered.
    async fn claim_messages_by(
        &self,
        claim: Claim<'_>,
        full: usize,
    ) -> StoreResult<Claimed<StoredMessage>> {
        let now = claim.now;
        let rows = self.claim_rows(claim).await?;
        let mut out = Vec::with_capacity(rows.len());
        let mut unreadable = Vec::new();
        for row in &rows {
            match stored_message::<Self>(row) {
                Ok(message) => out.push(message),
                Err(e) => unreadable.push((Self::col_i64(row, "seq")?, e.to_string())),
            }
        }
        if !unreadable.is_empty() {
            let mut tx = self.begin().await?;
            Self::bury_messages(&mut tx, &unreadable, now).await?;
            Self::commit(tx).await?;
        }
        out.sort_by_key(|m| m.seq);
        Ok(Claimed::new(out, rows.len() >= full))
    }

    /// The timers `claim` takes, the earliest first. The instance of a row that cannot be
    /// read is suspended with the reason (it would wait for the timer forever); the row stays
    /// locked to this host, so it is not claimed again while the host runs.
    async fn claim_timers_by(&self, claim: Claim<'_>) -> StoreResult<Claimed<DueTimer>> {
        let (now, limit) = (claim.now, claim.limit);
        let rows = self.claim_rows(claim).await?;
        let mut out = Vec::with_capacity(rows.len());
        let mut unreadable = Vec::new();
        for row in &rows {
            match due_timer::<Self>(row) {
                Ok(timer) => out.push(timer),
                Err(e) => unreadable.push((row, e)),
            }
        }
        if !unreadable.is_empty() {
            let mut tx = self.begin().await?;
            for (row, e) in unreadable {
                let why = format!("a timer of this instance cannot be read: {e}");
                tracing::error!(error = %why, "a timer row cannot be read");
                if let Ok(id) = Self::col_id(row, "instance_id") {
                    Self::suspend_unreadable(&mut tx, id, &why, now).await?;
                }
            }
            Self::commit(tx).await?;
        }
        out.sort_by_key(|t| t.due_at);
        Ok(Claimed::new(out, rows.len() >= limit as usize))
    }

    /// The instances an acquire's `rows` hold. A row that cannot be read is left out of the
    /// answer, as if another host held it, and its instance suspended with the reason, so that
    /// it is not claimed again until an operator fixes the row and resumes it.
    async fn acquired(
        tx: &mut Self::Tx,
        rows: Vec<RowOf<Self>>,
        now: DateTime<Utc>,
    ) -> StoreResult<Vec<InstanceRecord>> {
        let mut unreadable = Vec::new();
        let out = Self::read_acquired(&rows, &mut unreadable)?;
        Self::suspend_unreadable_all(tx, unreadable, now).await?;
        Ok(out)
    }

    /// [`Claims::acquired`] for an acquire already committed (sent as one statement): an
    /// instance whose row cannot be read is suspended in a transaction of its own.
    async fn acquired_committed(
        &self,
        rows: &[RowOf<Self>],
        now: DateTime<Utc>,
    ) -> StoreResult<Vec<InstanceRecord>> {
        let mut unreadable = Vec::new();
        let out = Self::read_acquired(rows, &mut unreadable)?;
        if !unreadable.is_empty() {
            let mut tx = self.begin().await?;
            Self::suspend_unreadable_all(&mut tx, unreadable, now).await?;
            Self::commit(tx).await?;
        }
        Ok(out)
    }

    /// The instances an acquire's `rows` hold; those whose row cannot be read go to
    /// `unreadable`, with why.
    fn read_acquired(
        rows: &[RowOf<Self>],
        unreadable: &mut Vec<(Self::Id, String)>,
    ) -> StoreResult<Vec<InstanceRecord>> {
        let mut out = Vec::with_capacity(rows.len());
        for row in rows {
            match instance_record::<Self>(row) {
                Ok(record) => out.push(record),
                Err(e) => unreadable.push((
                    Self::col_id(row, "id")?,
                    format!("its instances row cannot be read: {e}"),
                )),
            }
        }
        Ok(out)
    }

    /// Suspends the instances whose row an acquire could not read, with why.
    async fn suspend_unreadable_all(
        tx: &mut Self::Tx,
        unreadable: Vec<(Self::Id, String)>,
        now: DateTime<Utc>,
    ) -> StoreResult<()> {
        for (id, why) in unreadable {
            tracing::error!(error = %why, "an instance cannot be loaded; suspended");
            Self::suspend_unreadable(tx, id, &why, now).await?;
        }
        Ok(())
    }

    /// Dead-letters claimed messages that cannot be read, `(seq, why)`: a copy of each goes to
    /// `dead_letters` with the reason (its columns as text, whatever they hold), and the message
    /// is marked `dead`, so that it is never claimed again and holds back nothing.
    async fn bury_messages(
        tx: &mut Self::Tx,
        rows: &[(i64, String)],
        now: DateTime<Utc>,
    ) -> StoreResult<()> {
        let copy = format!(
            "INSERT INTO dead_letters (id, instance_id, port, message_type, body, reason, attempts, dead_at) \
             SELECT {}, {}, NULL, {}, {}, $2, 0, $3 FROM messages WHERE seq = $1 \
             ON CONFLICT (id) DO NOTHING",
            Self::as_text("id"),
            Self::uuid_or_null("instance_id"),
            Self::as_text("message_type"),
            Self::as_text("body"),
        );
        for (seq, why) in rows {
            let reason = format!("message {seq} cannot be read: {why}");
            tracing::error!(message.seq = seq, error = %reason, "a message cannot be read; dead-lettered");
            sqlx::query(&copy)
                .bind(*seq)
                .bind(reason.as_str())
                .bind(Self::time(now))
                .execute(&mut **tx)
                .await
                .map_err(|e| Self::map_err("bury messages", e))?;
            sqlx::query(
                "UPDATE messages SET status = 'dead', locked_by = NULL, reason = $2 WHERE seq = $1",
            )
            .bind(*seq)
            .bind(reason.as_str())
            .execute(&mut **tx)
            .await
            .map_err(|e| Self::map_err("bury messages", e))?;
        }
        Ok(())
    }

    /// Suspends instance `id` (as stored) because a row of it cannot be read: its status,
    /// `last_error` and a new epoch (a host holding it in memory is fenced). No history row is
    /// written: the instance's own columns may be what cannot be read. An operator fixes the
    /// row, then resumes it.
    async fn suspend_unreadable(
        tx: &mut Self::Tx,
        id: Self::Id,
        why: &str,
        now: DateTime<Utc>,
    ) -> StoreResult<()> {
        sqlx::query(
            "UPDATE instances SET status = 'suspended', last_error = $2, epoch = epoch + 1, \
             owner = NULL, lease_expires_at = NULL, updated_at = $3 \
             WHERE id = $1 AND status IN ('running', 'dehydrated')",
        )
        .bind(id)
        .bind(why)
        .bind(Self::time(now))
        .execute(&mut **tx)
        .await
        .map_err(|e| Self::map_err("suspend unreadable", e))?;
        Ok(())
    }

    /// [`MessageBox::heartbeat`](crate::store::MessageBox::heartbeat): the leases of the
    /// instances `host` owns renewed to `lease_until` ([`Backend::RENEW_LEASES`]), and its
    /// `hosts` row beaten (a host another one marked stopped while it was slow is back).
    async fn heartbeat(
        &self,
        host: &str,
        now: DateTime<Utc>,
        lease_until: DateTime<Utc>,
    ) -> StoreResult<()> {
        self.learn_lease(now, lease_until);
        let mut tx = self.begin_soft().await?;
        sqlx::query(Self::RENEW_LEASES)
            .bind(host)
            .bind(Self::time(lease_until))
            .execute(&mut *tx)
            .await
            .map_err(|e| Self::map_err("heartbeat", e))?;
        sqlx::query("UPDATE hosts SET heartbeat_at = $2, stopped_at = NULL WHERE id = $1")
            .bind(host)
            .bind(Self::time(now))
            .execute(&mut *tx)
            .await
            .map_err(|e| Self::map_err("heartbeat", e))?;
        Self::commit(tx).await
    }

    /// [`MessageBox::release`](crate::store::MessageBox::release).
    async fn release(&self, host: &str, now: DateTime<Utc>) -> StoreResult<()> {
        let mut tx = self.begin().await?;
        let give_back = format!(
            "UPDATE messages SET locked_by = NULL, {} WHERE locked_by = $1 AND status = 'routed'",
            Self::GIVE_BACK
        );
        for sql in [
            give_back.as_str(),
            "UPDATE timers SET locked_by = NULL WHERE locked_by = $1",
            "UPDATE outbox SET locked_by = NULL, locked_until = NULL WHERE locked_by = $1",
            "UPDATE instances SET owner = NULL, lease_expires_at = NULL, \
               status = CASE WHEN status = 'running' AND state IS NOT NULL THEN 'dehydrated' ELSE status END \
             WHERE owner = $1",
        ] {
            sqlx::query(sql)
                .bind(host)
                .execute(&mut *tx)
                .await
                .map_err(|e| Self::map_err("release", e))?;
        }
        sqlx::query("UPDATE hosts SET stopped_at = $2, heartbeat_at = $2 WHERE id = $1")
            .bind(host)
            .bind(Self::time(now))
            .execute(&mut *tx)
            .await
            .map_err(|e| Self::map_err("release", e))?;
        Self::commit(tx).await
    }

    /// [`MessageBox::note_unrunnable`](crate::store::MessageBox::note_unrunnable): the lease goes
    /// (another host may have the definition); the claimed messages stay locked to this host so
    /// that it does not pick them up again and again.
    async fn note_unrunnable(&self, id: Uuid, error: &str, now: DateTime<Utc>) -> StoreResult<()> {
        let mut tx = self.begin().await?;
        sqlx::query(
            "UPDATE instances SET last_error = $2, updated_at = $3, owner = NULL, lease_expires_at = NULL \
             WHERE id = $1",
        )
        .bind(Self::uuid(id))
        .bind(error)
        .bind(Self::time(now))
        .execute(&mut *tx)
        .await
        .map_err(|e| Self::map_err("note unrunnable", e))?;
        Self::commit(tx).await
    }
}

/// A claimed message row, checked.
fn stored_message<B: Backend>(row: &RowOf<B>) -> StoreResult<StoredMessage> {
    Ok(StoredMessage {
        seq: B::col_i64(row, "seq")?,
        id: B::col_text(row, "id")?,
        message_type: B::col_text(row, "message_type")?,
        kind: B::col_word(row, "kind")?,
        properties: B::col_json(row, "properties")?,
        body: B::col_json(row, "body")?,
        instance_id: B::col_uuid(row, "instance_id")?,
        subscription_id: B::col_uuid_opt(row, "subscription_id")?,
        published_at: B::col_time(row, "published_at")?,
        delivery_count: i64::from(B::col_u32(row, "messages", "delivery_count")?),
    })
}

/// A claimed timer row, checked.
fn due_timer<B: Backend>(row: &RowOf<B>) -> StoreResult<DueTimer> {
    Ok(DueTimer {
        instance_id: B::col_uuid(row, "instance_id")?,
        name: B::col_text(row, "name")?,
        due_at: B::col_time(row, "due_at")?,
    })
}

/// An acquired instance row, checked.
fn instance_record<B: Backend>(row: &RowOf<B>) -> StoreResult<InstanceRecord> {
    Ok(InstanceRecord {
        id: B::col_uuid(row, "id")?,
        orchestration: B::col_text(row, "orchestration")?,
        version: B::col_u32(row, "instances", "version")?,
        status: B::col_word(row, "status")?,
        state: B::col_bytes_opt(row, "state")?,
        engine_state: B::col_bytes_opt(row, "engine_state")?,
        epoch: B::col_i64(row, "epoch")?,
        history_seq: B::col_i64(row, "history_seq")?,
        parent_id: B::col_uuid_opt(row, "parent_id")?,
    })
}
