//! Opening a SQLite database: the connection options every connection of a store shares (WAL,
//! `synchronous=FULL`, the busy timeout, a size cap for tests), the read pool and the one write
//! connection.

use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use sqlx::sqlite::{
    SqliteAutoVacuum, SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous,
};
use sqlx::SqlitePool;

use super::wake::Wake;
use super::writer::{self, Writer};
use super::{map_err, SqliteStore};
use crate::store::{StoreError, StoreResult};

impl SqliteStore {
    /// Opens (creating if needed) the database at `url` (`sqlite://PATH` or `sqlite::memory:`).
    ///
    /// # Errors
    /// The file cannot be opened or created.
    pub async fn open(url: &str) -> StoreResult<Self> {
        Self::open_with(url, None).await
    }

    /// [`SqliteStore::open`] with a cap on the database's size, in pages (`PRAGMA
    /// max_page_count` on every connection of this store, the write connection included when
    /// it is opened again): a write that needs a page past it fails with `SQLITE_FULL`, as on a
    /// full disk. A cap below the database's current size is raised to it. For tests of a full
    /// disk: fill the database from another connection, and free space by deleting from it.
    ///
    /// # Errors
    /// The file cannot be opened or created.
    pub async fn open_with_max_pages(url: &str, max_pages: u64) -> StoreResult<Self> {
        Self::open_with(url, Some(max_pages)).await
    }

    async fn open_with(url: &str, max_pages: Option<u64>) -> StoreResult<Self> {
        let memory = url.contains(":memory:") || url.contains("mode=memory");
        let options = SqliteConnectOptions::from_str(url)
            .map_err(|source| StoreError::Database {
                operation: "open",
                source,
            })?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .busy_timeout(Duration::from_secs(10))
            // Room for the multi-row statements of small groups (`batch::reuse`).
            .statement_cache_capacity(512)
            .foreign_keys(false)
            // The temporary table a group commit fences its points with (`batch::push_fence`)
            // stays in memory.
            .pragma("temp_store", "memory");
        let options = match max_pages {
            Some(pages) => options.pragma("max_page_count", pages.to_string()),
            None => options,
        };
        // Every connection is opened here, before any load: opening one later, while another
        // writes, can fail at once with SQLITE_BUSY on the journal-mode pragma.
        let connect = |connections: u32| {
            SqlitePoolOptions::new()
                .max_connections(connections)
                .min_connections(connections)
                .idle_timeout(None)
                .max_lifetime(None)
                .test_before_acquire(false)
                .after_connect(|conn, _| Box::pin(writer::add_temp_tables(conn)))
                .connect_with(options.clone())
        };
        if memory {
            // One connection is the whole database.
            let pool = connect(1).await.map_err(|e| map_err("open", e))?;
            return Ok(Self {
                writer: Writer::Pooled(pool.clone()),
                pool,
                wake: Arc::default(),
                registered: Arc::default(),
            });
        }
        // A new file gives the pages retention frees back to the file system, a few at a time
        // (`retention.rs`); an existing file without it keeps them for reuse. Set by the write
        // connection alone, which opens first and creates the file: the read connections never
        // race it to write the new file's first page.
        let writer = Writer::connect(&options.clone().auto_vacuum(SqliteAutoVacuum::Incremental))
            .await
            .map_err(|e| map_err("open", e))?;
        let pool = connect(3).await.map_err(|e| map_err("open", e))?;
        let wake = Arc::new(Wake::for_file(options.get_filename()));
        Ok(Self {
            pool,
            writer,
            wake,
            registered: Arc::default(),
        })
    }

    /// The connection pool, for tests and tools that read the database directly.
    pub fn pool(&self) -> &SqlitePool {
        &self.pool
    }
}
