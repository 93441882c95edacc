//! The `cairn` command-line tool, as building blocks for an application's `main`.
//!
//! An application registers its orchestrations and send ports in an [`App`] and hands it to
//! [`main`]; the binary then offers `migrate`, `host`, `demo`, `start`, `publish`, `list`, `show`,
//! `suspend`, `resume` and `terminate` against the database named by `--database` (or
//! `CAIRN_DATABASE_URL`, default `sqlite://cairn.db`).
//!
//! Only `cairn migrate`, `cairn host --migrate` and `cairn demo` change the schema on
//! PostgreSQL; every other command checks that the schema is the one this build carries and
//! refuses otherwise, so that it can run under a role with no right to change the schema
//! (`docs/operations.md`). On SQLite (an embedded file one process owns) every command migrates.
//! A URL is only ever shown redacted ([`crate::store::redact_url`]).

#[cfg(feature = "console")]
mod console;
mod ops;
mod send;
pub mod versions;
#[cfg(feature = "console")]
pub use console::ConsoleCommand;
pub use ops::{parse_duration, parse_time, LogFormat};
pub use send::{DeadLetterCommand, OutboxCommand};

use std::collections::BTreeMap;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::host::receive::{HttpSettings, HttpToken, ReceiveLocation};
use crate::host::{Client, ClientError, Host, HostConfig, HostError};
use crate::store::{
    redact_url, ControlAction, InstanceStatus, NewMessage, PublishOutcome, Store, StoreError,
};
use crate::{codec, Ports, Registry};

/// What an application hands to [`main`].
pub struct App {
    /// The orchestrations the host runs.
    pub registry: Registry,
    /// Builds the send ports; a port may publish back through the client it is given.
    pub ports: Arc<dyn Fn(Client) -> Ports + Send + Sync>,
    /// The messages `cairn demo` publishes for its `i`-th instance (the first one activates it),
    /// given the instance number and a run id to keep message ids unique.
    pub demo: DemoFeed,
}

/// The messages `cairn demo` publishes for its `i`-th instance, given `i` and a run id.
pub type DemoFeed = Arc<dyn Fn(usize, &str) -> Vec<NewMessage> + Send + Sync>;

