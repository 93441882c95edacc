//! Moving an instance's state from one version of its orchestration to another: the pure part of
//! `cairn upgrade`, shared by the command, the test kit and the benchmark.
//!
//! A stored state of version `from` is handed to version `to`'s [`Orchestration::upgrade`]
//! (through the registry, types erased), and the result is encoded as `to`'s state, with the step
//! name read off it ([`migrate`], which writes nothing). [`run`] does it for every waiting
//! instance of an orchestration, each moved in a persistence point of its own by the store's
//! [`Versions::upgrade`](crate::store::Versions::upgrade), fenced by the epoch it was read at:
//! an instance a host holds (its lease runs) waits until the host lets it go; one a host took
//! meanwhile is read again; one whose migration fails stays as it is, listed with the error.
//! Running it again after a crash moves what is left.
//!
//! ```
//! # use cairn::Registry;
//! # fn demo(registry: &Registry, bytes: &[u8]) {
//! match cairn::upgrade::migrate(registry, "approval", 1, 2, bytes) {
//!     Ok(migrated) => println!("moves to step {}", migrated.step),
//!     Err(e) => println!("stays on version 1: {e}"),
//! }
//! # }
//! ```
//!
//! [`Orchestration::upgrade`]: crate::Orchestration::upgrade

use std::collections::HashSet;
use std::time::{Duration, Instant};

use uuid::Uuid;

use crate::clock::Clock;
use crate::codec;
use crate::registry::Registry;
use crate::store::{
    Store, StoreError, UpgradeCandidate, UpgradeFilter, UpgradeOutcome, UpgradePoint,
};

/// A state migrated to the target version, ready to store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Migrated {
    /// The state, encoded as the target version's.
    pub state: Vec<u8>,
    /// Its step (the variant's name), for `instances.step`.
    pub step: String,
}

/// Why a state cannot move.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum UpgradeError {
    /// The target version is not registered in this build.
    #[error(
        "orchestration {name:?} version {to} is not registered in this build; run `cairn upgrade` \
         from a build that has it (registered: {registered})"
    )]
    NotRegistered {
        /// The orchestration.
        name: String,
        /// The version asked for.
        to: u32,
        /// What this build registers under that name.
        registered: String,
    },
    /// The instance has no state to migrate (it has not run its first transition).
    #[error("the instance has no stored state yet; it starts on the version it was created with")]
    NoState,
    /// The migration refused the state, or its result does not encode.
    #[error("migration from version {from} to {to} failed: {error}")]
    Failed {
        /// The version the state is of.
        from: u32,
        /// The version asked for.
        to: u32,
        /// What the migration said.
        error: String,
    },
}

/// Migrates `state`, stored by version `from` of orchestration `name`, to version `to`.
///
/// # Errors
/// [`UpgradeError`]: the target is not registered, or its migration refused the state.
pub fn migrate(
    registry: &Registry,
    name: &str,
    from: u32,
    to: u32,
    state: &[u8],
) -> Result<Migrated, UpgradeError> {
    let def = registry
        .get(name, to)
        .ok_or_else(|| UpgradeError::NotRegistered {
            name: name.to_owned(),
            to,
            registered: registered(registry, name),
        })?;
    let state = def
        .upgrade_state(from, state)
        .map_err(|e| UpgradeError::Failed {
            from,
            to,
            error: e.to_string(),
        })?;
    let step = codec::step_name(&state, "state");
    Ok(Migrated { state, step })
}

/// The versions this build registers under `name`, in words.
fn registered(registry: &Registry, name: &str) -> String {
    let versions: Vec<String> = registry
        .versions()
        .into_iter()
        .filter(|(n, _)| n == name)
        .map(|(_, v)| v.to_string())
        .collect();
    if versions.is_empty() {
        "none".to_owned()
    } else {
        versions.join(", ")
    }
}

/// What [`run`] is asked to do: `cairn upgrade ORCHESTRATION --to VERSION [--from VERSION]
/// [--dry-run] [--limit N]`.
#[derive(Debug, Clone)]
pub struct Plan {
    /// The orchestration.
    pub orchestration: String,
    /// Only instances on this version; `None`: every version below `to`.
    pub from: Option<u32>,
    /// The version they move to.
    pub to: u32,
    /// Decode and migrate every instance, write nothing.
    pub dry_run: bool,
    /// Move at most this many.
    pub limit: Option<u64>,
    /// How long to wait for instances hosts hold in memory (they move when the host lets them
    /// go, at their next dehydration); those still held then are reported, for another run.
    pub wait: Duration,
    /// Who moves them, for `history.host`.
    pub by: String,
}

