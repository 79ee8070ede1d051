"""The CORE metric (DCLM, arXiv:2406.11794) as nanochat computes it: few-shot tasks scored by likelihood.

The eval bundle is a folder: core.yaml (the task list), eval_data/<task>.jsonl (the examples) and
eval_meta_data.csv (each task's random baseline, in percent). Each example is rendered with a few
examples of the same task in front (drawn with a seed fixed per example), then:
  multiple_choice  one context, several continuations: the choice with the lowest mean loss wins;
  schema           several contexts, one continuation: the context with the lowest mean loss wins;
  language_modeling  the continuation is right only if greedy decoding reproduces every token.
A task's centered accuracy is (acc - baseline) / (1 - baseline): 0 at chance, 1 perfect; CORE is their
mean. Prompts, few-shot draws, the shuffle and the scores follow nanochat's core_eval.py and base_eval.py.
"""

from __future__ import annotations

import csv
import json
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import torch
import torch.nn.functional as F

from trainer.engine import autocast_for
from trainer.tokenizer import Tokenizer

TASK_TYPES = ("multiple_choice", "schema", "language_modeling")
FEWSHOT_SEED = 1234  # + the example's index: nanochat's draw, so the prompts are the same
SHUFFLE_SEED = 1337  # the order examples are taken in when --max-per-task subsamples


class BundleError(ValueError):
    """The eval bundle is missing or malformed: something the user fixes (another bundle)."""


@dataclass(frozen=True)
class CoreTask:
    label: str
    task_type: str
    dataset_uri: str  # relative to eval_data/
    num_fewshot: int
    continuation_delimiter: str
    random_baseline: float  # percent, as eval_meta_data.csv gives it


@dataclass
class Scored:
    """An example's token rows and where in each the scored span lies ([start, end) token positions)."""

    rows: list[list[int]]
    starts: list[int]
    ends: list[int]
    gold: int


def load_bundle(bundle_dir: Path) -> list[CoreTask]:
    """The tasks of core.yaml with their random baselines, in the file's order."""
    import yaml  # datasets and huggingface_hub depend on PyYAML already

    config_path, meta_path = bundle_dir / "core.yaml", bundle_dir / "eval_meta_data.csv"
    for path in (config_path, meta_path):
        if not path.is_file():
            raise BundleError(f"eval bundle {bundle_dir} has no {path.name}: point EVAL_BUNDLE at a folder "
                              "with core.yaml, eval_meta_data.csv and eval_data/")
    try:
        with open(meta_path, encoding="utf-8") as f:
            baselines = {row["Eval Task"]: float(row["Random baseline"]) for row in csv.DictReader(f)}
        entries = yaml.safe_load(config_path.read_text(encoding="utf-8"))["icl_tasks"]
        tasks = [_task(entry, baselines, meta_path) for entry in entries]
    except BundleError:
        raise
    except (yaml.YAMLError, UnicodeDecodeError, KeyError, IndexError, TypeError, ValueError) as exc:
        raise BundleError(f"eval bundle {bundle_dir}: core.yaml or eval_meta_data.csv is malformed "
                          f"({type(exc).__name__}: {exc}): use nanochat's eval_bundle or a copy of its "
                          "layout") from None
    return tasks


def _task(entry: dict[str, Any], baselines: dict[str, float], meta_path: Path) -> CoreTask:
    label, uri = entry["label"], entry["dataset_uri"]
    if entry["icl_task_type"] not in TASK_TYPES:
        raise BundleError(f"task {label}: unknown icl_task_type {entry['icl_task_type']!r}")
    if label not in baselines:
        raise BundleError(f"task {label} has no random baseline in {meta_path}")
    # A path inside eval_data/, never beside or above it (the bundle may come from anyone).
    if not isinstance(uri, str) or PurePosixPath(uri).is_absolute() or ".." in PurePosixPath(uri).parts:
        raise BundleError(f"task {label}: dataset_uri {uri!r} is not a path inside eval_data/")
    shots = entry["num_fewshot"][0]
    if type(shots) is not int or shots < 0:
        raise BundleError(f"task {label}: num_fewshot {shots!r} is not a count")
    return CoreTask(label=label, task_type=entry["icl_task_type"], dataset_uri=uri, num_fewshot=shots,
                    continuation_delimiter=str(entry.get("continuation_delimiter", " ")),
                    random_baseline=baselines[label])


