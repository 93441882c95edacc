//! The console's pages (GET): overview, instances, one instance, maps, suspended instances, dead
//! letters, unrouted and zombie messages, held sends, hosts. Each reads through
//! [`ConsoleReads`](crate::store::console::ConsoleReads) or the operators' verbs, and renders
//! HTML on the server.

use axum::extract::{Path, Query, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, NaiveDateTime, Utc};
use maud::{html, Markup};
use serde::Deserialize;
use uuid::Uuid;

use super::view::{self, instance_link, status, time, time_opt, with_query, Viewer};
use super::{map, Shared};
use crate::codec;
use crate::store::console::{Cursor, InstanceFilter, InstancePage, LIST_LIMIT};
use crate::store::{InstanceStatus, InstanceSummary};

/// Rows per page of the instance list.
pub const PAGE_ROWS: u32 = 50;

/// An action form's hidden fields: the CSRF token and where to come back to.
fn hidden(viewer: &Viewer, back: &str) -> Markup {
    html! {
        input type="hidden" name="csrf" value=(viewer.csrf.as_deref().unwrap_or_default());
        input type="hidden" name="back" value=(back);
    }
}

/// GET `/`.
pub async fn overview(State(c): State<Shared>, headers: HeaderMap) -> Response {
    let viewer = c.viewer(&headers);
    let reads = match c.reads() {
        Ok(r) => r,
        Err(e) => return e,
    };
    let now = Utc::now();
    let (o, counted) = match tokio::try_join!(reads.overview(now), c.counts.get(&c.store)) {
        Ok(both) => both,
        Err(e) => return super::failed(&viewer, e),
    };
    let suspended = o.suspended;
    let p50 = view::percentile(&o.durations_ms, 50);
    let p99 = view::percentile(&o.durations_ms, 99);
    let card = |n: i64, label: &str, href: &str| {
        html! {
            div class={ "card" @if n > 0 && href != "/hosts" { " warn" } } {
                a href=(href) { div.n { (n) } div.note { (label) } }
            }
        }
    };
    let body = html! {
        div.cards {
            (card(suspended, "suspended instances", "/suspended"))
            (card(o.dead_letters, "dead letters", "/dead-letters"))
            (card(o.unrouted, "unrouted messages", "/messages"))
            (card(o.zombies, "zombie messages", "/messages"))
            (card(o.held_sends, "held sends", "/held"))
            (card(o.live_hosts, "live hosts", "/hosts"))
        }
        div.cards {
            (view::per_minute_chart(now, &o.points_per_minute, "persistence points"))
            (view::per_minute_chart(now, &o.completions_per_minute, "completions"))
            div.card {
                div.note { "start to completion · last hour" }
                div.n { "p50 " (p50.map(view::millis).unwrap_or_else(|| "-".into())) }
                div.n { "p99 " (p99.map(view::millis).unwrap_or_else(|| "-".into())) }
                div.note { (o.durations_ms.len()) " completions (at most the latest "
                    (crate::store::console::DURATION_SAMPLE) ")" }
            }
        }
        h2 { "Instances by orchestration, version and status" }
        p.note { "Counted at " (time(counted.at)) " UTC; counted again at most every "
            (super::counts::MAX_AGE.as_secs()) " s." }
        table #by-definition {
            tr { th { "orchestration" } th.num { "version" } th { "status" } th.num { "instances" } th { "" } }
            @for d in &counted.counts {
                tr {
                    td { (d.orchestration) }
                    td.num { (d.version) }
                    td { (status(d.status)) }
                    td.num { a href=(with_query("/instances", &[
                        ("orchestration", d.orchestration.clone()),
                        ("version", d.version.to_string()),
                        ("status", d.status.as_str().to_owned())])) { (d.count) } }
                    td { a href={ "/maps/" (d.orchestration) "/" (d.version) } { "map" } }
                }
            }
        }
    };
    view::page("/", "Overview", &viewer, body).into_response()
}

