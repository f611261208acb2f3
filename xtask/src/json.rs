//! A small JSON reader for `orchestrator status --json` (xtask stays std + anyhow).

use anyhow::{Context, Result, bail};

#[derive(Debug)]
pub(crate) enum Json {
    /// `true`, `false` or `null`: nothing read here needs which.
    Literal,
    Number(f64),
    String(String),
    Array(Vec<Json>),
    Object(Vec<(String, Json)>),
}

impl Json {
    pub(crate) fn get(&self, key: &str) -> Option<&Json> {
        match self {
            Json::Object(fields) => fields.iter().find(|(k, _)| k == key).map(|(_, v)| v),
            _ => None,
        }
    }

    pub(crate) fn items(&self) -> &[Json] {
        match self {
            Json::Array(items) => items,
            _ => &[],
        }
    }

    pub(crate) fn number(&self) -> Option<f64> {
        match self {
            Json::Number(n) => Some(*n),
            _ => None,
        }
    }

    pub(crate) fn text(&self) -> Option<&str> {
        match self {
            Json::String(s) => Some(s),
            _ => None,
        }
    }
}

pub(crate) struct JsonParser<'a> {
    text: &'a str,
    at: usize,
}

impl JsonParser<'_> {
    pub(crate) fn parse(text: &str) -> Result<Json> {
        let mut parser = JsonParser { text, at: 0 };
        let value = parser.value()?;
        parser.skip_space();
        if parser.at != text.len() {
            bail!("trailing characters after JSON at byte {}", parser.at);
        }
        Ok(value)
    }

    fn peek(&self) -> Option<u8> {
        self.text.as_bytes().get(self.at).copied()
    }

    fn skip_space(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\n' | b'\r' | b'\t')) {
            self.at += 1;
        }
    }

    fn expect(&mut self, byte: u8) -> Result<()> {
        self.skip_space();
        if self.peek() != Some(byte) {
            bail!("expected {:?} at byte {} of the JSON", byte as char, self.at);
        }
        self.at += 1;
        Ok(())
    }

    fn value(&mut self) -> Result<Json> {
        self.skip_space();
        match self.peek() {
            Some(b'{') => {
                self.at += 1;
                let mut fields = Vec::new();
                self.skip_space();
                if self.peek() == Some(b'}') {
                    self.at += 1;
                    return Ok(Json::Object(fields));
                }
                loop {
                    self.skip_space();
                    let key = self.string()?;
                    self.expect(b':')?;
                    fields.push((key, self.value()?));
                    self.skip_space();
                    match self.peek() {
                        Some(b',') => self.at += 1,
                        Some(b'}') => {
                            self.at += 1;
                            return Ok(Json::Object(fields));
                        }
                        _ => bail!("expected , or }} at byte {} of the JSON", self.at),
                    }
                }
            }
            Some(b'[') => {
                self.at += 1;
                let mut items = Vec::new();
                self.skip_space();
                if self.peek() == Some(b']') {
                    self.at += 1;
                    return Ok(Json::Array(items));
                }
                loop {
                    items.push(self.value()?);
                    self.skip_space();
                    match self.peek() {
                        Some(b',') => self.at += 1,
                        Some(b']') => {
                            self.at += 1;
                            return Ok(Json::Array(items));
                        }
                        _ => bail!("expected , or ] at byte {} of the JSON", self.at),
                    }
                }
            }
            Some(b'"') => Ok(Json::String(self.string()?)),
            Some(b't') => self.literal("true"),
            Some(b'f') => self.literal("false"),
            Some(b'n') => self.literal("null"),
            Some(b'-' | b'0'..=b'9') => {
                let start = self.at;
                while matches!(self.peek(), Some(b'-' | b'+' | b'.' | b'e' | b'E' | b'0'..=b'9')) {
                    self.at += 1;
                }
                let number = &self.text[start..self.at];
                Ok(Json::Number(
                    number.parse().with_context(|| format!("bad JSON number {number:?}"))?,
                ))
            }
            _ => bail!("unexpected input at byte {} of the JSON", self.at),
        }
    }

    fn literal(&mut self, word: &str) -> Result<Json> {
        if !self.text[self.at..].starts_with(word) {
            bail!("unexpected input at byte {} of the JSON", self.at);
        }
        self.at += word.len();
        Ok(Json::Literal)
    }

    fn string(&mut self) -> Result<String> {
        if self.peek() != Some(b'"') {
            bail!("expected a string at byte {} of the JSON", self.at);
        }
        self.at += 1;
        let mut out = String::new();
        loop {
            let rest = &self.text[self.at..];
            let Some(stop) = rest.find(['"', '\\']) else { bail!("unterminated JSON string") };
            out.push_str(&rest[..stop]);
            self.at += stop;
            if self.peek() == Some(b'"') {
                self.at += 1;
                return Ok(out);
            }
            let escape = self.text.as_bytes().get(self.at + 1).copied();
            self.at += 2;
            match escape {
                Some(b'"') => out.push('"'),
                Some(b'\\') => out.push('\\'),
                Some(b'/') => out.push('/'),
                Some(b'b') => out.push('\u{8}'),
                Some(b'f') => out.push('\u{c}'),
                Some(b'n') => out.push('\n'),
                Some(b'r') => out.push('\r'),
                Some(b't') => out.push('\t'),
                Some(b'u') => {
                    let hex = self.text.get(self.at..self.at + 4).context("short \\u escape")?;
                    let code = u32::from_str_radix(hex, 16).context("bad \\u escape")?;
                    out.push(char::from_u32(code).unwrap_or('\u{fffd}'));
                    self.at += 4;
                }
                _ => bail!("bad escape in a JSON string"),
            }
        }
    }
}
