//! The small orchestrations the benchmark runs, and the in-process port that answers them.

use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::{Context, Correlation, Event, Fault, Next, Orchestration, Ports, Registry};

/// The send port every benchmark request goes to.
pub const ECHO_PORT: &str = "bench.echo";
/// The message type [`Waiter`] waits for, correlated on `key`.
pub const GO_TYPE: &str = "bench.go";

/// Every benchmark orchestration.
pub fn registry() -> Registry {
    Registry::new()
        .register::<Chain>()
        .register::<FanOut>()
        .register::<Waiter>()
}

/// The in-process port: answers each request at once with about 100 bytes.
pub fn ports() -> Ports {
    Ports::new().function(ECHO_PORT, |msg| async move {
        let i = msg.body.get("i").cloned().unwrap_or_default();
        Ok(Some(json!({
            "i": i,
            "greeting": "hello from the echo port, a reply of about one hundred bytes",
        })))
    })
}

/// W1 and W2: `calls` request-response calls in a row; completes with the last reply.
#[derive(Debug)]
pub struct Chain;

/// [`Chain`]'s input.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ChainInput {
    /// How many calls.
    pub calls: u32,
}

/// [`Chain`]'s state.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum ChainState {
    /// Waiting for the reply to call number `done + 1` of `calls`.
    Calling {
        /// Calls answered.
        done: u32,
        /// Calls in all.
        calls: u32,
    },
}

impl Orchestration for Chain {
    const NAME: &'static str = "bench.chain";
    const VERSION: u32 = 1;
    type Input = ChainInput;
    type State = ChainState;
    type Output = serde_json::Value;

    fn start(ctx: &mut Context, input: ChainInput) -> Result<Next<Self>, Fault> {
        ctx.request(ECHO_PORT, "bench.call", &json!({ "i": 0 }))?;
        Ok(Next::Continue(ChainState::Calling {
            done: 0,
            calls: input.calls.max(1),
        }))
    }

    fn on_event(ctx: &mut Context, state: ChainState, event: Event) -> Result<Next<Self>, Fault> {
        let ChainState::Calling { done, calls } = state;
        let reply = event.message()?.body.clone();
        let done = done + 1;
        if done >= calls {
            return Ok(Next::Complete(reply));
        }
        ctx.request(ECHO_PORT, "bench.call", &json!({ "i": done }))?;
        Ok(Next::Continue(ChainState::Calling { done, calls }))
    }
}

/// W3: `width` requests sent at once, joined on all replies.
#[derive(Debug)]
pub struct FanOut;

/// [`FanOut`]'s input.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FanOutInput {
    /// How many requests.
    pub width: u32,
}

/// [`FanOut`]'s state.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum FanOutState {
    /// Waiting for `remaining` replies.
    Joining {
        /// Replies still to come.
        remaining: u32,
    },
}

impl Orchestration for FanOut {
    const NAME: &'static str = "bench.fanout";
    const VERSION: u32 = 1;
    type Input = FanOutInput;
    type State = FanOutState;
    type Output = u32;

    fn start(ctx: &mut Context, input: FanOutInput) -> Result<Next<Self>, Fault> {
        let width = input.width.max(1);
        for i in 0..width {
            ctx.request(ECHO_PORT, "bench.call", &json!({ "i": i }))?;
        }
        Ok(Next::Continue(FanOutState::Joining { remaining: width }))
    }

    fn on_event(_: &mut Context, state: FanOutState, event: Event) -> Result<Next<Self>, Fault> {
        let FanOutState::Joining { remaining } = state;
        event.message()?;
        let remaining = remaining.saturating_sub(1);
        if remaining == 0 {
            return Ok(Next::Complete(0));
        }
        Ok(Next::Continue(FanOutState::Joining { remaining }))
    }
}

/// W4 and W5: waits for a `bench.go` message correlated on `key`, or for a timer.
#[derive(Debug)]
pub struct Waiter;

/// [`Waiter`]'s input.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WaiterInput {
    /// Waits for `bench.go` with this `key`.
    pub key: Option<String>,
    /// Waits this many seconds.
    pub timer_s: Option<i64>,
}

/// [`Waiter`]'s state.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum WaiterState {
    /// Waiting.
    Waiting,
}

impl Orchestration for Waiter {
    const NAME: &'static str = "bench.waiter";
    const VERSION: u32 = 1;
    type Input = WaiterInput;
    type State = WaiterState;
    type Output = ();

    fn start(ctx: &mut Context, input: WaiterInput) -> Result<Next<Self>, Fault> {
        if let Some(key) = input.key {
            ctx.receive(GO_TYPE, Correlation::on("key", key));
        }
        if let Some(s) = input.timer_s {
            ctx.delay("wake", chrono::Duration::seconds(s));
        }
        Ok(Next::Continue(WaiterState::Waiting))
    }

    fn on_event(_: &mut Context, _: WaiterState, _: Event) -> Result<Next<Self>, Fault> {
        Ok(Next::Complete(()))
    }
}
