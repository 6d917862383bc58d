"""Reference for the training-step parity test (tests/e2e/train_parity.rs): diffusers + PEFT LoRA on the
tiny UNet, v-prediction loss, torch AdamW over the LoRA parameters only.

Run from the repository root with the reference environment (tools/reference/setup.sh):

    /work/refvenv/bin/python tools/reference/make_train_fixtures.py

It (re)writes tests/fixtures/reference/train_step.safetensors deterministically (CPU, float32, one
thread, fixed seeds). What it does is what diffusers' train_text_to_image_lora_sdxl.py does for
one batch, with fixed inputs instead of a data loader:

- the UNet of tests/fixtures/tiny-sdxl in float32, frozen (`requires_grad_(False)`), then
  `unet.add_adapter(LoraConfig(r=4, lora_alpha=8, target_modules=[to_q, to_k, to_v, to_out.0]))`;
- every lora_A and lora_B replaced by seeded random values (B non-zero, so the adapters change
  the output and every gradient is informative);
- `DDPMScheduler.from_config(<fixture scheduler config>)`: noisy = add_noise(latents, noise, t),
  target = get_velocity(latents, noise, t), t an int64 tensor;
- pred = unet(noisy, t, prompt_embeds, added_cond_kwargs={text_embeds, time_ids});
  loss = F.mse_loss(pred.float(), target.float(), reduction="mean");
- torch.optim.AdamW(lora params, lr 1e-3, betas (0.9, 0.999), eps 1e-8, weight_decay 1e-2),
  3 steps on the same inputs (loss, backward, step, zero_grad), no gradient clipping.

The keys are documented in tests/fixtures/README.md (section `reference/train_step.safetensors`).
"""

import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from diffusers import DDPMScheduler, UNet2DConditionModel  # noqa: E402
from peft import LoraConfig  # noqa: E402

from make_fixtures import setup_torch, write_safetensors  # noqa: E402

ROOT = HERE.parents[1]
MODEL = ROOT / "tests" / "fixtures" / "tiny-sdxl"
OUT = ROOT / "tests" / "fixtures" / "reference" / "train_step.safetensors"

RANK, ALPHA = 4, 8
TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
LR, BETAS, EPS, WEIGHT_DECAY = 1e-3, (0.9, 0.999), 1e-8, 1e-2
STEPS = 3
TIMESTEPS = [999, 250]
# Original size, crop top-left, target size (kohya / diffusers order), one row per sample.
TIME_IDS = [[96, 128, 0, 0, 96, 128], [128, 96, 8, 4, 128, 96]]
B_STD = 0.2  # lora_B ~ N(0, B_STD^2): the adapters move the loss by a few percent
INPUT_SEED, LORA_SEED = 40, 41


def lora_params(unet):
    """The LoRA parameters by their PEFT state-dict name, sorted."""
    return dict(sorted((n, p) for n, p in unet.named_parameters() if ".lora_" in n))


def compute_loss(unet, scheduler, inp):
    t = inp["timesteps"]
    noisy = scheduler.add_noise(inp["latents"], inp["noise"], t)
    target = scheduler.get_velocity(inp["latents"], inp["noise"], t)
    pred = unet(noisy, t, inp["prompt_embeds"],
                added_cond_kwargs={"text_embeds": inp["text_embeds"], "time_ids": inp["time_ids"]},
                return_dict=False)[0]
    return F.mse_loss(pred.float(), target.float(), reduction="mean"), noisy, target


