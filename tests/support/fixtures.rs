//! Test-only orchestrations and a host that can be crashed.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cairn::host::receive::ReceiveLocation;
use cairn::store::faulty::{FaultPlan, FaultyStore};
use cairn::store::Store;
use cairn::{
    Call, Called, Client, Context, Correlation, Event, Fault, Host, HostConfig, HostStats, Next,
    OnFault, Orchestration, OutboundMessage, PortError, Ports, Registry, ScopeFault, ScopeKind,
    UnexpectedEvent,
};
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio_util::sync::CancellationToken;

/// Collects `item` messages for a key without a persistence point (only memory changes), then on
/// `collect.done` sends everything it collected to the `log` port and completes.
pub struct Collector;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum CollectorState {
    Collecting { key: String, items: Vec<i64> },
}

impl Orchestration for Collector {
    const NAME: &'static str = "collector";
    const VERSION: u32 = 1;
    const ACTIVATED_BY: &'static [&'static str] = &["collect.start"];
    type Input = serde_json::Value;
    type State = CollectorState;
    type Output = Vec<i64>;

    fn start(ctx: &mut Context, input: serde_json::Value) -> Result<Next<Self>, Fault> {
        let key = input["key"].as_str().unwrap_or_default().to_owned();
        ctx.send("log", "collect.started", &key)?;
        listen(ctx, &key);
        Ok(Next::Continue(CollectorState::Collecting {
            key,
            items: Vec::new(),
        }))
    }

    fn on_event(
        ctx: &mut Context,
        state: CollectorState,
        event: Event,
    ) -> Result<Next<Self>, Fault> {
        let CollectorState::Collecting { key, mut items } = state;
        let message = event.message()?;
        match message.message_type.as_str() {
            "item" => {
                items.push(message.body["n"].as_i64().ok_or("item without n")?);
                *ITEMS_SEEN.lock().unwrap().entry(key.clone()).or_default() += 1;
                listen(ctx, &key);
                Ok(Next::Continue(CollectorState::Collecting { key, items }))
            }
            "collect.done" => {
                ctx.send("log", "collect.items", &items)?;
                Ok(Next::Complete(items))
            }
            _ => Err(UnexpectedEvent(event.label()).into()),
        }
    }
}

fn listen(ctx: &mut Context, key: &str) {
    ctx.receive("item", Correlation::on("key", key));
    ctx.receive("collect.done", Correlation::on("key", key));
}

/// Panics on a `boom` message; completes on `fine`. Started with a key that begins with
/// `panic-at-start`, its first transition panics.
pub struct Panicker;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum PanickerState {
    Waiting { key: String },
}

impl Orchestration for Panicker {
    const NAME: &'static str = "panicker";
    const VERSION: u32 = 1;
    type Input = String;
    type State = PanickerState;
    type Output = ();

    fn start(ctx: &mut Context, key: String) -> Result<Next<Self>, Fault> {
        if key.starts_with("panic-at-start") {
            *PANICS.lock().unwrap().entry(key).or_default() += 1;
            panic!("this first transition always panics");
        }
        ctx.receive("boom", Correlation::on("key", &key));
        ctx.receive("fine", Correlation::on("key", &key));
        Ok(Next::Continue(PanickerState::Waiting { key }))
    }

    fn on_event(
        _ctx: &mut Context,
        _state: PanickerState,
        event: Event,
    ) -> Result<Next<Self>, Fault> {
        if event.message()?.message_type == "boom" {
            let PanickerState::Waiting { key } = _state;
            *PANICS.lock().unwrap().entry(key).or_default() += 1;
            panic!("boom: this transition always panics");
        }
        Ok(Next::Complete(()))
    }
}

/// How many `item` transitions the Collector of `key` ran (in memory: they make no point).
pub fn items_seen(key: &str) -> usize {
    ITEMS_SEEN.lock().unwrap().get(key).copied().unwrap_or(0)
}

