//! Send ports: leases, retries with backoff, the backup transport, dead letters and their
//! resubmission, the file and HTTP ports, and ordered delivery across a SIGKILL. Every test runs
//! on SQLite and PostgreSQL, and reads the outcome back from the database and from the target's
//! own deduplicated record.

#![allow(clippy::unwrap_used)] // tests may unwrap: a panic is a failed test

mod support;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cairn::store::InstanceStatus;
use cairn::{
    Client, Context, Correlation, Event, Fault, HostConfig, Next, Orchestration, OutboundMessage,
    PortError, Ports, Registry, RetryPolicy, UnexpectedEvent,
};
use serde_json::json;
use support::fixtures::{Deliveries, HostSetup, HostThread};
use support::TestDb;
use uuid::Uuid;

backend_tests!(
    a_flaky_target_gets_each_message_once_after_retries_with_backoff,
    a_target_that_never_succeeds_falls_back_to_the_backup_transport,
    without_a_backup_the_send_is_dead_lettered_the_instance_told_and_a_resubmit_delivers_it,
    a_delivery_lease_is_renewed_while_a_slow_delivery_runs,
    an_expired_delivery_lease_makes_the_send_deliverable_again_under_the_same_id,
    the_file_port_writes_each_message_atomically_named_by_its_id,
    the_http_port_posts_with_an_idempotency_key_retries_5xx_and_dead_letters_4xx,
    an_ordered_port_stops_on_a_failing_message_until_an_operator_resumes_it,
);

/// Sends `count` messages (`{"key", "n"}`) to `port` at start, then waits for `sender.done`; a
/// send's final failure completes it with `{"failed": message id}`.
struct Sender;

impl Orchestration for Sender {
    const NAME: &'static str = "sender";
    const VERSION: u32 = 1;
    type Input = serde_json::Value;
    type State = String;
    type Output = serde_json::Value;

    fn start(ctx: &mut Context, input: serde_json::Value) -> Result<Next<Self>, Fault> {
        let key = input["key"].as_str().unwrap_or_default().to_owned();
        let port = input["port"].as_str().unwrap_or_default().to_owned();
        for n in 0..input["count"].as_u64().unwrap_or(1) {
            ctx.send(&port, "item", &json!({ "key": key, "n": n }))?;
        }
        ctx.receive("sender.done", Correlation::on("key", &key));
        Ok(Next::Continue(key))
    }

    fn on_event(_ctx: &mut Context, _key: String, event: Event) -> Result<Next<Self>, Fault> {
        match event {
            Event::SendFailed {
                message_id, error, ..
            } => Ok(Next::Complete(
                json!({ "failed": message_id, "error": error }),
            )),
            Event::Message(m) if m.message_type == "sender.done" => {
                Ok(Next::Complete(json!({ "ok": true })))
            }
            other => Err(UnexpectedEvent(other.label()).into()),
        }
    }
}

fn registry() -> Registry {
    Registry::new().register::<Sender>()
}

fn config() -> HostConfig {
    HostConfig {
        poll_interval: Duration::from_millis(20),
        drain_timeout: Duration::from_millis(500),
        outbox_lock: Duration::from_secs(2),
        lease_duration: Duration::from_secs(2),
        ..HostConfig::default()
    }
}

fn fast_retry(max_attempts: u32) -> RetryPolicy {
    RetryPolicy {
        max_attempts,
        base: Duration::from_millis(20),
        factor: 2.0,
        cap: Duration::from_millis(200),
    }
}

/// A host with the `Sender` orchestration and `ports`, on a runtime of its own
/// ([`HostThread::crash`] drops the runtime: a kill with nothing saved).
async fn start_host(db: &TestDb, config: HostConfig, ports: Ports) -> (HostThread, Client) {
    let setup = HostSetup {
        registry: registry(),
        ports: Box::new(move |_| ports),
        ..HostSetup::new(config, Deliveries::default())
    };
    HostThread::launch(db, setup).await
}

/// A target's own record: every call, and the ids it accepted (deduplicated).
#[derive(Clone, Default)]
struct Target {
    calls: Arc<Mutex<Vec<String>>>,
    accepted: Arc<Mutex<BTreeMap<String, usize>>>,
}

impl Target {
    fn call(&self, id: &str) -> usize {
        let mut calls = self.calls.lock().unwrap();
        calls.push(id.to_owned());
        calls.iter().filter(|c| *c == id).count()
    }
    fn accept(&self, id: &str) {
        *self
            .accepted
            .lock()
            .unwrap()
            .entry(id.to_owned())
            .or_default() += 1;
    }
    fn calls_of(&self, id: &str) -> usize {
        self.calls
            .lock()
            .unwrap()
            .iter()
            .filter(|c| *c == id)
            .count()
    }
    fn accepted(&self) -> BTreeMap<String, usize> {
        self.accepted.lock().unwrap().clone()
    }
}

