"""Router training: losses and schedules, CPU smoke training on a tiny random Llama, resume, 2-process gloo run.

Run as a script (`python -m torch.distributed.run ... tests/test_training.py --worker OUT` or `--eval-worker OUT`)
it is the worker of the distributed tests.
"""
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from elastic_cuda.training.data import ROBUST_TASKS, SENSITIVE_TASKS, TASKS
from elastic_cuda.training.losses import (lagrangian_regulariser, logits_needed, masked_lm_loss, msr_from_z,
                                          sample_regulariser, task_weights)
from elastic_cuda.training.schedule import lr_factor, tau_at
from elastic_cuda.training.trainer import RouterTrainer, TrainConfig, read_log

# tasks whose fixed text fits in 384 byte tokens (kv_retrieval / variable_tracking / docstring need ~512)
SHORT_TASKS = ("passkey", "fact_qa", "code_continuation", "copy_local")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(model="tiny-llama", lengths=(384,), sink=16, window=64, num_workers=0, progress=False,
            save_every=0, device="cpu", dtype="float32", calibration_samples=8)


# ---------------------------------------------------------------------------------------------- losses, schedules
def test_regulariser_weights_match_batched_form():
    g = torch.Generator().manual_seed(0)
    n = 11
    task_idx = torch.randint(0, 5, (n,), generator=g)
    msr = torch.rand(n, generator=g, dtype=torch.float64)
    targets = torch.where(task_idx < 2, 0.7, 1.0).to(torch.float64)
    lam1, lam2 = torch.rand(5, generator=g, dtype=torch.float64), torch.rand(5, generator=g, dtype=torch.float64)
    batched = lagrangian_regulariser(msr, task_idx, targets, lam1, lam2)
    w = task_weights(task_idx.tolist())
    summed = sum(w[i] * sample_regulariser(msr[i], float(targets[i]), lam1[task_idx[i]], lam2[task_idx[i]])
                 for i in range(n))
    # float64 reference: explicit loops over tasks
    ref = []
    for t in sorted(set(task_idx.tolist())):
        vals = [float(lam1[t] * abs(msr[i] - targets[i]) + lam2[t] * (msr[i] - targets[i]) ** 2)
                for i in range(n) if task_idx[i] == t]
        ref.append(sum(vals) / len(vals))
    ref = sum(ref) / len(ref)
    assert abs(float(batched) - ref) / ref < 1e-12 and abs(float(summed) - ref) / ref < 1e-12


def test_masked_lm_loss_with_kept_logits():
    g = torch.Generator().manual_seed(1)
    T, V = 20, 13
    ids = torch.randint(0, V, (T,), generator=g)
    logits = torch.randn(T, V, generator=g, dtype=torch.float64)
    mask = torch.zeros(T, dtype=torch.long)
    mask[15:] = 1
    keep = logits_needed(mask)
    assert keep == 6
    got = masked_lm_loss(logits[-keep:], ids, mask)
    ref = -sum(torch.log_softmax(logits[p - 1], -1)[ids[p]] for p in range(15, T)) / 5
    assert abs(float(got) - float(ref)) / float(ref) < 1e-6
    full = masked_lm_loss(logits, ids, mask)
    assert abs(float(full) - float(ref)) / float(ref) < 1e-6
    with pytest.raises(ValueError, match="loss_mask"):
        masked_lm_loss(logits[-3:], ids, mask)
    assert torch.allclose(msr_from_z(torch.tensor([[[1.0, 0.0], [0.0, 0.0]]])), torch.tensor([0.75]))


def test_schedules():
    total = 100
    assert lr_factor(0, total) == pytest.approx(1 / 20) and lr_factor(19, total) == pytest.approx(1.0)
    assert lr_factor(20, total) == pytest.approx(1.0) and lr_factor(99, total) < 1e-3
    assert all(lr_factor(s, total) >= lr_factor(s + 1, total) for s in range(20, 99))
    assert tau_at(0, total) == pytest.approx(1.5) and tau_at(30, total) == pytest.approx(1.25)
    assert tau_at(60, total) == 1.0 and tau_at(99, total) == 1.0
    assert tau_at(0, total, schedule="paper") == pytest.approx(1.5)
    assert tau_at(99, total, schedule="paper") == pytest.approx(max(1.0, 1.5 * math.exp(-0.6 * 0.99)))
    with pytest.raises(ValueError, match="schedule"):
        tau_at(0, total, schedule="linear")