static ITEMS_SEEN: Mutex<BTreeMap<String, usize>> = Mutex::new(BTreeMap::new());

/// How many times the Panicker panicked (on `boom`, or at its start), by key.
pub fn panics(key: &str) -> usize {
    PANICS.lock().unwrap().get(key).copied().unwrap_or(0)
}

static PANICS: Mutex<BTreeMap<String, usize>> = Mutex::new(BTreeMap::new());

/// Opens an atomic scope on `pair.begin` and sends `pair.first` inside it; on `pair.go` sends
/// `pair.second` and ends the scope (both commit together); on `pair.fail` the transition fails,
/// the scope rolls back, and its handler sends `pair.rolled-back`.
pub struct AtomicPair;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum PairState {
    Idle { key: String },
    InScope { key: String },
}

#[derive(Debug, thiserror::Error)]
#[error("pair {0} failed on purpose")]
pub struct PairFailed(pub String);

impl Orchestration for AtomicPair {
    const NAME: &'static str = "atomic-pair";
    const VERSION: u32 = 1;
    type Input = String;
    type State = PairState;
    type Output = String;

    fn start(ctx: &mut Context, key: String) -> Result<Next<Self>, Fault> {
        ctx.receive("pair.begin", Correlation::on("key", &key));
        Ok(Next::Continue(PairState::Idle { key }))
    }

    fn on_event(ctx: &mut Context, state: PairState, event: Event) -> Result<Next<Self>, Fault> {
        let ty = event.message()?.message_type.clone();
        match (state, ty.as_str()) {
            (PairState::Idle { key }, "pair.begin") => {
                ctx.begin_scope("pair", ScopeKind::Atomic);
                ctx.send("log", "pair.first", &key)?;
                ctx.receive("pair.go", Correlation::on("key", &key));
                ctx.receive("pair.fail", Correlation::on("key", &key));
                Ok(Next::Continue(PairState::InScope { key }))
            }
            (PairState::InScope { key }, "pair.go") => {
                ctx.send("log", "pair.second", &key)?;
                ctx.end_scope();
                Ok(Next::Complete("committed".into()))
            }
            (PairState::InScope { key }, "pair.fail") => Err(Box::new(PairFailed(key))),
            (_, other) => Err(UnexpectedEvent(other.to_owned()).into()),
        }
    }

    fn on_fault(
        ctx: &mut Context,
        state: PairState,
        fault: ScopeFault,
    ) -> Result<Next<Self>, Fault> {
        let PairState::Idle { key } = state else {
            return Err("the atomic scope did not roll back to where it began".into());
        };
        let failed = fault
            .downcast_ref::<PairFailed>()
            .ok_or("not a PairFailed")?;
        ctx.send("log", "pair.rolled-back", &json!({ "key": key, "scope": fault.scope, "atomic": fault.atomic, "error": failed.to_string() }))?;
        Ok(Next::Complete("rolled back".into()))
    }
}

/// `fixable` version 1 as first deployed: fails on `fixable.go` (a bug).
pub struct FixableBuggy;
/// `fixable` version 1 after the fix: completes with the message's `n`.
pub struct FixableFixed;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum FixableState {
    Waiting { key: String },
}

fn fixable_start(ctx: &mut Context, key: String) -> FixableState {
    ctx.receive("fixable.go", Correlation::on("key", &key));
    FixableState::Waiting { key }
}

impl Orchestration for FixableBuggy {
    const NAME: &'static str = "fixable";
    const VERSION: u32 = 1;
    type Input = String;
    type State = FixableState;
    type Output = i64;
    fn start(ctx: &mut Context, key: String) -> Result<Next<Self>, Fault> {
        Ok(Next::Continue(fixable_start(ctx, key)))
    }
    fn on_event(_: &mut Context, _: FixableState, _: Event) -> Result<Next<Self>, Fault> {
        Err("bug 17: n is read from the wrong field".into())
    }
}

