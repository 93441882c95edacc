//! Operator verbs: control (suspend, resume, terminate) by call and by a row inserted with SQL,
//! each bumping the epoch so that the host holding the instance is fenced (G4); giving up
//! sends, and reading and purging dead letters; housekeeping (zombies, unrouted messages past
//! their time to live).

use super::*;

crate::backend_tests!(
    control_moves_an_instance_between_statuses_and_fences_its_holder,
    a_control_row_inserted_with_sql_is_applied_once,
    an_operator_gives_up_a_send_and_purges_its_dead_letter,
    housekeeping_keeps_zombies_and_dead_letters_unrouted_messages_past_their_time_to_live,
);

async fn control_moves_an_instance_between_statuses_and_fences_its_holder(db: TestDb) {
    let now = at(0);
    let x = Uuid::now_v7();
    let epoch = started_and_held(&db, &[x], now).await[0].epoch;
    let suspend = |reason: &str| ControlAction::Suspend {
        reason: reason.into(),
    };
    assert_eq!(
        db.store.control(x, suspend("look"), at(1)).await.unwrap(),
        InstanceStatus::Suspended
    );
    // The holder's next point is fenced: the operator's word stands.
    let out = db
        .store
        .commit(&[send_point(x, "host-a", epoch, "late", 1, at(2))])
        .await
        .unwrap();
    assert_eq!(out, [CommitOutcome::Fenced]);
    assert_eq!(db.count("SELECT COUNT(*) FROM outbox").await, 0);
    assert!(matches!(
        db.store.control(x, suspend("again"), at(3)).await,
        Err(StoreError::WrongStatus { .. })
    ));
    let resumed = db
        .store
        .control(x, ControlAction::Resume { force: false }, at(4))
        .await
        .unwrap();
    assert!(!resumed.is_final(), "{resumed}");
    assert_eq!(
        db.store
            .control(
                x,
                ControlAction::Terminate {
                    reason: "done".into()
                },
                at(5)
            )
            .await
            .unwrap(),
        InstanceStatus::Terminated
    );
    assert!(matches!(
        db.store
            .control(x, ControlAction::Resume { force: false }, at(6))
            .await,
        Err(StoreError::WrongStatus { .. })
    ));
    let unknown = Uuid::now_v7();
    assert!(matches!(
        db.store.control(unknown, suspend("who"), at(7)).await,
        Err(StoreError::NoSuchInstance(id)) if id == unknown
    ));
    let listed = db
        .store
        .list_instances(Some(InstanceStatus::Terminated), 10)
        .await
        .unwrap();
    assert_eq!(listed.iter().map(|s| s.id).collect::<Vec<_>>(), [x]);
}

async fn a_control_row_inserted_with_sql_is_applied_once(db: TestDb) {
    let now = at(0);
    let x = Uuid::now_v7();
    let epoch = started_and_held(&db, &[x], now).await[0].epoch;
    sqlx::query(&format!(
        "INSERT INTO control (instance_id, action, reason) VALUES ('{x}', 'suspend', 'by sql')"
    ))
    .execute(&db.sql)
    .await
    .unwrap();
    let applied = db.store.apply_controls("host-a", at(1), 10).await.unwrap();
    assert_eq!(applied.len(), 1, "{applied:?}");
    assert_eq!(applied[0].instance_id, Some(x));
    assert_eq!(applied[0].result, Ok(InstanceStatus::Suspended));
    assert!(db
        .store
        .apply_controls("host-a", at(2), 10)
        .await
        .unwrap()
        .is_empty());
    assert_eq!(db.status(x).await, Some(InstanceStatus::Suspended));
    let out = db
        .store
        .commit(&[send_point(x, "host-a", epoch, "late", 1, at(3))])
        .await
        .unwrap();
    assert_eq!(out, [CommitOutcome::Fenced]);
}

