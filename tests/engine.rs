//! Behavioural tests of the engine, each run on SQLite and on PostgreSQL.

#![allow(clippy::unwrap_used)] // tests may unwrap: a panic is a failed test

mod support;

use std::collections::BTreeMap;
use std::time::Duration;

use cairn::store::faulty::FaultPlan;
use cairn::store::{ControlAction, InstanceStatus, NewInstance, NewMessage, PublishOutcome};
use cairn::Client;
use serde_json::json;
use support::fixtures::{fast_config, items_seen, Deliveries, HostThread};
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
    a_commit_whose_reply_was_lost_is_retried_without_refusing_it,
    commits_failing_beyond_retries_resume_from_the_last_point,
    the_host_loop_runs_the_next_transitions_while_a_group_commit_is_on_disk,
    bad_input_becomes_a_queryable_record_and_the_host_keeps_going,
    shutdown_saves_instances_that_consumed_messages_since_their_last_point,
    operators_suspend_resume_and_terminate_instances,
    idle_instances_dehydrate_and_rehydrate_on_their_next_message,
    an_eager_start_survives_its_hosts_crash_before_the_first_point,
    a_hosts_client_leaves_starts_to_claims_once_its_backlog_waits,
    an_eager_start_is_written_with_its_first_point_in_one_commit,
    an_eager_start_whose_first_transition_panics_is_stored_and_suspended_as_poison,
    a_fault_before_the_first_point_shows_the_step_the_last_transition_reached,
    the_start_transition_sees_the_activating_message_or_the_start,
);

/// Issue 25, point 3: the start transition sees what started it beside its input. Activated by a
/// published message: its type, id, properties (set and promoted) and received time. Started
/// through a client (the host's, run eagerly, and a plain one, claimed by the host): the start's
/// id `<instance id>:start` and type `start-probe.start`.
async fn the_start_transition_sees_the_activating_message_or_the_start(db: TestDb) {
    let (host, client) = HostThread::start(&db, fast_config(), Deliveries::default()).await;
    let (_, outcome) = client
        .publish(
            "probe.activate",
            json!({"order_id": "o-3", "amount": 12}),
            Some("activation-1".into()),
            BTreeMap::from([("region".to_owned(), "eu".to_owned())]),
        )
        .await
        .unwrap();
    let activated = routed(outcome);
    db.wait_status(activated, InstanceStatus::Completed, WAIT)
        .await;
    let output = output_of(&db, activated).await;
    let started_by = &output["started_by"];
    assert_eq!(output["input"], json!({"order_id": "o-3", "amount": 12}));
    assert_eq!(started_by["id"], "activation-1");
    assert_eq!(started_by["message_type"], "probe.activate");
    assert_eq!(started_by["by_message"], true);
    assert_eq!(
        started_by["properties"],
        json!({"region": "eu", "order_id": "o-3", "amount": "12"})
    );
    let published_at = db
        .texts(
            "SELECT CAST(published_at AS TEXT) FROM messages WHERE id = $1",
            "activation-1",
        )
        .await;
    let received: chrono::DateTime<chrono::Utc> =
        serde_json::from_value(started_by["received_at"].clone()).unwrap();
    let stored = chrono::DateTime::parse_from_rfc3339(&published_at[0].replace(' ', "T"))
        .map(|t| t.with_timezone(&chrono::Utc))
        .or_else(|_| {
            chrono::DateTime::parse_from_str(&published_at[0], "%Y-%m-%d %H:%M:%S%.f%#z")
                .map(|t| t.with_timezone(&chrono::Utc))
        })
        .unwrap_or_else(|e| panic!("{published_at:?}: {e}"));
    assert_eq!(received.timestamp_millis(), stored.timestamp_millis());

    let plain = Client::new(db.store.clone(), support::fixtures::registry());
    for client in [client, plain] {
        let id = client.start("start-probe", json!({"n": 1})).await.unwrap();
        db.wait_status(id, InstanceStatus::Completed, WAIT).await;
        let output = output_of(&db, id).await;
        assert_eq!(output["input"], json!({"n": 1}));
        assert_eq!(output["started_by"]["id"], format!("{id}:start"));
        assert_eq!(output["started_by"]["message_type"], "start-probe.start");
        assert_eq!(output["started_by"]["by_message"], false);
        assert_eq!(output["started_by"]["properties"], json!({}));
    }
    host.stop();
}

