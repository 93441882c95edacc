//! The runtime's side ([`MessageBox`]) for SQLite: the shared forwarding
//! ([`common::message_box`](crate::store::common::message_box)) to [`routing`], [`claims`] and
//! [`outbox`].

use chrono::{DateTime, Utc};
use uuid::Uuid;

use super::{claims, outbox, routing, SqliteStore};
use crate::store::*;

crate::store::common::message_box::message_box!(SqliteStore);
