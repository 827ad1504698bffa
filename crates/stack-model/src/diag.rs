//! Diagnostics for stack files: one error per problem, all of them at once.
//!
//! Every diagnostic names `file:line:column`, the field path, what was
//! expected and what was found, like Terraform's diagnostics.

use std::fmt;
use std::path::PathBuf;

use crate::model::yaml::Pos;

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Diagnostic {
    pub file: PathBuf,
    pub line: usize,
    pub column: usize,
    /// Field path such as `nodes[1].disk`; empty for the document itself.
    pub path: String,
    pub expected: String,
    pub found: String,
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let path = if self.path.is_empty() {
            "(document)"
        } else {
            &self.path
        };
        write!(
            f,
            "{}:{}:{}: {}: expected {}, found {}",
            self.file.display(),
            self.line,
            self.column,
            path,
            self.expected,
            self.found
        )
    }
}

/// Collects diagnostics for one file, sorted by position when done.
#[derive(Debug)]
pub struct Diagnostics {
    file: PathBuf,
    items: Vec<Diagnostic>,
}

impl Diagnostics {
    pub fn new(file: impl Into<PathBuf>) -> Self {
        Diagnostics {
            file: file.into(),
            items: Vec::new(),
        }
    }

    pub fn push(
        &mut self,
        pos: Pos,
        path: &str,
        expected: impl Into<String>,
        found: impl Into<String>,
    ) {
        self.items.push(Diagnostic {
            file: self.file.clone(),
            line: pos.line,
            column: pos.column,
            path: path.to_string(),
            expected: expected.into(),
            found: found.into(),
        });
    }

    /// Whether an error was already reported at `path` or below it.
    pub fn mentions(&self, path: &str) -> bool {
        self.items.iter().any(|d| {
            d.path == path
                || d.path
                    .strip_prefix(path)
                    .is_some_and(|rest| rest.starts_with(['.', '[']))
        })
    }

    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    pub fn into_sorted(mut self) -> Vec<Diagnostic> {
        self.items
            .sort_by(|a, b| (a.line, a.column, &a.path).cmp(&(b.line, b.column, &b.path)));
        self.items.dedup();
        self.items
    }
}
