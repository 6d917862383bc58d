"""Builds the tiny random SDXL model and the diffusers/transformers reference outputs of the parity tests.

Run from the repository root with the reference environment (tools/reference/setup.sh):

    /work/refvenv/bin/python tools/reference/make_fixtures.py

It (re)writes, deterministically (CPU, float32 math, fixed seeds, one thread):
    tests/fixtures/tiny-sdxl/                  diffusers folder, weights in float16
    tests/fixtures/tiny-sdxl-sgm.safetensors   the same weights in the original single-file layout
    tests/fixtures/reference/{te,unet,vae,pipeline}.safetensors
    tests/fixtures/README.md
All reference outputs are computed in float32 from the float16-rounded weights, i.e. from the
files as saved (the model is reloaded from tests/fixtures/tiny-sdxl before anything is computed).
"""

import json
import math
import shutil
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import diffusers  # noqa: E402
import transformers  # noqa: E402
from diffusers import (  # noqa: E402
    AutoencoderKL,
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from safetensors.torch import load_file  # noqa: E402
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer  # noqa: E402

import sgm_convert  # noqa: E402
import tiny_tokenizer  # noqa: E402

ROOT = HERE.parents[1]
FIXTURES = ROOT / "tests" / "fixtures"
MODEL = FIXTURES / "tiny-sdxl"
SGM_FILE = FIXTURES / "tiny-sdxl-sgm.safetensors"
REF = FIXTURES / "reference"
SDXL_SCHEDULER = Path("/work/shared/sdxl-base-1.0/scheduler/scheduler_config.json")

PROMPTS = ["a red fox, watercolor painting", "", "A PHOTO of a cat... café 🦊 (red)!!"]
PIPE_PROMPT = "a red fox, watercolor painting"
HEIGHT, WIDTH = 96, 128

UNET_CONFIG = dict(
    sample_size=16,
    in_channels=4,
    out_channels=4,
    block_out_channels=[32, 48, 56],
    norm_num_groups=8,
    layers_per_block=2,
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    mid_block_type="UNetMidBlock2DCrossAttn",
    transformer_layers_per_block=[1, 1, 2],
    attention_head_dim=[2, 3, 4],
    use_linear_projection=True,
    cross_attention_dim=80,
    addition_embed_type="text_time",
    addition_embed_type_num_heads=64,
    addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=6 * 8 + 40,
    flip_sin_to_cos=True,
    freq_shift=0,
)
VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    latent_channels=4,
    block_out_channels=[8, 16, 16, 16],
    down_block_types=["DownEncoderBlock2D"] * 4,
    up_block_types=["UpDecoderBlock2D"] * 4,
    layers_per_block=1,
    norm_num_groups=4,
    scaling_factor=0.13025,
    sample_size=64,
    force_upcast=False,
)
TE1_CONFIG = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=3, num_attention_heads=4,
                  hidden_act="quick_gelu", projection_dim=32)
TE2_CONFIG = dict(hidden_size=48, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                  hidden_act="gelu", projection_dim=40)


ST_DTYPES = {torch.float16: "F16", torch.float32: "F32", torch.int64: "I64", torch.int32: "I32"}


