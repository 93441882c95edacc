//! Many hosts on one PostgreSQL database (G4): hosts killed, frozen past their leases, a database
//! restart, how work spreads, and how fast an idle host wakes. PostgreSQL only: sharing one
//! database between hosts is what the PostgreSQL backend is for (SQLite serves one host).

#![allow(clippy::unwrap_used)] // tests may unwrap: a panic is a failed test

mod support;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use serde_json::json;
use support::processes::{
    check_guarantees, feed, new_run, stop, wait_until_all_ended, Run, HOST_ARGS,
};
use support::{Backend, TestDb};

/// These tests run one at a time: each starts several hosts, and two cores shared by twelve
/// busy hosts would test the machine, not the engine.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

async fn postgres() -> Option<TestDb> {
    TestDb::new(Backend::Postgres).await
}

/// G4 from the history: along each instance's history the epoch never goes back, and one epoch
/// was only ever written by one host.
async fn assert_one_owner_at_a_time(run: &Run) {
    let backwards = run.db.count(
        "SELECT COUNT(*) FROM history h JOIN history p ON p.instance_id = h.instance_id AND p.seq = h.seq - 1 \
         WHERE h.epoch < p.epoch").await;
    assert_eq!(
        backwards, 0,
        "a point was written with an older epoch than the one before it"
    );
    let shared = run.db.count(
        "SELECT COUNT(*) FROM (SELECT instance_id, epoch FROM history WHERE host <> 'operator' \
         GROUP BY instance_id, epoch HAVING COUNT(DISTINCT host) > 1) x").await;
    assert_eq!(shared, 0, "two hosts committed under one epoch");
}

/// Persistence points each host wrote, by host id.
async fn points_by_host(run: &Run) -> BTreeMap<String, i64> {
    let rows: Vec<(String, i64)> =
        sqlx::query_as("SELECT host, COUNT(*) FROM history GROUP BY host")
            .fetch_all(&run.db.sql)
            .await
            .unwrap();
    rows.into_iter().collect()
}

/// How often a host's commits were refused: fenced by the epoch check, or aborted by the server
/// because the host had left its transaction idle while frozen.
fn refusals_in_log(log: &str) -> u64 {
    let fenced = log
        .lines()
        .filter_map(|l| l.split("fenced: ").nth(1))
        .filter_map(|rest| {
            rest.split(|c: char| !c.is_ascii_digit())
                .next()?
                .parse()
                .ok()
        })
        .max()
        .unwrap_or(0);
    let aborted = log
        .lines()
        .filter(|l| l.contains("idle-in-transaction timeout"))
        .count() as u64;
    fenced + aborted
}

#[cfg_attr(
    not(pg_available),
    ignore = "no PostgreSQL binaries at build time (orchestrations/build.rs); CONTRIBUTING.md, PostgreSQL"
)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_hosts_survive_a_killed_host_and_a_frozen_zombie() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let Some(db) = postgres().await else { return };
    let run = new_run(db).await;
    let mut a = run.spawn(0, 5, HOST_ARGS, "warn");
    let b = run.spawn(1, 5, HOST_ARGS, "info");
    let c = run.spawn(2, 5, HOST_ARGS, "warn");
    let (mut ids, mut published) = feed(&run, 0, 1200).await;
    run.db
        .wait_for("work under way", Duration::from_secs(60), || async {
            run.db
                .count("SELECT COUNT(*) FROM instances WHERE status IN ('completed', 'failed')")
                .await
                > 100
        })
        .await;

    // A dies; B freezes while holding instances and stays frozen well past its leases.
    a.sigkill();
    let b_id: String = sqlx::query_scalar("SELECT id FROM hosts WHERE pid = $1")
        .bind(b.0.id() as i32)
        .fetch_one(&run.db.sql)
        .await
        .unwrap();
    let owned_by_b = "SELECT COUNT(*) FROM instances WHERE owner = $1";
    let mut held = 0;
    for _ in 0..200 {
        b.signal(Signal::SIGSTOP);
        held = run.db.count_with(owned_by_b, &b_id).await;
        if held > 0 {
            break;
        }
        b.signal(Signal::SIGCONT);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(held > 0, "B never held an instance to be taken over");
    let frozen_at = Instant::now();
    let (more_ids, more) = feed(&run, 1, 300).await;
    ids.extend(more_ids);
    published.extend(more);
    eprintln!("B ({b_id}) froze owning {held} instances");
    let takeover = "C to take over instances B owned, with B frozen past three leases";
    run.db
        .wait_for(takeover, Duration::from_secs(120), || async {
            let still = run
                .db
                .count_with(
                    "SELECT COUNT(*) FROM instances WHERE owner = $1 AND status NOT IN ('completed', 'failed')",
                    &b_id,
                )
                .await;
            frozen_at.elapsed() > Duration::from_secs(6) && still < held
        })
        .await;
    let still = run
        .db
        .count_with("SELECT COUNT(*) FROM instances WHERE owner = $1", &b_id)
        .await;
    eprintln!(
        "B frozen for {:?}; it still owns {still} of its {held} instances",
        frozen_at.elapsed()
    );
    // B wakes up as a zombie: whatever it held in memory was taken over and must not commit.
    b.signal(Signal::SIGCONT);

    wait_until_all_ended(&run, &ids, Duration::from_secs(240)).await;
    stop(b);
    stop(c);
    check_guarantees(&run, &ids, &published).await;
    assert_one_owner_at_a_time(&run).await;
    let refused = refusals_in_log(&run.log_of(1));
    eprintln!(
        "persistence points by host: {:?}; the zombie had commits refused {refused} times",
        points_by_host(&run).await
    );
    assert!(
        refused > 0,
        "the zombie never tried to commit a taken-over instance: the test proved nothing\n{}",
        run.log_of(1)
    );
}

