//! Bad input at the doors: the publish API, the CLI, the file drop and HTTP, each fed malformed
//! JSON, a NUL where text is stored and deeper in a body, odd Unicode (a lone surrogate escape,
//! right-to-left and zero-width characters), input past the maximum message size, an unknown
//! message type and injection strings. Each bad item gets its final answer (an error, a 4xx, a
//! file moved aside with its reason), what can be stored is stored verbatim, the host stays alive,
//! and a good approval published alongside completes; on each backend.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use cairn::host::receive::{HttpSettings, HttpToken, ReceiveLocation};
use cairn::store::{NewMessage, PublishOutcome};
use cairn::{Client, HostConfig};
use serde_json::json;

use crate::support::fixtures::{fast_config, HostThread};
use crate::support::TestDb;

const WAIT: Duration = Duration::from_secs(60);

/// The maximum message size the doors are tested with: small, so that oversize input is cheap.
const MAX: usize = 64 * 1024;

/// Injection strings, stored verbatim wherever they go.
const INJECTION: &str = "'; DROP TABLE messages; --";
const INJECTION_2: &str = "\" OR 1=1; DELETE FROM instances WHERE ''='";

/// Right-to-left override, zero-width space, zero-width joiner, a combining mark, an emoji.
const ODD: &str = "\u{202E}abc\u{200B}d\u{200D}e\u{0301}\u{1F600}";

crate::backend_tests!(
    the_publish_api_refuses_what_cannot_be_stored_and_keeps_the_rest_verbatim,
    the_cli_refuses_bad_input_with_a_clear_error_and_a_failure_exit,
    a_bad_dropped_file_is_moved_aside_with_its_reason_and_good_files_after_it_are_published,
    a_file_name_used_again_with_other_content_is_stored_and_the_same_content_is_not,
    http_answers_bad_input_with_a_4xx_and_never_asks_for_a_retry,
    http_with_a_token_answers_401_without_it_and_202_with_it,
    slow_http_connections_are_closed_and_ordinary_requests_are_still_served,
    a_large_body_is_stored_once,
);

fn config() -> HostConfig {
    HostConfig {
        max_message_bytes: MAX,
        ..fast_config()
    }
}

/// Publishes an approval request and its decision through the API.
async fn good_approval(client: &Client, request_id: &str) {
    for (ty, body) in good_messages(request_id) {
        client
            .publish(
                ty,
                body,
                Some(format!("{ty}:{request_id}")),
                BTreeMap::new(),
            )
            .await
            .expect("a good publish");
    }
}