async fn outbox_ids(db: &TestDb, instance: Uuid) -> Vec<String> {
    db.texts(
        "SELECT id FROM outbox WHERE CAST(instance_id AS TEXT) = $1 ORDER BY seq",
        &instance.to_string(),
    )
    .await
}

/// Waits until the instance has sends and every one is delivered (read in one statement, so that
/// sends committed between two reads cannot slip through).
async fn wait_all_delivered(db: &TestDb, instance: Uuid, what: &str) {
    let id = instance.to_string();
    db.wait_for(what, Duration::from_secs(30), || async {
        db.count_with(
            "SELECT CASE WHEN EXISTS (SELECT 1 FROM outbox WHERE CAST(instance_id AS TEXT) = $1) \
             AND NOT EXISTS (SELECT 1 FROM outbox WHERE CAST(instance_id AS TEXT) = $1 \
             AND status <> 'delivered') THEN 1 ELSE 0 END",
            &id,
        )
        .await
            == 1
    })
    .await;
}

/// A time column as text (both backends), parsed.
fn parse_time(text: &str) -> chrono::DateTime<chrono::Utc> {
    chrono::DateTime::parse_from_rfc3339(text)
        .or_else(|_| chrono::DateTime::parse_from_str(text, "%Y-%m-%d %H:%M:%S%.f%#z"))
        .unwrap_or_else(|e| panic!("time {text:?}: {e}"))
        .with_timezone(&chrono::Utc)
}

async fn a_flaky_target_gets_each_message_once_after_retries_with_backoff(db: TestDb) {
    const FAILURES: usize = 3;
    let target = Target::default();
    let t = target.clone();
    let ports = Ports::new()
        .function("flaky", move |msg: OutboundMessage| {
            let t = t.clone();
            async move {
                if t.call(&msg.id) <= FAILURES {
                    return Err(PortError::transient("target unavailable"));
                }
                t.accept(&msg.id);
                Ok(None)
            }
        })
        .retry("flaky", fast_retry(6));
    let (host, client) = start_host(&db, config(), ports).await;
    let instance = client
        .start("sender", json!({ "key": "k", "port": "flaky", "count": 5 }))
        .await
        .unwrap();
    wait_all_delivered(&db, instance, "five sends delivered").await;
    drop(host);
    let ids = outbox_ids(&db, instance).await;
    assert_eq!(ids.len(), 5);
    let accepted = target.accepted();
    for id in &ids {
        assert_eq!(
            accepted.get(id),
            Some(&1),
            "{id} accepted once; accepted {accepted:?}"
        );
        assert_eq!(target.calls_of(id), FAILURES + 1, "{id} called 4 times");
    }
    // Attempts and backoff are visible in SQL: 4 attempts each; the last retry was scheduled at
    // least base + 2 base + 4 base (20 + 40 + 80 ms) after the send was committed.
    for id in &ids {
        assert_eq!(
            db.count_with("SELECT attempts FROM outbox WHERE id = $1", id)
                .await,
            (FAILURES + 1) as i64
        );
        let created = db
            .texts(
                "SELECT CAST(created_at AS TEXT) FROM outbox WHERE id = $1",
                id,
            )
            .await;
        let next = db
            .texts(
                "SELECT CAST(next_attempt_at AS TEXT) FROM outbox WHERE id = $1",
                id,
            )
            .await;
        let waited = parse_time(&next[0]) - parse_time(&created[0]);
        assert!(
            waited >= chrono::Duration::milliseconds(140),
            "{id}: backoff of {waited} is too short"
        );
        let via = db
            .texts("SELECT delivered_via FROM outbox WHERE id = $1", id)
            .await;
        assert_eq!(via, ["primary"]);
    }
    eprintln!(
        "5 sends, {} calls in all, each accepted once",
        target.calls.lock().unwrap().len()
    );
}

