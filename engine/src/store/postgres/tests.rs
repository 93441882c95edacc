//! Checks of this backend against a real server: a throwaway cluster on loopback, each test
//! with a database of its own.

use std::collections::BTreeMap;
use std::time::Duration;

use super::claims::{CLAIM_MESSAGES, CLAIM_TIMERS, NEXT_TIMER};
use super::kept::PointConnection;
use super::pg_harness;

use super::*;

pub(super) async fn fresh() -> Option<PostgresStore> {
    // A database in the throwaway cluster the integration tests use (started on first use;
    // skipped with one line when PostgreSQL is missing, unless CAIRN_REQUIRE_POSTGRES=1).
    let url = pg_harness::fresh_database().await?;
    let store = PostgresStore::open(&url).await.expect("open");
    store.migrate().await.expect("migrate");
    Some(store)
}

pub(super) fn at(secs: i64) -> DateTime<Utc> {
    DateTime::from_timestamp(1_800_000_000 + secs, 0).expect("valid time")
}

pub(super) fn point(
    id: Uuid,
    epoch: i64,
    host: &str,
    history_seq: i64,
    now: DateTime<Utc>,
) -> PersistencePoint {
    PersistencePoint {
        instance_id: id,
        epoch,
        host: host.to_owned(),
        reason: Reason::Dehydrate,
        detail: None,
        status: InstanceStatus::Dehydrated,
        resumable: true,
        failed: Vec::new(),
        state: Some(vec![1, 2, 3]),
        engine_state: Some(vec![4]),
        step: "Waiting".into(),
        waiting_for: "payment".into(),
        next_timer_at: None,
        last_error: None,
        output: None,
        history_seq,
        consumed: vec![],
        subscriptions: None,
        cancel_timers: vec![],
        set_timers: vec![],
        outbox: vec![],
        delivered: vec![],
        messages: vec![],
        children: vec![],
        release: false,
        at: now,
        outbox_lock_until: now + chrono::Duration::seconds(60),
        start: None,
    }
}

pub(super) fn new_instance(orchestration: &str) -> NewInstance {
    NewInstance {
        id: Uuid::new_v4(),
        orchestration: orchestration.into(),
        version: 1,
        parent: None,
        input: serde_json::json!({"n": 1}),
    }
}

async fn scalar_i64(store: &PostgresStore, sql: &str) -> i64 {
    sqlx::query_scalar(sql)
        .fetch_one(store.pool())
        .await
        .expect(sql)
}

#[tokio::test]
async fn migrations_put_everything_in_the_cairn_schema_and_run_twice() {
    let Some(store) = fresh().await else { return };
    store.migrate().await.expect("second migrate is a no-op");
    let tables: Vec<String> = sqlx::query_scalar(
        "SELECT table_name::text FROM information_schema.tables WHERE table_schema = 'cairn' ORDER BY 1",
    )
    .fetch_all(store.pool())
    .await
    .expect("tables");
    assert_eq!(
        tables,
        [
            "_sqlx_migrations",
            "control",
            "dead_letters",
            "history",
            "hosts",
            "inbox",
            "instances",
            "messages",
            "outbox",
            "subscription_keys",
            "subscriptions",
            "timers",
            "waited_keys"
        ]
    );
    assert_eq!(store.backend(), "postgres");
}

