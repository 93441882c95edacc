//! The store's conformance suite: the `Store` contract (G1-G5), checked by calling the trait
//! directly, with no host, on each backend.
//!
//! Every test is an `async fn name(db: TestDb)` listed in its file's `backend_tests!`, so it runs
//! as `name::sqlite` and `name::postgres`. A new backend passes when every test here passes on
//! it: add it to `support::Backend` and to `backend_tests!`. A few tests, listed in
//! `many_host_tests!`, check what only a backend serving many hosts at once promises (taking over
//! a dead host's claims and leases while others run): they run on PostgreSQL; SQLite serves one
//! host per file and takes everything over at `Store::recover`. The files follow the guarantees:
//!
//! | file | what it checks |
//! |---|---|
//! | `publish.rs` | publish, route and dedupe (G1, G5) |
//! | `fencing.rs` | points, receives and eager starts fenced by the lease epoch (G4) |
//! | `claims.rs` | claims and locks: one claimer, given back on unlock or release (G3) |
//! | `group_commit.rs` | group commits, each point fenced and all-or-nothing; every write path ends as the plain transaction would |
//! | `outbox.rs` | sends after commit, claimed once, their replies (G2) |
//! | `timers.rs` | timers claimed when due, once |
//! | `write_paths.rs` | random points in random groups end as one transaction per point would (a property test) |
//! | `operators.rs` | operator verbs: control, dead letters |
//! | `subscribers.rs` | publish-subscribe: every subscriber whose filter a message passes, send port subscriptions, broken filters recorded |
//! | `late.rs` | late messages: a message for the key of an ended instance is its zombie, a later instance gets only what follows it |

#![allow(clippy::unwrap_used)] // tests may unwrap: a panic is a failed test

mod support;

#[path = "conformance/claims.rs"]
mod claims;
#[path = "conformance/fencing.rs"]
mod fencing;
#[path = "conformance/group_commit.rs"]
mod group_commit;
#[path = "conformance/late.rs"]
mod late;
#[path = "conformance/operators.rs"]
mod operators;
#[path = "conformance/outbox.rs"]
mod outbox;
#[path = "conformance/publish.rs"]
mod publish;
#[path = "conformance/schema.rs"]
mod schema;
#[path = "conformance/subscribers.rs"]
mod subscribers;
#[path = "conformance/timers.rs"]
mod timers;
#[path = "conformance/write_paths.rs"]
mod write_paths;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use cairn::store::*;
use cairn::Correlation;
use chrono::{DateTime, Utc};
use serde_json::json;
use support::TestDb;
use uuid::Uuid;

// Helpers shared by the files: instances, points and rows built by hand, as a host would.

/// An instance started, its start message consumed, and a point that subscribes it to
/// `paid` correlated on `order = round` (not yet committed).
async fn started_and_receiving(
    store: &Arc<dyn Store>,
    round: i32,
    now: DateTime<Utc>,
) -> (NewInstance, i64, PersistencePoint) {
    let inst = new_instance("order");
    store
        .start_instances(vec![inst.clone()], None, now)
        .await
        .expect("start");
    let msgs = store
        .claim_messages("host-a", now, 10)
        .await
        .expect("claim");
    let rec = store
        .acquire("host-a", &[inst.id], now, at(30))
        .await
        .expect("acquire");
    let mut p = point(inst.id, rec[0].epoch, "host-a", 1, now);
    p.consumed = msgs
        .iter()
        .filter(|m| m.instance_id == inst.id)
        .map(|m| m.seq)
        .collect();
    p.subscriptions = Some(vec![SubscriptionRow {
        id: Uuid::new_v4(),
        message_type: "paid".into(),
        correlation: Correlation::on("order", round),
        earlier: false,
    }]);
    (inst, rec[0].epoch, p)
}

/// A fixed time, `secs` seconds after an arbitrary origin.
fn at(secs: i64) -> DateTime<Utc> {
    DateTime::from_timestamp(1_800_000_000 + secs, 0).expect("valid time")
}

