"""Strategy ``pipeline`` (M4) and ``tandem sweep``: every model of a pipelined job ends exactly
where its solo synchronous run ends (same seeds), and each leaves its own run record."""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

import pipeline_jobs
import tandem
from tandem.api import prepare_run_dir
from tandem.codecs import CODECS
from tandem.errors import ConfigError
from tandem.launch import spawn
from tandem.sweep import expand_grid, label_of, variant_configs
from tandem.telemetry.curves import load_events

BASE = {"workload": {"name": "digits"}, "workers": 2, "steps": 8, "batch_size": 16, "lr": 0.1,
        "momentum": 0.9, "seed": 3, "progress": False, "eval_every": 4}
# (overrides inside the pipeline, the same model's solo config written by hand)
DENSE = [({"lr": 0.05}, {"lr": 0.05}),
         ({"lr": 0.2, "workload": {"options": {"hidden": 32}}},
          {"lr": 0.2, "workload": {"name": "digits", "options": {"hidden": 32}}})]
# lossy codecs when registered: fp16 (stateless) and PowerSGD (two collectives per exchange,
# error-feedback memory per model)
POWERSGD = {"codec": {"name": "powersgd", "options": {"rank": 2}}}
LOSSY = ([({"codec": "fp16"}, {"codec": "fp16"})] if "fp16" in CODECS else []) + \
    ([(dict(POWERSGD, lr=0.3), dict(POWERSGD, lr=0.3))] if "powersgd" in CODECS else [])


def _run(cfg: dict) -> list[dict]:
    full = tandem.load_config(cfg)
    prepare_run_dir(full)
    return spawn(pipeline_jobs.train_params, full.workers, full.model_dump(mode="json"),
                 timeout_s=180)


def _split(result: dict) -> list[list[np.ndarray]]:
    out, off = [], 0
    for n in result["params_per_model"]:
        out.append(result["params"][off:off + n])
        off += n
    return out