/// The instance list's query string: every filter, and the cursor.
#[derive(Debug, Default, Deserialize)]
pub struct ListQuery {
    #[serde(default)]
    orchestration: String,
    #[serde(default)]
    version: String,
    #[serde(default)]
    status: String,
    #[serde(default)]
    step: String,
    #[serde(default)]
    ckey: String,
    #[serde(default)]
    cvalue: String,
    #[serde(default)]
    from: String,
    #[serde(default)]
    to: String,
    #[serde(default)]
    error: String,
    #[serde(default)]
    after: String,
}

/// A time typed into a filter: RFC 3339, or `YYYY-MM-DD HH:MM[:SS]` / `YYYY-MM-DDTHH:MM` (a
/// browser's `datetime-local`) read as UTC, or a date.
fn parse_time(text: &str) -> Result<Option<DateTime<Utc>>, String> {
    let text = text.trim();
    if text.is_empty() {
        return Ok(None);
    }
    if let Ok(t) = DateTime::parse_from_rfc3339(text) {
        return Ok(Some(t.with_timezone(&Utc)));
    }
    for format in [
        "%Y-%m-%d %H:%M:%S",
        "%Y-%m-%dT%H:%M:%S",
        "%Y-%m-%d %H:%M",
        "%Y-%m-%dT%H:%M",
    ] {
        if let Ok(t) = NaiveDateTime::parse_from_str(text, format) {
            return Ok(Some(t.and_utc()));
        }
    }
    if let Ok(d) = chrono::NaiveDate::parse_from_str(text, "%Y-%m-%d") {
        return Ok(d.and_hms_opt(0, 0, 0).map(|t| t.and_utc()));
    }
    Err(format!(
        "{text:?} is not a time: write it as 2026-12-05 09:30 (UTC) or RFC 3339"
    ))
}

impl ListQuery {
    /// The filter and cursor, or what is wrong with them.
    fn parse(&self) -> Result<(InstanceFilter, Option<Cursor>), String> {
        let text = |s: &str| (!s.trim().is_empty()).then(|| s.trim().to_owned());
        let version = match self.version.trim() {
            "" => None,
            v => Some(
                v.parse::<u32>()
                    .map_err(|_| format!("version {v:?} is not a number"))?,
            ),
        };
        let status = match self.status.trim() {
            "" => None,
            s => Some(s.parse::<InstanceStatus>()?),
        };
        let correlation = match (text(&self.ckey), text(&self.cvalue)) {
            (Some(k), Some(v)) => Some((k, v)),
            (None, None) => None,
            _ => return Err("a correlation filter needs both its key and its value".to_owned()),
        };
        let after = match self.after.split_once('_') {
            Some((t, id)) => Some(Cursor {
                updated_at: DateTime::parse_from_rfc3339(t)
                    .map_err(|e| format!("the page cursor's time does not read: {e}"))?
                    .with_timezone(&Utc),
                id: id
                    .parse()
                    .map_err(|e| format!("the page cursor's id does not read: {e}"))?,
            }),
            None if self.after.is_empty() => None,
            None => return Err("the page cursor does not read; start from the first page".into()),
        };
        Ok((
            InstanceFilter {
                orchestration: text(&self.orchestration),
                version,
                status,
                step: text(&self.step),
                correlation,
                from: parse_time(&self.from)?,
                to: parse_time(&self.to)?,
                error: text(&self.error),
            },
            after,
        ))
    }

    /// The filters as query pairs (no cursor).
    fn pairs(&self) -> Vec<(&'static str, String)> {
        vec![
            ("orchestration", self.orchestration.clone()),
            ("version", self.version.clone()),
            ("status", self.status.clone()),
            ("step", self.step.clone()),
            ("ckey", self.ckey.clone()),
            ("cvalue", self.cvalue.clone()),
            ("from", self.from.clone()),
            ("to", self.to.clone()),
            ("error", self.error.clone()),
        ]
    }
}

