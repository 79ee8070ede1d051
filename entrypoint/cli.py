"""The `phoenix` command line: one click group, one subcommand per job."""

from __future__ import annotations

import click

from entrypoint.demo.demo import demo_command
from entrypoint.hub.restore import restore_command
from entrypoint.launch.preflight import doctor_command
from entrypoint.launch.run import run_command
from entrypoint.launch.volume import health_command
from entrypoint.sidecar.loop import sync_command
from entrypoint.status import status_command
from entrypoint.tools.chat import chat_command
from entrypoint.tools.eval import eval_command
from entrypoint.tools.export import export_command
from entrypoint.tools.report import report_command
from trainer import __version__


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="phoenix")
def main() -> None:
    """Resumable nanochat-style pretraining on preemptible GPUs, with checkpoints safe on the HF Hub."""


main.add_command(demo_command)
main.add_command(run_command)
main.add_command(doctor_command)
main.add_command(health_command)
main.add_command(status_command)
main.add_command(sync_command)
main.add_command(restore_command)
main.add_command(chat_command)
main.add_command(export_command)
main.add_command(eval_command)
main.add_command(report_command)
