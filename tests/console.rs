//! The operations console in a real browser (headless Chromium through its WebDriver), on each
//! backend: every page opened against a database a running host fills with the samples; an
//! operator filters to a suspended instance, is refused a resume without signing in, signs in
//! with the token, resumes it and sees it complete.
//!
//! With `CAIRN_SCREENSHOTS=DIR` (`just screenshots`) the SQLite run also saves a PNG of every
//! page into DIR (`docs/console/`), the pictures of `docs/console.md`.

#![allow(clippy::unwrap_used)] // tests may unwrap: a panic is a failed test

#[path = "support/browser.rs"]
mod browser;
mod support;

use std::collections::BTreeMap;
use std::time::Duration;

use browser::Browser;
use cairn::console::{ConsoleSettings, ConsoleToken};
use cairn::store::{ControlAction, InstanceStatus, NewMessage, PublishOutcome};
use cairn::{Host, Ports};
use serde_json::json;
use support::fixtures::fast_config;
use support::{Backend, TestDb};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

backend_tests!(
    the_console_shows_every_page_and_resumes_a_suspended_instance,
    the_console_benchmark_fills_a_database_and_every_page_answers,
    cairn_console_serves_the_database_and_refuses_what_it_must,
    signed_in_actions_act_on_many_instances_dead_letters_and_held_sends,
    cairn_host_serves_the_console_beside_it,
);

const TOKEN: &str = "console-test-token";

/// A host running the samples on `db`, fed a few of each, and the approval that the test
/// suspends: its id.
async fn fill(db: &TestDb, stop: &CancellationToken) -> Uuid {
    let registry = cairn_orchestrations::registry();
    let host = Host::new(db.store.clone(), registry, Ports::new()).with_config(fast_config());
    let client = host.client();
    let ports = cairn_orchestrations::ports::sample_ports(
        host.client(),
        cairn_orchestrations::ports::Ledger::from_env(),
    );
    let host = host.with_ports(ports);
    host.sync_activations().await.unwrap();
    tokio::spawn(host.run(stop.clone()));
    let mut batch = Vec::new();
    for i in 0..12 {
        batch.extend(cairn_orchestrations::demo_messages(i, "console"));
    }
    client.publish_batch(batch).await.unwrap();
    // An approval nobody decides within the test: it waits, is suspended, then resumed.
    let (_, outcome) = client
        .publish(
            "approval.requested",
            json!({ "request_id": "req-console", "approver": "bob", "summary": "a new desk",
                    "escalate_after_ms": 3_600_000, "deadline_after_ms": 7_200_000 }),
            Some("req-console-requested".into()),
            BTreeMap::new(),
        )
        .await
        .unwrap();
    let PublishOutcome::Routed(id) = outcome else {
        panic!("the approval did not start: {outcome:?}")
    };
    db.wait_for(
        "the approval to wait for its decision",
        Duration::from_secs(30),
        || async {
            db.store
                .instance_summaries(&[id])
                .await
                .unwrap()
                .first()
                .is_some_and(|s| s.step == "AwaitingDecision")
        },
    )
    .await;
    db.store
        .control(
            id,
            ControlAction::Suspend {
                reason: "held for the audit".into(),
            },
            chrono::Utc::now(),
        )
        .await
        .unwrap();
    // Its decision arrives while it is suspended: it waits, routed, for the resume.
    client
        .publish_batch(vec![NewMessage::published(
            "req-console-decision",
            "approval.decision",
            json!({ "request_id": "req-console", "approved": true, "by": "bob" }),
            BTreeMap::new(),
        )])
        .await
        .unwrap();
    // A message nobody subscribes to, a dead letter and a held send, for their pages.
    client
        .publish(
            "invoice.paid",
            json!({ "invoice_id": "inv-7" }),
            Some("inv-7-paid".into()),
            BTreeMap::new(),
        )
        .await
        .unwrap();
    dead_letter_and_held_send(db, id).await;
    id
}

/// A dead letter `dl-console` and a held send `held-console` of instance `id`, written with SQL
/// (as a port that gave up, and an ordered port stopped on a send, would leave them).
async fn dead_letter_and_held_send(db: &TestDb, id: Uuid) {
    let now = chrono::Utc::now()
        .format("%Y-%m-%dT%H:%M:%S%.6fZ")
        .to_string();
    sqlx::query(&format!(
        "INSERT INTO dead_letters (id, instance_id, port, message_type, body, reason, attempts, dead_at) \
         VALUES ('dl-console', '{id}', 'payments', 'payment.request', '{{}}', \
         'HTTP 503 from payments after 10 attempts', 10, '{now}')"
    ))
    .execute(&db.sql)
    .await
    .unwrap();
    sqlx::query(&format!(
        "INSERT INTO outbox (id, instance_id, port, message_type, body, expects_reply, status, \
         attempts, next_attempt_at, last_error, created_at) VALUES ('held-console', '{id}', 'ledger', \
         'ledger.entry', '{{}}', FALSE, 'held', 10, '{now}', 'ledger refused: connection reset', '{now}')"
    ))
    .execute(&db.sql)
    .await
    .unwrap();
}

