"""The first-GPU check: every CUDA path phoenix has, measured in one offline command (scripts/gpu_check.sh).

    scripts/gpu_check.sh [--out gpu_check.json] [--budget-s 480]   # one GPU, at most ~8 minutes
    scripts/gpu_check.sh --cpu                                     # the same parts at tiny CPU sizes

Each part (bench/gpu_probes.py) runs in a process of its own under its own time limit, so a hung
compile or a crashed CUDA context costs that part only; its outcome (passed / failed / timeout /
skipped, with the error's last lines) goes into the JSON file, rewritten after every part. The last
line printed is a one-line summary. Exit status 0 only when every part passed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Part:
    name: str
    cap_s: float  # the most this part may take
    args: dict[str, Any]  # passed to its probe


# In priority order: a part starts only when the overall budget still has its min_start_s. The device
# batch parts time compiled steps (tok/s, MFU, peak memory) at auto's choice per card, the whole card
# included: they replace the throughput parts at a fixed batch of 16. Each card is a compile or two, so
# within 480 s the parts after resume_1proc may not start: `--only` runs them in a second call.
GPU_PARTS = [
    Part("env", 30, {}),
    Part("device_batch_d20", 170, dict(depth=20, cards=[141, 80, 40, 24])),  # the whole card first
    Part("oom_relaunch", 75, {}),
    Part("device_batch_d12", 90, dict(depth=12, cards=[24, 40, 80])),
    Part("resume_1proc", 130, dict(nproc=1)),
    Part("checkpoint_d20", 75, dict(depth=20, vocab=32768)),  # ~6 GB of state, written 4 times
    Part("compile", 90, {}),
    Part("bf16", 30, {}),
    Part("fp8", 60, {}),
    Part("two_process", 90, {}),
    Part("save_d20", 90, dict(depth=20, vocab=32768, processes=1)),  # the trainer's save, call to published
    Part("relaunch_warm", 180, dict(args=[])),  # tiny preset, compiled on CUDA: warm vs cold inductor cache
]
CPU_PARTS = [
    Part("env", 60, {}),
    Part("compile", 240, {}),
    Part("bf16", 60, {}),
    Part("fp8", 30, {}),
    Part("throughput_tiny", 120, dict(depth=2, batch=2, seq=64, vocab=512, aspect=32, head_dim=32, steps=5)),
    Part("checkpoint_tiny", 60, dict(depth=2, vocab=2048)),
    Part("resume_1proc", 180, dict(nproc=1)),
    Part("oom_relaunch", 120, {}),
    Part("two_process", 180, {}),
    Part("save_tiny", 60, dict(depth=2, vocab=2048, processes=1)),
    Part("relaunch_tiny", 120, dict(args=["--no-compile"])),  # the path only: eager, nothing to cache
]
MIN_START_S = 20


def run_part(name: str, args: dict[str, Any], cpu: bool, workdir: Path, timeout: float) -> dict[str, Any]:
    """In the part's own process: the probe for `name`."""
    import torch

    from bench import gpu_probes as probes

    device = torch.device("cpu" if cpu else "cuda")
    if name == "env":
        return probes.environment()
    if name == "compile":
        return probes.compile_check(device)
    if name == "bf16":
        return probes.bf16_check(device)
    if name == "fp8":
        return probes.fp8_check(device)
    if name.startswith("throughput"):
        return probes.throughput(device, **args)
    if name.startswith("device_batch"):
        from bench.device_batch import device_batch_check

        return device_batch_check(device, args["depth"], args["cards"], timeout)
    if name == "oom_relaunch":
        from bench.device_batch import oom_relaunch_check

        return oom_relaunch_check(device, workdir, 0.9 * timeout)
    if name.startswith("checkpoint"):
        return probes.checkpoint_stall(device, args["depth"], args["vocab"], workdir / "checkpoint")
    if name.startswith("save"):
        from bench.checkpoint import measure_emergency_save

        result = measure_emergency_save(args["depth"], args["vocab"], args["processes"], workdir / "save", 2)
        return {**result, "passed": result["emergency_save_s"] > 0}
    if name.startswith("relaunch"):
        from bench.relaunch import measure_relaunch

        return measure_relaunch(workdir / "relaunch", args["args"], device.type, 0.9 * timeout)
    # Inner limits a little under the part's, so a slow run is reported by the probe, not killed.
    if name.startswith("resume"):
        return probes.resume_check(device, workdir, args["nproc"], 0.9 * timeout)
    if name == "two_process":
        return probes.two_process_check(device, workdir, 0.9 * timeout)
    raise ValueError(f"unknown part {name}")


