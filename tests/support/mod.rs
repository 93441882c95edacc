//! Shared test support: every behavioural test runs on each backend.
//!
//! [`backend_tests!`] turns `async fn name(db: TestDb)` into `name::sqlite` and `name::postgres`
//! tests. A [`TestDb`] is a fresh, migrated database: a temporary SQLite file, or a new database in
//! a throwaway PostgreSQL cluster this test process starts on loopback (see [`pg`]).

#![allow(dead_code)]

pub mod fixtures;
pub mod pg;
pub mod processes;

use std::sync::Arc;
use std::time::Duration;

use cairn::store::{InstanceStatus, Store};
use sqlx::any::AnyPoolOptions;
use sqlx::AnyPool;
use uuid::Uuid;

/// Which backend a test runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// A fresh, migrated database for one test.
pub struct TestDb {
    pub backend: Backend,
    pub url: String,
    pub store: Arc<dyn Store>,
    /// Plain SQL access, for assertions and for corrupting things on purpose. Write SQL both
    /// backends accept (`CAST(id AS TEXT) = $1` to compare ids).
    pub sql: AnyPool,
    _dir: Option<tempfile::TempDir>,
}

impl TestDb {
    /// A fresh database, or `None` (with a `SKIPPED:` line, see [`pg`]) when PostgreSQL is not
    /// available and not required.
    pub async fn new(backend: Backend) -> Option<Self> {
        let (url, dir) = match backend {
            Backend::Sqlite => {
                let dir = tempfile::tempdir().expect("temp dir");
                let url = format!("sqlite://{}", dir.path().join("test.db").display());
                (url, Some(dir))
            }
            Backend::Postgres => (pg::fresh_database().await?, None),
        };
        Some(Self::at(backend, url, dir).await)
    }

    /// A migrated database at `url` (`dir` is kept alive with it).
    pub async fn at(backend: Backend, url: String, dir: Option<tempfile::TempDir>) -> Self {
        sqlx::any::install_default_drivers();
        let store = cairn::store::open(&url).await.expect("open store");
        store.migrate().await.expect("migrate");
        let sql_url = match backend {
            Backend::Sqlite => url.clone(),
            Backend::Postgres => format!("{url}?options=-c%20search_path%3Dcairn"),
        };
        let sql = AnyPoolOptions::new()
            .max_connections(2)
            .connect(&sql_url)
            .await
            .expect("sql pool");
        Self {
            backend,
            url,
            store,
            sql,
            _dir: dir,
        }
    }

    /// One i64 from a query.
    pub async fn count(&self, query: &str) -> i64 {
        sqlx::query_scalar::<_, i64>(query)
            .fetch_one(&self.sql)
            .await
            .unwrap_or_else(|e| panic!("{query}: {e}"))
    }

    /// One i64 from a query with one text parameter.
    pub async fn count_with(&self, query: &str, param: &str) -> i64 {
        sqlx::query_scalar::<_, i64>(query)
            .bind(param.to_owned())
            .fetch_one(&self.sql)
            .await
            .unwrap_or_else(|e| panic!("{query}: {e}"))
    }

    /// Text rows from a query with one text parameter.
    pub async fn texts(&self, query: &str, param: &str) -> Vec<String> {
        sqlx::query_scalar::<_, String>(query)
            .bind(param.to_owned())
            .fetch_all(&self.sql)
            .await
            .unwrap_or_else(|e| panic!("{query}: {e}"))
    }

    /// An instance's status.
    pub async fn status(&self, id: Uuid) -> Option<InstanceStatus> {
        self.store
            .instance_summaries(&[id])
            .await
            .expect("summaries")
            .first()
            .map(|s| s.status)
    }

    /// Waits until `check` holds, polling; panics with `what` after `timeout`.
    pub async fn wait_for<F, Fut>(&self, what: &str, timeout: Duration, mut check: F)
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = bool>,
    {
        let deadline = tokio::time::Instant::now() + timeout;
        while !check().await {
            assert!(
                tokio::time::Instant::now() < deadline,
                "timed out after {timeout:?} waiting for {what}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits until instance `id` has a subscription (its receive is written).
    pub async fn wait_subscribed(&self, id: Uuid, timeout: Duration) {
        self.wait_for("the instance's receive", timeout, || async {
            self.count_with(
                "SELECT COUNT(*) FROM subscriptions WHERE CAST(instance_id AS TEXT) = $1",
                &id.to_string(),
            )
            .await
                > 0
        })
        .await;
    }

    /// Waits until the instance has written its first persistence point.
    pub async fn wait_first_point(&self, id: Uuid, timeout: Duration) {
        self.wait_for(
            "the instance's first persistence point",
            timeout,
            || async {
                self.count_with(
                    "SELECT COUNT(*) FROM history WHERE CAST(instance_id AS TEXT) = $1",
                    &id.to_string(),
                )
                .await
                    >= 1
            },
        )
        .await;
    }

    /// Waits until the instance has this status.
    pub async fn wait_status(&self, id: Uuid, status: InstanceStatus, timeout: Duration) {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let now = self.status(id).await;
            if now == Some(status) {
                return;
            }
            if tokio::time::Instant::now() > deadline {
                let detail = self.store.instance_detail(id).await.ok().flatten();
                panic!("instance {id} is {now:?}, not {status} after {timeout:?}: {detail:?}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// Generates `name::sqlite` and `name::postgres` for each `async fn name(db: TestDb)`. The
/// PostgreSQL test is `ignored` when the build found no PostgreSQL binaries (see [`pg`]).
#[macro_export]
macro_rules! backend_tests {
    ($($name:ident),* $(,)?) => {
        $(
            mod $name {
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn sqlite() {
                    if let Some(db) = $crate::support::TestDb::new($crate::support::Backend::Sqlite).await {
                        super::$name(db).await;
                    }
                }
                #[cfg_attr(not(pg_available), ignore = "no PostgreSQL binaries at build time (orchestrations/build.rs); CONTRIBUTING.md, PostgreSQL")]
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn postgres() {
                    if let Some(db) = $crate::support::TestDb::new($crate::support::Backend::Postgres).await {
                        super::$name(db).await;
                    }
                }
            }
        )*
    };
}

/// Generates `name::postgres` alone, for each `async fn name(db: TestDb)` that checks what only a
/// backend serving many hosts at once promises (PostgreSQL): SQLite serves one host per file.
#[macro_export]
macro_rules! many_host_tests {
    ($($name:ident),* $(,)?) => {
        $(
            mod $name {
                #[cfg_attr(not(pg_available), ignore = "no PostgreSQL binaries at build time (orchestrations/build.rs); CONTRIBUTING.md, PostgreSQL")]
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn postgres() {
                    if let Some(db) = $crate::support::TestDb::new($crate::support::Backend::Postgres).await {
                        super::$name(db).await;
                    }
                }
            }
        )*
    };
}
