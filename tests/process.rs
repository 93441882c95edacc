//! The `cairn` binary as a real process: killed with SIGKILL at random moments under load, and
//! stopped with SIGTERM under load. The guarantees are then checked from the database and from
//! the ports' own record (the ledger file the sample ports append each delivered message id to).
//!
//! `CAIRN_SOAK=1` runs the long version of the crash test (`just soak`).

#![allow(clippy::unwrap_used)] // tests may unwrap: a panic is a failed test

mod support;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use cairn::store::NewMessage;
use rand::Rng;
use serde_json::json;
use support::processes::{check_guarantees, feed, new_run, stop, wait_until_all_ended};
use support::TestDb;

backend_tests!(
    sigkill_at_random_moments_loses_nothing,
    sigterm_saves_every_instance_and_a_restart_finishes_them,
    an_ordered_port_delivers_in_commit_order_across_a_sigkill_and_a_failing_message,
    a_host_whose_log_cannot_be_written_keeps_running,
    work_committed_by_another_process_wakes_the_host_without_its_poll,
    retention_under_sigkill_deletes_only_ended_instances_and_all_that_was_theirs,
);

/// Trips whose car reply is in and not consumed by a committed point: a host killed now dies
/// inside (or just before) their atomic confirmation scope, which must leave no trace.
const INSIDE_ATOMIC: &str = "SELECT COUNT(*) FROM instances i WHERE i.step = 'BookingCar' \
    AND i.status NOT IN ('completed', 'failed') AND EXISTS (SELECT 1 FROM messages m \
    WHERE m.instance_id = i.id AND m.kind = 'reply' AND m.status = 'routed')";

async fn sigkill_at_random_moments_loses_nothing(db: TestDb) {
    let soak = std::env::var("CAIRN_SOAK").is_ok_and(|v| v == "1");
    let (first_wave, wave, kills) = if soak {
        (2_000, 400, 30)
    } else {
        (500, 150, 6)
    };
    let run = new_run(db).await;
    // Every delivery takes up to 30 ms, like a remote system: kills land mid-delivery.
    const LATENCY_MS: u64 = 30;
    let mut host = run.spawn_host_with(0, LATENCY_MS);
    let (mut ids, mut published) = feed(&run, 0, first_wave).await;
    let mut rng = rand::thread_rng();
    let mut inside_atomic = 0;
    let mut sends_in_flight = 0;
    for k in 1..=kills {
        tokio::time::sleep(Duration::from_millis(rng.gen_range(100..700))).await;
        host.sigkill();
        let open = run
            .db
            .count("SELECT COUNT(*) FROM instances WHERE status NOT IN ('completed', 'failed')")
            .await;
        let in_atomic = run.db.count(INSIDE_ATOMIC).await;
        inside_atomic += in_atomic;
        // Sends a host had leased for delivery and not recorded: delivered or not, they must
        // be delivered (again) under the same id.
        let leased = run
            .db
            .count("SELECT COUNT(*) FROM outbox WHERE status = 'pending' AND locked_by IS NOT NULL")
            .await;
        sends_in_flight += leased;
        eprintln!(
            "kill {k}: {open} instances in flight, {leased} sends being delivered, {in_atomic} trips inside their atomic scope"
        );
        assert!(
            open > 0,
            "kill {k} hit an idle host: the test would prove nothing"
        );
        // More work arrives while the host is down (G1: accepted with no host running).
        let (more_ids, more) = feed(&run, k, wave).await;
        ids.extend(more_ids);
        published.extend(more);
        host = run.spawn_host_with(k, LATENCY_MS);
    }
    // One more kill, aimed at trips inside their atomic confirmation scope (1.5 s long).
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    while run.db.count(INSIDE_ATOMIC).await == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "no trip reached its atomic scope"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    host.sigkill();
    let in_atomic = run.db.count(INSIDE_ATOMIC).await;
    eprintln!("aimed kill: {in_atomic} trips inside their atomic scope");
    inside_atomic += in_atomic;
    host = run.spawn_host_with(kills + 1, LATENCY_MS);
    wait_until_all_ended(
        &run,
        &ids,
        Duration::from_secs(if soak { 900 } else { 180 }),
    )
    .await;
    stop(host);
    assert!(sends_in_flight > 0, "no kill landed during a delivery");
    assert!(
        inside_atomic > 0,
        "no kill landed inside an atomic scope: the test would not show that one leaves no trace"
    );
    check_guarantees(&run, &ids, &published).await;
}