# What each task type reads from an example: text fields, lists of texts, and `gold` (an index into them).
_EXAMPLE_FIELDS = {"multiple_choice": (("query",), "choices"),
                   "schema": (("continuation",), "context_options"),
                   "language_modeling": (("context", "continuation"), None)}


def _example_problem(task_type: str, example: Any) -> str | None:
    if not isinstance(example, dict):
        return "not a JSON object"
    texts, options = _EXAMPLE_FIELDS[task_type]
    for name in texts:
        if not isinstance(example.get(name), str):
            return f"no text {name!r}"
    if options is not None:
        choices, gold = example.get(options), example.get("gold")
        if not isinstance(choices, list) or not choices or not all(isinstance(c, str) for c in choices):
            return f"{options!r} is not a list of texts"
        if type(gold) is not int or not 0 <= gold < len(choices):
            return f"gold {gold!r} is not an index into {options!r}"
    return None


def load_examples(bundle_dir: Path, task: CoreTask, max_per_task: int = -1) -> list[dict[str, Any]]:
    """The task's examples in nanochat's shuffled order, the first max_per_task of them if > 0."""
    path = bundle_dir / "eval_data" / task.dataset_uri
    if not path.is_file():
        raise BundleError(f"task {task.label}: {path} is missing from the eval bundle")
    data = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                example = json.loads(line)
            except ValueError:
                example = None
            if problem := _example_problem(task.task_type, example):
                raise BundleError(f"task {task.label}: line {number} of {path} is malformed ({problem}): "
                                  "fix or replace the eval bundle")
            data.append(example)
    if len(data) <= task.num_fewshot:
        raise BundleError(f"task {task.label}: {len(data)} examples in {path}, too few for "
                          f"{task.num_fewshot}-shot prompts")
    random.Random(SHUFFLE_SEED).shuffle(data)
    return data[:max_per_task] if max_per_task > 0 else data


def centered(accuracy: float, random_baseline_percent: float) -> float:
    """Accuracy rescaled so that chance is 0 and perfect is 1."""
    baseline = 0.01 * random_baseline_percent
    return (accuracy - baseline) / (1.0 - baseline)


# ---------------------------------------------------------------------------------------------------
# Prompts: the text of nanochat's Jinja templates, as plain strings


def render_multiple_choice(item: dict, delimiter: str, fewshot: list[dict]) -> list[str]:
    shots = "".join(f"{ex['query']}{delimiter}{ex['choices'][ex['gold']]}\n\n" for ex in fewshot)
    return [f"{shots}{item['query']}{delimiter}{choice}" for choice in item["choices"]]


def render_schema(item: dict, delimiter: str, fewshot: list[dict]) -> list[str]:
    shots = "".join(f"{ex['context_options'][ex['gold']]}{delimiter}{ex['continuation']}\n\n"
                    for ex in fewshot)
    return [f"{shots}{context}{delimiter}{item['continuation']}" for context in item["context_options"]]


def render_language_modeling(item: dict, delimiter: str, fewshot: list[dict]) -> list[str]:
    """[prompt without the continuation, prompt with it]; contexts are trimmed (some end in spaces)."""
    shots = "".join(f"{ex['context'].strip()}{delimiter}{ex['continuation']}\n\n" for ex in fewshot)
    without = f"{shots}{item['context'].strip()}{delimiter}"
    # Stripped so that a trailing space, which the tokenizer would fuse with the continuation's first
    # word, does not stop `without` from being a token prefix of `with`.
    return [without.strip(), without + item["continuation"]]


def common_length(rows: list[list[int]], from_end: bool = False) -> int:
    """Length of the prefix (or suffix) all rows share."""
    n = 0
    for column in zip(*(reversed(r) if from_end else r for r in rows), strict=False):  # to the shortest
        if any(token != column[0] for token in column):
            break
        n += 1
    return n


