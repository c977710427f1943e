"""The front door (issue 14): bad input gives a ValueError that names the argument or the file, router files are
checked at load, the CLI ends in one line instead of a traceback, --help describes every command with its
defaults, resume never unpickles, and the build says what it builds."""
from __future__ import annotations

import json
import math
import os
import re

import pytest
import torch

import elastic_cuda
from elastic_cuda.router import CONFIG_FILE, WEIGHTS_FILE, RouterSet

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ----------------------------------------------------------------------------- boundary_pool wrapper
@pytest.mark.parametrize("name,call,pattern", [
    ("cu_seqlens negative start", lambda k: elastic_cuda.ops.boundary_pool(
        k, cu_seqlens=torch.tensor([-1, 4], dtype=torch.int32)), r"cu_seqlens must start at >= 0"),
    ("cu_seqlens decreasing", lambda k: elastic_cuda.ops.boundary_pool(
        k, cu_seqlens=torch.tensor([0, 3, 2], dtype=torch.int32)), r"non-decreasing"),
    ("cu_seqlens past the end", lambda k: elastic_cuda.ops.boundary_pool(
        k, cu_seqlens=torch.tensor([0, 5], dtype=torch.int32)), r"within the 4 tokens"),
    ("cu_seqlens int64", lambda k: elastic_cuda.ops.boundary_pool(
        k, cu_seqlens=torch.tensor([0, 4])), r"cu_seqlens must be an int32 tensor"),
    ("integer keys", lambda k: elastic_cuda.ops.boundary_pool(
        k.long(), cu_seqlens=torch.tensor([0, 4], dtype=torch.int32)), r"keys must be floating point"),
    ("n_first float", lambda k: elastic_cuda.ops.boundary_pool(
        k, n_first=2.5, cu_seqlens=torch.tensor([0, 4], dtype=torch.int32)), r"n_first/n_last must be ints"),
])
def test_boundary_pool_wrapper_raises_value_error(name, call, pattern):
    keys = torch.randn(4, 2, 8)
    with pytest.raises(ValueError, match=pattern):
        call(keys)


