//! Retention: ended instances deleted after a period, with everything that belonged to them
//! ([`crate::store::retention`] says what), by the host in the background
//! ([`HostConfig::retain_ended`](super::HostConfig::retain_ended)) and by `cairn purge`, both
//! through [`purge_ended`].
//!
//! A purge goes batch by batch ([`PurgeFilter::limit`] instances each, one short transaction),
//! pausing between batches as long as the batch took (at least `pause`, at most
//! [`MAX_PAUSE`]), so that it takes at most about half of the database's write time and
//! persistence points never wait behind it for longer than one batch (on SQLite the batch holds
//! the one write connection). With an archive folder, each batch's
//! instances are first written to `DIR/cairn-archive-YYYY-MM-DD.jsonl`, one JSON line per
//! instance with its history, and the file synced, before they are deleted: a crash in between
//! leaves them archived and not deleted, and they are archived again (a second line) when the
//! next purge deletes them.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::metrics::Metrics;
use crate::clock::SharedClock;
use crate::store::retention::{EndedInstance, PurgeFilter};
use crate::store::{Store, StoreError};

/// Pages an incremental vacuum gives back after each batch (SQLite).
const RECLAIM_PAGES: u32 = 2000;

/// The longest pause between two batches.
pub const MAX_PAUSE: Duration = Duration::from_millis(200);

/// What a purge did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PurgeTotals {
    /// Instances deleted.
    pub instances: u64,
    /// Rows deleted in all tables.
    pub rows: u64,
    /// Instances written to the archive.
    pub archived: u64,
}

/// Errors of a purge.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PurgeError {
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The archive could not be written; nothing of the batch was deleted.
    #[error("cannot write the archive {path}: {source}; nothing of this batch was deleted (check the folder exists and is writable, or leave out --archive)")]
    Archive {
        /// The archive file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

/// The archive file a purge at `now` appends to in `dir`.
pub fn archive_file(dir: &Path, now: chrono::DateTime<chrono::Utc>) -> PathBuf {
    dir.join(format!("cairn-archive-{}.jsonl", now.format("%Y-%m-%d")))
}

/// Appends `instances` to `path`, one JSON line each, and syncs the file.
async fn archive(path: PathBuf, instances: &[EndedInstance]) -> Result<(), PurgeError> {
    let mut text = String::new();
    for instance in instances {
        // An instance always serializes: plain strings, numbers and times.
        if let Ok(line) = serde_json::to_string(instance) {
            text.push_str(&line);
            text.push('\n');
        }
    }
    let at = path.clone();
    let written = tokio::task::spawn_blocking(move || -> std::io::Result<()> {
        use std::io::{Read, Seek, SeekFrom, Write};
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .read(true)
            .append(true)
            .open(&at)?;
        // A line a crash cut short stays alone on its line.
        if file.metadata()?.len() > 0 {
            let mut last = [0u8];
            file.seek(SeekFrom::End(-1))?;
            file.read_exact(&mut last)?;
            if last[0] != b'\n' {
                file.write_all(b"\n")?;
            }
        }
        file.write_all(text.as_bytes())?;
        file.sync_all()
    })
    .await
    .unwrap_or_else(|e| Err(std::io::Error::other(e)));
    written.map_err(|source| PurgeError::Archive { path, source })
}

/// Purges the instances `filter` selects, batch by batch, until none is left, `stop` is
/// cancelled, or another host holds the turn (PostgreSQL); archives each batch first into
/// `archive_dir` when given. Pauses between batches as long as the batch took, at least `pause`.
///
/// # Errors
/// The store failed, or the archive could not be written (that batch is not deleted).
pub async fn purge_ended(
    store: &dyn Store,
    filter: &PurgeFilter,
    archive_dir: Option<&Path>,
    clock: &SharedClock,
    pause: Duration,
    stop: &CancellationToken,
) -> Result<PurgeTotals, PurgeError> {
    let mut totals = PurgeTotals::default();
    loop {
        let began = std::time::Instant::now();
        let batch = store.purgeable(filter, archive_dir.is_some()).await?;
        if batch.is_empty() {
            break;
        }
        if let Some(dir) = archive_dir {
            archive(archive_file(dir, clock.now()), &batch).await?;
            totals.archived += batch.len() as u64;
        }
        let ids: Vec<_> = batch.iter().map(|i| i.id).collect();
        let purged = store.purge(&ids, filter).await?;
        if purged.not_our_turn {
            tracing::debug!("another host is purging; leaving it to that host");
            break;
        }
        totals.instances += purged.instances;
        totals.rows += purged.rows;
        if purged.instances > 0 {
            store.reclaim_space(RECLAIM_PAGES).await?;
        }
        // Less than a full batch was all there was, or the rest is held back by something
        // (a send still pending): it is looked at again next time.
        if batch.len() < filter.limit as usize || purged.instances == 0 {
            break;
        }
        let rest = began.elapsed().clamp(pause, MAX_PAUSE.max(pause));
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = tokio::time::sleep(rest) => {}
        }
    }
    Ok(totals)
}

/// What the host's retention task needs.
pub(super) struct Retainer {
    pub store: Arc<dyn Store>,
    pub clock: SharedClock,
    /// How long an ended instance is kept.
    pub retain: Duration,
    /// Instances per batch.
    pub batch: u32,
    /// How often to look.
    pub interval: Duration,
    pub archive: Option<PathBuf>,
    pub metrics: Option<Arc<Metrics>>,
}

impl Retainer {
    /// Purges every `interval` until `stop` is cancelled.
    pub(super) async fn run(self, stop: CancellationToken) {
        let mut tick = tokio::time::interval(self.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let retain = chrono::Duration::from_std(self.retain).unwrap_or(chrono::Duration::MAX);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tick.tick() => {}
            }
            let now = self.clock.now();
            let filter = PurgeFilter {
                ended_before: now
                    .checked_sub_signed(retain)
                    .unwrap_or(chrono::DateTime::<chrono::Utc>::MIN_UTC),
                orchestration: None,
                limit: self.batch,
            };
            let pause = Duration::from_millis(10);
            match purge_ended(
                self.store.as_ref(),
                &filter,
                self.archive.as_deref(),
                &self.clock,
                pause,
                &stop,
            )
            .await
            {
                Ok(totals) if totals.instances > 0 => {
                    if let Some(metrics) = &self.metrics {
                        metrics.purged(totals.instances);
                    }
                    tracing::info!(instances = totals.instances, rows = totals.rows,
                        archived = totals.archived, ended_before = %filter.ended_before,
                        "purged ended instances past the retention period");
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "purging ended instances failed; retrying at the next interval")
                }
            }
        }
    }
}