/// Batches that took children's results (claimed, not yet consumed by a committed point) and
/// wait for another child that has not ended.
const COLLECTING_WITH_RESULTS_TAKEN: &str = "SELECT COUNT(*) FROM instances b \
    WHERE b.status = 'running' AND EXISTS (SELECT 1 FROM messages m WHERE m.instance_id = b.id \
      AND m.kind = 'child_completed' AND m.status = 'routed' AND m.locked_by IS NOT NULL) \
    AND EXISTS (SELECT 1 FROM instances c WHERE c.parent_id = b.id \
      AND c.status NOT IN ('completed', 'failed', 'terminated'))";

async fn sigterm_saves_every_instance_and_a_restart_finishes_them(db: TestDb) {
    let run = new_run(db).await;
    // Slow ports spread the children's results out in time, so batches are mid-collection.
    // Instances stay in memory until the SIGTERM: with the usual quick dehydration (300 ms) an
    // idle batch would save what it took in a dehydration point of its own first, on a slow
    // machine before the SIGTERM arrives, leaving the shutdown nothing to save.
    let host = run.spawn(
        0,
        300,
        &[
            "--dehydrate-after-ms",
            "60000",
            "--poll-ms",
            "20",
            "--lease-ms",
            "2000",
        ],
        "warn",
    );
    let (ids, published) = feed(&run, 0, 300).await;
    // Stop while batches are collecting their children's results: those results are consumed
    // without a persistence point of their own, so the shutdown point must save them.
    // Wait until batches hold children's results in memory (taken, not yet consumed) and still
    // wait for other children: their last result, which would complete them with a point of
    // their own, cannot come before the SIGTERM.
    run.db
        .wait_for(
            "batches holding children's results",
            Duration::from_secs(60),
            || async { run.db.count(COLLECTING_WITH_RESULTS_TAKEN).await >= 5 },
        )
        .await;
    let started = Instant::now();
    let mut host = host;
    host.sigterm();
    let status = host.wait();
    let took = started.elapsed();
    assert!(
        status.success(),
        "host exit status {status}\n{}",
        run.host_log()
    );
    assert!(took < Duration::from_secs(15), "shutdown took {took:?}");
    let saved = run
        .db
        .count("SELECT COUNT(*) FROM history WHERE reason = 'shutdown'")
        .await;
    assert!(
        saved > 0,
        "no shutdown persistence point was written\n{}",
        run.host_log()
    );
    // Nothing stays locked, nothing is owned; messages the saved instances consumed are consumed.
    assert_eq!(
        run.db
            .count("SELECT COUNT(*) FROM messages WHERE locked_by IS NOT NULL")
            .await,
        0
    );
    assert_eq!(
        run.db
            .count("SELECT COUNT(*) FROM instances WHERE owner IS NOT NULL")
            .await,
        0
    );
    let consumed_at_shutdown = run.db.count(
        "SELECT COUNT(*) FROM messages m JOIN history h ON h.instance_id = m.instance_id AND h.reason = 'shutdown' \
         WHERE m.status = 'consumed' AND m.consumed_at = h.at").await;
    assert!(
        consumed_at_shutdown > 0,
        "the shutdown points consumed no message"
    );
    eprintln!("shutdown in {took:?}: {saved} instances saved, {consumed_at_shutdown} messages consumed by them");

    let host = run.spawn_host(1);
    wait_until_all_ended(&run, &ids, Duration::from_secs(120)).await;
    stop(host);
    check_guarantees(&run, &ids, &published).await;
}