def test_wrapper_value_checks_skip_fake_tensors():
    """Shape propagation (FakeTensorMode) has no values to read: the wrapper's CPU value checks step aside and the
    fake kernels give the shapes (the checks run when the call really runs)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    q, kv = torch.randn(9, 4, 8), torch.randn(9, 2, 8)
    cu = torch.tensor([0, 4, 9], dtype=torch.int32)
    hm = torch.tensor([[0, 1], [1, 2]], dtype=torch.int32)
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        fake = [mode.from_tensor(t) for t in (q, kv, cu, hm)]
        out = elastic_cuda.ops.attention(fake[0], fake[1], fake[1], fake[3], cu_seqlens_q=fake[2],
                                         cu_seqlens_k=fake[2], max_seqlen_q=5, max_seqlen_k=5,
                                         block_mask=torch.ones(2, 2, 1, 1, dtype=torch.bool), block_size=8)
        pooled = elastic_cuda.ops.boundary_pool(fake[1], cu_seqlens=fake[2])
    assert out.shape == q.shape and pooled.shape == (2, 2, 8)


@pytest.mark.skipif(not torch.cuda.is_available() or not elastic_cuda.has_cuda_kernels(), reason="needs CUDA")
def test_wrapper_never_syncs_on_cuda_and_keeps_the_nan_rule():
    """On CUDA the wrapper reads no head_mode / cu_seqlens values (torch's sync debug mode raises on any
    device-to-host sync), and an invalid mode still gives that head NaN instead of an exception (README)."""
    dev = "cuda"
    q = torch.randn(1, 64, 4, 64, device=dev, dtype=torch.bfloat16)
    k = torch.randn(1, 64, 2, 64, device=dev, dtype=torch.bfloat16)
    # every input is on the device before the sync check starts (a host-to-device copy itself syncs)
    cu = torch.tensor([0, 20, 64], dtype=torch.int32, device=dev)
    hm_bad = torch.tensor([[0, 7]], dtype=torch.int32, device=dev)
    hm_full, hm_packed = torch.zeros_like(hm_bad), torch.zeros(2, 2, dtype=torch.int32, device=dev)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        bad = elastic_cuda.ops.attention(q, k, k, hm_bad)
        good = elastic_cuda.ops.attention(q, k, k, hm_full)
        packed = elastic_cuda.ops.attention(q[0], k[0], k[0], hm_packed, cu_seqlens_q=cu, cu_seqlens_k=cu,
                                            max_seqlen_q=44, max_seqlen_k=44)
        pooled = elastic_cuda.ops.boundary_pool(k[0], cu_seqlens=cu)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isnan(bad[:, :, 2:]).all() and torch.allclose(bad[:, :, :2], good[:, :, :2])
    assert torch.isfinite(packed).all() and torch.isfinite(pooled).all()


def test_readme_promises_value_error_from_the_wrapper():
    """The README's promise that this file's tests (and test_op_front.py's BAD_ARGS) hold the wrapper to."""
    text = open(os.path.join(ROOT, "README.md")).read()
    assert "Bad input raises a `ValueError` (Python wrapper)" in text


# ----------------------------------------------------------------------------- router files
def _saved_routers(tmp_path, **config):
    cfg = dict(num_layers=2, num_kv_heads=2, head_dim=16, standardize_input=True, head_bias=True, **config)
    torch.manual_seed(0)
    routers = RouterSet(cfg)
    routers.save(str(tmp_path))
    return routers


def _load_fails(tmp_path, file_name, pattern):
    path = os.path.join(str(tmp_path), file_name)
    with pytest.raises(ValueError) as info:
        RouterSet.load(str(tmp_path))
    message = str(info.value)
    assert path in message and re.search(pattern, message), message


@pytest.mark.parametrize("text,pattern", [
    ("{not json", r"cannot read .* as JSON"),
    ("", r"cannot read .* as JSON"),
    ("[1, 2, 3]", r"must hold a JSON object, got a list"),
    ('"routers"', r"must hold a JSON object, got a str"),
])
def test_corrupt_router_config_names_the_file(tmp_path, text, pattern):
    _saved_routers(tmp_path)
    (tmp_path / CONFIG_FILE).write_text(text)
    _load_fails(tmp_path, CONFIG_FILE, pattern)


def test_router_config_not_utf8_names_the_file(tmp_path):
    _saved_routers(tmp_path)
    (tmp_path / CONFIG_FILE).write_bytes(b'{"version": 1, "sink": "\xff\xfe"}')
    _load_fails(tmp_path, CONFIG_FILE, r"cannot read .* as JSON")


@pytest.mark.parametrize("change,pattern", [
    (dict(num_layers=None), r"config\['num_layers'\] must be a positive int"),
    (dict(head_dim="64"), r"config\['head_dim'\] must be a positive int"),
    (dict(sink=-1), r"sink must be an int >= 0"),  # the sparse settings: SparseConfig's one check
    (dict(window="512"), r"window must be an int >= 1"),
    (dict(n_first="100"), r"config\['n_first'\] must be an int"),
    (dict(standardize_input="yes"), r"config\['standardize_input'\] must be true or false"),
    (dict(sparse_mode="dense"), r"sparse_mode must be one of"),
    # BLOCK settings are checked where they are used, in BLOCK mode (SparseConfig: a STREAM config carries them unused)
    (dict(sparse_mode="block", xattn_threshold=2.0), r"xattn threshold must be in \[0, 1\]"),
    (dict(sparse_mode="block", block_size=100), r"block_size must be a positive multiple of the xattn stride"),
])
def test_bad_router_config_values_name_the_file(tmp_path, change, pattern):
    _saved_routers(tmp_path)
    cfg = json.loads((tmp_path / CONFIG_FILE).read_text())
    cfg.update(change)
    (tmp_path / CONFIG_FILE).write_text(json.dumps(cfg))
    _load_fails(tmp_path, CONFIG_FILE, pattern)


def test_router_config_missing_keys_names_the_file(tmp_path):
    _saved_routers(tmp_path)
    (tmp_path / CONFIG_FILE).write_text(json.dumps({"version": 1}))
    _load_fails(tmp_path, CONFIG_FILE, r"num_layers")


@pytest.mark.parametrize("data", [b"", b"garbage bytes, not safetensors", b"\x08\x00\x00\x00\x00\x00\x00\x00{bad}   "])
def test_corrupt_router_weights_name_the_file(tmp_path, data):
    _saved_routers(tmp_path)
    (tmp_path / WEIGHTS_FILE).write_bytes(data)
    _load_fails(tmp_path, WEIGHTS_FILE, r"cannot read .* as safetensors")


@pytest.mark.parametrize("key,value,pattern", [
    ("routers.1.router_mlp.4.weight", float("nan"), r"routers.1.router_mlp.4.weight .* 1 non-finite"),
    ("routers.0.task_mlp.0.bias", float("inf"), r"non-finite"),
    ("routers.0.input_mean", float("nan"), r"routers.0.input_mean .* non-finite"),
    ("routers.1.input_std", 0.0, r"routers.1.input_std .* must be > 0"),
    ("routers.0.head_bias", float("-inf"), r"non-finite"),
])
def test_non_finite_router_weights_and_statistics_refused(tmp_path, key, value, pattern):
    from safetensors.torch import load_file, save_file

    _saved_routers(tmp_path)
    path = str(tmp_path / WEIGHTS_FILE)
    state = load_file(path)
    assert key in state
    state[key] = state[key].clone()
    state[key].view(-1)[0] = value
    save_file(state, path)
    _load_fails(tmp_path, WEIGHTS_FILE, pattern)


def test_integer_router_weights_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    _saved_routers(tmp_path)
    path = str(tmp_path / WEIGHTS_FILE)
    state = load_file(path)
    state["routers.0.head_bias"] = state["routers.0.head_bias"].to(torch.int64)
    save_file(state, path)
    _load_fails(tmp_path, WEIGHTS_FILE, r"routers.0.head_bias .* must be floating point")


def test_valid_router_files_load_unchanged(tmp_path):
    """The base the corruptions start from loads, with the weights it saved (each failure is the corruption's)."""
    routers = _saved_routers(tmp_path)
    loaded = RouterSet.load(str(tmp_path))
    for (ka, a), (kb, b) in zip(routers.state_dict().items(), loaded.state_dict().items()):
        assert ka == kb and torch.equal(a, b)


# ----------------------------------------------------------------------------- resume never unpickles
class _RunsCodeWhenUnpickled:
    """A pickle payload: unpickling it calls os.mkdir(marker), the stand-in for arbitrary code."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def _write_pickle_payload(path, marker):
    import pickle

    with open(path, "wb") as f:
        pickle.dump({"step": 1, "payload": _RunsCodeWhenUnpickled(marker)}, f)


def test_checkpoint_state_round_trips_optimizer_scheduler_and_rng(tmp_path):
    """save_state / load_state keep what resume needs, exactly: int-keyed optimizer state, tuples (betas, Python's
    RNG state), None, bools, NaN/inf floats, 0-dim and uint8 tensors."""
    import random

    from elastic_cuda.training.checkpoint import load_state, save_state

    p = torch.nn.Parameter(torch.randn(3, 4))
    opt = torch.optim.AdamW([{"params": [p], "lr": 1e-3, "betas": (0.9, 0.95), "name": "routers"}])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 ** s)
    p.grad = torch.randn_like(p)
    opt.step()
    sched.step()
    state = {"optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "python": random.getstate(),
             "torch": torch.get_rng_state(), "floats": [float("nan"), float("inf"), -0.0], "flag": True,
             "none": None, "view": torch.arange(10.0)[::3], "config": {"lengths": (384, 512), "extra": {}}}
    save_state(state, str(tmp_path / "state"))
    back = load_state(str(tmp_path / "state"))
    assert back["python"] == state["python"] and isinstance(back["python"][1], tuple)
    assert torch.equal(back["torch"], state["torch"]) and back["torch"].dtype == torch.uint8
    assert back["optimizer"]["param_groups"] == state["optimizer"]["param_groups"]
    assert set(back["optimizer"]["state"]) == {0}
    for k, v in state["optimizer"]["state"][0].items():
        assert torch.equal(back["optimizer"]["state"][0][k], v) and back["optimizer"]["state"][0][k].shape == v.shape
    assert back["scheduler"] == state["scheduler"]
    assert math.isnan(back["floats"][0]) and back["floats"][1:] == [float("inf"), -0.0]
    assert back["flag"] is True and back["none"] is None and torch.equal(back["view"], state["view"])
    assert back["config"] == state["config"]
    opt2 = torch.optim.AdamW([{"params": [torch.nn.Parameter(p.detach().clone())], "name": "routers"}])
    opt2.load_state_dict(back["optimizer"])  # the decoded state is what torch's own loader accepts
    with pytest.raises(TypeError, match=r"state.obj is a object"):
        save_state({"obj": object()}, str(tmp_path / "bad"))


@pytest.mark.parametrize("corrupt", ["state.pt only", "safetensors is a pickle", "json is a pickle"])
def test_resume_refuses_pickles_and_never_runs_their_code(tmp_path, monkeypatch, corrupt):
    """A crafted checkpoint whose pickle would run code is refused with a ValueError, and the code never runs."""
    from elastic_cuda.training.checkpoint import save_state
    from elastic_cuda.training.trainer import RouterTrainer, TrainConfig

    marker = str(tmp_path / "code_ran")
    ckpt = tmp_path / "run" / "checkpoints" / "step_000001"
    ckpt.mkdir(parents=True)
    if corrupt == "state.pt only":
        _write_pickle_payload(str(ckpt / "state.pt"), marker)
        _write_pickle_payload(str(ckpt / "rng_rank0.pt"), marker)
        pattern = r"old pickle format"
    else:
        save_state({"step": 1}, str(ckpt / "state"))
        victim = "state.safetensors" if corrupt == "safetensors is a pickle" else "state.json"
        _write_pickle_payload(str(ckpt / victim), marker)
        pattern = re.escape(str(ckpt / victim)) + r" as (safetensors|JSON)"
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("resume called torch.load"))
    cfg = TrainConfig(out=str(tmp_path / "run"), steps=2, batch_size=2, resume=str(ckpt), model="tiny-llama",
                      lengths=(384,), num_workers=0, progress=False, save_every=0, device="cpu", dtype="float32",
                      calibration_samples=2)
    with pytest.raises(ValueError, match=pattern):
        RouterTrainer(cfg)
    assert not os.path.exists(marker), "the pickle's code ran"


def test_resume_ignores_a_pickled_rng_file(tmp_path, monkeypatch):
    """A real checkpoint (state + RNG as JSON/safetensors) with a planted rng_rank0.pt: resume reads only its own
    files, never torch.load / pickle, and the planted code never runs."""
    import pickle

    from elastic_cuda.training.trainer import RouterTrainer, TrainConfig

    kw = dict(steps=2, batch_size=2, model="tiny-llama", lengths=(384,), num_workers=0, progress=False,
              save_every=0, device="cpu", dtype="float32", calibration_samples=2)
    trainer = RouterTrainer(TrainConfig(out=str(tmp_path / "run"), **kw))
    trainer.step = 1
    path = trainer.save_checkpoint()
    trainer.close()
    assert sorted(os.listdir(path)) == ["rng_rank0.json", "rng_rank0.safetensors", "state.json", "state.safetensors"]
    marker = str(tmp_path / "code_ran")
    _write_pickle_payload(os.path.join(path, "rng_rank0.pt"), marker)
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("resume called torch.load"))
    monkeypatch.setattr(pickle, "load", lambda *a, **k: pytest.fail("resume called pickle.load"))
    monkeypatch.setattr(pickle, "loads", lambda *a, **k: pytest.fail("resume called pickle.loads"))
    resumed = RouterTrainer(TrainConfig(out=str(tmp_path / "run"), resume="auto", **kw))
    assert resumed.step == 1
    for k, v in trainer.routers.state_dict().items():
        assert torch.equal(v, resumed.routers.state_dict()[k]), k
    resumed.close()
    assert not os.path.exists(marker)


# ----------------------------------------------------------------------------- command line
COMMANDS = ("demo", "train-router", "eval")


def _help_text(capsys, command):
    from elastic_cuda.cli import main

    with pytest.raises(SystemExit) as info:
        main([command, "--help"])
    assert info.value.code == 0
    return capsys.readouterr().out


def _subparser(command):
    from elastic_cuda.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    return sub.choices[command]


@pytest.mark.parametrize("command", COMMANDS)
def test_help_describes_the_command_and_shows_defaults(capsys, command):
    text = _help_text(capsys, command)
    usage, description = text.split("\n\n")[:2]
    assert usage.startswith(f"usage: elastic_cuda {command}")
    first_words = {"demo": "Show what routing buys on SmolLM2-135M-Instruct", "train-router": "Train attention routers",
                   "eval": "Evaluate routing policies"}[command]
    assert description.startswith(first_words), description
    # no developer notes in what a user reads first (the old train-router help opened with a budget estimate)
    for dev_text in ("Budget estimate", "Defaults are sized", "until the lead", "register(", "docs/"):
        assert dev_text not in text
    options = text.split("\noptions:\n", 1)[1]
    for action in _subparser(command)._actions:
        if action.dest == "help":
            continue
        assert action.help and len(action.help) > 10, f"{command} {action.option_strings} has no help"
        flag = action.option_strings[0]
        entry = ("\n" + options).split(f"\n  {flag}", 1)[1].split("\n  --", 1)[0]  # this option's own block
        if action.default not in (None, False):
            assert "default" in entry, f"{command} {flag}: default {action.default!r} not shown"


def test_top_level_help_lists_every_command(capsys):
    from elastic_cuda.cli import main

    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    assert "Elastic Attention" in text and all(c in text for c in COMMANDS)


def _fails_in_one_line(capsys, argv, pattern):
    """The command exits with code 2 and its stderr ends in one 'elastic_cuda <command>: error: ...' line
    matching `pattern`; no traceback."""
    from elastic_cuda.cli import main

    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"elastic_cuda {argv[0]}: error: ") and re.search(pattern, last), last
    return last


@pytest.fixture
def no_model_run(monkeypatch):
    """The commands' bodies fail the test if reached: argument errors must come before any model loads."""
    import elastic_cuda.demo
    import elastic_cuda.training.evaluate
    import elastic_cuda.training.trainer

    for module, name in ((elastic_cuda.demo, "run_demo"), (elastic_cuda.training.trainer, "train"),
                         (elastic_cuda.training.evaluate, "evaluate")):
        monkeypatch.setattr(module, name, lambda *a, **k: pytest.fail("the command ran despite a bad argument"))


def test_demo_prompt_file_errors_before_the_model_loads(tmp_path, capsys, no_model_run):
    missing = str(tmp_path / "nope.txt")
    _fails_in_one_line(capsys, ["demo", "--prompt-file", missing], re.escape(missing) + ": no such file")
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n\t\n")
    _fails_in_one_line(capsys, ["demo", "--prompt-file", str(empty)], "the file is empty")
    _fails_in_one_line(capsys, ["demo", "--prompt-file", str(tmp_path)], "not a regular file")
    binary = tmp_path / "binary.txt"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    _fails_in_one_line(capsys, ["demo", "--prompt-file", str(binary)], "not UTF-8 text")


def test_demo_prompt_file_reaches_the_demo(tmp_path, monkeypatch):
    import elastic_cuda.demo
    from elastic_cuda.cli import main

    seen = {}
    monkeypatch.setattr(elastic_cuda.demo, "run_demo", lambda args: seen.setdefault("args", args))
    good = tmp_path / "q.txt"
    good.write_text("What is the capital of France?")
    assert main(["demo", "--prompt-file", str(good)]) == 0
    assert seen["args"].prompt_file == str(good)


def test_demo_prompt_file_help_says_what_is_sent(capsys):
    text = " ".join(_help_text(capsys, "demo").split())
    assert "used as the user message" not in text
    assert "chat template" in text and "system message" in text


@pytest.mark.parametrize("command,flag", [("demo", "--routers"), ("eval", "--routers"),
                                          ("train-router", "--init-routers")])
def test_bad_router_directory_is_one_line(tmp_path, capsys, no_model_run, command, flag):
    missing = str(tmp_path / "no_routers")
    _fails_in_one_line(capsys, [command, flag, missing], "no such directory")
    _saved_routers(tmp_path)
    (tmp_path / CONFIG_FILE).write_text("[1, 2]")
    _fails_in_one_line(capsys, [command, flag, str(tmp_path)],
                       re.escape(str(tmp_path / CONFIG_FILE)) + " must hold a JSON object")


@pytest.mark.parametrize("argv,pattern", [
    (["demo", "--max-new-tokens", "0"], r"--max-new-tokens: must be >= 1"),
    (["demo", "--context-tokens", "50"], r"--length/--context-tokens: must be >= 256"),
    (["demo", "--threads", "0"], r"--threads: must be >= 1"),
    (["demo", "--sink", "-1"], r"--sink: must be >= 0"),
    (["demo", "--sparsity-shift", "nan"], r"--sparsity-shift: must be a finite number"),
    (["demo", "--device", "tpu"], r"--device: expected cpu, cuda or cuda:N"),
    (["train-router", "--steps", "0"], r"--steps: must be >= 1"),
    (["train-router", "--t-sen", "1.5"], r"--t-sen: must be in \[0, 1\]"),
    (["train-router", "--lengths", "64"], r"--lengths must be >= 128"),
    (["train-router", "--router-lr", "-1"], r"--router-lr: must be > 0"),
    (["eval", "--policies", "dense,magic"], r"--policies: must be a comma-separated subset"),
    (["eval", "--report-from", "/nonexistent/eval_results.json"], r"--report-from: .* no such file"),
    (["eval", "--samples-per-task", "x"], r"--samples-per-task: expected an integer"),
])
def test_bad_options_are_one_line(capsys, no_model_run, argv, pattern):
    _fails_in_one_line(capsys, argv, pattern)


def test_no_gpu_device_is_one_line(capsys, no_model_run):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    _fails_in_one_line(capsys, ["demo", "--device", "cuda"], r"--device: cuda: no CUDA GPU is available")
    _fails_in_one_line(capsys, ["train-router", "--device", "cuda:0"], r"no CUDA GPU is available")


def test_resume_of_a_pickle_checkpoint_is_one_line(tmp_path, capsys, no_model_run):
    (tmp_path / "state.pt").write_bytes(b"not read")
    _fails_in_one_line(capsys, ["train-router", "--resume", str(tmp_path)], r"old pickle checkpoint format")
    _fails_in_one_line(capsys, ["train-router", "--resume", str(tmp_path / "x")], r"not a checkpoint directory")


def test_errors_found_after_parsing_are_one_line(capsys, monkeypatch):
    """A ValueError from the command itself (e.g. routers that do not fit the model) ends in one line, exit 2."""
    import elastic_cuda.demo

    def fail(args):
        raise ValueError("RouterSet does not match this model (num_layers: routers 2 vs model 30)\nsecond line")

    monkeypatch.setattr(elastic_cuda.demo, "run_demo", fail)
    last = _fails_in_one_line(capsys, ["demo"], r"does not match this model .* second line$")
    assert "\n" not in last


def test_cli_error_end_to_end_exit_code_and_no_traceback(tmp_path):
    """The real entry point (a subprocess, as a user runs it): exit code 2, one error line, no traceback."""
    import subprocess
    import sys

    missing = str(tmp_path / "missing.txt")
    proc = subprocess.run([sys.executable, "-m", "elastic_cuda", "demo", "--prompt-file", missing], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and proc.stdout == ""
    assert proc.stderr.strip().splitlines()[-1] == \
        f"elastic_cuda demo: error: argument --prompt-file: {missing}: no such file"


# ----------------------------------------------------------------------------- build feedback
def _load_build_progress():
    import importlib.util

    spec = importlib.util.spec_from_file_location("build_progress", os.path.join(ROOT, "scripts", "build_progress.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _fake_build_log(n_files: int, indent: str = "") -> list[str]:
    """A build log as `pip install -v` gives it: what setup.py and ninja print comes indented by `indent`, and the
    plan line twice (pip loads setup.py for the metadata, then for the build)."""
    plan = (f"{indent}elastic_cuda: building CUDA + CPU kernels (CUDA toolkit at /usr/local/cuda; "
            "TORCH_CUDA_ARCH_LIST=8.0;9.0a; cutlass=yes): 7 C++ and 13 CUDA files, MAX_JOBS=2")
    lines = ["Obtaining file:///repo", plan, "  Running command python setup.py develop", plan]
    for i in range(1, n_files + 1):
        src = f"/repo/csrc/attention/file{i}.cu"
        lines.append(f"{indent}[{i}/{n_files}] /usr/local/cuda/bin/nvcc --generate-dependencies-with-compile -c {src} "
                     f"-o /repo/build/file{i}.o -O3 --use_fast_math")
        lines.append(f"{indent}/repo/csrc/attention/file{i}.cu(12): warning #177-D: variable declared but never used")
    return lines + ["Successfully installed elastic_cuda-0.1.0"]


@pytest.mark.parametrize("indent", ["", "  "], ids=["plain", "pip-indented"])
@pytest.mark.parametrize("n_files", [1, 2, 6, 20, 137])
def test_build_progress_is_short_and_follows_ninja(n_files, indent):
    bp = _load_build_progress()
    now = [0.0]
    progress = bp.Progress(clock=lambda: now[0])
    printed = []
    for line in _fake_build_log(n_files, indent):
        now[0] += 7.0
        printed += progress.feed(line)
    assert printed[0].startswith("elastic_cuda: building CUDA + CPU kernels") and "TORCH_CUDA_ARCH_LIST" in printed[0]
    assert sum(s.startswith("elastic_cuda: building") for s in printed) == 1  # the plan once
    steps = printed[1:]
    assert 1 <= len(steps) <= 12, steps  # short, whatever the number of files
    assert steps[-1].startswith(f"elastic_cuda: compiled {n_files}/{n_files} (file{n_files}.cu)"), steps[-1]
    assert steps[0].startswith(f"elastic_cuda: compiled 1/{n_files} (file1.cu)")
    done = [int(re.match(r"elastic_cuda: compiled (\d+)/", s).group(1)) for s in steps]
    assert done == sorted(done) and len(set(done)) == len(done)
    assert all(len(s) < 100 for s in steps) and "warning" not in " ".join(printed)
    # time counts from the plan line (7 s per log line, two lines per file): 7 s to the first file
    assert steps[0].endswith(", 7s so far") and steps[-1].endswith(f", {bp._duration(7.0 * (2 * n_files - 1))} so far")


def test_build_progress_copies_everything_to_the_log(tmp_path):
    import subprocess
    import sys

    text = "\n".join(_fake_build_log(3, indent="  ")) + "\n"
    log = tmp_path / "build.log"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "build_progress.py"), str(log)], input=text,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and log.read_text() == text
    out = proc.stdout.splitlines()
    assert out[0].startswith("elastic_cuda: building") and [s.split(" (")[0] for s in out[1:]] == \
        [f"elastic_cuda: compiled {i}/3" for i in (1, 2, 3)]


def test_setup_says_what_it_builds_before_compiling():
    """setup.py prints its plan when it is loaded, i.e. before any compiling (here `--name` builds nothing)."""
    import subprocess
    import sys

    env = dict(os.environ, ELASTIC_CUDA_CPU_ONLY="1", MAX_JOBS="3")
    proc = subprocess.run([sys.executable, "setup.py", "--name"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    n_cpp = len([f for f in _glob_sources("cpp")])
    assert (f"elastic_cuda: building CPU-only kernels, no CUDA kernels (ELASTIC_CUDA_CPU_ONLY=1): {n_cpp} C++ files, "
            "MAX_JOBS=3") in proc.stderr


def _glob_sources(ext):
    import glob

    return glob.glob(os.path.join(ROOT, "csrc", "**", f"*.{ext}"), recursive=True)


def test_install_script_says_where_the_log_goes_first_and_two_facts_last(tmp_path):
    """install.sh: the log's path is printed before the build runs, progress comes from build_progress.py, and the
    end reports 'CUDA kernels compiled' and 'GPU present' as two lines (run here against this checkout)."""
    import subprocess
    import sys

    script = open(os.path.join(ROOT, "scripts", "install.sh")).read()
    assert script.index("full log: $BUILD_LOG") < script.index("pip install -v")
    assert "build_progress.py" in script
    facts = script.split("\"$PY\" - <<'PYEOF'\n", 1)[1].split("\nPYEOF", 1)[0]
    proc = subprocess.run([sys.executable, "-c", facts], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    compiled = next(s for s in lines if s.strip().startswith("CUDA kernels compiled:"))
    gpu = next(s for s in lines if s.strip().startswith("GPU present:"))
    assert compiled.strip().endswith("yes" if elastic_cuda.has_cuda_kernels() else "no (CPU-only build)")
    assert gpu.strip().startswith("GPU present: yes" if torch.cuda.is_available() else "GPU present: no")
    assert "CUDA kernels: True" not in proc.stdout


def test_readme_tells_about_the_model_cache_and_the_build_log():
    text = " ".join(open(os.path.join(ROOT, "README.md")).read().split())
    assert "~/.cache/elastic_cuda" in text and "517 MB" in text and "ELASTIC_CUDA_CACHE=off" in text
    assert "rm -rf ~/.cache/elastic_cuda" in text
    assert "/tmp/elastic_cuda_build.log" in text
