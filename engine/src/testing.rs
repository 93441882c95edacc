//! The test kit for orchestration authors.
//!
//! Two tools, for two kinds of test:
//!
//! * [`Scenario`] runs an orchestration's transitions with no engine and no database: feed it
//!   events, then assert on its state, its step, the effects it asked for and its outcome. It uses
//!   the engine's own event handling, so what a scenario accepts the host accepts too (a message
//!   the instance does not wait for is refused, as the host would hold it back).
//! * [`CrashTest`] runs one instance under the real engine on a temporary SQLite database, once
//!   cleanly and then with a crash injected at every persistence point in turn (just before its
//!   commit, and just after it), restarting a fresh host each time. It checks G1-G3 and G5 for
//!   the orchestration: the instance ends as in the clean run, every message addressed to it is
//!   consumed exactly once, its history is the clean run's history, every committed send was
//!   delivered and no uncommitted one was. With [`CrashTest::upgrade_to`] the instance is moved
//!   to a newer version while it waits, and the crashes cover that upgrade point too.
//! * [`Scenario::upgraded`] checks a migration against real stored states: it loads a state of an
//!   older version ([`Fixture`], exported with `cairn export ID` or read from a database with
//!   [`Fixture::from_database`]), migrates it as `cairn upgrade` would, and runs it on.
//!
//! ```
//! use cairn::testing::Scenario;
//! # use cairn::{Context, Event, Fault, Next, Orchestration, Correlation};
//! # use serde::{Deserialize, Serialize};
//! # struct Greeter;
//! # #[derive(Clone, Serialize, Deserialize)] enum State { AwaitingName }
//! # impl Orchestration for Greeter {
//! #     const NAME: &'static str = "greeter"; const VERSION: u32 = 1;
//! #     type Input = (); type State = State; type Output = String;
//! #     fn start(ctx: &mut Context, _: ()) -> Result<Next<Self>, Fault> {
//! #         ctx.receive("name.given", Correlation::none()); Ok(Next::Continue(State::AwaitingName)) }
//! #     fn on_event(_: &mut Context, _: State, e: Event) -> Result<Next<Self>, Fault> {
//! #         Ok(Next::Complete(format!("hello {}", e.message()?.body::<String>()?))) }
//! # }
//! let mut s = Scenario::<Greeter>::start(()).unwrap();
//! assert_eq!(s.step(), "AwaitingName");
//! s.message("name.given", serde_json::json!("ada")).unwrap();
//! assert_eq!(s.output(), Some(&"hello ada".to_owned()));
//! ```

use std::collections::{BTreeMap, BTreeSet};
use std::marker::PhantomData;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use uuid::Uuid;

use crate::codec;
use crate::context::Effect;
use crate::host::instance::{Delivery, LiveInstance, Waits};
use crate::host::{Client, Host, HostConfig};
use crate::orchestration::Orchestration;
use crate::registry::Registry;
use crate::store::faulty::{CrashPoint, FaultPlan, FaultyStore};
use crate::store::sqlite::SqliteStore;
use crate::store::{
    HistoryRow, InstanceRecord, InstanceStatus, Maintenance, MessageKind, NewMessage,
    OperatorVerbs, Reason, Store, StoredMessage,
};
use crate::Ports;

mod upgrade;
pub use crate::upgrade::Fixture;

/// A scenario step that could not be taken.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ScenarioError {
    /// The transition failed or panicked; the engine would suspend the instance.
    #[error("the instance would be suspended: {0}")]
    Faulted(String),
    /// The instance does not wait for this event.
    #[error("the instance does not wait for {0}; it waits for: {1}")]
    NotWaiting(String, String),
    /// The instance has ended.
    #[error("the instance has ended")]
    Ended,
    /// The orchestration is not in the scenario's registry.
    #[error("orchestration {0} is not registered")]
    Unregistered(&'static str),
    /// The instance moved between steps along a transition its orchestration does not declare
    /// ([`Orchestration::TRANSITIONS`](crate::Orchestration::TRANSITIONS), or a step not in
    /// [`Orchestration::STEPS`](crate::Orchestration::STEPS)).
    #[error("undeclared transition {from} -> {to}: add it to the orchestration's TRANSITIONS (and STEPS), or fix the transition")]
    UndeclaredTransition {
        /// The step it left (`(start)` for its first).
        from: String,
        /// The step it reached.
        to: String,
    },
    /// A stored state did not load or migrate ([`Scenario::upgraded`]).
    #[error("the stored state does not move to this version: {0}")]
    Upgrade(String),
}