impl Orchestration for FixableFixed {
    const NAME: &'static str = "fixable";
    const VERSION: u32 = 1;
    type Input = String;
    type State = FixableState;
    type Output = i64;
    fn start(ctx: &mut Context, key: String) -> Result<Next<Self>, Fault> {
        Ok(Next::Continue(fixable_start(ctx, key)))
    }
    fn on_event(_: &mut Context, _: FixableState, event: Event) -> Result<Next<Self>, Fault> {
        Ok(Next::Complete(
            event.message()?.body["n"].as_i64().ok_or("no n")?,
        ))
    }
}

/// Ends as `failed` on any fault (`ON_UNHANDLED_FAULT = Fail`): fails on every message.
pub struct FailFast;

impl Orchestration for FailFast {
    const NAME: &'static str = "fail-fast";
    const VERSION: u32 = 1;
    const ON_UNHANDLED_FAULT: OnFault = OnFault::Fail;
    type Input = String;
    type State = FixableState;
    type Output = ();
    fn start(ctx: &mut Context, key: String) -> Result<Next<Self>, Fault> {
        ctx.receive("fail-fast.go", Correlation::on("key", &key));
        Ok(Next::Continue(FixableState::Waiting { key }))
    }
    fn on_event(_: &mut Context, _: FixableState, _: Event) -> Result<Next<Self>, Fault> {
        Err("the data is bad".into())
    }
}

/// A sequential convoy: every `line` with the same `order` goes to one instance, in order; it
/// completes after `CONVOY_BATCH` lines, and the next line of that order starts a new instance.
pub struct LineConvoy;

/// Lines per `LineConvoy` instance.
pub const CONVOY_BATCH: usize = 25;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum LineState {
    Collecting { order: String, seen: Vec<i64> },
}

impl LineConvoy {
    fn take(ctx: &mut Context, order: String, mut seen: Vec<i64>, n: i64) -> Next<Self> {
        seen.push(n);
        if seen.len() == CONVOY_BATCH {
            return Next::Complete(seen);
        }
        ctx.receive("line", Correlation::on("order", &order));
        Next::Continue(LineState::Collecting { order, seen })
    }
}

impl Orchestration for LineConvoy {
    const NAME: &'static str = "line-convoy";
    const VERSION: u32 = 1;
    const ACTIVATED_BY: &'static [&'static str] = &["line"];
    const CONVOY: &'static [&'static str] = &["order"];
    type Input = serde_json::Value;
    type State = LineState;
    type Output = Vec<i64>;

    fn start(ctx: &mut Context, line: serde_json::Value) -> Result<Next<Self>, Fault> {
        let order = line["order"]
            .as_str()
            .ok_or("line without order")?
            .to_owned();
        let n = line["n"].as_i64().ok_or("line without n")?;
        Ok(Self::take(ctx, order, Vec::new(), n))
    }

    fn on_event(ctx: &mut Context, state: LineState, event: Event) -> Result<Next<Self>, Fault> {
        let LineState::Collecting { order, seen } = state;
        let n = event.message()?.body["n"]
            .as_i64()
            .ok_or("line without n")?;
        Ok(Self::take(ctx, order, seen, n))
    }
}

/// A parallel convoy: `doc.a` and `doc.b` of one `case`, in either order; whichever comes first
/// starts the instance, which completes with both.
pub struct DocPair;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum DocPairState {
    Waiting { case: String, first: String },
}

