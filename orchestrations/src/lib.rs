//! The sample orchestrations, and the wiring of the `cairn` binary.
//!
//! This is the crate to copy when you write your own: one module per orchestration, a
//! [`registry`] that lists them, the send ports they use ([`ports`]), and a `main.rs` that hands
//! both to [`cairn::cli`].

pub mod approval;
pub mod approval_v2;
pub mod audit_trail;
pub mod invoice_batch;
pub mod loan_application;
pub mod order_fulfilment;
pub mod ports;
pub mod trip_booking;

use std::collections::BTreeMap;

use cairn::store::NewMessage;
use cairn::Registry;
use serde_json::json;

/// Every orchestration this application runs.
pub fn registry() -> Registry {
    Registry::new()
        .register::<order_fulfilment::OrderFulfilment>()
        // Version 1 stays the default for new requests; version 2 runs beside it, and runs the
        // instances `cairn upgrade approval --to 2` moves (docs/versioning.md).
        .register_default::<approval::Approval>()
        .register::<approval_v2::ApprovalV2>()
        .register::<invoice_batch::InvoiceBatch>()
        .register::<invoice_batch::Invoice>()
        .register::<trip_booking::TripBooking>()
        .register::<audit_trail::AuditTrail>()
        .register::<loan_application::LoanApplication>()
}

/// The messages `cairn demo` publishes for its `i`-th instance: the first one activates it. Every
/// timeout is short, so each instance ends within seconds even if what it waits for never comes.
pub fn demo_messages(i: usize, run: &str) -> Vec<NewMessage> {
    let published =
        |id: String, ty: &str, body| NewMessage::published(id, ty, body, BTreeMap::new());
    match i % 4 {
        0 => {
            let order_id = format!("{run}-order-{i}");
            let amount = if i % 7 == 0 {
                1500.0
            } else {
                10.0 + (i % 90) as f64
            };
            vec![published(
                format!("{order_id}-placed"),
                "order.placed",
                json!({ "order_id": order_id, "customer": format!("customer-{}", i % 17),
                        "amount": amount, "shipment_timeout_ms": 1500 }),
            )]
        }
        1 => {
            let request_id = format!("{run}-approval-{i}");
            let mut out = vec![published(
                format!("{request_id}-requested"),
                "approval.requested",
                json!({ "request_id": request_id, "approver": "alice", "summary": "new laptop",
                        "escalate_after_ms": 800, "deadline_after_ms": 800 }),
            )];
            // A loan, whose credit check is a called orchestration, and the bureau's answer.
            let loan_id = format!("{run}-loan-{i}");
            out.push(published(
                format!("{loan_id}-requested"),
                "loan.requested",
                json!({ "loan_id": loan_id, "customer": format!("customer-{}", i % 17), "amount": 2500.0 }),
            ));
            out.push(published(
                format!("{loan_id}-checked"),
                "credit.checked",
                json!({ "loan_id": loan_id, "score": 450 + (i % 7) * 50 }),
            ));
            if i % 2 == 0 {
                out.push(published(
                    format!("{request_id}-decision"),
                    "approval.decision",
                    json!({ "request_id": request_id, "approved": i % 4 == 0, "by": "alice" }),
                ));
            }
            out
        }
        3 => {
            // Half the trips find one service sold out, and compensate the bookings made.
            let trip_id = format!("{run}-trip-{i}");
            let sold_out = ["", "flight", "", "hotel", "", "car"][(i / 4) % 6];
            vec![published(
                format!("{trip_id}-requested"),
                "trip.requested",
                json!({ "trip_id": trip_id, "traveller": format!("traveller-{}", i % 13),
                        "sold_out": (!sold_out.is_empty()).then_some(sold_out) }),
            )]
        }
        _ => {
            let batch_id = format!("{run}-batch-{i}");
            vec![published(
                format!("{batch_id}-submitted"),
                "invoice.batch",
                json!({ "batch_id": batch_id, "lines": [
                    { "customer": "acme", "amount": 120.0 },
                    { "customer": "globex", "amount": 80.5 },
                    { "customer": "initech", "amount": if i % 5 == 0 { 900.0 } else { 42.0 } },
                ]}),
            )]
        }
    }
}

/// The code examples of the README and of `docs/`, compiled and run as this crate's doc tests
/// (`cargo test -p cairn-orchestrations --doc`), so that an example cannot drift from the engine.
/// Excerpts of code compiled elsewhere are fenced `rust,ignore` and checked to be still there by
/// `tests/docs.rs`, which also checks that every page with examples is listed here.
#[cfg(doctest)]
pub mod doc_examples {
    #[doc = include_str!("../../README.md")]
    pub struct Readme;
    #[doc = include_str!("../../docs/console.md")]
    pub struct Console;
    #[doc = include_str!("../../docs/messaging.md")]
    pub struct Messaging;
    #[doc = include_str!("../../docs/scopes-and-lifecycle.md")]
    pub struct ScopesAndLifecycle;
    #[doc = include_str!("../../docs/send-ports.md")]
    pub struct SendPorts;
    #[doc = include_str!("../../docs/versioning.md")]
    pub struct Versioning;
    #[doc = include_str!("../../docs/writing-an-orchestration.md")]
    pub struct WritingAnOrchestration;
}
