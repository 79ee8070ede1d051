"""`phoenix eval`: the CORE and chat-eval harnesses against answers fixed in advance.

Scoring is checked on a GPT without blocks (n_layer=0: each position's logits depend on its own token
only) whose weights we set, so the log-likelihoods can be computed by hand in numpy and a chosen answer
planted. End to end, `phoenix eval base|chat` runs as a process on a volume holding a freshly initialised
tiny model (its head is zero: every logit equal, so it always picks the first choice), with the eval
bundle and the chat datasets served by the local Hub under their real repo ids, configs and splits.
"""

from __future__ import annotations

import io
import json
import logging
import math
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from entrypoint.tools.eval import (
    EvalError,
    evaluate_chat,
    evaluate_finished_stage,
    resolve_bundle,
    results_path,
)
from tests.helpers import MODEL_TAG, chat_conversations, fill, fill_checkpoint, run_phoenix, small_tmpfs
from trainer import checkpoint_layout as layout
from trainer.chat_eval import (
    TASKS,
    Problem,
    categorical_answers,
    chatcore,
    extract_gsm8k_answer,
    generative_answers,
    is_right,
)
from trainer.core_eval import (
    BundleError,
    CoreTask,
    centered,
    evaluate_task,
    load_bundle,
    load_examples,
    prepare,
    render_language_modeling,
    render_multiple_choice,
    render_schema,
)
from trainer.engine import Engine
from trainer.model import GPT, GPTConfig, build_model
from trainer.tokenizer import train_tokenizer

SOFTCAP = 15.0


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    texts = [m["content"] for conversation in chat_conversations(400) for m in conversation]
    # Enough "####" that it becomes one token: a bigram model can then be made to write "#### 7".
    return train_tokenizer(texts + ["The answer is\n#### 7", "#### 42"] * 400, 300,
                           tmp_path_factory.mktemp("tokenizer"))


def blockless_gpt(vocab_size: int, seed: int = 0) -> GPT:
    """A GPT with no blocks, random embeddings and a zero head: logits = 15 tanh(W h(token) / 15)."""
    torch.manual_seed(seed)
    config = GPTConfig(sequence_len=64, vocab_size=vocab_size, n_layer=0, n_head=2, n_kv_head=2, n_embd=16)
    model = build_model(config, "cpu").eval()
    with torch.no_grad():
        model.lm_head.weight.zero_()  # init draws it at std 0.001
    return model


def hidden(model: GPT, token: int) -> np.ndarray:
    """What the head sees for `token`, in numpy: the embedding RMS-normed twice (float64)."""
    x = model.transformer.wte.weight[token].detach().double().numpy()
    for _ in range(2):
        x = x / np.sqrt(np.mean(x * x) + np.finfo(np.float32).eps)
    return x


def hand_logits(model: GPT, token: int) -> np.ndarray:
    head = model.lm_head.weight.detach().double().numpy()
    return SOFTCAP * np.tanh(head @ hidden(model, token) / SOFTCAP)


def hand_loss(model: GPT, prev: int, nxt: int) -> float:
    logits = hand_logits(model, prev)
    return float(math.log(np.exp(logits - logits.max()).sum()) + logits.max() - logits[nxt])


def plant(model: GPT, pairs: list[tuple[int, int]], strength: float = 1.0) -> None:
    """Make `next` the clear favourite after `prev` for each pair."""
    with torch.no_grad():
        for prev, nxt in pairs:
            model.lm_head.weight[nxt] += strength * torch.tensor(hidden(model, prev), dtype=torch.float32)


# --- CORE ------------------------------------------------------------------------------------------

MC_ITEM = {"query": "What color is the river?", "choices": ["blue", "green", "ancient"], "gold": 0}
FEWSHOT = [{"query": "What color is the apple?", "choices": ["red", "white"], "gold": 0},
           {"query": "What color is the cloud?", "choices": ["black", "gentle"], "gold": 1}]


