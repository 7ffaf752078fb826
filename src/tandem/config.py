"""The one validated run configuration.

A run is described by :class:`RunConfig`, built from a YAML file, CLI flags, or Python. Every field
is validated by pydantic; any invalid value raises :class:`~tandem.errors.ConfigError` naming the
field and the allowed values, never a traceback from deep inside a worker.

This module is pure data: it checks the *shape* of values and imports no plugin. Whether a named
strategy, codec or workload exists, whether its options are valid and whether they go together is
decided by :func:`tandem.resolve.resolve`, which the API and the worker entry call.

Compact string forms are accepted where users type them on a command line:

* ``net="100mbit:1ms"`` or ``"1gbit:200us:50us"`` (bandwidth, one-way latency, optional jitter),
  with options: ``"10mbit:1ms,hosts=4,duplex=1.4"`` (:class:`NetConfig`)
* ``stragglers="0.2:5"`` (p 0.2 a worker a step, 5x its compute), ``"0.2:exp:0.05"`` (mean 0.05 s)
* ``slow_workers=["1:3"]`` (rank 1 computes 3x slower)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from tandem.errors import ConfigError
from tandem.netconfig import NetConfig


class _Strict(BaseModel):
    # NaN or infinity in a rate, a timeout or a probability is always a typo or a bug upstream
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class StragglerConfig(_Strict):
    """Random stragglers: each worker, each step, is delayed with probability ``p``.

    ``kind="factor"``: the delay is ``factor`` x that step's compute time (a 5 means the step takes
    6x as long). ``kind="exp"``: the delay is drawn from an exponential with mean ``mean_s``.
    """

    p: float = Field(ge=0, le=1)
    kind: Literal["factor", "exp"] = "factor"
    factor: float = Field(default=1.0, ge=0)
    mean_s: float = Field(default=0.0, ge=0)

    @classmethod
    def parse(cls, text: str) -> StragglerConfig:
        parts = text.split(":")
        if len(parts) == 2:
            return cls(p=float(parts[0]), kind="factor", factor=float(parts[1]))
        if len(parts) == 3 and parts[1] == "exp":
            return cls(p=float(parts[0]), kind="exp", mean_s=float(parts[2]))
        raise ValueError(f"stragglers {text!r}: expected P:FACTOR (0.2:5) "
                         "or P:exp:MEAN_S (0.2:exp:0.05)")


class SlowWorker(_Strict):
    """A worker whose compute always takes ``factor`` x as long (``factor >= 1``)."""

    rank: int = Field(ge=0)
    factor: float = Field(ge=1)

    @classmethod
    def parse(cls, text: str) -> SlowWorker:
        parts = text.split(":")
        if len(parts) != 2:
            raise ValueError(f"slow worker {text!r}: expected RANK:FACTOR, e.g. 1:3")
        return cls(rank=int(parts[0]), factor=float(parts[1]))


class WorkloadConfig(_Strict):
    """Which workload (a registered one, or yours by import path), and how the training set is
    split over workers. ``name: package.module:function`` (or ``factory:`` in YAML) names your
    own: ``function(**options)`` returns a :class:`tandem.Workload`, and gets ``seed=`` too if it
    takes one."""

    name: str = Field(default="digits", min_length=1, description="a registered workload "
                      "(`tandem workloads`) or package.module:function")
    data_path: Path | None = None
    partition: Literal["iid", "label", "redundant"] = "iid"
    redundancy: int = Field(default=1, ge=1, description="d: how many workers hold each partition")
    labels_per_worker: int = Field(default=2, ge=1, description="for partition=label")
    options: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _factory(cls, v: Any) -> Any:
        if isinstance(v, dict) and "factory" in v:
            v = dict(v)
            factory = v.pop("factory")
            if "name" in v and v["name"] != factory:
                raise ValueError(f"give either name ({v['name']!r}) or factory ({factory!r})")
            v["name"] = factory
        return v

    @property
    def is_factory(self) -> bool:
        """Named by import path (``package.module:function``) rather than registered."""
        return ":" in self.name


class PluginConfig(_Strict):
    """A registered component (strategy or codec) by name, with its own options."""

    name: str
    options: dict[str, Any] = Field(default_factory=dict)


class OptimizerConfig(_Strict):
    """A built-in optimizer by name (``sgd``, ``adam``, ``adamw``) with extra keyword options
    (``betas``, ``eps``, ``nesterov`` ...); ``lr``, ``momentum`` (sgd) and ``weight_decay`` come
    from the run's own fields."""

    name: Literal["sgd", "adam", "adamw"]  # required: a default would replace a workload's own
    options: dict[str, Any] = Field(default_factory=dict)


