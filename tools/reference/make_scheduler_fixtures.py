"""Reference runs of diffusers' schedulers for the scheduler parity test.

For each case (a scheduler, a config, a step count) it records the timesteps, sigmas and
init_noise_sigma, and a full sampling loop on a fixed sample with fake model outputs
`model_output_i = 0.1 * scale_model_input(sample_i) + E_i` (E_i fixed): every scaled input, every
sample, and the final sample. Euler ancestral takes its noise from the fixture. Also alphas_cumprod,
add_noise, get_velocity and SNR of the training noise schedule (DDPMScheduler, as diffusers' and
kohya's training scripts use).

Writes tests/fixtures/reference/schedulers.safetensors; the metadata `cases` (JSON) lists each case's
graft scheduler name, diffusers config and step count.

Run from the repository root: /work/refvenv/bin/python tools/reference/make_scheduler_fixtures.py
"""

import json
from pathlib import Path

import diffusers
import numpy as np
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
)
from diffusers.schedulers import scheduling_euler_ancestral_discrete
from diffusers.training_utils import compute_snr
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "tests/fixtures/reference/schedulers.safetensors"

# SDXL base 1.0's scheduler_config.json (the values graft's SchedulerConfig::sdxl_base() has).
SDXL = {
    "_class_name": "EulerDiscreteScheduler",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "interpolation_type": "linear",
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "sample_max_value": 1.0,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "trained_betas": None,
    "use_karras_sigmas": False,
}

SHAPE = (2, 4, 3, 5)

