"""LoCon fixtures made with the LyCORIS library itself: LoCon (kohya's conv LoRA) and LyCORIS' Tucker
LoCon on conv layers of the tiny model (3x3 resnet convs, a 1x1 shortcut, a stride-2 downsampler, an
upsampler), with the weight differences LyCORIS computes.

Run from the repository root with the reference environment (lycoris-lora 4.1.3 in it):

    /work/refvenv/bin/python tools/reference/make_locon_fixtures.py

Writes tests/fixtures/lora/lycoris_locon.safetensors (the modules' `custom_state_dict()` under kohya
module names with the diffusers UNet spelling, float32, as LyCORIS saves) and
tests/fixtures/lora/lycoris_locon_expected.safetensors (per graft layer: LyCORIS' `get_diff_weight`
at multiplier 1, checked here to be what the module's `forward` adds: conv(x, W + dW) - conv(x, W)),
and adds a section to tests/fixtures/lora/README.md.
"""

import json
import sys
from importlib.metadata import version
from pathlib import Path

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from lycoris.modules.locon import LoConModule  # noqa: E402

import check_lora_files as c  # noqa: E402

# (graft layer, LoConModule arguments)
CASES = [
    ("unet.down_blocks.1.resnets.0.conv1", dict(lora_dim=4, alpha=2)),
    # 1x1: down [r, in, 1, 1]
    ("unet.down_blocks.1.resnets.0.conv_shortcut", dict(lora_dim=3, alpha=1.5)),
    # stride 2
    ("unet.down_blocks.0.downsamplers.0.conv", dict(lora_dim=2, alpha=4)),
    # Tucker: down [r, in, 1, 1], mid [r, r, 3, 3], up [out, r, 1, 1]
    ("unet.mid_block.resnets.0.conv2", dict(lora_dim=3, alpha=1, use_tucker=True)),
    ("unet.up_blocks.1.upsamplers.0.conv", dict(lora_dim=2, alpha=0, use_tucker=True)),
    ("unet.up_blocks.2.resnets.2.conv1", dict(lora_dim=4, alpha=8)),
]


def main():
    c.setup_torch()
    pipe = c.load_pipeline()
    g = torch.Generator().manual_seed(51)
    tensors, expected, described = {}, {}, []
    for layer, kw in CASES:
        org = c.module_of(pipe, layer)
        assert isinstance(org, torch.nn.Conv2d), layer
        name = c.kohya_name(layer, sgm=False)
        m = LoConModule(name, org, multiplier=1.0, **kw)
        with torch.no_grad():
            for pname, p in sorted(m.named_parameters()):
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
            delta = m.get_diff_weight(multiplier=1.0)[0].float()
            # The forward's semantics: conv(x, W + dW) with the layer's stride and padding.
            m.multiplier = 1.0
            m.apply_to()
            x = torch.randn(2, org.in_channels, 7, 6, generator=g)
            got = m(x) - F.conv2d(x, org.weight, org.bias, org.stride, org.padding)
            want = F.conv2d(x, delta, None, org.stride, org.padding)
            err = (got - want).abs().max().item()
            assert err < 1e-5, f"{layer}: forward differs from conv with get_diff_weight by {err}"
            m.restore()
            expected[layer] = delta.contiguous()
            state = m.custom_state_dict()
            for k, v in state.items():
                tensors[f"{name}.{k}"] = v.detach().float().contiguous().clone()
        shapes = {k: list(v.shape) for k, v in state.items()}
        described.append((layer, kw, shapes, tuple(org.weight.shape)))
    c.write_safetensors(tensors, c.OUT / "lycoris_locon.safetensors", {})
    c.write_safetensors(expected, c.OUT / "lycoris_locon_expected.safetensors",
                        {"layers": json.dumps([layer for layer, _ in CASES])})
    write_readme(described)
    print("wrote lycoris_locon.safetensors, lycoris_locon_expected.safetensors")


def write_readme(described):
    readme = c.OUT / "README.md"
    before, _, rest = readme.read_text().partition("\n## LoCon")
    # Keep any section after this one.
    after = ""
    if rest and "\n## " in rest:
        after = "\n## " + rest.split("\n## ", 1)[1]
    rows = "\n".join(f"| `{layer}` {list(w)} | LoConModule({', '.join(f'{k}={v}' for k, v in kw.items())}) | "
                     + ", ".join(f"`{k}` {v}" for k, v in shapes.items()) + " |"
                     for layer, kw, shapes, w in described)
    text = before.rstrip() + f"""

## LoCon (`tools/reference/make_locon_fixtures.py`, lycoris-lora {version('lycoris-lora')})

LyCORIS `LoConModule`s on conv layers of the tiny UNet (parameters 0.3 N(0, 1), seed 51), saved as
LyCORIS saves them (`custom_state_dict()`, kohya module names with the diffusers UNet spelling,
float32):

- `lycoris_locon.safetensors`: all the modules below in one file.
- `lycoris_locon_expected.safetensors`: per graft layer, `get_diff_weight(multiplier=1)` [out, in, kh, kw];
  the script checks that the module's `forward` adds exactly `conv(x, dW)` with the layer's stride and
  padding.

| layer [weight] | module | tensors |
|---|---|---|
{rows}

LyCORIS uses Tucker only for kernels larger than 1x1; alpha 0 means alpha = r. Tucker's difference is
`dW[o, i] = alpha / r * sum_ab up[o, a] mid[a, b] down[b, i]` (`rebuild_tucker`).
""" + after
    readme.write_text(text)


if __name__ == "__main__":
    main()