class ScheduleConfig(_Strict):
    """The learning-rate schedule, stepped once per optimizer step: ``constant``, ``cosine``
    (to ``min_lr_ratio`` x lr at the last step) or ``linear`` (likewise), after ``warmup_steps``
    of linear warm-up from 0. String form: ``cosine`` or ``cosine:WARMUP_STEPS``."""

    name: Literal["constant", "cosine", "linear"] = "constant"
    warmup_steps: int = Field(default=0, ge=0)
    min_lr_ratio: float = Field(default=0.0, ge=0, le=1)

    @classmethod
    def parse(cls, text: str) -> ScheduleConfig:
        name, _, warm = text.partition(":")
        if warm and not warm.strip().isdigit():
            raise ValueError(f"schedule {text!r}: expected NAME[:WARMUP_STEPS], e.g. cosine:100")
        return cls(name=name.strip(), warmup_steps=int(warm) if warm else 0)


class RunConfig(_Strict):
    """Everything one run needs. See ``tandem train --help`` for each field's CLI flag."""

    name: str | None = None
    out: Path | None = None
    workload: WorkloadConfig = Field(default_factory=WorkloadConfig)
    strategy: PluginConfig = Field(default_factory=lambda: PluginConfig(name="allreduce"))
    codec: PluginConfig = Field(default_factory=lambda: PluginConfig(name="dense"))
    workers: int = Field(default=2, ge=1, le=1024)
    steps: int | None = Field(default=None, ge=1)
    epochs: float | None = Field(default=None, gt=0)
    batch_size: int = Field(default=32, ge=1)
    lr: float = Field(default=0.05, gt=0)
    momentum: float = Field(default=0.0, ge=0, lt=1)
    weight_decay: float = Field(default=0.0, ge=0)
    optimizer: OptimizerConfig | None = Field(
        default=None, description="sgd | adam | adamw; default: the workload's own, else sgd")
    schedule: ScheduleConfig | None = Field(
        default=None, description="LR schedule; default: the workload's own, else constant")
    clip_grad_norm: float | None = Field(
        default=None, gt=0, description="clip the aggregated gradient's global norm to this")
    accumulation: int | None = Field(default=None, ge=1,
                                     description="micro-batches per optimizer step")
    precision: Literal["fp32", "bf16", "fp16"] | None = Field(
        default=None, description="fp32; bf16 autocast (CPU or GPU); fp16 (GPU, grad scaler)")
    seed: int = Field(default=0, ge=0, lt=2**63, description="seeds numpy and torch generators")
    net: NetConfig | None = None
    stragglers: StragglerConfig | None = None
    slow_workers: list[SlowWorker] = Field(default_factory=list)
    target_accuracy: float | None = Field(default=None, gt=0, le=1)
    eval_every: int = Field(default=0, ge=0, description="steps between evaluations; 0 = auto")
    tensorboard: bool = False
    progress: bool = True
    timeout_s: float = Field(default=60.0, gt=0, description="the longest any wait may last")
    backend: Literal["auto", "gloo", "nccl"] = "auto"
    master_addr: str = "127.0.0.1"
    nan_policy: Literal["skip", "stop"] = "stop"
    stop_on_divergence: bool = False
    checkpoint_every: int = Field(default=0, ge=0, description="steps between checkpoints; 0 = off")
    resume: bool = Field(default=False, description="continue from the run directory's checkpoint")
    inject_nan: list[tuple[int, int]] = Field(
        default_factory=list, description="fault injection for tests: (rank, step) pairs whose "
        "gradient is replaced by NaN")
    inject_crash: list[tuple[int, int]] = Field(
        default_factory=list, description="fault injection for tests: (rank, step) pairs at which "
        "that worker kills itself with SIGKILL (not when resuming)")
    threads_per_worker: int = Field(default=1, ge=1)

    @field_validator("net", mode="before")
    @classmethod
    def _net(cls, v: Any) -> Any:
        return NetConfig.parse(v) if isinstance(v, str) else v

    @field_validator("stragglers", mode="before")
    @classmethod
    def _stragglers(cls, v: Any) -> Any:
        return StragglerConfig.parse(v) if isinstance(v, str) else v

    @field_validator("slow_workers", mode="before")
    @classmethod
    def _slow(cls, v: Any) -> Any:
        v = _listed(v)
        if not isinstance(v, list | tuple):
            return v  # pydantic reports the wrong type
        return [SlowWorker.parse(s) if isinstance(s, str) else s for s in v]

    @field_validator("inject_nan", "inject_crash", mode="before")
    @classmethod
    def _nan(cls, v: Any) -> Any:
        v = _listed(v)
        if not isinstance(v, list | tuple):
            return v
        out = []
        for s in v:
            if isinstance(s, str):
                parts = s.split(":")
                if len(parts) != 2 or not all(p.strip().lstrip("-").isdigit() for p in parts):
                    raise ValueError(f"{s!r}: expected RANK:STEP, e.g. 1:10")
                s = (int(parts[0]), int(parts[1]))
            out.append(s)
        return out

    @field_validator("optimizer", mode="before")
    @classmethod
    def _optimizer(cls, v: Any) -> Any:
        return {"name": v} if isinstance(v, str) else v

    @field_validator("schedule", mode="before")
    @classmethod
    def _schedule(cls, v: Any) -> Any:
        return ScheduleConfig.parse(v) if isinstance(v, str) else v

    @field_validator("strategy", "codec", mode="before")
    @classmethod
    def _plugin(cls, v: Any) -> Any:
        return {"name": v} if isinstance(v, str) else v

    @model_validator(mode="after")
    def _check(self) -> RunConfig:
        for sw in self.slow_workers:
            if sw.rank >= self.workers:
                raise ValueError(f"slow_workers: rank {sw.rank} >= workers ({self.workers})")
        if self.workload.redundancy > self.workers:
            raise ValueError(
                f"workload.redundancy: {self.workload.redundancy} exceeds workers ({self.workers})"
            )
        return self

    # ---- derived values -------------------------------------------------------------------
    def run_name(self) -> str:
        return self.name or \
            f"{self.workload.name}-{self.strategy.name}-{self.codec.name}-w{self.workers}"

    def run_dir(self) -> Path:
        return Path(self.out) if self.out else Path("runs") / self.run_name()

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def _listed(v: Any) -> Any:
    """A list field's value: ``None`` -> ``[]``, ``"a,b"`` -> ``["a", "b"]``, else as it is."""
    return [] if v is None else [s for s in v.split(",") if s] if isinstance(v, str) else v


