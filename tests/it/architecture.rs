//! The shape of the library's source, checked: data flows one way (no file
//! reaches, by `crate::`, `super::` or `self::` paths, a file that reaches it
//! back), and only the command-line layer reads stdin, prints, draws progress
//! or handles signals. The source is `src/` and the model crate's
//! `crates/stack-model/src/`, whose modules `src/lib.rs` re-exports at the
//! same paths (`model`, `diag`), so both are one module tree here.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

fn model_src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("crates/stack-model/src")
}

/// Every `.rs` file of the library by its module path (`engine::plan`), and
/// the model crate's root, which has no module path of its own.
fn modules() -> (BTreeMap<Vec<String>, PathBuf>, Vec<PathBuf>) {
    let mut out = BTreeMap::new();
    let mut roots = Vec::new();
    for root in [src(), model_src()] {
        let mut stack = vec![root.clone()];
        while let Some(dir) = stack.pop() {
            for entry in std::fs::read_dir(&dir).unwrap().flatten() {
                let path = entry.path();
                if path.is_dir() {
                    stack.push(path);
                    continue;
                }
                if path.extension().is_none_or(|e| e != "rs") {
                    continue;
                }
                let relative = path.strip_prefix(&root).unwrap();
                let mut segments: Vec<String> = relative
                    .iter()
                    .map(|s| s.to_string_lossy().trim_end_matches(".rs").to_string())
                    .collect();
                if matches!(
                    segments.last().map(String::as_str),
                    Some("mod" | "lib" | "main")
                ) {
                    segments.pop();
                }
                if root == src() && relative == Path::new("main.rs") {
                    // The binary is a crate of its own.
                    continue;
                }
                if root == model_src() && relative == Path::new("lib.rs") {
                    // Its modules are re-exported under `stack`'s own root.
                    roots.push(path);
                    continue;
                }
                assert!(
                    out.insert(segments, path.clone()).is_none(),
                    "{} has a module path another file has",
                    path.display()
                );
            }
        }
    }
    (out, roots)
}

/// The text without comments and string literals, so that neither counts as a path.
fn code(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '/' if chars.peek() == Some(&'/') => {
                for c in chars.by_ref() {
                    if c == '\n' {
                        out.push('\n');
                        break;
                    }
                }
            }
            '"' => {
                let mut escaped = false;
                for c in chars.by_ref() {
                    match (escaped, c) {
                        (false, '\\') => escaped = true,
                        (false, '"') => break,
                        _ => escaped = false,
                    }
                }
                out.push_str("\"\"");
            }
            _ => out.push(c),
        }
    }
    out
}

fn is_ident(c: char) -> bool {
    c.is_alphanumeric() || c == '_'
}

/// The paths a `use` tree names: `a::{b, c::{d, e}}` is `a::b`, `a::c::d`, `a::c::e`.
fn expand(tree: &str, prefix: &[String], out: &mut Vec<Vec<String>>) {
    let tree = tree.trim();
    if let Some(open) = tree.find('{') {
        let base: Vec<String> = tree[..open]
            .split("::")
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_string)
            .collect();
        let mut path = prefix.to_vec();
        path.extend(base);
        let inner = &tree[open + 1..tree.rfind('}').unwrap_or(tree.len())];
        let mut depth = 0;
        let mut start = 0;
        for (i, c) in inner.char_indices() {
            match c {
                '{' => depth += 1,
                '}' => depth -= 1,
                ',' if depth == 0 => {
                    expand(&inner[start..i], &path, out);
                    start = i + 1;
                }
                _ => {}
            }
        }
        expand(&inner[start..], &path, out);
    } else if !tree.is_empty() {
        let mut path = prefix.to_vec();
        let words = tree.split(" as ").next().unwrap_or(tree);
        path.extend(words.split("::").map(|s| s.trim().to_string()));
        out.push(path);
    }
}

/// The module paths a file's code names, each from the module it is named in
/// (inline `mod x { … }` blocks included).
fn paths(text: &str, module: &[String]) -> Vec<(Vec<String>, Vec<String>)> {
    let code = code(text);
    let mut found = Vec::new();
    // The inline modules open at each point, by the brace depth they close at.
    let mut inline: Vec<(String, usize)> = Vec::new();
    let mut depth = 0usize;
    let bytes: Vec<char> = code.chars().collect();
    let mut i = 0;
    let word_at = |i: usize, word: &str| {
        code.get(i..).is_some_and(|rest| rest.starts_with(word))
            && (i == 0 || !is_ident(bytes[i - 1]))
            && !bytes.get(i + word.len()).copied().is_some_and(is_ident)
    };
    let here = |inline: &[(String, usize)]| {
        let mut m = module.to_vec();
        m.extend(inline.iter().map(|(n, _)| n.clone()));
        m
    };
    while i < bytes.len() {
        match bytes[i] {
            '{' => depth += 1,
            '}' => {
                depth = depth.saturating_sub(1);
                if inline.last().is_some_and(|(_, d)| *d == depth) {
                    inline.pop();
                }
            }
            _ => {}
        }
        if word_at(i, "mod") {
            let rest: String = bytes[i + 3..].iter().collect();
            let name: String = rest
                .trim_start()
                .chars()
                .take_while(|c| is_ident(*c))
                .collect();
            let after = rest.trim_start()[name.len()..].trim_start();
            if after.starts_with('{') {
                inline.push((name, depth));
            }
        }
        if word_at(i, "use") {
            let end = code[i..].find(';').map_or(code.len(), |e| i + e);
            let mut trees = Vec::new();
            expand(&code[i + 3..end], &[], &mut trees);
            for tree in trees {
                found.push((here(&inline), tree));
            }
            i = end;
            continue;
        }
        // A path: an identifier followed by `::` (`crate::a::b`, `super::x`, `child::f`).
        if is_ident(bytes[i]) && (i == 0 || !(is_ident(bytes[i - 1]) || bytes[i - 1] == ':')) {
            let path: String = bytes[i..]
                .iter()
                .take_while(|c| is_ident(**c) || **c == ':')
                .collect();
            if path.contains("::") {
                found.push((
                    here(&inline),
                    path.split("::")
                        .filter(|s| !s.is_empty())
                        .map(str::to_string)
                        .collect(),
                ));
            }
            i += path.len();
            continue;
        }
        i += 1;
    }
    found
}

