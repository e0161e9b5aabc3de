//! House rules of the whole workspace, checked on its sources (parsed as Rust with `syn`):
//! no function outside tests over 80 lines, and no import circle between the files of a crate
//! (a file's children may use it; two files that use each other, directly or round a longer
//! loop, may not).
// It reads the services' modules.
#![cfg(feature = "service")]

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use syn::visit::Visit;

/// The longest function allowed outside tests, in lines from `fn` to its closing brace.
const MAX_FN_LINES: usize = 80;

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("common sits in the workspace")
        .to_path_buf()
}

/// Each member crate's `src` folder (the fuzz targets are not members).
fn crates() -> Vec<(String, PathBuf)> {
    let root = workspace();
    let manifest =
        std::fs::read_to_string(root.join("Cargo.toml")).expect("the workspace manifest");
    let members = manifest
        .lines()
        .find(|line| line.starts_with("members"))
        .expect("a members list");
    let mut crates = Vec::new();
    for member in members.split('"').skip(1).step_by(2) {
        // `*-writer`: every folder whose name ends so.
        match member.split_once('*') {
            None => crates.push(member.to_owned()),
            Some((prefix, suffix)) => {
                for entry in std::fs::read_dir(&root).expect("the workspace folder") {
                    let name = entry
                        .expect("an entry")
                        .file_name()
                        .to_string_lossy()
                        .into_owned();
                    if name.starts_with(prefix)
                        && name.ends_with(suffix)
                        && root.join(&name).join("Cargo.toml").exists()
                    {
                        crates.push(name);
                    }
                }
            }
        }
    }
    crates.sort();
    crates
        .into_iter()
        .map(|name| {
            let src = root.join(&name).join("src");
            (name, src)
        })
        .collect()
}

/// Every `.rs` file under `dir` but test modules and binaries of their own (`src/bin`).
fn sources(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).expect("a readable folder") {
            let path = entry.expect("an entry").path();
            if path.is_dir() {
                if path.file_name().is_some_and(|n| n != "bin" && n != "tests") {
                    stack.push(path);
                }
            } else if path.extension().is_some_and(|e| e == "rs")
                && path.file_name().is_some_and(|n| n != "tests.rs")
            {
                out.push(path);
            }
        }
    }
    out.sort();
    out
}

/// The module path of a file: `src/consumer/window.rs` is `consumer::window`.
fn module_of(src: &Path, file: &Path) -> Vec<String> {
    let relative = file
        .strip_prefix(src)
        .expect("under src")
        .with_extension("");
    let mut parts: Vec<String> = relative
        .components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect();
    if matches!(
        parts.last().map(String::as_str),
        Some("lib" | "main" | "mod")
    ) {
        parts.pop();
    }
    parts
}

/// True for `#[cfg(test)]` and `#[cfg(any(test, …))]`: code that only tests compile.
fn is_test_only(attrs: &[syn::Attribute]) -> bool {
    attrs.iter().any(|a| match &a.meta {
        syn::Meta::List(list) if a.path().is_ident("cfg") => list
            .tokens
            .clone()
            .into_iter()
            .any(|t| t.to_string() == "test"),
        _ => false,
    })
}

/// Collects long functions and the `crate::`/`super::` paths a file names, outside test code.
#[derive(Default)]
struct Reader {
    long: Vec<(String, usize)>,
    paths: Vec<Vec<String>>,
}

impl Reader {
    fn function(&mut self, sig: &syn::Signature, block: &syn::Block) {
        let start = sig.fn_token.span.start().line;
        let end = block.brace_token.span.close().end().line;
        let lines = end - start + 1;
        if lines > MAX_FN_LINES {
            self.long.push((sig.ident.to_string(), lines));
        }
    }
}

impl<'ast> Visit<'ast> for Reader {
    fn visit_item_mod(&mut self, item: &'ast syn::ItemMod) {
        if !is_test_only(&item.attrs) {
            syn::visit::visit_item_mod(self, item);
        }
    }
    fn visit_item_fn(&mut self, item: &'ast syn::ItemFn) {
        if !is_test_only(&item.attrs) {
            self.function(&item.sig, &item.block);
            syn::visit::visit_item_fn(self, item);
        }
    }
    fn visit_impl_item_fn(&mut self, item: &'ast syn::ImplItemFn) {
        if !is_test_only(&item.attrs) {
            self.function(&item.sig, &item.block);
            syn::visit::visit_impl_item_fn(self, item);
        }
    }
    fn visit_item_impl(&mut self, item: &'ast syn::ItemImpl) {
        if !is_test_only(&item.attrs) {
            syn::visit::visit_item_impl(self, item);
        }
    }
    fn visit_item_use(&mut self, item: &'ast syn::ItemUse) {
        if !is_test_only(&item.attrs) {
            use_paths(&item.tree, &mut Vec::new(), &mut self.paths);
        }
    }
    fn visit_path(&mut self, path: &'ast syn::Path) {
        let parts: Vec<String> = path.segments.iter().map(|s| s.ident.to_string()).collect();
        if matches!(parts.first().map(String::as_str), Some("crate" | "super")) {
            self.paths.push(parts);
        }
        syn::visit::visit_path(self, path);
    }
}