def write_safetensors(tensors, path, metadata):
    """Writes a .safetensors file byte-for-byte reproducibly.

    safetensors' own writer orders the metadata differently on every run; here the header lists
    the metadata and the tensors sorted (tensors by decreasing element size, then name, so every
    tensor stays aligned), and the header is space-padded to a multiple of 8 as the library does.
    """
    order = sorted(tensors, key=lambda k: (-tensors[k].element_size(), k))
    header = {"__metadata__": dict(sorted(metadata.items()))}
    blobs, offset = [], 0
    for k in order:
        t = tensors[k].detach().contiguous().cpu()
        data = t.view(torch.uint8).numpy().tobytes() if t.dim() else t.reshape(1).view(torch.uint8).numpy().tobytes()
        header[k] = {"dtype": ST_DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * (-len(text) % 8)
    # Write beside and rename: the input tensors may be memory-mapped from the file being replaced.
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(len(text).to_bytes(8, "little"))
        f.write(text)
        for b in blobs:
            f.write(b)
    tmp.chmod(0o644)
    tmp.replace(path)
    back = load_file(path)  # check the file with the reference reader
    assert set(back) == set(tensors) and all(torch.equal(back[k], tensors[k].cpu()) for k in tensors), path


def to_json(v):
    """Strict JSON (no NaN/Infinity, which Rust's serde_json rejects): non-finite floats become strings."""
    def clean(x):
        if isinstance(x, float) and not math.isfinite(x):
            return str(x)
        if isinstance(x, dict):
            return {k: clean(y) for k, y in x.items()}
        if isinstance(x, (list, tuple)):
            return [clean(y) for y in x]
        return x
    return json.dumps(clean(v), sort_keys=True, allow_nan=False, ensure_ascii=False)


def setup_torch():
    torch.set_num_threads(1)  # one thread: the same summation order on every run
    torch.use_deterministic_algorithms(True)
    torch.set_default_dtype(torch.float32)


# ---------------------------------------------------------------- model construction


def randomise(model, gen):
    """Replaces every parameter: O(1) activations, no default-looking norms or biases."""
    done = set()
    for _name, m in model.named_modules():
        w = getattr(m, "weight", None)
        b = getattr(m, "bias", None)
        if isinstance(m, (torch.nn.LayerNorm, torch.nn.GroupNorm)):
            if w is not None:
                w.data = 1.0 + 0.1 * torch.randn(w.shape, generator=gen)
        elif isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)):
            fan_in = w[0].numel()
            w.data = torch.randn(w.shape, generator=gen) / fan_in ** 0.5
        elif isinstance(m, torch.nn.Embedding):
            w.data = torch.randn(w.shape, generator=gen)
        else:
            continue
        done.add(id(w))
        if b is not None:
            b.data = 0.1 * torch.randn(b.shape, generator=gen)
            done.add(id(b))
    missed = [n for n, p in model.named_parameters() if id(p) not in done]
    assert not missed, f"parameters not randomised: {missed}"


def round_fp16(model):
    for p in model.parameters():
        p.data = p.data.half().float()


def clip_config(vocab_size, **kw):
    return CLIPTextConfig(vocab_size=vocab_size, max_position_embeddings=77, eos_token_id=2, bos_token_id=0,
                          pad_token_id=1, layer_norm_eps=1e-5, attention_dropout=0.0, dropout=0.0, **kw)


