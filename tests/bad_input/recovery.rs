//! Bad input: the database itself. A host must resume by itself, within seconds of the fault
//! clearing, with nothing lost and no restart: after a full disk (SQLite), a long-held write lock
//! (SQLite), a database restart (PostgreSQL). And SIGTERM while the database is unreachable
//! must stop a `cairn host` within its drain time, what it could not save being replayed by the
//! next host.
//!
//! Each test prints what it measured (`--nocapture`): the recovery times, the exit time.
//!
//! The load is `Collector` instances (`fixtures.rs`): each takes `item` messages in memory only,
//! with no persistence point of its own, and on `collect.done` sends the items it took to the
//! `log` port and completes with them. An item consumed twice, or lost, shows in its output.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cairn::store::sqlite::SqliteStore;
use cairn::store::{InstanceStatus, Store};
use cairn::{Client, Host, HostConfig, HostStats, Ports};
use serde_json::json;
use sqlx::Connection;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::support::fixtures::{fast_config, ports, registry, Deliveries};
use crate::support::processes::{check_guarantees, feed, new_run, wait_until_all_ended};
use crate::support::{pg, Backend, TestDb};

/// Collectors started by each test.
const KEYS: usize = 10;

fn key(n: usize) -> String {
    format!("k{n}")
}

/// A host on `store` with the test orchestrations and recording ports; quick dehydration, so
/// that idle instances write persistence points during the fault too.
async fn host_on(store: Arc<dyn Store>, deliveries: &Deliveries) -> (Host, Client) {
    let config = HostConfig {
        dehydrate_after: Duration::from_millis(300),
        ..fast_config()
    };
    let host = Host::new(store, registry(), Ports::new()).with_config(config);
    let client = host.client();
    let host = host.with_ports(ports(client.clone(), deliveries.clone()));
    host.sync_activations().await.expect("activations");
    (host, client)
}