impl Orchestration for DocPair {
    const NAME: &'static str = "doc-pair";
    const VERSION: u32 = 1;
    const ACTIVATED_BY: &'static [&'static str] = &["doc.a", "doc.b"];
    const CONVOY: &'static [&'static str] = &["case"];
    type Input = serde_json::Value;
    type State = DocPairState;
    type Output = Vec<String>;

    fn start(ctx: &mut Context, doc: serde_json::Value) -> Result<Next<Self>, Fault> {
        let case = doc["case"].as_str().ok_or("doc without case")?.to_owned();
        let first = doc["kind"].as_str().ok_or("doc without kind")?.to_owned();
        let other = if first == "a" { "doc.b" } else { "doc.a" };
        ctx.cancel_waits();
        ctx.receive(other, Correlation::on("case", &case));
        Ok(Next::Continue(DocPairState::Waiting { case, first }))
    }

    fn on_event(_: &mut Context, state: DocPairState, event: Event) -> Result<Next<Self>, Fault> {
        let DocPairState::Waiting { first, .. } = state;
        let second = event.message()?.body["kind"]
            .as_str()
            .ok_or("doc without kind")?
            .to_owned();
        Ok(Next::Complete(vec![first, second]))
    }
}

/// Completes at once with what started it ([`Context::started_by`]) as its output: activated by
/// `probe.activate`, or started by a client.
pub struct StartProbe;

impl Orchestration for StartProbe {
    const NAME: &'static str = "start-probe";
    const VERSION: u32 = 1;
    const ACTIVATED_BY: &'static [&'static str] = &["probe.activate"];
    type Input = serde_json::Value;
    type State = ();
    type Output = serde_json::Value;
    fn start(ctx: &mut Context, input: serde_json::Value) -> Result<Next<Self>, Fault> {
        let started_by = ctx
            .started_by()
            .ok_or("a start transition without started_by")?;
        Ok(Next::Complete(
            json!({ "input": input, "started_by": serde_json::to_value(started_by)? }),
        ))
    }
    fn on_event(_: &mut Context, _: (), event: Event) -> Result<Next<Self>, Fault> {
        Err(UnexpectedEvent(event.label()).into())
    }
}

/// The purchase order of docs/messaging.md#late-messages: activated by `po.submitted`
/// (`{po_id, escalate_ms, earlier}`), it waits for a `po.ack` of its `po_id` (with
/// `receive_earlier` when `earlier`), completing with the ack's `by`; if none comes within
/// `escalate_ms` it escalates and completes with `"escalated"`.
pub struct PurchaseOrder;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum PurchaseOrderState {
    AwaitingAck { po_id: String },
}

impl Orchestration for PurchaseOrder {
    const NAME: &'static str = "purchase-order";
    const VERSION: u32 = 1;
    const ACTIVATED_BY: &'static [&'static str] = &["po.submitted"];
    type Input = serde_json::Value;
    type State = PurchaseOrderState;
    type Output = String;
    fn start(ctx: &mut Context, po: serde_json::Value) -> Result<Next<Self>, Fault> {
        let po_id = po["po_id"].as_str().ok_or("a PO without po_id")?.to_owned();
        let on = Correlation::on("po_id", &po_id);
        if po["earlier"].as_bool() == Some(true) {
            ctx.receive_earlier("po.ack", on);
        } else {
            ctx.receive("po.ack", on);
        }
        let after = po["escalate_ms"].as_i64().unwrap_or(60_000);
        ctx.delay("escalate", chrono::Duration::milliseconds(after));
        Ok(Next::Continue(PurchaseOrderState::AwaitingAck { po_id }))
    }
    fn on_event(_: &mut Context, _: PurchaseOrderState, event: Event) -> Result<Next<Self>, Fault> {
        match event {
            Event::Timer { .. } => Ok(Next::Complete("escalated".to_owned())),
            event => Ok(Next::Complete(
                event.message()?.body["by"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned(),
            )),
        }
    }
}

/// Publish-subscribe: `invoice.issued` activates both of these. The audit takes every invoice;
/// the review only large EU ones (its `FILTER`). Each completes at once with the id of the
/// message that started it.
pub struct InvoiceAudit;
/// See [`InvoiceAudit`].
pub struct LargeInvoiceReview;

fn started_by_id(ctx: &Context) -> Result<String, Fault> {
    Ok(ctx.started_by().ok_or("no started_by")?.id.clone())
}

