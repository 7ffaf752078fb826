"""The command line at its edges: bad input is refused before anything starts, with exit status 2
and one line naming the flag; plugin flags combine with a YAML config as documented; the help and
the listings explain every flag and option.

Nothing here trains or simulates for long: the functions that would launch (``tandem.api.train``,
``tandem.sweep.run_sweep``, ``tandem.sim.study``) are replaced by recorders, so a test sees what
would have started, or that nothing did.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import typer.main
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

import tandem.api
import tandem.sim
import tandem.sweep
from tandem.cli import app

RUN = CliRunner()


class Launches:
    """Records what the CLI would have started."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def sim(self, base, ps, ds):
        self.calls.append((base, list(ps), list(ds)))
        return {}

    def sweep(self, base, variants, bucket_mb=0.0):
        self.calls.append((base, variants, bucket_mb))
        return {"table": "", "run_dir": Path("runs/never")}

    def train(self, cfg):
        self.calls.append((cfg,))
        return {}


@pytest.fixture
def launches(monkeypatch) -> Launches:
    rec = Launches()
    monkeypatch.setattr(tandem.sim, "study", rec.sim)
    monkeypatch.setattr(tandem.sim, "plot_study", lambda results, path: Path(path))
    monkeypatch.setattr(tandem.sim, "save_study", lambda results, path: Path(path))
    monkeypatch.setattr(tandem.sweep, "run_sweep", rec.sweep)
    monkeypatch.setattr(tandem.api, "train", rec.train)
    return rec


def _refused(result, *flags: str) -> str:
    """The result is a refusal: status 2, one line, no traceback, naming one of ``flags``."""
    text = result.output.strip()
    assert result.exit_code == 2, (result.exit_code, text, result.exception)
    assert "\n" not in text and text.startswith("error: "), text
    assert "Traceback" not in text
    assert any(f in text for f in flags), (flags, text)
    return text


# ---- tandem sim goco -------------------------------------------------------------------------
@pytest.mark.parametrize("args, flag, allowed", [
    (["--p", "1.5"], "--p", "[0, 1)"),
    (["--p", "0.1,abc"], "--p", "'abc'"),
    (["--devices", "0"], "--devices", "1 to 4096"),
    (["--steps", "0"], "--steps", "at least 1"),
    (["--d", "5", "--devices", "4"], "--d", "1 to --devices (4)"),
    (["--lr", "nan"], "--lr", "positive finite"),
    (["--topology", "moebius"], "--topology", "exponential"),
    (["--samples", "10", "--dim", "2", "--devices", "64"], "--samples", "one sample per device"),
    (["--devices", "abc"], "--devices", "valid integer"),
])
def test_sim_goco_refuses_bad_flags_before_simulating(launches, tmp_path, args, flag, allowed):
    """The issue's cases: each used to be a traceback, a misleading message or a NaN table."""
    res = RUN.invoke(app, ["sim", "goco", *args, "--out", str(tmp_path)])
    assert allowed in _refused(res, flag)
    assert launches.calls == []


def test_sim_goco_valid_flags_reach_the_simulator(launches, tmp_path):
    res = RUN.invoke(app, ["sim", "goco", "--devices", "16", "--p", "0,0.5", "--d", "2,4",
                           "--allocation", "fractional", "--out", str(tmp_path)])
    assert res.exit_code == 0, res.output
    (base, ps, ds), = launches.calls
    assert (base.devices, ps, ds, base.allocation) == (16, [0.0, 0.5], [2, 4], "fractional")


def test_valid_edges_of_the_simulator_run_and_stay_finite():
    """What check() lets through must run: one device, d = devices, p = 0, minibatch 1, the
    smallest sample count; every curve finite."""
    for kw in (dict(devices=1, d=1), dict(devices=4, d=4, allocation="fractional"),
               dict(devices=5, d=2, p=0.0, batch_size=1, topology="erdos_renyi"),
               dict(devices=3, d=3, mode="dsgd", workload_options={"n": 3, "dim": 1})):
        cfg = tandem.sim.SimConfig(steps=4, **kw)
        cfg.check()
        assert np.isfinite(tandem.sim.simulate(cfg).opt_error).all(), kw


def _pick(*values: str) -> st.SearchStrategy[str]:
    return st.sampled_from(values)


