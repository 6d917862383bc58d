"""LoRA file fixtures made the way kohya and diffusers write them, and a check that diffusers loads
the files graft writes.

Run from the repository root with the reference environment (tools/reference/setup.sh):

    /work/refvenv/bin/python tools/reference/check_lora_files.py
        (re)writes tests/fixtures/lora/ (deterministic; CPU, float32 math, fixed seeds)

    /work/refvenv/bin/python tools/reference/check_lora_files.py --check-exports target/lora-export-check
        loads every kohya / PEFT file the Rust test `graft-formats --test export` wrote there with
        diffusers' `pipe.load_lora_weights`, fuses it and compares each merged weight with the
        delta graft says the file holds (`expected.safetensors` in the same folder); checks the
        LyCORIS `diff` files' key names with diffusers' own kohya key conversion.

    /work/refvenv/bin/python tools/reference/check_lora_files.py --check-locon target/locon-export-check
        loads the LoCon / Tucker files graft TRAINED and exported (the Rust tests
        `graft-tests --test e2e plugin_lora::locon` write them there with graft's deltas) with the LyCORIS
        library (`LoConModule.make_module_from_state_dict`, every key used, `get_diff_weight`) and,
        for files without a Tucker core, with diffusers' `pipe.load_lora_weights` (every module
        attached, fused weights); both are compared with graft's deltas.

Fixtures (see tests/fixtures/lora/README.md, written by this script):
    peft_diffusers.safetensors    PEFT adapters (r=4, alpha=8, one rank_pattern and one alpha_pattern
                                  entry) on the tiny UNet and both text encoders, saved by
                                  StableDiffusionXLPipeline.save_lora_weights with the adapter
                                  metadata; float16
    kohya_sgm.safetensors         the same weights under kohya's SDXL names (SGM UNet names,
                                  lora_te1_/lora_te2_, .alpha tensors, ss_* metadata and hashes
                                  computed as sd-scripts does); float16
    kohya_diffusers_bf16.safetensors  kohya keys with diffusers UNet module names, bfloat16, no
                                  alpha on the text encoders (scale 1 there)
    expected.safetensors          per fixture, diffusers' fused-minus-base weight for selected layers,
                                  and the UNet / text-encoder outputs with the PEFT adapter at
                                  weights 1.0 and 0.5
"""

import argparse
import hashlib
import json
import sys
from io import BytesIO
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
FIXTURES = ROOT / "tests" / "fixtures"
MODEL = FIXTURES / "tiny-sdxl"
OUT = FIXTURES / "lora"
REF = FIXTURES / "reference"

import diffusers  # noqa: E402
import peft  # noqa: E402
import safetensors.torch  # noqa: E402
from diffusers import StableDiffusionXLPipeline  # noqa: E402
from peft import LoraConfig  # noqa: E402
from peft.tuners.tuners_utils import BaseTunerLayer  # noqa: E402
from peft.utils import get_peft_model_state_dict  # noqa: E402
from safetensors import safe_open  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

LAYERS_PER_BLOCK = 2  # of the tiny UNet (SDXL's too): SGM block numbers depend on it
UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2"]
TE_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]
RANK, ALPHA = 4, 8
RANK_PATTERN = {"mid_block.attentions.0.transformer_blocks.1.attn2.to_k": 2}
# On proj_in, not on an attention projection: diffusers 0.42 drops per-module kohya alphas of attention
# projections (its converted alpha key keeps `.processor.to_q_lora.down.weight` and matches nothing).
ALPHA_PATTERN = {"down_blocks.1.attentions.1.proj_in": 3}
COMPONENTS = ("unet", "text_encoder", "text_encoder_2")

# Layers whose expected delta is stored (graft names: component prefix + diffusers module path).
SELECTED = [
    "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q",
    "unet.down_blocks.1.attentions.1.proj_in",
    "unet.down_blocks.2.attentions.1.transformer_blocks.1.attn2.to_k",
    "unet.mid_block.attentions.0.transformer_blocks.1.attn2.to_k",
    "unet.down_blocks.1.attentions.0.transformer_blocks.0.ff.net.0.proj",
    "unet.up_blocks.0.attentions.2.transformer_blocks.1.attn1.to_out.0",
    "unet.up_blocks.1.attentions.2.transformer_blocks.0.ff.net.2",
    "unet.up_blocks.1.attentions.0.proj_out",
    "text_encoder.text_model.encoder.layers.0.self_attn.q_proj",
    "text_encoder.text_model.encoder.layers.2.mlp.fc1",
    "text_encoder_2.text_model.encoder.layers.1.self_attn.out_proj",
    "text_encoder_2.text_model.encoder.layers.2.mlp.fc2",
]

