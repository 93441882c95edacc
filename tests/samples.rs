//! The sample orchestrations, tested with the kit users get (`cairn::testing`): their transitions
//! as pure functions, and each under the real engine with a crash at every persistence point.

#![allow(clippy::unwrap_used)] // tests may unwrap: a panic is a failed test

mod support;

use std::collections::BTreeMap;
use std::sync::Arc;

use cairn::store::{InstanceStatus, NewMessage, Reason};
use cairn::testing::{CrashTest, Outcome, Recorder, Scenario, ScenarioError};
use cairn::{Client, Effect, OutboundMessage, PortError, Ports};
use cairn_orchestrations::approval::{self, Approval};
use cairn_orchestrations::approval_v2::ApprovalV2;
use cairn_orchestrations::invoice_batch::{Invoice, InvoiceBatch};
use cairn_orchestrations::loan_application::{self, LoanApplication};
use cairn_orchestrations::order_fulfilment::{self, OrderFulfilment};
use cairn_orchestrations::registry;
use cairn_orchestrations::trip_booking::{self, TripBooking};
use serde_json::json;

fn order(amount: f64) -> order_fulfilment::Order {
    order_fulfilment::Order {
        order_id: "o-1".into(),
        customer: "ada".into(),
        amount,
        shipment_timeout_ms: 1000,
    }
}

#[test]
fn order_pays_ships_and_completes_with_a_receipt() {
    let mut s = Scenario::<OrderFulfilment>::start(order(10.0)).unwrap();
    assert_eq!(s.step(), "AwaitingPayment");
    assert_eq!(
        s.sends(),
        vec![(
            "payment",
            "payment.authorise",
            &json!({"order_id": "o-1", "amount": 10.0})
        )]
    );
    assert_eq!(s.persistence_points(), &[Reason::Send]);

    s.reply("payment", json!({"authorised": true, "code": "A1"}))
        .unwrap();
    assert_eq!(s.step(), "AwaitingShipment");
    assert_eq!(
        s.waiting_for().split("; ").count(),
        2,
        "listens for the shipment and the timeout: {}",
        s.waiting_for()
    );
    assert!(s
        .waiting_for()
        .contains("message shipment.confirmed {order_id=o-1}"));

    // A shipment for another order is not for this instance.
    let other = s.message(
        "shipment.confirmed",
        json!({"order_id": "o-2", "tracking": "T"}),
    );
    assert!(
        matches!(other, Err(ScenarioError::NotWaiting(..))),
        "{other:?}"
    );

    s.message(
        "shipment.confirmed",
        json!({"order_id": "o-1", "tracking": "T-9"}),
    )
    .unwrap();
    let receipt = s.output().expect("completed");
    assert!(receipt.shipped);
    assert_eq!(receipt.tracking.as_deref(), Some("T-9"));
    assert_eq!(
        s.persistence_points(),
        &[Reason::Send, Reason::Send, Reason::Complete]
    );
}

#[test]
fn order_timeout_wins_the_listen_and_cancels_the_receive() {
    let mut s = Scenario::<OrderFulfilment>::start(order(10.0)).unwrap();
    s.reply("payment", json!({"authorised": true, "code": "A1"}))
        .unwrap();
    s.timer("shipment-timeout").unwrap();
    assert!(!s.output().expect("completed").shipped);
    assert!(s.waits().receives.is_empty() && s.waits().delays.is_empty());
}

#[test]
fn order_with_declined_payment_fails() {
    let mut s = Scenario::<OrderFulfilment>::start(order(5000.0)).unwrap();
    s.reply("payment", json!({"authorised": false})).unwrap();
    assert_eq!(
        s.outcome(),
        &Outcome::Failed("payment for order o-1 declined".into())
    );
}

#[test]
fn order_with_an_undecodable_reply_is_a_fault() {
    let mut s = Scenario::<OrderFulfilment>::start(order(10.0)).unwrap();
    let err = s.reply("payment", json!({"nonsense": 1})).unwrap_err();
    assert!(
        matches!(&err, ScenarioError::Faulted(t) if t.contains("does not decode")),
        "{err}"
    );
}

fn request() -> approval::Request {
    approval::Request {
        request_id: "r-1".into(),
        approver: "alice".into(),
        escalate_to: "bob".into(),
        summary: "laptop".into(),
        escalate_after_ms: 300,
        deadline_after_ms: 300,
    }
}