/// Command-line arguments.
#[derive(Debug, Parser)]
#[command(
    name = "cairn",
    version,
    about = "Cairn: durable orchestrations on SQLite or PostgreSQL"
)]
pub struct Cli {
    /// The database: sqlite://PATH (created if missing) or postgres://USER@HOST/DB.
    #[arg(
        long,
        global = true,
        env = "CAIRN_DATABASE_URL",
        // `--help` would otherwise show the variable's value, password included.
        hide_env_values = true,
        default_value = "sqlite://cairn.db"
    )]
    pub database: String,
    /// How log lines are written to stderr: text, or one JSON object per line carrying the
    /// fields of its spans (instance id, orchestration, version, step, reason).
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create or upgrade the database schema: the only command (with `host --migrate` and
    /// `demo`) that changes it on PostgreSQL; run it as the role that owns the schema.
    Migrate,
    /// Run the engine host until stopped (SIGINT or SIGTERM saves every instance, then exits).
    Host {
        /// Exit once no instance has work left and no timer is due within a few seconds.
        #[arg(long)]
        until_idle: bool,
        /// Save and drop an instance from memory after it has been idle this long.
        #[arg(long, default_value_t = 1000)]
        dehydrate_after_ms: u64,
        /// Look for new work this often when nothing wakes the host.
        #[arg(long, default_value_t = 100)]
        poll_ms: u64,
        /// How long this host's lease on an instance lasts without renewal; after a crash,
        /// other hosts take its instances over once their leases expire (PostgreSQL).
        #[arg(long, default_value_t = 30_000)]
        lease_ms: u64,
        /// Poison protection: suspend an instance, naming the message, once a message has been
        /// delivered this many times without being consumed.
        #[arg(long, default_value_t = 10)]
        max_deliveries: u32,
        /// Dead-letter a message no subscription has matched for this many seconds.
        #[arg(long, default_value_t = 7 * 24 * 3600)]
        unrouted_ttl_s: u64,
        /// A folder to take messages from: each *.json file dropped there is one message
        /// ({"type", "id"?, "properties"?, "body"}), removed once committed.
        #[arg(long, value_name = "DIR")]
        file_drop: Option<std::path::PathBuf>,
        /// Listen for messages on HTTP (POST /messages with the same JSON), e.g. 127.0.0.1:8080.
        #[arg(long, value_name = "ADDR")]
        http: Option<std::net::SocketAddr>,
        /// Apply pending migrations before starting, like `cairn migrate` (PostgreSQL: needs the
        /// schema owner's rights). Without it, a host on PostgreSQL refuses a schema that is
        /// not the one this build carries.
        #[arg(long)]
        migrate: bool,
        /// The largest message body, as JSON text, any door accepts (the publish API, the
        /// `inbox` table, the file drop, HTTP); larger ones are refused with a clear error.
        #[arg(long, value_name = "N", env = "CAIRN_MAX_MESSAGE_BYTES", default_value_t = crate::store::DEFAULT_MAX_MESSAGE_BYTES)]
        max_message_bytes: usize,
        /// Require `Authorization: Bearer TOKEN` on every HTTP request (else 401). Prefer the
        /// environment variable: a command line is visible to other users of the machine.
        #[arg(
            long,
            value_name = "TOKEN",
            env = "CAIRN_HTTP_TOKEN",
            hide_env_values = true
        )]
        http_token: Option<HttpToken>,
        /// Close an HTTP connection whose request head (line and headers) takes longer than this
        /// to arrive, or that waits longer than this for its next request.
        #[arg(long, value_name = "MS", default_value_t = 10_000)]
        http_header_timeout_ms: u64,
        /// Close an HTTP connection on which nothing moves for this long while no request is
        /// being answered (a stalled request body).
        #[arg(long, value_name = "MS", default_value_t = 60_000)]
        http_idle_timeout_ms: u64,
        /// Serve at most this many HTTP connections at once; more wait to be accepted.
        #[arg(long, value_name = "N", default_value_t = 1024)]
        http_max_connections: usize,
        /// Also serve the operations console (docs/console.md) on this address, e.g.
        /// 127.0.0.1:8081.
        #[arg(long, value_name = "ADDR")]
        console: Option<std::net::SocketAddr>,
        /// The token the console's actions need (read-only without it). Prefer the environment
        /// variable: a command line is visible to other users of the machine.
        #[arg(
            long,
            value_name = "TOKEN",
            env = "CAIRN_CONSOLE_TOKEN",
            hide_env_values = true
        )]
        console_token: Option<String>,
        /// Serve Prometheus metrics on GET /metrics, with GET /healthz and GET /readyz, at this
        /// address (e.g. 127.0.0.1:9464); see docs/operations.md.
        #[arg(long, value_name = "ADDR")]
        metrics: Option<std::net::SocketAddr>,
        /// Delete ended instances (completed, failed, terminated) this long after they ended,
        /// with their history, messages and sends: 90s, 30m, 12h, 7d; 0 keeps them forever.
        #[arg(long, value_name = "DURATION", default_value = "7d", value_parser = parse_duration)]
        retain_ended: Duration,
        /// Before deleting an ended instance, append it with its history as one JSON line to
        /// DIR/cairn-archive-YYYY-MM-DD.jsonl.
        #[arg(long, value_name = "DIR")]
        archive: Option<std::path::PathBuf>,
    },
    /// Delete ended instances (completed, failed, terminated) that ended before a time, with
    /// everything that belonged to them; what a host's --retain-ended does on its own.
    Purge {
        /// Only instances that ended before this time: RFC 3339 (2026-11-21T00:00:00Z) or a
        /// duration ago (30d).
        #[arg(long, value_name = "TIME", value_parser = parse_time)]
        ended_before: chrono::DateTime<chrono::Utc>,
        /// Only instances of this orchestration.
        #[arg(long, value_name = "NAME")]
        orchestration: Option<String>,
        /// Count what would be deleted, and delete nothing.
        #[arg(long)]
        dry_run: bool,
        /// Before deleting, append each instance with its history as one JSON line to
        /// DIR/cairn-archive-YYYY-MM-DD.jsonl.
        #[arg(long, value_name = "DIR")]
        archive: Option<std::path::PathBuf>,
        /// Instances deleted per transaction.
        #[arg(long, value_name = "N", default_value_t = 500)]
        batch: u32,
    },
    /// Run the host with the sample orchestrations and feed it instances; shows progress and a
    /// summary, and returns when every instance it started has ended.
    Demo {
        /// How many instances to start.
        #[arg(long, default_value_t = 30)]
        instances: usize,
    },
    /// Start an instance of an orchestration.
    Start {
        /// The orchestration's name.
        orchestration: String,
        /// Its input, as JSON.
        #[arg(long, default_value = "null")]
        input: String,
        /// The largest input, as JSON text, accepted.
        #[arg(long, value_name = "N", env = "CAIRN_MAX_MESSAGE_BYTES", default_value_t = crate::store::DEFAULT_MAX_MESSAGE_BYTES)]
        max_message_bytes: usize,
    },
    /// Publish a message; it is routed to the instance that waits for it, or starts one.
    Publish {
        /// The message type.
        message_type: String,
        /// The body, as JSON.
        #[arg(long)]
        body: String,
        /// The message id (a second publish with the same id is ignored).
        #[arg(long)]
        id: Option<String>,
        /// A routing property, KEY=VALUE (repeatable); top-level body fields are promoted too.
        #[arg(long = "property", value_name = "KEY=VALUE")]
        properties: Vec<String>,
        /// The largest body, as JSON text, accepted.
        #[arg(long, value_name = "N", env = "CAIRN_MAX_MESSAGE_BYTES", default_value_t = crate::store::DEFAULT_MAX_MESSAGE_BYTES)]
        max_message_bytes: usize,
    },
    /// List instances, most recently changed first.
    List {
        /// Only instances with this status.
        #[arg(long)]
        status: Option<InstanceStatus>,
        /// At most this many.
        #[arg(long, default_value_t = 50)]
        limit: u32,
    },
    /// Show one instance: its state as JSON, what it waits for, and its history.
    Show {
        /// The instance id.
        id: Uuid,
        /// Print only the stored state's bytes, in hex (for a test fixture).
        #[arg(long)]
        state_bytes: bool,
    },
    /// Print an instance's stored state as a JSON fixture for the test kit
    /// (`cairn::testing::upgraded`): orchestration, version, step and the state's bytes in hex.
    Export {
        /// The instance id.
        id: Uuid,
    },
    /// Move the waiting instances (dehydrated, suspended, and running ones once their host lets
    /// them go) of an orchestration to another version, each in a persistence point of its own
    /// (history reason `upgrade`), through the new version's `Orchestration::upgrade`. An
    /// instance whose migration fails stays on its version, unchanged, and is listed. Safe to run
    /// again after a crash, and beside running hosts.
    Upgrade {
        /// The orchestration's name.
        orchestration: String,
        /// The version to move to (registered in this build).
        #[arg(long)]
        to: u32,
        /// Only instances on this version (default: every version below --to).
        #[arg(long)]
        from: Option<u32>,
        /// Decode and migrate every instance, write nothing; report how many would move and
        /// every failure.
        #[arg(long)]
        dry_run: bool,
        /// Move at most this many.
        #[arg(long)]
        limit: Option<u64>,
        /// How long to wait for instances hosts hold in memory before reporting them as pending.
        #[arg(long, value_name = "DURATION", default_value = "60s", value_parser = parse_duration)]
        wait: Duration,
    },
    /// Instances per orchestration and version, by status, and which running hosts register
    /// each version.
    Versions,
    /// Suspend an instance at its last persistence point.
    Suspend {
        /// The instance id.
        id: Uuid,
        /// Why (shown in last_error).
        #[arg(long, default_value = "suspended from the command line")]
        reason: String,
    },
    /// Resume a suspended instance from its last persistence point; the messages it had
    /// received since are delivered again.
    Resume {
        /// The instance id.
        id: Uuid,
        /// Resume even an instance suspended as not resumable whose state this build does not
        /// read either (without it, such an instance is resumed once this build reads its state).
        #[arg(long)]
        force: bool,
    },
    /// End an instance, cancelling its waits.
    Terminate {
        /// The instance id.
        id: Uuid,
        /// Why (shown in last_error).
        #[arg(long, default_value = "terminated from the command line")]
        reason: String,
    },
    /// Serve the operations console (docs/console.md) against --database until stopped
    /// (SIGINT or SIGTERM).
    #[cfg(feature = "console")]
    Console(console::ConsoleCommand),
    /// List, show, resubmit and purge dead letters.
    #[command(subcommand)]
    DeadLetters(send::DeadLetterCommand),
    /// Steer sends waiting in the outbox: resume a held one, dead-letter one.
    #[command(subcommand)]
    Outbox(send::OutboxCommand),
    /// Run the benchmark workloads (see `docs/performance.md`) on a database of their own, which
    /// is emptied before each run: without --database, a SQLite file in the temp folder.
    #[cfg(feature = "bench")]
    Bench {
        /// A workload to run (repeatable); all of them when none is given.
        #[arg(long, value_enum, ignore_case = true)]
        workload: Vec<crate::bench::Workload>,
        /// Instances per workload (each workload has its own default).
        #[arg(long)]
        instances: Option<usize>,
        /// Runs of each workload; the figures are their medians, with the spread.
        #[arg(long, default_value_t = 1)]
        runs: usize,
        /// One JSON object per line per figure instead of a table.
        #[arg(long)]
        json: bool,
        /// Also append the figures, one JSON object per line, to this file.
        #[arg(long, value_name = "PATH")]
        json_file: Option<std::path::PathBuf>,
        /// Callers for the one-call-at-a-time figures of W1, W4 and W8: tasks that each start
        /// one instance or publish one message per call.
        #[arg(long, default_value_t = crate::bench::DEFAULT_CALLERS)]
        callers: usize,
        /// W2 also with its starts made by a separate client on its own connections, which the
        /// host hears of only through the database.
        #[arg(long)]
        from_process: bool,
        /// W4 with this many filtered activating subscriptions on its message type besides
        /// (filters no message passes, each evaluated on every message): what filters cost
        /// routing.
        #[arg(long, default_value_t = 0)]
        filtered_subscriptions: usize,
        /// The hosts keep Prometheus metrics and serve them on a loopback port (to measure
        /// what metrics cost: W1 with and without).
        #[arg(long)]
        metrics: bool,
        /// W7: how long it runs (e.g. 10m).
        #[arg(long, value_name = "DURATION", default_value = "10m", value_parser = parse_duration)]
        duration: Duration,
        /// W7: orchestrations started per second.
        #[arg(long, value_name = "N", default_value_t = 200.0)]
        rate: f64,
        /// W7: how long an ended instance is kept before the host deletes it (e.g. 1m).
        #[arg(long, value_name = "DURATION", default_value = "1m", value_parser = parse_duration)]
        retain_ended: Duration,
    },
}