/// A host whose log cannot be written (its stderr is a pipe whose reader has gone, as when a log
/// shipper dies) keeps running: a failed log line is dropped, not a panic in whatever thread
/// logged it (a host task, a database connection's worker thread). Logging at `debug`, every
/// part of the host logs.
async fn a_host_whose_log_cannot_be_written_keeps_running(db: TestDb) {
    let run = new_run(db).await;
    let mut host = run.spawn_with_broken_log("debug");
    let (ids, published) = feed(&run, 0, 30).await;
    wait_until_all_ended(&run, &ids, Duration::from_secs(60)).await;
    host.sigterm();
    let status = host.wait();
    assert!(status.success(), "host exit status {status}");
    check_guarantees(&run, &ids, &published).await;
}

/// A host polling only once a minute still runs at once what another process commits for it:
/// PostgreSQL's `NOTIFY`, SQLite's wake-up socket (`store/sqlite/wake.rs`). The first wave is
/// published before the host starts (its start-up claim takes it: the marker that the host is up
/// and idle), the second while it idles, from this test's own store, a process apart from the
/// host's.
async fn work_committed_by_another_process_wakes_the_host_without_its_poll(db: TestDb) {
    let run = new_run(db).await;
    let (first, _) = feed(&run, 0, 1).await;
    let args = ["--dehydrate-after-ms", "300", "--poll-ms", "60000"];
    let no_failures = [("CAIRN_SAMPLE_FAILURE_PERCENT", "0".to_owned())];
    let mut host = run.spawn_env(0, 0, &args, "warn", &no_failures);
    wait_until_all_ended(&run, &first, Duration::from_secs(30)).await;
    let t = Instant::now();
    let (second, _) = feed(&run, 1, 1).await;
    wait_until_all_ended(&run, &second, Duration::from_secs(20)).await;
    let took = t.elapsed();
    host.sigterm();
    assert!(host.wait().success());
    assert!(
        took < Duration::from_secs(10),
        "the second wave took {took:?}: the host waited for its minute-long poll"
    );
}