/// The file a path from `from` reaches: the deepest module of the path that is a file.
fn resolve(
    from: &[String],
    path: &[String],
    files: &BTreeMap<Vec<String>, PathBuf>,
) -> Option<Vec<String>> {
    let mut segments = path.iter();
    let mut module: Vec<String> = match path.first().map(String::as_str) {
        Some("crate") => {
            segments.next();
            Vec::new()
        }
        Some("super" | "self") => from.to_vec(),
        // A child module named from its parent (`validate::validate(…)`).
        Some(first) if files.contains_key(&[from, &[first.to_string()]].concat()) => from.to_vec(),
        _ => return None,
    };
    let mut reached = None;
    for segment in segments {
        match segment.as_str() {
            "super" => {
                module.pop();
            }
            "self" | "*" => {}
            name => module.push(name.to_string()),
        }
        if files.contains_key(&module) {
            reached = Some(module.clone());
        }
    }
    reached.or_else(|| {
        // `super::x` where x is an item of the parent module itself.
        let mut parent = module;
        while !parent.is_empty() && !files.contains_key(&parent) {
            parent.pop();
        }
        Some(parent)
    })
}

#[test]
fn no_file_in_src_reaches_back_to_a_file_that_reaches_it() {
    let (files, _) = modules();
    let mut edges: BTreeMap<Vec<String>, BTreeSet<Vec<String>>> = BTreeMap::new();
    for (module, file) in &files {
        let text = std::fs::read_to_string(file).unwrap();
        for (from, path) in paths(&text, module) {
            if let Some(target) = resolve(&from, &path, &files) {
                if &target != module {
                    edges.entry(module.clone()).or_default().insert(target);
                }
            }
        }
    }
    let module = |path: &str| path.split("::").map(str::to_string).collect::<Vec<_>>();
    assert!(
        edges
            .get(&module("engine::session"))
            .is_some_and(|to| to.contains(&module("engine::plan"))),
        "the checker reads paths: {edges:#?}"
    );
    assert!(
        edges
            .get(&module("model::decode"))
            .is_some_and(|to| to.contains(&module("diag"))),
        "the checker reads the model crate's paths: {edges:#?}"
    );
    // Depth-first search for a way back.
    fn visit(
        node: &Vec<String>,
        edges: &BTreeMap<Vec<String>, BTreeSet<Vec<String>>>,
        path: &mut Vec<Vec<String>>,
        done: &mut BTreeSet<Vec<String>>,
        cycles: &mut Vec<String>,
    ) {
        if let Some(start) = path.iter().position(|n| n == node) {
            let shown: Vec<String> = path[start..]
                .iter()
                .chain([node])
                .map(|m| m.join("::"))
                .collect();
            cycles.push(shown.join(" → "));
            return;
        }
        if !done.insert(node.clone()) {
            return;
        }
        path.push(node.clone());
        for next in edges.get(node).into_iter().flatten() {
            visit(next, edges, path, done, cycles);
        }
        path.pop();
    }
    let mut cycles = Vec::new();
    let mut done = BTreeSet::new();
    for module in files.keys() {
        visit(module, &edges, &mut Vec::new(), &mut done, &mut cycles);
    }
    assert!(
        cycles.is_empty(),
        "import circles in the library's source:\n{}",
        cycles.join("\n")
    );
}

#[test]
fn only_the_command_line_layer_reads_stdin_prints_draws_progress_or_handles_signals() {
    let mut found = Vec::new();
    let (files, roots) = modules();
    let library = files
        .into_iter()
        .filter(|(module, _)| module.first().is_none_or(|m| m != "cli"))
        .map(|(_, file)| file)
        .chain(roots);
    for file in library {
        let code = code(&std::fs::read_to_string(&file).unwrap());
        for needle in [
            "io::stdin",
            "println!",
            "eprintln!",
            "print!",
            "eprint!",
            "indicatif",
            "tokio::signal",
            "signal(",
            "is_terminal",
            "process::exit",
        ] {
            if code.contains(needle) {
                found.push(format!("{}: {needle}", file.display()));
            }
        }
    }
    assert!(found.is_empty(), "{}", found.join("\n"));
}
