//! Bad input: rows an operator or a tool writes into the tables the engine reads, with plain SQL.
//! A wrong storage class (SQLite keeps whatever it is given), a NULL, garbage text in a status,
//! JSON or time column, a NUL escape: each ends as a record with a reason (a `rejected` control
//! row, a dead letter, a suspended instance), never as a panic or a stop for the rows beside it.
//! Each test also starts a good instance alongside (an approval fed through the `inbox` table)
//! and checks that it completes.

use std::time::Duration;

use crate::backend_tests;
use crate::support::fixtures::{fast_config, Deliveries, HostThread};
use crate::support::processes::{new_run, HOST_ARGS};
use crate::support::{Backend, TestDb};
use cairn::store::InstanceStatus;

backend_tests!(
    control_rows_of_the_wrong_type_are_rejected_naming_the_column,
    a_control_row_with_text_in_force_does_not_crash_loop_a_host_process,
    inbox_rows_that_cannot_be_read_are_dead_lettered_and_the_rows_behind_them_published,
    an_inbox_row_with_a_nul_in_a_property_is_dead_lettered_not_retried_forever,
    an_inbox_row_over_the_maximum_message_size_is_dead_lettered,
    a_message_row_that_cannot_be_read_is_dead_lettered,
    an_instance_row_that_cannot_be_read_suspends_that_instance_only,
    an_outbox_row_that_cannot_be_read_is_dead_lettered_and_other_sends_go_out,
    subscription_rows_that_cannot_be_read_route_nothing_and_stop_nothing,
    an_inbox_row_the_database_refuses_is_dead_lettered_with_its_error,
);

const WAIT: Duration = Duration::from_secs(20);

/// A good approval, through the `inbox` table: its request and its decision.
async fn feed_good_approval(db: &TestDb, tag: &str) {
    for sql in [
        format!(
            "INSERT INTO inbox (message_id, message_type, body) VALUES ('{tag}-req', \
             'approval.requested', '{{\"request_id\": \"{tag}\", \"approver\": \"bo\"}}')"
        ),
        format!(
            "INSERT INTO inbox (message_id, message_type, body) VALUES ('{tag}-dec', \
             'approval.decision', '{{\"request_id\": \"{tag}\", \"approved\": true, \"by\": \"bo\"}}')"
        ),
    ] {
        sqlx::query(&sql).execute(&db.sql).await.unwrap();
    }
}

/// Waits until the good approval completed.
async fn wait_good_approval(db: &TestDb) {
    db.wait_for("the good approval to complete", WAIT, || async {
        db.count(
            "SELECT COUNT(*) FROM instances WHERE orchestration = 'approval' AND status = 'completed'",
        )
        .await
            == 1
    })
    .await;
}

async fn exec(db: &TestDb, sql: &str) {
    sqlx::query(sql)
        .execute(&db.sql)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
}

/// The `result` of every rejected control row, in id order.
async fn rejected_controls(db: &TestDb) -> Vec<String> {
    db.texts(
        "SELECT result FROM control WHERE status = 'rejected' AND result <> $1 ORDER BY id",
        "",
    )
    .await
}

/// The reason of every dead letter, in id order.
async fn dead_reasons(db: &TestDb) -> Vec<(String, String)> {
    sqlx::query_as::<_, (String, String)>("SELECT id, reason FROM dead_letters ORDER BY id")
        .fetch_all(&db.sql)
        .await
        .unwrap()
}

const NO_SUCH: &str = "00000000-0000-7000-8000-000000000000";