#[test]
fn approval_escalates_then_takes_the_late_decision() {
    let mut s = Scenario::<Approval>::start(request()).unwrap();
    assert_eq!(s.step(), "AwaitingDecision");
    s.timer("escalate").unwrap();
    assert_eq!(s.step(), "Escalated");
    assert_eq!(s.sends()[0].0, "notifications");
    assert_eq!(s.sends()[0].2["to"], "bob");
    s.message(
        "approval.decision",
        json!({"request_id": "r-1", "approved": true, "by": "bob"}),
    )
    .unwrap();
    assert_eq!(s.output().map(|d| d.approved), Some(true));
}

#[test]
fn approval_rejects_by_default_after_the_deadline() {
    let mut s = Scenario::<Approval>::start(request()).unwrap();
    s.timer("escalate").unwrap();
    s.timer("deadline").unwrap();
    assert_eq!(s.output().map(|d| d.approved), Some(false));
}

#[test]
fn invoice_batch_joins_on_every_child_in_any_order() {
    let batch = json!({"batch_id": "b", "lines": [
        {"customer": "a", "amount": 1.0}, {"customer": "b", "amount": 2.0}, {"customer": "c", "amount": 3.0}]});
    let mut s = Scenario::<InvoiceBatch>::start_with(
        cairn::Registry::new().register::<Invoice>(),
        chrono::Utc::now(),
        serde_json::from_value(batch).unwrap(),
    )
    .unwrap();
    let children: Vec<_> = s
        .started()
        .iter()
        .map(|(id, name, _)| (*id, name.to_string()))
        .collect();
    assert_eq!(children.len(), 3);
    assert!(children.iter().all(|(_, name)| name == "invoice"));
    assert_eq!(s.persistence_points(), &[Reason::Start]);
    s.child_completed(children[2].0, json!(3.0)).unwrap();
    s.child_failed(children[0].0, "refused").unwrap();
    assert!(s.output().is_none());
    s.child_completed(children[1].0, json!(2.0)).unwrap();
    let summary = s.output().expect("completed");
    assert_eq!(summary.total, 5.0);
    assert_eq!(summary.failed, vec!["a".to_owned()]);
}

/// Ports that behave like the samples' and record every delivery.
fn recording_ports(client: Client, recorder: Recorder) -> Ports {
    let record = |recorder: Recorder, reply: fn(&OutboundMessage) -> Option<serde_json::Value>| {
        move |msg: OutboundMessage| {
            let recorder = recorder.clone();
            async move {
                recorder.record(&msg.port, &msg.id);
                Ok::<_, PortError>(reply(&msg))
            }
        }
    };
    let warehouse_recorder = recorder.clone();
    Ports::new()
        .function(
            "payment",
            record(recorder.clone(), |m| {
                Some(json!({"authorised": m.body["amount"].as_f64() < Some(1000.0), "code": "A"}))
            }),
        )
        .function(
            "billing",
            record(recorder.clone(), |m| {
                Some(json!({"billed": m.body["amount"].as_f64() <= Some(500.0)}))
            }),
        )
        .function("notifications", record(recorder.clone(), |_| None))
        .function(
            "flights",
            record(recorder.clone(), |m| booking(m, "flight")),
        )
        .function("hotels", record(recorder.clone(), |m| booking(m, "hotel")))
        .function("cars", record(recorder, |m| booking(m, "car")))
        .function("warehouse", move |msg: OutboundMessage| {
            let recorder = warehouse_recorder.clone();
            let client = client.clone();
            async move {
                recorder.record(&msg.port, &msg.id);
                let order = msg.body["order_id"].as_str().unwrap_or_default().to_owned();
                client
                    .publish(
                        "shipment.confirmed",
                        json!({"order_id": order, "tracking": "T"}),
                        Some(format!("ship-{order}")),
                        BTreeMap::new(),
                    )
                    .await
                    .map_err(|e| PortError::transient(e.to_string()))?;
                Ok(None)
            }
        })
}

