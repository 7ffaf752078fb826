"""The emulated link's configuration (``--net``), apart from :mod:`tandem.config` so that the
link's options can grow without the run configuration's module growing with them."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from tandem.units import parse_bytes, parse_duration, parse_rate

_NET_OPTIONS = {"hosts": ("hosts", int), "duplex": ("duplex", float),  # option: (field, parser)
                "duplex_after": ("duplex_after_s", parse_duration),
                "collective": ("collective", float), "burst": ("burst_bytes", parse_bytes)}


class NetConfig(BaseModel):
    """An emulated full-duplex link per process: bandwidth (bit/s), one-way latency, jitter (s).

    ``hosts``: emulate that many hosts instead, each with one such link that its processes
    share; what they send each other stays on the host and costs nothing. Rank ``r`` runs on
    host ``r % hosts``: under the local launcher (workers first, then servers or agents) server
    or agent ``i`` shares host ``i`` with worker ``i``, as torchrun places them one per node.
    Local launcher only (under torchrun the processes are on their nodes already).

    ``duplex``: a message comes in that many times slower while the link sends (1: ideal; TCP on
    shaped links: ``bench/p2p``), once it has sent ``duplex_after_s`` (a shaper's burst lets a
    short transfer through unqueued); ``collective``: likewise for an all-reduce (both ways),
    see :mod:`tandem.transport.shaping`.

    ``burst_bytes`` (``burst=4125b``): the link is a token bucket of that size, as a ``tc tbf``
    shaper or a cloud VM's rate limit is: after the link idles, up to that many bytes leave at
    once, and only what follows waits for the line rate. 0 (the default): every byte does."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    bandwidth_bps: float = Field(gt=0)
    latency_s: float = Field(default=0.0, ge=0)
    jitter_s: float = Field(default=0.0, ge=0)
    hosts: int | None = Field(default=None, ge=1)
    duplex: float = Field(default=1.0, ge=1.0, le=10.0)
    duplex_after_s: float = Field(default=0.0, ge=0)
    collective: float = Field(default=1.0, ge=1.0, le=10.0)
    burst_bytes: int = Field(default=0, ge=0)

    @classmethod
    def parse(cls, text: str) -> NetConfig:
        link, *options = text.split(",")
        parts = link.split(":")
        if not 1 <= len(parts) <= 3:
            raise ValueError(
                f"net {text!r}: expected BANDWIDTH[:LATENCY[:JITTER]][,OPTION=VALUE...], "
                "e.g. 100mbit:1ms")
        lat = parse_duration(parts[1]) if len(parts) > 1 else 0.0
        jit = parse_duration(parts[2]) if len(parts) > 2 else 0.0
        extra: dict[str, float] = {}
        for option in options:
            key, _, value = (x.strip() for x in option.partition("="))
            try:
                name, parse = _NET_OPTIONS[key]
                extra[name] = parse(value)
            except (KeyError, ValueError) as err:
                what = "bad value in" if isinstance(err, ValueError) else "unknown option"
                raise ValueError(f"net {text!r}: {what} {option!r}; the options are hosts=N "
                                 "(N emulated hosts), duplex=X (in X times slower while sending), "
                                 "duplex_after=DURATION (once sending that long), collective=X, "
                                 "burst=SIZE (a token bucket's, e.g. 4kb)"
                                 ) from None
        return cls(bandwidth_bps=parse_rate(parts[0]), latency_s=lat, jitter_s=jit, **extra)

    @property
    def bytes_per_s(self) -> float:
        return self.bandwidth_bps / 8.0
