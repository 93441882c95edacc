//! The console's benchmark: a database filled with a million made-up instances in bulk SQL
//! ([`fill`]), and every page timed over HTTP ([`time_pages`]). `cairn console --fill N
//! --time-pages` runs both; `docs/console.md` has the figures.
//!
//! The fill is plain `INSERT ... SELECT` over a generated series (`generate_series` on
//! PostgreSQL, a recursive CTE on SQLite), for a database of its own: it writes instances of the
//! sample orchestrations spread over 30 days, 91% completed, 4% waiting (dehydrated, with a
//! correlated subscription each), 2% suspended and 1% failed (with an error), and the rest
//! running or terminated; two history rows each; 1,000 dead letters, 1,000 unrouted messages
//! and 50 held sends.

use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use sqlx::{AnyPool, Executor};
use tokio_util::sync::CancellationToken;

use super::{serve, ConsoleSettings};
use crate::store::Store;
use crate::Registry;

/// What went wrong in the console's benchmark.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConsoleBenchError {
    /// A statement of the fill failed.
    #[error("filling the database failed at {step}: {source}\nhint: fill a database of its own, migrated (`cairn migrate`)")]
    Fill {
        /// Which statement.
        step: &'static str,
        /// The database's error.
        source: sqlx::Error,
    },
    /// A page did not answer 200.
    #[error("page {page} answered {answer}")]
    Page {
        /// The page's path.
        page: String,
        /// Its status or the request's error.
        answer: String,
    },
}

/// The SQL in which the fill differs between the backends.
struct Dialect {
    /// Table prefix (the schema on PostgreSQL).
    schema: &'static str,
    postgres: bool,
}

impl Dialect {
    /// `SELECT {cols} FROM` a series of `n` integers `i` (with `WHERE`, if any, after it).
    fn series(&self, n: u64, cols: &str, tail: &str) -> String {
        if self.postgres {
            format!("SELECT {cols} FROM generate_series(CAST(0 AS BIGINT), {n} - 1) AS n(i) {tail}")
        } else {
            format!(
                "WITH RECURSIVE n(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM n WHERE i + 1 < {n}) \
                 SELECT {cols} FROM n {tail}"
            )
        }
    }

    /// The uuid of row `i` of run `run`, `kind` (four hex digits) telling tables apart.
    fn uuid(&self, run: u32, kind: &str, i: &str) -> String {
        if self.postgres {
            format!("CAST(lpad(to_hex({run}), 8, '0') || '-{kind}-4000-8000-' || lpad(to_hex({i}), 12, '0') AS UUID)")
        } else {
            format!("printf('%08x-{kind}-4000-8000-%012x', {run}, {i})")
        }
    }

    /// A time, from seconds since the epoch.
    fn time(&self, epoch: &str) -> String {
        if self.postgres {
            format!("to_timestamp({epoch})")
        } else {
            format!("strftime('%Y-%m-%dT%H:%M:%S', {epoch}, 'unixepoch') || '.000000Z'")
        }
    }

    fn blob(&self, bytes: &[u8]) -> String {
        let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        if self.postgres {
            format!("decode('{hex}', 'hex')")
        } else {
            format!("X'{hex}'")
        }
    }

    fn text(&self, expr: &str) -> String {
        if self.postgres {
            format!("CAST({expr} AS TEXT)")
        } else {
            expr.to_owned()
        }
    }
}

const STATUS: &str = "CASE WHEN i % 100 < 2 THEN 'suspended' WHEN i % 100 = 2 THEN 'failed' \
     WHEN i % 100 < 7 THEN 'dehydrated' WHEN i % 100 = 7 THEN 'running' \
     WHEN i % 100 = 8 THEN 'terminated' ELSE 'completed' END";
const ORCHESTRATION: &str =
    "CASE i % 5 WHEN 0 THEN 'order-fulfilment' WHEN 1 THEN 'order-fulfilment' \
     WHEN 2 THEN 'approval' WHEN 3 THEN 'invoice-batch' ELSE 'trip-booking' END";
