"""Router training (method-digest section 5): frozen backbone, trainable routers and per-task Lagrange multipliers.

Every layer runs both full and sparse attention and mixes them per KV head with the router's hard
straight-through z (``ElasticState.training_mix``). Loss = LM cross-entropy + the per-task regulariser of
``losses.py``; routers descend (AdamW (0.9, 0.95), lr 5e-4, wd 0.1), lambdas ascend (AdamW maximize=True,
lr 1e-3, wd 0.1, init U[0, 0.5)); 20% linear warmup then cosine to ~0 for both groups; grad-norm clip 5.0 over
all trainable parameters; Gumbel temperature from ``schedule.tau_at``.

Routing sees the prompt only: each sample runs as a prefill of its prompt (routers decide there) and then its
answer as a cached continuation that reuses the decision (``prompt_then_answer_logits``), exactly as at inference.

Batching: one optimizer step = ``batch_size`` samples (global, over all ranks); a rank runs its samples
``micro_batch`` at a time (default 1: B = 1, no padding; more: prompts left-padded and answers right-padded with
positions counted over real tokens, so each sample's logits and routing are its own - the routers pool only its
valid keys - and lengths 1K-8K mix freely); gradients accumulate. The LM loss is the mean over samples of each
sample's mean token CE (short and long samples weigh the same); the regulariser is the per-task mean then the mean
over tasks of the global batch, realised as fixed per-sample weights (``losses.task_weights``), so the summed
gradient is exact.

Distributed (torchrun): RANK / WORLD_SIZE / LOCAL_RANK from the environment, NCCL on CUDA (gloo when ranks share
GPUs), gloo on CPU. Rank r
takes samples r, r + W, ... of each global batch; router and lambda gradients are all-reduced (sum) before
clipping, so every rank applies the same update to bit-identical parameters (initialised from one seed and
broadcast from rank 0). Gumbel noise is seeded per rank.

Checkpoints (``<out>/checkpoints/step_XXXXXX/``): state.json + state.safetensors (routers, lambdas, optimizer,
scheduler, step, config) and rng_rank<r>.json + .safetensors (Python and torch RNG of each rank); no pickle, so a
checkpoint cannot run code (``checkpoint.py``); ``--resume auto`` picks the latest. Data are a
pure function of the sample index, so a resumed run reproduces the uninterrupted one exactly.
Outputs: train_log.jsonl (one line per step), training_curves.png, data_manifest.json, train_config.json,
routers/ (RouterSet.save, plus training_lambdas.json: the final lambdas, which ``init_routers`` continues from).
"""
from __future__ import annotations

import json
import math
import os
import random
import time
from dataclasses import asdict, dataclass, field

import torch

from ..attention import FULL_BRANCHES
from ..attention.sparse_config import DEFAULT as SPARSE_DEFAULT
from ..attention.sparse_config import SparseConfig
from .checkpoint import load_state, save_state, state_exists
from .data import TASK_CATEGORY, TASKS, DataConfig, TaskDataset
from .distributed import DistEnv, resolve_device_dtype
from .losses import logits_needed, masked_lm_loss, msr_from_z, sample_regulariser, task_weights
from .models import load_model_and_tokenizer
from .schedule import lr_factor, tau_at


