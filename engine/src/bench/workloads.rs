//! The workloads: each starts a fresh database and an engine host in this process, drives it,
//! and measures from the first start (or publish) to the last completion.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use serde_json::json;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::orchestrations::{self, Chain, FanOut, Waiter, GO_TYPE};
use super::{db, http, percentile, BenchError, Figure};
use crate::host::receive::ReceiveLocation;
use crate::host::{Ended, HostStats};
use crate::store::{Activation, InstanceStatus, NewMessage, Store};
use crate::{Client, Host, HostError, Orchestration};

/// A benchmark workload; see the [module docs](super).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "cli", derive(clap::ValueEnum))]
pub enum Workload {
    /// N orchestrations of 3 (and of 5) sequential request-response calls.
    #[cfg_attr(feature = "cli", value(name = "W1", alias = "w1"))]
    W1,
    /// One 3-call orchestration at a time: latency.
    #[cfg_attr(feature = "cli", value(name = "W2", alias = "w2"))]
    W2,
    /// Fan-out of 100 requests joined on all replies.
    #[cfg_attr(feature = "cli", value(name = "W3", alias = "w3"))]
    W3,
    /// Correlated wake-ups of dehydrated instances.
    #[cfg_attr(feature = "cli", value(name = "W4", alias = "w4"))]
    W4,
    /// Idle scale: memory with many waiting instances, and waking 1,000.
    #[cfg_attr(feature = "cli", value(name = "W5", alias = "w5"))]
    W5,
    /// W1 with 1, 2 and 3 hosts (PostgreSQL).
    #[cfg_attr(feature = "cli", value(name = "W6", alias = "w6"))]
    W6,
    /// The HTTP receive location: one message a request, from many clients.
    #[cfg_attr(feature = "cli", value(name = "W8", alias = "w8"))]
    W8,
    /// The raw ceiling of the database for what a persistence point writes.
    #[cfg_attr(feature = "cli", value(name = "ceiling"))]
    Ceiling,
    /// Steady state: W1 orchestrations at a constant rate for a while, with a short retention;
    /// database size and memory over time. Not in [`Workload::ALL`]: it runs for minutes.
    #[cfg_attr(feature = "cli", value(name = "W7", alias = "w7"))]
    W7,
}

/// How a workload's hosts run, beyond its size.
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    /// The hosts keep [`Metrics`](crate::host::Metrics) and serve them on a loopback port
    /// (the cost of metrics is W1 with this on against off).
    pub metrics: bool,
    /// W7: how long it runs.
    pub duration: Duration,
    /// W7: orchestrations started per second.
    pub rate: f64,
    /// W7: how long an ended instance is kept.
    pub retain: Duration,
    /// Tasks that each start one instance or publish one message per call (W1, W4, W8).
    pub callers: usize,
    /// W2 also from a separate client on its own connections.
    pub from_process: bool,
    /// W4: filtered activating subscriptions on its message type besides (none passes).
    pub filtered_subscriptions: usize,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            metrics: false,
            duration: Duration::from_secs(600),
            rate: 200.0,
            retain: Duration::from_secs(60),
            callers: DEFAULT_CALLERS,
            from_process: false,
            filtered_subscriptions: 0,
        }
    }
}

impl Workload {
    /// Every workload, ceiling first.
    pub const ALL: [Workload; 8] = [
        Workload::Ceiling,
        Workload::W1,
        Workload::W2,
        Workload::W3,
        Workload::W4,
        Workload::W5,
        Workload::W6,
        Workload::W8,
    ];

    /// Its size when `--instances` is not given.
    pub fn default_instances(self) -> usize {
        match self {
            Workload::W1 | Workload::W4 | Workload::W6 | Workload::W8 => 10_000,
            Workload::W2 => 500,
            Workload::W3 => 50,
            Workload::W5 => 100_000,
            Workload::Ceiling => 20_000,
            // Not a count: it runs for `Settings::duration`.
            Workload::W7 => 0,
        }
    }