/// The audit trail's ordered file port, with 1,000 entries: the host is killed with SIGKILL while
/// it delivers them, entry 500 keeps failing (the port must stop on it, not skip it), and an
/// operator resumes it once the target is fixed. The port's own record (the ledger, in arrival
/// order, and the files) must show every entry exactly once (deduplicated by id) in commit order.
async fn an_ordered_port_delivers_in_commit_order_across_a_sigkill_and_a_failing_message(
    db: TestDb,
) {
    const ENTRIES: i64 = 1_000;
    const FAILING: i64 = 500;
    let run = new_run(db).await;
    let audit = run.dir.path().join("audit");
    let recovered = run.dir.path().join("audit-recovered");
    let env = [
        ("CAIRN_AUDIT_DIR", audit.display().to_string()),
        ("CAIRN_AUDIT_FAIL_N", FAILING.to_string()),
        ("CAIRN_AUDIT_RECOVERED", recovered.display().to_string()),
    ];
    let spawn = |n: usize| run.spawn_env(n, 0, support::processes::HOST_ARGS, "warn", &env);
    let mut host = spawn(0);
    let client = run.client();
    let events: Vec<NewMessage> = (0..ENTRIES)
        .map(|n| {
            NewMessage::published(
                format!("audit-{n}"),
                "audit.event",
                json!({"n": n, "text": format!("entry {n}")}),
                BTreeMap::new(),
            )
        })
        .collect();
    for chunk in events.chunks(100) {
        client.publish_batch(chunk.to_vec()).await.unwrap();
    }
    // Kill the host while it delivers.
    run.db
        .wait_for("deliveries under way", Duration::from_secs(60), || async {
            run.db
                .count("SELECT COUNT(*) FROM outbox WHERE port = 'audit' AND status = 'delivered'")
                .await
                > 50
        })
        .await;
    host.sigkill();
    let delivered_at_kill = run
        .db
        .count("SELECT COUNT(*) FROM outbox WHERE port = 'audit' AND status = 'delivered'")
        .await;
    eprintln!("killed with {delivered_at_kill} audit entries delivered");
    assert!(
        delivered_at_kill < ENTRIES,
        "the kill came after every delivery"
    );
    host = spawn(1);
    // Every entry committed before the failing one arrives; then the port stops on it.
    run.db
        .wait_for(
            "the port to hold the failing entry",
            Duration::from_secs(120),
            || async {
                run.db
                    .count("SELECT COUNT(*) FROM outbox WHERE port = 'audit' AND status = 'held'")
                    .await
                    == 1
            },
        )
        .await;
    let held: String =
        sqlx::query_scalar("SELECT id FROM outbox WHERE port = 'audit' AND status = 'held'")
            .fetch_one(&run.db.sql)
            .await
            .unwrap();
    let order: Vec<String> =
        sqlx::query_scalar("SELECT id FROM outbox WHERE port = 'audit' ORDER BY seq")
            .fetch_all(&run.db.sql)
            .await
            .unwrap();
    let held_at = order.iter().position(|id| *id == held).unwrap();
    // The held row is the marker: the port's one delivery loop wrote it after its last try of
    // the failing entry, so every pass in which a port that skips would have delivered a later
    // entry came before it. A delivery during the hold would break the order checked at the end.
    let arrived = first_arrivals(&run, "audit");
    assert_eq!(
        arrived,
        order[..held_at],
        "before the held entry: everything, in commit order, nothing after it"
    );
    // The target is fixed; the operator resumes the held entry with the CLI.
    std::fs::write(&recovered, "fixed").unwrap();
    let resumed = std::process::Command::new(env!("CARGO_BIN_EXE_cairn"))
        .args(["--database", &run.db.url, "outbox", "resume", &held])
        .output()
        .unwrap();
    assert!(
        resumed.status.success(),
        "{}",
        String::from_utf8_lossy(&resumed.stderr)
    );
    run.db
        .wait_for(
            "every entry delivered",
            Duration::from_secs(120),
            || async {
                run.db
                    .count(
                        "SELECT COUNT(*) FROM outbox WHERE port = 'audit' AND status = 'delivered'",
                    )
                    .await
                    == ENTRIES
            },
        )
        .await;
    stop(host);
    let arrived = first_arrivals(&run, "audit");
    assert_eq!(
        arrived, order,
        "all 1,000 entries, each once, in commit order"
    );
    let files = std::fs::read_dir(&audit)
        .unwrap()
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().ends_with(".json"))
        .count();
    assert_eq!(
        files as i64, ENTRIES,
        "one file per entry in the audit folder"
    );
    let redelivered = run
        .ledger_ids()
        .into_iter()
        .filter(|(id, n)| order.contains(id) && *n > 1)
        .count();
    eprintln!("{ENTRIES} audit entries in commit order; {redelivered} delivered more than once (same id); entry {FAILING} held until resumed");
}

/// The ids a port received, in arrival order, each counted at its first arrival (a receiver
/// deduplicating by id).
fn first_arrivals(run: &support::processes::Run, port: &str) -> Vec<String> {
    let text = std::fs::read_to_string(run.ledger()).unwrap_or_default();
    let mut seen = std::collections::BTreeSet::new();
    text.lines()
        .filter_map(|line| {
            let mut cols = line.split('\t');
            (cols.next() == Some(port)).then(|| cols.next().unwrap_or_default().to_owned())
        })
        .filter(|id| seen.insert(id.clone()))
        .collect()
}