def test_prompts_are_nanochat_templates_rendered():
    jinja2 = pytest.importorskip("jinja2")  # torch depends on it; nanochat renders with it
    mc = jinja2.Template("""
{%- for example in fewshot_examples -%}
{{ example.query }}{{ continuation_delimiter }}{{ example.choices[example.gold] }}

{% endfor -%}
{{ item.query }}{{ continuation_delimiter }}{{ choice }}""".strip())
    expected = [mc.render(fewshot_examples=FEWSHOT, continuation_delimiter=" Answer: ", item=MC_ITEM,
                          choice=choice) for choice in MC_ITEM["choices"]]
    assert render_multiple_choice(MC_ITEM, " Answer: ", FEWSHOT) == expected
    assert expected[0].startswith("What color is the apple? Answer: red\n\nWhat color is the cloud?")

    schema_item = {"context_options": ["The apple fell", "The river ran"], "continuation": "fast.", "gold": 1}
    schema = jinja2.Template("""
{%- for example in fewshot_examples -%}
{{ example.context_options[example.gold] }}{{ continuation_delimiter }}{{ example.continuation }}

{% endfor -%}
{{ context }}{{ continuation_delimiter }}{{ item.continuation }}""".strip())
    assert render_schema(schema_item, " ", [schema_item]) == [
        schema.render(fewshot_examples=[schema_item], continuation_delimiter=" ", item=schema_item, context=c)
        for c in schema_item["context_options"]]

    lm_item = {"context": "The quiet garden is  ", "continuation": "green"}
    lm = jinja2.Template("""
{%- for example in fewshot_examples -%}
{{ example.context | trim }}{{ continuation_delimiter }}{{ example.continuation }}

{% endfor -%}
{{ item.context | trim }}{{ continuation_delimiter }}
{%- if include_continuation %}{{ item.continuation }}{% endif %}
""".strip())
    context = dict(fewshot_examples=[lm_item], continuation_delimiter=" ", item=lm_item)
    assert render_language_modeling(lm_item, " ", [lm_item]) == [
        lm.render(include_continuation=False, **context).strip(),
        lm.render(include_continuation=True, **context)]


def test_multiple_choice_loss_is_the_hand_computed_mean_and_the_lowest_wins(tokenizer):
    model = blockless_gpt(tokenizer.vocab_size)
    with torch.no_grad():
        model.lm_head.weight.normal_(std=0.5)
    task = CoreTask("colors", "multiple_choice", "colors.jsonl", 0, " ", 25.0)
    example = prepare(task, [MC_ITEM], 0, tokenizer, model.rotary_seq_len)
    means = [np.mean([hand_loss(model, row[p - 1], row[p]) for p in range(start, end)])
             for row, start, end in zip(example.rows, example.starts, example.ends, strict=True)]
    assert example.starts[0] > 1 and all(e > s for s, e in zip(example.starts, example.ends, strict=True))

    from trainer.core_eval import token_losses

    losses, _ = token_losses(model, example.rows, tokenizer.bos_id)
    for b, (start, end) in enumerate(zip(example.starts, example.ends, strict=True)):
        expected = [hand_loss(model, example.rows[b][p - 1], example.rows[b][p]) for p in range(start, end)]
        assert losses[b, start - 1:end - 1].tolist() == pytest.approx(expected, abs=1e-4)
    best = int(np.argmin(means))
    right = evaluate_task(model, tokenizer, task, [{**MC_ITEM, "gold": best}])
    wrong = evaluate_task(model, tokenizer, task, [{**MC_ITEM, "gold": (best + 1) % 3}])
    assert (right, wrong) == (1.0, 0.0)