/// `impl Orchestration` for a subscriber that completes at once with the id of the message that
/// started it: its name, the types that activate it, its filter.
macro_rules! started_by_recorder {
    ($ty:ident, $name:literal, $types:expr, $filter:literal) => {
        impl Orchestration for $ty {
            const NAME: &'static str = $name;
            const VERSION: u32 = 1;
            const ACTIVATED_BY: &'static [&'static str] = $types;
            const FILTER: &'static str = $filter;
            type Input = serde_json::Value;
            type State = ();
            type Output = String;
            fn start(ctx: &mut Context, _: serde_json::Value) -> Result<Next<Self>, Fault> {
                Ok(Next::Complete(started_by_id(ctx)?))
            }
            fn on_event(_: &mut Context, _: (), event: Event) -> Result<Next<Self>, Fault> {
                Err(UnexpectedEvent(event.label()).into())
            }
        }
    };
}

started_by_recorder!(InvoiceAudit, "invoice-audit", &["invoice.issued"], "");
started_by_recorder!(
    LargeInvoiceReview,
    "large-invoice-review",
    &["invoice.issued"],
    "amount >= 1000 AND region = 'EU'"
);

/// Publish-subscribe beside a convoy: `line` activates it for the lines marked `audited = 'yes'`
/// (its `FILTER`; the convoy tests' lines are not), besides `LineConvoy`. It completes at once
/// with the id of the message that started it.
pub struct LineAudit;

started_by_recorder!(LineAudit, "line-audit", &["line"], "audited = 'yes'");

/// Every orchestration the engine tests use (with the buggy `fixable`).
pub fn registry() -> Registry {
    cairn_orchestrations::registry()
        .register::<Collector>()
        .register::<Panicker>()
        .register::<AtomicPair>()
        .register::<FixableBuggy>()
        .register::<FailFast>()
        .register::<LineConvoy>()
        .register::<DocPair>()
        .register::<StartProbe>()
        .register::<PurchaseOrder>()
        .register::<InvoiceAudit>()
        .register::<LargeInvoiceReview>()
        .register::<LineAudit>()
        .register::<Reserving>()
}

/// Called by [`Reserving`] (never started alone): in a (long-running) scope `reserve`, sends
/// `reserve` to the `log` port and waits for `stock.answer` correlated on its key; a
/// `{"ok": false}` answer is a fault; `{"ok": true}` ends the scope (recording the key for its
/// compensation, which sends `release`) and returns the key.
pub struct Reservation;

#[derive(Debug, thiserror::Error)]
#[error("no stock for {0}")]
pub struct NoStock(pub String);

impl Orchestration for Reservation {
    const NAME: &'static str = "reservation";
    const VERSION: u32 = 1;
    type Input = String;
    type State = String;
    type Output = String;

    fn start(ctx: &mut Context, key: String) -> Result<Next<Self>, Fault> {
        ctx.begin_scope("reserve", ScopeKind::LongRunning);
        ctx.send("log", "reserve", &key)?;
        ctx.receive("stock.answer", Correlation::on("key", &key));
        Ok(Next::Continue(key))
    }

    fn on_event(ctx: &mut Context, key: String, event: Event) -> Result<Next<Self>, Fault> {
        match event {
            Event::Compensate { data, .. } => {
                ctx.send("log", "release", &data)?;
                Ok(Next::Continue(key))
            }
            event => {
                if event.message()?.body::<serde_json::Value>()?["ok"] != json!(true) {
                    return Err(Box::new(NoStock(key)));
                }
                ctx.end_scope_with(&key)?;
                Ok(Next::Complete(key))
            }
        }
    }
}

/// Calls [`Reservation`] inside a scope `order` of its own, for a key: a fault of the call
/// reaches `order`'s exception handler, which sends `handled` and completes with the error. After
/// the call returns it waits for `order.cancel`, then compensates everything (the called
/// orchestration's `reserve` scope among it) and completes on `Compensated`.
pub struct Reserving;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum ReservingState {
    Reserving {
        key: String,
        call: Call<Reservation>,
    },
    Reserved {
        key: String,
        call: Option<Call<Reservation>>,
    },
}