ST_DTYPES = {torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32", torch.int64: "I64"}


def setup_torch():
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    torch.set_default_dtype(torch.float32)


def write_safetensors(tensors, path, metadata):
    """A .safetensors file, byte-for-byte reproducible: metadata and tensors sorted (tensors by
    decreasing element size, then name, as the safetensors library lays them out), header
    space-padded to a multiple of 8. Checked by reading it back with the library."""
    order = sorted(tensors, key=lambda k: (-tensors[k].element_size(), k))
    header = {"__metadata__": dict(sorted(metadata.items()))} if metadata else {}
    blobs, offset = [], 0
    for k in order:
        t = tensors[k].detach().contiguous().cpu()
        data = t.reshape(-1).view(torch.uint8).numpy().tobytes()
        header[k] = {"dtype": ST_DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * (-len(text) % 8)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(len(text).to_bytes(8, "little"))
        f.write(text)
        for b in blobs:
            f.write(b)
    tmp.chmod(0o644)
    tmp.replace(path)
    back = load_file(path)
    assert set(back) == set(tensors) and all(torch.equal(back[k], tensors[k].cpu()) for k in tensors), path
    return path.read_bytes()


def file_metadata(path):
    with safe_open(path, "pt") as f:
        return dict(f.metadata() or {})


# ---------------------------------------------------------------- names


def sgm_unet_path(path):
    """diffusers UNet module path -> SGM path (FACTS.md block map)."""
    p = path.split(".")
    n = LAYERS_PER_BLOCK + 1
    if p[0] == "down_blocks" and p[2] == "attentions":
        return ".".join(["input_blocks", str(1 + n * int(p[1]) + int(p[3])), "1"] + p[4:])
    if p[0] == "mid_block" and p[2] == "0":
        return ".".join(["middle_block", "1"] + p[3:])
    if p[0] == "up_blocks" and p[2] == "attentions":
        return ".".join(["output_blocks", str(n * int(p[1]) + int(p[3])), "1"] + p[4:])
    raise ValueError(f"no SGM name for {path}")


def split_layer(name):
    for c in ("text_encoder_2", "text_encoder", "unet"):
        if name.startswith(c + "."):
            return c, name[len(c) + 1:]
    raise ValueError(name)


def kohya_name(layer, sgm=True):
    comp, path = split_layer(layer)
    if comp == "unet":
        return "lora_unet_" + (sgm_unet_path(path) if sgm else path).replace(".", "_")
    return {"text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}[comp] + path.replace(".", "_")


def layer_name(comp, path):
    """Python module path -> graft layer name. transformers 5's CLIPTextModel has no `text_model`
    level (its modules are `encoder.layers.N...`, CLIPTextModelWithProjection keeps it); graft, kohya
    and the real SDXL files always say `text_model.`."""
    if comp != "unet" and not path.startswith("text_model."):
        path = "text_model." + path
    return f"{comp}.{path}"


def module_of(pipe, layer):
    comp, path = split_layer(layer)
    model = getattr(pipe, comp)
    if comp != "unet" and not hasattr(model, "text_model"):
        path = path.removeprefix("text_model.")
    return model.get_submodule(path)


def base_weight(module):
    return (module.base_layer if isinstance(module, BaseTunerLayer) else module).weight


# ---------------------------------------------------------------- pipeline


def load_pipeline():
    pipe = StableDiffusionXLPipeline.from_pretrained(MODEL, torch_dtype=torch.float32, add_watermarker=False,
                                                     local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    for c in COMPONENTS + ("vae",):
        getattr(pipe, c).eval()
    return pipe


def linear_weights(pipe):
    """Every nn.Linear weight of the three models, by graft name (base weights under PEFT)."""
    out = {}
    for comp in COMPONENTS:
        for name, m in getattr(pipe, comp).named_modules():
            if isinstance(m, torch.nn.Linear) and ".lora_" not in name and "base_layer" not in name:
                out[layer_name(comp, name)] = m.weight.detach().clone()
            elif isinstance(m, BaseTunerLayer):
                out[layer_name(comp, name)] = base_weight(m).detach().clone()
    return out


def adapted_layers(pipe):
    return sorted(layer_name(comp, name) for comp in COMPONENTS
                  for name, m in getattr(pipe, comp).named_modules() if isinstance(m, BaseTunerLayer))


def fused_deltas(path, layers=None, scale=1.0):
    """diffusers' fused weight minus the base weight, per layer (all adapted layers by default)."""
    pipe = load_pipeline()
    before = linear_weights(pipe)
    pipe.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name="x")
    loaded = adapted_layers(pipe)
    pipe.fuse_lora(components=list(COMPONENTS), lora_scale=scale, adapter_names=["x"])
    after = linear_weights(pipe)
    changed = sorted(k for k in before if not torch.equal(before[k], after[k]))
    deltas = {k: (after[k] - before[k]) for k in (layers or loaded)}
    return deltas, loaded, changed


# ---------------------------------------------------------------- fixtures


def make_peft(pipe):
    """Adds seeded PEFT adapters (values rounded through float16) and returns the state dicts."""
    unet_cfg = LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=UNET_TARGETS, init_lora_weights="gaussian",
                          rank_pattern=RANK_PATTERN, alpha_pattern=ALPHA_PATTERN)
    te_cfg = LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=TE_TARGETS, init_lora_weights="gaussian")
    pipe.unet.add_adapter(unet_cfg)
    pipe.text_encoder.add_adapter(te_cfg)
    pipe.text_encoder_2.add_adapter(te_cfg)
    g = torch.Generator().manual_seed(40)
    with torch.no_grad():
        for comp in COMPONENTS:
            for name, p in sorted(getattr(pipe, comp).named_parameters()):
                if ".lora_A." in name:
                    p.copy_((torch.randn(p.shape, generator=g) / p.shape[1] ** 0.5).half().float())
                elif ".lora_B." in name:
                    p.copy_((0.5 * torch.randn(p.shape, generator=g) / p.shape[1] ** 0.5).half().float())
    layers, metas = {}, {}
    for comp in COMPONENTS:
        model = getattr(pipe, comp)
        layers[comp] = {k: v.half() for k, v in get_peft_model_state_dict(model).items()}
        cfg = model.peft_config["default"].to_dict()
        # A set in PEFT's config: sorted so the header is the same on every run.
        cfg["target_modules"] = sorted(cfg["target_modules"])
        metas[comp] = cfg
    return layers, metas


def save_peft(layers, metas, tmp):
    """diffusers' own writer, then the same tensors and header rewritten in sorted order."""
    StableDiffusionXLPipeline.save_lora_weights(
        tmp, unet_lora_layers=layers["unet"], text_encoder_lora_layers=layers["text_encoder"],
        text_encoder_2_lora_layers=layers["text_encoder_2"], unet_lora_adapter_metadata=metas["unet"],
        text_encoder_lora_adapter_metadata=metas["text_encoder"],
        text_encoder_2_lora_adapter_metadata=metas["text_encoder_2"], weight_name="peft.safetensors")
    src = Path(tmp) / "peft.safetensors"
    tensors, meta = load_file(src), file_metadata(src)
    assert "lora_adapter_metadata" in meta, meta.keys()
    path = OUT / "peft_diffusers.safetensors"
    write_safetensors(tensors, path, meta)
    return path, tensors, meta


def peft_modules(tensors):
    """graft layer -> (down, up) from a diffusers PEFT state dict."""
    out = {}
    for k, v in tensors.items():
        if k.endswith(".lora_A.weight"):
            module = k[: -len(".lora_A.weight")]
            comp, path = split_layer(module)
            out[layer_name(comp, path)] = (v, tensors[module + ".lora_B.weight"])
    return out


def module_alpha(layer):
    comp, path = split_layer(layer)
    if comp == "unet":
        if path in ALPHA_PATTERN:
            return float(ALPHA_PATTERN[path])
    return float(ALPHA)


def kohya_hashes(tensors, metadata):
    """sd-scripts library/train_util.py precalculate_safetensors_hashes: only the ss_* metadata,
    serialised by the safetensors library; model hash over the bytes after the header, legacy hash
    over 0x100000..0x110000 of the whole serialisation."""
    meta = {k: v for k, v in metadata.items() if k.startswith("ss_")}
    b = BytesIO(safetensors.torch.save(tensors, meta))
    n = int.from_bytes(b.read(8), "little")
    b.seek(8 + n)
    model_hash = hashlib.sha256(b.read()).hexdigest()
    b.seek(0x100000)
    legacy = hashlib.sha256(b.read(0x10000)).hexdigest()[0:8]
    return model_hash, legacy


def save_kohya(modules, path, dtype, sgm, te_alpha, output_name):
    tensors = {}
    for layer, (down, up) in sorted(modules.items()):
        name = kohya_name(layer, sgm=sgm)
        tensors[f"{name}.lora_down.weight"] = down.to(dtype)
        tensors[f"{name}.lora_up.weight"] = up.to(dtype)
        if te_alpha or layer.startswith("unet."):
            # kohya keeps alpha as a 0-d tensor and saves it in the save dtype like the rest.
            tensors[f"{name}.alpha"] = torch.tensor(module_alpha(layer)).to(dtype)
    meta = {
        "ss_network_dim": "Dynamic", "ss_network_alpha": "Dynamic", "ss_network_module": "networks.lora",
        "ss_network_args": "{}", "ss_base_model_version": "sdxl_base_v1-0", "ss_output_name": output_name,
        "ss_steps": "100", "ss_unet_lr": "0.0001", "ss_text_encoder_lr": "5e-05", "ss_v2": "False",
        "modelspec.sai_model_spec": "1.0.0", "modelspec.architecture": "stable-diffusion-xl-v1-base/lora",
        "modelspec.implementation": "https://github.com/Stability-AI/generative-models",
        "modelspec.title": output_name,
    }
    meta["sshs_model_hash"], meta["sshs_legacy_hash"] = kohya_hashes(tensors, meta)
    data = write_safetensors(tensors, path, meta)
    n = int.from_bytes(data[:8], "little")
    assert hashlib.sha256(data[8 + n:]).hexdigest() == meta["sshs_model_hash"], "data layout differs from safetensors'"
    return tensors, meta


@torch.no_grad()
def adapter_outputs(path):
    """UNet output (reference/unet.safetensors inputs, main case) and the text encoders' penultimate
    hidden states (reference/te.safetensors prompts) with the adapter at weights 1.0 and 0.5, unfused."""
    pipe = load_pipeline()
    pipe.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name="x")
    u, te = load_file(REF / "unet.safetensors"), load_file(REF / "te.safetensors")
    out = {}
    for w, tag in ((1.0, "w1"), (0.5, "w05")):
        pipe.set_adapters(["x"], adapter_weights=[w])
        out[f"unet_out.{tag}"] = pipe.unet(u["sample"], u["timesteps"], encoder_hidden_states=u["encoder_hidden_states"],
                                           added_cond_kwargs={"text_embeds": u["text_embeds"],
                                                              "time_ids": u["time_ids"]}).sample
        for i, te_name in ((1, "text_encoder"), (2, "text_encoder_2")):
            r = getattr(pipe, te_name)(te[f"te{i}.input_ids"], output_hidden_states=True)
            out[f"te{i}.hidden_states.2.{tag}"] = r.hidden_states[-2]
    return out


