//! The CPU cost of one step of an instance, without a database: decode its state, run a
//! transition, encode the state, and build the persistence point the store will write.
//! `just microbench` (or `cargo bench -p cairn --bench transition`).

#![allow(clippy::unwrap_used)] // a benchmark may unwrap: a panic is a failed run

use std::collections::BTreeMap;

use cairn::bench::orchestrations::{registry, ChainState, ECHO_PORT};
use cairn::codec;
use cairn::host::instance::{LiveInstance, Waits};
use cairn::store::{InstanceRecord, InstanceStatus, MessageKind, Reason, StoredMessage};
use cairn::{Context, Event, Message};
use chrono::Utc;
use criterion::{black_box, criterion_group, criterion_main, Criterion};
use serde_json::json;
use uuid::Uuid;

/// A W1 instance that has sent its first request, as loaded from the database.
fn record(id: Uuid) -> InstanceRecord {
    let def = registry().latest("bench.chain").unwrap().clone();
    let state: cairn::registry::AnyState = Box::new(ChainState::Calling { done: 0, calls: 3 });
    let waits = Waits {
        requests: vec![("request-0".to_owned(), ECHO_PORT.to_owned())],
        ..Waits::default()
    };
    InstanceRecord {
        id,
        orchestration: "bench.chain".to_owned(),
        version: 1,
        status: InstanceStatus::Running,
        state: Some(def.encode_state(&state).unwrap()),
        engine_state: Some(codec::encode(&waits).unwrap()),
        epoch: 1,
        history_seq: 1,
        parent_id: None,
    }
}

/// The echo port's reply to the first request, as claimed from the database.
fn reply(id: Uuid) -> StoredMessage {
    StoredMessage {
        seq: 2,
        id: "request-0:reply".to_owned(),
        message_type: "bench.call.reply".to_owned(),
        kind: MessageKind::Reply,
        properties: BTreeMap::from([
            ("request_id".to_owned(), "request-0".to_owned()),
            ("port".to_owned(), ECHO_PORT.to_owned()),
        ]),
        body: json!({ "i": 0, "greeting": "hello from the echo port, a reply of about one hundred bytes" }),
        instance_id: id,
        subscription_id: None,
        published_at: Utc::now(),
        delivery_count: 1,
    }
}

fn transition_path(c: &mut Criterion) {
    let registry = registry();
    let def = registry.latest("bench.chain").unwrap().clone();
    let id = Uuid::new_v4();
    let rec = record(id);
    let bytes = rec.state.clone().unwrap();
    let msg = reply(id);
    let now = Utc::now();
    let has_port = |name: &str| name == ECHO_PORT;

    c.bench_function("decode_state", |b| {
        b.iter(|| def.decode_state(black_box(&bytes)).unwrap())
    });
    let event = Event::Reply {
        request_id: "request-0".to_owned(),
        port: ECHO_PORT.to_owned(),
        message: Message {
            id: msg.id.clone(),
            message_type: msg.message_type.clone(),
            properties: msg.properties.clone(),
            body: msg.body.clone(),
            published_at: msg.published_at,
        },
    };
    c.bench_function("run_transition", |b| {
        b.iter_batched(
            || (def.decode_state(&bytes).unwrap(), event.clone()),
            |(state, event)| {
                let mut ctx = Context::new(id, now);
                def.on_event(&mut ctx, state, event).unwrap()
            },
            criterion::BatchSize::SmallInput,
        )
    });
    let state = def.decode_state(&bytes).unwrap();
    c.bench_function("encode_state", |b| {
        b.iter(|| def.encode_state(black_box(&state)).unwrap())
    });
    // The whole step the host runs per event: load, deliver, build the point.
    c.bench_function("load_deliver_point", |b| {
        b.iter_batched(
            || (rec.clone(), msg.clone()),
            |(rec, msg)| {
                let mut instance = LiveInstance::load(rec, def.clone()).unwrap();
                instance.deliver_message(msg, &registry, &has_port, now);
                instance
                    .persistence_point(Reason::Send, "host-bench", now, now)
                    .unwrap()
            },
            criterion::BatchSize::SmallInput,
        )
    });
    // The same for an instance already in memory: deliver and build the point.
    c.bench_function("deliver_point_hot", |b| {
        b.iter_batched(
            || {
                (
                    LiveInstance::load(rec.clone(), def.clone()).unwrap(),
                    msg.clone(),
                )
            },
            |(mut instance, msg)| {
                instance.deliver_message(msg, &registry, &has_port, now);
                instance
                    .persistence_point(Reason::Send, "host-bench", now, now)
                    .unwrap()
            },
            criterion::BatchSize::SmallInput,
        )
    });
}

criterion_group!(benches, transition_path);
criterion_main!(benches);
