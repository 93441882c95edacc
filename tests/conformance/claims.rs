//! Claims and locks (G3): a message is claimed by one host at a time, a live claimer keeps its
//! claim and a dead one loses it; what a host gives back (unlock, a point that releases its
//! instance) is released, uncounted unless its delivery failed.

use super::*;

crate::backend_tests!(
    a_heartbeat_renews_its_hosts_leases_and_release_gives_everything_up,
    concurrent_claims_never_share_a_message,
    unlocking_gives_back_what_the_host_holds_and_leaves_other_hosts_locks,
    a_point_giving_up_its_instance_releases_what_it_held_and_consumes_the_rest,
    a_claim_says_whether_there_may_be_more,
    an_acquire_suspends_an_instance_whose_row_cannot_be_read_and_takes_the_others,
);

// Taking over the claims and leases of a host that is gone, while other hosts run on the same
// database, is promised by backends that serve many hosts at once (PostgreSQL). SQLite serves one
// host per file: a new host takes everything over at `Store::recover`, which releases all locks
// and leases (checked by the tests above).
crate::many_host_tests!(
    a_live_claimer_keeps_its_claim_and_a_dead_one_loses_it,
    a_claim_on_an_expired_instance_is_not_taken_by_a_third_host,
);

async fn a_live_claimer_keeps_its_claim_and_a_dead_one_loses_it(db: TestDb) {
    let store = db.store.clone();
    let now = at(0);
    store.recover("host-a", now).await.expect("recover a");
    store.recover("host-b", now).await.expect("recover b");
    let inst = new_instance("order");
    store
        .start_instances(vec![inst.clone()], None, now)
        .await
        .expect("start");
    // a claimed (the instance has no owner yet) and is about to acquire: b must not take it.
    assert_eq!(
        store
            .claim_messages("host-a", now, 10)
            .await
            .expect("claim")
            .len(),
        1
    );
    assert!(store
        .claim_messages("host-b", at(1), 10)
        .await
        .expect("claim")
        .is_empty());
    assert_eq!(
        store
            .activity(at(1))
            .await
            .expect("activity")
            .ready_messages,
        0
    );
    // Nor does a claim it twice.
    assert!(store
        .claim_messages("host-a", at(2), 10)
        .await
        .expect("claim")
        .is_empty());
    // a stops beating: after two lease durations (30 s by default) b takes the message.
    store
        .heartbeat("host-b", at(61), at(91))
        .await
        .expect("heartbeat");
    assert_eq!(
        store
            .activity(at(61))
            .await
            .expect("activity")
            .ready_messages,
        1
    );
    assert_eq!(
        store
            .claim_messages("host-b", at(61), 10)
            .await
            .expect("claim")
            .len(),
        1
    );
    // And recovery marks a stopped, not b.
    store.recover("host-c", at(62)).await.expect("recover c");
    let stopped: Vec<String> =
        sqlx::query_scalar("SELECT id FROM hosts WHERE stopped_at IS NOT NULL")
            .fetch_all(&db.sql)
            .await
            .expect("hosts");
    assert_eq!(stopped, ["host-a"]);
}

async fn a_claim_on_an_expired_instance_is_not_taken_by_a_third_host(db: TestDb) {
    let store = db.store.clone();
    let now = at(0);
    for host in ["host-a", "host-b", "host-c"] {
        store.recover(host, now).await.expect("recover");
    }
    let inst = new_instance("order");
    store
        .start_instances(vec![inst.clone()], None, now)
        .await
        .expect("start");
    assert_eq!(
        store
            .claim_messages("host-a", now, 10)
            .await
            .expect("claim")
            .len(),
        1
    );
    let a = store
        .acquire("host-a", &[inst.id], now, at(2))
        .await
        .expect("acquire");
    // a's lease runs out with the message in its memory; b takes it over, then c polls
    // between b's claim and b's acquire: c must leave b's claim alone.
    for host in ["host-b", "host-c"] {
        store
            .heartbeat(host, at(3), at(5))
            .await
            .expect("heartbeat");
    }
    let b = store
        .claim_messages("host-b", at(3), 10)
        .await
        .expect("claim");
    assert_eq!(b.len(), 1);
    assert!(store
        .claim_messages("host-c", at(3), 10)
        .await
        .expect("claim")
        .is_empty());
    let acquired = store
        .acquire("host-b", &[inst.id], at(3), at(5))
        .await
        .expect("acquire");
    assert_eq!(acquired[0].epoch, a[0].epoch + 1);
    // b holds it: neither b nor c claims it again.
    assert!(store
        .claim_messages("host-b", at(4), 10)
        .await
        .expect("claim")
        .is_empty());
    assert!(store
        .claim_messages("host-c", at(4), 10)
        .await
        .expect("claim")
        .is_empty());
}