def make_fixtures():
    import tempfile

    setup_torch()
    OUT.mkdir(parents=True, exist_ok=True)
    pipe = load_pipeline()
    layers, metas = make_peft(pipe)
    with tempfile.TemporaryDirectory() as tmp:
        peft_path, peft_tensors, peft_meta = save_peft(layers, metas, tmp)
    modules = peft_modules(peft_tensors)

    kohya_path = OUT / "kohya_sgm.safetensors"
    save_kohya(modules, kohya_path, torch.float16, sgm=True, te_alpha=True, output_name="tiny_kohya_sgm")
    kd_path = OUT / "kohya_diffusers_bf16.safetensors"
    save_kohya(modules, kd_path, torch.bfloat16, sgm=False, te_alpha=False, output_name="tiny_kohya_diffusers")

    expected, summary = {}, {}
    for path in (peft_path, kohya_path, kd_path):
        deltas, loaded, changed = fused_deltas(path)
        assert loaded == sorted(modules), f"{path.name}: diffusers attached {len(loaded)} layers, file has {len(modules)}"
        assert changed == loaded, f"{path.name}: fused weights changed outside the adapted layers"
        half, _, _ = fused_deltas(path, SELECTED, scale=0.5)
        for layer in SELECTED:
            assert torch.allclose(half[layer], 0.5 * deltas[layer], atol=1e-6), (path.name, layer)
            expected[f"{path.stem}/{layer}"] = deltas[layer]
        summary[path.name] = len(loaded)
    # Same numbers under other names: diffusers must merge the kohya file exactly as the PEFT file
    # (so only the PEFT file's deltas are stored for both).
    for layer in SELECTED:
        d = (expected[f"peft_diffusers/{layer}"] - expected.pop(f"kohya_sgm/{layer}")).abs().max().item()
        assert d < 1e-6, (layer, d)
    outputs = adapter_outputs(peft_path)
    kohya_outputs = adapter_outputs(kohya_path)
    for k, v in outputs.items():
        assert (v - kohya_outputs[k]).abs().max().item() < 1e-5, k
        expected[f"peft_diffusers/{k}"] = v
    write_safetensors({k: v.contiguous() for k, v in expected.items()}, OUT / "expected.safetensors",
                      {"selected": json.dumps(SELECTED), "modules": json.dumps(summary, sort_keys=True)})
    write_readme(peft_meta, summary, modules)
    print("wrote", ", ".join(p.name for p in sorted(OUT.iterdir())))