/// GET `/instances`.
pub async fn instances(
    State(c): State<Shared>,
    headers: HeaderMap,
    Query(q): Query<ListQuery>,
) -> Response {
    list_page(c, headers, q, "/instances", "Instances").await
}

/// GET `/suspended`: the instance list of suspended instances, with their reasons.
pub async fn suspended(State(c): State<Shared>, headers: HeaderMap) -> Response {
    let q = ListQuery {
        status: "suspended".to_owned(),
        ..ListQuery::default()
    };
    list_page(c, headers, q, "/suspended", "Suspended instances").await
}

async fn list_page(
    c: Shared,
    headers: HeaderMap,
    q: ListQuery,
    path: &str,
    title: &str,
) -> Response {
    let viewer = c.viewer(&headers);
    let reads = match c.reads() {
        Ok(r) => r,
        Err(e) => return e,
    };
    let (filter, after) = match q.parse() {
        Ok(f) => f,
        Err(e) => return super::bad_request(&viewer, &e),
    };
    let page = match reads.instances(&filter, after, PAGE_ROWS).await {
        Ok(p) => p,
        Err(e) => return super::failed(&viewer, e),
    };
    let back = with_query(path, &q.pairs());
    let body = html! {
        @if path == "/instances" {
            (filters(&q))
        } @else {
            p.note { "Each was suspended with the reason shown; resume one to deliver again the messages it had received since its last persistence point." }
        }
        (instance_table(&page, &viewer, &back))
        @if let Some(next) = page.next {
            p { a #next-page href=(next_page(path, &q, next)) { "Next " (PAGE_ROWS) " →" } }
        }
        @if !q.after.is_empty() {
            p { a href=(with_query(path, &q.pairs())) { "← First page" } }
        }
    };
    view::page(path, title, &viewer, body).into_response()
}

/// The link to the page after `next`, with the same filters.
fn next_page(path: &str, q: &ListQuery, next: Cursor) -> String {
    let mut pairs = q.pairs();
    pairs.push((
        "after",
        format!("{}_{}", next.updated_at.to_rfc3339(), next.id),
    ));
    with_query(path, &pairs)
}

fn filters(q: &ListQuery) -> Markup {
    html! {
        form.filters method="get" action="/instances" {
            label { "orchestration" input name="orchestration" value=(q.orchestration) size="14"; }
            label { "version" input name="version" value=(q.version) size="3"; }
            label { "status"
                select name="status" {
                    option value="" { "any" }
                    @for s in ["running", "dehydrated", "suspended", "completed", "failed", "terminated"] {
                        option value=(s) selected[q.status == s] { (s) }
                    }
                }
            }
            label { "step" input name="step" value=(q.step) size="12"; }
            label { "correlation key" input name="ckey" value=(q.ckey) size="10"; }
            label { "value" input name="cvalue" value=(q.cvalue) size="14"; }
            label { "changed from (UTC)" input name="from" value=(q.from) placeholder="2026-12-05 09:00" size="16"; }
            label { "to" input name="to" value=(q.to) size="16"; }
            label { "error contains" input name="error" value=(q.error) size="14"; }
            button #filter type="submit" { "Filter" }
            a href="/instances" { "clear" }
        }
    }
}

/// The instance table with its bulk actions.
fn instance_table(page: &InstancePage, viewer: &Viewer, back: &str) -> Markup {
    instance_rows(&page.rows, viewer, back, true)
}

fn instance_rows(rows: &[InstanceSummary], viewer: &Viewer, back: &str, bulk: bool) -> Markup {
    html! {
        @if bulk {
            form #bulk method="post" action="/actions/instances" {
                (hidden(viewer, back))
                div.actions {
                    span.note { "selected:" }
                    button type="submit" name="action" value="resume" { "Resume" }
                    button.plain type="submit" name="action" value="suspend" { "Suspend" }
                    button.danger type="submit" name="action" value="terminate" data-confirm="Terminate the selected instances?" { "Terminate" }
                    input name="reason" placeholder="reason (suspend, terminate)" size="28";
                }
            }
        }
        table #instances {
            tr {
                @if bulk { th { input type="checkbox" data-select-all="bulk" title="select all"; } }
                th { "instance" } th { "orchestration" } th.num { "v" } th { "status" } th { "step" }
                th { "waiting for / last error" } th { "changed (UTC)" }
            }
            @for r in rows {
                tr data-id=(r.id) {
                    @if bulk { td { input type="checkbox" name="ids" value=(r.id) form="bulk"; } }
                    td { (instance_link(r.id)) }
                    td { (r.orchestration) }
                    td.num { (r.version) }
                    td.status { (status(r.status)) }
                    td { (r.step) }
                    td { (r.last_error.as_deref().unwrap_or(&r.waiting_for)) }
                    td.mono { (time(r.updated_at)) }
                }
            }
        }
        @if rows.is_empty() { p.note { "No instance matches." } }
    }
}