def _kill_tree(proc: subprocess.Popen) -> None:
    from entrypoint.launch.procs import descendants, signal_pids

    signal_pids([proc.pid, *descendants(proc.pid)], signal.SIGKILL)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def spawn_part(part: Part, cpu: bool, workdir: Path, timeout: float) -> dict[str, Any]:
    """Run one part in a child process; never raises: the outcome is in the returned record."""
    result_path = workdir / f"{part.name}.json"
    command = [sys.executable, "-m", "bench.gpu_check", "--part", part.name, "--workdir", str(workdir),
               "--result", str(result_path), "--timeout", str(timeout), *(["--cpu"] if cpu else [])]
    log_path = workdir / f"{part.name}.log"
    start = time.monotonic()
    with open(log_path, "w") as log_file:
        proc = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_tree(proc)
            code = None
    record: dict[str, Any] = {"seconds": round(time.monotonic() - start, 1), "budget_s": round(timeout)}
    if code is None:
        record["status"] = "timeout"
    elif code == 0 and result_path.exists():
        result = json.loads(result_path.read_text())
        record["status"] = "passed" if result.get("passed") else "failed"
        record["result"] = result
        return record
    else:
        record["status"] = "error"
        record["exit"] = code
    record["log_tail"] = log_path.read_text(errors="replace")[-2000:]
    return record


def summary_line(report: dict[str, Any]) -> str:
    parts = report["parts"]
    words = []
    env = parts.get("env", {}).get("result", {})
    words.append(f"{env.get('gpu', 'cpu')} torch={env.get('torch')} cuda={env.get('cuda_runtime')} "
                 f"nccl={env.get('nccl')} driver={env.get('driver')}")
    for name, record in parts.items():
        r = record.get("result", {})
        if record["status"] not in ("passed", "failed"):
            words.append(f"{name}={record['status']}")
        elif name.startswith("throughput"):
            mfu = f"{r['mfu_pct']}%" if r["mfu_pct"] is not None else "-"
            words.append(f"{name.split('_')[1]} {r['tok_per_sec']:,} tok/s mfu={mfu} "
                         f"optimizer={r['optimizer_pct']}%")
        elif name.startswith("device_batch"):
            picks = " ".join(f"{c['card_gib']:.0f}G:{c.get('device_batch', '-')}" for c in r.get("cards", []))
            full = next((c for c in reversed(r.get("cards", [])) if c.get("tok_per_sec")), {})
            nanochat = full.get("at_nanochat_device_batch")
            versus = f" vs {nanochat['tok_per_sec']:,} at {nanochat['device_batch']}" if nanochat else ""
            words.append(f"{name.split('_')[-1]} auto {picks} ({full.get('tok_per_sec', 0):,} tok/s{versus})")
        elif name == "oom_relaunch":
            launches = "->".join(map(str, r.get("device_batch_per_launch", [])))
            words.append(f"oom relaunch {launches} {record['status']}")
        elif name.startswith("checkpoint"):
            words.append(f"ckpt stall {r['async_stall_ms']:.0f} ms vs torch.save {r['sync_save_ms']:.0f} ms")
        elif name.startswith("save"):
            words.append(f"emergency save {r['emergency_save_s']:.1f} s on {r['processes']} proc")
        elif name.startswith("relaunch") and "relaunch_cold" in r:
            warm, cold = r["relaunch_warm"], r["relaunch_cold"]
            words.append(f"relaunch to first step warm {warm['launch_to_first_step_s']:.0f} s "
                         f"(compile {warm['compile_s']:.0f}) vs cold {cold['launch_to_first_step_s']:.0f} s "
                         f"(compile {cold['compile_s']:.0f})")
        elif name.startswith("resume"):
            how = "bitwise" if r.get("bitwise") else f"max_rel={r.get('after_resume_max_rel_diff')}"
            words.append(f"kill-9 resume from step {r.get('resumed_from')} {how} {record['status']}")
        elif name == "two_process":
            ok = [b for b, a in r["attempts"].items() if a.get("ok")]
            words.append(f"2proc ok={','.join(ok) or 'none'} {record['status']}")
        else:
            words.append(f"{name} {record['status']}")
    passed = sum(record["status"] == "passed" for record in parts.values())
    words.append(f"{passed}/{len(parts)} passed in {report['seconds']:.0f}s")
    return "gpu_check: " + " | ".join(words)