def write_readme(peft_meta, summary, modules):
    files = "\n".join(f"| `{p.name}` | {p.stat().st_size:,} |" for p in sorted(OUT.glob("*.safetensors")))
    unet_n = sum(1 for m in modules if m.startswith("unet."))
    readme = OUT / "README.md"
    # The LyCORIS section belongs to make_lycoris_fixtures.py: keep it.
    lycoris = readme.read_text().partition("\n## LyCORIS")[1:] if readme.exists() else ("", "")
    readme.write_text(f"""# LoRA file fixtures

Written by `tools/reference/check_lora_files.py` (torch {torch.__version__}, diffusers {diffusers.__version__},
peft {peft.__version__}); do not edit by hand. Regenerate (deterministic) from the repository root:

```
/work/refvenv/bin/python tools/reference/check_lora_files.py
```

| file | bytes |
|---|---|
{files}

One adapter on the tiny model of `tests/fixtures/tiny-sdxl` ({len(modules)} layers: {unet_n} UNet linears
`{'`, `'.join(UNET_TARGETS)}` in every transformer; `{'`, `'.join(TE_TARGETS)}` in every layer of both text
encoders), PEFT `LoraConfig(r={RANK}, lora_alpha={ALPHA})`, UNet `rank_pattern={RANK_PATTERN}`,
`alpha_pattern={ALPHA_PATTERN}`. lora_A ~ N(0, 1/in), lora_B ~ 0.5 N(0, 1/r) (seed 40), rounded through
float16, so the three files below hold the same numbers (bf16 rounds them again).

- `peft_diffusers.safetensors`: `StableDiffusionXLPipeline.save_lora_weights(..., unet_lora_adapter_metadata=
  unet.peft_config["default"].to_dict(), ...)` (and the text encoders'), i.e. keys
  `unet.<module>.lora_A.weight` / `.lora_B.weight`, `text_encoder.` / `text_encoder_2.` prefixes, float16;
  header `format: pt` and `lora_adapter_metadata` (JSON, `indent=2, sort_keys=True`, keys prefixed by component:
  `unet.r`, `unet.lora_alpha`, `unet.rank_pattern`, `unet.alpha_pattern`, `unet.target_modules`, ... the whole
  PEFT config). The file is rewritten with the same tensors and header in sorted order (diffusers' writer orders
  them differently on each run); `target_modules` is sorted before saving for the same reason.
- `kohya_sgm.safetensors`: kohya's SDXL layout written by hand following sd-scripts: `lora_unet_<SGM module
  path with _>` (`input_blocks.(1+3i+j).1` = `down_blocks.i.attentions.j`, `middle_block.1`,
  `output_blocks.(3i+j).1` = `up_blocks.i.attentions.j`), `lora_te1_` / `lora_te2_` + the transformers module
  path with `_`; `.lora_down.weight`, `.lora_up.weight`, `.alpha` (0-d, float16 like the rest); metadata
  `ss_*` and `modelspec.*` as sd-scripts writes them, `sshs_model_hash` / `sshs_legacy_hash` computed exactly as
  sd-scripts' `precalculate_safetensors_hashes` does (checked: the model hash is the sha256 of this file's data
  after the header).
- `kohya_diffusers_bf16.safetensors`: kohya keys with the diffusers UNet module names
  (`lora_unet_down_blocks_1_attentions_0_...`), bfloat16, `.alpha` on the UNet modules only (the text encoder
  modules have none: scale 1).
- `expected.safetensors` (float32):
  - `<file stem>/<graft layer>` (stems `peft_diffusers` and `kohya_diffusers_bf16`): for the {len(SELECTED)}
    layers in metadata `selected`, diffusers' `pipe.load_lora_weights(file)` + `pipe.fuse_lora(lora_scale=1.0)`
    weight minus the base weight, [out, in]. `kohya_sgm` gives the `peft_diffusers` deltas (checked to 1e-6,
    not stored twice). The script also checks: diffusers attaches exactly the file's layers ({summary}), fusing changes
    no other linear weight, `lora_scale=0.5` gives half the delta, and the kohya and PEFT files give the same
    deltas (1e-6).
  - `peft_diffusers/unet_out.w1` / `.w05`: the UNet output for the inputs of `reference/unet.safetensors`
    (main case) with the PEFT file loaded, unfused, `pipe.set_adapters(["x"], adapter_weights=[w])`;
    `peft_diffusers/te1.hidden_states.2.w1` / `.w05`, `te2...`: the text encoders' penultimate hidden states
    for the three prompts of `reference/te.safetensors` likewise. The kohya file gives the same outputs (1e-5).

The module deltas follow `W' = W + w * alpha / r * lora_B @ lora_A`: alpha 8 / rank 4 = 2 in general; 3 / 4
for `down_blocks.1.attentions.1.proj_in`; 8 / 2 = 4 for
`mid_block.attentions.0.transformer_blocks.1.attn2.to_k` (rank 2); and 1 for the text encoders of
`kohya_diffusers_bf16.safetensors`.

Two facts of this reference stack the files respect:
- transformers 5's `CLIPTextModel` has no `text_model` module level, so diffusers + transformers 5 saves
  text encoder 1 PEFT keys as `text_encoder.encoder.layers.N...` (as in `peft_diffusers.safetensors`), while
  `CLIPTextModelWithProjection` keeps `text_encoder_2.text_model.encoder...`. diffusers strips a
  `text_model.` prefix when loading, so both spellings load; kohya keys always say `text_model`.
- diffusers 0.42 ignores a kohya per-module alpha that differs from the most common one when the module is
  an attention projection (`to_q`, ...: its converted alpha key keeps `.processor.to_q_lora.down.weight` and
  the PEFT `alpha_pattern` entry matches nothing; PEFT warns "alpha_pattern keys did not match"). kohya and
  A1111 apply it. The fixtures' non-default alpha is therefore on `proj_in`, which diffusers handles.
""" + "".join(lycoris))