def prepare(task: CoreTask, data: list[dict], index: int, tokenizer: Tokenizer, max_len: int) -> Scored:
    """Render and tokenize example `index` with its few-shot examples; rows longer than max_len keep
    their last max_len tokens (the scored span is at the end)."""
    item = data[index]
    fewshot: list[dict] = []
    if task.num_fewshot > 0:
        # nanochat samples from the list of the other indices; sampling positions in range(n - 1) and
        # skipping over `index` draws the same examples without building that list for every example.
        picks = random.Random(FEWSHOT_SEED + index).sample(range(len(data) - 1), task.num_fewshot)
        fewshot = [data[i + (i >= index)] for i in picks]
    delimiter = task.continuation_delimiter
    if task.task_type == "multiple_choice":
        rows = tokenizer.encode_batch(render_multiple_choice(item, delimiter, fewshot))
        starts, ends = [common_length(rows)] * len(rows), [len(r) for r in rows]
    elif task.task_type == "schema":
        rows = tokenizer.encode_batch(render_schema(item, delimiter, fewshot))
        suffix = common_length(rows, from_end=True)
        starts, ends = [len(r) - suffix for r in rows], [len(r) for r in rows]
    else:
        prompts = render_language_modeling(item, delimiter, fewshot)
        without, with_continuation = tokenizer.encode_batch(prompts)
        if with_continuation[:len(without)] != without or len(without) >= len(with_continuation):
            raise BundleError(f"task {task.label} example {index}: the prompt without the continuation "
                              "does not tokenize to a prefix of the prompt with it")
        rows, starts, ends = [with_continuation], [len(without)], [len(with_continuation)]
    crops = [max(0, len(r) - max_len) for r in rows]
    return Scored(rows=[r[c:] for r, c in zip(rows, crops, strict=True)],
                  starts=[s - c for s, c in zip(starts, crops, strict=True)],
                  ends=[e - c for e, c in zip(ends, crops, strict=True)],
                  gold=item.get("gold", 0))


# ---------------------------------------------------------------------------------------------------
# Scoring


@torch.no_grad()
def token_losses(model: torch.nn.Module, rows: list[list[int]], pad_id: int
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """(losses, argmax) of right-padded rows, both (B, T) on the CPU: losses[b, t] is the loss of token
    t + 1 given tokens 0..t, argmax[b, t] the model's greedy guess for it. Padding sits after every real
    token, so causal attention keeps it from changing them."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    for b, row in enumerate(rows):
        ids[b, :len(row)] = torch.tensor(row, dtype=torch.long)
    device = next(model.parameters()).device
    ids = ids.to(device)
    with autocast_for(device):
        logits = model(ids)
    targets = torch.roll(ids, shifts=-1, dims=1)
    losses = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="none")
    return losses.view(ids.shape).cpu(), logits.argmax(dim=-1).cpu()


def is_correct(task_type: str, example: Scored, losses: torch.Tensor, argmax: torch.Tensor) -> bool:
    """losses/argmax: the example's own rows out of token_losses."""
    if task_type == "language_modeling":
        start, end = example.starts[0], example.ends[0]
        target = torch.tensor(example.rows[0][start:end])
        return bool(torch.equal(argmax[0, start - 1:end - 1], target))
    mean_losses = [losses[i, s - 1:e - 1].mean().item()
                   for i, (s, e) in enumerate(zip(example.starts, example.ends, strict=True))]
    return mean_losses.index(min(mean_losses)) == example.gold


def batches(examples: list[Scored], max_rows: int) -> Iterator[list[Scored]]:
    """Whole examples grouped into forwards of at most max_rows rows (an example is never split)."""
    group: list[Scored] = []
    for example in examples:
        if group and sum(len(e.rows) for e in group) + len(example.rows) > max_rows:
            yield group
            group = []
        group.append(example)
    if group:
        yield group


def evaluate_task(model: torch.nn.Module, tokenizer: Tokenizer, task: CoreTask, data: list[dict],
                  batch_rows: int = 32) -> float:
    """Accuracy of a GPT on the task's examples; rows are cut to the model's rotary cache (10x the
    training length), the longest it can read."""
    examples = [prepare(task, data, i, tokenizer, model.rotary_seq_len) for i in range(len(data))]
    correct = 0
    for group in batches(examples, batch_rows):
        losses, argmax = token_losses(model, [r for e in group for r in e.rows], tokenizer.bos_id)
        row = 0
        for example in group:
            n = len(example.rows)
            correct += is_correct(task.task_type, example, losses[row:row + n], argmax[row:row + n])
            row += n
    return correct / len(examples)
