//! The CLIP byte-level BPE tokenizer of both SDXL text encoders.
//!
//! It gives the same ids as transformers' `CLIPTokenizer` (transformers 5, backed by the
//! `tokenizers` library) called with `padding="max_length", truncation=True, max_length=77`:
//!
//! 1. Special tokens (`<|startoftext|>`, `<|endoftext|>`, the pad token) written in the prompt are
//!    split out first: the "not normalized" ones on the raw text, the "normalized" ones after
//!    normalization. Which is which comes from the folder's config files, as in transformers.
//! 2. Normalization: Unicode NFC, every run of whitespace to one space, per-character lowercase.
//!    There is no ftfy fix-up and no HTML unescaping (OpenAI's original CLIP code has them).
//! 3. Pre-tokenization: CLIP's regex (letters runs, single digits, punctuation runs, English
//!    contractions); whitespace is dropped. Then the byte-level pre-tokenizer's GPT-2 regex
//!    splits again, and each piece is mapped byte by byte to printable chars.
//! 4. BPE with `</w>` appended to each piece's last symbol, lowest merge rank first.
//! 5. `[BOS] tokens.. [EOS] pad..`, tokens cut to `max_len - 2`.
//!
//! A quirk kept for parity: SDXL's `tokenizer_2` pads with `!`, which makes `!` a special token,
//! so a `!` in a prompt becomes id 0 (not the BPE token `!</w>`) for the second text encoder.

use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use regex::Regex;
use serde_json::Value;
use unicode_normalization::UnicodeNormalization;

/// The sequence length of both SDXL text encoders.
pub const MAX_LEN: usize = 77;

const BOS: &str = "<|startoftext|>";
const EOS: &str = "<|endoftext|>";

/// OpenAI's CLIP BPE vocabulary (from the open_clip_torch package): a header line, then merges.
const BUILTIN_BPE_GZ: &[u8] = include_bytes!("../assets/bpe_simple_vocab_16e6.txt.gz");
/// CLIP uses the first 49152 - 256 - 2 merges of that file.
const BUILTIN_MERGES: usize = 49152 - 256 - 2;

/// CLIP's pre-tokenizer pattern (transformers' `CLIPTokenizer`); what it does not match
/// (whitespace) is dropped.
const PATTERN: &str = r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+";
/// The byte-level pre-tokenizer's GPT-2 pattern, applied to each piece of the first split (which
/// holds no whitespace, so GPT-2's whitespace alternatives are left out). It splits only the
/// pieces that mix letters and punctuation: `<|endoftext|>` typed in another case.
const BYTE_LEVEL_PATTERN: &str = r"'s|'t|'re|'ve|'m|'ll|'d|\p{L}+|\p{N}+|[^\s\p{L}\p{N}]+";

#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error("{}: cannot read: {source}", path.display())]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{}: {message}", path.display())]
    Invalid { path: PathBuf, message: String },
    #[error(
        "{}: no CLIP tokenizer here: expected `vocab.json` + `merges.txt`, or `tokenizer.json`",
        dir.display()
    )]
    Missing { dir: PathBuf },
}

fn invalid(path: &Path, message: impl Into<String>) -> TokenizerError {
    TokenizerError::Invalid { path: path.to_path_buf(), message: message.into() }
}

/// The pad tokens of the two SDXL tokenizers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PadToken {
    /// `<|endoftext|>` (49407): `tokenizer` (CLIP ViT-L).
    EndOfText,
    /// `!` (0): `tokenizer_2` (OpenCLIP bigG).
    Exclamation,
}

impl PadToken {
    fn content(self) -> &'static str {
        match self {
            PadToken::EndOfText => EOS,
            PadToken::Exclamation => "!",
        }
    }
}

/// A token matched as a whole in the text before BPE: on the raw text when not `normalized`,
/// on the normalized text when `normalized`.
#[derive(Debug, Clone)]
struct SpecialToken {
    content: String,
    id: u32,
    normalized: bool,
}

/// How a config names a special token: its text and whether it matches after normalization.
#[derive(Debug, Clone)]
struct TokenSpec {
    content: String,
    normalized: bool,
}

