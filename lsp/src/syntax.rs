//! What kind of completion the cursor calls for, decided from the tree-sitter tree where the language
//! has a grammar and from indentation elsewhere: none (the cursor is inside an identifier), the rest
//! of the line, or a multi-line body (the cursor is in an empty block). Also the rules that end a
//! multi-line completion once its block is complete (indentation and brackets, with tree-sitter telling
//! which of them are inside strings and comments), and the trimming of text that repeats the suffix.
use tree_sitter::{InputEdit, Node, Parser, Point, Tree};

use crate::text::{floor_char_boundary, is_word_char};

/// A language the server knows by name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Language {
    /// Python.
    Python,
    /// Rust.
    Rust,
    /// JavaScript (and JSX).
    JavaScript,
    /// TypeScript.
    TypeScript,
    /// TSX.
    Tsx,
    /// Go.
    Go,
    /// C.
    C,
    /// C++.
    Cpp,
    /// Java.
    Java,
    /// Anything else: indentation rules only.
    Other,
}

impl Language {
    /// From an LSP `languageId`, falling back on the file extension of `uri`.
    pub fn detect(language_id: &str, uri: &str) -> Language {
        let by_id = match language_id {
            "python" => Some(Language::Python),
            "rust" => Some(Language::Rust),
            "javascript" | "javascriptreact" => Some(Language::JavaScript),
            "typescript" => Some(Language::TypeScript),
            "typescriptreact" => Some(Language::Tsx),
            "go" => Some(Language::Go),
            "c" => Some(Language::C),
            "cpp" | "c++" => Some(Language::Cpp),
            "java" => Some(Language::Java),
            _ => None,
        };
        by_id.unwrap_or_else(|| {
            let extension = uri.rsplit('.').next().unwrap_or("");
            match extension {
                "py" | "pyi" => Language::Python,
                "rs" => Language::Rust,
                "js" | "mjs" | "cjs" | "jsx" => Language::JavaScript,
                "ts" | "mts" | "cts" => Language::TypeScript,
                "tsx" => Language::Tsx,
                "go" => Language::Go,
                "c" | "h" => Language::C,
                "cc" | "cpp" | "cxx" | "hpp" | "hh" | "hxx" => Language::Cpp,
                "java" => Language::Java,
                _ => Language::Other,
            }
        })
    }

    /// The tree-sitter grammar, if there is one.
    pub fn grammar(self) -> Option<tree_sitter::Language> {
        Some(match self {
            Language::Python => tree_sitter_python::LANGUAGE.into(),
            Language::Rust => tree_sitter_rust::LANGUAGE.into(),
            Language::JavaScript => tree_sitter_javascript::LANGUAGE.into(),
            Language::TypeScript => tree_sitter_typescript::LANGUAGE_TYPESCRIPT.into(),
            Language::Tsx => tree_sitter_typescript::LANGUAGE_TSX.into(),
            Language::Go => tree_sitter_go::LANGUAGE.into(),
            Language::C => tree_sitter_c::LANGUAGE.into(),
            Language::Cpp => tree_sitter_cpp::LANGUAGE.into(),
            Language::Java => tree_sitter_java::LANGUAGE.into(),
            Language::Other => return None,
        })
    }

    /// A parser for this language, if it has a grammar.
    pub fn parser(self) -> Option<Parser> {
        let mut parser = Parser::new();
        parser.set_language(&self.grammar()?).ok()?;
        Some(parser)
    }

    /// Blocks are delimited by indentation rather than braces.
    fn indented(self) -> bool {
        matches!(self, Language::Python | Language::Other)
    }
}

/// What to generate at the cursor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Nothing: the cursor is inside a word.
    Skip,
    /// The rest of the current line.
    SingleLine,
    /// A block body: several lines, until the block is complete.
    MultiLine,
}

/// The decision and what the block-complete rule needs: the indentation (in columns) that every
/// line of the body has; a line indented less ends the completion.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    /// What to generate.
    pub mode: Mode,
    /// Indentation of the block the cursor is in.
    pub block_indent: usize,
}

