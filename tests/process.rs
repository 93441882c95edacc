//! The `cairn` binary as a real process: killed with SIGKILL at random moments under load, and
//! stopped with SIGTERM under load. The guarantees are then checked from the database and from
//! the ports' own record (the ledger file the sample ports append each delivered message id to).
//!
//! `CAIRN_SOAK=1` runs the long version of the crash test (`just soak`).

#![allow(clippy::unwrap_used)] // tests may unwrap: a panic is a failed test

mod support;

use std::time::{Duration, Instant};

use rand::Rng;
use support::processes::{check_guarantees, feed, new_run, stop, wait_until_all_ended};
use support::TestDb;

backend_tests!(
    sigkill_at_random_moments_loses_nothing,
    sigterm_saves_every_instance_and_a_restart_finishes_them
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
    let mut host = run.spawn_host(0);
    let (mut ids, mut published) = feed(&run, 0, first_wave).await;
    let mut rng = rand::thread_rng();
    let mut inside_atomic = 0;
    for k in 1..=kills {
        tokio::time::sleep(Duration::from_millis(rng.gen_range(100..700))).await;
        host.sigkill();
        let open = run
            .db
            .count("SELECT COUNT(*) FROM instances WHERE status NOT IN ('completed', 'failed')")
            .await;
        let in_atomic = run.db.count(INSIDE_ATOMIC).await;
        inside_atomic += in_atomic;
        eprintln!(
            "kill {k}: {open} instances in flight, {in_atomic} trips inside their atomic scope"
        );
        assert!(
            open > 0,
            "kill {k} hit an idle host: the test would prove nothing"
        );
        // More work arrives while the host is down (G1: accepted with no host running).
        let (more_ids, more) = feed(&run, k, wave).await;
        ids.extend(more_ids);
        published.extend(more);
        host = run.spawn_host(k);
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
    host = run.spawn_host(kills + 1);
    wait_until_all_ended(
        &run,
        &ids,
        Duration::from_secs(if soak { 900 } else { 180 }),
    )
    .await;
    stop(host);
    assert!(
        inside_atomic > 0,
        "no kill landed inside an atomic scope: the test would not show that one leaves no trace"
    );
    check_guarantees(&run, &ids, &published).await;
}

async fn sigterm_saves_every_instance_and_a_restart_finishes_them(db: TestDb) {
    let run = new_run(db).await;
    // Slow ports spread the children's results out in time, so batches are mid-collection.
    let host = run.spawn_host_with(0, 300);
    let (ids, published) = feed(&run, 0, 300).await;
    // Stop while batches are collecting their children's results: those results are consumed
    // without a persistence point of their own, so the shutdown point must save them.
    // Wait until batches hold children's results in memory: taken, not yet consumed.
    run.db.wait_for("batches holding children's results", Duration::from_secs(60), || async {
        run.db.count("SELECT COUNT(*) FROM messages WHERE kind = 'child_completed' AND status = 'routed' AND locked_by IS NOT NULL").await >= 5
    }).await;
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