/// A dehydrating persistence point of instance `id` by `host` under `epoch`, writing its state
/// and history only.
fn point(
    id: Uuid,
    epoch: i64,
    host: &str,
    history_seq: i64,
    now: DateTime<Utc>,
) -> PersistencePoint {
    PersistencePoint {
        instance_id: id,
        epoch,
        host: host.to_owned(),
        reason: Reason::Dehydrate,
        detail: None,
        status: InstanceStatus::Dehydrated,
        resumable: true,
        failed: Vec::new(),
        state: Some(vec![1, 2, 3]),
        engine_state: Some(vec![4]),
        step: "Waiting".into(),
        waiting_for: "payment".into(),
        next_timer_at: None,
        last_error: None,
        output: None,
        history_seq,
        consumed: vec![],
        subscriptions: None,
        cancel_timers: vec![],
        set_timers: vec![],
        outbox: vec![],
        delivered: vec![],
        messages: vec![],
        children: vec![],
        release: false,
        at: now,
        outbox_lock_until: now + chrono::Duration::seconds(60),
        start: None,
    }
}

/// A new instance of `orchestration`, version 1.
fn new_instance(orchestration: &str) -> NewInstance {
    NewInstance {
        id: Uuid::new_v4(),
        orchestration: orchestration.into(),
        version: 1,
        parent: None,
        input: serde_json::json!({"n": 1}),
    }
}

/// A persistence point of instance `id` that sends one message (`send-<step>`), written by `host`
/// holding `epoch`.
fn send_point(
    id: Uuid,
    host: &str,
    epoch: i64,
    step: &str,
    history_seq: i64,
    at: chrono::DateTime<chrono::Utc>,
) -> cairn::store::PersistencePoint {
    cairn::store::PersistencePoint {
        instance_id: id,
        epoch,
        host: host.into(),
        reason: cairn::store::Reason::Send,
        detail: None,
        status: InstanceStatus::Running,
        resumable: true,
        failed: vec![],
        state: Some(vec![0x90]),
        engine_state: None,
        step: step.into(),
        waiting_for: String::new(),
        next_timer_at: None,
        last_error: None,
        output: None,
        history_seq,
        consumed: vec![],
        subscriptions: None,
        cancel_timers: vec![],
        set_timers: vec![],
        outbox: vec![cairn::store::OutboxRow {
            id: format!("send-{step}"),
            instance_id: id,
            port: "p".into(),
            message_type: "t".into(),
            body: json!({}),
            expects_reply: false,
            attempts: 0,
        }],
        delivered: vec![],
        messages: vec![],
        children: vec![],
        release: false,
        at,
        outbox_lock_until: at,
        start: None,
    }
}

/// One group commit of several points (G4): each point is fenced on its own, a fenced one writes
/// nothing while the others commit, and each point of an instance is fenced against the row its
/// earlier point in the group wrote.
/// A new `approval` instance, for tests that drive the store by hand.
fn approval(id: Uuid) -> NewInstance {
    NewInstance {
        id,
        orchestration: "approval".into(),
        version: 1,
        parent: None,
        input: json!({}),
    }
}

/// Starts `approval` instances `ids` and leases them all to `host-a`.
async fn started_and_held(
    db: &TestDb,
    ids: &[Uuid],
    now: chrono::DateTime<chrono::Utc>,
) -> Vec<cairn::store::InstanceRecord> {
    db.store
        .start_instances(ids.iter().copied().map(approval).collect(), None, now)
        .await
        .unwrap();
    let held = db
        .store
        .acquire("host-a", ids, now, now + chrono::Duration::seconds(30))
        .await
        .unwrap();
    assert_eq!(held.len(), ids.len());
    held
}

/// The row of instance `id`'s start message: `(locked_by, delivery_count, seq, status)`.
async fn start_message(db: &TestDb, id: Uuid) -> (Option<String>, i32, i64, String) {
    sqlx::query_as(
        "SELECT locked_by, delivery_count, seq, status FROM messages \
         WHERE kind = 'start' AND CAST(instance_id AS TEXT) = $1",
    )
    .bind(id.to_string())
    .fetch_one(&db.sql)
    .await
    .unwrap()
}
