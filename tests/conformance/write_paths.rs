//! Every write path ends as the plain one. A backend may write a group of points in several
//! ways (PostgreSQL: one statement alone, or a transaction; SQLite: one script alone, a
//! transaction fenced in SQL, or one that reads the fence first, for more than eight points
//! or rows). Random sequences of points (first points of eager
//! starts among them), committed in random groups, must leave the database as the same points
//! committed one by one, each in a transaction of its own, would.

use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};

use super::*;

crate::backend_tests!(every_write_path_ends_as_one_transaction_per_point_would);

/// The instances of one case.
const INSTANCES: usize = 3;
/// Messages routed to each instance besides its start message.
const EXTRA_MESSAGES: usize = 2;

/// One point, in terms of the case: which instance, and what it writes.
#[derive(Debug, Clone)]
struct Step {
    instance: usize,
    /// Written under an epoch the instance no longer has.
    stale: bool,
    /// Consumes the next of its instance's messages no earlier point consumed.
    consume: bool,
    sends: usize,
    /// Marks delivered the oldest send of its instance not marked yet.
    deliver: bool,
    /// Re-arms the timer `t` (due at this many seconds), or cancels it (`Some(0)`).
    timer: Option<u8>,
    /// Gives its subscription set: empty, or one receive.
    subscribe: Option<bool>,
    /// Releases its instance: dehydrates it, or completes it (`Some(true)`).
    release: Option<bool>,
    /// Starts a new instance instead (an eager start written with its first point), which
    /// sends and sets its timer and subscriptions as above.
    first: bool,
}

fn step() -> impl Strategy<Value = Step> {
    (
        0..INSTANCES,
        prop::bool::weighted(0.15),
        any::<bool>(),
        prop_oneof![4 => Just(0usize), 2 => 1..3usize, 1 => 4..7usize],
        prop::bool::weighted(0.3),
        prop::option::weighted(0.2, 0..4u8),
        prop::option::weighted(0.25, any::<bool>()),
        prop::option::weighted(0.1, any::<bool>()),
        prop::bool::weighted(0.1),
    )
        .prop_map(
            |(instance, stale, consume, sends, deliver, timer, subscribe, release, first)| Step {
                instance,
                stale,
                consume,
                sends,
                deliver,
                timer,
                subscribe,
                release,
                first,
            },
        )
}

/// A sequence of points and how it is cut into groups (sizes, the last one as long as what is
/// left): single points, small groups, and groups of more than eight points.
fn case() -> impl Strategy<Value = (Vec<Step>, Vec<usize>)> {
    (
        prop::collection::vec(step(), 1..24),
        prop::collection::vec(prop_oneof![1..4usize, 4..9usize, 9..14usize], 1..8),
    )
}

