"""A tiny CLIP BPE vocabulary (vocab.json + merges.txt) learned from a few hundred English words.

Layout as in OpenAI's CLIP vocabulary: the 256 byte-level characters, the same 256 with `</w>`,
one entry per merge (in merge order), then `<|startoftext|>` and `<|endoftext|>` last.
"""

import json
from pathlib import Path

# Words the tests prompt with come first and weigh most, so they end up as single tokens.
PROMPT_WORDS = [
    "a", "red", "fox", "photo", "of", "cat", "watercolor", "painting", "blurry", "the", "dog",
    "portrait", "in", "style", "oil", "on", "canvas", "with", "and", "blue", "sky",
]
COMMON_WORDS = """
about above across after again against air all almost along also always am among an animal another
answer any are area around art artist as ask at autumn away back ball be beach beautiful because bed
been before began begin being below best better between big bird black blood boat body book both box
boy bright bring brown build but by call came can car care carry castle center change children city
class clear close cloud cold color come common complete could country course cover cross cut dark day
deep did different do does done door down draw drawing dream during each early earth east eat end
enough even evening ever every eye face fall family far farm fast father feel field figure fill find
fine fire first fish five flower fly follow food foot for forest form found four free friend from
front full game garden gave get girl give glass go gold good got gray great green ground group grow
had half hand happy hard has have he head hear heart help her here high hill him his hold home horse
hot house how hundred i if into is island it its just keep kind king know lake land large last late
laugh lead learn leave left less letter light like line list little live long look love low made make
man many map mark may me mean men might mile mind moon more morning most mother mountain move much
music must my name near need never new next night no north not nothing now number ocean old once one
only open or order other our out over own page paper part pass people person picture piece place
plain plan plant play point portrait power pretty pull put queen question quick rain ran reach read
ready real render rest right river road rock room round rule run said same sat saw say school sea
second see seem self sentence set several shadow shape she ship short should show side simple since
sing sit six size sleep slow small snow so some song soon sound south space stand star start stay
still stone stop story street strong study such summer sun sunset sure surface table take talk tall
tell ten than that their them then there these they thing think this those though thought three
through time to today together told too took top toward town tree true try turn two under until up
upon us use very voice walk wall want warm was watch water wave way we well went were west what
wheel when where which while white who whole why wide wild will wind window winter wish wood word work
world would write year yellow yes yet you young your highly detailed sharp focus cinematic lighting
studio golden hour landscape illustration sketch pencil digital anime realistic masterpiece quality
""".split()


def bytes_to_unicode():
    """The GPT-2 / CLIP byte -> printable character table (byte order as in CLIP's vocabulary)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def learn_merges(num_merges):
    b2u = bytes_to_unicode()
    counts = {}
    for w in PROMPT_WORDS:
        counts[w] = counts.get(w, 0) + 1000
    for w in COMMON_WORDS:
        counts[w] = counts.get(w, 0) + 1
    words = {}
    for w, c in counts.items():
        chars = [b2u[b] for b in w.encode("utf-8")]
        chars[-1] = chars[-1] + "</w>"
        words[tuple(chars)] = c
    merges = []
    while len(merges) < num_merges:
        pairs = {}
        for syms, c in words.items():
            for a, b in zip(syms, syms[1:]):
                pairs[(a, b)] = pairs.get((a, b), 0) + c
        if not pairs:
            break
        # Most frequent pair; ties broken by the pair's text so the result is deterministic.
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        new_words = {}
        for syms, c in words.items():
            out, i = [], 0
            while i < len(syms):
                if i + 1 < len(syms) and (syms[i], syms[i + 1]) == best:
                    out.append(syms[i] + syms[i + 1])
                    i += 2
                else:
                    out.append(syms[i])
                    i += 1
            new_words[tuple(out)] = new_words.get(tuple(out), 0) + c
        words = new_words
    return merges


def build_vocab(num_merges=486):
    b2u = bytes_to_unicode()
    chars = list(b2u.values())
    tokens = chars + [c + "</w>" for c in chars]
    merges = learn_merges(num_merges)
    for a, b in merges:
        tokens.append(a + b)
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    assert len(set(tokens)) == len(tokens), "duplicate vocabulary entry"
    vocab = {t: i for i, t in enumerate(tokens)}
    return vocab, merges


def _special(content):
    return {"__type": "AddedToken", "content": content, "lstrip": False, "normalized": True,
            "rstrip": False, "single_word": False}


def write_tokenizer(folder: Path, vocab, merges, pad_token):
    """Writes the four files of a CLIP tokenizer folder as the SDXL base repository has them."""
    folder.mkdir(parents=True, exist_ok=True)
    for f in folder.iterdir():
        f.unlink()
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False) + "\n", encoding="utf-8")
    lines = ["#version: 0.2"] + [f"{a} {b}" for a, b in merges]
    (folder / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    special = {
        "bos_token": _special("<|startoftext|>"),
        "eos_token": _special("<|endoftext|>"),
        "pad_token": pad_token,
        "unk_token": _special("<|endoftext|>"),
    }
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
    config = {
        "add_prefix_space": False,
        "bos_token": _special("<|startoftext|>"),
        "clean_up_tokenization_spaces": True,
        "do_lower_case": True,
        "eos_token": _special("<|endoftext|>"),
        "errors": "replace",
        "model_max_length": 77,
        "pad_token": pad_token,
        "tokenizer_class": "CLIPTokenizer",
        "unk_token": _special("<|endoftext|>"),
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