/// Publishes until the store takes it (the same id each time: a repeat is ignored, G5);
/// returns how long that took.
async fn publish_until_taken(client: &Client, ty: &str, body: serde_json::Value, id: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match client
            .publish(ty, body.clone(), Some(id.to_owned()), BTreeMap::new())
            .await
        {
            Ok(_) => return,
            Err(e) => {
                assert!(
                    Instant::now() < deadline,
                    "{id} still refused after 20 s: {e}"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
}

/// Starts the collectors and gives each items 1 and 2.
async fn start_collectors(client: &Client) {
    for k in 0..KEYS {
        let key = key(k);
        publish_until_taken(
            client,
            "collect.start",
            json!({"key": key}),
            &format!("start-{key}"),
        )
        .await;
        for n in 1..=2 {
            publish_until_taken(
                client,
                "item",
                json!({"key": key, "n": n}),
                &format!("item-{key}-{n}"),
            )
            .await;
        }
    }
}

/// Item 3 and the end for every collector, each published until taken; returns when the first
/// was taken.
async fn finish_collectors(client: &Client) -> Duration {
    let started = Instant::now();
    let mut first = None;
    for k in 0..KEYS {
        let key = key(k);
        publish_until_taken(
            client,
            "item",
            json!({"key": key, "n": 3}),
            &format!("item-{key}-3"),
        )
        .await;
        first.get_or_insert_with(|| started.elapsed());
        publish_until_taken(
            client,
            "collect.done",
            json!({"key": key}),
            &format!("done-{key}"),
        )
        .await;
    }
    first.unwrap_or_default()
}

/// The collectors' instances, once each has been started.
async fn collector_ids(db: &TestDb) -> Vec<Uuid> {
    let ids: Vec<String> = sqlx::query_scalar(
        "SELECT CAST(id AS TEXT) FROM instances WHERE orchestration = 'collector'",
    )
    .fetch_all(&db.sql)
    .await
    .expect("instances");
    ids.iter().map(|id| id.parse().expect("a uuid")).collect()
}

/// Waits until every collector has saved its items and left memory (the `dehydrate` point).
async fn wait_all_dehydrated(db: &TestDb) {
    db.wait_for("the collectors saved their items and went idle", Duration::from_secs(20), || async {
        db.count("SELECT COUNT(*) FROM instances WHERE orchestration = 'collector' AND status = 'dehydrated'")
            .await
            == KEYS as i64
    })
    .await;
}

/// The fault has just cleared: finishes the collectors and prints how long it took from now to
/// the first publish committed, to the host's first persistence point, and to every collector
/// completed.
async fn resume_and_measure(db: &TestDb, client: &Client, what: &str) {
    let cleared = Instant::now();
    let history = db.count("SELECT COUNT(*) FROM history").await;
    let first_point = async {
        db.wait_for(
            "the host's first persistence point",
            Duration::from_secs(20),
            || async { db.count("SELECT COUNT(*) FROM history").await > history },
        )
        .await;
        cleared.elapsed()
    };
    let (first_publish, first_point) = tokio::join!(finish_collectors(client), first_point);
    wait_all_completed(db, Duration::from_secs(20)).await;
    eprintln!(
        "{what}: first publish committed after {first_publish:?}, the host's first point after \
         {first_point:?}, every instance completed after {:?}",
        cleared.elapsed()
    );
}

/// Waits until every collector completed; returns how long that took.
async fn wait_all_completed(db: &TestDb, timeout: Duration) -> Duration {
    let started = Instant::now();
    db.wait_for("every collector completed", timeout, || async {
        db.count("SELECT COUNT(*) FROM instances WHERE orchestration = 'collector' AND status = 'completed'")
            .await
            == KEYS as i64
    })
    .await;
    started.elapsed()
}

/// Nothing lost, nothing consumed twice: every collector completed with items 1, 2 and 3 once
/// each, every stored message is consumed, and the log port got each collector's items (once
/// every committed send is delivered: a send leaves after its commit, not with it).
async fn check_nothing_lost(db: &TestDb, deliveries: &Deliveries) {
    db.wait_for(
        "every committed send delivered",
        Duration::from_secs(20),
        || async {
            db.count("SELECT COUNT(*) FROM outbox WHERE status <> 'delivered'")
                .await
                == 0
        },
    )
    .await;
    let ids = collector_ids(db).await;
    assert_eq!(ids.len(), KEYS, "one instance per key");
    for id in ids {
        assert_eq!(db.status(id).await, Some(InstanceStatus::Completed));
        let output: String =
            sqlx::query_scalar("SELECT output FROM instances WHERE CAST(id AS TEXT) = $1")
                .bind(id.to_string())
                .fetch_one(&db.sql)
                .await
                .expect("output");
        let output: Vec<i64> = serde_json::from_str(&output).expect("a list of items");
        assert_eq!(output, vec![1, 2, 3], "instance {id}: each item once");
    }
    assert_eq!(
        db.count("SELECT COUNT(*) FROM messages WHERE status <> 'consumed'")
            .await,
        0,
        "every message consumed"
    );
    assert_eq!(
        db.count("SELECT COUNT(*) FROM messages").await,
        (KEYS * 5) as i64,
        "each message stored once"
    );
    let logged = deliveries.bodies("log");
    let items: Vec<_> = logged.iter().filter(|b| b.is_array()).collect();
    assert!(
        items.len() >= KEYS,
        "each collector's items were sent: {logged:?}"
    );
    assert!(items.iter().all(|b| **b == json!([1, 2, 3])), "{logged:?}");
}

/// Runs `test` beside a host on `store` (in this task: the host's future need not be `Send`),
/// then stops the host; the host must not have stopped by itself.
async fn beside_host<F>(host: Host, test: F) -> HostStats
where
    F: std::future::Future<Output = ()>,
{
    let stop = CancellationToken::new();
    let run = host.run(stop.clone());
    tokio::pin!(run);
    let test = async {
        test.await;
        stop.cancel();
    };
    tokio::pin!(test);
    let mut tested = false;
    loop {
        tokio::select! {
            stats = &mut run => {
                assert!(tested, "the host stopped by itself: {stats:?}");
                return stats.expect("the host ran");
            }
            () = &mut test, if !tested => tested = true,
        }
    }
}

/// SQLite, disk full: while full, a publish is refused with a clear error; once space is freed
/// the host resumes by itself. (It used to stay up and never recover, every write refused with
/// "attempted to call begin_with at non-zero transaction depth", until restarted.) The database's
/// size is capped for the host's store (`SqliteStore::open_with_max_pages`, `SQLITE_FULL` past
/// it as on a full disk); the test fills and frees it from a connection of its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_full_disk_a_sqlite_host_resumes_by_itself_with_nothing_lost() {
    let db = TestDb::new(Backend::Sqlite).await.expect("SQLite");
    sqlx::query("CREATE TABLE filler (x BLOB)")
        .execute(&db.sql)
        .await
        .expect("filler table");
    // Room for the host to work in: 2 MB of free pages, within the cap (the size now).
    sqlx::query("INSERT INTO filler VALUES (zeroblob(2000000))")
        .execute(&db.sql)
        .await
        .expect("room");
    sqlx::query("DELETE FROM filler")
        .execute(&db.sql)
        .await
        .expect("room");
    let store: Arc<dyn Store> = Arc::new(
        SqliteStore::open_with_max_pages(&db.url, 1)
            .await
            .expect("open"),
    );
    let deliveries = Deliveries::default();
    let (host, client) = host_on(store, &deliveries).await;
    beside_host(host, async {
        start_collectors(&client).await;
        wait_all_dehydrated(&db).await;

        // The disk fills up.
        sqlx::query("INSERT INTO filler VALUES (zeroblob(4000000))")
            .execute(&db.sql)
            .await
            .expect("filled");
        let big = json!({"key": "k0", "blob": "x".repeat(200_000)});
        let refused = client
            .publish("unheard.of", big, Some("big".into()), BTreeMap::new())
            .await
            .expect_err("a publish to a full database is refused");
        eprintln!("disk full: publish refused: {refused}");
        assert!(
            refused.to_string().contains("full"),
            "a clear error: {refused}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;

        // Space comes back.
        sqlx::query("DELETE FROM filler")
            .execute(&db.sql)
            .await
            .expect("freed");
        resume_and_measure(&db, &client, "disk full: after space was freed").await;
    })
    .await;
    check_nothing_lost(&db, &deliveries).await;
}

/// SQLite, a long-held lock: another connection holds the write lock (`BEGIN IMMEDIATE`) for
/// 12 s, longer than the store's busy timeout (10 s), so that the host's writes are refused
/// with `SQLITE_BUSY` and not only delayed. The host waits, and resumes once the lock is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sqlite_host_waits_out_a_long_held_write_lock_with_nothing_lost() {
    let db = TestDb::new(Backend::Sqlite).await.expect("SQLite");
    let deliveries = Deliveries::default();
    let (host, client) = host_on(db.store.clone(), &deliveries).await;
    beside_host(host, async {
        start_collectors(&client).await;
        wait_all_dehydrated(&db).await;
        let mut locker = sqlx::SqliteConnection::connect(&db.url)
            .await
            .expect("a second connection");
        sqlx::query("BEGIN IMMEDIATE")
            .execute(&mut locker)
            .await
            .expect("the write lock");
        // Meanwhile a publish waits, and is refused once the busy timeout runs out.
        let waited = Instant::now();
        let refused = client
            .publish(
                "item",
                json!({"key": "k0", "n": 3}),
                Some("item-k0-3".into()),
                BTreeMap::new(),
            )
            .await
            .expect_err("refused while the lock is held");
        eprintln!(
            "write lock held: publish refused after {:?}: {refused}",
            waited.elapsed()
        );
        tokio::time::sleep(Duration::from_secs(12).saturating_sub(waited.elapsed())).await;
        sqlx::query("COMMIT")
            .execute(&mut locker)
            .await
            .expect("released");
        resume_and_measure(&db, &client, "write lock held 12 s: after it was released").await;
    })
    .await;
    check_nothing_lost(&db, &deliveries).await;
}

/// Stops or starts the server off the runtime's threads: the host runs in the test's task.
async fn server(cluster: &Arc<pg::Cluster>, action: fn(&pg::Cluster) -> Result<(), String>) {
    let cluster = cluster.clone();
    tokio::task::spawn_blocking(move || action(&cluster))
        .await
        .expect("pg_ctl ran")
        .expect("pg_ctl succeeded");
}

/// PostgreSQL, a database restart: the server is stopped for 3 s and started again while one
/// host runs; the host resumes by itself within seconds.
#[cfg_attr(
    not(pg_available),
    ignore = "no PostgreSQL binaries at build time (orchestrations/build.rs); CONTRIBUTING.md, PostgreSQL"
)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_postgres_host_resumes_after_a_database_restart_with_nothing_lost() {
    let Some(cluster) = pg::dedicated_cluster() else {
        return;
    };
    let url = pg::database_in(&cluster).await;
    let cluster = Arc::new(cluster);
    let db = TestDb::at(Backend::Postgres, url, None).await;
    let deliveries = Deliveries::default();
    let (host, client) = host_on(db.store.clone(), &deliveries).await;
    beside_host(host, async {
        start_collectors(&client).await;
        wait_all_dehydrated(&db).await;
        let stopping = Instant::now();
        server(&cluster, pg::Cluster::stop_server).await;
        eprintln!(
            "database restart: server stopped in {:?}",
            stopping.elapsed()
        );
        let refused = client
            .publish(
                "item",
                json!({"key": "k0", "n": 3}),
                Some("item-k0-3".into()),
                BTreeMap::new(),
            )
            .await
            .expect_err("refused while the server is down");
        eprintln!("database restart: publish refused: {refused}");
        tokio::time::sleep(Duration::from_secs(3)).await;
        let starting = Instant::now();
        server(&cluster, pg::Cluster::start_server).await;
        eprintln!(
            "database restart: server started in {:?}",
            starting.elapsed()
        );
        resume_and_measure(&db, &client, "database restart: after the server was back").await;
    })
    .await;
    check_nothing_lost(&db, &deliveries).await;
}

/// How long `cairn host` may take to exit after SIGTERM: its drain time (5 s by default,
/// `HostConfig::drain_timeout`), then at most 1 s to give up its leases, 1 s to close its
/// connections and 0.5 s for tasks still running, and a margin for a loaded test machine.
const EXIT_WITHIN: Duration = Duration::from_secs(9);

/// PostgreSQL down, then SIGTERM: a real `cairn host` exits within its drain time (it took
/// 122 s, retrying the shutdown points and the lease release against a server that was gone).
/// Once the server is back, a new host finishes every instance, nothing lost (G1-G5 from the
/// database and the ports' ledger).
#[cfg_attr(
    not(pg_available),
    ignore = "no PostgreSQL binaries at build time (orchestrations/build.rs); CONTRIBUTING.md, PostgreSQL"
)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_with_postgres_down_exits_within_the_drain_time_and_nothing_is_lost() {
    let Some(cluster) = pg::dedicated_cluster() else {
        return;
    };
    let url = pg::database_in(&cluster).await;
    let run = new_run(TestDb::at(Backend::Postgres, url, None).await).await;
    // Instances stay in memory (no dehydration), so that the shutdown has points to write.
    let args = [
        "--dehydrate-after-ms",
        "60000",
        "--poll-ms",
        "20",
        "--lease-ms",
        "2000",
    ];
    let mut host = run.spawn(0, 200, &args, "info");
    let (ids, published) = feed(&run, 0, 40).await;
    run.db
        .wait_for("work under way", Duration::from_secs(30), || async {
            run.db.count("SELECT COUNT(*) FROM history").await > 20
        })
        .await;
    cluster.stop_server().expect("stopped");
    let signalled = Instant::now();
    host.sigterm();
    let status = host.wait();
    let took = signalled.elapsed();
    eprintln!("SIGTERM with PostgreSQL down: exited in {took:?} ({status})");
    assert!(took < EXIT_WITHIN, "exit took {took:?}\n{}", run.log_of(0));
    cluster.start_server().expect("started");
    let host = run.spawn_host(1);
    wait_until_all_ended(&run, &ids, Duration::from_secs(60)).await;
    crate::support::processes::stop(host);
    check_guarantees(&run, &ids, &published).await;
}

