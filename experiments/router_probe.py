"""Offline probes of router trainability on SmolLM2 (CPU is enough), the evidence behind docs/decisions.md
"Router input standardisation and head bias".

  python -m experiments.router_probe cache --split train --count 128 --out /tmp/keys_train.pt
  python -m experiments.router_probe cache --split eval --count 48 --out /tmp/keys_eval.pt
  python -m experiments.router_probe separability --train /tmp/keys_train.pt
  python -m experiments.router_probe simulate --train /tmp/keys_train.pt --eval /tmp/keys_eval.pt \
      --runs paper:5e-4 layer:5e-4 head:5e-4 head+bias:5e-4
  python -m experiments.router_probe grad-scale --count 16
  python -m experiments.router_probe grad-scale --count 96 --save /tmp/lm_grads.pt    # ~1-2 min per sample on CPU
  python -m experiments.router_probe simulate --train /tmp/lm_grads.pt --eval /tmp/keys_eval.pt --t-sen 0.4

cache:        boundary-pooled pre-RoPE keys [L, Hkv, D] of training prompts (one prefill each).
separability: held-out accuracy of a logistic probe (sensitive vs robust task) per (layer, KV head).
simulate:     regulariser-only router training on cached keys (the method's STE, lambda ascent, schedules; no LM
              loss), then the deterministic MSR per task category on the eval keys. Input variants: paper (raw),
              layer (standardised per layer over heads), head (per KV head, what RouterSet uses), +bias (per-head
              logit bias).
              With --train from `grad-scale --save`, the LM loss joins as the linear term sum(dLM/dz . z) per sample
              (first order around the fresh routers' routing; --lm-scale 0 turns it off).
grad-scale:   per-sample gradients of the answer LM loss and of the regulariser w.r.t. the straight-through z;
              --save also stores each sample's pooled keys and dLM/dz for `simulate`.
"""
from __future__ import annotations

import argparse
import os

import torch

from elastic_cuda.ops import boundary_pool
from elastic_cuda.training.data import TASK_CATEGORY, TASKS, DataConfig, TaskDataset
from elastic_cuda.training.losses import sample_regulariser, task_weights
from elastic_cuda.training.schedule import lr_factor, tau_at


def _robust(tasks: torch.Tensor) -> torch.Tensor:
    return torch.tensor([TASK_CATEGORY[TASKS[int(t)]] == "robust" for t in tasks])


def cache(args):
    from elastic_cuda.training.models import load_model_and_tokenizer

    model, tok = load_model_and_tokenizer("smollm2", torch.device("cpu"), torch.float32, 0)
    cfg = model.config
    L, H, D = cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.hidden_size // cfg.num_attention_heads
    caught = [None] * L
    for i, layer in enumerate(model.model.layers):
        layer.self_attn.k_proj.register_forward_hook(lambda m, a, out, i=i: caught.__setitem__(i, out.detach()))
    ds = TaskDataset(tok, split=args.split, seed=0,
                     config=DataConfig(lengths=tuple(args.lengths), local_window=512, sink=64))
    feats, tasks = [], []
    from tqdm.auto import tqdm

    for idx in tqdm(range(args.count), desc=f"cache {args.split}"):
        s = ds[idx]
        with torch.no_grad():
            model.model(input_ids=torch.tensor([s.prompt_ids]))
        feats.append(torch.stack([boundary_pool(c.view(1, c.shape[1], H, D), n_first=100, n_last=100)[0]
                                  for c in caught]))
        tasks.append(TASKS.index(s.task))
    torch.save({"feats": torch.stack(feats), "tasks": torch.tensor(tasks)}, args.out)
    print(f"saved {args.count} x {tuple(feats[0].shape)} to {args.out}")


