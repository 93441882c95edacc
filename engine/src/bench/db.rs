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
use crate::store::Store;

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
            Err(BenchError::Url(url.to_owned()))
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
                return Err(BenchError::NotABenchDatabase(url.to_owned()));
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
/// with the durable settings the store uses. `single`: one transaction per point; `batched`:
/// 100 points per transaction, each statement multi-row (PostgreSQL: over 4 connections).
///
/// # Errors
/// A statement failed.
pub async fn ceiling(url: &str, points: usize) -> Result<Vec<Figure>, BenchError> {
    let backend = Backend::of(url)?;
    fresh(url).await?.close().await;
    let mut out = Vec::new();
    match backend {
        Backend::Sqlite => {
            let store = SqliteStore::open(url).await?;
            let pool = store.pool().clone();
            for sql in setup_sql("BLOB", "INTEGER PRIMARY KEY AUTOINCREMENT") {
                sqlx::query(&sql)
                    .execute(&pool)
                    .await
                    .map_err(BenchError::Sql)?;
            }
            let single = points.min(3000);
            out.push(single_loop_sqlite(&pool, single).await?);
            out.push(batched_sqlite(&pool, points).await?);
            store.close().await;
        }
        Backend::Postgres => {
            let store = PostgresStore::open(url).await?;
            let pool = store.pool().clone();
            for sql in setup_sql("BYTEA", "BIGSERIAL PRIMARY KEY") {
                sqlx::query(&sql)
                    .execute(&pool)
                    .await
                    .map_err(BenchError::Sql)?;
            }
            let single = points.min(3000);
            out.push(single_loop_pg(&pool, single).await?);
            out.push(batched_pg(&pool, points, 4).await?);
            store.close().await;
        }
    }
    for f in &mut out {
        f.backend = backend.name();
    }
    Ok(out)
}

/// The ceiling's two tables, with the backend's blob and serial types.
fn setup_sql(blob: &str, serial: &str) -> [String; 2] {
    [
        format!("CREATE TABLE IF NOT EXISTS bench_raw_state (id BIGINT PRIMARY KEY, state {blob} NOT NULL, updated_at TEXT NOT NULL)"),
        format!("CREATE TABLE IF NOT EXISTS bench_raw_messages (seq {serial}, id TEXT NOT NULL UNIQUE, body TEXT NOT NULL)"),
    ]
}

fn figure(name: &str, points: usize, wall: f64, lat: &mut [f64]) -> Figure {
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

macro_rules! single_loop {
    ($name:ident, $pool:ty) => {
        async fn $name(pool: &$pool, points: usize) -> Result<Figure, BenchError> {
            let state = vec![7u8; STATE_BYTES];
            let mut lat = Vec::with_capacity(points);
            let t0 = Instant::now();
            for k in 0..points {
                let t = Instant::now();
                let mut tx = pool.begin().await.map_err(BenchError::Sql)?;
                sqlx::query(
                    "INSERT INTO bench_raw_state (id, state, updated_at) VALUES ($1, $2, $3) \
                     ON CONFLICT (id) DO UPDATE SET state = excluded.state, updated_at = excluded.updated_at",
                )
                .bind((k % 1000) as i64)
                .bind(&state)
                .bind("2026-01-01T00:00:00.000000Z")
                .execute(&mut *tx)
                .await
                .map_err(BenchError::Sql)?;
                sqlx::query("INSERT INTO bench_raw_messages (id, body) VALUES ($1, $2)")
                    .bind(format!("s-{k}"))
                    .bind(BODY)
                    .execute(&mut *tx)
                    .await
                    .map_err(BenchError::Sql)?;
                sqlx::query("DELETE FROM bench_raw_messages WHERE id = $1")
                    .bind(format!("s-{}", k.wrapping_sub(1)))
                    .execute(&mut *tx)
                    .await
                    .map_err(BenchError::Sql)?;
                tx.commit().await.map_err(BenchError::Sql)?;
                lat.push(t.elapsed().as_secs_f64() * 1000.0);
            }
            let wall = t0.elapsed().as_secs_f64();
            Ok(figure("ceiling-single", points, wall, &mut lat))
        }
    };
}

single_loop!(single_loop_sqlite, sqlx::SqlitePool);
single_loop!(single_loop_pg, sqlx::PgPool);

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

async fn batch_loop_sqlite(pool: &sqlx::SqlitePool, points: usize) -> Result<f64, BenchError> {
    let state = vec![7u8; STATE_BYTES];
    let t0 = Instant::now();
    let mut k = 0;
    while k < points {
        let n = 100.min(points - k);
        let [upsert, insert, delete] = batch_sql(n, k);
        let mut tx = pool.begin().await.map_err(BenchError::Sql)?;
        let mut q = sqlx::query(&upsert);
        for i in 0..n {
            q = q
                .bind(((k + i) % 1000) as i64)
                .bind(&state)
                .bind("2026-01-01T00:00:00.000000Z");
        }
        q.execute(&mut *tx).await.map_err(BenchError::Sql)?;
        sqlx::query(&insert)
            .execute(&mut *tx)
            .await
            .map_err(BenchError::Sql)?;
        sqlx::query(&delete)
            .execute(&mut *tx)
            .await
            .map_err(BenchError::Sql)?;
        tx.commit().await.map_err(BenchError::Sql)?;
        k += n;
    }
    Ok(t0.elapsed().as_secs_f64())
}

async fn batched_sqlite(pool: &sqlx::SqlitePool, points: usize) -> Result<Figure, BenchError> {
    let wall = batch_loop_sqlite(pool, points).await?;
    Ok(figure("ceiling-batch100", points, wall, &mut []))
}

/// Each connection writes its own id range, so the batches do not contend on rows.
async fn batched_pg(
    pool: &sqlx::PgPool,
    points: usize,
    connections: usize,
) -> Result<Figure, BenchError> {
    let per = points / connections;
    let t0 = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for c in 0..connections {
        let pool = pool.clone();
        tasks.spawn(async move {
            // Offsetting the ids keeps the connections on separate rows.
            let state = vec![7u8; STATE_BYTES];
            let mut k = 0;
            while k < per {
                let n = 100.min(per - k);
                let base = c * 1_000_000 + k;
                let [upsert, insert, delete] = batch_sql(n, base);
                let mut tx = pool.begin().await?;
                let mut q = sqlx::query(&upsert);
                for i in 0..n {
                    q = q
                        .bind((c * 1000 + (k + i) % 1000) as i64)
                        .bind(&state)
                        .bind("2026-01-01T00:00:00.000000Z");
                }
                q.execute(&mut *tx).await?;
                sqlx::query(&insert).execute(&mut *tx).await?;
                sqlx::query(&delete).execute(&mut *tx).await?;
                tx.commit().await?;
                k += n;
            }
            Ok::<(), sqlx::Error>(())
        });
    }
    while let Some(done) = tasks.join_next().await {
        done.map_err(|e| BenchError::Task(e.to_string()))?
            .map_err(BenchError::Sql)?;
    }
    let wall = t0.elapsed().as_secs_f64();
    Ok(figure("ceiling-batch100", per * connections, wall, &mut []))
}
