//! The benchmark's database: a fresh one for every run, and the raw ceiling measured on it.
//!
//! `cairn bench` empties the database it is given before each run (SQLite: the file is
//! recreated; PostgreSQL: the `cairn` schema is dropped and migrated again). So that it never
//! wipes real work, it refuses a database that holds instances unless an earlier `cairn bench`
//! marked it as its own (the table `bench_marker`).

use std::sync::Arc;
use std::time::Instant;

use sqlx::Row;

use super::{percentile, BenchError, Figure};
use crate::store::postgres::PostgresStore;
use crate::store::sqlite::SqliteStore;
use crate::store::{Maintenance, Store};

/// Which backend a URL names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// `sqlite://PATH`
    Sqlite,
    /// `postgres://...`
    Postgres,
}

impl Backend {
    /// The backend of `url`.
    ///
    /// # Errors
    /// [`BenchError::Url`] for anything else (in-memory SQLite included: it is not durable).
    pub fn of(url: &str) -> Result<Self, BenchError> {
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Ok(Backend::Postgres)
        } else if url.starts_with("sqlite:") && !url.contains(":memory:") {
            Ok(Backend::Sqlite)
        } else {
            Err(BenchError::Url(crate::store::redact_url(url)))
        }
    }

    /// `sqlite` or `postgres`.
    pub fn name(self) -> &'static str {
        match self {
            Backend::Sqlite => "sqlite",
            Backend::Postgres => "postgres",
        }
    }
}

fn sqlite_path(url: &str) -> String {
    let rest = url
        .strip_prefix("sqlite://")
        .or_else(|| url.strip_prefix("sqlite:"))
        .unwrap_or(url);
    rest.split('?').next().unwrap_or(rest).to_owned()
}

/// Whether the database may be wiped: it holds no instance, or `cairn bench` made it.
macro_rules! check_wipeable {
    ($name:ident, $pool:ty) => {
        async fn $name(pool: &$pool, url: &str) -> Result<(), BenchError> {
            let marked = sqlx::query("SELECT 1 FROM bench_marker")
                .fetch_optional(pool)
                .await
                .is_ok();
            if marked {
                return Ok(());
            }
            let instances: i64 = sqlx::query("SELECT COUNT(*) FROM instances")
                .fetch_one(pool)
                .await
                .map(|r| r.get(0))
                .unwrap_or(0);
            if instances > 0 {
                return Err(BenchError::NotABenchDatabase(crate::store::redact_url(url)));
            }
            Ok(())
        }
    };
}

check_wipeable!(check_sqlite, sqlx::SqlitePool);
check_wipeable!(check_pg, sqlx::PgPool);

/// Empties the database at `url`, migrates it, marks it as the benchmark's, and opens the store.
///
/// # Errors
/// The database holds real work ([`BenchError::NotABenchDatabase`]), or cannot be used.
pub async fn fresh(url: &str) -> Result<Arc<dyn Store>, BenchError> {
    match Backend::of(url)? {
        Backend::Sqlite => {
            let path = sqlite_path(url);
            if std::path::Path::new(&path).exists() {
                let old = SqliteStore::open(url).await?;
                check_sqlite(old.pool(), url).await?;
                old.close().await;
                for suffix in ["", "-wal", "-shm"] {
                    let _ = std::fs::remove_file(format!("{path}{suffix}"));
                }
            }
            let store = SqliteStore::open(url).await?;
            store.migrate().await?;
            sqlx::query("CREATE TABLE IF NOT EXISTS bench_marker (at TEXT)")
                .execute(store.pool())
                .await
                .map_err(BenchError::Sql)?;
            Ok(Arc::new(store))
        }
        Backend::Postgres => {
            let old = PostgresStore::open(url).await?;
            check_pg(old.pool(), url).await?;
            sqlx::query("DROP SCHEMA IF EXISTS cairn CASCADE")
                .execute(old.pool())
                .await
                .map_err(BenchError::Sql)?;
            old.close().await;
            let store = PostgresStore::open(url).await?;
            store.migrate().await?;
            sqlx::query("CREATE TABLE IF NOT EXISTS bench_marker (at TEXT)")
                .execute(store.pool())
                .await
                .map_err(BenchError::Sql)?;
            Ok(Arc::new(store))
        }
    }
}

/// Opens another store on the same database (another host, for W6).
///
/// # Errors
/// The database cannot be reached.
pub async fn open(url: &str) -> Result<Arc<dyn Store>, BenchError> {
    Ok(crate::store::open(url).await?)
}

const STATE_BYTES: usize = 512;

