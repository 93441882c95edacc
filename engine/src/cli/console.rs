//! `cairn console` and `cairn host --console`: the operations console ([`crate::console`]) served
//! against the database; with `--fill` and `--time-pages`, its benchmark (`docs/console.md`).

use std::net::SocketAddr;
use std::sync::Arc;

use clap::Args;
use tokio_util::sync::CancellationToken;

use super::{spawn_signal_handler, App, CliError, Command};
use crate::console::{self, ConsoleSettings, ConsoleToken};
use crate::store::Store;

/// `cairn console`.
#[derive(Debug, Args)]
pub struct ConsoleCommand {
    /// The address to serve on.
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:8080")]
    pub http: SocketAddr,
    /// The token the console's actions need (read-only without it). Prefer the environment
    /// variable: a command line is visible to other users of the machine.
    #[arg(
        long,
        value_name = "TOKEN",
        env = "CAIRN_CONSOLE_TOKEN",
        hide_env_values = true
    )]
    pub console_token: Option<String>,
    /// Benchmark: first fill the database with N made-up instances (with their history, waits,
    /// dead letters, unrouted messages and held sends), in bulk SQL. For a database of its own.
    #[arg(long, value_name = "N")]
    pub fill: Option<u64>,
    /// Benchmark: time every page (RUNS times each, the median and the slowest printed), then
    /// exit instead of serving.
    #[arg(long, value_name = "RUNS", num_args = 0..=1, default_missing_value = "5")]
    pub time_pages: Option<usize>,
}

impl Command {
    /// `cairn console` without a token and without `--fill` writes nothing (it may run under a
    /// read-only role).
    pub(super) fn console_reads_only(&self) -> bool {
        matches!(self, Command::Console(c) if c.console_token.is_none() && c.fill.is_none())
    }
}

fn settings(token: Option<String>) -> Result<ConsoleSettings, CliError> {
    let token = token
        .map(|t| t.parse::<ConsoleToken>())
        .transpose()
        .map_err(|e| CliError::NotFound(format!("--console-token: {e}")))?;
    Ok(ConsoleSettings { token })
}

async fn bind(addr: SocketAddr) -> Result<tokio::net::TcpListener, CliError> {
    tokio::net::TcpListener::bind(addr).await.map_err(|e| {
        CliError::Io(std::io::Error::new(
            e.kind(),
            format!("cannot serve the console on {addr}: {e}\nhint: choose another address with --http (or --console)"),
        ))
    })
}

/// `cairn console`.
pub(super) async fn run(
    command: ConsoleCommand,
    app: &App,
    store: Arc<dyn Store>,
    url: &str,
) -> Result<(), CliError> {
    if let Some(n) = command.fill {
        let took = console::bench::fill(url, &*store, n).await?;
        eprintln!("filled {n} instances in {:.1} s", took.as_secs_f64());
    }
    let settings = settings(command.console_token)?;
    let listener = bind(command.http).await?;
    if let Some(runs) = command.time_pages {
        let mut figures =
            console::bench::time_pages(listener, store.clone(), app.registry.clone(), runs).await?;
        figures.push(console::bench::time_count(&*store, runs).await?);
        print!("{}", console::bench::table(&figures));
        return Ok(());
    }
    let addr = listener.local_addr()?;
    eprintln!(
        "cairn console: http://{addr}/ ({})",
        if settings.token.is_some() {
            "actions need the token"
        } else {
            "read-only: no --console-token"
        }
    );
    let stop = CancellationToken::new();
    spawn_signal_handler(stop.clone())?;
    console::serve(listener, store, app.registry.clone(), settings, stop).await?;
    Ok(())
}

/// `cairn host --console ADDR`: the console served beside the host until `stop`.
pub(super) async fn console_beside_host(
    addr: SocketAddr,
    token: Option<String>,
    app: &App,
    store: Arc<dyn Store>,
    stop: CancellationToken,
) -> Result<(), CliError> {
    let settings = settings(token)?;
    let listener = bind(addr).await?;
    let registry = app.registry.clone();
    tokio::spawn(async move {
        if let Err(e) = console::serve(listener, store, registry, settings, stop).await {
            tracing::error!(error = %e, "console: stopped serving");
        }
    });
    Ok(())
}
