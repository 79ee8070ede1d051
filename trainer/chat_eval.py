"""Chat-model evaluations as nanochat's chat_eval runs them: ARC-Easy/Challenge, MMLU, GSM8K.

Every problem becomes a conversation rendered with the chat template SFT trains on, up to the assistant's
turn. Multiple choice (ARC, MMLU) lists the choices as "- text=A" lines and asks for the letter; the
answer is the letter whose token the model scores highest at the assistant's first position, among this
problem's letters only (nanochat's categorical eval: no sampling, one batched forward). GSM8K is
generative: the model writes a solution, greedy, until <|assistant_end|>, and it counts when the number
after its "####" equals the reference's. Datasets come from the Hub through `datasets`, shuffled with
nanochat's seed, so --max-problems takes the same subset.

HumanEval is left out: scoring it runs model-written Python, and nanochat's guard (a subprocess with
some os functions removed) is not a sandbox; doing it honestly needs an isolated container.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from trainer.data import DataError
from trainer.engine import Engine
from trainer.tokenizer import Tokenizer

if TYPE_CHECKING:
    import datasets

SHUFFLE_SEED = 42
MMLU_LETTERS = ("A", "B", "C", "D")
GSM8K_ANSWER = re.compile(r"#### (\-?[0-9\.\,]+)")


@dataclass
class Problem:
    messages: list[dict[str, str]]  # the user's question, then the reference answer
    letters: tuple[str, ...] = ()  # multiple choice: the letters that may be answered
    answer: str = ""  # the right letter, or GSM8K's reference number


@dataclass(frozen=True)
class ChatTask:
    name: str
    repo_id: str
    config: str
    split: str
    kind: str  # "categorical" (score the letters) or "generative" (write an answer)
    random_baseline: float  # accuracy at chance, for the centered score
    to_problem: Callable[[dict[str, Any]], Problem]


def render_mc(question: str, letters: tuple[str, ...], choices: list[str]) -> str:
    """nanochat's multiple-choice prompt: the letter after each choice (small models bind it better) and
    no space before the letter, so it is the same token as the answer the assistant gives."""
    lines = "".join(f"- {choice}={letter}\n" for letter, choice in zip(letters, choices, strict=True))
    return (f"Multiple Choice question: {question}\n{lines}"
            "\nRespond only with the letter of the correct answer.")


def arc_problem(row: dict[str, Any]) -> Problem:
    letters = tuple(row["choices"]["label"])
    if row["answerKey"] not in letters:
        raise DataError(f"ARC row {row.get('id')}: answer {row['answerKey']!r} is not one of {letters}")
    return Problem([{"role": "user", "content": render_mc(row["question"], letters, row["choices"]["text"])},
                    {"role": "assistant", "content": row["answerKey"]}], letters, row["answerKey"])


def mmlu_problem(row: dict[str, Any]) -> Problem:
    answer = MMLU_LETTERS[row["answer"]]
    return Problem([{"role": "user", "content": render_mc(row["question"], MMLU_LETTERS, row["choices"])},
                    {"role": "assistant", "content": answer}], MMLU_LETTERS, answer)


def extract_gsm8k_answer(text: str) -> str | None:
    """The number after "#### ", commas dropped (the official GSM8K normalisation), or None."""
    match = GSM8K_ANSWER.search(text)
    return match.group(1).strip().replace(",", "") if match else None


def gsm8k_problem(row: dict[str, Any]) -> Problem:
    # The reference's <<expr=result>> calculator annotations stay in its text: only the final number counts.
    return Problem([{"role": "user", "content": row["question"]},
                    {"role": "assistant", "content": row["answer"]}],
                   answer=extract_gsm8k_answer(row["answer"]))


TASKS: dict[str, ChatTask] = {task.name: task for task in (
    ChatTask("ARC-Easy", "allenai/ai2_arc", "ARC-Easy", "test", "categorical", 0.25, arc_problem),
    ChatTask("ARC-Challenge", "allenai/ai2_arc", "ARC-Challenge", "test", "categorical", 0.25, arc_problem),
    ChatTask("MMLU", "cais/mmlu", "all", "test", "categorical", 0.25, mmlu_problem),
    ChatTask("GSM8K", "openai/gsm8k", "main", "test", "generative", 0.0, gsm8k_problem),
)}


def load_problems(task: ChatTask, cache_dir: Path, max_problems: int | None = None) -> list[Problem]:
    """The task's test problems from the Hub (cached in cache_dir), in nanochat's shuffled order."""
    import datasets  # heavy: only the chat eval needs it
    from datasets.exceptions import DatasetNotFoundError

    try:
        ds: datasets.Dataset = datasets.load_dataset(task.repo_id, task.config, split=task.split,
                                                     cache_dir=str(cache_dir))
    except DatasetNotFoundError:
        raise DataError(f"{task.name}: dataset {task.repo_id!r} not found on the Hub: check HF_ENDPOINT "
                        "and the network") from None
    except ConnectionError as exc:
        raise DataError(f"{task.name}: dataset {task.repo_id!r} is neither reachable nor cached in "
                        f"{cache_dir} ({exc}): check the network or HF_ENDPOINT") from None
    except ValueError as exc:  # an unknown config or split names the ones that exist
        raise DataError(f"{task.name}: dataset {task.repo_id!r}: {exc}") from None
    ds = ds.shuffle(seed=SHUFFLE_SEED)
    if max_problems is not None:
        ds = ds.select(range(min(max_problems, len(ds))))
    return [task.to_problem(row) for row in ds]


def letter_ids(tokenizer: Tokenizer, letters: tuple[str, ...]) -> list[int]:
    ids = [tokenizer.encode(letter) for letter in letters]
    if any(len(i) != 1 for i in ids):
        raise DataError(f"answer letters {letters} are not single tokens of this tokenizer")
    return [i[0] for i in ids]


@torch.no_grad()
def categorical_answers(engine: Engine, problems: list[Problem], batch_size: int = 8) -> list[str]:
    """Each problem's letter with the highest logit at the assistant's first position, among its own."""
    answers = []
    for i in range(0, len(problems), batch_size):
        group = problems[i:i + batch_size]
        # A prompt past the model's context keeps its end: the choices and the answer position.
        prompts = [engine.chat_prompt(p.messages[:-1])[-engine.max_len:] for p in group]
        width = max(len(p) for p in prompts)
        # Right padding comes after the answer position, so causal attention never lets it in.
        ids = torch.tensor([p + [engine.tokenizer.bos_id] * (width - len(p)) for p in prompts],
                           device=engine.device)
        with engine.autocast:
            logits = engine.model(ids)
        for b, problem in enumerate(group):
            scores = logits[b, len(prompts[b]) - 1, letter_ids(engine.tokenizer, problem.letters)]
            answers.append(problem.letters[int(scores.argmax())])
    return answers


def generative_answers(engine: Engine, problems: list[Problem], batch_size: int, max_new_tokens: int
                       ) -> list[str]:
    """Each problem's answer as the model writes it: greedy, until <|assistant_end|> or max_new_tokens."""
    answers = []
    for i in range(0, len(problems), batch_size):
        prompts = [engine.chat_prompt(p.messages[:-1]) for p in problems[i:i + batch_size]]
        # The answer must fit in the model's context after the longest prompt of the batch; a prompt
        # that leaves no room at all gets no answer (counted wrong) rather than stopping the eval.
        fits = [p for p in prompts if len(p) < engine.max_len]
        budget = min(max_new_tokens, engine.max_len - max((len(p) for p in fits), default=0))
        written = iter(engine.generate(fits, max_tokens=budget) if fits else [])
        answers += [engine.decode(next(written)) if len(p) < engine.max_len else "" for p in prompts]
    return answers


def is_right(task: ChatTask, problem: Problem, answer: str) -> bool:
    if task.kind == "categorical":
        return answer == problem.answer
    predicted = extract_gsm8k_answer(answer)
    return predicted is not None and predicted == problem.answer


def chatcore(accuracies: dict[str, float]) -> float:
    """Mean centered accuracy over the tasks evaluated (nanochat's ChatCORE, here without HumanEval)."""
    return sum((acc - TASKS[name].random_baseline) / (1 - TASKS[name].random_baseline)
               for name, acc in accuracies.items()) / len(accuracies)
