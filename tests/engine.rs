//! Behavioural tests of the engine, each run on SQLite and on PostgreSQL.

#![allow(clippy::unwrap_used)] // tests may unwrap: a panic is a failed test

mod support;

use std::collections::BTreeMap;
use std::time::Duration;

use cairn::store::faulty::FaultPlan;
use cairn::store::{ControlAction, InstanceStatus, NewInstance, NewMessage, PublishOutcome};
use cairn::Client;
use serde_json::json;
use support::fixtures::{fast_config, Deliveries, HostThread};
use support::TestDb;
use uuid::Uuid;

const WAIT: Duration = Duration::from_secs(20);

fn msg(id: &str, ty: &str, body: serde_json::Value) -> NewMessage {
    NewMessage::published(id, ty, body, BTreeMap::new())
}

async fn publish(client: &Client, id: &str, ty: &str, body: serde_json::Value) -> PublishOutcome {
    client
        .publish_batch(vec![msg(id, ty, body)])
        .await
        .expect("publish")
        .remove(0)
}

fn routed(outcome: PublishOutcome) -> Uuid {
    match outcome {
        PublishOutcome::Routed(id) => id,
        other => panic!("expected routed, got {other:?}"),
    }
}

backend_tests!(
    samples_run_to_completion_on_the_host,
    a_message_published_twice_is_stored_once,
    an_unrouted_message_is_kept_and_routed_when_a_receive_appears,
    replay_after_a_crash_delivers_consumed_messages_again_in_order,
    failing_commits_are_retried_and_nothing_is_lost,
    commits_failing_beyond_retries_resume_from_the_last_point,
    bad_input_becomes_a_queryable_record_and_the_host_keeps_going,
    shutdown_saves_instances_that_consumed_messages_since_their_last_point,
    operators_suspend_resume_and_terminate_instances,
    idle_instances_dehydrate_and_rehydrate_on_their_next_message,
    a_commit_by_a_host_that_lost_the_lease_is_fenced,
    a_group_commit_fences_each_point_and_writes_an_instances_points_in_order,
    a_large_group_commit_fences_each_point_too,
    a_point_consuming_a_message_not_routed_to_its_instance_fails_and_writes_nothing,
    a_point_giving_up_its_instance_releases_what_it_held_and_consumes_the_rest,
    a_point_consumes_the_reply_copy_another_host_stored_while_the_point_waited,
    unlocking_gives_back_what_the_host_holds_and_leaves_other_hosts_locks,
    a_message_of_a_cancelled_receive_is_routed_again,
    receives_declared_between_points_are_fenced_like_points,
    a_group_commit_cancels_re_arms_and_sets_each_instances_timers,
    an_eager_start_is_held_by_its_host_until_its_lease_runs_out,
    an_eager_start_survives_its_hosts_crash_before_the_first_point,
    a_hosts_client_leaves_starts_to_claims_once_its_backlog_waits,
    a_first_point_writes_its_instance_with_its_start,
    an_eager_start_is_written_with_its_first_point_in_one_commit,
    an_eager_start_whose_first_transition_panics_is_stored_and_suspended_as_poison,
);

async fn samples_run_to_completion_on_the_host(db: TestDb) {
    let deliveries = Deliveries::default();
    let (host, client) = HostThread::start(&db, fast_config(), deliveries.clone()).await;
    let order = routed(publish(&client, "o1", "order.placed",
        json!({"order_id": "o1", "customer": "ada", "amount": 12.5, "shipment_timeout_ms": 30000})).await);
    let approval = client
        .start("approval", json!({"request_id": "r1", "approver": "alice"}))
        .await
        .unwrap();
    publish(
        &client,
        "d1",
        "approval.decision",
        json!({"request_id": "r1", "approved": true, "by": "alice"}),
    )
    .await;
    let batch = routed(publish(&client, "b1", "invoice.batch", json!({"batch_id": "b1", "lines": [
        {"customer": "a", "amount": 10.0}, {"customer": "b", "amount": 900.0}, {"customer": "c", "amount": 5.0}]})).await);
    for id in [order, approval, batch] {
        db.wait_status(id, InstanceStatus::Completed, WAIT).await;
    }
    let detail = db.store.instance_detail(order).await.unwrap().unwrap();
    assert_eq!(detail.output.as_ref().unwrap()["shipped"], json!(true));
    assert_eq!(detail.summary.step, "completed");
    let reasons: Vec<_> = detail.history.iter().map(|h| h.reason.as_str()).collect();
    assert_eq!(reasons, ["send", "send", "complete"]);
    let batch = db.store.instance_detail(batch).await.unwrap().unwrap();
    assert_eq!(
        batch.output.unwrap(),
        json!({"batch_id": "b1", "total": 15.0, "failed": ["b"]})
    );
    assert_eq!(
        db.count("SELECT COUNT(*) FROM instances WHERE orchestration = 'invoice'")
            .await,
        3
    );
    assert_eq!(
        db.count("SELECT COUNT(*) FROM messages WHERE status <> 'consumed'")
            .await,
        0
    );
    host.stop();
}

async fn a_message_published_twice_is_stored_once(db: TestDb) {
    let deliveries = Deliveries::default();
    let (host, client) = HostThread::start(&db, fast_config(), deliveries).await;
    let body =
        json!({"order_id": "dup", "customer": "ada", "amount": 1.0, "shipment_timeout_ms": 30000});
    let first = routed(publish(&client, "same-id", "order.placed", body.clone()).await);
    assert_eq!(
        publish(&client, "same-id", "order.placed", body.clone()).await,
        PublishOutcome::Duplicate
    );
    // A batch holding the same id twice stores it once too.
    let outcomes = client
        .publish_batch(vec![
            msg("twice", "no.subscriber", json!(1)),
            msg("twice", "no.subscriber", json!(2)),
        ])
        .await
        .unwrap();
    assert_eq!(
        outcomes,
        vec![PublishOutcome::Unrouted, PublishOutcome::Duplicate]
    );
    db.wait_status(first, InstanceStatus::Completed, WAIT).await;
    assert_eq!(
        db.count("SELECT COUNT(*) FROM messages WHERE id = 'same-id'")
            .await,
        1
    );
    assert_eq!(
        db.count("SELECT COUNT(*) FROM messages WHERE id = 'twice'")
            .await,
        1
    );
    assert_eq!(
        db.count("SELECT COUNT(*) FROM instances WHERE orchestration = 'order-fulfilment'")
            .await,
        1
    );
    host.stop();
}

async fn an_unrouted_message_is_kept_and_routed_when_a_receive_appears(db: TestDb) {
    let deliveries = Deliveries::default();
    let (host, client) = HostThread::start(&db, fast_config(), deliveries).await;
    let early = publish(
        &client,
        "early-decision",
        "approval.decision",
        json!({"request_id": "late-r", "approved": true, "by": "bob"}),
    )
    .await;
    assert_eq!(early, PublishOutcome::Unrouted);
    let reason = db
        .texts(
            "SELECT reason FROM messages WHERE id = $1 AND status = 'unrouted'",
            "early-decision",
        )
        .await;
    assert!(
        reason[0].contains("no subscription matches message type \"approval.decision\""),
        "{reason:?}"
    );
    let id = client
        .start(
            "approval",
            json!({"request_id": "late-r", "approver": "alice"}),
        )
        .await
        .unwrap();
    db.wait_status(id, InstanceStatus::Completed, WAIT).await;
    let out = db
        .store
        .instance_detail(id)
        .await
        .unwrap()
        .unwrap()
        .output
        .unwrap();
    assert_eq!(out["by"], "bob");
    assert_eq!(
        db.count_with(
            "SELECT COUNT(*) FROM messages WHERE id = $1 AND status = 'consumed'",
            "early-decision"
        )
        .await,
        1
    );
    host.stop();
}