const VERSION: &str = "CASE i % 5 WHEN 1 THEN 2 ELSE 1 END";
const STEP: &str = "CASE WHEN i % 100 = 2 OR i % 100 >= 8 THEN CASE i % 100 WHEN 2 THEN 'failed' WHEN 8 THEN 'terminated' ELSE 'completed' END \
     ELSE CASE (i / 5) % 3 WHEN 0 THEN 'Received' WHEN 1 THEN 'AwaitingPayment' ELSE 'Shipping' END END";
const WAITING: &str = "i % 100 >= 3 AND i % 100 <= 7";

/// Fills the database at `url` (migrated, through `store`) with `n` instances and the rest;
/// returns how long it took.
///
/// # Errors
/// [`ConsoleBenchError::Fill`] naming the statement that failed.
pub async fn fill(url: &str, store: &dyn Store, n: u64) -> Result<Duration, ConsoleBenchError> {
    let started = Instant::now();
    sqlx::any::install_default_drivers();
    let postgres = store.backend() == "postgres";
    let d = Dialect {
        schema: if postgres { "cairn." } else { "" },
        postgres,
    };
    let pool = AnyPool::connect(url)
        .await
        .map_err(|source| ConsoleBenchError::Fill {
            step: "connect",
            source,
        })?;
    let run: u32 = rand::random::<u32>() >> 1;
    let now = Utc::now().timestamp();
    // Spread over 30 days, at least a second apart.
    let spread_ms = (30 * 86_400_000 / n.max(1)).max(1000);
    let made = format!("({now} - (i * {spread_ms}) / 1000)");
    let changed = format!("({made} + i % 97)");
    let state = rmp_serde::to_vec_named(&serde_json::json!({
        "AwaitingPayment": { "order_id": "ord-42", "customer": "acme", "amount": 129.5 }
    }))
    .unwrap_or_default();
    let s = d.schema;
    let uuid = d.uuid(run, "0000", "i");
    let subscription = d.uuid(run, "0001", "i");
    let order = d.text(&format!("'ord-{run}-' || {}", d.text("i")));
    let statements: Vec<(&'static str, String)> = vec![
        (
            "instances",
            format!(
                "INSERT INTO {s}instances (id, orchestration, version, status, step, waiting_for, \
                 created_at, updated_at, last_error, state, epoch, history_seq, resumable) {}",
                d.series(
                    n,
                    &format!(
                        "{uuid}, {ORCHESTRATION}, {VERSION}, {STATUS}, {STEP}, \
                         CASE WHEN {WAITING} THEN 'payment.received (order_id=' || {order} || ')' ELSE '' END, \
                         {}, {}, \
                         CASE WHEN i % 100 < 3 THEN 'payment service refused: card declined (' || {} || ')' END, \
                         {}, 1, 2, {}",
                        d.time(&made),
                        d.time(&changed),
                        d.text("i"),
                        d.blob(&state),
                        if postgres { "TRUE" } else { "1" },
                    ),
                    ""
                )
            ),
        ),
        (
            "history (start)",
            format!(
                "INSERT INTO {s}history (instance_id, seq, reason, step, status, at, host, epoch) {}",
                d.series(
                    n,
                    &format!("{uuid}, 1, 'start', 'Received', 'running', {}, 'fill', 1", d.time(&made)),
                    ""
                )
            ),
        ),
        (
            "history (latest)",
            format!(
                "INSERT INTO {s}history (instance_id, seq, reason, step, status, at, host, epoch) {}",
                d.series(
                    n,
                    &format!(
                        "{uuid}, 2, CASE WHEN i % 100 < 2 THEN 'suspend' WHEN {WAITING} THEN 'dehydrate' \
                         ELSE 'complete' END, {STEP}, {STATUS}, {}, 'fill', 1",
                        d.time(&changed)
                    ),
                    ""
                )
            ),
        ),
        (
            "subscriptions",
            format!(
                "INSERT INTO {s}subscriptions (id, message_type, instance_id, correlation_keys, \
                 correlation, created_at) {}",
                d.series(
                    n,
                    &format!(
                        "{subscription}, 'payment.received', {uuid}, 'order_id', 'order_id=' || {order}, {}",
                        d.time(&made)
                    ),
                    &format!("WHERE {WAITING}")
                )
            ),
        ),
        (
            "dead letters",
            format!(
                "INSERT INTO {s}dead_letters (id, instance_id, port, message_type, body, reason, \
                 attempts, dead_at) {}",
                d.series(
                    n.min(1000),
                    &format!(
                        "'fill-{run}-dl-' || {}, {uuid}, 'payments', 'payment.request', '{{}}', \
                         'HTTP 503 from payments after 10 attempts', 10, {}",
                        d.text("i"),
                        d.time(&changed)
                    ),
                    ""
                )
            ),
        ),
        (
            "unrouted messages",
            format!(
                "INSERT INTO {s}messages (id, message_type, kind, properties, body, status, reason, \
                 published_at) {}",
                d.series(
                    n.min(1000),
                    &format!(
                        "'fill-{run}-m-' || {}, 'invoice.paid', 'published', \
                         '{{\"invoice_id\":\"inv-' || {} || '\"}}', '{{}}', 'unrouted', \
                         'no subscription matched invoice.paid', {}",
                        d.text("i"),
                        d.text("i"),
                        d.time(&changed)
                    ),
                    ""
                )
            ),
        ),
        (
            "held sends",
            format!(
                "INSERT INTO {s}outbox (id, instance_id, port, message_type, body, expects_reply, \
                 status, attempts, next_attempt_at, last_error, created_at) {}",
                d.series(
                    n.min(50),
                    &format!(
                        "'fill-{run}-o-' || {}, {uuid}, 'ledger', 'ledger.entry', '{{}}', {}, 'held', 10, {}, \
                         'ledger refused: connection reset', {}",
                        d.text("i"),
                        if postgres { "FALSE" } else { "0" },
                        d.time(&changed),
                        d.time(&made)
                    ),
                    ""
                )
            ),
        ),
    ];
    for (step, sql) in statements {
        let t = Instant::now();
        pool.execute(sql.as_str())
            .await
            .map_err(|source| ConsoleBenchError::Fill { step, source })?;
        tracing::info!(
            step,
            took_ms = t.elapsed().as_millis() as u64,
            "console fill"
        );
    }
    // What autovacuum would do on its own a little later: statistics for the planner and, on
    // PostgreSQL, the visibility map that lets counts read the indexes alone.
    let upkeep = if postgres {
        "VACUUM ANALYZE"
    } else {
        "ANALYZE"
    };
    pool.execute(upkeep)
        .await
        .map_err(|source| ConsoleBenchError::Fill {
            step: "analyze",
            source,
        })?;
    pool.close().await;
    Ok(started.elapsed())
}