/// Errors the CLI reports.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CliError {
    /// The database could not be opened or migrated, or its schema is not this build's.
    #[error("cannot use the database {url}: {source}{}", open_hint(source))]
    Open {
        /// The URL given, redacted ([`redact_url`]).
        url: String,
        /// Why.
        source: StoreError,
    },
    /// A store call failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A client call failed.
    #[error(transparent)]
    Client(#[from] ClientError),
    /// The host stopped on an error.
    #[error(transparent)]
    Host(#[from] HostError),
    /// A JSON argument did not parse.
    #[error("{what} is not valid JSON: {source}\nhint: quote it for the shell, e.g. --body '{{\"order_id\": \"42\"}}'")]
    Json {
        /// Which argument.
        what: &'static str,
        /// The parse error.
        source: serde_json::Error,
    },
    /// A --property without `=`.
    #[error("--property {0:?} is not KEY=VALUE")]
    Property(String),
    /// No such instance.
    #[error("no instance {0}\nhint: `cairn list` shows the instances")]
    NoInstance(Uuid),
    /// Nothing matched what the operator named.
    #[error("{0}")]
    NotFound(String),
    /// A benchmark failed.
    #[cfg(feature = "bench")]
    #[error(transparent)]
    Bench(#[from] crate::bench::BenchError),
    /// The console's benchmark failed.
    #[cfg(feature = "console")]
    #[error(transparent)]
    ConsoleBench(#[from] crate::console::bench::ConsoleBenchError),
    /// Setting up the runtime or signals failed.
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// Parses the command line and runs it; the whole of an application's `main`.
pub fn main(app: App) -> ExitCode {
    let cli = Cli::parse();
    let default_level = match cli.command {
        Command::Host { .. } => "info",
        _ => "warn",
    };
    let telemetry = ops::init_logging(cli.log_format, default_level);
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(run(cli, app));
    // Whatever still runs (a task the host gave up on at shutdown) does not hold up the exit.
    runtime.shutdown_timeout(EXIT_WITHIN);
    drop(telemetry);
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn open_hint(source: &StoreError) -> &'static str {
    match source {
        // It says what to do itself.
        StoreError::Schema(_) => "",
        _ => "\nhint: check --database / CAIRN_DATABASE_URL",
    }
}

/// What a command does about the database schema when it opens the database.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum SchemaUse {
    /// Apply pending migrations (`cairn migrate`, `cairn host --migrate`, `cairn demo`).
    Migrate,
    /// PostgreSQL: check that the schema is this build's ([`Maintenance::check_schema`](crate::store::Maintenance::check_schema)) and change
    /// nothing, so that the command runs under a role that cannot change the schema. SQLite (one
    /// process owns the file; there are no roles): migrate.
    Check,
}

/// Opens the database, and migrates it or checks its schema.
///
/// # Errors
/// [`CliError::Open`] (with the URL redacted): the database cannot be opened or migrated, or its
/// schema is not this build's.
pub async fn open_store(url: &str, schema: SchemaUse) -> Result<Arc<dyn Store>, CliError> {
    let open = |source| CliError::Open {
        url: redact_url(url),
        source,
    };
    let store = crate::store::open(url).await.map_err(open)?;
    let checked = match schema {
        SchemaUse::Check if store.backend() == "postgres" => store.check_schema().await,
        _ => store.migrate().await,
    };
    if let Err(e) = checked {
        store.close().await;
        return Err(open(e));
    }
    Ok(store)
}

impl Command {
    /// What this command does about the schema.
    pub fn schema_use(&self) -> SchemaUse {
        match self {
            Command::Migrate | Command::Demo { .. } | Command::Host { migrate: true, .. } => {
                SchemaUse::Migrate
            }
            #[cfg(feature = "console")]
            Command::Console(c) if c.fill.is_some() => SchemaUse::Migrate,
            _ => SchemaUse::Check,
        }
    }

    /// Whether this command only reads, and so must not write anything either (it may run
    /// under a read-only role).
    fn reads_only(&self) -> bool {
        matches!(
            self,
            Command::List { .. }
                | Command::Show { .. }
                | Command::Export { .. }
                | Command::Versions
                | Command::Upgrade { dry_run: true, .. }
                | Command::DeadLetters(
                    send::DeadLetterCommand::List { .. } | send::DeadLetterCommand::Show { .. }
                )
        ) || self.console_reads_only()
    }
}

/// Runs one parsed command.
///
/// # Errors
/// [`CliError`], naming what went wrong and what to do.
pub async fn run(cli: Cli, app: App) -> Result<(), CliError> {
    #[cfg(feature = "bench")]
    if let Command::Bench { .. } = cli.command {
        return bench(cli).await;
    }
    let store = open_store(&cli.database, cli.command.schema_use()).await?;
    let result = execute(cli, app, store.clone()).await;
    // Bounded: with the database unreachable, closing its connections must not hold up the
    // exit (a host's shutdown is bounded the same way, `HostConfig::drain_timeout`).
    if tokio::time::timeout(CLOSE_WITHIN, store.close())
        .await
        .is_err()
    {
        tracing::warn!("closing the database connections took too long; exiting anyway");
    }
    result
}

/// How long closing the database connections may take when a command ends.
const CLOSE_WITHIN: Duration = Duration::from_secs(1);

/// How long tasks still running when a command ends may take before the process exits.
const EXIT_WITHIN: Duration = Duration::from_millis(500);

async fn execute(cli: Cli, app: App, store: Arc<dyn Store>) -> Result<(), CliError> {
    let client = Client::new(store.clone(), app.registry.clone());
    // Activating subscriptions exist as soon as the schema does, so that a message published
    // before any host has run starts its instance rather than waiting as unrouted. Commands
    // that only read write nothing (they may run under a read-only role).
    if !cli.command.reads_only() {
        build_host(&app, store.clone(), HostConfig::default())
            .sync_activations()
            .await?;
    }
    match cli.command {
        Command::Migrate => {
            println!(
                "the database at {} is up to date",
                redact_url(&cli.database)
            );
        }
        Command::Host {
            until_idle,
            dehydrate_after_ms,
            poll_ms,
            lease_ms,
            max_deliveries,
            unrouted_ttl_s,
            file_drop,
            http,
            migrate: _,
            max_message_bytes,
            http_token,
            http_header_timeout_ms,
            http_idle_timeout_ms,
            http_max_connections,
            console,
            console_token,
            metrics,
            retain_ended,
            archive,
        } => {
            if let Some(dir) = &archive {
                if !dir.is_dir() {
                    return Err(CliError::NotFound(format!(
                        "--archive {}: no such folder; create it first",
                        dir.display()
                    )));
                }
            }
            let config = HostConfig {
                retain_ended: (!retain_ended.is_zero()).then_some(retain_ended),
                archive,
                until_idle,
                dehydrate_after: Duration::from_millis(dehydrate_after_ms),
                poll_interval: Duration::from_millis(poll_ms),
                lease_duration: Duration::from_millis(lease_ms),
                max_deliveries,
                unrouted_ttl: Duration::from_secs(unrouted_ttl_s),
                max_message_bytes,
                ..HostConfig::default()
            };
            let mut host = build_host(&app, store.clone(), config);
            if let Some(dir) = file_drop {
                host = host.with_receive_location(ReceiveLocation::FileDrop {
                    dir,
                    poll: Duration::from_millis(poll_ms),
                });
            }
            if let Some(addr) = http {
                let settings = HttpSettings {
                    token: http_token,
                    header_read_timeout: Duration::from_millis(http_header_timeout_ms),
                    idle_timeout: Duration::from_millis(http_idle_timeout_ms),
                    max_connections: http_max_connections,
                };
                host = host.with_receive_location(ReceiveLocation::Http { addr, settings });
            }
            if let Some(addr) = metrics {
                let listener = std::net::TcpListener::bind(addr).map_err(|e| {
                    std::io::Error::new(
                        e.kind(),
                        format!("--metrics {addr}: cannot listen there: {e}"),
                    )
                })?;
                host = host.with_operations(listener);
            }
            let stop = CancellationToken::new();
            spawn_signal_handler(stop.clone())?;
            if let Some(addr) = console {
                console_beside_host(addr, console_token, &app, store.clone(), stop.clone()).await?;
            }
            host.run(stop).await?;
        }
        Command::Demo { instances } => demo(&app, store, instances, &cli.database).await?,
        Command::Start {
            orchestration,
            input,
            max_message_bytes,
        } => {
            let input = parse_json("--input", &input)?;
            let client = client.with_max_message_bytes(max_message_bytes);
            let id = client.start(&orchestration, input).await?;
            println!("{id}");
        }
        Command::Publish {
            message_type,
            body,
            id,
            properties,
            max_message_bytes,
        } => {
            let body = parse_json("--body", &body)?;
            let client = client.with_max_message_bytes(max_message_bytes);
            let mut props = BTreeMap::new();
            for p in properties {
                let (k, v) = p
                    .split_once('=')
                    .ok_or_else(|| CliError::Property(p.clone()))?;
                props.insert(k.to_owned(), v.to_owned());
            }
            let (id, outcome) = client.publish(&message_type, body, id, props).await?;
            match outcome {
                PublishOutcome::Routed(instance) => println!("{id}: routed to instance {instance}"),
                PublishOutcome::Unrouted => println!(
                    "{id}: stored as unrouted (nothing subscribes to {message_type:?} with these properties yet); \
                     it is routed when a matching receive appears"
                ),
                PublishOutcome::Duplicate => println!("{id}: already published; ignored"),
                PublishOutcome::ToPorts => {
                    println!("{id}: sent to the send ports that subscribe to {message_type:?}")
                }
                PublishOutcome::Zombie(instance) => println!(
                    "{id}: stored as a zombie of instance {instance}, which waited on its key and has ended \
                     (a late message; `cairn show {instance}` lists it)"
                ),
            }
        }
        Command::List { status, limit } => {
            let rows = store.list_instances(status, limit).await?;
            println!(
                "{:<36}  {:<18} {:>3}  {:<10}  {:<20}  waiting for / last error",
                "id", "orchestration", "v", "status", "step"
            );
            for r in rows {
                let note = r
                    .last_error
                    .clone()
                    .unwrap_or_else(|| r.waiting_for.clone());
                println!(
                    "{:<36}  {:<18} {:>3}  {:<10}  {:<20}  {}",
                    r.id,
                    r.orchestration,
                    r.version,
                    r.status,
                    r.step,
                    truncate(&note, 70)
                );
            }
        }
        Command::Show {
            id,
            state_bytes: true,
        } => versions::state_bytes(&*store, id).await?,
        Command::Export { id } => versions::export(&*store, id).await?,
        Command::Versions => versions::versions(&*store, &app.registry).await?,
        Command::Upgrade {
            orchestration,
            to,
            from,
            dry_run,
            limit,
            wait,
        } => {
            let plan = versions::plan(orchestration, to, from, dry_run, limit, wait);
            versions::run_upgrade(&*store, &app.registry, plan).await?
        }
        Command::Show { id, .. } => {
            let detail = store
                .instance_detail(id)
                .await?
                .ok_or(CliError::NoInstance(id))?;
            let s = &detail.summary;
            println!("instance      {}", s.id);
            println!("orchestration {} v{}", s.orchestration, s.version);
            println!("status        {}", s.status);
            println!("step          {}", s.step);
            println!(
                "waiting for   {}",
                if s.waiting_for.is_empty() {
                    "-"
                } else {
                    &s.waiting_for
                }
            );
            if let Some(t) = detail.next_timer_at {
                println!("next timer    {t}");
            }
            if let Some(e) = &s.last_error {
                println!("last error    {e}");
            }
            println!("created       {}", detail.created_at);
            println!("updated       {}", s.updated_at);
            match &detail.state {
                Some(bytes) => match codec::to_json(bytes) {
                    Ok(json) => println!(
                        "state\n{}",
                        serde_json::to_string_pretty(&json).unwrap_or_default()
                    ),
                    Err(e) => println!("state         (does not decode: {e})"),
                },
                None => println!("state         (not started)"),
            }
            if let Some(output) = &detail.output {
                println!(
                    "output\n{}",
                    serde_json::to_string_pretty(output).unwrap_or_default()
                );
            }
            if !detail.pending_messages.is_empty() {
                println!("messages waiting to be consumed");
                for (mid, ty) in &detail.pending_messages {
                    println!("  {mid}  {ty}");
                }
            }
            if !detail.zombies.is_empty() {
                println!("zombies (arrived after it ended; kept, not consumed)");
                for (mid, ty) in &detail.zombies {
                    println!("  {mid}  {ty}");
                }
            }
            println!("history");
            for h in &detail.history {
                let line = format!(
                    "  {:>3}  {:<10} {:<20} {:<10} {}  {}",
                    h.seq,
                    h.reason,
                    h.step,
                    h.status,
                    h.at,
                    h.detail.as_deref().unwrap_or_default()
                );
                println!("{}", line.trim_end());
            }
        }
        Command::Suspend { id, reason } => {
            control(&*store, id, ControlAction::Suspend { reason }).await?
        }
        Command::Resume { id, force } => {
            versions::resume(&*store, &app.registry, id, force).await?
        }
        Command::Terminate { id, reason } => {
            control(&*store, id, ControlAction::Terminate { reason }).await?
        }
        Command::DeadLetters(command) => send::dead_letters(&*store, command).await?,
        Command::Purge {
            ended_before,
            orchestration,
            dry_run,
            archive,
            batch,
        } => {
            let filter = crate::store::retention::PurgeFilter {
                ended_before,
                orchestration,
                limit: batch,
            };
            ops::purge(&*store, filter, archive, dry_run).await?
        }
        Command::Outbox(command) => send::outbox(&*store, command).await?,
        #[cfg(feature = "console")]
        Command::Console(command) => console::run(command, &app, store, &cli.database).await?,
        #[cfg(feature = "bench")]
        Command::Bench { .. } => return bench(cli).await,
    }
    Ok(())
}

/// `cairn bench`: the benchmark's own orchestrations on a database it may empty.
#[cfg(feature = "bench")]
async fn bench(cli: Cli) -> Result<(), CliError> {
    let Command::Bench {
        workload,
        instances,
        runs,
        json,
        json_file,
        callers,
        from_process,
        filtered_subscriptions,
        metrics,
        duration,
        rate,
        retain_ended,
    } = cli.command
    else {
        return Ok(());
    };
    let url = if cli.database == "sqlite://cairn.db"
        && std::env::var_os("CAIRN_DATABASE_URL").is_none()
    {
        format!(
            "sqlite://{}",
            std::env::temp_dir().join("cairn-bench.db").display()
        )
    } else {
        cli.database
    };
    let options = crate::bench::BenchOptions {
        workloads: if workload.is_empty() {
            crate::bench::Workload::ALL.to_vec()
        } else {
            workload
        },
        instances,
        runs,
        settings: crate::bench::Settings {
            metrics,
            duration,
            rate,
            retain: retain_ended,
            callers,
            from_process,
            filtered_subscriptions,
        },
    };
    let figures = crate::bench::run(&url, &options).await?;
    if let Some(path) = json_file {
        use std::io::Write as _;
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)?;
        for f in &figures {
            writeln!(file, "{}", serde_json::to_string(f).unwrap_or_default())?;
        }
    }
    if json {
        for f in &figures {
            println!("{}", serde_json::to_string(f).unwrap_or_default());
        }
    } else {
        print!("{}", crate::bench::table(&figures));
    }
    Ok(())
}

fn build_host(app: &App, store: Arc<dyn Store>, config: HostConfig) -> Host {
    let host = Host::new(store, app.registry.clone(), Ports::new()).with_config(config);
    let ports = (app.ports)(host.client());
    host.with_ports(ports)
}

async fn control(store: &dyn Store, id: Uuid, action: ControlAction) -> Result<(), CliError> {
    let status = store
        .control(id, action, chrono::Utc::now())
        .await
        .map_err(|e| match e {
            StoreError::NoSuchInstance(id) => CliError::NoInstance(id),
            other => CliError::Store(other),
        })?;
    println!("{id}: {status}");
    Ok(())
}

fn parse_json(what: &'static str, text: &str) -> Result<serde_json::Value, CliError> {
    serde_json::from_str(text).map_err(|source| CliError::Json { what, source })
}

fn truncate(text: &str, max: usize) -> String {
    if text.chars().count() <= max {
        text.to_owned()
    } else {
        let cut: String = text.chars().take(max.saturating_sub(1)).collect();
        format!("{cut}…")
    }
}

/// Cancels `stop` on SIGINT or SIGTERM.
///
/// # Errors
/// Signal handlers cannot be installed.
pub fn spawn_signal_handler(stop: CancellationToken) -> std::io::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM: saving instances and stopping"),
            _ = int.recv() => tracing::info!("SIGINT: saving instances and stopping"),
        }
        stop.cancel();
    });
    Ok(())
}