def main():
    setup_torch()
    unet = UNet2DConditionModel.from_pretrained(MODEL, subfolder="unet", torch_dtype=torch.float32,
                                                local_files_only=True)
    unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=RANK, lora_alpha=ALPHA, init_lora_weights="gaussian", target_modules=TARGETS))
    unet.train()  # as the training script; the tiny UNet has no dropout, so train and eval agree
    params = lora_params(unet)
    trainable = sorted(n for n, p in unet.named_parameters() if p.requires_grad)
    assert trainable == list(params), "only the LoRA parameters may be trainable"
    # 17 transformer blocks x 2 attentions x 4 projections x (A, B).
    assert len(params) == 17 * 2 * 4 * 2, len(params)

    gen = torch.Generator().manual_seed(LORA_SEED)
    for name, p in params.items():
        if ".lora_A." in name:
            p.data = torch.randn(p.shape, generator=gen) / p.shape[1] ** 0.5
        else:
            p.data = B_STD * torch.randn(p.shape, generator=gen)
    init = {n: p.detach().clone() for n, p in params.items()}

    scheduler_config = json.loads((MODEL / "scheduler" / "scheduler_config.json").read_text())
    scheduler = DDPMScheduler.from_config(scheduler_config)

    gen = torch.Generator().manual_seed(INPUT_SEED)
    inp = {
        "latents": torch.randn(2, 4, 12, 16, generator=gen),
        "noise": torch.randn(2, 4, 12, 16, generator=gen),
        "prompt_embeds": torch.randn(2, 77, 80, generator=gen),
        "text_embeds": torch.randn(2, 40, generator=gen),
        "time_ids": torch.tensor(TIME_IDS, dtype=torch.float32),
        "timesteps": torch.tensor(TIMESTEPS, dtype=torch.int64),
    }

    # The loss without the adapters (B = 0), to show that the adapters matter.
    with torch.no_grad():
        saved = {n: p.data.clone() for n, p in params.items() if ".lora_B." in n}
        for n in saved:
            params[n].data.zero_()
        loss_base = compute_loss(unet, scheduler, inp)[0]
        for n, v in saved.items():
            params[n].data = v

    opt = torch.optim.AdamW(list(params.values()), lr=LR, betas=BETAS, eps=EPS, weight_decay=WEIGHT_DECAY,
                            foreach=False)
    losses, grads = [], {}
    for step in range(STEPS):
        opt.zero_grad(set_to_none=True)
        loss, noisy, target = compute_loss(unet, scheduler, inp)
        loss.backward()
        losses.append(loss.item())
        if step == 0:
            grads = {n: p.grad.detach().clone() for n, p in params.items()}
            first = dict(noisy=noisy.detach(), target=target.detach(), loss=loss.detach())
        opt.step()
    with torch.no_grad():
        loss_final = compute_loss(unet, scheduler, inp)[0]

    out = dict(inp)
    out["noisy"] = first["noisy"]
    out["target"] = first["target"]
    out["loss"] = first["loss"].reshape(())
    out["loss_base"] = loss_base.detach().reshape(())
    out["losses"] = torch.tensor(losses, dtype=torch.float32)
    out["loss_final"] = loss_final.detach().reshape(())
    for n in params:
        out[f"init.{n}"] = init[n]
        out[f"grad.{n}"] = grads[n]
        out[f"final.{n}"] = params[n].detach().clone()
    for k, v in out.items():
        assert torch.isfinite(v.float()).all(), k
    for n in params:
        assert grads[n].abs().max() > 0, f"zero gradient for {n}"

    meta = {
        "generator": "tools/reference/make_train_fixtures.py",
        "lora": json.dumps({"r": RANK, "lora_alpha": ALPHA, "target_modules": TARGETS, "scale": ALPHA / RANK}),
        "adamw": json.dumps({"lr": LR, "betas": list(BETAS), "eps": EPS, "weight_decay": WEIGHT_DECAY,
                             "steps": STEPS}),
        "scheduler": "DDPMScheduler.from_config(tests/fixtures/tiny-sdxl/scheduler/scheduler_config.json)",
        "loss": 'F.mse_loss(pred.float(), target.float(), reduction="mean"), v-prediction target',
    }
    write_safetensors(out, OUT, meta)
    print(f"{len(params)} LoRA tensors; loss without adapters {loss_base.item():.6f}, with {losses[0]:.6f}; "
          f"losses {losses}, after {STEPS} steps {loss_final.item():.6f}; "
          f"max |grad| {max(g.abs().max().item() for g in grads.values()):.3e}, "
          f"min max|grad| {min(g.abs().max().item() for g in grads.values()):.3e}; {OUT.stat().st_size:,} bytes")


if __name__ == "__main__":
    main()