async fn the_console_shows_every_page_and_resumes_a_suspended_instance(db: TestDb) {
    let Some(browser) = Browser::start().await else {
        return;
    };
    let stop = CancellationToken::new();
    let id = fill(&db, &stop).await;
    let base = console_on(&db, &stop).await;
    let shots = std::env::var_os("CAIRN_SCREENSHOTS")
        .filter(|_| db.backend == Backend::Sqlite)
        .map(std::path::PathBuf::from);
    if let Some(dir) = &shots {
        std::fs::create_dir_all(dir).unwrap();
    }
    let shot = |name: &'static str| {
        let path = shots.as_ref().map(|d| d.join(format!("{name}.png")));
        let browser = &browser;
        async move {
            if let Some(path) = path {
                browser.screenshot(&path).await;
            }
        }
    };

    // Every page opens, read-only, with what the host and the test wrote.
    let pages = [
        ("/", "Overview", "overview", "#by-definition", "approval"),
        (
            "/instances",
            "Instances",
            "instances",
            "#instances",
            "approval",
        ),
        (
            "/suspended",
            "Suspended instances",
            "suspended",
            "#instances",
            "held for the audit",
        ),
        ("/maps", "Maps", "maps", "#maps", "trip-booking v1"),
        (
            "/maps/approval/1",
            "Map of approval v1",
            "map",
            "#map",
            "AwaitingDecision",
        ),
        (
            "/dead-letters",
            "Dead letters",
            "dead-letters",
            "#dead-letters",
            "dl-console",
        ),
        (
            "/messages",
            "Unrouted and zombie messages",
            "messages",
            "#unrouted",
            "invoice.paid",
        ),
        ("/held", "Held ports", "held", "#held", "held-console"),
        ("/hosts", "Hosts", "hosts", "#hosts", "live"),
    ];
    for (path, title, name, marker, shows) in pages {
        browser.goto(&format!("{base}{path}")).await;
        assert_eq!(browser.text("h1").await, title, "{path}");
        let text = browser.text(marker).await;
        assert!(
            text.contains(shows),
            "{path}: {marker} shows {shows:?}: {text}"
        );
        shot(name).await;
    }
    browser.goto(&format!("{base}/maps/approval/1")).await;
    assert!(
        browser.has("#map a[data-step=\"AwaitingDecision\"]").await,
        "the map links the step the approval waits at to its instances"
    );

    // The operator filters to the suspended approval.
    browser.goto(&format!("{base}/instances")).await;
    browser
        .type_into("input[name=orchestration]", "approval")
        .await;
    browser
        .click("select[name=status] option[value=suspended]")
        .await;
    browser.type_into("input[name=error]", "AUDIT").await;
    browser.click("#filter").await;
    browser.wait_for_url("status=suspended").await;
    let rows = browser.text("#instances").await;
    assert!(rows.contains("held for the audit"), "{rows}");
    assert!(rows.contains(&id.to_string()[..8]), "{rows}");
    shot("instances-filtered").await;
    browser.click(&format!("a[href=\"/instances/{id}\"]")).await;
    assert_eq!(browser.text("#status").await, "suspended");
    assert_eq!(
        browser.text("#last-error").await,
        "suspended by operator: held for the audit"
    );
    shot("instance").await;

    // Without the token, a resume is refused, and nothing changes.
    browser.click("#resume").await;
    assert!(
        browser.text("#refused").await.contains("sign in"),
        "the refusal says to sign in"
    );
    assert_eq!(db.status(id).await, Some(InstanceStatus::Suspended));

    // Signed in with the token, the resume goes through and the instance completes.
    browser.goto(&format!("{base}/login")).await;
    browser.type_into("#token", TOKEN).await;
    browser.click("#sign-in").await;
    browser
        .wait_for_url_where("a page past the sign-in", |u| !u.contains("/login"))
        .await;
    assert_eq!(browser.text("h1").await, "Overview");
    browser.goto(&format!("{base}/instances/{id}")).await;
    browser.click("#resume").await;
    assert!(browser.text("#outcome").await.contains(&id.to_string()));
    db.wait_status(id, InstanceStatus::Completed, Duration::from_secs(30))
        .await;
    browser.goto(&format!("{base}/instances/{id}")).await;
    assert_eq!(browser.text("#status").await, "completed");
    assert!(browser.text("#history").await.contains("complete"));
    assert!(browser.title().await.contains("Cairn console"));

    browser.quit().await;
    stop.cancel();
}