def build_and_save():
    """Builds the random model and saves the diffusers folder (float16); returns the rounded f32 state dicts."""
    vocab, merges = tiny_tokenizer.build_vocab()
    tmp_tok = FIXTURES / ".tok_tmp"
    tiny_tokenizer.write_tokenizer(tmp_tok / "tokenizer", vocab, merges, "<|endoftext|>")
    tiny_tokenizer.write_tokenizer(tmp_tok / "tokenizer_2", vocab, merges, "!")
    tok1 = CLIPTokenizer.from_pretrained(tmp_tok / "tokenizer")
    tok2 = CLIPTokenizer.from_pretrained(tmp_tok / "tokenizer_2")

    torch.manual_seed(0)
    te1 = CLIPTextModel(clip_config(len(vocab), **TE1_CONFIG)).eval()
    te2 = CLIPTextModelWithProjection(clip_config(len(vocab), **TE2_CONFIG)).eval()
    unet = UNet2DConditionModel(**UNET_CONFIG).eval()
    vae = AutoencoderKL(**VAE_CONFIG).eval()
    for seed, model in ((1, te1), (2, te2), (3, unet), (4, vae)):
        randomise(model, torch.Generator().manual_seed(seed))
        round_fp16(model)
    rounded = {k: {n: p.detach().clone() for n, p in m.state_dict().items()}
               for k, m in (("text_encoder", te1), ("text_encoder_2", te2), ("unet", unet), ("vae", vae))}

    scheduler = EulerDiscreteScheduler.from_config(json.loads(SDXL_SCHEDULER.read_text()))
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=te1, text_encoder_2=te2, tokenizer=tok1, tokenizer_2=tok2,
                                     unet=unet, scheduler=scheduler, add_watermarker=False)
    if MODEL.exists():
        shutil.rmtree(MODEL)
    pipe.to(torch.float16)
    pipe.save_pretrained(MODEL, safe_serialization=True)

    # Post-process to the layout of the real SDXL repository.
    shutil.copyfile(SDXL_SCHEDULER, MODEL / "scheduler" / "scheduler_config.json")
    for name, pad in (("tokenizer", "<|endoftext|>"), ("tokenizer_2", "!")):
        tiny_tokenizer.write_tokenizer(MODEL / name, vocab, merges, pad)
    shutil.rmtree(tmp_tok)
    for sub in ("text_encoder", "text_encoder_2"):
        f = MODEL / sub / "model.safetensors"
        sd = load_file(f)
        # transformers 5 saves CLIPTextModel without `text_model.`; the real SDXL files have it.
        sd = {(k if k.startswith("text_model.") or k.startswith("text_projection") else "text_model." + k): v
              for k, v in sd.items()}
        write_safetensors(sd, f, {"format": "pt"})
    for sub in ("unet", "vae"):
        f = MODEL / sub / "diffusion_pytorch_model.safetensors"
        write_safetensors(load_file(f), f, {"format": "pt"})
    for f in sorted(MODEL.rglob("*.safetensors")):
        for k, v in load_file(f).items():
            assert v.dtype == torch.float16, f"{f}:{k} is {v.dtype}"
    return rounded


def load_pipeline():
    pipe = StableDiffusionXLPipeline.from_pretrained(MODEL, torch_dtype=torch.float32, add_watermarker=False,
                                                     local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    for m in (pipe.unet, pipe.vae, pipe.text_encoder, pipe.text_encoder_2):
        m.eval()
    return pipe


def check_reload(pipe, rounded):
    for name, ref in rounded.items():
        sd = getattr(pipe, name).state_dict()
        assert set(sd) == set(ref), f"{name}: keys differ after reload: {set(sd) ^ set(ref)}"
        for k, v in ref.items():
            assert torch.equal(sd[k].float(), v.float()), f"{name}.{k} differs after reload"


# ---------------------------------------------------------------- reference outputs


def save_ref(name, tensors, meta):
    REF.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous() for k, v in tensors.items()}
    for k, v in tensors.items():
        assert torch.isfinite(v.float()).all(), f"{name}:{k} is not finite"
    meta = {k: (v if isinstance(v, str) else to_json(v)) for k, v in meta.items()}
    write_safetensors(tensors, REF / f"{name}.safetensors", dict(sorted(meta.items())))
    return tensors


