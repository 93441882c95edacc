//! The `cairn` command line, run as a user would: every verb, `host --until-idle` and `demo`,
//! on SQLite and PostgreSQL.

#![allow(clippy::unwrap_used)] // tests may unwrap: a panic is a failed test

mod support;

use std::process::{Command, Output};
use std::time::{Duration, Instant};

use support::TestDb;

fn cairn(db: &TestDb, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_cairn"))
        .args(["--database", &db.url])
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .expect("run cairn")
}

fn ok(db: &TestDb, args: &[&str]) -> String {
    let out = cairn(db, args);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "cairn {args:?} failed: {}{}",
        stdout,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

backend_tests!(
    every_verb_works_from_the_command_line,
    demo_returns_when_every_instance_has_ended,
    dead_letters_are_listed_shown_resubmitted_and_purged,
);

async fn every_verb_works_from_the_command_line(db: TestDb) {
    ok(&db, &["migrate"]);
    // start, publish (activating and correlated), then a host that stops once all is done.
    let approval = ok(
        &db,
        &[
            "start",
            "approval",
            "--input",
            r#"{"request_id": "cli-1", "approver": "ada", "escalate_after_ms": 60000}"#,
        ],
    );
    let approval = approval.trim().to_owned();
    let published = ok(
        &db,
        &[
            "publish",
            "approval.decision",
            "--body",
            r#"{"request_id": "cli-1", "approved": true, "by": "ada"}"#,
            "--id",
            "decision-cli-1",
        ],
    );
    assert!(published.contains("decision-cli-1"), "{published}");
    let again = ok(
        &db,
        &[
            "publish",
            "approval.decision",
            "--body",
            "{}",
            "--id",
            "decision-cli-1",
        ],
    );
    assert!(again.contains("already published"), "{again}");
    let parked = ok(
        &db,
        &[
            "start",
            "approval",
            "--input",
            r#"{"request_id": "cli-2", "approver": "bob"}"#,
        ],
    );
    let parked = parked.trim().to_owned();
    let started = Instant::now();
    ok(
        &db,
        &[
            "host",
            "--until-idle",
            "--poll-ms",
            "20",
            "--dehydrate-after-ms",
            "200",
        ],
    );
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "--until-idle took {:?}",
        started.elapsed()
    );

    let shown = ok(&db, &["show", &approval]);
    for needle in [
        "status        completed",
        "\"by\": \"ada\"",
        "send",
        "complete",
    ] {
        assert!(shown.contains(needle), "show lacks {needle:?}:\n{shown}");
    }
    let listed = ok(&db, &["list", "--status", "completed"]);
    assert!(listed.contains(&approval), "{listed}");

    // The second approval waits for its decision (an hour's escalation): steer it.
    let shown = ok(&db, &["show", &parked]);
    assert!(
        shown.contains("message approval.decision {request_id=cli-2}"),
        "{shown}"
    );
    assert!(ok(&db, &["suspend", &parked, "--reason", "audit"]).contains("suspended"));
    assert!(ok(&db, &["list", "--status", "suspended"]).contains("suspended by operator: audit"));
    assert!(ok(&db, &["resume", &parked]).contains("dehydrated"));
    assert!(ok(&db, &["terminate", &parked, "--reason", "withdrawn"]).contains("terminated"));
    assert_eq!(
        db.status(parked.parse().unwrap()).await,
        Some(cairn::store::InstanceStatus::Terminated)
    );

    // Errors say what went wrong and what to do, with a failing exit code.
    let bad = cairn(&db, &["publish", "x", "--body", "{nope"]);
    assert!(!bad.status.success());
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(
        err.contains("--body is not valid JSON") && err.contains("hint:"),
        "{err}"
    );
    let unknown = cairn(&db, &["start", "no-such-orchestration"]);
    assert!(String::from_utf8_lossy(&unknown.stderr)
        .contains("no orchestration named \"no-such-orchestration\""));
    let resume = cairn(&db, &["resume", &approval]);
    assert!(String::from_utf8_lossy(&resume.stderr)
        .contains("only a suspended instance can be resumed"));
}