async fn concurrent_claims_never_share_a_message(db: TestDb) {
    let store = db.store.clone();
    let now = at(0);
    let instances: Vec<NewInstance> = (0..200).map(|_| new_instance("order")).collect();
    store
        .start_instances(instances, None, now)
        .await
        .expect("start");
    // Every host has started before any claims: on SQLite a host's start releases the locks of
    // the hosts before it (one host a file), which would hand their claims out again.
    for h in 0..4 {
        store
            .recover(&format!("host-{h}"), now)
            .await
            .expect("recover");
    }
    let mut tasks = tokio::task::JoinSet::new();
    for h in 0..4 {
        let store = store.clone();
        tasks.spawn(async move {
            let host = format!("host-{h}");
            let mut seqs = Vec::new();
            loop {
                let got = store.claim_messages(&host, now, 7).await.expect("claim");
                if got.is_empty() {
                    return seqs;
                }
                seqs.extend(got.into_iter().map(|m| m.seq));
            }
        });
    }
    let mut all = Vec::new();
    while let Some(seqs) = tasks.join_next().await {
        all.extend(seqs.expect("task"));
    }
    let total = all.len();
    all.sort_unstable();
    all.dedup();
    assert_eq!((total, all.len()), (200, 200));
}

/// `Store::unlock` (a host giving back what it claimed but will not run): its locks are released
/// and their claims given back uncounted, except the messages whose delivery failed, which keep
/// their count (poison protection); another host's locks stay.
async fn unlocking_gives_back_what_the_host_holds_and_leaves_other_hosts_locks(db: TestDb) {
    let store = db.store.clone();
    let now = chrono::Utc::now();
    let (x, y, z) = (Uuid::now_v7(), Uuid::now_v7(), Uuid::now_v7());
    store
        .start_instances(vec![approval(x), approval(y), approval(z)], None, now)
        .await
        .unwrap();
    let claimed = store.claim_messages("host-a", now, 10).await.unwrap();
    assert_eq!(claimed.len(), 3);
    let seq_of = |id| claimed.iter().find(|m| m.instance_id == id).unwrap().seq;
    // y's start message is another host's now (it took the claim over).
    let moved = sqlx::query("UPDATE messages SET locked_by = 'host-b' WHERE seq = $1")
        .bind(seq_of(y))
        .execute(&db.sql)
        .await
        .unwrap();
    assert_eq!(moved.rows_affected(), 1);
    store
        .unlock("host-a", &[x, y, z], &[seq_of(z)])
        .await
        .unwrap();
    let state = |id: Uuid| {
        let sql = db.sql.clone();
        async move {
            sqlx::query_as::<_, (Option<String>, i32)>(
                "SELECT locked_by, delivery_count FROM messages WHERE CAST(instance_id AS TEXT) = $1",
            )
            .bind(id.to_string())
            .fetch_one(&sql)
            .await
            .unwrap()
        }
    };
    assert_eq!(
        state(x).await,
        (None, 0),
        "x: released, its claim given back"
    );
    assert_eq!(
        state(y).await,
        (Some("host-b".to_owned()), 1),
        "y: another host's lock stays"
    );
    assert_eq!(
        state(z).await,
        (None, 1),
        "z: released, its failed delivery counted"
    );
}

