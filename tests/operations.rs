//! Operations (issue 22), on each backend: the metrics a scrape shows against what the database
//! recorded, `/readyz` while the database is down and after, and retention deleting exactly the
//! ended instances past the period with everything that was theirs, and nothing else.

#![allow(clippy::unwrap_used)] // tests may unwrap: a panic is a failed test

mod support;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use cairn::clock::ManualClock;
use cairn::store::{ControlAction, InstanceStatus};
use cairn::{Client, OutboundMessage, PortError, Ports};
use serde_json::json;
use support::fixtures::{fast_config, Deliveries, HostSetup, HostThread};
use support::{pg, Backend, TestDb};
use uuid::Uuid;

const WAIT: Duration = Duration::from_secs(30);

backend_tests!(
    a_scrape_after_a_run_shows_the_counters_moved_by_what_the_run_did,
    retention_deletes_exactly_the_ended_instances_past_the_period_and_all_that_was_theirs,
    cairn_purge_counts_archives_and_deletes_what_it_is_told,
);

/// The body of `GET http://addr/path`, with its status.
async fn get(addr: SocketAddr, path: &str) -> (u16, String) {
    let response = reqwest::Client::new()
        .get(format!("http://{addr}{path}"))
        .timeout(Duration::from_secs(10))
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    (status, response.text().await.unwrap())
}

/// The value of one series (`name{labels}` exactly as rendered), or 0 when it is absent.
fn series(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(' '))
        .map_or(0.0, |v| v.trim().parse().unwrap())
}

/// A listener on a free loopback port.
fn free_listener() -> (std::net::TcpListener, SocketAddr) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    (listener, addr)
}

/// The `log` port, failing for good on a list of items holding 99 (dead-lettered at once);
/// every other port records.
fn ports_failing_on_99(client: Client, deliveries: Deliveries) -> Ports {
    let log = deliveries.clone();
    support::fixtures::ports(client, deliveries).function("log", move |msg: OutboundMessage| {
        let log = log.clone();
        async move {
            if msg
                .body
                .as_array()
                .is_some_and(|items| items.contains(&json!(99)))
            {
                return Err(PortError::permanent("the log refuses 99"));
            }
            log.0
                .lock()
                .unwrap()
                .push((msg.port.clone(), msg.id.clone(), msg.body.clone()));
            Ok(None)
        }
    })
}

async fn publish(client: &Client, ty: &str, body: serde_json::Value) {
    client
        .publish(ty, body, None, BTreeMap::new())
        .await
        .unwrap();
}

/// Starts a collector on `key` and feeds it `items`; with `done`, it completes.
async fn collector(client: &Client, key: &str, items: &[i64], done: bool) -> Uuid {
    let id = client
        .start("collector", json!({ "key": key }))
        .await
        .unwrap();
    for n in items {
        publish(client, "item", json!({ "key": key, "n": n })).await;
    }
    if done {
        publish(client, "collect.done", json!({ "key": key })).await;
    }
    id
}

/// Waits until no send is left to deliver.
async fn wait_sends_settled(db: &TestDb) {
    db.wait_for("every send delivered or dead", WAIT, || async {
        db.count("SELECT COUNT(*) FROM outbox WHERE status NOT IN ('delivered', 'dead')")
            .await
            == 0
    })
    .await;
}

