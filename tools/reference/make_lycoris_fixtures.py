"""LyCORIS fixtures made with the LyCORIS library itself: LoHa, LoKr (split and full-matrix), DoRA on
output rows and on input columns, and a full diff, on layers of the tiny model, with the merged
weights LyCORIS computes.

The reference environment does not carry lycoris-lora; install it beside it, without touching the
venv, then run from the repository root:

    /work/refvenv/bin/pip install --target /tmp/lyco --no-deps lycoris-lora==4.1.3 einops toml
    PYTHONPATH=/tmp/lyco /work/refvenv/bin/python tools/reference/make_lycoris_fixtures.py

Writes tests/fixtures/lora/lycoris_mixed.safetensors (the modules' `custom_state_dict()` under kohya
module names with the diffusers UNet spelling, float32, as LyCORIS saves) and
tests/fixtures/lora/lycoris_expected.safetensors (per graft layer: the weight difference the module's
forward applies at multiplier 1, float32), and adds a section to tests/fixtures/lora/README.md.
"""

import json
import sys
from importlib.metadata import version
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from lycoris.modules.full import FullModule  # noqa: E402
from lycoris.modules.locon import LoConModule  # noqa: E402
from lycoris.modules.loha import LohaModule  # noqa: E402
from lycoris.modules.lokr import LokrModule  # noqa: E402

import check_lora_files as c  # noqa: E402

# (graft layer, LyCORIS class, constructor arguments)
CASES = [
    ("unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q", LohaModule, dict(lora_dim=4, alpha=2)),
    # factor -1, rank 4 < max(w2 dims) / 2: w1 full, w2 split: scale alpha / r
    ("unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k", LokrModule, dict(lora_dim=4, alpha=1, factor=-1)),
    # both factors full matrices: scale 1 whatever alpha says
    ("text_encoder.text_model.encoder.layers.0.self_attn.q_proj", LokrModule, dict(lora_dim=4, alpha=3, full_matrix=True)),
    # w1 and w2 both split
    ("unet.mid_block.attentions.0.transformer_blocks.0.ff.net.0.proj", LokrModule,
     dict(lora_dim=2, alpha=4, factor=8, decompose_both=True)),
    # DoRA, magnitude per output row (LyCORIS' default today): dora_scale [out, 1]
    ("text_encoder_2.text_model.encoder.layers.1.mlp.fc1", LoConModule,
     dict(lora_dim=4, alpha=8, weight_decompose=True, wd_on_out=True)),
    # DoRA, magnitude per input column (older files): dora_scale [1, in]
    ("unet.down_blocks.1.attentions.1.proj_in", LoConModule,
     dict(lora_dim=4, alpha=2, weight_decompose=True, wd_on_out=False)),
    # LoHa with DoRA
    ("unet.up_blocks.0.attentions.1.transformer_blocks.1.attn1.to_v", LohaModule,
     dict(lora_dim=2, alpha=1, weight_decompose=True)),
    # full weight difference (`diff`, and `diff_b` for the bias)
    ("unet.mid_block.attentions.0.transformer_blocks.1.ff.net.2", FullModule, dict()),
]


def main():
    c.setup_torch()
    pipe = c.load_pipeline()
    g = torch.Generator().manual_seed(50)
    tensors, expected, described = {}, {}, []
    for layer, cls, kw in CASES:
        org = c.module_of(pipe, layer)
        name = c.kohya_name(layer, sgm=False)
        m = cls(name, org, multiplier=1.0, **kw)
        with torch.no_grad():
            for pname, p in sorted(m.named_parameters()):
                if pname == "dora_scale":
                    p.mul_(1 + 0.2 * torch.rand(p.shape, generator=g))  # not the base norm
                elif pname.startswith(("diff", "bias")):
                    p.copy_(0.05 * torch.randn(p.shape, generator=g))
                else:
                    p.copy_(0.3 * torch.randn(p.shape, generator=g))
            if cls is FullModule:
                # Its parameters hold the absolute weight once applied (`custom_state_dict` saves
                # weight - original): apply it first, as LyCORIS does before training.
                m.apply_to()
                delta = m.get_diff_weight(multiplier=1.0)[0]
            else:
                # What the module does in its forward (the training semantics, which A1111 and ComfyUI
                # follow): the output on an identity batch minus the base layer's is dW^T.
                # (`get_merged_weight` of LoHa / LoKr in lycoris-lora 4.1.3 multiplies by alpha / r
                # twice, in `get_weight` and again in `get_diff_weight`: not used.)
                m.multiplier = 1.0
                x = torch.eye(org.in_features)
                delta = (m(x) - org(x)).T
            expected[layer] = delta.float().contiguous()
            for k, v in m.custom_state_dict().items():
                tensors[f"{name}.{k}"] = v.detach().float().contiguous().clone()
        shapes = {k: list(v.shape) for k, v in m.custom_state_dict().items()}
        described.append((layer, cls.__name__, kw, shapes))
    c.write_safetensors(tensors, c.OUT / "lycoris_mixed.safetensors", {})
    c.write_safetensors(expected, c.OUT / "lycoris_expected.safetensors",
                        {"layers": json.dumps([layer for layer, _, _ in CASES])})
    write_readme(described)
    print("wrote lycoris_mixed.safetensors, lycoris_expected.safetensors")


def write_readme(described):
    readme = c.OUT / "README.md"
    text = readme.read_text().split("\n## LyCORIS")[0].rstrip() + "\n"
    rows = "\n".join(f"| `{layer}` | {cls}({', '.join(f'{k}={v}' for k, v in kw.items())}) | "
                     + ", ".join(f"`{k}` {v}" for k, v in shapes.items()) + " |"
                     for layer, cls, kw, shapes in described)
    text += f"""
## LyCORIS (`tools/reference/make_lycoris_fixtures.py`, lycoris-lora {version('lycoris-lora')})

Made with the LyCORIS module classes on layers of the tiny model (parameters random, seed 50;
DoRA magnitudes the base norms times 1 + 0.2 U(0, 1)), saved as LyCORIS saves them
(`custom_state_dict()` under kohya module names, diffusers UNet spelling, float32):

- `lycoris_mixed.safetensors`: all the modules below in one file.
- `lycoris_expected.safetensors`: per graft layer, the weight difference the LyCORIS module's `forward`
  applies at multiplier 1 (its output on an identity batch minus the base layer's; for `FullModule`,
  `get_diff_weight`). With DoRA it depends on the base weight: those of `tiny-sdxl/`.

| layer | module | tensors |
|---|---|---|
{rows}

LyCORIS scales LoKr by alpha / r when a factor is split and by 1 when both are full matrices (it then
stores alpha = r). Its DoRA multiplier rescales the normalised weight,
`W' = (W + dW) * (m * (s / |W + dW| - 1) + 1)`; A1111 and ComfyUI interpolate the merged weight,
`W' = W + m * ((W + dW) * s / |W + dW| - W)`. The two agree at m = 1, the only multiplier stored here.
lycoris-lora 4.1.3's `get_diff_weight` / `get_merged_weight` of LoHa and LoKr scale by alpha / r twice
(once in `get_weight`, again in `get_diff_weight`); its `forward`, A1111 and ComfyUI scale once, and so does
graft.
"""
    readme.write_text(text)


if __name__ == "__main__":
    main()
