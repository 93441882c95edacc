//! The `cairn` binary: the engine's command-line tool with the sample orchestrations registered.

use std::process::ExitCode;
use std::sync::Arc;

use cairn::cli::App;
use cairn_orchestrations::{demo_messages, ports, registry};

fn main() -> ExitCode {
    cairn::cli::main(App {
        registry: registry(),
        ports: Arc::new(|client| ports::sample_ports(client, ports::Ledger::from_env())),
        demo: Arc::new(demo_messages),
    })
}
