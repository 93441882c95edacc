//! The runtime's side ([`MessageBox`]) for SQLite: the shared forwarding
//! ([`common::message_box`](crate::store::common::message_box)) to [`routing`], [`claims`] and
//! [`outbox`], and the wake-up socket other processes' work arrives on ([`super::wake`]).

use std::sync::Arc;

use chrono::{DateTime, Utc};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::{claims, outbox, routing, SqliteStore};
use crate::store::*;

crate::store::common::message_box::message_box! {
    SqliteStore,
    async fn listen(&self, wake: Arc<Notify>, stop: CancellationToken) {
        self.wake.clone().listen(wake, stop).await
    }
}