async fn replay_after_a_crash_delivers_consumed_messages_again_in_order(db: TestDb) {
    let deliveries = Deliveries::default();
    let (host, client) = HostThread::start(&db, fast_config(), deliveries.clone()).await;
    let id = routed(publish(&client, "c-start", "collect.start", json!({"key": "k1"})).await);
    db.wait_for("the start point", WAIT, || async {
        db.count("SELECT COUNT(*) FROM history").await == 1
    })
    .await;
    let items: Vec<NewMessage> = (1..=5)
        .map(|n| msg(&format!("item-{n}"), "item", json!({"key": "k1", "n": n})))
        .collect();
    client.publish_batch(items).await.unwrap();
    // The instance takes all five (they are locked to the host) but writes no persistence point.
    db.wait_for("five items claimed", WAIT, || async {
        db.count(
            "SELECT COUNT(*) FROM messages WHERE message_type = 'item' AND locked_by IS NOT NULL",
        )
        .await
            == 5
    })
    .await;
    host.crash();

    // After the crash: the state is the last persisted one, the items are not consumed.
    let detail = db.store.instance_detail(id).await.unwrap().unwrap();
    assert_eq!(detail.history.len(), 1);
    let state = cairn::codec::to_json(detail.state.as_ref().unwrap()).unwrap();
    assert_eq!(state["Collecting"]["items"], json!([]));
    assert_eq!(
        db.count("SELECT COUNT(*) FROM messages WHERE message_type = 'item' AND status = 'routed'")
            .await,
        5
    );

    let (host, client) = HostThread::start(&db, fast_config(), deliveries.clone()).await;
    publish(&client, "c-done", "collect.done", json!({"key": "k1"})).await;
    db.wait_status(id, InstanceStatus::Completed, WAIT).await;
    assert_items_logged(&db, &deliveries, json!([1, 2, 3, 4, 5])).await;
    assert_eq!(
        db.count(
            "SELECT COUNT(*) FROM messages WHERE message_type = 'item' AND status = 'consumed'"
        )
        .await,
        5
    );
    host.stop();
}

async fn failing_commits_are_retried_and_nothing_is_lost(db: TestDb) {
    let plan = FaultPlan::new();
    let deliveries = Deliveries::default();
    let (host, client) =
        HostThread::start_with(&db, fast_config(), deliveries.clone(), Some(plan.clone())).await;
    plan.fail_next_commits(4);
    let mut ids = Vec::new();
    for i in 0..10 {
        ids.push(routed(publish(&client, &format!("o{i}"), "order.placed",
            json!({"order_id": format!("o{i}"), "customer": "c", "amount": 5.0, "shipment_timeout_ms": 30000})).await));
    }
    for id in &ids {
        db.wait_status(*id, InstanceStatus::Completed, WAIT).await;
    }
    assert!(plan.commits() >= 4);
    assert_g2(&db, &deliveries).await;
    assert_eq!(
        db.count("SELECT COUNT(*) FROM messages WHERE status <> 'consumed'")
            .await,
        0
    );
    host.stop();
}

async fn commits_failing_beyond_retries_resume_from_the_last_point(db: TestDb) {
    let plan = FaultPlan::new();
    let deliveries = Deliveries::default();
    let (host, client) =
        HostThread::start_with(&db, fast_config(), deliveries.clone(), Some(plan.clone())).await;
    plan.fail_next_commits(12); // more than the host's retries: it forgets and replays
    let id = routed(publish(&client, "cs", "collect.start", json!({"key": "k2"})).await);
    let items: Vec<NewMessage> = (1..=3)
        .map(|n| msg(&format!("i2-{n}"), "item", json!({"key": "k2", "n": n})))
        .collect();
    client.publish_batch(items).await.unwrap();
    publish(&client, "cd", "collect.done", json!({"key": "k2"})).await;
    db.wait_status(id, InstanceStatus::Completed, WAIT).await;
    assert_items_logged(&db, &deliveries, json!([1, 2, 3])).await;
    assert_g2(&db, &deliveries).await;
    host.stop();
}

/// The collector's `collect.items` send reached the `log` port (at least once, always with the
/// same items, in order), once every committed send has been delivered.
async fn assert_items_logged(db: &TestDb, deliveries: &Deliveries, items: serde_json::Value) {
    db.wait_for("every committed send delivered", WAIT, || async {
        db.count("SELECT COUNT(*) FROM outbox WHERE status <> 'delivered'")
            .await
            == 0
    })
    .await;
    let logged: Vec<_> = deliveries
        .bodies("log")
        .into_iter()
        .filter(|b| b.is_array())
        .collect();
    assert!(!logged.is_empty(), "collect.items was never delivered");
    for body in logged {
        assert_eq!(body, items, "replayed once each, in order");
    }
}

/// G2 from the ports' record: every delivered id was committed, every committed send delivered.
async fn assert_g2(db: &TestDb, deliveries: &Deliveries) {
    let committed: std::collections::BTreeSet<String> =
        sqlx::query_scalar::<_, String>("SELECT id FROM outbox")
            .fetch_all(&db.sql)
            .await
            .unwrap()
            .into_iter()
            .collect();
    let delivered: std::collections::BTreeSet<String> = deliveries.ids().into_iter().collect();
    assert!(
        delivered.is_subset(&committed),
        "delivered but never committed: {:?}",
        delivered.difference(&committed)
    );
    db.wait_for("every committed send delivered", WAIT, || async {
        db.count("SELECT COUNT(*) FROM outbox WHERE status <> 'delivered'")
            .await
            == 0
    })
    .await;
    let delivered: std::collections::BTreeSet<String> = deliveries.ids().into_iter().collect();
    assert_eq!(delivered, committed);
}

async fn bad_input_becomes_a_queryable_record_and_the_host_keeps_going(db: TestDb) {
    let deliveries = Deliveries::default();
    let (host, client) = HostThread::start(&db, fast_config(), deliveries).await;
    // An undecodable body: the activation message does not decode as the orchestration's input.
    let undecodable =
        routed(publish(&client, "bad-body", "order.placed", json!({"order_id": 5})).await);
    // An unknown message type.
    assert_eq!(
        publish(&client, "who", "no.such.type", json!({})).await,
        PublishOutcome::Unrouted
    );
    // Unknown orchestration name, and a known name at an unknown version, in the database.
    let ghost = Uuid::new_v4();
    let future = Uuid::new_v4();
    let now = chrono::Utc::now();
    db.store
        .start_instances(
            vec![
                NewInstance {
                    id: ghost,
                    orchestration: "ghost".into(),
                    version: 1,
                    parent: None,
                    input: json!(null),
                },
                NewInstance {
                    id: future,
                    orchestration: "approval".into(),
                    version: 99,
                    parent: None,
                    input: json!(null),
                },
            ],
            None,
            now,
        )
        .await
        .unwrap();
    // A panicking transition.
    let panicky = client.start("panicker", json!("p1")).await.unwrap();
    db.wait_for("the panicker to wait", WAIT, || async {
        db.count("SELECT COUNT(*) FROM subscriptions WHERE message_type = 'boom'")
            .await
            == 1
    })
    .await;
    publish(&client, "boom-1", "boom", json!({"key": "p1"})).await;
    // A corrupt state blob: an instance saved, its state then overwritten.
    let corrupt = client
        .start("approval", json!({"request_id": "rc", "approver": "x"}))
        .await
        .unwrap();
    db.wait_first_point(corrupt, WAIT).await;
    host.stop();
    sqlx::query("UPDATE instances SET state = $1 WHERE CAST(id AS TEXT) = $2")
        .bind(vec![0xc1u8, 0xff, 0x00, 0x13])
        .bind(corrupt.to_string())
        .execute(&db.sql)
        .await
        .unwrap();
    let (host, client) = HostThread::start(&db, fast_config(), Deliveries::default()).await;
    publish(
        &client,
        "dc",
        "approval.decision",
        json!({"request_id": "rc", "approved": true, "by": "x"}),
    )
    .await;
    // And a healthy instance that must complete regardless.
    let healthy = client
        .start("approval", json!({"request_id": "ok", "approver": "x"}))
        .await
        .unwrap();
    publish(
        &client,
        "dok",
        "approval.decision",
        json!({"request_id": "ok", "approved": true, "by": "x"}),
    )
    .await;

    db.wait_status(healthy, InstanceStatus::Completed, WAIT)
        .await;
    for (id, needle) in [
        (undecodable, "does not decode"),
        (panicky, "poison message"),
        (corrupt, "does not decode"),
    ] {
        db.wait_status(id, InstanceStatus::Suspended, WAIT).await;
        let err = db.store.instance_summaries(&[id]).await.unwrap()[0]
            .last_error
            .clone()
            .unwrap();
        assert!(err.contains(needle), "{id}: {err}");
    }
    // The panic's message is still there, not consumed: resuming after a fix replays it.
    assert_eq!(
        db.count_with(
            "SELECT COUNT(*) FROM messages WHERE id = $1 AND status = 'routed'",
            "boom-1"
        )
        .await,
        1
    );
    for id in [ghost, future] {
        db.wait_for("the unrunnable instance to be explained", WAIT, || async {
            db.store.instance_summaries(&[id]).await.unwrap()[0]
                .last_error
                .as_deref()
                .is_some_and(|e| e.contains("is not registered"))
        })
        .await;
    }
    let reason = db
        .texts("SELECT reason FROM messages WHERE id = $1", "who")
        .await;
    assert!(reason[0].contains("no.such.type"), "{reason:?}");
    host.stop();
}