#[cfg_attr(
    not(pg_available),
    ignore = "no PostgreSQL binaries at build time (orchestrations/build.rs); CONTRIBUTING.md, PostgreSQL"
)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn work_spreads_across_three_live_hosts() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let Some(db) = postgres().await else { return };
    let run = new_run(db).await;
    let hosts: Vec<_> = (0..3)
        .map(|n| run.spawn(n, 20, HOST_ARGS, "warn"))
        .collect();
    let (ids, published) = feed(&run, 0, 1500).await;
    wait_until_all_ended(&run, &ids, Duration::from_secs(240)).await;
    for h in hosts {
        stop(h);
    }
    check_guarantees(&run, &ids, &published).await;
    let completions: Vec<(String, i64)> = sqlx::query_as(
        "SELECT host, COUNT(*) FROM history WHERE reason = 'complete' GROUP BY host ORDER BY host",
    )
    .fetch_all(&run.db.sql)
    .await
    .unwrap();
    let total: i64 = completions.iter().map(|(_, n)| n).sum();
    let shares: Vec<f64> = completions
        .iter()
        .map(|(_, n)| *n as f64 / total as f64)
        .collect();
    eprintln!("completions by host: {completions:?} (shares {shares:.2?})");
    assert_eq!(
        completions.len(),
        3,
        "every host completed instances: {completions:?}"
    );
    for share in shares {
        assert!(
            share >= 0.15,
            "a host did less than 15% of the work: {completions:?}"
        );
    }
}

#[cfg_attr(
    not(pg_available),
    ignore = "no PostgreSQL binaries at build time (orchestrations/build.rs); CONTRIBUTING.md, PostgreSQL"
)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hosts_recover_from_a_database_restart_with_nothing_lost() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let Some(cluster) = support::pg::dedicated_cluster() else {
        return;
    };
    let url = support::pg::database_in(&cluster).await;
    let run = new_run(TestDb::at(Backend::Postgres, url, None).await).await;
    let hosts: Vec<_> = (0..2).map(|n| run.spawn(n, 5, HOST_ARGS, "warn")).collect();
    let (ids, published) = feed(&run, 0, 600).await;
    run.db
        .wait_for("work under way", Duration::from_secs(60), || async {
            run.db
                .count("SELECT COUNT(*) FROM instances WHERE status IN ('completed', 'failed')")
                .await
                > 50
        })
        .await;
    cluster.stop_server().unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    cluster.start_server().unwrap();
    eprintln!("database restarted");
    wait_until_all_ended(&run, &ids, Duration::from_secs(240)).await;
    for h in hosts {
        stop(h);
    }
    check_guarantees(&run, &ids, &published).await;
    assert_one_owner_at_a_time(&run).await;
}

#[cfg_attr(
    not(pg_available),
    ignore = "no PostgreSQL binaries at build time (orchestrations/build.rs); CONTRIBUTING.md, PostgreSQL"
)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_host_wakes_on_notify_not_on_its_poll() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let Some(db) = postgres().await else { return };
    let run = new_run(db).await;
    // Polling every 30 s: only a notification can make this host react quickly.
    let host = run.spawn(
        0,
        0,
        &[
            "--poll-ms",
            "30000",
            "--lease-ms",
            "2000",
            "--dehydrate-after-ms",
            "300",
        ],
        "warn",
    );
    // A warm-up instance first: once its first point is written the host is up and has claimed
    // what there was; from then on only a notification (or the 30 s poll) makes it claim again.
    let client = run.client();
    let (_, warm_up) = client
        .publish(
            "approval.requested",
            json!({"request_id": "warm-up", "approver": "x"}),
            None,
            BTreeMap::new(),
        )
        .await
        .unwrap();
    let cairn::store::PublishOutcome::Routed(warm_up) = warm_up else {
        panic!("{warm_up:?}")
    };
    run.db
        .wait_first_point(warm_up, Duration::from_secs(60))
        .await;
    tokio::time::sleep(Duration::from_millis(300)).await; // the claim after that point is done
    let mut latencies = Vec::new();
    for i in 0..5 {
        let started = Instant::now();
        let (_, outcome) = client
            .publish(
                "approval.requested",
                json!({"request_id": format!("n{i}"), "approver": "x"}),
                None,
                BTreeMap::new(),
            )
            .await
            .unwrap();
        let cairn::store::PublishOutcome::Routed(id) = outcome else {
            panic!("{outcome:?}")
        };
        run.db.wait_first_point(id, Duration::from_secs(10)).await;
        latencies.push(started.elapsed());
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    stop(host);
    eprintln!("publish to first persistence point, with a 30 s poll: {latencies:?}");
    assert!(
        latencies.iter().all(|l| *l < Duration::from_secs(2)),
        "{latencies:?}"
    );
}
