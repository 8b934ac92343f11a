"""A run on disk: its atomic writes (`files`), its directory and lock (`run`), and the
checkpoints that `--resume` continues from (`checkpoints`)."""
