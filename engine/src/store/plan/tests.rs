//! Points in, plan out: which rows each table gets, and which point each belongs to.

use chrono::Duration;
use serde_json::json;

use super::*;
use crate::store::{InstanceStatus, Reason, SubscriptionRow};
use crate::Correlation;

fn at(secs: i64) -> DateTime<Utc> {
    DateTime::from_timestamp(1_800_000_000 + secs, 0).expect("valid time")
}

fn point(id: Uuid, seq: i64, now: DateTime<Utc>) -> PersistencePoint {
    PersistencePoint {
        instance_id: id,
        epoch: 7,
        host: "host-a".into(),
        reason: Reason::Dehydrate,
        detail: None,
        status: InstanceStatus::Dehydrated,
        resumable: true,
        failed: vec![],
        state: Some(vec![1]),
        engine_state: None,
        step: "Waiting".into(),
        waiting_for: "payment".into(),
        next_timer_at: None,
        last_error: None,
        output: None,
        history_seq: seq,
        consumed: vec![],
        subscriptions: None,
        cancel_timers: vec![],
        set_timers: vec![],
        outbox: vec![],
        delivered: vec![],
        messages: vec![],
        children: vec![],
        release: false,
        at: now,
        outbox_lock_until: now + Duration::seconds(60),
        start: None,
    }
}

fn send(id: &str, instance_id: Uuid) -> OutboxRow {
    OutboxRow {
        id: id.into(),
        instance_id,
        port: "payment".into(),
        message_type: "payment.requested".into(),
        body: json!({"amount": 5}),
        expects_reply: true,
        attempts: 0,
    }
}

fn instance(orchestration: &str) -> NewInstance {
    NewInstance {
        id: Uuid::new_v4(),
        orchestration: orchestration.into(),
        version: 1,
        parent: None,
        input: json!({"n": 1}),
    }
}

fn subscription(message_type: &str) -> SubscriptionRow {
    SubscriptionRow {
        id: Uuid::new_v4(),
        message_type: message_type.into(),
        correlation: Correlation::on("order", 1),
        earlier: false,
    }
}

