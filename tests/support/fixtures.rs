//! Test-only orchestrations and a host that can be crashed.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cairn::store::faulty::{FaultPlan, FaultyStore};
use cairn::store::Store;
use cairn::{
    Client, Context, Correlation, Event, Fault, Host, HostConfig, HostStats, Next, Orchestration,
    OutboundMessage, PortError, Ports, Registry, UnexpectedEvent,
};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

/// Collects `item` messages for a key without a persistence point (only memory changes), then on
/// `collect.done` sends everything it collected to the `log` port and completes.
pub struct Collector;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum CollectorState {
    Collecting { key: String, items: Vec<i64> },
}

impl Orchestration for Collector {
    const NAME: &'static str = "collector";
    const VERSION: u32 = 1;
    const ACTIVATED_BY: &'static [&'static str] = &["collect.start"];
    type Input = serde_json::Value;
    type State = CollectorState;
    type Output = Vec<i64>;

    fn start(ctx: &mut Context, input: serde_json::Value) -> Result<Next<Self>, Fault> {
        let key = input["key"].as_str().unwrap_or_default().to_owned();
        ctx.send("log", "collect.started", &key)?;
        listen(ctx, &key);
        Ok(Next::Continue(CollectorState::Collecting {
            key,
            items: Vec::new(),
        }))
    }

    fn on_event(
        ctx: &mut Context,
        state: CollectorState,
        event: Event,
    ) -> Result<Next<Self>, Fault> {
        let CollectorState::Collecting { key, mut items } = state;
        let message = event.message()?;
        match message.message_type.as_str() {
            "item" => {
                items.push(message.body["n"].as_i64().ok_or("item without n")?);
                listen(ctx, &key);
                Ok(Next::Continue(CollectorState::Collecting { key, items }))
            }
            "collect.done" => {
                ctx.send("log", "collect.items", &items)?;
                Ok(Next::Complete(items))
            }
            _ => Err(UnexpectedEvent(event.label()).into()),
        }
    }
}

fn listen(ctx: &mut Context, key: &str) {
    ctx.receive("item", Correlation::on("key", key));
    ctx.receive("collect.done", Correlation::on("key", key));
}

/// Panics on a `boom` message; completes on `fine`.
pub struct Panicker;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum PanickerState {
    Waiting { key: String },
}

impl Orchestration for Panicker {
    const NAME: &'static str = "panicker";
    const VERSION: u32 = 1;
    type Input = String;
    type State = PanickerState;
    type Output = ();

    fn start(ctx: &mut Context, key: String) -> Result<Next<Self>, Fault> {
        ctx.receive("boom", Correlation::on("key", &key));
        ctx.receive("fine", Correlation::on("key", &key));
        Ok(Next::Continue(PanickerState::Waiting { key }))
    }

    fn on_event(
        _ctx: &mut Context,
        _state: PanickerState,
        event: Event,
    ) -> Result<Next<Self>, Fault> {
        if event.message()?.message_type == "boom" {
            panic!("boom: this transition always panics");
        }
        Ok(Next::Complete(()))
    }
}

/// Every orchestration the engine tests use.
pub fn registry() -> Registry {
    cairn_orchestrations::registry()
        .register::<Collector>()
        .register::<Panicker>()
}

/// What the ports delivered: (port, message id, body).
#[derive(Clone, Default, Debug)]
pub struct Deliveries(pub Arc<Mutex<Vec<(String, String, serde_json::Value)>>>);

impl Deliveries {
    pub fn all(&self) -> Vec<(String, String, serde_json::Value)> {
        self.0.lock().unwrap().clone()
    }
    pub fn ids(&self) -> Vec<String> {
        self.all().into_iter().map(|(_, id, _)| id).collect()
    }
    pub fn bodies(&self, port: &str) -> Vec<serde_json::Value> {
        self.all()
            .into_iter()
            .filter(|(p, _, _)| p == port)
            .map(|(_, _, b)| b)
            .collect()
    }
}