/// The points of a case, built for one database (message seqs are read from it).
async fn points(
    db: &TestDb,
    case_no: u32,
    ids: &[Uuid],
    epochs: &[i64],
    steps: &[Step],
    plain: bool,
) -> Vec<PersistencePoint> {
    let now = at(0);
    let mut seq = [0i64; INSTANCES];
    let mut consumed = [0usize; INSTANCES];
    let mut sent: Vec<Vec<String>> = vec![Vec::new(); INSTANCES];
    let mut delivered = [0usize; INSTANCES];
    let mut gone = [false; INSTANCES];
    let mut out = Vec::new();
    for (n, s) in steps.iter().enumerate() {
        let i = s.instance;
        let (id, mut p, commits) = if s.first {
            // A new instance, the same id on both databases, unique in the case.
            let id = Uuid::from_u128(ids[i].as_u128() ^ ((n as u128 + 1) << 64));
            let mut p = send_point(id, "host-a", FIRST_EPOCH, &format!("s{n}"), 1, now);
            p.start = Some(Box::new(FirstPoint {
                instance: NewInstance {
                    orchestration: format!("case-{case_no}"),
                    ..approval(id)
                },
                lease_until: at(3600),
            }));
            (id, p, false)
        } else {
            seq[i] += 1;
            let mut p = send_point(ids[i], "host-a", epochs[i], &format!("s{n}"), seq[i], now);
            if s.stale {
                p.epoch -= 1;
            }
            // Whether this point commits: the same on every path (that is what is checked).
            (ids[i], p, !s.stale && !gone[i])
        };
        p.outbox.clear();
        // Each message is consumed by at most one point of the case (a second would be a bug,
        // refused as corrupt with the whole group); a fenced point's consumption is void.
        if s.consume && !s.first && consumed[i] <= EXTRA_MESSAGES {
            let message = if consumed[i] == 0 {
                start_message(db, id).await.2
            } else {
                let message_id = format!("c{case_no}-m{i}-{}", consumed[i]);
                sqlx::query_scalar::<_, i64>("SELECT seq FROM messages WHERE id = $1")
                    .bind(message_id)
                    .fetch_one(&db.sql)
                    .await
                    .unwrap()
            };
            p.consumed = vec![message];
            consumed[i] += 1;
        }
        for k in 0..s.sends {
            let send_id = format!("c{case_no}-send-{n}-{k}");
            p.outbox.push(OutboxRow {
                id: send_id.clone(),
                instance_id: id,
                port: "p".into(),
                message_type: "t".into(),
                body: json!({"n": n, "k": k}),
                expects_reply: k == 0,
                attempts: 0,
            });
            if commits {
                sent[i].push(send_id);
            }
        }
        if s.deliver && !s.first && delivered[i] < sent[i].len() {
            p.delivered = vec![sent[i][delivered[i]].clone()];
            delivered[i] += 1;
        }
        match s.timer {
            Some(0) => p.cancel_timers = vec!["t".into()],
            Some(due) => {
                p.cancel_timers = vec!["t".into()];
                p.set_timers = vec![("t".into(), at(i64::from(due) * 60))];
                p.next_timer_at = Some(at(i64::from(due) * 60));
            }
            None => {}
        }
        p.subscriptions = s.subscribe.map(|one| {
            if one {
                vec![SubscriptionRow {
                    // The same id on both databases, unique in the case.
                    id: Uuid::from_u128(id.as_u128() ^ (n as u128 + 1)),
                    message_type: "prop.event".into(),
                    correlation: Correlation::on("case", format!("{case_no}-{n}")),
                    earlier: false,
                }]
            } else {
                vec![]
            }
        });
        if let Some(complete) = s.release {
            p.release = true;
            p.status = if complete {
                InstanceStatus::Completed
            } else {
                InstanceStatus::Dehydrated
            };
            if commits {
                gone[i] = true;
            }
            if s.first {
                // A first point that gives its instance up at once is not one a host makes.
                p.release = false;
                p.status = InstanceStatus::Running;
            }
        }
        if plain {
            // Cancelling a timer nobody set changes nothing, and takes every backend off its
            // one-round-trip path: each point is written in a transaction of its own.
            p.cancel_timers.push("never-set".into());
        }
        out.push(p);
    }
    out
}

/// Starts a case's instances (each with its start message and two more routed to it) and
/// holds them for `host-a`; returns their epochs.
async fn set_up(db: &TestDb, case_no: u32, ids: &[Uuid]) -> Vec<i64> {
    let now = at(0);
    let instances = ids
        .iter()
        .map(|id| NewInstance {
            orchestration: format!("case-{case_no}"),
            ..approval(*id)
        })
        .collect();
    db.store
        .start_instances(instances, None, now)
        .await
        .unwrap();
    let messages = ids
        .iter()
        .enumerate()
        .flat_map(|(i, id)| {
            (1..=EXTRA_MESSAGES).map(move |k| {
                NewMessage::to_instance(
                    format!("c{case_no}-m{i}-{k}"),
                    "prop.item",
                    MessageKind::Published,
                    json!({"k": k}),
                    *id,
                )
            })
        })
        .collect();
    db.store.publish(messages, now).await.unwrap();
    let held = db
        .store
        .acquire("host-a", ids, now, at(3600))
        .await
        .unwrap();
    ids.iter()
        .map(|id| held.iter().find(|r| r.id == *id).unwrap().epoch)
        .collect()
}