/// GET `/instances/{id}`.
pub async fn instance(
    State(c): State<Shared>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    let viewer = c.viewer(&headers);
    let Ok(id) = id.parse::<Uuid>() else {
        return super::bad_request(&viewer, &format!("{id:?} is not an instance id (a uuid)"));
    };
    let reads = match c.reads() {
        Ok(r) => r,
        Err(e) => return e,
    };
    let detail = match c.store.instance_detail(id).await {
        Ok(Some(d)) => d,
        Ok(None) => return super::not_found(&viewer, &format!("no instance {id}")),
        Err(e) => return super::failed(&viewer, e),
    };
    let waits = match reads.instance_waits(id).await {
        Ok(w) => w,
        Err(e) => return super::failed(&viewer, e),
    };
    let s = &detail.summary;
    let state = match &detail.state {
        Some(bytes) => match codec::to_json(bytes) {
            Ok(json) => serde_json::to_string_pretty(&json).unwrap_or_default(),
            Err(e) => format!("(the state does not decode: {e})"),
        },
        None => "(not started)".to_owned(),
    };
    let back = format!("/instances/{id}");
    let body = html! {
        div.grid2 {
            div {
                dl.kv #summary {
                    dt { "instance" } dd.mono { (s.id) }
                    dt { "orchestration" } dd { a href={ "/maps/" (s.orchestration) "/" (s.version) } { (s.orchestration) " v" (s.version) } }
                    dt { "status" } dd #status { (status(s.status)) }
                    dt { "step" } dd #step { (s.step) }
                    dt { "waiting for" } dd { @if s.waiting_for.is_empty() { "-" } @else { (s.waiting_for) } }
                    dt { "next timer" } dd { (time_opt(detail.next_timer_at)) }
                    dt { "last error" } dd #last-error { (s.last_error.as_deref().unwrap_or("-")) }
                    dt { "created" } dd.mono { (time(detail.created_at)) }
                    dt { "changed" } dd.mono { (time(s.updated_at)) }
                    dt { "parent" } dd { @if let Some(p) = waits.parent { (instance_link(p)) } @else { "-" } }
                }
                form #actions method="post" action="/actions/instances" {
                    (hidden(&viewer, &back))
                    input type="hidden" name="ids" value=(s.id);
                    div.actions {
                        @if s.status == InstanceStatus::Suspended {
                            button #resume type="submit" name="action" value="resume" { "Resume" }
                        }
                        @if !s.status.is_final() && s.status != InstanceStatus::Suspended {
                            button.plain #suspend type="submit" name="action" value="suspend" { "Suspend" }
                        }
                        @if !s.status.is_final() {
                            button.danger #terminate type="submit" name="action" value="terminate" data-confirm="Terminate this instance?" { "Terminate" }
                            input name="reason" placeholder="reason" size="24";
                        }
                    }
                }
                h2 { "Waits" }
                table #subscriptions {
                    tr { th { "receives" } th { "correlation" } }
                    @for (ty, corr) in &waits.subscriptions { tr { td { (ty) } td.mono { (corr) } } }
                    @for (name, due) in &waits.timers { tr { td { "timer " (name) } td.mono { "due " (time(*due)) } } }
                }
                @if waits.subscriptions.is_empty() && waits.timers.is_empty() { p.note { "Waits for nothing." } }
                h2 { "History" }
                ol.timeline #history {
                    @for h in &detail.history {
                        li {
                            b { (h.reason.as_str()) } " at " span.mono { (time(h.at)) }
                            " · step " (h.step) " · " (h.status.as_str())
                            @if let Some(d) = &h.detail { br; span.note { (d) } }
                        }
                    }
                }
            }
            div {
                h2 { "State" }
                pre #state { (state) }
                @if let Some(output) = &detail.output {
                    h2 { "Output" }
                    pre { (serde_json::to_string_pretty(output).unwrap_or_default()) }
                }
            }
        }
        h2 { "Messages" }
        table #messages {
            tr { th { "id" } th { "type" } th { "status" } th { "published" } th { "consumed" } }
            @for m in &waits.messages {
                tr { td.mono { (m.id) } td { (m.message_type) } td { (m.status) } td.mono { (time(m.published_at)) } td.mono { (time_opt(m.consumed_at)) } }
            }
        }
        h2 { "Sends" }
        table #sends {
            tr { th { "id" } th { "port" } th { "type" } th { "delivery" } th.num { "attempts" } th { "last error" } th { "delivered" } }
            @for sd in &waits.sends {
                tr { td.mono { (sd.id) } td { (sd.port) } td { (sd.message_type) } td { (sd.status) } td.num { (sd.attempts) }
                     td { (sd.last_error.as_deref().unwrap_or("")) } td.mono { (time_opt(sd.delivered_at)) } }
            }
        }
        @if !waits.children.is_empty() {
            h2 { "Children" }
            (instance_rows(&waits.children, &viewer, &back, false))
        }
    };
    view::page(
        "/instances",
        &format!("Instance {}", &id.to_string()[..8]),
        &viewer,
        body,
    )
    .into_response()
}