/// Node kinds whose descendants are inside a string or comment: complete the line only.
const TEXT_KINDS: &[&str] = &[
    "string",
    "string_literal",
    "string_content",
    "raw_string_literal",
    "template_string",
    "interpreted_string_literal",
    "comment",
    "line_comment",
    "block_comment",
    "char_literal",
    "character_literal",
];

/// Characters that may open a string or a comment in some grammar.
const TEXT_OPENERS: [char; 5] = ['"', '\'', '`', '#', '/'];

/// Node kinds that hold a block of statements or members.
const BLOCK_KINDS: &[&str] = &[
    "block",
    "compound_statement",
    "statement_block",
    "declaration_list",
    "field_declaration_list",
    "class_body",
    "interface_body",
    "enum_body",
    "constructor_body",
    "switch_block",
    "object",
    "function_body",
];

/// Decides what to complete at byte `offset` of `text`; `tree` is the document's current tree.
pub fn decide(language: Language, text: &str, tree: Option<&Tree>, offset: usize) -> Decision {
    let offset = floor_char_boundary(text, offset);
    let line_start = text[..offset].rfind('\n').map_or(0, |i| i + 1);
    let line_end = text[offset..].find('\n').map_or(text.len(), |i| offset + i);
    let before = &text[line_start..offset];
    let after = &text[offset..line_end];
    let current_indent = indent_width(before);
    let single = Decision { mode: Mode::SingleLine, block_indent: current_indent };
    if after.chars().next().is_some_and(is_word_char) {
        return Decision { mode: Mode::Skip, block_indent: current_indent };
    }
    if let Some(tree) = tree {
        if inside_text(tree.root_node(), offset) {
            return single;
        }
    }
    let blank_before = before.trim().is_empty();
    let blank_after = after.trim().is_empty() || (!language.indented() && after.trim().starts_with(['}', ')']));
    let opener = previous_opener(language, text, line_start, before);
    if blank_before && blank_after {
        // An empty line: multi-line when it is the (so far empty) body of a block.
        if let Some(opener_indent) = opener {
            let next = next_code_line_indent(text, line_end);
            let empty_body = next.is_none_or(|next| next <= opener_indent);
            let tree_empty = tree.is_none_or(|tree| block_is_empty(tree.root_node(), offset));
            if empty_body || tree_empty {
                let indent = current_indent.max(opener_indent + 1);
                return Decision { mode: Mode::MultiLine, block_indent: indent };
            }
        }
        if tree.is_some_and(|tree| block_is_empty(tree.root_node(), offset)) {
            return Decision { mode: Mode::MultiLine, block_indent: current_indent };
        }
        return single;
    }
    // At the end of a line that opens a block: the body.
    if blank_after && ends_with_opener(language, before) {
        let next = next_code_line_indent(text, line_end);
        if next.is_none_or(|next| next <= current_indent) {
            return Decision { mode: Mode::MultiLine, block_indent: current_indent + 1 };
        }
    }
    single
}

/// Columns of leading whitespace (a tab counts as 4).
pub fn indent_width(line: &str) -> usize {
    line.chars().take_while(|c| c.is_whitespace() && *c != '\n').map(|c| if c == '\t' { 4 } else { 1 }).sum()
}

fn ends_with_opener(language: Language, before: &str) -> bool {
    let code = before.trim_end();
    match language {
        Language::Python => code.ends_with(':'),
        Language::Other => code.ends_with(':') || code.ends_with('{'),
        _ => code.ends_with('{'),
    }
}

/// The indentation of the line above when it opens a block (and the cursor line is blank).
fn previous_opener(language: Language, text: &str, line_start: usize, before: &str) -> Option<usize> {
    if !before.trim().is_empty() {
        return None;
    }
    let above = text[..line_start].trim_end_matches(['\n', '\r', ' ', '\t']);
    let start = above.rfind('\n').map_or(0, |i| i + 1);
    let line = &above[start..];
    ends_with_opener(language, line).then(|| indent_width(line))
}

