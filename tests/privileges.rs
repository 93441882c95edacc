//! Secrets and least privilege, with the real `cairn` binary: no command prints a database
//! password; on PostgreSQL only `cairn migrate` (or `host --migrate`, or `demo`) changes the
//! schema and every other command refuses a schema that is not its own; and a host and the CLI
//! run under the runtime and read-only roles whose SQL `docs/operations.md` gives.

#![allow(clippy::unwrap_used)] // tests may unwrap: a panic is a failed test

mod support;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use sqlx::Connection;
use support::pg;

const SECRET: &str = "S3cretPW";

/// What a `cairn` run printed, and whether it succeeded.
struct Run {
    ok: bool,
    out: String,
}

fn cairn_env(url: &str, args: &[&str], env: &[(&str, &str)]) -> Run {
    let out = Command::new(env!("CARGO_BIN_EXE_cairn"))
        .args(["--database", url])
        .args(args)
        .env("RUST_LOG", "warn")
        .env_remove("CAIRN_DATABASE_URL")
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .output()
        .expect("run cairn");
    Run {
        ok: out.status.success(),
        out: format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    }
}

fn cairn(url: &str, args: &[&str]) -> Run {
    cairn_env(url, args, &[])
}

/// Runs `cairn` and asserts that it succeeded; returns its standard output and error.
fn ok(url: &str, args: &[&str]) -> String {
    let run = cairn(url, args);
    assert!(run.ok, "cairn {args:?} failed:\n{}", run.out);
    run.out
}

/// Runs `cairn` and asserts that it failed; returns its standard output and error.
fn fails(url: &str, args: &[&str]) -> String {
    let run = cairn(url, args);
    assert!(!run.ok, "cairn {args:?} succeeded:\n{}", run.out);
    run.out
}

fn assert_no_secret(what: &str, text: &str) {
    assert!(
        !text.contains(SECRET),
        "{what} printed the password:\n{text}"
    );
}

fn database_name(url: &str) -> &str {
    url.rsplit('/').next().unwrap()
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap()
}

#[cfg_attr(
    not(pg_available),
    ignore = "no PostgreSQL binaries at build time (orchestrations/build.rs); CONTRIBUTING.md, PostgreSQL"
)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_command_prints_the_database_password() {
    let Some(url) = pg::fresh_database().await else {
        return;
    };
    // Nothing listens there: every command fails to connect, in parallel (each may wait for the
    // pool's timeout).
    let nowhere = format!(
        "postgres://postgres:{SECRET}@127.0.0.1:{}/db?password={SECRET}&sslpassword={SECRET}",
        free_port()
    );
    let commands: &[&[&str]] = &[
        &["migrate"],
        &["list"],
        &["show", "00000000-0000-7000-8000-000000000000"],
        &["host", "--until-idle"],
        &["host", "--migrate", "--until-idle"],
        &["start", "approval"],
        &["publish", "x", "--body", "{}"],
        &["demo", "--instances", "1"],
        &["bench", "--workload", "w2", "--instances", "1"],
    ];
    let handles: Vec<_> = commands
        .iter()
        .flat_map(|args| {
            ["warn", "debug"].map(|level| {
                let nowhere = nowhere.clone();
                let args: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
                std::thread::spawn(move || {
                    let args: Vec<&str> = args.iter().map(String::as_str).collect();
                    let run = cairn_env(&nowhere, &args, &[("RUST_LOG", level)]);
                    (args.join(" "), level, run)
                })
            })
        })
        .collect();
    for handle in handles {
        let (args, level, run) = handle.join().unwrap();
        assert!(!run.ok, "cairn {args} succeeded:\n{}", run.out);
        assert_no_secret(
            &format!("cairn {args} (RUST_LOG={level}, unreachable)"),
            &run.out,
        );
        assert!(
            args.starts_with("bench") || run.out.contains("postgres://postgres:***@127.0.0.1"),
            "cairn {args} does not name the database it could not use:\n{}",
            run.out
        );
    }

    // A URL of no supported backend, and the help with the URL in the environment.
    let out = fails(&format!("mysql://root:{SECRET}@db/x"), &["list"]);
    assert!(out.contains("unsupported database URL"), "{out}");
    assert_no_secret("an unsupported URL", &out);
    let help = Command::new(env!("CARGO_BIN_EXE_cairn"))
        .arg("--help")
        .env("CAIRN_DATABASE_URL", &nowhere)
        .output()
        .unwrap();
    assert_no_secret("--help", &String::from_utf8_lossy(&help.stdout));

    // A database that works, reached with a password (the test cluster trusts local
    // connections: it is accepted and not checked).
    let with_password = format!(
        "{}?sslpassword={SECRET}",
        url.replacen("postgres@", &format!("postgres:{SECRET}@"), 1)
    );
    assert_ne!(with_password, url);
    for level in ["warn", "debug"] {
        for args in [
            &["migrate"][..],
            &["list"],
            &["demo", "--instances", "2"],
            &["host", "--until-idle", "--poll-ms", "20"],
        ] {
            let run = cairn_env(&with_password, args, &[("RUST_LOG", level)]);
            assert!(run.ok, "cairn {args:?} failed:\n{}", run.out);
            assert_no_secret(&format!("cairn {args:?} (RUST_LOG={level})"), &run.out);
            if args == ["migrate"] {
                assert!(
                    run.out.contains("postgres://postgres:***@127.0.0.1"),
                    "{}",
                    run.out
                );
            }
        }
    }
}

