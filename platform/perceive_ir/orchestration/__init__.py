"""Ray Train around the training loop: job configs, run storage, the trainer, run naming and resume."""
