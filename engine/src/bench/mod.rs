//! `cairn bench`: the benchmark workloads W1-W6 and the raw ceiling of the database.
//!
//! Every figure is measured with the durable defaults a user gets (SQLite WAL with
//! `synchronous=FULL`, PostgreSQL with `synchronous_commit=on`) on a database the benchmark
//! empties before each run (see [`db`]). A workload runs an engine [`Host`](crate::Host) in this
//! process with the benchmark's own orchestrations ([`orchestrations`]) and an in-process send
//! port, and waits for the instances to end through [`Host::with_endings`](crate::Host::with_endings).
//!
//! | workload | what |
//! |---|---|
//! | W1 | N orchestrations, each 3 sequential request-response calls (and 5, "hello cities"), started 500 a call ("batched"), and started one a call by C callers |
//! | W2 | one such orchestration at a time, N in a row: latency from start to completion; with `--from-process`, also started by a separate client on its own connections |
//! | W3 | an orchestration sends 100 requests at once and joins on the replies, N times |
//! | W4 | N instances wait dehydrated for a correlated message; N messages published 500 a call, and one a call by C callers |
//! | W5 | N instances wait (half on messages, half on timers): memory, then waking 1,000 |
//! | W6 | W1 with 1, 2 and 3 hosts on one PostgreSQL database |
//! | W7 | steady state: W1's orchestrations at a constant rate for minutes with a short retention; database size, memory, p99 by minute ([`steady`](self::steady)) |
//! | W8 | the HTTP receive location: C clients each posting one message a request, against `publish_batch` of 500 from one task |
//! | ceiling | what a persistence point writes, by a bare sqlx loop: one at a time, 100 per transaction, and 100 per transaction as multi-row statements |
//!
//! `docs/performance.md` has the figures and how to reproduce them (`just bench`).

pub mod db;
mod http;
pub mod orchestrations;
mod steady;
mod workloads;

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::Serialize;

use crate::host::{ClientError, HostError};
use crate::store::StoreError;

pub use workloads::{Settings, Workload, DEFAULT_CALLERS};

/// Why a benchmark could not run.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BenchError {
    /// The URL names no durable database the benchmark can use.
    #[error(
        "cairn bench needs a database file or server: sqlite://PATH or postgres://..., not {0:?}"
    )]
    Url(String),
    /// The database holds instances the benchmark did not make.
    #[error("{0} holds instances that cairn bench did not create; the benchmark empties its database, so give it one of its own (e.g. --database sqlite:///tmp/cairn-bench.db)")]
    NotABenchDatabase(String),
    /// A workload does not apply to this backend.
    #[error("{0}")]
    NotApplicable(String),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A client call failed.
    #[error(transparent)]
    Client(#[from] ClientError),
    /// The host stopped on an error.
    #[error(transparent)]
    Host(#[from] HostError),
    /// A raw statement failed.
    #[error("raw SQL: {0}")]
    Sql(#[source] sqlx::Error),
    /// A task failed.
    #[error("task: {0}")]
    Task(String),
    /// Instances did not end in time, or ended badly.
    #[error("{0}")]
    Stalled(String),
}

/// One measured figure (or, after [`summarise`], the median of several runs).
#[derive(Debug, Clone, Default, Serialize)]
pub struct Figure {
    /// `W1`..`W6`, `ceiling-single`, `ceiling-batch100`, `ceiling-batch100-multirow`.
    pub workload: String,
    /// `sqlite` or `postgres`.
    pub backend: &'static str,
    /// Instances (or points, for the ceiling).
    pub instances: u64,
    /// Seconds from the first start (or publish) to the last completion.
    pub wall_s: f64,
    /// Orchestrations completed per second.
    pub orchestrations_per_s: Option<f64>,
    /// Persistence points committed per second.
    pub persistence_points_per_s: Option<f64>,
    /// Median latency, milliseconds.
    pub p50_ms: Option<f64>,
    /// 99th percentile latency, milliseconds.
    pub p99_ms: Option<f64>,
    /// Workload-specific figures (calls, hosts, rss_mb, wake_1000_s, ceiling_share...).
    #[serde(flatten)]
    pub extra: BTreeMap<String, f64>,
    /// How many runs this is the median of.
    pub runs: usize,
    /// For every figure: [min, max] over the runs.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub spread: BTreeMap<String, [f64; 2]>,
}

impl Figure {
    fn numbers(&self) -> BTreeMap<String, f64> {
        let mut out = BTreeMap::new();
        out.insert("wall_s".to_owned(), self.wall_s);
        for (k, v) in [
            ("orchestrations_per_s", self.orchestrations_per_s),
            ("persistence_points_per_s", self.persistence_points_per_s),
            ("p50_ms", self.p50_ms),
            ("p99_ms", self.p99_ms),
        ] {
            if let Some(v) = v {
                out.insert(k.to_owned(), v);
            }
        }
        out.extend(self.extra.iter().map(|(k, v)| (k.clone(), *v)));
        out
    }

    /// A key telling runs of the same figure apart (workload, calls, hosts, callers, ...).
    fn key(&self) -> String {
        let mut key = self.workload.clone();
        for k in ["calls", "hosts", "callers", "from_process", "via_http"] {
            if let Some(v) = self.extra.get(k) {
                let _ = write!(key, " {k}={v}");
            }
        }
        key
    }
}

/// The `q` quantile (nearest rank) of `values`, sorting them; `None` when empty.
pub fn percentile(values: &mut [f64], q: f64) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    values.sort_by(f64::total_cmp);
    let rank = ((q * values.len() as f64).ceil() as usize).clamp(1, values.len());
    Some(values[rank - 1])
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    let n = values.len();
    if n % 2 == 1 {
        values[n / 2]
    } else {
        (values[n / 2 - 1] + values[n / 2]) / 2.0
    }
}

/// Groups the figures of several runs by workload and gives each field's median, with the
/// spread (min, max) over the runs.
pub fn summarise(figures: Vec<Figure>) -> Vec<Figure> {
    let mut groups: Vec<(String, Vec<Figure>)> = Vec::new();
    for f in figures {
        let key = f.key();
        match groups.iter_mut().find(|(k, _)| *k == key) {
            Some((_, g)) => g.push(f),
            None => groups.push((key, vec![f])),
        }
    }
    groups
        .into_iter()
        .map(|(_, runs)| {
            let mut out = runs[0].clone();
            out.runs = runs.len();
            let mut fields: BTreeMap<String, Vec<f64>> = BTreeMap::new();
            for r in &runs {
                for (k, v) in r.numbers() {
                    fields.entry(k).or_default().push(v);
                }
            }
            for (k, mut values) in fields {
                let min = values.iter().copied().fold(f64::INFINITY, f64::min);
                let max = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let m = median(&mut values);
                match k.as_str() {
                    "wall_s" => out.wall_s = m,
                    "orchestrations_per_s" => out.orchestrations_per_s = Some(m),
                    "persistence_points_per_s" => out.persistence_points_per_s = Some(m),
                    "p50_ms" => out.p50_ms = Some(m),
                    "p99_ms" => out.p99_ms = Some(m),
                    _ => {
                        out.extra.insert(k.clone(), m);
                    }
                }
                if runs.len() > 1 {
                    out.spread.insert(k, [min, max]);
                }
            }
            out
        })
        .collect()
}

/// What `cairn bench` was asked for.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// The workloads, in order.
    pub workloads: Vec<Workload>,
    /// Instances per workload (its default when `None`).
    pub instances: Option<usize>,
    /// Runs of each workload; the figures are their medians.
    pub runs: usize,
    /// How the hosts run (metrics on or off; W7's duration, rate and retention).
    pub settings: Settings,
}

