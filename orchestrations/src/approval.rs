//! Approval with escalation: a human decision with a deadline.
//!
//! Activated by `approval.requested` (or `cairn start approval`). It notifies the approver
//! (one-way send to the `notifications` port), then waits for an `approval.decision` message
//! correlated on the request id. If none comes before the escalation delay, it notifies the
//! escalation contact and waits again; if none comes before the final deadline, the request is
//! rejected by default. While it waits it keeps the `approval.comment` messages it receives
//! (correlated on the request id too).
//!
//! Version 2 ([`crate::approval_v2`]) stores its state in another shape and reads this version's
//! states through its migration; the samples' registry runs both and still starts new requests
//! here (version 1 is pinned as the default), so `cairn upgrade approval --to 2` moves them.
//!
//! ```text
//!  requested ──► AwaitingDecision ──decision──► completed
//!                      │ timer escalate (send notifications)
//!                      ▼
//!                 Escalated ──decision──► completed
//!                      └──timer deadline──► completed (rejected: no decision)
//! ```

use cairn::{Context, Correlation, Event, Fault, Next, Orchestration, UnexpectedEvent};
use chrono::Duration;
use serde::{Deserialize, Serialize};

/// The orchestration.
pub struct Approval;

/// The body of `approval.requested`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Request {
    /// The business key decisions are correlated on.
    pub request_id: String,
    /// Who decides.
    pub approver: String,
    /// Who is told when the approver is slow.
    #[serde(default = "default_escalation")]
    pub escalate_to: String,
    /// What is asked for.
    #[serde(default)]
    pub summary: String,
    /// Wait this long before escalating.
    #[serde(default = "default_escalate_ms")]
    pub escalate_after_ms: i64,
    /// After escalating, wait this long before rejecting by default.
    #[serde(default = "default_escalate_ms")]
    pub deadline_after_ms: i64,
}

fn default_escalation() -> String {
    "manager".to_owned()
}

fn default_escalate_ms() -> i64 {
    3_600_000
}

/// One variant per step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum State {
    /// Waiting for the approver.
    AwaitingDecision {
        /// The request.
        request: Request,
        /// The comments received so far (a field added with a default: states stored before
        /// it still decode, so no new version was needed).
        #[serde(default)]
        comments: Vec<Comment>,
    },
    /// Escalated; waiting for anyone's decision or the deadline.
    Escalated {
        /// The request.
        request: Request,
        /// The comments received so far.
        #[serde(default)]
        comments: Vec<Comment>,
    },
}

/// The body of `approval.comment`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Comment {
    /// The request commented on.
    pub request_id: String,
    /// Who wrote it.
    pub by: String,
    /// What they wrote.
    pub text: String,
}

/// Asks the approver, and waits for a decision or a comment, or the escalation delay.
pub(crate) fn ask(ctx: &mut Context, request: &Request) -> Result<(), Fault> {
    ctx.send(
        "notifications",
        "approval.asked",
        &serde_json::json!({ "to": request.approver, "request_id": request.request_id }),
    )?;
    listen(ctx, &request.request_id);
    ctx.delay(
        "escalate",
        Duration::milliseconds(request.escalate_after_ms),
    );
    Ok(())
}

/// Tells the escalation contact, and waits again, until the deadline.
pub(crate) fn escalate(ctx: &mut Context, request: &Request) -> Result<(), Fault> {
    ctx.send(
        "notifications",
        "approval.escalated",
        &serde_json::json!({ "to": request.escalate_to, "request_id": request.request_id }),
    )?;
    listen(ctx, &request.request_id);
    ctx.delay(
        "deadline",
        Duration::milliseconds(request.deadline_after_ms),
    );
    Ok(())
}

/// After a comment: waits again for a decision or a comment, and for the escalation (or, once
/// escalated, the deadline) restarted: a comment is activity on the request. (A comment wins the
/// Listen like any event, which cancels every wait, the timer too.)
pub(crate) fn after_comment(ctx: &mut Context, request: &Request, escalated: bool) {
    listen(ctx, &request.request_id);
    if escalated {
        ctx.delay(
            "deadline",
            Duration::milliseconds(request.deadline_after_ms),
        );
    } else {
        ctx.delay(
            "escalate",
            Duration::milliseconds(request.escalate_after_ms),
        );
    }
}

/// Waits for a decision or a comment on `request_id`.
pub(crate) fn listen(ctx: &mut Context, request_id: &str) {
    ctx.receive(
        "approval.decision",
        Correlation::on("request_id", request_id),
    );
    ctx.receive(
        "approval.comment",
        Correlation::on("request_id", request_id),
    );
}

/// The body of `approval.decision`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Decision {
    /// The request decided on.
    pub request_id: String,
    /// The decision.
    pub approved: bool,
    /// Who decided.
    pub by: String,
}

impl Orchestration for Approval {
    const NAME: &'static str = "approval";
    const VERSION: u32 = 1;
    const ACTIVATED_BY: &'static [&'static str] = &["approval.requested"];
    // Its map, for the console; the test kit fails a transition outside it.
    const STEPS: &'static [&'static str] = &["AwaitingDecision", "Escalated"];
    const TRANSITIONS: &'static [(&'static str, &'static str)] = &[
        ("(start)", "AwaitingDecision"),
        ("AwaitingDecision", "Escalated"),
    ];
    type Input = Request;
    type State = State;
    type Output = Decision;

    fn start(ctx: &mut Context, request: Request) -> Result<Next<Self>, Fault> {
        ask(ctx, &request)?;
        Ok(Next::Continue(State::AwaitingDecision {
            request,
            comments: Vec::new(),
        }))
    }

    fn on_event(ctx: &mut Context, state: State, event: Event) -> Result<Next<Self>, Fault> {
        match (state, event) {
            (state, Event::Message(message)) if message.message_type == "approval.comment" => {
                let comment: Comment = message.body()?;
                let (State::AwaitingDecision { request, comments }
                | State::Escalated { request, comments }) = &state;
                after_comment(ctx, request, matches!(state, State::Escalated { .. }));
                let mut comments = comments.clone();
                comments.push(comment);
                let request = request.clone();
                Ok(Next::Continue(match state {
                    State::AwaitingDecision { .. } => State::AwaitingDecision { request, comments },
                    State::Escalated { .. } => State::Escalated { request, comments },
                }))
            }
            (State::AwaitingDecision { .. } | State::Escalated { .. }, Event::Message(message)) => {
                Ok(Next::Complete(message.body::<Decision>()?))
            }
            (State::AwaitingDecision { request, comments }, Event::Timer { .. }) => {
                escalate(ctx, &request)?;
                Ok(Next::Continue(State::Escalated { request, comments }))
            }
            (State::Escalated { request, .. }, Event::Timer { .. }) => {
                Ok(Next::Complete(Decision {
                    request_id: request.request_id,
                    approved: false,
                    by: "nobody (deadline passed)".to_owned(),
                }))
            }
            (_, Event::SendFailed { port, error, .. }) => {
                Ok(Next::Fail(format!("could not reach {port}: {error}")))
            }
            (_, event) => Err(UnexpectedEvent(event.label()).into()),
        }
    }
}