/// (instance, row) of each row, to compare rows with what was asked for.
fn rows<T: Copy>(rows: &[Row<'_, T>]) -> Vec<(Uuid, T)> {
    rows.iter().map(|r| (r.instance(), r.row)).collect()
}

fn ids(points: &[&PersistencePoint]) -> Vec<Uuid> {
    points.iter().map(|p| p.instance_id).collect()
}

#[test]
fn a_group_is_cut_into_runs_where_an_instance_has_a_second_point() {
    let (a, b, c) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
    let group = [
        point(a, 1, at(0)),
        point(b, 1, at(0)),
        point(a, 2, at(1)),
        point(c, 1, at(1)),
    ];
    let plan = CommitPlan::of(&group);
    let runs: Vec<Vec<(Uuid, i64)>> = plan
        .runs
        .iter()
        .map(|r| {
            r.points
                .iter()
                .map(|p| (p.instance_id, p.history_seq))
                .collect()
        })
        .collect();
    assert_eq!(runs, [vec![(a, 1), (b, 1)], vec![(a, 2), (c, 1)]]);
    assert_eq!(plan.runs[1].run.len(), 2);
    assert!(CommitPlan::of(&[]).runs.is_empty());
    assert!(CommitPlan::single(&group).is_none(), "two runs are not one");
    assert!(CommitPlan::single(&[]).is_none());
    let single = CommitPlan::single(&group[..2]).expect("one run");
    assert_eq!(ids(&single.points), [a, b]);
}

#[test]
fn every_row_of_the_common_parts_names_its_point() {
    let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
    let mut pa = point(a, 3, at(10));
    pa.consumed = vec![11, 12];
    pa.outbox = vec![send("a-1", a), send("a-2", a)];
    pa.delivered = vec!["req-a".into()];
    let mut pb = point(b, 1, at(20));
    pb.consumed = vec![13];
    pb.delivered = vec!["req-b".into(), "req-c".into()];
    pb.subscriptions = Some(vec![]);
    let group = [pa, pb];
    let plan = CommitPlan::of(&group);
    let [run] = plan.runs.as_slice() else {
        panic!("one run: {plan:?}")
    };
    assert_eq!(ids(&run.points), [a, b]);
    assert_eq!(rows(&run.consumed), [(a, 11), (a, 12), (b, 13)]);
    let sends: Vec<(Uuid, &str, DateTime<Utc>)> = run
        .sends
        .iter()
        .map(|r| (r.instance(), r.row.id.as_str(), r.point.outbox_lock_until))
        .collect();
    let lock = at(10) + Duration::seconds(60);
    assert_eq!(sends, [(a, "a-1", lock), (a, "a-2", lock)]);
    assert_eq!(
        rows(&run.delivered),
        [(a, "req-a"), (b, "req-b"), (b, "req-c")]
    );
    assert_eq!(run.delivered[2].at(), at(20), "a row has its point's time");
    assert_eq!(ids(&run.giving), [b]);
    assert!(run.firsts.is_empty() && run.released.is_empty() && run.failed.is_empty());
}

#[test]
fn only_a_released_point_gives_back_its_failed_messages() {
    let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
    let mut kept = point(a, 1, at(0));
    kept.failed = vec![5];
    let mut released = point(b, 1, at(0));
    released.release = true;
    released.failed = vec![6, 7];
    let group = [kept, released];
    let plan = CommitPlan::of(&group);
    let run = &plan.runs[0];
    assert_eq!(ids(&run.released), [b]);
    assert_eq!(rows(&run.failed), [(b, 6), (b, 7)]);
}

#[test]
fn a_first_point_inserts_its_instance_under_its_own_fence() {
    let (a, held) = (instance("order"), Uuid::new_v4());
    let mut first = point(a.id, 1, at(0));
    first.start = Some(Box::new(FirstPoint {
        instance: a.clone(),
        lease_until: at(30),
    }));
    let group = [point(held, 4, at(0)), first];
    let plan = CommitPlan::of(&group);
    let run = &plan.runs[0];
    let firsts: Vec<(Uuid, Uuid, i64, DateTime<Utc>)> = run
        .firsts
        .iter()
        .map(|r| {
            (
                r.instance(),
                r.row.instance.id,
                r.point.epoch,
                r.row.lease_until,
            )
        })
        .collect();
    assert_eq!(firsts, [(a.id, a.id, 7, at(30))]);
    assert_eq!(
        ids(&run.points),
        [held, a.id],
        "its instance row is fenced too"
    );
}

#[test]
fn a_fence_read_first_keeps_the_rows_of_the_points_it_matched() {
    let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
    let mut pa = point(a, 1, at(0));
    pa.consumed = vec![1];
    pa.outbox = vec![send("a-1", a)];
    pa.release = true;
    pa.failed = vec![1];
    let mut pb = point(b, 1, at(0));
    pb.consumed = vec![2, 3];
    pb.delivered = vec!["req-b".into()];
    pb.subscriptions = Some(vec![subscription("x")]);
    pb.release = true;
    let group = [pa, pb];
    let plan = CommitPlan::of(&group);
    let fenced = plan.runs[0].fenced_to(&HashSet::from([b]));
    assert_eq!(ids(&fenced.points), [b]);
    assert_eq!(rows(&fenced.consumed), [(b, 2), (b, 3)]);
    assert!(fenced.sends.is_empty() && fenced.failed.is_empty());
    assert_eq!(rows(&fenced.delivered), [(b, "req-b")]);
    assert_eq!(ids(&fenced.released), [b]);
    assert_eq!(ids(&fenced.giving), [b]);
    assert_eq!(
        fenced.run.len(),
        2,
        "the outcomes are still the whole run's"
    );
    let outcomes: Vec<_> = fenced.outcomes(&HashSet::from([b])).collect();
    assert_eq!(outcomes, [CommitOutcome::Fenced, CommitOutcome::Committed]);
}

#[test]
fn what_is_written_after_the_fence_is_the_matched_points_only() {
    let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
    let child = instance("shipment");
    let mut pa = point(a, 1, at(5));
    pa.children = vec![child.clone()];
    pa.cancel_timers = vec!["reminder".into()];
    pa.set_timers = vec![
        ("reminder".into(), at(60)),
        ("timeout".into(), at(90)),
        ("reminder".into(), at(70)),
    ];
    pa.messages = vec![NewMessage::published(
        "m-1",
        "done",
        json!({}),
        Default::default(),
    )];
    pa.delivered = vec!["req-a".into()];
    let mut pb = point(b, 1, at(5));
    pb.children = vec![instance("other")];
    pb.set_timers = vec![("timeout".into(), at(90))];
    pb.subscriptions = Some(vec![]);
    let group = [pa, pb];
    let plan = CommitPlan::of(&group);
    let written = plan.runs[0].written(&HashSet::from([a]));
    let children: Vec<(Uuid, DateTime<Utc>)> =
        written.children.iter().map(|(c, t)| (c.id, *t)).collect();
    assert_eq!(children, [(child.id, at(5))]);
    assert_eq!(written.cancelled_timers, [(a, "reminder")]);
    assert_eq!(
        written.set_timers,
        [(a, "reminder", at(70)), (a, "timeout", at(90))],
        "one row a timer, its last due time"
    );
    let messages: Vec<(&str, DateTime<Utc>)> = written
        .messages
        .iter()
        .map(|(m, t)| (m.message_type.as_str(), *t))
        .collect();
    assert_eq!(messages, [("done", at(5))]);
    assert_eq!(rows(&written.delivered), [(a, "req-a")]);
    assert!(written.giving.is_empty(), "b was fenced");
    let none = plan.runs[0].written(&HashSet::new());
    assert!(none.children.is_empty() && none.set_timers.is_empty() && none.messages.is_empty());
}

#[test]
fn subscription_changes_make_each_giving_instance_hold_exactly_its_set() {
    let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
    let (kept, added) = (subscription("kept"), subscription("added"));
    let mut pa = point(a, 1, at(5));
    pa.subscriptions = Some(vec![kept.clone(), added.clone()]);
    let mut pb = point(b, 1, at(6));
    pb.subscriptions = Some(vec![]);
    let group = [pa, pb];
    let plan = CommitPlan::of(&group);
    let written = plan.runs[0].written(&HashSet::from([a, b]));
    let (stale, other) = (Uuid::new_v4(), Uuid::new_v4());
    let changes = written.subscription_changes([
        (a, kept.id, "kept".to_owned()),
        (a, stale, "stale".to_owned()),
        (b, other, "other".to_owned()),
    ]);
    assert_eq!(
        changes.removed,
        [(stale, "stale".to_owned()), (other, "other".to_owned())]
    );
    let added_rows: Vec<(Uuid, Uuid, DateTime<Utc>)> = changes
        .added
        .iter()
        .map(|(i, s, t)| (*i, s.id, *t))
        .collect();
    assert_eq!(added_rows, [(a, added.id, at(5))]);
}