#[test]
fn order_fulfilment_survives_a_crash_at_every_persistence_point() {
    let report = CrashTest::new(registry(), "order-fulfilment", json!(order(10.0)))
        .ports(recording_ports)
        .run()
        .unwrap_or_else(|e| panic!("{e}"));
    eprintln!("{report:?}");
    assert_eq!(report.status, InstanceStatus::Completed);
    assert!(
        report.commits >= 3 && report.crashed_runs >= 6,
        "{report:?}"
    );
}

#[test]
fn approval_survives_a_crash_at_every_persistence_point() {
    let decision = NewMessage::published(
        "decision-r-1",
        "approval.decision",
        json!({"request_id": "r-1", "approved": true, "by": "alice"}),
        BTreeMap::new(),
    );
    let report = CrashTest::new(registry(), "approval", json!(request()))
        .ports(recording_ports)
        .publish(decision)
        .run()
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(report.status, InstanceStatus::Completed);
}

#[test]
fn invoice_batch_survives_a_crash_at_every_persistence_point() {
    let batch = json!({"batch_id": "b", "lines": [{"customer": "a", "amount": 1.0}, {"customer": "b", "amount": 900.0}]});
    let report = CrashTest::new(registry(), "invoice-batch", batch)
        .ports(recording_ports)
        .run()
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(report.status, InstanceStatus::Completed);
    assert_eq!(report.history.first().map(|(r, _)| *r), Some(Reason::Start));
}

#[test]
fn effects_are_plain_data() {
    let s = Scenario::<OrderFulfilment>::start(order(1.0)).unwrap();
    assert!(
        matches!(&s.effects()[0], Effect::Send { expects_reply: true, port, .. } if port == "payment")
    );
    let _unused: Arc<()> = Arc::new(());
}

fn trip(sold_out: Option<&str>) -> trip_booking::Trip {
    trip_booking::Trip {
        trip_id: "t-1".into(),
        traveller: "ada".into(),
        sold_out: sold_out.map(str::to_owned),
        settle_ms: 20,
    }
}

fn booking(msg: &OutboundMessage, service: &str) -> Option<serde_json::Value> {
    if msg.message_type.ends_with(".cancel") {
        return None;
    }
    Some(if msg.body["sold_out"].as_str() == Some(service) {
        json!({"booked": false, "reason": "sold out"})
    } else {
        json!({"booked": true, "reference": format!("{service}-{}", msg.id)})
    })
}

#[test]
fn trip_books_three_services_and_confirms_in_an_atomic_scope() {
    let mut s = Scenario::<TripBooking>::start(trip(None)).unwrap();
    s.reply("flights", json!({"booked": true, "reference": "F1"}))
        .unwrap();
    s.reply("hotels", json!({"booked": true, "reference": "H1"}))
        .unwrap();
    s.reply("cars", json!({"booked": true, "reference": "C1"}))
        .unwrap();
    // Inside the atomic scope: the itinerary is buffered, no persistence point yet.
    assert_eq!(s.step(), "Confirming");
    assert_eq!(
        s.persistence_points(),
        [Reason::Send, Reason::ScopeEnd, Reason::ScopeEnd]
    );
    s.timer("settle").unwrap();
    assert_eq!(
        s.persistence_points(),
        [
            Reason::Send,
            Reason::ScopeEnd,
            Reason::ScopeEnd,
            Reason::Complete
        ]
    );
    assert_eq!(s.output().unwrap().car, "C1");
    assert!(s
        .details()
        .iter()
        .any(|d| d.contains("atomic scope confirm committed")));
}

#[test]
fn a_refused_car_compensates_the_hotel_then_the_flight() {
    let mut s = Scenario::<TripBooking>::start(trip(Some("car"))).unwrap();
    s.reply("flights", json!({"booked": true, "reference": "F1"}))
        .unwrap();
    s.reply("hotels", json!({"booked": true, "reference": "H1"}))
        .unwrap();
    s.reply("cars", json!({"booked": false, "reason": "sold out"}))
        .unwrap();
    assert_eq!(
        s.persistence_points(),
        [
            Reason::Send,
            Reason::ScopeEnd,
            Reason::ScopeEnd,
            Reason::Compensate,
            Reason::Compensate,
            Reason::Compensate,
            Reason::Complete
        ]
    );
    let compensated: Vec<&String> = s
        .details()
        .iter()
        .filter(|d| d.ends_with("compensated"))
        .collect();
    assert_eq!(
        compensated,
        ["scope hotel compensated", "scope flight compensated"]
    );
    match s.outcome() {
        Outcome::Failed(why) => assert!(
            why.contains("car refused the booking: sold out; 2 booking(s) cancelled"),
            "{why}"
        ),
        other => panic!("expected failed, got {other:?}"),
    }
}