/// The indentation of the next line after `from` that has code, if any.
fn next_code_line_indent(text: &str, from: usize) -> Option<usize> {
    text[from..].split('\n').skip(1).find(|line| !line.trim().is_empty()).map(indent_width)
}

/// The node at `offset` and its ancestors, innermost first.
fn ancestors_at(root: Node, offset: usize) -> impl Iterator<Item = Node> {
    std::iter::successors(root.descendant_for_byte_range(offset, offset), Node::parent)
}

fn inside_text(root: Node, offset: usize) -> bool {
    for node in ancestors_at(root, offset).filter(|node| TEXT_KINDS.contains(&node.kind())) {
        // The cursor right after a closing quote or at the end of a line comment is not inside.
        if node.start_byte() < offset && offset < node.end_byte() {
            return true;
        }
        if offset == node.end_byte()
            && node.kind().contains("comment")
            && !node.utf8_text(&[]).is_ok_and(|t| t.ends_with("*/"))
        {
            return node.kind() != "block_comment";
        }
    }
    false
}

/// Where a window of `text` that should begin near `from` (before `cursor`) starts: the first line
/// start in the first half of `from..cursor` that is not inside a string or comment of `tree`, so
/// that parsing the window alone sees what the document means; `from` itself when there is none.
pub fn window_start(text: &str, tree: Option<&Tree>, from: usize, cursor: usize) -> usize {
    if from == 0 {
        return 0;
    }
    let limit = floor_char_boundary(text, from + (cursor - from) / 2);
    let mut at = from;
    while let Some(newline) = text[at..limit].find('\n') {
        at += newline + 1;
        match tree.and_then(|tree| text_node_end(tree.root_node(), at)) {
            Some(end) if end < limit => at = end,
            Some(_) => break,
            None => return at,
        }
    }
    from
}

/// The end of the string or comment that `offset` lies strictly inside, if any.
fn text_node_end(root: Node, offset: usize) -> Option<usize> {
    ancestors_at(root, offset)
        .find(|node| TEXT_KINDS.contains(&node.kind()) && node.start_byte() < offset && offset < node.end_byte())
        .map(|node| node.end_byte())
}

/// Whether the innermost block around `offset` holds no statements (comments and errors aside).
fn block_is_empty(root: Node, offset: usize) -> bool {
    let block = ancestors_at(root, offset)
        .find(|node| BLOCK_KINDS.contains(&node.kind()) && node.start_byte() < offset && offset <= node.end_byte());
    block.is_some_and(|node| {
        let mut cursor = node.walk();
        let has_code =
            node.named_children(&mut cursor).any(|child| !child.kind().contains("comment") && child.kind() != "ERROR");
        !has_code
    })
}

/// Ends a completion where its block ends. Decoding calls [`cut`](Self::cut) after every token;
/// where the completion holds a quote or comment marker, `prefix + completion` is parsed with
/// tree-sitter (incrementally, as the completion grows) so that brackets and line starts inside
/// strings and comments do not count.
pub struct BlockEnd {
    decision: Decision,
    language: Language,
    prefix: String,
    /// Where the prefix ends, as tree-sitter counts rows and columns.
    prefix_end: Point,
    parser: Option<Parser>,
    /// The last parse and the completion it covered.
    parsed: Option<(Tree, String)>,
}

impl BlockEnd {
    /// The rule for a completion at the end of `prefix` (the text before the cursor).
    pub fn new(decision: Decision, language: Language, prefix: &str) -> BlockEnd {
        let multi_line = decision.mode == Mode::MultiLine;
        let parser = if multi_line { language.parser() } else { None };
        let prefix_end = end_point(Point { row: 0, column: 0 }, prefix);
        BlockEnd { decision, language, prefix: prefix.to_string(), prefix_end, parser, parsed: None }
    }

