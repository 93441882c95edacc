//! The `cairn` binary as a real process: killed with SIGKILL at random moments under load, and
//! stopped with SIGTERM under load. The guarantees are then checked from the database and from
//! the ports' own record (the ledger file the sample ports append each delivered message id to).
//!
//! `CAIRN_SOAK=1` runs the long version of the crash test (`just soak`).

#![allow(clippy::unwrap_used)] // tests may unwrap: a panic is a failed test

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use cairn::store::{InstanceStatus, NewMessage, PublishOutcome};
use cairn::Client;
use rand::Rng;
use serde_json::json;
use support::TestDb;
use uuid::Uuid;

backend_tests!(
    sigkill_at_random_moments_loses_nothing,
    sigterm_saves_every_instance_and_a_restart_finishes_them
);

struct Run {
    db: TestDb,
    dir: tempfile::TempDir,
}

impl Run {
    fn ledger(&self) -> PathBuf {
        self.dir.path().join("ledger.tsv")
    }

    fn spawn_host(&self, n: usize) -> HostProcess {
        self.spawn_host_with(n, 0)
    }

    fn spawn_host_with(&self, n: usize, latency_ms: u64) -> HostProcess {
        let log = std::fs::File::create(self.dir.path().join(format!("host-{n}.log"))).unwrap();
        Command::new(env!("CARGO_BIN_EXE_cairn"))
            .args([
                "--database",
                &self.db.url,
                "host",
                "--dehydrate-after-ms",
                "300",
                "--poll-ms",
                "20",
                "--lease-ms",
                "2000",
            ])
            .env("CAIRN_PORT_LEDGER", self.ledger())
            .env("RUST_LOG", "warn")
            .env("CAIRN_SAMPLE_LATENCY_MS", latency_ms.to_string())
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .map(HostProcess)
            .expect("spawn the cairn host")
    }

    fn client(&self) -> Client {
        Client::new(self.db.store.clone(), cairn_orchestrations::registry())
    }

    /// Sends as the ports saw them: id -> number of deliveries.
    fn ledger_ids(&self) -> BTreeMap<String, usize> {
        let text = std::fs::read_to_string(self.ledger()).unwrap_or_default();
        let mut out = BTreeMap::new();
        for line in text.lines() {
            let id = line.split('\t').nth(1).expect("port<TAB>id").to_owned();
            *out.entry(id).or_default() += 1;
        }
        out
    }

    fn host_log(&self) -> String {
        let mut out = String::new();
        for entry in std::fs::read_dir(self.dir.path()).unwrap().flatten() {
            if entry.file_name().to_string_lossy().starts_with("host-") {
                out.push_str(&std::fs::read_to_string(entry.path()).unwrap_or_default());
            }
        }
        out
    }
}