#[test]
fn an_unreachable_hotel_is_a_fault_the_trip_handles() {
    let mut s = Scenario::<TripBooking>::start(trip(None)).unwrap();
    s.reply("flights", json!({"booked": true, "reference": "F1"}))
        .unwrap();
    let request = s.waits().requests[0].0.clone();
    s.send_failed(&request, "hotels", "connection refused")
        .unwrap();
    match s.outcome() {
        Outcome::Failed(why) => assert!(
            why.contains("unreachable: connection refused; 1 booking(s) cancelled"),
            "{why}"
        ),
        other => panic!("expected failed, got {other:?}"),
    }
}

#[test]
fn trip_survives_a_crash_at_every_persistence_point_when_it_completes() {
    let report = CrashTest::new(registry(), "trip-booking", json!(trip(None)))
        .ports(recording_ports)
        .run()
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(report.status, InstanceStatus::Completed);
    assert!(
        report.history.iter().any(|(r, _)| *r == Reason::ScopeEnd),
        "{report:?}"
    );
}

#[test]
fn trip_survives_a_crash_at_every_persistence_point_while_compensating() {
    let report = CrashTest::new(registry(), "trip-booking", json!(trip(Some("car"))))
        .ports(recording_ports)
        .run()
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(report.status, InstanceStatus::Failed);
    let compensations = report
        .history
        .iter()
        .filter(|(r, _)| *r == Reason::Compensate)
        .count();
    assert_eq!(compensations, 3, "{report:?}");
    assert!(report.crashed_runs >= 14, "{report:?}");
}

/// A bell that rings once: it declares only its first step, so its one transition is undeclared.
struct Bell;

#[derive(Clone, serde::Serialize, serde::Deserialize)]
enum BellState {
    Idle,
    Ringing,
}

impl cairn::Orchestration for Bell {
    const NAME: &'static str = "bell";
    const VERSION: u32 = 1;
    const STEPS: &'static [&'static str] = &["Idle", "Ringing"];
    const TRANSITIONS: &'static [(&'static str, &'static str)] = &[("(start)", "Idle")];
    type Input = ();
    type State = BellState;
    type Output = ();

    fn start(ctx: &mut cairn::Context, _: ()) -> Result<cairn::Next<Self>, cairn::Fault> {
        ctx.receive("bell.pressed", cairn::Correlation::none());
        Ok(cairn::Next::Continue(BellState::Idle))
    }

    fn on_event(
        ctx: &mut cairn::Context,
        _: BellState,
        _: cairn::Event,
    ) -> Result<cairn::Next<Self>, cairn::Fault> {
        ctx.receive("bell.pressed", cairn::Correlation::none());
        Ok(cairn::Next::Continue(BellState::Ringing))
    }
}

#[test]
fn a_transition_the_orchestration_does_not_declare_fails_its_scenario() {
    let mut s = Scenario::<Bell>::start(()).unwrap();
    assert_eq!(s.step(), "Idle");
    let err = s.message("bell.pressed", json!({})).unwrap_err();
    assert!(
        matches!(&err, ScenarioError::UndeclaredTransition { from, to } if from == "Idle" && to == "Ringing"),
        "{err}"
    );
}

/// Completes at once with what started it, as its start transition saw it.
struct StartedByEcho;

impl cairn::Orchestration for StartedByEcho {
    const NAME: &'static str = "started-by-echo";
    const VERSION: u32 = 1;
    const ACTIVATED_BY: &'static [&'static str] = &["echo.asked"];
    type Input = serde_json::Value;
    type State = ();
    type Output = Option<cairn::StartedBy>;
    fn start(
        ctx: &mut cairn::Context,
        _: serde_json::Value,
    ) -> Result<cairn::Next<Self>, cairn::Fault> {
        Ok(cairn::Next::Complete(ctx.started_by().cloned()))
    }
    fn on_event(
        _: &mut cairn::Context,
        _: (),
        event: cairn::Event,
    ) -> Result<cairn::Next<Self>, cairn::Fault> {
        Err(cairn::UnexpectedEvent(event.label()).into())
    }
}

