//! The typed model of a stack file.
//!
//! `load` reads a file into a positioned YAML tree (`yaml`), decodes it into
//! what the user wrote (`file`, every value with its position, type errors
//! collected), checks the rules that span fields (`validate`), and fills the
//! defaults in one place (`defaults`) to give the resolved [`Stack`] that the
//! planner and providers use.

pub mod decode;
pub mod defaults;
pub mod file;
mod stack;
pub mod validate;
pub mod values;
pub mod yaml;

use std::path::{Path, PathBuf};

use crate::diag::{Diagnostic, Diagnostics};
pub use stack::*;
pub use values::{ByteSize, ImageRef};

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("cannot read stack file {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{} has {} error{}:\n{}", path.display(), diagnostics.len(), if diagnostics.len() == 1 { "" } else { "s" }, render(diagnostics))]
    Invalid {
        path: PathBuf,
        diagnostics: Vec<Diagnostic>,
    },
}

fn render(diagnostics: &[Diagnostic]) -> String {
    diagnostics
        .iter()
        .map(|d| format!("  {d}"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Reads, decodes, validates and resolves a stack file. No network access.
pub fn load(path: &Path) -> Result<Stack, LoadError> {
    let text = std::fs::read_to_string(path).map_err(|source| LoadError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    load_str(path, &text)
}

/// Like [`load`], for text already read; `path` is used in messages and to
/// place the state folder.
pub fn load_str(path: &Path, text: &str) -> Result<Stack, LoadError> {
    let mut diags = Diagnostics::new(path);
    let parsed = match yaml::parse(text) {
        Ok(root) => decode::decode(&root, &mut diags),
        Err(err) => {
            diags.push(err.pos, "", "valid YAML", err.message);
            None
        }
    };
    if let Some(file) = &parsed {
        validate::validate(file, &mut diags);
    }
    match parsed {
        Some(file) if diags.is_empty() => Ok(defaults::resolve(file, path)),
        _ => Err(LoadError::Invalid {
            path: path.to_path_buf(),
            diagnostics: diags.into_sorted(),
        }),
    }
}
