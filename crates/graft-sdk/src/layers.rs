//! Choosing layers by name: globs and (with the `regex` feature) regular expressions.
//!
//! Globs match the whole name: `*` any run of characters (dots included), `?` one character,
//! `[abc]` / `[a-z]` / `[!abc]` one character of (not of) a set. A pattern starting with `re:` is
//! a regular expression searched in the name (anchor it with `^...$` for a whole match). A
//! pattern starting with `!` excludes what it matches.
//!
//! ```
//! use graft_sdk::LayerMatcher;
//! let m = LayerMatcher::new(&["unet.*.attn2.to_[kv]", "!unet.mid_block.*"]).unwrap();
//! assert!(m.matches("unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k"));
//! assert!(!m.matches("unet.mid_block.attentions.0.transformer_blocks.0.attn2.to_k"));
//! assert!(!m.matches("unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_q"));
//! ```

use crate::error::{Error, Result};
use crate::LayerInfo;

enum Pattern {
    Glob(Vec<GlobToken>),
    #[cfg(feature = "regex")]
    Regex(regex::Regex),
}

impl Pattern {
    fn matches(&self, name: &str) -> bool {
        match self {
            Pattern::Glob(tokens) => {
                let chars: Vec<char> = name.chars().collect();
                glob_match(tokens, &chars)
            }
            #[cfg(feature = "regex")]
            Pattern::Regex(re) => re.is_match(name),
        }
    }
}

/// A set of include and exclude patterns over layer names.
pub struct LayerMatcher {
    include: Vec<Pattern>,
    exclude: Vec<Pattern>,
}

impl LayerMatcher {
    /// Compiles the patterns; a bad pattern is an error naming it.
    pub fn new<S: AsRef<str>>(patterns: &[S]) -> Result<Self> {
        let mut include = Vec::new();
        let mut exclude = Vec::new();
        for p in patterns {
            let p = p.as_ref();
            let (list, body) = match p.strip_prefix('!') {
                Some(rest) => (&mut exclude, rest),
                None => (&mut include, p),
            };
            list.push(compile(body).map_err(|e| Error::config(format!("layer pattern `{p}`: {e}")))?);
        }
        Ok(Self { include, exclude })
    }

    /// True when some include pattern matches and no exclude pattern does. With only exclude
    /// patterns, everything else matches.
    pub fn matches(&self, name: &str) -> bool {
        let included = self.include.is_empty() || self.include.iter().any(|p| p.matches(name));
        included && !self.exclude.iter().any(|p| p.matches(name))
    }

    /// The layers whose names match, in their order.
    pub fn filter<'l>(&self, layers: &'l [LayerInfo]) -> Vec<&'l LayerInfo> {
        layers.iter().filter(|l| self.matches(l.name())).collect()
    }
}

fn compile(pattern: &str) -> std::result::Result<Pattern, String> {
    if let Some(re) = pattern.strip_prefix("re:") {
        #[cfg(feature = "regex")]
        {
            return regex::Regex::new(re).map(Pattern::Regex).map_err(|e| e.to_string());
        }
        #[cfg(not(feature = "regex"))]
        {
            let _ = re;
            return Err("regular expressions need graft-sdk's `regex` feature".to_string());
        }
    }
    parse_glob(pattern).map(Pattern::Glob)
}

/// True when `name` matches the glob `pattern` (see the module docs).
pub fn glob_matches(pattern: &str, name: &str) -> Result<bool> {
    let tokens = parse_glob(pattern).map_err(|e| Error::config(format!("glob `{pattern}`: {e}")))?;
    let chars: Vec<char> = name.chars().collect();
    Ok(glob_match(&tokens, &chars))
}

enum GlobToken {
    Char(char),
    Any,
    Star,
    Set { negated: bool, ranges: Vec<(char, char)> },
}