async fn a_target_that_never_succeeds_falls_back_to_the_backup_transport(db: TestDb) {
    let primary = Target::default();
    let backup = Target::default();
    let (p, b) = (primary.clone(), backup.clone());
    let ports = Ports::new()
        .function("down", move |msg: OutboundMessage| {
            let p = p.clone();
            async move {
                p.call(&msg.id);
                Err::<Option<serde_json::Value>, _>(PortError::transient("primary is down"))
            }
        })
        .retry("down", fast_retry(3))
        .backup(
            "down",
            Arc::new(move |msg: OutboundMessage| {
                let b = b.clone();
                async move {
                    b.call(&msg.id);
                    b.accept(&msg.id);
                    Ok(None)
                }
            }),
        );
    let (host, client) = start_host(&db, config(), ports).await;
    let instance = client
        .start("sender", json!({ "key": "b", "port": "down", "count": 2 }))
        .await
        .unwrap();
    wait_all_delivered(&db, instance, "sends delivered through the backup").await;
    drop(host);
    for id in outbox_ids(&db, instance).await {
        assert_eq!(primary.calls_of(&id), 3, "the primary got its 3 attempts");
        assert_eq!(backup.accepted().get(&id), Some(&1));
        assert_eq!(
            db.texts("SELECT delivered_via FROM outbox WHERE id = $1", &id)
                .await,
            ["backup"]
        );
        assert_eq!(
            db.count_with("SELECT attempts FROM outbox WHERE id = $1", &id)
                .await,
            4
        );
    }
    assert_eq!(db.count("SELECT COUNT(*) FROM dead_letters").await, 0);
}

async fn without_a_backup_the_send_is_dead_lettered_the_instance_told_and_a_resubmit_delivers_it(
    db: TestDb,
) {
    let down = Arc::new(AtomicBool::new(true));
    let target = Target::default();
    let (t, d) = (target.clone(), down.clone());
    let ports = Ports::new()
        .function("fragile", move |msg: OutboundMessage| {
            let (t, d) = (t.clone(), d.clone());
            async move {
                t.call(&msg.id);
                if d.load(Ordering::SeqCst) {
                    return Err(PortError::transient("target is down"));
                }
                t.accept(&msg.id);
                Ok(None)
            }
        })
        .retry("fragile", fast_retry(3));
    let (host, client) = start_host(&db, config(), ports).await;
    let instance = client
        .start(
            "sender",
            json!({ "key": "d", "port": "fragile", "count": 1 }),
        )
        .await
        .unwrap();
    db.wait_status(instance, InstanceStatus::Completed, Duration::from_secs(30))
        .await;
    let id = outbox_ids(&db, instance).await.remove(0);
    // The instance was told, naming the message.
    let detail = db.store.instance_detail(instance).await.unwrap().unwrap();
    assert_eq!(detail.output.as_ref().unwrap()["failed"], json!(id));
    let dead = db
        .store
        .dead_letter(&id)
        .await
        .unwrap()
        .expect("a dead letter");
    assert_eq!(dead.attempts, 3);
    assert_eq!(dead.port.as_deref(), Some("fragile"));
    assert!(dead.reason.contains("target is down"), "{}", dead.reason);
    assert_eq!(db.store.dead_letters(10).await.unwrap().len(), 1);
    assert_eq!(
        db.texts("SELECT status FROM outbox WHERE id = $1", &id)
            .await,
        ["dead"]
    );
    assert_eq!(target.calls_of(&id), 3);
    // The target recovers; the operator resubmits: delivered under the same id, once.
    down.store(false, Ordering::SeqCst);
    assert!(db
        .store
        .resubmit_dead_letter(&id, chrono::Utc::now())
        .await
        .unwrap());
    wait_all_delivered(&db, instance, "the resubmitted send delivered").await;
    drop(host);
    assert_eq!(target.accepted().get(&id), Some(&1));
    assert_eq!(db.count("SELECT COUNT(*) FROM dead_letters").await, 0);
    // Purging: nothing left to purge; a second resubmit finds nothing.
    assert_eq!(db.store.purge_dead_letters(&[], None).await.unwrap(), 0);
    assert!(!db
        .store
        .resubmit_dead_letter(&id, chrono::Utc::now())
        .await
        .unwrap());
}

async fn a_delivery_lease_is_renewed_while_a_slow_delivery_runs(db: TestDb) {
    let target = Target::default();
    let t = target.clone();
    let ports = Ports::new().function("slow", move |msg: OutboundMessage| {
        let t = t.clone();
        async move {
            t.call(&msg.id);
            tokio::time::sleep(Duration::from_millis(1500)).await;
            t.accept(&msg.id);
            Ok(None)
        }
    });
    // The lease lasts 300 ms, the delivery 1.5 s: without renewal the poll would take the row
    // again and deliver it a second time.
    let config = HostConfig {
        outbox_lock: Duration::from_millis(300),
        ..config()
    };
    let (host, client) = start_host(&db, config, ports).await;
    let instance = client
        .start("sender", json!({ "key": "s", "port": "slow", "count": 3 }))
        .await
        .unwrap();
    wait_all_delivered(&db, instance, "slow sends delivered").await;
    drop(host);
    for id in outbox_ids(&db, instance).await {
        assert_eq!(target.calls_of(&id), 1, "{id} was delivered more than once");
        assert_eq!(
            db.count_with("SELECT attempts FROM outbox WHERE id = $1", &id)
                .await,
            1
        );
    }
}

