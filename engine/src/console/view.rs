//! The console's look: the page layout with its navigation, the stylesheet and the little
//! script (served as files, so that the Content-Security-Policy allows nothing inline), and the
//! small pieces pages share (status badges, times, links, bar charts).

use axum::response::Html;
use chrono::{DateTime, Utc};
use maud::{html, Markup, DOCTYPE};

use crate::store::InstanceStatus;

/// The stylesheet, `/console.css`.
pub const CSS: &str = r#"
*{box-sizing:border-box}
body{margin:0;font:14px/1.4 system-ui,-apple-system,"Segoe UI",sans-serif;color:#1d2330;background:#f5f6f8}
header{background:#1d2330;color:#fff;padding:0 16px;display:flex;align-items:center;gap:18px;flex-wrap:wrap}
header .brand{font-weight:700;font-size:16px;padding:10px 0}
header nav a{color:#c9d1e0;text-decoration:none;padding:12px 6px;display:inline-block}
header nav a.on{color:#fff;border-bottom:3px solid #6ea8fe}
header .who{margin-left:auto;font-size:12px;color:#c9d1e0}
header .who a{color:#fff}
main{padding:16px;max-width:1400px}
h1{font-size:20px;margin:4px 0 12px}
h2{font-size:16px;margin:20px 0 8px}
table{border-collapse:collapse;background:#fff;width:100%;margin-bottom:12px}
th,td{border-bottom:1px solid #e3e6ec;padding:5px 8px;text-align:left;vertical-align:top}
th{background:#eef0f4;font-weight:600;font-size:12px;text-transform:uppercase;color:#545b6a}
td.num,th.num{text-align:right}
code,pre,.mono{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:12px}
pre{background:#fff;border:1px solid #e3e6ec;padding:10px;overflow:auto;max-height:480px}
.badge{display:inline-block;padding:1px 8px;border-radius:10px;font-size:12px;font-weight:600;background:#e3e6ec}
.s-running{background:#d7e8ff;color:#0a4fb3}.s-dehydrated{background:#e6e0ff;color:#4b2fb3}
.s-suspended{background:#ffe3c2;color:#8a4a00}.s-completed{background:#d3f5dc;color:#10662b}
.s-failed{background:#ffd6d6;color:#a30d0d}.s-terminated{background:#e3e6ec;color:#545b6a}
.cards{display:flex;gap:12px;flex-wrap:wrap;margin-bottom:12px}
.card{background:#fff;border:1px solid #e3e6ec;border-radius:6px;padding:10px 14px;min-width:150px}
.card .n{font-size:24px;font-weight:700}.card a{text-decoration:none;color:inherit}
.card.warn .n{color:#a30d0d}
form.filters{display:flex;gap:8px;flex-wrap:wrap;align-items:end;background:#fff;padding:10px;border:1px solid #e3e6ec;margin-bottom:10px}
form.filters label{display:flex;flex-direction:column;font-size:12px;color:#545b6a}
input,select,button{font:inherit;padding:4px 6px}
button{background:#0a4fb3;color:#fff;border:0;border-radius:4px;padding:5px 12px;cursor:pointer}
button.danger{background:#a30d0d}button.plain{background:#545b6a}
.actions{display:flex;gap:8px;align-items:center;flex-wrap:wrap;margin:8px 0}
.note{color:#545b6a;font-size:12px}
.flash{background:#fff7d6;border:1px solid #e8d27a;padding:8px 12px;margin-bottom:12px}
.refused{background:#ffd6d6;border:1px solid #e08a8a;padding:8px 12px;margin-bottom:12px}
.grid2{display:grid;grid-template-columns:1fr 1fr;gap:16px}
dl.kv{display:grid;grid-template-columns:140px 1fr;gap:4px 12px;background:#fff;padding:10px;border:1px solid #e3e6ec;margin:0}
dl.kv dt{color:#545b6a}dl.kv dd{margin:0}
.timeline{list-style:none;padding:0;margin:0;border-left:3px solid #c9d1e0}
.timeline li{padding:4px 0 8px 12px;position:relative}
.timeline li:before{content:"";position:absolute;left:-8px;top:9px;width:12px;height:12px;border-radius:6px;background:#6ea8fe}
svg.chart rect{fill:#6ea8fe}svg.chart text{font-size:10px;fill:#545b6a}
svg.map .node rect{fill:#fff;stroke:#6ea8fe;stroke-width:2;rx:6}
svg.map .node.end rect{stroke:#10662b}svg.map .node.start rect{stroke:#545b6a}
svg.map .node:hover rect{fill:#eef4ff}
svg.map text{font-size:12px;fill:#1d2330}svg.map text.count{fill:#8a4a00;font-weight:600}
svg.map path{fill:none;stroke:#8a93a6;stroke-width:1.5}
svg.map path.declared{stroke-dasharray:5 4}svg.map path.undeclared{stroke:#a30d0d}
svg.map text.edge{font-size:10px;fill:#545b6a}
a{color:#0a4fb3}
"#;

/// The script, `/console.js`: "select all" for the bulk checkboxes, and a confirmation before
/// a destructive action.
pub const JS: &str = r#"
document.addEventListener('change', function (e) {
  if (e.target.matches('input[data-select-all]')) {
    document.querySelectorAll('input[name=ids][form="' + e.target.dataset.selectAll + '"]')
      .forEach(function (box) { box.checked = e.target.checked; });
  }
});
document.addEventListener('submit', function (e) {
  var button = e.submitter;
  if (button && button.dataset.confirm && !window.confirm(button.dataset.confirm)) {
    e.preventDefault();
  }
});
"#;

/// The pages in the navigation: path and title.
const NAV: &[(&str, &str)] = &[
    ("/", "Overview"),
    ("/instances", "Instances"),
    ("/maps", "Maps"),
    ("/suspended", "Suspended"),
    ("/dead-letters", "Dead letters"),
    ("/messages", "Unrouted & zombies"),
    ("/held", "Held ports"),
    ("/hosts", "Hosts"),
];

/// Whether the viewer may act, for the layout's corner.
#[derive(Debug, Clone)]
pub struct Viewer {
    /// The session's CSRF token, when signed in.
    pub csrf: Option<String>,
    /// Whether the console takes actions at all.
    pub has_token: bool,
}

/// A whole page: navigation (with `active` marked), `title`, and `body`.
pub fn page(active: &str, title: &str, viewer: &Viewer, body: Markup) -> Html<String> {
    let page = html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { (title) " · Cairn console" }
                link rel="stylesheet" href="/console.css";
                script src="/console.js" defer {}
            }
            body {
                header {
                    span.brand { "Cairn" }
                    nav {
                        @for (path, name) in NAV {
                            a href=(path) class=[(*path == active).then_some("on")] { (name) }
                        }
                    }
                    span.who {
                        @if viewer.csrf.is_some() {
                            "signed in · "
                            form method="post" action="/logout" style="display:inline" {
                                button.plain type="submit" { "Sign out" }
                            }
                        } @else if viewer.has_token {
                            "read-only · " a href="/login" { "Sign in to act" }
                        } @else {
                            "read-only (no --console-token)"
                        }
                    }
                }
                main {
                    h1 { (title) }
                    (body)
                }
            }
        }
    };
    Html(page.into_string())
}

/// An instance status as a coloured badge.
pub fn status(s: InstanceStatus) -> Markup {
    html! { span class={ "badge s-" (s.as_str()) } { (s.as_str()) } }
}

/// A time as the console shows it (UTC, to the second).
pub fn time(t: DateTime<Utc>) -> String {
    t.format("%Y-%m-%d %H:%M:%S").to_string()
}

/// An optional time.
pub fn time_opt(t: Option<DateTime<Utc>>) -> String {
    t.map(time).unwrap_or_default()
}

/// A link to an instance, showing the start of its id.
pub fn instance_link(id: uuid::Uuid) -> Markup {
    let text = id.to_string();
    html! { a.mono href={ "/instances/" (text) } title=(text) { (&text[..8]) "…" } }
}

/// A path with its query string (`pairs` with empty values left out).
pub fn with_query(path: &str, pairs: &[(&str, String)]) -> String {
    let mut q = url::form_urlencoded::Serializer::new(String::new());
    for (k, v) in pairs.iter().filter(|(_, v)| !v.is_empty()) {
        q.append_pair(k, v);
    }
    let q = q.finish();
    if q.is_empty() {
        path.to_owned()
    } else {
        format!("{path}?{q}")
    }
}

/// A bar chart of counts per minute over the last hour: 60 bars, the newest on the right.
pub fn per_minute_chart(now: DateTime<Utc>, counts: &[(String, i64)], label: &str) -> Markup {
    let by_minute: std::collections::HashMap<&str, i64> =
        counts.iter().map(|(m, n)| (m.as_str(), *n)).collect();
    let bars: Vec<i64> = (0..60)
        .rev()
        .map(|ago| {
            let minute = (now - chrono::Duration::minutes(ago))
                .format("%Y-%m-%dT%H:%M")
                .to_string();
            by_minute.get(minute.as_str()).copied().unwrap_or(0)
        })
        .collect();
    let max = bars.iter().copied().max().unwrap_or(0).max(1);
    let total: i64 = bars.iter().sum();
    let per_second = total as f64 / 3600.0;
    html! {
        div.card {
            div.note { (label) " · last hour" }
            div.n { (format!("{per_second:.2}")) "/s" }
            svg.chart width="300" height="60" viewBox="0 0 300 60" role="img" aria-label=(label) {
                @for (i, n) in bars.iter().enumerate() {
                    @let h = (*n as f64 / max as f64 * 50.0).round();
                    rect x=(i * 5) y=(55.0 - h) width="4" height=(h) {
                        title { (n) }
                    }
                }
                text x="0" y="60" { "-60 min" }
                text x="270" y="60" { "now" }
            }
        }
    }
}

/// The `p`-th percentile (0-100) of sorted values.
pub fn percentile(sorted: &[i64], p: usize) -> Option<i64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = (sorted.len() * p).div_ceil(100).clamp(1, sorted.len());
    Some(sorted[rank - 1])
}

/// Milliseconds in words.
pub fn millis(ms: i64) -> String {
    match ms {
        ms if ms < 1000 => format!("{ms} ms"),
        ms if ms < 60_000 => format!("{:.1} s", ms as f64 / 1000.0),
        ms if ms < 3_600_000 => format!("{:.1} min", ms as f64 / 60_000.0),
        ms => format!("{:.1} h", ms as f64 / 3_600_000.0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_take_the_value_at_their_rank() {
        let v: Vec<i64> = (1..=100).collect();
        assert_eq!(percentile(&v, 50), Some(50));
        assert_eq!(percentile(&v, 99), Some(99));
        assert_eq!(percentile(&[7], 99), Some(7));
        assert_eq!(percentile(&[], 50), None);
    }

    #[test]
    fn a_query_string_leaves_out_empty_fields_and_escapes_the_rest() {
        assert_eq!(
            with_query(
                "/instances",
                &[("status", "".into()), ("step", "A&B".into())]
            ),
            "/instances?step=A%26B"
        );
    }
}
