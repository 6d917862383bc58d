"""Reference ids of transformers' CLIPTokenizer for the tokenizer parity test.

Builds the standard CLIP vocabulary (vocab.json + merges.txt) from the same
`bpe_simple_vocab_16e6.txt.gz` that graft embeds, lays it out as tokenizer folders of several
shapes, tokenizes tricky prompts with transformers' CLIPTokenizer and writes
tests/fixtures/reference/tokenizer.json. The test rebuilds each folder from the embedded vocabulary
plus the small config files recorded here, so the fixture stays small.

Run from the repository root: /work/refvenv/bin/python tools/reference/make_tokenizer_fixtures.py
"""

import gzip
import json
import tempfile
from pathlib import Path

import transformers
from transformers import CLIPTokenizer

ROOT = Path(__file__).resolve().parents[2]
BPE_FILE = ROOT / "crates/graft-sdxl/assets/bpe_simple_vocab_16e6.txt.gz"
OUT = ROOT / "tests/fixtures/reference/tokenizer.json"
MAX_LENGTH = 77

PROMPTS = [
    "a photo of a cat",
    "",
    "   ",
    "A PHOTO Of A CaT, HighLY DeTaiLed",
    "  leading and trailing spaces  ",
    "multiple   spaces\tand\ttabs\n\nand newlines\r\nend",
    "punctuation: hello, world! what's up? (yes) [no] {maybe} -- 'quoted' \"double\"",
    "don't can't I'm we'll they've she'd it's DON'T IT'S ''s",
    "Café naïve résumé Ångström façade",
    "e\u0301 decomposed accent and A\u030a (NFC)",
    "東京タワーの写真、夜景",
    "你好，世界！",
    "한국어 텍스트 그림",
    "emoji 🦊🐱‍👤 👍🏽 ❤️ 🇫🇷",
    "ΟΔΥΣΣΕΥΣ final sigma Σ",
    "İstanbul ß ẞ ﬁ ligature ı I",
    "numbers 1234567 3.14 1,000 2nd 42x",
    "masterpiece, best quality, (detailed:1.2), [blurry], <lora:style:0.8>",
    "<|endoftext|> inside a prompt",
    "<|ENDOFTEXT|> upper and <|EndOfText|>",
    "<|startoftext|>start",
    "wow!!! great!",
    "!",
    "hello!world",
    "\u00a0non-breaking\u2003em space\u3000ideographic\u2028line sep",
    "zero\u200bwidth\ufeffbom\u00adsoft hyphen",
    "control\x07bell\x00nul",
    "über-detailed_8k-UHD  photo.jpg",
    "$100 & 50% off #hashtag @user ~tilde `code` ^caret |pipe \\backslash",
    "\u2019curly\u2019 \u201cquotes\u201d \u2014 em dash \u2026 ellipsis",
    "a " * 100,
    "a highly detailed oil painting of a majestic red fox sitting in a snowy forest at golden hour, "
    "cinematic lighting, sharp focus, intricate fur, trending on artstation, by greg rutkowski and "
    "alphonse mucha, 8k, octane render, volumetric fog, bokeh, masterpiece, award winning photograph",
]


def bytes_to_unicode():
    """GPT-2 / CLIP's byte -> printable character table, in CLIP's vocabulary order."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def clip_vocab():
    """The vocabulary the way OpenAI's CLIP builds it: bytes, bytes + </w>, merges, specials."""
    lines = gzip.open(BPE_FILE).read().decode("utf-8").split("\n")
    merges = lines[1 : 49152 - 256 - 2 + 1]
    chars = list(bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars] + ["".join(m.split()) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(tokens)}, merges


def special(content):
    return {"content": content, "lstrip": False, "normalized": True, "rstrip": False, "single_word": False}


def sdxl_configs(pad):
    """special_tokens_map.json and tokenizer_config.json as SDXL base 1.0's tokenizer folders have them."""
    specials = {"bos_token": special("<|startoftext|>"), "eos_token": special("<|endoftext|>"),
                "pad_token": pad, "unk_token": special("<|endoftext|>")}
    config = {
        "add_prefix_space": False,
        "bos_token": dict(special("<|startoftext|>"), __type="AddedToken"),
        "clean_up_tokenization_spaces": True,
        "do_lower_case": True,
        "eos_token": dict(special("<|endoftext|>"), __type="AddedToken"),
        "errors": "replace",
        "model_max_length": 77,
        "pad_token": pad,
        "tokenizer_class": "CLIPTokenizer",
        "unk_token": dict(special("<|endoftext|>"), __type="AddedToken"),
    }
    return {"special_tokens_map.json": json.dumps(specials, indent=2), "tokenizer_config.json": json.dumps(config, indent=2)}


def write_vocab_merges(folder, vocab, merges):
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")


def run_case(name, folder, source, builtin=None, files=None, added_tokens=None):
    tok = CLIPTokenizer.from_pretrained(folder)
    padded = tok(PROMPTS, padding="max_length", max_length=MAX_LENGTH, truncation=True).input_ids
    plain = [tok(p, add_special_tokens=False).input_ids for p in PROMPTS]
    case = {"name": name, "source": source, "files": files or {}, "pad_token": str(tok.pad_token),
            "pad_id": tok.pad_token_id, "padded": padded, "plain": plain}
    if builtin:
        case["builtin"] = builtin
    if added_tokens is not None:
        case["added_tokens"] = added_tokens
    return case


def main():
    vocab, merges = clip_vocab()
    assert len(vocab) == 49408
    cases = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        # SDXL base 1.0's two folders (vocab.json + merges.txt + the two config files); graft's
        # built-in vocabulary must give the same ids.
        for name, pad, builtin in (("sdxl_tokenizer", "<|endoftext|>", "EndOfText"), ("sdxl_tokenizer_2", "!", "Exclamation")):
            folder = tmp / name
            folder.mkdir()
            write_vocab_merges(folder, vocab, merges)
            files = sdxl_configs(pad)
            for f, text in files.items():
                (folder / f).write_text(text)
            cases.append(run_case(name, folder, "vocab.json", builtin=builtin, files=files))
        # vocab.json + merges.txt alone: transformers' defaults.
        folder = tmp / "vocab_merges_only"
        folder.mkdir()
        write_vocab_merges(folder, vocab, merges)
        cases.append(run_case("vocab_merges_only", folder, "vocab.json"))
        # What transformers 5 saves: tokenizer.json + tokenizer_config.json.
        for name in ("sdxl_tokenizer", "sdxl_tokenizer_2"):
            saved = tmp / f"{name}_saved"
            CLIPTokenizer.from_pretrained(tmp / name).save_pretrained(saved)
            full = json.loads((saved / "tokenizer.json").read_text(encoding="utf-8"))
            assert full["model"]["vocab"] == vocab, "saved vocabulary differs"
            assert [" ".join(m) for m in full["model"]["merges"]] == merges, "saved merges differ"
            files = {f.name: f.read_text(encoding="utf-8") for f in saved.iterdir() if f.name != "tokenizer.json"}
            cases.append(run_case(f"{name}_tokenizer_json", saved, "tokenizer.json", files=files,
                                  added_tokens=full["added_tokens"]))

    OUT.parent.mkdir(parents=True, exist_ok=True)
    data = {"transformers": transformers.__version__, "max_length": MAX_LENGTH, "prompts": PROMPTS, "cases": cases}
    OUT.write_text(json.dumps(data, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"wrote {OUT} ({len(PROMPTS)} prompts, {len(cases)} cases)")


if __name__ == "__main__":
    main()
