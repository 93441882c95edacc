//! # Cairn
//!
//! A durable orchestration engine in the tradition of the BizTalk Server orchestration engine.
//! Long-running business processes are written as **explicit state machines**
//! ([`Orchestration`]); an engine [`Host`] runs thousands of instances, routes messages to them by
//! subscription and correlation, and saves each instance at **persistence points** to SQLite or
//! PostgreSQL. After a crash every instance resumes from its last persistence point and the
//! messages it had received since are delivered again. Operators inspect and steer instances with
//! plain SQL and the `cairn` command-line tool (`cli`, with the `cli` feature).
//!
//! The guarantees (G1-G6) are stated in `docs/concepts.md`; every test is written against them.
//!
//! ## Features
//!
//! None is on by default: `cairn = "..."` is the engine alone (authoring API, registry, store,
//! host, send ports).
//!
//! | feature | gives |
//! |---|---|
//! | `cli` | `cairn::cli`: the `cairn` command-line tool as building blocks for an application's `main` (clap, indicatif, tracing-subscriber) |
//! | `bench` | `cairn::bench`: the benchmark workloads W1-W6 and the raw ceiling, which empty the database they run on; with `cli`, the `cairn bench` command |
//! | `testing` | `cairn::testing`: the test kit, `Scenario` (transitions as pure functions) and `CrashTest` (a crash before and after every commit) |
//!
//! ## Quick start
//!
//! ```no_run
//! use cairn::{Host, Ports, Registry};
//! # use cairn::{Context, Event, Fault, Next, Orchestration};
//! # struct MyOrder;
//! # impl Orchestration for MyOrder {
//! #     const NAME: &'static str = "my-order"; const VERSION: u32 = 1;
//! #     type Input = (); type State = (); type Output = ();
//! #     fn start(_: &mut Context, _: ()) -> Result<Next<Self>, Fault> { Ok(Next::Complete(())) }
//! #     fn on_event(_: &mut Context, _: (), _: Event) -> Result<Next<Self>, Fault> { Ok(Next::Complete(())) }
//! # }
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let store = cairn::store::open("sqlite://cairn.db").await?;
//! store.migrate().await?;
//! let registry = Registry::new().register::<MyOrder>();
//! let ports = Ports::new().function("payment", |_msg| async { Ok(None) });
//! let host = Host::new(store, registry, ports);
//! let client = host.client();
//! client.start("my-order", serde_json::json!(null)).await?;
//! host.run(tokio_util::sync::CancellationToken::new()).await?;
//! # Ok(()) }
//! ```

#![warn(missing_docs)]

#[cfg(feature = "bench")]
pub mod bench;
pub mod call;
#[cfg(feature = "cli")]
pub mod cli;
pub mod clock;
pub mod codec;
#[cfg(feature = "console")]
pub mod console;
mod context;
pub mod filter;
pub mod host;
mod orchestration;
pub mod registry;
pub mod store;
#[cfg(feature = "testing")]
pub mod testing;
pub mod upgrade;

pub use call::{Call, Called};
pub use context::{Context, Delay, Effect, Receive, ScopeKind, StartedBy};
pub use host::ports::{
    Delivering, FilePort, HttpPort, OutboundMessage, PortError, Ports, RetryPolicy, SendPort,
};
pub use host::{Client, ClientError, Host, HostConfig, HostError, HostStats};
pub use orchestration::{
    BodyError, Correlation, Event, Fault, Message, Next, OnFault, Orchestration, ScopeFault,
    StoredState, UnexpectedEvent, WrongVersion,
};
pub use registry::Registry;