async fn control_rows_of_the_wrong_type_are_rejected_naming_the_column(db: TestDb) {
    let (host, client) = HostThread::start(&db, fast_config(), Deliveries::default()).await;
    // An instance the good request acts on.
    let target = client
        .start(
            "approval",
            serde_json::json!({"request_id": "target", "approver": "x", "escalate_after_ms": 600000}),
        )
        .await
        .unwrap();
    db.wait_first_point(target, WAIT).await;
    let bad: Vec<String> = match db.backend {
        // What SQLite's flexible typing lets anyone write.
        Backend::Sqlite => vec![
            format!("INSERT INTO control (instance_id, action, force) VALUES ('{NO_SUCH}', 'resume', 'true')"),
            format!("INSERT INTO control (instance_id, action, reason) VALUES ('{target}', 'suspend', X'00ff')"),
            "INSERT INTO control (instance_id, action) VALUES (X'00ff', 'terminate')".to_owned(),
            format!("INSERT INTO control (instance_id, action, force) VALUES ('{target}', 'resume', 2.5)"),
        ],
        // PostgreSQL's types admit no such row: a request for an instance that does not exist.
        Backend::Postgres => vec![format!(
            "INSERT INTO control (instance_id, action, force) VALUES ('{NO_SUCH}', 'resume', 'true')"
        )],
    };
    for sql in &bad {
        exec(&db, sql).await;
    }
    // A good request behind the bad ones is carried out.
    exec(
        &db,
        &format!("INSERT INTO control (instance_id, action, reason) VALUES ('{target}', 'terminate', 'done with it')"),
    )
    .await;
    feed_good_approval(&db, "ctl").await;
    db.wait_status(target, InstanceStatus::Terminated, WAIT)
        .await;
    wait_good_approval(&db).await;
    db.wait_for("every control row answered", WAIT, || async {
        db.count("SELECT COUNT(*) FROM control WHERE status = 'pending'")
            .await
            == 0
    })
    .await;
    let rejected = rejected_controls(&db).await;
    assert_eq!(rejected.len(), bad.len(), "{rejected:#?}");
    match db.backend {
        Backend::Sqlite => {
            assert!(
                rejected[0].contains("column force holds TEXT \"true\""),
                "{rejected:#?}"
            );
            assert!(
                rejected[1].contains("column reason holds BLOB x'00ff'"),
                "{rejected:#?}"
            );
            assert!(
                rejected[2].contains("column instance_id holds BLOB x'00ff'"),
                "{rejected:#?}"
            );
            assert!(
                rejected[3].contains("column force holds REAL 2.5"),
                "{rejected:#?}"
            );
        }
        Backend::Postgres => {
            assert!(rejected[0].contains(NO_SUCH), "{rejected:#?}");
        }
    }
    assert_eq!(
        db.count("SELECT COUNT(*) FROM control WHERE status = 'done'")
            .await,
        1
    );
    host.stop();
}

async fn a_control_row_with_text_in_force_does_not_crash_loop_a_host_process(db: TestDb) {
    // The row is there before the host starts: it used to panic on every start.
    exec(
        &db,
        &format!("INSERT INTO control (instance_id, action, force) VALUES ('{NO_SUCH}', 'resume', 'true')"),
    )
    .await;
    if db.backend == Backend::Sqlite {
        exec(
            &db,
            "INSERT INTO inbox (message_id, message_type, body) VALUES (X'01', 'approval.requested', '{}')",
        )
        .await;
    }
    let run = new_run(db).await;
    let mut host = run.spawn(1, 0, HOST_ARGS, "warn");
    let db = &run.db;
    feed_good_approval(db, "proc").await;
    db.wait_for("the control row rejected", WAIT, || async {
        db.count("SELECT COUNT(*) FROM control WHERE status = 'rejected'")
            .await
            == 1
    })
    .await;
    wait_good_approval(db).await;
    // And a bad row written while it runs.
    exec(
        db,
        &format!("INSERT INTO control (instance_id, action, force) VALUES ('{NO_SUCH}', 'resume', 'true')"),
    )
    .await;
    db.wait_for("the second control row rejected", WAIT, || async {
        db.count("SELECT COUNT(*) FROM control WHERE status = 'rejected'")
            .await
            == 2
    })
    .await;
    assert!(
        host.0.try_wait().unwrap().is_none(),
        "the host exited: {}",
        run.log_of(1)
    );
    assert_eq!(db.count("SELECT COUNT(*) FROM inbox").await, 0);
    crate::support::processes::stop(host);
    assert!(
        !run.log_of(1).contains("panicked"),
        "the host panicked: {}",
        run.log_of(1)
    );
}

