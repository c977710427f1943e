"""Long-context samples for router training and evaluation, built from offline text (no download).

Text sources (all read from the local Python install; details and determinism notes in ``corpus.py``):
  * the standard library's Python sources (``sysconfig.get_paths()["stdlib"]``),
  * their module/class/function docstrings (parsed with ``ast``),
  * the language-reference topics of ``pydoc_data/topics.py``,
  * license texts shipped in ``site-packages/*.dist-info``.
``TaskDataset.manifest()`` / ``write_manifest`` list every document used, with the Python version.

Tasks (the category label is used only by the training loss, never at inference):
  sparsity-SENSITIVE (need tokens far from the end, which streaming attention drops):
    ``passkey``            a pass key planted once in filler; answer the number.
    ``kv_retrieval``       2-4 "value for key <adj-noun> is <number>" records; answer one key's value.
    ``variable_tracking``  a chain VAR A = 12345 ... VAR B = A ... VAR C = B (+ a distractor chain); value of C.
    ``fact_qa``            "Important fact: <person>'s <object> is kept in the city of <city>." planted once;
                           answer the city.
  sparsity-ROBUST (the answer depends on the last few hundred tokens only):
    ``code_continuation``  stdlib code; answer the next lines (~48 tokens).
    ``prose_continuation`` docs/licence prose; answer the next lines.
    ``docstring_summary``  code filler, then a function whose docstring lost its first line; answer that line.
    ``copy_local``         any filler; answer = the last line of the text, copied.
Needles of sensitive tasks are placed at filler token positions in [sink + 16, F - local_window - 32), F = filler
length (``DataConfig.local_window``, default 512 = the streaming window), so with sink 64 / window 512 they lie
outside what a streaming head sees from the question: the tasks are sensitive by construction, not by luck. When F
is too short for that zone (prompts under ~700 tokens) the zone falls back to [10%, 50%) of the filler.
The partial first line: the filler starts with the tail of a reserved stretch of text cut to the exact token
count still missing, so lengths are token-exact up to tokenizer merges at the seams.

Sample: chat prompt rendered with the tokenizer's own chat template (one user turn: instruction, context,
question; ``add_generation_prompt=True``), then the assistant answer with the template's end-of-turn text.
``input_ids`` = prompt ids + answer ids; ``loss_mask[i] = 1`` if token i is a prediction target.

Loss mask decision: ``loss_on="answer"`` by default (the paper's code uses all tokens). Our contexts are
concatenations of unrelated real texts, so almost every context token is predictable from local context,
and the far-context dependencies the router must protect are concentrated in the answer tokens (a pass key is
~3 tokens of an 8K sequence). With an all-token loss that signal is diluted ~1000x and a few-minute run cannot
see it; the paper could afford it with 0.74B tokens of real SFT data whose documents do carry long-range
dependencies. ``loss_on="all"`` reproduces the paper's choice.

Length: ``target_tokens`` (1K-8K for real use; >= 128, and enough for the task's fixed text, else ValueError)
counts prompt + answer tokens.
Filler is added line by line, re-rendered and corrected until the length lies in
[target - tol, target], tol = max(16, 3% of target); the final length is ``len(input_ids)``.

Determinism: each sample is a pure function of (seed, split, index) (or of an explicit key), through
``random.Random(<string>)`` (seeded from a SHA-512 of the string, independent of PYTHONHASHSEED), plus the
sorted document lists. Held-out data: split="eval" uses a disjoint set of source documents (hash of the document
name, so the split is the same on every machine) and its own seed stream.
"""
from __future__ import annotations

import ast
import json
import random
import sys
import textwrap
from dataclasses import asdict, dataclass, field

from ..attention.sparse_config import DEFAULT as SPARSE_DEFAULT
from .corpus import TextCorpus

SENSITIVE_TASKS = ("passkey", "kv_retrieval", "variable_tracking", "fact_qa")
ROBUST_TASKS = ("code_continuation", "prose_continuation", "docstring_summary", "copy_local")
TASKS = SENSITIVE_TASKS + ROBUST_TASKS
TASK_CATEGORY = {**{t: "sensitive" for t in SENSITIVE_TASKS}, **{t: "robust" for t in ROBUST_TASKS}}

