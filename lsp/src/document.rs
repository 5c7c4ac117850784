//! An open document: its text, line starts, and its tree-sitter tree, edited incrementally.
//! Positions arrive in the negotiated encoding (UTF-16 code units by default, UTF-8 bytes or UTF-32
//! code points when negotiated) and are converted to byte offsets here.
use tree_sitter::{InputEdit, Parser, Point, Tree};

use crate::syntax::Language;
use crate::text::floor_char_boundary;

/// Documents larger than this are not parsed (indentation rules only), to keep edits cheap.
pub const MAX_PARSED_BYTES: usize = 1 << 20;

/// How LSP counts characters within a line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    /// Bytes.
    Utf8,
    /// UTF-16 code units (the LSP default).
    Utf16,
    /// Unicode scalar values.
    Utf32,
}

/// A position that does not exist in the document.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadPosition(pub String);

/// One open document.
pub struct Document {
    text: String,
    line_starts: Vec<usize>,
    /// The language, which decides the grammar.
    pub language: Language,
    parser: Option<Parser>,
    tree: Option<Tree>,
    /// The version the client last sent.
    pub version: i32,
}

/// Whether a parse may start from the old tree (edited in step with the text) or reads it all.
#[derive(Debug, Clone, Copy)]
enum Reparse {
    Whole,
    FromEditedTree,
}

impl Document {
    /// Opens `text`, parsing it when the language has a grammar and the text is not too large.
    pub fn new(text: String, language: Language, version: i32) -> Document {
        let mut document = Document {
            line_starts: line_starts(&text),
            text,
            language,
            parser: language.parser(),
            tree: None,
            version,
        };
        document.reparse(Reparse::Whole);
        document
    }

    /// The text.
    pub fn text(&self) -> &str {
        &self.text
    }

    /// The current tree, if the document is parsed.
    pub fn tree(&self) -> Option<&Tree> {
        self.tree.as_ref()
    }

    /// Replaces the whole text.
    pub fn replace_all(&mut self, text: String) {
        self.text = text;
        self.line_starts = line_starts(&self.text);
        self.reparse(Reparse::Whole);
    }

    /// Replaces the range `start..end` (LSP positions, clamped to the document) with `new_text`, and
    /// edits the tree to match before reparsing it incrementally.
    pub fn edit(&mut self, start: (u32, u32), end: (u32, u32), new_text: &str, encoding: Encoding) {
        let start_byte = self.offset_clamped(start, encoding);
        let end_byte = self.offset_clamped(end, encoding).max(start_byte);
        let start_point = self.point(start_byte);
        let old_end_point = self.point(end_byte);
        self.text.replace_range(start_byte..end_byte, new_text);
        let new_end_byte = start_byte + new_text.len();
        // Lines inside the old range go, the new text's lines come in, later ones shift.
        let delta = new_text.len() as isize - (end_byte - start_byte) as isize;
        let tail: Vec<usize> =
            self.line_starts[old_end_point.row + 1..].iter().map(|&s| (s as isize + delta) as usize).collect();
        self.line_starts.truncate(start_point.row + 1);
        self.line_starts.extend(new_text.match_indices('\n').map(|(i, _)| start_byte + i + 1));
        self.line_starts.extend(tail);
        let new_end_point = self.point(new_end_byte);
        if let Some(tree) = self.tree.as_mut() {
            tree.edit(&InputEdit {
                start_byte,
                old_end_byte: end_byte,
                new_end_byte,
                start_position: start_point,
                old_end_position: old_end_point,
                new_end_position: new_end_point,
            });
        }
        self.reparse(Reparse::FromEditedTree);
    }

    fn reparse(&mut self, how: Reparse) {
        let Some(parser) = self.parser.as_mut() else {
            return;
        };
        if self.text.len() > MAX_PARSED_BYTES || self.text.as_bytes().contains(&0) {
            self.tree = None;
            return;
        }
        let old = match how {
            Reparse::FromEditedTree => self.tree.as_ref(),
            Reparse::Whole => None,
        };
        self.tree = parser.parse(&self.text, old);
    }

    fn point(&self, byte: usize) -> Point {
        let row = self.line_starts.partition_point(|&start| start <= byte) - 1;
        Point { row, column: byte - self.line_starts[row] }
    }

    /// The byte offset of an LSP position, or an error when the line does not exist or the
    /// character falls inside a multi-unit character. A character past the line's end means its end.
    pub fn offset(&self, (line, character): (u32, u32), encoding: Encoding) -> Result<usize, BadPosition> {
        let line = line as usize;
        let Some(&start) = self.line_starts.get(line) else {
            return Err(BadPosition(format!("line {line} is past the end ({} lines)", self.line_starts.len())));
        };
        let end = self.line_starts.get(line + 1).map_or(self.text.len(), |&next| next - 1);
        let text = &self.text[start..end];
        let text = text.strip_suffix('\r').unwrap_or(text);
        let mut units = 0usize;
        let target = character as usize;
        for (index, c) in text.char_indices() {
            if units == target {
                return Ok(start + index);
            }
            units += match encoding {
                Encoding::Utf8 => c.len_utf8(),
                Encoding::Utf16 => c.len_utf16(),
                Encoding::Utf32 => 1,
            };
            if units > target {
                return Err(BadPosition(format!("line {line}, character {character} is inside a character")));
            }
        }
        Ok(start + text.len())
    }