@torch.no_grad()
def make_te(pipe):
    out = {}
    for tag, tok, te in (("te1", pipe.tokenizer, pipe.text_encoder), ("te2", pipe.tokenizer_2, pipe.text_encoder_2)):
        ids = tok(PROMPTS, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        out[f"{tag}.input_ids"] = ids.to(torch.int64)
        r = te(ids, output_hidden_states=True)
        for i, h in enumerate(r.hidden_states):
            out[f"{tag}.hidden_states.{i}"] = h
        out[f"{tag}.last_hidden_state"] = r.last_hidden_state
        # transformers 5: CLIPTextModel is the text transformer itself; the projection model wraps one.
        inner = te.text_model if isinstance(te, CLIPTextModelWithProjection) else te
        out[f"{tag}.pooled"] = inner(ids).pooler_output
        if tag == "te2":
            out["te2.text_embeds"] = r.text_embeds
    # What the SDXL pipeline feeds the UNet (no classifier-free guidance here).
    pe, _, pooled, _ = pipe.encode_prompt(PROMPTS, device="cpu", num_images_per_prompt=1,
                                          do_classifier_free_guidance=False)
    n1 = pipe.text_encoder.config.num_hidden_layers
    n2 = pipe.text_encoder_2.config.num_hidden_layers
    # hidden_states[-2]: the output of the penultimate layer, before the final LayerNorm.
    expect = torch.cat([out[f"te1.hidden_states.{n1 - 1}"], out[f"te2.hidden_states.{n2 - 1}"]], -1)
    assert torch.allclose(pe, expect, atol=1e-6)
    assert torch.allclose(pooled, out["te2.text_embeds"], atol=1e-6)
    out["prompt_embeds"] = pe
    out["pooled_prompt_embeds"] = pooled
    meta = {"prompts": PROMPTS, "input_ids_dtype": "int64"}
    return save_ref("te", out, meta), meta


@torch.no_grad()
def make_unet(pipe):
    unet = pipe.unet
    g = torch.Generator().manual_seed(10)
    x = {
        "sample": torch.randn(2, 4, 12, 16, generator=g),
        "timesteps": torch.tensor([999.0, 37.0]),
        "encoder_hidden_states": torch.randn(2, 77, 80, generator=g),
        "text_embeds": torch.randn(2, 40, generator=g),
        "time_ids": torch.tensor([[96.0, 128, 0, 0, 96, 128], [128.0, 96, 8, 4, 128, 96]]),
        "odd.sample": torch.randn(1, 4, 7, 9, generator=g),
        "odd.timesteps": torch.tensor([500.0]),
        "odd.encoder_hidden_states": torch.randn(1, 77, 80, generator=g),
        "odd.text_embeds": torch.randn(1, 40, generator=g),
        "odd.time_ids": torch.tensor([[56.0, 72, 0, 0, 56, 72]]),
    }
    inter = {}
    hooks = []

    def grab(name):
        def hook(_m, _i, o):
            inter[name] = (o[0] if isinstance(o, tuple) else o).detach().clone()
        return hook

    named = {"time_proj": unet.time_proj, "time_embedding": unet.time_embedding, "add_time_proj": unet.add_time_proj,
             "add_embedding": unet.add_embedding, "conv_in": unet.conv_in, "mid_block": unet.mid_block,
             "conv_norm_out": unet.conv_norm_out}
    for i, b in enumerate(unet.down_blocks):
        named[f"down_blocks.{i}"] = b
    for i, b in enumerate(unet.up_blocks):
        named[f"up_blocks.{i}"] = b
    for name, m in named.items():
        hooks.append(m.register_forward_hook(grab(name)))
    out = unet(x["sample"], x["timesteps"], encoder_hidden_states=x["encoder_hidden_states"],
               added_cond_kwargs={"text_embeds": x["text_embeds"], "time_ids": x["time_ids"]}).sample
    for h in hooks:
        h.remove()
    out_odd = unet(x["odd.sample"], x["odd.timesteps"], encoder_hidden_states=x["odd.encoder_hidden_states"],
                   added_cond_kwargs={"text_embeds": x["odd.text_embeds"], "time_ids": x["odd.time_ids"]}).sample
    t = dict(x)
    t["out"] = out
    t["odd.out"] = out_odd
    for k, v in inter.items():
        t[f"inter.{k}"] = v
    print(f"unet out std {out.std():.3f} max {out.abs().max():.3f}; odd std {out_odd.std():.3f}")
    return save_ref("unet", t, {}), {}


@torch.no_grad()
def make_vae(pipe):
    vae = pipe.vae
    g = torch.Generator().manual_seed(20)
    image = torch.rand(1, 3, HEIGHT, WIDTH, generator=g) * 2 - 1
    latents = torch.randn(1, 4, HEIGHT // 8, WIDTH // 8, generator=g)
    dist = vae.encode(image).latent_dist
    dec = vae.decode(latents).sample
    print(f"vae mean std {dist.mean.std():.3f} logvar mean {dist.logvar.mean():.3f} decoded std {dec.std():.3f}")
    t = {"image": image, "posterior.mean": dist.mean, "posterior.logvar": dist.logvar, "latents": latents,
         "decoded": dec}
    return save_ref("vae", t, {}), {}


def scheduler_cases(base_config):
    base = dict(base_config)
    return [
        ("euler", EulerDiscreteScheduler.from_config(base), None),
        ("euler_neg", EulerDiscreteScheduler.from_config(base), "blurry"),
        ("euler_v", EulerDiscreteScheduler.from_config(base, prediction_type="v_prediction"), None),
        ("ddim", DDIMScheduler.from_config(base), None),
        ("dpmpp_2m_karras", DPMSolverMultistepScheduler.from_config(
            base, algorithm_type="dpmsolver++", solver_order=2, use_karras_sigmas=True), None),
    ]


def public_config(s):
    return {"_class_name": type(s).__name__, **{k: v for k, v in dict(s.config).items() if not k.startswith("_")}}


@torch.no_grad()
def make_pipeline(pipe):
    g = torch.Generator().manual_seed(30)
    init = torch.randn(1, 4, HEIGHT // 8, WIDTH // 8, generator=g)
    base_config = dict(pipe.scheduler.config)
    t = {"init_latents": init}
    meta = {"prompt": PIPE_PROMPT, "height": HEIGHT, "width": WIDTH, "num_inference_steps": 4,
            "guidance_scale": 5.0, "cases": {}}
    sf = pipe.vae.config.scaling_factor
    for name, sched, neg in scheduler_cases(base_config):
        pipe.scheduler = sched
        kw = dict(prompt=PIPE_PROMPT, negative_prompt=neg, height=HEIGHT, width=WIDTH, num_inference_steps=4,
                  guidance_scale=5.0)
        lat = pipe(**kw, latents=init.clone(), output_type="latent").images
        timesteps = pipe.scheduler.timesteps.clone().float()
        decoded = pipe.vae.decode(lat / sf).sample
        img_np = pipe(**kw, latents=init.clone(), output_type="np").images
        img = torch.from_numpy(img_np)
        assert torch.allclose(img, (decoded / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1), atol=1e-6)
        t[f"{name}.latents"] = lat
        t[f"{name}.decoded"] = decoded
        t[f"{name}.timesteps"] = timesteps
        meta["cases"][name] = {"negative_prompt": neg, "scheduler": public_config(sched)}
        print(f"pipeline {name}: timesteps {timesteps.tolist()} latents std {lat.std():.3f}")
    t["add_time_ids"] = torch.tensor([[float(HEIGHT), WIDTH, 0, 0, HEIGHT, WIDTH]])
    pipe.scheduler = EulerDiscreteScheduler.from_config(base_config)
    return save_ref("pipeline", t, meta), meta


# ---------------------------------------------------------------- single file (SGM)


def make_sgm(pipe):
    def sd_of(sub):
        name = "diffusion_pytorch_model.safetensors" if sub in ("unet", "vae") else "model.safetensors"
        return load_file(MODEL / sub / name)

    unet_cfg, vae_cfg = dict(pipe.unet.config), dict(pipe.vae.config)
    te2_layers = pipe.text_encoder_2.config.num_hidden_layers
    parts = [sgm_convert.unet_to_sgm(sd_of("unet"), unet_cfg), sgm_convert.vae_to_sgm(sd_of("vae"), vae_cfg),
             sgm_convert.te1_to_sgm(sd_of("text_encoder")), sgm_convert.te2_to_sgm(sd_of("text_encoder_2"), te2_layers)]
    sgm = {}
    for p in parts:
        assert not set(p) & set(sgm)
        sgm.update(p)
    # Present in real SDXL single files and unused by the model: loaders must skip them.
    sgm["conditioner.embedders.1.model.logit_scale"] = torch.tensor(4.6052, dtype=torch.float16)
    sgm["conditioner.embedders.0.transformer.text_model.embeddings.position_ids"] = torch.arange(77)[None]
    write_safetensors(sgm, SGM_FILE, {"format": "pt"})

    # Check 1: the inverse mapping gives back every diffusers tensor exactly.
    sgm = load_file(SGM_FILE)
    extra = ("conditioner.embedders.1.model.logit_scale",
             "conditioner.embedders.0.transformer.text_model.embeddings.position_ids")
    back = sgm_convert.sgm_to_diffusers({k: v for k, v in sgm.items() if k not in extra}, unet_cfg, vae_cfg,
                                        te2_layers)
    for sub, sd in zip(("unet", "vae", "text_encoder", "text_encoder_2"), back):
        ref = sd_of(sub)
        assert set(sd) == set(ref), f"{sub}: {set(sd) ^ set(ref)}"
        for k in ref:
            assert torch.equal(sd[k], ref[k]), f"{sub}.{k}"

    # Check 2: diffusers' own single-file loader reads it into the same model.
    single = StableDiffusionXLPipeline.from_single_file(str(SGM_FILE), config=str(MODEL), torch_dtype=torch.float32,
                                                        local_files_only=True, add_watermarker=False)
    for sub in ("unet", "vae", "text_encoder", "text_encoder_2"):
        a, b = getattr(single, sub).state_dict(), getattr(pipe, sub).state_dict()
        assert set(a) == set(b), f"from_single_file {sub}: {set(a) ^ set(b)}"
        for k in b:
            assert torch.equal(a[k], b[k]), f"from_single_file {sub}.{k} differs"
    print(f"sgm: {len(sgm)} tensors, round trip and from_single_file match exactly")
    return sgm


# ---------------------------------------------------------------- README


def shape_table(tensors):
    rows = ["| key | shape | dtype |", "|---|---|---|"]
    for k in sorted(tensors):
        v = tensors[k]
        rows.append(f"| `{k}` | {list(v.shape)} | {str(v.dtype).replace('torch.', '')} |")
    return "\n".join(rows)


def my_files():
    """The files this script writes (other fixtures in tests/fixtures come from other scripts)."""
    files = sorted(f for f in MODEL.rglob("*") if f.is_file()) + [SGM_FILE]
    files += [REF / f"{n}.safetensors" for n in ("te", "unet", "vae", "pipeline")]
    return [(str(f.relative_to(FIXTURES)), f.stat().st_size) for f in files]


def write_readme(pipe, refs, pipe_meta, sgm):
    import readme_text

    def count(m):
        return sum(p.numel() for p in m.parameters())

    params = dict(unet_params=count(pipe.unet), vae_params=count(pipe.vae), te1_params=count(pipe.text_encoder),
                  te2_params=count(pipe.text_encoder_2))
    files = my_files()
    files.append(("total", sum(s for _, s in files)))
    text = readme_text.render(refs=refs, shape_table=shape_table, pipe_meta=dict(pipe_meta, te_prompts=PROMPTS),
                              sgm=sgm, params=params, files=files,
                              versions=f"torch {torch.__version__}, diffusers {diffusers.__version__}, "
                                       f"transformers {transformers.__version__}")
    # Sections other scripts appended (e.g. make_train_fixtures.py) are kept.
    readme = FIXTURES / "README.md"
    if readme.exists():
        old = readme.read_text()
        marker = "\n## `reference/train_step.safetensors`"
        if marker in old:
            text = text.rstrip("\n") + "\n" + old[old.index(marker):]
    readme.write_text(text)


def main():
    setup_torch()
    FIXTURES.mkdir(parents=True, exist_ok=True)
    rounded = build_and_save()
    pipe = load_pipeline()
    check_reload(pipe, rounded)
    refs = {}
    refs["te"], _ = make_te(pipe)
    refs["unet"], _ = make_unet(pipe)
    refs["vae"], _ = make_vae(pipe)
    refs["pipeline"], pipe_meta = make_pipeline(pipe)
    sgm = make_sgm(pipe)
    write_readme(pipe, refs, pipe_meta, sgm)
    total = sum(s for _, s in my_files())
    print(f"done: {total / 1e6:.2f} MB in {len(my_files())} files")


if __name__ == "__main__":
    main()
