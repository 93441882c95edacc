//! The map of an orchestration version, drawn as SVG: its steps as boxes, the transitions seen in
//! recent history (and those it declares, [`Orchestration::TRANSITIONS`](crate::Orchestration::TRANSITIONS))
//! as arrows, and how many instances are at each step now. Each step links to the instances there.
//!
//! The layout is by layers: a step's column is its distance from the start along the
//! transitions (breadth first), so that a map reads left to right; steps no transition reaches
//! go in a last column.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use maud::{html, Markup};

use super::view::with_query;
use crate::store::console::{MapData, MAP_START};
use crate::store::InstanceStatus;

const NODE_W: usize = 170;
const NODE_H: usize = 46;
const COL_GAP: usize = 80;
const ROW_GAP: usize = 26;
const MARGIN: usize = 16;

/// The ends of a map: the statuses a final point goes to.
const ENDS: &[&str] = &["completed", "failed", "terminated"];

/// What the map draws: every step, each transition with whether it was seen and declared.
#[derive(Debug, Default, PartialEq)]
pub struct Layout {
    /// Step name to (column, row).
    pub at: BTreeMap<String, (usize, usize)>,
    /// (from, to) to (times seen recently, declared).
    pub edges: BTreeMap<(String, String), (i64, bool)>,
}

