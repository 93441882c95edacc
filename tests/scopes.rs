//! Transactional scopes, exception handlers, compensation, the instance lifecycle (suspend,
//! resume after a fix, terminate, control by SQL) and poison protection: each run on SQLite and
//! on PostgreSQL, each checked against the database and the ports' own record.

#![allow(clippy::unwrap_used)] // tests may unwrap: a panic is a failed test

mod support;

use std::collections::BTreeMap;
use std::time::Duration;

use cairn::store::{ControlAction, InstanceStatus, NewMessage, StoreError};
use cairn::{Client, HostConfig};
use serde_json::json;
use support::fixtures::{self, fast_config, Deliveries, HostSetup, HostThread};
use support::TestDb;
use uuid::Uuid;

const WAIT: Duration = Duration::from_secs(20);

async fn publish(client: &Client, id: &str, ty: &str, body: serde_json::Value) {
    client
        .publish_batch(vec![NewMessage::published(id, ty, body, BTreeMap::new())])
        .await
        .expect("publish");
}

fn types(deliveries: &Deliveries, port: &str) -> Vec<String> {
    deliveries
        .all()
        .into_iter()
        .filter(|(p, _, _)| p == port)
        .map(|(_, _, body)| body.to_string())
        .collect()
}

/// Waits until `n` subscriptions to `message_type` are written.
async fn wait_subscribed(db: &TestDb, message_type: &str, n: i64) {
    db.wait_for(
        &format!("{n} receive(s) of {message_type}"),
        WAIT,
        || async {
            db.count_with(
                "SELECT COUNT(*) FROM subscriptions WHERE message_type = $1",
                message_type,
            )
            .await
                == n
        },
    )
    .await;
}

/// The `detail` column of an instance's history, in order.
async fn details(db: &TestDb, id: Uuid) -> Vec<String> {
    db.texts(
        "SELECT COALESCE(detail, '') FROM history WHERE CAST(instance_id AS TEXT) = $1 ORDER BY seq",
        &id.to_string(),
    )
    .await
}

async fn reasons(db: &TestDb, id: Uuid) -> Vec<String> {
    db.texts(
        "SELECT reason FROM history WHERE CAST(instance_id AS TEXT) = $1 ORDER BY seq",
        &id.to_string(),
    )
    .await
}

backend_tests!(
    an_atomic_scope_commits_its_sends_together_at_its_end,
    a_fault_in_an_atomic_scope_rolls_back_and_its_handler_runs,
    the_trip_saga_compensates_completed_bookings_newest_first,
    an_unhandled_fault_fails_an_instance_that_declares_it,
    a_suspended_instance_resumes_on_a_fixed_build_of_the_same_version,
    an_instance_with_unreadable_state_is_not_resumable_without_force,
    operators_steer_instances_by_inserting_control_rows,
    a_poison_message_suspends_its_instance_after_the_configured_attempts,
    a_fault_in_a_called_orchestration_reaches_the_callers_exception_handler,
    a_called_orchestrations_scope_is_compensated_by_the_callers_compensate,
);

/// An instance's `output` column.
async fn output_of(db: &TestDb, id: Uuid) -> Vec<String> {
    db.texts(
        "SELECT output FROM instances WHERE CAST(id AS TEXT) = $1",
        &id.to_string(),
    )
    .await
}

/// The bodies the `log` port delivered, in order.
fn logged(deliveries: &Deliveries) -> Vec<serde_json::Value> {
    deliveries.bodies("log")
}