_ADJECTIVES = ("amber", "brisk", "cobalt", "dusty", "eager", "frosty", "gentle", "hollow", "ivory", "jolly",
               "keen", "lunar", "misty", "noble", "olive", "proud", "quiet", "rapid", "silver", "tidal")
_NOUNS = ("falcon", "harbor", "lantern", "meadow", "needle", "orchard", "pebble", "quarry", "river", "saddle",
          "thistle", "valley", "willow", "anchor", "beacon", "canyon", "dagger", "ember", "glacier", "kettle")
_PEOPLE = ("Alice", "Bruno", "Chiara", "Dmitri", "Elena", "Farid", "Greta", "Hiro", "Ingrid", "Jonas", "Kavya",
           "Lorenzo", "Mei", "Nadia", "Oscar", "Priya", "Quentin", "Rosa", "Sven", "Tariq")
_OBJECTS = ("violin", "telescope", "bicycle", "passport", "umbrella", "chessboard", "typewriter", "compass",
            "notebook", "camera")
_CITIES = ("Lisbon", "Oslo", "Nairobi", "Kyoto", "Valparaiso", "Tbilisi", "Quebec", "Hanoi", "Bergen", "Cusco",
           "Tallinn", "Marrakesh", "Adelaide", "Reykjavik", "Bologna")
_MAX_LINE_CHARS = 400


@dataclass
class Sample:
    task: str
    category: str
    target_tokens: int
    input_ids: list[int]
    loss_mask: list[int]
    prompt_len: int
    answer: str
    meta: dict = field(default_factory=dict)

    @property
    def num_tokens(self) -> int:
        return len(self.input_ids)

    @property
    def prompt_ids(self) -> list[int]:
        return self.input_ids[: self.prompt_len]


@dataclass(frozen=True)
class DataConfig:
    lengths: tuple[int, ...] = (1024, 2048, 4096, 8192)
    tasks: tuple[str, ...] = TASKS
    loss_on: str = "answer"          # "answer" | "all" (see module docstring)
    local_window: int = SPARSE_DEFAULT.window  # needles stay out of the last local_window tokens
    sink: int = SPARSE_DEFAULT.sink            # ... and out of the first sink tokens
    answer_tokens: int = 48          # length of continuation answers
    eval_fraction: float = 0.2       # fraction of source documents held out for split="eval"

    def __post_init__(self):
        if self.loss_on not in ("answer", "all"):
            raise ValueError(f"loss_on must be 'answer' or 'all', got {self.loss_on!r}")
        bad = [t for t in self.tasks if t not in TASK_CATEGORY]
        if bad or not self.tasks:
            raise ValueError(f"tasks must be a non-empty subset of {TASKS}, got {self.tasks!r}")
        if not self.lengths or min(self.lengths) < 128:
            raise ValueError(f"lengths must be non-empty and each >= 128 tokens, got {self.lengths!r}")


def _lines_of(text: str) -> list[str]:
    out = []
    for line in text.split("\n"):
        line = line.rstrip()
        while len(line) > _MAX_LINE_CHARS:  # wrap very long lines so one line is never a large token jump
            cut = line.rfind(" ", 0, _MAX_LINE_CHARS)
            cut = cut if cut > 0 else _MAX_LINE_CHARS
            out.append(line[:cut])
            line = line[cut:].lstrip()
        out.append(line)
    return out


