//! A throwaway PostgreSQL cluster for the tests of one test process.
//!
//! The first test that needs PostgreSQL starts a cluster in a temporary folder, on a free
//! loopback port, as the `postgres` user when running as root (PostgreSQL refuses root). Each test
//! gets a database of its own in it. A watchdog shell process stops the cluster and removes its
//! folder when the test process exits, however it exits.
//!
//! Without PostgreSQL binaries (found by [`pg_bin`]) the PostgreSQL tests of `tests/` are marked
//! `ignored` at build time (`orchestrations/build.rs`, `cfg(pg_available)`). A test that runs all
//! the same (`--include-ignored`, the store's own tests, a cluster that fails to start) skips
//! with a `SKIPPED:` line on stderr, after a banner at the first skip of the process, unless
//! `CAIRN_REQUIRE_POSTGRES=1` (set by `.ci/run`), which makes that a failure.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;

use sqlx::Connection;

/// A running cluster.
#[derive(Debug)]
pub struct Cluster {
    pub port: u16,
    pub dir: PathBuf,
    pub bin: PathBuf,
    pub as_postgres: bool,
}

static CLUSTER: OnceLock<Result<Cluster, String>> = OnceLock::new();

fn required() -> bool {
    std::env::var("CAIRN_REQUIRE_POSTGRES").is_ok_and(|v| v == "1")
}

#[path = "pg_bin.rs"]
pub mod pg_bin;

