"""Pre-flight: try the job on one batch before any worker starts.

A mistake in a model, a loss or a metric used to surface only after the workers had started, as a
worker's traceback seconds later. Here, in the launcher (and in each ``torchrun`` process before it
joins the group), the job is built and run once on one batch:

1. the workload builds (its data exists, its options are valid);
2. the model builds, twice, to the same weights for the same seed (every worker builds its own
   replica and the strategies that train replicas need them equal: all-reduce averages
   gradients, gossip's compressed copies and float16 average start from the initial model;
   not checked for a parameter server, whose workers take the server's parameters); the
   optimizer and schedule build from the step recipe;
3. one forward and backward under the run's precision: the loss must be a finite scalar;
4. every metric runs on a test batch and gives a ``(sum, count)`` with ``count > 0``
   (accuracy-like metrics must lie in [0, 1]);
5. the strategy checks the recipe (e.g. a parameter server needs one server to clip);
6. parameters that receive no gradient are named, with what the strategy does with them.

Problems come back as :class:`~tandem.errors.ConfigError` / :class:`~tandem.errors.DataError`
that say what to fix. It costs one batch of compute (well under a second on the bundled
workloads) plus building the workload once in the launcher.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from tandem.config import RunConfig
from tandem.errors import ConfigError, DataError, TandemError
from tandem.resolve import resolve
from tandem.telemetry.log import get_logger
from tandem.trainer import apply_workload_defaults, build_model, training_spec
from tandem.trainer.evaluate import shard_batches
from tandem.trainer.precision import Precision
from tandem.workloads import build_workload
from tandem.workloads.base import Workload

log = get_logger(__name__)


@dataclass
class Preflight:
    """What the check found: the config with the workload's defaults applied, the workload,
    and the names of parameters that got no gradient."""

    cfg: RunConfig
    workload: Workload
    unused: list[str] = field(default_factory=list)
    report: dict[str, Any] = field(default_factory=dict)


def preflight(cfg: RunConfig, workload: Workload | None = None) -> Preflight:
    """Run the checks of the module docstring; raise what a user must fix."""
    resolved = resolve(cfg, object_workload=workload is not None)
    work = workload if workload is not None else build_workload(cfg.workload, cfg.seed)
    cfg = apply_workload_defaults(cfg, work)
    spec = training_spec(cfg, work)
    resolved.strategy.check_training(cfg, resolved.strategy_options, spec)
    try:
        model = build_model(work, cfg.seed)
    except Exception as err:  # noqa: BLE001 - the user's factory: name it
        raise ConfigError(f"building the model failed: {type(err).__name__}: {err}") from err
    if resolved.strategy.needs_identical_start:
        _check_same_start(model, work, cfg.seed, resolved.strategy.name)
    opt = spec.make_optimizer(model)
    spec.make_scheduler(opt, max(1, cfg.steps or 1))
    precision = Precision(spec.precision, torch.device("cpu"))
    x, y = _one_batch(work, cfg.batch_size)
    model.train()
    try:
        with precision.autocast():
            out = model(x)
    except Exception as err:  # noqa: BLE001
        raise ConfigError(f"the model's forward failed on a training batch of inputs "
                          f"{_shape(x)}: {type(err).__name__}: {err}") from err
    try:
        with precision.autocast():
            loss = work.loss_fn(out, y)
    except Exception as err:  # noqa: BLE001
        raise ConfigError(f"loss_fn(output {_shape(out)}, target {_shape(y)}) failed: "
                          f"{type(err).__name__}: {err}. For sequence outputs (N, T, V) use "
                          "tandem.metrics.sequence_cross_entropy, or return (N, V, T) for "
                          "cross_entropy") from err
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        raise ConfigError(f"loss_fn must return a scalar tensor; it returned "
                          f"{_shape(loss) if isinstance(loss, torch.Tensor) else type(loss)}")
    first = float(loss.detach())
    if not math.isfinite(first):
        raise DataError(f"the loss of the first training batch is {first}: check the data "
                        "(NaN inputs?) and the model's initialisation")
    loss.backward()
    unused = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    if unused:
        log.warning("parameters that receive no gradient: %s; %s", unused,
                    resolved.strategy.unused_parameters_note())
    report = {"loss": float(loss.detach()), "output": _shape(out), "target": _shape(y),
              "training": spec.describe(), "unused_parameters": unused}
    report["metrics"] = _check_metrics(model, work)
    return Preflight(cfg, work, unused, report)


def _check_same_start(model: torch.nn.Module, work: Workload, seed: int, strategy: str) -> None:
    """Build the model a second time from ``seed`` and refuse the job if any parameter or
    buffer differs: each worker would start from other weights, and nothing later would say
    so (a NaN in the same place on both counts as equal)."""
    again = build_model(work, seed).state_dict()
    first = model.state_dict()
    for name, a in first.items():
        b = again.get(name)
        same = b is not None and a.shape == b.shape and a.dtype == b.dtype and (
            torch.equal(a, b) or (a.is_floating_point() and bool(
                ((a == b) | (a.isnan() & b.isnan())).all())))
        if not same:
            raise ConfigError(
                f"the model factory built different weights for the same seed ({seed}), first "
                f"at {name!r}: every {strategy} worker builds its own copy, so they would start "
                "apart. Draw the initial weights from torch's generator (Tandem seeds it just "
                "before calling the factory) or load fixed weights inside the factory")
    if set(again) - set(first):
        raise ConfigError(f"the model factory built different parameters for the same seed: "
                          f"{sorted(set(again) - set(first))} only the second time")


def _one_batch(work: Workload, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    data = work.train
    n = min(batch, len(data))
    if n == 0:
        raise DataError(f"workload {work.name}: the training set is empty")
    try:
        if hasattr(data, "x") and hasattr(data, "y"):
            return data.x[:n], data.y[:n]
        items = [data[i] for i in range(n)]
        collate = torch.utils.data.default_collate
        x, y = collate(items)
        return torch.as_tensor(x), torch.as_tensor(y)
    except TandemError:
        raise
    except Exception as err:  # noqa: BLE001
        raise DataError(f"workload {work.name}: reading a training batch failed: "
                        f"{type(err).__name__}: {err}") from err


@torch.no_grad()
def _check_metrics(model: torch.nn.Module, work: Workload) -> dict[str, float]:
    metrics = work.metric_fns()
    if not metrics or work.test is None:
        return {}
    model.eval()
    x, y = next(iter(shard_batches(work, 0, 1, batch=64)))
    out = model(x)
    got = {}
    for name, fn in metrics.items():
        try:
            s, n = fn(out, y)
        except Exception as err:  # noqa: BLE001
            raise ConfigError(f"metric {name!r}(output {_shape(out)}, target {_shape(y)}) "
                              f"failed: {type(err).__name__}: {err}") from err
        if float(n) <= 0:
            raise ConfigError(f"metric {name!r} returned a count of {float(n)}; a metric "
                              "returns (sum, count) with count > 0")
        value = float(s) / float(n)
        if "accuracy" in name and not 0.0 <= value <= 1.0:
            raise ConfigError(f"metric {name!r} gave {value:.4g} on a test batch, outside "
                              f"[0, 1]: output {_shape(out)} vs target {_shape(y)}; for "
                              "(N, T, V) outputs use tandem.metrics.token_accuracy")
        got[name] = value
    return got


def _shape(t: Any) -> str:
    return str(tuple(t.shape)) if hasattr(t, "shape") else type(t).__name__
