//! The versioning commands: `cairn upgrade` (waiting instances moved to another version, each in
//! a persistence point of its own), `cairn versions` (instances per orchestration, version and
//! status, and the running hosts that register each version), `cairn export` and
//! `cairn show --state-bytes` (an instance's stored state, for the test kit's fixtures), and the
//! check behind `cairn resume`: a suspension marked not resumable is resumed without `--force`
//! once this build reads the state.

use std::collections::BTreeMap;
use std::time::Duration;

use uuid::Uuid;

use super::CliError;
use crate::clock::SystemClock;
use crate::store::{ControlAction, InstanceStatus, Store};
use crate::upgrade::{self, Plan};
use crate::Registry;

/// `cairn upgrade`: moves what it can and prints what did not move. An error when some
/// instance stays behind (failed, or still held), so that a script sees it.
///
/// # Errors
/// [`CliError`]: the store failed, the version is not in this build, or instances stayed.
pub async fn run_upgrade(
    store: &dyn Store,
    registry: &Registry,
    plan: Plan,
) -> Result<(), CliError> {
    let report = upgrade::run(store, registry, &SystemClock, &plan)
        .await
        .map_err(|e| CliError::NotFound(e.to_string()))?;
    let to = plan.to;
    let name = &plan.orchestration;
    if plan.dry_run {
        println!(
            "dry run: {} instance(s) of {name} would move to version {to}",
            report.moved
        );
    } else {
        println!(
            "moved {} instance(s) of {name} to version {to}",
            report.moved
        );
    }
    for (id, version, error) in &report.failed {
        println!("failed  {id}  stays on version {version}: {error}");
    }
    for (id, why) in &report.pending {
        println!("pending {id}: {why}");
    }
    if report.failed.is_empty() && report.pending.is_empty() {
        return Ok(());
    }
    Err(CliError::NotFound(format!(
        "{} instance(s) failed to migrate and stay on their version (listed above); {} did not \
         move yet{}",
        report.failed.len(),
        report.pending.len(),
        if report.pending.is_empty() {
            ""
        } else {
            ": run the command again (a host holds them in memory until it dehydrates them)"
        }
    )))
}

/// `cairn versions`: instances per orchestration and version by status, and the running hosts
/// that register each version (`hosts.registrations`).
///
/// # Errors
/// The store failed.
pub async fn versions(store: &dyn Store, registry: &Registry) -> Result<(), CliError> {
    let now = chrono::Utc::now();
    let counts = store.version_counts().await?;
    let hosts = store.running_hosts(now).await?;
    let mut rows: BTreeMap<(String, u32), Vec<(String, u64)>> = BTreeMap::new();
    for c in counts {
        rows.entry((c.orchestration, c.version))
            .or_default()
            .push((c.status, c.count));
    }
    for (name, version) in registry.versions() {
        rows.entry((name, version)).or_default();
    }
    println!(
        "{:<24} {:>7}  {:<44} registered in running hosts",
        "orchestration", "version", "instances by status"
    );
    for ((name, version), statuses) in rows {
        let statuses = if statuses.is_empty() {
            "-".to_owned()
        } else {
            statuses
                .iter()
                .map(|(s, n)| format!("{s} {n}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let running: Vec<&str> = hosts
            .iter()
            .filter(|h| h.runs(&name, version))
            .map(|h| h.id.as_str())
            .collect();
        let waiting = statuses.contains("running") || statuses.contains("dehydrated");
        let running = if running.is_empty() && waiting {
            "none: its waiting instances need attention".to_owned()
        } else if running.is_empty() {
            "none".to_owned()
        } else {
            running.join(", ")
        };
        let current = registry
            .current(&name)
            .is_some_and(|d| d.version() == version);
        let version = format!("{version}{}", if current { "*" } else { "" });
        println!("{name:<24} {version:>7}  {statuses:<44} {running}");
    }
    println!("(* the version this build starts new instances on)");
    Ok(())
}

/// An instance's state as a fixture for the test kit (`cairn export ID`).
pub async fn export(store: &dyn Store, id: Uuid) -> Result<(), CliError> {
    let fixture = fixture(store, id).await?;
    println!(
        "{}",
        serde_json::to_string_pretty(&fixture).map_err(|source| CliError::Json {
            what: "the fixture",
            source
        })?
    );
    Ok(())
}

/// `cairn show --state-bytes ID`: the stored state as hex, nothing else.
pub async fn state_bytes(store: &dyn Store, id: Uuid) -> Result<(), CliError> {
    let fixture = fixture(store, id).await?;
    println!("{}", fixture.state_hex);
    Ok(())
}

async fn fixture(store: &dyn Store, id: Uuid) -> Result<crate::upgrade::Fixture, CliError> {
    let detail = store
        .instance_detail(id)
        .await?
        .ok_or(CliError::NoInstance(id))?;
    crate::upgrade::Fixture::of(&detail).ok_or_else(|| {
        CliError::NotFound(format!(
            "instance {id} has no stored state yet (not started)"
        ))
    })
}

/// `cairn resume`: a suspension marked not resumable is resumed without `--force` when this
/// build's definition of the instance's version reads its state now.
///
/// # Errors
/// [`CliError`]: no such instance, the store refused (with what to do), or failed.
pub async fn resume(
    store: &dyn Store,
    registry: &Registry,
    id: Uuid,
    force: bool,
) -> Result<(), CliError> {
    let mut force = force;
    if !force {
        if let Some(detail) = store.instance_detail(id).await? {
            let s = &detail.summary;
            let reads = registry
                .get(&s.orchestration, s.version)
                .zip(detail.state.as_deref())
                .is_some_and(|(def, bytes)| def.decode_state(bytes).is_ok());
            if s.status == InstanceStatus::Suspended && reads {
                // Whatever made it not resumable (its state did not decode) is cured.
                force = true;
            }
        }
    }
    super::control(store, id, ControlAction::Resume { force }).await
}

/// The plan `cairn upgrade` runs.
pub fn plan(
    orchestration: String,
    to: u32,
    from: Option<u32>,
    dry_run: bool,
    limit: Option<u64>,
    wait: Duration,
) -> Plan {
    Plan {
        orchestration,
        from,
        to,
        dry_run,
        limit,
        wait,
        by: "cairn upgrade".to_owned(),
    }
}

/// `cairn demo`: moves the waiting instances of every orchestration whose current version is not
/// its newest to the newest, as `cairn upgrade` would (instances a host holds stay); one line
/// each, in words.
pub async fn demo_upgrades(store: &dyn Store, registry: &Registry) -> Vec<String> {
    let mut lines = Vec::new();
    let mut names: Vec<String> = registry.versions().into_iter().map(|(n, _)| n).collect();
    names.dedup();
    for name in names {
        let (Some(current), Some(newest)) = (registry.current(&name), registry.latest(&name))
        else {
            continue;
        };
        let (from, to) = (current.version(), newest.version());
        if from == to {
            continue;
        }
        let mut plan = plan(name.clone(), to, Some(from), false, None, Duration::ZERO);
        plan.by = "cairn demo".to_owned();
        lines.push(
            match upgrade::run(store, registry, &SystemClock, &plan).await {
                Ok(r) => format!(
                "upgraded while the host ran: {} {name} instance(s) from version {from} to {to} \
                 ({} failed to migrate, {} held by the host: they finished on version {from})",
                r.moved,
                r.failed.len(),
                r.pending.len()
            ),
                Err(e) => format!("upgrade of {name} to version {to} failed: {e}"),
            },
        );
    }
    lines
}
