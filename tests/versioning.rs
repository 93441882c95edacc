//! Versions side by side and `cairn upgrade`, on SQLite and PostgreSQL: waiting instances moved
//! to a new version while messages for them arrive (and the host is killed with SIGKILL), a
//! migration that fails for some states, an instance no running host can run (found by the
//! documented "needs attention" query, then run by a host that has its version), a suspension
//! resumed without `--force` once the build reads its state, and `cairn versions`.

#![allow(clippy::unwrap_used)] // tests may unwrap: a panic is a failed test

mod support;

use std::collections::BTreeMap;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use cairn::store::{InstanceStatus, NewMessage};
use cairn::upgrade::{self, Plan};
use cairn::{Client, Registry};
use cairn_orchestrations::approval::Approval;
use cairn_orchestrations::approval_v2::ApprovalV2;
use serde_json::json;
use support::fixtures::{fast_config, Deliveries, HostSetup, HostThread};
use support::processes::{new_run, Run};
use support::{Backend, TestDb};
use uuid::Uuid;

const WAIT: Duration = Duration::from_secs(60);

backend_tests!(
    waiting_v1_instances_move_to_v2_while_comments_arrive_and_the_host_is_killed,
    a_migration_that_fails_for_some_states_leaves_exactly_those_on_v1_with_the_error,
    an_instance_no_running_host_can_run_is_found_then_run_by_a_host_that_has_its_version,
    a_suspension_not_resumable_is_resumed_without_force_once_the_build_reads_the_state,
    cairn_versions_shows_instances_by_version_and_the_hosts_that_register_them,
    an_upgrade_point_is_fenced_by_the_epoch_and_by_a_live_lease,
);

/// The documented "needs attention" query (docs/sql.md); `{cutoff}` is a minute ago, written the
/// way each backend says it.
const NEEDS_ATTENTION: &str = "SELECT CAST(i.id AS TEXT) AS id, \
       CASE WHEN i.status = 'suspended' THEN COALESCE(i.last_error, 'suspended') \
         ELSE 'no running host has orchestration ' || i.orchestration || ' version ' \
           || CAST(i.version AS TEXT) END AS reason \
     FROM instances i \
     WHERE i.status = 'suspended' \
        OR (i.status IN ('running', 'dehydrated') AND NOT EXISTS ( \
             SELECT 1 FROM hosts h WHERE h.stopped_at IS NULL AND h.heartbeat_at >= {cutoff} \
               AND (h.registrations IS NULL OR h.registrations LIKE \
                    '%,' || i.orchestration || '@' || CAST(i.version AS TEXT) || ',%')))";

fn request(id: &str, approver: &str) -> serde_json::Value {
    // Long timers: the instances wait for messages, not for a deadline.
    json!({ "request_id": id, "approver": approver, "escalate_after_ms": 3_600_000,
            "deadline_after_ms": 3_600_000 })
}

fn msg(id: String, ty: &str, body: serde_json::Value) -> NewMessage {
    NewMessage::published(id, ty, body, BTreeMap::new())
}

fn plan(to: u32, dry_run: bool) -> Plan {
    Plan {
        orchestration: "approval".into(),
        from: None,
        to,
        dry_run,
        limit: None,
        wait: Duration::from_secs(30),
        by: "test".into(),
    }
}

/// The needs-attention rows, as (id, reason), through the plain SQL pool.
async fn needs_attention(db: &TestDb) -> Vec<(String, String)> {
    let cutoff = match db.backend {
        // SQLite stores times as ISO-8601 text; PostgreSQL as timestamptz.
        Backend::Sqlite => "strftime('%Y-%m-%dT%H:%M:%fZ', 'now', '-60 seconds')",
        Backend::Postgres => "now() - interval '60 seconds'",
    };
    sqlx::query_as::<_, (String, String)>(&NEEDS_ATTENTION.replace("{cutoff}", cutoff))
        .fetch_all(&db.sql)
        .await
        .unwrap()
}