@dataclass
class TrainConfig:
    out: str = "runs/router"
    model: str = "smollm2"
    steps: int = 120
    batch_size: int = 16
    lengths: tuple[int, ...] = (1024, 2048, 4096, 8192)
    tasks: tuple[str, ...] = TASKS
    t_sen: float = 0.7
    # what sparse heads run (attention/sparse_config.py; `sparse` below gathers them)
    sink: int = SPARSE_DEFAULT.sink
    window: int = SPARSE_DEFAULT.window
    sparse_mode: str = SPARSE_DEFAULT.sparse_mode
    block_size: int = SPARSE_DEFAULT.block_size
    xattn_stride: int = SPARSE_DEFAULT.xattn_stride
    xattn_threshold: float = SPARSE_DEFAULT.xattn_threshold
    loss_on: str = "answer"
    device: str = "auto"
    dtype: str = "auto"
    seed: int = 0
    standardize_input: bool = True  # router input standardisation (router.py); False: the paper's router
    head_bias: bool = True          # learned per-KV-head logit offset (router.py)
    calibration_samples: int = 64   # train-split prompts measured for the input standardisation
    router_lr: float = 5e-4
    router_weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    lambda_lr: float = 1e-3
    lambda_weight_decay: float = 0.1
    lambda_init_max: float = 0.5
    warmup_ratio: float = 0.2
    min_lr_ratio: float = 1e-7
    grad_clip: float = 5.0
    tau_max: float = 1.5
    tau_min: float = 1.0
    tau_decay_ratio: float = 0.6
    tau_schedule: str = "code"
    save_every: int = 50
    num_workers: int = 2           # data-building worker processes per rank (0: build in the main process)
    micro_batch: int = 1           # samples per forward on a rank (padded; fewer launches per sample)
    full_branch: str = "auto"      # how the training mix runs: auto | op | sdpa | train_mix (attention.train_mix_attention)
    resume: str | None = None
    init_routers: str | None = None  # RouterSet dir to fine-tune from (weights + input standardisation)
    fresh_lambdas: bool = False    # with init_routers: start the lambdas fresh even if the dir saved its final ones
    stop_after: int | None = None  # stop (with a checkpoint) after this many steps in total: tests, time slices
    progress: bool = True
    extra: dict = field(default_factory=dict)

    def validate(self):
        if self.steps <= 0 or self.batch_size <= 0:
            raise ValueError(f"steps and batch_size must be > 0, got {self.steps}, {self.batch_size}")
        if self.micro_batch <= 0:
            raise ValueError(f"micro_batch must be > 0, got {self.micro_batch}")
        if self.full_branch not in FULL_BRANCHES:
            raise ValueError(f"full_branch must be one of {FULL_BRANCHES}, got {self.full_branch!r}")
        if self.standardize_input and self.calibration_samples < 2:
            raise ValueError(f"calibration_samples must be >= 2 with standardize_input, got {self.calibration_samples}")
        if not 0.0 <= self.t_sen <= 1.0:
            raise ValueError(f"t_sen must be in [0, 1], got {self.t_sen}")
        _ = self.sparse  # ValueError naming a bad sparse setting

    @property
    def sparse(self) -> SparseConfig:
        return SparseConfig.from_dict(asdict(self), where="TrainConfig: ")


def _check_prompt_keep(T: int, prompt_len: int, keep: int):
    if not 0 < prompt_len < T or not 0 < keep <= T:
        raise ValueError(f"need 0 < prompt_len < len(ids) and 0 < keep <= len(ids), got prompt_len={prompt_len}, "
                         f"keep={keep}, len={T}")


def prompt_then_answer_logits(model, ids: torch.Tensor, prompt_len: int, keep: int) -> torch.Tensor:
    """Logits [keep, V] for the last `keep` positions of ids [T], computed as inference sees the sequence:
    a prefill of the prompt (where the routers decide, pooling the prompt's keys only, answer excluded) and then
    the answer tokens as a continuation over the KV cache, which reuses the prefill routing (and, in training,
    its straight-through z). One forward over prompt + answer would let the routers pool the answer's keys."""
    T = ids.shape[0]
    _check_prompt_keep(T, prompt_len, keep)
    answer_len = T - prompt_len
    keep_prompt = max(1, keep - answer_len)  # the last prompt position always predicts the first answer token
    out = model(input_ids=ids[None, :prompt_len], use_cache=True, logits_to_keep=keep_prompt)
    cont = model(input_ids=ids[None, prompt_len:], past_key_values=out.past_key_values, use_cache=True)
    logits = torch.cat([out.logits[0], cont.logits[0]], dim=0)
    return logits[-keep:] if keep < logits.shape[0] else logits