impl Orchestration for Reserving {
    const NAME: &'static str = "reserving";
    const VERSION: u32 = 1;
    type Input = String;
    type State = ReservingState;
    type Output = String;

    fn start(ctx: &mut Context, key: String) -> Result<Next<Self>, Fault> {
        ctx.begin_scope("order", ScopeKind::LongRunning);
        let called = ctx.call::<Reservation>(key.clone())?;
        Self::after(ctx, key, called)
    }

    fn on_event(
        ctx: &mut Context,
        state: ReservingState,
        event: Event,
    ) -> Result<Next<Self>, Fault> {
        match (state, event) {
            (ReservingState::Reserving { key, call }, event) => {
                let called = call.on_event(ctx, event)?;
                Self::after(ctx, key, called)
            }
            (
                ReservingState::Reserved { key, call },
                Event::Compensate {
                    scope,
                    data,
                    remaining,
                },
            ) => {
                let call = match (scope.as_str(), call) {
                    ("reserve", Some(call)) => match call.on_event(
                        ctx,
                        Event::Compensate {
                            scope,
                            data,
                            remaining,
                        },
                    )? {
                        Called::Running(call) => Some(call),
                        other => {
                            return Err(format!(
                                "the reservation's compensation ended it: {other:?}"
                            )
                            .into())
                        }
                    },
                    (_, call) => call,
                };
                Ok(Next::Continue(ReservingState::Reserved { key, call }))
            }
            (ReservingState::Reserved { key, .. }, Event::Compensated { count, .. }) => Ok(
                Next::Complete(format!("{key} cancelled, {count} compensated")),
            ),
            (ReservingState::Reserved { key, call }, event) => {
                if event.message()?.message_type != "order.cancel" {
                    return Err(UnexpectedEvent(event.label()).into());
                }
                ctx.compensate_all();
                Ok(Next::Continue(ReservingState::Reserved { key, call }))
            }
        }
    }

    fn on_fault(
        ctx: &mut Context,
        state: ReservingState,
        fault: ScopeFault,
    ) -> Result<Next<Self>, Fault> {
        if fault.scope == "reserve" {
            // The called orchestration's scope: its handler (the default re-raises, on to
            // `order`, this orchestration's).
            let ReservingState::Reserving { key, call } = state else {
                return Err(fault.error);
            };
            let called = call.on_fault(ctx, fault)?;
            return Self::after(ctx, key, called);
        }
        let error = fault
            .downcast_ref::<NoStock>()
            .ok_or("not a NoStock")?
            .to_string();
        ctx.send(
            "log",
            "handled",
            &json!({ "scope": fault.scope, "error": error }),
        )?;
        Ok(Next::Complete(format!(
            "handled in {}: {error}",
            fault.scope
        )))
    }
}

impl Reserving {
    fn after(
        ctx: &mut Context,
        key: String,
        called: Called<Reservation>,
    ) -> Result<Next<Self>, Fault> {
        Ok(match called {
            Called::Running(call) => Next::Continue(ReservingState::Reserving { key, call }),
            Called::Returned { output, last } => {
                ctx.end_scope();
                ctx.receive("order.cancel", Correlation::on("key", &output));
                Next::Continue(ReservingState::Reserved { key, call: last })
            }
            Called::Failed(why) => Next::Fail(why),
        })
    }
}

/// What the ports delivered: (port, message id, body).
#[derive(Clone, Default, Debug)]
pub struct Deliveries(pub Arc<Mutex<Vec<(String, String, serde_json::Value)>>>);