/// Retention while a host runs and is killed: a host deleting ended instances after one second
/// (archiving them first) is SIGKILLed twice mid-load and started again. Every instance still
/// ends as its input says (nothing of a running one was deleted: it would stall or fail), each
/// is archived with a gapless history ending in its final status, and at the end nothing of
/// them is left in any table.
async fn retention_under_sigkill_deletes_only_ended_instances_and_all_that_was_theirs(db: TestDb) {
    let run = new_run(db).await;
    let archive = run.dir.path().join("archive");
    std::fs::create_dir(&archive).unwrap();
    let archive_arg = archive.to_str().unwrap().to_owned();
    let mut args = support::processes::HOST_ARGS.to_vec();
    args.extend(["--retain-ended", "1s", "--archive", &archive_arg]);
    let mut host = run.spawn(0, 20, &args, "warn");
    let (mut ids, _) = feed(&run, 0, 120).await;
    let mut declined = 0;
    for k in 1..=2 {
        // Once the host purges, more work arrives, and the host is killed with it in flight.
        run.db
            .wait_for(
                "ended instances purged",
                Duration::from_secs(60),
                || async { archived_lines(&archive).len() > 20 * k },
            )
            .await;
        let (more, _) = feed(&run, k, 60).await;
        ids.extend(more);
        tokio::time::sleep(Duration::from_millis(
            rand::thread_rng().gen_range(100..400),
        ))
        .await;
        host.sigkill();
        let open = run
            .db
            .count("SELECT COUNT(*) FROM instances WHERE status NOT IN ('completed', 'failed', 'terminated')")
            .await;
        eprintln!("kill {k}: {open} instances open");
        host = run.spawn(k, 20, &args, "warn");
    }
    for wave in 0..=2 {
        let (starts, _) = support::processes::load(wave, if wave == 0 { 120 } else { 60 });
        declined += starts
            .iter()
            .filter(|m| m.message_type == "order.placed" && m.body["amount"] == json!(5000.0))
            .count();
    }
    // Everything ends, and is purged: no table keeps anything of an ended instance.
    run.db
        .wait_for(
            "every instance ended and purged",
            Duration::from_secs(180),
            || async { run.db.count("SELECT COUNT(*) FROM instances").await == 0 },
        )
        .await;
    stop(host);
    // (The activating subscriptions, of no instance, stay.)
    for table in ["history", "messages", "outbox", "subscriptions", "timers"] {
        assert_eq!(
            run.db
                .count(&format!(
                    "SELECT COUNT(*) FROM {table} WHERE instance_id IS NOT NULL"
                ))
                .await,
            0,
            "rows left in {table}"
        );
    }
    // Each instance fed is archived, ended as expected, with its whole history.
    let mut by_id: BTreeMap<String, serde_json::Value> = BTreeMap::new();
    for line in archived_lines(&archive) {
        let id = line["id"].as_str().unwrap().to_owned();
        let history = line["history"].as_array().unwrap();
        let seqs: Vec<i64> = history.iter().map(|h| h["seq"].as_i64().unwrap()).collect();
        assert_eq!(seqs, (1..=seqs.len() as i64).collect::<Vec<_>>(), "{line}");
        let status = line["status"].as_str().unwrap();
        assert!(
            ["completed", "failed", "terminated"].contains(&status),
            "{line}"
        );
        assert_eq!(history.last().unwrap()["status"], json!(status), "{line}");
        // Archived twice only if a kill fell between the archive and the delete: the same.
        if let Some(earlier) = by_id.insert(id, line.clone()) {
            assert_eq!(earlier, line);
        }
    }
    for id in &ids {
        assert!(
            by_id.contains_key(&id.to_string()),
            "instance {id} never archived"
        );
    }
    let failed_orders = by_id
        .values()
        .filter(|l| {
            l["orchestration"] == json!("order-fulfilment") && l["status"] == json!("failed")
        })
        .count();
    assert_eq!(
        failed_orders, declined,
        "exactly the declined orders failed"
    );
}

fn archived_lines(dir: &std::path::Path) -> Vec<serde_json::Value> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let text = std::fs::read_to_string(entry.path()).unwrap_or_default();
        // A line cut by a kill mid-write is not there: the file is synced before any delete.
        out.extend(text.lines().filter_map(|l| serde_json::from_str(l).ok()));
    }
    out
}