async fn a_scrape_after_a_run_shows_the_counters_moved_by_what_the_run_did(db: TestDb) {
    let (listener, addr) = free_listener();
    let deliveries = Deliveries::default();
    let setup = HostSetup {
        ports: Box::new(move |client| ports_failing_on_99(client, deliveries)),
        operations: Some(listener),
        ..HostSetup::new(fast_config(), Deliveries::default())
    };
    let (host, client) = HostThread::launch(&db, setup).await;
    // Six collectors, two of whose last sends are dead-lettered.
    let mut ids = Vec::new();
    for i in 0..6 {
        let items: &[i64] = if i < 2 { &[1, 99] } else { &[1, 2] };
        ids.push(collector(&client, &format!("m{i}"), items, true).await);
    }
    for id in &ids {
        db.wait_status(*id, InstanceStatus::Completed, WAIT).await;
    }
    wait_sends_settled(&db).await;
    assert_eq!(get(addr, "/healthz").await.0, 200);
    assert_eq!(get(addr, "/readyz").await, (200, "ready\n".to_owned()));
    let (status, text) = get(addr, "/metrics").await;
    assert_eq!(status, 200);

    // Every point the host committed is a history row, by reason.
    let mut points = 0.0;
    for reason in [
        "send",
        "start",
        "scope_end",
        "suspend",
        "dehydrate",
        "shutdown",
        "complete",
    ] {
        let rows = db
            .count_with("SELECT COUNT(*) FROM history WHERE reason = $1", reason)
            .await;
        let counted = series(
            &text,
            &format!("cairn_persistence_points_total{{reason=\"{reason}\"}}"),
        );
        assert_eq!(counted, rows as f64, "points of reason {reason}:\n{text}");
        points += counted;
    }
    assert!(points >= 12.0, "at least a start and a complete each");
    // Each transition consumed one message (the start's, an item's, the done's).
    let consumed = db
        .count("SELECT COUNT(*) FROM messages WHERE status = 'consumed'")
        .await;
    assert_eq!(consumed, 6 * 4);
    assert_eq!(
        series(
            &text,
            "cairn_transitions_total{orchestration=\"collector\",outcome=\"ok\"}"
        ),
        consumed as f64
    );
    // Sends: delivered and dead-lettered, as the outbox and the dead letters say.
    let delivered = db
        .count("SELECT COUNT(*) FROM outbox WHERE status = 'delivered'")
        .await;
    assert_eq!(delivered, 6 * 2 - 2);
    assert_eq!(
        series(
            &text,
            "cairn_send_attempts_total{port=\"log\",outcome=\"delivered\"}"
        ),
        delivered as f64
    );
    let dead = db
        .count("SELECT COUNT(*) FROM dead_letters WHERE port = 'log'")
        .await;
    assert_eq!(dead, 2);
    assert_eq!(
        series(
            &text,
            "cairn_send_attempts_total{port=\"log\",outcome=\"dead\"}"
        ),
        dead as f64
    );
    assert_eq!(
        series(&text, "cairn_dead_letters"),
        db.count("SELECT COUNT(*) FROM dead_letters").await as f64
    );
    // What the client published (items and dones), and the gauges read from the store.
    let published = db
        .count("SELECT COUNT(*) FROM messages WHERE kind = 'published'")
        .await;
    assert_eq!(published, 6 * 3);
    assert_eq!(
        series(&text, "cairn_messages_published_total{door=\"api\"}"),
        published as f64
    );
    assert_eq!(
        series(
            &text,
            "cairn_instances{orchestration=\"collector\",status=\"completed\"}"
        ),
        6.0
    );
    assert_eq!(series(&text, "cairn_commits_fenced_total"), 0.0);
    assert!(series(&text, "cairn_commit_duration_seconds_count") >= 1.0);
    assert!(series(&text, "cairn_claim_duration_seconds_count") >= 1.0);
    host.stop();
}

/// `/readyz` answers 200, then 503 while `down` holds, then 200 again after `up`.
async fn readyz_follows_the_database(
    db: &TestDb,
    down: impl std::future::Future<Output = ()>,
    up: impl std::future::Future<Output = ()>,
) {
    let (listener, addr) = free_listener();
    let setup = HostSetup {
        operations: Some(listener),
        ..HostSetup::new(fast_config(), Deliveries::default())
    };
    let (host, client) = HostThread::launch(db, setup).await;
    let id = collector(&client, "before", &[1], true).await;
    db.wait_status(id, InstanceStatus::Completed, WAIT).await;
    assert_eq!(get(addr, "/readyz").await, (200, "ready\n".to_owned()));
    down.await;
    let (status, why) = get(addr, "/readyz").await;
    assert_eq!(status, 503, "{why}");
    assert!(why.starts_with("not ready: "), "{why}");
    assert_eq!(get(addr, "/healthz").await.0, 200, "the host itself runs");
    up.await;
    db.wait_for("/readyz ready again", WAIT, || async {
        get(addr, "/readyz").await.0 == 200
    })
    .await;
    // And the host works again.
    let id = collector(&client, "after", &[1], true).await;
    db.wait_status(id, InstanceStatus::Completed, WAIT).await;
    host.stop();
}

