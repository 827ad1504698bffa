//! The typed model of a stack file.
//!
//! `load` reads a file of at most 1 MiB, checks that it is UTF-8 text
//! (`text`), reads it into a positioned YAML tree within bounds (`yaml`),
//! decodes it into what the user wrote (`file`, every value with its
//! position, type errors collected), checks the rules that span fields
//! (`validate`), and fills the defaults in one place (`defaults`) to give the
//! resolved [`Stack`] that the planner and providers use.

pub mod decode;
pub mod defaults;
pub mod file;
mod stack;
pub mod text;
pub mod validate;
pub mod values;
pub mod yaml;

use std::io::Read;
use std::path::{Path, PathBuf};

use crate::diag::{Diagnostic, Diagnostics};
pub use stack::*;
pub use values::{ByteSize, Checksum, HashAlgorithm, ImageRef};

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
/// Reads at most one byte more than [`text::MAX_FILE_SIZE`].
pub fn load(path: &Path) -> Result<Stack, LoadError> {
    let mut bytes = Vec::new();
    std::fs::File::open(path)
        .and_then(|file| {
            file.take(text::MAX_FILE_SIZE as u64 + 1)
                .read_to_end(&mut bytes)
        })
        .map_err(|source| LoadError::Read {
            path: path.to_path_buf(),
            source,
        })?;
    load_bytes(path, &bytes)
}

/// Like [`load`], for the bytes of a file already read; `path` is used in
/// messages and to place the state folder.
pub fn load_bytes(path: &Path, bytes: &[u8]) -> Result<Stack, LoadError> {
    let mut diags = Diagnostics::new(path);
    match text::from_bytes(bytes, &mut diags) {
        Some(text) => load_str(path, text),
        None => Err(invalid(path, diags)),
    }
}

/// Like [`load_bytes`], for text already decoded.
pub fn load_str(path: &Path, text: &str) -> Result<Stack, LoadError> {
    let mut diags = Diagnostics::new(path);
    let parsed = match text::printable(text, &mut diags).map(yaml::parse) {
        Some(Ok(root)) => decode::decode(&root, &mut diags),
        Some(Err(err)) => {
            diags.push(err.pos, "", err.expected, err.found);
            None
        }
        None => None,
    };
    if let Some(file) = &parsed {
        validate::validate(file, &mut diags);
    }
    match parsed {
        Some(file) if diags.is_empty() => Ok(defaults::resolve(file, path)),
        _ => Err(invalid(path, diags)),
    }
}

fn invalid(path: &Path, diags: Diagnostics) -> LoadError {
    LoadError::Invalid {
        path: path.to_path_buf(),
        diagnostics: diags.into_sorted(),
    }
}