/// How a scenario's instance stands.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome<T> {
    /// Still running.
    Running,
    /// Completed with this output.
    Completed(T),
    /// Failed with this reason.
    Failed(String),
    /// Suspended itself with this reason.
    Suspended(String),
}

/// An orchestration run by hand, with no engine and no database. See the module docs.
pub struct Scenario<O: Orchestration> {
    instance: LiveInstance,
    registry: Registry,
    now: DateTime<Utc>,
    seq: i64,
    points: Vec<Reason>,
    details: Vec<String>,
    outcome: Outcome<O::Output>,
    /// The step after the last transition (`None` before the first), for the declared map.
    last_step: Option<String>,
    _o: PhantomData<fn() -> O>,
}

impl<O: Orchestration> std::fmt::Debug for Scenario<O> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Scenario")
            .field("instance", &self.instance)
            .field("points", &self.points)
            .finish_non_exhaustive()
    }
}

impl<O: Orchestration> Scenario<O> {
    /// Starts an instance with `input`, at the current time.
    ///
    /// # Errors
    /// The start transition failed.
    pub fn start(input: O::Input) -> Result<Self, ScenarioError> {
        Self::start_with(Registry::new().register::<O>(), Utc::now(), input)
    }

    /// Starts an instance with a registry (holding the children it starts) at a given time.
    ///
    /// # Errors
    /// The start transition failed.
    pub fn start_with(
        registry: Registry,
        now: DateTime<Utc>,
        input: O::Input,
    ) -> Result<Self, ScenarioError> {
        let registry = registry.register::<O>();
        let def = registry
            .get(O::NAME, O::VERSION)
            .cloned()
            .ok_or(ScenarioError::Unregistered(O::NAME))?;
        let record = InstanceRecord {
            id: Uuid::new_v4(),
            orchestration: O::NAME.to_owned(),
            version: O::VERSION,
            status: InstanceStatus::Running,
            state: None,
            engine_state: None,
            epoch: 1,
            history_seq: 0,
            parent_id: None,
        };
        let instance =
            LiveInstance::load(record, def).map_err(|f| ScenarioError::Faulted(f.error.0))?;
        let mut scenario = Self::of(instance, registry, now);
        let input =
            serde_json::to_value(input).map_err(|e| ScenarioError::Faulted(e.to_string()))?;
        scenario.deliver(MessageKind::Start, "start", input, BTreeMap::new())?;
        Ok(scenario)
    }

    /// A scenario of an instance loaded, before any event.
    fn of(instance: LiveInstance, registry: Registry, now: DateTime<Utc>) -> Self {
        Self {
            instance,
            registry,
            now,
            seq: 0,
            points: Vec::new(),
            details: Vec::new(),
            outcome: Outcome::Running,
            last_step: None,
            _o: PhantomData,
        }
    }

    /// Moves the scenario's clock forward.
    pub fn advance(&mut self, by: chrono::Duration) -> &mut Self {
        self.now += by;
        self
    }

    /// The scenario's clock.
    pub fn now(&self) -> DateTime<Utc> {
        self.now
    }

    /// Delivers a published message (body fields are promoted to properties, as on publish).
    ///
    /// # Errors
    /// The instance does not wait for it, has ended, or the transition failed.
    pub fn message(
        &mut self,
        message_type: &str,
        body: serde_json::Value,
    ) -> Result<&mut Self, ScenarioError> {
        let properties =
            NewMessage::published("", message_type, body.clone(), BTreeMap::new()).properties;
        self.deliver(MessageKind::Published, message_type, body, properties)
    }

