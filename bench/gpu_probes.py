"""The checks bench/gpu_check.py runs, one function per part; each returns a JSON-ready dict with `passed`.

Everything goes through the trainer's own code (compute_setup, build_model, the ShardedOptimizer, the
AsyncCheckpointer, `phoenix run`), on CUDA or, with the tiny sizes of --cpu, on the CPU.
"""

from __future__ import annotations

import importlib
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from entrypoint.launch.procs import descendants, signal_pids
from trainer.distributed import Dist, ShardedOptimizer
from trainer.model import build_model, config_for_depth
from trainer.optim import HybridOptimizer
from trainer.runtime import compiles_update, compute_setup

# (depth, aspect_ratio, head_dim, vocab, seq, batch) of the small model the compile checks train; the
# CPU one is tests/test_compile.py's, so a suite run compiles it once (inductor's on-disk cache).
COMPILE_GEOMETRY = {"cpu": (2, 32, 32, 512, 64, 2), "cuda": (4, 64, 128, 8192, 512, 8)}
# SFT batches are as long as their longest conversation: lengths that share no factor, none of them 1.
# On CPU all past 32: inductor's C++ codegen picks a reduction's accumulator by its size (a guard at
# batch x length x width <= 4096), which the scalars' gradients (sums over every activation) would cross.
SFT_LENGTHS = {"cpu": [35, 33, 50, 47, 64, 41], "cuda": [37, 512, 211, 64, 449, 97, 300]}
# Compiled vs eager losses over a few steps. fp32 on CPU: inductor only reorders reductions. bf16 on
# CUDA: fused kernels keep fp32 intermediates that eager rounds to bf16 (8 mantissa bits, 4e-3 a step).
COMPILE_RTOL = {"cpu": 1e-5, "cuda": 2e-2}
# Bounds the drift after a resume on CUDA (see resume_check); a resume that lost state (RNG, optimizer,
# loader position) shows up as loss differences of whole percents at once.
RESUME_RTOL = 1e-2


def kind(device: torch.device) -> str:
    return "cuda" if device.type == "cuda" else "cpu"


def max_rel_diff(a: list[float], b: list[float]) -> float:
    return max((abs(x - y) / max(abs(y), 1e-12) for x, y in zip(a, b, strict=True)), default=0.0)


# ---------------------------------------------------------------------------------------------------
# Environment


def _version(module: str) -> str | None:
    try:
        return getattr(importlib.import_module(module), "__version__", "present")
    except Exception:  # absent, or broken: either way not usable
        return None


def _nccl_version() -> str | None:
    try:
        version = torch.cuda.nccl.version()  # a tuple in recent torch, an int (e.g. 2708) in older ones
    except Exception:  # a build without NCCL
        return None
    return ".".join(map(str, version)) if isinstance(version, tuple) else str(version)


def environment() -> dict[str, Any]:
    """Versions of everything the figures depend on, and whether the trainer imports stay lean."""
    info: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__,
                            "cuda_runtime": torch.version.cuda, "cuda_available": torch.cuda.is_available(),
                            "cpu_count": os.cpu_count()}
    for module in ("numpy", "safetensors", "pyarrow", "tokenizers", "huggingface_hub", "click", "triton"):
        info[module] = _version(module)
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, gpu_count=torch.cuda.device_count(),
                    gpu_memory_gib=round(props.total_memory / 2**30, 1),
                    capability=".".join(map(str, torch.cuda.get_device_capability(0))),
                    cudnn=torch.backends.cudnn.version(), nccl=_nccl_version())
    if shutil.which("nvidia-smi"):
        query = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                               capture_output=True, text=True, timeout=30)
        info["driver"] = query.stdout.strip().splitlines()[0] if query.returncode == 0 else None
    import trainer.sft  # noqa: F401  (and trainer.train through it)

    # A bare GPU host has neither: the stages must import them only where they are used.
    # (A blocked module sits in sys.modules as None.)
    info["eager_heavy_imports"] = sorted(m for m in ("datasets", "wandb", "httpx2") if sys.modules.get(m))
    try:  # what `phoenix run` needs on top: click, and huggingface_hub 1.x or 2.x
        import entrypoint.launch.run  # noqa: F401

        info["phoenix_run_imports"] = "ok"
    except Exception as exc:  # reported, and the resume part will fail with the same reason
        info["phoenix_run_imports"] = f"{exc.__class__.__name__}: {exc}"
    info["passed"] = not info["eager_heavy_imports"] and info["phoenix_run_imports"] == "ok"
    return info


