//! Bad input at a persistence point: an instance whose point the database refuses (or that can
//! never be stored) is suspended alone, with the reason, while the points it shared a group
//! commit with are written.

use std::collections::BTreeMap;
use std::time::Duration;

use cairn::store::faulty::FaultPlan;
use cairn::store::{ControlAction, InstanceStatus, Reason};
use cairn::{Client, PortError, Ports};
use serde_json::json;
use uuid::Uuid;

use crate::backend_tests;
use crate::support::fixtures::{fast_config, Deliveries, HostSetup, HostThread};
use crate::support::TestDb;

backend_tests!(
    a_point_that_cannot_be_stored_suspends_only_its_instance,
    a_group_commit_the_database_refuses_still_commits_its_other_points,
    a_port_error_holding_a_nul_is_recorded,
);

const GOOD: usize = 20;

/// Starts `GOOD` collectors and one with `bad_key`, in one call (so that their first points
/// share a group commit), at position `GOOD / 2`. Returns the ids of the good ones and the bad one.
async fn start_collectors(client: &Client, bad_key: &str) -> (Vec<(Uuid, String)>, Uuid) {
    let mut starts: Vec<(String, serde_json::Value)> = (0..GOOD)
        .map(|i| {
            (
                "collector".to_owned(),
                json!({ "key": format!("good-{i}") }),
            )
        })
        .collect();
    starts.insert(
        GOOD / 2,
        ("collector".to_owned(), json!({ "key": bad_key })),
    );
    let mut ids = client.start_many(starts).await.expect("started");
    let bad = ids.remove(GOOD / 2);
    let good = ids
        .into_iter()
        .enumerate()
        .map(|(i, id)| (id, format!("good-{i}")))
        .collect();
    (good, bad)
}

/// Finishes the good collectors and waits until each has completed.
async fn finish(db: &TestDb, client: &Client, good: &[(Uuid, String)]) {
    for (i, (_, key)) in good.iter().enumerate() {
        for (ty, body) in [
            ("item", json!({ "key": key, "n": i })),
            ("collect.done", json!({ "key": key })),
        ] {
            client
                .publish(ty, body, None, BTreeMap::new())
                .await
                .expect("publish");
        }
    }
    for (id, _) in good {
        db.wait_status(*id, InstanceStatus::Completed, Duration::from_secs(30))
            .await;
    }
}

async fn last_error(db: &TestDb, id: Uuid) -> String {
    let detail = db
        .store
        .instance_detail(id)
        .await
        .expect("detail")
        .expect("the instance exists");
    detail.summary.last_error.unwrap_or_default()
}

async fn suspensions(db: &TestDb, id: Uuid) -> usize {
    let detail = db.store.instance_detail(id).await.expect("detail");
    let history = detail.expect("the instance exists").history;
    // No gap: every point the instance wrote is there, numbered from 1.
    let seqs: Vec<i64> = history.iter().map(|h| h.seq).collect();
    let expected: Vec<i64> = (1..=seqs.len() as i64).collect();
    let mut sorted = seqs.clone();
    sorted.sort();
    assert_eq!(sorted, expected, "history of {id} has a gap");
    history
        .iter()
        .filter(|h| h.reason == Reason::Suspend)
        .count()
}

