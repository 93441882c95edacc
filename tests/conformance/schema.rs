//! What the schema promises the write path: a persistence point of a running instance rewrites
//! its row's status, step, `updated_at` and more, and every index that covers one of those
//! columns is written with it (on SQLite whenever the column is set, on PostgreSQL whenever the
//! row is). Only the indexes the engine's own claims need may do that; an index for reading
//! (the console's, an operator's) covers columns a point never sets, or is partial and leaves
//! out the rows of running instances without an error.

use super::*;

crate::backend_tests!(no_index_for_reading_is_rewritten_by_the_points_of_running_instances);

/// The columns of `instances` a persistence point sets.
const POINT_COLUMNS: [&str; 13] = [
    "status",
    "step",
    "waiting_for",
    "next_timer_at",
    "updated_at",
    "last_error",
    "state",
    "engine_state",
    "output",
    "history_seq",
    "owner",
    "lease_expires_at",
    "resumable",
];

/// The indexes the engine's claims and recovery read, which may be rewritten by points.
const ENGINE_INDEXES: [&str; 2] = ["instances_by_status", "instances_by_owner"];

async fn no_index_for_reading_is_rewritten_by_the_points_of_running_instances(db: TestDb) {
    let query = match db.backend {
        support::Backend::Sqlite => {
            "SELECT name || ' ' || sql FROM sqlite_master \
             WHERE type = 'index' AND tbl_name = 'instances' AND sql IS NOT NULL AND name <> $1"
        }
        support::Backend::Postgres => {
            "SELECT indexname || ' ' || indexdef FROM pg_indexes \
             WHERE schemaname = 'cairn' AND tablename = 'instances' AND indexname <> $1"
        }
    };
    let indexes = db.texts(query, "").await;
    assert!(
        indexes
            .iter()
            .any(|i| i.starts_with("instances_by_definition ")),
        "the console's index is there: {indexes:?}"
    );
    for index in &indexes {
        let name = index.split(' ').next().unwrap_or_default();
        let columns = index
            .split_once(" ON ")
            .and_then(|(_, on)| on.split_once('('))
            .and_then(|(_, rest)| rest.split_once(')'))
            .map(|(columns, _)| columns)
            .unwrap_or_else(|| panic!("no column list in {index}"));
        let rewritten: Vec<&str> = columns
            .split(',')
            .map(|c| c.trim().trim_matches('"'))
            .filter(|c| POINT_COLUMNS.contains(c))
            .collect();
        let spares_running =
            index.contains("<> 'running'") || index.contains("last_error IS NOT NULL");
        assert!(
            rewritten.is_empty() || spares_running || ENGINE_INDEXES.contains(&name),
            "{name} covers {rewritten:?}, which every point of a running instance rewrites: \
             {index}\nmake it partial (WHERE status <> 'running'), or measure what it costs \
             the write path (docs/performance.md) and add it to ENGINE_INDEXES"
        );
    }
}