# ---------------------------------------------------------------------------------------------------
# torch.compile: compiled vs eager, and no recompile per SFT length


def _graph_count() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def probe_model(device: torch.device, seed: int = 0) -> torch.nn.Module:
    """The compile-check geometry's model with non-zero head and output projections, so step 1's loss is
    not log(vocab) in every variant a probe compares."""
    depth, aspect, head_dim, vocab, seq, _ = COMPILE_GEOMETRY[kind(device)]
    torch.manual_seed(seed)
    model = build_model(config_for_depth(depth, vocab, seq, aspect, head_dim), device)
    with torch.no_grad():
        for p in model.parameters():
            if not p.abs().sum():
                p.normal_(0, 0.02)
    return model


def train_losses(device: torch.device, compile_mode: str, lengths: list[int], dynamic: bool = False,
                 seed: int = 0) -> tuple[list[float], int, list[int]]:
    """Per-step losses of the compile-check model trained on batches of the given lengths, through the
    trainer's compute_setup and optimizer (its update compiled where the trainer compiles it); the graphs
    dynamo compiled for the model, and per step those it compiled for the optimizer update."""
    import torch._dynamo

    depth, aspect, head_dim, vocab, seq, batch = COMPILE_GEOMETRY[kind(device)]
    torch._dynamo.reset()
    graphs_before = _graph_count()
    model = probe_model(device, seed)
    one_process = Dist(0, 0, 1, device)
    optimizer = ShardedOptimizer(model, one_process, compile_update=compiles_update(compile_mode, device))
    train_model, autocast = compute_setup(model, one_process, compile_mode, dynamic=dynamic)
    data = torch.Generator().manual_seed(seed + 1)
    losses, update_graphs = [], []
    for step, length in enumerate(lengths):
        optimizer.set_schedule(step, len(lengths))  # a new learning rate every step: no recompile
        x = torch.randint(0, vocab, (batch, length), generator=data).to(device)
        y = torch.randint(0, vocab, (batch, length), generator=data)
        y[:, : length // 3] = -1  # SFT-style: no loss on the prompt
        with autocast:
            loss = train_model(x, y.to(device))
        loss.backward()
        before_update = _graph_count()
        optimizer.step()
        update_graphs.append(_graph_count() - before_update)
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses, _graph_count() - graphs_before - sum(update_graphs), update_graphs


def compile_check(device: torch.device, steps: int = 5) -> dict[str, Any]:
    """Base (fixed length, static shapes) and SFT (a new length every step, dynamic=True as sft.py)."""
    k = kind(device)
    seq = COMPILE_GEOMETRY[k][4]
    result: dict[str, Any] = {"rtol": COMPILE_RTOL[k]}
    for stage, lengths, dynamic in (("base", [seq] * steps, False), ("sft", SFT_LENGTHS[k], True)):
        eager, _, _ = train_losses(device, "off", lengths)
        start = time.perf_counter()
        compiled, graphs, update_graphs = train_losses(device, "on", lengths, dynamic=dynamic)
        rel = max_rel_diff(compiled, eager)
        # The update compiles once per parameter shape, at the first step, never again.
        result[stage] = {"lengths": lengths, "eager": eager, "compiled": compiled, "max_rel_diff": rel,
                         "graphs": graphs, "update_graphs": update_graphs,
                         "seconds": round(time.perf_counter() - start, 1),
                         "passed": rel <= COMPILE_RTOL[k] and graphs == 1 and not any(update_graphs[1:])}
    result["passed"] = result["base"]["passed"] and result["sft"]["passed"]
    return result


def bf16_check(device: torch.device, steps: int = 3) -> dict[str, Any]:
    """A few steps under bf16 autocast (the CUDA recipe; on CPU via torch.autocast('cpu')) next to fp32:
    the matmuls really run in bf16, and the losses stay finite and within bf16's reach of fp32's."""
    depth, aspect, head_dim, vocab, seq, batch = COMPILE_GEOMETRY[kind(device)]
    results = {}
    for dtype in (torch.float32, torch.bfloat16):
        model = probe_model(device)
        optimizer = HybridOptimizer(model)
        seen: set[str] = set()
        model.transformer.h[0].mlp.c_fc.register_forward_hook(
            lambda _m, _i, out, seen=seen: seen.add(str(out.dtype)))
        residual: set[str] = set()  # bf16 from the embedding lookup on under autocast, as nanochat's
        model.transformer.h[0].register_forward_pre_hook(
            lambda _m, args, residual=residual: residual.add(str(args[0].dtype)))
        data = torch.Generator().manual_seed(1)
        losses = []
        for _ in range(steps):
            x = torch.randint(0, vocab, (batch, seq), generator=data).to(device)
            y = torch.randint(0, vocab, (batch, seq), generator=data).to(device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
                loss = model(x, y)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
        results[str(dtype).removeprefix("torch.")] = {"losses": losses, "matmul_dtypes": sorted(seen),
                                                      "residual_dtypes": sorted(residual)}
    rel = max_rel_diff(results["bfloat16"]["losses"], results["float32"]["losses"])
    bf16_run = results["bfloat16"]
    ran_bf16 = bf16_run["matmul_dtypes"] == bf16_run["residual_dtypes"] == ["torch.bfloat16"]
    finite = all(map(torch.isfinite, map(torch.tensor, results["bfloat16"]["losses"])))
    return {**results, "max_rel_diff": rel, "passed": bool(ran_bf16 and finite and rel <= 5e-2)}


def fp8_check(device: torch.device, steps: int = 5) -> dict[str, Any]:
    """FP8=1's path where the GPU has FP8 (compute capability >= 8.9): the compile-check model, compiled,
    `steps` steps with its linears converted (trainer.fp8) next to plain bf16; losses finite and within 5e-2,
    ms per step of each. Elsewhere the refusal the trainer prints, and the FP8 matmul itself checked
    against float32 on small operands (the CPU has torch._scaled_mm too)."""
    from trainer.fp8 import Float8Linear, convert_to_fp8, fp8_unavailable

    refusal = fp8_unavailable(device)
    if refusal is not None:
        torch.manual_seed(0)
        holder = torch.nn.Sequential(torch.nn.Linear(256, 256, bias=False, device=device))
        convert_to_fp8(holder)
        x = torch.randn(64, 256, device=device)
        exact = x @ holder[0].weight.t()
        rel = ((holder(x).float() - exact).norm() / exact.norm()).item()  # with gradients: the FP8 path
        return {"refused": refusal, "matmul_rel_err": rel,
                "passed": isinstance(holder[0], Float8Linear) and 1e-4 < rel < 0.08}
    depth, aspect, head_dim, vocab, seq, batch = COMPILE_GEOMETRY[kind(device)]
    results: dict[str, Any] = {}
    for fp8 in (False, True):
        model = probe_model(device)
        optimizer = HybridOptimizer(model)
        converted = convert_to_fp8(model)[0] if fp8 else 0
        train_model, autocast = compute_setup(model, Dist(0, 0, 1, device), "on")
        data = torch.Generator().manual_seed(1)
        losses, times = [], []
        for _ in range(steps):
            x = torch.randint(0, vocab, (batch, seq), generator=data).to(device)
            y = torch.randint(0, vocab, (batch, seq), generator=data).to(device)
            torch.cuda.synchronize()
            start = time.perf_counter()
            with autocast:
                loss = train_model(x, y)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
            times.append(time.perf_counter() - start)
        results["fp8" if fp8 else "bf16"] = {"losses": losses, "converted_linears": converted,
                                             "step_ms_after_first": 1000 * sum(times[1:]) / (steps - 1)}
    rel = max_rel_diff(results["fp8"]["losses"], results["bf16"]["losses"])
    finite = all(map(torch.isfinite, map(torch.tensor, results["fp8"]["losses"])))
    return {**results, "max_rel_diff": rel,
            "passed": bool(finite and rel <= 5e-2 and results["fp8"]["converted_linears"] > 0)}


# ---------------------------------------------------------------------------------------------------
# Throughput and checkpoint stall (the bench scripts' functions)


def throughput(device: torch.device, depth: int, batch: int, seq: int, vocab: int, aspect: int,
               head_dim: int, steps: int) -> dict[str, Any]:
    from bench.throughput import measure_throughput

    result = measure_throughput(depth, device, batch, seq, vocab, aspect, head_dim, compile_mode="on",
                                steps=steps, warmup=3)
    finite = bool(torch.isfinite(torch.tensor(result["final_loss"])))
    return {**result, "passed": result["compiled"] and finite}


def checkpoint_stall(device: torch.device, depth: int, vocab: int, workdir: Path) -> dict[str, Any]:
    from bench.checkpoint import measure_stall

    workdir.mkdir(parents=True, exist_ok=True)
    result = measure_stall(depth, vocab, device, workdir, repeats=2)
    return {**result, "passed": result["async_stall_ms"] > 0}


# ---------------------------------------------------------------------------------------------------
# `phoenix run`, killed with SIGKILL mid-run and relaunched, against an uninterrupted run


def tiny_run_env(device: torch.device, tag: str, nproc: int = 1, **extra: str) -> dict[str, str]:
    """The environment of a tiny-preset `phoenix run` on `device` with no Hub and no W&B."""
    env = {key: value for key, value in os.environ.items() if key not in ("HF_REPO_ID", "HF_TOKEN")}
    cuda = device.type == "cuda"
    env.update(MODEL_TAG=tag, PRESET="tiny", RUN_SFT="0", DEVICE="cuda" if cuda else "cpu",
               NPROC_PER_NODE=str(nproc), HF_HUB_OFFLINE="1", WANDB_RUN="", PYTHONUNBUFFERED="1",
               OMP_NUM_THREADS=env.get("OMP_NUM_THREADS", "1" if not cuda else "4"), **extra)
    return env


def tiny_run_args(steps: int, save_every: int) -> list[str]:
    return ["--num-iterations", str(steps), "--save-every", str(save_every), "--eval-every", str(steps // 2),
            "--tokenizer-chars", "500000"]


def volume_with_shards(volume: Path) -> None:
    """Shards on the volume plus their listing: the trainer never asks the Hub for anything."""
    from entrypoint.demo.synthetic import write_shards

    shards = write_shards(volume / "base_data", num_shards=3, docs_per_shard=300)
    (volume / "base_data" / "shards.json").write_text(json.dumps({"shards": [p.name for p in shards]}))


def phoenix_run(volume: Path, env: dict[str, str], trainer_args: list[str], kill_at: int | None,
                 timeout: float) -> tuple[int | None, str]:
    """`python -m entrypoint run` (the container's entrypoint); with kill_at, SIGKILL every process of
    the run as soon as it logs that step, as a preempted instance dies."""
    env = {**env, "NANOCHAT_BASE_DIR": str(volume)}
    command = [sys.executable, "-m", "entrypoint", "run", "--", *trainer_args]
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    deadline = time.monotonic() + timeout
    for line in proc.stdout:
        lines.append(line)
        if (kill_at is not None and f"step {kill_at:05d}/" in line) or time.monotonic() > deadline:
            signal_pids([proc.pid, *descendants(proc.pid)], signal.SIGKILL)
            proc.wait()
            return None, "".join(lines)
    return proc.wait(), "".join(lines)


def logged_losses(volume: Path, tag: str) -> tuple[dict[int, float], dict[int, float]]:
    """(first, last) logged loss per step: a relaunch logs the steps after its checkpoint again."""
    first: dict[int, float] = {}
    last: dict[int, float] = {}
    for line in (volume / "logs" / f"train_base_{tag}.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "loss" in record:
            first.setdefault(record["step"], record["loss"])
            last[record["step"]] = record["loss"]
    return first, last


def resume_check(device: torch.device, workdir: Path, nproc: int, timeout: float) -> dict[str, Any]:
    """The tiny preset through `phoenix run` (no Hub, generated shards): once uninterrupted, once killed
    with SIGKILL at a step between two checkpoints and relaunched; the per-step losses must agree.

    On the CPU (fp32, fixed reduction order) they agree bitwise. On CUDA they may not: inductor's
    reductions can pick another kernel configuration in a new process and some backward kernels
    accumulate with atomics; there the steps before the kill, which both runs computed from the same
    start, measure that noise, and the steps after the resume must stay within RESUME_RTOL of the
    reference.
    """
    cuda = device.type == "cuda"
    steps, save_every, kill_at = (300, 50, 160) if cuda else (20, 4, 9)
    tag = f"gpu-check-{nproc}p"
    trainer_args = tiny_run_args(steps, save_every)
    env = tiny_run_env(device, tag, nproc)
    reference, resumed = workdir / f"reference_{nproc}p", workdir / f"resumed_{nproc}p"
    volume_with_shards(reference)
    start = time.monotonic()
    code, out = phoenix_run(reference, env, trainer_args, None, timeout / 2)
    if code != 0:
        return {"passed": False, "error": f"uninterrupted run exited {code}", "log_tail": out[-3000:]}
    resumed.mkdir(parents=True)
    for name in ("base_data", "tokenizer"):  # the same shards and tokenizer, as after a first run
        shutil.copytree(reference / name, resumed / name)
    remaining = timeout - (time.monotonic() - start)
    code, out = phoenix_run(resumed, env, trainer_args, kill_at, remaining / 2)
    if code is not None:
        return {"passed": False, "error": f"the run ended (exit {code}) before step {kill_at} was killed",
                "log_tail": out[-3000:]}
    remaining = timeout - (time.monotonic() - start)
    code, out = phoenix_run(resumed, env, trainer_args, None, remaining)
    if code != 0:
        return {"passed": False, "error": f"relaunch exited {code}", "log_tail": out[-3000:]}
    resumed_from = next((int(line.split("resuming from step=")[1].split()[0]) for line in out.splitlines()
                         if "resuming from step=" in line), None)
    _, want = logged_losses(reference, tag)
    first, got = logged_losses(resumed, tag)
    before = [s for s in sorted(want) if resumed_from and s <= resumed_from]
    after = [s for s in sorted(want) if resumed_from and s > resumed_from]
    complete = sorted(got) == sorted(want) == list(range(1, steps + 1))
    noise = max_rel_diff([first[s] for s in before], [want[s] for s in before]) if before else None
    drift = max_rel_diff([got[s] for s in after], [want[s] for s in after]) if after else None
    bitwise = complete and all(got[s] == want[s] for s in want)
    result = {"nproc": nproc, "steps": steps, "save_every": save_every, "killed_at_log_of_step": kill_at,
              "resumed_from": resumed_from, "complete": complete, "bitwise": bitwise,
              "repeat_max_rel_diff": noise, "after_resume_max_rel_diff": drift,
              "seconds": round(time.monotonic() - start, 1)}
    tolerance = 0.0 if not cuda else RESUME_RTOL
    result["rtol"] = tolerance
    result["passed"] = bool(complete and resumed_from and 0 < resumed_from < steps
                            and (bitwise or (drift is not None and drift <= tolerance)))
    return result


# ---------------------------------------------------------------------------------------------------
# Two processes on one GPU: NCCL, else gloo


def dist_worker(backend: str, result_path: Path) -> None:
    """One rank under torchrun: the trainer's sharded optimizer step + compile (compute_setup) over
    `backend` for 3 steps on different data per rank; the replicas must stay identical and each rank
    hold the optimizer state of its own parameters only. Rank 0 writes what it saw."""
    import torch.distributed as dist

    from trainer.distributed import exit_when_orphaned

    exit_when_orphaned()  # a killed torchrun must not leave a rank holding the GPU
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    cuda = torch.cuda.is_available() and backend != "gloo-cpu"
    device = torch.device("cuda", rank % torch.cuda.device_count()) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group(backend.removesuffix("-cpu"), device_id=device if backend == "nccl" else None)
    depth, aspect, head_dim, vocab, seq, batch = COMPILE_GEOMETRY[kind(device)]
    torch.manual_seed(0)
    model = build_model(config_for_depth(depth, vocab, seq, aspect, head_dim), device)
    d = Dist(rank, device.index or 0, world, device)
    optimizer = ShardedOptimizer(model, d, compile_update=compiles_update("on", device))
    train_model, autocast = compute_setup(model, d, "on")
    data = torch.Generator().manual_seed(100 + rank)
    losses, step_ms = [], []
    for step in range(3):
        optimizer.set_schedule(step, 3)
        x = torch.randint(0, vocab, (batch, seq), generator=data).to(device)
        y = torch.randint(0, vocab, (batch, seq), generator=data).to(device)
        with autocast:
            loss = train_model(x, y)
        loss.backward()
        start = time.perf_counter()
        optimizer.step()
        losses.append(loss.item())  # a sync: the step's time includes its kernels
        step_ms.append(round(1000 * (time.perf_counter() - start), 1))
        optimizer.zero_grad()
    checksum = torch.stack([p.detach().double().sum() for p in model.parameters()]).sum().reshape(1)
    sums = [torch.zeros_like(checksum) for _ in range(world)]
    dist.all_gather(sums, checksum)
    held = sorted({key.split(".", 1)[1].rsplit(".", 1)[0] for key in optimizer.optimizer.state})
    names_of: list[Any] = [None] * world  # the parameters each rank holds optimizer state for
    dist.all_gather_object(names_of, held)
    names = [set(n) for n in names_of]
    if rank == 0:
        result_path.write_text(json.dumps({
            "backend": backend, "device": str(device), "losses": losses, "optimizer_step_ms": step_ms,
            "replicas_identical": len({s.item() for s in sums}) == 1,
            "state_sharded": not set.intersection(*names) and set.union(*names) == set(optimizer.owners),
            "state_names_per_rank": [len(n) for n in names]}))
    dist.destroy_process_group()


def two_process_check(device: torch.device, workdir: Path, timeout: float) -> dict[str, Any]:
    """Two ranks on this host's first GPU(s): NCCL first (NCCL >= 2.5 refuses two ranks on one GPU,
    "Duplicate GPU detected"; that refusal is recorded), then gloo on the same CUDA tensors."""
    backends = ["nccl", "gloo"] if device.type == "cuda" else ["gloo-cpu"]
    attempts = {}
    deadline = time.monotonic() + timeout
    for backend in backends:
        # A refusal comes at once; a success compiles (model and update), so NCCL gets a third of the time.
        left = deadline - time.monotonic()
        limit = left / 3 if backend == "nccl" else left
        result_path = workdir / f"dist_{backend}.json"
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                   "-m", "bench.gpu_check", "--dist-worker", backend, "--result", str(result_path)]
        env = {**os.environ, "NCCL_DEBUG": "WARN", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            output, code = proc.communicate(timeout=limit)[0], proc.returncode
        except subprocess.TimeoutExpired:
            signal_pids([proc.pid, *descendants(proc.pid)], signal.SIGKILL)  # a hung NCCL init, say
            output, code = f"timed out after {limit:.0f}s", None
            proc.communicate()
        if code == 0 and result_path.exists():
            attempts[backend] = {**json.loads(result_path.read_text()), "ok": True}
        else:
            # The refusal if NCCL gave one, else the worker's exception (torchrun ends on a banner of "=").
            lines = [line.strip() for line in output.splitlines() if line.strip().strip("=")]
            reason = next((line for line in lines if "Duplicate GPU" in line), None) or next(
                (line for line in lines
                 if ("Error" in line or "error:" in line) and "ChildFailedError" not in line),
                lines[-1] if lines else "no output")
            attempts[backend] = {"ok": False, "exit": code, "reason": reason[-500:],
                                 "output_tail": lines[-40:]}
        if attempts[backend]["ok"]:
            break  # NCCL worked (two GPUs): the gloo fallback has nothing to add
    passed = any(a.get("ok") and a.get("replicas_identical") and a.get("state_sharded")
                 for a in attempts.values())
    return {"gpus": torch.cuda.device_count() if device.type == "cuda" else 0, "attempts": attempts,
            "passed": passed}
