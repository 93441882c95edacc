//! Where the PostgreSQL server binaries are: the one probe, shared by the test harness
//! (`pg.rs`) and the build script of `cairn-orchestrations` (`orchestrations/build.rs`), which
//! marks the PostgreSQL tests `ignored` when it finds none.
//!
//! `CAIRN_PG_BIN`, when set, is the only folder looked in (point it nowhere to test what
//! happens without PostgreSQL); otherwise the `PATH`, then `/usr/lib/postgresql/*/bin`, newest
//! version first.

use std::path::PathBuf;

/// The variable that names the one folder to look in.
pub const PG_BIN_VAR: &str = "CAIRN_PG_BIN";

/// The first folder holding both `initdb` and `pg_ctl`.
pub fn find_bin_dir() -> Option<PathBuf> {
    let candidates: Vec<PathBuf> = match std::env::var_os(PG_BIN_VAR) {
        Some(dir) => vec![PathBuf::from(dir)],
        None => {
            let mut on_path: Vec<PathBuf> = std::env::var_os("PATH")
                .map(|p| std::env::split_paths(&p).collect())
                .unwrap_or_default();
            if let Ok(entries) = std::fs::read_dir("/usr/lib/postgresql") {
                let mut versions: Vec<PathBuf> = entries
                    .filter_map(|e| e.ok())
                    .map(|e| e.path().join("bin"))
                    .collect();
                versions.sort();
                on_path.extend(versions.into_iter().rev());
            }
            on_path
        }
    };
    candidates
        .into_iter()
        .find(|d| d.join("initdb").is_file() && d.join("pg_ctl").is_file())
}