/// Fast settings, and instances dehydrated soon after they go idle: `cairn upgrade` moves an
/// instance a host holds once the host lets it go.
fn config() -> cairn::HostConfig {
    cairn::HostConfig {
        dehydrate_after: Duration::from_millis(200),
        ..fast_config()
    }
}

fn samples_setup() -> HostSetup {
    HostSetup {
        registry: cairn_orchestrations::registry(),
        ..HostSetup::new(config(), Deliveries::default())
    }
}

async fn count(db: &TestDb, sql: &str) -> i64 {
    db.count(sql).await
}

/// Done when (1): 1,000 version-1 approvals wait, dehydrated, while a `cairn host` with versions
/// 1 and 2 runs; `cairn upgrade approval --to 2` moves them while two comments for each arrive;
/// the host is killed with SIGKILL during the upgrade, and the upgrade process too, and both
/// are started again. Every instance completes on version 2 with its migrated state: its output
/// carries exactly its two comments and says it came from version 1; every comment and decision
/// is consumed once, and each instance has one upgrade point.
async fn waiting_v1_instances_move_to_v2_while_comments_arrive_and_the_host_is_killed(db: TestDb) {
    let n: usize = std::env::var("CAIRN_UPGRADE_INSTANCES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000);
    let run = new_run(db).await;
    let client = run.client();
    let starts: Vec<(String, serde_json::Value)> = (0..n)
        .map(|i| ("approval".to_owned(), request(&format!("r{i}"), "alice")))
        .collect();
    let ids = client.start_many(starts).await.unwrap();
    let mut host = run.spawn_host(0);
    let db = &run.db;
    db.wait_for("every v1 instance dehydrated", WAIT, || async {
        count(
            db,
            "SELECT COUNT(*) FROM instances WHERE version = 1 AND status = 'dehydrated'",
        )
        .await
            == n as i64
    })
    .await;

    let mut upgrade = upgrade_process(&run, &[]);
    // Two comments for every instance, published while the upgrade runs.
    let publisher = {
        let client = client.clone();
        tokio::spawn(async move {
            for round in 0..2 {
                for chunk in (0..n).collect::<Vec<_>>().chunks(100) {
                    let batch = chunk
                        .iter()
                        .map(|i| {
                            msg(format!("c{round}-{i}"), "approval.comment",
                                json!({"request_id": format!("r{i}"), "by": "bob", "text": format!("comment {round}")}))
                        })
                        .collect();
                    client.publish_batch(batch).await.unwrap();
                }
            }
        })
    };
    // SIGKILL the host, then the upgrade, once some instances moved; start both again.
    let started = Instant::now();
    while upgraded(db).await < (n / 4) as i64 && started.elapsed() < WAIT {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    host.sigkill();
    let killed_at = upgraded(db).await;
    let _ = upgrade.kill();
    let _ = upgrade.wait();
    let host_again = run.spawn_host(1);
    publisher.await.unwrap();
    let rerun = upgrade_process(&run, &[]).wait_with_output().unwrap();
    assert!(
        rerun.status.success(),
        "the upgrade run again must move every instance:\n{}\n{}",
        String::from_utf8_lossy(&rerun.stdout),
        String::from_utf8_lossy(&rerun.stderr)
    );
    eprintln!(
        "{} moved when the host was killed; the run again: {}",
        killed_at,
        String::from_utf8_lossy(&rerun.stdout).trim()
    );
    assert_eq!(
        count(
            db,
            "SELECT COUNT(*) FROM instances WHERE orchestration = 'approval' AND version = 2"
        )
        .await,
        n as i64
    );
    // One upgrade point each, even across the kills.
    assert_eq!(upgraded(db).await, n as i64);
    assert_eq!(
        count(
            db,
            "SELECT COUNT(*) FROM (SELECT instance_id FROM history WHERE reason = 'upgrade' \
                   GROUP BY instance_id HAVING COUNT(*) > 1) x"
        )
        .await,
        0
    );
    // The comments reach the instances (on version 1 or 2) before the decisions are sent.
    db.wait_for("every comment consumed", WAIT, || async {
        count(db, "SELECT COUNT(*) FROM messages WHERE message_type = 'approval.comment' AND status = 'consumed'").await
            == 2 * n as i64
    })
    .await;
    let decisions = (0..n)
        .map(|i| {
            msg(
                format!("d{i}"),
                "approval.decision",
                json!({"request_id": format!("r{i}"), "approved": true, "by": "alice"}),
            )
        })
        .collect();
    client.publish_batch(decisions).await.unwrap();
    support::processes::wait_until_all_ended(&run, &ids, WAIT).await;
    let mut host_again = host_again;
    host_again.sigkill();

    for id in &ids {
        let detail = db.store.instance_detail(*id).await.unwrap().unwrap();
        assert_eq!(detail.summary.status, InstanceStatus::Completed, "{id}");
        assert_eq!(detail.summary.version, 2, "{id}");
        let output = detail.output.unwrap();
        assert_eq!(output["upgraded_from"], 1, "{id}: {output}");
        let mut texts: Vec<&str> = output["comments"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["text"].as_str().unwrap())
            .collect();
        // Each comment exactly once. Not their order: on PostgreSQL a message claimed by the
        // host killed before it took the instance stays locked to it until its heartbeat is
        // older than the cutoff (two leases), and the comment behind it may go first; that is
        // the claims' rule for a gone host's locks (`postgres/claims.rs`, `lock_free`), with or
        // without an upgrade (the upgrade point leaves owner, lease and locks as they are).
        texts.sort_unstable();
        assert_eq!(texts, ["comment 0", "comment 1"], "{id}: {output}");
    }
    assert_eq!(
        count(db, "SELECT COUNT(*) FROM messages WHERE message_type IN ('approval.comment', 'approval.decision') \
                   AND status <> 'consumed'").await,
        0
    );
}

async fn upgraded(db: &TestDb) -> i64 {
    count(db, "SELECT COUNT(*) FROM history WHERE reason = 'upgrade'").await
}

/// `cairn upgrade approval --to 2` as a process on the run's database.
fn upgrade_process(run: &Run, args: &[&str]) -> std::process::Child {
    Command::new(env!("CARGO_BIN_EXE_cairn"))
        .args([
            "--database",
            &run.db.url,
            "upgrade",
            "approval",
            "--to",
            "2",
        ])
        .args(args)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn cairn upgrade")
}

/// Done when (2): requests without an approver cannot move (version 2's migration refuses
/// them). A dry run reports how many would move and every failure, writing nothing; the
/// upgrade moves the others, leaves exactly those on version 1, unchanged, listed with the
/// error; they still finish on version 1.
async fn a_migration_that_fails_for_some_states_leaves_exactly_those_on_v1_with_the_error(
    db: TestDb,
) {
    let (host, client) = HostThread::launch(&db, samples_setup()).await;
    let approvers = ["alice", "", "carol", "", "dave", "erin"];
    let mut ids = Vec::new();
    for (i, approver) in approvers.iter().enumerate() {
        ids.push(
            client
                .start("approval", request(&format!("m{i}"), approver))
                .await
                .unwrap(),
        );
    }
    for id in &ids {
        db.wait_first_point(*id, WAIT).await;
    }
    let before: Vec<Vec<u8>> = states(&db, &ids).await;
    let clock = cairn::clock::SystemClock;
    let registry = cairn_orchestrations::registry();

    let dry = upgrade::run(&*db.store, &registry, &clock, &plan(2, true))
        .await
        .unwrap();
    assert_eq!(dry.moved, 4);
    let failed: Vec<Uuid> = dry.failed.iter().map(|f| f.0).collect();
    assert_eq!(failed, vec![ids[1], ids[3]]);
    assert_eq!(states(&db, &ids).await, before, "a dry run writes nothing");
    assert_eq!(
        db.count("SELECT COUNT(*) FROM instances WHERE version = 2")
            .await,
        0
    );

    let report = upgrade::run(&*db.store, &registry, &clock, &plan(2, false))
        .await
        .unwrap();
    assert_eq!(report.moved, 4, "{report:?}");
    assert!(report.pending.is_empty(), "{report:?}");
    assert_eq!(report.failed.len(), 2);
    for (id, version, error) in &report.failed {
        assert!([ids[1], ids[3]].contains(id));
        assert_eq!(*version, 1);
        assert!(error.contains("has no approver"), "{error}");
    }
    let after = states(&db, &ids).await;
    for (i, id) in ids.iter().enumerate() {
        let version = db.store.instance_summaries(&[*id]).await.unwrap()[0].version;
        if i == 1 || i == 3 {
            assert_eq!(version, 1);
            assert_eq!(after[i], before[i], "a failed instance is unchanged");
        } else {
            assert_eq!(version, 2);
            assert_ne!(after[i], before[i]);
        }
    }
    // Running it again moves nothing more and fails the same two.
    let again = upgrade::run(&*db.store, &registry, &clock, &plan(2, false))
        .await
        .unwrap();
    assert_eq!((again.moved, again.failed.len()), (0, 2));
    for (i, id) in ids.iter().enumerate() {
        client
            .publish_batch(vec![msg(
                format!("md{i}"),
                "approval.decision",
                json!({"request_id": format!("m{i}"), "approved": true, "by": "x"}),
            )])
            .await
            .unwrap();
        db.wait_status(*id, InstanceStatus::Completed, WAIT).await;
        let output = db
            .store
            .instance_detail(*id)
            .await
            .unwrap()
            .unwrap()
            .output
            .unwrap();
        // Version 1's output is the decision; version 2's carries it with the comments.
        assert_eq!(
            output.get("upgraded_from").is_some(),
            i != 1 && i != 3,
            "{output}"
        );
    }
    host.stop();
}

async fn states(db: &TestDb, ids: &[Uuid]) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    for id in ids {
        out.push(
            db.store
                .instance_detail(*id)
                .await
                .unwrap()
                .unwrap()
                .state
                .unwrap(),
        );
    }
    out
}

/// Done when (3): an approval on version 2 while the only running host has version 1 alone is
/// found by the documented query, with the reason; once a host with version 2 starts (beside
/// the first on PostgreSQL, after it on SQLite, one host a file), that host runs it.
async fn an_instance_no_running_host_can_run_is_found_then_run_by_a_host_that_has_its_version(
    db: TestDb,
) {
    let v1_only = HostSetup {
        registry: Registry::new().register::<Approval>(),
        ..HostSetup::new(config(), Deliveries::default())
    };
    let (old_host, _) = HostThread::launch(&db, v1_only).await;
    let v2 = Client::new(db.store.clone(), Registry::new().register::<ApprovalV2>());
    let id = v2.start("approval", request("n1", "alice")).await.unwrap();
    let idle = Client::new(db.store.clone(), Registry::new().register::<Approval>());
    // A version-1 instance the old host runs: once its first point is written, the old host
    // has claimed since the version-2 start was written, and left it.
    let marker = idle
        .start("approval", request("n0", "alice"))
        .await
        .unwrap();
    db.wait_first_point(marker, WAIT).await;
    let found = needs_attention(&db).await;
    assert_eq!(found.len(), 1, "{found:?}");
    assert_eq!(found[0].0, id.to_string());
    assert!(
        found[0]
            .1
            .contains("no running host has orchestration approval version 2"),
        "{found:?}"
    );
    let attention = db
        .store
        .needing_attention(chrono::Utc::now(), 10)
        .await
        .unwrap();
    assert_eq!(attention.len(), 1);
    assert!(
        attention[0].reason.contains("cairn upgrade"),
        "{attention:?}"
    );

    let old_host = match db.backend {
        Backend::Sqlite => {
            old_host.stop();
            None
        }
        Backend::Postgres => Some(old_host),
    };
    let (new_host, client) = HostThread::launch(&db, samples_setup()).await;
    db.wait_first_point(id, WAIT).await;
    assert!(needs_attention(&db).await.is_empty());
    client
        .publish_batch(vec![msg(
            "n1-d".into(),
            "approval.decision",
            json!({"request_id": "n1", "approved": true, "by": "alice"}),
        )])
        .await
        .unwrap();
    db.wait_status(id, InstanceStatus::Completed, WAIT).await;
    // Every point of it was written by a host that registers version 2.
    let writers = db
        .texts(
            "SELECT COALESCE(h.registrations, '') FROM history x JOIN hosts h ON h.id = x.host \
             WHERE CAST(x.instance_id AS TEXT) = $1",
            &id.to_string(),
        )
        .await;
    assert!(!writers.is_empty());
    assert!(
        writers.iter().all(|r| r.contains(",approval@2,")),
        "{writers:?}"
    );
    new_host.stop();
    if let Some(h) = old_host {
        h.stop();
    }
}

/// `shape` version 1 as first deployed: its state is `{a}`.
struct ShapeOld;
/// `shape` version 1 in a build that changed the state's shape without a new version: `{a, b}`.
struct ShapeNew;

#[derive(Clone, serde::Serialize, serde::Deserialize)]
enum OldState {
    Waiting { a: i64 },
}

#[derive(Clone, serde::Serialize, serde::Deserialize)]
enum NewState {
    Waiting { a: i64, b: String },
}

impl cairn::Orchestration for ShapeOld {
    const NAME: &'static str = "shape";
    const VERSION: u32 = 1;
    type Input = i64;
    type State = OldState;
    type Output = i64;
    fn start(ctx: &mut cairn::Context, a: i64) -> Result<cairn::Next<Self>, cairn::Fault> {
        ctx.receive("shape.go", cairn::Correlation::on("a", a.to_string()));
        Ok(cairn::Next::Continue(OldState::Waiting { a }))
    }
    fn on_event(
        _: &mut cairn::Context,
        state: OldState,
        _: cairn::Event,
    ) -> Result<cairn::Next<Self>, cairn::Fault> {
        let OldState::Waiting { a } = state;
        Ok(cairn::Next::Complete(a))
    }
}

impl cairn::Orchestration for ShapeNew {
    const NAME: &'static str = "shape";
    const VERSION: u32 = 1;
    type Input = i64;
    type State = NewState;
    type Output = i64;
    fn start(ctx: &mut cairn::Context, a: i64) -> Result<cairn::Next<Self>, cairn::Fault> {
        ctx.receive("shape.go", cairn::Correlation::on("a", a.to_string()));
        Ok(cairn::Next::Continue(NewState::Waiting {
            a,
            b: String::new(),
        }))
    }
    fn on_event(
        _: &mut cairn::Context,
        state: NewState,
        _: cairn::Event,
    ) -> Result<cairn::Next<Self>, cairn::Fault> {
        let NewState::Waiting { a, .. } = state;
        Ok(cairn::Next::Complete(a))
    }
}

fn shape_host(registry: Registry) -> HostSetup {
    HostSetup {
        registry,
        ..HostSetup::new(config(), Deliveries::default())
    }
}

/// The case: a build changes the state's shape under the same version; the instance is
/// suspended not resumable, and its `last_error` names the commands that work. A plain resume
/// is refused while no build reads the state; once the right build is deployed again, `cairn
/// resume` (without `--force`) resumes it and it completes.
async fn a_suspension_not_resumable_is_resumed_without_force_once_the_build_reads_the_state(
    db: TestDb,
) {
    let old = || Registry::new().register::<ShapeOld>();
    let new = || Registry::new().register::<ShapeNew>();
    let (host, client) = HostThread::launch(&db, shape_host(old())).await;
    let id = client.start("shape", json!(7)).await.unwrap();
    db.wait_first_point(id, WAIT).await;
    host.stop();

    let (host, client) = HostThread::launch(&db, shape_host(new())).await;
    client
        .publish_batch(vec![NewMessage::published(
            "go-7",
            "shape.go",
            json!({}),
            BTreeMap::from([("a".to_owned(), "7".to_owned())]),
        )])
        .await
        .unwrap();
    db.wait_status(id, InstanceStatus::Suspended, WAIT).await;
    let error = db.store.instance_summaries(&[id]).await.unwrap()[0]
        .last_error
        .clone()
        .unwrap();
    assert!(error.contains("does not decode"), "{error}");
    assert!(
        error.contains("cairn upgrade shape --to NEWER --from 1"),
        "{error}"
    );
    assert!(error.contains(&format!("cairn resume {id}")), "{error}");
    // This build does not read it: a plain resume is refused, saying what works.
    let refused = cairn::cli::versions::resume(&*db.store, &new(), id, false)
        .await
        .unwrap_err();
    assert!(refused.to_string().contains("--force"), "{refused}");
    assert_eq!(db.status(id).await, Some(InstanceStatus::Suspended));
    host.stop();

    // The right build again: `cairn resume` without --force, and it completes.
    let (host, _client) = HostThread::launch(&db, shape_host(old())).await;
    cairn::cli::versions::resume(&*db.store, &old(), id, false)
        .await
        .unwrap();
    db.wait_status(id, InstanceStatus::Completed, WAIT).await;
    host.stop();
}

/// `cairn versions` lists each orchestration's versions with their instances by status and
/// the running hosts that register them; `hosts.registrations` holds the host's definitions.
async fn cairn_versions_shows_instances_by_version_and_the_hosts_that_register_them(db: TestDb) {
    let (host, client) = HostThread::launch(&db, samples_setup()).await;
    let id = client
        .start("approval", request("v1", "alice"))
        .await
        .unwrap();
    db.wait_first_point(id, WAIT).await;
    let registrations = db
        .texts(
            "SELECT registrations FROM hosts WHERE stopped_at IS NULL AND $1 = $1",
            "x",
        )
        .await;
    assert_eq!(registrations.len(), 1);
    assert!(
        registrations[0].contains(",approval@1,approval@2,"),
        "{registrations:?}"
    );
    let out = Command::new(env!("CARGO_BIN_EXE_cairn"))
        .args(["--database", &db.url, "versions"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v1 = text
        .lines()
        .find(|l| l.starts_with("approval") && l.contains(" 1* "))
        .unwrap_or_else(|| panic!("{text}"));
    assert!(
        v1.contains("running 1") || v1.contains("dehydrated 1"),
        "{text}"
    );
    let v2 = text
        .lines()
        .find(|l| l.starts_with("approval") && l.contains(" 2 "))
        .unwrap_or_else(|| panic!("{text}"));
    assert!(v2.contains(" - "), "{text}");
    assert!(
        !v2.contains("none"),
        "a running host registers version 2: {text}"
    );
    host.stop();
}

/// The upgrade rate (`just upgrade-bench`): `CAIRN_UPGRADE_BENCH` (default 10,000) version-1
/// approvals wait, dehydrated, while a host with versions 1 and 2 runs, idle; the time
/// `upgrade::run` (what `cairn upgrade` runs) takes to move them all is printed as instances/s.
/// Measure it in a release build: `cargo test --release ... -- --ignored --nocapture`.
async fn upgrade_rate(db: TestDb) {
    let n: usize = std::env::var("CAIRN_UPGRADE_BENCH")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000);
    let (host, client) = HostThread::launch(&db, samples_setup()).await;
    for chunk in (0..n).collect::<Vec<_>>().chunks(1000) {
        let starts = chunk
            .iter()
            .map(|i| ("approval".to_owned(), request(&format!("b{i}"), "alice")))
            .collect();
        client.start_many(starts).await.unwrap();
    }
    db.wait_for(
        "every v1 instance dehydrated",
        Duration::from_secs(600),
        || async {
            db.count("SELECT COUNT(*) FROM instances WHERE version = 1 AND status = 'dehydrated'")
                .await
                == n as i64
        },
    )
    .await;
    let registry = cairn_orchestrations::registry();
    let started = Instant::now();
    let report = upgrade::run(
        &*db.store,
        &registry,
        &cairn::clock::SystemClock,
        &plan(2, false),
    )
    .await
    .unwrap();
    let took = started.elapsed();
    assert_eq!(report.moved, n as u64, "{report:?}");
    println!(
        "upgrade rate, {:?}: {n} instances in {:.2} s = {:.0} instances/s",
        db.backend,
        took.as_secs_f64(),
        n as f64 / took.as_secs_f64()
    );
    host.stop();
}

mod upgrade_rate {
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    #[ignore = "a measurement, not a test: just upgrade-bench"]
    async fn sqlite() {
        if let Some(db) = super::TestDb::new(super::Backend::Sqlite).await {
            super::upgrade_rate(db).await;
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    #[ignore = "a measurement, not a test: just upgrade-bench"]
    async fn postgres() {
        if let Some(db) = super::TestDb::new(super::Backend::Postgres).await {
            super::upgrade_rate(db).await;
        }
    }
}

/// The store's upgrade point (G4): written only at the epoch the instance was read at and with
/// no live lease on it; otherwise `Changed` and nothing written. Written, it is one history row
/// with reason `upgrade` naming both versions.
async fn an_upgrade_point_is_fenced_by_the_epoch_and_by_a_live_lease(db: TestDb) {
    use cairn::store::{UpgradeFilter, UpgradeOutcome, UpgradePoint};
    let (host, client) = HostThread::launch(&db, samples_setup()).await;
    let id = client
        .start("approval", request("f1", "alice"))
        .await
        .unwrap();
    db.wait_status(id, InstanceStatus::Dehydrated, WAIT).await;
    host.stop();
    let registry = cairn_orchestrations::registry();
    let read = |db: &TestDb| {
        let store = db.store.clone();
        async move {
            let filter = UpgradeFilter {
                orchestration: "approval".into(),
                from: Some(1),
                to: 2,
                after: None,
                limit: 10,
            };
            store
                .upgrade_candidates(&filter, chrono::Utc::now())
                .await
                .unwrap()
                .remove(0)
        }
    };
    let c = read(&db).await;
    let migrated =
        upgrade::migrate(&registry, "approval", 1, 2, c.state.as_deref().unwrap()).unwrap();
    let point = UpgradePoint {
        id,
        from: 1,
        to: 2,
        epoch: c.epoch,
        state: migrated.state,
        step: migrated.step,
        by: "test".into(),
    };
    // A host takes the instance after it was read: the point read before is fenced.
    let now = chrono::Utc::now();
    db.store
        .acquire("host-x", &[id], now, now + chrono::Duration::seconds(30))
        .await
        .unwrap();
    assert_eq!(
        db.store.upgrade(&point, now).await.unwrap(),
        UpgradeOutcome::Changed
    );
    // Read again: the live lease of host-x still holds it.
    let c = read(&db).await;
    assert_eq!(c.held_by.as_deref(), Some("host-x"));
    let point = UpgradePoint {
        epoch: c.epoch,
        ..point
    };
    assert_eq!(
        db.store.upgrade(&point, now).await.unwrap(),
        UpgradeOutcome::Changed
    );
    assert_eq!(
        db.count("SELECT COUNT(*) FROM instances WHERE version = 2")
            .await,
        0
    );
    // Once the lease ran out, the same point is written, once.
    let later = now + chrono::Duration::seconds(31);
    assert_eq!(
        db.store.upgrade(&point, later).await.unwrap(),
        UpgradeOutcome::Moved
    );
    assert_eq!(
        db.store.upgrade(&point, later).await.unwrap(),
        UpgradeOutcome::Changed
    );
    let detail = db.store.instance_detail(id).await.unwrap().unwrap();
    assert_eq!(detail.summary.version, 2);
    assert_eq!(detail.summary.step, "Pending");
    let upgrades: Vec<_> = detail
        .history
        .iter()
        .filter(|h| h.reason == cairn::store::Reason::Upgrade)
        .collect();
    assert_eq!(upgrades.len(), 1);
    assert_eq!(
        upgrades[0].detail.as_deref(),
        Some("upgraded from version 1 to version 2")
    );
}