fn use_paths(tree: &syn::UseTree, prefix: &mut Vec<String>, out: &mut Vec<Vec<String>>) {
    match tree {
        syn::UseTree::Path(p) => {
            prefix.push(p.ident.to_string());
            use_paths(&p.tree, prefix, out);
            prefix.pop();
        }
        syn::UseTree::Name(n) => out.push(with(prefix, &n.ident)),
        syn::UseTree::Rename(r) => out.push(with(prefix, &r.ident)),
        syn::UseTree::Glob(_) => out.push(prefix.clone()),
        syn::UseTree::Group(g) => g.items.iter().for_each(|t| use_paths(t, prefix, out)),
    }
}

fn with(prefix: &[String], ident: &syn::Ident) -> Vec<String> {
    let mut path = prefix.to_vec();
    path.push(ident.to_string());
    path
}

/// The files of one crate, by module path, with what each names.
fn read_crate(src: &Path) -> BTreeMap<Vec<String>, Reader> {
    sources(src)
        .into_iter()
        .map(|file| {
            let text = std::fs::read_to_string(&file).expect("a readable source");
            let syntax = syn::parse_file(&text)
                .unwrap_or_else(|e| panic!("{} does not parse: {e}", file.display()));
            let mut reader = Reader::default();
            reader.visit_file(&syntax);
            (module_of(src, &file), reader)
        })
        .collect()
}

/// The module a path names: its longest prefix that is a file of the crate (`super` resolved
/// from `from`); `None` for paths outside the crate.
fn target(
    modules: &BTreeSet<Vec<String>>,
    from: &[String],
    path: &[String],
) -> Option<Vec<String>> {
    let mut absolute: Vec<String> = match path.first().map(String::as_str) {
        Some("crate") => Vec::new(),
        Some("super") => from[..from.len().saturating_sub(1)].to_vec(),
        _ => return None,
    };
    let mut rest = &path[1..];
    while rest.first().is_some_and(|s| s == "super") {
        absolute.pop();
        rest = &rest[1..];
    }
    absolute.extend(rest.iter().cloned());
    (0..=absolute.len())
        .rev()
        .map(|n| absolute[..n].to_vec())
        .find(|candidate| modules.contains(candidate))
}

/// Import circles: sets of two or more files that each reach all the others.
fn circles(edges: &BTreeMap<Vec<String>, BTreeSet<Vec<String>>>) -> Vec<Vec<String>> {
    let reach = |from: &Vec<String>| {
        let mut seen = BTreeSet::new();
        let mut stack = vec![from.clone()];
        while let Some(node) = stack.pop() {
            for next in edges.get(&node).into_iter().flatten() {
                if seen.insert(next.clone()) {
                    stack.push(next.clone());
                }
            }
        }
        seen
    };
    let reachable: BTreeMap<_, _> = edges.keys().map(|m| (m.clone(), reach(m))).collect();
    let mut found = BTreeSet::new();
    for (module, seen) in &reachable {
        let circle: BTreeSet<String> = seen
            .iter()
            .filter(|other| *other != module && reachable[*other].contains(module))
            .chain(std::iter::once(module))
            .map(|m| m.join("::"))
            .collect();
        if circle.len() > 1 {
            found.insert(circle.into_iter().collect::<Vec<_>>());
        }
    }
    found.into_iter().collect()
}

/// Who uses whom among the files of the crate at `src`; a file's own items and its ancestors'
/// do not count (a child is part of its parent).
fn imports(src: &Path) -> BTreeMap<Vec<String>, BTreeSet<Vec<String>>> {
    let files = read_crate(src);
    let modules: BTreeSet<Vec<String>> = files.keys().cloned().collect();
    files
        .iter()
        .map(|(module, reader)| {
            let uses = reader
                .paths
                .iter()
                .filter_map(|path| target(&modules, module, path))
                .filter(|to| !module.starts_with(to))
                .collect();
            (module.clone(), uses)
        })
        .collect()
}

#[test]
fn no_function_outside_tests_is_over_80_lines() {
    let mut long = Vec::new();
    for (name, src) in crates() {
        for (module, reader) in read_crate(&src) {
            for (function, lines) in reader.long {
                long.push(format!(
                    "{name}: {}::{function}: {lines} lines",
                    module.join("::")
                ));
            }
        }
    }
    assert!(
        long.is_empty(),
        "split these into named steps:\n{}",
        long.join("\n")
    );
}