def prompt_then_answer_logits_batch(model, seqs: list, prompt_lens: list, keeps: list) -> list:
    """prompt_then_answer_logits for several sequences in one prefill + one continuation: prompts left-padded
    (2D mask, positions counted over real tokens, so every sample sees exactly its own unpadded computation and
    the routers pool only its own keys), answers right-padded (a pad after the last answer token is seen by no
    real position: causal). seqs: int64 [T_b] on one device. Returns the per-sample logits [keep_b, V]."""
    B = len(seqs)
    if not B == len(prompt_lens) == len(keeps):
        raise ValueError(f"seqs, prompt_lens and keeps must have one entry per sample, got {B}, {len(prompt_lens)}, "
                         f"{len(keeps)}")
    lens = [int(x.shape[0]) for x in seqs]
    for T, P, K in zip(lens, prompt_lens, keeps):
        _check_prompt_keep(T, P, K)
    if B == 1:
        return [prompt_then_answer_logits(model, seqs[0], prompt_lens[0], keeps[0])]
    dev = seqs[0].device
    P_max = max(prompt_lens)
    answers = [T - P for T, P in zip(lens, prompt_lens)]
    A_max = max(answers)
    ids_p = torch.zeros(B, P_max, dtype=torch.long, device=dev)
    mask_p = torch.zeros(B, P_max, dtype=torch.long, device=dev)
    ids_a = torch.zeros(B, A_max, dtype=torch.long, device=dev)
    for b, (x, P, A) in enumerate(zip(seqs, prompt_lens, answers)):
        ids_p[b, P_max - P:] = x[:P]
        mask_p[b, P_max - P:] = 1
        ids_a[b, :A] = x[P:]
    pos_p = (mask_p.cumsum(1) - 1).clamp_min(0)
    pos_a = torch.tensor(prompt_lens, device=dev)[:, None] + torch.arange(A_max, device=dev)[None]
    keep_prompt = max(max(1, K - A) for K, A in zip(keeps, answers))
    out = model(input_ids=ids_p, attention_mask=mask_p, position_ids=pos_p, use_cache=True,
                logits_to_keep=keep_prompt)
    mask_all = torch.cat([mask_p, torch.ones(B, A_max, dtype=torch.long, device=dev)], dim=1)
    cont = model(input_ids=ids_a, attention_mask=mask_all, position_ids=pos_a,
                 past_key_values=out.past_key_values, use_cache=True)
    result = []
    for b, (K, A) in enumerate(zip(keeps, answers)):
        logits = torch.cat([out.logits[b], cont.logits[b, :A]], dim=0)
        result.append(logits[-K:])
    return result


def _first(batch):
    return batch


class _RankIndices(torch.utils.data.Sampler):
    """Dataset indices this rank builds, in training order, from optimizer step `start` to `end`."""

    def __init__(self, start: int, end: int, batch_size: int, rank: int, world: int):
        self.start, self.end, self.batch_size, self.rank, self.world = start, end, batch_size, rank, world

    def __iter__(self):
        for step in range(self.start, self.end):
            for j in range(self.rank, self.batch_size, self.world):
                yield step * self.batch_size + j

    def __len__(self):
        return (self.end - self.start) * len(range(self.rank, self.batch_size, self.world))


def _checkpoint_dirs(out: str) -> list[str]:
    root = os.path.join(out, "checkpoints")
    if not os.path.isdir(root):
        return []
    return sorted(os.path.join(root, d) for d in os.listdir(root)
                  if d.startswith("step_") and state_exists(os.path.join(root, d, "state")))


LAMBDAS_FILE = "training_lambdas.json"  # beside the saved routers: the run's final lambdas, to continue it