/// Lays out the map of `data`, completed by the declared `steps` and `transitions`.
pub fn layout(
    data: &MapData,
    steps: &[&'static str],
    transitions: &[(&'static str, &'static str)],
) -> Layout {
    let mut edges: BTreeMap<(String, String), (i64, bool)> = BTreeMap::new();
    for (from, to, n) in &data.transitions {
        edges.entry((from.clone(), to.clone())).or_default().0 += n;
    }
    for (from, to) in transitions {
        edges
            .entry(((*from).to_owned(), (*to).to_owned()))
            .or_default()
            .1 = true;
    }
    let mut nodes: BTreeSet<String> = BTreeSet::new();
    nodes.insert(MAP_START.to_owned());
    nodes.extend(steps.iter().map(|s| (*s).to_owned()));
    nodes.extend(data.by_step.iter().map(|(s, _, _)| s.clone()));
    for (from, to) in edges.keys() {
        nodes.insert(from.clone());
        nodes.insert(to.clone());
    }
    // Steps an instance sits at without a recorded way in start from the start.
    let mut next: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for (from, to) in edges.keys() {
        next.entry(from.as_str()).or_default().push(to.as_str());
    }
    let mut column: BTreeMap<&str, usize> = BTreeMap::new();
    let mut queue = VecDeque::from([(MAP_START, 0usize)]);
    while let Some((node, depth)) = queue.pop_front() {
        if column.contains_key(node) {
            continue;
        }
        column.insert(node, depth);
        for to in next.get(node).into_iter().flatten() {
            queue.push_back((to, depth + 1));
        }
    }
    let last = column.values().copied().max().unwrap_or(0) + 1;
    let mut rows: BTreeMap<usize, usize> = BTreeMap::new();
    let mut at = BTreeMap::new();
    // Declared steps first in their declared order, then the others by name; ends last.
    let mut ordered: Vec<&String> = Vec::new();
    for s in steps {
        if let Some(n) = nodes.get(*s) {
            ordered.push(n);
        }
    }
    for n in &nodes {
        if !ordered.contains(&n) && !ENDS.contains(&n.as_str()) {
            ordered.push(n);
        }
    }
    for n in &nodes {
        if ENDS.contains(&n.as_str()) {
            ordered.push(n);
        }
    }
    for n in ordered {
        let col = if ENDS.contains(&n.as_str()) {
            column.values().copied().max().unwrap_or(0).max(1)
        } else {
            column.get(n.as_str()).copied().unwrap_or(last)
        };
        let row = rows.entry(col).or_default();
        at.insert(n.clone(), (col, *row));
        *row += 1;
    }
    Layout { at, edges }
}

fn xy(col: usize, row: usize) -> (usize, usize) {
    (
        MARGIN + col * (NODE_W + COL_GAP),
        MARGIN + row * (NODE_H + ROW_GAP),
    )
}

/// The map as SVG, each step a link to its instances (`orchestration`, `version`, `step`).
pub fn svg(
    orchestration: &str,
    version: u32,
    data: &MapData,
    steps: &[&'static str],
    transitions: &[(&'static str, &'static str)],
) -> Markup {
    let layout = layout(data, steps, transitions);
    let declared = !transitions.is_empty();
    let mut waiting: BTreeMap<&str, (i64, i64)> = BTreeMap::new();
    for (step, status, n) in &data.by_step {
        let w = waiting.entry(step.as_str()).or_default();
        match status {
            InstanceStatus::Suspended => w.1 += n,
            s if !s.is_final() => w.0 += n,
            _ => {}
        }
    }
    let cols = layout.at.values().map(|(c, _)| *c).max().unwrap_or(0) + 1;
    let rows = layout.at.values().map(|(_, r)| *r).max().unwrap_or(0) + 1;
    let width = 2 * MARGIN + cols * NODE_W + (cols - 1) * COL_GAP;
    let height = 2 * MARGIN + rows * NODE_H + (rows - 1) * ROW_GAP + 20;
    html! {
        svg.map xmlns="http://www.w3.org/2000/svg" width=(width) height=(height)
            viewBox={ "0 0 " (width) " " (height) } role="img" aria-label={ "map of " (orchestration) } {
            defs {
                marker id="arrow" viewBox="0 0 10 10" refX="10" refY="5" markerWidth="7" markerHeight="7" orient="auto-start-reverse" {
                    path d="M 0 0 L 10 5 L 0 10 z" style="fill:#8a93a6;stroke:none" {}
                }
            }
            @for ((from, to), (seen, is_declared)) in &layout.edges {
                @if let (Some(&(fc, fr)), Some(&(tc, tr))) = (layout.at.get(from), layout.at.get(to)) {
                    @let (fx, fy) = xy(fc, fr);
                    @let (tx, ty) = xy(tc, tr);
                    @let (x1, y1) = (fx + NODE_W, fy + NODE_H / 2);
                    @let (x2, y2) = if tc > fc { (tx, ty + NODE_H / 2) } else { (tx + NODE_W / 2, ty + NODE_H) };
                    @let bend = if tc > fc { (x1 + x2) / 2 } else { x1 + COL_GAP / 2 };
                    @let class = if *seen == 0 { "declared" } else if declared && !is_declared { "undeclared" } else { "" };
                    path class=(class) marker-end="url(#arrow)"
                        d={ "M " (x1) " " (y1) " C " (bend) " " (y1) ", " (bend) " " (y2) ", " (x2) " " (y2) } {
                        title { (from) " → " (to) ": " (seen) " seen recently" @if *is_declared { ", declared" } }
                    }
                    @if *seen > 0 {
                        text.edge x=(bend + 3) y=((y1 + y2) / 2 - 3) { (seen) }
                    }
                }
            }
            @for (step, (col, row)) in &layout.at {
                @let (x, y) = xy(*col, *row);
                @let kind = if step == MAP_START { "node start" } else if ENDS.contains(&step.as_str()) { "node end" } else { "node" };
                @let (active, suspended) = waiting.get(step.as_str()).copied().unwrap_or_default();
                @let href = if ENDS.contains(&step.as_str()) {
                    with_query("/instances", &[("orchestration", orchestration.to_owned()), ("version", version.to_string()), ("status", step.clone())])
                } else {
                    with_query("/instances", &[("orchestration", orchestration.to_owned()), ("version", version.to_string()), ("step", step.clone())])
                };
                a href=(href) class=(kind) data-step=(step) {
                    rect x=(x) y=(y) width=(NODE_W) height=(NODE_H) {}
                    text x=(x + 8) y=(y + 18) { (step) }
                    @if step != MAP_START && !ENDS.contains(&step.as_str()) {
                        text.count x=(x + 8) y=(y + 36) {
                            (active) " waiting"
                            @if suspended > 0 { " · " (suspended) " suspended" }
                        }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data() -> MapData {
        MapData {
            by_step: vec![("Waiting".into(), InstanceStatus::Dehydrated, 3)],
            transitions: vec![
                (MAP_START.into(), "Received".into(), 5),
                ("Received".into(), "Waiting".into(), 4),
                ("Waiting".into(), "completed".into(), 2),
            ],
        }
    }

    #[test]
    fn steps_are_laid_out_left_to_right_from_the_start() {
        let l = layout(&data(), &[], &[]);
        assert_eq!(l.at[MAP_START].0, 0);
        assert_eq!(l.at["Received"].0, 1);
        assert_eq!(l.at["Waiting"].0, 2);
        assert_eq!(l.at["completed"].0, 3);
    }

    #[test]
    fn declared_transitions_complete_the_map_and_are_marked() {
        let l = layout(
            &data(),
            &["Received", "Waiting", "Cancelled"],
            &[("Waiting", "Cancelled")],
        );
        assert_eq!(l.edges[&("Waiting".into(), "Cancelled".into())], (0, true));
        assert_eq!(l.edges[&("Received".into(), "Waiting".into())], (4, false));
        assert!(l.at.contains_key("Cancelled"));
    }
}
