"""The trained model every run leaves behind: ``runs/<name>/model.pt``, and loading it back.

``model.pt`` holds the full ``state_dict`` (parameters *and* buffers) of the run's final model
and what is needed to rebuild the module: the workload as the config names it and the seed. Which
model is "final" depends on the strategy (each strategy's page says): the workers' common model
(``allreduce``, ``pipeline`` per variant, ``local``), the parameter server's global model as the
workers hold it after the final pull, the BSP controller's model, the coded server's model, and
for ``gossip`` the network average of the peers' parameters (each peer's own with
``--strategy-opt save_peers=true``: ``model.peer<R>.pt``).

A workload passed to :func:`tandem.train` as an object has no name to rebuild it from; the job
then also writes ``model_fn.pkl`` (the model factory, pickled by value when it lives in a script
or a notebook), which :func:`load_model` uses. Loading that file runs code: only load run
directories you trust (``model.pt`` itself loads with ``weights_only=True``).
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any

import torch

from tandem.errors import CheckpointError

FORMAT = "tandem-model/1"
FACTORY_FILE = "model_fn.pkl"


def save_final_model(run_dir: Path | str, model: torch.nn.Module, cfg: Any, *,
                     name: str = "model.pt", **meta: Any) -> Path:
    """Write ``model``'s full state_dict (atomically) with the workload it rebuilds from."""
    path = Path(run_dir) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    payload = {"format": FORMAT, "state_dict": state,
               "workload": cfg.workload.model_dump(mode="json"), "seed": int(cfg.seed),
               "strategy": cfg.strategy.name, **meta}
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)
    return path


def save_model_factory(run_dir: Path | str, model_fn: Any) -> None:
    """``model_fn.pkl`` for a workload given as an object (see the module docstring)."""
    import cloudpickle

    path = Path(run_dir) / FACTORY_FILE
    path.write_bytes(cloudpickle.dumps(model_fn))


def load_model(run_dir: Path | str, *, peer: int | None = None, model_fn: Any = None,
               map_location: str | torch.device = "cpu") -> torch.nn.Module:
    """The trained model of a finished run, as an ``nn.Module`` in eval mode.

    ``peer``: a gossip peer's own model (written with ``save_peers=true``). ``model_fn``: the
    factory to build the module with, when the run's workload was passed as an object and you
    would rather not unpickle ``model_fn.pkl``.
    """
    run_dir = Path(run_dir)
    path = run_dir / ("model.pt" if peer is None else f"model.peer{peer}.pt")
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist: the run did not finish, or it predates "
                              "final models (checkpoints are under checkpoints/)")
    try:
        payload = torch.load(path, weights_only=True, map_location=map_location)
    except Exception as err:  # noqa: BLE001 - any unpickling failure means corrupt
        raise CheckpointError(f"{path} is corrupt or unreadable: {err}") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a Tandem model file")
    if model_fn is None:
        model_fn = _model_fn(run_dir, payload)
    torch.manual_seed(int(payload.get("seed", 0)))
    model = model_fn()
    model.load_state_dict(payload["state_dict"])
    return model.eval()


def _model_fn(run_dir: Path, payload: dict[str, Any]) -> Any:
    pickled = run_dir / FACTORY_FILE
    if pickled.is_file():
        return pickle.loads(pickled.read_bytes())  # noqa: S301 - the user's own run directory
    from tandem.config import WorkloadConfig
    from tandem.workloads import build_workload

    cfg = WorkloadConfig.model_validate(payload["workload"])
    return build_workload(cfg, int(payload.get("seed", 0))).model_fn
