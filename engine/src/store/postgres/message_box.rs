//! The runtime's side ([`MessageBox`]) for PostgreSQL: the shared forwarding
//! ([`common::message_box`](crate::store::common::message_box)) to [`routing`], [`claims`] and
//! [`outbox`], and [`listen`] for other hosts' work.

use std::sync::Arc;

use chrono::{DateTime, Utc};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::{claims, listen, outbox, routing, PostgresStore};
use crate::store::*;

crate::store::common::message_box::message_box! {
    PostgresStore,
    async fn listen(&self, wake: Arc<Notify>, stop: CancellationToken) {
        listen::listen(self, wake, stop).await
    }
}
