//! Quoting user input in error messages: short values whole, long ones as a short escaped
//! prefix and their length, so that a 5,000-character value still gives a one-line message.

use std::fmt;

/// How many characters of a long value an error message shows.
pub const QUOTED_CHARS: usize = 40;

/// `text` quoted for an error message: `"main projections"` (escaped like `{:?}`) when it has at
/// most [`QUOTED_CHARS`] characters, else its first ones and its length:
/// `"xxxx…"… (5000 characters)`.
///
/// ```
/// use orchestrator_core::quote;
/// assert_eq!(quote("a\"b").to_string(), r#""a\"b""#);
/// let long = "x".repeat(5000);
/// assert_eq!(quote(&long).to_string(), format!("{:?}… (5000 characters)", "x".repeat(40)));
/// ```
pub fn quote(text: &str) -> Quoted<'_> {
    Quoted(text)
}

/// See [`quote`].
#[derive(Debug, Clone, Copy)]
pub struct Quoted<'a>(&'a str);

impl fmt::Display for Quoted<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0.char_indices().nth(QUOTED_CHARS) {
            None => write!(f, "{:?}", self.0),
            Some((cut, _)) => {
                write!(f, "{:?}… ({} characters)", &self.0[..cut], self.0.chars().count())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_values_whole_long_ones_as_a_prefix_and_a_length() {
        assert_eq!(quote("").to_string(), "\"\"");
        assert_eq!(quote(&"x".repeat(40)).to_string(), format!("\"{}\"", "x".repeat(40)));
        assert_eq!(
            quote(&"x".repeat(41)).to_string(),
            format!("\"{}\"… (41 characters)", "x".repeat(40))
        );
        // Escaped, cut on a character boundary, counted in characters.
        let tricky = format!("a\nb\u{1b}[31m{}", "é".repeat(5000));
        let quoted = quote(&tricky).to_string();
        assert!(quoted.starts_with("\"a\\nb\\u{1b}[31mééé"), "{quoted}");
        assert!(quoted.ends_with("… (5008 characters)"), "{quoted}");
        assert!(!quoted.contains('\n') && !quoted.contains('\u{1b}'));
        assert!(quoted.len() < 120);
    }
}
