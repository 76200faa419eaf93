//! The modules' structure, held by a test: no cycle among the operator's top-level modules
//! (`src/<module>.rs`, `src/<module>/`), nor among the sidecar crate's (`byok-proxy/src/`).
//! A cycle means two modules that cannot be understood, tested or moved one without the
//! other; the start-up module (`serve`) is the one place that wires the parts together.
//!
//! The edges are the `crate::`/`super::` paths of non-test code: each file up to its
//! `#[cfg(test)]` module (tests may reach anywhere), without comments.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Every `.rs` file under `dir`.
fn rust_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d)
            .expect("readable source dir")
            .flatten()
        {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                out.push(path);
            }
        }
    }
    out.sort();
    out
}

/// The file's code without its test module and without comments.
fn non_test_code(source: &str) -> String {
    let code = match source.find("#[cfg(test)]\nmod tests") {
        Some(at) => &source[..at],
        None => source,
    };
    code.lines()
        .map(|l| match l.find("//") {
            // A `//` inside a string (a URL) is rare in paths' lines; cutting there only
            // loses text after it, never adds an edge.
            Some(at) => &l[..at],
            None => l,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// The first segments of every `prefix` path in `code`: `crate::a::b` gives `a`,
/// `crate::{a, b::c}` gives `a` and `b`.
fn first_segments(code: &str, prefix: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let ident = |s: &str| -> String {
        s.trim_start()
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect()
    };
    for (at, _) in code.match_indices(prefix) {
        // Not the tail of a longer path (`foo::crate::` is not a thing, but `xsuper::` could be).
        let before = code[..at].chars().next_back();
        if before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_') {
            continue;
        }
        let rest = &code[at + prefix.len()..];
        if let Some(group) = rest.strip_prefix('{') {
            // Items of a group at depth 1: `a`, `b::c`, `d::{e, f}`.
            let mut depth = 1;
            let mut item_start = true;
            for (i, c) in group.char_indices() {
                match c {
                    '{' => depth += 1,
                    '}' => {
                        depth -= 1;
                        if depth == 0 {
                            break;
                        }
                    }
                    ',' if depth == 1 => item_start = true,
                    _ if item_start && !c.is_whitespace() => {
                        item_start = false;
                        let name = ident(&group[i..]);
                        if !name.is_empty() {
                            out.insert(name);
                        }
                    }
                    _ => {}
                }
            }
        } else {
            let name = ident(rest);
            if !name.is_empty() {
                out.insert(name);
            }
        }
    }
    out
}

/// The top-level module a file under `src` belongs to.
fn module_of(src: &Path, file: &Path) -> String {
    let rel = file.strip_prefix(src).expect("under src");
    let first = rel
        .components()
        .next()
        .map(|c| c.as_os_str().to_string_lossy().to_string())
        .unwrap_or_default();
    first.trim_end_matches(".rs").to_owned()
}

/// Edges between the top-level modules of the crate at `src` (`lib.rs` and `main.rs` are not
/// modules). `super::` from a top-level module's own file is the crate root.
fn module_graph(src: &Path) -> BTreeMap<String, BTreeSet<String>> {
    let files = rust_files(src);
    let modules: BTreeSet<String> = files
        .iter()
        .map(|f| module_of(src, f))
        .filter(|m| m != "lib" && m != "main")
        .collect();
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for file in &files {
        let from = module_of(src, file);
        if !modules.contains(&from) {
            continue;
        }
        let code = non_test_code(&std::fs::read_to_string(file).expect("readable"));
        let mut targets = first_segments(&code, "crate::");
        let top_level_file = file.parent() == Some(src);
        if top_level_file {
            targets.extend(first_segments(&code, "super::"));
        }
        let entry = graph.entry(from.clone()).or_default();
        for to in targets {
            if to != from && modules.contains(&to) {
                entry.insert(to);
            }
        }
    }
    graph
}

/// One cycle of `graph`, if any, as the path around it.
fn find_cycle(graph: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    #[derive(Clone, Copy, PartialEq)]
    enum Mark {
        Open,
        Done,
    }
    fn visit(
        node: &str,
        graph: &BTreeMap<String, BTreeSet<String>>,
        marks: &mut BTreeMap<String, Mark>,
        path: &mut Vec<String>,
    ) -> Option<Vec<String>> {
        match marks.get(node) {
            Some(Mark::Done) => return None,
            Some(Mark::Open) => {
                let start = path.iter().position(|n| n == node).unwrap_or(0);
                let mut cycle = path[start..].to_vec();
                cycle.push(node.to_owned());
                return Some(cycle);
            }
            None => {}
        }
        marks.insert(node.to_owned(), Mark::Open);
        path.push(node.to_owned());
        for next in graph.get(node).into_iter().flatten() {
            if let Some(cycle) = visit(next, graph, marks, path) {
                return Some(cycle);
            }
        }
        path.pop();
        marks.insert(node.to_owned(), Mark::Done);
        None
    }
    let mut marks = BTreeMap::new();
    for node in graph.keys() {
        if let Some(cycle) = visit(node, graph, &mut marks, &mut Vec::new()) {
            return Some(cycle);
        }
    }
    None
}

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn the_operators_top_level_modules_have_no_cycle() {
    let graph = module_graph(&root().join("src"));
    // The graph is the real one: the start-up module uses the parts it wires.
    assert!(
        graph
            .get("serve")
            .is_some_and(|to| to.contains("controller") && to.contains("webhook")),
        "{graph:?}"
    );
    if let Some(cycle) = find_cycle(&graph) {
        panic!("a module cycle: {}", cycle.join(" -> "));
    }
}

#[test]
fn the_sidecars_modules_have_no_cycle() {
    let graph = module_graph(&root().join("byok-proxy/src"));
    assert!(
        graph
            .get("forward")
            .is_some_and(|to| to.contains("upstream")),
        "{graph:?}"
    );
    if let Some(cycle) = find_cycle(&graph) {
        panic!("a module cycle: {}", cycle.join(" -> "));
    }
}

#[test]
fn the_parser_sees_every_path_form_and_the_finder_every_cycle() {
    let code = non_test_code(
        "use crate::a::b;\nuse crate::{c, d::{e, f}, g};\nfn x() { super::h::i(); } // crate::j\n\
         #[cfg(test)]\nmod tests { use crate::k; }\n",
    );
    assert_eq!(
        first_segments(&code, "crate::"),
        ["a", "c", "d", "g"].map(String::from).into()
    );
    assert_eq!(
        first_segments(&code, "super::"),
        ["h"].map(String::from).into()
    );
    let graph = |edges: &[(&str, &str)]| {
        let mut g: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for (a, b) in edges {
            g.entry((*a).into()).or_default().insert((*b).into());
            g.entry((*b).into()).or_default();
        }
        g
    };
    assert_eq!(find_cycle(&graph(&[("a", "b"), ("b", "c")])), None);
    let cycle = find_cycle(&graph(&[("a", "b"), ("b", "c"), ("c", "a")])).expect("a cycle");
    assert_eq!(cycle.first(), cycle.last());
    assert_eq!(cycle.len(), 4);
}
