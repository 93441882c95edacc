//! [`CrashTest`]: one instance under the real engine, on SQLite or PostgreSQL, with a crash
//! injected before and after every commit in turn, and messages published and time moved at the
//! steps the test names.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use uuid::Uuid;

use crate::clock::{Clock, SharedClock};
use crate::host::{Client, Host, HostConfig};
use crate::registry::Registry;
use crate::store::faulty::{CrashPoint, FaultPlan, FaultyStore};
use crate::store::postgres::PostgresStore;
use crate::store::sqlite::SqliteStore;
use crate::store::{HistoryRow, InstanceStatus, Maintenance, NewMessage, Reason, Store};
use crate::Ports;

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

/// Something a crash test does when its instance reaches a step.
#[derive(Debug, Clone)]
enum Action {
    /// Publish this message.
    Publish(NewMessage),
    /// Move the engine's clock forward.
    Advance(chrono::Duration),
}

/// One instance under the real engine with a crash at every persistence point. See the
/// [module docs](crate::testing).
pub struct CrashTest {
    registry: Registry,
    ports: PortFactory,
    orchestration: String,
    input: serde_json::Value,
    messages: Vec<NewMessage>,
    at_steps: Vec<(String, Action)>,
    database: Option<String>,
    timeout: Duration,
    /// An upgrade planned with [`CrashTest::upgrade_to`].
    pub(super) upgrade: Option<super::upgrade::Planned>,
}

impl std::fmt::Debug for CrashTest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CrashTest")
            .field("orchestration", &self.orchestration)
            .field("messages", &self.messages.len())
            .field("at_steps", &self.at_steps.len())
            .finish_non_exhaustive()
    }
}

struct Life {
    status: Option<InstanceStatus>,
}

#[derive(Clone, Copy)]
enum Setup {
    Start,
    Run(Uuid),
}

/// A clock that runs with the system's, shifted by what the test moved it forward: timers come
/// due when the test says, and leases still expire (a takeover after a crash on PostgreSQL).
#[derive(Debug, Default)]
struct Shifted(Mutex<chrono::Duration>);

impl Shifted {
    fn advance(&self, by: chrono::Duration) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) += by;
    }
}

