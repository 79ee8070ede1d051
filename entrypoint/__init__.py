"""phoenix's orchestration around the trainer: launch/ (`phoenix run`), hub/, sidecar/ (`phoenix sync`),
tools/ (chat, eval, export, report), demo/ (with the local Hub), and the CLI, status and logs beside them."""