/// The sample ports plus `log`, all recording into `deliveries`.
pub fn ports(client: Client, deliveries: Deliveries) -> Ports {
    let rec = move |d: Deliveries, reply: fn(&OutboundMessage) -> Option<serde_json::Value>| {
        move |msg: OutboundMessage| {
            let d = d.clone();
            async move {
                d.0.lock()
                    .unwrap()
                    .push((msg.port.clone(), msg.id.clone(), msg.body.clone()));
                Ok::<_, PortError>(reply(&msg))
            }
        }
    };
    let warehouse = deliveries.clone();
    Ports::new()
        .function("payment", rec(deliveries.clone(), |m| {
            Some(serde_json::json!({"authorised": m.body["amount"].as_f64() < Some(1000.0), "code": "A"}))
        }))
        .function("billing", rec(deliveries.clone(), |m| {
            Some(serde_json::json!({"billed": m.body["amount"].as_f64() <= Some(500.0)}))
        }))
        .function("notifications", rec(deliveries.clone(), |_| None))
        .function("log", rec(deliveries, |_| None))
        .function("warehouse", move |msg: OutboundMessage| {
            let d = warehouse.clone();
            let client = client.clone();
            async move {
                d.0.lock().unwrap().push((msg.port.clone(), msg.id.clone(), msg.body.clone()));
                let order = msg.body["order_id"].as_str().unwrap_or_default().to_owned();
                client
                    .publish("shipment.confirmed", serde_json::json!({"order_id": order, "tracking": "T"}),
                        Some(format!("ship-{order}")), BTreeMap::new())
                    .await
                    .map_err(|e| PortError::transient(e.to_string()))?;
                Ok(None)
            }
        })
}

/// Fast settings for tests.
pub fn fast_config() -> HostConfig {
    HostConfig {
        poll_interval: Duration::from_millis(20),
        dehydrate_after: Duration::from_secs(60),
        drain_timeout: Duration::from_millis(500),
        outbox_lock: Duration::from_secs(2),
        lease_duration: Duration::from_secs(2),
        ..HostConfig::default()
    }
}

/// A host on a thread and runtime of its own, so that a test can crash it: dropping the runtime
/// stops every task of the host at once, with nothing saved, as a killed process would.
pub struct HostThread {
    stop: CancellationToken,
    crash: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<Option<HostStats>>>,
}

impl HostThread {
    /// Starts a host on the test database with `registry()` and `ports()`, on a runtime and
    /// store of its own (wrapped in a [`FaultyStore`] when a plan is given). Returns once the
    /// host's activating subscriptions are written, with a client.
    pub async fn start(
        db: &super::TestDb,
        config: HostConfig,
        deliveries: Deliveries,
    ) -> (Self, Client) {
        Self::start_with(db, config, deliveries, None).await
    }

    /// [`HostThread::start`] with injected faults.
    pub async fn start_with(
        db: &super::TestDb,
        config: HostConfig,
        deliveries: Deliveries,
        plan: Option<Arc<FaultPlan>>,
    ) -> (Self, Client) {
        let url = db.url.clone();
        let stop = CancellationToken::new();
        let (crash_tx, crash_rx) = tokio::sync::oneshot::channel::<()>();
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel::<Client>();
        let token = stop.clone();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap();
            let stats = rt.block_on(async move {
                let plain = cairn::store::open(&url).await.expect("open store");
                let store: Arc<dyn Store> = match plan {
                    Some(plan) => Arc::new(FaultyStore::new(plain, plan)),
                    None => plain,
                };
                let host = Host::new(store, registry(), Ports::new()).with_config(config);
                let client = host.client();
                let host = host.with_ports(ports(client.clone(), deliveries));
                host.sync_activations().await.expect("activations");
                let _ = ready_tx.send(client);
                tokio::select! {
                    result = host.run(token) => Some(result.expect("host run")),
                    _ = crash_rx => None,
                }
            });
            rt.shutdown_background();
            stats
        });
        let client = ready_rx.await.expect("host thread started");
        (
            Self {
                stop,
                crash: Some(crash_tx),
                thread: Some(thread),
            },
            client,
        )
    }

    /// Stops the host gracefully (shutdown persistence points) and returns its stats.
    pub fn stop(mut self) -> HostStats {
        self.stop.cancel();
        self.thread
            .take()
            .unwrap()
            .join()
            .unwrap()
            .expect("host stopped")
    }

    /// Crashes the host: its runtime is dropped mid-flight.
    pub fn crash(mut self) {
        let _ = self.crash.take().unwrap().send(());
        let _ = self.thread.take().unwrap().join();
    }
}

impl Drop for HostThread {
    fn drop(&mut self) {
        self.stop.cancel();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