/// Call Orchestration: `reserving` calls `reservation` inside its scope `order`; the called
/// orchestration's `NoStock` fault goes through its own scope `reserve` (whose handler, reached
/// through the caller's, re-raises it) to the caller's `order` handler. One instance, one history.
async fn a_fault_in_a_called_orchestration_reaches_the_callers_exception_handler(db: TestDb) {
    let deliveries = Deliveries::default();
    let (host, client) = HostThread::start(&db, fast_config(), deliveries.clone()).await;
    let id = client.start("reserving", json!("k-fail")).await.unwrap();
    wait_subscribed(&db, "stock.answer", 1).await;
    publish(
        &client,
        "answer-1",
        "stock.answer",
        json!({"key": "k-fail", "ok": false}),
    )
    .await;
    db.wait_status(id, InstanceStatus::Completed, WAIT).await;
    let output = output_of(&db, id).await;
    assert_eq!(
        output,
        vec![json!("handled in order: no stock for k-fail").to_string()]
    );
    db.wait_for("both sends delivered", WAIT, || async {
        logged(&deliveries).len() == 2
    })
    .await;
    assert_eq!(
        logged(&deliveries),
        vec![
            json!("k-fail"),
            json!({"scope": "order", "error": "no stock for k-fail"})
        ]
    );
    // The call ran inside the caller: one instance, its waits and points the caller's.
    assert_eq!(db.count("SELECT COUNT(*) FROM instances").await, 1);
    assert_eq!(
        reasons(&db, id).await.last().map(String::as_str),
        Some("complete")
    );
    assert_eq!(
        db.count("SELECT COUNT(*) FROM messages WHERE status <> 'consumed'")
            .await,
        0
    );
    host.stop();
}

/// Call Orchestration: the scope `reserve` that the called `reservation` completed is compensated
/// (its `release` sent once) when the caller compensates everything after the call returned.
async fn a_called_orchestrations_scope_is_compensated_by_the_callers_compensate(db: TestDb) {
    let deliveries = Deliveries::default();
    let (host, client) = HostThread::start(&db, fast_config(), deliveries.clone()).await;
    let id = client.start("reserving", json!("k-ok")).await.unwrap();
    wait_subscribed(&db, "stock.answer", 1).await;
    publish(
        &client,
        "answer-2",
        "stock.answer",
        json!({"key": "k-ok", "ok": true}),
    )
    .await;
    wait_subscribed(&db, "order.cancel", 1).await;
    assert_eq!(
        db.texts(
            "SELECT step FROM instances WHERE CAST(id AS TEXT) = $1",
            &id.to_string()
        )
        .await,
        vec!["Reserved".to_owned()]
    );
    publish(&client, "cancel-2", "order.cancel", json!({"key": "k-ok"})).await;
    db.wait_status(id, InstanceStatus::Completed, WAIT).await;
    db.wait_for("both sends delivered", WAIT, || async {
        logged(&deliveries).len() == 2
    })
    .await;
    assert_eq!(logged(&deliveries), vec![json!("k-ok"), json!("k-ok")]);
    let output = output_of(&db, id).await;
    assert_eq!(
        output,
        vec![json!("k-ok cancelled, 2 compensated").to_string()]
    );
    let compensations = reasons(&db, id)
        .await
        .into_iter()
        .filter(|r| r == "compensate")
        .count();
    // One point for each scope compensated (the called orchestration's `reserve`, the caller's
    // `order`), and one for `Compensated`.
    assert_eq!(compensations, 3, "{:?}", reasons(&db, id).await);
    assert_eq!(db.count("SELECT COUNT(*) FROM instances").await, 1);
    host.stop();
}

