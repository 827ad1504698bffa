//! YAML and JSON trees converted into each other: kubeconfigs and manifests
//! are YAML on disk and JSON (`serde_json::Value`) everywhere else. Their
//! YAML is read here within the model's bounds on aliases and nesting, which
//! yaml_rust2's own loader does not have.

use serde_json::{json, Value};
use yaml_rust2::{Yaml, YamlLoader};

use crate::model::yaml::{self, SyntaxError};

#[derive(Debug, thiserror::Error)]
pub enum YamlError {
    #[error("{0}")]
    OutOfBounds(SyntaxError),
    #[error("{0}")]
    Syntax(#[from] yaml_rust2::ScanError),
}

/// The documents of a YAML text, once it is known to be within the bounds
/// on aliases and nesting (see `model::yaml`).
pub fn load(text: &str) -> Result<Vec<Yaml>, YamlError> {
    yaml::check(text).map_err(YamlError::OutOfBounds)?;
    Ok(YamlLoader::load_from_str(text)?)
}

/// A YAML tree as JSON; keys that are not strings are dropped.
pub fn to_json(yaml: &Yaml) -> Value {
    match yaml {
        Yaml::Real(r) => r.parse::<f64>().map_or(Value::Null, |f| json!(f)),
        Yaml::Integer(i) => json!(i),
        Yaml::String(s) => json!(s),
        Yaml::Boolean(b) => json!(b),
        Yaml::Array(items) => Value::Array(items.iter().map(to_json).collect()),
        Yaml::Hash(map) => Value::Object(
            map.iter()
                .filter_map(|(k, v)| Some((k.as_str()?.to_string(), to_json(v))))
                .collect(),
        ),
        _ => Value::Null,
    }
}

/// A JSON tree as YAML.
pub fn to_yaml(value: &Value) -> Yaml {
    match value {
        Value::Null => Yaml::Null,
        Value::Bool(b) => Yaml::Boolean(*b),
        Value::Number(n) => match n.as_i64() {
            Some(i) => Yaml::Integer(i),
            None => Yaml::Real(n.to_string()),
        },
        Value::String(s) => Yaml::String(s.clone()),
        Value::Array(items) => Yaml::Array(items.iter().map(to_yaml).collect()),
        Value::Object(map) => Yaml::Hash(
            map.iter()
                .map(|(k, v)| (Yaml::String(k.clone()), to_yaml(v)))
                .collect(),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Nested aliases that would expand to 9^9 scalars ("billion laughs").
    fn alias_bomb() -> String {
        let mut text = "a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n".to_string();
        for (name, previous) in ["b", "c", "d", "e", "f", "g", "h", "i"]
            .iter()
            .zip("abcdefgh".chars())
        {
            let aliases = vec![format!("*{previous}"); 9].join(", ");
            text.push_str(&format!("{name}: &{name} [{aliases}]\n"));
        }
        text
    }

    #[test]
    fn manifests_and_kubeconfigs_are_read_within_the_bounds() {
        let err = load(&alias_bomb()).unwrap_err().to_string();
        assert!(
            err.contains("at most 100000 nodes") && err.contains("`*e`"),
            "{err}"
        );
        let deep = format!("{}x\n", "- ".repeat(100_000));
        let err = load(&deep).unwrap_err().to_string();
        assert!(err.contains("at most 128 levels"), "{err}");
        let docs = load("a: &x 1\nb: *x\n---\nc: 2\n").unwrap();
        assert_eq!(docs.len(), 2);
        assert_eq!(to_json(&docs[0]), json!({"a": 1, "b": 1}));
    }
}