# (case name, graft scheduler name, diffusers class, config overrides, extra from_config kwargs)
CASES = [
    ("euler", "euler", EulerDiscreteScheduler, {}, {}),
    ("euler_v_trailing", "euler", EulerDiscreteScheduler, {"prediction_type": "v_prediction", "timestep_spacing": "trailing"}, {}),
    ("euler_linspace", "EulerDiscreteScheduler", EulerDiscreteScheduler, {"timestep_spacing": "linspace"}, {}),
    ("euler_karras", "EulerDiscreteScheduler", EulerDiscreteScheduler, {"use_karras_sigmas": True}, {}),
    ("euler_zsnr", "euler", EulerDiscreteScheduler,
     {"prediction_type": "v_prediction", "timestep_spacing": "trailing", "rescale_betas_zero_snr": True}, {}),
    ("euler_linear_betas", "euler", EulerDiscreteScheduler, {"beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02}, {}),
    ("euler_a", "euler_a", EulerAncestralDiscreteScheduler, {}, {}),
    ("euler_a_v_trailing", "EulerAncestralDiscreteScheduler", EulerAncestralDiscreteScheduler,
     {"prediction_type": "v_prediction", "timestep_spacing": "trailing"}, {}),
    ("ddim", "ddim", DDIMScheduler, {}, {}),
    ("ddim_v_trailing", "DDIMScheduler", DDIMScheduler, {"prediction_type": "v_prediction", "timestep_spacing": "trailing"}, {}),
    ("ddim_linspace_alpha_one", "ddim", DDIMScheduler, {"timestep_spacing": "linspace", "set_alpha_to_one": True}, {}),
    ("ddim_clip", "ddim", DDIMScheduler, {"clip_sample": True, "clip_sample_range": 1.5}, {}),
    ("dpmpp_2m", "dpmpp_2m", DPMSolverMultistepScheduler, {}, {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    ("dpmpp_2m_karras", "dpmpp_2m_karras", DPMSolverMultistepScheduler, {"use_karras_sigmas": True},
     {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    ("dpmpp_2m_v_trailing", "dpmpp_2m", DPMSolverMultistepScheduler,
     {"prediction_type": "v_prediction", "timestep_spacing": "trailing"}, {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    ("dpmpp_2m_linspace", "DPMSolverMultistepScheduler", DPMSolverMultistepScheduler, {"timestep_spacing": "linspace"},
     {"algorithm_type": "dpmsolver++", "solver_order": 2}),
]
STEPS = [4, 7]
EXTRA_STEPS = {"dpmpp_2m_karras": [16], "euler": [30], "dpmpp_2m": [25]}


def as_f64(x):
    return torch.as_tensor(np.asarray(x, dtype=np.float64))


def run_case(name, cls, config, kwargs, steps, gen, out):
    sched = cls.from_config(config, **kwargs)
    sched.set_timesteps(steps)
    key = f"{name}.{steps}"
    out[f"{key}.timesteps"] = as_f64(sched.timesteps.numpy())
    if hasattr(sched, "sigmas") and cls is not DDIMScheduler:
        out[f"{key}.sigmas"] = as_f64(sched.sigmas.numpy())
    out[f"{key}.init_noise_sigma"] = as_f64([float(sched.init_noise_sigma)])

    sample = torch.randn(SHAPE, generator=gen, dtype=torch.float32) * float(sched.init_noise_sigma)
    out[f"{key}.start"] = sample.clone()
    e = torch.randn((steps,) + SHAPE, generator=gen, dtype=torch.float32)
    out[f"{key}.eps"] = e
    noise = torch.randn((steps,) + SHAPE, generator=gen, dtype=torch.float32)
    if cls is EulerAncestralDiscreteScheduler:
        out[f"{key}.noise"] = noise
        queue = list(noise)
        scheduling_euler_ancestral_discrete.randn_tensor = lambda *a, **k: queue.pop(0)
    scaled_all, samples = [], []
    for i, t in enumerate(sched.timesteps):
        scaled = sched.scale_model_input(sample, t)
        scaled_all.append(scaled)
        model_output = 0.1 * scaled + e[i]
        sample = sched.step(model_output, t, sample).prev_sample
        samples.append(sample)
    out[f"{key}.scaled"] = torch.stack(scaled_all)
    out[f"{key}.samples"] = torch.stack(samples)
    return sched


def public_config(config):
    """The config as diffusers writes scheduler_config.json (JSON text: it may hold -Infinity)."""
    return json.dumps({k: v for k, v in dict(config).items() if not k.startswith("_")}, sort_keys=True)


def main():
    gen = torch.Generator().manual_seed(20240611)
    out = {}
    meta_cases = []
    for name, graft_name, cls, overrides, kwargs in CASES:
        config = dict(SDXL, **overrides)
        for steps in STEPS + EXTRA_STEPS.get(name, []):
            sched = run_case(name, cls, config, kwargs, steps, gen, out)
        meta_cases.append({"name": name, "scheduler": graft_name, "class": cls.__name__, "steps": STEPS + EXTRA_STEPS.get(name, []),
                           "config": public_config(sched.config)})

    # Training noise schedules (DDPMScheduler, as training scripts use).
    training = []
    for name, overrides in (
        ("sdxl", {}),
        ("linear", {"beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02}),
        ("cosine", {"beta_schedule": "squaredcos_cap_v2"}),
        ("zsnr", {"rescale_betas_zero_snr": True}),
    ):
        config = dict(SDXL, **overrides)
        ddpm = DDPMScheduler.from_config(config)
        out[f"train.{name}.alphas_cumprod"] = ddpm.alphas_cumprod.clone()
        training.append({"name": name, "config": public_config(ddpm.config)})
    ddpm = DDPMScheduler.from_config(SDXL)
    x0 = torch.randn(4, 4, 3, 5, generator=gen)
    noise = torch.randn(4, 4, 3, 5, generator=gen)
    timesteps = torch.tensor([0, 1, 500, 999], dtype=torch.int64)
    out["train.x0"] = x0
    out["train.noise"] = noise
    out["train.timesteps"] = timesteps
    out["train.noisy"] = ddpm.add_noise(x0, noise, timesteps)
    out["train.velocity"] = ddpm.get_velocity(x0, noise, timesteps)
    out["train.snr"] = compute_snr(ddpm, timesteps).to(torch.float64)

    out = {k: v.contiguous() for k, v in out.items()}
    meta = {"diffusers": diffusers.__version__, "shape": json.dumps(SHAPE), "cases": json.dumps(meta_cases),
            "training": json.dumps(training)}
    OUT.parent.mkdir(parents=True, exist_ok=True)
    save_file(out, OUT, metadata=meta)
    print(f"wrote {OUT}: {len(meta_cases)} cases, {len(out)} tensors, {OUT.stat().st_size} bytes")


if __name__ == "__main__":
    main()
