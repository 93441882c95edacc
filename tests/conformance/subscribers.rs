//! Publish-subscribe (docs/messaging.md#publish-subscribe), the store alone: a message starts an
//! instance of every orchestration whose activating subscription and filter it passes (a copy
//! for each but the first), a send port's subscription puts it in the outbox, a filter that does
//! not parse routes nothing and is recorded, and a duplicate starts nothing.

use super::*;

crate::backend_tests!(
    a_message_goes_to_every_subscriber_whose_filter_it_passes_and_a_broken_filter_is_recorded,
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