/// One page's times.
#[derive(Debug, Clone)]
pub struct PageFigure {
    /// The page's path.
    pub page: String,
    /// Its times, sorted.
    pub times: Vec<Duration>,
}

impl PageFigure {
    /// The median time.
    pub fn median(&self) -> Duration {
        self.times
            .get(self.times.len() / 2)
            .copied()
            .unwrap_or_default()
    }

    /// The slowest time.
    pub fn slowest(&self) -> Duration {
        self.times.last().copied().unwrap_or_default()
    }
}

/// The text after `marker` in `html` up to the next `"`.
fn attribute_after(html: &str, marker: &str) -> Option<String> {
    let start = html.find(marker)? + marker.len();
    let rest = &html[start..];
    Some(rest[..rest.find('"')?].replace("&amp;", "&"))
}

/// Serves the console on `listener` and times every page `runs` times (after one untimed
/// request each, which warms the database's cache as an operator's first click would).
///
/// # Errors
/// [`ConsoleBenchError::Page`] when a page does not answer 200.
pub async fn time_pages(
    listener: tokio::net::TcpListener,
    store: Arc<dyn Store>,
    registry: Registry,
    runs: usize,
) -> Result<Vec<PageFigure>, ConsoleBenchError> {
    let base = format!(
        "http://{}",
        listener.local_addr().map_err(|e| ConsoleBenchError::Page {
            page: "/".into(),
            answer: e.to_string()
        })?
    );
    let stop = CancellationToken::new();
    let server = tokio::spawn(serve(
        listener,
        store,
        registry,
        ConsoleSettings::default(),
        stop.clone(),
    ));
    let http = reqwest::Client::new();
    let get = |page: String| {
        let http = http.clone();
        let url = format!("{base}{page}");
        async move {
            let started = Instant::now();
            let answer = http.get(&url).send().await;
            let body = match answer {
                Ok(r) if r.status().is_success() => r.text().await.unwrap_or_default(),
                Ok(r) => {
                    return Err(ConsoleBenchError::Page {
                        page,
                        answer: r.status().to_string(),
                    })
                }
                Err(e) => {
                    return Err(ConsoleBenchError::Page {
                        page,
                        answer: e.to_string(),
                    })
                }
            };
            Ok((started.elapsed(), body))
        }
    };
    let (_, first) = get("/instances".into()).await?;
    let mut pages: Vec<String> = vec![
        "/".into(),
        "/instances".into(),
        "/instances?status=suspended".into(),
        "/instances?status=dehydrated&orchestration=approval".into(),
        "/instances?orchestration=order-fulfilment&version=1&step=AwaitingPayment".into(),
        "/instances?error=declined".into(),
        format!(
            "/instances?from={}&to={}",
            (Utc::now() - chrono::Duration::days(3)).format("%Y-%m-%d+%H:%M"),
            (Utc::now() - chrono::Duration::days(2)).format("%Y-%m-%d+%H:%M")
        ),
        "/maps".into(),
        "/maps/order-fulfilment/1".into(),
        "/suspended".into(),
        "/dead-letters".into(),
        "/messages".into(),
        "/held".into(),
        "/hosts".into(),
    ];
    if let Some(next) = attribute_after(&first, "id=\"next-page\" href=\"") {
        pages.push(next);
    }
    if let Some(id) = attribute_after(&first, "href=\"/instances/") {
        pages.push(format!("/instances/{id}"));
    }
    // A correlation value some waiting instance has.
    let (_, waiting) = get("/instances?status=dehydrated".into()).await?;
    if let Some(id) = attribute_after(&waiting, "href=\"/instances/") {
        let (_, page) = get(format!("/instances/{id}")).await?;
        if let Some(corr) = attribute_after(&page, "<td class=\"mono\">") {
            if let Some((k, v)) = corr.split_once('=') {
                let v = v.split('<').next().unwrap_or_default();
                pages.push(format!("/instances?ckey={k}&cvalue={v}"));
            }
        }
    }
    let mut figures = Vec::new();
    for page in pages {
        get(page.clone()).await?;
        let mut times = Vec::with_capacity(runs);
        for _ in 0..runs.max(1) {
            times.push(get(page.clone()).await?.0);
        }
        times.sort();
        figures.push(PageFigure { page, times });
    }
    stop.cancel();
    let _ = server.await;
    Ok(figures)
}