/// What a case left in the database: every row of its instances, every column as text (on
/// SQLite as an SQL literal) but the `seq` of messages and sends, which count over the whole
/// database (and a PostgreSQL sequence is not rolled back with a transaction): their order is
/// compared instead.
async fn contents(db: &TestDb, case_no: u32) -> BTreeMap<String, Vec<Vec<Option<String>>>> {
    let of_case = "IN (SELECT id FROM instances WHERE orchestration = $1)";
    let tables = [
        ("instances", format!("id {of_case}")),
        ("messages", format!("instance_id {of_case}")),
        ("outbox", format!("instance_id {of_case}")),
        ("history", format!("instance_id {of_case}")),
        ("subscriptions", format!("instance_id {of_case}")),
        ("timers", format!("instance_id {of_case}")),
    ];
    let mut out = BTreeMap::new();
    for (table, filter) in tables {
        let columns: Vec<String> = match db.backend {
            support::Backend::Sqlite => {
                sqlx::query_scalar("SELECT name FROM pragma_table_info($1) ORDER BY cid")
                    .bind(table)
                    .fetch_all(&db.sql)
                    .await
                    .unwrap()
            }
            support::Backend::Postgres => sqlx::query_scalar(
                "SELECT CAST(column_name AS TEXT) FROM information_schema.columns \
                 WHERE table_schema = 'cairn' AND table_name = $1 ORDER BY ordinal_position",
            )
            .bind(table)
            .fetch_all(&db.sql)
            .await
            .unwrap(),
        };
        let columns: Vec<String> = columns
            .into_iter()
            .filter(|c| !(matches!(table, "messages" | "outbox") && c == "seq"))
            .collect();
        let select = columns
            .iter()
            .map(|c| match db.backend {
                // As an SQL literal: a blob need not be text.
                support::Backend::Sqlite => format!("quote({c})"),
                support::Backend::Postgres => format!("CAST({c} AS TEXT)"),
            })
            .collect::<Vec<_>>()
            .join(", ");
        let query = format!("SELECT {select} FROM {table} WHERE {filter}");
        let rows = sqlx::query(&query)
            .bind(format!("case-{case_no}"))
            .fetch_all(&db.sql)
            .await
            .unwrap_or_else(|e| panic!("{query}: {e}"));
        let mut rows: Vec<Vec<Option<String>>> = rows
            .iter()
            .map(|row| {
                (0..columns.len())
                    .map(|k| sqlx::Row::get::<Option<String>, _>(row, k))
                    .collect()
            })
            .collect();
        rows.sort();
        for row in &rows {
            assert_eq!(row.len(), columns.len());
        }
        out.insert(format!("{table} ({})", columns.join(", ")), rows);
        if matches!(table, "messages" | "outbox") {
            // The order of the rows, which their seqs give.
            let query = format!("SELECT id FROM {table} WHERE {filter} ORDER BY seq");
            let ids: Vec<String> = sqlx::query_scalar(&query)
                .bind(format!("case-{case_no}"))
                .fetch_all(&db.sql)
                .await
                .unwrap_or_else(|e| panic!("{query}: {e}"));
            out.insert(
                format!("{table} in order"),
                vec![ids.into_iter().map(Some).collect()],
            );
        }
    }
    out
}

/// Commits a case's points on `db`: one by one in transactions (`plain`), or in its groups.
async fn run(
    db: &TestDb,
    case_no: u32,
    ids: &[Uuid],
    steps: &[Step],
    groups: &[usize],
    plain: bool,
) -> Vec<CommitOutcome> {
    let epochs = set_up(db, case_no, ids).await;
    let points = points(db, case_no, ids, &epochs, steps, plain).await;
    let mut outcomes = Vec::new();
    if plain {
        for p in points {
            outcomes.extend(db.store.commit(&[p]).await.unwrap());
        }
        return outcomes;
    }
    let mut rest = points.as_slice();
    let mut sizes = groups.iter().copied();
    while !rest.is_empty() {
        let size = sizes.next().unwrap_or(rest.len()).min(rest.len());
        let (group, after) = rest.split_at(size);
        outcomes.extend(db.store.commit(group).await.unwrap());
        rest = after;
    }
    outcomes
}

async fn every_write_path_ends_as_one_transaction_per_point_would(grouped: TestDb) {
    let plain = TestDb::new(grouped.backend).await.unwrap();
    let cases = std::sync::atomic::AtomicU32::new(0);
    let handle = tokio::runtime::Handle::current();
    let mut runner = TestRunner::new(Config {
        cases: 48,
        max_shrink_iters: 64,
        failure_persistence: None,
        ..Config::default()
    });
    let result = runner.run(&case(), |(steps, groups)| {
        let case_no = cases.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let ids: Vec<Uuid> = (0..INSTANCES).map(|_| Uuid::now_v7()).collect();
        tokio::task::block_in_place(|| {
            handle.block_on(async {
                let expected = run(&plain, case_no, &ids, &steps, &groups, true).await;
                let got = run(&grouped, case_no, &ids, &steps, &groups, false).await;
                prop_assert_eq!(got, expected);
                prop_assert_eq!(
                    contents(&grouped, case_no).await,
                    contents(&plain, case_no).await
                );
                Ok(())
            })
        })
    });
    if let Err(e) = result {
        panic!("{e}");
    }
}
