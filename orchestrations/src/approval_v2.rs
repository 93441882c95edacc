//! Approval, version 2: the same process as [`crate::approval`] with its state in a new shape,
//! and a migration that reads version 1's states.
//!
//! Version 1 keeps one variant per step (`AwaitingDecision`, `Escalated`); version 2 keeps one
//! step, `Pending`, with the escalation as a flag, and remembers which version the instance
//! started on. Its output carries the comments. A version-1 state does not decode as version 2
//! (its variant names are unknown there), so an instance moves only through
//! [`Orchestration::upgrade`]: `cairn upgrade approval --to 2`. The migration refuses a request
//! with no approver (version 2 needs one to escalate from); such an instance stays on version 1,
//! listed with the error, and finishes there.
//!
//! ```text
//!  requested ──► Pending{escalated: false} ──decision──► completed
//!                   │ comment: kept     │ timer escalate (send notifications)
//!                   ▼                   ▼
//!               Pending{escalated: true} ──decision──► completed
//!                   └──timer deadline──► completed (rejected: no decision)
//! ```

use cairn::{Context, Event, Fault, Next, Orchestration, StoredState, UnexpectedEvent};
use serde::{Deserialize, Serialize};

use crate::approval::{self, after_comment, ask, escalate, Approval, Comment, Decision, Request};

/// The orchestration, version 2.
pub struct ApprovalV2;

/// Its state: one step, the escalation a flag.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum State {
    /// Waiting for a decision (and, once escalated, for the deadline).
    Pending {
        /// The request.
        request: Request,
        /// Whether the escalation contact has been told.
        escalated: bool,
        /// The comments received so far.
        comments: Vec<Comment>,
        /// The version the instance started on, when it was moved here by `cairn upgrade`.
        upgraded_from: Option<u32>,
    },
}

/// What a completed instance returns.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Outcome {
    /// The decision.
    pub decision: Decision,
    /// Every comment received, in order.
    pub comments: Vec<Comment>,
    /// The version it started on, when it was moved.
    pub upgraded_from: Option<u32>,
}

/// Why a version-1 state does not move.
#[derive(Debug, thiserror::Error)]
#[error("request {0} has no approver, and version 2 needs one; it stays on version 1 and finishes there")]
pub struct NoApprover(String);

impl Orchestration for ApprovalV2 {
    const NAME: &'static str = "approval";
    const VERSION: u32 = 2;
    const ACTIVATED_BY: &'static [&'static str] = &["approval.requested"];
    const STEPS: &'static [&'static str] = &["Pending"];
    const TRANSITIONS: &'static [(&'static str, &'static str)] = &[("(start)", "Pending")];
    type Input = Request;
    type State = State;
    type Output = Outcome;

    fn start(ctx: &mut Context, request: Request) -> Result<Next<Self>, Fault> {
        ask(ctx, &request)?;
        Ok(Next::Continue(State::Pending {
            request,
            escalated: false,
            comments: Vec::new(),
            upgraded_from: None,
        }))
    }

    fn on_event(ctx: &mut Context, state: State, event: Event) -> Result<Next<Self>, Fault> {
        let State::Pending {
            request,
            escalated,
            mut comments,
            upgraded_from,
        } = state;
        match event {
            Event::Message(message) if message.message_type == "approval.comment" => {
                comments.push(message.body()?);
                after_comment(ctx, &request, escalated);
                Ok(Next::Continue(State::Pending {
                    request,
                    escalated,
                    comments,
                    upgraded_from,
                }))
            }
            Event::Message(message) => Ok(Next::Complete(Outcome {
                decision: message.body()?,
                comments,
                upgraded_from,
            })),
            Event::Timer { .. } if !escalated => {
                escalate(ctx, &request)?;
                Ok(Next::Continue(State::Pending {
                    request,
                    escalated: true,
                    comments,
                    upgraded_from,
                }))
            }
            Event::Timer { .. } => Ok(Next::Complete(Outcome {
                decision: Decision {
                    request_id: request.request_id,
                    approved: false,
                    by: "nobody (deadline passed)".to_owned(),
                },
                comments,
                upgraded_from,
            })),
            Event::SendFailed { port, error, .. } => {
                Ok(Next::Fail(format!("could not reach {port}: {error}")))
            }
            event => Err(UnexpectedEvent(event.label()).into()),
        }
    }

    /// Version 1's two steps become one step with a flag; its waits (the decision and comment
    /// receives, the escalation or deadline timer) stay as version 1 set them, and version 2
    /// handles each.
    fn upgrade(stored: StoredState<'_>) -> Result<State, Fault> {
        let (request, escalated, comments) = match stored.decode_as::<Approval>()? {
            approval::State::AwaitingDecision { request, comments } => (request, false, comments),
            approval::State::Escalated { request, comments } => (request, true, comments),
        };
        if request.approver.trim().is_empty() {
            return Err(NoApprover(request.request_id).into());
        }
        Ok(State::Pending {
            request,
            escalated,
            comments,
            upgraded_from: Some(stored.version),
        })
    }
}