/// A vocabulary (token -> id) and its merges in rank order.
type VocabAndMerges = (HashMap<String, u32>, Vec<(String, String)>);

/// A piece of text after splitting out special tokens.
enum Piece<'a> {
    Text(&'a str),
    Special(u32),
}

/// The CLIP tokenizer: vocabulary, merges and special tokens.
#[derive(Debug, Clone)]
pub struct ClipTokenizer {
    vocab: HashMap<String, u32>,
    /// (left id, right id) -> (rank, merged id).
    merges: HashMap<(u32, u32), (u32, u32)>,
    byte_chars: [char; 256],
    specials: Vec<SpecialToken>,
    pattern: Regex,
    byte_level_pattern: Regex,
    bos: u32,
    eos: u32,
    unk: u32,
    pad: u32,
}

impl ClipTokenizer {
    /// Loads a tokenizer folder (`tokenizer/` or `tokenizer_2/` of a diffusers model): `tokenizer.json`
    /// when present, else `vocab.json` + `merges.txt`, with the special tokens and pad token of
    /// `tokenizer_config.json` / `special_tokens_map.json`. Without a stated pad token it pads with
    /// `<|endoftext|>`, as transformers does.
    pub fn from_folder(dir: &Path) -> Result<Self, TokenizerError> {
        Self::from_folder_with_default_pad(dir, PadToken::EndOfText)
    }

    /// [`ClipTokenizer::from_folder`], padding with `default_pad` when the folder states no pad token.
    pub fn from_folder_with_default_pad(dir: &Path, default_pad: PadToken) -> Result<Self, TokenizerError> {
        let tokenizer_json = dir.join("tokenizer.json");
        let vocab_json = dir.join("vocab.json");
        let merges_txt = dir.join("merges.txt");
        let file = if tokenizer_json.is_file() {
            let json = read_json(&tokenizer_json)?;
            Some((tokenizer_json, json))
        } else {
            None
        };
        let (vocab, merges) = match &file {
            Some((path, json)) => vocab_and_merges_from_tokenizer_json(path, json)?,
            None if vocab_json.is_file() && merges_txt.is_file() => (read_vocab(&vocab_json)?, read_merges(&merges_txt)?),
            None => return Err(TokenizerError::Missing { dir: dir.to_path_buf() }),
        };
        let source = file.as_ref().map(|(p, _)| p.clone()).unwrap_or(vocab_json);
        let configs = SpecialConfigs::read(dir, file.as_ref().map(|(p, j)| (p.as_path(), j)))?;
        let (specials, pad) = configs.resolve(&vocab, default_pad, dir)?;
        Self::new(vocab, &merges, specials, &pad, &source)
    }

    /// The standard CLIP vocabulary built into the binary, for single-file checkpoints, with the
    /// special tokens of SDXL base 1.0's `tokenizer` (pad `EndOfText`) or `tokenizer_2` (pad
    /// `Exclamation`) folder.
    pub fn builtin(pad: PadToken) -> Self {
        // The data is compiled in and checked by the tests: a failure here is a build defect.
        let (vocab, merges) = builtin_vocab_and_merges().expect("the built-in CLIP vocabulary is corrupt");
        // SDXL's folders state BOS, EOS and UNK as normalized tokens and the pad token as a plain
        // string, which transformers adds last (so `<|endoftext|>` as pad ends up not normalized).
        let spec = |content: &str, normalized| TokenSpec { content: content.to_string(), normalized };
        let configs = SpecialConfigs {
            bos: Some(spec(BOS, true)),
            eos: Some(spec(EOS, true)),
            unk: Some(spec(EOS, true)),
            pad: Some(spec(pad.content(), false)),
            ..SpecialConfigs::default()
        };
        let (specials, pad) =
            configs.resolve(&vocab, pad, Path::new("<built-in CLIP vocabulary>")).expect("the built-in CLIP vocabulary lacks a special token");
        Self::new(vocab, &merges, specials, &pad, Path::new("<built-in CLIP vocabulary>")).expect("the built-in CLIP vocabulary is corrupt")
    }

