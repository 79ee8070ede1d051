"""The trainer container's entrypoint, `phoenix run`: preflight, the volume's lock, status and failure files,
restore, prepare, and the torchrun launcher that relays and stops the stage processes."""