async fn inbox_rows_that_cannot_be_read_are_dead_lettered_and_the_rows_behind_them_published(
    db: TestDb,
) {
    let bad: Vec<(&str, &str)> = match db.backend {
        Backend::Sqlite => vec![
            (
                "INSERT INTO inbox (message_id, message_type, body) VALUES ('b1', 'approval.requested', X'00ff')",
                "column body holds BLOB x'00ff'",
            ),
            (
                "INSERT INTO inbox (message_id, message_type, body) VALUES ('b2', X'00ff', '{}')",
                "column message_type holds BLOB x'00ff'",
            ),
            (
                "INSERT INTO inbox (message_id, message_type, body) VALUES (X'00ff', 'approval.requested', '{}')",
                "column message_id holds BLOB x'00ff'",
            ),
            (
                "INSERT INTO inbox (message_id, message_type, properties, body) VALUES ('b4', 'approval.requested', X'7b7d', '{}')",
                "column properties holds BLOB x'7b7d'",
            ),
            (
                "INSERT INTO inbox (message_id, message_type, body) VALUES ('b5', 'approval.requested', CAST(X'ff' AS TEXT))",
                "column body holds TEXT that is not UTF-8",
            ),
        ],
        Backend::Postgres => vec![
            (
                "INSERT INTO inbox (message_id, message_type, body) VALUES ('b1', 'approval.requested', 'not json')",
                "the body is not JSON",
            ),
            (
                "INSERT INTO inbox (message_id, message_type, properties, body) VALUES ('b2', 'approval.requested', '[1]', '{}')",
                "properties are not a JSON object",
            ),
        ],
    };
    for (sql, _) in &bad {
        exec(&db, sql).await;
    }
    feed_good_approval(&db, "behind").await;
    let (host, _client) = HostThread::start(&db, fast_config(), Deliveries::default()).await;
    wait_good_approval(&db).await;
    db.wait_for("the inbox to empty", WAIT, || async {
        db.count("SELECT COUNT(*) FROM inbox").await == 0
    })
    .await;
    let dead = dead_reasons(&db).await;
    assert_eq!(dead.len(), bad.len(), "{dead:#?}");
    for ((_, why), (id, reason)) in bad.iter().zip(&dead) {
        assert!(id.starts_with("inbox-"), "{dead:#?}");
        assert!(reason.contains(why), "{reason} should say {why}");
    }
    // `cairn dead-letters list` lists every one: a body that is not JSON shows as its text,
    // text that is not UTF-8 (SQLite keeps it as written) with replacement characters.
    let listed = db
        .store
        .dead_letters(100)
        .await
        .expect("a listing despite an unreadable dead letter");
    let ids: Vec<&str> = listed.iter().map(|d| d.id.as_str()).collect();
    assert_eq!(listed.len(), bad.len(), "{ids:?}");
    // Written while the host runs, too.
    if db.backend == Backend::Sqlite {
        exec(
            &db,
            "INSERT INTO inbox (message_id, message_type, body) VALUES ('late', 'approval.requested', X'00')",
        )
        .await;
        db.wait_for("the late row dead-lettered", WAIT, || async {
            db.count("SELECT COUNT(*) FROM dead_letters").await == bad.len() as i64 + 1
        })
        .await;
    }
    host.stop();
}

async fn an_inbox_row_with_a_nul_in_a_property_is_dead_lettered_not_retried_forever(db: TestDb) {
    // A promoted body field and an explicit property, each holding a NUL escape: PostgreSQL
    // cannot store either as text. The same refusal on every backend.
    exec(
        &db,
        "INSERT INTO inbox (message_id, message_type, body) VALUES ('nul-1', 'approval.requested', \
         '{\"request_id\":\"r\\u0000x\",\"approver\":\"a\"}')",
    )
    .await;
    exec(
        &db,
        "INSERT INTO inbox (message_id, message_type, properties, body) VALUES ('nul-2', \
         'approval.requested', '{\"request_id\":\"p\\u0000q\"}', '{\"approver\":\"a\"}')",
    )
    .await;
    // A NUL nested in the body is fine: bodies are stored as JSON text.
    exec(
        &db,
        "INSERT INTO inbox (message_id, message_type, body) VALUES ('nul-3', 'approval.requested', \
         '{\"request_id\":\"nested\",\"approver\":\"a\",\"note\":{\"text\":\"a\\u0000b\"}}')",
    )
    .await;
    feed_good_approval(&db, "after-nul").await;
    let (host, _client) = HostThread::start(&db, fast_config(), Deliveries::default()).await;
    wait_good_approval(&db).await;
    db.wait_for("the inbox to empty", WAIT, || async {
        db.count("SELECT COUNT(*) FROM inbox").await == 0
    })
    .await;
    let dead = dead_reasons(&db).await;
    assert_eq!(dead.len(), 2, "{dead:#?}");
    assert!(
        dead[0].1.contains("property \"request_id\" contains a NUL"),
        "{dead:#?}"
    );
    assert!(
        dead[1].1.contains("property \"request_id\" contains a NUL"),
        "{dead:#?}"
    );
    // The nested NUL was published, and its body kept intact.
    let body = db
        .texts("SELECT body FROM messages WHERE id = $1", "nul-3")
        .await;
    let body: serde_json::Value = serde_json::from_str(&body[0]).unwrap();
    assert_eq!(body["note"]["text"], "a\u{0}b");
    host.stop();
}

