//! The code examples of `README.md` and `docs/` cannot drift from the code.
//!
//! Every ` ```rust ` block there is one of two kinds:
//!
//! * a whole example: compiled and run as a doc test of the `orchestrations` crate, which includes
//!   every page (`doc_examples` in `orchestrations/src/lib.rs`, under `cfg(doctest)`), so
//!   `cargo test --workspace --doc` runs it;
//! * an excerpt of code that is compiled and tested elsewhere (a sample, a test): fenced
//!   ` ```rust,ignore ` with `<!-- excerpt: PATH -->` on the line before, and found here, verbatim
//!   (indentation aside), in that file.
//!
//! The tests below check both: each page is included for the doc tests, and each excerpt is still
//! in its file. No database is involved.

use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the orchestrations crate sits in the workspace")
        .to_path_buf()
}

/// README.md and every page in docs/.
fn pages() -> Vec<PathBuf> {
    let mut pages = vec![root().join("README.md")];
    let mut docs: Vec<PathBuf> = std::fs::read_dir(root().join("docs"))
        .expect("docs/ is readable")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "md"))
        .collect();
    docs.sort();
    pages.extend(docs);
    pages
}

/// A fenced rust block: its info string, the line before its fence, its lines, where it starts.
struct Block {
    info: String,
    before: String,
    lines: Vec<String>,
    line: usize,
}

fn rust_blocks(text: &str) -> Vec<Block> {
    let mut out = Vec::new();
    let lines: Vec<&str> = text.lines().collect();
    let mut i = 0;
    while i < lines.len() {
        let Some(info) = lines[i].trim_start().strip_prefix("```") else {
            i += 1;
            continue;
        };
        let start = i;
        let mut body = Vec::new();
        i += 1;
        while i < lines.len() && !lines[i].trim_start().starts_with("```") {
            body.push(lines[i].to_owned());
            i += 1;
        }
        i += 1;
        if info.trim().starts_with("rust") {
            out.push(Block {
                info: info.trim().to_owned(),
                before: start
                    .checked_sub(1)
                    .map_or(String::new(), |b| lines[b].trim().to_owned()),
                lines: body,
                line: start + 1,
            });
        }
    }
    out
}

fn normalised(lines: &[String]) -> Vec<String> {
    lines
        .iter()
        .map(|l| l.trim().to_owned())
        .filter(|l| !l.is_empty())
        .collect()
}

#[test]
fn every_page_with_rust_examples_is_compiled_as_doc_tests() {
    let lib = std::fs::read_to_string(root().join("orchestrations/src/lib.rs"))
        .expect("orchestrations/src/lib.rs is readable");
    let mut missing = Vec::new();
    for page in pages() {
        let text = std::fs::read_to_string(&page).expect("a page is readable");
        if rust_blocks(&text).is_empty() {
            continue;
        }
        let rel = page
            .strip_prefix(root())
            .expect("under the root")
            .display()
            .to_string();
        if !lib.contains(&format!("include_str!(\"../../{rel}\")")) {
            missing.push(rel);
        }
    }
    assert!(
        missing.is_empty(),
        "these pages have rust examples but are not included in `doc_examples` \
         (orchestrations/src/lib.rs), so their examples are not compiled: {missing:?}"
    );
}

#[test]
fn every_rust_example_is_a_doc_test_or_a_verbatim_excerpt() {
    let mut problems = Vec::new();
    let mut excerpts = 0;
    let mut whole = 0;
    for page in pages() {
        let text = std::fs::read_to_string(&page).expect("a page is readable");
        let name = page
            .strip_prefix(root())
            .expect("under the root")
            .display()
            .to_string();
        for block in rust_blocks(&text) {
            let at = format!("{name}:{}", block.line);
            let excerpt_of = block
                .before
                .strip_prefix("<!-- excerpt:")
                .and_then(|r| r.strip_suffix("-->"))
                .map(|p| p.trim().to_owned());
            match (block.info.as_str(), excerpt_of) {
                ("rust", None) => whole += 1,
                ("rust,ignore", Some(path)) => {
                    excerpts += 1;
                    let Ok(source) = std::fs::read_to_string(root().join(&path)) else {
                        problems.push(format!("{at}: excerpt of {path}, which does not exist"));
                        continue;
                    };
                    let source: Vec<String> =
                        normalised(&source.lines().map(str::to_owned).collect::<Vec<_>>());
                    let wanted = normalised(&block.lines);
                    if !source.windows(wanted.len()).any(|w| w == wanted.as_slice()) {
                        problems.push(format!(
                            "{at}: the excerpt is no longer in {path}; copy the code again"
                        ));
                    }
                }
                (info, Some(_)) => problems.push(format!(
                    "{at}: an excerpt is fenced `rust,ignore`, not `{info}`"
                )),
                (info, None) => problems.push(format!(
                    "{at}: `{info}` is neither a doc test (`rust`) nor an excerpt \
                     (`<!-- excerpt: PATH -->` then `rust,ignore`)"
                )),
            }
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
    assert!(
        whole > 0 && excerpts > 0,
        "{whole} doc tests, {excerpts} excerpts"
    );
}
