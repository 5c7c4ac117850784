//! Byte-offset helpers on UTF-8 text: words and character boundaries.

/// A character that belongs to an identifier.
pub fn is_word_char(c: char) -> bool {
    c.is_alphanumeric() || c == '_'
}

/// The nearest character boundary at or before `offset` (clamped to the text).
pub fn floor_char_boundary(text: &str, offset: usize) -> usize {
    let mut offset = offset.min(text.len());
    while !text.is_char_boundary(offset) {
        offset -= 1;
    }
    offset
}

/// The nearest character boundary at or after `offset` (clamped to the text).
pub fn ceil_char_boundary(text: &str, offset: usize) -> usize {
    let mut offset = offset.min(text.len());
    while !text.is_char_boundary(offset) {
        offset += 1;
    }
    offset
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boundaries() {
        let text = "aé😀b";
        let check = |offset, floor, ceil| {
            assert_eq!(floor_char_boundary(text, offset), floor, "floor of {offset}");
            assert_eq!(ceil_char_boundary(text, offset), ceil, "ceil of {offset}");
        };
        check(0, 0, 0);
        check(2, 1, 3);
        check(4, 3, 7);
        check(7, 7, 7);
        check(99, 8, 8);
    }
}