/// `cairn console --fill N --time-pages` on a small fill: every page it times answers 200
/// (`time_pages` fails otherwise), the list has a next page, and the filters find what the fill
/// wrote (an instance page and a correlation filter were reached from them).
async fn the_console_benchmark_fills_a_database_and_every_page_answers(db: TestDb) {
    cairn::console::bench::fill(&db.url, &*db.store, 3000)
        .await
        .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let figures = cairn::console::bench::time_pages(
        listener,
        db.store.clone(),
        cairn_orchestrations::registry(),
        1,
    )
    .await
    .unwrap();
    let pages: Vec<&str> = figures.iter().map(|f| f.page.as_str()).collect();
    assert!(pages.iter().any(|p| p.contains("after=")), "{pages:?}");
    assert!(
        pages.iter().any(|p| p.starts_with("/instances/")),
        "{pages:?}"
    );
    assert!(
        pages.iter().any(|p| p.contains("ckey=order_id")),
        "{pages:?}"
    );
    assert_eq!(
        db.count_with(
            "SELECT COUNT(*) FROM instances WHERE status = $1",
            "suspended"
        )
        .await,
        60
    );
    // The pages it times show what it wrote: the map of the definition it names has steps with
    // instances waiting and transitions between them.
    let map = db
        .store
        .console()
        .unwrap()
        .map("order-fulfilment", 1)
        .await
        .unwrap();
    assert!(
        map.by_step
            .iter()
            .any(|(step, _, n)| step == "AwaitingPayment" && *n > 0),
        "{map:?}"
    );
    assert!(
        map.transitions
            .iter()
            .any(|(from, to, _)| from == "Received" && to == "completed"),
        "{map:?}"
    );
}

/// `cairn console` as a process: it serves the database's pages to anyone, refuses a sign-in
/// with a wrong token and an action from another site, and stops on SIGTERM.
async fn cairn_console_serves_the_database_and_refuses_what_it_must(db: TestDb) {
    let (child, base) = cairn_serving(&db, &["console", "--http"]).await;
    let http = reqwest::Client::new();
    let overview = http.get(format!("{base}/")).send().await.unwrap();
    assert_eq!(overview.status(), 200);
    assert!(overview
        .text()
        .await
        .unwrap()
        .contains("Instances by orchestration"));

    let form = |path: &'static str| {
        http.post(format!("{base}{path}"))
            .header("content-type", "application/x-www-form-urlencoded")
    };
    let wrong = form("/login").body("token=guess").send().await.unwrap();
    assert_eq!(wrong.status(), 403);
    assert!(wrong
        .text()
        .await
        .unwrap()
        .contains("not the console token"));
    let cross = form("/actions/instances")
        .header("origin", "http://evil.example")
        .body(format!("action=resume&ids={}", Uuid::nil()))
        .send()
        .await
        .unwrap();
    assert_eq!(cross.status(), 403);
    assert!(cross.text().await.unwrap().contains("is refused"));

    stop_with_sigterm(child).await;
}

/// The value of the first hidden `csrf` input of a page.
fn csrf_of(page: &str) -> String {
    let marker = "name=\"csrf\" value=\"";
    let start = page.find(marker).expect("a csrf field") + marker.len();
    page[start..][..64].to_owned()
}