async fn an_inbox_row_over_the_maximum_message_size_is_dead_lettered(db: TestDb) {
    let big = "x".repeat(4096);
    exec(
        &db,
        &format!(
            "INSERT INTO inbox (message_id, message_type, body) VALUES ('big', 'approval.requested', \
             '{{\"request_id\":\"big\",\"approver\":\"a\",\"pad\":\"{big}\"}}')"
        ),
    )
    .await;
    feed_good_approval(&db, "small").await;
    let config = cairn::HostConfig {
        max_message_bytes: 1024,
        ..fast_config()
    };
    let (host, _client) = HostThread::start(&db, config, Deliveries::default()).await;
    wait_good_approval(&db).await;
    let dead = dead_reasons(&db).await;
    assert_eq!(dead.len(), 1, "{dead:#?}");
    assert!(
        dead[0]
            .1
            .contains("over the maximum message size of 1024 bytes"),
        "{dead:#?}"
    );
    host.stop();
}

async fn a_message_row_that_cannot_be_read_is_dead_lettered(db: TestDb) {
    let (host, client) = HostThread::start(&db, fast_config(), Deliveries::default()).await;
    let target = client
        .start(
            "approval",
            serde_json::json!({"request_id": "garbled", "approver": "x", "escalate_after_ms": 600000}),
        )
        .await
        .unwrap();
    db.wait_first_point(target, WAIT).await;
    // A decision for it, garbled in the table before the host claims it: a tool wrote the
    // message straight into `messages`.
    let garble = match db.backend {
        Backend::Sqlite => "X'00ff'",
        Backend::Postgres => "'not json'",
    };
    exec(
        &db,
        &format!(
            "INSERT INTO messages (id, message_type, kind, properties, body, status, instance_id, \
             published_at) VALUES ('garbled', 'approval.decision', 'published', '{{}}', {garble}, \
             'routed', '{target}', '2026-01-01T00:00:00.000000Z')"
        ),
    )
    .await;
    feed_good_approval(&db, "beside").await;
    db.wait_for("the garbled message dead-lettered", WAIT, || async {
        db.count("SELECT COUNT(*) FROM dead_letters WHERE id = 'garbled'")
            .await
            == 1
    })
    .await;
    let reason = db
        .texts("SELECT reason FROM dead_letters WHERE id = $1", "garbled")
        .await;
    assert!(reason[0].contains("cannot be read"), "{reason:?}");
    assert!(reason[0].contains("body"), "{reason:?}");
    assert_eq!(
        db.texts("SELECT status FROM messages WHERE id = $1", "garbled")
            .await,
        ["dead"]
    );
    wait_good_approval(&db).await;
    // Its instance is untouched: still waiting for a decision.
    let status = db.status(target).await;
    assert!(
        matches!(
            status,
            Some(InstanceStatus::Running | InstanceStatus::Dehydrated)
        ),
        "{status:?}"
    );
    host.stop();
}

async fn an_instance_row_that_cannot_be_read_suspends_that_instance_only(db: TestDb) {
    let config = cairn::HostConfig {
        dehydrate_after: Duration::from_millis(50),
        ..fast_config()
    };
    let (host, client) = HostThread::start(&db, config, Deliveries::default()).await;
    let target = client
        .start(
            "approval",
            serde_json::json!({"request_id": "broken", "approver": "x", "escalate_after_ms": 600000}),
        )
        .await
        .unwrap();
    db.wait_status(target, InstanceStatus::Dehydrated, WAIT)
        .await;
    // A tool writes garbage into its row while it is out of memory.
    let garble = match db.backend {
        Backend::Sqlite => "version = 'one'",
        Backend::Postgres => "version = -1",
    };
    exec(
        &db,
        &format!("UPDATE instances SET {garble} WHERE CAST(id AS TEXT) = '{target}'"),
    )
    .await;
    // Its decision arrives: loading it fails.
    exec(
        &db,
        "INSERT INTO inbox (message_id, message_type, body) VALUES ('broken-dec', \
         'approval.decision', '{\"request_id\": \"broken\", \"approved\": true, \"by\": \"bo\"}')",
    )
    .await;
    feed_good_approval(&db, "healthy").await;
    // Read with SQL: the store's summaries cannot read the garbled row either.
    let id = target.to_string();
    db.wait_for("the broken instance suspended", WAIT, || async {
        db.count_with(
            "SELECT COUNT(*) FROM instances WHERE CAST(id AS TEXT) = $1 AND status = 'suspended'",
            &id,
        )
        .await
            == 1
    })
    .await;
    let error = db
        .texts(
            "SELECT last_error FROM instances WHERE CAST(id AS TEXT) = $1",
            &id,
        )
        .await;
    assert!(error[0].contains("cannot be read"), "{error:?}");
    assert!(error[0].contains("version"), "{error:?}");
    wait_good_approval(&db).await;
    // `cairn list` leaves the garbled row out and shows the others.
    let listed = db
        .store
        .list_instances(None, 100)
        .await
        .expect("a listing despite the garbled row");
    assert!(!listed.iter().any(|s| s.id == target));
    assert!(listed.iter().any(|s| s.status == InstanceStatus::Completed));
    host.stop();
}