/// GET `/maps`: the orchestration versions there are maps of.
pub async fn maps(State(c): State<Shared>, headers: HeaderMap) -> Response {
    let viewer = c.viewer(&headers);
    let reads = match c.reads() {
        Ok(r) => r,
        Err(e) => return e,
    };
    let mut versions: std::collections::BTreeSet<(String, u32)> = c
        .registry
        .definitions()
        .map(|d| (d.name().to_owned(), d.version()))
        .collect();
    match reads.activations().await {
        Ok(a) => versions.extend(a),
        Err(e) => return super::failed(&viewer, e),
    }
    let body = html! {
        p.note { "The orchestration versions this console knows (registered in its build, or activated in the database). Another version: /maps/NAME/VERSION." }
        ul #maps {
            @for (name, version) in &versions {
                li { a href={ "/maps/" (name) "/" (version) } { (name) " v" (version) } }
            }
        }
    };
    view::page("/maps", "Maps", &viewer, body).into_response()
}

/// GET `/maps/{name}/{version}`.
pub async fn map_page(
    State(c): State<Shared>,
    headers: HeaderMap,
    Path((name, version)): Path<(String, u32)>,
) -> Response {
    let viewer = c.viewer(&headers);
    let reads = match c.reads() {
        Ok(r) => r,
        Err(e) => return e,
    };
    let data = match reads.map(&name, version).await {
        Ok(d) => d,
        Err(e) => return super::failed(&viewer, e),
    };
    let (steps, transitions) = c
        .registry
        .get(&name, version)
        .map(|d| (d.steps(), d.transitions()))
        .unwrap_or_default();
    let body = html! {
        p.note {
            "Steps as boxes with the instances at each now; arrows are the transitions seen in the latest "
            (crate::store::console::MAP_SAMPLE) " persistence points (with how many)"
            @if !transitions.is_empty() { ", dashed where only declared, red where not declared" }
            ". Click a step for its instances."
        }
        div #map { (map::svg(&name, version, &data, steps, transitions)) }
    };
    view::page("/maps", &format!("Map of {name} v{version}"), &viewer, body).into_response()
}