def _assert_bitwise(a: list[np.ndarray], b: list[np.ndarray]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.dtype == y.dtype and x.shape == y.shape
        assert np.array_equal(x, y), f"max difference {np.abs(x - y).max()}"


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    """One pipelined job (dense models of two architectures, plus fp16 when registered) and each
    model's solo ``allreduce`` run."""
    tmp = tmp_path_factory.mktemp("pipe")
    models = DENSE + LOSSY
    cfg = dict(BASE, out=str(tmp / "job"),
               strategy={"name": "pipeline", "options": {"models": [m for m, _ in models]}})
    results = _run(cfg)
    solos = [_run(dict(BASE, out=str(tmp / f"solo{i}"), **s))[0]["params"]
             for i, (_, s) in enumerate(models)]
    return {"cfg": cfg, "results": results, "solos": solos, "dir": tmp / "job"}


def test_dense_models_are_bitwise_equal_to_their_solo_allreduce_runs(job):
    r0, r1 = job["results"]
    for rank_params in (_split(r0), _split(r1)):
        for i in range(len(DENSE)):
            _assert_bitwise(rank_params[i], job["solos"][i])
    # the two dense models really differ (lr and width), so equality is not an accident
    assert [p.shape for p in _split(r0)[0]] != [p.shape for p in _split(r0)[1]]


@pytest.mark.parametrize("codec", ["fp16", "powersgd"])
def test_lossy_codec_models_equal_their_solo_runs_with_that_codec(job, codec):
    if codec not in CODECS:
        pytest.skip(f"codec {codec} is not in the codec registry (`tandem codecs`); "
                    "the lossy case runs once it is")
    names = [m["codec"] if isinstance(m["codec"], str) else m["codec"]["name"]
             for m, _ in LOSSY]
    i = len(DENSE) + names.index(codec)
    for rank_result in job["results"]:
        _assert_bitwise(_split(rank_result)[i], job["solos"][i])


def test_each_model_leaves_a_run_record_with_its_own_bytes_and_overlap(job):
    variants = variant_configs(tandem.load_config(job["cfg"]))
    assert [label for label, _ in variants][:2] == ["lr=0.05", "lr=0.2,hidden=32"]
    per_step = {"lr=0.05": (64 * 128 + 128 + 128 * 10 + 10) * 4,  # dense fp32, ring at N=2
                "lr=0.2,hidden=32": (64 * 32 + 32 + 32 * 10 + 10) * 4,
                "codec=fp16": (64 * 128 + 128 + 128 * 10 + 10) * 2}  # others: not pinned
    for label, vcfg in variants:
        d = vcfg.run_dir()
        for name in ("config.yaml", "events.jsonl", "summary.json", "curves.png"):
            assert (d / name).is_file(), f"{label}: {name}"
        solo = yaml.safe_load((d / "config.yaml").read_text())
        assert solo["strategy"]["name"] == "allreduce" and solo["out"] == str(d)
        s = json.loads((d / "summary.json").read_text())
        assert s["steps"] == BASE["steps"] and s["strategy"] == "pipeline"
        if label in per_step:
            assert s["bytes_sent_per_worker_per_step"] == per_step[label]
        assert s["evaluations"] == 2 and 0.0 <= s["final_test_accuracy"] <= 1.0
        stats = s["info"]["pipeline"]
        assert stats["label"] == label and stats["comm_s"] > 0
        assert 0.0 <= stats["hidden_share"] <= 1.0
        assert stats["hidden_s"] <= stats["comm_s"] + 1e-9
    job_stats = job["results"][0]
    assert [m["label"] for m in job_stats["models"]] == [label for label, _ in variants]
    # the job's own step records hold every byte its models sent, the last round's too (whose
    # exchanges used to finish after the job's record of that round was written)
    def sent(d):
        return sum(r["bytes_sent"] for r in load_events(d) if r.get("kind") == "step")
    assert sent(job["dir"]) == sum(sent(v.run_dir()) for _, v in variants) > 0
    assert 0.0 <= job_stats["hidden_share"] <= 1.0


def test_gradient_hooks_per_bucket_keep_exact_results_at_two_workers(job, tmp_path):
    """Buckets launched from gradient hooks during backward: still the solo results (at two
    workers a sum of two numbers does not depend on how the buffer is cut)."""
    cfg = dict(BASE, out=str(tmp_path / "hooked"),
               strategy={"name": "pipeline",
                         "options": {"models": [m for m, _ in DENSE], "bucket_mb": 0.004}})
    r0 = _run(cfg)[0]
    for i in range(len(DENSE)):
        _assert_bitwise(_split(r0)[i], job["solos"][i])


def test_sweep_command_writes_records_table_and_overlay(tmp_path):
    from tandem.cli import app

    out = tmp_path / "sweep"
    res = CliRunner().invoke(app, ["sweep", "--workload", "digits", "--workers", "2", "--steps",
                                   "6", "--lr", "0.05,0.2", "--eval-every", "3", "--no-progress",
                                   "--out", str(out)])
    assert res.exit_code == 0, res.output
    for label in ("lr=0.05", "lr=0.2"):
        assert label in res.output
        assert (out / "variants" / label / "summary.json").is_file()
    assert (out / "sweep.png").stat().st_size > 0
    rows = json.loads((out / "sweep.json").read_text())
    assert [r["lr"] for r in rows] == [0.05, 0.2] and all(r["steps"] == 6 for r in rows)
    assert all(0.0 <= r["hidden_share"] <= 1.0 for r in rows)


def test_variants_expand_and_bad_overrides_fail_before_any_process_starts(tmp_path):
    assert expand_grid({"lr": [0.1, 0.2], "codec.name": ["dense", "fp16"]}) == [
        {"lr": 0.1, "codec.name": "dense"}, {"lr": 0.1, "codec.name": "fp16"},
        {"lr": 0.2, "codec.name": "dense"}, {"lr": 0.2, "codec.name": "fp16"}]
    assert expand_grid({"lr": [0.1, 0.2], "seed": [1, 2]}, paired=True) == [
        {"lr": 0.1, "seed": 1}, {"lr": 0.2, "seed": 2}]
    with pytest.raises(ConfigError):
        expand_grid({"lr": [0.1, 0.2], "seed": [1, 2, 3]}, paired=True)
    assert label_of({"workload": {"options": {"hidden": 64}}, "lr": 0.1}, 0) == "hidden=64,lr=0.1"
    with pytest.raises(ConfigError, match="cannot override"):
        tandem.load_config(dict(BASE, strategy={"name": "pipeline",
                                                "options": {"models": [{"workers": 3}]}}))
    bad = tandem.load_config(dict(BASE, out=str(tmp_path / "bad"), strategy={"name": "pipeline",
                                                  "options": {"models": [{"lr": -1.0}]}}))
    with pytest.raises(ConfigError, match="pipeline model 0"):
        tandem.train(bad)
    empty = tandem.load_config(dict(BASE, out=str(tmp_path / "empty"), strategy="pipeline"))
    with pytest.raises(ConfigError, match="needs models"):
        tandem.train(empty)


def _lane_steps(run, label: str) -> list[dict]:
    path = run / "variants" / label / "events.rank0.jsonl"
    return [r for r in map(json.loads, path.open()) if r["kind"] == "step"]


def test_the_overlap_really_hides_communication_behind_the_next_models_compute(tmp_path):
    """While model 0's exchange crosses a slow link (300 ms per hop), model 1 computes: in every
    round model 1's forward begins before model 0's exchange has ended. With overlap off (the
    control, same job) it begins only after. An ordering of events, not a duration, so a busy
    machine cannot flip it short of a 300 ms stall. (hidden_share in [0, 1] alone would pass
    with no overlap at all.)"""
    base = {"workload": {"name": "digits"}, "workers": 2, "steps": 4, "batch_size": 64,
            "seed": 1, "progress": False, "eval_every": 100, "net": "1gbit:300ms"}
    before: dict[bool, list[bool]] = {}
    for overlap in (True, False):
        run = tmp_path / f"overlap-{overlap}"
        tandem.train(dict(base, out=str(run), strategy={"name": "pipeline", "options": {
            "models": [{"lr": 0.05}, {"lr": 0.1}], "overlap": overlap}}), timeout_s=300)
        first, second = _lane_steps(run, "lr=0.05"), _lane_steps(run, "lr=0.1")
        assert [r["step"] for r in first] == [r["step"] for r in second] == [0, 1, 2, 3]
        before[overlap] = [b["t_compute_start"] < a["t_comm_done"]
                           for a, b in zip(first, second, strict=True)]
    assert before == {True: [True] * 4, False: [False] * 4}


def test_one_exchange_on_the_link_at_a_time_unless_switched_off(tmp_path):
    """Breaks if ``one_at_a_time`` (the default) lets two models' exchanges hold the link at
    once, or hands the link out in another order than the round's, or if switching it off does
    not let them run together. Over a slow link (300 ms per hop) model 1's gradient is ready
    long before model 0's exchange ends: with turns its exchange starts only after that end (and
    model 0's next one only after model 1's), without them at once. Orderings, not durations."""
    base = {"workload": {"name": "digits"}, "workers": 2, "steps": 3, "batch_size": 64,
            "seed": 1, "progress": False, "eval_every": 100, "net": "1gbit:300ms"}
    for turns in (True, False):
        run = tmp_path / f"turns-{turns}"
        tandem.train(dict(base, out=str(run), strategy={"name": "pipeline", "options": {
            "models": [{"lr": 0.05}, {"lr": 0.1}], "one_at_a_time": turns}}), timeout_s=300)
        first, second = _lane_steps(run, "lr=0.05"), _lane_steps(run, "lr=0.1")
        spans = sorted((r["t_comm_start"], r["t_comm_done"], i, r["step"])
                       for i, steps in enumerate((first, second)) for r in steps)
        disjoint = [a[1] <= b[0] for a, b in zip(spans, spans[1:], strict=False)]
        if turns:
            assert all(disjoint)
            assert [(i, step) for _, _, i, step in spans] == [(0, 0), (1, 0), (0, 1), (1, 1),
                                                               (0, 2), (1, 2)]
        else:
            together = [b["t_comm_start"] < a["t_comm_done"]
                        for a, b in zip(first, second, strict=True)]
            assert together == [True] * 3
