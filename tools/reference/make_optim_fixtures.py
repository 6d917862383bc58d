"""Reference values of torch.optim.AdamW (with per-parameter and global gradient clipping) and of the
diffusers learning-rate schedules, for the host's optimizer and schedule tests.

Run from the repository root with the reference environment:

    /work/refvenv/bin/python tools/reference/make_optim_fixtures.py

It writes tests/fixtures/reference/optim.safetensors (float32 math on CPU, fixed seed):
  - AdamW: 3 parameters in 2 groups, 3 steps with given gradients. Group "a" (p0, p1): lr 1e-2,
    weight decay 1e-2, betas (0.9, 0.999), eps 1e-8, each parameter's gradient clipped to norm 0.5.
    Group "b" (p2): lr 5e-3, weight decay 0.1, betas (0.8, 0.99), eps 1e-6, no per-parameter clip.
    Then all gradients together clipped to norm 1.0 (torch.nn.utils.clip_grad_norm_). The learning
    rates of step k are the base rates times lr_factors[k].
    Keys: init.<p>, grad.<k>.<p>, param.<k>.<p> (after step k), exp_avg.<p>, exp_avg_sq.<p> (after
    the last step), lr_factors.
  - Schedules: sched.<name> = the factor after 0..19 scheduler steps, from diffusers.optimization.
    get_scheduler with 3 warmup steps and 15 training steps (cosine_with_restarts: num_cycles 2).
"""

from pathlib import Path

import torch
from diffusers.optimization import get_scheduler
from safetensors.torch import save_file

OUT = Path("tests/fixtures/reference/optim.safetensors")


def adamw_fixture(out):
    torch.manual_seed(0)
    params = {
        "p0": torch.randn(2, 3),
        "p1": torch.randn(4),
        "p2": torch.randn(3, 2),
    }
    for name, p in params.items():
        out[f"init.{name}"] = p.clone()
    vars_ = {name: torch.nn.Parameter(p.clone()) for name, p in params.items()}
    groups = [
        {"params": [vars_["p0"], vars_["p1"]], "lr": 1e-2, "weight_decay": 1e-2, "betas": (0.9, 0.999), "eps": 1e-8},
        {"params": [vars_["p2"]], "lr": 5e-3, "weight_decay": 0.1, "betas": (0.8, 0.99), "eps": 1e-6},
    ]
    base_lrs = [g["lr"] for g in groups]
    opt = torch.optim.AdamW(groups, foreach=False)
    lr_factors = [0.5, 1.0, 0.75]
    out["lr_factors"] = torch.tensor(lr_factors, dtype=torch.float64)
    # Gradient scales chosen so that both clips act on some steps and not on others.
    scales = [2.0, 0.05, 0.6]
    for k in range(3):
        for name, v in vars_.items():
            g = torch.randn_like(v) * scales[k]
            out[f"grad.{k}.{name}"] = g.clone()
            v.grad = g
        for name in ("p0", "p1"):
            torch.nn.utils.clip_grad_norm_([vars_[name]], 0.5, foreach=False)
        torch.nn.utils.clip_grad_norm_(list(vars_.values()), 1.0, foreach=False)
        for g, base in zip(opt.param_groups, base_lrs):
            g["lr"] = base * lr_factors[k]
        opt.step()
        for name, v in vars_.items():
            out[f"param.{k}.{name}"] = v.detach().clone()
    for name, v in vars_.items():
        st = opt.state[v]
        out[f"exp_avg.{name}"] = st["exp_avg"].clone()
        out[f"exp_avg_sq.{name}"] = st["exp_avg_sq"].clone()


def schedule_fixture(out):
    for name in ["constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts"]:
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        kwargs = {"num_cycles": 2} if name == "cosine_with_restarts" else {}
        sched = get_scheduler(name, opt, num_warmup_steps=3, num_training_steps=15, **kwargs)
        factors = []
        for _ in range(20):
            factors.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
        out[f"sched.{name}"] = torch.tensor(factors, dtype=torch.float64)


def main():
    torch.set_num_threads(1)
    out = {}
    adamw_fixture(out)
    schedule_fixture(out)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in out.items()}, str(OUT), metadata={"generator": "tools/reference/make_optim_fixtures.py"})
    print(f"wrote {OUT} ({len(out)} tensors)")


if __name__ == "__main__":
    main()
