//! Hosts as real `cairn` processes, the load they run, and the guarantee checks made afterwards
//! from the database and from the ports' own record (the ledger file the sample ports append
//! every delivered message id to).

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use cairn::store::{InstanceStatus, NewMessage, PublishOutcome};
use cairn::Client;
use serde_json::json;
use uuid::Uuid;

use super::TestDb;

/// Quick dehydration and polling, and a short lease so that takeovers happen within the test.
pub const HOST_ARGS: &[&str] = &[
    "--dehydrate-after-ms",
    "300",
    "--poll-ms",
    "20",
    "--lease-ms",
    "2000",
];

pub struct Run {
    pub db: TestDb,
    pub dir: tempfile::TempDir,
}

impl Run {
    pub fn ledger(&self) -> PathBuf {
        self.dir.path().join("ledger.tsv")
    }

    pub fn spawn_host(&self, n: usize) -> HostProcess {
        self.spawn_host_with(n, 0)
    }

    pub fn spawn_host_with(&self, n: usize, latency_ms: u64) -> HostProcess {
        self.spawn(n, latency_ms, HOST_ARGS, "warn")
    }

    /// A `cairn host` child with these host arguments and a log level; its log goes to
    /// `host-N.log` in the run's folder.
    pub fn spawn(&self, n: usize, latency_ms: u64, args: &[&str], log: &str) -> HostProcess {
        self.spawn_env(n, latency_ms, args, log, &[])
    }

    /// [`Run::spawn`] with more environment variables.
    pub fn spawn_env(
        &self,
        n: usize,
        latency_ms: u64,
        args: &[&str],
        log: &str,
        env: &[(&str, String)],
    ) -> HostProcess {
        let out = std::fs::File::create(self.dir.path().join(format!("host-{n}.log"))).unwrap();
        self.host_command(latency_ms, args, log)
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .map(HostProcess)
            .expect("spawn the cairn host")
    }

    /// A `cairn host` child with the default host arguments whose output goes to pipes nobody
    /// reads: their read ends are closed at once, so every line it writes fails (a log shipper
    /// that died).
    pub fn spawn_with_broken_log(&self, log: &str) -> HostProcess {
        let mut child = self
            .host_command(0, HOST_ARGS, log)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn the cairn host");
        drop(child.stdout.take());
        drop(child.stderr.take());
        HostProcess(child)
    }

    fn host_command(&self, latency_ms: u64, args: &[&str], log: &str) -> Command {
        let mut command = Command::new(env!("CARGO_BIN_EXE_cairn"));
        command
            .args(["--database", &self.db.url, "host"])
            .args(args)
            .env("CAIRN_PORT_LEDGER", self.ledger())
            .env("RUST_LOG", log)
            .env("CAIRN_SAMPLE_LATENCY_MS", latency_ms.to_string())
            // The booking services fail now and then: retried under the same id.
            .env("CAIRN_SAMPLE_FAILURE_PERCENT", "5")
            .stdin(Stdio::null());
        command
    }

    /// One host's log.
    pub fn log_of(&self, n: usize) -> String {
        std::fs::read_to_string(self.dir.path().join(format!("host-{n}.log"))).unwrap_or_default()
    }

    pub fn client(&self) -> Client {
        Client::new(self.db.store.clone(), cairn_orchestrations::registry())
    }

    /// Sends as the ports saw them: id -> number of deliveries.
    pub fn ledger_ids(&self) -> BTreeMap<String, usize> {
        let text = std::fs::read_to_string(self.ledger()).unwrap_or_default();
        let mut out = BTreeMap::new();
        for line in text.lines() {
            let id = line.split('\t').nth(1).expect("port<TAB>id").to_owned();
            *out.entry(id).or_default() += 1;
        }
        out
    }

    pub fn host_log(&self) -> String {
        let mut out = String::new();
        for entry in std::fs::read_dir(self.dir.path()).unwrap().flatten() {
            if entry.file_name().to_string_lossy().starts_with("host-") {
                out.push_str(&std::fs::read_to_string(entry.path()).unwrap_or_default());
            }
        }
        out
    }
}

pub async fn new_run(db: TestDb) -> Run {
    // Write the activating subscriptions first, so the load routes whether or not a host is up.
    cairn::Host::new(
        db.store.clone(),
        cairn_orchestrations::registry(),
        cairn::Ports::new(),
    )
    .sync_activations()
    .await
    .unwrap();
    Run {
        db,
        dir: tempfile::tempdir().unwrap(),
    }
}

