"""Reference values of the optimizers beyond AdamW, for the host's optimizer tests:
bitsandbytes AdamW8bit (its CPU backend), lion_pytorch.Lion, prodigyopt.Prodigy and
transformers.optimization.Adafactor (kohya's optimizer_type names AdamW8bit, Lion, Prodigy,
Adafactor). Versions are pinned in tools/reference/requirements.txt.

Run from the repository root with the reference environment:

    /work/refvenv/bin/python tools/reference/make_optim_kinds_fixtures.py

It writes tests/fixtures/reference/optim_kinds.safetensors (float32 on CPU, fixed seed). Three
parameters in two groups, 3 steps with given gradients, no clipping (the clipping shared by all
optimizers is checked by optim.safetensors): group "a" = p0 (8x6), p1 (10); group "b" = p2 (5x4,
all zeros at the start, as a LoRA "up" matrix). The learning rates of step k are the groups' base
rates times lr_factors[k]. Keys:
  init.<p>, grad.<k>.<p>, lr_factors                 shared by Lion, Prodigy and Adafactor
  <opt>.param.<k>.<p>                                the parameter after step k
  lion:        a: lr 1e-3, wd 0.1, betas (0.9, 0.99);  b: lr 5e-4, wd 0, betas (0.8, 0.95)
  prodigy:     lr 1.0 in both groups (prodigyopt needs equal rates), d_coef 2, use_bias_correction,
               a: wd 0.01, b: wd 0 (decoupled), default betas and eps; prodigy.d = d after each step;
               its own gradients prodigy.grad.<k>.<p> = grad.0.<p> + 0.1 * grad.<k>.<p> (a steady
               direction, so that d grows) and prodigy.init.<p> = init.<p>
  adafactor:   transformers' defaults (relative_step, scale_parameter, no beta1), a: wd 0, b: wd 0.01;
               the schedule's factors do not apply (relative step sizes)
  adafactor_lr: relative_step False, scale_parameter False, beta1 0.9, a: lr 1e-2 wd 0.01,
               b: lr 5e-3 wd 0
  q8.*:        AdamW8bit with its own parameters so that one has >= 4096 weights (8-bit state):
               q8.init.<p>, q8.grad.<k>.<p>, q8.param.<k>.<p> for p0 (64x65, 17 blocks of 256, the last
               partial), p1 (40) in group a (lr 1e-2, wd 1e-2) and p2 (6x5) in group b (lr 5e-3,
               wd 0.1, betas (0.8, 0.99), eps 1e-6); p1 and p2 stay 32-bit (< min_8bit_size 4096).
               q8.state1 / q8.state2 (uint8 codes), q8.absmax1 / q8.absmax2 of p0 after the last
               step, q8.qmap1 / q8.qmap2 (the dynamic maps as the CPU quantizer left them).
"""

from pathlib import Path

import bitsandbytes as bnb
import torch
from lion_pytorch import Lion
from prodigyopt import Prodigy
from safetensors.torch import save_file
from transformers.optimization import Adafactor

OUT = Path("tests/fixtures/reference/optim_kinds.safetensors")
LR_FACTORS = [0.5, 1.0, 0.75]
STEPS = 3


def make_data(out, prefix, shapes, zero, scales):
    g = torch.Generator().manual_seed(1)
    init = {}
    for name, shape in shapes.items():
        init[name] = torch.zeros(shape) if name == zero else torch.randn(shape, generator=g)
        out[f"{prefix}init.{name}"] = init[name].clone()
    grads = []
    for k in range(STEPS):
        gk = {name: torch.randn(shape, generator=g) * scales[k] for name, shape in shapes.items()}
        for name, t in gk.items():
            out[f"{prefix}grad.{k}.{name}"] = t.clone()
        grads.append(gk)
    return init, grads