@pytest.mark.parametrize("policy", ["all_full", "all_sparse"])
def test_prompt_then_answer_matches_one_forward(policy):
    """Prefill + cached continuation gives the logits of one forward (fixed routing); rel. error in fp32."""
    from elastic_cuda.integrations.transformers import disable, enable
    from elastic_cuda.training.models import tiny_llama
    from elastic_cuda.training.trainer import prompt_then_answer_logits

    model = tiny_llama(0)
    enable(model, None, policy=policy, sink=4, window=16)
    ids = torch.randint(4, 260, (100,), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        got = prompt_then_answer_logits(model, ids, 80, 25)
        ref = model(input_ids=ids[None], use_cache=False).logits[0, -25:]
    disable(model)
    assert got.shape == ref.shape
    assert float((got - ref).abs().max() / ref.abs().max()) < 1e-5
    with pytest.raises(ValueError, match="prompt_len"):
        prompt_then_answer_logits(model, ids, 100, 1)


def test_batched_prompt_then_answer_matches_per_sample():
    """Left-padded prompts + right-padded answers in one batch give each sample its own logits AND its own routing
    (trained-style standardised routers, argmax), for prompts and answers of different lengths; fp32."""
    from elastic_cuda.integrations.transformers import disable, enable
    from elastic_cuda.router import RouterSet
    from elastic_cuda.training.models import tiny_llama
    from elastic_cuda.training.trainer import prompt_then_answer_logits, prompt_then_answer_logits_batch

    model = tiny_llama(0)
    torch.manual_seed(3)
    routers = RouterSet.for_model(model, sink=4, window=16, standardize_input=True, head_bias=True).eval()
    state = enable(model, routers, policy="router", sink=4, window=16)
    gen = torch.Generator().manual_seed(5)
    shapes = [(140, 110, 20), (97, 60, 37), (120, 119, 1), (150, 100, 50)]  # (length, prompt_len, keep)
    seqs = [torch.randint(4, 260, (T,), generator=gen) for T, _, _ in shapes]
    with torch.no_grad():
        routers.start_input_calibration()  # standardised inputs + large weights: routing that depends on the input
        for x in seqs:
            model(input_ids=x[None], use_cache=False, logits_to_keep=1)
        routers.finish_input_calibration(routers.calibration_sums())
        for m in routers.modules():
            if isinstance(m, torch.nn.Linear):
                m.weight.normal_(0, 0.6, generator=gen)
        ref, ref_modes = [], []
        for x, (T, P, K) in zip(seqs, shapes):
            ref.append(prompt_then_answer_logits(model, x, P, K))
            ref_modes.append(state.last_head_mode[0].clone())
        got = prompt_then_answer_logits_batch(model, seqs, [P for _, P, _ in shapes], [K for _, _, K in shapes])
        got_modes = state.last_head_mode
    disable(model)
    assert len({tuple(m.flatten().tolist()) for m in ref_modes}) > 1, "routing should differ between samples"
    for b, (g, r) in enumerate(zip(got, ref)):
        assert g.shape == r.shape
        assert float((g - r).abs().max() / r.abs().max()) < 1e-5, b
        assert torch.equal(got_modes[b], ref_modes[b]), b


# ---------------------------------------------------------------------------------------------- training on CPU
def _routers_state(trainer):
    return {k: v.detach().clone() for k, v in trainer.routers.state_dict().items()}


def _eval_msr(trainer, samples):
    """Deterministic (argmax) routing MSR over `samples`."""
    trainer.routers.eval()
    vals = []
    with torch.no_grad():
        for s in samples:
            trainer.model(input_ids=torch.tensor([s.prompt_ids]), use_cache=False, logits_to_keep=1)
            vals.append(trainer.state.metrics()["msr"])
    trainer.routers.train()
    return sum(vals) / len(vals)


def test_smoke_training_cpu(tmp_path):
    cfg = TrainConfig(out=str(tmp_path / "run"), steps=2, batch_size=8, **{**TINY, "lengths": (512,)})
    trainer = RouterTrainer(cfg)
    # the router inputs were standardised on calibration prompts before step 1 (not left at mean 0 / std 1)
    assert all(r.standardize_input and r.use_head_bias for r in trainer.routers.routers)
    assert all(r.input_mean.abs().sum() > 0 and not torch.equal(r.input_std, torch.ones_like(r.input_std))
               for r in trainer.routers.routers)
    lam0 = trainer.lambdas.detach().clone()
    r0 = _routers_state(trainer)
    record = trainer.run()
    trainer.close()
    assert math.isfinite(record["loss"]) and math.isfinite(record["lm_loss"]) and record["reg"] > 0
    assert bool((trainer.lambdas.detach() > lam0).all()), "gradient ascent must raise every lambda"
    assert any(not torch.equal(r0[k], v) for k, v in trainer.routers.state_dict().items())
    recs = read_log(os.path.join(cfg.out, "train_log.jsonl"))
    assert [r["step"] for r in recs] == [1, 2]
    assert set(recs[0]["msr"]) == set(TASKS) and set(recs[0]["lambda1"]) == set(TASKS)
    for name in ("training_curves.png", "data_manifest.json", "train_config.json", "routers/routers.safetensors"):
        assert os.path.isfile(os.path.join(cfg.out, name)), name
    from elastic_cuda.router import RouterSet

    loaded = RouterSet.load(os.path.join(cfg.out, "routers"), model=trainer.model)
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, trainer.routers.state_dict()[k].cpu())