impl Deliveries {
    pub fn all(&self) -> Vec<(String, String, serde_json::Value)> {
        self.0.lock().unwrap().clone()
    }
    pub fn ids(&self) -> Vec<String> {
        self.all().into_iter().map(|(_, id, _)| id).collect()
    }
    pub fn bodies(&self, port: &str) -> Vec<serde_json::Value> {
        self.all()
            .into_iter()
            .filter(|(p, _, _)| p == port)
            .map(|(_, _, b)| b)
            .collect()
    }
}

/// The sample ports plus `log`, all recording into `deliveries`.
pub fn ports(client: Client, deliveries: Deliveries) -> Ports {
    let rec = move |d: Deliveries, reply: fn(&OutboundMessage) -> Option<serde_json::Value>| {
        move |msg: OutboundMessage| {
            let d = d.clone();
            async move {
                d.0.lock()
                    .unwrap()
                    .push((msg.port.clone(), msg.id.clone(), msg.body.clone()));
                Ok::<_, PortError>(reply(&msg))
            }
        }
    };
    let warehouse = deliveries.clone();
    Ports::new()
        .function("payment", rec(deliveries.clone(), |m| {
            Some(serde_json::json!({"authorised": m.body["amount"].as_f64() < Some(1000.0), "code": "A"}))
        }))
        .function("billing", rec(deliveries.clone(), |m| {
            Some(serde_json::json!({"billed": m.body["amount"].as_f64() <= Some(500.0)}))
        }))
        .function("notifications", rec(deliveries.clone(), |_| None))
        .function("log", rec(deliveries.clone(), |_| None))
        .function("flights", rec(deliveries.clone(), |m| booking_reply(m, "flight")))
        .function("hotels", rec(deliveries.clone(), |m| booking_reply(m, "hotel")))
        .function("cars", rec(deliveries, |m| booking_reply(m, "car")))
        .function("warehouse", move |msg: OutboundMessage| {
            let d = warehouse.clone();
            let client = client.clone();
            async move {
                d.0.lock().unwrap().push((msg.port.clone(), msg.id.clone(), msg.body.clone()));
                let order = msg.body["order_id"].as_str().unwrap_or_default().to_owned();
                client
                    .publish("shipment.confirmed", serde_json::json!({"order_id": order, "tracking": "T"}),
                        Some(format!("ship-{order}")), BTreeMap::new())
                    .await
                    .map_err(|e| PortError::transient(e.to_string()))?;
                Ok(None)
            }
        })
}

/// A booking service's answer, as the sample's ports give it.
fn booking_reply(msg: &OutboundMessage, service: &str) -> Option<serde_json::Value> {
    if msg.message_type.ends_with(".cancel") {
        return None;
    }
    Some(if msg.body["sold_out"].as_str() == Some(service) {
        json!({ "booked": false, "reason": format!("no {service} left") })
    } else {
        json!({ "booked": true, "reference": format!("{service}-{}", msg.id) })
    })
}

/// Fast settings for tests.
pub fn fast_config() -> HostConfig {
    HostConfig {
        poll_interval: Duration::from_millis(20),
        dehydrate_after: Duration::from_secs(60),
        drain_timeout: Duration::from_millis(500),
        outbox_lock: Duration::from_secs(2),
        lease_duration: Duration::from_secs(2),
        ..HostConfig::default()
    }
}

/// A host on a thread and runtime of its own, so that a test can crash it: dropping the runtime
/// stops every task of the host at once, with nothing saved, as a killed process would.
pub struct HostThread {
    stop: CancellationToken,
    crash: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<Option<HostStats>>>,
}

/// What a [`HostThread`] runs: settings, definitions, ports, receive locations, faults.
pub struct HostSetup {
    pub config: HostConfig,
    pub registry: Registry,
    /// Builds the send ports from the host's client.
    pub ports: Box<dyn FnOnce(Client) -> Ports + Send>,
    pub locations: Vec<ReceiveLocation>,
    /// Wraps the store in a [`FaultyStore`] with this plan.
    pub plan: Option<Arc<FaultPlan>>,
    /// Serves `/metrics`, `/healthz`, `/readyz` there ([`Host::with_operations`]).
    pub operations: Option<std::net::TcpListener>,
    /// The host's clock (the system's if `None`).
    pub clock: Option<cairn::clock::SharedClock>,
}