async fn demo_returns_when_every_instance_has_ended(db: TestDb) {
    let started = Instant::now();
    let out = ok(&db, &["demo", "--instances", "30"]);
    assert!(out.contains("cairn demo: 30 instances ended"), "{out}");
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "demo took {:?}",
        started.elapsed()
    );
    assert_eq!(
        db.count(
            "SELECT COUNT(*) FROM instances WHERE status IN ('running', 'dehydrated', 'suspended')"
        )
        .await,
        0
    );
    assert!(
        db.count("SELECT COUNT(*) FROM history WHERE reason = 'complete'")
            .await
            >= 30
    );
}

/// SQLite serves one host: a second host on the same file refuses to start (it would release
/// the first one's leases and break G4). PostgreSQL runs many hosts (see scale_out.rs).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_host_on_one_sqlite_file_refuses_to_start() {
    let db = TestDb::new(support::Backend::Sqlite).await.unwrap();
    let mut first = Command::new(env!("CARGO_BIN_EXE_cairn"))
        .args(["--database", &db.url, "host"])
        .env("RUST_LOG", "warn")
        .spawn()
        .unwrap();
    db.wait_for(
        "the first host to register",
        Duration::from_secs(20),
        || async {
            db.count("SELECT COUNT(*) FROM hosts WHERE stopped_at IS NULL")
                .await
                == 1
        },
    )
    .await;
    let second = cairn(&db, &["host", "--until-idle"]);
    let _ = first.kill();
    let _ = first.wait();
    assert!(!second.status.success());
    let err = String::from_utf8_lossy(&second.stderr);
    assert!(
        err.contains("another host") && err.contains("SQLite serves one host"),
        "{err}"
    );
    // Once the first host is gone, a new one starts.
    ok(&db, &["host", "--until-idle"]);
}

/// `cairn host --until-idle` with the sample booking services failing `percent`% of calls.
fn host_until_idle(db: &TestDb, percent: &str) {
    let out = Command::new(env!("CARGO_BIN_EXE_cairn"))
        .args([
            "--database",
            &db.url,
            "host",
            "--until-idle",
            "--poll-ms",
            "20",
        ])
        .env("RUST_LOG", "warn")
        .env("CAIRN_SAMPLE_FAILURE_PERCENT", percent)
        .output()
        .expect("run cairn host");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

async fn dead_letters_are_listed_shown_resubmitted_and_purged(db: TestDb) {
    // Two trips whose airline is down: each flight booking is tried, then dead-lettered.
    for trip in ["dl-1", "dl-2"] {
        let body = format!(r#"{{"trip_id": "{trip}", "traveller": "ada"}}"#);
        ok(
            &db,
            &["publish", "trip.requested", "--body", &body, "--id", trip],
        );
    }
    host_until_idle(&db, "100");
    let dead: Vec<String> = sqlx::query_scalar("SELECT id FROM dead_letters ORDER BY id")
        .fetch_all(&db.sql)
        .await
        .unwrap();
    assert_eq!(dead.len(), 2, "{dead:?}");
    let listed = ok(&db, &["dead-letters", "list"]);
    for id in &dead {
        assert!(listed.contains(id.as_str()), "{listed}");
    }
    let shown = ok(&db, &["dead-letters", "show", &dead[0]]);
    assert!(
        shown.contains("flights") && shown.contains("simulated"),
        "{shown}"
    );
    // The airline is back: resubmit one, purge the other.
    ok(&db, &["dead-letters", "resubmit", &dead[0]]);
    ok(&db, &["dead-letters", "purge", &dead[1]]);
    host_until_idle(&db, "0");
    assert_eq!(
        db.count_with(
            "SELECT COUNT(*) FROM outbox WHERE id = $1 AND status = 'delivered'",
            &dead[0]
        )
        .await,
        1
    );
    assert_eq!(
        db.count_with(
            "SELECT COUNT(*) FROM outbox WHERE id = $1 AND status = 'dead'",
            &dead[1]
        )
        .await,
        1
    );
    assert_eq!(db.count("SELECT COUNT(*) FROM dead_letters").await, 0);
    // Its trip had already failed and compensated: the late reply is kept as a zombie.
    assert_eq!(
        db.count_with(
            "SELECT COUNT(*) FROM messages WHERE id = $1 AND status IN ('zombie', 'routed')",
            &format!("{}:reply", dead[0])
        )
        .await,
        1
    );
}
