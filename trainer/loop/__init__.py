"""The training loop (`train`), its setup (`runtime`), checkpoints, monitor and the `train` command line."""
