//! Outbox (G2): sends are written by a committed point only, claimed once their lock runs out,
//! and a delivery's reply reaches the instance once.

use super::*;

crate::backend_tests!(a_point_consumes_the_reply_copy_another_host_stored_while_the_point_waited,);

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