    /// Answers the oldest unanswered request sent to `port`.
    ///
    /// # Errors
    /// No request to `port` is waiting, or the transition failed.
    pub fn reply(
        &mut self,
        port: &str,
        body: serde_json::Value,
    ) -> Result<&mut Self, ScenarioError> {
        let request = self
            .instance
            .waits()
            .requests
            .iter()
            .find(|(_, p)| p == port)
            .map(|(id, _)| id.clone())
            .ok_or_else(|| {
                ScenarioError::NotWaiting(format!("a reply from {port}"), self.waiting_for())
            })?;
        let properties = BTreeMap::from([
            ("request_id".to_owned(), request),
            ("port".to_owned(), port.to_owned()),
        ]);
        self.deliver(MessageKind::Reply, "reply", body, properties)
    }

    /// Fires the timer `name`.
    ///
    /// # Errors
    /// The instance does not wait for it, or the transition failed.
    pub fn timer(&mut self, name: &str) -> Result<&mut Self, ScenarioError> {
        self.ensure_running()?;
        if !self.instance.waits().delays.iter().any(|d| d.name == name) {
            return Err(ScenarioError::NotWaiting(
                format!("timer {name}"),
                self.waiting_for(),
            ));
        }
        let delivery = self
            .instance
            .deliver_timer(name, &self.registry, &|_| true, self.now);
        self.after(delivery)
    }

    /// Reports that a child completed with `output`.
    ///
    /// # Errors
    /// The transition failed.
    pub fn child_completed(
        &mut self,
        child: Uuid,
        output: serde_json::Value,
    ) -> Result<&mut Self, ScenarioError> {
        let body = serde_json::json!({ "child": child, "output": output });
        self.deliver(
            MessageKind::ChildCompleted,
            "child.completed",
            body,
            BTreeMap::new(),
        )
    }

    /// Reports that a child failed.
    ///
    /// # Errors
    /// The transition failed.
    pub fn child_failed(&mut self, child: Uuid, error: &str) -> Result<&mut Self, ScenarioError> {
        let body = serde_json::json!({ "child": child, "error": error });
        self.deliver(
            MessageKind::ChildFailed,
            "child.failed",
            body,
            BTreeMap::new(),
        )
    }

    /// Reports that a send was dead-lettered.
    ///
    /// # Errors
    /// The transition failed.
    pub fn send_failed(
        &mut self,
        message_id: &str,
        port: &str,
        error: &str,
    ) -> Result<&mut Self, ScenarioError> {
        let body = serde_json::json!({ "message_id": message_id, "port": port, "error": error });
        self.deliver(
            MessageKind::SendFailed,
            "send.failed",
            body,
            BTreeMap::new(),
        )
    }

    fn ensure_running(&self) -> Result<(), ScenarioError> {
        match self.outcome {
            Outcome::Running => Ok(()),
            _ => Err(ScenarioError::Ended),
        }
    }

    fn deliver(
        &mut self,
        kind: MessageKind,
        message_type: &str,
        body: serde_json::Value,
        properties: BTreeMap<String, String>,
    ) -> Result<&mut Self, ScenarioError> {
        self.ensure_running()?;
        self.seq += 1;
        let msg = StoredMessage {
            seq: self.seq,
            id: format!("scenario-{}", self.seq),
            message_type: message_type.to_owned(),
            kind,
            properties,
            body,
            instance_id: self.instance.id,
            subscription_id: None,
            published_at: self.now,
            delivery_count: 1,
        };
        let label = format!("message {message_type}");
        let delivery = self
            .instance
            .deliver_message(msg, &self.registry, &|_| true, self.now);
        if delivery == Delivery::Held {
            self.instance.take_held();
            return Err(ScenarioError::NotWaiting(label, self.waiting_for()));
        }
        self.after(delivery)
    }

    /// Checks the step the last transition reached against the declared steps and transitions,
    /// where the orchestration declares them.
    fn check_declared(&mut self) -> Result<(), ScenarioError> {
        if !matches!(self.outcome, Outcome::Running | Outcome::Suspended(_))
            || self.state().is_none()
        {
            return Ok(());
        }
        let to = self.step();
        let from = self
            .last_step
            .replace(to.clone())
            .unwrap_or_else(|| "(start)".to_owned());
        let undeclared_step = !O::STEPS.is_empty() && !O::STEPS.contains(&to.as_str());
        let undeclared_move = !O::TRANSITIONS.is_empty()
            && from != to
            && !O::TRANSITIONS.contains(&(from.as_str(), to.as_str()));
        if undeclared_step || undeclared_move {
            return Err(ScenarioError::UndeclaredTransition { from, to });
        }
        Ok(())
    }