/// SQLite: another process holds the database's write lock (`BEGIN IMMEDIATE`), so no host can
/// commit; `/readyz` says so, and recovers when the lock is let go.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_fails_while_sqlite_is_locked_by_another_writer_and_recovers() {
    let db = TestDb::new(Backend::Sqlite).await.unwrap();
    let holder = Arc::new(tokio::sync::Mutex::new(None));
    let url = db.url.clone();
    let (take, give) = (holder.clone(), holder.clone());
    readyz_follows_the_database(
        &db,
        async move {
            use sqlx::Connection;
            let mut conn = sqlx::SqliteConnection::connect(&url).await.unwrap();
            sqlx::query("BEGIN IMMEDIATE")
                .execute(&mut conn)
                .await
                .unwrap();
            *take.lock().await = Some(conn);
        },
        async move {
            let mut conn = give.lock().await.take().unwrap();
            sqlx::query("ROLLBACK").execute(&mut conn).await.unwrap();
        },
    )
    .await;
}

/// PostgreSQL: the server is stopped, then started again.
#[cfg_attr(
    not(pg_available),
    ignore = "no PostgreSQL binaries at build time (orchestrations/build.rs); CONTRIBUTING.md, PostgreSQL"
)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_fails_while_postgres_is_stopped_and_recovers() {
    let Some(cluster) = pg::dedicated_cluster() else {
        return;
    };
    let url = pg::database_in(&cluster).await;
    let db = TestDb::at(Backend::Postgres, url, None).await;
    let cluster = Arc::new(cluster);
    let (stop, start) = (cluster.clone(), cluster.clone());
    readyz_follows_the_database(
        &db,
        async move {
            tokio::task::spawn_blocking(move || stop.stop_server().unwrap())
                .await
                .unwrap();
        },
        async move {
            tokio::task::spawn_blocking(move || start.start_server().unwrap())
                .await
                .unwrap();
        },
    )
    .await;
}

/// `id IN (...)` for SQL both backends accept.
fn in_list(column: &str, ids: &[Uuid]) -> String {
    let list: Vec<String> = ids.iter().map(|id| format!("'{id}'")).collect();
    format!("CAST({column} AS TEXT) IN ({})", list.join(", "))
}

/// The tables that hold rows of an instance, and their instance column.
const OWNED: [(&str, &str); 8] = [
    ("instances", "id"),
    ("history", "instance_id"),
    ("messages", "instance_id"),
    ("outbox", "instance_id"),
    ("subscriptions", "instance_id"),
    ("waited_keys", "instance_id"),
    ("timers", "instance_id"),
    ("control", "instance_id"),
];

/// Rows of `ids`, table by table.
async fn rows_of(db: &TestDb, ids: &[Uuid]) -> Vec<(&'static str, i64)> {
    let mut out = Vec::new();
    for (table, column) in OWNED {
        let n = db
            .count(&format!(
                "SELECT COUNT(*) FROM {table} WHERE {}",
                in_list(column, ids)
            ))
            .await;
        out.push((table, n));
    }
    out
}

/// Rows that name an instance that is not there.
async fn orphans(db: &TestDb) -> Vec<(&'static str, i64)> {
    let mut out = Vec::new();
    for (table, column) in &OWNED[1..] {
        let n = db
            .count(&format!(
                "SELECT COUNT(*) FROM {table} t WHERE t.{column} IS NOT NULL AND NOT EXISTS \
                 (SELECT 1 FROM instances i WHERE i.id = t.{column})"
            ))
            .await;
        if n > 0 {
            out.push((*table, n));
        }
    }
    out
}