def test_planted_answers_are_found_by_every_task_type(tokenizer):
    model = blockless_gpt(tokenizer.vocab_size, seed=1)
    mc = CoreTask("mc", "multiple_choice", "mc.jsonl", 1, " ", 25.0)
    lm = CoreTask("lm", "language_modeling", "lm.jsonl", 0, " ", 0.0)
    # A bigram model cannot prefer "blue" after "?" in one example and not in another: distinct choices.
    data = [MC_ITEM, {"query": "What color is the ocean?", "choices": ["red", "white", "quiet"], "gold": 1}]
    for index in (0, 1):  # plant the gold continuation of each example (with its few-shot prompt)
        example = prepare(mc, data, index, tokenizer, model.rotary_seq_len)
        row, start, end = example.rows[example.gold], example.starts[example.gold], example.ends[example.gold]
        plant(model, [(row[p - 1], row[p]) for p in range(start, end)], strength=2.0)
    assert evaluate_task(model, tokenizer, mc, data) == 1.0
    assert evaluate_task(model, tokenizer, mc, data, batch_rows=1) == 1.0  # one example per forward

    model = blockless_gpt(tokenizer.vocab_size, seed=2)  # "blue" was planted above
    lm_item = {"context": "What color is the forest?", "continuation": "blue"}
    example = prepare(lm, [lm_item], 0, tokenizer, model.rotary_seq_len)
    row, start, end = example.rows[0], example.starts[0], example.ends[0]
    pairs = [(row[p - 1], row[p]) for p in range(start, end)]
    assert len({prev for prev, _ in pairs}) == len(pairs), "a bigram model can only plant distinct steps"
    assert evaluate_task(model, tokenizer, lm, [lm_item]) == 0.0
    plant(model, pairs, strength=3.0)
    assert all(int(np.argmax(hand_logits(model, prev))) == nxt for prev, nxt in pairs)
    assert evaluate_task(model, tokenizer, lm, [lm_item]) == 1.0


def test_centered_accuracy_is_zero_at_chance_and_one_when_perfect():
    assert centered(0.25, 25.0) == 0.0
    assert centered(1.0, 25.0) == 1.0
    assert centered(0.5, 25.0) == pytest.approx(1 / 3)
    assert centered(0.1, 25.0) == pytest.approx(-0.2)  # below chance is negative, as in nanochat
    assert chatcore({"ARC-Easy": 0.75, "GSM8K": 0.5}) == pytest.approx((2 / 3 + 0.5) / 2)


# --- chat evals -------------------------------------------------------------------------------------


def test_gsm8k_answer_extraction():
    assert extract_gsm8k_answer("She pays 3 * 4 = <<3*4=12>>12 dollars.\n#### 12") == "12"
    assert extract_gsm8k_answer("#### 1,234.5 apples") == "1234.5"
    assert extract_gsm8k_answer("#### -7") == "-7"
    assert extract_gsm8k_answer("the answer is 12") is None
    task, problem = TASKS["GSM8K"], Problem([], answer="12")
    assert is_right(task, problem, "so 12 in all\n#### 12")
    assert not is_right(task, problem, "#### 13")
    assert not is_right(task, Problem([], answer=None), "no number")  # a reference without #### never matches


def test_letters_are_scored_at_the_assistant_position_among_the_problems_own(tokenizer):
    model = blockless_gpt(tokenizer.vocab_size)
    engine = Engine(model, tokenizer)
    start = tokenizer.special_id("<|assistant_start|>")
    letter = {x: tokenizer.encode(x)[0] for x in "ABCD"}
    plant(model, [(start, letter["C"])])
    plant(model, [(start, letter["D"])], strength=2.0)  # D is best, but only some problems offer it
    question = [{"role": "user", "content": "What color is the apple?"},
                {"role": "assistant", "content": "A"}]
    problems = [Problem(question, ("A", "B", "C", "D"), "D"), Problem(question, ("A", "B", "C"), "C"),
                Problem(question[:1] + [{"role": "assistant", "content": "B"}], ("A", "B"), "B")]
    assert categorical_answers(engine, problems, batch_size=2) == ["D", "C", "A"]