def _save_lambdas(directory: str, lambdas: torch.Tensor, step: int, t_sen: float):
    lam = lambdas.detach().cpu()
    with open(os.path.join(directory, LAMBDAS_FILE), "w") as f:
        json.dump({"step": step, "t_sen": t_sen, "tasks": list(TASKS),
                   "lambda1": {t: float(lam[0, i]) for i, t in enumerate(TASKS)},
                   "lambda2": {t: float(lam[1, i]) for i, t in enumerate(TASKS)}}, f, indent=1)


def _load_lambdas(directory: str) -> torch.Tensor | None:
    """[2, len(TASKS)] lambdas saved by the run that trained the routers in `directory` (None if it saved none).

    Fine-tuning with fresh lambdas restarts the Lagrangian near 0, and the LM term then pulls the routers off the
    sparsity targets the first run reached (robust MSR 0.79 -> 0.71 in 150 steps, docs/decisions.md)."""
    path = os.path.join(directory, LAMBDAS_FILE)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        saved = json.load(f)
    missing = [t for t in TASKS if t not in saved.get("lambda1", {}) or t not in saved.get("lambda2", {})]
    if missing:
        raise ValueError(f"init_routers: {path} has no lambdas for tasks {missing}; use fresh_lambdas")
    return torch.tensor([[float(saved[k][t]) for t in TASKS] for k in ("lambda1", "lambda2")])


def _load_init_routers(config: TrainConfig, model):
    """The RouterSet to fine-tune from; its routing settings must be the ones this run trains with."""
    from ..router import RouterSet

    routers = RouterSet.load(config.init_routers, model=model)
    rc = routers.config
    keys = ("sink", "window", "sparse_mode", "standardize_input", "head_bias")
    if config.sparse_mode == "block":  # (a STREAM run does not use the BLOCK settings)
        keys += ("block_size", "xattn_stride", "xattn_threshold")
    bad = [f"{k}: routers {rc.get(k)!r} vs run {getattr(config, k)!r}" for k in keys if rc.get(k) != getattr(config, k)]
    if bad:
        raise ValueError(f"init_routers: {config.init_routers} was trained with other settings ({'; '.join(bad)}); "
                         "train with the same sink / window / sparse mode / router architecture")
    return routers


