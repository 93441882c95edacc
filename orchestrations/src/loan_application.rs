//! Loan application: Call Orchestration (BizTalk's synchronous call), as an explicit state machine.
//!
//! Activated by a `loan.requested` message. It calls [`CreditCheck`] inside its own instance: the
//! credit check asks the credit bureau (a send to the `notifications` port) and waits for
//! `credit.checked` correlated on the loan id; its waits, sends and persistence points are the
//! loan application's, and there is one instance row. When the call returns the score, the loan
//! is granted at 600 or more, the decision is sent, and the instance completes.
//!
//! ```text
//!  loan.requested ──► CheckingCredit ──(the call returns the score)──► completed (decision sent)
//!                     [CreditCheck: credit.check.requested sent, waits credit.checked]
//! ```

use cairn::{Call, Called, Context, Correlation, Event, Fault, Next, Orchestration};
use serde::{Deserialize, Serialize};

/// The orchestration.
pub struct LoanApplication;

/// A loan request, the body of `loan.requested`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoanRequest {
    /// The business key the credit check is correlated on.
    pub loan_id: String,
    /// The customer.
    pub customer: String,
    /// How much.
    pub amount: f64,
}

/// One variant per step; the variant's name is the `step` column.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum State {
    /// The credit check runs (called, inside this instance).
    CheckingCredit {
        /// The request.
        request: LoanRequest,
        /// The call.
        check: Call<CreditCheck>,
    },
}

/// What a completed instance returns.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Decision {
    /// The loan.
    pub loan_id: String,
    /// The bureau's score.
    pub score: u32,
    /// Whether it was granted.
    pub granted: bool,
}

/// The smallest score a loan is granted at.
pub const GRANTED_FROM: u32 = 600;

impl Orchestration for LoanApplication {
    const NAME: &'static str = "loan-application";
    const VERSION: u32 = 1;
    const ACTIVATED_BY: &'static [&'static str] = &["loan.requested"];
    const STEPS: &'static [&'static str] = &["CheckingCredit"];
    const TRANSITIONS: &'static [(&'static str, &'static str)] = &[("(start)", "CheckingCredit")];
    type Input = LoanRequest;
    type State = State;
    type Output = Decision;

    fn start(ctx: &mut Context, request: LoanRequest) -> Result<Next<Self>, Fault> {
        let called = ctx.call::<CreditCheck>(request.loan_id.clone())?;
        Self::after_check(ctx, request, called)
    }

    fn on_event(ctx: &mut Context, state: State, event: Event) -> Result<Next<Self>, Fault> {
        let State::CheckingCredit { request, check } = state;
        let called = check.on_event(ctx, event)?;
        Self::after_check(ctx, request, called)
    }
}

impl LoanApplication {
    fn after_check(
        ctx: &mut Context,
        request: LoanRequest,
        called: Called<CreditCheck>,
    ) -> Result<Next<Self>, Fault> {
        match called {
            Called::Running(check) => Ok(Next::Continue(State::CheckingCredit { request, check })),
            Called::Returned { output: score, .. } => {
                let decision = Decision {
                    loan_id: request.loan_id,
                    score,
                    granted: score >= GRANTED_FROM,
                };
                ctx.send("notifications", "loan.decided", &decision)?;
                Ok(Next::Complete(decision))
            }
            Called::Failed(why) => Ok(Next::Fail(why)),
        }
    }
}

/// Called by [`LoanApplication`] (not registered: it runs only inside a caller): asks the credit
/// bureau and returns its score.
pub struct CreditCheck;

/// The body of `credit.checked`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CreditChecked {
    /// The loan.
    pub loan_id: String,
    /// The score.
    pub score: u32,
}

impl Orchestration for CreditCheck {
    const NAME: &'static str = "credit-check";
    const VERSION: u32 = 1;
    /// The loan id.
    type Input = String;
    /// The loan id.
    type State = String;
    /// The score.
    type Output = u32;

    fn start(ctx: &mut Context, loan_id: String) -> Result<Next<Self>, Fault> {
        ctx.send(
            "notifications",
            "credit.check.requested",
            &serde_json::json!({ "loan_id": loan_id }),
        )?;
        ctx.receive("credit.checked", Correlation::on("loan_id", &loan_id));
        Ok(Next::Continue(loan_id))
    }

    fn on_event(_: &mut Context, _: String, event: Event) -> Result<Next<Self>, Fault> {
        let checked: CreditChecked = event.message()?.body()?;
        Ok(Next::Complete(checked.score))
    }
}