# ---------------------------------------------------------------- checking graft's exports


def check_exports(folder):
    """Loads graft's kohya / PEFT exports with diffusers and compares the fused weights with graft's deltas."""
    setup_torch()
    folder = Path(folder)
    expected = load_file(folder / "expected.safetensors")
    failures = []
    files = sorted(p for p in folder.glob("*.safetensors") if p.name != "expected.safetensors")
    if not files:
        sys.exit(f"{folder}: no exported files: run `cargo test -p graft-formats --test export` first")
    for path in files:
        want = {k.split("/", 1)[1]: v for k, v in expected.items() if k.startswith(path.stem + "/")}
        if not want:
            failures.append(f"{path.name}: no expected deltas")
            continue
        if "diff" in path.stem:
            failures += check_diff_file(path, want)
            continue
        deltas, loaded, changed = fused_deltas(path)
        if loaded != sorted(want):
            failures.append(f"{path.name}: diffusers attached {len(loaded)} layers, graft wrote {len(want)}: "
                            f"{sorted(set(loaded) ^ set(want))[:5]}")
        if changed != loaded:
            failures.append(f"{path.name}: fusing changed other weights: {sorted(set(changed) ^ set(loaded))[:5]}")
        worst = 0.0
        for layer, d in want.items():
            if layer in deltas:
                err = (deltas[layer] - d).abs().max().item()
                worst = max(worst, err / max(1.0, d.abs().max().item()))
        if worst > 1e-5:
            failures.append(f"{path.name}: merged weights differ from graft's delta by up to {worst:.2e}")
        print(f"{path.name}: diffusers attached {len(loaded)} layers, max |merged - (W + graft delta)| {worst:.2e}"
              f" ({file_metadata(path).get('ss_output_name', 'peft')})")
    if failures:
        print("\n".join("FAIL " + f for f in failures))
        sys.exit(1)
    print(f"{len(files)} passed, 0 failed")