async fn new_run(db: TestDb) -> Run {
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
fn load(wave: usize, count: usize) -> (Vec<NewMessage>, Vec<NewMessage>) {
    let mut starts = Vec::new();
    let mut follow = Vec::new();
    let publish = |id: String, ty: &str, body| {
        NewMessage::published(format!("w{wave}-{id}"), ty, body, BTreeMap::new())
    };
    let mut i = 0;
    while starts.len() < count {
        i += 1;
        match i % 3 {
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

async fn feed(run: &Run, wave: usize, count: usize) -> (Vec<Uuid>, Vec<String>) {
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

async fn wait_until_all_ended(run: &Run, ids: &[Uuid], timeout: Duration) {
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
async fn check_guarantees(run: &Run, ids: &[Uuid], published: &[String]) {
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
    let redelivered = delivered.values().filter(|n| **n > 1).count();
    eprintln!(
        "{} sends delivered, {redelivered} of them more than once (at least once, same id)",
        committed.len()
    );
}

/// A `cairn host` child process, killed if the test ends (or panics) without stopping it.
struct HostProcess(Child);

impl HostProcess {
    fn sigkill(&mut self) {
        self.0.kill().expect("SIGKILL");
        self.0.wait().unwrap();
    }

    fn sigterm(&self) {
        let pid = nix::unistd::Pid::from_raw(self.0.id() as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    }

    fn wait(&mut self) -> std::process::ExitStatus {
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

fn stop(mut host: HostProcess) {
    host.sigterm();
    host.wait();
}

async fn sigkill_at_random_moments_loses_nothing(db: TestDb) {
    let soak = std::env::var("CAIRN_SOAK").is_ok_and(|v| v == "1");
    let (first_wave, wave, kills) = if soak {
        (2_000, 400, 30)
    } else {
        (500, 150, 6)
    };
    let run = new_run(db).await;
    let mut host = run.spawn_host(0);
    let (mut ids, mut published) = feed(&run, 0, first_wave).await;
    let mut rng = rand::thread_rng();
    for k in 1..=kills {
        tokio::time::sleep(Duration::from_millis(rng.gen_range(100..700))).await;
        host.sigkill();
        let open = run
            .db
            .count("SELECT COUNT(*) FROM instances WHERE status NOT IN ('completed', 'failed')")
            .await;
        eprintln!("kill {k}: {open} instances in flight");
        assert!(
            open > 0,
            "kill {k} hit an idle host: the test would prove nothing"
        );
        // More work arrives while the host is down (G1: accepted with no host running).
        let (more_ids, more) = feed(&run, k, wave).await;
        ids.extend(more_ids);
        published.extend(more);
        host = run.spawn_host(k);
    }
    wait_until_all_ended(
        &run,
        &ids,
        Duration::from_secs(if soak { 900 } else { 180 }),
    )
    .await;
    stop(host);
    check_guarantees(&run, &ids, &published).await;
}

async fn sigterm_saves_every_instance_and_a_restart_finishes_them(db: TestDb) {
    let run = new_run(db).await;
    // Slow ports spread the children's results out in time, so batches are mid-collection.
    let host = run.spawn_host_with(0, 300);
    let (ids, published) = feed(&run, 0, 300).await;
    // Stop while batches are collecting their children's results: those results are consumed
    // without a persistence point of their own, so the shutdown point must save them.
    // Wait until batches hold children's results in memory: taken, not yet consumed.
    run.db.wait_for("batches holding children's results", Duration::from_secs(60), || async {
        run.db.count("SELECT COUNT(*) FROM messages WHERE kind = 'child_completed' AND status = 'routed' AND locked_by IS NOT NULL").await >= 5
    }).await;
    let started = Instant::now();
    let mut host = host;
    host.sigterm();
    let status = host.wait();
    let took = started.elapsed();
    assert!(
        status.success(),
        "host exit status {status}\n{}",
        run.host_log()
    );
    assert!(took < Duration::from_secs(15), "shutdown took {took:?}");
    let saved = run
        .db
        .count("SELECT COUNT(*) FROM history WHERE reason = 'shutdown'")
        .await;
    assert!(
        saved > 0,
        "no shutdown persistence point was written\n{}",
        run.host_log()
    );
    // Nothing stays locked, nothing is owned; messages the saved instances consumed are consumed.
    assert_eq!(
        run.db
            .count("SELECT COUNT(*) FROM messages WHERE locked_by IS NOT NULL")
            .await,
        0
    );
    assert_eq!(
        run.db
            .count("SELECT COUNT(*) FROM instances WHERE owner IS NOT NULL")
            .await,
        0
    );
    let consumed_at_shutdown = run.db.count(
        "SELECT COUNT(*) FROM messages m JOIN history h ON h.instance_id = m.instance_id AND h.reason = 'shutdown' \
         WHERE m.status = 'consumed' AND m.consumed_at = h.at").await;
    assert!(
        consumed_at_shutdown > 0,
        "the shutdown points consumed no message"
    );
    eprintln!("shutdown in {took:?}: {saved} instances saved, {consumed_at_shutdown} messages consumed by them");

    let host = run.spawn_host(1);
    wait_until_all_ended(&run, &ids, Duration::from_secs(120)).await;
    stop(host);
    check_guarantees(&run, &ids, &published).await;
}