def check(cpu: bool, out: Path, budget_s: float, only: list[str] | None) -> int:
    parts = [p for p in (CPU_PARTS if cpu else GPU_PARTS) if not only or p.name in only]
    workdir = Path(tempfile.mkdtemp(prefix="phoenix-gpu-check-"))
    report: dict[str, Any] = {"mode": "cpu" if cpu else "cuda", "budget_s": budget_s, "workdir": str(workdir),
                              "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "parts": {}}
    start = time.monotonic()
    for part in parts:
        left = budget_s - (time.monotonic() - start)
        if left < MIN_START_S:
            report["parts"][part.name] = {"status": "skipped", "reason": f"{left:.0f}s of the budget left"}
        else:
            report["parts"][part.name] = spawn_part(part, cpu, workdir, min(part.cap_s, left))
        record = report["parts"][part.name]
        print(f"part={part.name} status={record['status']} seconds={record.get('seconds', 0)}", flush=True)
        report["seconds"] = round(time.monotonic() - start, 1)
        out.write_text(json.dumps(report, indent=1))
    report["summary"] = summary_line(report)
    out.write_text(json.dumps(report, indent=1))
    print(report["summary"], flush=True)
    return 0 if all(r["status"] == "passed" for r in report["parts"].values()) else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/gpu_check.sh", description=__doc__.splitlines()[0])
    parser.add_argument("--cpu", action="store_true", help="tiny sizes on the CPU (the suite runs this)")
    parser.add_argument("--out", type=Path, default=Path("gpu_check.json"), help="the JSON report")
    parser.add_argument("--budget-s", type=float, default=480, help="all parts together, in seconds")
    parser.add_argument("--only", default="", help="comma-separated part names (default: all)")
    parser.add_argument("--part", help=argparse.SUPPRESS)  # internal: run one part in this process
    parser.add_argument("--dist-worker", help=argparse.SUPPRESS)  # internal: one rank under torchrun
    parser.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--timeout", type=float, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.dist_worker:
        from bench.gpu_probes import dist_worker

        dist_worker(args.dist_worker, args.result)
        return 0
    if args.part:
        table = {p.name: p for p in (CPU_PARTS if args.cpu else GPU_PARTS)}
        result = run_part(args.part, table[args.part].args, args.cpu, args.workdir, args.timeout)
        args.result.write_text(json.dumps(result, indent=1))
        return 0
    if not args.cpu:
        import torch

        if not torch.cuda.is_available():
            print(f"error: torch {torch.__version__} sees no CUDA GPU: run this on a GPU host (docker run "
                  "--gpus all ...), or pass --cpu for the tiny CPU check", file=sys.stderr)
            return 2
    only = [name for name in args.only.split(",") if name]
    return check(args.cpu, args.out, args.budget_s, only)


if __name__ == "__main__":
    sys.exit(main())