#[cfg_attr(
    not(pg_available),
    ignore = "no PostgreSQL binaries at build time (orchestrations/build.rs); CONTRIBUTING.md, PostgreSQL"
)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_postgres_only_migrate_changes_the_schema() {
    let Some(cluster) = pg::cluster() else {
        return;
    };
    let Some(url) = pg::fresh_database().await else {
        return;
    };
    let mut admin = sqlx::PgConnection::connect(&url).await.unwrap();
    let schemas = |n: i64| {
        format!("SELECT COUNT(*) FROM pg_namespace WHERE nspname = 'cairn' HAVING COUNT(*) = {n}")
    };

    // No schema: every command but migrate refuses, naming `cairn migrate`, and creates nothing.
    for args in [
        &["list"][..],
        &["host", "--until-idle"],
        &["start", "approval"],
        &["publish", "x", "--body", "{}"],
    ] {
        let out = fails(&url, args);
        assert!(
            out.contains("no Cairn schema") && out.contains("`cairn migrate`"),
            "cairn {args:?}:\n{out}"
        );
    }
    sqlx::query(&schemas(0))
        .fetch_one(&mut admin)
        .await
        .expect("no command created the schema");

    // `host --migrate` migrates, like `cairn migrate`.
    ok(
        &url,
        &["host", "--migrate", "--until-idle", "--poll-ms", "20"],
    );
    sqlx::query(&schemas(1))
        .fetch_one(&mut admin)
        .await
        .unwrap();
    ok(&url, &["list"]);
    ok(&url, &["migrate"]);

    // A schema a newer build migrated: this binary is older than the schema.
    sqlx::query(
        "INSERT INTO cairn._sqlx_migrations (version, description, success, checksum, execution_time) \
         VALUES (99991231000000, 'from a newer build', TRUE, '\\x00', 0)",
    )
    .execute(&mut admin)
    .await
    .unwrap();
    for args in [&["list"][..], &["host", "--until-idle"]] {
        let out = fails(&url, args);
        assert!(
            out.contains("ahead of this build")
                && out.contains("99991231000000")
                && out.contains("older than the schema"),
            "cairn {args:?}:\n{out}"
        );
    }
    sqlx::query("DELETE FROM cairn._sqlx_migrations WHERE version = 99991231000000")
        .execute(&mut admin)
        .await
        .unwrap();

    // A schema behind the binary (its newest migration not applied).
    let newest: i64 = sqlx::query_scalar("SELECT MAX(version) FROM cairn._sqlx_migrations")
        .fetch_one(&mut admin)
        .await
        .unwrap();
    sqlx::query("DELETE FROM cairn._sqlx_migrations WHERE version = $1")
        .bind(newest)
        .execute(&mut admin)
        .await
        .unwrap();
    for args in [
        &["list"][..],
        &["host", "--until-idle"],
        &["start", "approval"],
    ] {
        let out = fails(&url, args);
        assert!(
            out.contains("behind this build")
                && out.contains(&newest.to_string())
                && out.contains("`cairn migrate`"),
            "cairn {args:?}:\n{out}"
        );
    }
    admin.close().await.ok();
    let _ = cluster;

    // SQLite (one process owns the file, no roles): every command migrates, as in the README's
    // quick start.
    let dir = tempfile::tempdir().unwrap();
    let sqlite = format!("sqlite://{}", dir.path().join("fresh.db").display());
    ok(&sqlite, &["list"]);
    ok(
        &sqlite,
        &[
            "start",
            "approval",
            "--input",
            r#"{"request_id": "s", "approver": "a"}"#,
        ],
    );
}