    /// Runs it once on a fresh database at `url`, with the default [`Settings`].
    ///
    /// # Errors
    /// See [`BenchError`].
    pub async fn run(self, url: &str, instances: Option<usize>) -> Result<Vec<Figure>, BenchError> {
        self.run_with(url, instances, &Settings::default()).await
    }

    /// [`Workload::run`] with `settings`.
    ///
    /// # Errors
    /// See [`BenchError`].
    pub async fn run_with(
        self,
        url: &str,
        instances: Option<usize>,
        settings: &Settings,
    ) -> Result<Vec<Figure>, BenchError> {
        let n = instances.unwrap_or(self.default_instances()).max(1);
        let backend = db::Backend::of(url)?.name();
        let callers = settings.callers.max(1);
        let mut figures = match self {
            Workload::W1 => vec![
                w1(url, n, 3, 1, None, settings).await?,
                w1(url, n, 5, 1, None, settings).await?,
                w1(url, n, 3, 1, Some(callers), settings).await?,
            ],
            Workload::W2 if settings.from_process => {
                vec![w2(url, n).await?, w2_from_process(url, n).await?]
            }
            Workload::W7 => vec![super::steady::w7(url, settings).await?],
            Workload::W2 => vec![w2(url, n).await?],
            Workload::W3 => vec![w3(url, n, 100).await?],
            Workload::W4 => {
                let filtered = settings.filtered_subscriptions;
                vec![
                    w4(url, n, None, filtered).await?,
                    w4(url, n, Some(callers), filtered).await?,
                ]
            }
            Workload::W8 => w8(url, n, callers).await?,
            Workload::W5 => vec![w5(url, n).await?],
            Workload::W6 => w6(url, n).await?,
            Workload::Ceiling => db::ceiling(url, n).await?,
        };
        for f in &mut figures {
            f.backend = backend;
            f.runs = 1;
        }
        Ok(figures)
    }
}

/// Callers of the one-call-at-a-time figures when `--callers` is not given.
pub const DEFAULT_CALLERS: usize = 256;

/// How long a workload may take before it is called stalled.
const DEADLINE: Duration = Duration::from_secs(900);

/// Hosts running in this process, all reporting endings to one channel.
pub(super) struct Running {
    pub(super) client: Client,
    pub(super) store: Arc<dyn Store>,
    stores: Vec<Arc<dyn Store>>,
    pub(super) endings: mpsc::UnboundedReceiver<Ended>,
    stop: CancellationToken,
    hosts: Vec<JoinHandle<Result<HostStats, HostError>>>,
}

impl Running {
    /// One host per store, with the default settings.
    fn start(stores: Vec<Arc<dyn Store>>) -> Self {
        Self::start_with(stores, &Settings::default(), None, None)
    }

    /// One host per store, keeping metrics if `settings` say so, deleting ended instances
    /// after `retain` if given; the first also with the receive location `receive`.
    pub(super) fn start_with(
        stores: Vec<Arc<dyn Store>>,
        settings: &Settings,
        retain: Option<Duration>,
        receive: Option<ReceiveLocation>,
    ) -> Self {
        let (tx, endings) = mpsc::unbounded_channel();
        let mut receive = receive;
        let stop = CancellationToken::new();
        let registry = orchestrations::registry();
        let mut client = None;
        let mut hosts = Vec::new();
        let first = stores[0].clone();
        for store in stores.iter().cloned() {
            let mut host = Host::new(store, registry.clone(), orchestrations::ports())
                .with_endings(tx.clone());
            if let Some(location) = receive.take() {
                host = host.with_receive_location(location);
            }
            if settings.metrics {
                // Served on a loopback port nobody scrapes: the cost is the counting.
                match std::net::TcpListener::bind("127.0.0.1:0") {
                    Ok(listener) => host = host.with_operations(listener),
                    Err(_) => host = host.with_metrics(),
                }
            }
            if let Some(retain) = retain {
                host = host.with_config(crate::HostConfig {
                    retain_ended: Some(retain),
                    ..crate::HostConfig::default()
                });
            }
            client.get_or_insert_with(|| host.client());
            hosts.push(tokio::spawn(host.run(stop.clone())));
        }
        // One host runs what its own client starts; many share what a store's client starts.
        if hosts.len() > 1 {
            client = None;
        }
        Self {
            client: client.unwrap_or_else(|| Client::new(first.clone(), registry)),
            store: first,
            stores,
            endings,
            stop,
            hosts,
        }
    }