#[tokio::test]
async fn a_publish_wakes_a_listener() {
    let Some(store) = fresh().await else { return };
    let wake = Arc::new(tokio::sync::Notify::new());
    let stop = tokio_util::sync::CancellationToken::new();
    let listener = {
        let (store, wake, stop) = (store.clone(), wake.clone(), stop.clone());
        tokio::spawn(async move { store.listen(wake, stop).await })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let notified = wake.notified();
    let msg = NewMessage::published("w1", "nobody.cares", serde_json::json!({}), BTreeMap::new());
    store.publish(vec![msg], at(0)).await.expect("publish");
    tokio::time::timeout(Duration::from_secs(2), notified)
        .await
        .expect("woken by the notification");
    stop.cancel();
    listener.await.expect("listener");
}

/// An instance held by `host-a` under epoch 1, whose points are written alone (on the
/// kept connection, once it is connected).
async fn held_instance(store: &PostgresStore) -> Uuid {
    let now = at(0);
    store.recover("host-a", now).await.expect("recover");
    let inst = new_instance("order");
    store
        .start_instances(vec![inst.clone()], None, now)
        .await
        .expect("start");
    let lease = now + chrono::Duration::seconds(30);
    let records = store
        .acquire("host-a", &[inst.id], now, lease)
        .await
        .expect("acquire");
    assert_eq!(records[0].epoch, 1);
    inst.id
}

/// Commits points of `id` from `seq` on until the kept connection is connected; returns
/// its server process and the next seq.
async fn connect_kept(store: &PostgresStore, id: Uuid, mut seq: i64) -> (i32, i64) {
    for _ in 0..200 {
        let out = store
            .commit(&[point(id, 1, "host-a", seq, at(seq))])
            .await
            .expect("commit");
        assert_eq!(out, [CommitOutcome::Committed]);
        seq += 1;
        if let Some(pid) = store.points.backend_pid().await {
            return (pid, seq);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("the kept connection never connected");
}

#[tokio::test]
async fn a_point_on_a_lost_kept_connection_fails_retryably_and_the_next_reconnects() {
    let Some(store) = fresh().await else { return };
    let id = held_instance(&store).await;
    let (pid, seq) = connect_kept(&store, id, 1).await;
    sqlx::query("SELECT pg_terminate_backend($1)")
        .bind(pid)
        .execute(store.pool())
        .await
        .expect("terminate");
    let history = scalar_i64(&store, "SELECT COUNT(*) FROM history").await;

    let err = store
        .commit(&[point(id, 1, "host-a", seq, at(seq))])
        .await
        .expect_err("the kept connection is gone");
    assert!(err.is_retryable(), "{err:?}");
    assert_eq!(
        scalar_i64(&store, "SELECT COUNT(*) FROM history").await,
        history,
        "the failed point wrote nothing"
    );
    // The host tries the point again: it is written, and the kept connection is replaced.
    let (new_pid, _) = connect_kept(&store, id, seq).await;
    assert_ne!(new_pid, pid);
    assert_eq!(
        scalar_i64(
            &store,
            &format!("SELECT COUNT(*) FROM history WHERE seq = {seq}")
        )
        .await,
        1
    );
}

#[tokio::test]
async fn a_point_dropped_mid_statement_takes_the_kept_connection_with_it() {
    let Some(store) = fresh().await else { return };
    let id = held_instance(&store).await;
    let (pid, seq) = connect_kept(&store, id, 1).await;

    // Dropped before it says how its statement ended: the connection's state is unknown.
    let conn = store.point_connection().await.expect("connection");
    assert!(matches!(conn, PointConnection::Kept(_)));
    drop(conn);
    assert_eq!(store.points.backend_pid().await, None);

    // One that ends cleanly keeps it.
    let (new_pid, seq) = connect_kept(&store, id, seq).await;
    assert_ne!(new_pid, pid);
    let mut conn = store.point_connection().await.expect("connection");
    assert!(matches!(conn, PointConnection::Kept(_)));
    let refused = sqlx::query("SELECT * FROM no_such_table")
        .execute(&mut *conn)
        .await
        .map(|_| ())
        .map_err(|e| {
            map_err(
                "a point dropped mid statement takes the kept connection with it",
                e,
            )
        });
    conn.ended(&refused);
    drop(conn);
    assert_eq!(store.points.backend_pid().await, Some(new_pid));
    connect_kept(&store, id, seq).await;
}

#[tokio::test]
async fn a_killed_connection_is_retryable() {
    let Some(store) = fresh().await else { return };
    let mut conn = store.pool().acquire().await.expect("connection");
    let pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
        .fetch_one(&mut *conn)
        .await
        .expect("pid");
    sqlx::query("SELECT pg_terminate_backend($1)")
        .bind(pid)
        .execute(store.pool())
        .await
        .expect("terminate");
    let err = sqlx::query("SELECT 1")
        .execute(&mut *conn)
        .await
        .map_err(|e| map_err("a killed connection is retryable", e))
        .expect_err("the connection is gone");
    assert!(err.is_retryable(), "{err:?}");
    let err = sqlx::query("SELECT * FROM no_such_table")
        .execute(store.pool())
        .await
        .map_err(|e| map_err("a killed connection is retryable", e))
        .expect_err("no table");
    assert!(!err.is_retryable(), "{err:?}");
}

/// The rows of `relation` a statement reads, by `EXPLAIN ANALYZE` (then rolled back): the
/// actual rows of every plan node that scans it, times its loops. A claim is run for `host`
/// (a limit of 64); a query of [`OperatorVerbs::activity`] with `host` `None`.
async fn rows_read(
    store: &PostgresStore,
    sql: &str,
    host: Option<&str>,
    relation: &str,
    now: DateTime<Utc>,
) -> f64 {
    fn walk(node: &serde_json::Value, relation: &str) -> f64 {
        let own = if node["Relation Name"] == relation {
            node["Actual Rows"].as_f64().unwrap_or(0.0)
                * node["Actual Loops"].as_f64().unwrap_or(0.0)
        } else {
            0.0
        };
        let children = node["Plans"].as_array().into_iter().flatten();
        own + children.map(|c| walk(c, relation)).sum::<f64>()
    }
    let mut tx = store.pool.begin().await.expect("begin");
    let explain = format!("EXPLAIN (ANALYZE, FORMAT JSON) {sql}");
    let query = sqlx::query_scalar::<_, serde_json::Value>(&explain);
    let query = match host {
        Some(host) => query
            .bind(host)
            .bind(now)
            .bind(64_i64)
            .bind(now)
            .bind(None::<String>),
        None => query.bind(now).bind(now),
    };
    let plan = query.fetch_one(&mut *tx).await.expect("explain");
    tx.rollback().await.expect("rollback");
    walk(&plan[0]["Plan"], relation)
}

/// A claim's cost must not grow with how many instances wait, whatever the statistics say.
/// Autovacuum analyses a table up to a minute after it grew: in W5's setup, plans made from
/// statistics of nearly empty tables hashed every waiting instance for each claim (200 ms
/// with 100,000 waiting). Here the tables are analysed empty and then filled with 20,000
/// instances, each with a routed start message and a due timer: a claim of 64 reads a few
/// instances per row it takes, not all of them.
#[tokio::test]
async fn claims_read_instances_by_key_even_with_statistics_of_empty_tables() {
    let Some(store) = fresh().await else { return };
    let now = at(100);
    for sql in [
        "ANALYZE instances, messages, timers",
        "ALTER TABLE instances SET (autovacuum_enabled = false)",
        "ALTER TABLE messages SET (autovacuum_enabled = false)",
        "ALTER TABLE timers SET (autovacuum_enabled = false)",
        "INSERT INTO instances (id, orchestration, version, status, step, created_at, updated_at) \
         SELECT gen_random_uuid(), 'order', 1, 'running', 'start', now(), now() \
         FROM generate_series(1, 20000)",
        "INSERT INTO messages (id, message_type, kind, properties, body, status, instance_id, published_at) \
         SELECT 'start-' || id, 'order', 'start', '{}', '{}', 'routed', id, now() FROM instances",
        "INSERT INTO timers (instance_id, name, due_at) SELECT id, 'deadline', now() FROM instances",
    ] {
        sqlx::query(sql).execute(&store.pool).await.expect(sql);
    }
    for (sql, host, reads) in [
        (CLAIM_MESSAGES.as_str(), Some("host-a"), "messages"),
        (CLAIM_TIMERS.as_str(), Some("host-a"), "timers"),
        (NEXT_TIMER.as_str(), None, "timers"),
    ] {
        let instances = rows_read(&store, sql, host, "instances", now).await;
        assert!(
            instances <= 1_000.0,
            "{sql}\nread {instances} instances to claim from {reads}"
        );
    }
    let taken = store
        .claim_messages("host-a", now, 64)
        .await
        .expect("claim");
    assert_eq!(taken.len(), 64);
    let due = store
        .claim_timers("host-a", now + chrono::Duration::hours(1), 64)
        .await
        .expect("timers");
    assert_eq!(due.len(), 64);
}

/// A soft transaction (claims, acquire, the heartbeat) commits without waiting for the WAL's
/// flush, and only for itself: the next transaction waits again (`SET LOCAL` ends with it).
#[tokio::test]
async fn a_soft_transaction_is_asynchronous_and_the_next_is_not() {
    use crate::store::common::Backend;
    async fn setting(tx: &mut Tx) -> String {
        sqlx::query_scalar("SHOW synchronous_commit")
            .fetch_one(&mut **tx)
            .await
            .expect("shown")
    }
    let Some(store) = fresh().await else { return };
    let mut soft = store.begin_soft().await.expect("a soft transaction");
    assert_eq!(setting(&mut soft).await, "off");
    <PostgresStore as Backend>::commit(soft)
        .await
        .expect("committed");
    let mut durable = store.begin().await.expect("a transaction");
    assert_eq!(setting(&mut durable).await, "on");
    <PostgresStore as Backend>::commit(durable)
        .await
        .expect("committed");
}

/// The soft connection (claims, acquire: one statement each) commits without waiting for the
/// WAL's flush; a point's connection, which the store connects from the same options, waits.
#[tokio::test]
async fn the_soft_connection_is_asynchronous_and_the_points_one_is_not() {
    async fn setting(conn: &mut sqlx::PgConnection) -> String {
        sqlx::query_scalar("SHOW synchronous_commit")
            .fetch_one(conn)
            .await
            .expect("shown")
    }
    let Some(store) = fresh().await else { return };
    // The first use of each kept connection connects it; the second finds it.
    for _ in 0..50 {
        let mut soft = store.soft_connection().await.expect("a soft connection");
        let mut point = store
            .point_connection()
            .await
            .expect("a point's connection");
        let kept = matches!(
            (&soft, &point),
            (PointConnection::Kept(_), PointConnection::Kept(_))
        );
        let soft_setting = setting(&mut soft).await;
        assert_eq!(setting(&mut point).await, "on", "a point's connection");
        soft.ended(&Ok(()));
        point.ended(&Ok(()));
        if kept {
            assert_eq!(soft_setting, "off", "the kept soft connection");
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("the kept connections never connected");
}