async fn output_of(db: &TestDb, id: Uuid) -> serde_json::Value {
    db.store
        .instance_detail(id)
        .await
        .unwrap()
        .unwrap()
        .output
        .unwrap()
}

/// Issue 25, point 5: `fixable` (the buggy build) waits after its start transition (memory only,
/// no persistence point), then fails on `fixable.go`. The suspended instance shows the step its
/// start transition reached, `Waiting`, not `created`; its stored state is still none (it
/// resumes from the start).
async fn a_fault_before_the_first_point_shows_the_step_the_last_transition_reached(db: TestDb) {
    let (host, _) = HostThread::start(&db, fast_config(), Deliveries::default()).await;
    // A client that is not the host's: the start is claimed by the host, not run eagerly with a
    // first point.
    let client = Client::new(db.store.clone(), support::fixtures::registry());
    let id = client.start("fixable", json!("step-5")).await.unwrap();
    db.wait_subscribed(id, WAIT).await;
    publish(&client, "go-step-5", "fixable.go", json!({"key": "step-5"})).await;
    db.wait_status(id, InstanceStatus::Suspended, WAIT).await;
    let step = db
        .texts(
            "SELECT step FROM instances WHERE CAST(id AS TEXT) = $1",
            &id.to_string(),
        )
        .await;
    assert_eq!(step, vec!["Waiting".to_owned()]);
    let history = db
        .texts(
            "SELECT reason || ':' || step FROM history WHERE CAST(instance_id AS TEXT) = $1 ORDER BY seq",
            &id.to_string(),
        )
        .await;
    assert_eq!(history, vec!["suspend:Waiting".to_owned()], "{history:?}");
    host.stop();
}

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

