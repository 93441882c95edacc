//! Trip booking: the saga sample. A trip books a flight, a hotel and a car, one after the other,
//! each through a request-response port inside its own long-running scope, all nested in the
//! long-running scope `trip`. When a booking is refused (or its port gives up), the fault travels
//! up to the `trip` scope's exception handler, which compensates the bookings already made: the
//! engine hands back each completed scope's data, newest first, and each compensation cancels one
//! booking in its own persistence point. With all three booked, the confirmation is sent from an
//! atomic scope: the itinerary and the confirmation go out together at its end, or not at all.
//!
//! ```text
//! start ─► BookingFlight ─reply─► BookingHotel ─reply─► BookingCar ─reply─► Confirming ─timer─► completed
//!               │ refused              │ refused             │ refused        (atomic scope)
//!               └──────────────────────┴─────────────────────┴─► Compensating ─► failed
//!                                      trip's handler: compensate("trip")   (one cancel per booking made)
//! ```

use cairn::{Context, Event, Fault, Next, Orchestration, ScopeFault, ScopeKind};
use chrono::Duration;
use serde::{Deserialize, Serialize};
use serde_json::json;

/// The orchestration.
pub struct TripBooking;

/// A trip to book (the body of `trip.requested`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Trip {
    /// The trip's id.
    pub trip_id: String,
    /// Who travels.
    pub traveller: String,
    /// A service with nothing left to book (`flight`, `hotel` or `car`): the sample's way to make
    /// a booking fail.
    #[serde(default)]
    pub sold_out: Option<String>,
    /// How long the confirmation's atomic scope stays open (milliseconds; 20 by default).
    #[serde(default = "default_settle_ms")]
    pub settle_ms: i64,
}

fn default_settle_ms() -> i64 {
    20
}

/// The references of a booked trip.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Booked {
    /// The trip's id.
    pub trip_id: String,
    /// The flight's reference.
    pub flight: String,
    /// The hotel's reference.
    pub hotel: String,
    /// The car's reference.
    pub car: String,
}

/// One step per variant.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum State {
    /// Waiting for the airline.
    BookingFlight {
        /// The trip.
        trip: Trip,
    },
    /// Waiting for the hotel.
    BookingHotel {
        /// The trip.
        trip: Trip,
        /// The flight's reference.
        flight: String,
    },
    /// Waiting for the car rental.
    BookingCar {
        /// The trip.
        trip: Trip,
        /// The flight's reference.
        flight: String,
        /// The hotel's reference.
        hotel: String,
    },
    /// Inside the atomic confirmation scope: the itinerary is buffered until the scope ends.
    Confirming {
        /// The trip.
        trip: Trip,
        /// The bookings.
        booked: Booked,
    },
    /// A booking failed: cancelling the ones made.
    Compensating {
        /// The trip.
        trip: Trip,
        /// What failed.
        reason: String,
    },
}

impl State {
    fn trip(&self) -> Trip {
        match self {
            State::BookingFlight { trip }
            | State::BookingHotel { trip, .. }
            | State::BookingCar { trip, .. }
            | State::Confirming { trip, .. }
            | State::Compensating { trip, .. } => trip.clone(),
        }
    }
}

/// A service refused a booking: the typed fault the `trip` scope's handler receives.
#[derive(Debug, thiserror::Error)]
#[error("{service} refused the booking: {reason}")]
pub struct BookingRefused {
    /// flight, hotel or car.
    pub service: String,
    /// What it said.
    pub reason: String,
}

/// The send port of each service.
pub fn port_of(service: &str) -> &'static str {
    match service {
        "flight" => "flights",
        "hotel" => "hotels",
        _ => "cars",
    }
}

fn book(ctx: &mut Context, service: &str, trip: &Trip) -> Result<(), Fault> {
    ctx.begin_scope(service, ScopeKind::LongRunning);
    ctx.request(
        port_of(service),
        &format!("{service}.book"),
        &json!({ "trip_id": trip.trip_id, "traveller": trip.traveller, "sold_out": trip.sold_out }),
    )?;
    Ok(())
}