async fn an_outbox_row_that_cannot_be_read_is_dead_lettered_and_other_sends_go_out(db: TestDb) {
    let deliveries = Deliveries::default();
    let (host, client) = HostThread::start(&db, fast_config(), deliveries.clone()).await;
    let target = client
        .start(
            "approval",
            serde_json::json!({"request_id": "sender", "approver": "x", "escalate_after_ms": 600000}),
        )
        .await
        .unwrap();
    db.wait_first_point(target, WAIT).await;
    // A send written by a tool, its body garbled.
    let garble = match db.backend {
        Backend::Sqlite => "X'00ff'",
        Backend::Postgres => "'not json'",
    };
    exec(
        &db,
        &format!(
            "INSERT INTO outbox (id, instance_id, port, message_type, body, expects_reply, status, \
             attempts, next_attempt_at, created_at) VALUES ('bad-send', '{target}', 'log', 'note', \
             {garble}, FALSE, 'pending', 0, '2026-01-01T00:00:00.000000Z', '2026-01-01T00:00:00.000000Z')"
        ),
    )
    .await;
    db.wait_for("the garbled send dead-lettered", WAIT, || async {
        db.count("SELECT COUNT(*) FROM dead_letters WHERE id = 'bad-send'")
            .await
            == 1
    })
    .await;
    let reason = db
        .texts("SELECT reason FROM dead_letters WHERE id = $1", "bad-send")
        .await;
    assert!(reason[0].contains("cannot be read"), "{reason:?}");
    assert!(reason[0].contains("body"), "{reason:?}");
    assert_eq!(
        db.texts("SELECT status FROM outbox WHERE id = $1", "bad-send")
            .await,
        ["dead"]
    );
    // Its instance is told, as of any send given up on.
    assert_eq!(
        db.count("SELECT COUNT(*) FROM messages WHERE id = 'bad-send:failed'")
            .await,
        1
    );
    // Sends beside it go out.
    client
        .start("collector", serde_json::json!({"key": "after-bad-send"}))
        .await
        .unwrap();
    db.wait_for("a good send delivered", WAIT, || async {
        deliveries.all().iter().any(|(port, _, _)| port == "log")
    })
    .await;
    feed_good_approval(&db, "after-send").await;
    wait_good_approval(&db).await;
    host.stop();
}