    fn new(
        vocab: HashMap<String, u32>,
        merge_list: &[(String, String)],
        specials: Vec<SpecialToken>,
        pad: &str,
        source: &Path,
    ) -> Result<Self, TokenizerError> {
        let id_of = |token: &str| -> Result<u32, TokenizerError> {
            match vocab.get(token) {
                Some(&id) => Ok(id),
                None => specials
                    .iter()
                    .find(|s| s.content == token)
                    .map(|s| s.id)
                    .ok_or_else(|| invalid(source, format!("the vocabulary has no `{token}` token"))),
            }
        };
        let (bos, eos, pad) = (id_of(BOS)?, id_of(EOS)?, id_of(pad)?);
        let mut merges = HashMap::with_capacity(merge_list.len());
        for (rank, (a, b)) in merge_list.iter().enumerate() {
            let get = |t: &str| {
                vocab.get(t).copied().ok_or_else(|| invalid(source, format!("merge {} `{a} {b}`: `{t}` is not in the vocabulary", rank + 1)))
            };
            let merged = get(&format!("{a}{b}"))?;
            // The first occurrence of a pair wins, as in `tokenizers`.
            merges.entry((get(a)?, get(b)?)).or_insert((rank as u32, merged));
        }
        let pattern = Regex::new(PATTERN).expect("the CLIP pattern is a valid regex");
        let byte_level_pattern = Regex::new(BYTE_LEVEL_PATTERN).expect("the GPT-2 pattern is a valid regex");
        let byte_chars = bytes_to_unicode();
        Ok(Self { vocab, merges, byte_chars, specials, pattern, byte_level_pattern, bos, eos, unk: eos, pad })
    }

    pub fn bos_id(&self) -> u32 {
        self.bos
    }

    pub fn eos_id(&self) -> u32 {
        self.eos
    }

    pub fn pad_id(&self) -> u32 {
        self.pad
    }

    /// The number of entries of the vocabulary (49408 for CLIP).
    pub fn vocab_size(&self) -> usize {
        self.vocab.len()
    }

    /// The token ids of `text`, without BOS / EOS and without padding or truncation.
    pub fn encode(&self, text: &str) -> Vec<u32> {
        let mut ids = Vec::new();
        for piece in self.split_specials(text, false) {
            match piece {
                Piece::Special(id) => ids.push(id),
                Piece::Text(raw) => {
                    let normalized = normalize(raw);
                    for piece in self.split_specials(&normalized, true) {
                        match piece {
                            Piece::Special(id) => ids.push(id),
                            Piece::Text(t) => self.encode_normalized(t, &mut ids),
                        }
                    }
                }
            }
        }
        ids
    }

    /// `[BOS] tokens.. [EOS] pad..`, exactly `max_len` ids (77 for SDXL): the tokens are cut to
    /// `max_len - 2` so that EOS always stays.
    pub fn encode_padded(&self, text: &str, max_len: usize) -> Vec<u32> {
        let mut tokens = self.encode(text);
        tokens.truncate(max_len.saturating_sub(2));
        let mut ids = Vec::with_capacity(max_len);
        ids.push(self.bos);
        ids.extend(tokens);
        ids.push(self.eos);
        ids.truncate(max_len);
        ids.resize(max_len, self.pad);
        ids
    }