/// The load: orders that ship, approvals with their decisions, invoice batches. Timeouts are long
/// so that every outcome is known in advance whatever the kills do to timing.
/// The credit score the bureau answers for loan `i` of a load.
fn loan_score(i: usize) -> u32 {
    450 + (i % 7) as u32 * 50
}

pub fn load(wave: usize, count: usize) -> (Vec<NewMessage>, Vec<NewMessage>) {
    let mut starts = Vec::new();
    let mut follow = Vec::new();
    let publish = |id: String, ty: &str, body| {
        NewMessage::published(format!("w{wave}-{id}"), ty, body, BTreeMap::new())
    };
    let mut i = 0;
    while starts.len() < count {
        i += 1;
        match i % 4 {
            3 => {
                // A trip; three in four find one service sold out and compensate.
                let trip_id = format!("w{wave}-trip-{i}");
                let sold_out = [None, Some("flight"), Some("hotel"), Some("car")][(i / 4) % 4];
                starts.push(publish(
                    format!("{trip_id}-requested"),
                    "trip.requested",
                    json!({"trip_id": trip_id, "traveller": "t", "sold_out": sold_out, "settle_ms": 1500}),
                ));
            }
            0 => {
                let order_id = format!("w{wave}-order-{i}");
                if cairn_orchestrations::ports::warehouse_loses(&order_id) {
                    continue;
                }
                let amount = if i % 11 == 0 { 5000.0 } else { 20.0 };
                starts.push(publish(format!("{order_id}-placed"), "order.placed",
                    json!({"order_id": order_id, "customer": "c", "amount": amount, "shipment_timeout_ms": 600_000})));
            }
            1 => {
                let request_id = format!("w{wave}-approval-{i}");
                starts.push(publish(format!("{request_id}-requested"), "approval.requested",
                    json!({"request_id": request_id, "approver": "alice", "escalate_after_ms": 600_000})));
                follow.push(publish(
                    format!("{request_id}-decision"),
                    "approval.decision",
                    json!({"request_id": request_id, "approved": true, "by": "alice"}),
                ));
                // A loan: its credit check is a called orchestration (one instance, the
                // caller's points) that sends and waits for the bureau's correlated answer.
                let loan_id = format!("w{wave}-loan-{i}");
                starts.push(publish(
                    format!("{loan_id}-requested"),
                    "loan.requested",
                    json!({"loan_id": loan_id, "customer": "c", "amount": 2500.0}),
                ));
                follow.push(publish(
                    format!("{loan_id}-checked"),
                    "credit.checked",
                    json!({"loan_id": loan_id, "score": loan_score(i)}),
                ));
            }
            _ => {
                let lines: Vec<_> = (0..4)
                    .map(|l| json!({"customer": format!("c{l}"), "amount": 10.0 * (l + 1) as f64}))
                    .collect();
                starts.push(publish(
                    format!("batch-{i}"),
                    "invoice.batch",
                    json!({"batch_id": format!("batch-{i}"), "lines": lines}),
                ));
            }
        }
    }
    (starts, follow)
}

pub async fn feed(run: &Run, wave: usize, count: usize) -> (Vec<Uuid>, Vec<String>) {
    let (starts, follow) = load(wave, count);
    let mut published: Vec<String> = starts.iter().chain(&follow).map(|m| m.id.clone()).collect();
    let client = run.client();
    let mut ids = Vec::new();
    for chunk in starts.chunks(50) {
        for outcome in client.publish_batch(chunk.to_vec()).await.unwrap() {
            match outcome {
                PublishOutcome::Routed(id) => ids.push(id),
                other => panic!("activation not routed: {other:?}"),
            }
        }
    }
    client.publish_batch(follow).await.unwrap();
    published.sort();
    (ids, published)
}