    fn after(&mut self, delivery: Delivery) -> Result<&mut Self, ScenarioError> {
        let ran = matches!(delivery, Delivery::Ran(_));
        self.after_delivery(delivery)?;
        if ran {
            self.check_declared()?;
        }
        Ok(self)
    }

    fn after_delivery(&mut self, delivery: Delivery) -> Result<&mut Self, ScenarioError> {
        match delivery {
            Delivery::Held | Delivery::Ran(None) => {}
            Delivery::Faulted(text) => return Err(ScenarioError::Faulted(text.0)),
            Delivery::Panicked { error, .. } => return Err(ScenarioError::Faulted(error.0)),
            Delivery::Ran(Some(reason)) => {
                let point = self
                    .instance
                    .persistence_point(reason, "scenario", self.now, self.now)
                    .map_err(|e| ScenarioError::Faulted(e.0))?;
                self.points.push(reason);
                self.details.extend(point.detail.clone());
                // The engine's own messages to the instance (compensation steps) arrive next.
                let own: Vec<_> = point
                    .messages
                    .iter()
                    .filter(|m| {
                        m.target == Some(self.instance.id) && m.kind == MessageKind::Compensate
                    })
                    .cloned()
                    .collect();
                self.outcome = match point.status {
                    InstanceStatus::Completed => {
                        let output = point.output.unwrap_or_default();
                        Outcome::Completed(
                            serde_json::from_value(output)
                                .map_err(|e| ScenarioError::Faulted(e.to_string()))?,
                        )
                    }
                    InstanceStatus::Failed => Outcome::Failed(point.last_error.unwrap_or_default()),
                    InstanceStatus::Suspended => {
                        Outcome::Suspended(point.last_error.unwrap_or_default())
                    }
                    _ => Outcome::Running,
                };
                for msg in own {
                    self.deliver(msg.kind, &msg.message_type, msg.body, msg.properties)?;
                }
            }
        }
        Ok(self)
    }

    /// What the persistence points so far said they did (`history.detail`), in order.
    pub fn details(&self) -> &[String] {
        &self.details
    }

    /// The current state.
    pub fn state(&self) -> Option<&O::State> {
        self.instance.state::<O::State>()
    }

    /// The current step: the state's variant name, as in the `step` column.
    pub fn step(&self) -> String {
        self.state()
            .and_then(|s| codec::encode(s).ok())
            .map(|bytes| codec::step_name(&bytes, "state"))
            .unwrap_or_else(|| "created".to_owned())
    }

    /// The effects the last transition asked for.
    pub fn effects(&self) -> &[Effect] {
        self.instance.last_effects()
    }

    /// The sends of the last transition: (port, message type, body).
    pub fn sends(&self) -> Vec<(&str, &str, &serde_json::Value)> {
        self.effects()
            .iter()
            .filter_map(|e| match e {
                Effect::Send {
                    port,
                    message_type,
                    body,
                    ..
                } => Some((port.as_str(), message_type.as_str(), body)),
                _ => None,
            })
            .collect()
    }

    /// The children the last transition started: (id, orchestration, input).
    pub fn started(&self) -> Vec<(Uuid, &str, &serde_json::Value)> {
        self.effects()
            .iter()
            .filter_map(|e| match e {
                Effect::Start {
                    child,
                    orchestration,
                    input,
                } => Some((*child, orchestration.as_str(), input)),
                _ => None,
            })
            .collect()
    }

    /// What the instance waits for now.
    pub fn waits(&self) -> &Waits {
        self.instance.waits()
    }

    /// What the instance waits for, as the `waiting_for` column shows it.
    pub fn waiting_for(&self) -> String {
        self.instance.waits().describe()
    }

    /// The persistence points so far, by reason.
    pub fn persistence_points(&self) -> &[Reason] {
        &self.points
    }

    /// How the instance stands.
    pub fn outcome(&self) -> &Outcome<O::Output> {
        &self.outcome
    }

    /// The output, once completed.
    pub fn output(&self) -> Option<&O::Output> {
        match &self.outcome {
            Outcome::Completed(output) => Some(output),
            _ => None,
        }
    }
}