/// The `sql` blocks of the roles section of `docs/operations.md`, in order, for the database
/// `db` (the docs name it `cairn`).
fn roles_sql(db: &str) -> Vec<String> {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/operations.md");
    let doc = std::fs::read_to_string(path).unwrap();
    let start = doc
        .find("### Roles and least privilege on PostgreSQL")
        .expect("the roles section in docs/operations.md");
    let section = &doc[start..];
    let end = section[4..].find("\n#").map_or(section.len(), |i| i + 4);
    let section = &section[..end];
    let mut blocks = Vec::new();
    let mut rest = section;
    while let Some(open) = rest.find("```sql\n") {
        let body = &rest[open + "```sql\n".len()..];
        let close = body.find("```").expect("a closed sql block");
        blocks.push(body[..close].replace("DATABASE cairn ", &format!("DATABASE {db} ")));
        rest = &body[close + 3..];
    }
    blocks
}

fn spawn_host(url: &str, log: &std::path::Path) -> Child {
    let file = std::fs::File::create(log).unwrap();
    Command::new(env!("CARGO_BIN_EXE_cairn"))
        .args(["--database", url, "host"])
        .args(["--poll-ms", "20", "--dehydrate-after-ms", "200"])
        .env("RUST_LOG", "warn")
        .env_remove("CAIRN_DATABASE_URL")
        .stdin(Stdio::null())
        .stdout(file.try_clone().unwrap())
        .stderr(file)
        .spawn()
        .unwrap()
}