async fn an_expired_delivery_lease_makes_the_send_deliverable_again_under_the_same_id(db: TestDb) {
    let first = Target::default();
    let f = first.clone();
    let hangs = Ports::new().function("target", move |msg: OutboundMessage| {
        let f = f.clone();
        async move {
            f.call(&msg.id);
            tokio::time::sleep(Duration::from_secs(3600)).await;
            Ok(None)
        }
    });
    let config = HostConfig {
        outbox_lock: Duration::from_millis(500),
        ..config()
    };
    let (host, client) = start_host(&db, config.clone(), hangs).await;
    let instance = client
        .start(
            "sender",
            json!({ "key": "e", "port": "target", "count": 1 }),
        )
        .await
        .unwrap();
    db.wait_for("the delivery to start", Duration::from_secs(30), || async {
        !first.calls.lock().unwrap().is_empty()
    })
    .await;
    host.crash();
    let id = outbox_ids(&db, instance).await.remove(0);
    assert_eq!(
        db.texts("SELECT status FROM outbox WHERE id = $1", &id)
            .await,
        ["pending"]
    );
    let second = Target::default();
    let s = second.clone();
    let works = Ports::new().function("target", move |msg: OutboundMessage| {
        let s = s.clone();
        async move {
            s.call(&msg.id);
            s.accept(&msg.id);
            Ok(None)
        }
    });
    let (host, _) = start_host(&db, config, works).await;
    wait_all_delivered(&db, instance, "the send delivered after the lease expired").await;
    drop(host);
    assert_eq!(first.calls_of(&id), 1);
    assert_eq!(
        second.accepted().get(&id),
        Some(&1),
        "redelivered under the same id"
    );
}

async fn the_file_port_writes_each_message_atomically_named_by_its_id(db: TestDb) {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let ports = Ports::new().file("files", &out);
    let (host, client) = start_host(&db, config(), ports).await;
    let instance = client
        .start(
            "sender",
            json!({ "key": "f", "port": "files", "count": 20 }),
        )
        .await
        .unwrap();
    wait_all_delivered(&db, instance, "files written").await;
    drop(host);
    let ids = outbox_ids(&db, instance).await;
    let mut names: Vec<String> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    let mut expected: Vec<String> = ids.iter().map(|id| format!("{id}.json")).collect();
    expected.sort();
    assert_eq!(
        names, expected,
        "one file per message, no temporary file left"
    );
    for id in &ids {
        let text = std::fs::read_to_string(out.join(format!("{id}.json"))).unwrap();
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["id"], json!(id));
        assert_eq!(v["body"]["key"], json!("f"));
    }
}

/// A tiny HTTP server: answers 503 to the first POST of each idempotency key, 200 after; 400 to
/// a body whose `n` is 2. Records the keys it accepted.
async fn http_target(target: Target) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut socket, _)) = listener.accept().await else {
                return;
            };
            let target = target.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                let (head, body) = loop {
                    let n = socket.read(&mut chunk).await.unwrap_or(0);
                    if n == 0 {
                        return;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                    let text = String::from_utf8_lossy(&buf).into_owned();
                    if let Some(end) = text.find("\r\n\r\n") {
                        let head = text[..end].to_owned();
                        let length: usize = head
                            .lines()
                            .find_map(|l| {
                                let (k, v) = l.split_once(':')?;
                                k.eq_ignore_ascii_case("content-length")
                                    .then(|| v.trim().parse().ok())?
                            })
                            .unwrap_or(0);
                        if buf.len() >= end + 4 + length {
                            let body = String::from_utf8_lossy(&buf[end + 4..end + 4 + length])
                                .into_owned();
                            break (head, body);
                        }
                    }
                };
                let key = head
                    .lines()
                    .find_map(|l| {
                        let (k, v) = l.split_once(':')?;
                        k.eq_ignore_ascii_case("idempotency-key")
                            .then(|| v.trim().to_owned())
                    })
                    .unwrap_or_default();
                let body: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
                let calls = target.call(&key);
                let status = if body["n"] == json!(2) {
                    "400 Bad Request"
                } else if calls == 1 {
                    "503 Service Unavailable"
                } else {
                    target.accept(&key);
                    "200 OK"
                };
                let reply = format!(
                    "HTTP/1.1 {status}\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{{}}"
                );
                let _ = socket.write_all(reply.as_bytes()).await;
                let _ = socket.shutdown().await;
            });
        }
    });
    format!("http://{addr}/messages")
}

