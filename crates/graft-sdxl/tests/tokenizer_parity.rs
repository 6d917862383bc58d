//! The CLIP tokenizer against transformers' `CLIPTokenizer` (tools/reference/make_tokenizer_fixtures.py):
//! the built-in vocabulary, folders with vocab.json + merges.txt, and tokenizer.json files, on prompts
//! with punctuation, unicode, mixed case, odd whitespace, special tokens and over-long text.

use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use graft_sdxl::tokenizer::{ClipTokenizer, PadToken};
use serde_json::{json, Value};

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn fixture() -> Value {
    let path = repo_root().join("tests/fixtures/reference/tokenizer.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap()
}

/// The vocabulary and merges of the embedded BPE file, built as OpenAI's CLIP does.
fn clip_vocab() -> (Vec<String>, Vec<String>) {
    let gz = std::fs::read(Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/bpe_simple_vocab_16e6.txt.gz")).unwrap();
    let mut text = String::new();
    flate2::read::GzDecoder::new(&gz[..]).read_to_string(&mut text).unwrap();
    let merges: Vec<String> = text.split('\n').skip(1).take(49152 - 256 - 2).map(str::to_string).collect();
    let printable = |b: u32| (0x21..=0x7e).contains(&b) || (0xa1..=0xac).contains(&b) || (0xae..=0xff).contains(&b);
    let mut chars: Vec<char> = (0..256u32).filter(|&b| printable(b)).map(|b| char::from_u32(b).unwrap()).collect();
    chars.extend((0..(256 - chars.len()) as u32).map(|i| char::from_u32(256 + i).unwrap()));
    let mut tokens: Vec<String> = chars.iter().map(|c| c.to_string()).collect();
    tokens.extend(chars.iter().map(|c| format!("{c}</w>")));
    tokens.extend(merges.iter().map(|m| m.replace(' ', "")));
    tokens.push("<|startoftext|>".into());
    tokens.push("<|endoftext|>".into());
    (tokens, merges)
}

fn vocab_json(tokens: &[String]) -> Value {
    let map: serde_json::Map<String, Value> = tokens.iter().enumerate().map(|(i, t)| (t.clone(), json!(i))).collect();
    Value::Object(map)
}

/// Writes one fixture case's folder: the recorded config files plus the vocabulary in the case's form.
fn write_case_folder(dir: &Path, case: &Value, tokens: &[String], merges: &[String]) {
    std::fs::create_dir_all(dir).unwrap();
    for (name, text) in case["files"].as_object().unwrap() {
        std::fs::write(dir.join(name), text.as_str().unwrap()).unwrap();
    }
    match case["source"].as_str().unwrap() {
        "vocab.json" => {
            std::fs::write(dir.join("vocab.json"), vocab_json(tokens).to_string()).unwrap();
            std::fs::write(dir.join("merges.txt"), format!("#version: 0.2\n{}\n", merges.join("\n"))).unwrap();
        }
        "tokenizer.json" => {
            let pairs: Vec<Value> = merges.iter().map(|m| json!(m.split(' ').collect::<Vec<_>>())).collect();
            let file = json!({
                "version": "1.0",
                "added_tokens": case["added_tokens"],
                "model": {"type": "BPE", "end_of_word_suffix": "</w>", "vocab": vocab_json(tokens), "merges": pairs},
            });
            std::fs::write(dir.join("tokenizer.json"), file.to_string()).unwrap();
        }
        other => panic!("unknown source {other}"),
    }
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

/// Compares every prompt; returns the mismatches as readable lines.
fn compare(tok: &ClipTokenizer, case: &Value, prompts: &[String], max_len: usize, what: &str) -> Vec<String> {
    let mut failures = Vec::new();
    for (i, prompt) in prompts.iter().enumerate() {
        let plain = tok.encode(prompt);
        let expected_plain = ids(&case["plain"][i]);
        if plain != expected_plain {
            failures.push(format!("{what} encode({prompt:?}):\n  got      {plain:?}\n  expected {expected_plain:?}"));
        }
        let padded = tok.encode_padded(prompt, max_len);
        let expected = ids(&case["padded"][i]);
        if padded != expected {
            failures.push(format!("{what} encode_padded({prompt:?}):\n  got      {padded:?}\n  expected {expected:?}"));
        }
    }
    failures
}

#[test]
fn matches_transformers_clip_tokenizer() {
    let data = fixture();
    let prompts: Vec<String> = data["prompts"].as_array().unwrap().iter().map(|p| p.as_str().unwrap().to_string()).collect();
    let max_len = data["max_length"].as_u64().unwrap() as usize;
    let (tokens, merges) = clip_vocab();
    let tmp = tempfile::tempdir().unwrap();
    let mut failures = Vec::new();
    let cases = data["cases"].as_array().unwrap();
    assert!(cases.len() >= 5 && prompts.len() >= 30);
    for case in cases {
        let name = case["name"].as_str().unwrap();
        let dir = tmp.path().join(name);
        write_case_folder(&dir, case, &tokens, &merges);
        let tok = ClipTokenizer::from_folder(&dir).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(tok.pad_id(), case["pad_id"].as_u64().unwrap() as u32, "{name}: pad id");
        failures.extend(compare(&tok, case, &prompts, max_len, &format!("[{name}]")));
        if let Some(builtin) = case.get("builtin").and_then(Value::as_str) {
            let pad = if builtin == "Exclamation" { PadToken::Exclamation } else { PadToken::EndOfText };
            let tok = ClipTokenizer::builtin(pad);
            failures.extend(compare(&tok, case, &prompts, max_len, &format!("[builtin {builtin}]")));
        }
    }
    assert!(failures.is_empty(), "{} mismatches:\n{}", failures.len(), failures.join("\n"));
}

#[test]
fn builtin_equals_generated_vocab_files() {
    let (tokens, merges) = clip_vocab();
    let tmp = tempfile::tempdir().unwrap();
    std::fs::write(tmp.path().join("vocab.json"), vocab_json(&tokens).to_string()).unwrap();
    std::fs::write(tmp.path().join("merges.txt"), format!("#version: 0.2\n{}\n", merges.join("\n"))).unwrap();
    let from_files = ClipTokenizer::from_folder(tmp.path()).unwrap();
    let builtin = ClipTokenizer::builtin(PadToken::EndOfText);
    assert_eq!(from_files.vocab_size(), builtin.vocab_size());
    let text = "The quick brown fox jumps over the lazy dog; 1234 ÅÄÖ 東京 🦊!";
    assert_eq!(from_files.encode_padded(text, 77), builtin.encode_padded(text, 77));
}

/// The tiny tokenizer folders of tests/fixtures/tiny-sdxl against the ids the reference pipeline used.
#[test]
fn tiny_sdxl_tokenizers_match_reference_input_ids() {
    let root = repo_root();
    let te = root.join("tests/fixtures/reference/te.safetensors");
    let bytes = std::fs::read(&te).unwrap_or_else(|e| panic!("{}: {e}", te.display()));
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let meta: HashMap<String, String> = meta.metadata().clone().unwrap_or_default();
    let prompts: Vec<String> = serde_json::from_str(&meta["prompts"]).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    for (folder, key, default_pad) in
        [("tokenizer", "te1.input_ids", PadToken::EndOfText), ("tokenizer_2", "te2.input_ids", PadToken::Exclamation)]
    {
        let tok = ClipTokenizer::from_folder_with_default_pad(&root.join("tests/fixtures/tiny-sdxl").join(folder), default_pad)
            .unwrap_or_else(|e| panic!("{folder}: {e}"));
        let view = st.tensor(key).unwrap();
        assert_eq!(view.dtype(), safetensors::Dtype::I64);
        let expected: Vec<u32> = view.data().chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().unwrap()) as u32).collect();
        let width = view.shape()[1];
        for (i, prompt) in prompts.iter().enumerate() {
            assert_eq!(tok.encode_padded(prompt, width), expected[i * width..(i + 1) * width], "{folder}: {prompt:?}");
        }
    }
}
