//! A YAML tree that remembers where every node came from, read within
//! bounds.
//!
//! serde deserialisers stop at the first error and forget positions; validation
//! must report every error with `file:line:column`, so the stack file is first
//! read into this tree and then decoded by hand (see `decode.rs`).
//!
//! YAML aliases repeat their anchor's whole node, so a few hundred bytes of
//! nested aliases ("billion laughs") expand to billions of nodes; and
//! yaml_rust2's own loaders recurse once per level of nesting. Every YAML
//! text `stack` reads (the stack file here, manifests and kubeconfigs through
//! [`check`]) is therefore read one event at a time against [`MAX_DEPTH`],
//! [`MAX_ALIASES`] and the size of what aliases repeat.

use std::collections::HashMap;

use yaml_rust2::parser::{Event, Parser};
use yaml_rust2::scanner::{Marker, TScalarStyle};

/// How deep mappings and lists may nest.
pub const MAX_DEPTH: usize = 128;
/// How many aliases (`*name`) one text may use.
pub const MAX_ALIASES: usize = 1000;
/// How many nodes all aliases together may repeat (an alias of a list of
/// ten scalars repeats eleven), and how many all anchored nodes may hold
/// (each is copied to be repeated).
pub const MAX_REPEATED_NODES: usize = 100_000;
/// The same for the bytes of their scalars.
pub const MAX_REPEATED_TEXT: usize = 1 << 20;

/// A 1-based line and column in the stack file.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct Pos {
    pub line: usize,
    pub column: usize,
}

impl Pos {
    fn from_marker(mark: Marker) -> Self {
        Pos {
            line: mark.line(),
            column: mark.col() + 1,
        }
    }
}

/// One node of the document with its position.
#[derive(Clone, Debug, PartialEq)]
pub struct Node {
    pub pos: Pos,
    pub value: Value,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    Null,
    /// A scalar as written; `quoted` scalars are always strings.
    Scalar {
        text: String,
        quoted: bool,
    },
    Seq(Vec<Node>),
    /// Keys keep their own positions so unknown keys point at the key.
    Map(Vec<(Node, Node)>),
}

impl Node {
    /// What a user would call this node's type, for "expected X, found Y" messages.
    pub fn kind_name(&self) -> String {
        match &self.value {
            Value::Null => "nothing".to_string(),
            Value::Scalar { text, quoted } => {
                let text = shown(text);
                if *quoted {
                    format!("the string \"{text}\"")
                } else {
                    format!("`{text}`")
                }
            }
            Value::Seq(_) => "a list".to_string(),
            Value::Map(_) => "a mapping".to_string(),
        }
    }
}

/// How many characters of a scalar messages show.
const SHOWN_CHARACTERS: usize = 60;

/// A scalar as messages show it: control characters escaped (a terminal
/// would act on them), a long one cut short with its length.
pub fn shown(text: &str) -> String {
    let mut out = String::new();
    for (i, c) in text.chars().enumerate() {
        if i == SHOWN_CHARACTERS {
            out.push_str(&format!("… ({} characters)", text.chars().count()));
            break;
        }
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

/// A syntax error or a bound passed, with its position, in the words of a
/// diagnostic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyntaxError {
    pub pos: Pos,
    pub expected: String,
    pub found: String,
}

impl std::fmt::Display for SyntaxError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "line {} column {}: expected {}, found {}",
            self.pos.line, self.pos.column, self.expected, self.found
        )
    }
}

/// Whether a text may hold more than one document (`---`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Documents {
    One,
    Many,
}

/// What one open mapping or list holds so far, for the size of its anchor.
struct Open {
    anchor: usize,
    pos: Pos,
    size: Size,
}

/// The nodes and scalar bytes of a node and everything in it.
#[derive(Clone, Copy, Default)]
struct Size {
    nodes: usize,
    text: usize,
}

/// What has been read so far against the bounds.
struct Budget<'t> {
    text: &'t str,
    documents: Documents,
    seen_document: bool,
    open: Vec<Open>,
    anchors: HashMap<usize, Size>,
    aliases: usize,
    /// What aliases have repeated.
    repeated: Size,
    /// What anchored nodes hold.
    anchored: Size,
}