#[test]
fn no_two_files_of_a_crate_import_each_other() {
    let mut found = Vec::new();
    for (name, src) in crates() {
        let circles = circles(&imports(&src));
        found.extend(
            circles
                .into_iter()
                .map(|c| format!("{name}: {}", c.join(" ↔ "))),
        );
    }
    assert!(found.is_empty(), "import circles:\n{}", found.join("\n"));
}

#[test]
fn the_checks_see_what_they_look_for() {
    // A circle and a long function the checks must catch, so neither can pass by seeing nothing.
    let (a, b, c) = (
        vec!["a".to_owned()],
        vec!["b".to_owned()],
        vec!["c".to_owned()],
    );
    let edges = BTreeMap::from([
        (a.clone(), BTreeSet::from([b.clone()])),
        (b.clone(), BTreeSet::from([c.clone()])),
        (c.clone(), BTreeSet::from([a.clone()])),
    ]);
    assert_eq!(circles(&edges), vec![vec!["a", "b", "c"]]);
    let body = "    let x = 1;\n".repeat(MAX_FN_LINES);
    let syntax = syn::parse_file(&format!("fn long() {{\n{body}}}\n")).expect("parses");
    let mut reader = Reader::default();
    reader.visit_file(&syntax);
    assert_eq!(reader.long, vec![("long".to_owned(), MAX_FN_LINES + 2)]);
    let text = "use crate::x::{y, z::w};\nfn f() { super::q::r(); }\n#[cfg(test)]\nmod t { use crate::n; }";
    let mut reader = Reader::default();
    reader.visit_file(&syn::parse_file(text).expect("parses"));
    let paths: Vec<String> = reader.paths.iter().map(|p| p.join("::")).collect();
    assert_eq!(paths, ["crate::x::y", "crate::x::z::w", "super::q::r"]);
    // Every member crate is read, and the crate this test lives in imports between its files.
    let all = crates();
    let names: Vec<&str> = all.iter().map(|(name, _)| name.as_str()).collect();
    assert!(names.contains(&"pg-writer") && names.contains(&"mongo-writer") && names.len() >= 7);
    assert!(all.iter().all(|(_, src)| !sources(src).is_empty()));
    let common = imports(&workspace().join("common/src"));
    assert!(common[&vec!["routing".to_owned()]].contains(&vec!["record".to_owned()]));
}

/// The anchors GitHub makes of a Markdown file's headings.
fn anchors(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter_map(|line| line.strip_prefix('#'))
        .map(|heading| {
            heading
                .trim_start_matches('#')
                .trim()
                .to_lowercase()
                .chars()
                .filter(|c| c.is_alphanumeric() || *c == '-' || *c == '_' || *c == ' ')
                .map(|c| if c == ' ' { '-' } else { c })
                .collect()
        })
        .collect()
}

/// The relative links of a Markdown text: `(target, fragment)`.
fn links(text: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for (start, _) in text.match_indices("](") {
        let rest = &text[start + 2..];
        let Some(end) = rest.find(')') else { continue };
        let link = &rest[..end];
        if link.contains("://") || link.contains(' ') || link.starts_with("mailto:") {
            continue;
        }
        let (path, fragment) = link.split_once('#').unwrap_or((link, ""));
        out.push((path.to_owned(), fragment.to_owned()));
    }
    out
}

#[test]
fn every_link_in_the_readme_and_the_docs_resolves() {
    let root = workspace();
    let mut pages = vec![root.join("README.md")];
    for entry in std::fs::read_dir(root.join("docs")).expect("docs/") {
        let path = entry.expect("an entry").path();
        if path.extension().is_some_and(|e| e == "md") {
            pages.push(path);
        }
    }
    let mut broken = Vec::new();
    for page in &pages {
        let text = std::fs::read_to_string(page).expect("a readable page");
        for (path, fragment) in links(&text) {
            let target = if path.is_empty() {
                page.clone()
            } else {
                page.parent().expect("in a folder").join(&path)
            };
            let shown = format!("{}: ({path}#{fragment})", page.display());
            if !target.exists() {
                broken.push(format!("{shown}: no such file"));
            } else if !fragment.is_empty()
                && target.extension().is_some_and(|e| e == "md")
                && !anchors(&std::fs::read_to_string(&target).expect("readable"))
                    .contains(&fragment)
            {
                broken.push(format!("{shown}: no such heading"));
            }
        }
    }
    assert!(pages.len() >= 5, "the README and the docs are read");
    assert!(broken.is_empty(), "broken links:\n{}", broken.join("\n"));
    // The check itself: a heading's anchor, and a link it must see.
    assert!(anchors("## Metrics, dashboards, alerts").contains("metrics-dashboards-alerts"));
    assert_eq!(
        links("see [x](docs/a.md#b) and [y](https://e.org)"),
        [("docs/a.md".to_owned(), "b".to_owned())]
    );
}