    /// Like [`offset`](Self::offset), clamped into the document (edits must always apply).
    pub fn offset_clamped(&self, position: (u32, u32), encoding: Encoding) -> usize {
        match self.offset(position, encoding) {
            Ok(offset) => offset,
            Err(_) if position.0 as usize >= self.line_starts.len() => self.text.len(),
            // Inside a character: its start.
            Err(_) => {
                let offset = self.offset((position.0, position.1.saturating_sub(1)), encoding).unwrap_or(0);
                floor_char_boundary(&self.text, offset)
            }
        }
    }

    /// The LSP position of a byte offset.
    pub fn position(&self, offset: usize, encoding: Encoding) -> (u32, u32) {
        let point = self.point(offset.min(self.text.len()));
        let line = &self.text[self.line_starts[point.row]..self.line_starts[point.row] + point.column];
        let character = match encoding {
            Encoding::Utf8 => line.len(),
            Encoding::Utf16 => line.encode_utf16().count(),
            Encoding::Utf32 => line.chars().count(),
        };
        (point.row as u32, character as u32)
    }
}

fn line_starts(text: &str) -> Vec<usize> {
    std::iter::once(0).chain(text.match_indices('\n').map(|(i, _)| i + 1)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Applies `edits` (start, end, text) in `encoding` to `initial` and compares with `expected`;
    /// the incrementally edited tree must equal a fresh parse.
    /// (start, end, new text) in LSP positions.
    type Edit<'a> = ((u32, u32), (u32, u32), &'a str);

    fn check(initial: &str, edits: &[Edit], encoding: Encoding, expected: &str) {
        let mut document = Document::new(initial.to_string(), Language::Python, 0);
        for &(start, end, text) in edits {
            document.edit(start, end, text, encoding);
        }
        assert_eq!(document.text(), expected);
        assert_eq!(document.line_starts, line_starts(expected));
        let fresh = Document::new(expected.to_string(), Language::Python, 0);
        assert_eq!(
            document.tree().unwrap().root_node().to_sexp(),
            fresh.tree().unwrap().root_node().to_sexp(),
            "incremental parse differs"
        );
    }

    #[test]
    fn edits_in_every_encoding() {
        // "é" is 2 UTF-8 bytes, 1 UTF-16 unit; "😀" is 4 bytes, 2 UTF-16 units, 1 scalar.
        let text = "s = 'é😀x'\ny = 1\n";
        check(text, &[((0, 8), (0, 9), "z")], Encoding::Utf16, "s = 'é😀z'\ny = 1\n");
        check(text, &[((0, 11), (0, 12), "z")], Encoding::Utf8, "s = 'é😀z'\ny = 1\n");
        check(text, &[((0, 7), (0, 8), "z")], Encoding::Utf32, "s = 'é😀z'\ny = 1\n");
        check(
            text,
            &[((1, 0), (1, 0), "def f():\n    pass\n")],
            Encoding::Utf16,
            "s = 'é😀x'\ndef f():\n    pass\ny = 1\n",
        );
        check(text, &[((0, 0), (2, 0), "")], Encoding::Utf16, "");
        // Past the end of a line or the document: clamped.
        check("ab\ncd", &[((0, 99), (1, 1), "X")], Encoding::Utf16, "abXd");
        check("ab", &[((7, 0), (9, 0), "!")], Encoding::Utf16, "ab!");
        check(
            "x = 1\n",
            &[((0, 4), (0, 5), "2"), ((0, 5), (0, 5), " + 3"), ((1, 0), (1, 0), "y = x\n")],
            Encoding::Utf16,
            "x = 2 + 3\ny = x\n",
        );
    }

    #[test]
    fn positions_inside_a_character_are_rejected() {
        let document = Document::new("a😀b\n".to_string(), Language::Other, 0);
        assert_eq!(document.offset((0, 1), Encoding::Utf16), Ok(1));
        assert!(document.offset((0, 2), Encoding::Utf16).is_err(), "inside the surrogate pair");
        assert_eq!(document.offset((0, 3), Encoding::Utf16), Ok(5));
        assert!(document.offset((0, 3), Encoding::Utf8).is_err());
        assert_eq!(document.offset((0, 2), Encoding::Utf32), Ok(5));
        assert!(document.offset((5, 0), Encoding::Utf16).is_err());
        assert_eq!(document.position(5, Encoding::Utf16), (0, 3));
        assert_eq!(document.position(5, Encoding::Utf8), (0, 5));
    }
}