#[test]
fn a_scenario_start_and_activation_show_what_started_the_instance() {
    let s = Scenario::<StartedByEcho>::activate("echo.asked", json!({"order_id": "o-9"})).unwrap();
    let by = s.output().cloned().flatten().expect("started by a message");
    assert!(by.by_message);
    assert_eq!(by.message_type, "echo.asked");
    assert_eq!(by.property("order_id"), Some("o-9"));

    let s = Scenario::<StartedByEcho>::start(json!({})).unwrap();
    let by = s.output().cloned().flatten().expect("started");
    assert!(!by.by_message);
    assert_eq!(by.message_type, "started-by-echo.start");
    assert!(by.id.ends_with(":start"), "{}", by.id);
    assert!(by.properties.is_empty());
}

backend_tests!(approval_escalates_by_the_clock_and_survives_a_crash_at_every_point_on_each_backend);

/// Issue 25, point 6: the crash test on SQLite and on PostgreSQL (`CrashTest::database`), with
/// time moved and a message published at the steps the test names, not only after the start.
/// The approval waits a day before escalating: the clock moves a day at `AwaitingDecision`; the
/// decision is published once it shows `Escalated`. Every run (clean, and a crash before and
/// after each commit) must end completed, approved by carol, with the clean run's history.
async fn approval_escalates_by_the_clock_and_survives_a_crash_at_every_point_on_each_backend(
    db: support::TestDb,
) {
    let request = approval::Request {
        escalate_after_ms: 86_400_000,
        deadline_after_ms: 86_400_000,
        ..request()
    };
    let decision = NewMessage::published(
        "decision-carol",
        "approval.decision",
        json!({"request_id": "r-1", "approved": true, "by": "carol"}),
        BTreeMap::new(),
    );
    let url = db.url.clone();
    let report = tokio::task::spawn_blocking(move || {
        CrashTest::new(registry(), "approval", json!(request))
            .database(&url)
            .ports(recording_ports)
            .advance_at("AwaitingDecision", chrono::Duration::days(1))
            .publish_at("Escalated", decision)
            .run()
    })
    .await
    .unwrap()
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(report.status, InstanceStatus::Completed);
    let steps: Vec<&str> = report.history.iter().map(|(_, s)| s.as_str()).collect();
    assert_eq!(
        steps,
        ["AwaitingDecision", "Escalated", "completed"],
        "{report:?}"
    );
    assert!(report.crashed_runs >= 6, "{report:?}");
}

fn loan() -> loan_application::LoanRequest {
    loan_application::LoanRequest {
        loan_id: "l-1".into(),
        customer: "ada".into(),
        amount: 2500.0,
    }
}

#[test]
fn a_loan_calls_its_credit_check_inside_its_own_instance() {
    let mut s = Scenario::<LoanApplication>::start(loan()).unwrap();
    // The called credit check's send and wait are the loan's.
    assert_eq!(s.step(), "CheckingCredit");
    assert_eq!(s.waiting_for(), "message credit.checked {loan_id=l-1}");
    assert_eq!(
        s.sends(),
        [(
            "notifications",
            "credit.check.requested",
            &json!({"loan_id": "l-1"})
        )]
    );
    s.message("credit.checked", json!({"loan_id": "l-1", "score": 640}))
        .unwrap();
    assert_eq!(
        s.output(),
        Some(&loan_application::Decision {
            loan_id: "l-1".into(),
            score: 640,
            granted: true
        })
    );
    assert_eq!(
        s.sends(),
        [(
            "notifications",
            "loan.decided",
            &json!({"loan_id": "l-1", "score": 640, "granted": true})
        )]
    );
    assert_eq!(s.persistence_points(), [Reason::Send, Reason::Complete]);
}

#[test]
fn loan_application_survives_a_crash_at_every_persistence_point() {
    let answer = NewMessage::published(
        "checked-1",
        "credit.checked",
        json!({"loan_id": "l-1", "score": 500}),
        BTreeMap::new(),
    );
    let report = CrashTest::new(registry(), "loan-application", json!(loan()))
        .ports(recording_ports)
        .publish(answer)
        .run()
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(report.status, InstanceStatus::Completed);
}

