//! Patterns over dotted module paths (`model.layers.3.self_attn.v_proj`),
//! shared by quantization plans and adapter targets. A pattern's segments
//! are literal names, `*` (any one segment) or a layer range `A-B` (any
//! index from A to B inclusive); it matches a path that contains its
//! segments consecutively, so `v_proj`, `layers.0-3.mlp` and
//! `layers.*.self_attn.o_proj` all work.

use crate::error::{Error, Result};

#[derive(Debug, Clone, PartialEq, Eq)]
enum Segment {
    Literal(String),
    Any,
    Range(usize, usize),
}

/// A compiled module-path pattern.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModulePattern {
    source: String,
    segments: Vec<Segment>,
}

impl ModulePattern {
    /// Compiles `pattern`; an empty segment or an empty range is an error.
    pub fn new(pattern: &str) -> Result<Self> {
        if pattern.is_empty() {
            return Err(Error::InvalidArgument("an empty module pattern".into()));
        }
        let segments = pattern
            .split('.')
            .map(|segment| {
                if segment == "*" {
                    return Ok(Segment::Any);
                }
                if let Some((a, b)) = segment.split_once('-') {
                    if let (Ok(a), Ok(b)) = (a.parse::<usize>(), b.parse::<usize>()) {
                        if a > b {
                            return Err(Error::InvalidArgument(format!(
                                "pattern {pattern:?}: range {segment} is empty"
                            )));
                        }
                        return Ok(Segment::Range(a, b));
                    }
                }
                if segment.is_empty() {
                    return Err(Error::InvalidArgument(format!(
                        "pattern {pattern:?} has an empty segment"
                    )));
                }
                Ok(Segment::Literal(segment.to_owned()))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            source: pattern.to_owned(),
            segments,
        })
    }

    /// The pattern as written.
    pub fn as_str(&self) -> &str {
        &self.source
    }

    /// Whether `path` contains the pattern's segments consecutively.
    pub fn matches(&self, path: &str) -> bool {
        let parts: Vec<&str> = path.split('.').collect();
        parts.windows(self.segments.len()).any(|window| {
            window
                .iter()
                .zip(&self.segments)
                .all(|(part, segment)| match segment {
                    Segment::Literal(text) => text == part,
                    Segment::Any => true,
                    Segment::Range(a, b) => {
                        part.parse::<usize>().is_ok_and(|i| (*a..=*b).contains(&i))
                    }
                })
        })
    }

    /// How specific the pattern is: literal segments count double, then
    /// length.
    pub fn specificity(&self) -> (usize, usize) {
        let literal = self
            .segments
            .iter()
            .filter(|s| matches!(s, Segment::Literal(_)))
            .count();
        (2 * literal + self.segments.len(), self.segments.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segments_ranges_and_globs() {
        let p = ModulePattern::new("layers.0-3.*.v_proj").unwrap();
        assert!(p.matches("model.layers.2.self_attn.v_proj"));
        assert!(!p.matches("model.layers.4.self_attn.v_proj"));
        assert!(!p.matches("model.layers.2.self_attn.q_proj"));
        assert!(ModulePattern::new("v_proj")
            .unwrap()
            .matches("model.layers.9.self_attn.v_proj"));
        assert!(ModulePattern::new("layers.5-2").is_err());
        assert!(ModulePattern::new("a..b").is_err());
    }
}
