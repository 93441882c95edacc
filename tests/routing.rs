//! Routing on the receive side: sequential and parallel convoys, unrouted messages, zombies,
//! and the receive locations (SQL inbox, file drop, HTTP). Each runs on SQLite and on PostgreSQL
//! and reads its outcome back from the database.

#![allow(clippy::unwrap_used)] // tests may unwrap: a panic is a failed test

mod support;

use std::collections::BTreeMap;
use std::time::Duration;

use cairn::host::receive::ReceiveLocation;
use cairn::store::{InstanceStatus, MessageKind, NewMessage, PublishOutcome};
use cairn::{Client, HostConfig};
use serde_json::json;
use support::fixtures::{fast_config, Deliveries, HostThread, CONVOY_BATCH};
use support::TestDb;

const WAIT: Duration = Duration::from_secs(120);

backend_tests!(
    a_sequential_convoy_gets_every_message_of_its_value_in_order_one_instance_at_a_time,
    a_parallel_convoy_is_started_by_whichever_message_comes_first,
    one_publish_batch_of_convoy_messages_starts_one_instance_per_value,
    an_unrouted_message_is_dead_lettered_after_its_time_to_live,
    a_message_for_an_ended_instance_is_kept_as_a_zombie,
    rows_inserted_into_the_inbox_table_are_published,
    files_dropped_in_a_folder_are_published_then_removed,
    http_posts_are_accepted_after_commit_and_deduplicated_by_their_key,
    properties_set_by_the_publisher_route_and_win_over_promoted_body_fields,
    a_late_ack_is_a_zombie_of_its_ended_po_and_not_taken_by_the_resubmitted_one,
    a_message_starts_one_instance_of_each_orchestration_whose_filter_it_passes,
    a_send_port_subscribes_by_filter_and_receives_published_messages_directly,
    lines_reach_their_convoy_instance_in_order_and_each_starts_an_audit_beside_it,
    invoices_published_before_their_subscribers_registered_reach_each_of_them,
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

/// A batch is routed with one read per type, but a convoy's activation in it changes where the
/// rest of the batch goes: the next lines of that order join the instance just started.
async fn one_publish_batch_of_convoy_messages_starts_one_instance_per_value(db: TestDb) {
    let (host, client) = HostThread::start(&db, fast_config(), Deliveries::default()).await;
    let batch: Vec<NewMessage> = (0..CONVOY_BATCH)
        .flat_map(|n| {
            ["a", "b"].map(|order| {
                NewMessage::published(
                    format!("batch-{order}-{n}"),
                    "line",
                    json!({"order": order, "n": n}),
                    BTreeMap::new(),
                )
            })
        })
        .collect();
    let outcomes = client.publish_batch(batch).await.expect("publish");
    assert!(outcomes
        .iter()
        .all(|o| matches!(o, cairn::store::PublishOutcome::Routed(_))));
    db.wait_for("both convoy instances ended", WAIT, || async {
        db.count("SELECT COUNT(*) FROM instances WHERE orchestration = 'line-convoy' AND status = 'completed'")
            .await
            == 2
    })
    .await;
    let runs = instances(&db, "line-convoy").await;
    assert_eq!(runs.len(), 2, "one instance per order: {runs:?}");
    for (_, _, _, output) in runs {
        let seen: Vec<i64> = serde_json::from_str(&output).unwrap();
        assert_eq!(seen, (0..CONVOY_BATCH as i64).collect::<Vec<_>>());
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
    db.wait_first_point(id, WAIT).await;
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

async fn files_dropped_in_a_folder_are_published_then_removed(db: TestDb) {
    let dir = tempfile::tempdir().unwrap();
    let drop = dir.path().to_owned();
    let files = [
        (
            "001-request.json",
            r#"{"type": "approval.requested", "body": {"request_id": "file-1", "approver": "cy"}}"#,
        ),
        (
            "002-decision.json",
            r#"{"type": "approval.decision", "id": "file-decision-1", "body": {"request_id": "file-1", "approved": true, "by": "cy"}}"#,
        ),
        ("003-broken.json", "{ this is not json"),
        ("ignored.txt", "not a message: wrong extension"),
    ];
    for (name, text) in files {
        std::fs::write(drop.join(name), text).unwrap();
    }
    let location = ReceiveLocation::FileDrop {
        dir: drop.clone(),
        poll: Duration::from_millis(20),
    };
    let (host, _client) = HostThread::start_receiving(&db, fast_config(), vec![location]).await;
    db.wait_for("the approval to complete", WAIT, || async {
        db.count("SELECT COUNT(*) FROM instances WHERE orchestration = 'approval' AND status = 'completed'").await == 1
    })
    .await;
    // Published under the file's name and a hash of its content when it names no id; removed
    // once committed.
    assert_eq!(
        db.count_with(
            "SELECT COUNT(*) FROM messages WHERE id LIKE $1",
            "file:001-request.json:%"
        )
        .await,
        1
    );
    assert_eq!(
        db.count_with(
            "SELECT COUNT(*) FROM messages WHERE id = $1",
            "file-decision-1"
        )
        .await,
        1
    );
    assert!(!drop.join("001-request.json").exists() && !drop.join("002-decision.json").exists());
    assert!(drop.join("ignored.txt").exists());
    // The broken file is moved aside with the reason, not lost.
    let why = std::fs::read_to_string(drop.join("rejected/003-broken.json.error.txt")).unwrap();
    assert!(why.contains("not a message envelope"), "{why}");
    assert!(drop.join("rejected/003-broken.json").exists());
    // A file seen again (a crash between commit and removal) is a duplicate, stored once.
    std::fs::write(drop.join("001-request.json"), files[0].1).unwrap();
    db.wait_for("the file to be taken again", WAIT, || async {
        !drop.join("001-request.json").exists()
    })
    .await;
    assert_eq!(
        db.count("SELECT COUNT(*) FROM instances WHERE orchestration = 'approval'")
            .await,
        1
    );
    host.stop();
}

/// One HTTP/1.1 POST; returns the status code and the body.
async fn post(addr: std::net::SocketAddr, headers: &str, body: &str) -> (u16, serde_json::Value) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let request = format!(
        "POST /messages HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n{headers}Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    let status = response[9..12].parse().unwrap();
    let json = response.split("\r\n\r\n").nth(1).unwrap_or_default();
    (status, serde_json::from_str(json).unwrap_or_default())
}

async fn http_posts_are_accepted_after_commit_and_deduplicated_by_their_key(db: TestDb) {
    let addr = {
        let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        probe.local_addr().unwrap()
    };
    let (host, _client) =
        HostThread::start_receiving(&db, fast_config(), vec![ReceiveLocation::http(addr)]).await;
    let request =
        r#"{"type": "approval.requested", "body": {"request_id": "web-1", "approver": "di"}}"#;
    let mut first = (0, serde_json::Value::Null);
    for _ in 0..100 {
        if tokio::net::TcpStream::connect(addr).await.is_ok() {
            first = post(addr, "Idempotency-Key: web-req-1\r\n", request).await;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(first.0, 202, "{first:?}");
    assert_eq!(first.1["outcome"], json!("routed"));
    // 202 means committed: the message is in the database now.
    assert_eq!(
        db.count_with("SELECT COUNT(*) FROM messages WHERE id = $1", "web-req-1")
            .await,
        1
    );
    let again = post(addr, "Idempotency-Key: web-req-1\r\n", request).await;
    assert_eq!(
        (again.0, again.1["outcome"].clone()),
        (202, json!("duplicate"))
    );
    let decision = r#"{"type": "approval.decision", "id": "web-dec-1", "body": {"request_id": "web-1", "approved": true, "by": "di"}}"#;
    assert_eq!(post(addr, "", decision).await.0, 202);
    let bad = post(addr, "", "{ nope").await;
    assert_eq!(bad.0, 400);
    assert!(
        bad.1["error"]
            .as_str()
            .unwrap()
            .contains("not a message envelope"),
        "{bad:?}"
    );
    db.wait_for("the approval to complete", WAIT, || async {
        db.count("SELECT COUNT(*) FROM instances WHERE orchestration = 'approval' AND status = 'completed'").await == 1
    })
    .await;
    assert_eq!(
        db.count("SELECT COUNT(*) FROM instances WHERE orchestration = 'approval'")
            .await,
        1
    );
    host.stop();
}

async fn properties_set_by_the_publisher_route_and_win_over_promoted_body_fields(db: TestDb) {
    let (host, client) = HostThread::start(&db, fast_config(), Deliveries::default()).await;
    let real = client
        .start("approval", json!({"request_id": "real", "approver": "x"}))
        .await
        .unwrap();
    let decoy = client
        .start("approval", json!({"request_id": "decoy", "approver": "x"}))
        .await
        .unwrap();
    db.wait_for("both to wait", WAIT, || async {
        db.count("SELECT COUNT(*) FROM subscriptions WHERE message_type = 'approval.decision'")
            .await
            == 2
    })
    .await;
    // The body says "decoy"; the publisher's property says "real", and wins.
    let message = NewMessage::published(
        "decision-by-property",
        "approval.decision",
        json!({"request_id": "decoy", "approved": true, "by": "x"}),
        BTreeMap::from([("request_id".to_owned(), "real".to_owned())]),
    );
    client.publish_batch(vec![message]).await.unwrap();
    db.wait_status(real, InstanceStatus::Completed, WAIT).await;
    assert_ne!(db.status(decoy).await, Some(InstanceStatus::Completed));
    let properties = db
        .texts(
            "SELECT properties FROM messages WHERE id = $1",
            "decision-by-property",
        )
        .await;
    assert!(
        properties[0].contains("\"request_id\":\"real\""),
        "{properties:?}"
    );
    assert!(
        properties[0].contains("\"approved\":\"true\""),
        "body fields are promoted: {properties:?}"
    );
    host.stop();
}

/// Issue 25, point 4, the purchase order of docs/messaging.md#late-messages. An ack that arrives
/// after its PO escalated and ended is a zombie naming that PO; the resubmitted PO (same po_id)
/// does not take it and completes with the ack published after it waits; a PO whose receive asks
/// for earlier messages takes the zombie. An ack published before any PO of its id waited keeps
/// today's behaviour: held unrouted, then routed to the first PO that waits on it.
async fn a_late_ack_is_a_zombie_of_its_ended_po_and_not_taken_by_the_resubmitted_one(db: TestDb) {
    let (host, client) = HostThread::start(&db, fast_config(), Deliveries::default()).await;
    let submit = |id: &str, body: serde_json::Value| {
        let client = client.clone();
        let id = id.to_owned();
        async move {
            let (_, outcome) = client
                .publish("po.submitted", body, Some(id), BTreeMap::new())
                .await
                .unwrap();
            match outcome {
                PublishOutcome::Routed(instance) => instance,
                other => panic!("a PO is routed: {other:?}"),
            }
        }
    };
    let ack = |id: &str, po: &str, by: &str| {
        let client = client.clone();
        let (id, body) = (id.to_owned(), json!({"po_id": po, "by": by}));
        async move {
            client
                .publish("po.ack", body, Some(id), BTreeMap::new())
                .await
                .unwrap()
                .1
        }
    };
    let output = |id: uuid::Uuid| {
        let db = &db;
        async move {
            db.store
                .instance_detail(id)
                .await
                .unwrap()
                .unwrap()
                .output
                .unwrap()
        }
    };

    // The first PO escalates and ends; its ack comes too late.
    let first = submit("po-1", json!({"po_id": "po-1", "escalate_ms": 100})).await;
    db.wait_status(first, InstanceStatus::Completed, WAIT).await;
    assert_eq!(output(first).await, json!("escalated"));
    assert_eq!(
        ack("ack-stale", "po-1", "stale").await,
        PublishOutcome::Zombie(first)
    );
    let row: (String, String, String) = sqlx::query_as(
        "SELECT status, CAST(instance_id AS TEXT), reason FROM messages WHERE id = $1",
    )
    .bind("ack-stale")
    .fetch_one(&db.sql)
    .await
    .unwrap();
    assert_eq!(
        (row.0.as_str(), row.1.clone()),
        ("zombie", first.to_string())
    );
    assert!(row.2.starts_with("late: "), "{}", row.2);
    let detail = db.store.instance_detail(first).await.unwrap().unwrap();
    assert_eq!(
        detail.zombies,
        [("ack-stale".to_owned(), "po.ack".to_owned())]
    );

    // The same PO resubmitted: it does not complete with the stale ack, but with the next one.
    let again = submit("po-1-again", json!({"po_id": "po-1"})).await;
    db.wait_subscribed(again, WAIT).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(db.status(again).await, Some(InstanceStatus::Running));
    assert_eq!(
        db.texts("SELECT status FROM messages WHERE id = $1", "ack-stale")
            .await,
        ["zombie"]
    );
    assert_eq!(
        ack("ack-fresh", "po-1", "fresh").await,
        PublishOutcome::Routed(again)
    );
    db.wait_status(again, InstanceStatus::Completed, WAIT).await;
    assert_eq!(output(again).await, json!("fresh"));

    // A PO whose receive asks for earlier messages takes the zombie.
    let third = submit("po-1-third", json!({"po_id": "po-1", "earlier": true})).await;
    db.wait_status(third, InstanceStatus::Completed, WAIT).await;
    assert_eq!(output(third).await, json!("stale"));

    // An ack before any PO of its id ever waited: unrouted, then taken by the first PO.
    assert_eq!(
        ack("ack-early", "po-2", "early").await,
        PublishOutcome::Unrouted
    );
    let early = submit("po-2", json!({"po_id": "po-2"})).await;
    db.wait_status(early, InstanceStatus::Completed, WAIT).await;
    assert_eq!(output(early).await, json!("early"));
    host.stop();
}

/// Issue 25, point 8: publish-subscribe. `invoice.issued` activates `invoice-audit` (no filter)
/// and `large-invoice-review` (`amount >= 1000 AND region = 'EU'`): a large EU invoice starts
/// one instance of each (the message and a copy, each consumed once), a small one the audit
/// only, a duplicate nothing. The filters are data in `subscriptions`. A filter row written by
/// hand that does not parse routes nothing, says why in `filter_error`, and the other
/// subscription still receives.
async fn a_message_starts_one_instance_of_each_orchestration_whose_filter_it_passes(db: TestDb) {
    let (host, client) = HostThread::start(&db, fast_config(), Deliveries::default()).await;
    let filters: Vec<(String, String)> = sqlx::query_as(
        "SELECT orchestration, filter FROM subscriptions \
         WHERE message_type = 'invoice.issued' AND instance_id IS NULL ORDER BY orchestration",
    )
    .fetch_all(&db.sql)
    .await
    .unwrap();
    assert_eq!(
        filters,
        [
            ("invoice-audit".to_owned(), String::new()),
            (
                "large-invoice-review".to_owned(),
                "amount >= 1000 AND region = 'EU'".to_owned()
            )
        ]
    );
    let invoice = |id: &str, amount: i64, region: &str| {
        NewMessage::published(
            id,
            "invoice.issued",
            json!({"amount": amount, "region": region}),
            BTreeMap::new(),
        )
    };
    let outcomes = client
        .publish_batch(vec![
            invoice("inv-big", 1500, "EU"),
            invoice("inv-small", 10, "EU"),
            invoice("inv-us", 5000, "US"),
        ])
        .await
        .unwrap();
    assert!(
        outcomes
            .iter()
            .all(|o| matches!(o, PublishOutcome::Routed(_))),
        "{outcomes:?}"
    );
    let ended = |orchestration: &'static str| {
        let db = &db;
        async move {
            sqlx::query_scalar::<_, String>(
                "SELECT output FROM instances WHERE orchestration = $1 AND status = 'completed' \
                 ORDER BY output",
            )
            .bind(orchestration)
            .fetch_all(&db.sql)
            .await
            .unwrap()
        }
    };
    db.wait_for("every invoice instance completed", WAIT, || async {
        db.count("SELECT COUNT(*) FROM instances WHERE orchestration LIKE '%invoice%' AND status = 'completed'")
            .await
            == 4
    })
    .await;
    assert_eq!(
        ended("invoice-audit").await,
        ["\"inv-big\"", "\"inv-small\"", "\"inv-us\""]
    );
    assert_eq!(
        ended("large-invoice-review").await,
        ["\"inv-big/large-invoice-review\""]
    );
    assert_eq!(
        db.count("SELECT COUNT(*) FROM messages WHERE message_type = 'invoice.issued' AND status = 'consumed'")
            .await,
        4
    );
    // Published again: stored once, no instance more.
    let again = client
        .publish_batch(vec![invoice("inv-big", 1500, "EU")])
        .await
        .unwrap();
    assert_eq!(again, [PublishOutcome::Duplicate]);

    // A filter written by hand that does not parse: the audit routes nothing, the review still
    // receives, and the row says why.
    sqlx::query(
        "UPDATE subscriptions SET filter = 'amount >>> (' \
         WHERE orchestration = 'invoice-audit' AND instance_id IS NULL",
    )
    .execute(&db.sql)
    .await
    .unwrap();
    let outcomes = client
        .publish_batch(vec![invoice("inv-after", 2000, "EU")])
        .await
        .unwrap();
    assert!(
        matches!(outcomes[0], PublishOutcome::Routed(_)),
        "{outcomes:?}"
    );
    db.wait_for("the review of inv-after", WAIT, || async {
        ended("large-invoice-review").await.len() == 2
    })
    .await;
    let noted: Vec<String> = sqlx::query_scalar(
        "SELECT COALESCE(filter_error, '') FROM subscriptions \
         WHERE orchestration = 'invoice-audit' AND instance_id IS NULL",
    )
    .fetch_all(&db.sql)
    .await
    .unwrap();
    assert!(noted[0].contains("does not parse"), "{noted:?}");
    assert_eq!(ended("invoice-audit").await.len(), 3);
    host.stop();
}

/// Issue 25, point 8: a send port subscribes to published messages by itself (messaging-only
/// routing). `log` takes `invoice.issued` of 1000 or more besides the orchestrations that
/// activate on it; `refuser` takes every `shipment.scanned`, which nothing else subscribes to,
/// and refuses it: the send is dead-lettered, as any send is. The subscriptions are rows of
/// `subscriptions` with `port` set.
async fn a_send_port_subscribes_by_filter_and_receives_published_messages_directly(db: TestDb) {
    let deliveries = Deliveries::default();
    let recorded = deliveries.clone();
    let setup = support::fixtures::HostSetup {
        ports: Box::new(move |client| {
            support::fixtures::ports(client, recorded)
                .function("refuser", |_msg: cairn::OutboundMessage| async move {
                    Err::<Option<serde_json::Value>, _>(cairn::PortError::permanent(
                        "the scanner archive refuses everything",
                    ))
                })
                .subscribe("log", "invoice.issued", "amount >= 1000")
                .subscribe("refuser", "shipment.scanned", "")
        }),
        ..support::fixtures::HostSetup::new(fast_config(), Deliveries::default())
    };
    let (host, client) = HostThread::launch(&db, setup).await;
    let ports: Vec<(String, String, String)> = sqlx::query_as(
        "SELECT port, message_type, filter FROM subscriptions WHERE port IS NOT NULL ORDER BY port",
    )
    .fetch_all(&db.sql)
    .await
    .unwrap();
    assert_eq!(
        ports,
        [
            (
                "log".to_owned(),
                "invoice.issued".to_owned(),
                "amount >= 1000".to_owned()
            ),
            (
                "refuser".to_owned(),
                "shipment.scanned".to_owned(),
                String::new()
            ),
        ]
    );
    let invoice = |id: &str, amount: i64| {
        NewMessage::published(
            id,
            "invoice.issued",
            json!({"amount": amount, "region": "US"}),
            BTreeMap::new(),
        )
    };
    client
        .publish_batch(vec![invoice("inv-a", 5000), invoice("inv-b", 5)])
        .await
        .unwrap();
    db.wait_for("the log port's delivery", WAIT, || async {
        deliveries.ids().contains(&"inv-a@log".to_owned())
    })
    .await;
    // The orchestrations still got both invoices; the port only the large one.
    db.wait_for("both audits", WAIT, || async {
        db.count("SELECT COUNT(*) FROM instances WHERE orchestration = 'invoice-audit' AND status = 'completed'")
            .await
            == 2
    })
    .await;
    assert!(!deliveries.ids().iter().any(|id| id.starts_with("inv-b")));

    let (_, outcome) = client
        .publish(
            "shipment.scanned",
            json!({"parcel": "p-1"}),
            Some("scan-1".into()),
            BTreeMap::new(),
        )
        .await
        .unwrap();
    assert_eq!(outcome, PublishOutcome::ToPorts);
    assert_eq!(
        db.texts("SELECT status FROM messages WHERE id = $1", "scan-1")
            .await,
        ["consumed"]
    );
    db.wait_for("the refused send dead-lettered", WAIT, || async {
        db.count_with(
            "SELECT COUNT(*) FROM dead_letters WHERE id = $1 AND port = 'refuser'",
            "scan-1@refuser",
        )
        .await
            == 1
    })
    .await;
    assert_eq!(
        db.texts("SELECT status FROM outbox WHERE id = $1", "scan-1@refuser")
            .await,
        ["dead"]
    );
    host.stop();
}

/// Issue 25, point 8: `line` activates the `line-convoy` convoy (one instance an order) and,
/// when marked audited, `line-audit`. The first line of an order starts one of each (the convoy
/// by its copy); each later line goes to the convoy's instance through its correlated receive,
/// and a copy of it starts an audit. The convoy still gets every line of its order, in order,
/// and each line is audited once, even when published again.
async fn lines_reach_their_convoy_instance_in_order_and_each_starts_an_audit_beside_it(db: TestDb) {
    let (host, client) = HostThread::start(&db, fast_config(), Deliveries::default()).await;
    let line = |n: usize| {
        NewMessage::published(
            format!("audited-{n}"),
            "line",
            json!({"order": "audited", "n": n, "audited": "yes"}),
            BTreeMap::new(),
        )
    };
    let lines: Vec<NewMessage> = (0..CONVOY_BATCH).map(line).collect();
    for batch in lines.chunks(5) {
        client.publish_batch(batch.to_vec()).await.unwrap();
    }
    // A line published again: stored once, audited once.
    assert_eq!(
        client.publish_batch(vec![line(3)]).await.unwrap(),
        [PublishOutcome::Duplicate]
    );
    db.wait_for("the convoy and every audit completed", WAIT, || async {
        db.count("SELECT COUNT(*) FROM instances WHERE orchestration IN ('line-convoy', 'line-audit') AND status = 'completed'")
            .await
            == 1 + CONVOY_BATCH as i64
    })
    .await;
    let runs = instances(&db, "line-convoy").await;
    assert_eq!(runs.len(), 1, "{runs:?}");
    let seen: Vec<usize> = serde_json::from_str(&runs[0].3).unwrap();
    assert_eq!(seen, (0..CONVOY_BATCH).collect::<Vec<_>>());
    let audited: Vec<String> = sqlx::query_scalar(
        "SELECT output FROM instances WHERE orchestration = 'line-audit' ORDER BY output",
    )
    .fetch_all(&db.sql)
    .await
    .unwrap();
    let mut expected: Vec<String> = (0..CONVOY_BATCH)
        .map(|n| match n {
            // The first line activates both: the audit, first by name, has the line itself.
            0 => "\"audited-0\"".to_owned(),
            n => format!("\"audited-{n}/line-audit\""),
        })
        .collect();
    expected.sort();
    assert_eq!(audited, expected);
    assert_eq!(
        db.count(
            "SELECT COUNT(*) FROM messages WHERE message_type = 'line' AND status <> 'consumed'"
        )
        .await,
        0
    );
    host.stop();
}

/// Issue 25, point 8: invoices published while no host had registered their subscribers are
/// unrouted; when a host registers them, each invoice goes to every orchestration whose filter
/// it passes, as a fresh publish does (the review gets a copy), once.
async fn invoices_published_before_their_subscribers_registered_reach_each_of_them(db: TestDb) {
    let invoice = |id: &str, amount: i64| {
        NewMessage::published(
            id,
            "invoice.issued",
            json!({"amount": amount, "region": "EU"}),
            BTreeMap::new(),
        )
    };
    let early = vec![invoice("early-big", 5000), invoice("early-small", 5)];
    assert_eq!(
        db.store
            .publish(early.clone(), chrono::Utc::now())
            .await
            .unwrap(),
        [PublishOutcome::Unrouted, PublishOutcome::Unrouted]
    );
    let (host, client) = HostThread::start(&db, fast_config(), Deliveries::default()).await;
    db.wait_for("every invoice instance completed", WAIT, || async {
        db.count("SELECT COUNT(*) FROM instances WHERE orchestration LIKE '%invoice%' AND status = 'completed'")
            .await
            == 3
    })
    .await;
    let ended: Vec<(String, String)> = sqlx::query_as(
        "SELECT orchestration, output FROM instances ORDER BY orchestration, output",
    )
    .fetch_all(&db.sql)
    .await
    .unwrap();
    assert_eq!(
        ended,
        [
            ("invoice-audit".to_owned(), "\"early-big\"".to_owned()),
            ("invoice-audit".to_owned(), "\"early-small\"".to_owned()),
            (
                "large-invoice-review".to_owned(),
                "\"early-big/large-invoice-review\"".to_owned()
            ),
        ]
    );
    assert_eq!(
        client.publish_batch(early).await.unwrap(),
        [PublishOutcome::Duplicate, PublishOutcome::Duplicate]
    );
    host.stop();
}
