//! Order fulfilment: the classic BizTalk sample, as an explicit state machine.
//!
//! Activated by an `order.placed` message. It asks the `payment` port for an authorisation
//! (request-response), then asks the `warehouse` port to ship (one-way) and listens for either a
//! `shipment.confirmed` message correlated on the order id or a timeout, whichever comes first.
//! It completes with a receipt either way; a declined payment fails the instance.
//!
//! ```text
//!  order.placed ──► AwaitingPayment ──reply: declined──► failed
//!                        │ reply: authorised (send warehouse)
//!                        ▼
//!                  AwaitingShipment ──shipment.confirmed──► completed (shipped)
//!                        └────────────timer shipment-timeout──► completed (not shipped)
//! ```

use cairn::{Context, Correlation, Event, Fault, Next, Orchestration, UnexpectedEvent};
use chrono::Duration;
use serde::{Deserialize, Serialize};

/// The orchestration.
pub struct OrderFulfilment;

/// An order, the body of `order.placed`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Order {
    /// The business key shipments are correlated on.
    pub order_id: String,
    /// The customer.
    pub customer: String,
    /// What it costs.
    pub amount: f64,
    /// How long to wait for the shipment confirmation.
    #[serde(default = "default_timeout_ms")]
    pub shipment_timeout_ms: i64,
}

fn default_timeout_ms() -> i64 {
    60_000
}

/// One variant per step; the variant's name is the `step` column.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum State {
    /// Waiting for the payment port's answer.
    AwaitingPayment {
        /// The order.
        order: Order,
    },
    /// Paid; waiting for the warehouse or the timeout.
    AwaitingShipment {
        /// The order.
        order: Order,
        /// The payment authorisation.
        authorisation: String,
    },
}

/// What a completed instance returns.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Receipt {
    /// The order.
    pub order_id: String,
    /// The payment authorisation.
    pub authorisation: String,
    /// Whether the warehouse confirmed the shipment in time.
    pub shipped: bool,
    /// The carrier's tracking number, when shipped.
    pub tracking: Option<String>,
}

/// The payment port's reply.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PaymentReply {
    /// Whether the payment went through.
    pub authorised: bool,
    /// The authorisation code.
    #[serde(default)]
    pub code: String,
}

/// The body of `shipment.confirmed`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ShipmentConfirmed {
    /// The order.
    pub order_id: String,
    /// The tracking number.
    pub tracking: String,
}

impl Orchestration for OrderFulfilment {
    const NAME: &'static str = "order-fulfilment";
    const VERSION: u32 = 1;
    const ACTIVATED_BY: &'static [&'static str] = &["order.placed"];
    type Input = Order;
    type State = State;
    type Output = Receipt;

    fn start(ctx: &mut Context, order: Order) -> Result<Next<Self>, Fault> {
        ctx.request(
            "payment",
            "payment.authorise",
            &serde_json::json!({ "order_id": order.order_id, "amount": order.amount }),
        )?;
        Ok(Next::Continue(State::AwaitingPayment { order }))
    }

    fn on_event(ctx: &mut Context, state: State, event: Event) -> Result<Next<Self>, Fault> {
        match (state, event) {
            (State::AwaitingPayment { order }, Event::Reply { message, .. }) => {
                let reply: PaymentReply = message.body()?;
                if !reply.authorised {
                    return Ok(Next::Fail(format!(
                        "payment for order {} declined",
                        order.order_id
                    )));
                }
                ctx.send("warehouse", "shipment.requested", &order)?;
                ctx.receive(
                    "shipment.confirmed",
                    Correlation::on("order_id", &order.order_id),
                );
                ctx.delay(
                    "shipment-timeout",
                    Duration::milliseconds(order.shipment_timeout_ms),
                );
                Ok(Next::Continue(State::AwaitingShipment {
                    order,
                    authorisation: reply.code,
                }))
            }
            (
                State::AwaitingShipment {
                    order,
                    authorisation,
                },
                Event::Message(message),
            ) => {
                let shipped: ShipmentConfirmed = message.body()?;
                Ok(Next::Complete(Receipt {
                    order_id: order.order_id,
                    authorisation,
                    shipped: true,
                    tracking: Some(shipped.tracking),
                }))
            }
            (
                State::AwaitingShipment {
                    order,
                    authorisation,
                },
                Event::Timer { .. },
            ) => Ok(Next::Complete(Receipt {
                order_id: order.order_id,
                authorisation,
                shipped: false,
                tracking: None,
            })),
            (_, Event::SendFailed { port, error, .. }) => {
                Ok(Next::Fail(format!("could not reach {port}: {error}")))
            }
            (_, event) => Err(UnexpectedEvent(event.label()).into()),
        }
    }
}
