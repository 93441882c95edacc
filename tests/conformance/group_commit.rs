//! Group commit: many points in one `commit`, each fenced and all-or-nothing on its own; a point
//! that cannot be written fails the whole call and writes nothing. Also the write paths: every
//! way a backend may write a group must leave the database as one transaction per group would.

use super::*;

crate::backend_tests!(
    a_group_commit_fences_each_point_and_writes_an_instances_points_in_order,
    a_large_group_commit_fences_each_point_too,
    a_point_consuming_a_message_not_routed_to_its_instance_fails_and_writes_nothing,
);

/// One group commit of several points (G4): each point is fenced on its own, a fenced one writes
/// nothing while the others commit, and each point of an instance is fenced against the row its
/// earlier point in the group wrote.
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
            earlier: false,
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
            earlier: false,
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
                    earlier: false,
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
            matches!(&err, StoreError::NotRouted(text) if text.contains("consumed twice")),
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
