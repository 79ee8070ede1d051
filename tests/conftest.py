"""Shared pytest fixtures. `hub`: a live local Hub (entrypoint.demo.localhub) for the real client; the marker
`credit_delayed` runs a storage test twice, with the Hub crediting squashed storage at once and much later."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from entrypoint.demo.localhub import LocalHub

HUB_USER = "phoenix-test"
HUB_TOKEN = "hf_localhub_phoenix_test_write"
CREDIT_DELAY_S = 3600.0  # storage a squash freed still counts for the rest of the test (the Hub: up to 36 h)

# huggingface_hub snapshots these variables when it is first imported, which happens after this module runs.
# The endpoint is a closed local port, so a call that escapes the `hub` fixture fails fast instead of reaching
# huggingface.co; the `hub` fixture then points the client at the live server.
os.environ["HF_ENDPOINT"] = "http://127.0.0.1:9"
os.environ.pop("HF_HUB_DISABLE_XET", None)  # large files go through Xet, as on the Hub (localhub speaks it)
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
os.environ.pop("HF_HUB_OFFLINE", None)
# On a cloud VM `phoenix run` would find its cloud and poll the real metadata server: tests that watch
# set PREEMPTION_WATCH and point PREEMPTION_METADATA_URL at a fake one on loopback.
os.environ["PREEMPTION_WATCH"] = "off"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "long: a check that repeats what faster tests cover, left out of the default run to keep "
        "it near 12 min; scripts/long_tests.sh runs them")
    config.addinivalue_line(
        "markers", "credit_delayed(fails=None): run with squashed storage credited at once, then after "
        f"{CREDIT_DELAY_S:.0f} s; `fails` names why the delayed run must fail (a strict xfail)")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    marker = metafunc.definition.get_closest_marker("credit_delayed")
    if marker is None:
        return
    fails = marker.kwargs.get("fails")
    marks = [pytest.mark.xfail(strict=True, reason=fails)] if fails else []
    metafunc.parametrize("credit_delay", [pytest.param(0.0, id="credit-at-once"),
                                          pytest.param(CREDIT_DELAY_S, id="credit-delayed", marks=marks)])


@pytest.fixture
def credit_delay() -> float:
    """Seconds the `hub` keeps counting storage a super-squash or LFS purge freed (0: at once)."""
    return 0.0


@dataclass
class Hub:
    server: LocalHub  # faults (fail_next, cut_next, down...), the Hub's terms (credit_delay_s...), counters
    url: str
    token: str  # write token of `user`
    user: str
    env: dict[str, str]  # full environment for subprocesses: HF_ENDPOINT, HF_TOKEN, HF_HOME, ...


@pytest.fixture
def hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, credit_delay: float) -> Iterator[Hub]:
    """A started LocalHub on 127.0.0.1 (random port, fresh data dir) and a client environment pointing at it.

    The environment is set in `os.environ` (subprocesses get `hub.env`) and in `huggingface_hub.constants`,
    the copy the already-imported client reads, so in-process code using the defaults reaches this server
    and a per-test HF_HOME, never huggingface.co or the user's cache.
    """
    from huggingface_hub import constants

    hf_home = tmp_path / "hf_home"
    with LocalHub(tmp_path / "hub_data", tokens={HUB_TOKEN: HUB_USER}) as server:
        server.credit_delay_s = credit_delay
        settings = {
            "HF_ENDPOINT": server.url,
            "HF_TOKEN": HUB_TOKEN,
            "HF_HOME": str(hf_home),
            "HF_HUB_DISABLE_TELEMETRY": "1",
        }
        for key, value in settings.items():
            monkeypatch.setenv(key, value)
        for key in ("HF_HUB_DISABLE_XET", "HF_HUB_OFFLINE", "HF_HUB_CACHE", "HF_TOKEN_PATH",
                    "HUGGING_FACE_HUB_TOKEN"):
            monkeypatch.delenv(key, raising=False)
        patched = {
            "ENDPOINT": server.url,
            "HUGGINGFACE_CO_URL_TEMPLATE": server.url + "/{repo_id}/resolve/{revision}/{filename}",
            "HF_HUB_DISABLE_XET": False,
            "HF_HUB_DISABLE_TELEMETRY": True,
            "HF_HUB_OFFLINE": False,
            "HF_HOME": str(hf_home),
            "HF_HUB_CACHE": str(hf_home / "hub"),
            "HF_TOKEN_PATH": str(hf_home / "token"),
            "HF_STORED_TOKENS_PATH": str(hf_home / "stored_tokens"),
        }
        for key, value in patched.items():
            monkeypatch.setattr(constants, key, value)
        yield Hub(server=server, url=server.url, token=HUB_TOKEN, user=HUB_USER, env=dict(os.environ))
