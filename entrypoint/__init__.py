"""phoenix entrypoint: restore, resume, launch, Hub sync and the `phoenix` CLI around the trainer."""
