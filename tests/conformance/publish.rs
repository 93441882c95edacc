//! Publish, route and dedupe (G1, G5): a published message is stored once under its id, routed
//! to the instance whose subscription it matches, kept as unrouted when none does, and routed
//! again when a subscription appears or goes away; concurrent publishers and subscribers never
//! lose a message between them.

use super::*;

crate::backend_tests!(
    publish_routes_dedupes_and_reroutes,
    concurrent_publishers_of_one_id_store_it_once_and_activate_once,
    a_message_published_while_its_subscription_is_written_is_routed,
    a_message_published_while_its_subscription_is_removed_is_not_lost_to_it,
    a_message_of_a_cancelled_receive_is_routed_again,
);

async fn publish_routes_dedupes_and_reroutes(db: TestDb) {
    let store = db.store.clone();
    let now = at(0);
    let msg = NewMessage::published(
        "m1",
        "order.placed",
        serde_json::json!({"order": "A"}),
        BTreeMap::new(),
    );
    assert_eq!(
        store
            .publish(vec![msg.clone()], now)
            .await
            .expect("publish"),
        [PublishOutcome::Unrouted]
    );
    assert_eq!(
        store
            .publish(vec![msg.clone(), msg.clone()], now)
            .await
            .expect("publish"),
        [PublishOutcome::Duplicate, PublishOutcome::Duplicate]
    );
    // An activating subscription routes the waiting message: a new instance, a start message.
    let activation = Activation {
        message_type: "order.placed".into(),
        orchestration: "order".into(),
        version: 3,
        convoy: String::new(),
        filter: String::new(),
        port: None,
    };
    store
        .sync_activations(std::slice::from_ref(&activation), now)
        .await
        .expect("sync");
    store
        .sync_activations(&[activation], now)
        .await
        .expect("sync again");
    let (status, kind): (String, String) =
        sqlx::query_as("SELECT status, kind FROM messages WHERE id = 'm1'")
            .fetch_one(&db.sql)
            .await
            .expect("row");
    assert_eq!((status.as_str(), kind.as_str()), ("routed", "start"));
    assert_eq!(db.count("SELECT COUNT(*) FROM instances").await, 1);
    // Publishing an activating message creates an instance; its duplicate creates none.
    let m2 = NewMessage::published(
        "m2",
        "order.placed",
        serde_json::json!({"order": "B"}),
        BTreeMap::new(),
    );
    let out = store.publish(vec![m2.clone()], now).await.expect("publish");
    let PublishOutcome::Routed(created) = out[0] else {
        panic!("not routed: {out:?}")
    };
    assert_eq!(
        store.publish(vec![m2], now).await.expect("publish"),
        [PublishOutcome::Duplicate]
    );
    assert_eq!(db.count("SELECT COUNT(*) FROM instances").await, 2);
    let summaries = store
        .instance_summaries(&[created, Uuid::new_v4()])
        .await
        .expect("summaries");
    assert_eq!(summaries.len(), 1);
    assert_eq!(summaries[0].version, 3);
    assert_eq!(summaries[0].status, InstanceStatus::Running);
}

async fn concurrent_publishers_of_one_id_store_it_once_and_activate_once(db: TestDb) {
    let store = db.store.clone();
    let now = at(0);
    let activation = Activation {
        message_type: "go".into(),
        orchestration: "runner".into(),
        version: 1,
        convoy: String::new(),
        filter: String::new(),
        port: None,
    };
    store
        .sync_activations(&[activation], now)
        .await
        .expect("sync");
    for round in 0..20 {
        let mut tasks = tokio::task::JoinSet::new();
        for _ in 0..6 {
            let store = store.clone();
            tasks.spawn(async move {
                let msg = NewMessage::published(
                    format!("same-{round}"),
                    "go",
                    serde_json::json!({}),
                    BTreeMap::new(),
                );
                store.publish(vec![msg], now).await.expect("publish")
            });
        }
        let mut routed = 0;
        while let Some(out) = tasks.join_next().await {
            if matches!(out.expect("task")[0], PublishOutcome::Routed(_)) {
                routed += 1;
            }
        }
        assert_eq!(routed, 1);
    }
    assert_eq!(db.count("SELECT COUNT(*) FROM instances").await, 20);
    assert_eq!(db.count("SELECT COUNT(*) FROM messages").await, 20);
}

async fn a_message_published_while_its_subscription_is_written_is_routed(db: TestDb) {
    let store = db.store.clone();
    let now = at(0);
    store.recover("host-a", now).await.expect("recover");
    for round in 0..100 {
        let (_, _, mut p) = started_and_receiving(&store, round, now).await;
        p.release = true;
        let committer = {
            let store = store.clone();
            tokio::spawn(async move { store.commit(&[p]).await.expect("commit") })
        };
        let publisher = {
            let store = store.clone();
            tokio::spawn(async move {
                let msg = NewMessage::published(
                    format!("paid-{round}"),
                    "paid",
                    serde_json::json!({"order": round}),
                    BTreeMap::new(),
                );
                store.publish(vec![msg], now).await.expect("publish")
            })
        };
        committer.await.expect("task");
        publisher.await.expect("task");
    }
    assert_eq!(
        db.count("SELECT COUNT(*) FROM messages WHERE status = 'unrouted'")
            .await,
        0
    );
}

async fn a_message_published_while_its_subscription_is_removed_is_not_lost_to_it(db: TestDb) {
    let store = db.store.clone();
    let now = at(0);
    store.recover("host-a", now).await.expect("recover");
    for round in 0..100 {
        let (inst, epoch, p) = started_and_receiving(&store, round, now).await;
        store.commit(&[p]).await.expect("commit");
        // The receive is cancelled while a matching message is published.
        let mut cancel = point(inst.id, epoch, "host-a", 2, now);
        cancel.subscriptions = Some(vec![]);
        cancel.release = true;
        let committer = {
            let store = store.clone();
            tokio::spawn(async move { store.commit(&[cancel]).await.expect("commit") })
        };
        let publisher = {
            let store = store.clone();
            tokio::spawn(async move {
                let msg = NewMessage::published(
                    format!("paid-{round}"),
                    "paid",
                    serde_json::json!({"order": round}),
                    BTreeMap::new(),
                );
                store.publish(vec![msg], now).await.expect("publish")
            })
        };
        committer.await.expect("task");
        publisher.await.expect("task");
    }
    assert_eq!(
        db.count(
            "SELECT COUNT(*) FROM messages m WHERE m.status = 'routed' AND m.subscription_id IS NOT NULL \
             AND NOT EXISTS (SELECT 1 FROM subscriptions s WHERE s.id = m.subscription_id)"
        )
        .await,
        0
    );
    assert_eq!(
        db.count(
            "SELECT COUNT(*) FROM messages WHERE message_type = 'paid' AND status = 'unrouted'"
        )
        .await,
        100
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
                    earlier: false,
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