async fn the_http_port_posts_with_an_idempotency_key_retries_5xx_and_dead_letters_4xx(db: TestDb) {
    let target = Target::default();
    let url = http_target(target.clone()).await;
    let ports = Ports::new().http("web", &url).retry("web", fast_retry(4));
    let (host, client) = start_host(&db, config(), ports).await;
    let instance = client
        .start("sender", json!({ "key": "h", "port": "web", "count": 4 }))
        .await
        .unwrap();
    // Message n = 2 is refused with a 400: dead-lettered at once, and the instance told.
    db.wait_status(instance, InstanceStatus::Completed, Duration::from_secs(30))
        .await;
    let id = instance.to_string();
    db.wait_for("the other sends delivered", Duration::from_secs(30), || async {
        db.count_with(
            "SELECT COUNT(*) FROM outbox WHERE CAST(instance_id AS TEXT) = $1 AND status = 'delivered'",
            &id,
        )
        .await
            == 3
    })
    .await;
    drop(host);
    let ids = outbox_ids(&db, instance).await;
    let accepted = target.accepted();
    for (n, id) in ids.iter().enumerate() {
        if n == 2 {
            assert_eq!(target.calls_of(id), 1, "a 4xx is not retried");
            let dead = db
                .store
                .dead_letter(id)
                .await
                .unwrap()
                .expect("dead letter");
            assert!(dead.reason.contains("400"), "{}", dead.reason);
            assert_eq!(dead.attempts, 1);
        } else {
            assert_eq!(target.calls_of(id), 2, "a 503, then a 200");
            assert_eq!(accepted.get(id), Some(&1));
            assert_eq!(
                db.count_with("SELECT attempts FROM outbox WHERE id = $1", id)
                    .await,
                2
            );
        }
    }
    let detail = db.store.instance_detail(instance).await.unwrap().unwrap();
    assert_eq!(detail.output.as_ref().unwrap()["failed"], json!(ids[2]));
}

async fn an_ordered_port_stops_on_a_failing_message_until_an_operator_resumes_it(db: TestDb) {
    let down = Arc::new(AtomicBool::new(true));
    let arrived: Arc<Mutex<Vec<u64>>> = Arc::default();
    let (d, a) = (down.clone(), arrived.clone());
    let ports = Ports::new()
        .function("ledger", move |msg: OutboundMessage| {
            let (d, a) = (d.clone(), a.clone());
            async move {
                let n = msg.body["n"].as_u64().unwrap_or_default();
                if n == 5 && d.load(Ordering::SeqCst) {
                    return Err(PortError::transient("ledger refuses entry 5"));
                }
                a.lock().unwrap().push(n);
                Ok(None)
            }
        })
        .retry("ledger", fast_retry(3))
        .ordered("ledger");
    let (host, client) = start_host(&db, config(), ports).await;
    let instance = client
        .start(
            "sender",
            json!({ "key": "o", "port": "ledger", "count": 20 }),
        )
        .await
        .unwrap();
    db.wait_for(
        "the port to hold entry 5",
        Duration::from_secs(30),
        || async {
            db.count("SELECT COUNT(*) FROM outbox WHERE status = 'held'")
                .await
                == 1
        },
    )
    .await;
    // Stopped, not skipped: nothing after entry 5 was delivered. The held row is the marker:
    // the port's one delivery loop wrote it after trying entry 5 three times, so every pass in
    // which a port that skips would have delivered entry 6 came before it. A delivery during
    // the hold would break the commit order checked after the resume.
    assert_eq!(*arrived.lock().unwrap(), (0..5).collect::<Vec<_>>());
    let ids = outbox_ids(&db, instance).await;
    assert_eq!(
        db.texts("SELECT status FROM outbox WHERE id = $1", &ids[5])
            .await,
        ["held"]
    );
    down.store(false, Ordering::SeqCst);
    assert!(db
        .store
        .resume_send(&ids[5], chrono::Utc::now())
        .await
        .unwrap());
    wait_all_delivered(&db, instance, "the port to go on after the resume").await;
    drop(host);
    assert_eq!(*arrived.lock().unwrap(), (0..20).collect::<Vec<_>>());
}