    /// Where to cut `completion` while it is still being decoded: after its first line for
    /// [`Mode::SingleLine`]; for [`Mode::MultiLine`], before the first later line whose code starts
    /// indented less than the block, or before a line holding the closing bracket of the cursor's
    /// block. `None`: keep going. A last line that is still open is not judged where it may hold an
    /// unfinished string or comment (tree-sitter cannot know yet).
    pub fn cut(&mut self, completion: &str) -> Option<usize> {
        if self.parser.is_none() || !completion.contains(TEXT_OPENERS) {
            return block_end(self.decision, self.language, completion, None);
        }
        let judged = &completion[..completion.rfind('\n').map_or(0, |i| i + 1)];
        let Some((mask, settled)) = self.text_mask(judged) else {
            return block_end(self.decision, self.language, judged, None);
        };
        // A string or comment still open parses as an error: wait until it closes.
        settled.then(|| block_end(self.decision, self.language, judged, Some(&mask))).flatten()
    }

    /// Where to cut the whole, final `completion`.
    pub fn finish(&mut self, completion: &str) -> Option<usize> {
        let mask = self.text_mask(completion).map(|(mask, _)| mask);
        block_end(self.decision, self.language, completion, mask.as_deref())
    }

    /// For each byte of `completion`, whether it lies inside a string or comment (after its opening
    /// delimiter), and whether the completion parsed without errors; `None` when there is no grammar
    /// or nothing that could open a string or comment.
    fn text_mask(&mut self, completion: &str) -> Option<(Vec<bool>, bool)> {
        let parser = self.parser.as_mut()?;
        if !completion.contains(TEXT_OPENERS) {
            return None;
        }
        let base = self.prefix.len();
        let text = format!("{}{completion}", self.prefix);
        let old = self.parsed.take().map(|(mut tree, old_completion)| {
            // The completion grows at its end; decoding may also rewrite its last bytes.
            let same = common_prefix_len(&old_completion, completion);
            let start_position = end_point(self.prefix_end, &completion[..same]);
            tree.edit(&InputEdit {
                start_byte: base + same,
                old_end_byte: base + old_completion.len(),
                new_end_byte: text.len(),
                start_position,
                old_end_position: end_point(start_position, &old_completion[same..]),
                new_end_position: end_point(start_position, &completion[same..]),
            });
            tree
        });
        let tree = parser.parse(&text, old.as_ref())?;
        let mut mask = vec![false; completion.len()];
        let mut settled = true;
        scan(tree.root_node(), base, &mut mask, &mut settled);
        self.parsed = Some((tree, completion.to_string()));
        Some((mask, settled))
    }
}

/// Marks in `mask` (bytes from `base` on) the insides of string and comment nodes, and clears
/// `settled` where an error node reaches past `base` (recovery often starts it at the enclosing
/// statement, in the prefix).
fn scan(node: Node, base: usize, mask: &mut [bool], settled: &mut bool) {
    if node.end_byte() <= base {
        return;
    }
    if node.is_error() {
        *settled = false;
    }
    if TEXT_KINDS.contains(&node.kind()) {
        let from = (node.start_byte() + 1).max(base) - base;
        let to = (node.end_byte() - base).min(mask.len());
        if from < to {
            mask[from..to].fill(true);
        }
        return;
    }
    let mut cursor = node.walk();
    for child in node.children(&mut cursor) {
        scan(child, base, mask, settled);
    }
}

fn common_prefix_len(a: &str, b: &str) -> usize {
    let same = a.bytes().zip(b.bytes()).take_while(|(x, y)| x == y).count();
    floor_char_boundary(b, same)
}

/// Where `text` ends when it starts at `start`.
fn end_point(start: Point, text: &str) -> Point {
    match text.rfind('\n') {
        Some(last) => Point { row: start.row + text.matches('\n').count(), column: text.len() - last - 1 },
        None => Point { row: start.row, column: start.column + text.len() },
    }
}