    /// Splits out the special tokens of one kind (leftmost, then longest match).
    fn split_specials<'a>(&self, text: &'a str, normalized: bool) -> Vec<Piece<'a>> {
        let candidates: Vec<&SpecialToken> = self.specials.iter().filter(|s| s.normalized == normalized).collect();
        let mut pieces = Vec::new();
        let mut start = 0;
        let mut pos = 0;
        while pos < text.len() {
            let rest = &text[pos..];
            let found = candidates.iter().filter(|s| !s.content.is_empty() && rest.starts_with(&s.content)).max_by_key(|s| s.content.len());
            if let Some(special) = found {
                if start < pos {
                    pieces.push(Piece::Text(&text[start..pos]));
                }
                pieces.push(Piece::Special(special.id));
                pos += special.content.len();
                start = pos;
            } else {
                pos += rest.chars().next().map_or(1, char::len_utf8);
            }
        }
        if start < text.len() {
            pieces.push(Piece::Text(&text[start..]));
        }
        pieces
    }

    /// Pre-tokenizes normalized text and runs BPE on each piece.
    fn encode_normalized(&self, text: &str, ids: &mut Vec<u32>) {
        for piece in self.pattern.find_iter(text) {
            for m in self.byte_level_pattern.find_iter(piece.as_str()) {
                let word: Vec<char> = m.as_str().bytes().map(|b| self.byte_chars[b as usize]).collect();
                self.bpe(&word, ids);
            }
        }
    }

    /// Byte-pair merges of one pre-token (byte-level chars), lowest rank first.
    fn bpe(&self, word: &[char], ids: &mut Vec<u32>) {
        let last = word.len().saturating_sub(1);
        let mut symbols: Vec<u32> = word
            .iter()
            .enumerate()
            .map(|(i, c)| {
                let mut s = c.to_string();
                if i == last {
                    s.push_str("</w>");
                }
                self.vocab.get(&s).copied().unwrap_or(self.unk)
            })
            .collect();
        loop {
            // The pair of lowest rank, then merge all its (non-overlapping) occurrences.
            let best = symbols
                .windows(2)
                .filter_map(|w| self.merges.get(&(w[0], w[1])).map(|&(rank, merged)| (rank, (w[0], w[1]), merged)))
                .min_by_key(|&(rank, _, _)| rank);
            let Some((_, pair, merged)) = best else { break };
            let mut out = Vec::with_capacity(symbols.len());
            let mut i = 0;
            while i < symbols.len() {
                if i + 1 < symbols.len() && (symbols[i], symbols[i + 1]) == pair {
                    out.push(merged);
                    i += 2;
                } else {
                    out.push(symbols[i]);
                    i += 1;
                }
            }
            symbols = out;
        }
        ids.extend(symbols);
    }
}

/// NFC, whitespace runs to one space, per-character lowercase (no final-sigma rule), as the
/// `tokenizers` normalizers of `CLIPTokenizer`.
fn normalize(text: &str) -> String {
    let nfc: String = text.nfc().collect();
    let mut out = String::with_capacity(nfc.len());
    let mut in_space = false;
    for c in nfc.chars() {
        if c.is_whitespace() {
            if !in_space {
                out.push(' ');
            }
            in_space = true;
        } else {
            in_space = false;
            out.extend(c.to_lowercase());
        }
    }
    out
}

/// GPT-2 / CLIP's byte -> printable char table: printable Latin-1 bytes map to themselves, the
/// others to U+0100 onwards, in byte order.
fn bytes_to_unicode() -> [char; 256] {
    let printable = |b: u32| (0x21..=0x7e).contains(&b) || (0xa1..=0xac).contains(&b) || (0xae..=0xff).contains(&b);
    let mut table = ['\0'; 256];
    let mut next = 256u32;
    for b in 0..256u32 {
        let code = if printable(b) {
            b
        } else {
            next += 1;
            next - 1
        };
        table[b as usize] = char::from_u32(code).expect("byte-level chars are valid");
    }
    table
}

/// The byte-level chars in CLIP's vocabulary order: the printable bytes first, then the others.
fn byte_chars_in_vocab_order() -> Vec<char> {
    let table = bytes_to_unicode();
    let mut chars: Vec<char> = table.iter().copied().filter(|&c| (c as u32) < 256).collect();
    chars.extend(table.iter().copied().filter(|&c| (c as u32) >= 256));
    chars
}