def _list(values: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    return st.lists(values, min_size=1, max_size=3).map(",".join)


JUNK = st.text(st.characters(codec="ascii", exclude_characters="\x00,"), max_size=8)

# flag -> (values fine together with any fine values of the other flags (defaults included),
#          values refused whatever the other flags are, as long as those are fine)
SIM_FLAGS = {
    "--devices": (st.integers(3, 64).map(str), ("0", "-1", "4097", "x", "1.5")),  # default d<=3
    "--p": (_list(_pick("0", "0.1", "0.5", "0.99")),
            ("1", "1.5", "-0.1", "nan", "inf", "a", "", "0.1,x")),
    "--d": (_pick("1", "1,1"), ("0", "-1", "5000", "b", "1,0")),
    "--steps": (st.integers(1, 500).map(str), ("0", "-1", "x")),
    "--lr": (_pick("0.05", "1e-4", "2"), ("0", "-1", "nan", "inf", "?")),
    "--lr-decay": (_pick("0", "0.5"), ("-1", "nan", "inf")),
    "--mode": (_pick("goco", "dsgd", "redundant", "wait"), ("nope", "")),
    "--topology": (_pick("ring", "torus", "exponential", "erdos_renyi", "complete"), ("grid",)),
    "--gossip-rounds": (st.integers(1, 1000).map(str), ("0", "-1", "1001")),
    "--allocation": (_pick("cyclic"), ("random",)),  # fractional: d must divide devices
    "--noise": (_pick("0", "1.5"), ("-1", "nan")),
    "--dim": (st.integers(1, 100).map(str), ("0", "-1", "70000")),  # > any default samples
    "--samples": (_pick("0", "5000"), ("-5", "x")),
    "--batch-size": (st.integers(0, 64).map(str), ("-1", "x")),
    "--seed": (_pick("0", "1", str(2**63 - 1)), ("-1", str(2**64), "1e3")),
}


@st.composite
def command_lines(draw, *groups: tuple[dict, int]):
    """(args, flags given, kind, the bad flag) with at least ``min_size`` flags of each
    ``(flags, min_size)`` group: ``fine`` = every value fine, ``one bad`` = one flag refused
    whatever the others are, ``hostile`` = anything, typos and junk included."""
    kind = draw(_pick("fine", "one bad", "hostile"))
    given = [f for flags, least in groups for f in draw(st.lists(
        st.sampled_from(sorted(flags)), unique=True, min_size=least, max_size=least + 3))]
    bad = draw(st.sampled_from(given)) if kind == "one bad" else None
    pools = {k: v for flags, _ in groups for k, v in flags.items()}
    args = []
    for f in given:
        fine, refused = pools[f]
        value = st.one_of(fine, st.sampled_from(refused), JUNK) if kind == "hostile" else \
            st.sampled_from(refused) if f == bad else fine
        args.append(f"{f}={draw(value)}")
    return args, given, kind, bad


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(command_lines((SIM_FLAGS, 1)))
# found by a draw: dsgd ignores d, yet a d beyond the devices is still refused
@example(drawn=(["--devices=3", "--d=5000", "--mode=dsgd"], ["--devices", "--d", "--mode"],
                "one bad", "--d"))
def test_sim_goco_any_flags_start_or_are_refused_in_one_line(launches, tmp_path, drawn):
    args, given, kind, bad = drawn
    launches.calls.clear()
    res = RUN.invoke(app, ["sim", "goco", *args, "--out", str(tmp_path)])
    event(f"{kind}: {'accepted' if res.exit_code == 0 else 'refused'}")
    if res.exit_code == 0:
        assert kind != "one bad", (args, "accepted")
        assert len(launches.calls) == 1
    else:
        assert kind != "fine", (args, res.output)
        _refused(res, *([bad] if bad else given))
        assert launches.calls == [], "refused, yet the simulation started"


# ---- tandem sweep ----------------------------------------------------------------------------
SWEEP_LISTS = {
    "--lr": (_list(_pick("0.1", "0.01", "1e-3")), ("-1", "0", "nan", "fast", "0.1,0")),
    "--momentum": (_list(_pick("0", "0.9")), ("1", "-0.5", "x")),
    "--seed": (_list(_pick("0", "1", "7")), ("-1", "1.5", str(2**70))),
    "--batch-size": (_list(_pick("8", "32")), ("0", "3.5", "big")),
    "--codec": (_list(_pick("dense", "fp16", "topk", "randomk")), ("zip", "", "dense,zip")),
    "--workload": (_list(_pick("digits", "mnist5k")), ("cifar", "digits,cifar")),
    "--variant": (_pick("{lr: 0.2}", "{codec: topk}", "{workload: {options: {hidden: 8}}}"),
                  ("{workers: 3}", "[1", "7", "{}", "{lr: -1}", "{codec: {x: 1}}")),
}
SWEEP_MORE = {
    "--codec-opt": (_pick("momentum=0,0.5", "momentum_masking=false"),
                    ("bogus=1", "momentum=2", "momentum=0,2", "ratio", "=1")),
    "--workload-opt": (_pick("hidden=8,16"), ("hidden=0", "hidden=8,0", "hidden", "bogus=1")),
    "--workers": (st.integers(1, 8).map(str), ("0", "-1", "2000", "two")),
    "--steps": (st.integers(1, 50).map(str), ("0", "-1", "many")),
    "--epochs": (_pick("0.5", "2"), ("0", "-1", "inf", "nan", "x")),
    "--net": (_pick("100mbit:1ms", "1gbit:200us:50us"),
              ("100mbit:1", "fast", "0mbit", "1e999mbit", "1gbit:1ms:2")),
    "--stragglers": (_pick("0.2:5", "0.1:exp:0.05"), ("1.5:2", "a:b", "0.2:exp:nan")),
    "--timeout": (_pick("10", "0.5"), ("0", "-5", "nan", "inf", "soon")),
    "--nan-policy": (_pick("skip", "stop"), ("ignore",)),
    "--target-accuracy": (_pick("0.9", "1"), ("1.5", "0")),
    "--eval-every": (st.integers(0, 10).map(str), ("-1", "often")),
    "--bucket-mb": (_pick("0", "0.5"), ("-1", "nan")),
    "--partition": (_pick("iid", "label"), ("random",)),
}


@pytest.mark.parametrize("flag, value", [(f, v) for f, (_, bad) in SIM_FLAGS.items()
                                         for v in bad])
def test_sim_goco_refuses_every_bad_value_naming_its_flag(launches, tmp_path, flag, value):
    _refused(RUN.invoke(app, ["sim", "goco", f"{flag}={value}", "--out", str(tmp_path)]), flag)
    assert launches.calls == []


@pytest.mark.parametrize("flag, value", [(f, v) for f, (_, bad) in
                                         {**SWEEP_LISTS, **SWEEP_MORE}.items() for v in bad])
def test_sweep_refuses_every_bad_value_naming_its_flag(launches, tmp_path, flag, value):
    """Also with something to sweep around it, so the bad value is not masked by "nothing to
    sweep"; the axis given is fine."""
    axis = ["--seed=1,2"] if flag != "--seed" else ["--lr=0.1,0.2"]
    _refused(RUN.invoke(app, ["sweep", *axis, f"{flag}={value}"]), flag)
    assert launches.calls == []


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(command_lines((SWEEP_LISTS, 1), (SWEEP_MORE, 0)), st.booleans())
def test_sweep_any_flags_start_or_are_refused_in_one_line(launches, tmp_path, drawn, paired):
    """A sweep command line: some list flags or --variant, other flags, maybe --paired."""
    args, given, kind, bad = drawn
    args, given = args + ["--paired"] * paired, given + ["--paired"] * paired
    launches.calls.clear()
    res = RUN.invoke(app, ["sweep", *args, "--out", str(tmp_path / "s")])
    event(f"{kind}: {'accepted' if res.exit_code == 0 else 'refused'}")
    if res.exit_code == 0:
        assert kind != "one bad", (args, "accepted")
        (base, variants, _), = launches.calls
        assert variants and base.out == tmp_path / "s"
        # every variant valid on its own: the job would not fail in a worker
        job = tandem.sweep.sweep_config(base, variants)
        assert len(tandem.sweep.variant_configs(job)) == len(variants)
    else:
        something_to_sweep = any(a.startswith("--variant") or "," in a for a in args)
        assert kind != "fine" or paired or not something_to_sweep, (args, res.output)
        _refused(res, *([bad] + ["--paired"] * paired if kind == "one bad" else given))
        assert launches.calls == [], "refused, yet the sweep started"


def test_sweep_codec_options_follow_every_swept_codec(launches, tmp_path):
    """--codec-opt with several codecs lands in each variant (each starts from its codec's
    defaults); with one codec it sets the base; the YAML's codec options go with the YAML's
    codec."""
    cfg = tmp_path / "run.yaml"
    cfg.write_text("codec: {name: topk, options: {ratio: 0.3, scope: global}}\n")
    res = RUN.invoke(app, ["sweep", "--config", str(cfg), "--codec", "randomk,topk",
                           "--codec-opt", "ratio=0.01"])
    assert res.exit_code == 0, res.output
    base, variants, _ = launches.calls[-1]
    solos = dict(tandem.sweep.variant_configs(tandem.sweep.sweep_config(base, variants)))
    codecs = {v.codec.name: v.codec.options for v in solos.values()}
    assert codecs == {"randomk": {"ratio": 0.01}, "topk": {"ratio": 0.01, "scope": "global"}}
    res = RUN.invoke(app, ["sweep", "--config", str(cfg), "--codec", "fp16",
                           "--lr", "0.1,0.2"])
    assert res.exit_code == 0, res.output
    assert launches.calls[-1][0].codec.model_dump() == {"name": "fp16", "options": {}}
    res = RUN.invoke(app, ["sweep", "--codec", "dense,topk", "--codec-opt", "ratio=0.01"])
    assert "codec=dense" in _refused(res, "--codec")  # dense takes no ratio: which variant


# ---- tandem train: plugins from the YAML and the flags ---------------------------------------
def test_train_codec_and_strategy_flags_replace_or_amend_the_yaml(launches, tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("codec: {name: topk, options: {ratio: 0.1}}\n"
                   "strategy: {name: gossip, options: {p: 0.1}}\n")

    def train(*args: str):
        res = RUN.invoke(app, ["train", *args])
        assert res.exit_code == 0, res.output
        return launches.calls[-1][0]

    c = train("--config", str(cfg), "--codec", "fp16")  # was: "fp16 option ratio: Extra ..."
    assert (c.codec.name, c.codec.options, c.strategy.options) == ("fp16", {}, {"p": 0.1})
    c = train("--config", str(cfg), "--codec-opt", "ratio=0.2")
    assert (c.codec.name, c.codec.options) == ("topk", {"ratio": 0.2})
    c = train("--codec-opt", "momentum=0.5")  # was: "codec.name: Field required"
    assert (c.codec.name, c.codec.options) == ("dense", {"momentum": 0.5})
    c = train("--config", str(cfg), "--strategy", "allreduce", "--codec", "topk")
    assert (c.strategy.options, c.codec.options) == ({}, {"ratio": 0.1})  # same codec: kept
    c = train("--strategy-opt", "overlap=true")
    assert (c.strategy.name, c.strategy.options) == ("allreduce", {"overlap": True})
    _refused(RUN.invoke(app, ["train", "--codec-opt", "ratio=0.1"]), "--codec-opt")
    _refused(RUN.invoke(app, ["train", "--config", str(cfg), "--strategy-opt", "p=2"]),
             "--strategy-opt")
    c = train("--optimizer", "sgd", "--optimizer-opt", "nesterov=true", "--momentum", "0.9")
    assert (c.optimizer.name, c.optimizer.options) == ("sgd", {"nesterov": True})
    # without --optimizer the options would silently swap the workload's optimizer for sgd
    assert "optimizer.name" in _refused(RUN.invoke(app, [
        "train", "--optimizer-opt", "nesterov=true"]), "--optimizer-opt")


@pytest.mark.parametrize("args, flag", [
    (["--net", "100mbit:1"], "--net"),  # was: one second of latency, silently
    (["--net", "100mbit:1ms:3"], "--net"),
    (["--workers", "0"], "--workers"),
    (["--seed", "-1"], "--seed"),
    (["--lr", "inf"], "--lr"),
    (["--stragglers", "0.2:x"], "--stragglers"),
    (["--workers", "2", "--slow-worker", "4:2"], "--slow-worker"),
    (["--codec-opt", "ratio"], "--codec-opt"),
    (["--optimizer", "sgd", "--optimizer-opt", "nesterov"], "--optimizer-opt"),
    (["--bogus", "1"], "--bogus"),
])
def test_train_refuses_bad_flags_in_one_line_naming_the_flag(launches, args, flag):
    _refused(RUN.invoke(app, ["train", *args]), flag)
    assert launches.calls == []


# ---- help and listings -----------------------------------------------------------------------
def test_train_help_groups_every_flag_in_a_panel_with_help():
    cmd = typer.main.get_command(app).commands["train"]
    panels = {p.name: p.rich_help_panel for p in cmd.params if p.name != "help"}
    assert set(panels.values()) == {"Run", "Model and data", "Optimizer step", "Network",
                                    "Faults", "Output"}
    assert all(p.help for p in cmd.params), [p.name for p in cmd.params if not p.help]
    assert panels["net"] == "Network" and panels["stragglers"] == "Faults"
    text = RUN.invoke(app, ["train", "--help"], terminal_width=200).output
    for title in ("Run", "Model and data", "Network", "Faults", "Output"):
        assert f"─ {title} ─" in text, title


def test_listings_show_every_option_with_its_default_and_description():
    from tandem.codecs import CODECS
    from tandem.workloads import WORKLOADS

    out = RUN.invoke(app, ["workloads"]).output
    for name, spec in WORKLOADS.items():
        assert f"{name} " in out
        for key, field in spec.options.model_fields.items():
            assert field.description, f"workload {name} option {key} has no description"
            assert f"{key}={field.default!r}" in out and " ".join(field.description.split()) in out
    out = RUN.invoke(app, ["codecs"]).output
    for name, cls in CODECS.items():
        for key, field in cls.Options.model_fields.items():
            assert field.description, f"codec {name} option {key} has no description"
    assert "ratio=0.01  [> 0, <= 1]  fraction of entries sent" in out  # topk: bounds shown
    assert "scope='layer'  [layer | global]" in out
