//! A connection a store keeps outside the pool for writes of one statement: it keeps two, one
//! for persistence points and starts, one for claims and acquires (connected with
//! `synchronous_commit = off`: see `PostgresStore::soft_connection`). What follows says
//! "point" for either.
//!
//! A pool hands out its idle connections in turn, so each point would go to the next server
//! process and pay for its colder caches and, per connection, for preparing and planning the
//! statement anew. And a pooled connection costs a round trip each time it goes back: sqlx
//! checks it with a `Sync` before it is idle again (and, on `acquire`, once more), which on a
//! host's latency path is one more wake-up of the server per point on cores the server and the
//! host share. The kept connection is used directly, with no check: a point that fails on it
//! in any other way than the server refusing the statement, or that is dropped before it ends,
//! takes the connection with it, and the next point connects a new one.

use std::ops::{Deref, DerefMut};
use std::sync::Arc;

use sqlx::pool::PoolConnection;
use sqlx::postgres::{PgConnectOptions, PgConnection};
use sqlx::{ConnectOptions, Connection, PgPool, Postgres};
use tokio::sync::{Mutex, OwnedMutexGuard};

use super::map_err;
use crate::store::{StoreError, StoreResult};

/// The kept connection: none until the first point connects it, and again after one failed.
#[derive(Debug, Clone, Default)]
pub(super) struct KeptConnection(Arc<Mutex<Option<PgConnection>>>);

impl KeptConnection {
    /// The kept connection if it is connected and free, else one of `pool`'s. A point that
    /// finds it not connected starts connecting it, for the points after it.
    pub(super) async fn acquire(
        &self,
        options: &PgConnectOptions,
        pool: &PgPool,
    ) -> StoreResult<PointConnection> {
        if let Ok(mut kept) = self.0.clone().try_lock_owned() {
            if kept.is_some() {
                return Ok(PointConnection::Kept(Held { kept, clean: false }));
            }
            let options = options.clone();
            // The lock is held until connected, so that one point connects at a time.
            tokio::spawn(async move {
                match options.connect().await {
                    Ok(conn) => *kept = Some(conn),
                    Err(e) => tracing::debug!(error = %e, "connecting the kept point connection"),
                }
            });
        }
        Ok(PointConnection::Pooled(
            pool.acquire().await.map_err(|e| map_err("acquire", e))?,
        ))
    }

    /// The server process of the kept connection, if it is connected and free.
    #[cfg(test)]
    pub(super) async fn backend_pid(&self) -> Option<i32> {
        let mut kept = self.0.try_lock().ok()?;
        sqlx::query_scalar("SELECT pg_backend_pid()")
            .fetch_one(kept.as_mut()?)
            .await
            .ok()
    }

    /// Closes the kept connection, once the point using it (if any) is done.
    pub(super) async fn close(&self) {
        if let Some(conn) = self.0.lock().await.take() {
            let _ = conn.close().await;
        }
    }
}

/// A connection for one persistence point: the kept one, or one of the pool's.
pub(super) enum PointConnection {
    Kept(Held),
    Pooled(PoolConnection<Postgres>),
}

impl PointConnection {
    /// Says how the point's statement ended. The kept connection stays for the next point if
    /// the statement succeeded or the server refused it (the connection is as good as before);
    /// otherwise, and if this is never called (the point was dropped mid-statement), it is
    /// dropped when this is.
    pub(super) fn ended<T>(&mut self, result: &StoreResult<T>) {
        if let PointConnection::Kept(held) = self {
            // Refused by the server, but not a refusal that ends the session (that is
            // `Unavailable`, as is a lost connection); `Corrupt` is a failed check, a refusal.
            held.clean = matches!(
                result,
                Ok(_)
                    | Err(StoreError::Database {
                        source: sqlx::Error::Database(_),
                        ..
                    })
                    | Err(StoreError::Corrupt(_))
                    | Err(StoreError::NotRouted(_))
            );
        }
    }
}

/// The kept connection, held by one point.
pub(super) struct Held {
    kept: OwnedMutexGuard<Option<PgConnection>>,
    /// Whether the point's statement ended so that the connection can be used again.
    clean: bool,
}

impl Drop for Held {
    fn drop(&mut self) {
        if !self.clean {
            // Dropped mid-statement, or the connection failed: its state is unknown.
            self.kept.take();
        }
    }
}

impl Deref for PointConnection {
    type Target = PgConnection;

    fn deref(&self) -> &PgConnection {
        match self {
            PointConnection::Kept(held) => held.kept.as_ref().expect("held only when connected"),
            PointConnection::Pooled(conn) => conn,
        }
    }
}

impl DerefMut for PointConnection {
    fn deref_mut(&mut self) -> &mut PgConnection {
        match self {
            PointConnection::Kept(held) => held.kept.as_mut().expect("held only when connected"),
            PointConnection::Pooled(conn) => conn,
        }
    }
}