class RouterTrainer:
    """Builds everything from a TrainConfig; `run()` trains and returns the final step's log record."""

    def __init__(self, config: TrainConfig, model=None, tokenizer=None):
        from ..integrations.transformers import enable
        from ..router import RouterSet

        config.validate()
        self.cfg = config
        probe_device, _ = resolve_device_dtype(config.device, config.dtype)
        self.env = DistEnv(probe_device.type)
        self.device, self.dtype = resolve_device_dtype(config.device, config.dtype, self.env.local_rank)
        random.seed(config.seed)
        torch.manual_seed(config.seed)
        if model is None:
            model, tokenizer = load_model_and_tokenizer(config.model, self.device, self.dtype, config.seed)
        self.model, self.tokenizer = model.to(self.device).eval(), tokenizer
        self.model.requires_grad_(False)
        torch.manual_seed(config.seed)  # identical router init on every rank (and broadcast below, to be sure)
        if config.init_routers:
            self.routers = _load_init_routers(config, self.model).to(self.device, torch.float32)
        else:
            self.routers = RouterSet.for_model(self.model, **config.sparse.to_dict(),
                                               standardize_input=config.standardize_input,
                                               head_bias=config.head_bias).to(self.device, torch.float32)
        # the routers carry the run's sparse settings (init_routers: checked equal above)
        self.state = enable(self.model, self.routers, policy="router")  # train_step enters its training mix
        self.routers.train()  # Gumbel sampling; the backbone stays in eval mode (no dropout)
        gen = torch.Generator().manual_seed(config.seed + 12345)
        n_tasks = len(TASKS)
        self.lambdas = torch.nn.Parameter(
            (torch.rand(2, n_tasks, generator=gen) * config.lambda_init_max).to(self.device))  # rows: lambda1, lambda2
        saved = _load_lambdas(config.init_routers) if config.init_routers and not config.fresh_lambdas else None
        if saved is not None:
            with torch.no_grad():
                self.lambdas.copy_(saved)
        self.router_params = [p for p in self.routers.parameters()]
        for p in self.router_params:
            p.requires_grad_(True)
            self.env.broadcast_(p.data)
        self.env.broadcast_(self.lambdas.data)
        self.optimizer = torch.optim.AdamW([
            {"params": self.router_params, "lr": config.router_lr, "weight_decay": config.router_weight_decay,
             "betas": config.betas, "maximize": False, "name": "routers"},
            {"params": [self.lambdas], "lr": config.lambda_lr, "weight_decay": config.lambda_weight_decay,
             "betas": config.betas, "maximize": True, "name": "lambdas"},
        ])
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(s, config.steps, config.warmup_ratio, config.min_lr_ratio))
        data_cfg = DataConfig(lengths=tuple(config.lengths), tasks=tuple(config.tasks), loss_on=config.loss_on,
                              local_window=config.window, sink=config.sink)
        self.dataset = TaskDataset(self.tokenizer, split="train", seed=config.seed, config=data_cfg)
        self.step = 0
        self._seed_rank_rng()
        if config.resume:
            self.load_checkpoint(config.resume)
        if config.standardize_input and self.step == 0 and not config.init_routers:
            self.calibrate_router_inputs()  # (init_routers brings its own: the weights were trained on it)

    # ------------------------------------------------------------------ router input standardisation
    def calibrate_router_inputs(self):
        """Measure the routers' input mean/std on `calibration_samples` train-split prompts (their own seed, so
        the training samples are untouched), sharded over ranks and all-reduced: every rank ends identical."""
        cfg, env = self.cfg, self.env
        data_cfg = self.dataset.config
        calib = TaskDataset(self.tokenizer, split="train", seed=cfg.seed + 7, config=data_cfg)
        self.routers.eval()
        self.routers.start_input_calibration()
        with torch.no_grad():
            for i in range(env.rank, cfg.calibration_samples, env.world):
                ids = torch.tensor([calib[i].prompt_ids], dtype=torch.long, device=self.device)
                with self._autocast():
                    self.model(input_ids=ids, use_cache=False, logits_to_keep=1)
        sums = env.all_reduce_(self.routers.calibration_sums())
        n = self.routers.finish_input_calibration(sums)
        for buf in self.routers.buffers():
            env.broadcast_(buf.data)
        self.routers.train()
        if env.main:
            print(f"[train-router] router input standardisation measured on {n} prompts")

    # ------------------------------------------------------------------ RNG and checkpoints
    def _seed_rank_rng(self):
        seed = self.cfg.seed * 1000 + 7919 * (self.env.rank + 1)
        random.seed(seed)
        torch.manual_seed(seed)  # also seeds every CUDA device

    def _rng_state(self) -> dict:
        state = {"python": random.getstate(), "torch": torch.get_rng_state()}
        if self.device.type == "cuda":
            state["cuda"] = torch.cuda.get_rng_state(self.device)
        return state

    def _set_rng_state(self, state: dict):
        random.setstate(state["python"])
        torch.set_rng_state(state["torch"])
        if self.device.type == "cuda" and "cuda" in state:
            torch.cuda.set_rng_state(state["cuda"], self.device)

    def save_checkpoint(self) -> str:
        path = os.path.join(self.cfg.out, "checkpoints", f"step_{self.step:06d}")
        if self.env.main:
            os.makedirs(path, exist_ok=True)
        self.env.barrier()
        save_state(self._rng_state(), os.path.join(path, f"rng_rank{self.env.rank}"))
        if self.env.main:
            save_state({"step": self.step, "routers": self.routers.state_dict(), "lambdas": self.lambdas.detach(),
                        "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                        "world_size": self.env.world, "config": asdict(self.cfg)},
                       os.path.join(path, "state"))
        self.env.barrier()
        return path

    def load_checkpoint(self, where: str):
        if where == "auto":
            found = _checkpoint_dirs(self.cfg.out)
            if not found:
                if self.env.main:
                    print(f"[train-router] --resume auto: no checkpoint under {self.cfg.out}, starting fresh")
                return
            where = found[-1]
        if not state_exists(os.path.join(where, "state")):
            hint = " (its state.pt is the old pickle format, which resume no longer reads: unpickling can run code)" \
                if os.path.isfile(os.path.join(where, "state.pt")) else ""
            raise ValueError(f"resume: {where} is not a checkpoint directory (no state.json){hint}")
        ckpt = load_state(os.path.join(where, "state"), device=self.device)
        rng_file = os.path.join(where, f"rng_rank{self.env.rank}")
        try:
            self.routers.load_state_dict(ckpt["routers"])
            with torch.no_grad():
                self.lambdas.copy_(ckpt["lambdas"])
            self.optimizer.load_state_dict(ckpt["optimizer"])
            self.scheduler.load_state_dict(ckpt["scheduler"])
            self.step = int(ckpt["step"])
            same_world = state_exists(rng_file) and ckpt.get("world_size") == self.env.world
            if same_world:
                self._set_rng_state(load_state(rng_file))
        except (KeyError, TypeError, AttributeError, RuntimeError) as e:  # well-formed files, wrong contents
            raise ValueError(f"resume: {where} does not hold a checkpoint this run can continue "
                             f"({type(e).__name__}: {e})") from None
        if not same_world:  # a different world size: continue deterministically, but not bit-identically
            random.seed(self.cfg.seed * 1000 + self.step)
            torch.manual_seed(self.cfg.seed * 1000 + 7919 * (self.env.rank + 1) + self.step)
        if self.env.main:
            print(f"[train-router] resumed from {where} at step {self.step}")

    # ------------------------------------------------------------------ one optimizer step
    def _autocast(self):
        if self.dtype == torch.float32:
            return torch.autocast(self.device.type, enabled=False)
        return torch.autocast(self.device.type, dtype=self.dtype)

    def _sample_iterator(self, end: int):
        sampler = _RankIndices(self.step, end, self.cfg.batch_size, self.env.rank, self.env.world)
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # forked workers + Rust threads can deadlock
        if self.cfg.num_workers <= 0:
            return (self.dataset[i] for i in sampler)
        loader = torch.utils.data.DataLoader(self.dataset, batch_size=None, sampler=sampler, collate_fn=_first,
                                             num_workers=self.cfg.num_workers, prefetch_factor=8)
        return iter(loader)

    def train_step(self, samples=None) -> dict:
        """One optimizer step; `samples` yields this rank's samples in order (built on the fly if None)."""
        cfg, env = self.cfg, self.env
        if samples is None:
            samples = self._sample_iterator(self.step + 1)
        step = self.step
        tau = tau_at(step, cfg.steps, cfg.tau_max, cfg.tau_min, cfg.tau_decay_ratio, cfg.tau_schedule)
        indices = [step * cfg.batch_size + i for i in range(cfg.batch_size)]
        tasks = [self.dataset.task_of(i) for i in indices]
        weights = task_weights(tasks)
        n_tasks = len(TASKS)
        # sums over this rank's samples: [lm, reg, tokens, count per task, msr per task, lm per task]
        stats = torch.zeros(3 + 3 * n_tasks, dtype=torch.float64)
        self.optimizer.zero_grad(set_to_none=True)
        mine = list(range(env.rank, cfg.batch_size, env.world))
        for c in range(0, len(mine), cfg.micro_batch):
            chunk = mine[c: c + cfg.micro_batch]
            batch = []
            for j in chunk:
                sample = next(samples)
                if sample.task != tasks[j]:
                    raise RuntimeError(f"data order broken: sample for index {indices[j]} is {sample.task}, "
                                       f"expected {tasks[j]}")
                ids = torch.tensor(sample.input_ids, dtype=torch.long, device=self.device)
                mask = torch.tensor(sample.loss_mask, dtype=torch.long, device=self.device)
                batch.append((j, sample, ids, mask))
            with self._autocast(), self.state.training_mix(tau=tau, full_branch=cfg.full_branch):
                logits = prompt_then_answer_logits_batch(self.model, [b[2] for b in batch],
                                                         [b[1].prompt_len for b in batch],
                                                         [logits_needed(b[3]) for b in batch])
            msrs = msr_from_z(self.state.last_z)
            loss = 0.0
            for (j, sample, ids, mask), lg, msr in zip(batch, logits, msrs):
                lm = masked_lm_loss(lg, ids, mask)
                ti = TASKS.index(sample.task)
                target = 1.0 if TASK_CATEGORY[sample.task] == "robust" else cfg.t_sen
                reg = sample_regulariser(msr, target, self.lambdas[0, ti], self.lambdas[1, ti])
                loss = loss + lm / cfg.batch_size + weights[j] * reg
                stats[0] += lm.item() / cfg.batch_size
                stats[1] += weights[j] * reg.item()
                stats[2] += len(sample.input_ids)
                stats[3 + ti] += 1
                stats[3 + n_tasks + ti] += msr.item()
                stats[3 + 2 * n_tasks + ti] += lm.item()
            with self.state.training_mix(tau=tau, full_branch=cfg.full_branch):  # (a checkpointed forward reruns)
                loss.backward()
        params = self.router_params + [self.lambdas]
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).float()
                          for p in params])
        env.all_reduce_(flat)
        offset = 0
        for p in params:
            n = p.numel()
            p.grad = flat[offset: offset + n].view_as(p).to(p.dtype)
            offset += n
        stats = env.all_reduce_(stats.to(self.device)).cpu()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        lrs = [g["lr"] for g in self.optimizer.param_groups]
        self.optimizer.step()
        self.scheduler.step()
        self.step += 1
        counts = stats[3: 3 + n_tasks]
        record = {"step": self.step, "loss": float(stats[0] + stats[1]), "lm_loss": float(stats[0]),
                  "reg": float(stats[1]), "tokens": int(stats[2]), "tau": tau, "lr": lrs[0], "lambda_lr": lrs[1],
                  "grad_norm": float(grad_norm), "msr": {}, "lm_loss_task": {}, "lambda1": {}, "lambda2": {}}
        for ti, task in enumerate(TASKS):
            record["lambda1"][task] = float(self.lambdas.detach()[0, ti])
            record["lambda2"][task] = float(self.lambdas.detach()[1, ti])
            if counts[ti] > 0:
                record["msr"][task] = float(stats[3 + n_tasks + ti] / counts[ti])
                record["lm_loss_task"][task] = float(stats[3 + 2 * n_tasks + ti] / counts[ti])
        for cat in ("sensitive", "robust"):
            sel = [ti for ti, t in enumerate(TASKS) if TASK_CATEGORY[t] == cat and counts[ti] > 0]
            if sel:
                record[f"msr_{cat}"] = float(sum(stats[3 + n_tasks + ti] for ti in sel) / sum(counts[ti] for ti in sel))
        return record

    # ------------------------------------------------------------------ the loop
    def run(self) -> dict:
        from tqdm.auto import tqdm

        cfg, env = self.cfg, self.env
        os.makedirs(cfg.out, exist_ok=True)
        if env.main:
            with open(os.path.join(cfg.out, "train_config.json"), "w") as f:
                json.dump({**asdict(cfg), "world_size": env.world, "device": str(self.device),
                           "torch_dtype": str(self.dtype)}, f, indent=1)
            self.dataset.write_manifest(os.path.join(cfg.out, "data_manifest.json"))
        log_path = os.path.join(cfg.out, "train_log.jsonl")
        end = cfg.steps if cfg.stop_after is None else min(cfg.steps, cfg.stop_after)
        bar = tqdm(total=cfg.steps, initial=self.step, desc="train-router", disable=not (env.main and cfg.progress),
                   dynamic_ncols=True)
        record, t0 = {}, time.time()
        samples = self._sample_iterator(end)
        while self.step < end:
            start = time.time()
            record = self.train_step(samples)
            record["step_time_s"] = time.time() - start
            if env.main:
                with open(log_path, "a") as f:
                    f.write(json.dumps(record) + "\n")
                bar.set_postfix(loss=f"{record['loss']:.3f}", msr_sen=f"{record.get('msr_sensitive', math.nan):.2f}",
                                msr_rob=f"{record.get('msr_robust', math.nan):.2f}", tau=f"{record['tau']:.2f}")
            bar.update(1)
            if cfg.save_every and self.step % cfg.save_every == 0 and self.step < end:
                self.save_checkpoint()
        bar.close()
        if self.step > 0 and (not _checkpoint_dirs(cfg.out) or
                              not _checkpoint_dirs(cfg.out)[-1].endswith(f"step_{self.step:06d}")):
            self.save_checkpoint()
        if env.main:
            if self.step >= cfg.steps:
                self.routers.save(os.path.join(cfg.out, "routers"))
                _save_lambdas(os.path.join(cfg.out, "routers"), self.lambdas, self.step, cfg.t_sen)
            plot_training_log(log_path, os.path.join(cfg.out, "training_curves.png"))
            print(f"[train-router] {self.step}/{cfg.steps} steps in {time.time() - t0:.1f}s -> {cfg.out}")
        env.barrier()
        return record

    def close(self):
        self.env.close()