def check_diff_file(path, want):
    """A LyCORIS full-diff file: diffusers cannot load it, so check what can be checked with its code:
    each key names (through diffusers' kohya SGM -> diffusers conversion) a linear of the tiny model
    with the diff's shape, and the diff equals graft's delta."""
    from diffusers.loaders.lora_conversion_utils import _convert_unet_lora_key, _maybe_map_sgm_blocks_to_diffusers
    from diffusers.utils import convert_unet_state_dict_to_peft

    pipe = load_pipeline()
    tensors = load_file(path)
    fails = []
    # Rename `.diff` to a LoRA key so diffusers' own name conversion can be reused.
    as_lora = {k.replace(".diff", ".lora_down.weight"): v for k, v in tensors.items() if k.endswith(".diff")}
    extra = [k for k in tensors if not k.endswith((".diff", ".diff_b"))]
    if extra:
        fails.append(f"{path.name}: keys that are not diffs: {extra[:5]}")
    unet_keys = {k: v for k, v in as_lora.items() if k.startswith("lora_unet_")}
    mapped = _maybe_map_sgm_blocks_to_diffusers(dict(unet_keys), pipe.unet.config)
    for k, v in mapped.items():
        (name,) = convert_unet_state_dict_to_peft({_convert_unet_lora_key(k): v}).keys()
        layer = "unet." + name.replace(".lora_A.weight", "")
        try:
            w = module_of(pipe, layer).weight
        except AttributeError:
            fails.append(f"{path.name}: {k} -> {layer}: no such module")
            continue
        if tuple(w.shape) != tuple(v.shape):
            fails.append(f"{path.name}: {layer}: diff {tuple(v.shape)} vs weight {tuple(w.shape)}")
        elif layer not in want or (want[layer] - v.float()).abs().max().item() > 1e-6:
            fails.append(f"{path.name}: {layer}: diff differs from graft's delta")
    for k, v in as_lora.items():
        if k.startswith(("lora_te1_", "lora_te2_")):
            comp = "text_encoder" if k.startswith("lora_te1_") else "text_encoder_2"
            flat = k.split(".")[0].split("_", 2)[2]
            matches = [n for n, m in getattr(pipe, comp).named_modules()
                       if isinstance(m, torch.nn.Linear)
                       and split_layer(layer_name(comp, n))[1].replace(".", "_") == flat]
            layer = layer_name(comp, matches[0]) if len(matches) == 1 else None
            if layer is None or layer not in want:
                fails.append(f"{path.name}: {k}: names no single text-encoder linear")
            elif (want[layer] - v.float()).abs().max().item() > 1e-6:
                fails.append(f"{path.name}: {layer}: diff differs from graft's delta")
    n = len(as_lora)
    if n != len(want):
        fails.append(f"{path.name}: {n} diffs, graft expected {len(want)}")
    print(f"{path.name}: {n} diff tensors name linears of the model with matching shapes and values")
    return fails