def test_gsm8k_answers_are_generated_until_assistant_end(tokenizer):
    model = blockless_gpt(tokenizer.vocab_size)
    engine = Engine(model, tokenizer)
    written = tokenizer.encode("#### 7")
    chain = [tokenizer.special_id("<|assistant_start|>"), *written, tokenizer.special_id("<|assistant_end|>")]
    assert len(set(chain)) == len(chain), "a bigram model can only plant distinct steps"
    plant(model, list(zip(chain, chain[1:], strict=False)), strength=2.0)
    problems = [Problem([{"role": "user", "content": q}, {"role": "assistant", "content": f"#### {a}"}],
                        answer=a) for q, a in (("What color is the river?", "7"), ("Thank you!", "42"),
                                               ("What color is the river? " * 200, "7"))]
    assert len(engine.chat_prompt(problems[2].messages[:1])) > engine.max_len
    answers = generative_answers(engine, problems, batch_size=3, max_new_tokens=10)
    assert answers == ["#### 7", "#### 7", ""]  # the prompt past the context gets no answer, no crash
    right = [is_right(TASKS["GSM8K"], p, a) for p, a in zip(problems, answers, strict=True)]
    assert right == [True, False, False]


# --- end to end -------------------------------------------------------------------------------------


def write_model(base: Path, stage: str, step: int, tokenizer_dir: Path) -> None:
    """A volume with the tokenizer and one complete checkpoint of a freshly initialised tiny GPT."""
    import shutil

    from safetensors.torch import save_file

    shutil.copytree(tokenizer_dir, base / "tokenizer", dirs_exist_ok=True)
    config = GPTConfig(sequence_len=64, vocab_size=300, n_layer=1, n_head=2, n_kv_head=2, n_embd=16)
    model = build_model(config, "cpu")
    with torch.no_grad():  # init draws the head at std 0.001: zeroed, every choice ties and the first wins
        model.lm_head.weight.zero_()
    tmp = layout.new_tmp_dir(layout.stage_dir(base, stage, MODEL_TAG), step)
    save_file(model.state_dict(), str(tmp / "model.safetensors"))
    fill_checkpoint(tmp, step, stage, model_config=config.__dict__)
    layout.publish(tmp, step, done=True, stage=stage, model_tag=MODEL_TAG, run_id="test")


def jsonl(rows: list[dict]) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def core_bundle() -> dict[str, bytes]:
    """Three tasks whose accuracy for a model that always picks the first option is known: 1, 1/2, 0."""
    core_yaml = """icl_tasks:
- label: pick_first
  dataset_uri: pick_first.jsonl
  num_fewshot: [1]
  icl_task_type: multiple_choice
- label: half_first
  dataset_uri: half_first.jsonl
  num_fewshot: [0]
  icl_task_type: schema
  continuation_delimiter: ' '
- label: recite
  dataset_uri: recite.jsonl
  num_fewshot: [0]
  icl_task_type: language_modeling
"""
    meta = "Eval Task,Task Category,Task Type,#shots,#datapoints,Random baseline,Centered Metric?\n" \
           "pick_first,x,mc,1,4,25.0,yes\nhalf_first,x,schema,0,4,50.0,yes\nrecite,x,lm,0,2,0.0,yes\n"
    # An all-zero head gives every token the same loss: the choices tie and the first wins (nanochat's rule).
    pick_first = [{"query": f"Q{i}:", "choices": ["a", "b", "c"], "gold": 0} for i in range(4)]
    half_first = [{"context_options": ["The apple", "The river"], "continuation": "is red.", "gold": i % 2}
                  for i in range(4)]
    recite = [{"context": "Repeat after me: quiet", "continuation": "quiet"}] * 2
    return {"core.yaml": core_yaml.encode(), "eval_meta_data.csv": meta.encode(),
            "eval_data/pick_first.jsonl": jsonl(pick_first), "eval_data/half_first.jsonl": jsonl(half_first),
            "eval_data/recite.jsonl": jsonl(recite)}