impl Clock for Shifted {
    fn now(&self) -> DateTime<Utc> {
        Utc::now() + *self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// What one run shares across its host lives: its database, its clock, the actions taken.
struct Run {
    url: String,
    clock: Arc<Shifted>,
    done: Mutex<BTreeSet<usize>>,
}

impl CrashTest {
    /// A crash test of one instance of `orchestration` started with `input`, on a temporary
    /// SQLite database per run (see [`CrashTest::database`] for PostgreSQL).
    pub fn new(registry: Registry, orchestration: &str, input: serde_json::Value) -> Self {
        Self {
            registry,
            ports: Arc::new(|_, _| Ports::new()),
            orchestration: orchestration.to_owned(),
            input,
            messages: Vec::new(),
            at_steps: Vec::new(),
            database: None,
            timeout: Duration::from_secs(30),
            upgrade: None,
        }
    }

    /// Where the runs' databases go: a `sqlite:` URL (the default) gives each run a temporary
    /// file; a `postgres://` URL names a server, on which each run creates a database of its own
    /// (`cairn_crash_<id>`, dropped after the run), so the URL's role must be allowed to create
    /// databases. The same test then checks the same guarantees on that backend.
    #[must_use]
    pub fn database(mut self, url: &str) -> Self {
        self.database = Some(url.to_owned());
        self
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

    /// A message to publish once the instance shows `step` (its `instances.step`, written at
    /// each persistence point), once per run, crashes or not.
    #[must_use]
    pub fn publish_at(mut self, step: &str, message: NewMessage) -> Self {
        self.at_steps
            .push((step.to_owned(), Action::Publish(message)));
        self
    }

    /// Moves the engine's clock forward by `by` once the instance shows `step`, once per run:
    /// the timers it waits for come due (an escalation after a day, in a test that takes
    /// milliseconds).
    #[must_use]
    pub fn advance_at(mut self, step: &str, by: chrono::Duration) -> Self {
        self.at_steps.push((step.to_owned(), Action::Advance(by)));
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

    fn runtime() -> Result<tokio::runtime::Runtime, String> {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| e.to_string())
    }

    fn one_run(&self, crash: Option<(u64, CrashPoint)>) -> Result<CrashReport, String> {
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let fresh =
            Self::runtime()?.block_on(fresh_database(self.database.as_deref(), dir.path()))?;
        let run = Run {
            url: fresh.url.clone(),
            clock: Arc::new(Shifted::default()),
            done: Mutex::new(BTreeSet::new()),
        };
        let result = self.run_on(&run, crash);
        Self::runtime()?.block_on(fresh.drop_it());
        result
    }

    fn run_on(&self, run: &Run, crash: Option<(u64, CrashPoint)>) -> Result<CrashReport, String> {
        let recorder = Recorder::default();
        let plan = FaultPlan::new();
        if let Some((k, point)) = crash {
            plan.crash_at_commit(k, point);
        }
        // The instance is started before the first host life, as a client would.
        let id = self.host_life(run, &recorder, None, Setup::Start)?.1;
        let (life, _) = self.host_life(run, &recorder, Some(plan.clone()), Setup::Run(id))?;
        let mut status = life.status;
        if crash.is_some() && !plan.has_crashed() && status.is_none() {
            return Err("the planned crash never happened and the instance did not end".into());
        }
        if status.is_none() || crash.is_some() {
            // Restart: a fresh host on the same database picks up where the last commit left.
            status = self
                .host_life(run, &recorder, None, Setup::Run(id))?
                .0
                .status;
        }
        let Some(status) = status else {
            return Err(format!(
                "instance did not end within {:?}; {}",
                self.timeout,
                describe(&run.url, id)
            ));
        };
        let commits = plan.commits();
        check(&run.url, id, &recorder).map(|history| CrashReport {
            commits,
            crashed_runs: 0,
            status,
            history,
        })
    }

    /// The actions whose step the instance shows now, not taken yet in this run: taken now.
    async fn act(&self, run: &Run, client: &Client, step: &str) -> Result<(), String> {
        for (n, (at, action)) in self.at_steps.iter().enumerate() {
            if at != step || !run.done.lock().unwrap_or_else(|e| e.into_inner()).insert(n) {
                continue;
            }
            match action {
                Action::Publish(message) => {
                    client
                        .publish_batch(vec![message.clone()])
                        .await
                        .map_err(|e| e.to_string())?;
                }
                Action::Advance(by) => run.clock.advance(*by),
            }
        }
        Ok(())
    }

    fn host_life(
        &self,
        run: &Run,
        recorder: &Recorder,
        plan: Option<Arc<FaultPlan>>,
        setup: Setup,
    ) -> Result<(Life, Uuid), String> {
        let runtime = Self::runtime()?;
        let result = runtime.block_on(async {
            let plain: Arc<dyn Store> = crate::store::open(&run.url)
                .await
                .map_err(|e| e.to_string())?;
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
                // A crashed host's leases must expire for the next one to take over (PostgreSQL).
                lease_duration: Duration::from_millis(1_000),
                ..HostConfig::default()
            };
            let clock: SharedClock = run.clock.clone();
            let ports = self.ports.clone();
            let recorded = recorder.clone();
            let host = Host::new(store.clone(), self.registry.clone(), Ports::new())
                .with_config(config)
                .with_clock(clock.clone())
                .with_ports_from(|client| ports(client, recorded));
            let client = host.client();
            let id = match setup {
                Setup::Start => {
                    host.sync_activations().await.map_err(|e| e.to_string())?;
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
                    plain.close().await;
                    return Ok((Life { status: None }, id));
                }
                Setup::Run(id) => id,
            };
            let mut upgrading = super::upgrade::Upgrading::default();
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
                let Some(summary) = summaries.first() else {
                    continue;
                };
                self.act(run, &client, &summary.step).await?;
                let sends_pending = plain
                    .activity(clock.now())
                    .await
                    .map_err(|e| e.to_string())?
                    .pending_sends;
                let ended =
                    summary.status.is_final() || summary.status == InstanceStatus::Suspended;
                if ended && sends_pending == 0 {
                    status = Some(summary.status);
                    break;
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
            plain.close().await;
            Ok((Life { status }, id))
        });
        runtime.shutdown_background();
        result
    }
}

/// A run's database: a temporary SQLite file, or a PostgreSQL database created for the run.
struct Fresh {
    url: String,
    /// For PostgreSQL: the server's URL and the database to drop after the run.
    drop: Option<(String, String)>,
}

impl Fresh {
    async fn drop_it(self) {
        let Some((server, name)) = self.drop else {
            return;
        };
        if let Ok(pool) = sqlx::PgPool::connect(&server).await {
            let dropped = sqlx::query(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"))
                .execute(&pool)
                .await;
            if let Err(e) = dropped {
                tracing::warn!(database = %name, error = %e, "a crash test's database was not dropped");
            }
            pool.close().await;
        }
    }
}

/// A fresh database for one run on `server` (a `postgres://` URL), else a SQLite file in `dir`.
async fn fresh_database(server: Option<&str>, dir: &std::path::Path) -> Result<Fresh, String> {
    let Some(server) = server.filter(|u| u.starts_with("postgres")) else {
        return Ok(Fresh {
            url: format!("sqlite://{}", dir.join("crash-test.db").display()),
            drop: None,
        });
    };
    let name = format!("cairn_crash_{}", Uuid::new_v4().simple());
    let pool = sqlx::PgPool::connect(server)
        .await
        .map_err(|e| format!("the crash test cannot reach PostgreSQL at its URL: {e}"))?;
    sqlx::query(&format!("CREATE DATABASE \"{name}\""))
        .execute(&pool)
        .await
        .map_err(|e| {
            format!("the crash test cannot create a database for a run (it needs CREATEDB): {e}")
        })?;
    pool.close().await;
    Ok(Fresh {
        url: with_database(server, &name),
        drop: Some((server.to_owned(), name)),
    })
}

/// `url` with its database name replaced by `name` (its query string kept).
fn with_database(url: &str, name: &str) -> String {
    let (base, query) = url
        .split_once('?')
        .map_or((url, None), |(b, q)| (b, Some(q)));
    let authority_end = base.find("://").map_or(0, |i| i + 3);
    let base = match base[authority_end..].find('/') {
        Some(slash) => &base[..authority_end + slash],
        None => base,
    };
    match query {
        Some(q) => format!("{base}/{name}?{q}"),
        None => format!("{base}/{name}"),
    }
}

/// Reads rows of one text column from the run's database, on either backend.
async fn texts(url: &str, sql: &str, param: Option<String>) -> Result<Vec<String>, String> {
    async fn on<DB: sqlx::Database>(
        pool: &sqlx::Pool<DB>,
        sql: &str,
        param: Option<String>,
    ) -> Result<Vec<String>, sqlx::Error>
    where
        for<'c> &'c mut DB::Connection: sqlx::Executor<'c, Database = DB>,
        for<'q> DB::Arguments<'q>: sqlx::IntoArguments<'q, DB>,
        String: for<'q> sqlx::Encode<'q, DB> + sqlx::Type<DB> + for<'r> sqlx::Decode<'r, DB>,
        (String,): for<'r> sqlx::FromRow<'r, DB::Row>,
    {
        let mut q = sqlx::query_as::<DB, (String,)>(sql);
        if let Some(p) = param {
            q = q.bind(p);
        }
        Ok(q.fetch_all(pool).await?.into_iter().map(|(t,)| t).collect())
    }
    let rows = if url.starts_with("postgres") {
        let store = PostgresStore::open(url).await.map_err(|e| e.to_string())?;
        let rows = on(store.pool(), sql, param).await;
        store.close().await;
        rows
    } else {
        let store = SqliteStore::open(url).await.map_err(|e| e.to_string())?;
        let rows = on(store.pool(), sql, param).await;
        store.close().await;
        rows
    };
    rows.map_err(|e| e.to_string())
}

/// Where the instance stands in the database, for an error.
fn describe(url: &str, id: Uuid) -> String {
    let Ok(runtime) = CrashTest::runtime() else {
        return "its state could not be read".into();
    };
    runtime.block_on(async {
        let read = async {
            let instance = texts(
                url,
                "SELECT status || ' ' || step || ' ' || COALESCE(owner, '-') || ' ' || \
                 CAST(epoch AS TEXT) FROM instances WHERE CAST(id AS TEXT) = $1",
                Some(id.to_string()),
            )
            .await?;
            let messages = texts(
                url,
                "SELECT id || ' ' || status || ' ' || COALESCE(locked_by, '-') || ' ' || \
                 CAST(delivery_count AS TEXT) FROM messages WHERE status <> 'consumed'",
                None,
            )
            .await?;
            let sends = texts(
                url,
                "SELECT id || ' ' || status || ' ' || COALESCE(locked_by, '-') FROM outbox \
                 WHERE status <> 'delivered'",
                None,
            )
            .await?;
            Ok::<_, String>(format!(
                "instance (status step owner epoch) {instance:?}; messages not consumed \
                 {messages:?}; sends not delivered {sends:?}"
            ))
        };
        read.await
            .unwrap_or_else(|e| format!("its state could not be read: {e}"))
    })
}

/// Checks G1, G2, G3 and G5 from the database and the ports' record.
fn check(url: &str, id: Uuid, recorder: &Recorder) -> Result<Vec<(Reason, String)>, String> {
    CrashTest::runtime()?.block_on(async {
        let sent: BTreeSet<String> = texts(url, "SELECT id FROM outbox", None)
            .await?
            .into_iter()
            .collect();
        let delivered: BTreeSet<String> = recorder
            .deliveries()
            .into_iter()
            .map(|(_, id)| id)
            .collect();
        if let Some(ghost) = delivered.difference(&sent).next() {
            return Err(format!(
                "G2: message {ghost} was delivered but no committed point sent it"
            ));
        }
        if let Some(lost) = sent.difference(&delivered).next() {
            return Err(format!("G2: committed send {lost} was never delivered"));
        }
        let left = texts(
            url,
            "SELECT id || ' is still ' || status FROM messages WHERE status <> 'consumed' \
             AND (instance_id IS NULL OR CAST(instance_id AS TEXT) = $1)",
            Some(id.to_string()),
        )
        .await?;
        if let Some(left) = left.first() {
            return Err(format!("G1/G5: message {left}, never consumed"));
        }
        let store = crate::store::open(url).await.map_err(|e| e.to_string())?;
        let rows: Vec<HistoryRow> = store
            .instance_detail(id)
            .await
            .map_err(|e| e.to_string())?
            .map(|d| d.history)
            .unwrap_or_default();
        store.close().await;
        let mut history = Vec::new();
        for (i, row) in rows.iter().enumerate() {
            if row.seq != i as i64 + 1 {
                return Err(format!("G3: history seq {} at position {}", row.seq, i + 1));
            }
            if !matches!(row.reason, Reason::Dehydrate | Reason::Shutdown) {
                history.push((row.reason, row.step.clone()));
            }
        }
        Ok(history)
    })
}

#[cfg(test)]
mod tests {
    use super::with_database;

    #[test]
    fn a_run_database_replaces_the_servers_database_in_the_url() {
        assert_eq!(
            with_database("postgres://u:p@127.0.0.1:5432/main?sslmode=disable", "run"),
            "postgres://u:p@127.0.0.1:5432/run?sslmode=disable"
        );
        assert_eq!(with_database("postgres://h", "run"), "postgres://h/run");
    }
}
