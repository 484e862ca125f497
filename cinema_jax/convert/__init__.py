"""Weight converters from PyTorch / diffusers / BFL checkpoints to Flax parameters (flux.py, skyreels.py)."""