/// A point that gives up its instance (dehydration) releases what the host held for it: the
/// messages it claimed and did not consume go back uncounted (the claim was no failed
/// delivery), one whose delivery failed the instance keeps its count (poison protection), its
/// timers are unlocked; a message the same point consumes is consumed, not released.
async fn a_point_giving_up_its_instance_releases_what_it_held_and_consumes_the_rest(db: TestDb) {
    let now = chrono::Utc::now();
    let x = Uuid::now_v7();
    let epoch = started_and_held(&db, &[x], now).await[0].epoch;
    // Three more messages for x, claimed by the host (locked, delivered once), and a timer.
    for id in ["kept", "failed", "consumed"] {
        sqlx::query(
            "INSERT INTO messages (id, message_type, kind, properties, body, status, \
             instance_id, published_at, locked_by, delivery_count) \
             SELECT $1, 't.item', 'published', properties, body, 'routed', instance_id, \
             published_at, 'host-a', 1 FROM messages WHERE kind = 'start' \
             AND CAST(instance_id AS TEXT) = $2",
        )
        .bind(id)
        .bind(x.to_string())
        .execute(&db.sql)
        .await
        .unwrap();
    }
    sqlx::query(
        "INSERT INTO timers (instance_id, name, due_at, locked_by) SELECT instance_id, \
         'reminder', published_at, 'host-a' FROM messages WHERE id = 'kept'",
    )
    .execute(&db.sql)
    .await
    .unwrap();
    let seq = |id: &'static str| {
        let db = &db;
        async move {
            sqlx::query_scalar::<_, i64>("SELECT seq FROM messages WHERE id = $1")
                .bind(id)
                .fetch_one(&db.sql)
                .await
                .unwrap()
        }
    };
    let mut point = send_point(x, "host-a", epoch, "saved", 1, now);
    point.outbox.clear();
    point.status = InstanceStatus::Dehydrated;
    point.reason = cairn::store::Reason::Dehydrate;
    point.release = true;
    point.consumed = vec![seq("consumed").await];
    point.failed = vec![seq("failed").await];
    let out = db.store.commit(&[point]).await.unwrap();
    assert_eq!(out, [cairn::store::CommitOutcome::Committed]);
    let message = |id: &'static str| {
        let db = &db;
        async move {
            sqlx::query_as::<_, (String, Option<String>, i32)>(
                "SELECT status, locked_by, delivery_count FROM messages WHERE id = $1",
            )
            .bind(id)
            .fetch_one(&db.sql)
            .await
            .unwrap()
        }
    };
    assert_eq!(message("kept").await, ("routed".into(), None, 0));
    assert_eq!(message("failed").await, ("routed".into(), None, 1));
    assert_eq!(message("consumed").await, ("consumed".into(), None, 1));
    let timer_lock: Option<String> = sqlx::query_scalar("SELECT locked_by FROM timers")
        .fetch_one(&db.sql)
        .await
        .unwrap();
    assert_eq!(timer_lock, None);
    let detail = db.store.instance_detail(x).await.unwrap().unwrap();
    assert_eq!(detail.summary.status, InstanceStatus::Dehydrated);
}

/// Leases (G4): a heartbeat renews every lease its host holds, so no other host acquires the
/// instance until the renewed lease runs out; `release` at shutdown gives up the leases and the
/// locks, so another host acquires the instance at once with a newer epoch and claims its
/// message again.
async fn a_heartbeat_renews_its_hosts_leases_and_release_gives_everything_up(db: TestDb) {
    let (x, y) = (Uuid::now_v7(), Uuid::now_v7());
    db.store.recover("host-a", at(0)).await.unwrap();
    db.store
        .start_instances(vec![approval(x), approval(y)], None, at(0))
        .await
        .unwrap();
    assert_eq!(
        db.store
            .claim_messages("host-a", at(0), 10)
            .await
            .unwrap()
            .len(),
        2
    );
    let held = db
        .store
        .acquire("host-a", &[x, y], at(0), at(30))
        .await
        .unwrap();
    assert_eq!(held.len(), 2);
    db.store.heartbeat("host-a", at(20), at(60)).await.unwrap();
    assert!(
        db.store
            .acquire("host-b", &[x], at(40), at(70))
            .await
            .unwrap()
            .is_empty(),
        "the lease was renewed to 60"
    );
    db.store.release("host-a", at(41)).await.unwrap();
    assert_eq!(
        db.count("SELECT COUNT(*) FROM instances WHERE owner IS NOT NULL")
            .await,
        0,
        "no lease left"
    );
    let taken = db
        .store
        .acquire("host-b", &[x], at(42), at(72))
        .await
        .unwrap();
    assert_eq!(taken.len(), 1);
    assert!(taken[0].epoch > held[0].epoch);
    let again = db.store.claim_messages("host-b", at(42), 10).await.unwrap();
    assert_eq!(
        again.iter().filter(|m| m.instance_id == x).count(),
        1,
        "its start message is claimed again"
    );
}

