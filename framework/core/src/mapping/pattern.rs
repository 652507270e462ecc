//! Tensor-name templates such as `model.layers.{L}.self_attn.q_proj.weight`.
//! `{L}` (a layer index) and `{E}` (an expert index) match a run of digits;
//! everything else matches literally. A template both matches names and
//! fills itself from the captured indices, which is what makes a rename
//! reversible without writing the inverse table.

use std::collections::BTreeMap;
use std::fmt;

#[derive(Debug, Clone, PartialEq, Eq)]
enum Piece {
    Literal(String),
    Index(char),
}

/// A compiled name template.
#[derive(Clone, PartialEq, Eq)]
pub struct Pattern {
    source: String,
    pieces: Vec<Piece>,
}

/// Indices captured by a match, keyed by placeholder letter (`L`, `E`).
pub type Captures = BTreeMap<char, usize>;

impl Pattern {
    /// Compiles `template`. Placeholders are `{L}` and `{E}`; any other
    /// brace is literal.
    pub fn new(template: &str) -> Self {
        let mut pieces = Vec::new();
        let mut literal = String::new();
        let mut rest = template;
        while !rest.is_empty() {
            let placeholder = ['L', 'E']
                .into_iter()
                .find(|c| rest.starts_with(&format!("{{{c}}}")));
            if let Some(c) = placeholder {
                if !literal.is_empty() {
                    pieces.push(Piece::Literal(std::mem::take(&mut literal)));
                }
                pieces.push(Piece::Index(c));
                rest = &rest[3..];
            } else {
                let ch = rest.chars().next().unwrap_or_default();
                literal.push(ch);
                rest = &rest[ch.len_utf8()..];
            }
        }
        if !literal.is_empty() {
            pieces.push(Piece::Literal(literal));
        }
        Self {
            source: template.to_owned(),
            pieces,
        }
    }

    /// The template text.
    pub fn as_str(&self) -> &str {
        &self.source
    }

    /// Whether the template has the placeholder `c`.
    pub fn has(&self, c: char) -> bool {
        self.pieces.contains(&Piece::Index(c))
    }

    /// Matches a whole name, returning the captured indices.
    pub fn matches(&self, name: &str) -> Option<Captures> {
        let mut captures = Captures::new();
        let mut rest = name;
        for piece in &self.pieces {
            match piece {
                Piece::Literal(text) => rest = rest.strip_prefix(text.as_str())?,
                Piece::Index(c) => {
                    let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
                    if digits == 0 {
                        return None;
                    }
                    let value: usize = rest[..digits].parse().ok()?;
                    if captures.insert(*c, value).is_some_and(|old| old != value) {
                        return None;
                    }
                    rest = &rest[digits..];
                }
            }
        }
        rest.is_empty().then_some(captures)
    }

    /// Fills the template from `captures`. Placeholders without a capture are
    /// left as written (`{L}`), which only happens on a malformed table.
    pub fn fill(&self, captures: &Captures) -> String {
        self.pieces
            .iter()
            .map(|piece| match piece {
                Piece::Literal(text) => text.clone(),
                Piece::Index(c) => captures
                    .get(c)
                    .map(usize::to_string)
                    .unwrap_or_else(|| format!("{{{c}}}")),
            })
            .collect()
    }
}

impl fmt::Debug for Pattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.source)
    }
}

impl fmt::Display for Pattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.source)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_and_fills_layer_indices() {
        let p = Pattern::new("model.layers.{L}.mlp.experts.{E}.w1.weight");
        let c = p
            .matches("model.layers.12.mlp.experts.3.w1.weight")
            .unwrap();
        assert_eq!(c[&'L'], 12);
        assert_eq!(c[&'E'], 3);
        assert_eq!(p.fill(&c), "model.layers.12.mlp.experts.3.w1.weight");
    }

    #[test]
    fn rejects_partial_and_non_digit_matches() {
        let p = Pattern::new("layers.{L}.attention.wq.weight");
        assert!(p.matches("layers.x.attention.wq.weight").is_none());
        assert!(p.matches("layers.0.attention.wq.weight.extra").is_none());
        assert!(p.matches("layers.0.attention.wq").is_none());
    }

    #[test]
    fn repeated_placeholder_must_agree() {
        let p = Pattern::new("a.{L}.b.{L}");
        assert!(p.matches("a.1.b.1").is_some());
        assert!(p.matches("a.1.b.2").is_none());
    }
}