/// GET `/dead-letters`.
pub async fn dead_letters(State(c): State<Shared>, headers: HeaderMap) -> Response {
    let viewer = c.viewer(&headers);
    let rows = match c.store.dead_letters(LIST_LIMIT).await {
        Ok(r) => r,
        Err(e) => return super::failed(&viewer, e),
    };
    let body = html! {
        p.note { "Sends that ran out of attempts, messages that could never be read, inbox rows refused. Resubmit puts a send back in the outbox under the same id." }
        form #bulk method="post" action="/actions/dead-letters" {
            (hidden(&viewer, "/dead-letters"))
            div.actions {
                span.note { "selected:" }
                button type="submit" name="action" value="resubmit" { "Resubmit" }
                button.danger type="submit" name="action" value="purge" data-confirm="Delete the selected dead letters for good?" { "Purge" }
            }
        }
        table #dead-letters {
            tr { th { input type="checkbox" data-select-all="bulk"; } th { "id" } th { "instance" } th { "port" } th { "type" } th { "reason" } th.num { "attempts" } th { "dead at" } }
            @for d in &rows {
                tr {
                    td { input type="checkbox" name="ids" value=(d.id) form="bulk"; }
                    td.mono { (d.id) }
                    td { @if let Some(i) = d.instance_id { (instance_link(i)) } }
                    td { (d.port.as_deref().unwrap_or("")) }
                    td { (d.message_type) }
                    td { (d.reason) }
                    td.num { (d.attempts) }
                    td.mono { (time(d.dead_at)) }
                }
            }
        }
        @if rows.is_empty() { p.note { "No dead letters." } }
    };
    view::page("/dead-letters", "Dead letters", &viewer, body).into_response()
}

/// GET `/messages`: unrouted and zombie messages.
pub async fn messages(State(c): State<Shared>, headers: HeaderMap) -> Response {
    let viewer = c.viewer(&headers);
    let reads = match c.reads() {
        Ok(r) => r,
        Err(e) => return e,
    };
    let (unrouted, zombies) =
        match tokio::try_join!(reads.messages("unrouted"), reads.messages("zombie")) {
            Ok(both) => both,
            Err(e) => return super::failed(&viewer, e),
        };
    let table = |rows: &[crate::store::console::MessageRow], id: &str, what: &str| {
        html! {
            table id=(id) {
                tr { th { "id" } th { "type" } th { "properties" } th { "instance" } th { "reason" } th { "published" } }
                @for m in rows {
                    tr {
                        td.mono { (m.id) } td { (m.message_type) } td.mono { (m.properties) }
                        td { @if let Some(i) = m.instance_id { (instance_link(i)) } }
                        td { (m.reason.as_deref().unwrap_or("")) } td.mono { (time(m.published_at)) }
                    }
                }
            }
            @if rows.is_empty() { p.note { "No " (what) " messages." } }
        }
    };
    let body = html! {
        h2 { "Unrouted" }
        p.note { "No subscription matched them yet. Each is routed as soon as a matching receive appears, or dead-lettered after the host's --unrouted-ttl-s." }
        (table(&unrouted, "unrouted", "unrouted"))
        h2 { "Zombies" }
        p.note { "They arrived for an instance that had already ended: kept, named, never consumed. Nothing to do but look." }
        (table(&zombies, "zombies", "zombie"))
    };
    view::page("/messages", "Unrouted and zombie messages", &viewer, body).into_response()
}