fn parse_glob(pattern: &str) -> std::result::Result<Vec<GlobToken>, String> {
    let mut tokens = Vec::new();
    let mut chars = pattern.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '*' => {
                if !matches!(tokens.last(), Some(GlobToken::Star)) {
                    tokens.push(GlobToken::Star);
                }
            }
            '?' => tokens.push(GlobToken::Any),
            '[' => {
                let negated = chars.peek() == Some(&'!');
                if negated {
                    chars.next();
                }
                let mut ranges = Vec::new();
                let mut closed = false;
                while let Some(c) = chars.next() {
                    if c == ']' && !ranges.is_empty() {
                        closed = true;
                        break;
                    }
                    if chars.peek() == Some(&'-') {
                        chars.next();
                        match chars.next() {
                            Some(']') | None => {
                                ranges.push((c, c));
                                ranges.push(('-', '-'));
                                closed = true;
                                break;
                            }
                            Some(hi) => ranges.push((c, hi)),
                        }
                    } else {
                        ranges.push((c, c));
                    }
                }
                if !closed {
                    return Err("unclosed `[`".to_string());
                }
                tokens.push(GlobToken::Set { negated, ranges });
            }
            c => tokens.push(GlobToken::Char(c)),
        }
    }
    Ok(tokens)
}

/// Iterative wildcard matching with one backtrack point per star (linear in practice).
fn glob_match(tokens: &[GlobToken], name: &[char]) -> bool {
    let (mut t, mut n) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while n < name.len() {
        let step = match tokens.get(t) {
            Some(GlobToken::Star) => {
                star = Some((t, n));
                t += 1;
                continue;
            }
            Some(GlobToken::Any) => true,
            Some(GlobToken::Char(c)) => *c == name[n],
            Some(GlobToken::Set { negated, ranges }) => ranges.iter().any(|&(lo, hi)| lo <= name[n] && name[n] <= hi) != *negated,
            None => false,
        };
        if step {
            t += 1;
            n += 1;
        } else if let Some((st, sn)) = star {
            t = st + 1;
            n = sn + 1;
            star = Some((st, sn + 1));
        } else {
            return false;
        }
    }
    tokens[t..].iter().all(|tok| matches!(tok, GlobToken::Star))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs() {
        let ok = |p: &str, n: &str| glob_matches(p, n).unwrap();
        assert!(ok("unet.*", "unet.down_blocks.1.attn1.to_q"));
        assert!(ok("*to_q", "text_encoder.text_model.to_q"));
        assert!(!ok("*to_q", "text_encoder.text_model.to_qx"));
        assert!(ok("unet.*.attn?.to_[qkv]", "unet.up_blocks.0.attn2.to_v"));
        assert!(!ok("unet.*.attn?.to_[!qkv]", "unet.up_blocks.0.attn2.to_v"));
        assert!(ok("*.layers.[0-9].*", "text_encoder.text_model.encoder.layers.7.mlp.fc1"));
        assert!(!ok("*.layers.[0-9].*", "text_encoder.text_model.encoder.layers.17.mlp.fc1"));
        assert!(ok("a*b*c", "aXbYbZc"));
        assert!(ok("", ""));
        assert!(glob_matches("x[ab", "x").is_err());
    }

    #[test]
    fn include_exclude_and_regex() {
        let m = LayerMatcher::new(&["re:attn[12]\\.to_(q|k)$", "!*mid_block*"]).unwrap();
        assert!(m.matches("unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"));
        assert!(!m.matches("unet.mid_block.attentions.0.transformer_blocks.0.attn1.to_q"));
        assert!(!m.matches("unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_v"));
        let only_exclude = LayerMatcher::new(&["!text_encoder*"]).unwrap();
        assert!(only_exclude.matches("unet.x"));
        assert!(!only_exclude.matches("text_encoder_2.x"));
        let e = LayerMatcher::new(&["re:("]).err().unwrap();
        assert!(e.message().contains("layer pattern `re:(`"), "{e}");
    }
}
