//! Where each token's text starts, in characters of the decoded text, as tokens arrive. The text
//! is the lossy UTF-8 decoding of the tokens' bytes: a character split over several tokens starts
//! where its first byte does, and an invalid byte sequence is one U+FFFD. Offsets never change once
//! given, so streamed and whole answers agree.

/// The tokens' bytes and the characters they settle into.
#[derive(Debug, Default, Clone)]
pub struct TextOffsets {
    bytes: Vec<u8>,
    /// Each token's first byte.
    starts: Vec<usize>,
    /// Where each settled character ends (an unfinished one at the end is not settled).
    char_ends: Vec<usize>,
    /// Bytes up to here are settled into characters.
    settled: usize,
}

impl TextOffsets {
    /// Adds a token's bytes.
    pub fn push(&mut self, bytes: &[u8]) {
        self.starts.push(self.bytes.len());
        self.bytes.extend_from_slice(bytes);
        self.settle(false);
    }

    /// No more tokens come: unfinished bytes at the end are a character (U+FFFD) of their own.
    pub fn finish(&mut self) {
        self.settle(true);
    }

    /// Tokens so far.
    pub fn len(&self) -> usize {
        self.starts.len()
    }

    /// Whether no token came.
    pub fn is_empty(&self) -> bool {
        self.starts.is_empty()
    }

    /// Characters settled so far.
    pub fn chars(&self) -> usize {
        self.char_ends.len()
    }

    /// The character where token `index` starts, once the bytes before it are settled (`None`
    /// before: the character it continues may still turn out invalid, or it may start a new one).
    pub fn offset(&self, index: usize) -> Option<usize> {
        let start = *self.starts.get(index)?;
        (start <= self.settled).then(|| self.char_ends.partition_point(|&end| end <= start))
    }

    fn settle(&mut self, last: bool) {
        let mut at = self.settled;
        for chunk in self.bytes[self.settled..].utf8_chunks() {
            for c in chunk.valid().chars() {
                at += c.len_utf8();
                self.char_ends.push(at);
            }
            let invalid = chunk.invalid();
            if invalid.is_empty() {
                continue;
            }
            // At the end, bytes that begin a character wait for the rest of it.
            let unfinished = at + invalid.len() == self.bytes.len()
                && std::str::from_utf8(invalid).err().is_some_and(|e| e.error_len().is_none());
            if unfinished && !last {
                break;
            }
            at += invalid.len();
            self.char_ends.push(at);
        }
        self.settled = at;
    }
}

#[cfg(test)]
mod tests {
    use super::TextOffsets;

    fn offsets(tokens: &[&[u8]]) -> Vec<usize> {
        let mut text = TextOffsets::default();
        tokens.iter().for_each(|token| text.push(token));
        text.finish();
        (0..tokens.len()).map(|i| text.offset(i).unwrap()).collect()
    }

    #[test]
    fn characters_split_over_tokens_and_invalid_bytes() {
        let cases: [(&[&[u8]], &[usize]); 6] = [
            (&[b"ab", b"c"], &[0, 2]),
            // 日 in three tokens, then a letter.
            (&[b"\xe6", b"\x97", b"\xa5", b"x"], &[0, 0, 0, 1]),
            // An invalid byte is a character of its own; so is a character cut short.
            (&[b"\xfd", b"magic"], &[0, 1]),
            (&[b"\xe6\x97", b"a"], &[0, 1]),
            (&[b"\xf0", b"\x9f", b"A"], &[0, 0, 1]),
            // A token of no bytes (a special token left out) starts where the next character does.
            (&[b"a", b"", b"b"], &[0, 1, 1]),
        ];
        for (tokens, expected) in cases {
            assert_eq!(offsets(tokens), expected, "{tokens:?}");
        }
    }

    #[test]
    fn an_offset_is_given_only_once_it_is_final() {
        let mut text = TextOffsets::default();
        text.push(b"a");
        text.push(b"\xe6");
        assert_eq!((text.offset(0), text.offset(1), text.chars()), (Some(0), Some(1), 1));
        text.push(b"\x97");
        assert_eq!(text.offset(2), None, "inside a character not yet whole");
        text.push(b"\xa5");
        assert_eq!((text.offset(2), text.chars()), (Some(1), 2));
        text.push(b"");
        assert_eq!(text.offset(4), Some(2));
        text.push(b"\xe6");
        text.finish();
        assert_eq!((text.offset(5), text.chars()), (Some(2), 3));
    }
}