def test_eval_base_core_metric_from_a_hub_bundle(hub, tmp_path, tokenizer_dir):
    base = tmp_path / "volume"
    write_model(base, "base", 10, tokenizer_dir)
    hub.server.publish_dataset("phoenix-test/eval-bundle", core_bundle())
    env = {**hub.env, "NANOCHAT_BASE_DIR": str(base), "MODEL_TAG": MODEL_TAG, "WANDB_MODE": "offline"}
    code, out = run_phoenix(env, "eval", "base", "--bundle", "phoenix-test/eval-bundle", "--device", "cpu")
    assert code == 0, out
    result = json.loads(results_path(base, MODEL_TAG, "base", 10).read_text())
    assert result["accuracy"] == {"pick_first": 1.0, "half_first": 0.5, "recite": 0.0}
    assert result["centered"] == {"pick_first": 1.0, "half_first": 0.0, "recite": 0.0}
    assert result["core_metric"] == pytest.approx(1 / 3)
    assert "event=eval_task stage=base step=10 task=pick_first shots=1 examples=4 accuracy=1.0000" in out
    assert "core_metric=0.3333" in out


@pytest.fixture(scope="module")
def tokenizer_dir(tokenizer, tmp_path_factory):
    path = tmp_path_factory.mktemp("tokenizer_dir")
    tokenizer._hf.save(str(path / "tokenizer.json"))
    return path


def test_eval_base_bundle_from_a_zip_url_is_unpacked_once(hub, tmp_path):
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as zf:
        for name, data in core_bundle().items():
            zf.writestr(f"eval_bundle/{name}", data)
    hub.server.publish_dataset("phoenix-test/zips", {"eval_bundle.zip": archive.getvalue()})
    url = f"{hub.url}/datasets/phoenix-test/zips/resolve/main/eval_bundle.zip"
    folder = resolve_bundle(url, tmp_path)
    assert (folder / "eval_data" / "recite.jsonl").is_file() and folder.parent == tmp_path / "eval_bundle"
    assert resolve_bundle(url, tmp_path) == folder


