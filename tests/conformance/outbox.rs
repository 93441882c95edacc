//! Outbox (G2): sends are written by a committed point only, claimed once their lock runs out,
//! and a delivery's reply reaches the instance once.

use super::*;
use crate::support::Backend;

const WAIT: Duration = Duration::from_secs(20);

crate::backend_tests!(
    a_point_consumes_the_reply_copy_another_host_stored_while_the_point_waited,
    a_send_is_claimed_once_retried_dead_lettered_resubmitted_and_delivered,
    an_ordered_port_delivers_in_order_and_stops_on_a_held_send_until_it_is_resumed,
);

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
    match db.backend {
        // The marker: the point's connection waits for a lock (the other transaction's row).
        Backend::Postgres => {
            db.wait_for("the point to wait for the row lock", WAIT, || async {
                db.count(
                    "SELECT COUNT(*) FROM pg_stat_activity \
                     WHERE datname = current_database() AND wait_event_type = 'Lock'",
                )
                .await
                    >= 1
            })
            .await;
        }
        // SQLite shows no writer waiting in its busy handler: give the point time to get there.
        Backend::Sqlite => tokio::time::sleep(Duration::from_millis(300)).await,
    }
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

/// A send's life in the outbox (G2): claimed by one host at a time once the writer's lock ran
/// out, tried again no sooner than its retry time, dead-lettered with its instance told (a
/// `send.failed` message routed to it), resubmitted under the same id with its attempts reset,
/// and once delivered never claimed again; an outcome for a row no longer pending changes
/// nothing.
async fn a_send_is_claimed_once_retried_dead_lettered_resubmitted_and_delivered(db: TestDb) {
    let now = at(0);
    let later = |s: i64| now + chrono::Duration::seconds(s);
    // Live hosts (PostgreSQL takes over the locks of a host that is not).
    for host in ["host-a", "host-b", "host-c"] {
        db.store.recover(host, now).await.unwrap();
    }
    let x = Uuid::now_v7();
    let epoch = started_and_held(&db, &[x], now).await[0].epoch;
    let mut sent = send_point(x, "host-a", epoch, "x1", 1, now);
    sent.outbox_lock_until = later(5);
    let out = db.store.commit(&[sent]).await.unwrap();
    assert_eq!(out, [CommitOutcome::Committed]);
    let claim = |host: &'static str, s: i64| {
        let store = db.store.clone();
        async move {
            store
                .claim_outbox(host, later(s), later(s + 30), 10, &[])
                .await
                .unwrap()
        }
    };
    assert!(
        claim("host-b", 1).await.is_empty(),
        "locked to the writer first"
    );
    let rows = claim("host-b", 6).await;
    assert_eq!(
        rows.iter().map(|r| r.id.as_str()).collect::<Vec<_>>(),
        ["send-x1"]
    );
    assert!(claim("host-c", 7).await.is_empty(), "claimed once");
    db.store
        .record_deliveries(
            vec![DeliveryOutcome::Retry {
                row: rows[0].clone(),
                error: "busy".into(),
                retry_at: later(60),
            }],
            later(8),
        )
        .await
        .unwrap();
    assert!(claim("host-c", 59).await.is_empty(), "not before its retry");
    let rows = claim("host-c", 61).await;
    assert_eq!(rows.len(), 1);
    db.store
        .record_deliveries(
            vec![DeliveryOutcome::Dead {
                row: rows[0].clone(),
                error: "gone".into(),
            }],
            later(62),
        )
        .await
        .unwrap();
    let dead = db.store.dead_letter("send-x1").await.unwrap().unwrap();
    assert_eq!(dead.instance_id, Some(x));
    assert!(dead.reason.contains("gone"), "{dead:?}");
    assert_eq!(
        db.count_with(
            "SELECT COUNT(*) FROM messages WHERE id = 'send-x1:failed' AND status = 'routed' \
             AND CAST(instance_id AS TEXT) = $1",
            &x.to_string()
        )
        .await,
        1,
        "the instance is told"
    );
    assert!(
        claim("host-c", 63).await.is_empty(),
        "a dead send is not sent"
    );
    assert!(db
        .store
        .resubmit_dead_letter("send-x1", later(64))
        .await
        .unwrap());
    assert_eq!(db.store.dead_letter("send-x1").await.unwrap(), None);
    let rows = claim("host-b", 65).await;
    assert_eq!(rows.len(), 1);
    assert_eq!((rows[0].id.as_str(), rows[0].attempts), ("send-x1", 0));
    let delivered = DeliveryOutcome::Delivered {
        row: rows[0].clone(),
        reply: None,
        via_backup: false,
    };
    db.store
        .record_deliveries(vec![delivered.clone()], later(66))
        .await
        .unwrap();
    // Recorded again (another host's outcome for the same row): nothing changes.
    db.store
        .record_deliveries(vec![delivered], later(67))
        .await
        .unwrap();
    assert!(claim("host-b", 200).await.is_empty(), "delivered once");
    assert_eq!(
        db.count("SELECT COUNT(*) FROM outbox WHERE id = 'send-x1' AND status = 'delivered'")
            .await,
        1
    );
    assert!(db.store.dead_letters(10).await.unwrap().is_empty());
}