/// CLIP's vocabulary built from the BPE file: bytes, bytes + `</w>`, one token per merge, then
/// `<|startoftext|>` and `<|endoftext|>` (49408 entries).
fn builtin_vocab_and_merges() -> Result<VocabAndMerges, String> {
    let mut text = String::new();
    flate2::read::GzDecoder::new(BUILTIN_BPE_GZ).read_to_string(&mut text).map_err(|e| e.to_string())?;
    let merges: Vec<(String, String)> = text
        .split('\n')
        .skip(1)
        .take(BUILTIN_MERGES)
        .map(|line| line.split_once(' ').map(|(a, b)| (a.to_string(), b.to_string())).ok_or_else(|| line.to_string()))
        .collect::<Result<_, _>>()?;
    if merges.len() != BUILTIN_MERGES {
        return Err(format!("{} merges, expected {BUILTIN_MERGES}", merges.len()));
    }
    let chars = byte_chars_in_vocab_order();
    let mut tokens: Vec<String> = chars.iter().map(|c| c.to_string()).collect();
    tokens.extend(chars.iter().map(|c| format!("{c}</w>")));
    tokens.extend(merges.iter().map(|(a, b)| format!("{a}{b}")));
    tokens.push(BOS.to_string());
    tokens.push(EOS.to_string());
    let vocab = tokens.into_iter().enumerate().map(|(i, t)| (t, i as u32)).collect();
    Ok((vocab, merges))
}

fn read_text(path: &Path) -> Result<String, TokenizerError> {
    std::fs::read_to_string(path).map_err(|source| TokenizerError::Io { path: path.to_path_buf(), source })
}

fn read_json(path: &Path) -> Result<Value, TokenizerError> {
    serde_json::from_str(&read_text(path)?).map_err(|e| invalid(path, format!("not valid JSON: {e}")))
}

fn vocab_from_json(path: &Path, value: &Value) -> Result<HashMap<String, u32>, TokenizerError> {
    let map = value.as_object().ok_or_else(|| invalid(path, "the vocabulary is not a JSON object of token -> id"))?;
    map.iter()
        .map(|(token, id)| match id.as_u64().and_then(|i| u32::try_from(i).ok()) {
            Some(id) => Ok((token.clone(), id)),
            None => Err(invalid(path, format!("token `{token}` has id {id}, expected an unsigned integer"))),
        })
        .collect()
}

fn read_vocab(path: &Path) -> Result<HashMap<String, u32>, TokenizerError> {
    vocab_from_json(path, &read_json(path)?)
}

/// `merges.txt`: an optional `#version` header, then one `left right` pair a line.
fn read_merges(path: &Path) -> Result<Vec<(String, String)>, TokenizerError> {
    let text = read_text(path)?;
    let mut merges = Vec::new();
    for (n, line) in text.lines().enumerate() {
        if line.is_empty() || (n == 0 && line.starts_with("#version")) {
            continue;
        }
        let (a, b) = line.split_once(' ').ok_or_else(|| invalid(path, format!("line {}: `{line}` is not a `left right` merge", n + 1)))?;
        merges.push((a.to_string(), b.to_string()));
    }
    Ok(merges)
}

/// `model.vocab` and `model.merges` of a `tokenizers` file (merges as `"a b"` or `["a", "b"]`).
fn vocab_and_merges_from_tokenizer_json(path: &Path, json: &Value) -> Result<VocabAndMerges, TokenizerError> {
    let model = json.get("model").ok_or_else(|| invalid(path, "no `model` entry"))?;
    if let Some(kind) = model.get("type").and_then(Value::as_str) {
        if kind != "BPE" {
            return Err(invalid(path, format!("`model.type` is `{kind}`, a CLIP tokenizer is `BPE`")));
        }
    }
    let vocab = vocab_from_json(path, model.get("vocab").ok_or_else(|| invalid(path, "no `model.vocab` entry"))?)?;
    let list = model.get("merges").and_then(Value::as_array).ok_or_else(|| invalid(path, "no `model.merges` list"))?;
    let mut merges = Vec::with_capacity(list.len());
    for (n, m) in list.iter().enumerate() {
        let pair = match m {
            Value::String(s) => s.split_once(' ').map(|(a, b)| (a.to_string(), b.to_string())),
            Value::Array(parts) => match parts.as_slice() {
                [Value::String(a), Value::String(b)] => Some((a.clone(), b.clone())),
                _ => None,
            },
            _ => None,
        };
        merges.push(pair.ok_or_else(|| invalid(path, format!("`model.merges[{n}]` is not a pair: {m}")))?);
    }
    Ok((vocab, merges))
}