/// What send ports delivered, shared by every host life of a [`CrashTest`]: the ports' own record.
#[derive(Debug, Clone, Default)]
pub struct Recorder(Arc<Mutex<Vec<(String, String)>>>);

impl Recorder {
    /// Records that `port` delivered message `id`.
    pub fn record(&self, port: &str, id: &str) {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((port.to_owned(), id.to_owned()));
    }

    /// Every delivery so far: (port, message id).
    pub fn deliveries(&self) -> Vec<(String, String)> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn clear(&self) {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clear();
    }
}

/// Builds the send ports for a crash test; record every delivery in the recorder.
pub type PortFactory = Arc<dyn Fn(Client, Recorder) -> Ports + Send + Sync>;

/// A guarantee the crash test found broken.
#[derive(Debug, thiserror::Error)]
#[error("crash at commit {commit} ({point:?}): {problem}")]
pub struct CrashTestFailure {
    /// Which commit the crash was injected at (0 for the clean run).
    pub commit: u64,
    /// Before or after it.
    pub point: Option<CrashPoint>,
    /// What was wrong.
    pub problem: String,
}

/// What a crash test ran.
#[derive(Debug, Clone, PartialEq)]
pub struct CrashReport {
    /// Commits in the clean run (each one a crash site, before and after).
    pub commits: u64,
    /// Runs with a crash.
    pub crashed_runs: usize,
    /// How the instance ended.
    pub status: InstanceStatus,
    /// The history of the clean run (reasons and steps, without dehydrate or shutdown).
    pub history: Vec<(Reason, String)>,
}

/// One instance under the real engine with a crash at every persistence point. See the module
/// docs.
pub struct CrashTest {
    registry: Registry,
    ports: PortFactory,
    orchestration: String,
    input: serde_json::Value,
    messages: Vec<NewMessage>,
    timeout: Duration,
    upgrade: Option<upgrade::Planned>,
}

impl std::fmt::Debug for CrashTest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CrashTest")
            .field("orchestration", &self.orchestration)
            .field("messages", &self.messages.len())
            .finish_non_exhaustive()
    }
}

struct Life {
    status: Option<InstanceStatus>,
}

impl CrashTest {
    /// A crash test of one instance of `orchestration` started with `input`.
    pub fn new(registry: Registry, orchestration: &str, input: serde_json::Value) -> Self {
        Self {
            registry,
            ports: Arc::new(|_, _| Ports::new()),
            orchestration: orchestration.to_owned(),
            input,
            messages: Vec::new(),
            timeout: Duration::from_secs(30),
            upgrade: None,
        }
    }

    /// The send ports; each must record its deliveries in the [`Recorder`] it is given.
    #[must_use]
    pub fn ports(
        mut self,
        ports: impl Fn(Client, Recorder) -> Ports + Send + Sync + 'static,
    ) -> Self {
        self.ports = Arc::new(ports);
        self
    }

    /// A message to publish right after the start (it waits, unrouted, until the instance
    /// subscribes to it).
    #[must_use]
    pub fn publish(mut self, message: NewMessage) -> Self {
        self.messages.push(message);
        self
    }

    /// How long each run may take.
    #[must_use]
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Runs the clean run and every crash run.
    ///
    /// # Errors
    /// The first broken guarantee.
    pub fn run(&self) -> Result<CrashReport, CrashTestFailure> {
        let fail = |commit, point, problem: String| CrashTestFailure {
            commit,
            point,
            problem,
        };
        let clean = self.one_run(None).map_err(|p| fail(0, None, p))?;
        let mut crashed_runs = 0;
        for k in 1..=clean.commits {
            for point in [CrashPoint::BeforeCommit, CrashPoint::AfterCommit] {
                let run = self
                    .one_run(Some((k, point)))
                    .map_err(|p| fail(k, Some(point), p))?;
                if run.status != clean.status {
                    return Err(fail(
                        k,
                        Some(point),
                        format!(
                            "ended {} where the clean run ended {}",
                            run.status, clean.status
                        ),
                    ));
                }
                if run.history != clean.history {
                    return Err(fail(
                        k,
                        Some(point),
                        format!(
                            "history {:?} differs from the clean run's {:?}",
                            run.history, clean.history
                        ),
                    ));
                }
                crashed_runs += 1;
            }
        }
        Ok(CrashReport {
            crashed_runs,
            ..clean
        })
    }