/// The reference in a booking reply, or the refusal as a typed fault.
fn reference(service: &str, event: &Event) -> Result<String, Fault> {
    match event {
        Event::Reply { message, .. } => {
            if message.body["booked"].as_bool() == Some(true) {
                Ok(message.body["reference"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned())
            } else {
                Err(Box::new(BookingRefused {
                    service: service.to_owned(),
                    reason: message.body["reason"]
                        .as_str()
                        .unwrap_or("no reason given")
                        .to_owned(),
                }))
            }
        }
        Event::SendFailed { error, .. } => Err(Box::new(BookingRefused {
            service: service.to_owned(),
            reason: format!("unreachable: {error}"),
        })),
        other => Err(format!(
            "unexpected event while booking the {service}: {}",
            other.label()
        )
        .into()),
    }
}

impl Orchestration for TripBooking {
    const NAME: &'static str = "trip-booking";
    const VERSION: u32 = 1;
    const ACTIVATED_BY: &'static [&'static str] = &["trip.requested"];
    type Input = Trip;
    type State = State;
    type Output = Booked;

    fn start(ctx: &mut Context, trip: Trip) -> Result<Next<Self>, Fault> {
        ctx.begin_scope("trip", ScopeKind::LongRunning);
        book(ctx, "flight", &trip)?;
        Ok(Next::Continue(State::BookingFlight { trip }))
    }

    fn on_event(ctx: &mut Context, state: State, event: Event) -> Result<Next<Self>, Fault> {
        match state {
            State::BookingFlight { trip } => {
                let flight = reference("flight", &event)?;
                ctx.end_scope_with(&json!({ "reference": flight }))?;
                book(ctx, "hotel", &trip)?;
                Ok(Next::Continue(State::BookingHotel { trip, flight }))
            }
            State::BookingHotel { trip, flight } => {
                let hotel = reference("hotel", &event)?;
                ctx.end_scope_with(&json!({ "reference": hotel }))?;
                book(ctx, "car", &trip)?;
                Ok(Next::Continue(State::BookingCar {
                    trip,
                    flight,
                    hotel,
                }))
            }
            State::BookingCar {
                trip,
                flight,
                hotel,
            } => {
                let car = reference("car", &event)?;
                ctx.end_scope_with(&json!({ "reference": car }))?;
                let booked = Booked {
                    trip_id: trip.trip_id.clone(),
                    flight,
                    hotel,
                    car,
                };
                // The itinerary and the confirmation leave together, at the end of this scope.
                ctx.begin_scope("confirm", ScopeKind::Atomic);
                ctx.send("notifications", "trip.itinerary", &booked)?;
                ctx.delay("settle", Duration::milliseconds(trip.settle_ms));
                Ok(Next::Continue(State::Confirming { trip, booked }))
            }
            State::Confirming { booked, .. } => match event {
                Event::Timer { .. } => {
                    ctx.send(
                        "notifications",
                        "trip.confirmed",
                        &json!({ "trip_id": booked.trip_id }),
                    )?;
                    ctx.end_scope(); // confirm: both sends commit now
                    ctx.end_scope(); // trip
                    Ok(Next::Complete(booked))
                }
                other => {
                    Err(format!("unexpected event while confirming: {}", other.label()).into())
                }
            },
            State::Compensating { trip, reason } => match event {
                Event::Compensate { scope, data, .. } => {
                    ctx.send(
                        port_of(&scope),
                        &format!("{scope}.cancel"),
                        &json!({ "trip_id": trip.trip_id, "reference": data["reference"] }),
                    )?;
                    Ok(Next::Continue(State::Compensating { trip, reason }))
                }
                Event::Compensated { count, .. } => Ok(Next::Fail(format!(
                    "trip {} not booked: {reason}; {count} booking(s) cancelled",
                    trip.trip_id
                ))),
                // A reply to a cancelled request can still arrive: nothing to do.
                _ => Ok(Next::Continue(State::Compensating { trip, reason })),
            },
        }
    }

    fn on_fault(ctx: &mut Context, state: State, fault: ScopeFault) -> Result<Next<Self>, Fault> {
        if fault.scope != "trip" {
            // A booking scope: let the trip decide.
            return Err(fault.error);
        }
        let reason = match fault.downcast_ref::<BookingRefused>() {
            Some(refused) => refused.to_string(),
            None => fault.error.to_string(),
        };
        ctx.cancel_waits();
        ctx.compensate("trip");
        Ok(Next::Continue(State::Compensating {
            trip: state.trip(),
            reason,
        }))
    }
}