/// A state exported from a database of version 1 (`cairn export ID`: an approval waiting with
/// one comment) migrates to version 2 and runs on to completion there, carrying the comment.
#[test]
fn an_exported_v1_approval_upgrades_to_v2_and_completes() {
    let path =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/approval-v1.json");
    let fixture = cairn::testing::Fixture::load(&path).unwrap();
    assert_eq!(fixture.version, 1);
    let mut s = Scenario::<ApprovalV2>::upgraded(&fixture).unwrap();
    assert_eq!(s.step(), "Pending");
    s.message(
        "approval.comment",
        json!({"request_id": "fx-1", "by": "ann", "text": "fine"}),
    )
    .unwrap();
    s.message(
        "approval.decision",
        json!({"request_id": "fx-1", "approved": true, "by": "ann"}),
    )
    .unwrap();
    let outcome = s.output().unwrap();
    assert_eq!(outcome.upgraded_from, Some(1));
    let texts: Vec<&str> = outcome.comments.iter().map(|c| c.text.as_str()).collect();
    assert_eq!(texts, ["cheaper model?", "fine"]);
}

/// A version-1 state version 2 refuses (no approver) is a clear error, not a panic.
#[test]
fn a_v1_approval_without_an_approver_does_not_upgrade() {
    let v1 = Scenario::<Approval>::start(approval::Request {
        approver: String::new(),
        ..request()
    })
    .unwrap();
    let state = cairn::codec::encode(v1.state().unwrap()).unwrap();
    let fixture = cairn::testing::Fixture {
        id: uuid::Uuid::new_v4(),
        orchestration: "approval".into(),
        version: 1,
        step: v1.step(),
        state_hex: state.iter().map(|b| format!("{b:02x}")).collect(),
        engine_state_hex: None,
    };
    let err = Scenario::<ApprovalV2>::upgraded(&fixture).unwrap_err();
    assert!(err.to_string().contains("has no approver"), "{err}");
}

/// An approval moved to version 2 while it waits, with a crash before and after every point,
/// the upgrade point included: it completes on version 2 as in the clean run.
#[test]
fn approval_survives_a_crash_at_every_point_including_its_upgrade_to_v2() {
    let decision = NewMessage::published(
        "decision-u-1",
        "approval.decision",
        json!({"request_id": "u-1", "approved": true, "by": "alice"}),
        BTreeMap::new(),
    );
    let request = approval::Request {
        request_id: "u-1".into(),
        escalate_after_ms: 3_600_000,
        deadline_after_ms: 3_600_000,
        ..request()
    };
    let report = CrashTest::new(registry(), "approval", json!(request))
        .ports(recording_ports)
        .upgrade_to(2, vec![decision])
        .run()
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(report.status, InstanceStatus::Completed);
    assert!(
        report.history.iter().any(|(r, _)| *r == Reason::Upgrade),
        "{report:?}"
    );
    assert!(report.crashed_runs >= 4, "{report:?}");
}

/// A comment wins the Listen like any event, which cancels every wait, the escalation timer too:
/// both versions of the approval declare it again, so a commented request still escalates and
/// then still meets its deadline.
#[test]
fn a_commented_approval_still_escalates_and_meets_its_deadline_on_both_versions() {
    let comment = json!({"request_id": "r-1", "by": "carol", "text": "looks fine"});
    let mut v1 = Scenario::<Approval>::start(request()).unwrap();
    v1.message("approval.comment", comment.clone()).unwrap();
    assert!(
        v1.waiting_for().contains("timer escalate"),
        "{}",
        v1.waiting_for()
    );
    v1.timer("escalate").unwrap();
    assert_eq!(v1.step(), "Escalated");
    v1.message("approval.comment", comment.clone()).unwrap();
    v1.timer("deadline").unwrap();
    assert!(matches!(v1.outcome(), Outcome::Completed(d) if !d.approved));

    let mut v2 = Scenario::<ApprovalV2>::start(request()).unwrap();
    v2.message("approval.comment", comment.clone()).unwrap();
    v2.timer("escalate").unwrap();
    v2.message("approval.comment", comment).unwrap();
    v2.timer("deadline").unwrap();
    assert!(
        matches!(v2.outcome(), Outcome::Completed(o) if !o.decision.approved && o.comments.len() == 2)
    );
}