/// Signed in, the forms' actions do what the command line's verbs do: terminate two instances
/// at once, resume a held send, purge a dead letter; a forged CSRF token does nothing.
async fn signed_in_actions_act_on_many_instances_dead_letters_and_held_sends(db: TestDb) {
    let client = cairn::Client::new(db.store.clone(), cairn_orchestrations::registry());
    let input = json!({ "request_id": "r", "approver": "a", "summary": "s",
                        "escalate_after_ms": 3_600_000, "deadline_after_ms": 7_200_000 });
    let first = client.start("approval", input.clone()).await.unwrap();
    let second = client.start("approval", input).await.unwrap();
    dead_letter_and_held_send(&db, first).await;
    let stop = CancellationToken::new();
    let base = console_on(&db, &stop).await;
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let signed = http
        .post(format!("{base}/login"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(format!("token={TOKEN}"))
        .send()
        .await
        .unwrap();
    assert_eq!(
        signed.status(),
        303,
        "signed in and sent on to the overview"
    );
    let cookie = signed.headers()["set-cookie"]
        .to_str()
        .unwrap()
        .split(';')
        .next()
        .unwrap()
        .to_owned();
    let post = |path: &str, body: String| {
        http.post(format!("{base}{path}"))
            .header("content-type", "application/x-www-form-urlencoded")
            .header("cookie", &cookie)
            .body(body)
            .send()
    };
    let page = http
        .get(format!("{base}/instances"))
        .header("cookie", &cookie)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let csrf = csrf_of(&page);

    let done = post(
        "/actions/instances",
        format!("csrf={csrf}&action=terminate&reason=duplicate+request&ids={first}&ids={second}"),
    )
    .await
    .unwrap();
    assert_eq!(done.status(), 200);
    for id in [first, second] {
        assert_eq!(db.status(id).await, Some(InstanceStatus::Terminated));
    }
    let detail = db.store.instance_detail(first).await.unwrap().unwrap();
    assert!(
        detail
            .summary
            .last_error
            .as_deref()
            .is_some_and(|e| e.contains("duplicate request")),
        "{:?}",
        detail.summary.last_error
    );

    let resumed = post(
        "/actions/sends",
        format!("csrf={csrf}&action=resume&ids=held-console"),
    )
    .await
    .unwrap()
    .text()
    .await
    .unwrap();
    assert!(resumed.contains("pending again"), "{resumed}");
    assert_eq!(
        db.count_with(
            "SELECT COUNT(*) FROM outbox WHERE id = $1 AND status = 'pending'",
            "held-console"
        )
        .await,
        1
    );

    // A forged CSRF token changes nothing; the session's own purges.
    let forged = post(
        "/actions/dead-letters",
        "csrf=forged&action=purge&ids=dl-console".to_owned(),
    )
    .await
    .unwrap();
    assert_eq!(forged.status(), 403);
    let count_dead = || {
        db.count_with(
            "SELECT COUNT(*) FROM dead_letters WHERE id = $1",
            "dl-console",
        )
    };
    assert_eq!(count_dead().await, 1);
    post(
        "/actions/dead-letters",
        format!("csrf={csrf}&action=purge&ids=dl-console"),
    )
    .await
    .unwrap();
    assert_eq!(count_dead().await, 0);
    stop.cancel();
}

/// `cairn` started with `args` and then a free loopback address, once it answers `GET /`: the
/// process and the console's base URL.
async fn cairn_serving(db: &TestDb, args: &[&str]) -> (tokio::process::Child, String) {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr = format!("127.0.0.1:{port}");
    let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_cairn"))
        .args(["--database", &db.url])
        .args(args)
        .arg(&addr)
        .env("CAIRN_CONSOLE_TOKEN", TOKEN)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let base = format!("http://{addr}");
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while reqwest::get(format!("{base}/")).await.is_err() {
        assert!(
            std::time::Instant::now() < deadline,
            "cairn {args:?} did not serve the console on {addr}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    (child, base)
}

/// Sends SIGTERM to `child` and checks that it exits, successfully, within 10 s.
async fn stop_with_sigterm(mut child: tokio::process::Child) {
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(child.id().unwrap()).unwrap()),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let status = tokio::time::timeout(Duration::from_secs(10), child.wait())
        .await
        .expect("cairn stops on SIGTERM")
        .unwrap();
    assert!(status.success(), "{status:?}");
}

/// `cairn host --console`: the host serves the console beside it, and lists itself as live.
async fn cairn_host_serves_the_console_beside_it(db: TestDb) {
    let (child, base) = cairn_serving(&db, &["host", "--console"]).await;
    // The console answers as the host starts; the host registers itself a moment later.
    db.wait_for(
        "the host to list itself as live",
        Duration::from_secs(30),
        || async {
            reqwest::get(format!("{base}/hosts"))
                .await
                .unwrap()
                .text()
                .await
                .unwrap()
                .contains("<td>live</td>")
        },
    )
    .await;
    stop_with_sigterm(child).await;
}

/// The console (with the test's token) on `db`, on a free loopback port until `stop`: its base
/// URL.
async fn console_on(db: &TestDb, stop: &CancellationToken) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(cairn::console::serve(
        listener,
        db.store.clone(),
        cairn_orchestrations::registry(),
        ConsoleSettings {
            token: Some(ConsoleToken::new(TOKEN)),
        },
        stop.clone(),
    ));
    base
}