/// Times the count of instances by definition that the overview keeps for a while
/// (`counts.rs`), read `runs` times straight from the store.
///
/// # Errors
/// [`ConsoleBenchError::Page`] when the store fails.
pub async fn time_count(store: &dyn Store, runs: usize) -> Result<PageFigure, ConsoleBenchError> {
    let page = "(overview's count by definition, uncached)".to_owned();
    let fail = |answer: String| ConsoleBenchError::Page {
        page: page.clone(),
        answer,
    };
    let reads = store
        .console()
        .ok_or_else(|| fail("no console queries".into()))?;
    let mut times = Vec::with_capacity(runs);
    for _ in 0..runs.max(1) {
        let started = Instant::now();
        reads
            .definition_counts()
            .await
            .map_err(|e| fail(e.to_string()))?;
        times.push(started.elapsed());
    }
    times.sort();
    Ok(PageFigure { page, times })
}

/// The figures as a table: page, median, slowest.
pub fn table(figures: &[PageFigure]) -> String {
    let mut out = format!("{:<72} {:>10} {:>10}\n", "page", "median ms", "max ms");
    for f in figures {
        out.push_str(&format!(
            "{:<72} {:>10.1} {:>10.1}\n",
            f.page,
            f.median().as_secs_f64() * 1000.0,
            f.slowest().as_secs_f64() * 1000.0
        ));
    }
    out
}
