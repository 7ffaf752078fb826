"""A plan's outputs: the ranked table, the plot of step time against N, the recommendation.

The table has one row per method x codec, ranked by the predicted step time at ``rank_at``
workers (default the largest N asked for), best first; ``local`` (one process, nothing sent) is
printed under it as the floor no method beats. The plot draws, per method, its best codec at
``rank_at`` against N on log-log axes, with ``allreduce`` + ``dense`` as the reference. The
recommendation is one paragraph generated from the numbers: the fastest configuration, how much
of the reference's step is communication, and what an exact method (same mathematics as
single-machine SGD) costs instead; a method within 10% of the fastest that is exact is preferred
(``EXACT_MARGIN``), and one whose workers run more than ``STALE_LIMIT`` steps ahead of the model
they update (bsp_shared's superstep, the candidate's steps per push) is named but not picked.

What the numbers cannot say: how many steps each configuration needs. Compressed codecs (with
error feedback) and asynchronous methods (candidate parameter server, bsp_shared, gossip) change
the optimisation; check the accuracy of the pick with a short ``tandem train`` run.
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tandem.plan.delays import ComputeTime
from tandem.plan.measure import Profile
from tandem.plan.model import PlanOptions, Prediction
from tandem.plan.network import Network

#: methods whose update equals synchronous SGD on the global batch, with the dense codec
EXACT = ("allreduce", "param_server:sync", "coded_ps", "pipeline")
#: an exact method this close to the fastest is the pick
EXACT_MARGIN = 1.10
#: a method whose workers run further ahead of the model than this many steps is not picked
STALE_LIMIT = 8.0


def fmt_time(s: float) -> str:
    if s >= 1.0:
        return f"{s:.3g} s"
    if s >= 1e-3:
        return f"{s * 1e3:.3g} ms"
    return f"{s * 1e6:.3g} us"


def fmt_bytes(b: float) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if b >= size:
            return f"{b / size:.3g} {unit}"
    return f"{b:.0f} B"


@dataclass
class PlanResult:
    """Every prediction of one plan, and what it assumed."""

    predictions: list[Prediction]
    profile: Profile
    network: Network
    compute: ComputeTime
    options: PlanOptions
    workers: list[int]
    rank_at: int
    notes: list[str] = field(default_factory=list)

    # ---- lookups ----------------------------------------------------------------------------
    def at(self, n: int) -> list[Prediction]:
        """The predictions at ``n`` workers, fastest first (``local`` last)."""
        rows = [p for p in self.predictions if p.workers == n]
        return sorted(rows, key=lambda p: (p.method == "local", p.step_s))

    def get(self, method: str, codec: str, n: int) -> Prediction | None:
        for p in self.predictions:
            if (p.method, p.codec, p.workers) == (method, codec, n):
                return p
        return None

    def curves(self) -> dict[tuple[str, str], dict[int, Prediction]]:
        out: dict[tuple[str, str], dict[int, Prediction]] = defaultdict(dict)
        for p in self.predictions:
            out[(p.method, p.codec)][p.workers] = p
        return dict(out)

    # ---- table ------------------------------------------------------------------------------
    def table(self) -> str:
        """One row per method x codec, ranked at ``rank_at`` (``local``: the floor, last)."""
        curves = self.curves()
        order = [(p.method, p.codec) for p in self.at(self.rank_at)]
        head = ["#", "method", "codec", *[f"N={n}" for n in self.workers],
                f"sent/worker/step@{self.rank_at}", "compute/comm/idle"]
        cells = []
        for i, key in enumerate(order, 1):
            c = curves[key]
            p = c[self.rank_at]
            split = "/".join(f"{round(100 * x)}" for x in p.split) + " %"
            label = f"pipeline(K={self.options.models})" if key[0] == "pipeline" else key[0]
            cells.append(["floor" if key[0] == "local" else str(i), label, key[1],
                          *[fmt_time(c[n].step_s) if n in c else "-" for n in self.workers],
                          fmt_bytes(p.bytes_per_step), split])
        widths = [max(len(h), *(len(r[j]) for r in cells)) for j, h in enumerate(head)]
        lines = ["  ".join(h.ljust(w) for h, w in zip(head, widths, strict=True)),
                 "  ".join("-" * w for w in widths)]
        lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)) for r in cells]
        return "\n".join(lines)

    # ---- recommendation ---------------------------------------------------------------------
    def recommendation(self) -> str:
        """One paragraph: what to pick at ``rank_at`` workers and why, from the numbers."""
        n = self.rank_at
        every = [p for p in self.at(n) if p.method not in ("local", "pipeline")]
        rows = [p for p in every if p.extra.get("staleness_steps", 0) <= STALE_LIMIT]
        if not rows:
            return "Nothing to compare: no method besides local and pipeline was planned."
        best = rows[0]
        base = self.get("allreduce", "dense", n)
        exact = [p for p in rows if p.method in EXACT and p.codec == "dense"]
        pick = exact[0] if exact and exact[0].step_s <= EXACT_MARGIN * best.step_s else best
        what = self.compute.describe()
        parts = [f"At N={n} on {self.network.describe()}, with {fmt_time(self.compute.mean())} "
                 "of compute per worker step" + (f" ({what})" if "+" in what else "") + ":"]
        if base is not None:
            c, m, i = base.split
            parts.append(f"allreduce+dense would take {fmt_time(base.step_s)} per step, "
                         f"{round(100 * (m + i))}% of it communicating or waiting, sending "
                         f"{fmt_bytes(base.bytes_per_step)} per worker per step.")
        if every[0] is not best:
            s = every[0]
            parts.append(f"{s.method}+{s.codec} would take only {fmt_time(s.step_s)}, but its "
                         f"workers run about {s.extra['staleness_steps']:.0f} steps ahead of the "
                         f"model they update (more than {STALE_LIMIT:g}), which costs "
                         "convergence this model does not price.")
        lead = "The fastest within that bound" if every[0] is not best else "The fastest"
        parts.append(f"{lead} is {best.method}+{best.codec} at {fmt_time(best.step_s)}"
                     + (f" ({base.step_s / best.step_s:.3g}x faster than allreduce+dense)"
                        if base is not None and base.step_s > best.step_s else "")
                     + f", sending {fmt_bytes(best.bytes_per_step)}.")
        if pick is best:
            why = self._why(best)
            parts.append(f"I would pick {best.method}+{best.codec}: {why}")
            sync = [p for p in rows if p.method in EXACT]
            if sync and sync[0] is not best and sync[0].codec != "dense":
                q = sync[0]
                parts.append(f"The fastest synchronous option (no stale updates) is "
                             f"{q.method}+{q.codec} at {fmt_time(q.step_s)}.")
            if exact and exact[0] is not best:
                e = exact[0]
                parts.append(f"If you need exactly synchronous SGD, the best exact option is "
                             f"{e.method}+dense at {fmt_time(e.step_s)} "
                             f"({e.step_s / best.step_s:.3g}x slower).")
        else:
            parts.append(f"I would pick {pick.method}+dense ({fmt_time(pick.step_s)}): within "
                         f"{round(100 * (pick.step_s / best.step_s - 1))}% of the fastest, and "
                         "it computes exactly what synchronous SGD computes, so its accuracy "
                         "per step needs no checking.")
        pipe = [p for p in self.at(n) if p.method == "pipeline"]
        if pipe and base is not None and pipe[0].step_s < 0.9 * base.step_s:
            parts.append(f"Training {self.options.models} models at once (a sweep), pipeline+"
                         f"{pipe[0].codec} takes {fmt_time(pipe[0].step_s)} per model step.")
        if best.codec != "dense" or best.method not in EXACT:
            parts.append("Step time is not time to accuracy: check the pick's accuracy with a "
                         "short `tandem train` run before renting the cluster.")
        return " ".join(parts)

    def _why(self, p: Prediction) -> str:
        c, m, i = p.split
        reasons = []
        if p.method == "param_server:candidate":
            reasons.append("its workers never wait for the server (the round trip of "
                           f"{fmt_time(p.extra.get('round_trip_s', 0.0))} hides behind "
                           f"{p.extra.get('steps_per_push', 1)} local steps per push)")
        elif p.method == "bsp_shared":
            per = p.extra.get("grads_per_update", 0.0) / max(1, p.workers)
            reasons.append("its workers add into shared memory and never wait, so throughput is "
                           "the sum of their speeds; the price is that each update averages "
                           f"{p.extra.get('grads_per_update', 0.0):,.0f} gradients ({per:.2g} "
                           "per worker, up to one superstep stale): a larger effective batch")
        elif p.method == "gossip:goco":
            reasons.append("each peer waits only for its neighbours and a straggler costs at "
                           "most the deadline")
        elif p.codec != "dense":
            reasons.append(f"{p.codec} cuts the bytes the network must carry")
        reasons.append(f"it spends {round(100 * c)}% computing, {round(100 * m)}% "
                       f"communicating, {round(100 * i)}% idle")
        return "; ".join(reasons) + "."

    # ---- plot and record --------------------------------------------------------------------
    def plot(self, path: str | Path, title: str | None = None) -> Path:
        """Step time against N (log-log): each method's best codec at ``rank_at``."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        curves = self.curves()
        best: dict[str, Prediction] = {}
        for p in self.at(self.rank_at):
            best.setdefault(p.method, p)
        fig, ax = plt.subplots(figsize=(7.5, 5))
        styles = ["-", "--", "-.", ":"]
        markers = "os^vD<>pP*"
        colors = [c for i, c in enumerate(plt.get_cmap("tab10").colors) if i != 7]  # no grey
        ranked = sorted(best.items(), key=lambda kv: kv[1].step_s)
        for i, (method, p) in enumerate([kv for kv in ranked if kv[0] != "local"]):
            c = curves[(method, p.codec)]
            ns = sorted(c)
            label = f"pipeline(K={self.options.models})" if method == "pipeline" else method
            ax.plot(ns, [c[k].step_s for k in ns], styles[i % 4], marker=markers[i % 10],
                    color=colors[i % len(colors)], label=f"{label} + {p.codec}")
        if "local" in best:
            c = curves[("local", best["local"].codec)]
            ns = sorted(c)
            ax.plot(ns, [c[k].step_s for k in ns], ":", color="0.4", lw=1,
                    label="local (compute floor)")
        base = curves.get(("allreduce", "dense"))
        if base and best.get("allreduce", None) and best["allreduce"].codec != "dense":
            ns = sorted(base)
            ax.plot(ns, [base[k].step_s for k in ns], "k--", lw=1, label="allreduce + dense")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("workers N")
        ax.set_ylabel("predicted step time (s)")
        ax.set_title(title or f"{self.profile.workload}: {self.network.describe()}", fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8, loc="upper left")
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
        return path

    def record(self) -> dict[str, Any]:
        """Inputs and every prediction, JSON-ready."""
        return {"workload": self.profile.workload, "params": self.profile.params,
                "batch_size": self.profile.batch_size, "compute_s": self.compute.mean(),
                "compute": self.compute.describe(), "compute_measured": self.profile.measured,
                "network": self.network.describe(), "workers": self.workers,
                "rank_at": self.rank_at, "options": vars(self.options),
                "codecs": {n: {"ops": c.exchange_ops, "message_bytes": c.message_nbytes}
                           for n, c in self.profile.codecs.items()},
                "predictions": [p.as_dict() for p in self.predictions],
                "recommendation": self.recommendation(), "notes": self.notes}

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.record(), indent=1, default=str))
        return path
