//! This host's leases: the heartbeat that renews them while the host runs, and giving them up
//! when it stops, within [`RELEASE_WITHIN`].

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::clock::SharedClock;
use crate::store::Store;

/// At shutdown, how long giving up the leases may take after the drain (the database may be
/// unreachable: the leases then expire on their own).
pub const RELEASE_WITHIN: Duration = Duration::from_secs(1);

/// Renews the leases of `host` every third of `lease`, until `stop` is cancelled.
pub(super) async fn heartbeat(
    store: Arc<dyn Store>,
    clock: SharedClock,
    host: String,
    lease: Duration,
    stop: CancellationToken,
) {
    let mut tick = tokio::time::interval(lease / 3);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {
                let now = clock.now();
                let until = now + chrono::Duration::from_std(lease).unwrap_or_default();
                if let Err(e) = store.heartbeat(&host, now, until).await {
                    tracing::warn!(error = %e, "lease renewal failed; retrying at the next beat");
                }
            }
        }
    }
}

/// Gives up every lease `host` holds, at shutdown: within [`RELEASE_WITHIN`], or they expire
/// on their own.
pub(super) async fn release(store: &dyn Store, host: &str, clock: &SharedClock) {
    match tokio::time::timeout(RELEASE_WITHIN, store.release(host, clock.now())).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "could not give up leases at shutdown; they expire on their own");
        }
        Err(_) => {
            tracing::warn!("giving up leases at shutdown took too long; they expire on their own")
        }
    }
}
