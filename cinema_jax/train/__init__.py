"""Training: sharded jitted steps, orbax checkpoints with exact resume, progressive long-context stages.

``train_and_evaluate(config, workdir)`` is the library entry; ``cinema-jax train`` wraps it (``train.cli``).
"""

from cinema_jax.train.metrics import NonFiniteError
from cinema_jax.train.trainer import TrainResult, stages, train_and_evaluate

__all__ = ["NonFiniteError", "TrainResult", "stages", "train_and_evaluate"]