async fn an_atomic_scope_commits_its_sends_together_at_its_end(db: TestDb) {
    let deliveries = Deliveries::default();
    let (host, client) = HostThread::start(&db, fast_config(), deliveries.clone()).await;
    let id = client.start("atomic-pair", json!("k1")).await.unwrap();
    wait_subscribed(&db, "pair.begin", 1).await;
    publish(&client, "b1", "pair.begin", json!({"key": "k1"})).await;
    wait_subscribed(&db, "pair.go", 1).await;
    // Inside the scope: its first send is buffered, with no persistence point of its own. The
    // marker: an instance started now writes its first point (a send to `notifications`), in
    // the same group commit as a point for `pair.begin` or a later one.
    let marker = client
        .start(
            "approval",
            json!({"request_id": "scope-marker", "approver": "x"}),
        )
        .await
        .unwrap();
    db.wait_first_point(marker, WAIT).await;
    assert_eq!(
        db.count_with(
            "SELECT COUNT(*) FROM outbox WHERE CAST(instance_id AS TEXT) = $1",
            &id.to_string()
        )
        .await,
        0
    );
    assert!(reasons(&db, id).await.is_empty());
    assert!(types(&deliveries, "log").is_empty());
    publish(&client, "g1", "pair.go", json!({"key": "k1"})).await;
    db.wait_status(id, InstanceStatus::Completed, WAIT).await;
    db.wait_for("both sends delivered", WAIT, || async {
        types(&deliveries, "log").len() == 2
    })
    .await;
    // Both sends were committed by one point: the scope's end.
    assert_eq!(reasons(&db, id).await, ["complete"]);
    assert_eq!(
        db.count_with(
            "SELECT COUNT(DISTINCT created_at) FROM outbox WHERE CAST(instance_id AS TEXT) = $1",
            &id.to_string()
        )
        .await,
        1
    );
    assert!(details(&db, id).await[0].contains("atomic scope pair committed"));
    host.stop();
}

async fn a_fault_in_an_atomic_scope_rolls_back_and_its_handler_runs(db: TestDb) {
    let deliveries = Deliveries::default();
    let (host, client) = HostThread::start(&db, fast_config(), deliveries.clone()).await;
    let id = client.start("atomic-pair", json!("k2")).await.unwrap();
    wait_subscribed(&db, "pair.begin", 1).await;
    publish(&client, "b2", "pair.begin", json!({"key": "k2"})).await;
    wait_subscribed(&db, "pair.fail", 1).await;
    publish(&client, "f2", "pair.fail", json!({"key": "k2"})).await;
    db.wait_status(id, InstanceStatus::Completed, WAIT).await;
    db.wait_for("the handler's send", WAIT, || async {
        !types(&deliveries, "log").is_empty()
    })
    .await;
    // Nothing the scope buffered left the engine; the handler got the state from before the
    // scope and the typed fault.
    let log = deliveries.bodies("log");
    assert_eq!(log.len(), 1, "{log:?}");
    assert_eq!(log[0]["scope"], json!("pair"));
    assert_eq!(log[0]["atomic"], json!(true));
    assert!(log[0]["error"]
        .as_str()
        .unwrap()
        .contains("pair k2 failed on purpose"));
    assert_eq!(
        db.count_with(
            "SELECT COUNT(*) FROM outbox WHERE CAST(instance_id AS TEXT) = $1",
            &id.to_string()
        )
        .await,
        1
    );
    let detail = details(&db, id).await.join(" | ");
    assert!(detail.contains("atomic scope pair rolled back"), "{detail}");
    // Every message the instance took part in was consumed once.
    assert_eq!(
        db.count("SELECT COUNT(*) FROM messages WHERE status <> 'consumed'")
            .await,
        0
    );
    host.stop();
}