async fn shutdown_saves_instances_that_consumed_messages_since_their_last_point(db: TestDb) {
    let deliveries = Deliveries::default();
    let (host, client) = HostThread::start(&db, fast_config(), deliveries.clone()).await;
    let id = routed(publish(&client, "s-start", "collect.start", json!({"key": "s"})).await);
    let items: Vec<NewMessage> = (1..=3)
        .map(|n| msg(&format!("s-{n}"), "item", json!({"key": "s", "n": n})))
        .collect();
    client.publish_batch(items).await.unwrap();
    db.wait_for("three items claimed", WAIT, || async {
        db.count(
            "SELECT COUNT(*) FROM messages WHERE message_type = 'item' AND locked_by IS NOT NULL",
        )
        .await
            == 3
    })
    .await;
    let stats = host.stop();
    assert_eq!(stats.points.get("shutdown"), Some(&1));
    let detail = db.store.instance_detail(id).await.unwrap().unwrap();
    assert_eq!(detail.history.last().unwrap().reason.as_str(), "shutdown");
    assert_eq!(detail.summary.status, InstanceStatus::Dehydrated);
    assert_eq!(
        db.count(
            "SELECT COUNT(*) FROM messages WHERE message_type = 'item' AND status = 'consumed'"
        )
        .await,
        3
    );
    assert_eq!(
        db.count("SELECT COUNT(*) FROM instances WHERE owner IS NOT NULL")
            .await,
        0
    );

    let (host, client) = HostThread::start(&db, fast_config(), deliveries.clone()).await;
    publish(&client, "s-done", "collect.done", json!({"key": "s"})).await;
    db.wait_status(id, InstanceStatus::Completed, WAIT).await;
    assert_items_logged(&db, &deliveries, json!([1, 2, 3])).await;
    host.stop();
}

async fn operators_suspend_resume_and_terminate_instances(db: TestDb) {
    let deliveries = Deliveries::default();
    let (host, client) = HostThread::start(&db, fast_config(), deliveries).await;
    let a = client
        .start("approval", json!({"request_id": "sa", "approver": "x"}))
        .await
        .unwrap();
    let b = client
        .start("approval", json!({"request_id": "sb", "approver": "x"}))
        .await
        .unwrap();
    for id in [a, b] {
        db.wait_first_point(id, WAIT).await;
    }
    let now = chrono::Utc::now();
    assert_eq!(
        db.store
            .control(
                a,
                ControlAction::Suspend {
                    reason: "audit".into()
                },
                now
            )
            .await
            .unwrap(),
        InstanceStatus::Suspended
    );
    publish(
        &client,
        "da",
        "approval.decision",
        json!({"request_id": "sa", "approved": true, "by": "x"}),
    )
    .await;
    // Suspended: the decision waits, unconsumed.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(db.status(a).await, Some(InstanceStatus::Suspended));
    assert_eq!(
        db.count_with(
            "SELECT COUNT(*) FROM messages WHERE id = $1 AND status = 'routed'",
            "da"
        )
        .await,
        1
    );
    let err = db
        .store
        .control(a, ControlAction::Terminate { reason: "x".into() }, now)
        .await;
    assert!(
        err.is_ok(),
        "terminating a suspended instance is allowed: {err:?}"
    );
    let err = db
        .store
        .control(a, ControlAction::Resume { force: false }, now)
        .await
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("only a suspended instance can be resumed"),
        "{err}"
    );

    db.store
        .control(
            b,
            ControlAction::Suspend {
                reason: "audit".into(),
            },
            now,
        )
        .await
        .unwrap();
    db.store
        .control(b, ControlAction::Resume { force: false }, now)
        .await
        .unwrap();
    publish(
        &client,
        "db",
        "approval.decision",
        json!({"request_id": "sb", "approved": false, "by": "x"}),
    )
    .await;
    db.wait_status(b, InstanceStatus::Completed, WAIT).await;
    let reasons: Vec<_> = db
        .store
        .instance_detail(b)
        .await
        .unwrap()
        .unwrap()
        .history
        .iter()
        .map(|h| h.reason.as_str())
        .collect();
    assert_eq!(reasons, ["send", "suspend", "complete"]);

    assert_eq!(db.status(a).await, Some(InstanceStatus::Terminated));
    assert_eq!(
        db.count_with(
            "SELECT COUNT(*) FROM subscriptions WHERE CAST(instance_id AS TEXT) = $1",
            &a.to_string()
        )
        .await,
        0
    );
    assert_eq!(
        db.count_with(
            "SELECT COUNT(*) FROM timers WHERE CAST(instance_id AS TEXT) = $1",
            &a.to_string()
        )
        .await,
        0
    );
    host.stop();
}

async fn idle_instances_dehydrate_and_rehydrate_on_their_next_message(db: TestDb) {
    let deliveries = Deliveries::default();
    let config = cairn::HostConfig {
        dehydrate_after: Duration::from_millis(100),
        ..fast_config()
    };
    let (host, client) = HostThread::start(&db, config, deliveries).await;
    let id = client
        .start("approval", json!({"request_id": "dh", "approver": "x"}))
        .await
        .unwrap();
    db.wait_status(id, InstanceStatus::Dehydrated, WAIT).await;
    let detail = db.store.instance_detail(id).await.unwrap().unwrap();
    assert_eq!(detail.history.last().unwrap().reason.as_str(), "dehydrate");
    assert!(
        detail
            .summary
            .waiting_for
            .contains("message approval.decision {request_id=dh}"),
        "{}",
        detail.summary.waiting_for
    );
    assert!(detail.next_timer_at.is_some());
    publish(
        &client,
        "ddh",
        "approval.decision",
        json!({"request_id": "dh", "approved": true, "by": "x"}),
    )
    .await;
    db.wait_status(id, InstanceStatus::Completed, WAIT).await;
    host.stop();
}

async fn a_commit_by_a_host_that_lost_the_lease_is_fenced(db: TestDb) {
    use cairn::store::CommitOutcome;
    let store = db.store.clone();
    let now = chrono::Utc::now();
    let id = Uuid::new_v4();
    store
        .start_instances(
            vec![NewInstance {
                id,
                orchestration: "approval".into(),
                version: 1,
                parent: None,
                input: json!({}),
            }],
            None,
            now,
        )
        .await
        .unwrap();
    let a = store
        .acquire(
            "host-a",
            &[id],
            now,
            now + chrono::Duration::milliseconds(50),
        )
        .await
        .unwrap();
    assert_eq!(a.len(), 1);
    // While A's lease holds, B cannot take the instance.
    assert!(store
        .acquire("host-b", &[id], now, now + chrono::Duration::seconds(30))
        .await
        .unwrap()
        .is_empty());
    // After it expires, B takes it with a newer epoch.
    let later = now + chrono::Duration::seconds(1);
    let b = store
        .acquire(
            "host-b",
            &[id],
            later,
            later + chrono::Duration::seconds(30),
        )
        .await
        .unwrap();
    assert_eq!(b.len(), 1);
    assert!(b[0].epoch > a[0].epoch);
    let out = store
        .commit(&[send_point(id, "host-a", a[0].epoch, "zombie", 1, later)])
        .await
        .unwrap();
    assert_eq!(out, vec![CommitOutcome::Fenced]);
    assert_eq!(
        db.count("SELECT COUNT(*) FROM outbox").await,
        0,
        "a fenced point sends nothing"
    );
    assert_eq!(
        db.count("SELECT COUNT(*) FROM history").await,
        0,
        "a fenced point writes nothing"
    );
    let out = store
        .commit(&[send_point(id, "host-b", b[0].epoch, "owner", 1, later)])
        .await
        .unwrap();
    assert_eq!(out, vec![CommitOutcome::Committed]);
    assert_eq!(db.count("SELECT COUNT(*) FROM history").await, 1);
}

/// A persistence point of instance `id` that sends one message (`send-<step>`), written by `host`
/// holding `epoch`.
fn send_point(
    id: Uuid,
    host: &str,
    epoch: i64,
    step: &str,
    history_seq: i64,
    at: chrono::DateTime<chrono::Utc>,
) -> cairn::store::PersistencePoint {
    cairn::store::PersistencePoint {
        instance_id: id,
        epoch,
        host: host.into(),
        reason: cairn::store::Reason::Send,
        detail: None,
        status: InstanceStatus::Running,
        resumable: true,
        failed: vec![],
        state: Some(vec![0x90]),
        engine_state: None,
        step: step.into(),
        waiting_for: String::new(),
        next_timer_at: None,
        last_error: None,
        output: None,
        history_seq,
        consumed: vec![],
        subscriptions: None,
        cancel_timers: vec![],
        set_timers: vec![],
        outbox: vec![cairn::store::OutboxRow {
            id: format!("send-{step}"),
            instance_id: id,
            port: "p".into(),
            message_type: "t".into(),
            body: json!({}),
            expects_reply: false,
            attempts: 0,
        }],
        delivered: vec![],
        messages: vec![],
        children: vec![],
        release: false,
        at,
        outbox_lock_until: at,
        start: None,
    }
}

