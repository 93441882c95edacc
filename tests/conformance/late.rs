//! Late messages (docs/messaging.md#late-messages): a message for a key whose instance has ended
//! is a zombie naming that instance, not held for a later one; a later instance of the key gets
//! only what is published after it waits, unless its receive asks for earlier ones; a message for
//! a key no instance ever waited on stays unrouted, as before.

use super::*;

crate::backend_tests!(
    a_message_for_the_key_of_an_ended_instance_is_a_zombie_and_not_routed_to_a_later_one,
);

/// The point that completes instance `id` (its receives gone).
fn complete(id: Uuid, epoch: i64, now: DateTime<Utc>) -> PersistencePoint {
    let mut p = point(id, epoch, "host-a", 2, now);
    p.reason = Reason::Complete;
    p.status = InstanceStatus::Completed;
    p.subscriptions = Some(vec![]);
    p.output = Some(json!("done"));
    p.release = true;
    p
}

async fn message_row(db: &TestDb, id: &str) -> (String, Option<String>, Option<String>) {
    sqlx::query_as("SELECT status, CAST(instance_id AS TEXT), reason FROM messages WHERE id = $1")
        .bind(id)
        .fetch_one(&db.sql)
        .await
        .unwrap()
}

fn paid(id: &str, order: i32) -> NewMessage {
    NewMessage::published(id, "paid", json!({ "order": order }), BTreeMap::new())
}

async fn a_message_for_the_key_of_an_ended_instance_is_a_zombie_and_not_routed_to_a_later_one(
    db: TestDb,
) {
    let store = db.store.clone();
    // A waits on paid/order=7, then completes.
    let (a, epoch, p) = started_and_receiving(&store, 7, at(0)).await;
    assert_eq!(
        store.commit(&[p]).await.unwrap(),
        [CommitOutcome::Committed]
    );
    // Before any instance waited on order=3: unrouted, as always.
    assert_eq!(
        store.publish(vec![paid("early", 3)], at(1)).await.unwrap(),
        [PublishOutcome::Unrouted]
    );
    assert_eq!(
        store
            .commit(&[complete(a.id, epoch, at(10))])
            .await
            .unwrap(),
        [CommitOutcome::Committed]
    );
    // After A ended: a zombie of A.
    assert_eq!(
        store.publish(vec![paid("late", 7)], at(20)).await.unwrap(),
        [PublishOutcome::Zombie(a.id)]
    );
    let (status, instance, reason) = message_row(&db, "late").await;
    assert_eq!(status, "zombie");
    assert_eq!(instance, Some(a.id.to_string()));
    assert!(reason.unwrap_or_default().starts_with("late: "));
    let detail = store.instance_detail(a.id).await.unwrap().unwrap();
    assert_eq!(detail.zombies, [("late".to_owned(), "paid".to_owned())]);

    // B waits on the same key: the late message stays A's; what is published next is B's.
    let (b, _, p) = started_and_receiving(&store, 7, at(30)).await;
    assert_eq!(
        store.commit(&[p]).await.unwrap(),
        [CommitOutcome::Committed]
    );
    assert_eq!(message_row(&db, "late").await.0, "zombie");
    assert_eq!(
        store.publish(vec![paid("fresh", 7)], at(40)).await.unwrap(),
        [PublishOutcome::Routed(b.id)]
    );

    // C waits on order=7 asking for earlier messages: it takes the late one.
    let (c, _, mut p) = started_and_receiving(&store, 7, at(50)).await;
    if let Some(subs) = p.subscriptions.as_mut() {
        subs[0].earlier = true;
    }
    assert_eq!(
        store.commit(&[p]).await.unwrap(),
        [CommitOutcome::Committed]
    );
    let (status, instance, reason) = message_row(&db, "late").await;
    assert_eq!(
        (status.as_str(), instance),
        ("routed", Some(c.id.to_string()))
    );
    assert_eq!(reason, None);

    // The early message goes to the first instance that waits on its key.
    let (d, _, p) = started_and_receiving(&store, 3, at(60)).await;
    assert_eq!(
        store.commit(&[p]).await.unwrap(),
        [CommitOutcome::Committed]
    );
    let (status, instance, _) = message_row(&db, "early").await;
    assert_eq!(
        (status.as_str(), instance),
        ("routed", Some(d.id.to_string()))
    );
}