def read_log(path: str) -> list[dict]:
    """Records of train_log.jsonl, the last one of each step (a resumed run may repeat steps)."""
    by_step = {}
    with open(path) as f:
        for line in f:
            if line.strip():
                rec = json.loads(line)
                by_step[rec["step"]] = rec
    return [by_step[s] for s in sorted(by_step)]


def plot_training_log(log_path: str, png_path: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not os.path.isfile(log_path):
        return
    recs = read_log(log_path)
    if not recs:
        return
    steps = [r["step"] for r in recs]
    fig, axes = plt.subplots(2, 3, figsize=(15, 8))
    ax = axes[0, 0]
    for key in ("loss", "lm_loss", "reg"):
        ax.plot(steps, [r[key] for r in recs], label=key)
    ax.set_title("loss")
    ax.legend()
    ax = axes[0, 1]
    for task in TASKS:
        pts = [(r["step"], r["msr"][task]) for r in recs if task in r["msr"]]
        if pts:
            ax.plot(*zip(*pts), ls="-" if TASK_CATEGORY[task] == "sensitive" else "--", label=task)
    ax.set_title("MSR per task (solid: sensitive, dashed: robust)")
    ax.set_ylim(-0.02, 1.02)
    ax.legend(fontsize=7)
    for ax, key in ((axes[0, 2], "lambda1"), (axes[1, 0], "lambda2")):
        for task in TASKS:
            ax.plot(steps, [r[key][task] for r in recs], ls="-" if TASK_CATEGORY[task] == "sensitive" else "--",
                    label=task)
        ax.set_title(key)
        ax.legend(fontsize=7)
    ax = axes[1, 1]
    ax.plot(steps, [r["tau"] for r in recs], label="tau")
    ax.set_title("Gumbel temperature")
    ax2 = axes[1, 2]
    ax2.plot(steps, [r["lr"] for r in recs], label="router lr")
    ax2.plot(steps, [r["lambda_lr"] for r in recs], label="lambda lr")
    ax2.set_title("learning rates")
    ax2.legend()
    for a in axes.flat:
        a.set_xlabel("step")
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)


def train(config: TrainConfig, model=None, tokenizer=None) -> dict:
    trainer = RouterTrainer(config, model=model, tokenizer=tokenizer)
    try:
        return trainer.run()
    finally:
        trainer.close()