/// An approval request and its decision.
fn good_messages(request_id: &str) -> [(&'static str, serde_json::Value); 2] {
    [
        (
            "approval.requested",
            json!({"request_id": request_id, "approver": "ada"}),
        ),
        (
            "approval.decision",
            json!({"request_id": request_id, "approved": true, "by": "ada"}),
        ),
    ]
}

/// Waits until the approval of `request_id` has completed.
async fn wait_completed(db: &TestDb, request_id: &str) {
    db.wait_for(
        &format!("the good approval {request_id} to complete"),
        WAIT,
        || async {
            db.count_with(
                "SELECT COUNT(*) FROM instances WHERE orchestration = 'approval' \
                 AND status = 'completed' AND output LIKE $1",
                &format!("%\"{request_id}\"%"),
            )
            .await
                == 1
        },
    )
    .await;
}

/// The stored body of message `id`, as JSON.
async fn stored_body(db: &TestDb, id: &str) -> serde_json::Value {
    let bodies = db
        .texts("SELECT body FROM messages WHERE id = $1", id)
        .await;
    assert_eq!(bodies.len(), 1, "message {id:?} stored once: {bodies:?}");
    serde_json::from_str(&bodies[0]).expect("a stored body is JSON")
}

/// The stored properties of message `id`.
async fn stored_properties(db: &TestDb, id: &str) -> BTreeMap<String, String> {
    let props = db
        .texts("SELECT properties FROM messages WHERE id = $1", id)
        .await;
    assert_eq!(props.len(), 1, "message {id:?} stored once");
    serde_json::from_str(&props[0]).expect("stored properties are JSON")
}

async fn messages_with_id(db: &TestDb, id: &str) -> i64 {
    db.count_with("SELECT COUNT(*) FROM messages WHERE id = $1", id)
        .await
}

/// A body whose JSON text is over [`MAX`].
fn oversize_body() -> serde_json::Value {
    json!({ "blob": { "text": "x".repeat(MAX + 1) } })
}

async fn the_publish_api_refuses_what_cannot_be_stored_and_keeps_the_rest_verbatim(db: TestDb) {
    let (host, client) = HostThread::start(&db, config(), Default::default()).await;
    let refused = |r: Result<(String, PublishOutcome), cairn::host::ClientError>| {
        r.expect_err("refused").to_string()
    };

    // The issue's case: a NUL in a top-level field, which is promoted to a property.
    let err = refused(
        client
            .publish(
                "approval.requested",
                json!({"request_id": "r\u{0}x", "approver": "a"}),
                Some("nul".into()),
                BTreeMap::new(),
            )
            .await,
    );
    assert!(err.contains("NUL") && err.contains("request_id"), "{err}");
    assert_eq!(messages_with_id(&db, "nul").await, 0);
    // In the id, the type, a property's name or value.
    let err = refused(
        client
            .publish("t", json!({}), Some("id\u{0}".into()), BTreeMap::new())
            .await,
    );
    assert!(err.contains("message id"), "{err}");
    let err = refused(
        client
            .publish("t\u{0}", json!({}), None, BTreeMap::new())
            .await,
    );
    assert!(err.contains("message type"), "{err}");
    let err = refused(
        client
            .publish(
                "t",
                json!({}),
                None,
                BTreeMap::from([("k\u{0}".to_owned(), "v".to_owned())]),
            )
            .await,
    );
    assert!(err.contains("property name"), "{err}");
    // Past the maximum size.
    let err = refused(
        client
            .publish("t", oversize_body(), Some("big".into()), BTreeMap::new())
            .await,
    );
    assert!(err.contains("maximum message size"), "{err}");
    assert_eq!(messages_with_id(&db, "big").await, 0);
    let err = client
        .start("approval", oversize_body())
        .await
        .expect_err("an oversize input is refused")
        .to_string();
    assert!(err.contains("maximum message size"), "{err}");
    let err = client
        .start_many(vec![
            (
                "approval".into(),
                json!({"request_id": "s-1", "approver": "a"}),
            ),
            ("approval".into(), oversize_body()),
        ])
        .await
        .expect_err("a batch with an oversize input is refused")
        .to_string();
    assert!(err.contains("maximum message size"), "{err}");
    assert_eq!(
        db.count("SELECT COUNT(*) FROM instances WHERE orchestration = 'approval'")
            .await,
        0,
        "nothing of a refused batch is started"
    );
    // A batch with one bad message is refused whole, naming the message.
    let batch = vec![
        NewMessage::published("batch-1", "t", json!({"a": 1}), BTreeMap::new()),
        NewMessage::published("batch-2", "t", json!({"a": "x\u{0}"}), BTreeMap::new()),
    ];
    let err = client
        .publish_batch(batch)
        .await
        .expect_err("the batch is refused")
        .to_string();
    assert!(err.contains("batch-2"), "{err}");
    assert_eq!(messages_with_id(&db, "batch-1").await, 0);

    // What can be stored is stored verbatim: a NUL deep in a body, odd Unicode, injections, an
    // unknown type (kept as unrouted, with its reason).
    let body = json!({
        "doc": { "text": "a\u{0}b", "odd": ODD },
        "injection": INJECTION,
        "odd": ODD,
    });
    let props = BTreeMap::from([
        (INJECTION.to_owned(), INJECTION_2.to_owned()),
        ("rtl".to_owned(), ODD.to_owned()),
    ]);
    let (id, outcome) = client
        .publish(INJECTION_2, body.clone(), Some(INJECTION.into()), props)
        .await
        .expect("stored");
    assert_eq!(
        (id.as_str(), outcome),
        (INJECTION, PublishOutcome::Unrouted)
    );
    assert_eq!(stored_body(&db, INJECTION).await, body);
    let stored = stored_properties(&db, INJECTION).await;
    assert_eq!(stored.get(INJECTION).map(String::as_str), Some(INJECTION_2));
    assert_eq!(stored.get("rtl").map(String::as_str), Some(ODD));
    assert_eq!(stored.get("odd").map(String::as_str), Some(ODD));
    assert_eq!(
        db.texts("SELECT message_type FROM messages WHERE id = $1", INJECTION)
            .await,
        vec![INJECTION_2.to_owned()]
    );
    assert_eq!(db.count("SELECT COUNT(*) FROM messages").await, 1);

    // The host is alive: a good approval completes.
    good_approval(&client, "api-good").await;
    wait_completed(&db, "api-good").await;
    host.stop();
}

fn cairn(db: &TestDb, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_cairn"))
        .args(["--database", &db.url])
        .args(args)
        .env("RUST_LOG", "warn")
        .env_remove("CAIRN_MAX_MESSAGE_BYTES")
        .output()
        .expect("run cairn")
}

/// Runs the CLI, expecting a failure; returns its stderr.
fn cli_fails(db: &TestDb, args: &[&str]) -> String {
    let out = cairn(db, args);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        !out.status.success(),
        "cairn {args:?} succeeded: {}{stderr}",
        String::from_utf8_lossy(&out.stdout)
    );
    stderr
}

