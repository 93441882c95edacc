//! Retention on SQLite: the shared purge and gauges ([`common::Retain`]) with instance ids bound
//! as a JSON list, the one host always taking its turn, freed pages given back to the file
//! system with `PRAGMA incremental_vacuum` (a database created with `auto_vacuum =
//! INCREMENTAL`, as `connect.rs` creates them; an older file keeps its free pages for reuse), and
//! the size of the file and its write-ahead log.

use chrono::{DateTime, Utc};
use uuid::Uuid;

use super::{map_err, SqliteStore, WriteTx};
use crate::store::common::{self, Backend};
use crate::store::StoreResult;

impl common::Retain for SqliteStore {
    type Ids = String;
    const IDS_1: &'static str = "IN (SELECT value FROM json_each($1))";

    fn ids(ids: &[Uuid]) -> String {
        serde_json::json!(ids.iter().map(Uuid::to_string).collect::<Vec<_>>()).to_string()
    }

    async fn take_turn(_tx: &mut WriteTx) -> StoreResult<bool> {
        Ok(true)
    }

    async fn reclaim_space(&self, pages: u32) -> StoreResult<()> {
        // In a steady state the pages a purge frees are soon filled again by new rows: giving
        // them back and growing the file again would only move pages about. They are given back
        // once more than an eighth of the file is free (after a large purge, or a shorter
        // retention).
        let (free, total): (i64, i64) = sqlx::query_as(
            "SELECT freelist_count, page_count FROM pragma_freelist_count, pragma_page_count",
        )
        .fetch_one(&self.pool)
        .await
        .map_err(|e| map_err("free pages", e))?;
        if free * 8 <= total {
            return Ok(());
        }
        let mut tx = self.begin().await?;
        // Reads the pragma's rows: each is one step of the vacuum.
        sqlx::query(&format!("PRAGMA incremental_vacuum({pages})"))
            .fetch_all(&mut *tx.tx)
            .await
            .map_err(|e| map_err("incremental vacuum", e))?;
        Self::commit(tx).await
    }

    async fn expired_elsewhere(
        &self,
        _host: &str,
        _ids: &[Uuid],
        _now: DateTime<Utc>,
    ) -> StoreResult<Vec<Uuid>> {
        Ok(Vec::new())
    }

    async fn database_bytes(&self) -> StoreResult<u64> {
        let e = |e| map_err("database size", e);
        let (file,): (String,) =
            sqlx::query_as("SELECT file FROM pragma_database_list WHERE name = 'main'")
                .fetch_one(&self.pool)
                .await
                .map_err(e)?;
        if file.is_empty() {
            // In memory.
            let (bytes,): (i64,) = sqlx::query_as(
                "SELECT page_count * page_size FROM pragma_page_count, pragma_page_size",
            )
            .fetch_one(&self.pool)
            .await
            .map_err(e)?;
            return Ok(u64::try_from(bytes).unwrap_or(0));
        }
        let mut bytes = 0;
        for path in [file.clone(), format!("{file}-wal")] {
            if let Ok(meta) = tokio::fs::metadata(&path).await {
                bytes += meta.len();
            }
        }
        Ok(bytes)
    }
}

common::retention::retention_verbs!(SqliteStore);