class TaskDataset:
    """Deterministic samples of one split: ``ds[i]`` cycles through the tasks, length drawn by seed."""

    def __init__(self, tokenizer, split: str = "train", seed: int = 0, config: DataConfig | None = None,
                 corpus: TextCorpus | None = None):
        self.tokenizer, self.split, self.seed = tokenizer, split, seed
        self.config = config or DataConfig()
        self.corpus = corpus or TextCorpus(split=split, eval_fraction=self.config.eval_fraction)
        if self.corpus.split != split:
            raise ValueError(f"corpus split {self.corpus.split!r} != split {split!r}")
        if getattr(tokenizer, "chat_template", None) is None:
            raise ValueError("tokenizer must have a chat template (tokenizer.chat_template is None)")
        self._newline = len(self._encode("\n")) or 1

    # -- public -----------------------------------------------------------------------------------------
    def task_of(self, index: int) -> str:
        """The task of ds[index] without building the sample (tasks cycle with the index)."""
        return self.config.tasks[index % len(self.config.tasks)]

    def __getitem__(self, index: int) -> Sample:
        if index < 0:
            raise ValueError(f"index must be >= 0, got {index}")
        rng = random.Random(f"{self.seed}:{self.split}:length:{index}")
        target = rng.choice(self.config.lengths)
        return self.sample(self.task_of(index), target, key=f"{self.seed}:{self.split}:{index}")

    def sample(self, task: str, target_tokens: int, key: str) -> Sample:
        """The sample of `task` at `target_tokens` determined by the string `key`."""
        if task not in TASK_CATEGORY:
            raise ValueError(f"task must be one of {TASKS}, got {task!r}")
        if target_tokens < 128:
            raise ValueError(f"target_tokens must be >= 128, got {target_tokens}")
        rng = random.Random(f"{key}:{task}:{target_tokens}")
        builder = getattr(self, "_task_" + task)
        return builder(rng, target_tokens)

    def eval_samples(self, lengths, samples_per_task: int, tasks=None) -> list[Sample]:
        """A fixed grid: every task x length x j < samples_per_task."""
        return [self.sample(t, n, key=f"grid:{self.seed}:{self.split}:{j}")
                for n in lengths for t in (tasks or self.config.tasks) for j in range(samples_per_task)]

    def manifest(self) -> dict:
        return {"python": sys.version.split()[0], "seed": self.seed, "config": asdict(self.config),
                "task_category": TASK_CATEGORY, "corpus": self.corpus.manifest()}

    def write_manifest(self, path: str) -> None:
        with open(path, "w") as f:
            json.dump(self.manifest(), f, indent=1)

    # -- helpers ----------------------------------------------------------------------------------------
    def _encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def _line_stream(self, rng: random.Random, kind: str):
        """Endless (line, doc name) stream: random documents of `kind`, each from a random line on."""
        names = self.corpus.code_docs if kind == "code" else self.corpus.prose_names()
        misses = 0
        while True:
            name = rng.choice(names)
            lines = _lines_of(self.corpus.text(name))
            if len(lines) < 8:
                misses += 1
                if misses > 1000:
                    raise ValueError(f"the {kind} documents of split {self.split!r} are (nearly) all empty")
                continue
            for line in lines[rng.randrange(len(lines) // 2):]:
                yield line, name

    def _encode_many(self, texts: list[str]) -> list[list[int]]:
        if callable(self.tokenizer) and not isinstance(self.tokenizer, type):
            try:  # HF fast tokenizers encode a batch in Rust, much faster than a Python loop
                return [list(x) for x in self.tokenizer(texts, add_special_tokens=False)["input_ids"]]
            except (TypeError, KeyError):
                pass
        return [self._encode(t) for t in texts]

    def _collect(self, rng: random.Random, kind: str, tokens: int) -> list[tuple[str, int, str]]:
        """(line, token count incl. newline, doc) until the counts reach `tokens`."""
        out, total, chunk = [], 0, []
        for line, name in self._line_stream(rng, kind):
            chunk.append((line, name))
            if len(chunk) < 128:
                continue
            for (text, doc), ids in zip(chunk, self._encode_many([c[0] for c in chunk])):
                n = len(ids) + self._newline
                out.append((text, n, doc))
                total += n
                if total >= tokens:
                    return out
            chunk = []

    @staticmethod
    def _supply(target: int) -> int:
        # per-line counts overestimate (BPE merges across newlines), so collect a generous margin
        return int(1.5 * target) + 256

    def _split_pad(self, lines):
        """Reserve the first 8 collected lines as the source of a partial leading line (token-exact lengths)."""
        return "\n".join(line for line, _, _ in lines[:8]), lines[8:]

    def _pad(self, source: str, tokens: int) -> str:
        """The last `tokens` tokens of `source` (whole source if shorter), '' if tokens <= 0."""
        if tokens <= 0:
            return ""
        ids = self._encode(source)
        return self.tokenizer.decode(ids[-tokens:]) if tokens < len(ids) else source

    def _with_pad(self, pad_source: str, lines_text: list[str], used: int, budget: int) -> tuple[str, int]:
        pad = self._pad(pad_source, budget - used - self._newline)
        body = ([pad] if pad else []) + lines_text
        return "\n".join(body), len(self._encode(pad)) + self._newline if pad else 0

    @staticmethod
    def _prefix(lines, budget: int) -> int:
        """How many leading lines fit in `budget` tokens."""
        used = 0
        for i, (_, n, _) in enumerate(lines):
            if used + n > budget:
                return i
            used += n
        return len(lines)

    def _render(self, user: str, answer: str) -> tuple[list[int], list[int]]:
        messages = [{"role": "user", "content": user}]
        prompt = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        full = self.tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": answer}],
                                                  tokenize=False)
        tail = full[len(prompt):] if full.startswith(prompt) else answer + (self.tokenizer.eos_token or "")
        return self._encode(prompt), self._encode(tail)

    def _fit(self, task: str, target: int, make) -> Sample:
        """Call make(budget) -> (user text, answer, meta) with a filler budget corrected until the rendered
        sample has target - tol <= len <= target tokens (tol = max(16, 3%))."""
        tol = max(16, int(0.03 * target))
        budget, best = target, None
        for _ in range(6):
            user, answer, meta = make(max(budget, 0))
            prompt_ids, answer_ids = self._render(user, answer)
            n = len(prompt_ids) + len(answer_ids)
            if best is None or (n <= target, -abs(target - tol // 2 - n)) > best[0]:
                best = ((n <= target, -abs(target - tol // 2 - n)), prompt_ids, answer_ids, answer, meta)
            if target - tol <= n <= target:
                break
            budget += target - tol // 2 - n
        _, prompt_ids, answer_ids, answer, meta = best
        if len(prompt_ids) + len(answer_ids) > target + tol:
            raise ValueError(f"target_tokens={target} is too short for task {task!r}: its fixed text alone takes "
                             f"{len(prompt_ids) + len(answer_ids)} tokens with this tokenizer")
        ids = prompt_ids + answer_ids
        if self.config.loss_on == "answer":
            mask = [0] * len(prompt_ids) + [1] * len(answer_ids)
        else:
            mask = [0] + [1] * (len(ids) - 1)
        return Sample(task, TASK_CATEGORY[task], target, ids, mask, len(prompt_ids), answer, meta)

    def _needle_task(self, rng, target, task, header, needles, question, answer, meta):
        """Filler with needle sentences at sorted depths inside the sensitive zone (see module docstring)."""
        kind = rng.choice(("prose", "code"))
        lines = self._collect(rng, kind, self._supply(target))
        fixed = len(self._encode(header + question + answer)) + sum(len(self._encode(s)) + 2 for s in needles)
        lo = self.config.sink + 16
        depths = sorted(rng.random() for _ in needles)

        pad_source, lines = self._split_pad(lines)

        def make(budget):
            k = self._prefix(lines, max(budget - fixed, 1))
            used = sum(n for _, n, _ in lines[:k])
            pad = self._pad(pad_source, budget - fixed - used - self._newline)
            pad_tokens = len(self._encode(pad)) + self._newline if pad else 0
            filler_tokens = used + pad_tokens
            hi = filler_tokens - self.config.local_window - 32  # the question after the filler only adds distance
            if hi - lo >= 32:
                positions = [lo + d * (hi - lo) for d in depths]
            else:
                positions = [filler_tokens * (0.1 + 0.4 * d) for d in depths]
            body, pos, j, placed = ([pad] if pad else []), pad_tokens, 0, []
            for line, n, _ in lines[:k]:
                while j < len(needles) and pos >= positions[j]:
                    body.append(needles[j])
                    placed.append(pos)
                    j += 1
                body.append(line)
                pos += n
            for s in needles[j:]:
                body.append(s)
                placed.append(pos)
            docs = sorted({d for _, _, d in lines[:k]})
            return header + "\n".join(body) + question, answer, {
                **meta, "filler": kind, "needle_token_positions": placed, "filler_tokens": filler_tokens,
                "docs": docs}

        return self._fit(task, target, make)

    # -- sparsity-sensitive tasks -----------------------------------------------------------------------
    def _task_passkey(self, rng, target):
        key = str(rng.randrange(10_000, 10_000_000))
        needle = f"The pass key is {key}. Remember it. {key} is the pass key."
        return self._needle_task(rng, target, "passkey",
                                 "A pass key is hidden inside the following text. Find it and remember it.\n\n",
                                 [needle], "\n\nWhat is the pass key? Answer with the number only.", key, {})

    def _task_kv_retrieval(self, rng, target):
        n = rng.randint(2, 4)  # with 3-6 records SmolLM2-135M (dense) missed 2/2 in a 1K check; 2-4: 2/3 right
        keys = rng.sample([f"{a}-{b}" for a in _ADJECTIVES for b in _NOUNS], n)
        values = [str(v) for v in rng.sample(range(100_000, 1_000_000), n)]
        records = [f'The value for the key "{k}" is {v}.' for k, v in zip(keys, values)]
        pick = rng.randrange(n)
        question = f'\n\nWhat is the value for the key "{keys[pick]}"? Answer with the number only.'
        return self._needle_task(rng, target, "kv_retrieval",
                                 "The text below contains several key-value records. Remember them.\n\n",
                                 records, question, values[pick], {"num_records": n})

    def _task_variable_tracking(self, rng, target):
        hops = rng.randint(2, 4)
        names = ["".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(5)) for _ in range(hops + 3)]
        value, distractor = (str(v) for v in rng.sample(range(10_000, 100_000), 2))
        chain = [f"VAR {names[0]} = {value}."] + [f"VAR {names[i]} = {names[i - 1]}." for i in range(1, hops + 1)]
        decoy = [f"VAR {names[hops + 1]} = {distractor}.", f"VAR {names[hops + 2]} = {names[hops + 1]}."]
        slots = sorted(rng.sample(range(len(chain) + len(decoy)), len(chain)))  # chain keeps its order
        needles, ci, di = [], 0, 0
        for s in range(len(chain) + len(decoy)):
            if s in slots:
                needles.append(chain[ci])
                ci += 1
            else:
                needles.append(decoy[di])
                di += 1
        question = (f"\n\nFollow the VAR assignments in the text. What is the value of {names[hops]}? "
                    "Answer with the number only.")
        return self._needle_task(rng, target, "variable_tracking",
                                 "The text below contains VAR assignments. Keep track of them.\n\n",
                                 needles, question, value, {"hops": hops})

    def _task_fact_qa(self, rng, target):
        # One planted fact, no distractor: with two distractor facts SmolLM2-135M (dense) answered a distractor's
        # city in 3/3 samples of a 1K check, which would make the task measure the model, not the routing.
        person, obj, city = rng.choice(_PEOPLE), rng.choice(_OBJECTS), rng.choice(_CITIES)
        fact = f"Important fact: {person}'s {obj} is kept in the city of {city}."
        question = (f"\n\nAccording to the important fact in the text, in which city is {person}'s {obj} kept? "
                    "Answer with the city name only.")
        return self._needle_task(rng, target, "fact_qa",
                                 "Read the text below. It mentions where an object is kept.\n\n",
                                 [fact], question, city, {})

    # -- sparsity-robust tasks --------------------------------------------------------------------------
    def _continuation(self, rng, target, task, kind, header):
        lines = self._collect(rng, kind, self._supply(target) + 4 * self.config.answer_tokens)
        question_free = len(self._encode(header))
        pad_source, lines = self._split_pad(lines)

        def make(budget):
            filler_budget = budget - question_free - self.config.answer_tokens
            k = max(1, min(len(lines) - 16, self._prefix(lines, filler_budget)))
            while k < len(lines) - 1 and not lines[k][0].strip():  # the answer starts on a non-empty line
                k += 1
            answer_lines, used = [], 0
            for line, n, _ in lines[k:]:
                if answer_lines and used + n > self.config.answer_tokens:
                    break
                answer_lines.append(line)
                used += n
            answer = "\n".join(answer_lines).strip("\n")
            ids = self._encode(answer)
            if len(ids) > 2 * self.config.answer_tokens:  # one very long line: cut it by tokens
                answer = self.tokenizer.decode(ids[: self.config.answer_tokens])
                ids = self._encode(answer)
            # The pad absorbs the answer's actual length: otherwise a shorter answer leaves the sample short, and
            # moving k to compensate changes the answer again (the fit could oscillate below target - tol).
            context, _ = self._with_pad(pad_source, [line for line, _, _ in lines[:k]],
                                        sum(n for _, n, _ in lines[:k]), budget - question_free - len(ids))
            return header + context + "\n", answer, {"filler": kind, "docs": sorted({d for _, _, d in lines[:k]})}

        return self._fit(task, target, make)

    def _task_code_continuation(self, rng, target):
        return self._continuation(rng, target, "code_continuation", "code",
                                  "Continue the following Python code. Reply with the next lines only.\n\n")

    def _task_prose_continuation(self, rng, target):
        return self._continuation(rng, target, "prose_continuation", "prose",
                                  "Continue the following text. Reply with the next lines only.\n\n")

    def _docstring_target(self, rng, max_tokens: int):
        """(where, name, function source without its docstring's first line, that line) from a random code file;
        the function takes at most `max_tokens` tokens."""
        for _ in range(300):
            name = rng.choice(self.corpus.code_docs)
            source = self.corpus.text(name)
            try:
                tree = ast.parse(source)
            except (SyntaxError, ValueError):
                continue
            src_lines = source.split("\n")
            found = []
            for node in ast.walk(tree):
                if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                    continue
                doc = ast.get_docstring(node)
                if not doc or len(doc.strip().splitlines()) < 3 or node.end_lineno - node.lineno > 40:
                    continue
                summary = doc.strip().splitlines()[0].strip()
                if 20 <= len(summary) <= 150:
                    found.append((node, summary))
            rng.shuffle(found)
            for node, summary in found[:8]:
                seg = src_lines[node.lineno - 1: node.end_lineno]
                doc_node = node.body[0]
                for i in range(doc_node.lineno - node.lineno, min(doc_node.end_lineno - node.lineno + 1, len(seg))):
                    if summary in seg[i]:
                        stripped = seg[i].replace(summary, "", 1)
                        if stripped.strip():
                            seg[i] = stripped.rstrip()
                        else:
                            del seg[i]
                        func = textwrap.dedent("\n".join(seg))
                        if len(self._encode(func)) <= max_tokens:
                            return f"{name}:{node.name}", node.name, func, summary
                        break
        raise ValueError(f"no function with a multi-line docstring of <= {max_tokens} tokens found in split "
                         f"{self.split!r}")

    def _task_docstring_summary(self, rng, target):
        where, fname, func, summary = self._docstring_target(rng, max(96, target // 4))
        lines = self._collect(rng, "code", self._supply(target))
        header = "Read the following Python code.\n\n"
        question = (f"\n\nThe first line of the docstring of `{fname}` (the last definition above) was removed. "
                    "Write that one-line summary.")
        fixed = len(self._encode(header + func + question + summary)) + 2

        pad_source, lines = self._split_pad(lines)

        def make(budget):
            k = self._prefix(lines, budget - fixed)
            context, _ = self._with_pad(pad_source, [line for line, _, _ in lines[:k]],
                                        sum(n for _, n, _ in lines[:k]), budget - fixed)
            return header + context + "\n\n" + func + question, summary, {
                "function": where, "docs": sorted({d for _, _, d in lines[:k]})}

        return self._fit("docstring_summary", target, make)

    def _task_copy_local(self, rng, target):
        kind = rng.choice(("prose", "code"))
        lines = self._collect(rng, kind, self._supply(target))
        header = "Read the following text.\n\n"
        question = "\n\nCopy the last line of the text above exactly, without changing anything."

        pad_source, lines = self._split_pad(lines)

        def make(budget):
            filler_budget = budget - len(self._encode(header + question)) - 24
            k = max(1, self._prefix(lines, filler_budget))
            while k > 1 and len(lines[k - 1][0].strip()) < 20:  # end on a line worth copying
                k -= 1
            answer = lines[k - 1][0].strip()
            context, _ = self._with_pad(pad_source, [line for line, _, _ in lines[:k]],
                                        sum(n for _, n, _ in lines[:k]), filler_budget)
            return header + context + question, answer, {"filler": kind,
                                                         "docs": sorted({d for _, _, d in lines[:k]})}

        return self._fit("copy_local", target, make)