async fn the_trip_saga_compensates_completed_bookings_newest_first(db: TestDb) {
    let deliveries = Deliveries::default();
    let (host, client) = HostThread::start(&db, fast_config(), deliveries.clone()).await;
    let mut trips = BTreeMap::new();
    for sold_out in [None, Some("flight"), Some("hotel"), Some("car")] {
        let trip_id = format!("trip-{}", sold_out.unwrap_or("ok"));
        let id = client
            .start(
                "trip-booking",
                json!({"trip_id": trip_id, "traveller": "ada", "sold_out": sold_out}),
            )
            .await
            .unwrap();
        trips.insert(sold_out, id);
    }
    for (sold_out, id) in &trips {
        let end = if sold_out.is_some() {
            InstanceStatus::Failed
        } else {
            InstanceStatus::Completed
        };
        db.wait_status(*id, end, WAIT).await;
    }
    db.wait_for("every send delivered", WAIT, || async {
        db.count("SELECT COUNT(*) FROM outbox WHERE status = 'pending'")
            .await
            == 0
    })
    .await;
    // The ports' record: every booking made for a failed trip is cancelled exactly once (the
    // order is history's: deliveries of successive points may overtake each other); nothing is
    // cancelled for the trip that completed.
    let all = deliveries.all();
    let cancels_of = |trip: &str| -> Vec<String> {
        let mut services: Vec<String> = all
            .iter()
            .filter(|(_, _, b)| b["trip_id"] == json!(trip) && b.get("reference").is_some())
            .map(|(_, _, b)| {
                b["reference"]
                    .as_str()
                    .unwrap()
                    .split('-')
                    .next()
                    .unwrap()
                    .to_owned()
            })
            .collect();
        services.sort();
        services
    };
    assert_eq!(cancels_of("trip-ok"), Vec::<String>::new());
    assert_eq!(cancels_of("trip-flight"), Vec::<String>::new());
    assert_eq!(cancels_of("trip-hotel"), ["flight"]);
    assert_eq!(cancels_of("trip-car"), ["flight", "hotel"]);
    let car = trips[&Some("car")];
    assert_eq!(
        reasons(&db, car).await,
        [
            "send",
            "scope_end",
            "scope_end",
            "compensate",
            "compensate",
            "compensate",
            "complete"
        ]
    );
    let detail = details(&db, car).await.join(" | ");
    assert!(
        detail.contains("scope hotel compensated | scope flight compensated"),
        "{detail}"
    );
    let error = db.store.instance_summaries(&[car]).await.unwrap()[0]
        .last_error
        .clone()
        .unwrap();
    assert!(
        error.contains("car refused the booking: no car left; 2 booking(s) cancelled"),
        "{error}"
    );
    // The completed trip sent its itinerary and confirmation together (the atomic scope).
    let ok = trips[&None];
    assert_eq!(reasons(&db, ok).await.last().unwrap(), "complete");
    assert_eq!(deliveries.bodies("notifications").len(), 2);
    host.stop();
}

async fn an_unhandled_fault_fails_an_instance_that_declares_it(db: TestDb) {
    let (host, client) = HostThread::start(&db, fast_config(), Deliveries::default()).await;
    let id = client.start("fail-fast", json!("ff")).await.unwrap();
    wait_subscribed(&db, "fail-fast.go", 1).await;
    publish(&client, "ff-go", "fail-fast.go", json!({"key": "ff"})).await;
    db.wait_status(id, InstanceStatus::Failed, WAIT).await;
    let error = db.store.instance_summaries(&[id]).await.unwrap()[0]
        .last_error
        .clone()
        .unwrap();
    assert!(error.contains("the data is bad"), "{error}");
    assert_eq!(
        db.count_with(
            "SELECT COUNT(*) FROM messages WHERE id = $1 AND status = 'consumed'",
            "ff-go"
        )
        .await,
        1
    );
    host.stop();
}