pub async fn wait_until_all_ended(run: &Run, ids: &[Uuid], timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        let summaries = run.db.store.instance_summaries(ids).await.unwrap();
        let open = summaries.iter().filter(|s| !s.status.is_final()).count();
        let pending = run
            .db
            .count("SELECT COUNT(*) FROM outbox WHERE status = 'pending'")
            .await;
        if open == 0 && pending == 0 && run.db.count("SELECT COUNT(*) FROM instances WHERE status NOT IN ('completed', 'failed', 'terminated')").await == 0 {
            return;
        }
        if Instant::now() > deadline {
            let stuck: Vec<_> = summaries
                .iter()
                .filter(|s| !s.status.is_final())
                .take(5)
                .collect();
            panic!("{open} instances still open, {pending} sends pending after {timeout:?}: {stuck:#?}\nhost log:\n{}", run.host_log());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// G1, G2, G5 and the samples' own results, read from the database and the ledger.
pub async fn check_guarantees(run: &Run, ids: &[Uuid], published: &[String]) {
    let db = &run.db;
    // Every instance ended as its input says it must; none was suspended by a fault.
    let summaries = db.store.instance_summaries(ids).await.unwrap();
    assert_eq!(summaries.len(), ids.len());
    for s in &summaries {
        assert_ne!(s.status, InstanceStatus::Suspended, "{s:?}");
    }
    assert_eq!(
        db.count("SELECT COUNT(*) FROM instances WHERE status = 'suspended'")
            .await,
        0
    );
    let failed = db.count("SELECT COUNT(*) FROM instances WHERE status = 'failed' AND orchestration = 'order-fulfilment'").await;
    let declined = db.count("SELECT COUNT(*) FROM messages WHERE message_type = 'order.placed' AND body LIKE '%5000%'").await;
    assert_eq!(failed, declined, "exactly the declined orders failed");
    // G1: every accepted message is stored, and consumed exactly once.
    for id in published {
        assert_eq!(
            db.count_with(
                "SELECT COUNT(*) FROM messages WHERE id = $1 AND status = 'consumed'",
                id
            )
            .await,
            1,
            "message {id}"
        );
    }
    assert_eq!(
        db.count("SELECT COUNT(*) FROM messages WHERE status <> 'consumed'")
            .await,
        0
    );
    // G5 through the results: a child result consumed twice would count twice in a batch total.
    let totals: Vec<String> =
        sqlx::query_scalar("SELECT output FROM instances WHERE orchestration = 'invoice-batch'")
            .fetch_all(&db.sql)
            .await
            .unwrap();
    for output in totals {
        let output: serde_json::Value = serde_json::from_str(&output).unwrap();
        assert_eq!(output["total"], json!(100.0), "{output}");
    }
    // Call Orchestration: every loan completed once, decided on the score its bureau answer
    // carried (the called credit check's result), and sent its decision.
    let loans: Vec<String> =
        sqlx::query_scalar("SELECT output FROM instances WHERE orchestration = 'loan-application'")
            .fetch_all(&db.sql)
            .await
            .unwrap();
    for output in &loans {
        let output: serde_json::Value = serde_json::from_str(output).unwrap();
        let i: usize = output["loan_id"]
            .as_str()
            .unwrap()
            .rsplit('-')
            .next()
            .unwrap()
            .parse()
            .unwrap();
        assert_eq!(output["score"], json!(loan_score(i)), "{output}");
        assert_eq!(
            output["granted"],
            json!(loan_score(i) >= cairn_orchestrations::loan_application::GRANTED_FROM),
            "{output}"
        );
    }
    assert_eq!(
        db.count("SELECT COUNT(*) FROM instances WHERE orchestration = 'loan-application' AND status = 'completed'").await,
        db.count("SELECT COUNT(*) FROM messages WHERE message_type = 'loan.requested'").await,
    );
    assert!(!loans.is_empty(), "the load had no loans");
    assert_eq!(
        db.count("SELECT COUNT(*) FROM instances WHERE orchestration = 'credit-check'")
            .await,
        0,
        "a called orchestration has no instance of its own"
    );
    // History rows are numbered without gaps: no persistence point lost or written twice.
    let gaps = db.count("SELECT COUNT(*) FROM instances i WHERE i.history_seq <> (SELECT COUNT(*) FROM history h WHERE h.instance_id = i.id)").await;
    assert_eq!(gaps, 0);
    // G2: the ports saw exactly the committed sends, each under its one id.
    let committed: BTreeSet<String> = sqlx::query_scalar::<_, String>("SELECT id FROM outbox")
        .fetch_all(&db.sql)
        .await
        .unwrap()
        .into_iter()
        .collect();
    let delivered = run.ledger_ids();
    let delivered_ids: BTreeSet<String> = delivered.keys().cloned().collect();
    let ghosts: Vec<_> = delivered_ids.difference(&committed).take(3).collect();
    assert!(
        ghosts.is_empty(),
        "delivered but never committed: {ghosts:?}"
    );
    let lost: Vec<_> = committed.difference(&delivered_ids).take(3).collect();
    assert!(lost.is_empty(), "committed but never delivered: {lost:?}");
    check_trips(run).await;
    let redelivered = delivered.values().filter(|n| **n > 1).count();
    eprintln!(
        "{} sends delivered, {redelivered} of them more than once (at least once, same id)",
        committed.len()
    );
}

/// The saga, from the booking services' own record: every booking a failed trip made is
/// cancelled exactly once (never twice, never skipped), a completed trip cancels nothing and sent
/// both messages of its atomic confirmation, and exactly the trips with a sold-out service failed.
async fn check_trips(run: &Run) {
    let text = std::fs::read_to_string(run.ledger()).unwrap_or_default();
    // Deduplicated by message id, as a receiver would: port, id, type, trip, reference.
    let mut lines: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for line in text.lines() {
        let cols: Vec<String> = line.split('\t').map(str::to_owned).collect();
        if cols.len() >= 3 {
            lines.insert(cols[1].clone(), cols);
        }
    }
    let mut booked: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut cancelled: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for cols in lines.values() {
        let (ty, trip, reference) = (
            &cols[2],
            cols.get(3).cloned().unwrap_or_default(),
            cols.get(4).cloned().unwrap_or_default(),
        );
        if cols.len() < 5 {
            continue;
        }
        if ty.ends_with(".book") && reference != "-" {
            booked.entry(trip).or_default().insert(reference);
        } else if ty.ends_with(".cancel") {
            cancelled.entry(trip).or_default().push(reference);
        }
    }
    let trips: Vec<(String, String, String)> = sqlx::query_as(
        "SELECT m.body, i.status, COALESCE(i.last_error, '') FROM messages m \
         JOIN instances i ON i.id = m.instance_id WHERE m.message_type = 'trip.requested'",
    )
    .fetch_all(&run.db.sql)
    .await
    .unwrap();
    let mut compensated = 0;
    for (body, status, error) in &trips {
        let body: serde_json::Value = serde_json::from_str(body).unwrap();
        let trip = body["trip_id"].as_str().unwrap().to_owned();
        let made = booked.get(&trip).cloned().unwrap_or_default();
        let mut undone = cancelled.get(&trip).cloned().unwrap_or_default();
        undone.sort();
        if body["sold_out"].is_null() {
            assert_eq!(status, "completed", "{trip}: {error}");
            assert_eq!(made.len(), 3, "{trip}");
            assert!(
                undone.is_empty(),
                "{trip} completed but cancelled {undone:?}"
            );
        } else {
            assert_eq!(status, "failed", "{trip}: {error}");
            let made: Vec<String> = made.into_iter().collect();
            assert_eq!(undone, made, "{trip}: each booking cancelled exactly once");
            compensated += made.len();
        }
    }
    let confirmations = lines
        .values()
        .filter(|c| c[0] == "notifications" && c[2].starts_with("trip."))
        .count();

    let completed = trips.iter().filter(|(_, s, _)| s == "completed").count();
    eprintln!(
        "{} trips: {completed} completed, {} compensated ({compensated} bookings cancelled)",
        trips.len(),
        trips.len() - completed
    );
    assert_eq!(
        confirmations,
        2 * completed,
        "itinerary and confirmation per completed trip"
    );
}

/// A `cairn host` child process, killed if the test ends (or panics) without stopping it.
pub struct HostProcess(pub Child);

impl HostProcess {
    pub fn sigkill(&mut self) {
        self.0.kill().expect("SIGKILL");
        self.0.wait().unwrap();
    }

    pub fn signal(&self, signal: nix::sys::signal::Signal) {
        let pid = nix::unistd::Pid::from_raw(self.0.id() as i32);
        nix::sys::signal::kill(pid, signal).unwrap();
    }

    pub fn sigterm(&self) {
        let pid = nix::unistd::Pid::from_raw(self.0.id() as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    }

    pub fn wait(&mut self) -> std::process::ExitStatus {
        self.0.wait().unwrap()
    }
}

impl Drop for HostProcess {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(None)) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

pub fn stop(mut host: HostProcess) {
    host.sigterm();
    host.wait();
}