/// SQLite, the analogue: another connection holds the database's write lock, so the host's
/// shutdown points wait on it (up to the 10 s busy timeout, then retried); SIGTERM must still
/// end the process within the drain time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_with_the_sqlite_file_locked_exits_within_the_drain_time_and_nothing_is_lost() {
    let db = TestDb::new(Backend::Sqlite).await.expect("SQLite");
    let run = new_run(db).await;
    let args = [
        "--dehydrate-after-ms",
        "60000",
        "--poll-ms",
        "20",
        "--lease-ms",
        "2000",
    ];
    let mut host = run.spawn(0, 200, &args, "info");
    let (ids, published) = feed(&run, 0, 40).await;
    run.db
        .wait_for("work under way", Duration::from_secs(30), || async {
            run.db.count("SELECT COUNT(*) FROM history").await > 20
        })
        .await;
    let mut locker = sqlx::SqliteConnection::connect(&run.db.url)
        .await
        .expect("a second connection");
    sqlx::query("BEGIN IMMEDIATE")
        .execute(&mut locker)
        .await
        .expect("the write lock");
    let signalled = Instant::now();
    host.sigterm();
    let status = host.wait();
    let took = signalled.elapsed();
    eprintln!("SIGTERM with the SQLite file locked: exited in {took:?} ({status})");
    assert!(took < EXIT_WITHIN, "exit took {took:?}\n{}", run.log_of(0));
    sqlx::query("COMMIT")
        .execute(&mut locker)
        .await
        .expect("released");
    drop(locker);
    let host = run.spawn_host(1);
    wait_until_all_ended(&run, &ids, Duration::from_secs(60)).await;
    crate::support::processes::stop(host);
    check_guarantees(&run, &ids, &published).await;
}