/// What the config files say about special tokens, gathered the way transformers 5 does.
#[derive(Debug, Default)]
struct SpecialConfigs {
    /// `tokenizer.json`'s `added_tokens` (content, id, normalized), in file order.
    file_added: Vec<SpecialToken>,
    /// Tokens by content whose flags replace those of the named tokens below.
    known: HashMap<String, (Option<u32>, bool)>,
    bos: Option<TokenSpec>,
    eos: Option<TokenSpec>,
    unk: Option<TokenSpec>,
    pad: Option<TokenSpec>,
}

impl SpecialConfigs {
    fn read(dir: &Path, tokenizer_json: Option<(&Path, &Value)>) -> Result<Self, TokenizerError> {
        let mut configs = SpecialConfigs::default();
        let mut file_known = HashMap::new();
        if let Some((path, json)) = tokenizer_json {
            for token in json.get("added_tokens").and_then(Value::as_array).into_iter().flatten() {
                let content = token.get("content").and_then(Value::as_str);
                let id = token.get("id").and_then(Value::as_u64).and_then(|i| u32::try_from(i).ok());
                let (Some(content), Some(id)) = (content, id) else {
                    return Err(invalid(path, format!("`added_tokens` entry without content or id: {token}")));
                };
                let normalized = token.get("normalized").and_then(Value::as_bool).unwrap_or(false);
                configs.file_added.push(SpecialToken { content: content.to_string(), id, normalized });
                file_known.insert(content.to_string(), (Some(id), normalized));
            }
        }
        let config_path = dir.join("tokenizer_config.json");
        let config = if config_path.is_file() { Some(read_json(&config_path)?) } else { None };
        let map_path = dir.join("special_tokens_map.json");
        let decoder = config.as_ref().and_then(|c| c.get("added_tokens_decoder")).and_then(Value::as_object);
        if let Some(decoder) = decoder {
            // A tokenizer_config.json with `added_tokens_decoder` is authoritative;
            // special_tokens_map.json is then ignored.
            for (id, token) in decoder {
                let content = token
                    .get("content")
                    .and_then(Value::as_str)
                    .ok_or_else(|| invalid(&config_path, format!("`added_tokens_decoder.{id}` has no `content`")))?;
                let normalized = token.get("normalized").and_then(Value::as_bool).unwrap_or(false);
                configs.known.insert(content.to_string(), (id.parse().ok(), normalized));
            }
        } else {
            configs.known = file_known;
        }
        let map = if decoder.is_none() && map_path.is_file() { Some(read_json(&map_path)?) } else { None };
        let named = |key: &str| -> Result<Option<TokenSpec>, TokenizerError> {
            if let Some(v) = map.as_ref().and_then(|m| m.get(key)) {
                return token_spec(&map_path, key, v);
            }
            match config.as_ref().and_then(|c| c.get(key)) {
                Some(v) => token_spec(&config_path, key, v),
                None => Ok(None),
            }
        };
        configs.bos = named("bos_token")?;
        configs.eos = named("eos_token")?;
        configs.unk = named("unk_token")?;
        configs.pad = named("pad_token")?;
        Ok(configs)
    }

