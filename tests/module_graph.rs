//! The library's module graph has no cycle (STYLE.md: dependencies point one way, from the
//! binaries down to `config`). Edges are read from the sources: every `crate::a` path in a file of
//! module `m` is an edge m → a between top-level modules, and every `super::b` in `a/x.rs` an edge
//! a::x → a::b between sibling submodules. Comments and test code (`#[cfg(test)]` modules) are
//! left out.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// The source without comments (doc links are not dependencies) and without its trailing
/// `#[cfg(test)] mod tests { ... }` block.
fn code_of(text: &str) -> String {
    let text = text
        .find("#[cfg(test)]\nmod tests")
        .map_or(text, |i| &text[..i]);
    text.lines()
        .filter(|line| !line.trim_start().starts_with("//"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Identifiers following `prefix` in `text`.
fn paths_after<'a>(text: &'a str, prefix: &str) -> BTreeSet<&'a str> {
    text.match_indices(prefix)
        .map(|(i, _)| {
            let rest = &text[i + prefix.len()..];
            let end = rest
                .find(|c: char| !(c.is_alphanumeric() || c == '_'))
                .unwrap_or(rest.len());
            &rest[..end]
        })
        .filter(|name| !name.is_empty())
        .collect()
}

/// A cycle of `graph`, if any (depth-first search).
fn find_cycle(graph: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        node: &str,
        graph: &BTreeMap<String, BTreeSet<String>>,
        stack: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(at) = stack.iter().position(|n| n == node) {
            let mut cycle = stack[at..].to_vec();
            cycle.push(node.to_string());
            return Some(cycle);
        }
        if done.contains(node) {
            return None;
        }
        stack.push(node.to_string());
        for next in graph.get(node).into_iter().flatten() {
            if let Some(cycle) = visit(next, graph, stack, done) {
                return Some(cycle);
            }
        }
        stack.pop();
        done.insert(node.to_string());
        None
    }
    let mut done = BTreeSet::new();
    graph
        .keys()
        .find_map(|node| visit(node, graph, &mut Vec::new(), &mut done))
}

fn rust_files(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

#[test]
fn modules_do_not_depend_on_each_other_in_a_cycle() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut top: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut siblings: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for file in &files {
        let relative = file.strip_prefix(&src).unwrap().with_extension("");
        let parts: Vec<String> = relative
            .components()
            .map(|c| c.as_os_str().to_string_lossy().to_string())
            .collect();
        if parts[0] == "bin" || parts[0] == "lib" {
            continue;
        }
        let text = std::fs::read_to_string(file).unwrap();
        let code = code_of(&text);
        let code = code.as_str();
        let module = parts[0].clone();
        for target in paths_after(code, "crate::") {
            if target != module {
                top.entry(module.clone())
                    .or_default()
                    .insert(target.to_string());
            }
        }
        if parts.len() >= 2 {
            let node = parts.join("::");
            let parent = parts[..parts.len() - 1].join("::");
            for sibling in paths_after(code, "super::") {
                let target = format!("{parent}::{sibling}");
                if target != node {
                    siblings.entry(node.clone()).or_default().insert(target);
                }
            }
        }
    }
    assert!(top.len() > 10, "read too few modules: {top:?}");
    assert_eq!(find_cycle(&top), None, "top-level modules in a cycle");
    assert_eq!(find_cycle(&siblings), None, "submodules in a cycle");
}
