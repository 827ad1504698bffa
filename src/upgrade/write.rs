//! `stack upgrade --write`: the images upgrades pinned, written into the
//! stack file in place. Only the image's text changes (or one `image:`
//! line is added); comments, order and spacing stay as they were, and the
//! result is loaded again before it replaces the file.

use std::path::{Path, PathBuf};

use crate::model::yaml::{self, Node, Value};

#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    #[error("cannot read {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: {reason}; write the image into it by hand", path.display())]
    Edit { path: PathBuf, reason: String },
    #[error("{}: the edited file does not load ({reason}); the file was left as it was", path.display())]
    Check { path: PathBuf, reason: String },
    #[error("cannot write {}", path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Writes `image` of each `(database, image)` into the stack file at `path`.
pub fn write_images(path: &Path, images: &[(String, String)]) -> Result<(), WriteError> {
    let text = std::fs::read_to_string(path).map_err(|source| WriteError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let edited = rewrite(&text, images).map_err(|reason| WriteError::Edit {
        path: path.to_path_buf(),
        reason,
    })?;
    let stack = crate::model::load_str(path, &edited).map_err(|e| WriteError::Check {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    for (database, image) in images {
        let written = stack.databases.iter().find(|d| &d.name == database);
        if written.map(|d| d.image.to_string()).as_deref() != Some(image.as_str()) {
            return Err(WriteError::Check {
                path: path.to_path_buf(),
                reason: format!("database {database} does not name {image} after the edit"),
            });
        }
    }
    // Beside the file, then renamed over it: never half written.
    let partial = path.with_extension("yaml.stack-write");
    let write = |source| WriteError::Write {
        path: path.to_path_buf(),
        source,
    };
    std::fs::write(&partial, &edited).map_err(write)?;
    if let Ok(meta) = std::fs::metadata(path) {
        std::fs::set_permissions(&partial, meta.permissions()).map_err(write)?;
    }
    std::fs::rename(&partial, path).map_err(write)
}

/// An edit of one line: characters `start..end` replaced by `text`, or
/// (`start` = `None`) `text` inserted as a new line after it.
struct Edit {
    line: usize,
    span: Option<(usize, usize)>,
    text: String,
}

fn entry<'a>(map: &'a [(Node, Node)], key: &str) -> Option<&'a (Node, Node)> {
    map.iter()
        .find(|(k, _)| matches!(&k.value, Value::Scalar { text, .. } if text == key))
}

/// `text` with each database's image replaced or added.
pub fn rewrite(text: &str, images: &[(String, String)]) -> Result<String, String> {
    let root = yaml::parse(text).map_err(|e| format!("{e:?}"))?;
    let Value::Map(top) = &root.value else {
        return Err("the file is not a mapping".into());
    };
    let Some((_, databases)) = entry(top, "databases") else {
        return Err("the file has no `databases`".into());
    };
    let Value::Seq(items) = &databases.value else {
        return Err("`databases` is not a list".into());
    };
    let lines: Vec<&str> = text.split('\n').collect();
    let mut edits = Vec::new();
    for (database, image) in images {
        let found = items.iter().find_map(|item| match &item.value {
            Value::Map(fields) => entry(fields, "name")
                .filter(|(_, v)| matches!(&v.value, Value::Scalar { text, .. } if text == database))
                .map(|_| fields),
            _ => None,
        });
        let Some(fields) = found else {
            return Err(format!("no database {database} in `databases`"));
        };
        match entry(fields, "image") {
            Some((_, value)) => {
                let line = value.pos.line - 1;
                let chars: Vec<char> = lines.get(line).unwrap_or(&"").chars().collect();
                let start = value.pos.column - 1;
                let end = scalar_end(&chars, start)
                    .ok_or_else(|| format!("the image of database {database} is not one line"))?;
                let quote = chars.get(start).filter(|c| **c == '"' || **c == '\'');
                let text = match quote {
                    Some(q) => format!("{q}{image}{q}"),
                    None => image.clone(),
                };
                edits.push(Edit {
                    line,
                    span: Some((start, end)),
                    text,
                });
            }
            None => {
                let (key, value) = entry(fields, "name").expect("found by its name");
                let line = value.pos.line - 1;
                let before: String = lines
                    .get(line)
                    .unwrap_or(&"")
                    .chars()
                    .take(key.pos.column - 1)
                    .collect();
                if before.contains('{') || key.pos.line != value.pos.line {
                    return Err(format!(
                        "database {database} is written in a style this edit does not handle"
                    ));
                }
                edits.push(Edit {
                    line,
                    span: None,
                    text: format!("{}image: {image}", " ".repeat(key.pos.column - 1)),
                });
            }
        }
    }
    let mut out: Vec<String> = lines.iter().map(|l| l.to_string()).collect();
    edits.sort_by_key(|e| std::cmp::Reverse(e.line));
    for edit in edits {
        match edit.span {
            Some((start, end)) => {
                let chars: Vec<char> = out[edit.line].chars().collect();
                let mut line: String = chars[..start].iter().collect();
                line.push_str(&edit.text);
                line.extend(&chars[end..]);
                out[edit.line] = line;
            }
            None => out.insert(edit.line + 1, edit.text),
        }
    }
    Ok(out.join("\n"))
}

/// Where the scalar starting at `start` ends on its line: after its closing
/// quote, or before a comment, a flow delimiter or trailing spaces.
fn scalar_end(chars: &[char], start: usize) -> Option<usize> {
    match chars.get(start)? {
        '"' => {
            let mut i = start + 1;
            while i < chars.len() {
                match chars[i] {
                    '\\' => i += 2,
                    '"' => return Some(i + 1),
                    _ => i += 1,
                }
            }
            None
        }
        '\'' => {
            let mut i = start + 1;
            while i < chars.len() {
                if chars[i] == '\'' {
                    if chars.get(i + 1) == Some(&'\'') {
                        i += 2;
                        continue;
                    }
                    return Some(i + 1);
                }
                i += 1;
            }
            None
        }
        _ => {
            let mut end = start;
            while end < chars.len() {
                let c = chars[end];
                if matches!(c, ',' | '}' | ']' | '\r')
                    || (c == '#' && end > 0 && chars[end - 1].is_whitespace())
                {
                    break;
                }
                end += 1;
            }
            while end > start && chars[end - 1].is_whitespace() {
                end -= 1;
            }
            Some(end)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PINNED: &str =
        "couchdb:3.5.2@sha256:0000000000000000000000000000000000000000000000000000000000000000";

    #[test]
    fn an_image_is_replaced_keeping_comments_and_quotes() {
        let text = "name: s\ndatabases:\n  # the documents\n  - kind: couchdb\n    name: docs\n    image: couchdb:3.5.1   # patch releases only\n  - kind: immudb\n    name: ledger\n    image: \"codenotary/immudb:1.11.0\"\n";
        let out = rewrite(
            text,
            &[
                ("docs".into(), PINNED.into()),
                ("ledger".into(), "codenotary/immudb:1.11.1".into()),
            ],
        )
        .unwrap();
        assert_eq!(
            out,
            format!("name: s\ndatabases:\n  # the documents\n  - kind: couchdb\n    name: docs\n    image: {PINNED}   # patch releases only\n  - kind: immudb\n    name: ledger\n    image: \"codenotary/immudb:1.11.1\"\n")
        );
    }

    #[test]
    fn a_missing_image_line_is_added_under_the_name() {
        let text = "databases:\n  - name: docs # first\n    kind: couchdb\n";
        let out = rewrite(text, &[("docs".into(), PINNED.into())]).unwrap();
        assert_eq!(
            out,
            format!("databases:\n  - name: docs # first\n    image: {PINNED}\n    kind: couchdb\n")
        );
    }

    #[test]
    fn flow_style_images_are_replaced_and_flow_entries_without_one_refused() {
        let text = "databases:\n  - {kind: couchdb, name: docs, image: couchdb:3.5.1}\n  - {kind: couchdb, name: more}\n";
        let out = rewrite(text, &[("docs".into(), PINNED.into())]).unwrap();
        assert!(out.contains(&format!("image: {PINNED}}}")), "{out}");
        let refused = rewrite(text, &[("more".into(), PINNED.into())]).unwrap_err();
        assert!(refused.contains("style"), "{refused}");
        let missing = rewrite(text, &[("nope".into(), PINNED.into())]).unwrap_err();
        assert!(missing.contains("no database nope"), "{missing}");
    }
}
