#!/usr/bin/env bash
# skypilot.yaml's setup and run, on each node SkyPilot gives the job (also runnable by hand to debug).
#
#   scripts/skypilot.sh setup          install phoenix (unless the image has it); mount NFS_SHARE if set
#   scripts/skypilot.sh run [-- ...]   the sidecar (node 0) and `phoenix run [-- trainer flags]`
#   scripts/skypilot.sh env            the rendezvous phoenix gets from SkyPilot's node variables
#
# run's exit status is what SkyPilot's managed-job recovery acts on (skypilot.yaml, job_recovery):
#   0    the run finished, or a newer launch elsewhere took it over (fenced): the job SUCCEEDED
#   75   stopped before finishing (a preemption notice, a stop): recover_on_exit_codes relaunches it
#   1, 2 phoenix run's crash and error codes: retried up to max_restarts_on_errors
set -euo pipefail
cd "$(dirname "$0")/.."

PREEMPTED_EXIT=75  # EX_TEMPFAIL; skypilot.yaml lists it in recover_on_exit_codes
base="${NANOCHAT_BASE_DIR:-$HOME/nanochat}"
export NANOCHAT_BASE_DIR="${base/#\~/$HOME}"  # SkyPilot passes "~/nanochat" as written

# SKYPILOT_NUM_NODES / NODE_RANK / NODE_IPS (one per line, the head node first) / NUM_GPUS_PER_NODE ->
# phoenix's NNODES / NODE_RANK / MASTER_ADDR / NPROC_PER_NODE (unset: one process per visible GPU).
node_env() {
    export NNODES="${SKYPILOT_NUM_NODES:-1}" NODE_RANK="${SKYPILOT_NODE_RANK:-0}"
    MASTER_ADDR="$(printf '%s\n' "${SKYPILOT_NODE_IPS:-127.0.0.1}" | head -n 1)"
    export MASTER_ADDR
    if [ "${SKYPILOT_NUM_GPUS_PER_NODE:-0}" -gt 0 ]; then
        export NPROC_PER_NODE="$SKYPILOT_NUM_GPUS_PER_NODE"
    fi
}

# How `phoenix run` ended on this node, from its status file: finished | stopped | fenced | failed.
launch_outcome() {
    python3 - <<'EOF'
import json, os
from pathlib import Path
from entrypoint.launch.volume import status_path
path = status_path(Path(os.environ["NANOCHAT_BASE_DIR"]), os.environ.get("MODEL_TAG", "d26-hyperbolic"),
                   int(os.environ["NODE_RANK"]))
try:
    print(json.loads(path.read_text()).get("status", "failed"))
except (OSError, ValueError):
    print("failed")
EOF
}

case "${1:-}" in
setup)
    if [ -n "${NFS_SHARE:-}" ]; then
        command -v mount.nfs4 >/dev/null || { sudo apt-get update -q && sudo apt-get install -y -q nfs-common; }
        sudo mkdir -p "$NANOCHAT_BASE_DIR"
        mountpoint -q "$NANOCHAT_BASE_DIR" || sudo mount -t nfs4 \
            -o nfsvers=4.1,rsize=1048576,wsize=1048576,hard,timeo=600,retrans=2 "$NFS_SHARE" "$NANOCHAT_BASE_DIR"
        sudo chown "$(id -u):$(id -g)" "$NANOCHAT_BASE_DIR"
    fi
    mkdir -p "$NANOCHAT_BASE_DIR"
    command -v phoenix >/dev/null || python3 -m pip install --quiet "torch==2.13.0" -e ".[train]"
    ;;
env)
    node_env
    env | grep -E '^(NNODES|NODE_RANK|MASTER_ADDR|NPROC_PER_NODE|NANOCHAT_BASE_DIR)=' | sort
    ;;
run)
    shift
    node_env
    sidecar=
    if [ "$NODE_RANK" = 0 ] && [ -n "${HF_REPO_ID:-}" ]; then
        phoenix sync &
        sidecar=$!
    fi
    code=0
    phoenix run "$@" || code=$?
    if [ -n "$sidecar" ]; then
        kill -TERM "$sidecar" 2>/dev/null || true  # its final push: whatever the run left unpushed
        wait "$sidecar" || true
    fi
    if [ "$code" = 0 ]; then
        case "$(launch_outcome)" in
            finished | fenced) code=0 ;;
            stopped) code=$PREEMPTED_EXIT ;;
            *) code=2 ;;  # held by phoenix's crash-loop guard: the last launch's error stands
        esac
    fi
    exit "$code"
    ;;
*)
    echo "usage: $0 setup | run [-- trainer flags] | env" >&2
    exit 2
    ;;
esac
