//! Fencing (G4): a point, a receive declared between points and an eager start commit only
//! under the epoch that holds the instance; a stale epoch writes nothing, even beside good points
//! in one group; a lease that ran out is taken over under a newer epoch.

use super::*;

crate::backend_tests!(
    a_point_commits_once_and_a_stale_epoch_is_fenced,
    a_commit_by_a_host_that_lost_the_lease_is_fenced,
    receives_declared_between_points_are_fenced_like_points,
    an_eager_start_is_held_by_its_host_until_its_lease_runs_out,
    a_first_point_writes_its_instance_with_its_start,
);

// Taking over the claims and leases of a host that is gone, while other hosts run on the same
// database, is promised by backends that serve many hosts at once (PostgreSQL). SQLite serves one
// host per file: a new host takes everything over at `Store::recover`, which releases all locks
// and leases (checked by the tests above).
crate::many_host_tests!(an_expired_lease_is_taken_over_and_the_old_owner_is_fenced,);

async fn a_point_commits_once_and_a_stale_epoch_is_fenced(db: TestDb) {
    let store = db.store.clone();
    let now = at(0);
    store.recover("host-a", now).await.expect("recover");
    let inst = new_instance("order");
    store
        .start_instances(vec![inst.clone()], None, now)
        .await
        .expect("start");
    let claimed = store
        .claim_messages("host-a", now, 10)
        .await
        .expect("claim");
    assert_eq!(claimed.len(), 1);
    assert_eq!(claimed[0].kind, MessageKind::Start);
    assert_eq!(claimed[0].instance_id, inst.id);
    assert_eq!(claimed[0].body, serde_json::json!({"n": 1}));
    assert!(store
        .claim_messages("host-a", now, 10)
        .await
        .expect("claim")
        .is_empty());
    let lease = now + chrono::Duration::seconds(30);
    let records = store
        .acquire("host-a", &[inst.id], now, lease)
        .await
        .expect("acquire");
    assert_eq!(records.len(), 1);
    let epoch = records[0].epoch;
    assert_eq!(epoch, 1);
    assert_eq!(records[0].state, None);

    let sub = SubscriptionRow {
        id: Uuid::new_v4(),
        message_type: "payment.received".into(),
        correlation: Correlation::on("order", "A"),
        earlier: false,
    };
    let mut p = point(inst.id, epoch, "host-a", 1, now);
    p.reason = Reason::Send;
    p.consumed = vec![claimed[0].seq];
    p.subscriptions = Some(vec![sub.clone()]);
    p.set_timers = vec![("timeout".into(), at(3600))];
    p.next_timer_at = Some(at(3600));
    p.outbox = vec![OutboxRow {
        id: "send-1".into(),
        instance_id: inst.id,
        port: "payment".into(),
        message_type: "payment.requested".into(),
        body: serde_json::json!({"amount": 5}),
        expects_reply: true,
        attempts: 0,
    }];
    // A stale epoch writes nothing, even beside a good point in the same group.
    let mut stale = p.clone();
    stale.epoch = epoch - 1;
    stale.consumed = vec![];
    let out = store.commit(&[stale, p.clone()]).await.expect("commit");
    assert_eq!(out, [CommitOutcome::Fenced, CommitOutcome::Committed]);
    assert_eq!(db.count("SELECT COUNT(*) FROM history").await, 1);
    assert_eq!(db.count("SELECT COUNT(*) FROM subscriptions").await, 1);
    // Consuming the same message again is an error, and rolls back the whole group.
    let mut again = point(inst.id, epoch, "host-a", 2, now);
    again.consumed = vec![claimed[0].seq];
    assert!(matches!(
        store.commit(&[again]).await,
        Err(StoreError::NotRouted(_))
    ));
    assert_eq!(db.count("SELECT COUNT(*) FROM history").await, 1);

    // A correlated message routes to the subscription; an uncorrelated one stays unrouted.
    let hit = NewMessage::published(
        "pay-A",
        "payment.received",
        serde_json::json!({"order": "A"}),
        BTreeMap::new(),
    );
    let miss = NewMessage::published(
        "pay-B",
        "payment.received",
        serde_json::json!({"order": "B"}),
        BTreeMap::new(),
    );
    assert_eq!(
        store.publish(vec![hit, miss], now).await.expect("publish"),
        [PublishOutcome::Routed(inst.id), PublishOutcome::Unrouted]
    );
    // The owner does not claim again what it holds; the outbox row is locked to it.
    let claimed = store
        .claim_messages("host-a", now, 10)
        .await
        .expect("claim");
    assert_eq!(claimed.len(), 1);
    assert_eq!(claimed[0].subscription_id, Some(sub.id));
    assert!(store
        .claim_outbox("host-b", now, at(120), 10, &[])
        .await
        .expect("outbox")
        .is_empty());
    let rows = store
        .claim_outbox("host-b", at(61), at(120), 10, &[])
        .await
        .expect("outbox");
    assert_eq!(rows.len(), 1);
    store
        .record_deliveries(
            vec![DeliveryOutcome::Delivered {
                row: rows[0].clone(),
                reply: Some(serde_json::json!({"ok": true})),
                via_backup: false,
            }],
            at(61),
        )
        .await
        .expect("record");
    assert_eq!(
        db.count("SELECT COUNT(*) FROM messages WHERE id = 'send-1:reply' AND status = 'routed'")
            .await,
        1
    );

    // Dropping the subscription and releasing: messages move back to unrouted / unlocked.
    let mut last = point(inst.id, epoch, "host-a", 2, at(62));
    last.consumed = vec![claimed[0].seq];
    last.subscriptions = Some(vec![]);
    last.cancel_timers = vec!["timeout".into()];
    last.release = true;
    assert_eq!(
        store.commit(&[last]).await.expect("commit"),
        [CommitOutcome::Committed]
    );
    assert_eq!(db.count("SELECT COUNT(*) FROM timers").await, 0);
    let detail = store
        .instance_detail(inst.id)
        .await
        .expect("detail")
        .expect("exists");
    assert_eq!(detail.summary.status, InstanceStatus::Dehydrated);
    assert_eq!(detail.history.len(), 2);
    assert_eq!(detail.state, Some(vec![1, 2, 3]));
    assert_eq!(
        detail.pending_messages,
        [(
            "send-1:reply".to_owned(),
            "payment.requested.reply".to_owned()
        )]
    );
    let activity = store.activity(at(62)).await.expect("activity");
    assert_eq!(activity.ready_messages, 1);
    assert_eq!(activity.count(InstanceStatus::Dehydrated), 1);

    // Operator control bumps the epoch: the old holder is fenced.
    assert_eq!(
        store
            .control(
                inst.id,
                ControlAction::Suspend {
                    reason: "look".into()
                },
                at(63)
            )
            .await
            .expect("suspend"),
        InstanceStatus::Suspended
    );
    assert!(store
        .claim_messages("host-a", at(63), 10)
        .await
        .expect("claim")
        .is_empty());
    assert!(matches!(
        store
            .control(
                inst.id,
                ControlAction::Suspend {
                    reason: "again".into()
                },
                at(63)
            )
            .await,
        Err(StoreError::WrongStatus { .. })
    ));
    assert_eq!(
        store
            .control(inst.id, ControlAction::Resume { force: false }, at(64))
            .await
            .expect("resume"),
        InstanceStatus::Dehydrated
    );
    assert_eq!(
        store
            .control(
                inst.id,
                ControlAction::Terminate {
                    reason: "done".into()
                },
                at(65)
            )
            .await
            .expect("terminate"),
        InstanceStatus::Terminated
    );
    let listed = store
        .list_instances(Some(InstanceStatus::Terminated), 10)
        .await
        .expect("list");
    assert_eq!(listed.len(), 1);
    assert_eq!(store.list_instances(None, 10).await.expect("list").len(), 1);
    store.release("host-a", at(66)).await.expect("release");
}