# ---------------------------------------------------------------- checking graft's LoCon exports


def all_weights(pipe):
    """Every nn.Linear and nn.Conv2d weight of the three models, by graft name (base weights under PEFT)."""
    out = {}
    for comp in COMPONENTS:
        for name, m in getattr(pipe, comp).named_modules():
            if isinstance(m, BaseTunerLayer):
                continue
            if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)):
                name = name.replace(".base_layer", "")
                out[layer_name(comp, name)] = m.weight.detach().clone()
    return out


def check_locon(folder):
    """graft's LoCon / Tucker exports against the LyCORIS library and diffusers."""
    from lycoris.modules.locon import LoConModule

    setup_torch()
    folder = Path(folder)
    failures = []
    stems = sorted(p.name[: -len(".expected.safetensors")] for p in folder.glob("*.expected.safetensors"))
    if not stems:
        sys.exit(f"{folder}: nothing to check: run `cargo test -p graft-tests --test e2e plugin_lora::locon plugin_lora::tucker` first")
    for stem in stems:
        path = folder / f"{stem}.safetensors"
        want = load_file(folder / f"{stem}.expected.safetensors")
        names = json.loads((folder / f"{stem}.names.json").read_text())
        tensors = load_file(path)
        groups = {}
        for k, v in tensors.items():
            module, suffix = k.split(".", 1)
            groups.setdefault(module, {})[suffix] = v
        # The LyCORIS library: build each module from its tensors, every key used.
        pipe = load_pipeline()
        worst, convs, tucker = 0.0, 0, 0
        for module, t in sorted(groups.items()):
            layer = names.get(module)
            if layer is None:
                failures.append(f"{path.name}: {module} names no layer graft exported")
                continue
            left = set(t) - {"lora_up.weight", "lora_down.weight", "lora_mid.weight", "alpha"}
            if left:
                failures.append(f"{path.name}: {module}: keys LyCORIS does not use: {sorted(left)}")
            org = module_of(pipe, layer)
            m = LoConModule.make_module_from_state_dict(
                module, org, t["lora_up.weight"], t["lora_down.weight"], t.get("lora_mid.weight"), t["alpha"], None)
            d = m.get_diff_weight(multiplier=1.0)[0].float().reshape(org.weight.shape)
            err = (d - want[layer].reshape(d.shape)).abs().max().item() / max(1.0, d.abs().max().item())
            worst = max(worst, err)
            convs += isinstance(org, torch.nn.Conv2d)
            tucker += "lora_mid.weight" in t
        if worst > 1e-5:
            failures.append(f"{path.name}: LyCORIS' weight differences differ from graft's by up to {worst:.2e}")
        print(f"{path.name}: LyCORIS built {len(groups)} modules ({convs} conv, {tucker} Tucker) from every key; "
              f"max |LyCORIS dW - graft dW| {worst:.2e} (relative)")
        if tucker:
            print(f"{path.name}: has Tucker cores (lora_mid): diffusers does not load those; LyCORIS only")
            continue
        # diffusers: load, every module attached, fused weights = base + graft's delta.
        pipe = load_pipeline()
        before = all_weights(pipe)
        pipe.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name="x")
        loaded = adapted_layers(pipe)
        if loaded != sorted(want):
            failures.append(f"{path.name}: diffusers attached {len(loaded)} layers, graft wrote {len(want)}: "
                            f"{sorted(set(loaded) ^ set(want))[:5]}")
        pipe.fuse_lora(components=list(COMPONENTS), lora_scale=1.0, adapter_names=["x"])
        after = all_weights(pipe)
        changed = sorted(k for k in before if not torch.equal(before[k], after[k]))
        if changed != sorted(want):
            failures.append(f"{path.name}: fusing changed {len(changed)} weights, graft wrote {len(want)}")
        worst = 0.0
        for layer, d in want.items():
            got = after[layer] - before[layer]
            worst = max(worst, (got - d.reshape(got.shape)).abs().max().item() / max(1.0, d.abs().max().item()))
        if worst > 1e-5:
            failures.append(f"{path.name}: diffusers' fused weights differ from graft's deltas by up to {worst:.2e}")
        print(f"{path.name}: diffusers attached {len(loaded)} layers ({convs} conv); "
              f"max |fused - (W + graft dW)| {worst:.2e} (relative)")
    if failures:
        print("\n".join("FAIL " + f for f in failures))
        sys.exit(1)
    print(f"{len(stems)} LoCon exports passed, 0 failed")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check-exports", metavar="DIR", help="check graft's exported files in DIR instead")
    ap.add_argument("--check-locon", metavar="DIR", help="check graft's LoCon / Tucker exports in DIR instead")
    args = ap.parse_args()
    if args.check_locon:
        check_locon(args.check_locon)
    elif args.check_exports:
        check_exports(args.check_exports)
    else:
        make_fixtures()


if __name__ == "__main__":
    main()