/// [`BlockEnd::cut`] with the string/comment bytes of `completion` given (`None`: all is code).
fn block_end(decision: Decision, language: Language, completion: &str, text_mask: Option<&[bool]>) -> Option<usize> {
    let is_code = |at: usize| text_mask.is_none_or(|mask| !mask[at]);
    match decision.mode {
        Mode::Skip => Some(0),
        Mode::SingleLine => completion.find('\n'),
        Mode::MultiLine => {
            let mut depth: i64 = 0;
            let mut start = 0;
            for (index, line) in completion.split_inclusive('\n').enumerate() {
                let complete_line = line.ends_with('\n');
                let code = line.trim();
                let first = start + (line.len() - line.trim_start().len());
                if index > 0 && !code.is_empty() && complete_line_or_long(line, complete_line) && is_code(first) {
                    let indent = indent_width(line);
                    if indent < decision.block_indent && !(depth > 0 && code.starts_with(['}', ')', ']'])) {
                        return Some(trim_blank_tail(completion, start));
                    }
                }
                if !language.indented() {
                    for (at, c) in line.char_indices() {
                        if !is_code(start + at) {
                            continue;
                        }
                        match c {
                            '{' | '(' | '[' => depth += 1,
                            '}' | ')' | ']' => depth -= 1,
                            _ => {}
                        }
                    }
                    if depth < 0 {
                        return Some(trim_blank_tail(completion, start));
                    }
                }
                start += line.len();
            }
            None
        }
    }
}

/// A line's indentation is known once it has a non-blank character.
fn complete_line_or_long(line: &str, complete: bool) -> bool {
    complete || !line.trim().is_empty()
}

fn trim_blank_tail(completion: &str, at: usize) -> usize {
    completion[..at].trim_end().len()
}

