//! Invoice batch: fan out to child orchestrations and join on all of them.
//!
//! BizTalk's Start Orchestration and Parallel Actions shapes. A batch starts one `invoice` child
//! per line (a `start` persistence point), waits for every child to end, in any order, and
//! completes with the total billed and the lines that failed. Each `invoice` asks the `billing`
//! port to bill its line (request-response) and completes with the amount billed, or fails if
//! billing refuses.
//!
//! ```text
//!  batch: Started ──start N invoices──► Collecting ──child ended (×N)──► completed
//!  invoice: Billing ──reply──► completed | failed
//! ```

use std::collections::BTreeMap;

use cairn::{Context, Event, Fault, Next, Orchestration, UnexpectedEvent};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// The batch orchestration.
pub struct InvoiceBatch;

/// The input of a batch.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Batch {
    /// The batch's business key.
    pub batch_id: String,
    /// One invoice per line.
    pub lines: Vec<Line>,
}

/// One line to bill.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Line {
    /// The customer.
    pub customer: String,
    /// The amount.
    pub amount: f64,
}

/// The batch's one step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum BatchState {
    /// Waiting for children to end.
    Collecting {
        /// The batch.
        batch_id: String,
        /// Children still running, with the customer of their line.
        outstanding: BTreeMap<Uuid, String>,
        /// Billed so far.
        total: f64,
        /// Customers whose invoice failed.
        failed: Vec<String>,
    },
}

/// What a batch returns.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BatchSummary {
    /// The batch.
    pub batch_id: String,
    /// Total billed.
    pub total: f64,
    /// Customers whose invoice failed.
    pub failed: Vec<String>,
}

impl Orchestration for InvoiceBatch {
    const NAME: &'static str = "invoice-batch";
    const VERSION: u32 = 1;
    const ACTIVATED_BY: &'static [&'static str] = &["invoice.batch"];
    type Input = Batch;
    type State = BatchState;
    type Output = BatchSummary;

    fn start(ctx: &mut Context, batch: Batch) -> Result<Next<Self>, Fault> {
        if batch.lines.is_empty() {
            return Ok(Next::Complete(BatchSummary {
                batch_id: batch.batch_id,
                total: 0.0,
                failed: Vec::new(),
            }));
        }
        let mut outstanding = BTreeMap::new();
        for line in &batch.lines {
            let child = ctx.start(Invoice::NAME, line)?;
            outstanding.insert(child, line.customer.clone());
        }
        Ok(Next::Continue(BatchState::Collecting {
            batch_id: batch.batch_id,
            outstanding,
            total: 0.0,
            failed: Vec::new(),
        }))
    }

    fn on_event(_ctx: &mut Context, state: BatchState, event: Event) -> Result<Next<Self>, Fault> {
        let BatchState::Collecting {
            batch_id,
            mut outstanding,
            mut total,
            mut failed,
        } = state;
        match event {
            Event::ChildCompleted { child, output } => {
                outstanding.remove(&child);
                total += output.as_f64().unwrap_or(0.0);
            }
            Event::ChildFailed { child, .. } => {
                if let Some(customer) = outstanding.remove(&child) {
                    failed.push(customer);
                }
            }
            other => return Err(UnexpectedEvent(other.label()).into()),
        }
        if outstanding.is_empty() {
            return Ok(Next::Complete(BatchSummary {
                batch_id,
                total,
                failed,
            }));
        }
        Ok(Next::Continue(BatchState::Collecting {
            batch_id,
            outstanding,
            total,
            failed,
        }))
    }
}

/// One invoice, started by a batch.
pub struct Invoice;

/// The invoice's one step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum InvoiceState {
    /// Waiting for the billing port.
    Billing {
        /// The line.
        line: Line,
    },
}

impl Orchestration for Invoice {
    const NAME: &'static str = "invoice";
    const VERSION: u32 = 1;
    type Input = Line;
    type State = InvoiceState;
    type Output = f64;

    fn start(ctx: &mut Context, line: Line) -> Result<Next<Self>, Fault> {
        ctx.request("billing", "invoice.bill", &line)?;
        Ok(Next::Continue(InvoiceState::Billing { line }))
    }

    fn on_event(
        _ctx: &mut Context,
        state: InvoiceState,
        event: Event,
    ) -> Result<Next<Self>, Fault> {
        let InvoiceState::Billing { line } = state;
        match event {
            Event::Reply { message, .. } => {
                let billed = message
                    .body
                    .get("billed")
                    .and_then(|b| b.as_bool())
                    .unwrap_or(false);
                if billed {
                    Ok(Next::Complete(line.amount))
                } else {
                    Ok(Next::Fail(format!(
                        "billing refused the invoice for {}",
                        line.customer
                    )))
                }
            }
            Event::SendFailed { error, .. } => {
                Ok(Next::Fail(format!("billing unreachable: {error}")))
            }
            other => Err(UnexpectedEvent(other.label()).into()),
        }
    }
}
