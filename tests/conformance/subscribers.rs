//! Publish-subscribe (docs/messaging.md#publish-subscribe), the store alone: a message starts an
//! instance of every orchestration whose activating subscription and filter it passes (a copy
//! for each but the first), a send port's subscription puts it in the outbox, a filter that does
//! not parse routes nothing and is recorded, and a duplicate starts nothing. The copies go to
//! each orchestration by its own rule: its running instance whose receive the message matches
//! (a convoy's for the message's values), else a new instance; whether the message's own route
//! is an instance's receive, an activation, or a reroute when the subscribers appear later.

use super::*;

crate::backend_tests!(
    a_message_goes_to_every_subscriber_whose_filter_it_passes_and_a_broken_filter_is_recorded,
    a_message_for_an_instances_receive_is_copied_to_the_other_subscribing_orchestrations,
    a_convoy_subscribing_beside_others_gets_its_copy_at_its_instance_for_the_value,
    a_message_routed_again_when_subscribers_appear_goes_to_each_of_them,
    a_message_routed_again_after_its_receive_was_cancelled_is_not_copied_twice,
);

fn activation(orchestration: &str, filter: &str) -> Activation {
    Activation {
        message_type: "invoice.issued".into(),
        orchestration: orchestration.into(),
        version: 1,
        convoy: String::new(),
        filter: filter.into(),
        port: None,
    }
}

fn invoice(id: &str, amount: i64) -> NewMessage {
    NewMessage::published(
        id,
        "invoice.issued",
        json!({ "amount": amount, "region": "EU" }),
        BTreeMap::new(),
    )
}

async fn a_message_goes_to_every_subscriber_whose_filter_it_passes_and_a_broken_filter_is_recorded(
    db: TestDb,
) {
    let store = db.store.clone();
    let port = Activation {
        orchestration: String::new(),
        version: 0,
        port: Some("archive".into()),
        ..activation("", "amount > 100")
    };
    store
        .sync_activations(
            &[
                activation("audit", ""),
                activation("review", "amount >= 1000 AND region = 'EU'"),
                port,
            ],
            at(0),
        )
        .await
        .unwrap();
    let out = store
        .publish(vec![invoice("big", 5000), invoice("small", 5)], at(1))
        .await
        .unwrap();
    assert!(
        out.iter().all(|o| matches!(o, PublishOutcome::Routed(_))),
        "{out:?}"
    );
    let started: Vec<(String, String)> = sqlx::query_as(
        "SELECT i.orchestration, m.id FROM instances i JOIN messages m ON m.instance_id = i.id \
         AND m.kind = 'start' ORDER BY m.id",
    )
    .fetch_all(&db.sql)
    .await
    .unwrap();
    assert_eq!(
        started,
        [
            ("audit".to_owned(), "big".to_owned()),
            ("review".to_owned(), "big/review".to_owned()),
            ("audit".to_owned(), "small".to_owned()),
        ]
    );
    let sends: Vec<(String, String, String)> =
        sqlx::query_as("SELECT id, port, status FROM outbox ORDER BY id")
            .fetch_all(&db.sql)
            .await
            .unwrap();
    assert_eq!(
        sends,
        [(
            "big@archive".to_owned(),
            "archive".to_owned(),
            "pending".to_owned()
        )]
    );
    // A duplicate: nothing more.
    assert_eq!(
        store
            .publish(vec![invoice("big", 5000)], at(2))
            .await
            .unwrap(),
        [PublishOutcome::Duplicate]
    );
    assert_eq!(db.count("SELECT COUNT(*) FROM instances").await, 3);
    // A filter written by hand that does not parse: recorded, and the others still route.
    sqlx::query("UPDATE subscriptions SET filter = 'amount >= ' WHERE orchestration = 'audit'")
        .execute(&db.sql)
        .await
        .unwrap();
    let out = store
        .publish(vec![invoice("after", 2000)], at(3))
        .await
        .unwrap();
    assert!(matches!(out[0], PublishOutcome::Routed(_)), "{out:?}");
    assert_eq!(
        db.count("SELECT COUNT(*) FROM instances WHERE orchestration = 'review'")
            .await,
        2
    );
    assert_eq!(
        db.count("SELECT COUNT(*) FROM instances WHERE orchestration = 'audit'")
            .await,
        2
    );
    let noted: Vec<Option<String>> =
        sqlx::query_scalar("SELECT filter_error FROM subscriptions WHERE orchestration = 'audit'")
            .fetch_all(&db.sql)
            .await
            .unwrap();
    assert!(
        noted[0]
            .as_deref()
            .is_some_and(|e| e.contains("does not parse")),
        "{noted:?}"
    );
}

/// The activating subscription of `orchestration` to `message_type`, with `filter`, correlated
/// on `convoy` (a convoy) or not (empty).
fn subscribing(message_type: &str, orchestration: &str, convoy: &str, filter: &str) -> Activation {
    Activation {
        message_type: message_type.into(),
        convoy: convoy.into(),
        ..activation(orchestration, filter)
    }
}

