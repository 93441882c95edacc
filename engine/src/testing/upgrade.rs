//! The test kit's side of versioning: [`Scenario::upgraded`] (a stored state of an older version
//! migrated and run on) and [`CrashTest::upgrade_to`] (an instance moved to a newer version while
//! it waits, with a crash before and after that upgrade point too).

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use uuid::Uuid;

use super::{CrashTest, Scenario, ScenarioError};
use crate::clock::SystemClock;
use crate::host::instance::LiveInstance;
use crate::host::Client;
use crate::orchestration::Orchestration;
use crate::registry::Registry;
use crate::store::{InstanceRecord, InstanceStatus, NewMessage, Store};
use crate::upgrade::{self, Fixture, Plan};

impl<O: Orchestration> Scenario<O> {
    /// An instance of this version made from a stored state of an older one, as `cairn upgrade`
    /// would make it: the fixture's state handed to `O::upgrade`, waiting for what it waited
    /// for (the fixture's bookkeeping, when exported). A fixture of this version is loaded as
    /// it is. Deliver events to run it on to completion.
    ///
    /// ```no_run
    /// # use cairn::testing::{Fixture, Scenario};
    /// # fn check<O: cairn::Orchestration>() -> Result<(), Box<dyn std::error::Error>> {
    /// // cairn export 01a2... > tests/fixtures/approval-v1.json
    /// let fixture = Fixture::load("tests/fixtures/approval-v1.json".as_ref())?;
    /// let mut s = Scenario::<O>::upgraded(&fixture)?;
    /// s.message("approval.decision", serde_json::json!({"request_id": "r1", "approved": true, "by": "ann"}))?;
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    /// [`ScenarioError::Upgrade`]: the fixture is of another orchestration, or does not load, or
    /// the migration refused it.
    pub fn upgraded(fixture: &Fixture) -> Result<Self, ScenarioError> {
        Self::upgraded_with(Registry::new(), Utc::now(), fixture)
    }

    /// [`Scenario::upgraded`] with a registry (holding the children it starts) at a given time.
    ///
    /// # Errors
    /// As [`Scenario::upgraded`].
    pub fn upgraded_with(
        registry: Registry,
        now: DateTime<Utc>,
        fixture: &Fixture,
    ) -> Result<Self, ScenarioError> {
        let fail = |e: String| ScenarioError::Upgrade(e);
        if fixture.orchestration != O::NAME {
            return Err(fail(format!(
                "the fixture is of orchestration {:?}, not {:?}",
                fixture.orchestration,
                O::NAME
            )));
        }
        let registry = registry.register::<O>();
        let stored = fixture.state().map_err(|e| fail(e.to_string()))?;
        let state = if fixture.version == O::VERSION {
            stored
        } else {
            upgrade::migrate(&registry, O::NAME, fixture.version, O::VERSION, &stored)
                .map_err(|e| fail(e.to_string()))?
                .state
        };
        let def = registry
            .get(O::NAME, O::VERSION)
            .cloned()
            .ok_or(ScenarioError::Unregistered(O::NAME))?;
        let record = InstanceRecord {
            id: fixture.id,
            orchestration: O::NAME.to_owned(),
            version: O::VERSION,
            status: InstanceStatus::Running,
            state: Some(state),
            engine_state: fixture.engine_state().map_err(|e| fail(e.to_string()))?,
            epoch: 1,
            history_seq: 0,
            parent_id: None,
        };
        let instance = LiveInstance::load(record, def).map_err(|f| fail(f.error.0))?;
        let mut scenario = Self::of(instance, registry, now);
        scenario.last_step = Some(scenario.step());
        Ok(scenario)
    }
}

/// What [`CrashTest::upgrade_to`] asked for.
pub(super) struct Planned {
    to: u32,
    after: Vec<NewMessage>,
}

impl CrashTest {
    /// Moves the instance to version `to` (registered in the crash test's registry) once it
    /// waits, dehydrated, as `cairn upgrade` does, then publishes `after`, the messages that run
    /// it on to its end. The upgrade point is one of the persistence points the test crashes
    /// before and after; a run whose upgrade crashed upgrades again after the restart.
    #[must_use]
    pub fn upgrade_to(mut self, to: u32, after: Vec<NewMessage>) -> Self {
        self.upgrade = Some(Planned { to, after });
        self
    }
}

/// One host life's progress through a planned upgrade.
#[derive(Default)]
pub(super) struct Upgrading {
    running: Option<tokio::task::JoinHandle<()>>,
    published: bool,
}

impl Upgrading {
    /// Moves the instance on a step: starts the upgrade once it waits on an older
    /// version (through `store`, which may crash), publishes the messages once it is on the new
    /// one (a publish after a restart is the same message ids, stored once).
    pub(super) async fn step(
        &mut self,
        planned: &Planned,
        registry: &Registry,
        store: &Arc<dyn Store>,
        plain: &Arc<dyn Store>,
        client: &Client,
        id: Uuid,
    ) -> Result<(), String> {
        let Some(summary) = plain
            .instance_summaries(&[id])
            .await
            .map_err(|e| e.to_string())?
            .pop()
        else {
            return Ok(());
        };
        if summary.version == planned.to {
            if !self.published {
                client
                    .publish_batch(planned.after.clone())
                    .await
                    .map_err(|e| e.to_string())?;
                self.published = true;
            }
            return Ok(());
        }
        let idle = self.running.as_ref().is_none_or(|r| r.is_finished());
        // Dehydrated, or running with no host holding it (after a crash): `upgrade::run`
        // leaves an instance a live host holds for the next step.
        let waiting = matches!(
            summary.status,
            InstanceStatus::Dehydrated | InstanceStatus::Running
        );
        if waiting && idle {
            let plan = Plan {
                orchestration: summary.orchestration.clone(),
                from: None,
                to: planned.to,
                dry_run: false,
                limit: None,
                wait: Duration::ZERO,
                by: "crash test".to_owned(),
            };
            let (store, registry) = (store.clone(), registry.clone());
            self.running = Some(tokio::spawn(async move {
                if let Err(e) = upgrade::run(&*store, &registry, &SystemClock, &plan).await {
                    tracing::warn!(error = %e, "crash test: the upgrade failed; tried again");
                }
            }));
        }
        Ok(())
    }
}