def separability(args):
    data = torch.load(args.train)
    X, y = data["feats"], _robust(data["tasks"]).float()
    N, L, H, D = X.shape
    n_fit = N * 3 // 4
    spread = [(X[:, l].std(0).mean() / X[:, l].abs().mean()).item() for l in range(L)]
    print(f"between-prompt spread / magnitude of pooled keys: {min(spread):.3f} - {max(spread):.3f}")
    for l in range(0, L, max(1, L // 6)):
        accs = []
        for h in range(H):
            x = X[:, l, h]
            x = (x - x[:n_fit].mean(0)) / (x[:n_fit].std(0) + 1e-6)
            w, b = torch.zeros(D, requires_grad=True), torch.zeros(1, requires_grad=True)
            opt = torch.optim.LBFGS([w, b], max_iter=200)

            def closure():
                opt.zero_grad()
                loss = torch.nn.functional.binary_cross_entropy_with_logits(x[:n_fit] @ w + b, y[:n_fit])
                loss = loss + 1e-2 * w.pow(2).sum()
                loss.backward()
                return loss

            opt.step(closure)
            accs.append((((x[n_fit:] @ w + b) > 0).float() == y[n_fit:]).float().mean().item())
        print(f"layer {l:2d}: held-out accuracy per KV head " + " ".join(f"{a:.2f}" for a in accs))


def _mlp_params(L, D, gen):
    # the AttentionRouter layers (task D->4D->D, router D->4D->D->2) stacked over layers, N(0, 0.02), zero bias
    dims = [(D, 4 * D), (4 * D, D), (D, 4 * D), (4 * D, D), (D, 2)]
    ps = []
    for i, o in dims:
        ps += [(torch.randn(L, i, o, generator=gen) * 0.02).requires_grad_(), torch.zeros(L, o, requires_grad=True)]
    return ps


def _logits(ps, x, head_bias):  # x [B, L, H, D] -> [B, L, H, 2]
    h = x.permute(1, 0, 2, 3)
    for k in range(5):
        h = torch.einsum("lbhi,lio->lbho", h, ps[2 * k]) + ps[2 * k + 1][:, None, None]
        if k in (0, 2, 3):  # SiLU after task[0], router[0], router[2]
            h = torch.nn.functional.silu(h)
    h = h.permute(1, 0, 2, 3)
    return h + head_bias if head_bias is not None else h


def simulate_one(X, T, Xe, Te, variant, lr, steps, batch, t_sen, lambda_lr, seed, G=None):
    """G (optional, [N, L, H]): each training sample's dLM/dz, making the LM loss a linear term G . z."""
    N, L, H, D = X.shape
    if variant.startswith("layer"):
        mean, std = X.mean(dim=(0, 2))[:, None], X.std(dim=(0, 2))[:, None]
    elif variant.startswith("head"):
        mean, std = X.mean(0), X.std(0)
    else:
        mean, std = torch.zeros(L, H, D), torch.ones(L, H, D)
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    ps = _mlp_params(L, D, gen)
    bias = torch.zeros(L, H, 2, requires_grad=True) if variant.endswith("+bias") else None
    lam = torch.nn.Parameter(torch.rand(2, len(TASKS), generator=gen) * 0.5)
    opt = torch.optim.AdamW([{"params": ps + ([bias] if bias is not None else []), "lr": lr, "weight_decay": 0.1,
                              "betas": (0.9, 0.95)},
                             {"params": [lam], "lr": lambda_lr, "weight_decay": 0.1, "betas": (0.9, 0.95),
                              "maximize": True}])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, steps))
    order = torch.randperm(N, generator=gen)
    for step in range(steps):
        idx = order[torch.arange(step * batch, (step + 1) * batch) % N]
        logits = _logits(ps, (X[idx] - mean) / (std + 1e-4), bias)
        u = torch.rand(logits.shape, generator=gen)
        probs = torch.softmax((logits - torch.log(-torch.log(u + 1e-8) + 1e-8)) / tau_at(step, steps), -1)
        hard = torch.nn.functional.one_hot(probs.argmax(-1), 2).float()
        z = (hard + probs - probs.detach())[..., 1]
        msr = 1 - z.mean((1, 2))
        t = T[idx]
        target = torch.where(_robust(t), 1.0, t_sen)
        reg = (torch.tensor(task_weights(t.tolist())) * sample_regulariser(msr, target, lam[0, t], lam[1, t])).sum()
        if G is not None:
            reg = reg + (G[idx] * z).sum() / batch
        opt.zero_grad()
        reg.backward()
        torch.nn.utils.clip_grad_norm_(ps + [lam] + ([bias] if bias is not None else []), 5.0)
        opt.step()
        sched.step()
    with torch.no_grad():
        lg = _logits(ps, (Xe - mean) / (std + 1e-4), bias)
        msr = 1 - (lg[..., 1] > lg[..., 0]).float().mean((1, 2))
        rob = _robust(Te)
    return msr[~rob].mean().item(), msr[rob].mean().item()


def simulate(args):
    tr, ev = torch.load(args.train), torch.load(args.eval or args.train)
    G = tr["g_lm"] * args.lm_scale if "g_lm" in tr and args.lm_scale else None
    for spec in args.runs:
        variant, lr = spec.split(":")
        sen, rob = simulate_one(tr["feats"], tr["tasks"], ev["feats"], ev["tasks"], variant, float(lr), args.steps,
                                args.batch, args.t_sen, args.lambda_lr, args.seed, G)
        print(f"{variant:10s} lr {lr:7s} {args.steps} steps x {args.batch} t_sen {args.t_sen} lambda lr "
              f"{args.lambda_lr:g} lm x{args.lm_scale if G is not None else 0:g}: eval MSR sensitive {sen:.3f} "
              f"robust {rob:.3f} gap {rob - sen:+.3f}", flush=True)