/// The raw ceiling: what one persistence point writes (upsert a 512-byte state row, insert a
/// message, delete the message the point before inserted), by a bare sqlx loop with no engine,
/// with the durable settings the store uses:
///
/// * `ceiling-single`: one point per transaction;
/// * `ceiling-batch100`: 100 points per transaction, each point its three statements (the
///   issue's "bare sqlx loop in batches");
/// * `ceiling-batch100-multirow`: 100 points per transaction as three multi-row statements, the
///   way the engine writes a group commit: what the database can take at most.
///
/// The batched ones run over one connection on SQLite (it has one writer) and over 4 at once on
/// PostgreSQL, each connection on rows of its own.
///
/// # Errors
/// A statement failed.
pub async fn ceiling(url: &str, points: usize) -> Result<Vec<Figure>, BenchError> {
    let backend = Backend::of(url)?;
    fresh(url).await?.close().await;
    let single = points.min(3000);
    let mut lat = Vec::with_capacity(single);
    let mut out = match backend {
        Backend::Sqlite => {
            let store = SqliteStore::open(url).await?;
            let pool = store.pool().clone();
            setup(&pool, "BLOB", "INTEGER PRIMARY KEY AUTOINCREMENT").await?;
            let t0 = Instant::now();
            points_sqlite(pool.clone(), 0, single, 1, Some(&mut lat)).await?;
            let single = figure("ceiling-single", single, t0.elapsed(), &mut lat);
            let t0 = Instant::now();
            points_sqlite(pool.clone(), SPAN, points, 100, None).await?;
            let rowwise = figure("ceiling-batch100", points, t0.elapsed(), &mut []);
            let t0 = Instant::now();
            multirow_sqlite(pool.clone(), 2 * SPAN, points).await?;
            let multirow = figure("ceiling-batch100-multirow", points, t0.elapsed(), &mut []);
            store.close().await;
            vec![single, rowwise, multirow]
        }
        Backend::Postgres => {
            let store = PostgresStore::open(url).await?;
            let pool = store.pool().clone();
            setup(&pool, "BYTEA", "BIGSERIAL PRIMARY KEY").await?;
            let t0 = Instant::now();
            points_pg(pool.clone(), 0, single, 1, Some(&mut lat)).await?;
            let single = figure("ceiling-single", single, t0.elapsed(), &mut lat);
            let per = points / PG_CONNECTIONS;
            let t0 = Instant::now();
            let mut tasks = tokio::task::JoinSet::new();
            for c in 1..=PG_CONNECTIONS {
                tasks.spawn(points_pg(pool.clone(), c * SPAN, per, 100, None));
            }
            join(tasks).await?;
            let rowwise = figure(
                "ceiling-batch100",
                per * PG_CONNECTIONS,
                t0.elapsed(),
                &mut [],
            );
            let t0 = Instant::now();
            let mut tasks = tokio::task::JoinSet::new();
            for c in 1..=PG_CONNECTIONS {
                tasks.spawn(multirow_pg(pool.clone(), (PG_CONNECTIONS + c) * SPAN, per));
            }
            join(tasks).await?;
            let multirow = figure(
                "ceiling-batch100-multirow",
                per * PG_CONNECTIONS,
                t0.elapsed(),
                &mut [],
            );
            store.close().await;
            vec![single, rowwise, multirow]
        }
    };
    for f in &mut out {
        f.backend = backend.name();
    }
    Ok(out)
}

/// Connections the batched PostgreSQL ceilings write over at once.
const PG_CONNECTIONS: usize = 4;

/// Points of one loop are numbered from a multiple of `SPAN`: loops of different starts write
/// different rows (state ids `first..first + 1000`, message ids from `first`).
const SPAN: usize = 1_000_000;

async fn join(mut tasks: tokio::task::JoinSet<Result<(), BenchError>>) -> Result<(), BenchError> {
    while let Some(done) = tasks.join_next().await {
        done.map_err(|e| BenchError::Task(e.to_string()))??;
    }
    Ok(())
}

/// Creates the ceiling's two tables, with the backend's blob and serial types.
async fn setup<'c, E>(pool: E, blob: &str, serial: &str) -> Result<(), BenchError>
where
    E: sqlx::Executor<'c> + Copy,
{
    for sql in [
        format!("CREATE TABLE IF NOT EXISTS bench_raw_state (id BIGINT PRIMARY KEY, state {blob} NOT NULL, updated_at TEXT NOT NULL)"),
        format!("CREATE TABLE IF NOT EXISTS bench_raw_messages (seq {serial}, id TEXT NOT NULL UNIQUE, body TEXT NOT NULL)"),
    ] {
        pool.execute(sql.as_str()).await.map_err(BenchError::Sql)?;
    }
    Ok(())
}

fn figure(name: &str, points: usize, wall: std::time::Duration, lat: &mut [f64]) -> Figure {
    let wall = wall.as_secs_f64();
    Figure {
        workload: name.to_owned(),
        instances: points as u64,
        wall_s: wall,
        persistence_points_per_s: Some(points as f64 / wall),
        p50_ms: percentile(lat, 0.50),
        p99_ms: percentile(lat, 0.99),
        ..Figure::default()
    }
}

