//! [`LiveInstance`] as a state machine: an event in, a [`Delivery`] and a persistence point (or
//! a fault point) out, asserted on what the point holds. `Order`, defined here, confirms an
//! order, waits for its payment (correlated on the order) or for it to expire, has it shipped,
//! and completes when it is delivered; a `poke` message makes a transition fail or panic.
//! `Batch` sends inside an atomic scope.

use std::collections::BTreeMap;

use chrono::{DateTime, Duration, TimeZone, Utc};
use serde::{Deserialize, Serialize};
use serde_json::json;
use uuid::Uuid;

use super::{Delivery, FaultText, LiveInstance};
use crate::context::{Context, ScopeKind};
use crate::orchestration::{Correlation, Event, Fault, Next, Orchestration};
use crate::registry::Registry;
use crate::store::{
    InstanceRecord, InstanceStatus, MessageKind, NewInstance, PersistencePoint, Reason,
    StoredMessage, FIRST_EPOCH,
};

struct Order;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
enum State {
    AwaitingPayment { order: String },
    Shipping { order: String },
}

impl Orchestration for Order {
    const NAME: &'static str = "order";
    const VERSION: u32 = 1;
    const ACTIVATED_BY: &'static [&'static str] = &["order.placed"];
    type Input = serde_json::Value;
    type State = State;
    type Output = String;

    fn start(ctx: &mut Context, input: serde_json::Value) -> Result<Next<Self>, Fault> {
        let order = input["order"].as_str().unwrap_or_default().to_owned();
        ctx.send("mail", "order.confirm", &json!({ "order": order }))?;
        ctx.receive("payment.received", Correlation::on("order", &order));
        ctx.receive("poke", Correlation::none());
        ctx.delay("expire", Duration::hours(1));
        Ok(Next::Continue(State::AwaitingPayment { order }))
    }

    fn on_event(ctx: &mut Context, state: State, event: Event) -> Result<Next<Self>, Fault> {
        match (state, event) {
            (_, Event::Message(m)) if m.message_type == "poke" => match m.body["do"].as_str() {
                Some("panic") => panic!("poked too hard"),
                _ => Err("the poke failed".into()),
            },
            (State::AwaitingPayment { order }, Event::Message(m))
                if m.message_type == "payment.received" =>
            {
                ctx.send("warehouse", "order.ship", &json!({ "order": order }))?;
                ctx.receive("order.delivered", Correlation::on("order", &order));
                Ok(Next::Continue(State::Shipping { order }))
            }
            (State::AwaitingPayment { order }, Event::Timer { name }) if name == "expire" => {
                ctx.send("mail", "order.expired", &json!({ "order": order }))?;
                Ok(Next::Fail(format!("order {order} expired")))
            }
            (State::Shipping { order }, Event::Message(m))
                if m.message_type == "order.delivered" =>
            {
                Ok(Next::Complete(format!("order {order} delivered")))
            }
            (_, event) => Err(format!("unexpected {}", event.label()).into()),
        }
    }
}

const HOST: &str = "host-test";

fn now() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2024, 5, 1, 12, 0, 0)
        .single()
        .expect("a valid time")
}

fn registry() -> Registry {
    Registry::new().register::<Order>()
}

fn ports(name: &str) -> bool {
    matches!(name, "mail" | "warehouse")
}

fn message(
    seq: i64,
    kind: MessageKind,
    message_type: &str,
    body: serde_json::Value,
) -> StoredMessage {
    let properties: BTreeMap<String, String> = body
        .as_object()
        .map(|o| {
            o.iter()
                .filter_map(|(k, v)| v.as_str().map(|s| (k.clone(), s.to_owned())))
                .collect()
        })
        .unwrap_or_default();
    StoredMessage {
        seq,
        id: format!("m{seq}"),
        message_type: message_type.to_owned(),
        kind,
        properties,
        body,
        instance_id: Uuid::nil(),
        subscription_id: None,
        published_at: now(),
        delivery_count: 1,
    }
}

fn published(seq: i64, message_type: &str, body: serde_json::Value) -> StoredMessage {
    message(seq, MessageKind::Published, message_type, body)
}

/// The record of a new instance of `O`, as a host loads one claimed with its start message.
fn record<O: Orchestration>(parent: Option<Uuid>) -> InstanceRecord {
    InstanceRecord::started(&NewInstance {
        id: Uuid::now_v7(),
        orchestration: O::NAME.to_owned(),
        version: O::VERSION,
        parent,
        input: json!({}),
    })
}

