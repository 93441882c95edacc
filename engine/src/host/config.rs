//! [`HostConfig`]: a host's settings, and their defaults.

use std::time::Duration;

/// Settings of a host.
#[derive(Debug, Clone)]
pub struct HostConfig {
    /// How often to look for work when nothing woke the host.
    pub poll_interval: Duration,
    /// Messages (and timers) claimed per round.
    pub batch_size: u32,
    /// Up to how many instances started by the host's own client may wait in memory for the
    /// host ([`Client`](super::Client)); a start that would leave more waiting is stored for any host to claim.
    pub eager_backlog: usize,
    /// An instance idle this long is saved and dropped from memory (the `dehydrate` point).
    pub dehydrate_after: Duration,
    /// How long a lease on an instance lasts without renewal.
    pub lease_duration: Duration,
    /// How long a send stays locked to the host delivering it.
    pub outbox_lock: Duration,
    /// Concurrent deliveries.
    pub send_concurrency: usize,
    /// On shutdown, how long the host may take to stop: to finish the round under way, write
    /// the shutdown points and let running deliveries finish. Whatever is not done by then is
    /// dropped as a crash would drop it, and resumes from the last persistence point. Giving up
    /// the leases then takes at most [`RELEASE_WITHIN`](super::RELEASE_WITHIN) more, so that [`Host::run`](super::Host::run) returns
    /// within `drain_timeout` + 1 s of being asked to stop, even with the database unreachable.
    pub drain_timeout: Duration,
    /// With `until_idle`, a timer due within this horizon still counts as work.
    pub idle_horizon: Duration,
    /// Stop once there is nothing left to do (see [`Host::run`](super::Host::run)).
    pub until_idle: bool,
    /// Poison protection: a message claimed more than this many times without being consumed
    /// (its delivery crashed the host, panicked or failed the instance each time) suspends its
    /// instance, naming the message, instead of being delivered again.
    pub max_deliveries: u32,
    /// How often to look for operators' requests in the `control` table and for rows in the
    /// `inbox` table (at once again while the inbox has rows).
    pub control_interval: Duration,
    /// An unrouted message no subscription has matched for this long is dead-lettered.
    pub unrouted_ttl: Duration,
    /// How often to mark zombies and dead-letter expired unrouted messages.
    pub housekeeping_interval: Duration,
    /// The largest message body, as JSON text, that any door (the publish API, the CLI, the
    /// `inbox` table, the file drop, HTTP) accepts; larger ones are refused with a clear error.
    pub max_message_bytes: usize,
    /// How long an ended instance (completed, failed, terminated) is kept before the host
    /// deletes it with everything that belonged to it; `None` keeps them forever. Looked at
    /// every [`housekeeping_interval`](Self::housekeeping_interval). `None` by default for an
    /// embedding application; `cairn host` keeps them 7 days unless told otherwise.
    pub retain_ended: Option<Duration>,
    /// Ended instances deleted per transaction by the retention.
    pub retention_batch: u32,
    /// A folder the retention writes each instance to, with its history, as one JSON line,
    /// before deleting it.
    pub archive: Option<std::path::PathBuf>,
}

impl Default for HostConfig {
    fn default() -> Self {
        Self {
            poll_interval: Duration::from_millis(100),
            batch_size: 256,
            eager_backlog: 1024,
            dehydrate_after: Duration::from_secs(1),
            lease_duration: Duration::from_secs(30),
            outbox_lock: Duration::from_secs(60),
            send_concurrency: 64,
            drain_timeout: Duration::from_secs(5),
            idle_horizon: Duration::from_secs(2),
            until_idle: false,
            max_deliveries: 10,
            control_interval: Duration::from_millis(250),
            unrouted_ttl: Duration::from_secs(7 * 24 * 3600),
            housekeeping_interval: Duration::from_secs(5),
            max_message_bytes: crate::store::DEFAULT_MAX_MESSAGE_BYTES,
            retain_ended: None,
            retention_batch: 500,
            archive: None,
        }
    }
}