    fn one_run(&self, crash: Option<(u64, CrashPoint)>) -> Result<CrashReport, String> {
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let url = format!("sqlite://{}", dir.path().join("crash-test.db").display());
        let recorder = Recorder::default();
        recorder.clear();
        let plan = FaultPlan::new();
        if let Some((k, point)) = crash {
            plan.crash_at_commit(k, point);
        }
        // The instance is started before the first host life, as a client would.
        let id = self.host_life(&url, &recorder, None, Setup::Start)?.1;
        let (life, _) = self.host_life(&url, &recorder, Some(plan.clone()), Setup::Run(id))?;
        let mut status = life.status;
        if crash.is_some() && !plan.has_crashed() && status.is_none() {
            return Err("the planned crash never happened and the instance did not end".into());
        }
        if status.is_none() || crash.is_some() {
            // Restart: a fresh host on the same database picks up where the last commit left.
            status = self
                .host_life(&url, &recorder, None, Setup::Run(id))?
                .0
                .status;
        }
        let Some(status) = status else {
            return Err(format!(
                "instance did not end within {:?}; {}",
                self.timeout,
                self.describe(&url, id)
            ));
        };
        let commits = plan.commits();
        self.check(&url, id, &recorder).map(|history| CrashReport {
            commits,
            crashed_runs: 0,
            status,
            history,
        })
    }

