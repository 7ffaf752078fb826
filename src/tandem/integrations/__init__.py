"""Tandem inside other people's training loops (each module needs its framework installed).

* :mod:`tandem.integrations.lightning`: :class:`CodecDDPStrategy` (Lightning's DDP strategy with a
  Tandem codec as its comm hook, on CPU as well as CUDA) and :class:`CodecBytesLogger` (the
  codec's bytes sent in Lightning's logger). ``pip install 'tandem[lightning]'``.
* Accelerate needs no helper: register :func:`tandem.codecs.ddp_hook` on the model that
  ``accelerator.prepare`` returns (``examples/accelerate_codec.py``).

Nothing else in Tandem imports this package, and importing it imports no framework.
"""