impl HostSetup {
    /// `registry()` and `ports()` recording into `deliveries`, no faults, no receive locations.
    pub fn new(config: HostConfig, deliveries: Deliveries) -> Self {
        Self {
            config,
            registry: registry(),
            ports: Box::new(move |client| ports(client, deliveries)),
            locations: Vec::new(),
            plan: None,
            operations: None,
            clock: None,
        }
    }
}

impl HostThread {
    /// Starts a host on the test database with `registry()` and `ports()`, on a runtime and
    /// store of its own. Returns once the host's activating subscriptions are written, with a
    /// client.
    pub async fn start(
        db: &super::TestDb,
        config: HostConfig,
        deliveries: Deliveries,
    ) -> (Self, Client) {
        Self::launch(db, HostSetup::new(config, deliveries)).await
    }

    /// [`HostThread::start`] with injected faults.
    pub async fn start_with(
        db: &super::TestDb,
        config: HostConfig,
        deliveries: Deliveries,
        plan: Option<Arc<FaultPlan>>,
    ) -> (Self, Client) {
        let setup = HostSetup {
            plan,
            ..HostSetup::new(config, deliveries)
        };
        Self::launch(db, setup).await
    }

    /// [`HostThread::start`] with receive locations.
    pub async fn start_receiving(
        db: &super::TestDb,
        config: HostConfig,
        locations: Vec<ReceiveLocation>,
    ) -> (Self, Client) {
        let setup = HostSetup {
            locations,
            ..HostSetup::new(config, Deliveries::default())
        };
        Self::launch(db, setup).await
    }

    /// Starts a host as `setup` says, on a runtime and store of its own.
    pub async fn launch(db: &super::TestDb, setup: HostSetup) -> (Self, Client) {
        let url = db.url.clone();
        let stop = CancellationToken::new();
        let (crash_tx, crash_rx) = tokio::sync::oneshot::channel::<()>();
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel::<Client>();
        let token = stop.clone();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap();
            let stats = rt.block_on(async move {
                let plain = cairn::store::open(&url).await.expect("open store");
                let store: Arc<dyn Store> = match setup.plan {
                    Some(plan) => Arc::new(FaultyStore::new(plain, plan)),
                    None => plain,
                };
                let mut host =
                    Host::new(store, setup.registry, Ports::new()).with_config(setup.config);
                for location in setup.locations {
                    host = host.with_receive_location(location);
                }
                if let Some(listener) = setup.operations {
                    host = host.with_operations(listener);
                }
                if let Some(clock) = setup.clock {
                    host = host.with_clock(clock);
                }
                let client = host.client();
                let host = host.with_ports((setup.ports)(client.clone()));
                host.sync_activations().await.expect("activations");
                let _ = ready_tx.send(client);
                tokio::select! {
                    result = host.run(token) => Some(result.expect("host run")),
                    _ = crash_rx => None,
                }
            });
            rt.shutdown_background();
            stats
        });
        let client = ready_rx.await.expect("host thread started");
        (
            Self {
                stop,
                crash: Some(crash_tx),
                thread: Some(thread),
            },
            client,
        )
    }

    /// Stops the host gracefully (shutdown persistence points) and returns its stats.
    pub fn stop(mut self) -> HostStats {
        self.stop.cancel();
        self.thread
            .take()
            .unwrap()
            .join()
            .unwrap()
            .expect("host stopped")
    }

    /// Crashes the host: its runtime is dropped mid-flight.
    pub fn crash(mut self) {
        let _ = self.crash.take().unwrap().send(());
        let _ = self.thread.take().unwrap().join();
    }
}

impl Drop for HostThread {
    fn drop(&mut self) {
        self.stop.cancel();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
