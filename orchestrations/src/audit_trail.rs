//! Audit trail: the file-port sample. Each `audit.event` starts an instance that writes the event
//! to the `audit` send port and completes. The port is a file port (one JSON file per event in
//! the audit folder, written atomically and named by message id) marked **ordered**: entries
//! arrive one at a time in the order they were committed, and an entry that keeps failing stops
//! the port (it is `held`) until an operator resumes it or dead-letters it; nothing behind it is
//! skipped.
//!
//! ```text
//! audit.event ─► start: send audit.entry to port `audit` ─► completed   [complete point, with the send]
//!                            └─ ordered file port: <audit dir>/<message id>.json, in commit order
//! ```

use cairn::{Context, Event, Fault, Next, Orchestration, UnexpectedEvent};
use serde::{Deserialize, Serialize};

/// The orchestration.
pub struct AuditTrail;

/// An event to record (the body of `audit.event`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuditEvent {
    /// Its number in the publisher's sequence.
    pub n: i64,
    /// What happened.
    pub text: String,
}

/// No state: an instance ends in its start transition.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum State {}

impl Orchestration for AuditTrail {
    const NAME: &'static str = "audit-trail";
    const VERSION: u32 = 1;
    const ACTIVATED_BY: &'static [&'static str] = &["audit.event"];
    type Input = AuditEvent;
    type State = State;
    type Output = i64;

    fn start(ctx: &mut Context, event: AuditEvent) -> Result<Next<Self>, Fault> {
        ctx.send("audit", "audit.entry", &event)?;
        Ok(Next::Complete(event.n))
    }

    fn on_event(_: &mut Context, _: State, event: Event) -> Result<Next<Self>, Fault> {
        Err(UnexpectedEvent(event.label()).into())
    }
}