async fn a_suspended_instance_resumes_on_a_fixed_build_of_the_same_version(db: TestDb) {
    // The first build has a bug: the transition fails and the instance is suspended at its last
    // persistence point, the message kept.
    let (host, client) = HostThread::start(&db, fast_config(), Deliveries::default()).await;
    let id = client.start("fixable", json!("fx")).await.unwrap();
    wait_subscribed(&db, "fixable.go", 1).await;
    publish(
        &client,
        "fx-go",
        "fixable.go",
        json!({"key": "fx", "n": 42}),
    )
    .await;
    db.wait_status(id, InstanceStatus::Suspended, WAIT).await;
    let error = db.store.instance_summaries(&[id]).await.unwrap()[0]
        .last_error
        .clone()
        .unwrap();
    assert!(error.contains("bug 17"), "{error}");
    assert_eq!(
        db.count_with(
            "SELECT COUNT(*) FROM messages WHERE id = $1 AND status = 'routed'",
            "fx-go"
        )
        .await,
        1
    );
    host.stop();
    // The fixed build, same name and version, is deployed; the operator resumes.
    let fixed = cairn_orchestrations::registry().register::<fixtures::FixableFixed>();
    let setup = HostSetup {
        registry: fixed,
        ..HostSetup::new(fast_config(), Deliveries::default())
    };
    let (host, _client) = HostThread::launch(&db, setup).await;
    db.store
        .control(
            id,
            ControlAction::Resume { force: false },
            chrono::Utc::now(),
        )
        .await
        .unwrap();
    db.wait_status(id, InstanceStatus::Completed, WAIT).await;
    let detail = db.store.instance_detail(id).await.unwrap().unwrap();
    assert_eq!(detail.output, Some(json!(42)));
    host.stop();
}

async fn an_instance_with_unreadable_state_is_not_resumable_without_force(db: TestDb) {
    let (host, client) = HostThread::start(&db, fast_config(), Deliveries::default()).await;
    // The collector sends at start: a first persistence point with its state.
    let id = client
        .start("collector", json!({"key": "nr"}))
        .await
        .unwrap();
    db.wait_first_point(id, WAIT).await;
    host.stop();
    sqlx::query("UPDATE instances SET state = $1 WHERE CAST(id AS TEXT) = $2")
        .bind(vec![0xc1u8, 0x00])
        .bind(id.to_string())
        .execute(&db.sql)
        .await
        .unwrap();
    let (host, client) = HostThread::start(&db, fast_config(), Deliveries::default()).await;
    publish(&client, "nr-item", "item", json!({"key": "nr", "n": 1})).await;
    db.wait_status(id, InstanceStatus::Suspended, WAIT).await;
    assert_eq!(
        db.count_with(
            "SELECT COUNT(*) FROM instances WHERE CAST(id AS TEXT) = $1 AND NOT resumable",
            &id.to_string()
        )
        .await,
        1
    );
    let refused = db
        .store
        .control(
            id,
            ControlAction::Resume { force: false },
            chrono::Utc::now(),
        )
        .await;
    assert!(
        matches!(refused, Err(StoreError::NotResumable { .. })),
        "{refused:?}"
    );
    // With force (after deploying a build that reads the state) it runs again; here the state
    // still does not decode, so it is suspended again, not lost.
    db.store
        .control(
            id,
            ControlAction::Resume { force: true },
            chrono::Utc::now(),
        )
        .await
        .unwrap();
    db.wait_status(id, InstanceStatus::Suspended, WAIT).await;
    host.stop();
}