async fn retention_deletes_exactly_the_ended_instances_past_the_period_and_all_that_was_theirs(
    db: TestDb,
) {
    let clock = ManualClock::new(chrono::Utc::now());
    let archive = tempfile::tempdir().unwrap();
    let config = cairn::HostConfig {
        retain_ended: Some(Duration::from_secs(3600)),
        retention_batch: 2,
        housekeeping_interval: Duration::from_millis(50),
        archive: Some(archive.path().to_owned()),
        ..fast_config()
    };
    let setup = HostSetup {
        clock: Some(Arc::new(clock.clone())),
        ..HostSetup::new(config, Deliveries::default())
    };
    let (host, client) = HostThread::launch(&db, setup).await;
    // Ended long ago: four completed (two sends each, delivered), one failed.
    let mut old = Vec::new();
    for i in 0..4 {
        old.push(collector(&client, &format!("old{i}"), &[i], true).await);
    }
    // Its start makes no point; the message waits unrouted until its receive is written.
    let failed = client.start("fail-fast", json!("ff")).await.unwrap();
    publish(&client, "fail-fast.go", json!({ "key": "ff" })).await;
    old.push(failed);
    // Not ended: two still collecting (an item each, unconsumed), one suspended.
    let live = vec![
        collector(&client, "live0", &[7], false).await,
        collector(&client, "live1", &[8], false).await,
    ];
    let suspended = collector(&client, "susp", &[9], false).await;
    db.wait_first_point(suspended, WAIT).await;
    db.store
        .control(
            suspended,
            ControlAction::Suspend {
                reason: "kept".into(),
            },
            clock_now(&clock),
        )
        .await
        .unwrap();
    for id in &old[..4] {
        db.wait_status(*id, InstanceStatus::Completed, WAIT).await;
    }
    db.wait_status(failed, InstanceStatus::Failed, WAIT).await;
    wait_sends_settled(&db).await;
    let mut kept = live.clone();
    kept.push(suspended);
    for id in &live {
        db.wait_first_point(*id, WAIT).await;
    }
    let kept_before = rows_of(&db, &kept).await;
    let old_history = db
        .count(&format!(
            "SELECT COUNT(*) FROM history WHERE {}",
            in_list("instance_id", &old)
        ))
        .await;

    // Two hours on: the old ones are past the period. Two more end now, inside it.
    clock.advance(chrono::Duration::hours(2));
    let recent = vec![
        collector(&client, "recent0", &[1], true).await,
        collector(&client, "recent1", &[2], true).await,
    ];
    db.wait_for("the old instances purged", WAIT, || async {
        db.count(&format!(
            "SELECT COUNT(*) FROM instances WHERE {}",
            in_list("id", &old)
        ))
        .await
            == 0
    })
    .await;
    for id in &recent {
        db.wait_status(*id, InstanceStatus::Completed, WAIT).await;
    }
    wait_sends_settled(&db).await;

    // Nothing of the old ones is left; the others are as they were.
    for (table, n) in rows_of(&db, &old).await {
        assert_eq!(n, 0, "rows of purged instances left in {table}");
    }
    assert_eq!(rows_of(&db, &kept).await, kept_before);
    assert_eq!(db.status(suspended).await, Some(InstanceStatus::Suspended));
    for id in &recent {
        assert_eq!(db.status(*id).await, Some(InstanceStatus::Completed));
        let history = db
            .count(&format!(
                "SELECT COUNT(*) FROM history WHERE {}",
                in_list("instance_id", &[*id])
            ))
            .await;
        assert!(history > 0);
    }
    assert_eq!(
        db.count("SELECT COUNT(*) FROM instances").await,
        (kept.len() + recent.len()) as i64
    );
    assert_eq!(orphans(&db).await, vec![]);

    // The archive holds each purged instance once, with its history.
    let mut archived = Vec::new();
    for entry in std::fs::read_dir(archive.path()).unwrap() {
        let text = std::fs::read_to_string(entry.unwrap().path()).unwrap();
        for line in text.lines() {
            archived.push(serde_json::from_str::<serde_json::Value>(line).unwrap());
        }
    }
    let mut ids: Vec<String> = archived
        .iter()
        .map(|a| a["id"].as_str().unwrap().to_owned())
        .collect();
    ids.sort();
    let mut expected: Vec<String> = old.iter().map(Uuid::to_string).collect();
    expected.sort();
    assert_eq!(ids, expected);
    let points: usize = archived
        .iter()
        .map(|a| a["history"].as_array().unwrap().len())
        .sum();
    assert_eq!(points as i64, old_history);
    host.stop();
}