def test_a_bad_eval_bundle_is_one_line_and_never_fills_the_volume(hub, tmp_path, tokenizer_dir):
    base = tmp_path / "volume"
    write_model(base, "base", 10, tokenizer_dir)
    env = {**hub.env, "NANOCHAT_BASE_DIR": str(base), "MODEL_TAG": MODEL_TAG, "WANDB_MODE": "offline"}

    def refused(bundle: str, *flags: str, volume: Path = base) -> str:
        code, out = run_phoenix({**env, "NANOCHAT_BASE_DIR": str(volume)}, "eval", "base", "--bundle", bundle,
                                "--device", "cpu", *flags)
        lines = [line for line in out.splitlines() if line.startswith("error: ")]
        assert code == 2 and "Traceback" not in out and len(lines) == 1, out
        return lines[0]

    def zipped(files: dict[str, bytes]) -> str:
        archive = io.BytesIO()
        with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf:
            for name, data in files.items():
                zf.writestr(f"eval_bundle/{name}", data)
        name = f"b{len(list(tmp_path.glob('*.zip')))}.zip"
        (tmp_path / name).write_bytes(archive.getvalue())
        hub.server.publish_dataset(f"phoenix-test/{name[:-4]}", {name: archive.getvalue()})
        return f"{hub.url}/datasets/phoenix-test/{name[:-4]}/resolve/main/{name}"

    # Bigger than allowed, packed (random bytes) or only once unpacked (zeros): nothing lands.
    noise = zipped({**core_bundle(), "noise.bin": np.random.default_rng(0).bytes(1_500_000)})
    assert "more than the 1.0 MB allowed" in refused(noise, "--max-bundle-mb", "1")
    zeros = zipped({**core_bundle(), "zeros.bin": bytes(3_000_000)})
    assert "3.0 MB, more than the 1.0 MB allowed" in refused(zeros, "--max-bundle-mb", "1")
    assert not [p for p in (base / "eval_bundle").rglob("*") if p.is_file()]

    # A full volume is the volume's fault, not the network's.
    with small_tmpfs(tmp_path / "small_volume", "1m") as small:
        write_model(small, "base", 10, tokenizer_dir)
        fill(small)
        line = refused(zeros, volume=small)
    assert "No space left on device" in line and "free space on the volume" in line and "network" not in line

    # Folders: malformed YAML (through the command), a dataset_uri outside the bundle, a malformed example.
    def folder(name: str, change: dict[str, bytes]) -> Path:
        for path, data in {**core_bundle(), **change}.items():
            (tmp_path / name / path).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / name / path).write_bytes(data)
        return tmp_path / name

    malformed = folder("yaml", {"core.yaml": b"icl_tasks: ["})
    assert "core.yaml or eval_meta_data.csv is malformed" in refused(str(malformed))
    outside = core_bundle()["core.yaml"].replace(b"recite.jsonl", b"../../secret.jsonl")
    with pytest.raises(BundleError, match=r"dataset_uri '../../secret.jsonl' is not a path inside eval_da"):
        load_bundle(folder("outside", {"core.yaml": outside}))
    torn = folder("torn", {"eval_data/pick_first.jsonl": jsonl([MC_ITEM]) + b'{"query": "Q:", "choi\n'})
    with pytest.raises(BundleError, match="line 2 of .* is malformed"):
        load_examples(torn, load_bundle(torn)[0])
    wrong = folder("wrong", {"eval_data/pick_first.jsonl": jsonl([MC_ITEM, {**MC_ITEM, "gold": 7}])})
    with pytest.raises(BundleError, match="gold 7 is not an index into 'choices'"):
        load_examples(wrong, load_bundle(wrong)[0])


def parquet(rows: list[dict]) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    buffer = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), buffer)
    return buffer.getvalue()


def configs_readme(configs: list[tuple[str, str]]) -> bytes:
    """The dataset card's YAML that tells `datasets` which files make each config's split (as on the Hub)."""
    lines = ["---", "configs:"]
    for config, split in configs:
        lines += [f"- config_name: {config}", "  data_files:", f"  - split: {split}",
                  f"    path: {config}/{split}-*"]
    return "\n".join([*lines, "---", ""]).encode()


def publish_chat_evals(server) -> None:
    """ARC, MMLU and GSM8K with the real repo ids, configs and splits: 4 problems each, answers chosen so a
    model that always says the first letter scores 3/4 on ARC-Easy, 1/4 on ARC-Challenge, 2/4 on MMLU."""
    def arc(keys: list[str]) -> list[dict]:
        return [{"id": f"q{i}", "question": "What color is the sky?",
                 "choices": {"text": ["blue", "red", "green", "white"],
                             "label": ["1", "2", "3", "4"] if key.isdigit() else ["A", "B", "C", "D"]},
                 "answerKey": key} for i, key in enumerate(keys)]
    server.publish_dataset("allenai/ai2_arc", {
        "README.md": configs_readme([("ARC-Easy", "test"), ("ARC-Challenge", "test")]),
        "ARC-Easy/test-00000-of-00001.parquet": parquet(arc(["A", "1", "B", "A"])),
        "ARC-Challenge/test-00000-of-00001.parquet": parquet(arc(["B", "C", "A", "D"]))})
    mmlu = [{"question": "2 + 2 = ?", "subject": "elementary_mathematics", "choices": ["4", "3", "5", "6"],
             "answer": answer} for answer in (0, 1, 0, 3)]
    server.publish_dataset("cais/mmlu", {"README.md": configs_readme([("all", "test")]),
                                         "all/test-00000-of-00001.parquet": parquet(mmlu)})
    gsm8k = [{"question": f"What is {n} + 1?", "answer": f"{n} + 1 = <<{n}+1={n + 1}>>{n + 1}\n#### {n + 1}"}
             for n in range(4)]
    server.publish_dataset("openai/gsm8k", {"README.md": configs_readme([("main", "test")]),
                                            "main/test-00000-of-00001.parquet": parquet(gsm8k)})


