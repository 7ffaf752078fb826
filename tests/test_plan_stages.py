"""``tandem plan`` costs LGC stage by stage (:mod:`tandem.plan.stages`): its warm-up and
autoencoder-training rounds are recorded as they run, each stage weighs its share of the run,
and the step a plan predicts is their mean. Behaviour only: the shares, the recorded messages
and the arithmetic, no assertion on how fast anything ran."""

from __future__ import annotations

import pytest
from bench.plan import window_mean

from tandem.errors import ConfigError
from tandem.plan import ComputeTime, Network, Tier, predict_one
from tandem.plan.measure import profile
from tandem.plan.stages import SAMPLES, codec_stages, stage_shares


@pytest.fixture(scope="module")
def prof():
    return profile("mnist5k", codecs=["lgc", "topk"], reps=1, warmup=1)


def test_a_stage_weighs_its_share_of_the_run_from_the_codec_options():
    assert stage_shares("lgc", {}) == (0.1, 0.2)
    assert stage_shares("lgc", {"warmup_fraction": 0.3, "ae_fraction": 0.5}) == (0.3, 0.5)
    assert stage_shares("lgc", {"warmup_steps": 5, "ae_steps": 10, "total_steps": 100}) == (
        0.05, 0.1)
    assert stage_shares("topk", {"ratio": 0.01}) == ()
    with pytest.raises(ConfigError, match="total_steps"):
        stage_shares("lgc", {"warmup_steps": 5})


def test_lgc_warm_up_and_autoencoder_rounds_are_recorded_as_they_run(prof):
    warm, train = codec_stages(prof, "lgc", 4)
    assert (warm.name, train.name) == ("warm-up", "autoencoder training")
    assert len(warm.rounds) == len(train.rounds) == SAMPLES
    # stage 1: top-k codes gathered, fewer bytes as the density ramps down to ratio
    gathered = [dict(r)["all_gather"] for r in warm.rounds]
    assert gathered == sorted(gathered, reverse=True) and gathered[0] > gathered[-1]
    # stage 2: the leader's positions broadcast, every worker's values on them gathered
    assert all({"broadcast", "all_gather"} <= {k for k, _ in r} for r in train.rounds)
    assert codec_stages(prof, "lgc", 4) is codec_stages(prof, "lgc", 4)  # memoised
    assert codec_stages(prof, "topk", 4) == [] and codec_stages(prof, "lgc", 1) == []


def test_the_predicted_step_is_the_mean_of_the_stages_weighed_by_their_share(prof):
    net, compute = Network(Tier(12.5e6, 1e-3), backend="tandem"), ComputeTime(0.01)
    pred = predict_one(prof, net, compute, "allreduce", "lgc", 4)
    stages = pred.extra["stages"]
    assert [s["stage"] for s in stages] == ["warm-up", "autoencoder training", "steady"]
    assert sum(s["share"] for s in stages) == pytest.approx(1.0)
    assert pred.step_s == pytest.approx(sum(s["share"] * s["step_s"] for s in stages))
    # the steady stage is what the plan charged before: the codec's steady exchange
    cp = prof.codecs["lgc"]
    steady = (compute.expected_max(4) + net.exchange(cp.exchange_ops, 4).seconds
              + cp.exchange_seconds(4))
    assert stages[-1]["step_s"] == pytest.approx(steady)
    assert pred.bytes_per_step == net.exchange(cp.exchange_ops, 4).sent
    assert "stages" not in predict_one(prof, net, compute, "allreduce", "topk", 4).extra
    # the pipeline weighs each stage's max(compute, exchange) the same way
    pipe = predict_one(prof, net, compute, "pipeline", "lgc", 4)
    assert [s["stage"] for s in pipe.extra["stages"]] == [s["stage"] for s in stages]
    assert pipe.step_s == pytest.approx(sum(s["share"] * s["step_s"]
                                            for s in pipe.extra["stages"]))
    assert all(p["step_s"] == pytest.approx(max(compute.expected_max(4), a["step_s"]
                                                - compute.expected_max(4)))
               for p, a in zip(pipe.extra["stages"], stages, strict=True))


def test_bench_plan_weighs_the_stages_as_its_measured_window_holds_them():
    stages = [{"share": 0.1, "step_s": 1.0}, {"share": 0.2, "step_s": 2.0},
              {"share": 0.7, "step_s": 4.0}]
    # 60 steps, skip 5: gaps end at steps 6..58; warm-up 0-5 (none), training 6-17 (12), 18-58
    assert window_mean(stages, 60, 5) == pytest.approx((12 * 2.0 + 41 * 4.0) / 53)
    assert window_mean(stages, 60, 0) == pytest.approx((5 * 1.0 + 12 * 2.0 + 41 * 4.0) / 58)
    # a run too short for the window: the whole run's stages (no division by zero)
    assert window_mean(stages, 7, 5) == pytest.approx((1 * 1.0 + 1 * 2.0 + 5 * 4.0) / 7)


def test_the_cli_says_which_codec_it_costed_stage_by_stage(tmp_path):
    from typer.testing import CliRunner

    from tandem.cli import app

    res = CliRunner().invoke(app, ["plan", "--workload", "mnist5k", "--workers", "2",
                                   "--compute-s", "0.01", "--codecs", "lgc,topk",
                                   "--strategies", "allreduce", "--out", str(tmp_path)])
    assert res.exit_code == 0, res.output
    notes = [ln for ln in res.output.splitlines() if ln.startswith("note: ")]
    assert len(notes) == 1 and notes[0].startswith("note: lgc: its step is the mean")
    assert "warm-up 10 %" in notes[0] and "autoencoder training 20 %" in notes[0]
    assert "steady 70 %" in notes[0]