fn clock_now(clock: &ManualClock) -> chrono::DateTime<chrono::Utc> {
    use cairn::clock::Clock;
    clock.now()
}

/// Runs the `cairn` binary on the test database; returns its standard output.
fn cairn(db: &TestDb, args: &[&str]) -> String {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_cairn"))
        .args(args)
        .env("CAIRN_DATABASE_URL", &db.url)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "cairn {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

async fn cairn_purge_counts_archives_and_deletes_what_it_is_told(db: TestDb) {
    let (host, client) = HostThread::start(&db, fast_config(), Deliveries::default()).await;
    let mut collectors = Vec::new();
    for i in 0..3 {
        collectors.push(collector(&client, &format!("p{i}"), &[i], true).await);
    }
    let failed = client.start("fail-fast", json!("pf")).await.unwrap();
    publish(&client, "fail-fast.go", json!({ "key": "pf" })).await;
    let running = collector(&client, "prun", &[1], false).await;
    for id in &collectors {
        db.wait_status(*id, InstanceStatus::Completed, WAIT).await;
    }
    db.wait_status(failed, InstanceStatus::Failed, WAIT).await;
    db.wait_first_point(running, WAIT).await;
    wait_sends_settled(&db).await;
    host.stop();
    // Everything ended before a time in the future: a dry run counts, and deletes nothing.
    let soon = (chrono::Utc::now() + chrono::Duration::minutes(1)).to_rfc3339();
    let out = cairn(&db, &["purge", "--ended-before", &soon, "--dry-run"]);
    assert!(out.starts_with("4 ended instances"), "{out}");
    assert_eq!(db.count("SELECT COUNT(*) FROM instances").await, 5);
    // Nothing ended a day ago.
    let out = cairn(&db, &["purge", "--ended-before", "1d"]);
    assert!(out.starts_with("0 ended instances"), "{out}");
    // One orchestration only, archived.
    let archive = tempfile::tempdir().unwrap();
    let dir = archive.path().to_str().unwrap();
    let out = cairn(
        &db,
        &[
            "purge",
            "--ended-before",
            &soon,
            "--orchestration",
            "fail-fast",
            "--archive",
            dir,
        ],
    );
    assert!(
        out.starts_with("1 ended instances of \"fail-fast\""),
        "{out}"
    );
    assert_eq!(db.status(failed).await, None);
    // The rest, in batches of two.
    let out = cairn(
        &db,
        &[
            "purge",
            "--ended-before",
            &soon,
            "--batch",
            "2",
            "--archive",
            dir,
        ],
    );
    assert!(out.starts_with("3 ended instances"), "{out}");
    for id in &collectors {
        assert_eq!(db.status(*id).await, None);
    }
    assert!(
        matches!(
            db.status(running).await,
            Some(InstanceStatus::Running | InstanceStatus::Dehydrated)
        ),
        "a running instance is never purged"
    );
    assert_eq!(orphans(&db).await, vec![]);
    let lines: usize = std::fs::read_dir(archive.path())
        .unwrap()
        .map(|e| {
            std::fs::read_to_string(e.unwrap().path())
                .unwrap()
                .lines()
                .count()
        })
        .sum();
    assert_eq!(lines, 4);
}