def test_eval_chat_scores_every_task_from_hub_datasets(hub, tmp_path, tokenizer_dir):
    base = tmp_path / "volume"
    write_model(base, "sft", 42, tokenizer_dir)
    publish_chat_evals(hub.server)
    env = {**hub.env, "NANOCHAT_BASE_DIR": str(base), "MODEL_TAG": MODEL_TAG, "WANDB_MODE": "offline",
           "WANDB_RUN": "eval-test"}
    code, out = run_phoenix(env, "eval", "chat", "--device", "cpu", "--max-new-tokens", "8")
    assert code == 0, out
    result = json.loads(results_path(base, MODEL_TAG, "sft", 42).read_text())
    # GSM8K: a zero head's greedy token is id 0, <|bos|>, which ends the answer at once: nothing to match.
    assert result["accuracy"] == {"ARC-Easy": 0.75, "ARC-Challenge": 0.25, "MMLU": 0.5, "GSM8K": 0.0}
    assert result["chatcore"] == pytest.approx((2 / 3 + 0 + 1 / 3 + 0) / 4)
    assert "task=MMLU problems=4 accuracy=0.5000" in out
    assert list((base / "logs").glob("wandb/offline-run-*")), "the results went to the offline W&B run"

    with pytest.raises(EvalError, match=r"unknown chat task\(s\) HumanEval: choose from ARC-Easy"):
        evaluate_chat(base, MODEL_TAG, ["ARC-Easy", "HumanEval"], "cpu", None, 8, 8)
    empty = tmp_path / "empty"
    empty.mkdir()
    no_volume = {**env, "NANOCHAT_BASE_DIR": str(empty), "EVAL_BUNDLE": str(empty)}
    code, out = run_phoenix(no_volume, "eval", "base")
    assert code == 2 and "error: no complete base checkpoint" in out and "Traceback" not in out


def test_eval_after_a_stage_runs_once_and_a_failure_does_not_stop_the_run(tmp_path, tokenizer_dir,
                                                                         monkeypatch, caplog):
    """EVAL=1's hook in `phoenix run`: the results file makes it run once; a bad bundle is one warning."""
    base = tmp_path / "volume"
    write_model(base, "base", 10, tokenizer_dir)
    monkeypatch.setenv("EVAL_BUNDLE", str(tmp_path / "no-such-bundle"))
    phoenix_log = logging.getLogger("phoenix")
    phoenix_log.addHandler(caplog.handler)  # setup_logging, run by an earlier test, stops propagation
    try:
        evaluate_finished_stage(base, MODEL_TAG, "base", "cpu")
    finally:
        phoenix_log.removeHandler(caplog.handler)
    assert "event=eval_failed stage=base step=10" in caplog.text
    assert not results_path(base, MODEL_TAG, "base", 10).exists()

    bundle = tmp_path / "bundle"
    for name, data in core_bundle().items():
        (bundle / name).parent.mkdir(parents=True, exist_ok=True)
        (bundle / name).write_bytes(data)
    monkeypatch.setenv("EVAL_BUNDLE", str(bundle))
    evaluate_finished_stage(base, MODEL_TAG, "base", "cpu")
    path = results_path(base, MODEL_TAG, "base", 10)
    assert json.loads(path.read_text())["core_metric"] == pytest.approx(1 / 3)
    written = path.stat().st_mtime_ns
    evaluate_finished_stage(base, MODEL_TAG, "base", "cpu")
    assert path.stat().st_mtime_ns == written