def _format_validation_error(err: ValidationError, what: str = "invalid configuration") -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"])
        msg = e["msg"].removeprefix("Value error, ")
        lines.append(f"{loc}: {msg}" if loc else msg)  # a whole-config check names its fields
    # one line, so a command line error is one red line naming every field at fault
    return f"{what}: " + "; ".join(lines)


def load_config(data: dict[str, Any] | None = None, path: str | Path | None = None,
                **overrides: Any) -> RunConfig:
    """Build a :class:`RunConfig` from a YAML file, a dict and keyword overrides (in that order).

    Overrides use dotted keys for nested fields: ``load_config(**{"codec.options.ratio": 0.01})``.
    Raises :class:`ConfigError` with every problem listed, on one line.

    Plugins (strategy, codec, workload): ``codec.name`` naming another codec than the file's
    replaces it *with its options* (``ratio`` means nothing to fp16); ``codec.options.KEY``
    amends the codec in force (overridden, else the file's, else the default). Names first.
    """
    merged: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {p} does not exist")
        try:
            loaded = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {p} is not valid YAML: {exc}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {p} must hold a mapping at its top level")
        merged.update(loaded)
    if data:
        merged.update(data)
    given = {k: v for k, v in overrides.items() if v is not None}
    for key in sorted(given, key=lambda k: k not in _PLUGIN_NAMES):  # names first (stable)
        _set_dotted(merged, key, given[key])
    try:
        return RunConfig.model_validate(merged)
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err)) from None


_PLUGINS = ("strategy", "codec", "workload")  # the sections that name a plugin
_PLUGIN_NAMES = tuple(f"{p}.name" for p in _PLUGINS)


def _set_dotted(target: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    cur = target
    for i, p in enumerate(parts[:-1]):
        nxt = cur.get(p)
        plugin = i == 0 and p in _PLUGINS
        if isinstance(nxt, str) and plugin:
            nxt = {"name": nxt}
        if not isinstance(nxt, dict):
            nxt = {}
        default = plugin and RunConfig.model_fields[p].default_factory().name  # type: ignore
        if plugin and p != "workload" and "name" not in nxt:
            nxt = {"name": default, **nxt}  # options alone: for the default plugin
        if plugin and parts[1:] == ["name"]:
            old = nxt.get("name", nxt.get("factory", default))
            # the new name replaces a YAML `factory:`; another plugin drops the old one's options
            nxt = {k: v for k, v in nxt.items()
                   if k != "factory" and (k != "options" or old == value)}
        cur[p] = nxt
        cur = nxt
    cur[parts[-1]] = value


def parse_options(pairs: list[str] | None) -> dict[str, Any]:
    """``["ratio=0.01", "variant=ps"]`` -> ``{"ratio": 0.01, "variant": "ps"}`` (YAML scalars)."""
    out: dict[str, Any] = {}
    for pair in pairs or []:
        if "=" not in pair:
            raise ConfigError(f"option {pair!r}: expected KEY=VALUE, e.g. ratio=0.01")
        k, v = pair.split("=", 1)
        try:
            out[k.strip()] = yaml.safe_load(v)
        except yaml.YAMLError:
            out[k.strip()] = v
    return out