def test_init_routers_fine_tunes_from_trained_routers(tmp_path):
    from elastic_cuda.router import RouterSet

    base = TrainConfig(out=str(tmp_path / "base"), steps=1, batch_size=2, tasks=SHORT_TASKS, **TINY)
    base_trainer = RouterTrainer(base)
    base_trainer.run()
    base_trainer.close()
    trained = os.path.join(base.out, "routers")
    ft = TrainConfig(out=str(tmp_path / "ft"), steps=1, batch_size=2, tasks=SHORT_TASKS, init_routers=trained, **TINY)
    trainer = RouterTrainer(ft)
    loaded = RouterSet.load(trained).state_dict()
    # starts exactly at the trained weights and their input standardisation (no re-calibration)
    for k, v in trainer.routers.state_dict().items():
        assert torch.equal(v.cpu(), loaded[k]), k
    # ... and at the first run's final lambdas (saved beside the routers), unless asked for fresh ones
    saved = json.load(open(os.path.join(trained, "training_lambdas.json")))
    assert saved["step"] == 1
    final = torch.tensor([[saved[k][t] for t in TASKS] for k in ("lambda1", "lambda2")])
    assert torch.allclose(final, base_trainer.lambdas.detach().cpu())
    assert torch.equal(trainer.lambdas.detach().cpu(), final)
    fresh = RouterTrainer(TrainConfig(out=str(tmp_path / "fresh"), steps=1, batch_size=2, tasks=SHORT_TASKS,
                                      init_routers=trained, fresh_lambdas=True, **TINY))
    assert not torch.allclose(fresh.lambdas.detach().cpu(), final)
    fresh.close()
    record = trainer.run()
    trainer.close()
    assert math.isfinite(record["loss"])
    with pytest.raises(ValueError, match="window"):
        RouterTrainer(TrainConfig(out=str(tmp_path / "bad"), steps=1, batch_size=2, tasks=SHORT_TASKS,
                                  init_routers=trained, **{**TINY, "window": 32}))