impl Budget<'_> {
    fn add(&mut self, size: Size) {
        if let Some(open) = self.open.last_mut() {
            open.size.nodes += size.nodes;
            open.size.text += size.text;
        }
    }

    fn anchored(&mut self, anchor: usize, size: Size, pos: Pos) -> Result<(), SyntaxError> {
        if anchor > 0 {
            self.anchors.insert(anchor, size);
            let what = "anchored nodes that hold";
            within(&mut self.anchored, size, pos, what, || {
                "this one".to_string()
            })?;
        }
        Ok(())
    }

    /// Checks one event before it is handed on.
    fn check(&mut self, event: &Event, mark: Marker) -> Result<(), SyntaxError> {
        let pos = Pos::from_marker(mark);
        match event {
            Event::DocumentStart => {
                if self.seen_document && self.documents == Documents::One {
                    return Err(SyntaxError {
                        pos,
                        expected: "one YAML document (a stack file is one mapping)".to_string(),
                        found: "a second document".to_string(),
                    });
                }
                self.seen_document = true;
            }
            Event::Scalar(text, _, anchor, _) => {
                let size = Size {
                    nodes: 1,
                    text: text.len(),
                };
                self.add(size);
                self.anchored(*anchor, size, pos)?;
            }
            Event::SequenceStart(anchor, _) | Event::MappingStart(anchor, _) => {
                if self.open.len() == MAX_DEPTH {
                    return Err(SyntaxError {
                        pos,
                        expected: format!(
                            "at most {MAX_DEPTH} levels of nested mappings and lists"
                        ),
                        found: "one more".to_string(),
                    });
                }
                self.open.push(Open {
                    anchor: *anchor,
                    pos,
                    size: Size { nodes: 1, text: 0 },
                });
            }
            Event::SequenceEnd | Event::MappingEnd => {
                if let Some(closed) = self.open.pop() {
                    self.add(closed.size);
                    self.anchored(closed.anchor, closed.size, closed.pos)?;
                }
            }
            Event::Alias(anchor) => {
                self.aliases += 1;
                let text = self.text;
                let name = move || alias_name(text, mark);
                if self.aliases > MAX_ALIASES {
                    return Err(SyntaxError {
                        pos,
                        expected: format!("at most {MAX_ALIASES} aliases"),
                        found: format!("`{}`, alias number {}", name(), self.aliases),
                    });
                }
                // An alias inside its own anchor's node is an error later.
                let size = self
                    .anchors
                    .get(anchor)
                    .copied()
                    .unwrap_or(Size { nodes: 1, text: 0 });
                self.add(size);
                let what = "aliases that repeat";
                within(&mut self.repeated, size, pos, what, || {
                    format!("`{}`", name())
                })?;
            }
            Event::Nothing | Event::StreamStart | Event::StreamEnd | Event::DocumentEnd => {}
        }
        Ok(())
    }
}

/// Adds `size` to `total`, refusing a total past the bounds.
fn within(
    total: &mut Size,
    size: Size,
    pos: Pos,
    what: &str,
    culprit: impl Fn() -> String,
) -> Result<(), SyntaxError> {
    total.nodes += size.nodes;
    total.text += size.text;
    if total.nodes > MAX_REPEATED_NODES {
        return Err(SyntaxError {
            pos,
            expected: format!("{what} at most {MAX_REPEATED_NODES} nodes in all"),
            found: format!("{}, which brings them to {}", culprit(), total.nodes),
        });
    }
    if total.text > MAX_REPEATED_TEXT {
        return Err(SyntaxError {
            pos,
            expected: format!(
                "{what} at most {} MiB of text in all",
                MAX_REPEATED_TEXT >> 20
            ),
            found: format!("{}, which brings them to {} bytes", culprit(), total.text),
        });
    }
    Ok(())
}

/// The alias as written at `mark` (`*name`), for messages.
fn alias_name(text: &str, mark: Marker) -> String {
    let rest: String = text
        .chars()
        .skip(mark.index())
        .take_while(|c| !c.is_whitespace() && !matches!(c, ',' | '[' | ']' | '{' | '}'))
        .take(80)
        .collect();
    if rest.starts_with('*') {
        rest
    } else {
        "an alias".to_string()
    }
}

/// Reads `text` one event at a time, handing each to `each` once it is
/// within the bounds; stops at the first syntax error or bound passed.
pub fn read_events(
    text: &str,
    documents: Documents,
    mut each: impl FnMut(Event, Marker),
) -> Result<(), SyntaxError> {
    let mut budget = Budget {
        text,
        documents,
        seen_document: false,
        open: Vec::new(),
        anchors: HashMap::new(),
        aliases: 0,
        repeated: Size::default(),
        anchored: Size::default(),
    };
    let mut parser = Parser::new_from_str(text);
    loop {
        let (event, mark) = parser.next_token().map_err(|err| SyntaxError {
            pos: Pos::from_marker(*err.marker()),
            expected: "valid YAML".to_string(),
            found: err.info().to_string(),
        })?;
        if event == Event::StreamEnd {
            return Ok(());
        }
        budget.check(&event, mark)?;
        each(event, mark);
    }
}

/// Whether a YAML text of any number of documents is within the bounds,
/// before a loader that does not check them (yaml_rust2's `YamlLoader`)
/// reads it.
pub fn check(text: &str) -> Result<(), SyntaxError> {
    read_events(text, Documents::Many, |_, _| {})
}

#[derive(Default)]
struct TreeBuilder {
    stack: Vec<Frame>,
    anchors: Vec<(usize, Node)>,
    root: Option<Node>,
    error: Option<SyntaxError>,
}

enum Frame {
    Seq(Node, usize),
    Map(Node, usize, Option<Node>),
}

