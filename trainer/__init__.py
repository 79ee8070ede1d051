"""phoenix trainer: the payload run under torchrun. Imports nothing heavy, so the sidecar can import
the torch-free checkpoint contract (trainer.checkpoint_layout, trainer.checkpoint_content) without
torch installed."""

__version__ = "0.1.0"
