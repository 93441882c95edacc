//! W7, the steady state: W1's orchestrations (3 request-response calls each) started at a
//! constant rate for a set time by one host that deletes ended instances after a short
//! retention. What it shows is whether a host that runs for long stays flat: the database's
//! size and the process's resident memory, sampled every few seconds, at the start, halfway and
//! at the end, their growth per hour and over the second half, and the 99th percentile of
//! start-to-completion latency minute by minute.
//!
//! The size of the live set oscillates with the retention's rhythm (a purge every few seconds),
//! so the growth over the second half compares the *mean* of the samples of the minute at half
//! time with that of the last whole minute (`db_growth_second_half_pct`,
//! `rss_growth_second_half_pct`); the single samples are there too (`db_bytes_half`,
//! `db_bytes_end`, ...). Latencies go to fixed histograms (1 % buckets), not to a growing list,
//! so that the benchmark's own bookkeeping does not show as the host's memory growth.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use serde_json::json;
use uuid::Uuid;

use super::orchestrations::Chain;
use super::workloads::{ms, rss_mb, Running, Settings};
use super::{db, BenchError, Figure};
use crate::store::InstanceStatus;
use crate::Orchestration;

/// How often arrivals are started.
const TICK: Duration = Duration::from_millis(100);

/// How long instances still running at the end may take to finish.
const DRAIN: Duration = Duration::from_secs(120);

/// Latencies in buckets 1 % wide, from 10 µs to about 100 s: constant memory whatever the count.
#[derive(Debug, Clone)]
struct Histogram {
    counts: Vec<u64>,
    total: u64,
}

/// The lower bound of the first bucket, in milliseconds, and the width factor of each.
const LOWEST_MS: f64 = 0.01;
const FACTOR: f64 = 1.01;
const BUCKETS: usize = 1700;

impl Histogram {
    fn new() -> Self {
        Self {
            counts: vec![0; BUCKETS],
            total: 0,
        }
    }

    fn record(&mut self, ms: f64) {
        let i = if ms <= LOWEST_MS {
            0
        } else {
            ((ms / LOWEST_MS).ln() / FACTOR.ln()) as usize
        };
        self.counts[i.min(BUCKETS - 1)] += 1;
        self.total += 1;
    }

    /// The `q` quantile (nearest rank), as the middle of its bucket (within 0.5 %).
    fn quantile(&self, q: f64) -> Option<f64> {
        if self.total == 0 {
            return None;
        }
        let rank = ((q * self.total as f64).ceil() as u64).clamp(1, self.total);
        let mut seen = 0;
        for (i, n) in self.counts.iter().enumerate() {
            seen += n;
            if seen >= rank {
                return Some(LOWEST_MS * FACTOR.powf(i as f64 + 0.5));
            }
        }
        None
    }
}

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
    let mut running = Running::start_with(vec![store], settings, Some(settings.retain), None);
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
    let mut by_minute: BTreeMap<u64, Histogram> = BTreeMap::new();
    let mut all = Histogram::new();
    let mut ticker = tokio::time::interval(TICK);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let ended = |running_since: Instant,
                 started: &mut HashMap<Uuid, Instant>,
                 by_minute: &mut BTreeMap<u64, Histogram>,
                 all: &mut Histogram,
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
            by_minute
                .entry(minute)
                .or_insert_with(Histogram::new)
                .record(latency);
            all.record(latency);
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
    let completed_in_time = all.total as usize;
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
    by_minute: BTreeMap<u64, Histogram>,
    all: Histogram,
) -> Figure {
    let first = samples[0];
    let last = samples[samples.len() - 1];
    // The first sample at or past half the run.
    let half = samples
        .iter()
        .copied()
        .find(|s| s.at_s >= last.at_s / 2.0)
        .unwrap_or(last);
    // The means of the samples in the minute from half time, and in the last minute.
    let mean_over = |from: f64, to: f64, value: fn(&Sample) -> f64| {
        let window: Vec<f64> = samples
            .iter()
            .filter(|s| s.at_s >= from && s.at_s <= to)
            .map(value)
            .collect();
        window.iter().sum::<f64>() / window.len().max(1) as f64
    };
    let minute = 60.0_f64.min(last.at_s / 4.0);
    let half_at = last.at_s / 2.0;
    let db_half_mean = mean_over(half_at, half_at + minute, |s| s.db_bytes);
    let db_end_mean = mean_over(last.at_s - minute, last.at_s, |s| s.db_bytes);
    let rss_half_mean = mean_over(half_at, half_at + minute, |s| s.rss_mb);
    let rss_end_mean = mean_over(last.at_s - minute, last.at_s, |s| s.rss_mb);
    let second_half_hours =
        ((last.at_s - minute / 2.0 - (half_at + minute / 2.0)) / 3600.0).max(f64::EPSILON);
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
        // Per hour over the second half: the first half fills the retention window.
        (
            "db_bytes_growth_per_h".to_owned(),
            (db_end_mean - db_half_mean) / second_half_hours,
        ),
        (
            "rss_mb_growth_per_h".to_owned(),
            (rss_end_mean - rss_half_mean) / second_half_hours,
        ),
        ("db_bytes_half_minute_mean".to_owned(), db_half_mean),
        ("db_bytes_last_minute_mean".to_owned(), db_end_mean),
        ("rss_mb_half_minute_mean".to_owned(), rss_half_mean),
        ("rss_mb_last_minute_mean".to_owned(), rss_end_mean),
        (
            "db_growth_second_half_pct".to_owned(),
            pct(db_half_mean, db_end_mean),
        ),
        (
            "rss_growth_second_half_pct".to_owned(),
            pct(rss_half_mean, rss_end_mean),
        ),
    ]);
    for (minute, latencies) in by_minute {
        if let Some(p99) = latencies.quantile(0.99) {
            extra.insert(format!("p99_ms_minute_{:02}", minute + 1), p99);
        }
    }
    Figure {
        workload: "W7".to_owned(),
        instances: started as u64,
        wall_s: wall,
        orchestrations_per_s: Some(completed_in_time as f64 / wall),
        persistence_points_per_s: None,
        p50_ms: all.quantile(0.50),
        p99_ms: all.quantile(0.99),
        extra,
        ..Figure::default()
    }
}