async fn an_expired_lease_is_taken_over_and_the_old_owner_is_fenced(db: TestDb) {
    let store = db.store.clone();
    let now = at(0);
    store.recover("host-a", now).await.expect("recover a");
    store.recover("host-b", now).await.expect("recover b");
    let inst = new_instance("order");
    store
        .start_instances(vec![inst.clone()], None, now)
        .await
        .expect("start");
    let lease = now + chrono::Duration::seconds(30);
    let a_msgs = store
        .claim_messages("host-a", now, 10)
        .await
        .expect("claim");
    assert_eq!(a_msgs.len(), 1);
    let a = store
        .acquire("host-a", &[inst.id], now, lease)
        .await
        .expect("acquire");
    assert_eq!(a.len(), 1);
    // While a's lease runs, b gets nothing and cannot acquire.
    assert!(store
        .claim_messages("host-b", at(10), 10)
        .await
        .expect("claim")
        .is_empty());
    assert!(store
        .acquire("host-b", &[inst.id], at(10), at(40))
        .await
        .expect("acquire")
        .is_empty());
    // a's own lease lapsing does not make a claim again what it holds.
    assert!(store
        .claim_messages("host-a", at(31), 10)
        .await
        .expect("claim")
        .is_empty());
    // After it, b claims the message a held, and takes the instance over.
    let b_msgs = store
        .claim_messages("host-b", at(31), 10)
        .await
        .expect("claim");
    assert_eq!(b_msgs.len(), 1);
    assert_eq!(b_msgs[0].seq, a_msgs[0].seq);
    let b = store
        .acquire("host-b", &[inst.id], at(31), at(61))
        .await
        .expect("acquire");
    assert_eq!(b.len(), 1);
    assert_eq!(b[0].epoch, a[0].epoch + 1);
    // a's heartbeat no longer renews it, and a's commit is fenced.
    store
        .heartbeat("host-a", at(32), at(62))
        .await
        .expect("heartbeat");
    let mut pa = point(inst.id, a[0].epoch, "host-a", 1, at(32));
    pa.consumed = vec![a_msgs[0].seq];
    assert_eq!(
        store.commit(&[pa]).await.expect("commit"),
        [CommitOutcome::Fenced]
    );
    let mut pb = point(inst.id, b[0].epoch, "host-b", 1, at(33));
    pb.consumed = vec![b_msgs[0].seq];
    assert_eq!(
        store.commit(&[pb]).await.expect("commit"),
        [CommitOutcome::Committed]
    );
    let delivered = db
        .count("SELECT CAST(delivery_count AS BIGINT) FROM messages")
        .await;
    assert_eq!(delivered, 2);
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
            earlier: false,
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
        earlier: false,
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
