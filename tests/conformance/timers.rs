//! Timers: claimed when due, once, by the host that holds the instance; a point's cancellations
//! go before its new due times.

use super::*;

crate::backend_tests!(
    timers_are_claimed_when_due_once,
    a_group_commit_cancels_re_arms_and_sets_each_instances_timers,
);

async fn timers_are_claimed_when_due_once(db: TestDb) {
    let store = db.store.clone();
    let now = at(0);
    store.recover("host-a", now).await.expect("recover");
    let inst = new_instance("order");
    store
        .start_instances(vec![inst.clone()], None, now)
        .await
        .expect("start");
    let msgs = store
        .claim_messages("host-a", now, 10)
        .await
        .expect("claim");
    let rec = store
        .acquire("host-a", &[inst.id], now, at(30))
        .await
        .expect("acquire");
    let mut p = point(inst.id, rec[0].epoch, "host-a", 1, now);
    p.consumed = vec![msgs[0].seq];
    p.set_timers = vec![("t1".into(), at(10)), ("t2".into(), at(20))];
    p.release = true;
    store.commit(&[p]).await.expect("commit");
    assert!(store
        .claim_timers("host-a", at(5), 10)
        .await
        .expect("timers")
        .is_empty());
    assert_eq!(
        store.activity(at(5)).await.expect("activity").next_timer_at,
        Some(at(10))
    );
    let due = store
        .claim_timers("host-a", at(25), 10)
        .await
        .expect("timers");
    assert_eq!(
        due.iter().map(|t| t.name.as_str()).collect::<Vec<_>>(),
        ["t1", "t2"]
    );
    assert!(store
        .claim_timers("host-b", at(25), 10)
        .await
        .expect("timers")
        .is_empty());
    store
        .unlock("host-a", &[inst.id], &[])
        .await
        .expect("unlock");
    assert_eq!(
        store
            .claim_timers("host-b", at(25), 10)
            .await
            .expect("timers")
            .len(),
        2
    );
}

/// Timers in a group commit: each instance's cancellations go before its new due times (a timer
/// fired and set again in one point stays, at its new time), and instances' timers do not mix.
/// Fails if a group's timers are deleted after they are set, or written to the wrong instance.
async fn a_group_commit_cancels_re_arms_and_sets_each_instances_timers(db: TestDb) {
    let now = chrono::Utc::now();
    let at = |s: i64| now + chrono::Duration::seconds(s);
    let (x, y) = (Uuid::now_v7(), Uuid::now_v7());
    let held = started_and_held(&db, &[x, y], now).await;
    let epoch = |id| held.iter().find(|r| r.id == id).unwrap().epoch;
    let point = |id, seq, cancel: &[&str], set: &[(&str, i64)]| {
        let mut p = send_point(id, "host-a", epoch(id), "timers", seq, now);
        p.outbox.clear();
        p.cancel_timers = cancel.iter().map(|n| n.to_string()).collect();
        p.set_timers = set.iter().map(|(n, s)| (n.to_string(), at(*s))).collect();
        p
    };
    db.store
        .commit(&[
            point(x, 1, &[], &[("t1", 10), ("t2", 20)]),
            point(y, 1, &[], &[("t1", 30)]),
        ])
        .await
        .unwrap();
    // x's t1 fired and is set again for later; its t2 is cancelled.
    db.store
        .commit(&[
            point(x, 2, &["t1", "t2"], &[("t1", 40)]),
            point(y, 2, &[], &[]),
        ])
        .await
        .unwrap();
    let due = |s| {
        let store = db.store.clone();
        async move {
            store
                .claim_timers("host-a", at(s), 10)
                .await
                .unwrap()
                .into_iter()
                .map(|t| (t.instance_id, t.name))
                .collect::<Vec<_>>()
        }
    };
    assert_eq!(due(35).await, [(y, "t1".to_owned())]);
    assert_eq!(due(45).await, [(x, "t1".to_owned())]);
}