/// Polls `show` (under `url`) until its output holds `needle`.
fn wait_shown(url: &str, id: &str, needle: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let shown = ok(url, &["show", id]);
        if shown.contains(needle) {
            return shown;
        }
        assert!(
            Instant::now() < deadline,
            "instance {id} never showed {needle:?}:\n{shown}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The error a statement run as `url`'s role fails with.
async fn refused(url: &str, statement: &str) -> String {
    let mut conn = sqlx::PgConnection::connect(url).await.unwrap();
    let err = sqlx::raw_sql(statement)
        .execute(&mut conn)
        .await
        .expect_err(statement)
        .to_string();
    conn.close().await.ok();
    err
}

#[cfg_attr(
    not(pg_available),
    ignore = "no PostgreSQL binaries at build time (orchestrations/build.rs); CONTRIBUTING.md, PostgreSQL"
)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_and_the_cli_run_under_the_runtime_and_read_only_roles_of_the_docs() {
    let Some(cluster) = pg::cluster() else {
        return;
    };
    let Some(url) = pg::fresh_database().await else {
        return;
    };
    let db = database_name(&url);
    let blocks = roles_sql(db);
    assert_eq!(
        blocks.len(),
        3,
        "the roles section's sql blocks: {blocks:?}"
    );

    // The administrator's part, exactly as the docs give it.
    let mut admin = sqlx::PgConnection::connect(&url).await.unwrap();
    sqlx::raw_sql(&blocks[0]).execute(&mut admin).await.unwrap();
    let owner = cluster.url_as("cairn_owner", db);
    // A password in the runtime role's URL too: it is never printed.
    let runtime = cluster.url_as(&format!("cairn_runtime:{SECRET}"), db);
    let readonly = cluster.url_as("cairn_readonly", db);

    // Before the owner migrates, the runtime role can neither use nor create the schema.
    let out = fails(&runtime, &["list"]);
    assert!(out.contains("`cairn migrate`"), "{out}");
    let out = fails(&runtime, &["migrate"]);
    assert!(out.contains("permission denied"), "{out}");
    assert_no_secret("cairn migrate as the runtime role", &out);
    ok(&owner, &["migrate"]);
    // Its right to create schemas taken back, the owner still migrates (nothing to do).
    sqlx::raw_sql(&blocks[1]).execute(&mut admin).await.unwrap();
    ok(&owner, &["migrate"]);

    // A host under the runtime role, steered by the CLI under the same role.
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("host.log");
    let mut host = spawn_host(&runtime, &log);
    let id = ok(
        &runtime,
        &[
            "start",
            "approval",
            "--input",
            r#"{"request_id": "least-1", "approver": "ada", "escalate_after_ms": 600000}"#,
        ],
    );
    let id = id.trim().to_owned();
    wait_shown(
        &readonly,
        &id,
        "message approval.decision {request_id=least-1}",
    );
    assert!(ok(&runtime, &["suspend", &id, "--reason", "audit"]).contains("suspended"));
    assert!(ok(&readonly, &["list", "--status", "suspended"]).contains(&id));
    ok(&runtime, &["resume", &id]);
    let published = ok(
        &runtime,
        &[
            "publish",
            "approval.decision",
            "--id",
            "least-decision-1",
            "--body",
            r#"{"request_id": "least-1", "approved": true, "by": "ada"}"#,
        ],
    );
    assert!(published.contains("least-decision-1"), "{published}");
    let shown = wait_shown(&readonly, &id, "status        completed");
    assert!(shown.contains("\"by\": \"ada\""), "{shown}");
    assert!(ok(&readonly, &["list"]).contains(&id));
    ok(&readonly, &["dead-letters", "list"]);

    // The read-only role reads and writes nothing; the runtime role creates nothing.
    let out = fails(&readonly, &["suspend", &id]);
    assert!(out.contains("permission denied"), "{out}");
    for statement in [
        "DELETE FROM cairn.hosts",
        "UPDATE cairn.instances SET status = 'failed'",
        "INSERT INTO cairn.control (instance_id, action) VALUES ('00000000-0000-7000-8000-000000000000', 'resume')",
    ] {
        let err = refused(&readonly, statement).await;
        assert!(err.contains("permission denied"), "{statement}: {err}");
    }
    for statement in [
        "CREATE TABLE cairn.not_allowed (a INT)",
        "CREATE TABLE public.not_allowed (a INT)",
        "ALTER TABLE cairn.instances ADD COLUMN not_allowed INT",
        "DROP TABLE cairn.history",
    ] {
        let err = refused(&runtime, statement).await;
        assert!(
            err.contains("permission denied") || err.contains("must be owner"),
            "{statement}: {err}"
        );
    }

    // The host stops cleanly, having never been refused anything.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(host.id()).unwrap()),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let status = host.wait().unwrap();
    let host_log = std::fs::read_to_string(&log).unwrap();
    assert!(
        status.success(),
        "the host exited with {status}:\n{host_log}"
    );
    assert!(!host_log.contains("permission denied"), "{host_log}");
    assert_no_secret("the host's log", &host_log);

    // The grants on existing tables (for a schema migrated before the roles) are valid SQL.
    sqlx::raw_sql(&blocks[2]).execute(&mut admin).await.unwrap();
    admin.close().await.ok();
}
