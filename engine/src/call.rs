//! Call Orchestration (BizTalk's synchronous call shape): another orchestration run inside the
//! calling instance.
//!
//! [`Context::call`] runs the called orchestration's start transition with the caller's
//! [`Context`]: what it sends, waits for, starts and delays are the caller's, and so are its
//! persistence points. Its state ([`Call`]) nests in the caller's state; the caller hands it the
//! events that arrive while it runs ([`Call::on_event`]) until it returns
//! ([`Called::Returned`]). There is one instance row and one history: in SQL the caller is at its
//! own step (the variant that holds the call) until the call returns.
//!
//! A fault the called orchestration raises is the caller's transition's fault: it reaches the
//! caller's innermost open scope's exception handler, exactly as if the caller had raised it. A
//! scope the called orchestration opens is a scope of the instance: its exception handler is the
//! caller's [`Orchestration::on_fault`], which hands it on with [`Call::on_fault`], and its
//! compensation is asked for with the caller's [`Context::compensate`] and handed on as an event.
//!
//! ```
//! use cairn::{Call, Called, Context, Correlation, Event, Fault, Next, Orchestration};
//! use serde::{Deserialize, Serialize};
//!
//! /// Called: waits for a credit check correlated on the customer.
//! struct CreditCheck;
//! impl Orchestration for CreditCheck {
//!     const NAME: &'static str = "credit-check";
//!     const VERSION: u32 = 1;
//!     type Input = String;
//!     type State = String;
//!     type Output = bool;
//!     fn start(ctx: &mut Context, customer: String) -> Result<Next<Self>, Fault> {
//!         ctx.receive("credit.checked", Correlation::on("customer", &customer));
//!         Ok(Next::Continue(customer))
//!     }
//!     fn on_event(_: &mut Context, _: String, event: Event) -> Result<Next<Self>, Fault> {
//!         Ok(Next::Complete(event.message()?.body::<bool>()?))
//!     }
//! }
//!
//! /// The caller.
//! struct Loan;
//! #[derive(Clone, Serialize, Deserialize)]
//! enum State { Checking(Call<CreditCheck>) }
//! impl Orchestration for Loan {
//!     const NAME: &'static str = "loan";
//!     const VERSION: u32 = 1;
//!     type Input = String;
//!     type State = State;
//!     type Output = bool;
//!     fn start(ctx: &mut Context, customer: String) -> Result<Next<Self>, Fault> {
//!         match ctx.call::<CreditCheck>(customer)? {
//!             Called::Running(call) => Ok(Next::Continue(State::Checking(call))),
//!             Called::Returned { output: ok, .. } => Ok(Next::Complete(ok)),
//!             Called::Failed(why) => Ok(Next::Fail(why)),
//!         }
//!     }
//!     fn on_event(ctx: &mut Context, state: State, event: Event) -> Result<Next<Self>, Fault> {
//!         let State::Checking(call) = state;
//!         match call.on_event(ctx, event)? {
//!             Called::Running(call) => Ok(Next::Continue(State::Checking(call))),
//!             Called::Returned { output: ok, .. } => Ok(Next::Complete(ok)),
//!             Called::Failed(why) => Ok(Next::Fail(why)),
//!         }
//!     }
//! }
//! ```

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::context::Context;
use crate::orchestration::{Event, Fault, Next, Orchestration, ScopeFault};

/// A call of orchestration `O` in progress (or returned), kept in the caller's state: the called
/// orchestration's state.
#[derive(Serialize, Deserialize)]
#[serde(bound = "")]
pub struct Call<O: Orchestration> {
    state: O::State,
}

impl<O: Orchestration> Clone for Call<O> {
    fn clone(&self) -> Self {
        Self {
            state: self.state.clone(),
        }
    }
}

impl<O: Orchestration> fmt::Debug for Call<O> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Call<{} v{}>", O::NAME, O::VERSION)
    }
}

/// Where a call stands after one of its transitions.
pub enum Called<O: Orchestration> {
    /// It runs on: keep it in the caller's state and hand it the next events.
    Running(Call<O>),
    /// It returned.
    Returned {
        /// What it returned.
        output: O::Output,
        /// It, at the state it returned from (none when it returned from its start), for the
        /// compensation of its scopes later ([`Call::on_event`] with [`Event::Compensate`]);
        /// drop it when it has none.
        last: Option<Call<O>>,
    },
    /// It ended failed for a business reason ([`Next::Fail`]).
    Failed(String),
}

impl<O: Orchestration> fmt::Debug for Called<O> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Called::Running(_) => write!(f, "Running({} v{})", O::NAME, O::VERSION),
            Called::Returned { .. } => write!(f, "Returned({} v{})", O::NAME, O::VERSION),
            Called::Failed(why) => write!(f, "Failed({why:?})"),
        }
    }
}

impl<O: Orchestration> Called<O> {
    fn after(next: Next<O>, last: Option<O::State>) -> Self {
        match next {
            Next::Continue(state) => Called::Running(Call { state }),
            Next::Complete(output) => Called::Returned {
                output,
                last: last.map(|state| Call { state }),
            },
            Next::Fail(why) => Called::Failed(why),
        }
    }
}

impl<O: Orchestration> Call<O> {
    /// Hands the call an event the caller received while it runs (or, after it returned, an
    /// [`Event::Compensate`] of one of its scopes).
    ///
    /// # Errors
    /// The called orchestration's fault: the caller's transition's fault.
    pub fn on_event(self, ctx: &mut Context, event: Event) -> Result<Called<O>, Fault> {
        let last = self.state.clone();
        Ok(Called::after(
            O::on_event(ctx, self.state, event)?,
            Some(last),
        ))
    }

    /// Hands the call the fault of a scope it opened (from the caller's
    /// [`Orchestration::on_fault`], when `fault.scope` is one of the called orchestration's).
    ///
    /// # Errors
    /// A fault its handler does not handle: on to the caller's enclosing scope.
    pub fn on_fault(self, ctx: &mut Context, fault: ScopeFault) -> Result<Called<O>, Fault> {
        let last = self.state.clone();
        Ok(Called::after(
            O::on_fault(ctx, self.state, fault)?,
            Some(last),
        ))
    }

    /// The called orchestration's state.
    pub fn state(&self) -> &O::State {
        &self.state
    }
}

impl Context {
    /// Calls orchestration `O` inside this instance (BizTalk's Call Orchestration): runs its start
    /// transition now, with this context. See the [`call`](crate::call) module.
    ///
    /// # Errors
    /// The called orchestration's fault, as this transition's.
    pub fn call<O: Orchestration>(&mut self, input: O::Input) -> Result<Called<O>, Fault> {
        Ok(Called::after(O::start(self, input)?, None))
    }
}