/// Runs the CLI, expecting success; returns its stdout.
fn cli_ok(db: &TestDb, args: &[&str]) -> String {
    let out = cairn(db, args);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "cairn {args:?} failed: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

async fn the_cli_refuses_bad_input_with_a_clear_error_and_a_failure_exit(db: TestDb) {
    let (host, _client) = HostThread::start(&db, config(), Default::default()).await;
    // The issue's case.
    let err = cli_fails(
        &db,
        &[
            "publish",
            "approval.requested",
            "--id",
            "nul",
            "--body",
            r#"{"request_id":"r\u0000x","approver":"a"}"#,
        ],
    );
    assert!(err.contains("NUL") && err.contains("request_id"), "{err}");
    assert_eq!(messages_with_id(&db, "nul").await, 0);
    // Malformed JSON, and a lone surrogate escape (no Unicode text can hold it).
    let err = cli_fails(&db, &["publish", "t", "--body", "{ nope"]);
    assert!(err.contains("not valid JSON"), "{err}");
    let err = cli_fails(&db, &["publish", "t", "--body", r#"{"s": "\ud800"}"#]);
    assert!(err.contains("not valid JSON"), "{err}");
    let err = cli_fails(&db, &["start", "approval", "--input", r#"["\udc00"]"#]);
    assert!(err.contains("not valid JSON"), "{err}");
    // Past the maximum size.
    let big = json!({"text": "x".repeat(2000)}).to_string();
    let err = cli_fails(
        &db,
        &[
            "publish",
            "t",
            "--body",
            &big,
            "--max-message-bytes",
            "1000",
        ],
    );
    assert!(err.contains("maximum message size"), "{err}");
    let err = cli_fails(
        &db,
        &[
            "start",
            "approval",
            "--input",
            &big,
            "--max-message-bytes",
            "1000",
        ],
    );
    assert!(err.contains("maximum message size"), "{err}");
    // An unknown orchestration is an error; an unknown message type is kept as unrouted.
    let err = cli_fails(&db, &["start", "no-such-orchestration"]);
    assert!(err.contains("no orchestration named"), "{err}");
    let out = cli_ok(
        &db,
        &[
            "publish",
            "no.such.type",
            "--body",
            "{}",
            "--id",
            "unknown-type",
        ],
    );
    assert!(out.contains("unrouted"), "{out}");
    // Injections and odd Unicode are stored verbatim.
    let body = json!({"text": INJECTION, "odd": ODD, "deep": {"nul": "a\u{0}b"}});
    let property = format!("who={INJECTION_2}");
    cli_ok(
        &db,
        &[
            "publish",
            INJECTION_2,
            "--body",
            &body.to_string(),
            "--id",
            INJECTION,
            "--property",
            &property,
        ],
    );
    assert_eq!(stored_body(&db, INJECTION).await, body);
    let props = stored_properties(&db, INJECTION).await;
    assert_eq!(props.get("who").map(String::as_str), Some(INJECTION_2));
    assert_eq!(props.get("odd").map(String::as_str), Some(ODD));
    assert_eq!(db.count("SELECT COUNT(*) FROM messages").await, 2);

    // The host is alive: a good approval published with the CLI completes.
    for (ty, body) in good_messages("cli-good") {
        cli_ok(&db, &["publish", ty, "--body", &body.to_string()]);
    }
    wait_completed(&db, "cli-good").await;
    host.stop();
}

/// The file `name` in `dir/rejected`, and the reason beside it.
fn rejected(dir: &Path, name: &str) -> String {
    let rejected = dir.join("rejected");
    assert!(
        rejected.join(name).exists(),
        "{name} was moved to rejected/; there: {:?}",
        std::fs::read_dir(&rejected)
            .map(|d| d.flatten().map(|e| e.file_name()).collect::<Vec<_>>())
    );
    std::fs::read_to_string(rejected.join(format!("{name}.error.txt"))).expect("the reason")
}

fn file_drop(dir: &Path) -> ReceiveLocation {
    ReceiveLocation::FileDrop {
        dir: dir.to_owned(),
        poll: Duration::from_millis(20),
    }
}

async fn a_bad_dropped_file_is_moved_aside_with_its_reason_and_good_files_after_it_are_published(
    db: TestDb,
) {
    let dir = tempfile::tempdir().unwrap();
    let folder = dir.path();
    let envelope = |ty: &str, id: Option<&str>, body: serde_json::Value| {
        let mut e = json!({"type": ty, "body": body});
        if let Some(id) = id {
            e["id"] = json!(id);
        }
        e.to_string()
    };
    let files = [
        (
            "001-nul.json",
            envelope(
                "approval.requested",
                None,
                json!({"request_id": "r\u{0}x", "approver": "a"}),
            ),
        ),
        (
            "002-nul-type.json",
            envelope("approval\u{0}.requested", None, json!({})),
        ),
        ("003-broken.json", "{ this is not json".to_owned()),
        (
            "004-surrogate.json",
            r#"{"type": "t", "body": {"s": "\ud800"}}"#.to_owned(),
        ),
        (
            "005-injection.json",
            envelope(
                INJECTION_2,
                Some(INJECTION),
                json!({"text": INJECTION, "odd": ODD, "deep": {"nul": "a\u{0}b"}}),
            ),
        ),
        (
            "006-unknown-type.json",
            envelope("no.such.type", Some("unknown-type"), json!({})),
        ),
        (
            "007-request.json",
            envelope(
                "approval.requested",
                None,
                good_messages("file-good")[0].1.clone(),
            ),
        ),
        (
            "008-decision.json",
            envelope(
                "approval.decision",
                None,
                good_messages("file-good")[1].1.clone(),
            ),
        ),
    ];
    for (name, text) in &files {
        std::fs::write(folder.join(name), text).unwrap();
    }
    // Past the maximum size: a sparse file, which must not be read into memory.
    let big = std::fs::File::create(folder.join("000-big.json")).unwrap();
    big.set_len(64 * 1024 * 1024).unwrap();
    drop(big);
    let (host, client) = HostThread::start_receiving(&db, config(), vec![file_drop(folder)]).await;

    wait_completed(&db, "file-good").await;
    db.wait_for("every file to be taken", WAIT, || async {
        files.iter().all(|(name, _)| !folder.join(name).exists())
    })
    .await;
    let why = rejected(folder, "000-big.json");
    assert!(why.contains("maximum message size"), "{why}");
    let why = rejected(folder, "001-nul.json");
    assert!(why.contains("NUL") && why.contains("request_id"), "{why}");
    let why = rejected(folder, "002-nul-type.json");
    assert!(why.contains("NUL") && why.contains("message type"), "{why}");
    let why = rejected(folder, "003-broken.json");
    assert!(why.contains("not a message envelope"), "{why}");
    let why = rejected(folder, "004-surrogate.json");
    assert!(why.contains("not a message envelope"), "{why}");
    assert_eq!(
        stored_body(&db, INJECTION).await,
        json!({"text": INJECTION, "odd": ODD, "deep": {"nul": "a\u{0}b"}})
    );
    assert_eq!(
        db.texts("SELECT status FROM messages WHERE id = $1", "unknown-type")
            .await,
        vec!["unrouted".to_owned()]
    );
    // The host and its client are alive.
    good_approval(&client, "file-good-2").await;
    wait_completed(&db, "file-good-2").await;
    host.stop();
}

async fn a_file_name_used_again_with_other_content_is_stored_and_the_same_content_is_not(
    db: TestDb,
) {
    let dir = tempfile::tempdir().unwrap();
    let folder = dir.path();
    let (host, _client) = HostThread::start_receiving(&db, config(), vec![file_drop(folder)]).await;
    let request = |request_id: &str| {
        json!({"type": "approval.requested", "body": {"request_id": request_id, "approver": "a"}})
            .to_string()
    };
    let approvals = || async {
        db.count("SELECT COUNT(*) FROM instances WHERE orchestration = 'approval'")
            .await
    };
    let file = folder.join("reuse.json");
    for (text, expected) in [
        (request("reuse-1"), 1),
        // The same name, other content: a new message.
        (request("reuse-2"), 2),
        // The same name and content again (as after a crash between commit and removal): a
        // duplicate, stored once.
        (request("reuse-2"), 2),
    ] {
        // Written under another name, then renamed in, as docs/messaging.md tells writers: the
        // drop would otherwise read the file while it is empty (write truncates first).
        let part = folder.join("reuse.json.part");
        std::fs::write(&part, &text).unwrap();
        std::fs::rename(&part, &file).unwrap();
        db.wait_for("the file to be taken", WAIT, || async { !file.exists() })
            .await;
        assert_eq!(approvals().await, expected, "after {text}");
    }
    assert!(!folder.join("rejected").exists());
    assert_eq!(
        db.count("SELECT COUNT(*) FROM messages WHERE message_type = 'approval.requested'")
            .await,
        2
    );
    host.stop();
}

/// A free loopback address.
fn free_addr() -> SocketAddr {
    let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    probe.local_addr().unwrap()
}

/// Waits until something listens on `addr`.
async fn wait_listening(addr: SocketAddr) {
    for _ in 0..500 {
        if tokio::net::TcpStream::connect(addr).await.is_ok() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("nothing listens on {addr}");
}

/// One HTTP/1.1 POST /messages; returns the status code and the JSON body of the answer.
async fn post(addr: SocketAddr, headers: &str, body: &[u8]) -> (u16, serde_json::Value) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut read, mut write) = stream.into_split();
    let mut request = format!(
        "POST /messages HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n{headers}Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    request.extend_from_slice(body);
    // The server may answer (413) before it has read the whole request.
    let writer = tokio::spawn(async move {
        let _ = write.write_all(&request).await;
        write
    });
    let mut response = Vec::new();
    let read = read.read_to_end(&mut response).await;
    assert!(
        !response.is_empty(),
        "an answer, not {read:?} ({} bytes written)",
        body.len()
    );
    drop(writer.await);
    let response = String::from_utf8_lossy(&response);
    let status = response[9..12].parse().unwrap();
    let json = response.split("\r\n\r\n").nth(1).unwrap_or_default();
    (status, serde_json::from_str(json).unwrap_or_default())
}

fn http_location(addr: SocketAddr) -> ReceiveLocation {
    ReceiveLocation::http(addr)
}

async fn http_answers_bad_input_with_a_4xx_and_never_asks_for_a_retry(db: TestDb) {
    let addr = free_addr();
    let (host, _client) =
        HostThread::start_receiving(&db, config(), vec![http_location(addr)]).await;
    wait_listening(addr).await;
    let refused = |(status, answer): (u16, serde_json::Value), code: u16, text: &str| {
        assert_eq!(status, code, "{answer}");
        let error = answer["error"].as_str().unwrap_or_default();
        assert!(error.contains(text), "{text:?} in {answer}");
        assert_ne!(answer["retry"], json!(true), "{answer}");
    };
    let nul = json!({"type": "approval.requested", "id": "nul",
        "body": {"request_id": "r\u{0}x", "approver": "a"}});
    refused(post(addr, "", nul.to_string().as_bytes()).await, 400, "NUL");
    assert_eq!(messages_with_id(&db, "nul").await, 0);
    let nul_key = json!({"type": "t", "properties": {"k\u{0}": "v"}, "body": {}});
    refused(
        post(addr, "", nul_key.to_string().as_bytes()).await,
        400,
        "NUL",
    );
    refused(
        post(addr, "", b"{ nope").await,
        400,
        "not a message envelope",
    );
    refused(
        post(addr, "", br#"{"type": "t", "body": {"s": "\ud800"}}"#).await,
        400,
        "not a message envelope",
    );
    refused(
        post(addr, "", b"{\"body\": {}}").await,
        400,
        "not a message envelope",
    );
    refused(
        post(addr, "", &[0xff, 0xfe, b'{', b'}']).await,
        400,
        "not a message envelope",
    );
    // Past the maximum size: the body, and the whole request.
    let big = json!({"type": "t", "id": "big", "body": oversize_body()}).to_string();
    refused(
        post(addr, "", big.as_bytes()).await,
        413,
        "maximum message size",
    );
    let huge = json!({"type": "t", "id": "huge", "body": {"t": "x".repeat(4 * MAX)}}).to_string();
    refused(
        post(addr, "", huge.as_bytes()).await,
        413,
        "maximum message size",
    );
    assert_eq!(messages_with_id(&db, "big").await, 0);
    // An unknown type is stored as unrouted; injections and odd Unicode verbatim.
    let (status, answer) = post(addr, "", br#"{"type": "no.such.type", "body": {}}"#).await;
    assert_eq!(
        (status, answer["outcome"].clone()),
        (202, json!("unrouted"))
    );
    let body = json!({"text": INJECTION, "odd": ODD, "deep": {"nul": "a\u{0}b"}});
    let request = json!({"type": INJECTION_2, "id": INJECTION, "properties": {"rtl": ODD},
        "body": body});
    let (status, answer) = post(addr, "", request.to_string().as_bytes()).await;
    assert_eq!(status, 202, "{answer}");
    assert_eq!(stored_body(&db, INJECTION).await, body);
    assert_eq!(
        stored_properties(&db, INJECTION)
            .await
            .get("rtl")
            .map(String::as_str),
        Some(ODD)
    );
    // The host is alive: a good approval posted over HTTP completes.
    for (ty, body) in good_messages("http-good") {
        let request = json!({"type": ty, "body": body}).to_string();
        assert_eq!(post(addr, "", request.as_bytes()).await.0, 202);
    }
    wait_completed(&db, "http-good").await;
    host.stop();
}

async fn a_large_body_is_stored_once(db: TestDb) {
    const LARGE: usize = 3 * 1024 * 1024;
    let (host, client) = HostThread::start(&db, fast_config(), Default::default()).await;
    let text = "y".repeat(LARGE);
    // A long top-level field (which is not promoted) and a long explicit property, on a type
    // nothing subscribes to (its unrouted reason names the properties).
    let props = BTreeMap::from([("note".to_owned(), "z".repeat(10_000))]);
    let (_, outcome) = client
        .publish(
            "nobody.listens",
            json!({"text": text, "short": "s"}),
            Some("large".into()),
            props,
        )
        .await
        .expect("stored");
    assert_eq!(outcome, PublishOutcome::Unrouted);
    let sizes = |column: &str| {
        let query = format!("SELECT CAST(LENGTH({column}) AS BIGINT) FROM messages WHERE id = $1");
        let db = &db;
        async move { db.count_with(&query, "large").await }
    };
    let body = sizes("body").await;
    assert!(body > LARGE as i64, "{body}");
    let properties = sizes("properties").await;
    assert!(
        (10_000..12_000).contains(&properties),
        "the long body field is not promoted: {properties}"
    );
    let reason = sizes("reason").await;
    assert!(reason < 1024, "the reason is short: {reason}");
    let stored = stored_properties(&db, "large").await;
    assert_eq!(stored.get("short").map(String::as_str), Some("s"));
    assert!(!stored.contains_key("text"));
    good_approval(&client, "large-good").await;
    wait_completed(&db, "large-good").await;
    host.stop();
}

async fn http_with_a_token_answers_401_without_it_and_202_with_it(db: TestDb) {
    const TOKEN: &str = "s3cret-t0ken";
    let addr = free_addr();
    let location = ReceiveLocation::Http {
        addr,
        settings: HttpSettings {
            token: Some(HttpToken::new(TOKEN)),
            ..HttpSettings::default()
        },
    };
    assert!(!format!("{location:?}").contains(TOKEN), "{location:?}");
    let (host, _client) = HostThread::start_receiving(&db, config(), vec![location]).await;
    wait_listening(addr).await;
    let request = |request_id: &str, i: usize| {
        let (ty, body) = good_messages(request_id)[i].clone();
        json!({"type": ty, "body": body}).to_string()
    };
    for headers in [
        String::new(),
        "Authorization: Bearer wrong\r\n".to_owned(),
        format!("Authorization: Bearer {TOKEN}x\r\n"),
        format!("Authorization: Basic {TOKEN}\r\n"),
        format!("Authorization: {TOKEN}\r\n"),
    ] {
        let (status, answer) = post(addr, &headers, request("token-none", 0).as_bytes()).await;
        assert_eq!(status, 401, "{headers:?}: {answer}");
        assert!(
            answer["error"]
                .as_str()
                .unwrap_or_default()
                .contains("token"),
            "{answer}"
        );
    }
    assert_eq!(
        db.count("SELECT COUNT(*) FROM messages").await,
        0,
        "nothing is stored without the token"
    );
    let auth = format!("Authorization: Bearer {TOKEN}\r\n");
    for i in 0..2 {
        let (status, answer) = post(addr, &auth, request("token-good", i).as_bytes()).await;
        assert_eq!(status, 202, "{answer}");
    }
    wait_completed(&db, "token-good").await;
    host.stop();
}

/// Whether the server closes `stream` within `within`: the read ends (EOF or reset).
async fn closed_within(stream: &mut tokio::net::TcpStream, within: Duration) -> bool {
    use tokio::io::AsyncReadExt;
    let mut sink = Vec::new();
    tokio::time::timeout(within, stream.read_to_end(&mut sink))
        .await
        .is_ok()
}

async fn slow_http_connections_are_closed_and_ordinary_requests_are_still_served(db: TestDb) {
    use tokio::io::AsyncWriteExt;
    const LIMIT: usize = 8;
    let addr = free_addr();
    let location = ReceiveLocation::Http {
        addr,
        settings: HttpSettings {
            header_read_timeout: Duration::from_millis(500),
            idle_timeout: Duration::from_millis(1000),
            max_connections: LIMIT,
            ..HttpSettings::default()
        },
    };
    let (host, _client) = HostThread::start_receiving(&db, config(), vec![location]).await;
    wait_listening(addr).await;
    let started = std::time::Instant::now();
    // Three times the connection limit, each sending half a request head, then nothing.
    let mut slow = Vec::new();
    for _ in 0..3 * LIMIT {
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        stream
            .write_all(b"POST /messages HTTP/1.1\r\nHost: slow\r\nContent-")
            .await
            .unwrap();
        slow.push(stream);
    }
    // A head sent whole, then a body that stalls.
    let mut stalled = tokio::net::TcpStream::connect(addr).await.unwrap();
    stalled
        .write_all(
            b"POST /messages HTTP/1.1\r\nHost: stalled\r\nContent-Length: 100\r\n\r\n{\"type\"",
        )
        .await
        .unwrap();
    // Ordinary requests are served once slow connections are dropped: the ones past the limit
    // wait to be accepted.
    for i in 0..2 {
        let (ty, body) = good_messages("slow-good")[i].clone();
        let request = json!({"type": ty, "body": body}).to_string();
        let (status, answer) =
            tokio::time::timeout(Duration::from_secs(20), post(addr, "", request.as_bytes()))
                .await
                .expect("an ordinary request is served while slow connections come and go");
        assert_eq!(status, 202, "{answer}");
    }
    let served = started.elapsed();
    eprintln!(
        "ordinary requests served {served:?} after {} slow connections",
        3 * LIMIT
    );
    assert!(served < Duration::from_secs(20), "{served:?}");
    for (i, stream) in slow.iter_mut().enumerate() {
        assert!(
            closed_within(stream, Duration::from_secs(10)).await,
            "slow connection {i} is closed"
        );
    }
    assert!(
        closed_within(&mut stalled, Duration::from_secs(10)).await,
        "the stalled body's connection is closed"
    );
    let closed = started.elapsed();
    eprintln!("every slow connection closed {closed:?} after they opened");
    assert!(closed < Duration::from_secs(20), "{closed:?}");
    wait_completed(&db, "slow-good").await;
    host.stop();
}
