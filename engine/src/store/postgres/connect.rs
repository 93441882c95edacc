//! Connecting: the pool, the connection kept for persistence points ([`super::kept`]), and the
//! transactions every room writes in.

use std::str::FromStr;
use std::sync::atomic::AtomicI64;
use std::sync::Arc;
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::PgPool;

use super::kept::{KeptConnection, PointConnection};
use super::{map_err, PostgresStore, Tx, SCHEMA};
use crate::store::{StoreError, StoreResult};

/// The lease duration assumed until a host tells the store its own (HostConfig's default).
const DEFAULT_LEASE_MS: i64 = 30_000;

/// How long a transaction may sit idle before the server aborts it (a paused host's).
const IDLE_IN_TRANSACTION_TIMEOUT: &str = "5s";

impl PostgresStore {
    /// Connects to the database at `url` (`postgres://USER[:PASSWORD]@HOST[:PORT]/DB`), with the
    /// schema `cairn` as the search path. The schema and tables are created by
    /// [`Maintenance::migrate`](crate::store::Maintenance::migrate).
    ///
    /// # Errors
    /// The URL is malformed, or the database cannot be reached within the pool's acquire timeout.
    pub async fn open(url: &str) -> StoreResult<Self> {
        let (url, dropped) = crate::store::url::without_unread_secrets(url);
        if !dropped.is_empty() {
            tracing::warn!(parameters = ?dropped, "ignoring database URL parameters that are not supported");
        }
        let options = PgConnectOptions::from_str(&url)
            .map_err(|source| StoreError::Database {
                operation: "open",
                source,
            })?
            .application_name("cairn")
            // A host that stops mid-transaction (paused, partitioned) must not hold its row and
            // route locks for everyone: the server aborts its transaction, and whatever that
            // host tries next is fenced. Cairn's own transactions never wait on anything but
            // the database.
            .options([
                ("search_path", SCHEMA),
                (
                    "idle_in_transaction_session_timeout",
                    IDLE_IN_TRANSACTION_TIMEOUT,
                ),
            ]);
        let pool = PgPoolOptions::new()
            .max_connections(8)
            .acquire_timeout(Duration::from_secs(10))
            .connect_with(options.clone())
            .await
            .map_err(|e| map_err("open", e))?;
        // Soft writes commit without waiting for the WAL's flush (see `soft_connection`).
        let soft_options = options.clone().options([("synchronous_commit", "off")]);
        Ok(Self {
            pool,
            options,
            soft_options,
            points: KeptConnection::default(),
            soft: KeptConnection::default(),
            lease_ms: Arc::new(AtomicI64::new(DEFAULT_LEASE_MS)),
            registered: Arc::default(),
        })
    }

    /// The connection pool, for tests and tools that read the database directly.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// A connection for a persistence point's or a start's one statement: the one the store
    /// keeps for them ([`kept`](super::kept)), or one of the pool's while that one is busy or
    /// not connected.
    pub(super) async fn point_connection(&self) -> StoreResult<PointConnection> {
        self.points.acquire(&self.options, &self.pool).await
    }

    /// A connection for a soft write that is one statement (a claim, an acquire): one the store
    /// keeps for them, whose session commits without waiting for the WAL's flush (what
    /// [`begin_soft`](crate::store::common::Backend::begin_soft) does with three more round
    /// trips), or one of the pool's, which commits durably, while that one is busy or not
    /// connected.
    pub(super) async fn soft_connection(&self) -> StoreResult<PointConnection> {
        self.soft.acquire(&self.soft_options, &self.pool).await
    }

    pub(super) async fn write(&self) -> StoreResult<Tx> {
        self.pool.begin().await.map_err(|e| map_err("begin", e))
    }
}

pub(super) async fn commit(tx: Tx) -> StoreResult<()> {
    tx.commit().await.map_err(|e| map_err("commit", e))
}