impl TreeBuilder {
    fn push_value(&mut self, node: Node) {
        match self.stack.last_mut() {
            None => {
                if self.root.is_none() {
                    self.root = Some(node);
                }
            }
            Some(Frame::Seq(seq, _)) => {
                if let Value::Seq(items) = &mut seq.value {
                    items.push(node);
                }
            }
            Some(Frame::Map(map, _, pending_key)) => match pending_key.take() {
                None => *pending_key = Some(node),
                Some(key) => {
                    if let Value::Map(entries) = &mut map.value {
                        entries.push((key, node));
                    }
                }
            },
        }
    }

    fn remember_anchor(&mut self, anchor: usize, node: &Node) {
        if anchor > 0 {
            self.anchors.push((anchor, node.clone()));
        }
    }
}

impl TreeBuilder {
    fn on_event(&mut self, event: Event, mark: Marker) {
        let pos = Pos::from_marker(mark);
        match event {
            Event::Scalar(text, style, anchor, _tag) => {
                let quoted = !matches!(style, TScalarStyle::Plain);
                let value =
                    if !quoted && matches!(text.as_str(), "" | "~" | "null" | "Null" | "NULL") {
                        Value::Null
                    } else {
                        Value::Scalar { text, quoted }
                    };
                let node = Node { pos, value };
                self.remember_anchor(anchor, &node);
                self.push_value(node);
            }
            Event::SequenceStart(anchor, _) => self.stack.push(Frame::Seq(
                Node {
                    pos,
                    value: Value::Seq(Vec::new()),
                },
                anchor,
            )),
            Event::MappingStart(anchor, _) => self.stack.push(Frame::Map(
                Node {
                    pos,
                    value: Value::Map(Vec::new()),
                },
                anchor,
                None,
            )),
            Event::SequenceEnd | Event::MappingEnd => {
                let (node, anchor) = match self.stack.pop() {
                    Some(Frame::Seq(node, anchor)) | Some(Frame::Map(node, anchor, _)) => {
                        (node, anchor)
                    }
                    None => return,
                };
                // Point a collection at its first entry: the start marks of
                // block collections fall after the first key.
                let mut node = node;
                match &node.value {
                    Value::Map(entries) if !entries.is_empty() => {
                        node.pos = node.pos.min(entries[0].0.pos)
                    }
                    Value::Seq(items) if !items.is_empty() => node.pos = node.pos.min(items[0].pos),
                    _ => {}
                }
                self.remember_anchor(anchor, &node);
                self.push_value(node);
            }
            Event::Alias(anchor) => {
                let found = self
                    .anchors
                    .iter()
                    .rev()
                    .find(|(id, _)| *id == anchor)
                    .map(|(_, node)| node.clone());
                match found {
                    Some(node) => self.push_value(node),
                    None => {
                        self.error.get_or_insert(SyntaxError {
                            pos,
                            expected: "an alias of a node written before it".to_string(),
                            found: "an alias inside its own anchor's node".to_string(),
                        });
                    }
                }
            }
            Event::Nothing
            | Event::StreamStart
            | Event::StreamEnd
            | Event::DocumentStart
            | Event::DocumentEnd => {}
        }
    }
}

/// Parses one YAML document into a positioned tree. An empty file is `Null`.
pub fn parse(text: &str) -> Result<Node, SyntaxError> {
    let mut builder = TreeBuilder::default();
    read_events(text, Documents::One, |event, mark| {
        builder.on_event(event, mark)
    })?;
    if let Some(error) = builder.error {
        return Err(error);
    }
    Ok(builder.root.unwrap_or(Node {
        pos: Pos { line: 1, column: 1 },
        value: Value::Null,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_point_at_keys_and_values() {
        let root = parse("name: demo\nnodes:\n  - name: a\n    count: 2\n").unwrap();
        let Value::Map(entries) = &root.value else {
            panic!("root is not a map")
        };
        assert_eq!(entries[0].0.pos, Pos { line: 1, column: 1 });
        assert_eq!(entries[0].1.pos, Pos { line: 1, column: 7 });
        let Value::Seq(items) = &entries[1].1.value else {
            panic!("nodes is not a list")
        };
        let Value::Map(group) = &items[0].value else {
            panic!("group is not a map")
        };
        assert_eq!(group[1].0.pos, Pos { line: 4, column: 5 });
    }

    #[test]
    fn syntax_errors_have_positions() {
        let err = parse("a: [1, 2\nb: 3\n").unwrap_err();
        assert!(err.pos.line >= 1, "{err:?}");
    }

    #[test]
    fn quoted_scalars_are_strings_and_null_is_null() {
        let root = parse("a: \"1\"\nb: ~\n").unwrap();
        let Value::Map(entries) = &root.value else {
            panic!()
        };
        assert_eq!(
            entries[0].1.value,
            Value::Scalar {
                text: "1".into(),
                quoted: true
            }
        );
        assert_eq!(entries[1].1.value, Value::Null);
    }
}