    fn host_life(
        &self,
        url: &str,
        recorder: &Recorder,
        plan: Option<Arc<FaultPlan>>,
        setup: Setup,
    ) -> Result<(Life, Uuid), String> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| e.to_string())?;
        let result = runtime.block_on(async {
            let plain: Arc<dyn Store> =
                Arc::new(SqliteStore::open(url).await.map_err(|e| e.to_string())?);
            plain.migrate().await.map_err(|e| e.to_string())?;
            let store: Arc<dyn Store> = match &plan {
                Some(plan) => Arc::new(FaultyStore::new(plain.clone(), plan.clone())),
                None => plain.clone(),
            };
            let config = HostConfig {
                poll_interval: Duration::from_millis(10),
                dehydrate_after: Duration::from_millis(200),
                outbox_lock: Duration::from_millis(500),
                drain_timeout: Duration::from_millis(500),
                ..HostConfig::default()
            };
            let host =
                Host::new(store.clone(), self.registry.clone(), Ports::new()).with_config(config);
            let ports = (self.ports)(host.client(), recorder.clone());
            let host = host.with_ports(ports);
            let id = match setup {
                Setup::Start => {
                    host.sync_activations().await.map_err(|e| e.to_string())?;
                    let client = host.client();
                    let id = client
                        .start(&self.orchestration, self.input.clone())
                        .await
                        .map_err(|e| e.to_string())?;
                    if !self.messages.is_empty() {
                        client
                            .publish_batch(self.messages.clone())
                            .await
                            .map_err(|e| e.to_string())?;
                    }
                    return Ok((Life { status: None }, id));
                }
                Setup::Run(id) => id,
            };
            let client = host.client();
            let mut upgrading = upgrade::Upgrading::default();
            let stop = tokio_util::sync::CancellationToken::new();
            let running = tokio::spawn(host.run(stop.clone()));
            let deadline = tokio::time::Instant::now() + self.timeout;
            let crashed = async {
                match &plan {
                    Some(plan) => plan.crashed().await,
                    None => std::future::pending().await,
                }
            };
            tokio::pin!(crashed);
            let mut status = None;
            loop {
                tokio::select! {
                    _ = &mut crashed => break,
                    _ = tokio::time::sleep(Duration::from_millis(20)) => {}
                }
                if let Some(planned) = &self.upgrade {
                    upgrading
                        .step(planned, &self.registry, &store, &plain, &client, id)
                        .await?;
                }
                let summaries = plain
                    .instance_summaries(&[id])
                    .await
                    .map_err(|e| e.to_string())?;
                let now_status = summaries.first().map(|s| s.status);
                let sends_pending = plain
                    .activity(Utc::now())
                    .await
                    .map_err(|e| e.to_string())?
                    .pending_sends;
                if let Some(s) =
                    now_status.filter(|s| s.is_final() || *s == InstanceStatus::Suspended)
                {
                    if sends_pending == 0 {
                        status = Some(s);
                        break;
                    }
                }
                if tokio::time::Instant::now() > deadline {
                    break;
                }
            }
            if plan.as_ref().is_some_and(|p| p.has_crashed()) {
                // The crash: nothing more of this host runs; the runtime is dropped below.
                return Ok((Life { status: None }, id));
            }
            stop.cancel();
            let _ = running.await;
            Ok((Life { status }, id))
        });
        runtime.shutdown_background();
        result
    }

    /// Where the instance stands in the database, for an error.
    fn describe(&self, url: &str, id: Uuid) -> String {
        let Ok(runtime) = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        else {
            return "its state could not be read".into();
        };
        runtime.block_on(async {
            let store = match SqliteStore::open(url).await {
                Ok(store) => store,
                Err(e) => return format!("its state could not be read: {e}"),
            };
            let read = async {
                let instance: (String, String, Option<String>, i64) = sqlx::query_as(
                    "SELECT status, step, owner, epoch FROM instances WHERE id = $1",
                )
                .bind(id.to_string())
                .fetch_one(store.pool())
                .await?;
                let messages: Vec<(String, String, Option<String>, i64)> = sqlx::query_as(
                    "SELECT id, status, locked_by, delivery_count FROM messages \
                     WHERE status <> 'consumed'",
                )
                .fetch_all(store.pool())
                .await?;
                let sends: Vec<(String, String, Option<String>)> = sqlx::query_as(
                    "SELECT id, status, locked_by FROM outbox WHERE status <> 'delivered'",
                )
                .fetch_all(store.pool())
                .await?;
                Ok::<_, sqlx::Error>(format!(
                    "instance (status, step, owner, epoch) {instance:?}; messages not consumed \
                     {messages:?}; sends not delivered {sends:?}"
                ))
            };
            let described = read
                .await
                .unwrap_or_else(|e| format!("its state could not be read: {e}"));
            store.close().await;
            described
        })
    }

    /// Checks G1, G2, G3 and G5 from the database and the ports' record.
    fn check(
        &self,
        url: &str,
        id: Uuid,
        recorder: &Recorder,
    ) -> Result<Vec<(Reason, String)>, String> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| e.to_string())?;
        runtime.block_on(async {
            let store = SqliteStore::open(url).await.map_err(|e| e.to_string())?;
            let pool = store.pool();
            let sent: BTreeSet<String> = sqlx::query_scalar::<_, String>("SELECT id FROM outbox")
                .fetch_all(pool)
                .await
                .map_err(|e| e.to_string())?
                .into_iter()
                .collect();
            let delivered: BTreeSet<String> = recorder.deliveries().into_iter().map(|(_, id)| id).collect();
            if let Some(ghost) = delivered.difference(&sent).next() {
                return Err(format!("G2: message {ghost} was delivered but no committed point sent it"));
            }
            if let Some(lost) = sent.difference(&delivered).next() {
                return Err(format!("G2: committed send {lost} was never delivered"));
            }
            let left: Vec<(String, String)> = sqlx::query_as(
                "SELECT id, status FROM messages WHERE status <> 'consumed' AND (instance_id IS NULL OR instance_id = $1)",
            )
            .bind(id.to_string())
            .fetch_all(pool)
            .await
            .map_err(|e| e.to_string())?;
            if let Some((mid, status)) = left.first() {
                return Err(format!("G1/G5: message {mid} is still {status}, never consumed"));
            }
            let mut history = Vec::new();
            let rows = store.instance_detail(id).await.map_err(|e| e.to_string())?.map(|d| d.history);
            let rows: Vec<HistoryRow> = rows.unwrap_or_default();
            for (i, row) in rows.iter().enumerate() {
                if row.seq != i as i64 + 1 {
                    return Err(format!("G3: history seq {} at position {}", row.seq, i + 1));
                }
                if !matches!(row.reason, Reason::Dehydrate | Reason::Shutdown) {
                    history.push((row.reason, row.step.clone()));
                }
            }
            store.close().await;
            Ok(history)
        })
    }
}

#[derive(Clone, Copy)]
enum Setup {
    Start,
    Run(Uuid),
}
