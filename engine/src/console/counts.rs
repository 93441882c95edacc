//! The overview's table of instances by orchestration, version and status, kept for a few
//! seconds.
//!
//! Counting a million instances reads a whole index: about 200 ms on SQLite, too slow to do for
//! every page view and pointless to do for every operator at once. The console keeps the last
//! count for [`MAX_AGE`]: a view within it shows the count kept (and says when it was taken); a
//! later view shows it too while one count runs in the background to replace it. Only the very
//! first view, before any count, waits for one, and the console starts that count as it starts.
//! What needs to be live is not here: the overview's suspended, dead-letter, unrouted, zombie
//! and held counts are read at each view, each from a small index range.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};

use crate::store::console::DefinitionCount;
use crate::store::{Store, StoreError, StoreResult};

/// How long a count is shown before a view starts another.
pub const MAX_AGE: Duration = Duration::from_secs(15);

/// A count and when it was taken.
#[derive(Debug, Clone)]
pub struct Counted {
    /// When the count was taken.
    pub at: DateTime<Utc>,
    taken: Instant,
    /// The counts.
    pub counts: Vec<DefinitionCount>,
}

/// The count kept, shared by every view.
#[derive(Debug, Default)]
pub struct CountCache {
    kept: tokio::sync::Mutex<Option<Counted>>,
    refreshing: AtomicBool,
}

async fn count(store: &dyn Store) -> StoreResult<Counted> {
    let reads = store
        .console()
        .ok_or_else(|| StoreError::Corrupt("this store has no console queries".to_owned()))?;
    let at = Utc::now();
    let taken = Instant::now();
    let counts = reads.definition_counts().await?;
    Ok(Counted { at, taken, counts })
}

impl CountCache {
    /// The count to show: the one kept (starting another in the background when it is older
    /// than [`MAX_AGE`]), or, when none was taken yet, a new one.
    ///
    /// # Errors
    /// The first count failed.
    pub async fn get(self: &Arc<Self>, store: &Arc<dyn Store>) -> StoreResult<Counted> {
        let mut kept = self.kept.lock().await;
        match &*kept {
            Some(c) if c.taken.elapsed() < MAX_AGE => Ok(c.clone()),
            Some(c) => {
                let c = c.clone();
                drop(kept);
                self.refresh_in_background(store.clone());
                Ok(c)
            }
            None => {
                // Views that come meanwhile wait for this one count rather than start theirs.
                let c = count(&**store).await?;
                *kept = Some(c.clone());
                Ok(c)
            }
        }
    }

    /// Starts a count in the background, unless one runs; it replaces the one kept.
    pub fn refresh_in_background(self: &Arc<Self>, store: Arc<dyn Store>) {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        if self.refreshing.swap(true, Ordering::AcqRel) {
            return;
        }
        let cache = self.clone();
        runtime.spawn(async move {
            match count(&*store).await {
                Ok(c) => *cache.kept.lock().await = Some(c),
                Err(e) => tracing::warn!(error = %e, "console: counting instances failed"),
            }
            cache.refreshing.store(false, Ordering::Release);
        });
    }
}