/// An ordered port (G2, in order): its rows are left to `claim_ordered`, which gives its oldest
/// send only, once no other live host holds it (a renewed lock holds it longer); a send held
/// after its retries stops the port until an operator resumes it, its attempts reset; once it
/// is delivered, the next send is the head.
async fn an_ordered_port_delivers_in_order_and_stops_on_a_held_send_until_it_is_resumed(
    db: TestDb,
) {
    for host in ["host-a", "host-b"] {
        db.store.recover(host, at(0)).await.unwrap();
    }
    let x = Uuid::now_v7();
    let epoch = started_and_held(&db, &[x], at(0)).await[0].epoch;
    let mut sent = send_point(x, "host-a", epoch, "x1", 1, at(0));
    sent.outbox = ["o1", "o2"]
        .into_iter()
        .map(|id| OutboxRow {
            id: id.into(),
            instance_id: x,
            port: "ordered".into(),
            message_type: "t".into(),
            body: json!({"id": id}),
            expects_reply: false,
            attempts: 0,
        })
        .collect();
    let out = db.store.commit(&[sent]).await.unwrap();
    assert_eq!(out, [CommitOutcome::Committed]);
    let ordered = ["ordered".to_owned()];
    assert!(
        db.store
            .claim_outbox("host-a", at(1), at(31), 10, &ordered)
            .await
            .unwrap()
            .is_empty(),
        "an ordered port's rows are left to claim_ordered"
    );
    let head = |host: &'static str, s: i64| {
        let store = db.store.clone();
        async move {
            store
                .claim_ordered(host, "ordered", at(s), at(s + 30))
                .await
                .unwrap()
                .map(|row| (row.id, row.attempts))
        }
    };
    assert_eq!(head("host-b", 2).await, Some(("o1".to_owned(), 0)));
    assert_eq!(head("host-a", 3).await, None, "host-b holds the head");
    db.store
        .renew_outbox("host-b", &["o1".to_owned()], at(100))
        .await
        .unwrap();
    db.store.heartbeat("host-b", at(40), at(200)).await.unwrap();
    assert_eq!(head("host-a", 50).await, None, "its lock was renewed");
    let o1 = OutboxRow {
        id: "o1".into(),
        instance_id: x,
        port: "ordered".into(),
        message_type: "t".into(),
        body: json!({"id": "o1"}),
        expects_reply: false,
        attempts: 3,
    };
    db.store
        .record_deliveries(
            vec![DeliveryOutcome::Held {
                row: o1.clone(),
                error: "refused".into(),
            }],
            at(60),
        )
        .await
        .unwrap();
    assert_eq!(head("host-a", 200).await, None, "held: the port stops");
    assert!(db.store.resume_send("o1", at(201)).await.unwrap());
    let resumed = db
        .store
        .claim_ordered("host-a", "ordered", at(202), at(232))
        .await
        .unwrap()
        .unwrap();
    assert_eq!((resumed.id.as_str(), resumed.attempts), ("o1", 0));
    db.store
        .record_deliveries(
            vec![DeliveryOutcome::Delivered {
                row: resumed,
                reply: None,
                via_backup: false,
            }],
            at(203),
        )
        .await
        .unwrap();
    assert_eq!(head("host-a", 204).await, Some(("o2".to_owned(), 0)));
}