async fn demo(
    app: &App,
    store: Arc<dyn Store>,
    instances: usize,
    url: &str,
) -> Result<(), CliError> {
    let config = HostConfig {
        dehydrate_after: Duration::from_millis(500),
        poll_interval: Duration::from_millis(50),
        ..HostConfig::default()
    };
    let host = build_host(app, store.clone(), config);
    host.sync_activations().await?;
    let client = host.client();
    let stop = CancellationToken::new();
    spawn_signal_handler(stop.clone())?;
    let started_at = Instant::now();
    let running = tokio::spawn(host.run(stop.clone()));

    let run_id = Uuid::new_v4().simple().to_string()[..8].to_owned();
    let mut ids = Vec::with_capacity(instances);
    let mut followers = Vec::new();
    for chunk_start in (0..instances).step_by(100) {
        let mut batch = Vec::new();
        for i in chunk_start..(chunk_start + 100).min(instances) {
            let mut msgs = (app.demo)(i, &run_id).into_iter();
            if let Some(first) = msgs.next() {
                batch.push(first);
            }
            followers.extend(msgs);
        }
        for outcome in client.publish_batch(batch).await? {
            if let PublishOutcome::Routed(id) = outcome {
                ids.push(id);
            }
        }
    }
    // Decisions and other follow-up messages: those that arrive before their instance waits for
    // them stay unrouted until it does.
    if !followers.is_empty() {
        client.publish_batch(followers).await?;
    }

    let bar = indicatif::ProgressBar::new(ids.len() as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] {bar:40} {pos}/{len} instances ended {msg}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let mut upgrades = None;
    let summary = loop {
        // Once the first instances wait, dehydrated, move those of a version older than one
        // this build registers, as `cairn upgrade` does, while the host runs.
        if upgrades.is_none() && started_at.elapsed() > Duration::from_millis(700) {
            upgrades = Some(versions::demo_upgrades(&*store, &app.registry).await);
        }
        let summary = statuses(&*store, &ids).await?;
        let ended = summary
            .iter()
            .filter(|s| s.status.is_final() || s.status == InstanceStatus::Suspended)
            .count();
        bar.set_position(ended as u64);
        if ended == ids.len() || stop.is_cancelled() {
            break summary;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    bar.finish_and_clear();
    stop.cancel();
    let stats = match running.await {
        Ok(result) => result?,
        Err(e) => return Err(CliError::Io(std::io::Error::other(e))),
    };
    let elapsed = started_at.elapsed();

    let mut table: BTreeMap<(String, String), usize> = BTreeMap::new();
    for s in &summary {
        *table
            .entry((s.orchestration.clone(), s.status.to_string()))
            .or_default() += 1;
    }
    println!(
        "cairn demo: {} instances ended in {:.1} s",
        summary.len(),
        elapsed.as_secs_f64()
    );
    println!();
    println!("  {:<18} {:<10} {:>6}", "orchestration", "status", "count");
    for ((orch, status), n) in &table {
        println!("  {orch:<18} {status:<10} {n:>6}");
    }
    println!();
    let points: Vec<String> = stats
        .points
        .iter()
        .map(|(r, n)| format!("{r} {n}"))
        .collect();
    println!("  persistence points: {}", points.join(", "));
    println!("  events delivered:   {}", stats.events);
    for line in upgrades.unwrap_or_default() {
        println!("  {line}");
    }
    println!();
    let shell = match url.strip_prefix("sqlite://") {
        Some(path) => format!("sqlite3 {path}"),
        // No password on a command line a person copies: psql asks for it, or reads
        // PGPASSWORD or ~/.pgpass.
        None => format!(
            "psql '{}' -c \"SET search_path = cairn\" -c",
            crate::store::url_without_password(url)
        ),
    };
    println!("Look inside:");
    println!("  {shell} \"SELECT orchestration, status, COUNT(*) FROM instances GROUP BY 1, 2\"");
    println!("  {shell} \"SELECT reason, COUNT(*) FROM history GROUP BY reason\"");
    println!(
        "  {shell} \"SELECT instance_id, seq, reason, detail FROM history WHERE reason IN ('scope_end', 'compensate') ORDER BY 1, 2\""
    );
    println!("  cargo run -- list --status failed");
    Ok(())
}

async fn statuses(
    store: &dyn Store,
    ids: &[Uuid],
) -> Result<Vec<crate::store::InstanceSummary>, CliError> {
    let mut out = Vec::with_capacity(ids.len());
    for chunk in ids.chunks(500) {
        out.extend(store.instance_summaries(chunk).await?);
    }
    Ok(out)
}

#[cfg(feature = "console")]
use console::console_beside_host;

/// Without the `console` feature, `cairn host --console` says what is missing.
#[cfg(not(feature = "console"))]
async fn console_beside_host(
    _addr: std::net::SocketAddr,
    _token: Option<String>,
    _app: &App,
    _store: Arc<dyn Store>,
    _stop: CancellationToken,
) -> Result<(), CliError> {
    Err(CliError::NotFound(
        "this build of cairn has no console: build the cairn crate with feature `console`".into(),
    ))
}

#[cfg(not(feature = "console"))]
impl Command {
    fn console_reads_only(&self) -> bool {
        false
    }
}