async fn operators_steer_instances_by_inserting_control_rows(db: TestDb) {
    let (host, client) = HostThread::start(&db, fast_config(), Deliveries::default()).await;
    let a = client.start("fixable", json!("ca")).await.unwrap();
    let b = client
        .start(
            "approval",
            json!({"request_id": "cb", "approver": "x", "escalate_after_ms": 600000}),
        )
        .await
        .unwrap();
    db.wait_for("both to wait", WAIT, || async {
        db.count("SELECT COUNT(*) FROM timers").await == 1
            && db
                .count("SELECT COUNT(*) FROM subscriptions WHERE message_type = 'fixable.go'")
                .await
                == 1
    })
    .await;
    // What an operator types into psql or sqlite3.
    let insert = |instance: Uuid, action: &'static str, reason: &'static str| {
        let sql = db.sql.clone();
        async move {
            sqlx::query(&format!(
                "INSERT INTO control (instance_id, action, reason) VALUES ('{instance}', '{action}', '{reason}')"
            ))
            .execute(&sql)
            .await
            .unwrap();
        }
    };
    insert(a, "suspend", "looking into it").await;
    db.wait_status(a, InstanceStatus::Suspended, WAIT).await;
    insert(b, "terminate", "customer withdrew").await;
    db.wait_status(b, InstanceStatus::Terminated, WAIT).await;
    // Terminate cancels the instance's subscriptions and timers.
    assert_eq!(
        db.count_with(
            "SELECT COUNT(*) FROM timers WHERE CAST(instance_id AS TEXT) = $1",
            &b.to_string()
        )
        .await,
        0
    );
    assert_eq!(
        db.count_with(
            "SELECT COUNT(*) FROM subscriptions WHERE CAST(instance_id AS TEXT) = $1",
            &b.to_string()
        )
        .await,
        0
    );
    // A request that cannot be carried out is rejected with the reason, not lost.
    insert(b, "resume", "").await;
    insert(a, "resume", "").await;
    db.wait_for("every control row handled", WAIT, || async {
        db.count("SELECT COUNT(*) FROM control WHERE status = 'pending'")
            .await
            == 0
    })
    .await;
    assert_eq!(
        db.count("SELECT COUNT(*) FROM control WHERE status = 'done'")
            .await,
        3
    );
    let rejected = db
        .texts("SELECT result FROM control WHERE status = $1", "rejected")
        .await;
    assert_eq!(rejected.len(), 1);
    assert!(
        rejected[0].contains("only a suspended instance can be resumed"),
        "{rejected:?}"
    );
    // The resumed instance runs on.
    publish(&client, "ca-go", "fixable.go", json!({"key": "ca", "n": 1})).await;
    db.wait_status(a, InstanceStatus::Suspended, WAIT).await; // the buggy build fails it again
    let error = db.store.instance_summaries(&[a]).await.unwrap()[0]
        .last_error
        .clone()
        .unwrap();
    assert!(error.contains("bug 17"), "{error}");
    host.stop();
}

async fn a_poison_message_suspends_its_instance_after_the_configured_attempts(db: TestDb) {
    let config = HostConfig {
        max_deliveries: 3,
        ..fast_config()
    };
    let (host, client) = HostThread::start(&db, config, Deliveries::default()).await;
    let key = format!("poison-{:?}", db.backend);
    let poisoned = client.start("panicker", json!(key)).await.unwrap();
    let healthy: Vec<Uuid> = {
        let mut ids = Vec::new();
        for i in 0..5 {
            ids.push(
                client
                    .start("panicker", json!(format!("{key}-ok-{i}")))
                    .await
                    .unwrap(),
            );
        }
        ids
    };
    wait_subscribed(&db, "boom", 6).await;
    publish(&client, &format!("{key}-boom"), "boom", json!({"key": key})).await;
    for i in 0..5 {
        publish(
            &client,
            &format!("{key}-fine-{i}"),
            "fine",
            json!({"key": format!("{key}-ok-{i}")}),
        )
        .await;
    }
    db.wait_status(poisoned, InstanceStatus::Suspended, WAIT)
        .await;
    for id in healthy {
        db.wait_status(id, InstanceStatus::Completed, WAIT).await;
    }
    assert_eq!(
        fixtures::panics(&key),
        3,
        "delivered exactly max_deliveries times"
    );
    let error = db.store.instance_summaries(&[poisoned]).await.unwrap()[0]
        .last_error
        .clone()
        .unwrap();
    assert!(
        error.contains(&format!("message {key}-boom (boom) was delivered 3 times")),
        "{error}"
    );
    assert!(error.contains("panicked: boom"), "{error}");
    // The message is kept, routed to the instance, for a resume after a fix.
    assert_eq!(
        db.count_with(
            "SELECT COUNT(*) FROM messages WHERE id = $1 AND status = 'routed'",
            &format!("{key}-boom")
        )
        .await,
        1
    );
    host.stop();
}