def test_block_sparse_mode_trains_and_saves_its_settings(tmp_path):
    """sparse_mode 'block': the training mix's sparse branch runs XAttention block masks, routers get gradients,
    and the saved RouterSet carries the block settings, which enable() and eval pick up."""
    from elastic_cuda.integrations.transformers import enable
    from elastic_cuda.router import RouterSet

    cfg = TrainConfig(out=str(tmp_path / "block"), steps=2, batch_size=2, tasks=SHORT_TASKS, sparse_mode="block",
                      block_size=32, xattn_stride=8, xattn_threshold=0.7, **TINY)
    trainer = RouterTrainer(cfg)
    before = [p.detach().clone() for p in trainer.routers.parameters()]
    record = trainer.run()
    assert math.isfinite(record["loss"])
    assert any(not torch.equal(a, p.detach()) for a, p in zip(before, trainer.routers.parameters()))
    # every layer estimated its masks
    assert all(trainer.state.meter.block_pairs(i) is not None for i in range(trainer.state.num_layers))
    trainer.close()
    saved = RouterSet.load(os.path.join(cfg.out, "routers"))
    assert {k: saved.config[k] for k in ("sparse_mode", "block_size", "xattn_stride", "xattn_threshold")} == \
        {"sparse_mode": "block", "block_size": 32, "xattn_stride": 8, "xattn_threshold": 0.7}
    model = trainer.model
    state = enable(model, saved, policy="router")
    assert (state.sparse_mode, state.block_size, state.xattn_stride, state.xattn_threshold) == ("block", 32, 8, 0.7)
    with pytest.raises(ValueError, match="multiple of the xattn stride"):
        TrainConfig(out=str(tmp_path / "bad"), sparse_mode="block", block_size=20, xattn_stride=8, **TINY).validate()


@pytest.mark.parametrize("paper_router", [True, False], ids=["paper_router", "standardised_router"])
@pytest.mark.parametrize("tasks,t_sen,expect", [(("code_continuation", "copy_local"), 0.7, "up"),
                                                (("passkey", "fact_qa"), 0.0, "down")])
def test_regulariser_moves_msr_to_target(tmp_path, tasks, t_sen, expect, paper_router):
    """With large lambdas and a fast router LR, routing MSR goes to the task target (1 robust, t_sen sensitive)."""
    assert set(tasks) <= set(ROBUST_TASKS if expect == "up" else SENSITIVE_TASKS)
    cfg = TrainConfig(out=str(tmp_path / "run"), steps=8 if paper_router else 16, batch_size=2, tasks=tasks,
                      t_sen=t_sen, lambda_init_max=50.0, router_lr=0.1, warmup_ratio=0.0,
                      standardize_input=not paper_router, head_bias=not paper_router, **TINY)
    trainer = RouterTrainer(cfg)
    with torch.no_grad():  # start from the opposite routing, so the move is visible whatever the random init
        for router in trainer.routers.routers:
            router.router_mlp[-1].bias.copy_(torch.tensor([-0.2, 0.2] if expect == "up" else [0.2, -0.2]))
    probe = [trainer.dataset[1000 + i] for i in range(4)]
    before = _eval_msr(trainer, probe)
    trainer.run()
    after = _eval_msr(trainer, probe)
    trainer.close()
    # the paper's router (near-constant logits) moves as a whole; the standardised one routes by input and
    # generalises to these unseen probes from 32 training samples, so allow a few heads to lag
    slack = 0.0 if paper_router else 0.25
    if expect == "up":
        assert before == 0.0 and after >= 1.0 - slack, (before, after)
    else:
        assert before == 1.0 and after <= slack, (before, after)


def test_resume_matches_uninterrupted_run(tmp_path):
    kw = dict(steps=3, batch_size=2, tasks=("passkey", "copy_local"), **TINY)
    full = TrainConfig(out=str(tmp_path / "full"), **kw)
    t_full = RouterTrainer(full)
    t_full.run()
    t_full.close()
    part = TrainConfig(out=str(tmp_path / "part"), stop_after=1, **kw)
    t_part = RouterTrainer(part)
    t_part.run()
    t_part.close()
    assert t_part.step == 1 and not os.path.isdir(os.path.join(part.out, "routers"))
    resumed = TrainConfig(out=str(tmp_path / "part"), resume="auto", **kw)
    t_res = RouterTrainer(resumed)
    assert t_res.step == 1
    t_res.run()
    t_res.close()
    for k, v in t_full.routers.state_dict().items():
        assert torch.equal(v, t_res.routers.state_dict()[k]), k
    assert torch.equal(t_full.lambdas.detach(), t_res.lambdas.detach())
    a = read_log(os.path.join(full.out, "train_log.jsonl"))
    b = read_log(os.path.join(part.out, "train_log.jsonl"))
    assert [r["loss"] for r in a] == [r["loss"] for r in b]