/// Runs a PostgreSQL binary, as the `postgres` user when we are root.
pub fn pg_command(cluster_bin: &Path, as_postgres: bool, program: &str) -> Command {
    let path = cluster_bin.join(program);
    if as_postgres {
        let mut cmd = Command::new("runuser");
        cmd.args(["-u", "postgres", "--"]).arg(path);
        cmd
    } else {
        Command::new(path)
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

fn start() -> Result<Cluster, String> {
    let bin = pg_bin::find_bin_dir().ok_or(if std::env::var_os(pg_bin::PG_BIN_VAR).is_some() {
        "no PostgreSQL binaries (initdb, pg_ctl) in $CAIRN_PG_BIN"
    } else {
        "no PostgreSQL binaries (initdb, pg_ctl) on PATH or in /usr/lib/postgresql"
    })?;
    let as_postgres = nix::unistd::geteuid().is_root();
    let dir = tempfile::Builder::new()
        .prefix("cairn-pg-")
        .tempdir()
        .map_err(|e| e.to_string())?
        .keep();
    if as_postgres {
        let status = Command::new("chown")
            .arg("postgres")
            .arg(&dir)
            .status()
            .map_err(|e| e.to_string())?;
        if !status.success() {
            return Err("chown of the cluster folder to postgres failed".into());
        }
    }
    let data = dir.join("data");
    let out = pg_command(&bin, as_postgres, "initdb")
        .arg("-D")
        .arg(&data)
        .args(["-A", "trust", "-U", "postgres", "--no-sync", "-E", "UTF8"])
        .output()
        .map_err(|e| format!("initdb: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "initdb failed: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    let port = free_port();
    let cluster = Cluster {
        port,
        dir,
        bin,
        as_postgres,
    };
    cluster.start_server()?;
    // The watchdog: stop the cluster and remove it once this process is gone.
    let script = format!(
        "while kill -0 {pid} 2>/dev/null; do sleep 1; done; {stop} >/dev/null 2>&1; rm -rf '{dir}'",
        pid = std::process::id(),
        stop = cluster.stop_command_line(),
        dir = cluster.dir.display(),
    );
    Command::new("sh")
        .args(["-c", &script])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("watchdog: {e}"))?;
    Ok(cluster)
}

impl Cluster {
    fn data(&self) -> PathBuf {
        self.dir.join("data")
    }

    /// Starts the server (again).
    pub fn start_server(&self) -> Result<(), String> {
        let opts = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c max_connections=400 -c fsync=off -c full_page_writes=off",
            self.port,
            self.dir.display()
        );
        let log = self.dir.join("log");
        let log = log.to_string_lossy();
        self.pg_ctl(&["-w", "-t", "60", "-o", &opts, "-l", &log, "start"])
    }

    /// Stops the server (fast mode: connections are cut, like a database restart).
    pub fn stop_server(&self) -> Result<(), String> {
        self.pg_ctl(&["-w", "-m", "fast", "stop"])
    }

    fn pg_ctl(&self, args: &[&str]) -> Result<(), String> {
        let out = pg_command(&self.bin, self.as_postgres, "pg_ctl")
            .arg("-D")
            .arg(self.data())
            .args(args)
            .output()
            .map_err(|e| format!("pg_ctl {args:?}: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "pg_ctl {args:?} failed: {}",
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        Ok(())
    }

    fn stop_command_line(&self) -> String {
        let pg_ctl = self.bin.join("pg_ctl");
        let prefix = if self.as_postgres {
            "runuser -u postgres -- "
        } else {
            ""
        };
        format!(
            "{prefix}{} -D '{}' -m immediate stop",
            pg_ctl.display(),
            self.data().display()
        )
    }

    /// The URL of a database in this cluster.
    pub fn url(&self, database: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{database}", self.port)
    }

    /// The URL of a database in this cluster for another role (the cluster trusts every local
    /// connection: a password in the URL is accepted and not checked).
    pub fn url_as(&self, user: &str, database: &str) -> String {
        format!("postgres://{user}@127.0.0.1:{}/{database}", self.port)
    }
}

/// The cluster, started on first use; `None` (after one line on stderr) when unavailable and not
/// required.
pub fn cluster() -> Option<&'static Cluster> {
    CLUSTER
        .get_or_init(start)
        .as_ref()
        .map_err(|why| skip(why))
        .ok()
}

/// How many PostgreSQL tests this process skipped.
static SKIPPED: AtomicUsize = AtomicUsize::new(0);

/// Says why PostgreSQL tests cannot run: a failure when required; otherwise a `SKIPPED:` line
/// naming the test (libtest names each test's thread after it), after a banner at the first.
/// Written to stderr itself, not with `eprintln!`, which libtest captures and hides for a test
/// that passes.
fn skip(why: &str) {
    use std::io::Write;
    if required() {
        panic!("CAIRN_REQUIRE_POSTGRES=1 but PostgreSQL is unavailable: {why}");
    }
    let thread = std::thread::current();
    let name = thread.name().unwrap_or("a PostgreSQL test");
    let mut err = std::io::stderr().lock();
    if SKIPPED.fetch_add(1, Ordering::SeqCst) == 0 {
        let _ = writeln!(
            err,
            "\n==== PostgreSQL tests are SKIPPED, and libtest reports them as passed: {why}\n\
             ==== install PostgreSQL (CONTRIBUTING.md, PostgreSQL), or set CAIRN_REQUIRE_POSTGRES=1 to make this an error\n"
        );
    }
    let _ = writeln!(err, "SKIPPED: {name}: {why}");
}
/// A cluster of its own, for a test that stops and starts the server; stopped and removed
/// when the test process exits.
pub fn dedicated_cluster() -> Option<Cluster> {
    start().map_err(|why| skip(&why)).ok()
}

/// A new, empty database in `cluster`; returns its URL.
pub async fn database_in(cluster: &Cluster) -> String {
    let name = format!("t_{}", uuid::Uuid::new_v4().simple());
    let mut conn = sqlx::PgConnection::connect(&cluster.url("postgres"))
        .await
        .expect("connect to the test cluster");
    sqlx::query(&format!("CREATE DATABASE {name}"))
        .execute(&mut conn)
        .await
        .expect("create database");
    conn.close().await.ok();
    cluster.url(&name)
}

/// A new, empty database; returns its URL.
pub async fn fresh_database() -> Option<String> {
    let cluster = cluster()?;
    let name = format!("t_{}", uuid::Uuid::new_v4().simple());
    let mut conn = sqlx::PgConnection::connect(&cluster.url("postgres"))
        .await
        .expect("connect to the test cluster");
    sqlx::query(&format!("CREATE DATABASE {name}"))
        .execute(&mut conn)
        .await
        .expect("create database");
    conn.close().await.ok();
    Some(cluster.url(&name))
}
