//! Routing on the receive side: sequential and parallel convoys, unrouted messages, zombies,
//! and the receive locations (SQL inbox, file drop, HTTP). Each runs on SQLite and on PostgreSQL
//! and reads its outcome back from the database.

#![allow(clippy::unwrap_used)] // tests may unwrap: a panic is a failed test

mod support;

use std::collections::BTreeMap;
use std::time::Duration;

use cairn::store::{InstanceStatus, MessageKind, NewMessage};
use cairn::{Client, HostConfig};
use serde_json::json;
use support::fixtures::{fast_config, Deliveries, HostThread, CONVOY_BATCH};
use support::TestDb;

const WAIT: Duration = Duration::from_secs(120);

backend_tests!(
    a_sequential_convoy_gets_every_message_of_its_value_in_order_one_instance_at_a_time,
    a_parallel_convoy_is_started_by_whichever_message_comes_first,
    an_unrouted_message_is_dead_lettered_after_its_time_to_live,
    a_message_for_an_ended_instance_is_kept_as_a_zombie,
    rows_inserted_into_the_inbox_table_are_published,
);

async fn publish(client: &Client, id: String, ty: &str, body: serde_json::Value) {
    client
        .publish_batch(vec![NewMessage::published(id, ty, body, BTreeMap::new())])
        .await
        .expect("publish");
}

/// (id, created_at, updated_at, output) of the instances of `orchestration`, oldest first.
async fn instances(db: &TestDb, orchestration: &str) -> Vec<(String, String, String, String)> {
    sqlx::query_as(
        "SELECT CAST(id AS TEXT), CAST(created_at AS TEXT), CAST(updated_at AS TEXT), COALESCE(output, '') \
         FROM instances WHERE orchestration = $1 ORDER BY created_at, id",
    )
    .bind(orchestration)
    .fetch_all(&db.sql)
    .await
    .unwrap()
}