/// A new instance of `Order`, loaded as a host loads one claimed with its start message.
fn new_order(parent: Option<Uuid>) -> LiveInstance {
    let registry = registry();
    let def = registry
        .get(Order::NAME, Order::VERSION)
        .cloned()
        .expect("registered");
    let record = record::<Order>(parent);
    LiveInstance::load(record, def).expect("a new instance loads")
}

fn deliver(instance: &mut LiveInstance, msg: StoredMessage) -> Delivery {
    instance.deliver_message(msg, &registry(), &ports, now())
}

fn point(instance: &mut LiveInstance, reason: Reason) -> PersistencePoint {
    instance
        .persistence_point(reason, HOST, now(), now() + Duration::minutes(1))
        .expect("the state encodes")
}

/// An order started by message 1, at its first persistence point.
fn started_order() -> (LiveInstance, PersistencePoint) {
    let mut instance = new_order(None);
    let start = message(
        1,
        MessageKind::Start,
        "order.placed",
        json!({ "order": "A1" }),
    );
    assert_eq!(
        deliver(&mut instance, start),
        Delivery::Ran(Some(Reason::Send))
    );
    let first = point(&mut instance, Reason::Send);
    (instance, first)
}

fn outbox(point: &PersistencePoint) -> Vec<(&str, &str, &serde_json::Value)> {
    point
        .outbox
        .iter()
        .map(|r| (r.port.as_str(), r.message_type.as_str(), &r.body))
        .collect()
}

fn subscriptions(point: &PersistencePoint) -> Vec<(String, String)> {
    point
        .subscriptions
        .as_ref()
        .expect("the point writes the subscriptions")
        .iter()
        .map(|s| (s.message_type.clone(), s.correlation.canonical()))
        .collect()
}

#[test]
fn a_started_instance_makes_its_first_point_with_its_send_waits_and_timer() {
    let (instance, first) = started_order();

    assert_eq!(first.instance_id, instance.id);
    assert_eq!(first.epoch, FIRST_EPOCH);
    assert_eq!(first.host, HOST);
    assert_eq!(first.reason, Reason::Send);
    assert_eq!(first.status, InstanceStatus::Running);
    assert_eq!(first.step, "AwaitingPayment");
    assert_eq!(first.history_seq, 1);
    assert_eq!(first.consumed, vec![1]);
    assert!(!first.release, "a running instance keeps its lease");
    assert!(first.state.is_some());
    assert_eq!(
        outbox(&first),
        vec![("mail", "order.confirm", &json!({ "order": "A1" }))]
    );
    assert_eq!(first.outbox[0].instance_id, instance.id);
    assert!(!first.outbox[0].expects_reply);
    assert_eq!(
        subscriptions(&first),
        vec![
            (
                "payment.received".to_owned(),
                Correlation::on("order", "A1").canonical()
            ),
            ("poke".to_owned(), String::new()),
        ]
    );
    let expires = now() + Duration::hours(1);
    assert_eq!(first.set_timers, vec![("expire".to_owned(), expires)]);
    assert!(first.cancel_timers.is_empty());
    assert_eq!(first.next_timer_at, Some(expires));
    assert_eq!(
        first.waiting_for,
        "message payment.received {order=A1}; message poke; timer expire at 2024-05-01T13:00:00Z"
    );
    assert!(
        !instance.is_dirty(),
        "the point resets the instance to itself"
    );
}

#[test]
fn a_received_message_produces_a_send_and_a_point_that_replaces_the_waits() {
    let (mut instance, _) = started_order();
    let paid = published(2, "payment.received", json!({ "order": "A1" }));

    assert_eq!(
        deliver(&mut instance, paid),
        Delivery::Ran(Some(Reason::Send))
    );
    assert!(instance.is_dirty());
    let next = point(&mut instance, Reason::Send);

    assert_eq!(next.consumed, vec![2]);
    assert_eq!(next.step, "Shipping");
    assert_eq!(next.history_seq, 2);
    assert_eq!(
        outbox(&next),
        vec![("warehouse", "order.ship", &json!({ "order": "A1" }))]
    );
    assert_eq!(
        subscriptions(&next),
        vec![(
            "order.delivered".to_owned(),
            Correlation::on("order", "A1").canonical()
        )]
    );
    assert_eq!(next.cancel_timers, vec!["expire".to_owned()]);
    assert!(next.set_timers.is_empty());
    assert_eq!(next.next_timer_at, None);
}

