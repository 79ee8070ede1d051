"""The sidecar image has no torch: the CLI and everything `phoenix sync`/`restore`/`status` import must not
need it (the Docker e2e script checks the image; this catches a stray import in every CI run)."""

import subprocess
import sys

BLOCK_TORCH = "import sys; sys.modules['torch'] = None; sys.modules['numpy'] = None\n"


def test_sidecar_commands_import_and_run_without_torch(tmp_path):
    code = BLOCK_TORCH + (
        "import entrypoint.cli, entrypoint.sidecar.sync, entrypoint.hub.restore, entrypoint.status\n"
        "import entrypoint.launch.run\n"
        "from entrypoint.cli import main\n"
        "main(['status', '--no-hub', '--json'])\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={"NANOCHAT_BASE_DIR": str(tmp_path), "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr
    assert '"model_tag": "d26-hyperbolic"' in done.stdout


def test_blocking_torch_really_blocks_it():
    done = subprocess.run([sys.executable, "-c", BLOCK_TORCH + "import trainer.train"], capture_output=True,
                          text=True)
    assert done.returncode != 0 and "torch" in done.stderr