/// One group commit of several points (G4): each point is fenced on its own, a fenced one writes
/// nothing while the others commit, and each point of an instance is fenced against the row its
/// earlier point in the group wrote.
/// A new `approval` instance, for tests that drive the store by hand.
fn approval(id: Uuid) -> NewInstance {
    NewInstance {
        id,
        orchestration: "approval".into(),
        version: 1,
        parent: None,
        input: json!({}),
    }
}

/// Starts `approval` instances `ids` and leases them all to `host-a`.
async fn started_and_held(
    db: &TestDb,
    ids: &[Uuid],
    now: chrono::DateTime<chrono::Utc>,
) -> Vec<cairn::store::InstanceRecord> {
    db.store
        .start_instances(ids.iter().copied().map(approval).collect(), None, now)
        .await
        .unwrap();
    let held = db
        .store
        .acquire("host-a", ids, now, now + chrono::Duration::seconds(30))
        .await
        .unwrap();
    assert_eq!(held.len(), ids.len());
    held
}

async fn a_group_commit_fences_each_point_and_writes_an_instances_points_in_order(db: TestDb) {
    use cairn::store::{CommitOutcome, SubscriptionRow};
    use cairn::Correlation;
    let store = db.store.clone();
    let now = chrono::Utc::now();
    let (x, y) = (Uuid::new_v4(), Uuid::new_v4());
    let held = started_and_held(&db, &[x, y], now).await;
    let epoch = held[0].epoch;
    // x2 gives the instance up, so x3, after it, no longer holds it.
    let mut x2 = send_point(x, "host-a", epoch, "x2", 2, now);
    x2.release = true;
    // Both first points consume their start message and subscribe; y1's must not.
    let subscribing = |id: Uuid, step: &str| {
        let mut point = send_point(id, "host-a", epoch, step, 1, now);
        point.subscriptions = Some(vec![SubscriptionRow {
            id: Uuid::now_v7(),
            message_type: "approval.decision".into(),
            correlation: Correlation::on("request_id", step),
        }]);
        point
    };
    let mut x1 = subscribing(x, "x1");
    x1.consumed = vec![start_message(&db, x).await.2];
    let mut y1 = subscribing(y, "y1");
    y1.epoch = epoch + 5;
    y1.consumed = vec![start_message(&db, y).await.2];
    let out = store
        .commit(&[x1, y1, x2, send_point(x, "host-a", epoch, "x3", 3, now)])
        .await
        .unwrap();
    assert_eq!(
        out,
        vec![
            CommitOutcome::Committed,
            CommitOutcome::Fenced,
            CommitOutcome::Committed,
            CommitOutcome::Fenced,
        ]
    );
    let summary = |id: Uuid| {
        let store = store.clone();
        async move { store.instance_detail(id).await.unwrap().unwrap() }
    };
    let x_detail = summary(x).await;
    assert_eq!(
        x_detail.summary.step, "x2",
        "x's points are written in order, to x2"
    );
    let steps: Vec<_> = x_detail.history.iter().map(|h| h.step.clone()).collect();
    assert_eq!(steps, ["x1", "x2"]);
    let y_detail = summary(y).await;
    assert_eq!(
        y_detail.summary.step, "created",
        "the fenced point wrote nothing"
    );
    assert!(y_detail.history.is_empty());
    assert_eq!(
        db.count("SELECT COUNT(*) FROM outbox").await,
        2,
        "the fenced points (y1, x3) send nothing"
    );
    assert_eq!(start_message(&db, x).await.3, "consumed");
    assert_eq!(
        start_message(&db, y).await.3,
        "routed",
        "the fenced point consumed nothing"
    );
    let subscribed = "SELECT COUNT(*) FROM subscriptions WHERE CAST(instance_id AS TEXT) = $1";
    assert_eq!(db.count_with(subscribed, &x.to_string()).await, 1);
    assert_eq!(
        db.count_with(subscribed, &y.to_string()).await,
        0,
        "the fenced point subscribed to nothing"
    );
}

/// A group commit of many points is fenced point by point like a small one (G4): the SQLite
/// store fences a run of up to eight points in SQL, in the same round trip as its writes, and a
/// larger one by reading the fence first. Here twelve points, one of them under an old epoch:
/// that one consumes, sends and subscribes to nothing; the others do all three.
async fn a_large_group_commit_fences_each_point_too(db: TestDb) {
    use cairn::store::{CommitOutcome, SubscriptionRow};
    use cairn::Correlation;
    let now = chrono::Utc::now();
    let ids: Vec<Uuid> = (0..12).map(|_| Uuid::now_v7()).collect();
    let epoch = started_and_held(&db, &ids, now).await[0].epoch;
    let stale = ids[4];
    let mut points = Vec::new();
    for (n, id) in ids.iter().enumerate() {
        let mut point = send_point(*id, "host-a", epoch, &format!("p{n}"), 1, now);
        if *id == stale {
            point.epoch = epoch - 1;
        }
        point.consumed = vec![start_message(&db, *id).await.2];
        point.subscriptions = Some(vec![SubscriptionRow {
            id: Uuid::now_v7(),
            message_type: "approval.decision".into(),
            correlation: Correlation::on("request_id", format!("r{n}")),
        }]);
        points.push(point);
    }
    let out = db.store.commit(&points).await.unwrap();
    for (id, outcome) in ids.iter().zip(&out) {
        let expected = if *id == stale {
            CommitOutcome::Fenced
        } else {
            CommitOutcome::Committed
        };
        assert_eq!(*outcome, expected, "instance {id}");
    }
    for id in &ids {
        let written = i64::from(*id != stale);
        let rows = |table: &str| {
            format!("SELECT COUNT(*) FROM {table} WHERE CAST(instance_id AS TEXT) = $1")
        };
        let id_text = id.to_string();
        assert_eq!(db.count_with(&rows("outbox"), &id_text).await, written);
        assert_eq!(db.count_with(&rows("history"), &id_text).await, written);
        assert_eq!(
            db.count_with(&rows("subscriptions"), &id_text).await,
            written
        );
        let status = start_message(&db, *id).await.3;
        assert_eq!(status == "consumed", *id != stale, "{id}: {status}");
    }
}

/// A point that consumes a message not routed to its instance (here one an earlier point
/// consumed already) is a bug, not a race: its commit fails as corrupt and writes nothing, nor
/// does any point of its group (each commit is one transaction). Checked for a point on its
/// own, one in a group that also writes subscriptions, and one in a large group, which the
/// SQLite store writes three different ways (one script with its `COMMIT`, a script in a
/// transaction, and statements after a fence read first).
async fn a_point_consuming_a_message_not_routed_to_its_instance_fails_and_writes_nothing(
    db: TestDb,
) {
    use cairn::store::{StoreError, SubscriptionRow};
    use cairn::Correlation;
    let now = chrono::Utc::now();
    let ids: Vec<Uuid> = (0..12).map(|_| Uuid::now_v7()).collect();
    let epoch = started_and_held(&db, &ids, now).await[0].epoch;
    let twice = ids[0];
    let mut first = send_point(twice, "host-a", epoch, "first", 1, now);
    first.consumed = vec![start_message(&db, twice).await.2];
    db.store.commit(std::slice::from_ref(&first)).await.unwrap();
    let mut again = send_point(twice, "host-a", epoch, "again", 2, now);
    again.consumed = first.consumed.clone();
    let others = |n: usize| {
        let db = &db;
        let ids = &ids;
        async move {
            let mut points = Vec::new();
            for (k, id) in ids[1..=n].iter().enumerate() {
                let mut point = send_point(*id, "host-a", epoch, &format!("p{k}"), 1, now);
                point.consumed = vec![start_message(db, *id).await.2];
                point.subscriptions = Some(vec![SubscriptionRow {
                    id: Uuid::now_v7(),
                    message_type: "approval.decision".into(),
                    correlation: Correlation::on("request_id", format!("r{k}")),
                }]);
                points.push(point);
            }
            points
        }
    };
    let alone = vec![again.clone()];
    let mut subscribing = others(2).await;
    subscribing.push(again.clone());
    let mut large = others(11).await;
    large.push(again);
    for (shape, points) in [
        ("alone", alone),
        ("with subscriptions", subscribing),
        ("in a large group", large),
    ] {
        let err = db.store.commit(&points).await.unwrap_err();
        assert!(
            matches!(&err, StoreError::Corrupt(text) if text.contains("consumed twice")),
            "{shape}: {err}"
        );
        assert_eq!(
            db.count("SELECT COUNT(*) FROM history").await,
            1,
            "{shape}: no point of the group wrote history"
        );
        assert_eq!(db.count("SELECT COUNT(*) FROM outbox").await, 1, "{shape}");
        assert_eq!(
            db.count("SELECT COUNT(*) FROM subscriptions").await,
            0,
            "{shape}"
        );
        assert_eq!(
            db.count("SELECT COUNT(*) FROM messages WHERE status = 'consumed'")
                .await,
            1,
            "{shape}: no point of the group consumed its message"
        );
        let detail = db.store.instance_detail(twice).await.unwrap().unwrap();
        assert_eq!(detail.summary.step, "first", "{shape}");
    }
    // The store still writes after the failures.
    let next = send_point(twice, "host-a", epoch, "next", 2, now);
    db.store.commit(&[next]).await.unwrap();
    assert_eq!(db.count("SELECT COUNT(*) FROM history").await, 2);
}