#[test]
fn a_message_whose_correlation_does_not_match_is_held_and_changes_nothing() {
    let (mut instance, _) = started_order();
    let other_order = published(2, "payment.received", json!({ "order": "B2" }));

    assert_eq!(deliver(&mut instance, other_order), Delivery::Held);
    assert!(!instance.is_dirty());
    let held = instance.take_held();
    assert_eq!(held.iter().map(|m| m.seq).collect::<Vec<_>>(), vec![2]);
    assert_eq!(instance.waits().receives.len(), 2, "the waits stand");

    // Delivered again, as a host does after a later transition, it is held again.
    let again = held.into_iter().next().expect("one held message");
    assert_eq!(deliver(&mut instance, again), Delivery::Held);
}

#[test]
fn a_reply_to_no_request_waited_for_is_consumed_without_a_transition() {
    let (mut instance, _) = started_order();
    let stray = message(
        2,
        MessageKind::Reply,
        "order.confirm.reply",
        json!({ "request_id": "r-unknown", "port": "mail" }),
    );

    assert_eq!(deliver(&mut instance, stray), Delivery::Ran(None));
    assert!(instance.is_dirty());
    let next = point(&mut instance, Reason::Dehydrate);
    assert_eq!(next.consumed, vec![2]);
    assert_eq!(next.step, "AwaitingPayment", "no transition ran");
    assert!(next.outbox.is_empty());
    assert_eq!(next.status, InstanceStatus::Dehydrated);
    assert!(next.release);
}

#[test]
fn a_timer_firing_runs_its_transition_and_writes_the_final_point() {
    let (mut instance, _) = started_order();

    let fired = instance.deliver_timer("expire", &registry(), &ports, now());
    assert_eq!(fired, Delivery::Ran(Some(Reason::Complete)));
    assert!(instance.has_ended());
    let last = point(&mut instance, Reason::Complete);

    assert_eq!(last.status, InstanceStatus::Failed);
    assert_eq!(last.last_error.as_deref(), Some("order A1 expired"));
    assert_eq!(last.step, "failed");
    assert!(last.release);
    assert!(last.consumed.is_empty(), "a timer is no message");
    assert_eq!(
        outbox(&last),
        vec![("mail", "order.expired", &json!({ "order": "A1" }))]
    );
    assert_eq!(last.cancel_timers, vec!["expire".to_owned()]);
    assert!(
        subscriptions(&last).is_empty(),
        "an ended instance waits for nothing"
    );
    assert_eq!(last.waiting_for, "");
}

#[test]
fn a_timer_no_longer_waited_for_runs_nothing_and_is_cancelled() {
    let (mut instance, _) = started_order();

    let fired = instance.deliver_timer("reminder", &registry(), &ports, now());
    assert_eq!(fired, Delivery::Ran(None));
    let next = point(&mut instance, Reason::Dehydrate);
    assert_eq!(next.step, "AwaitingPayment");
    assert_eq!(next.cancel_timers, vec!["reminder".to_owned()]);
    assert!(next.outbox.is_empty());
}

#[test]
fn completion_writes_the_final_point_with_the_output() {
    let (mut instance, _) = started_order();
    deliver(
        &mut instance,
        published(2, "payment.received", json!({ "order": "A1" })),
    );
    point(&mut instance, Reason::Send);

    let delivered = published(3, "order.delivered", json!({ "order": "A1" }));
    assert_eq!(
        deliver(&mut instance, delivered),
        Delivery::Ran(Some(Reason::Complete))
    );
    let last = point(&mut instance, Reason::Complete);

    assert_eq!(last.status, InstanceStatus::Completed);
    assert_eq!(last.output, Some(json!("order A1 delivered")));
    assert_eq!(last.last_error, None);
    assert_eq!(last.step, "completed");
    assert_eq!(last.consumed, vec![3]);
    assert_eq!(last.history_seq, 3);
    assert!(last.release);
    assert!(last.messages.is_empty(), "no parent to tell");
    assert!(subscriptions(&last).is_empty());
}

