"""Argument types and the help formatter shared by the command-line commands (cli.py, training/commands.py).

Each type checks its value while argparse parses, so a bad option ends in argparse's one-line
"elastic_cuda <command>: error: argument --x: ..." (exit code 2) before any model is loaded.
"""
from __future__ import annotations

import argparse
import math
import os


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Descriptions keep their paragraphs; every option's help ends in its default, except where there is none to
    show (None, a flag) or the help already says what the default is."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.default is None or action.default is False or action.default == argparse.SUPPRESS \
                or "default" in text:
            return text
        return super()._get_help_string(action)


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def positive_int(text: str) -> int:
    value = _int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def nonnegative_int(text: str) -> int:
    value = _int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def finite_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


def positive_float(text: str) -> float:
    value = finite_float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text!r}")
    return value


def fraction(text: str) -> float:
    value = finite_float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {text!r}")
    return value


def text_file(path: str) -> str:
    """A readable UTF-8 text file with something in it; returns the path (the command reads it)."""
    if not os.path.exists(path):
        raise argparse.ArgumentTypeError(f"{path}: no such file")
    if not os.path.isfile(path):
        raise argparse.ArgumentTypeError(f"{path}: not a regular file")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError as e:
        raise argparse.ArgumentTypeError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise argparse.ArgumentTypeError(f"{path}: cannot read it ({e.strerror})") from None
    if not text.strip():
        raise argparse.ArgumentTypeError(f"{path}: the file is empty")
    return path


def existing_file(path: str) -> str:
    if not os.path.isfile(path):
        raise argparse.ArgumentTypeError(f"{path}: no such file")
    return path


def router_dir(path: str) -> str:
    """A directory RouterSet.load reads (config, weights, finite values); checked here on the CPU, without the
    model (whether the routers fit the model is checked when it is loaded)."""
    from .router import RouterSet

    if not os.path.isdir(path):
        raise argparse.ArgumentTypeError(f"{path}: no such directory (a router directory from train-router, e.g. "
                                         "runs/router/routers)")
    try:
        RouterSet.load(path)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return path


def device_or_auto(text: str) -> str:
    """'auto' or a device() (the training commands pick the GPU per rank themselves)."""
    return text if text == "auto" else device(text)


def device(text: str) -> str:
    """'cpu', 'cuda' or 'cuda:N' where that GPU exists."""
    import torch

    try:
        dev = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"expected cpu, cuda or cuda:N, got {text!r}") from None
    if dev.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"expected cpu, cuda or cuda:N, got {text!r}")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise argparse.ArgumentTypeError(f"{text}: no CUDA GPU is available here (use cpu)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise argparse.ArgumentTypeError(f"{text}: there are {torch.cuda.device_count()} GPUs")
    return text