async fn subscription_rows_that_cannot_be_read_route_nothing_and_stop_nothing(db: TestDb) {
    let (host, _client) = HostThread::start(&db, fast_config(), Deliveries::default()).await;
    // A good approval: its request first, so that its receive is written (and the host has
    // written its activating subscriptions by then).
    exec(
        &db,
        "INSERT INTO inbox (message_id, message_type, body) VALUES ('sub-req', \
         'approval.requested', '{\"request_id\": \"sub\", \"approver\": \"bo\"}')",
    )
    .await;
    db.wait_for("the approval's receive", WAIT, || async {
        db.count("SELECT COUNT(*) FROM subscriptions WHERE message_type = 'approval.decision'")
            .await
            == 1
    })
    .await;
    // An activating subscription garbled by a tool: its type's messages stay unrouted.
    let garble = match db.backend {
        Backend::Sqlite => "version = 'one'",
        Backend::Postgres => "version = -1",
    };
    exec(
        &db,
        &format!(
            "UPDATE subscriptions SET {garble} WHERE instance_id IS NULL AND message_type = 'collect.start'"
        ),
    )
    .await;
    exec(
        &db,
        "INSERT INTO inbox (message_id, message_type, body) VALUES ('orphan', 'collect.start', '{\"key\": \"k\"}')",
    )
    .await;
    if db.backend == Backend::Sqlite {
        // A copy of the approval's receive, for an instance id no one can read, read first.
        exec(
            &db,
            "INSERT INTO subscriptions (id, message_type, instance_id, correlation_keys, correlation, created_at) \
             SELECT '00000000-0000-7000-8000-00000000000b', message_type, X'00ff', correlation_keys, \
               correlation, '2000-01-01T00:00:00.000000Z' FROM subscriptions WHERE message_type = 'approval.decision'",
        )
        .await;
    }
    exec(
        &db,
        "INSERT INTO inbox (message_id, message_type, body) VALUES ('sub-dec', \
         'approval.decision', '{\"request_id\": \"sub\", \"approved\": true, \"by\": \"bo\"}')",
    )
    .await;
    wait_good_approval(&db).await;
    db.wait_for("the inbox to empty", WAIT, || async {
        db.count("SELECT COUNT(*) FROM inbox").await == 0
    })
    .await;
    assert_eq!(
        db.texts("SELECT status FROM messages WHERE id = $1", "orphan")
            .await,
        ["unrouted"]
    );
    assert_eq!(db.count("SELECT COUNT(*) FROM dead_letters").await, 0);
    host.stop();
}

async fn an_inbox_row_the_database_refuses_is_dead_lettered_with_its_error(db: TestDb) {
    // A message id no PostgreSQL index can hold (a btree entry is at most about 2,700 bytes,
    // and random text does not compress): its publish fails for good. SQLite stores it.
    let id: String = (0..300).map(|_| uuid::Uuid::new_v4().to_string()).collect();
    exec(
        &db,
        &format!(
            "INSERT INTO inbox (message_id, message_type, body) VALUES ('{id}', 'approval.requested', \
             '{{\"request_id\": \"huge-id\", \"approver\": \"a\"}}')"
        ),
    )
    .await;
    feed_good_approval(&db, "after-refusal").await;
    let (host, _client) = HostThread::start(&db, fast_config(), Deliveries::default()).await;
    wait_good_approval(&db).await;
    db.wait_for("the inbox to empty", WAIT, || async {
        db.count("SELECT COUNT(*) FROM inbox").await == 0
    })
    .await;
    let dead = dead_reasons(&db).await;
    match db.backend {
        Backend::Postgres => {
            assert_eq!(dead.len(), 1, "{dead:#?}");
            assert!(dead[0].1.contains("the database refused it"), "{dead:#?}");
        }
        Backend::Sqlite => {
            assert!(dead.is_empty(), "{dead:#?}");
            assert_eq!(
                db.count_with("SELECT COUNT(*) FROM messages WHERE id = $1", &id)
                    .await,
                1
            );
        }
    }
    host.stop();
}

/// SQLite only: PostgreSQL's `timers.due_at` is a TIMESTAMPTZ, which holds nothing but a time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timer_row_that_cannot_be_read_suspends_its_instance_on_sqlite() {
    let Some(db) = TestDb::new(Backend::Sqlite).await else {
        return;
    };
    let (host, client) = HostThread::start(&db, fast_config(), Deliveries::default()).await;
    let target = client
        .start(
            "approval",
            serde_json::json!({"request_id": "timed", "approver": "x", "escalate_after_ms": 600000}),
        )
        .await
        .unwrap();
    db.wait_for("its timer", WAIT, || async {
        db.count("SELECT COUNT(*) FROM timers").await == 1
    })
    .await;
    // Due at once (it sorts before any time), and not a time.
    exec(&db, "UPDATE timers SET due_at = '0000-not-a-time'").await;
    feed_good_approval(&db, "untimed").await;
    db.wait_status(target, InstanceStatus::Suspended, WAIT)
        .await;
    let error = db
        .store
        .instance_summaries(&[target])
        .await
        .unwrap()
        .remove(0)
        .last_error
        .unwrap_or_default();
    assert!(
        error.contains("a timer of this instance cannot be read"),
        "{error}"
    );
    assert!(error.contains("due_at"), "{error}");
    wait_good_approval(&db).await;
    host.stop();
}