const BODY: &str =
    "a message body of about one hundred bytes, as the echo port replies with, padded";

/// Writes points `first..first + points`, `per_tx` to a transaction, each point its three
/// statements; with `lat`, the time of every transaction in ms. Loops of different `first`
/// (a multiple of [`SPAN`]) write different rows.
macro_rules! point_loop {
    ($name:ident, $pool:ty) => {
        async fn $name(
            pool: $pool,
            first: usize,
            points: usize,
            per_tx: usize,
            mut lat: Option<&mut Vec<f64>>,
        ) -> Result<(), BenchError> {
            let state = vec![7u8; STATE_BYTES];
            let mut k = first;
            while k < first + points {
                let t = Instant::now();
                let n = per_tx.min(first + points - k);
                let mut tx = pool.begin().await.map_err(BenchError::Sql)?;
                for k in k..k + n {
                    sqlx::query(
                        "INSERT INTO bench_raw_state (id, state, updated_at) VALUES ($1, $2, $3) \
                         ON CONFLICT (id) DO UPDATE SET state = excluded.state, updated_at = excluded.updated_at",
                    )
                    .bind((first + k % 1000) as i64)
                    .bind(&state)
                    .bind("2026-01-01T00:00:00.000000Z")
                    .execute(&mut *tx)
                    .await
                    .map_err(BenchError::Sql)?;
                    sqlx::query("INSERT INTO bench_raw_messages (id, body) VALUES ($1, $2)")
                        .bind(format!("p-{k}"))
                        .bind(BODY)
                        .execute(&mut *tx)
                        .await
                        .map_err(BenchError::Sql)?;
                    sqlx::query("DELETE FROM bench_raw_messages WHERE id = $1")
                        .bind(format!("p-{}", k.wrapping_sub(1)))
                        .execute(&mut *tx)
                        .await
                        .map_err(BenchError::Sql)?;
                }
                tx.commit().await.map_err(BenchError::Sql)?;
                if let Some(lat) = lat.as_deref_mut() {
                    lat.push(t.elapsed().as_secs_f64() * 1000.0);
                }
                k += n;
            }
            Ok(())
        }
    };
}

point_loop!(points_sqlite, sqlx::SqlitePool);
point_loop!(points_pg, sqlx::PgPool);

/// One batch of 100 points: three multi-row statements in one transaction.
fn batch_sql(n: usize, first: usize) -> [String; 3] {
    let mut upsert = String::from("INSERT INTO bench_raw_state (id, state, updated_at) VALUES ");
    let mut insert = String::from("INSERT INTO bench_raw_messages (id, body) VALUES ");
    let mut delete = String::from("DELETE FROM bench_raw_messages WHERE id IN (");
    for i in 0..n {
        let sep = if i == 0 { "" } else { ", " };
        upsert.push_str(&format!(
            "{sep}(${}, ${}, ${})",
            3 * i + 1,
            3 * i + 2,
            3 * i + 3
        ));
        insert.push_str(&format!("{sep}('b-{}', '{BODY}')", first + i));
        delete.push_str(&format!("{sep}'b-{}'", (first + i).wrapping_sub(n)));
    }
    upsert.push_str(
        " ON CONFLICT (id) DO UPDATE SET state = excluded.state, updated_at = excluded.updated_at",
    );
    delete.push(')');
    [upsert, insert, delete]
}

/// Writes points `first..first + points`, 100 to a transaction as three multi-row statements.
macro_rules! multirow_loop {
    ($name:ident, $pool:ty) => {
        async fn $name(pool: $pool, first: usize, points: usize) -> Result<(), BenchError> {
            let state = vec![7u8; STATE_BYTES];
            let mut k = first;
            while k < first + points {
                let n = 100.min(first + points - k);
                let [upsert, insert, delete] = batch_sql(n, k);
                let mut tx = pool.begin().await.map_err(BenchError::Sql)?;
                let mut q = sqlx::query(&upsert);
                for k in k..k + n {
                    q = q
                        .bind((first + k % 1000) as i64)
                        .bind(&state)
                        .bind("2026-01-01T00:00:00.000000Z");
                }
                q.execute(&mut *tx).await.map_err(BenchError::Sql)?;
                for sql in [insert, delete] {
                    sqlx::query(&sql)
                        .execute(&mut *tx)
                        .await
                        .map_err(BenchError::Sql)?;
                }
                tx.commit().await.map_err(BenchError::Sql)?;
                k += n;
            }
            Ok(())
        }
    };
}

multirow_loop!(multirow_sqlite, sqlx::SqlitePool);
multirow_loop!(multirow_pg, sqlx::PgPool);