async fn an_operator_gives_up_a_send_and_purges_its_dead_letter(db: TestDb) {
    let now = at(0);
    let x = Uuid::now_v7();
    let epoch = started_and_held(&db, &[x], now).await[0].epoch;
    let out = db
        .store
        .commit(&[send_point(x, "host-a", epoch, "x1", 1, now)])
        .await
        .unwrap();
    assert_eq!(out, [CommitOutcome::Committed]);
    let given_up = db
        .store
        .give_up_sends(&["send-x1".into()], "not wanted", at(1))
        .await
        .unwrap();
    assert_eq!(given_up, 1);
    let dead = db.store.dead_letters(10).await.unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].id, "send-x1");
    assert!(dead[0].reason.contains("not wanted"), "{dead:?}");
    assert_eq!(
        db.count("SELECT COUNT(*) FROM messages WHERE id = 'send-x1:failed'")
            .await,
        1,
        "the instance is told"
    );
    assert!(db
        .store
        .claim_outbox("host-b", at(100), at(130), 10, &[])
        .await
        .unwrap()
        .is_empty());
    assert_eq!(
        db.store
            .purge_dead_letters(&["send-x1".into()], None)
            .await
            .unwrap(),
        1
    );
    assert_eq!(db.store.dead_letter("send-x1").await.unwrap(), None);
    assert!(db
        .store
        .claim_outbox("host-b", at(101), at(131), 10, &[])
        .await
        .unwrap()
        .is_empty());
}

/// Housekeeping (G1): a message left routed to an instance that ended is kept as a `zombie`,
/// naming the instance; an unrouted message older than its time to live is dead-lettered with
/// a reason, and a younger one stays unrouted. A second pass finds nothing more to do.
async fn housekeeping_keeps_zombies_and_dead_letters_unrouted_messages_past_their_time_to_live(
    db: TestDb,
) {
    let x = Uuid::now_v7();
    let epoch = started_and_held(&db, &[x], at(0)).await[0].epoch;
    let late = NewMessage::to_instance("late", "t.item", MessageKind::Published, json!({}), x);
    let old = NewMessage::published("old", "nobody.listens", json!({}), BTreeMap::new());
    assert_eq!(
        db.store.publish(vec![late, old], at(0)).await.unwrap(),
        [PublishOutcome::Routed(x), PublishOutcome::Unrouted]
    );
    let young = NewMessage::published("young", "nobody.listens", json!({}), BTreeMap::new());
    db.store.publish(vec![young], at(20)).await.unwrap();
    let mut done = send_point(x, "host-a", epoch, "done", 1, at(1));
    done.outbox.clear();
    done.status = InstanceStatus::Completed;
    done.consumed = vec![start_message(&db, x).await.2];
    done.release = true;
    let out = db.store.commit(&[done]).await.unwrap();
    assert_eq!(out, [CommitOutcome::Committed]);
    let first = db.store.housekeeping(at(30), at(10)).await.unwrap();
    assert_eq!(
        first,
        Housekeeping {
            zombies: 1,
            expired: 1
        }
    );
    let status = |id: &'static str| {
        let db = &db;
        async move {
            sqlx::query_scalar::<_, String>("SELECT status FROM messages WHERE id = $1")
                .bind(id)
                .fetch_optional(&db.sql)
                .await
                .unwrap()
        }
    };
    assert_eq!(status("late").await.as_deref(), Some("zombie"));
    assert_eq!(status("young").await.as_deref(), Some("unrouted"));
    let dead = db.store.dead_letter("old").await.unwrap().unwrap();
    assert!(!dead.reason.is_empty(), "{dead:?}");
    assert_eq!(
        db.count_with(
            "SELECT COUNT(*) FROM messages WHERE id = 'late' AND CAST(instance_id AS TEXT) = $1",
            &x.to_string()
        )
        .await,
        1,
        "a zombie names its instance"
    );
    assert_eq!(
        db.store.housekeeping(at(31), at(10)).await.unwrap(),
        Housekeeping::default()
    );
}