    /// The special tokens (content unique, later definitions update earlier ones, in transformers'
    /// order: tokenizer.json's, then BOS, EOS, UNK, pad) and the pad token's text.
    fn resolve(&self, vocab: &HashMap<String, u32>, default_pad: PadToken, dir: &Path) -> Result<(Vec<SpecialToken>, String), TokenizerError> {
        let mut specials = self.file_added.clone();
        let mut upsert = |content: &str, id: Option<u32>, normalized: bool| -> Result<(), TokenizerError> {
            if let Some(existing) = specials.iter_mut().find(|s| s.content == content) {
                existing.normalized = normalized;
                return Ok(());
            }
            let id =
                vocab.get(content).copied().or(id).ok_or_else(|| invalid(dir, format!("special token `{content}` is not in the vocabulary")))?;
            specials.push(SpecialToken { content: content.to_string(), id, normalized });
            Ok(())
        };
        let mut known: Vec<(&String, &(Option<u32>, bool))> = self.known.iter().collect();
        known.sort_by_key(|(_, (id, _))| *id);
        // added_tokens_decoder entries are added before the named tokens.
        for (content, &(id, normalized)) in known {
            upsert(content, id, normalized)?;
        }
        let default = |content: &str| TokenSpec { content: content.to_string(), normalized: false };
        let named = [
            self.bos.clone().unwrap_or_else(|| default(BOS)),
            self.eos.clone().unwrap_or_else(|| default(EOS)),
            self.unk.clone().unwrap_or_else(|| default(EOS)),
            self.pad.clone().unwrap_or_else(|| default(default_pad.content())),
        ];
        for spec in &named {
            // transformers replaces a named token by the added token of the same text, if any.
            let (id, normalized) = match self.known.get(&spec.content) {
                Some(&(id, normalized)) => (id, normalized),
                None => (None, spec.normalized),
            };
            upsert(&spec.content, id, normalized)?;
        }
        Ok((specials, named[3].content.clone()))
    }
}

/// A special token entry of a config: a string, or an object with `content` (and `normalized`,
/// false when absent, as transformers' `AddedToken(special=True)`).
fn token_spec(path: &Path, key: &str, value: &Value) -> Result<Option<TokenSpec>, TokenizerError> {
    match value {
        Value::Null => Ok(None),
        Value::String(s) => Ok(Some(TokenSpec { content: s.clone(), normalized: false })),
        Value::Object(o) => {
            let content = o.get("content").and_then(Value::as_str).ok_or_else(|| invalid(path, format!("`{key}` has no `content`")))?;
            let normalized = o.get("normalized").and_then(Value::as_bool).unwrap_or(false);
            Ok(Some(TokenSpec { content: content.to_string(), normalized }))
        }
        other => Err(invalid(path, format!("`{key}` is {other}, expected a string or an object with `content`"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_vocab_has_clip_layout() {
        let tok = ClipTokenizer::builtin(PadToken::EndOfText);
        assert_eq!(tok.vocab_size(), 49408);
        assert_eq!((tok.bos_id(), tok.eos_id(), tok.pad_id()), (49406, 49407, 49407));
        assert_eq!(ClipTokenizer::builtin(PadToken::Exclamation).pad_id(), 0);
        assert_eq!(tok.encode("a photo of a cat"), vec![320, 1125, 539, 320, 2368]);
    }

    #[test]
    fn padded_keeps_eos_when_truncating() {
        let tok = ClipTokenizer::builtin(PadToken::Exclamation);
        let ids = tok.encode_padded(&"cat ".repeat(100), 77);
        assert_eq!(ids.len(), 77);
        assert_eq!((ids[0], ids[76]), (49406, 49407));
        assert_eq!(tok.encode_padded("", 5), vec![49406, 49407, 0, 0, 0]);
    }

    #[test]
    fn bad_folder_errors_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("vocab.json"), r#"{"a": 0, "b</w>": 1, "ab</w>": 2}"#).unwrap();
        std::fs::write(dir.path().join("merges.txt"), "#version: 0.2\na b</w>\n").unwrap();
        let err = ClipTokenizer::from_folder(dir.path()).unwrap_err().to_string();
        assert!(err.contains("<|startoftext|>") && err.contains(&dir.path().display().to_string()), "{err}");
        std::fs::write(dir.path().join("merges.txt"), "#version: 0.2\nnospace\n").unwrap();
        let err = ClipTokenizer::from_folder(dir.path()).unwrap_err().to_string();
        assert!(err.contains("merges.txt") && err.contains("line 2"), "{err}");
    }

    #[test]
    fn missing_folder_names_it() {
        let err = ClipTokenizer::from_folder(Path::new("/nonexistent/tok")).unwrap_err().to_string();
        assert!(err.contains("/nonexistent/tok") && err.contains("vocab.json"), "{err}");
    }
}