/// A point that gives up its instance (dehydration) releases what the host held for it: the
/// messages it claimed and did not consume go back uncounted (the claim was no failed
/// delivery), one whose delivery failed the instance keeps its count (poison protection), its
/// timers are unlocked; a message the same point consumes is consumed, not released.
async fn a_point_giving_up_its_instance_releases_what_it_held_and_consumes_the_rest(db: TestDb) {
    let now = chrono::Utc::now();
    let x = Uuid::now_v7();
    let epoch = started_and_held(&db, &[x], now).await[0].epoch;
    // Three more messages for x, claimed by the host (locked, delivered once), and a timer.
    for id in ["kept", "failed", "consumed"] {
        sqlx::query(
            "INSERT INTO messages (id, message_type, kind, properties, body, status, \
             instance_id, published_at, locked_by, delivery_count) \
             SELECT $1, 't.item', 'published', properties, body, 'routed', instance_id, \
             published_at, 'host-a', 1 FROM messages WHERE kind = 'start' \
             AND CAST(instance_id AS TEXT) = $2",
        )
        .bind(id)
        .bind(x.to_string())
        .execute(&db.sql)
        .await
        .unwrap();
    }
    sqlx::query(
        "INSERT INTO timers (instance_id, name, due_at, locked_by) SELECT instance_id, \
         'reminder', published_at, 'host-a' FROM messages WHERE id = 'kept'",
    )
    .execute(&db.sql)
    .await
    .unwrap();
    let seq = |id: &'static str| {
        let db = &db;
        async move {
            sqlx::query_scalar::<_, i64>("SELECT seq FROM messages WHERE id = $1")
                .bind(id)
                .fetch_one(&db.sql)
                .await
                .unwrap()
        }
    };
    let mut point = send_point(x, "host-a", epoch, "saved", 1, now);
    point.outbox.clear();
    point.status = InstanceStatus::Dehydrated;
    point.reason = cairn::store::Reason::Dehydrate;
    point.release = true;
    point.consumed = vec![seq("consumed").await];
    point.failed = vec![seq("failed").await];
    let out = db.store.commit(&[point]).await.unwrap();
    assert_eq!(out, [cairn::store::CommitOutcome::Committed]);
    let message = |id: &'static str| {
        let db = &db;
        async move {
            sqlx::query_as::<_, (String, Option<String>, i32)>(
                "SELECT status, locked_by, delivery_count FROM messages WHERE id = $1",
            )
            .bind(id)
            .fetch_one(&db.sql)
            .await
            .unwrap()
        }
    };
    assert_eq!(message("kept").await, ("routed".into(), None, 0));
    assert_eq!(message("failed").await, ("routed".into(), None, 1));
    assert_eq!(message("consumed").await, ("consumed".into(), None, 1));
    let timer_lock: Option<String> = sqlx::query_scalar("SELECT locked_by FROM timers")
        .fetch_one(&db.sql)
        .await
        .unwrap();
    assert_eq!(timer_lock, None);
    let detail = db.store.instance_detail(x).await.unwrap().unwrap();
    assert_eq!(detail.summary.status, InstanceStatus::Dehydrated);
}