/// A collector started with a NUL in its key waits on a correlation no backend can store as
/// text. Its first point is refused before it reaches the database, on both backends alike:
/// the instance is suspended with the reason and a history row, the twenty instances started in
/// the same call (and committed in the same group) complete, and a resume that runs the same
/// point again is refused again without harm.
async fn a_point_that_cannot_be_stored_suspends_only_its_instance(db: TestDb) {
    let (host, client) = HostThread::start(&db, fast_config(), Deliveries::default()).await;
    let (good, bad) = start_collectors(&client, "bad\u{0}key").await;

    db.wait_status(bad, InstanceStatus::Suspended, Duration::from_secs(30))
        .await;
    let error = last_error(&db, bad).await;
    assert!(
        error.contains("refused") && error.contains("NUL"),
        "last_error says why: {error}"
    );
    assert_eq!(suspensions(&db, bad).await, 1);
    finish(&db, &client, &good).await;

    // The start message the refused point consumed is not consumed: it keeps its delivery
    // count (poison protection counts the attempt), and is delivered again on resume, which
    // runs the same point: refused again, suspended again, the host unharmed.
    let counted = "SELECT CAST(COALESCE(SUM(delivery_count), 0) AS BIGINT) FROM messages \
                   WHERE CAST(instance_id AS TEXT) = $1 AND status = 'routed'";
    assert_eq!(db.count_with(counted, &bad.to_string()).await, 1);
    db.store
        .control(
            bad,
            ControlAction::Resume { force: false },
            chrono::Utc::now(),
        )
        .await
        .expect("resume");
    db.wait_for(
        "the instance suspended again",
        Duration::from_secs(30),
        || async {
            suspensions(&db, bad).await == 2
                && db.status(bad).await == Some(InstanceStatus::Suspended)
        },
    )
    .await;
    assert_eq!(db.count_with(counted, &bad.to_string()).await, 1);

    // The host is alive: a new instance still completes.
    let later = client
        .start("collector", json!({ "key": "later" }))
        .await
        .expect("start");
    finish(&db, &client, &[(later, "later".to_owned())]).await;
    host.stop();
}

/// The database refuses (an injected, non-retryable data error) every commit that carries one
/// instance's point. The group commit it shares with twenty others is split until that point
/// stands alone: the others are written, the refused one's instance is suspended at its last
/// persistence point with the database's error, and the host goes on.
async fn a_group_commit_the_database_refuses_still_commits_its_other_points(db: TestDb) {
    let plan = FaultPlan::new();
    plan.refuse_points_waiting_for("refuse-me");
    let (host, client) = HostThread::start_with(
        &db,
        fast_config(),
        Deliveries::default(),
        Some(plan.clone()),
    )
    .await;
    let (good, bad) = start_collectors(&client, "refuse-me").await;

    db.wait_status(bad, InstanceStatus::Suspended, Duration::from_secs(30))
        .await;
    let error = last_error(&db, bad).await;
    assert!(
        error.contains("refused") && error.contains("injected refusal"),
        "last_error carries the database's error: {error}"
    );
    assert_eq!(suspensions(&db, bad).await, 1);
    finish(&db, &client, &good).await;
    for (id, _) in &good {
        assert_eq!(suspensions(&db, *id).await, 0);
    }
    // The start message the refused point had consumed is not consumed: it is delivered again
    // on resume.
    let consumed = db
        .count_with(
            "SELECT COUNT(*) FROM messages WHERE CAST(instance_id AS TEXT) = $1 AND status = 'consumed'",
            &bad.to_string(),
        )
        .await;
    assert_eq!(consumed, 0);
    host.stop();
}

/// A send port fails with an error text holding a NUL (text from outside: a remote system's
/// answer). The dead letter records it, spelled out, on both backends; the record of the
/// delivery never fails, and the other instances' sends and completions go on.
async fn a_port_error_holding_a_nul_is_recorded(db: TestDb) {
    let mut setup = HostSetup::new(fast_config(), Deliveries::default());
    setup.ports = Box::new(|_| {
        Ports::new().function("log", |msg| async move {
            if msg.body == json!("nul-error") {
                Err(PortError::permanent("the remote said: bad\u{0}answer"))
            } else {
                Ok(None)
            }
        })
    });
    let (host, client) = HostThread::launch(&db, setup).await;
    let (good, bad) = start_collectors(&client, "nul-error").await;
    db.wait_for("the dead letter", Duration::from_secs(30), || async {
        db.count("SELECT COUNT(*) FROM dead_letters").await == 1
    })
    .await;
    let reasons = db
        .texts(
            "SELECT reason FROM dead_letters WHERE message_type = $1",
            "collect.started",
        )
        .await;
    assert_eq!(reasons.len(), 1);
    assert!(
        reasons[0].contains("bad\\0answer"),
        "the reason keeps the port's words, NUL spelled out: {:?}",
        reasons[0]
    );
    finish(&db, &client, &good).await;
    let _ = bad;
    host.stop();
}