def run(out, key, make_opt, init, grads, group_names, apply_factors=True, after_step=None):
    """Runs 3 steps; group_names lists the parameter names of each group."""
    vars_ = {n: torch.nn.Parameter(t.clone()) for n, t in init.items()}
    opt = make_opt([[vars_[n] for n in names] for names in group_names])
    base = [g["lr"] for g in opt.param_groups]
    for k in range(STEPS):
        for n, v in vars_.items():
            v.grad = grads[k][n].clone()
        if apply_factors:
            for g, b in zip(opt.param_groups, base):
                g["lr"] = b * LR_FACTORS[k]
        opt.step()
        for n, v in vars_.items():
            out[f"{key}.param.{k}.{n}"] = v.detach().clone()
        if after_step:
            after_step(opt, k)
    return opt, vars_


def main():
    torch.set_num_threads(1)
    out = {"lr_factors": torch.tensor(LR_FACTORS, dtype=torch.float64)}
    groups = [["p0", "p1"], ["p2"]]
    init, grads = make_data(out, "", {"p0": (8, 6), "p1": (10,), "p2": (5, 4)}, "p2", [1.0, 0.3, 2.0])

    run(out, "lion", lambda ps: Lion([
        {"params": ps[0], "lr": 1e-3, "weight_decay": 0.1, "betas": (0.9, 0.99)},
        {"params": ps[1], "lr": 5e-4, "weight_decay": 0.0, "betas": (0.8, 0.95)},
    ]), init, grads, groups)

    # Prodigy grows d only after progress along a steady direction: its gradients are the first
    # one plus a little of each step's.
    p_init = {n: t.clone() for n, t in init.items()}
    p_grads = [{n: grads[0][n] + 0.1 * grads[k][n] for n in init} for k in range(STEPS)]
    for n, t in p_init.items():
        out[f"prodigy.init.{n}"] = t.clone()
        for k in range(STEPS):
            out[f"prodigy.grad.{k}.{n}"] = p_grads[k][n].clone()
    ds = []
    run(out, "prodigy", lambda ps: Prodigy([
        {"params": ps[0], "weight_decay": 0.01},
        {"params": ps[1], "weight_decay": 0.0},
    ], lr=1.0, d_coef=2.0, use_bias_correction=True), p_init, p_grads, groups,
        after_step=lambda opt, k: ds.append(opt.param_groups[0]["d"]))
    out["prodigy.d"] = torch.tensor(ds, dtype=torch.float64)

    run(out, "adafactor", lambda ps: Adafactor([
        {"params": ps[0], "weight_decay": 0.0},
        {"params": ps[1], "weight_decay": 0.01},
    ], lr=None), init, grads, groups, apply_factors=False)

    run(out, "adafactor_lr", lambda ps: Adafactor([
        {"params": ps[0], "lr": 1e-2, "weight_decay": 0.01},
        {"params": ps[1], "lr": 5e-3, "weight_decay": 0.0},
    ], lr=1e-2, relative_step=False, scale_parameter=False, beta1=0.9), init, grads, groups)

    q_init, q_grads = make_data(out, "q8.", {"p0": (64, 65), "p1": (40,), "p2": (6, 5)}, None, [1.0, 0.3, 2.0])
    opt, vars_ = run(out, "q8", lambda ps: bnb.optim.AdamW8bit([
        {"params": ps[0], "lr": 1e-2, "weight_decay": 1e-2},
        {"params": ps[1], "lr": 5e-3, "weight_decay": 0.1, "betas": (0.8, 0.99), "eps": 1e-6},
    ]), q_init, q_grads, groups)
    st = opt.state[vars_["p0"]]
    assert st["state1"].dtype == torch.uint8, "p0 should have 8-bit state"
    assert opt.state[vars_["p1"]]["state1"].dtype == torch.float32, "p1 should have 32-bit state"
    for k in ["state1", "state2", "absmax1", "absmax2", "qmap1", "qmap2"]:
        out[f"q8.{k}"] = st[k].clone()

    OUT.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "generator": "tools/reference/make_optim_kinds_fixtures.py",
        "torch": torch.__version__,
        "bitsandbytes": bnb.__version__,
    }
    save_file({k: v.contiguous() for k, v in out.items()}, str(OUT), metadata=meta)
    print(f"wrote {OUT} ({len(out)} tensors, {OUT.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