/// Send port `port`'s subscription to `message_type`.
fn port_subscribing(message_type: &str, port: &str) -> Activation {
    Activation {
        orchestration: String::new(),
        version: 0,
        port: Some(port.into()),
        ..subscribing(message_type, "", "", "")
    }
}

/// Every stored message of `message_type`: (id, its instance's orchestration, kind, status),
/// by id.
async fn copies(db: &TestDb, message_type: &str) -> Vec<(String, String, String, String)> {
    sqlx::query_as(
        "SELECT m.id, COALESCE(i.orchestration, ''), m.kind, m.status FROM messages m \
         LEFT JOIN instances i ON i.id = m.instance_id WHERE m.message_type = $1 ORDER BY m.id",
    )
    .bind(message_type)
    .fetch_all(&db.sql)
    .await
    .unwrap()
}

fn row(
    id: &str,
    orchestration: &str,
    kind: &str,
    status: &str,
) -> (String, String, String, String) {
    (id.into(), orchestration.into(), kind.into(), status.into())
}

/// Issue 25, point 8: a message that matches an instance's correlated receive goes to that
/// instance, and a copy to every other orchestration whose activating subscription it passes
/// (and to the send ports that subscribe to it); one copy each, even when published again.
async fn a_message_for_an_instances_receive_is_copied_to_the_other_subscribing_orchestrations(
    db: TestDb,
) {
    let store = db.store.clone();
    // An `order` instance waits on paid/order=7.
    let (a, _, p) = started_and_receiving(&store, 7, at(0)).await;
    assert_eq!(
        store.commit(&[p]).await.unwrap(),
        [CommitOutcome::Committed]
    );
    store
        .sync_activations(
            &[
                subscribing("paid", "audit", "", ""),
                subscribing("paid", "refunds", "", "order < 0"),
                port_subscribing("paid", "ledger"),
            ],
            at(1),
        )
        .await
        .unwrap();
    let paid = NewMessage::published("p7", "paid", json!({ "order": 7 }), BTreeMap::new());
    assert_eq!(
        store.publish(vec![paid.clone()], at(2)).await.unwrap(),
        [PublishOutcome::Routed(a.id)]
    );
    let expected = [
        row("p7", "order", "published", "routed"),
        row("p7/audit", "audit", "start", "routed"),
    ];
    assert_eq!(copies(&db, "paid").await, expected);
    let sends: Vec<String> = sqlx::query_scalar("SELECT id FROM outbox ORDER BY id")
        .fetch_all(&db.sql)
        .await
        .unwrap();
    assert_eq!(sends, ["p7@ledger"]);
    // G5 per subscriber: published again, nothing more.
    assert_eq!(
        store.publish(vec![paid], at(3)).await.unwrap(),
        [PublishOutcome::Duplicate]
    );
    assert_eq!(copies(&db, "paid").await, expected);
    assert_eq!(db.count("SELECT COUNT(*) FROM instances").await, 2);
    assert_eq!(db.count("SELECT COUNT(*) FROM outbox").await, 1);
}

/// Issue 25, point 8: a convoy that subscribes to a type beside other orchestrations gets its
/// copy by the convoy's rule: the first message of a value starts its instance, the next ones go
/// to that instance (and the others still get theirs), in one batch or many.
async fn a_convoy_subscribing_beside_others_gets_its_copy_at_its_instance_for_the_value(
    db: TestDb,
) {
    let store = db.store.clone();
    store
        .sync_activations(
            &[
                subscribing("line", "audit", "", ""),
                subscribing("line", "lines", "order", ""),
            ],
            at(0),
        )
        .await
        .unwrap();
    let line = |id: &str, order: i32| {
        NewMessage::published(id, "line", json!({ "order": order }), BTreeMap::new())
    };
    store.publish(vec![line("a1", 1)], at(1)).await.unwrap();
    store.publish(vec![line("a2", 1)], at(2)).await.unwrap();
    store
        .publish(vec![line("b1", 2), line("a3", 1), line("b2", 2)], at(3))
        .await
        .unwrap();
    // Per value, one `lines` instance has every line of its value; every line started an audit.
    let by_instance: Vec<(String, String)> = sqlx::query_as(
        "SELECT CAST(m.instance_id AS TEXT), m.id FROM messages m \
         JOIN instances i ON i.id = m.instance_id WHERE i.orchestration = 'lines' ORDER BY m.id",
    )
    .fetch_all(&db.sql)
    .await
    .unwrap();
    let mut per_instance: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (instance, id) in by_instance {
        per_instance.entry(instance).or_default().push(id);
    }
    let mut groups: Vec<Vec<String>> = per_instance.into_values().collect();
    groups.sort();
    assert_eq!(
        groups,
        [vec!["a1/lines", "a2", "a3"], vec!["b1/lines", "b2"],]
    );
    assert_eq!(
        db.count("SELECT COUNT(*) FROM instances WHERE orchestration = 'audit'")
            .await,
        5
    );
    let audited: Vec<String> = sqlx::query_scalar(
        "SELECT m.id FROM messages m JOIN instances i ON i.id = m.instance_id \
         WHERE i.orchestration = 'audit' AND m.kind = 'start' ORDER BY m.id",
    )
    .fetch_all(&db.sql)
    .await
    .unwrap();
    assert_eq!(audited, ["a1", "a2/audit", "a3/audit", "b1", "b2/audit"]);
    // The instance of a value holds the convoy's subscription for it.
    assert_eq!(
        db.count(
            "SELECT COUNT(*) FROM subscriptions s JOIN instances i ON i.id = s.instance_id \
             WHERE i.orchestration = 'lines'"
        )
        .await,
        2
    );
    // Published again: nothing more.
    assert!(store
        .publish(vec![line("a2", 1), line("b1", 2)], at(4))
        .await
        .unwrap()
        .iter()
        .all(|o| *o == PublishOutcome::Duplicate));
    assert_eq!(db.count("SELECT COUNT(*) FROM instances").await, 7);
    assert_eq!(db.count("SELECT COUNT(*) FROM messages").await, 10);
}