/// Runs the workloads on the database at `url`, `runs` times each, and returns the medians.
/// Progress goes to stderr.
///
/// # Errors
/// See [`BenchError`].
pub async fn run(url: &str, options: &BenchOptions) -> Result<Vec<Figure>, BenchError> {
    let backend = db::Backend::of(url)?;
    let mut all = Vec::new();
    for workload in &options.workloads {
        if *workload == Workload::W6 && backend != db::Backend::Postgres {
            eprintln!(
                "cairn bench: W6 (scale-out) needs PostgreSQL; skipped on {}",
                backend.name()
            );
            continue;
        }
        for run in 1..=options.runs.max(1) {
            eprintln!(
                "cairn bench: {workload:?} on {} (run {run}/{})",
                backend.name(),
                options.runs.max(1)
            );
            let figures = workload
                .run_with(url, options.instances, &options.settings)
                .await?;
            for f in &figures {
                eprintln!("  {}", line(f));
            }
            all.extend(figures);
        }
    }
    let mut out = summarise(all);
    // W1 as a share of each batched ceiling that ran.
    for (ceiling, share) in [
        ("ceiling-batch100", "ceiling_share"),
        ("ceiling-batch100-multirow", "ceiling_share_multirow"),
    ] {
        let Some(ceiling) = out
            .iter()
            .find(|f| f.workload == ceiling)
            .and_then(|f| f.persistence_points_per_s)
        else {
            continue;
        };
        for f in out
            .iter_mut()
            .filter(|f| f.workload == "W1" && !f.extra.contains_key("callers"))
        {
            if let Some(pps) = f.persistence_points_per_s {
                f.extra.insert(share.to_owned(), pps / ceiling);
            }
        }
    }
    Ok(out)
}

fn opt(v: Option<f64>, digits: usize) -> String {
    v.map_or_else(|| "-".to_owned(), |v| format!("{v:.digits$}"))
}

fn line(f: &Figure) -> String {
    row(f, false)
}

/// One row of the table; with `spread`, the min..max of the figures that vary most.
fn row(f: &Figure, spread: bool) -> String {
    let mut other: Vec<String> = f
        .extra
        .iter()
        .map(|(k, v)| format!("{k}={}", trim(*v)))
        .collect();
    if spread {
        for (k, [lo, hi]) in &f.spread {
            if SPREAD_SHOWN.contains(&k.as_str()) {
                other.push(format!("{k}[{}..{}]", trim(*lo), trim(*hi)));
            }
        }
    }
    format!(
        "{:<25} {:<8} {:>7} {:>9.3} {:>9} {:>10} {:>8} {:>8}  {}",
        f.workload,
        f.backend,
        f.instances,
        f.wall_s,
        opt(f.orchestrations_per_s, 0),
        opt(f.persistence_points_per_s, 0),
        opt(f.p50_ms, 2),
        opt(f.p99_ms, 2),
        other.join(" ")
    )
}

/// The figures whose spread over the runs the table shows.
const SPREAD_SHOWN: [&str; 6] = [
    "orchestrations_per_s",
    "persistence_points_per_s",
    "p50_ms",
    "rss_mb",
    "wake_s",
    "per_fanout_ms",
];

fn trim(v: f64) -> String {
    if v.fract() == 0.0 && v.abs() < 1e9 {
        format!("{v:.0}")
    } else {
        format!("{v:.3}")
    }
}

/// The figures as a table, with the spread of the headline figure of each row.
pub fn table(figures: &[Figure]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<25} {:<8} {:>7} {:>9} {:>9} {:>10} {:>8} {:>8}  other (median of runs; [min..max])",
        "workload", "backend", "n", "wall s", "orch/s", "points/s", "p50 ms", "p99 ms",
    );
    for f in figures {
        let _ = writeln!(out, "{}", row(f, true));
    }
    out
}