#[test]
fn a_child_that_completes_tells_its_parent_in_its_final_point() {
    let parent = Uuid::now_v7();
    let mut instance = new_order(Some(parent));
    let start = message(
        1,
        MessageKind::Start,
        "order.placed",
        json!({ "order": "C3" }),
    );
    deliver(&mut instance, start);
    point(&mut instance, Reason::Send);
    deliver(
        &mut instance,
        published(2, "payment.received", json!({ "order": "C3" })),
    );
    point(&mut instance, Reason::Send);
    deliver(
        &mut instance,
        published(3, "order.delivered", json!({ "order": "C3" })),
    );

    let last = point(&mut instance, Reason::Complete);
    assert_eq!(last.messages.len(), 1);
    let told = &last.messages[0];
    assert_eq!(told.id, format!("{}:ended", instance.id));
    assert_eq!(told.message_type, "child.completed");
    assert_eq!(told.kind, MessageKind::ChildCompleted);
    assert_eq!(told.target, Some(parent));
    assert_eq!(
        told.body,
        json!({ "child": instance.id, "output": "order C3 delivered" })
    );
}

#[test]
fn a_failing_transition_suspends_the_instance_at_its_last_point_with_its_error() {
    let (mut instance, first) = started_order();
    let poke = published(2, "poke", json!({ "do": "fail" }));

    let delivery = deliver(&mut instance, poke);
    let Delivery::Faulted(text) = delivery else {
        panic!("expected a fault, got {delivery:?}");
    };
    assert_eq!(
        text,
        FaultText("transition failed: the poke failed".to_owned())
    );
    let suspend = instance.fault_point(&text, HOST, now());

    assert_eq!(suspend.reason, Reason::Suspend);
    assert_eq!(suspend.status, InstanceStatus::Suspended);
    assert_eq!(suspend.last_error, Some(text.0.clone()));
    assert!(suspend.resumable);
    assert!(suspend.release);
    assert_eq!(
        suspend.failed,
        vec![2],
        "the message keeps its delivery count"
    );
    assert!(suspend.consumed.is_empty(), "delivered again on resume");
    assert_eq!(suspend.state, None, "the stored state stays as it was");
    assert_eq!(suspend.engine_state, None);
    assert_eq!(suspend.subscriptions, None);
    assert_eq!(suspend.step, first.step);
    assert_eq!(suspend.waiting_for, first.waiting_for);
    assert_eq!(suspend.next_timer_at, first.next_timer_at);
    assert_eq!(suspend.history_seq, first.history_seq + 1);
}

#[test]
fn a_transition_that_panics_on_a_message_gives_it_back_to_be_delivered_again() {
    let (mut instance, _) = started_order();
    let poke = published(2, "poke", json!({ "do": "panic" }));

    let delivery = deliver(&mut instance, poke);
    assert_eq!(
        delivery,
        Delivery::Panicked {
            error: FaultText("transition panicked: poked too hard".to_owned()),
            seq: 2,
        }
    );
}

#[test]
fn a_send_to_a_port_the_host_lacks_faults_the_transition() {
    let mut instance = new_order(None);
    let start = message(
        1,
        MessageKind::Start,
        "order.placed",
        json!({ "order": "D4" }),
    );

    let delivery = instance.deliver_message(start, &registry(), &|_| false, now());
    assert_eq!(
        delivery,
        Delivery::Faulted(FaultText(
            "send port \"mail\" is not configured in this host; add it to the host's ports and resume"
                .to_owned()
        ))
    );
    let suspend = instance.fault_point(&FaultText("x".to_owned()), HOST, now());
    assert_eq!(suspend.failed, vec![1]);
    assert_eq!(suspend.step, "created", "it never reached a point");
}

#[test]
fn a_state_this_build_cannot_read_fails_the_load_with_a_reason() {
    let registry = registry();
    let def = registry
        .get(Order::NAME, Order::VERSION)
        .cloned()
        .expect("registered");
    let mut record = record::<Order>(None);
    record.state = Some(vec![0xc1]);

    let fault = LiveInstance::load(record, def).expect_err("the state does not decode");
    // It names the commands that work.
    for command in [
        "cairn upgrade order --to NEWER --from 1",
        "cairn resume ",
        "cairn terminate ",
    ] {
        assert!(fault.error.0.contains(command), "{}", fault.error.0);
    }
}

/// Opens an atomic scope on `go`, sending inside it; `done` ends the scope, `boom` fails
/// inside it.
struct Batch;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
enum Step {
    Idle,
    InScope { sent: u32 },
}

impl Orchestration for Batch {
    const NAME: &'static str = "batch";
    const VERSION: u32 = 1;
    type Input = serde_json::Value;
    type State = Step;
    type Output = ();

