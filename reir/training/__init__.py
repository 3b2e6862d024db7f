"""Training: the loop, its configuration and recipe, numeric precision, checkpoints, devices and torchrun."""