    /// Waits for `n` instances to end; returns when each ended. Any that did not complete is an
    /// error.
    async fn wait(&mut self, n: usize) -> Result<HashMap<Uuid, Instant>, BenchError> {
        let mut out = HashMap::with_capacity(n);
        let deadline = tokio::time::Instant::now() + DEADLINE;
        while out.len() < n {
            let ended = tokio::time::timeout_at(deadline, self.endings.recv())
                .await
                .map_err(|_| {
                    BenchError::Stalled(format!(
                        "only {} of {n} instances ended within {DEADLINE:?}",
                        out.len()
                    ))
                })?
                .ok_or_else(|| BenchError::Stalled("every host stopped".to_owned()))?;
            if ended.status != InstanceStatus::Completed {
                return Err(BenchError::Stalled(format!(
                    "instance {} ended {}; see `cairn show {}`",
                    ended.instance_id, ended.status, ended.instance_id
                )));
            }
            out.insert(ended.instance_id, Instant::now());
        }
        Ok(out)
    }

    /// Waits until `n` instances are dehydrated (saved and out of memory).
    async fn wait_dehydrated(&self, n: usize) -> Result<(), BenchError> {
        let deadline = Instant::now() + DEADLINE;
        loop {
            let activity = self.store.activity(chrono::Utc::now()).await?;
            if activity.count(InstanceStatus::Dehydrated) as usize >= n {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(BenchError::Stalled(format!(
                    "only {} of {n} instances dehydrated within {DEADLINE:?}",
                    activity.count(InstanceStatus::Dehydrated)
                )));
            }
            // Not more often: with 100,000 instances the counts take the server 0.1-0.3 s, and
            // the setup would share the server with them.
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }

    /// Stops the hosts; returns the persistence points they committed.
    pub(super) async fn stop(self) -> Result<u64, BenchError> {
        self.stop.cancel();
        let mut points = 0;
        for host in self.hosts {
            let stats = host.await.map_err(|e| BenchError::Task(e.to_string()))??;
            points += stats.points.values().sum::<u64>();
        }
        for store in self.stores {
            store.close().await;
        }
        Ok(points)
    }
}

pub(super) fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Starts instances in batches of `batch` (one transaction each); returns when each was started.
async fn start_batches(
    client: &Client,
    inputs: impl Iterator<Item = (String, serde_json::Value)>,
    batch: usize,
) -> Result<HashMap<Uuid, Instant>, BenchError> {
    let mut started = HashMap::new();
    let mut pending = Vec::with_capacity(batch);
    let mut inputs = inputs.peekable();
    while inputs.peek().is_some() {
        pending.extend(inputs.by_ref().take(batch));
        let at = Instant::now();
        for id in client.start_many(std::mem::take(&mut pending)).await? {
            started.insert(id, at);
        }
    }
    Ok(started)
}

/// Starts `n` instances of `name` with `input` from `callers` tasks, each one start per call, as
/// an application's request handlers would; returns when each call began.
async fn start_by_callers(
    client: &Client,
    n: usize,
    callers: usize,
    name: &'static str,
    input: serde_json::Value,
) -> Result<HashMap<Uuid, Instant>, BenchError> {
    let next = Arc::new(AtomicUsize::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..callers.min(n) {
        let (client, next, input) = (client.clone(), next.clone(), input.clone());
        tasks.spawn(async move {
            let mut started = Vec::new();
            while next.fetch_add(1, Ordering::Relaxed) < n {
                let at = Instant::now();
                started.push((client.start(name, input.clone()).await?, at));
            }
            Ok::<_, BenchError>(started)
        });
    }
    let mut started = HashMap::with_capacity(n);
    while let Some(done) = tasks.join_next().await {
        started.extend(done.map_err(|e| BenchError::Task(e.to_string()))??);
    }
    Ok(started)
}

/// Latencies from start to end, in milliseconds, and the last end.
fn latencies(
    started: &HashMap<Uuid, Instant>,
    ended: &HashMap<Uuid, Instant>,
) -> (Vec<f64>, Option<Instant>) {
    let lat = ended
        .iter()
        .filter_map(|(id, end)| started.get(id).map(|s| ms(end.duration_since(*s))))
        .collect();
    (lat, ended.values().max().copied())
}

/// W1: `n` orchestrations of `calls` calls on `hosts` hosts, started 500 a call, or one a call by
/// `callers`.
async fn w1(
    url: &str,
    n: usize,
    calls: u32,
    hosts: usize,
    callers: Option<usize>,
    settings: &Settings,
) -> Result<Figure, BenchError> {
    let mut stores = vec![db::fresh(url).await?];
    for _ in 1..hosts {
        stores.push(db::open(url).await?);
    }
    let mut running = Running::start_with(stores, settings, None, None);
    let t0 = Instant::now();
    let started = match callers {
        Some(c) => {
            start_by_callers(
                &running.client,
                n,
                c,
                Chain::NAME,
                json!({ "calls": calls }),
            )
            .await?
        }
        None => {
            let inputs = (0..n).map(|_| (Chain::NAME.to_owned(), json!({ "calls": calls })));
            start_batches(&running.client, inputs, 500).await?
        }
    };
    let ended = running.wait(n).await?;
    let (lat, last) = latencies(&started, &ended);
    let wall = last.unwrap_or(t0).duration_since(t0).as_secs_f64();
    let points = running.stop().await?;
    let mut extra = BTreeMap::from([("calls".to_owned(), f64::from(calls))]);
    if hosts > 1 || url.starts_with("postgres") {
        extra.insert("hosts".to_owned(), hosts as f64);
    }
    if let Some(c) = callers {
        extra.insert("callers".to_owned(), c as f64);
    }
    Ok(timed("W1", n, wall, Some(points), lat, extra))
}

/// Runs `n` instances one after the other; returns each one's latency and the whole.
async fn one_at_a_time(
    url: &str,
    n: usize,
    name: &str,
    input: serde_json::Value,
) -> Result<(Vec<f64>, f64, u64), BenchError> {
    let store = db::fresh(url).await?;
    let mut running = Running::start(vec![store]);
    let mut lat = Vec::with_capacity(n);
    let t0 = Instant::now();
    for _ in 0..n {
        let t = Instant::now();
        running.client.start(name, input.clone()).await?;
        running.wait(1).await?;
        lat.push(ms(t.elapsed()));
    }
    let wall = t0.elapsed().as_secs_f64();
    let points = running.stop().await?;
    Ok((lat, wall, points))
}

async fn w2(url: &str, n: usize) -> Result<Figure, BenchError> {
    let (lat, wall, points) = one_at_a_time(url, n, Chain::NAME, json!({ "calls": 3 })).await?;
    let extra = BTreeMap::from([("calls".to_owned(), 3.0)]);
    Ok(timed("W2", n, wall, Some(points), lat, extra))
}

/// W2 with each start made by a separate client on connections of its own, as another process
/// (the CLI, a web handler) makes it: the host hears of it only through the database. The
/// latency runs from the call to the completion's commit (the host's endings channel); the
/// client also watches for it through its own connection, polling each millisecond
/// (`seen_p50_ms`). `start_p50_ms` is the start call's own part (its commit).
async fn w2_from_process(url: &str, n: usize) -> Result<Figure, BenchError> {
    let store = db::fresh(url).await?;
    let mut running = Running::start(vec![store]);
    let other = db::open(url).await?;
    let client = Client::new(other.clone(), orchestrations::registry());
    let mut lat = Vec::with_capacity(n);
    let mut seen = Vec::with_capacity(n);
    let mut startd = Vec::with_capacity(n);
    let t0 = Instant::now();
    for _ in 0..n {
        let t = Instant::now();
        let id = client.start(Chain::NAME, json!({ "calls": 3 })).await?;
        startd.push(ms(t.elapsed()));
        running.wait(1).await?;
        lat.push(ms(t.elapsed()));
        loop {
            let status = other.instance_summaries(&[id]).await?;
            if status
                .first()
                .is_some_and(|s| s.status == InstanceStatus::Completed)
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        seen.push(ms(t.elapsed()));
    }
    let wall = t0.elapsed().as_secs_f64();
    other.close().await;
    let points = running.stop().await?;
    let mut extra = BTreeMap::from([("calls".to_owned(), 3.0), ("from_process".to_owned(), 1.0)]);
    if let Some(p50) = percentile(&mut seen, 0.50) {
        extra.insert("seen_p50_ms".to_owned(), p50);
    }
    if let Some(p50) = percentile(&mut startd, 0.50) {
        extra.insert("start_p50_ms".to_owned(), p50);
    }
    Ok(timed("W2", n, wall, Some(points), lat, extra))
}

/// A figure of `n` orchestrations in `wall` seconds with these latencies.
fn timed(
    workload: &str,
    n: usize,
    wall: f64,
    points: Option<u64>,
    mut lat: Vec<f64>,
    extra: BTreeMap<String, f64>,
) -> Figure {
    Figure {
        workload: workload.to_owned(),
        instances: n as u64,
        wall_s: wall,
        orchestrations_per_s: Some(n as f64 / wall),
        persistence_points_per_s: points.map(|p| p as f64 / wall),
        p50_ms: percentile(&mut lat, 0.50),
        p99_ms: percentile(&mut lat, 0.99),
        extra,
        ..Figure::default()
    }
}

async fn w3(url: &str, n: usize, width: u32) -> Result<Figure, BenchError> {
    let (lat, wall, points) =
        one_at_a_time(url, n, FanOut::NAME, json!({ "width": width })).await?;
    let extra = BTreeMap::from([
        ("width".to_owned(), f64::from(width)),
        ("per_fanout_ms".to_owned(), wall * 1000.0 / n as f64),
    ]);
    Ok(timed("W3", n, wall, Some(points), lat, extra))
}

fn waiter(key: Option<String>, timer_s: Option<i64>) -> (String, serde_json::Value) {
    (
        Waiter::NAME.to_owned(),
        json!({ "key": key, "timer_s": timer_s }),
    )
}

/// Publishes `bench.go` for these keys in batches of 500; returns when each batch was durable.
async fn publish_go(
    client: &Client,
    keys: impl Iterator<Item = String>,
) -> Result<Vec<Instant>, BenchError> {
    let keys: Vec<String> = keys.collect();
    let mut at = Vec::new();
    for chunk in keys.chunks(500) {
        let batch = chunk
            .iter()
            .map(|k| {
                NewMessage::published(
                    format!("go-{k}"),
                    GO_TYPE,
                    json!({ "key": k }),
                    BTreeMap::new(),
                )
            })
            .collect();
        client.publish_batch(batch).await?;
        at.push(Instant::now());
    }
    Ok(at)
}

/// Publishes `bench.go` for `n` keys from `callers` tasks, one message per call.
async fn publish_go_by_callers(
    client: &Client,
    n: usize,
    callers: usize,
) -> Result<(), BenchError> {
    let next = Arc::new(AtomicUsize::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..callers.min(n) {
        let (client, next) = (client.clone(), next.clone());
        tasks.spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n {
                    return Ok::<_, BenchError>(());
                }
                let k = format!("k{i}");
                client
                    .publish(
                        GO_TYPE,
                        json!({ "key": k }),
                        Some(format!("go-{k}")),
                        BTreeMap::new(),
                    )
                    .await?;
            }
        });
    }
    while let Some(done) = tasks.join_next().await {
        done.map_err(|e| BenchError::Task(e.to_string()))??;
    }
    Ok(())
}

/// W4: `n` dehydrated instances woken by `n` correlated messages, published 500 a call, or one a
/// call by `callers`.
async fn w4(
    url: &str,
    n: usize,
    callers: Option<usize>,
    filtered: usize,
) -> Result<Figure, BenchError> {
    let store = db::fresh(url).await?;
    if filtered > 0 {
        // Other orchestrations' activating subscriptions on `bench.go`, each with a filter no
        // W4 message passes: routing reads them with every batch, and evaluates every one of
        // them on every message (publish-subscribe copies a message routed to an instance to
        // every other orchestration whose filter it passes): both sides of the `OR`, the first
        // on the `key` each message carries.
        let activations: Vec<Activation> = (0..filtered)
            .map(|i| Activation {
                message_type: GO_TYPE.into(),
                orchestration: format!("bench-filtered-{i}"),
                version: 1,
                convoy: String::new(),
                filter: format!(
                    "key = 'nowhere-{i}' OR (amount >= {} AND region = 'nowhere-{i}')",
                    1000 * (i + 1)
                ),
                port: None,
            })
            .collect();
        store.sync_activations(&activations, Utc::now()).await?;
    }
    let mut running = Running::start(vec![store]);
    let inputs = (0..n).map(|i| waiter(Some(format!("k{i}")), None));
    start_batches(&running.client, inputs, 1000).await?;
    running.wait_dehydrated(n).await?;
    let t0 = Instant::now();
    match callers {
        Some(c) => publish_go_by_callers(&running.client, n, c).await?,
        None => {
            publish_go(&running.client, (0..n).map(|i| format!("k{i}"))).await?;
        }
    }
    let ended = running.wait(n).await?;
    let last = ended.values().max().copied().unwrap_or(t0);
    let wall = last.duration_since(t0).as_secs_f64();
    let lat: Vec<f64> = ended.values().map(|e| ms(e.duration_since(t0))).collect();
    running.stop().await?;
    let mut extra = BTreeMap::new();
    if let Some(c) = callers {
        extra.insert("callers".to_owned(), c as f64);
    }
    if filtered > 0 {
        extra.insert("filtered_subscriptions".to_owned(), filtered as f64);
    }
    Ok(timed("W4", n, wall, None, lat, extra))
}

/// W8: the HTTP receive location, `callers` clients each posting one message a request (`202`
/// after the commit), against `publish_batch` of 500 a call from one task, in the same run.
/// The messages activate nothing: what is measured is taking them in. Rates are messages
/// accepted per second (in `orchestrations_per_s`); latencies are per request. Last, the same
/// clients against a bare HTTP server ([`http::bare_server`]): the HTTP ceiling of the machine.
async fn w8(url: &str, n: usize, callers: usize) -> Result<Vec<Figure>, BenchError> {
    const TYPE: &str = "bench.w8";
    let addr = {
        let probe = std::net::TcpListener::bind("127.0.0.1:0")
            .map_err(|e| BenchError::Task(e.to_string()))?;
        probe
            .local_addr()
            .map_err(|e| BenchError::Task(e.to_string()))?
    };
    let store = db::fresh(url).await?;
    let running = Running::start_with(
        vec![store],
        &Settings::default(),
        None,
        Some(ReceiveLocation::http(addr)),
    );
    // The batched rate first, on the same host and database.
    let t0 = Instant::now();
    let mut batch_lat = Vec::new();
    for chunk in (0..n).collect::<Vec<_>>().chunks(500) {
        let t = Instant::now();
        let batch = chunk
            .iter()
            .map(|i| {
                NewMessage::published(
                    format!("batch-{i}"),
                    TYPE,
                    json!({ "i": i }),
                    BTreeMap::new(),
                )
            })
            .collect();
        running.client.publish_batch(batch).await?;
        batch_lat.push(ms(t.elapsed()));
    }
    let batched = timed(
        "W8",
        n,
        t0.elapsed().as_secs_f64(),
        None,
        batch_lat,
        BTreeMap::from([("via_http".to_owned(), 0.0)]),
    );
    let endpoint = format!("http://{addr}/messages");
    let (lat, wall) = http::post_one_a_request(&endpoint, TYPE, "http", n, callers).await?;
    running.stop().await?;
    let mut via_http = timed(
        "W8",
        n,
        wall,
        None,
        lat,
        BTreeMap::from([
            ("via_http".to_owned(), 1.0),
            ("callers".to_owned(), callers as f64),
        ]),
    );
    if let Some(rate) = batched.orchestrations_per_s.filter(|r| *r > 0.0) {
        let share = via_http.orchestrations_per_s.unwrap_or(0.0) / rate;
        via_http.extra.insert("vs_publish_batch".to_owned(), share);
    }
    // The same clients against a server with no engine behind it: what HTTP alone costs here.
    let stop = CancellationToken::new();
    let bare = http::bare_server(stop.clone()).await?;
    let bare_endpoint = format!("http://{bare}/messages");
    let (_, bare_wall) = http::post_one_a_request(&bare_endpoint, TYPE, "bare", n, callers).await?;
    stop.cancel();
    let bare_rate = n as f64 / bare_wall.max(f64::EPSILON);
    via_http
        .extra
        .insert("http_ceiling_per_s".to_owned(), bare_rate);
    let share = via_http.orchestrations_per_s.unwrap_or(0.0) / bare_rate;
    via_http.extra.insert("vs_http_ceiling".to_owned(), share);
    Ok(vec![batched, via_http])
}

/// (current, peak) resident set size of this process in MB, from `/proc/self/status`.
pub(super) fn rss_mb() -> (Option<f64>, Option<f64>) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|kb| kb.parse::<f64>().ok())
            .map(|kb| kb / 1024.0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

async fn w5(url: &str, n: usize) -> Result<Figure, BenchError> {
    let store = db::fresh(url).await?;
    let mut running = Running::start(vec![store]);
    let t0 = Instant::now();
    // Even instances wait for a message, odd ones for a timer an hour away.
    let inputs = (0..n).map(|i| {
        if i % 2 == 0 {
            waiter(Some(format!("k{i}")), None)
        } else {
            waiter(None, Some(3600))
        }
    });
    start_batches(&running.client, inputs, 1000).await?;
    running.wait_dehydrated(n).await?;
    let setup = t0.elapsed().as_secs_f64();
    let (_, load_peak) = rss_mb();
    // The peak while they wait: reset the high-water mark, stay idle a while, read it.
    let _ = std::fs::write("/proc/self/clear_refs", "5");
    let idle = if n >= 10_000 { 5000 } else { 200 };
    tokio::time::sleep(Duration::from_millis(idle)).await;
    let (rss, peak) = rss_mb();
    let wake = 1000.min(n.div_ceil(2));
    let t1 = Instant::now();
    publish_go(&running.client, (0..wake).map(|i| format!("k{}", 2 * i))).await?;
    let ended = running.wait(wake).await?;
    let last = ended.values().max().copied().unwrap_or(t1);
    let wake_s = last.duration_since(t1).as_secs_f64();
    let lat: Vec<f64> = ended.values().map(|e| ms(e.duration_since(t1))).collect();
    running.stop().await?;
    let mut extra = BTreeMap::from([
        ("setup_s".to_owned(), setup),
        ("woken".to_owned(), wake as f64),
        ("wake_s".to_owned(), wake_s),
    ]);
    for (k, v) in [
        ("rss_mb", rss),
        ("peak_rss_mb", peak),
        ("load_peak_rss_mb", load_peak),
    ] {
        if let Some(v) = v {
            extra.insert(k.to_owned(), v);
        }
    }
    let mut figure = timed("W5", wake, wake_s, None, lat, extra);
    figure.instances = n as u64;
    Ok(figure)
}

async fn w6(url: &str, n: usize) -> Result<Vec<Figure>, BenchError> {
    if db::Backend::of(url)? != db::Backend::Postgres {
        return Err(BenchError::NotApplicable(
            "W6 (many hosts on one database) needs PostgreSQL".to_owned(),
        ));
    }
    let mut out = Vec::new();
    for hosts in 1..=3 {
        let mut f = w1(url, n, 3, hosts, None, &Settings::default()).await?;
        f.workload = "W6".to_owned();
        out.push(f);
    }
    let one = out[0].orchestrations_per_s.unwrap_or(0.0);
    if one > 0.0 {
        for f in &mut out {
            let share = f.orchestrations_per_s.unwrap_or(0.0) / one;
            f.extra.insert("vs_one_host".to_owned(), share);
        }
    }
    Ok(out)
}