/// A claim tells the host whether to claim again at once: a full claim may have left work
/// behind, a claim that took all there was did not. (How full is full is the backend's own
/// business; the host only reads `more`.)
async fn a_claim_says_whether_there_may_be_more(db: TestDb) {
    let store = db.store.clone();
    let now = at(0);
    store.recover("host-a", now).await.expect("recover");
    let instances: Vec<_> = (0..5).map(|_| new_instance("order")).collect();
    store
        .start_instances(instances.clone(), None, now)
        .await
        .expect("start");

    let first = store.claim_messages("host-a", now, 2).await.expect("claim");
    assert_eq!(first.len(), 2);
    assert!(
        first.more,
        "a claim of 2 that took 2 of 5 may have left more"
    );
    let rest = store
        .claim_messages("host-a", now, 10)
        .await
        .expect("claim");
    assert_eq!(rest.len(), 3);
    assert!(!rest.more, "a claim of 10 that took the last 3 left none");
    let none = store
        .claim_messages("host-a", now, 10)
        .await
        .expect("claim");
    assert!(none.is_empty() && !none.more);

    // Timers likewise: five instances each wait for one.
    let ids: Vec<_> = instances.iter().map(|i| i.id).collect();
    let records = store
        .acquire("host-a", &ids, now, at(30))
        .await
        .expect("acquire");
    let seq_of = |id| {
        first
            .iter()
            .chain(rest.iter())
            .find(|m| m.instance_id == id)
            .unwrap()
            .seq
    };
    let points: Vec<_> = records
        .iter()
        .map(|r| {
            let mut p = point(r.id, r.epoch, "host-a", 1, now);
            p.consumed = vec![seq_of(r.id)];
            p.set_timers = vec![("t".into(), at(10))];
            p.release = true;
            p
        })
        .collect();
    store.commit(&points).await.expect("commit");
    let due = store
        .claim_timers("host-a", at(20), 2)
        .await
        .expect("timers");
    assert_eq!(due.len(), 2);
    assert!(due.more, "a claim of 2 timers of 5 due may have left more");
    let due = store
        .claim_timers("host-a", at(20), 10)
        .await
        .expect("timers");
    assert_eq!(due.len(), 3);
    assert!(
        !due.more,
        "a claim of 10 timers that took the last 3 left none"
    );
}

/// An acquire returns the instances it leased whose rows can be read; one whose row cannot be
/// read (a tool wrote a value of the wrong kind into it) is left out and suspended with the
/// reason, so that no host claims it again until an operator fixes it, and the others are taken.
async fn an_acquire_suspends_an_instance_whose_row_cannot_be_read_and_takes_the_others(db: TestDb) {
    let store = db.store.clone();
    let now = at(0);
    store.recover("host-a", now).await.expect("recover");
    let (good, broken) = (new_instance("order"), new_instance("order"));
    store
        .start_instances(vec![good.clone(), broken.clone()], None, now)
        .await
        .expect("start");
    let garble = match db.backend {
        support::Backend::Sqlite => "version = 'one'",
        support::Backend::Postgres => "version = -1",
    };
    sqlx::query(&format!(
        "UPDATE instances SET {garble} WHERE CAST(id AS TEXT) = '{}'",
        broken.id
    ))
    .execute(&db.sql)
    .await
    .expect("garbled");
    let acquired = store
        .acquire("host-a", &[good.id, broken.id], now, at(30))
        .await
        .expect("an unreadable row fails no acquire");
    let ids: Vec<Uuid> = acquired.iter().map(|r| r.id).collect();
    assert_eq!(ids, [good.id], "only the readable instance is taken");
    let broken_id = broken.id.to_string();
    assert_eq!(
        db.texts(
            "SELECT status FROM instances WHERE CAST(id AS TEXT) = $1",
            &broken_id
        )
        .await,
        ["suspended"]
    );
    let error = db
        .texts(
            "SELECT last_error FROM instances WHERE CAST(id AS TEXT) = $1",
            &broken_id,
        )
        .await;
    assert!(error[0].contains("cannot be read"), "{error:?}");
    assert_eq!(
        db.texts(
            "SELECT owner FROM instances WHERE CAST(id AS TEXT) = $1",
            &good.id.to_string()
        )
        .await,
        ["host-a"]
    );
}