/// GET `/held`: sends an ordered port holds.
pub async fn held(State(c): State<Shared>, headers: HeaderMap) -> Response {
    let viewer = c.viewer(&headers);
    let reads = match c.reads() {
        Ok(r) => r,
        Err(e) => return e,
    };
    let rows = match reads.held_sends().await {
        Ok(r) => r,
        Err(e) => return super::failed(&viewer, e),
    };
    let body = html! {
        p.note { "An ordered port stops on a send that failed every attempt, and holds the sends behind it. Resume it (attempts reset) or dead-letter it to let the port go on." }
        form #bulk method="post" action="/actions/sends" {
            (hidden(&viewer, "/held"))
            div.actions {
                span.note { "selected:" }
                button type="submit" name="action" value="resume" { "Resume" }
                button.danger type="submit" name="action" value="dead-letter" data-confirm="Dead-letter the selected sends?" { "Dead-letter" }
                input name="reason" placeholder="reason (dead-letter)" size="24";
            }
        }
        table #held {
            tr { th { input type="checkbox" data-select-all="bulk"; } th { "port" } th { "send" } th { "instance" } th { "type" } th.num { "attempts" } th { "last error" } }
            @for s in &rows {
                tr {
                    td { input type="checkbox" name="ids" value=(s.id) form="bulk"; }
                    td { (s.port) } td.mono { (s.id) } td { (instance_link(s.instance_id)) }
                    td { (s.message_type) } td.num { (s.attempts) } td { (s.last_error.as_deref().unwrap_or("")) }
                }
            }
        }
        @if rows.is_empty() { p.note { "No port holds a send." } }
    };
    view::page("/held", "Held ports", &viewer, body).into_response()
}

/// GET `/hosts`.
pub async fn hosts(State(c): State<Shared>, headers: HeaderMap) -> Response {
    let viewer = c.viewer(&headers);
    let reads = match c.reads() {
        Ok(r) => r,
        Err(e) => return e,
    };
    let rows = match reads.hosts().await {
        Ok(r) => r,
        Err(e) => return super::failed(&viewer, e),
    };
    let now = Utc::now();
    let body = html! {
        p.note { "A host that stopped beating loses its instances to the others once their leases expire (PostgreSQL); a SQLite file serves one host." }
        table #hosts {
            tr { th { "host" } th { "name" } th.num { "pid" } th { "started" } th { "last heartbeat" } th { "state" } th.num { "instances owned" } }
            @for h in &rows {
                tr {
                    td.mono { (h.id) } td { (h.name) } td.num { (h.pid) } td.mono { (time(h.started_at)) }
                    td.mono { (time(h.heartbeat_at)) }
                    td {
                        @if let Some(t) = h.stopped_at { "stopped " (time(t)) }
                        @else if now - h.heartbeat_at > chrono::Duration::minutes(2) { "silent: presumed gone" }
                        @else { "live" }
                    }
                    td.num { (h.owned) }
                }
            }
        }
        @if rows.is_empty() { p.note { "No host has run on this database." } }
    };
    view::page("/hosts", "Hosts", &viewer, body).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filter_times_read_as_utc_in_the_forms_people_type() {
        let t = parse_time("2026-12-05 09:30")
            .expect("reads")
            .expect("some");
        assert_eq!(t.to_rfc3339(), "2026-12-05T09:30:00+00:00");
        assert!(parse_time("yesterday").is_err());
        assert_eq!(parse_time("").expect("empty"), None);
    }

    #[test]
    fn a_correlation_filter_needs_key_and_value() {
        let q = ListQuery {
            ckey: "order_id".into(),
            ..ListQuery::default()
        };
        assert!(q.parse().is_err());
    }
}