@pytest.mark.parametrize("mode", ["stream", "block"])
def test_micro_batch_matches_one_sample_at_a_time(tmp_path, monkeypatch, mode):
    """micro_batch 3 (padded forwards) trains the same routers as 1 (with the Gumbel noise pinned: the draw order
    differs), up to fp32 rounding; in BLOCK mode each padded sample estimates its own block masks."""
    import elastic_cuda.router as router_module

    monkeypatch.setattr(router_module.torch, "rand_like", lambda x: torch.full_like(x, 0.37))
    block = dict(sparse_mode="block", block_size=32, xattn_stride=8, xattn_threshold=0.7) if mode == "block" else {}
    kw = dict(steps=2, batch_size=5, tasks=SHORT_TASKS, **TINY, **block)
    runs = {}
    for mb in (1, 3):
        trainer = RouterTrainer(TrainConfig(out=str(tmp_path / f"mb{mb}"), micro_batch=mb, **kw))
        trainer.run()
        trainer.close()
        runs[mb] = (trainer.routers.state_dict(), read_log(os.path.join(trainer.cfg.out, "train_log.jsonl")))
    (s1, log1), (s3, log3) = runs[1], runs[3]
    for a, b in zip(log1, log3):
        assert a["tokens"] == b["tokens"] and a["msr"] == pytest.approx(b["msr"], abs=1e-6)
        assert a["lm_loss"] == pytest.approx(b["lm_loss"], rel=1e-4) and a["reg"] == pytest.approx(b["reg"], rel=1e-4)
    for k, v in s1.items():
        assert torch.allclose(v, s3[k], rtol=1e-4, atol=1e-6), k


def test_worker_data_matches_in_process(tmp_path):
    cfg = TrainConfig(out=str(tmp_path / "w"), steps=2, batch_size=3, tasks=SHORT_TASKS, **{**TINY, "num_workers": 1})
    trainer = RouterTrainer(cfg)
    got = [s.input_ids for s in trainer._sample_iterator(2)]
    trainer.close()
    assert got == [trainer.dataset[i].input_ids for i in range(6)]


# ---------------------------------------------------------------------------------------------- evaluation
def _tiny_eval(out, samples_per_task=1):
    from elastic_cuda.router import RouterSet
    from elastic_cuda.training.evaluate import EvalConfig, evaluate
    from elastic_cuda.training.models import ByteTokenizer, tiny_llama

    model = tiny_llama(0)
    torch.manual_seed(3)
    routers = RouterSet.for_model(model, sink=16, window=64)
    with torch.no_grad():  # logits far from 0, so the routing is input dependent and not a coin flip of rounding
        for r in routers.routers:
            r.router_mlp[-1].weight.mul_(200.0)
    cfg = EvalConfig(out=out, model="tiny-llama", lengths=(384,), tasks=SHORT_TASKS,
                     samples_per_task=samples_per_task, calibration_per_task=1, max_new_tokens=2, device="cpu",
                     progress=False, policies=("dense", "elastic", "static", "all_sparse"))
    return cfg, evaluate(cfg, model=model, tokenizer=ByteTokenizer(), routers=routers)


