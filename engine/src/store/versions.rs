//! The store's fifth side: versions of orchestrations side by side. What each host registers
//! (`hosts.registrations`), the instances `cairn upgrade` moves and the fenced point that moves
//! one, the report of `cairn versions`, and the instances that need an operator.
//!
//! An instance runs on the version it started with. A host claims work only for the versions it
//! registers (its `hosts.registrations`), so an instance goes to a host that can run it and waits,
//! untouched, while none can; [`Versions::needing_attention`] finds it then, with the reason. The
//! SQL behind each method is in `common/versions.rs`, once for both backends.

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use uuid::Uuid;

use super::{InstanceStatus, StoreResult};

/// A host whose last heartbeat is older than this is taken as not running (a host beats every
/// third of its lease: 10 s by default).
pub const HOST_SILENT_AFTER: chrono::Duration = chrono::Duration::seconds(60);

/// `hosts.registrations` for these definitions: `name@version` items between commas, with a
/// comma at each end, so that SQL can match `'%,' || orchestration || '@' || version || ',%'`.
pub fn registrations_text(definitions: &[(String, u32)]) -> String {
    let mut text = String::from(",");
    for (name, version) in definitions {
        text.push_str(&format!("{name}@{version},"));
    }
    text
}

/// An instance `cairn upgrade` may move, as read.
#[derive(Debug, Clone)]
pub struct UpgradeCandidate {
    /// The instance.
    pub id: Uuid,
    /// The version it is on.
    pub version: u32,
    /// Its status (running, dehydrated or suspended).
    pub status: InstanceStatus,
    /// Its stored state (none before its first point).
    pub state: Option<Vec<u8>>,
    /// Its epoch when read: the move is fenced by it.
    pub epoch: i64,
    /// The host whose lease on it has not run out, if any: it holds the instance in memory, and
    /// the move waits for it to let go (at its next dehydration).
    pub held_by: Option<String>,
}

/// Which instances [`Versions::upgrade_candidates`] reads.
#[derive(Debug, Clone)]
pub struct UpgradeFilter {
    /// The orchestration.
    pub orchestration: String,
    /// Only instances on this version; `None`: every version below `to`.
    pub from: Option<u32>,
    /// The version they move to.
    pub to: u32,
    /// Only ids after this one (paging).
    pub after: Option<Uuid>,
    /// At most this many.
    pub limit: u32,
}

/// One move, as [`Versions::upgrade`] writes it.
#[derive(Debug, Clone)]
pub struct UpgradePoint {
    /// The instance.
    pub id: Uuid,
    /// The version it is on.
    pub from: u32,
    /// The version it moves to.
    pub to: u32,
    /// The epoch it was read at: nothing is written if it changed since.
    pub epoch: i64,
    /// The migrated state.
    pub state: Vec<u8>,
    /// Its step.
    pub step: String,
    /// Who moves it, for `history.host`.
    pub by: String,
}

/// What became of one move.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpgradeOutcome {
    /// Written: the instance is on the new version.
    Moved,
    /// Not written: the instance changed since it was read (a host took it, it ran on, it
    /// ended, or another upgrade moved it); read it again.
    Changed,
}

/// `cairn versions`: instances by orchestration, version and status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VersionCount {
    /// The orchestration.
    pub orchestration: String,
    /// The version.
    pub version: u32,
    /// The status.
    pub status: String,
    /// How many instances.
    pub count: u64,
}

/// A running host and what it registers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostRegistrations {
    /// `hosts.id`.
    pub id: String,
    /// `hosts.name` (the machine).
    pub name: String,
    /// Its `(orchestration, version)` pairs; `None` for a host that did not say (an older build).
    pub registrations: Option<Vec<(String, u32)>>,
}

impl HostRegistrations {
    /// Whether this host runs `orchestration` at `version` (a host that did not say runs all).
    pub fn runs(&self, orchestration: &str, version: u32) -> bool {
        self.registrations
            .as_ref()
            .is_none_or(|r| r.iter().any(|(n, v)| n == orchestration && *v == version))
    }
}

/// Parses `hosts.registrations`; items that do not read as `name@version` are left out.
pub fn parse_registrations(text: &str) -> Vec<(String, u32)> {
    text.split(',')
        .filter_map(|item| {
            let (name, version) = item.rsplit_once('@')?;
            Some((name.to_owned(), version.parse().ok()?))
        })
        .collect()
}

/// An instance that needs an operator: suspended, or on a version no running host has.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attention {
    /// The instance.
    pub id: Uuid,
    /// Its orchestration.
    pub orchestration: String,
    /// Its version.
    pub version: u32,
    /// Its status.
    pub status: InstanceStatus,
    /// Why it needs an operator.
    pub reason: String,
}

/// Versions side by side (see the module docs).
#[async_trait]
pub trait Versions: Send + Sync + std::fmt::Debug {
    /// Records the definitions host `host` runs in its `hosts` row (written by
    /// [`Maintenance::recover`](super::Maintenance::recover)); from then on its claims take work
    /// only for those versions.
    async fn record_registrations(
        &self,
        host: &str,
        definitions: &[(String, u32)],
    ) -> StoreResult<()>;

    /// The instances of `filter.orchestration` waiting (running, dehydrated or suspended) on a
    /// version `filter` selects, in id order.
    async fn upgrade_candidates(
        &self,
        filter: &UpgradeFilter,
        now: DateTime<Utc>,
    ) -> StoreResult<Vec<UpgradeCandidate>>;

    /// Moves one instance to `point.to` in a persistence point of its own: its version, state,
    /// step and a history row with reason `upgrade`, all or nothing, and only if it is still on
    /// `point.from` at `point.epoch`, waiting, with no live lease on it (G4: the epoch taken
    /// fences any host that held it; the owner column and its expired lease stay, so that the
    /// messages that owner had claimed are taken again in order). A suspension becomes
    /// resumable: the new version reads the state.
    async fn upgrade(
        &self,
        point: &UpgradePoint,
        now: DateTime<Utc>,
    ) -> StoreResult<UpgradeOutcome>;

    /// Instances by orchestration, version and status (ended ones included).
    async fn version_counts(&self) -> StoreResult<Vec<VersionCount>>;

    /// The hosts running at `now` (no stop recorded, a heartbeat within [`HOST_SILENT_AFTER`])
    /// and what they register.
    async fn running_hosts(&self, now: DateTime<Utc>) -> StoreResult<Vec<HostRegistrations>>;

    /// Instances that need an operator, at most `limit`: suspended ones (the reason is their
    /// `last_error`), and waiting ones whose version no running host registers: the documented
    /// "needs attention" query (docs/sql.md).
    async fn needing_attention(
        &self,
        now: DateTime<Utc>,
        limit: u32,
    ) -> StoreResult<Vec<Attention>>;
}