/// Issue 25, point 8: a message nothing subscribed to when it was published is routed again when
/// subscribers appear, as a fresh publish is: to every orchestration whose activating
/// subscription it passes, a copy each, and to the send ports that subscribe to it; once.
async fn a_message_routed_again_when_subscribers_appear_goes_to_each_of_them(db: TestDb) {
    let store = db.store.clone();
    let memo = NewMessage::published("m1", "memo", json!({ "size": 3 }), BTreeMap::new());
    assert_eq!(
        store.publish(vec![memo.clone()], at(0)).await.unwrap(),
        [PublishOutcome::Unrouted]
    );
    let subscribers = [
        subscribing("memo", "filing", "", ""),
        subscribing("memo", "indexing", "", "size > 1"),
        subscribing("memo", "large-memos", "", "size > 100"),
        port_subscribing("memo", "archive"),
    ];
    store.sync_activations(&subscribers, at(1)).await.unwrap();
    let expected = [
        row("m1", "filing", "start", "routed"),
        row("m1/indexing", "indexing", "start", "routed"),
    ];
    assert_eq!(copies(&db, "memo").await, expected);
    let sends: Vec<String> = sqlx::query_scalar("SELECT id FROM outbox ORDER BY id")
        .fetch_all(&db.sql)
        .await
        .unwrap();
    assert_eq!(sends, ["m1@archive"]);
    // Synced again, published again: nothing more.
    store.sync_activations(&subscribers, at(2)).await.unwrap();
    assert_eq!(
        store.publish(vec![memo], at(3)).await.unwrap(),
        [PublishOutcome::Duplicate]
    );
    assert_eq!(copies(&db, "memo").await, expected);
    assert_eq!(db.count("SELECT COUNT(*) FROM instances").await, 2);
    assert_eq!(db.count("SELECT COUNT(*) FROM outbox").await, 1);
}

/// G5 per subscriber when a message is routed again: routed to an instance's receive and copied
/// to `audit`, then put back to unrouted when that receive is cancelled (a Listen decided by its
/// other branch), it waits for the next receive of its values, and `audit`, which has its copy,
/// gets no second one: neither as the message's route nor as a copy.
async fn a_message_routed_again_after_its_receive_was_cancelled_is_not_copied_twice(db: TestDb) {
    let store = db.store.clone();
    let (x, x_epoch, p) = started_and_receiving(&store, 7, at(0)).await;
    assert_eq!(
        store.commit(&[p]).await.unwrap(),
        [CommitOutcome::Committed]
    );
    store
        .sync_activations(&[subscribing("paid", "audit", "", "")], at(1))
        .await
        .unwrap();
    let paid = NewMessage::published("p7", "paid", json!({ "order": 7 }), BTreeMap::new());
    assert_eq!(
        store.publish(vec![paid], at(2)).await.unwrap(),
        [PublishOutcome::Routed(x.id)]
    );
    // x's receive is cancelled before it took the message.
    let mut cancel = point(x.id, x_epoch, "host-a", 2, at(3));
    cancel.subscriptions = Some(vec![]);
    assert_eq!(
        store.commit(&[cancel]).await.unwrap(),
        [CommitOutcome::Committed]
    );
    assert_eq!(
        copies(&db, "paid").await,
        [
            row("p7", "", "published", "unrouted"),
            row("p7/audit", "audit", "start", "routed"),
        ]
    );
    // Another instance waits on order=7: it gets the message, and audit nothing more.
    let (y, _, p) = started_and_receiving(&store, 7, at(4)).await;
    assert_eq!(
        store.commit(&[p]).await.unwrap(),
        [CommitOutcome::Committed]
    );
    assert_eq!(
        copies(&db, "paid").await,
        [
            row("p7", "order", "published", "routed"),
            row("p7/audit", "audit", "start", "routed"),
        ]
    );
    assert_eq!(
        db.count(&format!(
            "SELECT COUNT(*) FROM messages WHERE id = 'p7' AND CAST(instance_id AS TEXT) = '{}'",
            y.id
        ))
        .await,
        1
    );
    assert_eq!(
        db.count("SELECT COUNT(*) FROM instances WHERE orchestration = 'audit'")
            .await,
        1
    );
}
