//! The operator's verbs for sends: `cairn dead-letters ...` and `cairn outbox ...`.
//!
//! Each has a plain-SQL equivalent, given in `docs/send-ports.md`.

use chrono::{DateTime, Utc};
use clap::Subcommand;

use super::{truncate, CliError};
use crate::store::Store;

/// `cairn dead-letters ...`
#[derive(Debug, Subcommand)]
pub enum DeadLetterCommand {
    /// List dead letters, newest first.
    List {
        /// At most this many.
        #[arg(long, default_value_t = 50)]
        limit: u32,
    },
    /// Show one dead letter: why, how many attempts, and its body.
    Show {
        /// The message id.
        id: String,
    },
    /// Put a dead-lettered send back into the outbox under the same id, its attempts reset;
    /// a running host delivers it.
    Resubmit {
        /// The message ids.
        #[arg(required = true)]
        ids: Vec<String>,
    },
    /// Delete dead letters: these ids, or those older than --before, or (with --all) every one.
    Purge {
        /// The message ids.
        ids: Vec<String>,
        /// Delete those dead before this time (RFC 3339, e.g. 2026-11-21T00:00:00Z).
        #[arg(long)]
        before: Option<DateTime<Utc>>,
        /// Delete every dead letter.
        #[arg(long)]
        all: bool,
    },
}

/// `cairn outbox ...`
#[derive(Debug, Subcommand)]
pub enum OutboxCommand {
    /// Let a held send (an ordered port stopped on it) be delivered again, its attempts reset;
    /// the port goes on from there.
    Resume {
        /// The message id.
        id: String,
    },
    /// Dead-letter a pending or held send now and tell its instance; an ordered port stopped
    /// on it goes on with the next message.
    DeadLetter {
        /// The message id.
        id: String,
        /// Why (kept in dead_letters.reason).
        #[arg(long, default_value = "dead-lettered by an operator")]
        reason: String,
    },
}

pub(super) async fn dead_letters(
    store: &dyn Store,
    command: DeadLetterCommand,
) -> Result<(), CliError> {
    match command {
        DeadLetterCommand::List { limit } => {
            let rows = store.dead_letters(limit).await?;
            println!(
                "{:<38} {:<14} {:<24} {:>8}  {:<20} reason",
                "id", "port", "type", "attempts", "dead at"
            );
            for d in rows {
                println!(
                    "{:<38} {:<14} {:<24} {:>8}  {:<20} {}",
                    d.id,
                    d.port.unwrap_or_default(),
                    truncate(&d.message_type, 24),
                    d.attempts,
                    d.dead_at.format("%Y-%m-%d %H:%M:%S"),
                    truncate(&d.reason, 80)
                );
            }
        }
        DeadLetterCommand::Show { id } => {
            let d = store
                .dead_letter(&id)
                .await?
                .ok_or_else(|| CliError::NotFound(format!("no dead letter {id}")))?;
            println!("id            {}", d.id);
            if let Some(instance) = d.instance_id {
                println!("instance      {instance}");
            }
            if let Some(port) = &d.port {
                println!("port          {port}");
            }
            println!("type          {}", d.message_type);
            println!("attempts      {}", d.attempts);
            println!("dead at       {}", d.dead_at.to_rfc3339());
            println!("reason        {}", d.reason);
            println!(
                "body          {}",
                serde_json::to_string_pretty(&d.body).unwrap_or_default()
            );
        }
        DeadLetterCommand::Resubmit { ids } => {
            for id in ids {
                if store.resubmit_dead_letter(&id, Utc::now()).await? {
                    println!("{id}: back in the outbox");
                } else {
                    return Err(CliError::NotFound(format!(
                        "no dead-lettered send {id} (`cairn dead-letters list` shows them)"
                    )));
                }
            }
        }
        DeadLetterCommand::Purge { ids, before, all } => {
            if ids.is_empty() && before.is_none() && !all {
                return Err(CliError::NotFound(
                    "name the dead letters to purge: ids, --before TIME or --all".into(),
                ));
            }
            let n = store.purge_dead_letters(&ids, before).await?;
            println!("{n} dead letter(s) purged");
        }
    }
    Ok(())
}

pub(super) async fn outbox(store: &dyn Store, command: OutboxCommand) -> Result<(), CliError> {
    match command {
        OutboxCommand::Resume { id } => {
            if store.resume_send(&id, Utc::now()).await? {
                println!("{id}: pending again");
            } else {
                return Err(CliError::NotFound(format!("no held send {id}")));
            }
        }
        OutboxCommand::DeadLetter { id, reason } => {
            let n = store
                .give_up_sends(std::slice::from_ref(&id), &reason, Utc::now())
                .await?;
            if n == 0 {
                return Err(CliError::NotFound(format!("no pending or held send {id}")));
            }
            println!("{id}: dead-lettered; its instance is told");
        }
    }
    Ok(())
}
