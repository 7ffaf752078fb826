"""Any Tandem codec under Lightning's own DDP strategy, and its bytes in Lightning's logger.

    from tandem.integrations.lightning import CodecBytesLogger, CodecDDPStrategy

    strategy = CodecDDPStrategy("powersgd", {"rank": 2}, process_group_backend="gloo")
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy=strategy,
                        callbacks=[CodecBytesLogger()])
    trainer.fit(model)
    strategy.bytes_sent()   # what this rank's codec sent, as Tandem's byte meter counts it

Why a subclass rather than ``DDPStrategy(ddp_comm_state=..., ddp_comm_hook=...)``: Lightning
(checked in 2.6) registers ``ddp_comm_hook`` only when the device is CUDA and silently ignores it
on CPU; and :func:`tandem.codecs.ddp_hook` reads the rank and world from ``torch.distributed``,
which Lightning initialises only after the strategy exists (and in every process it launches).
:class:`CodecDDPStrategy` therefore builds the codec and the hook in each process once the model
is wrapped in ``DistributedDataParallel``, and registers it on any device. Everything else is
Lightning's ``DDPStrategy`` (keyword arguments are passed on to it); see
:mod:`tandem.codecs.ddp_hook` for overlap, buckets and the byte meter.
"""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.strategies import DDPStrategy

from tandem.codecs import Codec, ddp_hook, make_codec
from tandem.codecs.ddp_hook import CodecHookState


class CodecDDPStrategy(DDPStrategy):
    """Lightning's ``DDPStrategy`` whose gradient exchange is a Tandem codec.

    ``codec``: a codec name (made with ``options`` and ``seed`` in every process; the seed must
    be the same everywhere) or a :class:`~tandem.codecs.base.Codec` built in every process.
    ``total_steps``: the run length for codecs that need it (``lgc``); default: the trainer's
    ``max_steps`` when it is set. ``overlap``: exchange on a background thread while backward
    goes on (False: inside the hook call). After setup, :attr:`hook_state` is the hook's
    :class:`~tandem.codecs.ddp_hook.CodecHookState` (its ``transport.meter`` counts the bytes).
    """

    def __init__(self, codec: str | Codec = "dense", options: dict[str, Any] | None = None, *,
                 seed: int = 0, total_steps: int | None = None, overlap: bool = True,
                 **kwargs: Any) -> None:
        for taken in ("ddp_comm_state", "ddp_comm_hook", "ddp_comm_wrapper"):
            if kwargs.get(taken) is not None:
                raise ValueError(f"CodecDDPStrategy registers its own comm hook; drop {taken}= "
                                 "or use Lightning's DDPStrategy")
        super().__init__(**kwargs)
        self.codec, self.codec_options, self.codec_seed = codec, dict(options or {}), seed
        self.total_steps, self.overlap = total_steps, overlap
        self.hook_state: CodecHookState | None = None

    def configure_ddp(self) -> None:
        super().configure_ddp()  # wraps the model in DistributedDataParallel
        codec = self.codec
        if isinstance(codec, str):
            codec = make_codec(codec, self.codec_options, seed=self.codec_seed)
        total = self.total_steps
        trainer = self.lightning_module.trainer if self.lightning_module is not None else None
        if total is None and trainer is not None and trainer.max_steps > 0:
            total = trainer.max_steps
        if self.hook_state is not None:
            self.hook_state.close()
        self.hook_state, hook = ddp_hook(codec, total_steps=total, overlap=self.overlap)
        self.model.register_comm_hook(self.hook_state, hook)

    def bytes_sent(self) -> int:
        """Bytes this rank's codec has sent (0 before the first fit). With Lightning's default
        launcher every process runs the script, so each reads its own; with
        ``start_method="spawn"`` or ``"fork"`` the hook lives in the launched processes only
        (read the bytes from the logger, :class:`CodecBytesLogger`)."""
        return 0 if self.hook_state is None else int(self.hook_state.transport.meter.sent_total())

    def teardown(self) -> None:
        if self.hook_state is not None:
            self.hook_state.close()  # the exchange thread; the counts stay readable
        super().teardown()


class CodecBytesLogger(Callback):
    """Logs this rank's codec bytes sent so far as ``name`` after every training batch.

    The value goes through ``LightningModule.log`` (float64, exact up to 2**53 bytes), so it
    reaches every logger at the trainer's ``log_every_n_steps`` and ``trainer.callback_metrics``;
    rank 0's logger records rank 0's bytes (every rank sends the same except under the leader
    of ``lgc``). Does nothing unless the trainer's strategy is a :class:`CodecDDPStrategy`.
    """

    def __init__(self, name: str = "tandem/bytes_sent", prog_bar: bool = False) -> None:
        self.name, self.prog_bar = name, prog_bar

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        strategy = trainer.strategy
        if isinstance(strategy, CodecDDPStrategy):
            value = torch.tensor(strategy.bytes_sent(), dtype=torch.float64)
            pl_module.log(self.name, value, on_step=True, on_epoch=False, prog_bar=self.prog_bar,
                          batch_size=1)