/// A Prometheus configuration's `flowmesh-<name>` jobs are exactly the services of the list.
fn assert_one_job_a_service(prometheus: &str, file: &str) {
    let jobs: Vec<String> = prometheus
        .lines()
        .filter_map(|l| l.trim().strip_prefix("- job_name: flowmesh-"))
        .map(str::to_owned)
        .collect();
    let listed: Vec<String> = flowmesh_common::services::SERVICES
        .iter()
        .map(|s| s.name.to_owned())
        .collect();
    assert_eq!(jobs, listed, "{file}: one flowmesh-<name> job a service");
}

#[test]
fn prometheus_and_compose_know_every_service_of_the_list() {
    use flowmesh_common::services::SERVICES;
    let root = workspace();
    let prometheus =
        std::fs::read_to_string(root.join("prometheus/prometheus.yml")).expect("prometheus.yml");
    let compose =
        std::fs::read_to_string(root.join("docker-compose.yml")).expect("docker-compose.yml");
    // The flowmesh jobs Prometheus scrapes, and their targets, are exactly the list's.
    assert_one_job_a_service(&prometheus, "prometheus/prometheus.yml");
    for service in SERVICES {
        let target = format!("\"{}:{}\"", service.name, service.probe_port);
        assert!(
            prometheus.contains(&target),
            "prometheus.yml: no target {target}"
        );
        let defined = format!("\n  {}:\n", service.name);
        let published = format!("{0}}}:{0}\"", service.probe_port);
        assert!(
            compose.contains(&defined),
            "docker-compose.yml: no service {}",
            service.name
        );
        assert!(
            compose.contains(&published),
            "docker-compose.yml: port {} not published",
            service.probe_port
        );
    }
}

#[test]
fn the_cluster_file_s_prometheus_scrapes_every_instance_it_runs() {
    use flowmesh_common::services::SERVICES;
    let root = workspace();
    let prometheus = std::fs::read_to_string(root.join("prometheus/prometheus.cluster.yml"))
        .expect("prometheus.cluster.yml");
    let compose = std::fs::read_to_string(root.join("docker-compose.cluster.yml"))
        .expect("docker-compose.cluster.yml");
    assert_one_job_a_service(&prometheus, "prometheus/prometheus.cluster.yml");
    // The compose services that run each one (`command: ["<name>"]`), and the targets scraped.
    let services = compose
        .split("\nservices:\n")
        .nth(1)
        .and_then(|rest| rest.split("\nvolumes:\n").next())
        .expect("a services: section");
    let mut runs: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for service in SERVICES {
        let anchor = format!("command: [\"{}\"]", service.name);
        assert!(
            compose.contains(&anchor),
            "docker-compose.cluster.yml runs no {}",
            service.name
        );
        let defined: Vec<String> = services
            .lines()
            .filter_map(|l| l.strip_prefix("  ").and_then(|l| l.strip_suffix(':')))
            .filter(|n| {
                !n.starts_with(' ')
                    && (*n == service.name || n.starts_with(&format!("{}-", service.name)))
            })
            .map(str::to_owned)
            .collect();
        runs.insert(service.name.to_owned(), defined.clone());
        assert!(
            !defined.is_empty(),
            "no compose service for {}",
            service.name
        );
        for instance in defined {
            // A static target, or a name Prometheus resolves to every container of a service
            // that scales.
            let target = format!("\"{instance}:{}\"", service.probe_port);
            let resolved = format!(
                "names: [\"{instance}\"], type: A, port: {}",
                service.probe_port
            );
            assert!(
                prometheus.contains(&target) || prometheus.contains(&resolved),
                "prometheus.cluster.yml does not scrape {target}"
            );
        }
    }
    assert_eq!(
        runs["generator"],
        ["generator-a", "generator-b", "generator-c"]
    );
    // More than one of each (docs/contracts.md §4 "Partitions" for mongo-writer's two).
    assert_eq!(runs["filter"], ["filter", "filter-2"]);
    assert_eq!(runs["mongo-writer"], ["mongo-writer", "mongo-writer-2"]);
    assert!(compose.contains("MONGO_PARTITIONS: \"2\""));
    for node in ["rabbitmq-1", "rabbitmq-2", "rabbitmq-3"] {
        assert!(
            prometheus.contains(&format!("\"{node}:15692\"")),
            "{node} not scraped"
        );
    }
}