def test_evaluate_policies_tiny(tmp_path):
    from elastic_cuda.training.evaluate import static_table_from_frequency

    cfg, res = _tiny_eval(str(tmp_path / "eval"))
    agg = res["aggregate"]
    assert agg["dense"]["summary"]["msr"] == 0.0 and agg["all_sparse"]["summary"]["msr"] == 1.0
    table = torch.tensor(res["static_table"])
    assert abs(float(table.float().mean()) - agg["elastic"]["summary"]["msr"]) <= 0.5 / table.numel() + 1e-9
    assert agg["static"]["summary"]["msr"] == float(table.float().mean())
    assert {r["policy"] for r in res["records"]} == set(cfg.policies) and len(res["records"]) == 4 * len(SHORT_TASKS)
    for name in ("eval_results.json", "eval_report.md", "eval_summary.png", "eval_data_manifest.json"):
        assert os.path.isfile(os.path.join(cfg.out, name))
    # dense and all_sparse differ on the robust loss only through attention: both finite
    assert math.isfinite(agg["dense"]["summary"]["loss_robust"]) and math.isfinite(agg["all_sparse"]["summary"]["loss_robust"])
    freq = torch.tensor([[0.9, 0.1], [0.5, 0.2]])
    assert static_table_from_frequency(freq, 0.5).tolist() == [[False, True], [False, True]]
    assert "elastic_beats_static_sensitive_accuracy_at_ge_msr" in res["targets"]
    assert set(res["uncertainty"]) == {"policies", "paired"}
    # the report can be rebuilt from the saved records alone, identically
    from elastic_cuda.training.evaluate import rewrite_report

    with open(os.path.join(cfg.out, "eval_report.md")) as f:
        before = f.read()
    assert rewrite_report(os.path.join(cfg.out, "eval_results.json")) + "\n" == before


def test_accuracy_targets_use_only_cells_dense_can_do():
    from elastic_cuda.training.evaluate import capable_cells, cell_accuracy, check_targets

    def cells(**acc):  # task_length=accuracy, 4 samples each
        table = {}
        for key, a in acc.items():
            task, length = key.rsplit("_", 1)
            table.setdefault(task, {})[length] = {"n": 4, "accuracy": a, "msr": 0.5}
        return table

    summary = {"msr_sensitive": 0.5, "msr_robust": 0.9, "loss_robust": 2.0, "msr": 0.7}
    agg = {"dense": {"by_task_length": cells(passkey_2048=1.0, fact_qa_2048=0.0), "summary": {"loss_robust": 2.0}},
           "elastic": {"by_task_length": cells(passkey_2048=1.0, fact_qa_2048=1.0), "summary": summary},
           "static": {"by_task_length": cells(passkey_2048=0.5, fact_qa_2048=1.0), "summary": {**summary, "msr": 0.7}}}
    keep, drop = capable_cells(agg)
    assert keep == [("passkey", "2048")] and drop == [("fact_qa", "2048", 0.0)]
    assert cell_accuracy(agg, "static", keep) == 0.5
    t = check_targets(agg)
    assert t["sensitive_accuracy_ge_dense_minus_3pts"] and t["elastic_beats_static_sensitive_accuracy_at_ge_msr"]
    assert t["msr_gap_ge_0.25"] and t["robust_msr_ge_0.8"] and t["robust_loss_le_dense_x1.03"]
    agg["elastic"]["by_task_length"]["passkey"]["2048"]["accuracy"] = 0.5  # now 50 points under dense, tied with static
    t = check_targets(agg)
    assert not t["sensitive_accuracy_ge_dense_minus_3pts"] and not t["elastic_beats_static_sensitive_accuracy_at_ge_msr"]


