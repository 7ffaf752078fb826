"""The user's job as every strategy runs it: model, optimizer, data, gradients, evaluation.

Keeping these in one place is what makes strategies comparable: the same seeds give the same
initial model and the same minibatch sequence whatever the strategy, so differences in a
comparison come from the synchronisation method alone.
"""

from tandem.trainer.evaluate import evaluate, evaluate_shard, is_eval_step
from tandem.trainer.precision import Precision, step_optimizer
from tandem.trainer.screen import check_finite, raise_non_finite, screen_gradients
from tandem.trainer.spec import TrainSpec, apply_workload_defaults, training_spec
from tandem.trainer.stragglers import ComputeFaults
from tandem.trainer.trainer import (
    LocalTrainer,
    build_model,
    build_optimizer,
    shard_indices,
    total_steps,
)

__all__ = ["ComputeFaults", "LocalTrainer", "Precision", "TrainSpec", "apply_workload_defaults",
           "build_model", "build_optimizer", "check_finite", "evaluate", "evaluate_shard",
           "is_eval_step", "raise_non_finite", "screen_gradients", "shard_indices",
           "step_optimizer", "total_steps", "training_spec"]