    fn start(ctx: &mut Context, _input: serde_json::Value) -> Result<Next<Self>, Fault> {
        ctx.receive("go", Correlation::none());
        Ok(Next::Continue(Step::Idle))
    }

    fn on_event(ctx: &mut Context, state: Step, event: Event) -> Result<Next<Self>, Fault> {
        let m = event.message()?;
        match (state, m.message_type.as_str()) {
            (Step::Idle, "go") => {
                ctx.begin_scope("pay", ScopeKind::Atomic);
                if m.body["ask"] == json!(true) {
                    ctx.request("mail", "batch.ask", &json!({}))?;
                } else {
                    ctx.send("mail", "batch.paid", &json!({}))?;
                }
                ctx.receive("done", Correlation::none());
                ctx.receive("boom", Correlation::none());
                Ok(Next::Continue(Step::InScope { sent: 1 }))
            }
            (Step::InScope { .. }, "done") => {
                ctx.end_scope_with(&json!({ "refund": 1 }))?;
                Ok(Next::Continue(Step::Idle))
            }
            _ => Err("boom".into()),
        }
    }
}

/// A `Batch` at its first point, waiting for `go`.
fn started_batch() -> (LiveInstance, Registry) {
    let registry = Registry::new().register::<Batch>();
    let def = registry
        .get(Batch::NAME, Batch::VERSION)
        .cloned()
        .expect("registered");
    let record = record::<Batch>(None);
    let mut instance = LiveInstance::load(record, def).expect("a new instance loads");
    let start = message(1, MessageKind::Start, "batch.started", json!({}));
    let started = instance.deliver_message(start, &registry, &ports, now());
    assert_eq!(
        started,
        Delivery::Ran(None),
        "a start with no effect makes no point"
    );
    point(&mut instance, Reason::Start);
    (instance, registry)
}

#[test]
fn sends_inside_an_atomic_scope_wait_for_its_end_and_commit_with_it() {
    let (mut instance, registry) = started_batch();

    let go = instance.deliver_message(published(2, "go", json!({})), &registry, &ports, now());
    assert_eq!(go, Delivery::Ran(None), "no point inside an atomic scope");
    assert!(instance.in_atomic_scope());

    let done = published(3, "done", json!({}));
    let done = instance.deliver_message(done, &registry, &ports, now());
    assert_eq!(done, Delivery::Ran(Some(Reason::ScopeEnd)));
    assert!(!instance.in_atomic_scope());
    let end = point(&mut instance, Reason::ScopeEnd);
    assert_eq!(end.consumed, vec![2, 3]);
    assert_eq!(outbox(&end), vec![("mail", "batch.paid", &json!({}))]);
    assert_eq!(end.detail.as_deref(), Some("atomic scope pay committed"));
    assert_eq!(end.step, "Idle");
}

#[test]
fn a_fault_inside_an_atomic_scope_rolls_it_back_and_suspends_the_instance() {
    let (mut instance, registry) = started_batch();
    let go = instance.deliver_message(published(2, "go", json!({})), &registry, &ports, now());
    assert_eq!(go, Delivery::Ran(None));

    let boom = published(3, "boom", json!({}));
    let delivery = instance.deliver_message(boom, &registry, &ports, now());
    let Delivery::Faulted(text) = delivery else {
        panic!("expected a fault, got {delivery:?}");
    };
    assert_eq!(
        text.0,
        "atomic scope pay rolled back: boom; its handler ran; transition failed: boom"
    );
    assert!(!instance.in_atomic_scope());
    let suspend = instance.fault_point(&text, HOST, now());
    assert_eq!(suspend.last_error.as_deref(), Some(text.0.as_str()));
    assert_eq!(suspend.failed, vec![3]);
    assert!(suspend.outbox.is_empty(), "the scope's send is dropped");
    assert_eq!(suspend.waiting_for, "message go");
}

#[test]
fn a_request_inside_an_atomic_scope_faults_the_transition() {
    let (mut instance, registry) = started_batch();
    let ask = published(2, "go", json!({ "ask": true }));

    let delivery = instance.deliver_message(ask, &registry, &ports, now());
    assert_eq!(
        delivery,
        Delivery::Faulted(FaultText(
            "request to port \"mail\" inside an atomic scope: its reply could never arrive \
             before the scope commits; send one-way, or use a long-running scope"
                .to_owned()
        ))
    );
    assert_eq!(
        instance
            .fault_point(&FaultText(String::new()), HOST, now())
            .failed,
        vec![2]
    );
}