def test_accuracy_uncertainty_pairs_the_same_prompts():
    from elastic_cuda.training.evaluate import accuracy_uncertainty, paired_accuracy_difference, wilson_interval

    lo, hi = wilson_interval(8, 10)  # textbook value: 0.8 with n = 10 -> [0.490, 0.943]
    assert abs(lo - 0.4902) < 1e-3 and abs(hi - 0.9433) < 1e-3
    assert wilson_interval(0, 5)[0] == 0.0 and wilson_interval(5, 5)[1] == 1.0

    def recs(policy, task, length, hits):
        return [{"policy": policy, "task": task, "length": length, "category": "sensitive", "correct": float(h)}
                for h in hits]

    # passkey 2048: elastic gets prompts 0-2 right, static 1-3: one discordant prompt each way
    records = (recs("dense", "passkey", 2048, [1, 1, 1, 1]) + recs("elastic", "passkey", 2048, [1, 1, 1, 0]) +
               recs("static", "passkey", 2048, [0, 1, 1, 1]) + recs("elastic", "fact_qa", 2048, [1, 1]) +
               recs("static", "fact_qa", 2048, [0, 0]) + recs("dense", "fact_qa", 2048, [0, 0]))
    d = paired_accuracy_difference(records, "elastic", "static", [("passkey", 2048)])
    assert d["n"] == 4 and d["diff"] == 0.0 and d["only_elastic"] == 1 and d["only_static"] == 1
    assert d["ci95"][0] < 0 < d["ci95"][1]
    agg = {"dense": {"by_task_length": {"passkey": {"2048": {"n": 4, "accuracy": 1.0}},
                                        "fact_qa": {"2048": {"n": 2, "accuracy": 0.0}}}},
           "elastic": {}, "static": {}}
    u = accuracy_uncertainty(records, agg)  # fact_qa (dense 0) is not a capable cell: it must not count
    assert u["policies"]["elastic"]["n"] == 4 and u["policies"]["elastic"]["accuracy"] == 0.75
    assert u["paired"]["elastic-dense"]["diff"] == -0.25 and u["paired"]["elastic-dense"]["only_dense"] == 1


# ---------------------------------------------------------------------------------------------- 2 processes (gloo)
def _worker(out):
    cfg = TrainConfig(out=out, steps=2, batch_size=4, tasks=SHORT_TASKS, **TINY)
    trainer = RouterTrainer(cfg)
    trainer.run()
    rank = trainer.env.rank
    torch.save({"routers": trainer.routers.state_dict(), "lambdas": trainer.lambdas.detach(),
                "world": trainer.env.world}, os.path.join(out, f"final_rank{rank}.pt"))
    trainer.close()


def _run_two_gloo_ranks(worker_flag, out):
    """This file as a worker under torchrun: 2 CPU processes (gloo), one thread each."""
    env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           os.path.abspath(__file__), worker_flag, out]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def test_two_process_gloo_ranks_stay_identical(tmp_path):
    out = str(tmp_path / "ddp")
    os.makedirs(out)
    _run_two_gloo_ranks("--worker", out)
    s0 = torch.load(os.path.join(out, "final_rank0.pt"))
    s1 = torch.load(os.path.join(out, "final_rank1.pt"))
    assert s0["world"] == s1["world"] == 2
    for k, v in s0["routers"].items():
        assert torch.equal(v, s1["routers"][k]), k
    assert torch.equal(s0["lambdas"], s1["lambdas"])
    recs = read_log(os.path.join(out, "train_log.jsonl"))
    assert len(recs) == 2 and all(math.isfinite(r["loss"]) for r in recs)
    # the global batch covered every task once per step (4 samples: 2 per rank)
    assert sum(1 for t in recs[0]["msr"]) == 4
    with open(os.path.join(out, "train_config.json")) as f:
        assert json.load(f)["world_size"] == 2


def test_two_process_eval_matches_one_process(tmp_path):
    """torchrun-sharded eval: same records, aggregates and static table as one process; rank 0 writes the files."""
    _, single = _tiny_eval(str(tmp_path / "one"), samples_per_task=2)
    out = str(tmp_path / "two")
    _run_two_gloo_ranks("--eval-worker", out)
    with open(os.path.join(out, "eval_results.json")) as f:
        two = json.load(f)
    assert two["world_size"] == 2 and len(two["records"]) == len(single["records"]) == 4 * 2 * len(SHORT_TASKS)
    for a, b in zip(single["records"], two["records"]):
        assert a.keys() == b.keys(), (a, b)
        for k in a:
            assert a[k] == pytest.approx(b[k], rel=1e-5, abs=1e-6) if isinstance(a[k], float) else a[k] == b[k], k
    assert two["static_table"] == single["static_table"]
    assert two["targets"] == single["targets"]


if __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] == "--worker":
    _worker(sys.argv[2])
if __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] == "--eval-worker":
    _tiny_eval(sys.argv[2], samples_per_task=2)