/// A reply the holder took in memory, for a request another host delivered too (its lock on the
/// outbox row had run out): that host marks the request delivered and stores a copy of the reply
/// for the instance in one transaction. The holder's point marks the same request delivered and
/// must consume the copy (G1: nothing left routed to a completed instance), also when the other
/// transaction commits while the point waits for its lock on the outbox row.
async fn a_point_consumes_the_reply_copy_another_host_stored_while_the_point_waited(db: TestDb) {
    use cairn::store::CommitOutcome;
    let now = chrono::Utc::now();
    let x = Uuid::now_v7();
    let epoch = started_and_held(&db, &[x], now).await[0].epoch;
    let sent = db
        .store
        .commit(&[send_point(x, "host-a", epoch, "x1", 1, now)])
        .await
        .unwrap();
    assert_eq!(sent, [CommitOutcome::Committed]);
    // The other host's delivery, held open.
    let mut other = db.sql.begin().await.unwrap();
    sqlx::query("UPDATE outbox SET status = 'delivered' WHERE id = 'send-x1'")
        .execute(&mut *other)
        .await
        .unwrap();
    sqlx::query(
        "INSERT INTO messages (id, message_type, kind, properties, body, status, instance_id, \
         published_at) SELECT 'send-x1:reply', 't.reply', 'reply', properties, body, 'routed', \
         instance_id, published_at FROM messages WHERE kind = 'start' \
         AND CAST(instance_id AS TEXT) = $1",
    )
    .bind(x.to_string())
    .execute(&mut *other)
    .await
    .unwrap();
    let mut took_reply = send_point(x, "host-a", epoch, "x2", 2, now);
    took_reply.delivered = vec!["send-x1".into()];
    let store = db.store.clone();
    let point = tokio::spawn(async move { store.commit(&[took_reply]).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !point.is_finished(),
        "the point waits for the other host's transaction"
    );
    other.commit().await.unwrap();
    assert_eq!(point.await.unwrap().unwrap(), [CommitOutcome::Committed]);
    assert_eq!(
        db.count_with(
            "SELECT COUNT(*) FROM messages WHERE id = 'send-x1:reply' AND status = 'consumed' \
             AND CAST(instance_id AS TEXT) = $1",
            &x.to_string()
        )
        .await,
        1,
        "the copy of the reply is consumed"
    );
}

/// `Store::unlock` (a host giving back what it claimed but will not run): its locks are released
/// and their claims given back uncounted, except the messages whose delivery failed, which keep
/// their count (poison protection); another host's locks stay.
async fn unlocking_gives_back_what_the_host_holds_and_leaves_other_hosts_locks(db: TestDb) {
    let store = db.store.clone();
    let now = chrono::Utc::now();
    let (x, y, z) = (Uuid::now_v7(), Uuid::now_v7(), Uuid::now_v7());
    store
        .start_instances(vec![approval(x), approval(y), approval(z)], None, now)
        .await
        .unwrap();
    let claimed = store.claim_messages("host-a", now, 10).await.unwrap();
    assert_eq!(claimed.len(), 3);
    let seq_of = |id| claimed.iter().find(|m| m.instance_id == id).unwrap().seq;
    // y's start message is another host's now (it took the claim over).
    let moved = sqlx::query("UPDATE messages SET locked_by = 'host-b' WHERE seq = $1")
        .bind(seq_of(y))
        .execute(&db.sql)
        .await
        .unwrap();
    assert_eq!(moved.rows_affected(), 1);
    store
        .unlock("host-a", &[x, y, z], &[seq_of(z)])
        .await
        .unwrap();
    let state = |id: Uuid| {
        let sql = db.sql.clone();
        async move {
            sqlx::query_as::<_, (Option<String>, i32)>(
                "SELECT locked_by, delivery_count FROM messages WHERE CAST(instance_id AS TEXT) = $1",
            )
            .bind(id.to_string())
            .fetch_one(&sql)
            .await
            .unwrap()
        }
    };
    assert_eq!(
        state(x).await,
        (None, 0),
        "x: released, its claim given back"
    );
    assert_eq!(
        state(y).await,
        (Some("host-b".to_owned()), 1),
        "y: another host's lock stays"
    );
    assert_eq!(
        state(z).await,
        (None, 1),
        "z: released, its failed delivery counted"
    );
}

/// A receive cancelled while a message routed to it waits unconsumed (a Listen decided by its
/// other branch): the message goes back to unrouted and is routed again, here to another
/// instance that waits for the same values. Fails if a point's removed subscriptions do not
/// route their messages again.
async fn a_message_of_a_cancelled_receive_is_routed_again(db: TestDb) {
    use cairn::store::SubscriptionRow;
    use cairn::Correlation;
    let store = db.store.clone();
    let now = chrono::Utc::now();
    let (x, y) = (Uuid::now_v7(), Uuid::now_v7());
    let held = started_and_held(&db, &[x, y], now).await;
    let epoch = |id| held.iter().find(|r| r.id == id).unwrap().epoch;
    let waiting = |id, seq, receives: usize| {
        let mut p = send_point(id, "host-a", epoch(id), "waiting", seq, now);
        p.outbox.clear();
        p.subscriptions = Some(
            (0..receives)
                .map(|_| SubscriptionRow {
                    id: Uuid::now_v7(),
                    message_type: "approval.decision".into(),
                    correlation: Correlation::on("request_id", "r1"),
                })
                .collect(),
        );
        p
    };
    let routed_to = |id: Uuid| {
        format!(
            "SELECT COUNT(*) FROM messages WHERE id = 'd1' AND status = 'routed' \
             AND CAST(instance_id AS TEXT) = '{id}'"
        )
    };
    // x waits for the decision on r1 and gets it: routed to x, not consumed yet.
    store.commit(&[waiting(x, 1, 1)]).await.unwrap();
    let properties = BTreeMap::from([("request_id".to_owned(), "r1".to_owned())]);
    let decision = NewMessage::published("d1", "approval.decision", json!({}), properties);
    assert_eq!(
        store.publish(vec![decision], now).await.unwrap(),
        [PublishOutcome::Routed(x)]
    );
    // y waits for the same decision: the message stays with x.
    store.commit(&[waiting(y, 1, 1)]).await.unwrap();
    assert_eq!(db.count(&routed_to(x)).await, 1);
    // x's receive is cancelled: the message goes to y.
    store.commit(&[waiting(x, 2, 0)]).await.unwrap();
    assert_eq!(db.count(&routed_to(y)).await, 1);
}

/// `Store::subscribe` (receives an instance declares between points, written at once): the
/// holder's are written and route the messages that waited for them; those of a writer whose
/// epoch moved are fenced and write nothing.
async fn receives_declared_between_points_are_fenced_like_points(db: TestDb) {
    use cairn::store::{CommitOutcome, NewReceives, SubscriptionRow};
    use cairn::Correlation;
    let now = chrono::Utc::now();
    let (x, y) = (Uuid::now_v7(), Uuid::now_v7());
    let held = started_and_held(&db, &[x, y], now).await;
    let epoch = |id| held.iter().find(|r| r.id == id).unwrap().epoch;
    let receives = |id: Uuid, epoch: i64, value: &str| NewReceives {
        instance_id: id,
        epoch,
        rows: vec![SubscriptionRow {
            id: Uuid::now_v7(),
            message_type: "approval.decision".into(),
            correlation: Correlation::on("request_id", value),
        }],
    };
    let decision = |id: &str, value: &str| {
        let properties = BTreeMap::from([("request_id".to_owned(), value.to_owned())]);
        NewMessage::published(id, "approval.decision", json!({}), properties)
    };
    // Both decisions are published before anyone waits for them: unrouted.
    let outcomes = db
        .store
        .publish(vec![decision("dx", "rx"), decision("dy", "ry")], now)
        .await
        .unwrap();
    assert!(outcomes
        .iter()
        .all(|o| matches!(o, PublishOutcome::Unrouted)));
    let out = db
        .store
        .subscribe(
            "host-a",
            &[receives(x, epoch(x), "rx"), receives(y, epoch(y) - 1, "ry")],
            now,
        )
        .await
        .unwrap();
    assert_eq!(out, [CommitOutcome::Committed, CommitOutcome::Fenced]);
    let routed_to = |message: &str, id: Uuid| {
        format!(
            "SELECT COUNT(*) FROM messages WHERE id = '{message}' AND status = 'routed' \
             AND CAST(instance_id AS TEXT) = '{id}'"
        )
    };
    assert_eq!(db.count(&routed_to("dx", x)).await, 1);
    assert_eq!(
        db.count(&format!(
            "SELECT COUNT(*) FROM subscriptions WHERE CAST(instance_id AS TEXT) = '{y}'"
        ))
        .await,
        0
    );
    assert_eq!(
        db.count("SELECT COUNT(*) FROM messages WHERE id = 'dy' AND status = 'unrouted'")
            .await,
        1
    );
}

/// Timers in a group commit: each instance's cancellations go before its new due times (a timer
/// fired and set again in one point stays, at its new time), and instances' timers do not mix.
/// Fails if a group's timers are deleted after they are set, or written to the wrong instance.
async fn a_group_commit_cancels_re_arms_and_sets_each_instances_timers(db: TestDb) {
    let now = chrono::Utc::now();
    let at = |s: i64| now + chrono::Duration::seconds(s);
    let (x, y) = (Uuid::now_v7(), Uuid::now_v7());
    let held = started_and_held(&db, &[x, y], now).await;
    let epoch = |id| held.iter().find(|r| r.id == id).unwrap().epoch;
    let point = |id, seq, cancel: &[&str], set: &[(&str, i64)]| {
        let mut p = send_point(id, "host-a", epoch(id), "timers", seq, now);
        p.outbox.clear();
        p.cancel_timers = cancel.iter().map(|n| n.to_string()).collect();
        p.set_timers = set.iter().map(|(n, s)| (n.to_string(), at(*s))).collect();
        p
    };
    db.store
        .commit(&[
            point(x, 1, &[], &[("t1", 10), ("t2", 20)]),
            point(y, 1, &[], &[("t1", 30)]),
        ])
        .await
        .unwrap();
    // x's t1 fired and is set again for later; its t2 is cancelled.
    db.store
        .commit(&[
            point(x, 2, &["t1", "t2"], &[("t1", 40)]),
            point(y, 2, &[], &[]),
        ])
        .await
        .unwrap();
    let due = |s| {
        let store = db.store.clone();
        async move {
            store
                .claim_timers("host-a", at(s), 10)
                .await
                .unwrap()
                .into_iter()
                .map(|t| (t.instance_id, t.name))
                .collect::<Vec<_>>()
        }
    };
    assert_eq!(due(35).await, [(y, "t1".to_owned())]);
    assert_eq!(due(45).await, [(x, "t1".to_owned())]);
}

/// The row of instance `id`'s start message: `(locked_by, delivery_count, seq, status)`.
async fn start_message(db: &TestDb, id: Uuid) -> (Option<String>, i32, i64, String) {
    sqlx::query_as(
        "SELECT locked_by, delivery_count, seq, status FROM messages \
         WHERE kind = 'start' AND CAST(instance_id AS TEXT) = $1",
    )
    .bind(id.to_string())
    .fetch_one(&db.sql)
    .await
    .unwrap()
}

/// An eager start (a host's own client starting instances, G3 and G4): the start transaction
/// leases each instance to the host and claims its start message for it, as acquiring and
/// claiming would. While the lease holds, no host claims or acquires them, the holder included
/// (it has them). Once the holder is gone and its lease has run out, another host claims the
/// start messages and acquires the instances with a newer epoch, and the holder's points are
/// fenced.
async fn an_eager_start_is_held_by_its_host_until_its_lease_runs_out(db: TestDb) {
    use cairn::store::{CommitOutcome, Holder, MessageKind, FIRST_EPOCH};
    let store = db.store.clone();
    let now = chrono::Utc::now();
    let (x, y) = (Uuid::now_v7(), Uuid::now_v7());
    let holder = Holder {
        host: "host-a",
        lease_until: now + chrono::Duration::seconds(2),
    };
    let held = store
        .start_instances(vec![approval(x), approval(y)], Some(holder), now)
        .await
        .unwrap();
    assert_eq!(held.len(), 2);
    for (h, id) in held.iter().zip([x, y]) {
        assert_eq!((h.record.id, h.record.epoch), (id, FIRST_EPOCH));
        assert_eq!(h.record.status, InstanceStatus::Running);
        assert_eq!(
            (h.message.instance_id, h.message.kind),
            (id, MessageKind::Start)
        );
        assert_eq!(h.message.body, json!({}));
        let row: (Option<String>, i64) =
            sqlx::query_as("SELECT owner, epoch FROM instances WHERE CAST(id AS TEXT) = $1")
                .bind(id.to_string())
                .fetch_one(&db.sql)
                .await
                .unwrap();
        assert_eq!(row, (Some("host-a".to_owned()), FIRST_EPOCH));
        assert_eq!(
            start_message(&db, id).await,
            (
                Some("host-a".to_owned()),
                1,
                h.message.seq,
                "routed".to_owned()
            ),
            "the start message is claimed by the holder, once"
        );
    }
    assert!(store
        .claim_messages("host-a", now, 10)
        .await
        .unwrap()
        .is_empty());
    assert!(store
        .claim_messages("host-b", now, 10)
        .await
        .unwrap()
        .is_empty());
    let lease = now + chrono::Duration::seconds(30);
    assert!(store
        .acquire("host-b", &[x, y], now, lease)
        .await
        .unwrap()
        .is_empty());

    // host-a is gone and its lease ran out; host-b starts (on SQLite its recovery releases what
    // the last host held; on PostgreSQL the locks of a host with no heartbeat are stale).
    let later = now + chrono::Duration::seconds(3);
    store.recover("host-b", later).await.unwrap();
    let claimed = store.claim_messages("host-b", later, 10).await.unwrap();
    let seqs = |m: &[cairn::store::StoredMessage]| m.iter().map(|m| m.seq).collect::<Vec<_>>();
    let held_messages: Vec<_> = held.iter().map(|h| h.message.clone()).collect();
    assert_eq!(seqs(&claimed), seqs(&held_messages));
    assert!(claimed.iter().all(|m| m.delivery_count == 2));
    let lease = later + chrono::Duration::seconds(30);
    let taken = store
        .acquire("host-b", &[x, y], later, lease)
        .await
        .unwrap();
    assert_eq!(taken.len(), 2);
    assert!(taken.iter().all(|r| r.epoch > FIRST_EPOCH));
    let out = store
        .commit(&[send_point(x, "host-a", FIRST_EPOCH, "zombie", 1, later)])
        .await
        .unwrap();
    assert_eq!(out, vec![CommitOutcome::Fenced]);
    assert_eq!(db.count("SELECT COUNT(*) FROM outbox").await, 0);
}

/// A host crashes after its client started an instance and before the instance's first
/// persistence point (G1, G3). The instance's first transition only waits, so it makes no point:
/// the start is written on its own, held by the host, and the next host runs the instance from
/// its start message, delivered a second time, and then the message it had received.
async fn an_eager_start_survives_its_hosts_crash_before_the_first_point(db: TestDb) {
    use cairn::store::faulty::CrashPoint;
    let plan = FaultPlan::new();
    let deliveries = Deliveries::default();
    let (host, client) =
        HostThread::start_with(&db, fast_config(), deliveries.clone(), Some(plan.clone())).await;
    // A first instance's first point: the host runs, so it takes what its client starts.
    client
        .start("approval", json!({"request_id": "r8", "approver": "bob"}))
        .await
        .unwrap();
    db.wait_for("the first instance's first point", WAIT, || async {
        db.count("SELECT COUNT(*) FROM history").await == 1
    })
    .await;
    let id = client.start("panicker", json!("k9")).await.unwrap();
    db.wait_for("the waiting instance's receives", WAIT, || async {
        db.count_with(
            "SELECT COUNT(*) FROM subscriptions WHERE CAST(instance_id AS TEXT) = $1",
            &id.to_string(),
        )
        .await
            == 2
    })
    .await;
    plan.crash_at_commit(1, CrashPoint::BeforeCommit);
    publish(&client, "fine9", "fine", json!({"key": "k9"})).await;
    tokio::time::timeout(WAIT, plan.crashed())
        .await
        .expect("the first point was attempted");
    host.crash();
    assert_eq!(db.count("SELECT COUNT(*) FROM history").await, 1);
    let (locked_by, count, _, status) = start_message(&db, id).await;
    assert!(locked_by.is_some(), "held by the crashed host");
    assert_eq!((count, status.as_str()), (1, "routed"));

    let (host, _client) = HostThread::start(&db, fast_config(), deliveries.clone()).await;
    db.wait_status(id, InstanceStatus::Completed, WAIT).await;
    let (_, count, _, status) = start_message(&db, id).await;
    assert_eq!((count, status.as_str()), (2, "consumed"));
    host.stop();
}

/// An eager start whose first transition makes a point is written with that point, in one
/// commit (G1, G2, G3). A host that crashes before that commit leaves no trace of the instance
/// (and its client's `start` never returned); one that crashes after it leaves the instance
/// at its first point, its start message consumed and its send pending, and the next host
/// delivers the send and runs the instance on.
async fn an_eager_start_is_written_with_its_first_point_in_one_commit(db: TestDb) {
    use cairn::store::faulty::CrashPoint;
    let deliveries = Deliveries::default();
    let mut ids = Vec::new();
    for (n, crash) in [(1, CrashPoint::BeforeCommit), (2, CrashPoint::AfterCommit)] {
        let plan = FaultPlan::new();
        let (host, client) =
            HostThread::start_with(&db, fast_config(), deliveries.clone(), Some(plan.clone()))
                .await;
        // A first start, so that the host runs and takes what its client starts.
        let running = format!("run{n}");
        ids.push(
            client
                .start(
                    "approval",
                    json!({"request_id": running, "approver": "bob"}),
                )
                .await
                .unwrap(),
        );
        db.wait_for("the first start's request sent", WAIT, || async {
            deliveries.ids().len() == ids.len()
        })
        .await;
        plan.crash_at_commit(1, crash);
        let crashing = tokio::spawn(async move {
            let request = json!({"request_id": format!("crash{n}"), "approver": "bob"});
            client.start("approval", request).await
        });
        tokio::time::timeout(WAIT, plan.crashed())
            .await
            .expect("the start was attempted");
        host.crash();
        crashing.abort();
        assert!(
            crashing.await.unwrap_err().is_cancelled(),
            "start never returned"
        );
    }
    let starts = "SELECT COUNT(*) FROM messages WHERE kind = 'start' AND body LIKE $1";
    assert_eq!(
        db.count_with(starts, "%crash1%").await,
        0,
        "no trace before the commit"
    );
    assert_eq!(db.count("SELECT COUNT(*) FROM instances").await, 3);
    assert_eq!(db.count_with(starts, "%crash2%").await, 1);
    let crashed: Vec<String> = db
        .texts(
            "SELECT CAST(instance_id AS TEXT) FROM messages WHERE kind = 'start' AND body LIKE $1",
            "%crash2%",
        )
        .await;
    let crashed = crashed[0].clone();
    assert_eq!(
        start_message(&db, crashed.parse().unwrap()).await.3,
        "consumed"
    );
    for (table, rows) in [("history", 1), ("outbox", 1)] {
        let query = format!("SELECT COUNT(*) FROM {table} WHERE CAST(instance_id AS TEXT) = $1");
        assert_eq!(db.count_with(&query, &crashed).await, rows, "{table}");
    }
    assert!(!deliveries
        .bodies("notifications")
        .iter()
        .any(|b| b["request_id"] == "crash2"));

    let (host, client) = HostThread::start(&db, fast_config(), deliveries.clone()).await;
    db.wait_for("the crashed start's request sent", WAIT, || async {
        deliveries
            .bodies("notifications")
            .iter()
            .any(|b| b["request_id"] == "crash2")
    })
    .await;
    for request in ["run1", "run2", "crash2"] {
        let decision = json!({"request_id": request, "approved": true, "by": "bob"});
        publish(
            &client,
            &format!("d-{request}"),
            "approval.decision",
            decision,
        )
        .await;
    }
    for id in ids.iter().copied().chain([crashed.parse().unwrap()]) {
        db.wait_status(id, InstanceStatus::Completed, WAIT).await;
    }
    host.stop();
}

/// A first transition that panics in a host's own client loses nothing and stops nothing:
/// `start` returns once the start is stored (G1), the host runs the transition again as any
/// delivery until the start message is suspended as poison, and the client and host go on.
async fn an_eager_start_whose_first_transition_panics_is_stored_and_suspended_as_poison(
    db: TestDb,
) {
    let config = cairn::HostConfig {
        max_deliveries: 3,
        ..fast_config()
    };
    let deliveries = Deliveries::default();
    let (host, client) = HostThread::start(&db, config, deliveries.clone()).await;
    // A first instance's first point: the host runs, so it takes what its client starts.
    client
        .start("approval", json!({"request_id": "p1", "approver": "bob"}))
        .await
        .unwrap();
    db.wait_for("the first instance's first point", WAIT, || async {
        db.count("SELECT COUNT(*) FROM history").await == 1
    })
    .await;
    let key = format!("panic-at-start-{}", Uuid::new_v4());
    let id = client.start("panicker", json!(key)).await.unwrap();
    assert_eq!(
        db.count_with(
            "SELECT COUNT(*) FROM instances WHERE CAST(id AS TEXT) = $1",
            &id.to_string()
        )
        .await,
        1,
        "stored when start returned"
    );
    db.wait_status(id, InstanceStatus::Suspended, WAIT).await;
    let summary = &db.store.instance_summaries(&[id]).await.unwrap()[0];
    let error = summary.last_error.clone().unwrap_or_default();
    assert!(
        error.contains("poison message") && error.contains("always panics"),
        "{error}"
    );
    // Once in the client, then in the host for each of the three deliveries allowed.
    assert_eq!(support::fixtures::panics(&key), 4);
    let (_, _, _, status) = start_message(&db, id).await;
    assert_eq!(status, "routed", "kept, to run again once resumed");

    let after = client
        .start("approval", json!({"request_id": "p2", "approver": "bob"}))
        .await
        .unwrap();
    db.wait_for("the next start's request sent", WAIT, || async {
        deliveries
            .bodies("notifications")
            .iter()
            .any(|b| b["request_id"] == "p2")
    })
    .await;
    assert_eq!(db.status(after).await, Some(InstanceStatus::Running));
    host.stop();
}

/// A host's own client hands its starts to the host only while it runs and no more than its
/// eager backlog would wait for it (memory stays bounded when a client starts faster than the
/// host runs): otherwise instances are stored for any host to claim, and they all run.
async fn a_hosts_client_leaves_starts_to_claims_once_its_backlog_waits(db: TestDb) {
    use support::fixtures::{ports, registry};
    let config = cairn::HostConfig {
        batch_size: 2,
        eager_backlog: 2,
        ..fast_config()
    };
    let plan = FaultPlan::new();
    let store = std::sync::Arc::new(cairn::store::faulty::FaultyStore::new(
        db.store.clone(),
        plan.clone(),
    ));
    let host = cairn::Host::new(store, registry(), cairn::Ports::new()).with_config(config);
    let host_id = host.id().to_owned();
    let client = host.client();
    let host = host.with_ports(ports(client.clone(), Deliveries::default()));
    let request = |n: u32| json!({"request_id": format!("w{n}"), "approver": "eve"});
    let owner = |id: Uuid| {
        let sql = db.sql.clone();
        async move {
            sqlx::query_scalar::<_, Option<String>>(
                "SELECT owner FROM instances WHERE CAST(id AS TEXT) = $1",
            )
            .bind(id.to_string())
            .fetch_one(&sql)
            .await
            .unwrap()
        }
    };
    // Not running yet: left to the claims.
    let before = client.start("approval", request(0)).await.unwrap();
    assert_eq!(owner(before).await, None);

    let stop = tokio_util::sync::CancellationToken::new();
    let running = tokio::spawn(host.run(stop.clone()));
    db.wait_status(before, InstanceStatus::Running, WAIT).await;
    db.wait_for("the first point", WAIT, || async { plan.commits() >= 1 })
        .await;
    // The host retries failing commits for seconds, taking no starts meanwhile. Three at once
    // are not handed over (more than the backlog of two), the next two are (none waited), the one
    // after is not (two wait). The client's own commits of first points fail too (one each),
    // and it writes those instances held instead; the host's first attempt is the third commit.
    plan.fail_next_commits(6);
    let first = client.start("approval", request(1)).await.unwrap();
    db.wait_for("the host busy committing", WAIT, || async {
        plan.commits() >= 3
    })
    .await;
    let many = |from: u32, to: u32| {
        (from..=to)
            .map(|n| ("approval".to_owned(), request(n)))
            .collect()
    };
    let mut shared = client.start_many(many(2, 4)).await.unwrap();
    let eager = client.start_many(many(5, 6)).await.unwrap();
    shared.push(client.start("approval", request(7)).await.unwrap());
    for id in eager.iter().chain([&first]) {
        assert_eq!(owner(*id).await.as_deref(), Some(host_id.as_str()));
    }
    for id in &shared {
        assert_eq!(owner(*id).await, None, "left to the claims");
        assert_eq!(start_message(&db, *id).await.0, None);
    }

    for n in 0..=7 {
        let decision = json!({"request_id": format!("w{n}"), "approved": true, "by": "eve"});
        publish(&client, &format!("wd{n}"), "approval.decision", decision).await;
    }
    for id in [before, first].iter().chain(&eager).chain(&shared) {
        db.wait_status(*id, InstanceStatus::Completed, WAIT).await;
    }
    stop.cancel();
    running.await.unwrap().unwrap();
}

/// An instance's first point written with its start (an eager start; G1, G4, G5): one commit
/// stores the instance, held by the point's host under the first epoch, its start message
/// consumed, and everything the point writes, whether the point is small (one round trip) or
/// writes more (a subscription and a timer, through a transaction). A second copy of the point
/// fails and writes nothing, and the instance's next points are fenced as any other's.
async fn a_first_point_writes_its_instance_with_its_start(db: TestDb) {
    use cairn::store::{CommitOutcome, FirstPoint, SubscriptionRow, FIRST_EPOCH};
    use cairn::Correlation;
    let store = db.store.clone();
    let now = chrono::Utc::now();
    let lease_until = now + chrono::Duration::seconds(30);
    let first = |id: Uuid, step: &str| {
        let mut point = send_point(id, "host-a", FIRST_EPOCH, step, 1, now);
        point.subscriptions = Some(vec![]);
        point.start = Some(Box::new(FirstPoint {
            instance: NewInstance {
                input: json!({"request_id": step}),
                ..approval(id)
            },
            lease_until,
        }));
        point
    };
    let (x, y) = (Uuid::now_v7(), Uuid::now_v7());
    let small = first(x, "x1");
    let mut large = first(y, "y1");
    large.subscriptions = Some(vec![SubscriptionRow {
        id: Uuid::now_v7(),
        message_type: "approval.decision".into(),
        correlation: Correlation::on("request_id", "y1"),
    }]);
    large.set_timers = vec![("reminder".into(), now + chrono::Duration::hours(1))];
    for point in [&small, &large] {
        let out = store.commit(std::slice::from_ref(point)).await.unwrap();
        assert_eq!(out, vec![CommitOutcome::Committed]);
    }
    for (id, step) in [(x, "x1"), (y, "y1")] {
        let id = id.to_string();
        let instance = "SELECT COUNT(*) FROM instances WHERE CAST(id AS TEXT) = $1 \
            AND status = 'running' AND owner = 'host-a' AND epoch = 1 AND history_seq = 1 \
            AND lease_expires_at IS NOT NULL AND orchestration = 'approval'";
        assert_eq!(
            db.count_with(instance, &id).await,
            1,
            "{step}: the instance, held"
        );
        assert_eq!(
            db.texts(
                "SELECT step FROM instances WHERE CAST(id AS TEXT) = $1",
                &id
            )
            .await,
            [step]
        );
        let start = "SELECT COUNT(*) FROM messages WHERE CAST(instance_id AS TEXT) = $1 \
            AND kind = 'start' AND status = 'consumed' AND locked_by IS NULL \
            AND delivery_count = 1 AND consumed_at IS NOT NULL";
        assert_eq!(
            db.count_with(start, &id).await,
            1,
            "{step}: its start, consumed"
        );
        assert_eq!(
            db.texts(
                "SELECT body FROM messages WHERE CAST(instance_id AS TEXT) = $1",
                &id
            )
            .await
            .iter()
            .map(|b| serde_json::from_str::<serde_json::Value>(b).unwrap())
            .collect::<Vec<_>>(),
            [json!({"request_id": step})]
        );
        let history = "SELECT COUNT(*) FROM history WHERE CAST(instance_id AS TEXT) = $1 \
            AND seq = 1 AND reason = 'send' AND epoch = 1";
        assert_eq!(db.count_with(history, &id).await, 1, "{step}: its history");
        let sent = "SELECT COUNT(*) FROM outbox WHERE CAST(instance_id AS TEXT) = $1 \
            AND status = 'pending' AND locked_by = 'host-a'";
        assert_eq!(db.count_with(sent, &id).await, 1, "{step}: its send");
    }
    assert_eq!(
        db.count("SELECT COUNT(*) FROM subscriptions WHERE instance_id IS NOT NULL")
            .await,
        1
    );
    assert_eq!(db.count("SELECT COUNT(*) FROM timers").await, 1);
    assert!(store
        .claim_messages("host-b", now, 10)
        .await
        .unwrap()
        .is_empty());

    // The same first point again: the instance is stored, so it fails and writes nothing.
    for point in [&small, &large] {
        let mut again = point.clone();
        again.outbox[0].id.push_str("-again");
        assert!(store.commit(&[again]).await.is_err());
    }
    for (table, rows) in [
        ("instances", 2),
        ("messages", 2),
        ("outbox", 2),
        ("history", 2),
    ] {
        assert_eq!(
            db.count(&format!("SELECT COUNT(*) FROM {table}")).await,
            rows,
            "{table}"
        );
    }
    // The instance's next point is fenced like any other's.
    let later = now + chrono::Duration::seconds(1);
    let out = store
        .commit(&[
            send_point(x, "host-a", FIRST_EPOCH, "x2", 2, later),
            send_point(y, "host-b", FIRST_EPOCH, "y2", 2, later),
        ])
        .await
        .unwrap();
    assert_eq!(out, vec![CommitOutcome::Committed, CommitOutcome::Fenced]);
    assert_eq!(db.count("SELECT COUNT(*) FROM history").await, 3);
}