/// Removes the end of `completion` that repeats what follows the cursor: the rest of the cursor's
/// line (e.g. a closing bracket the editor already has), or whole lines the suffix starts with.
pub fn trim_suffix_overlap<'a>(completion: &'a str, suffix: &str) -> &'a str {
    let line = suffix.split('\n').next().unwrap_or("").trim_end();
    let completion_trimmed = completion.trim_end();
    if !line.is_empty() && completion_trimmed.ends_with(line) {
        return &completion[..completion_trimmed.len() - line.len()];
    }
    // Whole lines: the completion's last lines equal the suffix's first code lines.
    let suffix_lines: Vec<&str> = suffix.lines().map(str::trim_end).skip_while(|l| l.trim().is_empty()).collect();
    let completion_lines: Vec<&str> = completion_trimmed.lines().collect();
    for n in (1..=suffix_lines.len().min(completion_lines.len())).rev() {
        let tail = &completion_lines[completion_lines.len() - n..];
        if tail.iter().map(|l| l.trim_end()).eq(suffix_lines[..n].iter().copied())
            && suffix_lines[..n].iter().any(|l| !l.trim().is_empty())
        {
            let keep: usize = completion_lines[..completion_lines.len() - n].iter().map(|l| l.len() + 1).sum();
            return completion[..keep.min(completion.len())].trim_end();
        }
    }
    completion
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `fixture` marks the cursor with `$0`; parses it with the language's grammar and decides.
    fn check(language: Language, fixture: &str, expected: Mode) {
        let offset = fixture.find("$0").expect("the fixture has a $0 cursor");
        let text = fixture.replace("$0", "");
        let tree = language.parser().map(|mut parser| parser.parse(&text, None).unwrap());
        assert_eq!(language.grammar().is_some(), language != Language::Other);
        let decision = decide(language, &text, tree.as_ref(), offset);
        assert_eq!(decision.mode, expected, "{language:?}:\n{fixture}");
    }

    #[test]
    fn decisions_per_language() {
        use Language::*;
        use Mode::*;
        let cases: &[(Language, &str, Mode)] = &[
            // Python
            (Python, "def add(a, b):\n    $0\n", MultiLine),
            (Python, "def add(a, b):$0\n", MultiLine),
            (Python, "def add(a, b):\n    return a + b\n\nx = ad$0d(1, 2)\n", Skip),
            (Python, "x = $0\n", SingleLine),
            (Python, "x = foo($0)\n", SingleLine),
            (Python, "s = \"hello $0 world\"\n", SingleLine),
            (Python, "# a comment $0\nx = 1\n", SingleLine),
            (Python, "def f():\n    x = 1\n    $0\n    return x\n", SingleLine),
            (Python, "class A:\n    def f(self):\n        $0\n\nclass B:\n    pass\n", MultiLine),
            // Rust
            (Rust, "fn main() {\n    $0\n}\n", MultiLine),
            (Rust, "fn main() {$0}\n", MultiLine),
            (Rust, "fn main() {\n    let x = va$0lue;\n}\n", Skip),
            (Rust, "fn main() {\n    let x = $0;\n}\n", SingleLine),
            (Rust, "fn main() {\n    let a = 1;\n    $0\n    let b = 2;\n}\n", SingleLine),
            (Rust, "// note: $0\nfn f() {}\n", SingleLine),
            (Rust, "struct S {\n    $0\n}\n", MultiLine),
            // JavaScript / TypeScript
            (JavaScript, "function f(a) {\n  $0\n}\n", MultiLine),
            (JavaScript, "const x = [1, 2].ma$0p(f);\n", Skip),
            (JavaScript, "const s = `text $0`;\n", SingleLine),
            (TypeScript, "class A {\n  $0\n}\n", MultiLine),
            (TypeScript, "function f(a: number): number {\n  const b = a;\n  $0\n  return b;\n}\n", SingleLine),
            (Tsx, "function App() {\n  $0\n}\n", MultiLine),
            // Go
            (Go, "package main\n\nfunc main() {\n\t$0\n}\n", MultiLine),
            (Go, "package main\n\nfunc main() {\n\tfmt.Pri$0ntln()\n}\n", Skip),
            (Go, "package main\n\nvar s = \"a $0 b\"\n", SingleLine),
            // C / C++
            (C, "int main(void) {\n    $0\n}\n", MultiLine),
            (C, "int main(void) {\n    int x = $0;\n    return x;\n}\n", SingleLine),
            (Cpp, "class A {\n  $0\n};\n", MultiLine),
            (Cpp, "int f() {\n  return st$0d::max(1, 2);\n}\n", Skip),
            // Java
            (Java, "class A {\n    void f() {\n        $0\n    }\n}\n", MultiLine),
            (Java, "class A {\n    String s = \"x $0\";\n}\n", SingleLine),
            (Java, "class A {\n    int f() { return le$0n; }\n}\n", Skip),
            // Other languages: indentation and brackets only
            (Other, "proc f {} {\n    $0\n}\n", MultiLine),
            (Other, "let x = $0\n", SingleLine),
            (Other, "abc$0def\n", Skip),
        ];
        for &(language, fixture, mode) in cases {
            check(language, fixture, mode);
        }
    }

    /// `completion` arrives a character at a time, as decoding produces it; it ends at the first
    /// cut (or at its end), as the engine ends it.
    fn check_end(language: Language, fixture: &str, completion: &str, expected: &str) {
        let offset = fixture.find("$0").unwrap();
        let text = fixture.replace("$0", "");
        let tree = language.parser().map(|mut parser| parser.parse(&text, None).unwrap());
        let decision = decide(language, &text, tree.as_ref(), offset);
        let mut rule = BlockEnd::new(decision, language, &text[..offset]);
        let ends = completion.char_indices().map(|(i, c)| i + c.len_utf8());
        let cut = ends
            .map(|end| &completion[..end])
            .find_map(|so_far| rule.cut(so_far).map(|at| &so_far[..at]))
            .unwrap_or_else(|| rule.finish(completion).map_or(completion, |at| &completion[..at]));
        assert_eq!(cut, expected, "{language:?} {decision:?}:\n{fixture}");
    }

    #[test]
    fn completions_end_with_their_block() {
        use Language::*;
        let cases: &[(Language, &str, &str, &str)] = &[
            (
                Python,
                "def f(x):\n    $0\n",
                "y = x + 1\n    return y\n\ndef g():\n    pass\n",
                "y = x + 1\n    return y",
            ),
            (Python, "x = $0\n", "1 + 2\ny = 3\n", "1 + 2"),
            (
                Rust,
                "fn f() {\n    $0\n}\n",
                "let a = 1;\n    if a > 0 {\n        g();\n    }\n}\nfn h() {}\n",
                "let a = 1;\n    if a > 0 {\n        g();\n    }",
            ),
            (C, "int f(void) {$0}\n", "\n    return 1;\n}\n", "\n    return 1;"),
            (Go, "package p\n\nfunc f() {\n\t$0\n}\n", "x := 1\n\t_ = x\n}\n\nfunc g() {}\n", "x := 1\n\t_ = x"),
            (Java, "class A {\n    void f() {\n        $0\n    }\n}\n", "g();\n    }\n}\n", "g();"),
            // Brackets and line starts inside strings and comments do not end the block (tree-sitter).
            (
                Rust,
                "fn f() {\n    $0\n}\n",
                "let s = \"}\";\n    let c = '}';\n    // } closed?\n    g(s);\n}\n",
                "let s = \"}\";\n    let c = '}';\n    // } closed?\n    g(s);",
            ),
            (
                C,
                "int f(void) {\n    $0\n}\n",
                "printf(\"%s}\\n\", s); /* ) } */\n    return 0;\n}\n",
                "printf(\"%s}\\n\", s); /* ) } */\n    return 0;",
            ),
            (
                JavaScript,
                "function f() {\n  $0\n}\n",
                "const t = `a\n}\n`;\n  return t;\n}\n",
                "const t = `a\n}\n`;\n  return t;",
            ),
            (
                Python,
                "def f():\n    $0\n",
                "s = \"\"\"\nat column 0\n\"\"\"\n    return s\nprint(f())\n",
                "s = \"\"\"\nat column 0\n\"\"\"\n    return s",
            ),
            // Without a grammar, indentation alone ends the block.
            (Other, "proc f {} {\n    $0\n}\n", "puts \"}\"\n    g\n}\n", "puts \"}\"\n    g"),
        ];
        for &(language, fixture, completion, expected) in cases {
            check_end(language, fixture, completion, expected);
        }
    }

    #[test]
    fn windows_start_outside_strings_and_comments() {
        let check = |language: Language, fixture: &str, expected: &str| {
            // `$from` marks where the window would start, `$0` the cursor.
            let from = fixture.find("$from").unwrap();
            let text = fixture.replace("$from", "");
            let cursor = text.find("$0").unwrap();
            let text = text.replace("$0", "");
            let tree = language.parser().map(|mut parser| parser.parse(&text, None).unwrap());
            let start = window_start(&text, tree.as_ref(), from, cursor);
            assert!(text[start..].starts_with(expected), "{language:?}: {:?}", &text[start..]);
        };
        let body = "x = 1\n".repeat(20);
        check(Language::Python, &format!("a = 1\nb$from = 2\nc = 3\n{body}$0"), "c = 3");
        check(Language::Python, &format!("s = \"\"\"\nd$fromoc\nstring\n\"\"\"\nc = 3\n{body}$0"), "c = 3");
        check(Language::C, &format!("/* a\n b$from\n */ int c;\nint d;\n{body}$0"), "int d;");
        check(Language::Other, &format!("a\nb$from\nc\n{body}$0"), "c");
        // No line start in the first half of the window: the window starts where it was asked to.
        check(Language::Python, &format!("abc$from{}\n$0", "x".repeat(100)), "xxx");
        check(Language::Python, &format!("a = 1\n$from{}\n$0", "é".repeat(51)), "éé");
    }

    #[test]
    fn suffix_overlap_is_trimmed() {
        let check = |completion: &str, suffix: &str, expected: &str| {
            assert_eq!(trim_suffix_overlap(completion, suffix), expected, "{completion:?} / {suffix:?}");
        };
        check("max(a, b))", ")\n", "max(a, b)");
        check("x + 1", ")\n", "x + 1");
        check("a = 1\n    return a\n", "\n    return a\n", "a = 1");
        check("abc", "", "abc");
    }
}