/// A commit the database wrote but whose reply was lost (the connection cut after COMMIT, as in
/// a database restart) is retried like any transient failure. The retry finds the points'
/// messages consumed already: that is no reason to suspend anyone (G5 held, G6 would not). The
/// instances resume from what is stored and complete, each message consumed once.
async fn a_commit_whose_reply_was_lost_is_retried_without_refusing_it(db: TestDb) {
    let plan = FaultPlan::new();
    let deliveries = Deliveries::default();
    let (host, client) =
        HostThread::start_with(&db, fast_config(), deliveries.clone(), Some(plan.clone())).await;
    plan.lose_next_commit_replies(3);
    let mut ids = Vec::new();
    for i in 0..10 {
        ids.push(routed(publish(&client, &format!("lost{i}"), "order.placed",
            json!({"order_id": format!("lost{i}"), "customer": "c", "amount": 5.0, "shipment_timeout_ms": 30000})).await));
    }
    for id in &ids {
        db.wait_status(*id, InstanceStatus::Completed, WAIT).await;
    }
    assert_eq!(
        db.count("SELECT COUNT(*) FROM instances WHERE status = 'suspended'")
            .await,
        0
    );
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

/// The host loop is a pipeline: while one group's commit is on disk (held here at the store
/// boundary, as a slow disk would hold it), the loop claims and runs the next transitions of
/// other instances. Those of the instance whose point is in the commit wait for it; its sends
/// leave only once it is written (G2), and nothing is lost or doubled when it is released.
async fn the_host_loop_runs_the_next_transitions_while_a_group_commit_is_on_disk(db: TestDb) {
    let plan = FaultPlan::new();
    let deliveries = Deliveries::default();
    let (host, client) =
        HostThread::start_with(&db, fast_config(), deliveries.clone(), Some(plan.clone())).await;
    // Ten collectors complete in one group, more than a group the loop commits and waits for
    // (the latency path of a few points); y collects while their commit is held.
    let xs: Vec<String> = (0..10).map(|_| Uuid::new_v4().to_string()).collect();
    let y = Uuid::new_v4().to_string();
    let messages = |keys: &[String], kind: &str| -> Vec<NewMessage> {
        keys.iter()
            .map(|key| msg(&format!("{key}-{kind}"), kind, json!({"key": key})))
            .collect()
    };
    let mut starts = messages(&xs, "collect.start");
    starts.extend(messages(std::slice::from_ref(&y), "collect.start"));
    let started = client.publish_batch(starts).await.unwrap();
    let ids: Vec<Uuid> = started.into_iter().map(routed).collect();
    db.wait_for("the collectors started", WAIT, || async {
        db.count("SELECT COUNT(*) FROM history").await == 11
    })
    .await;

    plan.hold_commits();
    client
        .publish_batch(messages(&xs, "collect.done"))
        .await
        .unwrap();
    db.wait_for(
        "the ten completions held on their way to disk",
        WAIT,
        || async { plan.held_commits() == 1 },
    )
    .await;
    let items: Vec<NewMessage> = (1..=3)
        .map(|n| msg(&format!("{y}-item-{n}"), "item", json!({"key": y, "n": n})))
        .collect();
    client.publish_batch(items).await.unwrap();
    db.wait_for("y's items taken while the commit is held", WAIT, || async {
        items_seen(&y) == 3
    })
    .await;
    assert_eq!(
        plan.held_commits(),
        1,
        "the completions' commit is still held"
    );
    assert!(
        deliveries.bodies("log").iter().all(|b| !b.is_array()),
        "a collect.items left before its point was written"
    );

    plan.release_commits();
    client
        .publish_batch(messages(std::slice::from_ref(&y), "collect.done"))
        .await
        .unwrap();
    for id in &ids {
        db.wait_status(*id, InstanceStatus::Completed, WAIT).await;
    }
    db.wait_for("every committed send delivered", WAIT, || async {
        db.count("SELECT COUNT(*) FROM outbox WHERE status <> 'delivered'")
            .await
            == 0
    })
    .await;
    let mut logged: Vec<_> = deliveries
        .bodies("log")
        .into_iter()
        .filter(|b| b.is_array())
        .collect();
    logged.sort_by_key(|b| b.as_array().map_or(0, Vec::len));
    let mut expected = vec![json!([]); 10];
    expected.push(json!([1, 2, 3]));
    assert_eq!(logged, expected, "each collector's items, once");
    assert_g2(&db, &deliveries).await;
    assert_eq!(
        db.count("SELECT COUNT(*) FROM messages WHERE status <> 'consumed'")
            .await,
        0
    );
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
    // No running host registers them: the host leaves them untouched (it claims work only for
    // the versions it registers), and the "needs attention" query explains them.
    let attention = db
        .store
        .needing_attention(chrono::Utc::now(), 100)
        .await
        .unwrap();
    for (id, name, version) in [(ghost, "ghost", 1), (future, "approval", 99)] {
        let found = attention
            .iter()
            .find(|a| a.id == id)
            .unwrap_or_else(|| panic!("{id} needs attention: {attention:?}"));
        assert!(
            found.reason.contains(&format!(
                "no running host has orchestration {name} version {version}"
            )),
            "{found:?}"
        );
        assert_eq!(db.status(id).await, Some(InstanceStatus::Running));
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
    // Suspended: the decision waits, unclaimed. The marker: a decision published after it, for
    // a running instance, is consumed; the host claims routed messages in publication order, so
    // the claim that took it would have taken `da` first, were `a` claimable.
    let c = client
        .start("approval", json!({"request_id": "sc", "approver": "x"}))
        .await
        .unwrap();
    db.wait_first_point(c, WAIT).await;
    publish(
        &client,
        "dc",
        "approval.decision",
        json!({"request_id": "sc", "approved": true, "by": "x"}),
    )
    .await;
    db.wait_status(c, InstanceStatus::Completed, WAIT).await;
    assert_eq!(db.status(a).await, Some(InstanceStatus::Suspended));
    assert_eq!(
        db.count_with(
            "SELECT COUNT(*) FROM messages WHERE id = $1 AND status = 'routed' \
             AND locked_by IS NULL AND delivery_count = 0",
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
