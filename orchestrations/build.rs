//! Marks the PostgreSQL tests `ignored` where they cannot run, so that `cargo test` counts them
//! as ignored rather than as passed.
//!
//! Sets `cfg(pg_available)` when the PostgreSQL server binaries the tests' throwaway cluster
//! needs (`initdb`, `pg_ctl`) are found, or when `CAIRN_REQUIRE_POSTGRES=1` (then their absence
//! fails each test, as before). The tests in `tests/` carry
//! `#[cfg_attr(not(pg_available), ignore = "...")]`.

#[path = "../tests/support/pg_bin.rs"]
mod pg_bin;

fn main() {
    println!("cargo::rustc-check-cfg=cfg(pg_available)");
    println!("cargo::rerun-if-changed=build.rs");
    println!("cargo::rerun-if-changed=../tests/support/pg_bin.rs");
    println!("cargo::rerun-if-env-changed={}", pg_bin::PG_BIN_VAR);
    if let Some(dir) = pg_bin::find_bin_dir() {
        // Found: probe again only if they go away (not on every change of PATH).
        for program in ["initdb", "pg_ctl"] {
            println!("cargo::rerun-if-changed={}", dir.join(program).display());
        }
        println!("cargo::rustc-cfg=pg_available");
        return;
    }
    println!("cargo::rerun-if-env-changed=PATH");
    println!("cargo::rerun-if-env-changed=CAIRN_REQUIRE_POSTGRES");
    if std::env::var("CAIRN_REQUIRE_POSTGRES").is_ok_and(|v| v == "1") {
        // Required: the tests run, and fail on the missing binaries.
        println!("cargo::rustc-cfg=pg_available");
        return;
    }
    println!(
        "cargo::warning=no PostgreSQL binaries (initdb, pg_ctl) on PATH, in /usr/lib/postgresql \
         or in ${}: the PostgreSQL tests are marked ignored (after installing them, \
         `touch orchestrations/build.rs`)",
        pg_bin::PG_BIN_VAR
    );
}