def grad_scale(args):
    from elastic_cuda.training.losses import logits_needed, masked_lm_loss, msr_from_z
    from elastic_cuda.training.trainer import RouterTrainer, TrainConfig, prompt_then_answer_logits

    cfg = TrainConfig(out=args.workdir, lengths=tuple(args.lengths), device="cpu", dtype="float32", num_workers=0,
                      progress=False, calibration_samples=16, save_every=0)
    trainer = RouterTrainer(cfg)
    mcfg = trainer.model.config
    L, H = mcfg.num_hidden_layers, mcfg.num_key_value_heads
    D = mcfg.hidden_size // mcfg.num_attention_heads
    caught = [None] * L
    for li, layer in enumerate(trainer.model.model.layers):
        # keep the first call of each sample (the prompt prefill), not the answer continuation
        layer.self_attn.k_proj.register_forward_hook(
            lambda m, a, out, li=li: caught.__setitem__(li, out.detach()) if caught[li] is None else None)
    by_cat = {"sensitive": [], "robust": []}
    saved = {"feats": [], "tasks": [], "g_lm": []}
    for i in range(args.count):
        s = trainer.dataset[i]
        caught[:] = [None] * L
        ids, mask = torch.tensor(s.input_ids), torch.tensor(s.loss_mask)
        with trainer.state.training_mix(tau=1.0, full_branch=cfg.full_branch):
            lm = masked_lm_loss(prompt_then_answer_logits(trainer.model, ids, s.prompt_len, logits_needed(mask)), ids,
                                mask)
        zs = trainer.state.z_per_layer
        msr = msr_from_z(trainer.state.last_z)[0]
        ti = TASKS.index(s.task)
        target = 1.0 if TASK_CATEGORY[s.task] == "robust" else cfg.t_sen
        reg = sample_regulariser(msr, target, trainer.lambdas[0, ti].detach(), trainer.lambdas[1, ti].detach())
        g_lm = torch.stack(torch.autograd.grad(lm, zs, retain_graph=True), 1)[0]
        g_reg = torch.stack(torch.autograd.grad(reg, zs), 1)[0]
        by_cat[TASK_CATEGORY[s.task]].append(g_lm)
        if args.save:  # the prompt's pooled keys (first k_proj call = the prompt prefill) and dLM/dz [L, H]
            saved["feats"].append(torch.stack([boundary_pool(c.reshape(1, -1, H, D), n_first=100,
                                                             n_last=100)[0] for c in caught]))
            saved["tasks"].append(ti)
            saved["g_lm"].append(g_lm.detach().reshape(L, H).float())
        print(f"{s.task:20s} {len(ids):5d} tokens: |dLM/dz| mean {g_lm.abs().mean():.2e} max {g_lm.abs().max():.2e}, "
              f"mean dLM/dz {g_lm.mean():+.2e}; |dReg/dz| {g_reg.abs().mean():.2e}", flush=True)
    for cat, gs in by_cat.items():
        if gs:
            g = torch.stack(gs)
            print(f"{cat}: mean dLM/dz {g.mean():+.2e}; per-head |mean| / std over samples "
                  f"{(g.mean(0).abs() / (g.std(0) + 1e-12)).mean():.2f}")
    if args.save:
        torch.save({k: torch.stack(v) if k != "tasks" else torch.tensor(v) for k, v in saved.items()}, args.save)
        print(f"saved {len(saved['tasks'])} samples to {args.save}")
    trainer.close()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("cache")
    c.add_argument("--split", default="train", choices=("train", "eval"))
    c.add_argument("--count", type=int, default=128)
    c.add_argument("--lengths", type=int, nargs="+", default=[1024])
    c.add_argument("--out", required=True)
    s = sub.add_parser("separability")
    s.add_argument("--train", required=True)
    m = sub.add_parser("simulate")
    m.add_argument("--train", required=True)
    m.add_argument("--eval", default=None)
    m.add_argument("--runs", nargs="+", default=["paper:5e-4", "layer:5e-4", "head:5e-4", "head+bias:5e-4"])
    m.add_argument("--steps", type=int, default=300)
    m.add_argument("--batch", type=int, default=16)
    m.add_argument("--t-sen", type=float, default=0.7)
    m.add_argument("--lambda-lr", type=float, default=1e-3)
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--lm-scale", type=float, default=1.0,
                   help="weight of the linearised LM term when --train holds g_lm (grad-scale --save); 0: off")
    g = sub.add_parser("grad-scale")
    g.add_argument("--count", type=int, default=16)
    g.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048])
    g.add_argument("--workdir", default="/tmp/router_probe_grad")
    g.add_argument("--save", default=None, help="save pooled keys, tasks and dLM/dz per sample (simulate --lm-grads)")
    args = p.parse_args()
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    {"cache": cache, "separability": separability, "simulate": simulate, "grad-scale": grad_scale}[args.cmd](args)


if __name__ == "__main__":
    main()
