//! The stack file as bytes before it is YAML: within the size limit, UTF-8
//! (a UTF-8 byte-order mark is dropped, UTF-16 is named as such) and free of
//! control characters, each problem at its line and column. The YAML parser
//! reports neither well: a Latin-1 byte had no position, a NUL ended the
//! document early ("provider missing").

use super::yaml::Pos;
use crate::diag::Diagnostics;

/// The largest stack file read; a stack file is a few KB.
pub const MAX_FILE_SIZE: usize = 1 << 20;

/// How many control characters are reported one by one; the rest are counted.
const CONTROLS_SHOWN: usize = 10;

/// Where byte `offset` of `bytes` is: lines counted by `\n`, columns in
/// characters, as the YAML parser counts them.
fn position(bytes: &[u8], offset: usize) -> Pos {
    let before = &bytes[..offset];
    let line_start = before
        .iter()
        .rposition(|b| *b == b'\n')
        .map_or(0, |i| i + 1);
    Pos {
        line: before.iter().filter(|b| **b == b'\n').count() + 1,
        column: before[line_start..]
            .iter()
            .filter(|b| (**b & 0xC0) != 0x80)
            .count()
            + 1,
    }
}

/// The bytes of a stack file as text, or `None` with the reason in `diags`.
pub fn from_bytes<'b>(bytes: &'b [u8], diags: &mut Diagnostics) -> Option<&'b str> {
    if bytes.len() > MAX_FILE_SIZE {
        diags.push(
            position(bytes, MAX_FILE_SIZE),
            "",
            format!(
                "a stack file of at most {} MiB (a stack file is a few KB)",
                MAX_FILE_SIZE >> 20
            ),
            "more: the limit is passed here",
        );
        return None;
    }
    let order_mark = match bytes {
        [0xFF, 0xFE, ..] => Some("FF FE"),
        [0xFE, 0xFF, ..] => Some("FE FF"),
        _ => None,
    };
    if let Some(mark) = order_mark {
        diags.push(
            Pos { line: 1, column: 1 },
            "",
            "UTF-8 text",
            format!("UTF-16 (its byte-order mark {mark}): save the file as UTF-8"),
        );
        return None;
    }
    match std::str::from_utf8(bytes) {
        Ok(text) => Some(text),
        Err(err) => {
            let offset = err.valid_up_to();
            diags.push(
                position(bytes, offset),
                "",
                "UTF-8 text",
                format!(
                    "the byte 0x{:02X} at offset {offset}, which is not UTF-8 (is the file Latin-1 or another 8-bit encoding? save it as UTF-8)",
                    bytes[offset]
                ),
            );
            None
        }
    }
}

/// Control characters a stack file may hold: tab and line breaks.
pub fn is_allowed_control(c: char) -> bool {
    matches!(c, '\t' | '\n' | '\r')
}

/// How a control character is named in messages.
pub fn control_name(c: char) -> String {
    if c == '\0' {
        "a NUL byte (U+0000)".to_string()
    } else {
        format!("the control character U+{:04X}", u32::from(c))
    }
}

/// The text without a leading UTF-8 byte-order mark, or `None` if it holds
/// control characters, each reported in `diags`.
pub fn printable<'t>(text: &'t str, diags: &mut Diagnostics) -> Option<&'t str> {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let mut pos = Pos { line: 1, column: 1 };
    let mut found = 0usize;
    let mut first_unshown = None;
    for c in text.chars() {
        if c.is_control() && !is_allowed_control(c) {
            found += 1;
            if found <= CONTROLS_SHOWN {
                diags.push(
                    pos,
                    "",
                    "text without control characters (tab and line breaks are the only ones allowed)",
                    control_name(c),
                );
            } else if first_unshown.is_none() {
                first_unshown = Some(pos);
            }
        }
        if c == '\n' {
            pos = Pos {
                line: pos.line + 1,
                column: 1,
            };
        } else {
            pos.column += 1;
        }
    }
    if let Some(pos) = first_unshown {
        diags.push(
            pos,
            "",
            "text without control characters (tab and line breaks are the only ones allowed)",
            format!("{} more from here on", found - CONTROLS_SHOWN),
        );
    }
    (found == 0).then_some(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_count_lines_and_characters() {
        let bytes = b"ab\n\xc3\xa7d\xff";
        assert_eq!(position(bytes, 0), Pos { line: 1, column: 1 });
        assert_eq!(position(bytes, 3), Pos { line: 2, column: 1 });
        // `ç` is two bytes and one column.
        assert_eq!(position(bytes, 6), Pos { line: 2, column: 3 });
    }

    #[test]
    fn a_utf8_byte_order_mark_is_dropped() {
        let mut diags = Diagnostics::new("s.yaml");
        assert_eq!(printable("\u{feff}a: 1\n", &mut diags), Some("a: 1\n"));
        assert!(diags.is_empty());
    }

    #[test]
    fn control_characters_past_the_tenth_are_counted_in_one_diagnostic() {
        let mut diags = Diagnostics::new("s.yaml");
        assert_eq!(printable(&"\u{7}".repeat(12), &mut diags), None);
        let diags = diags.into_sorted();
        assert_eq!(diags.len(), 11);
        assert_eq!(diags[10].column, 11);
        assert_eq!(diags[10].found, "2 more from here on");
    }
}