/// What [`run`] did.
#[derive(Debug, Clone, Default)]
pub struct Report {
    /// Instances moved (or, on a dry run, that would move).
    pub moved: u64,
    /// Instances whose migration failed, with the version they stay on and the error.
    pub failed: Vec<(Uuid, u32, String)>,
    /// Instances still held by a host (or not started yet) when the wait ran out: run again.
    pub pending: Vec<(Uuid, String)>,
}

/// Why [`run`] stopped.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RunError {
    /// Nothing can move: the target version is not in this build.
    #[error(transparent)]
    Upgrade(#[from] UpgradeError),
    /// The store failed; what moved stays moved, and running again moves the rest.
    #[error("the store failed during the upgrade (what moved stays moved; run it again): {0}")]
    Store(#[from] StoreError),
}

/// How many instances a pass reads at a time, and moves at once.
const PAGE: u32 = 500;
const AT_ONCE: usize = 8;

/// Moves the waiting instances `plan` names to `plan.to` (see the module docs).
///
/// # Errors
/// [`RunError`]: the target version is not registered, or the store failed.
pub async fn run(
    store: &dyn Store,
    registry: &Registry,
    clock: &dyn Clock,
    plan: &Plan,
) -> Result<Report, RunError> {
    if registry.get(&plan.orchestration, plan.to).is_none() {
        return Err(UpgradeError::NotRegistered {
            name: plan.orchestration.clone(),
            to: plan.to,
            registered: registered(registry, &plan.orchestration),
        }
        .into());
    }
    let started = Instant::now();
    let mut report = Report::default();
    let mut failed: HashSet<Uuid> = HashSet::new();
    loop {
        let mut pending = Vec::new();
        let mut after = None;
        loop {
            let filter = UpgradeFilter {
                orchestration: plan.orchestration.clone(),
                from: plan.from,
                to: plan.to,
                after,
                limit: PAGE,
            };
            let page = store.upgrade_candidates(&filter, clock.now()).await?;
            let Some(last) = page.last() else { break };
            after = Some(last.id);
            let mut ready = Vec::new();
            for c in page {
                let taken = report.moved + ready.len() as u64;
                if failed.contains(&c.id) || plan.limit.is_some_and(|limit| taken >= limit) {
                    continue;
                }
                match prepare(registry, plan, &c) {
                    Err(Wait(why)) => pending.push((c.id, why)),
                    Ok(Err(error)) => {
                        tracing::warn!(instance.id = %c.id, orchestration.name = %plan.orchestration, orchestration.version = c.version, %error, "migration failed; the instance stays on its version");
                        failed.insert(c.id);
                        report.failed.push((c.id, c.version, error.to_string()));
                    }
                    Ok(Ok(_)) if plan.dry_run => report.moved += 1,
                    Ok(Ok(point)) => match c.held_by {
                        Some(host) => {
                            pending.push((c.id, format!("held in memory by host {host}")))
                        }
                        None => ready.push(point),
                    },
                }
            }
            for chunk in ready.chunks(AT_ONCE) {
                let now = clock.now();
                let outcomes = futures_util::future::join_all(
                    chunk.iter().map(|point| store.upgrade(point, now)),
                )
                .await;
                for (point, outcome) in chunk.iter().zip(outcomes) {
                    match outcome? {
                        UpgradeOutcome::Moved => {
                            tracing::debug!(instance.id = %point.id, from = point.from, to = point.to, "upgraded");
                            report.moved += 1;
                        }
                        UpgradeOutcome::Changed => {
                            pending.push((point.id, "changed while it was read".to_owned()))
                        }
                    }
                }
            }
        }
        if pending.is_empty() || plan.dry_run || report.full(plan) || started.elapsed() >= plan.wait
        {
            report.pending = if report.full(plan) {
                Vec::new()
            } else {
                pending
            };
            return Ok(report);
        }
        tracing::info!(
            moved = report.moved,
            waiting = pending.len(),
            "instances held by hosts or changed meanwhile; reading them again"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

impl Report {
    fn full(&self, plan: &Plan) -> bool {
        plan.limit.is_some_and(|limit| self.moved >= limit)
    }
}

/// An instance that cannot move yet, and why.
struct Wait(String);

/// The point that moves candidate `c`, or its migration's error; [`Wait`] for one with no state.
fn prepare(
    registry: &Registry,
    plan: &Plan,
    c: &UpgradeCandidate,
) -> Result<Result<UpgradePoint, UpgradeError>, Wait> {
    let Some(state) = &c.state else {
        return Err(Wait("not started yet (no state)".to_owned()));
    };
    Ok(
        migrate(registry, &plan.orchestration, c.version, plan.to, state).map(|m| UpgradePoint {
            id: c.id,
            from: c.version,
            to: plan.to,
            epoch: c.epoch,
            state: m.state,
            step: m.step,
            by: plan.by.clone(),
        }),
    )
}

/// An instance's stored state as a file: what `cairn export ID` prints, and what the test kit
/// ([`Scenario::upgraded`](crate::testing)) loads to check a migration against real states.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Fixture {
    /// The instance it came from.
    pub id: Uuid,
    /// Its orchestration.
    pub orchestration: String,
    /// The version that stored the state.
    pub version: u32,
    /// Its step then.
    pub step: String,
    /// The state as stored (MessagePack), in hex.
    pub state_hex: String,
    /// The engine's bookkeeping stored with it (what the instance waits for), in hex.
    #[serde(default)]
    pub engine_state_hex: Option<String>,
}

/// A fixture whose hex is not hex.
#[derive(Debug, thiserror::Error)]
#[error("the fixture's hex is not an even number of hex digits (at digit {0})")]
pub struct NotHex(usize);

impl Fixture {
    /// A fixture of an instance as
    /// [`OperatorVerbs::instance_detail`](crate::store::OperatorVerbs::instance_detail) read
    /// it; `None` before its first point (no state).
    pub fn of(detail: &crate::store::InstanceDetail) -> Option<Self> {
        let s = &detail.summary;
        Some(Fixture {
            id: s.id,
            orchestration: s.orchestration.clone(),
            version: s.version,
            step: s.step.clone(),
            state_hex: to_hex(detail.state.as_deref()?),
            engine_state_hex: detail.engine_state.as_deref().map(to_hex),
        })
    }

    /// Reads a fixture file (`cairn export ID > FILE`).
    ///
    /// # Errors
    /// The file cannot be read or is not a fixture, in words.
    pub fn load(path: &std::path::Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        serde_json::from_str(&text).map_err(|e| format!("{} is not a fixture: {e}", path.display()))
    }

    /// The fixtures of the waiting instances of `orchestration` at `version` in a database (at
    /// most `limit`), to check a migration against real stored states.
    ///
    /// # Errors
    /// The store failed.
    pub async fn from_database(
        store: &dyn Store,
        orchestration: &str,
        version: u32,
        limit: u32,
    ) -> Result<Vec<Self>, StoreError> {
        let filter = UpgradeFilter {
            orchestration: orchestration.to_owned(),
            from: Some(version),
            to: version,
            after: None,
            limit,
        };
        let mut out = Vec::new();
        for c in store
            .upgrade_candidates(&filter, chrono::Utc::now())
            .await?
        {
            if let Some(detail) = store.instance_detail(c.id).await? {
                out.extend(Self::of(&detail));
            }
        }
        Ok(out)
    }

    /// The stored state's bytes.
    ///
    /// # Errors
    /// [`NotHex`].
    pub fn state(&self) -> Result<Vec<u8>, NotHex> {
        from_hex(&self.state_hex)
    }

    /// The stored bookkeeping's bytes, if exported.
    ///
    /// # Errors
    /// [`NotHex`].
    pub fn engine_state(&self) -> Result<Option<Vec<u8>>, NotHex> {
        self.engine_state_hex.as_deref().map(from_hex).transpose()
    }
}

fn to_hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn from_hex(text: &str) -> Result<Vec<u8>, NotHex> {
    let hex = text.trim().as_bytes();
    if hex.len() % 2 != 0 {
        return Err(NotHex(hex.len()));
    }
    hex.chunks(2)
        .enumerate()
        .map(|(i, pair)| {
            std::str::from_utf8(pair)
                .ok()
                .and_then(|p| u8::from_str_radix(p, 16).ok())
                .ok_or(NotHex(i * 2))
        })
        .collect()
}
