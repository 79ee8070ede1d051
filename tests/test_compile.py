"""The compile path the GPUs take, run on the CPU: inductor through the trainer's compute_setup.

torch.compile is on by default on CUDA (on the CPU only from depth-4-sized models up, never the tiny
preset the tests train), so without these a graph break, a compile error or a recompile per SFT batch
length would first show on a rented GPU. The probes are the ones
scripts/gpu_check.sh runs there (bench/gpu_probes.py), at the CPU's small geometry; a cold inductor
cache makes the module fixture take ~60 s on 2 cores (warm: ~15 s).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from bench.gpu_probes import COMPILE_RTOL, bf16_check, compile_check
from trainer.model import GPT, config_for_depth
from trainer.runtime import ConfigError, compiles, compiles_update
from trainer.sft import parse_sft_config
from trainer.train import parse_config

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def compiled() -> dict:
    return compile_check(CPU)


def test_compiled_base_steps_match_eager_in_one_graph(compiled):
    base = compiled["base"]
    # fp32 on CPU: inductor only fuses and reorders reductions, so 5 optimizer steps stay within 1e-5.
    assert base["max_rel_diff"] <= COMPILE_RTOL["cpu"], (base["compiled"], base["eager"])
    assert base["graphs"] == 1, "a graph break or recompile in the base step"


def test_sft_lengths_share_one_dynamic_graph_and_match_eager(compiled):
    sft = compiled["sft"]
    assert len(set(sft["lengths"])) == len(sft["lengths"]) > 4  # a new length every step
    assert sft["graphs"] == 1, f"{sft['graphs']} graphs for {len(sft['lengths'])} lengths: a recompile each"
    assert sft["max_rel_diff"] <= COMPILE_RTOL["cpu"], (sft["compiled"], sft["eager"])


@pytest.mark.parametrize("dynamic,graphs", [(False, 3), (True, 1)])
def test_the_graph_count_sees_a_recompile_per_length(dynamic, graphs):
    """The counter the two tests above rely on, on this torch: static shapes compile a graph per length,
    dynamic ones (what sft.py asks for) one for all."""
    from bench.gpu_probes import _graph_count

    torch._dynamo.reset()
    before = _graph_count()
    step = torch.compile(lambda x: (x * 2).sum(), backend="eager", dynamic=dynamic)
    for length in (8, 13, 21):
        step(torch.ones(2, length))
    assert _graph_count() - before == graphs


def test_bf16_autocast_steps_run_in_bf16_and_stay_near_fp32():
    result = bf16_check(CPU)
    assert result["bfloat16"]["matmul_dtypes"] == ["torch.bfloat16"]
    assert result["float32"]["matmul_dtypes"] == ["torch.float32"]
    assert result["passed"], result


def test_compile_flag_is_honest_on_every_device():
    cuda, cpu = torch.device("cuda"), CPU
    assert parse_config(["--preset", "tiny"]).compile == "auto"
    assert parse_config(["--preset", "tiny", "--compile"]).compile == "on"
    assert parse_sft_config(["--preset", "tiny", "--no-compile"]).compile == "off"
    assert compiles("auto", cuda) and not compiles("auto", cpu)
    with torch.device("meta"):  # shapes are enough to count FLOPs
        tiny = GPT(config_for_depth(2, 2048, 128, 32, 32)).estimate_flops_per_token()  # the tiny preset
        depth4 = GPT(config_for_depth(4, 8192, 512, 64, 128)).estimate_flops_per_token()
    assert not compiles("auto", cpu, tiny) and compiles("auto", cpu, depth4)  # the tiny CPU demo stays quick
    # The optimizer's update compiles with the model, on the CPU only at depth-4 sizes (not the probes').
    assert compiles_update("auto", cuda) and compiles_update("auto", cpu, depth4)
    assert not compiles_update("on", cpu, tiny) and not compiles_update("off", cpu, depth4)
    assert compiles("on", cpu) and not compiles("off", cuda)
    with pytest.raises(ConfigError, match="not allowed with"):  # one line, exit 2
        parse_config(["--preset", "tiny", "--compile", "--no-compile"])


# In a fresh interpreter, as the trainer starts: where inductor (and Triton inside it) will cache kernels.
CACHE_PROBE = """import sys
import trainer.train  # imports torch._dynamo, which sets TORCHINDUCTOR_CACHE_DIR to torch's default
from torch._inductor.runtime.cache_dir_utils import cache_dir, triton_cache_dir
from trainer.runtime import keep_compile_caches
keep_compile_caches(sys.argv[1])
print(cache_dir(), triton_cache_dir(0))
"""


def test_compiled_kernels_are_cached_on_the_volume_unless_a_folder_was_chosen(tmp_path):
    """A relaunch on the same volume finds the kernels its predecessor compiled (bench/relaunch.py)."""
    env = {k: v for k, v in os.environ.items() if k not in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR")}
    done = subprocess.run([sys.executable, "-c", CACHE_PROBE, str(tmp_path)], env=env, capture_output=True,
                          text=True, timeout=300)
    cache = tmp_path / "cache" / "torchinductor"
    assert done.returncode == 0 and done.stdout.split() == [str(cache), str(cache / "triton" / "0")], done
    chosen = tmp_path / "chosen"
    done = subprocess.run([sys.executable, "-c", CACHE_PROBE, str(tmp_path / "volume")],
                          env={**env, "TORCHINDUCTOR_CACHE_DIR": str(chosen)}, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0 and done.stdout.split()[0] == str(chosen), done