async fn a_sequential_convoy_gets_every_message_of_its_value_in_order_one_instance_at_a_time(
    db: TestDb,
) {
    const VALUES: usize = 50;
    const PER_VALUE: usize = 100;
    const TASKS: usize = 5;
    let (host, client) = HostThread::start(&db, fast_config(), Deliveries::default()).await;
    let started = std::time::Instant::now();
    let mut tasks = Vec::new();
    for t in 0..TASKS {
        let client = client.clone();
        tasks.push(tokio::spawn(async move {
            // Each task owns VALUES / TASKS orders and publishes their lines in order,
            // interleaved with the other tasks' publishes.
            for n in 0..PER_VALUE {
                for v in (t..VALUES).step_by(TASKS) {
                    let order = format!("order-{v}");
                    publish(
                        &client,
                        format!("{order}-line-{n}"),
                        "line",
                        json!({"order": order, "n": n}),
                    )
                    .await;
                }
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    let published = started.elapsed();
    db.wait_for("every line consumed", WAIT, || async {
        db.count(
            "SELECT COUNT(*) FROM messages WHERE message_type = 'line' AND status = 'consumed'",
        )
        .await
            == (VALUES * PER_VALUE) as i64
    })
    .await;
    db.wait_for("every convoy instance ended", WAIT, || async {
        db.count("SELECT COUNT(*) FROM instances WHERE orchestration = 'line-convoy' AND status <> 'completed'")
            .await
            == 0
    })
    .await;
    eprintln!(
        "{} lines published by {TASKS} tasks in {published:?}, all consumed after {:?}",
        VALUES * PER_VALUE,
        started.elapsed()
    );
    // Per order: its instances, oldest first, each took the next CONVOY_BATCH lines in order, and
    // none started before the one before it had ended.
    let mut by_order: BTreeMap<String, Vec<(String, String, Vec<i64>)>> = BTreeMap::new();
    for (id, created, updated, output) in instances(&db, "line-convoy").await {
        let order: String = sqlx::query_scalar(
            "SELECT properties FROM messages WHERE CAST(instance_id AS TEXT) = $1 AND kind = 'start'",
        )
        .bind(&id)
        .fetch_one(&db.sql)
        .await
        .unwrap();
        let order: BTreeMap<String, String> = serde_json::from_str(&order).unwrap();
        let seen: Vec<i64> = serde_json::from_str(&output).unwrap();
        by_order
            .entry(order["order"].clone())
            .or_default()
            .push((created, updated, seen));
    }
    assert_eq!(by_order.len(), VALUES);
    for (order, runs) in &by_order {
        assert_eq!(runs.len(), PER_VALUE / CONVOY_BATCH, "{order}: instances");
        let all: Vec<i64> = runs.iter().flat_map(|(_, _, seen)| seen.clone()).collect();
        assert_eq!(
            all,
            (0..PER_VALUE as i64).collect::<Vec<_>>(),
            "{order}: lines in publish order"
        );
        for pair in runs.windows(2) {
            assert!(
                pair[1].0 >= pair[0].1,
                "{order}: an instance started before the previous one ended: {pair:?}"
            );
        }
    }
    host.stop();
}

async fn a_parallel_convoy_is_started_by_whichever_message_comes_first(db: TestDb) {
    const CASES: usize = 40;
    let (host, client) = HostThread::start(&db, fast_config(), Deliveries::default()).await;
    let (a, b) = (client.clone(), client.clone());
    // Documents a and b of each case, published at once by two tasks, in opposite orders.
    let first = tokio::spawn(async move {
        for c in 0..CASES {
            publish(
                &a,
                format!("case-{c}-a"),
                "doc.a",
                json!({"case": format!("case-{c}"), "kind": "a"}),
            )
            .await;
        }
    });
    let second = tokio::spawn(async move {
        for c in (0..CASES).rev() {
            publish(
                &b,
                format!("case-{c}-b"),
                "doc.b",
                json!({"case": format!("case-{c}"), "kind": "b"}),
            )
            .await;
        }
    });
    first.await.unwrap();
    second.await.unwrap();
    db.wait_for("every case completed", WAIT, || async {
        db.count("SELECT COUNT(*) FROM instances WHERE orchestration = 'doc-pair' AND status = 'completed'")
            .await
            == CASES as i64
    })
    .await;
    // One instance per case, with both documents, whichever came first.
    let runs = instances(&db, "doc-pair").await;
    assert_eq!(runs.len(), CASES);
    let mut firsts = BTreeMap::new();
    for (_, _, _, output) in runs {
        let kinds: Vec<String> = serde_json::from_str(&output).unwrap();
        let mut sorted = kinds.clone();
        sorted.sort();
        assert_eq!(sorted, ["a", "b"]);
        *firsts.entry(kinds[0].clone()).or_insert(0) += 1;
    }
    eprintln!("first documents: {firsts:?}");
    assert_eq!(
        db.count("SELECT COUNT(*) FROM messages WHERE status <> 'consumed'")
            .await,
        0
    );
    host.stop();
}

async fn an_unrouted_message_is_dead_lettered_after_its_time_to_live(db: TestDb) {
    let config = HostConfig {
        unrouted_ttl: Duration::from_millis(300),
        housekeeping_interval: Duration::from_millis(50),
        ..fast_config()
    };
    let (host, client) = HostThread::start(&db, config, Deliveries::default()).await;
    publish(&client, "lost-1".into(), "nobody.listens", json!({"n": 1})).await;
    db.wait_for("the message to expire", WAIT, || async {
        db.count_with(
            "SELECT COUNT(*) FROM messages WHERE id = $1 AND status = 'dead'",
            "lost-1",
        )
        .await
            == 1
    })
    .await;
    let reason = db
        .texts("SELECT reason FROM dead_letters WHERE id = $1", "lost-1")
        .await;
    assert_eq!(reason.len(), 1);
    assert!(reason[0].contains("time to live"), "{reason:?}");
    assert!(
        reason[0].contains("no subscription matches message type \"nobody.listens\""),
        "{reason:?}"
    );
    // A message still within its time to live stays unrouted, waiting for a subscriber.
    publish(&client, "lost-2".into(), "nobody.listens", json!({"n": 2})).await;
    assert_eq!(
        db.count_with(
            "SELECT COUNT(*) FROM messages WHERE id = $1 AND status = 'unrouted'",
            "lost-2"
        )
        .await,
        1
    );
    host.stop();
}

async fn a_message_for_an_ended_instance_is_kept_as_a_zombie(db: TestDb) {
    let config = HostConfig {
        housekeeping_interval: Duration::from_millis(50),
        ..fast_config()
    };
    let (host, client) = HostThread::start(&db, config, Deliveries::default()).await;
    // The collector sends at start: its start message is consumed by that persistence point.
    let id = client
        .start("collector", json!({"key": "z1"}))
        .await
        .unwrap();
    db.wait_for("the instance's first point", WAIT, || async {
        db.count_with(
            "SELECT COUNT(*) FROM history WHERE CAST(instance_id AS TEXT) = $1",
            &id.to_string(),
        )
        .await
            == 1
    })
    .await;
    db.store
        .control(
            id,
            cairn::store::ControlAction::Terminate {
                reason: "done with it".into(),
            },
            chrono::Utc::now(),
        )
        .await
        .unwrap();
    // A reply arrives for it after it ended (addressed to it, as replies and child results are).
    client
        .publish_batch(vec![NewMessage::to_instance(
            "late-reply",
            "reply",
            MessageKind::Reply,
            json!({"ok": true}),
            id,
        )])
        .await
        .unwrap();
    db.wait_for("the late reply to become a zombie", WAIT, || async {
        db.count_with(
            "SELECT COUNT(*) FROM messages WHERE id = $1 AND status = 'zombie'",
            "late-reply",
        )
        .await
            == 1
    })
    .await;
    let reason = db
        .texts("SELECT reason FROM messages WHERE id = $1", "late-reply")
        .await;
    assert!(
        reason[0].contains("its instance ended (terminated)"),
        "{reason:?}"
    );
    let detail = db.store.instance_detail(id).await.unwrap().unwrap();
    assert_eq!(detail.summary.status, InstanceStatus::Terminated);
    assert_eq!(
        detail.zombies,
        [("late-reply".to_owned(), "reply".to_owned())]
    );
    host.stop();
}

async fn rows_inserted_into_the_inbox_table_are_published(db: TestDb) {
    let (host, _client) = HostThread::start(&db, fast_config(), Deliveries::default()).await;
    // What any SQL client can do: activate an instance, send it its decision, send a duplicate
    // (same message_id), and a row whose body is not JSON.
    for sql in [
        "INSERT INTO inbox (message_id, message_type, body) VALUES ('in-1', 'approval.requested', '{\"request_id\": \"sql-1\", \"approver\": \"bo\"}')",
        "INSERT INTO inbox (message_id, message_type, body) VALUES ('in-2', 'approval.decision', '{\"request_id\": \"sql-1\", \"approved\": true, \"by\": \"bo\"}')",
        "INSERT INTO inbox (message_id, message_type, body) VALUES ('in-2', 'approval.decision', '{\"request_id\": \"sql-1\", \"approved\": false, \"by\": \"eve\"}')",
        "INSERT INTO inbox (message_type, properties, body) VALUES ('approval.decision', '{\"request_id\": \"sql-2\"}', 'not json')",
    ] {
        sqlx::query(sql).execute(&db.sql).await.unwrap();
    }
    db.wait_for("the inbox to empty", WAIT, || async {
        db.count("SELECT COUNT(*) FROM inbox").await == 0
    })
    .await;
    db.wait_for("the approval to complete", WAIT, || async {
        db.count("SELECT COUNT(*) FROM instances WHERE orchestration = 'approval' AND status = 'completed'").await == 1
    })
    .await;
    let output: String =
        sqlx::query_scalar("SELECT output FROM instances WHERE orchestration = 'approval'")
            .fetch_one(&db.sql)
            .await
            .unwrap();
    assert!(
        output.contains("\"approved\":true"),
        "the first decision, not the duplicate: {output}"
    );
    assert_eq!(
        db.count("SELECT COUNT(*) FROM messages WHERE id IN ('in-1', 'in-2')")
            .await,
        2
    );
    let dead = db
        .texts(
            "SELECT reason FROM dead_letters WHERE message_type = $1",
            "approval.decision",
        )
        .await;
    assert_eq!(dead.len(), 1);
    assert!(dead[0].contains("the body is not JSON"), "{dead:?}");
    host.stop();
}
