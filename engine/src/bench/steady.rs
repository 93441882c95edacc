//! W7, the steady state: W1's orchestrations (3 request-response calls each) started at a
//! constant rate for a set time by one host that deletes ended instances after a short
//! retention. What it shows is whether a host that runs for long stays flat: the database's
//! size and the process's resident memory, sampled every few seconds, at the start, halfway and
//! at the end, their growth per hour and over the second half, and the 99th percentile of
//! start-to-completion latency minute by minute.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use serde_json::json;
use uuid::Uuid;

use super::orchestrations::Chain;
use super::workloads::{ms, rss_mb, Running, Settings};
use super::{db, percentile, BenchError, Figure};
use crate::store::InstanceStatus;
use crate::Orchestration;

/// How often arrivals are started.
const TICK: Duration = Duration::from_millis(100);

/// How long instances still running at the end may take to finish.
const DRAIN: Duration = Duration::from_secs(120);

/// One sample of size and memory.
#[derive(Debug, Clone, Copy)]
struct Sample {
    at_s: f64,
    db_bytes: f64,
    rss_mb: f64,
}

/// Runs W7; see the module docs.
pub(super) async fn w7(url: &str, settings: &Settings) -> Result<Figure, BenchError> {
    let store = db::fresh(url).await?;
    let mut running = Running::start_with(vec![store], settings, Some(settings.retain));
    let duration = settings.duration.max(Duration::from_secs(1));
    let sample_every = (duration / 60).clamp(Duration::from_millis(500), Duration::from_secs(10));
    let sample = |at: Duration, db_bytes: u64| Sample {
        at_s: at.as_secs_f64(),
        db_bytes: db_bytes as f64,
        rss_mb: rss_mb().0.unwrap_or(0.0),
    };
    let t0 = Instant::now();
    let mut samples = vec![sample(
        Duration::ZERO,
        running.store.database_bytes().await?,
    )];
    let mut last_sample = Instant::now();
    let mut started: HashMap<Uuid, Instant> = HashMap::new();
    let mut total_started = 0usize;
    let mut by_minute: BTreeMap<u64, Vec<f64>> = BTreeMap::new();
    let mut all = Vec::new();
    let mut ticker = tokio::time::interval(TICK);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let ended = |running_since: Instant,
                 started: &mut HashMap<Uuid, Instant>,
                 by_minute: &mut BTreeMap<u64, Vec<f64>>,
                 all: &mut Vec<f64>,
                 ended: crate::host::Ended|
     -> Result<(), BenchError> {
        if ended.status != InstanceStatus::Completed {
            return Err(BenchError::Stalled(format!(
                "instance {} ended {}; see `cairn show {}`",
                ended.instance_id, ended.status, ended.instance_id
            )));
        }
        if let Some(at) = started.remove(&ended.instance_id) {
            let latency = ms(at.elapsed());
            let minute = running_since.elapsed().as_secs() / 60;
            by_minute.entry(minute).or_default().push(latency);
            all.push(latency);
        }
        Ok(())
    };
    loop {
        tokio::select! {
            _ = ticker.tick() => {
                let elapsed = t0.elapsed();
                if elapsed >= duration {
                    break;
                }
                // Constant arrivals: whatever is due by now, however long the last start took.
                let due = (settings.rate * elapsed.as_secs_f64()) as usize;
                if due > total_started {
                    let inputs = (total_started..due)
                        .map(|_| (Chain::NAME.to_owned(), json!({ "calls": 3 })))
                        .collect();
                    let at = Instant::now();
                    for id in running.client.start_many(inputs).await? {
                        started.insert(id, at);
                    }
                    total_started = due;
                }
                if last_sample.elapsed() >= sample_every {
                    last_sample = Instant::now();
                    samples.push(sample(t0.elapsed(), running.store.database_bytes().await?));
                }
            }
            Some(end) = running.endings.recv() => {
                ended(t0, &mut started, &mut by_minute, &mut all, end)?;
            }
        }
    }
    samples.push(sample(t0.elapsed(), running.store.database_bytes().await?));
    let wall = t0.elapsed().as_secs_f64();
    let completed_in_time = all.len();
    // What is still running finishes, so that every start is accounted for.
    let deadline = tokio::time::Instant::now() + DRAIN;
    while !started.is_empty() {
        match tokio::time::timeout_at(deadline, running.endings.recv()).await {
            Ok(Some(end)) => ended(t0, &mut started, &mut by_minute, &mut all, end)?,
            _ => {
                return Err(BenchError::Stalled(format!(
                    "{} instances still running {DRAIN:?} after the arrivals stopped",
                    started.len()
                )))
            }
        }
    }
    running.stop().await?;
    Ok(figure(
        settings,
        total_started,
        completed_in_time,
        wall,
        &samples,
        by_minute,
        all,
    ))
}

/// The figure: sizes and memory at the start, halfway and the end, growth, latency by minute.
fn figure(
    settings: &Settings,
    started: usize,
    completed_in_time: usize,
    wall: f64,
    samples: &[Sample],
    by_minute: BTreeMap<u64, Vec<f64>>,
    mut all: Vec<f64>,
) -> Figure {
    let first = samples[0];
    let last = samples[samples.len() - 1];
    // The first sample at or past half the run.
    let half = samples
        .iter()
        .copied()
        .find(|s| s.at_s >= last.at_s / 2.0)
        .unwrap_or(last);
    let hours = (last.at_s / 3600.0).max(f64::EPSILON);
    let pct = |from: f64, to: f64| {
        if from > 0.0 {
            (to - from) / from * 100.0
        } else {
            0.0
        }
    };
    let mut extra = BTreeMap::from([
        ("rate".to_owned(), settings.rate),
        ("retain_s".to_owned(), settings.retain.as_secs_f64()),
        ("completed_in_time".to_owned(), completed_in_time as f64),
        ("db_bytes_start".to_owned(), first.db_bytes),
        ("db_bytes_half".to_owned(), half.db_bytes),
        ("db_bytes_end".to_owned(), last.db_bytes),
        (
            "db_bytes_max".to_owned(),
            samples.iter().map(|s| s.db_bytes).fold(0.0, f64::max),
        ),
        ("rss_mb_start".to_owned(), first.rss_mb),
        ("rss_mb_half".to_owned(), half.rss_mb),
        ("rss_mb_end".to_owned(), last.rss_mb),
        (
            "rss_mb_max".to_owned(),
            samples.iter().map(|s| s.rss_mb).fold(0.0, f64::max),
        ),
        (
            "db_bytes_growth_per_h".to_owned(),
            (last.db_bytes - first.db_bytes) / hours,
        ),
        (
            "rss_mb_growth_per_h".to_owned(),
            (last.rss_mb - first.rss_mb) / hours,
        ),
        (
            "db_growth_second_half_pct".to_owned(),
            pct(half.db_bytes, last.db_bytes),
        ),
        (
            "rss_growth_second_half_pct".to_owned(),
            pct(half.rss_mb, last.rss_mb),
        ),
    ]);
    for (minute, mut latencies) in by_minute {
        if let Some(p99) = percentile(&mut latencies, 0.99) {
            extra.insert(format!("p99_ms_minute_{:02}", minute + 1), p99);
        }
    }
    Figure {
        workload: "W7".to_owned(),
        instances: started as u64,
        wall_s: wall,
        orchestrations_per_s: Some(completed_in_time as f64 / wall),
        persistence_points_per_s: None,
        p50_ms: percentile(&mut all, 0.50),
        p99_ms: percentile(&mut all, 0.99),
        extra,
        ..Figure::default()
    }
}
