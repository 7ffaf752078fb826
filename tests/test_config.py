"""Config validation: every bad value is a ConfigError naming the field, never a deep traceback."""

from __future__ import annotations

import pytest

from tandem.config import NetConfig, StragglerConfig, parse_options
from tandem.errors import ConfigError
from tandem.resolve import load_config


def test_defaults_are_valid_and_round_trip_through_yaml(tmp_path):
    cfg = load_config()
    p = tmp_path / "c.yaml"
    p.write_text(cfg.to_yaml())
    assert load_config(path=p) == cfg


@pytest.mark.parametrize("overrides, field", [
    ({"workers": 0}, "workers"),
    ({"lr": -1}, "lr"),
    ({"strategy.name": "nope"}, "strategy"),
    ({"codec.name": "zip"}, "codec"),
    ({"net": "fast"}, "net"),
    ({"net": "100mbit:1parsec"}, "net"),
    ({"stragglers": "1.5:2"}, "stragglers"),
    ({"slow_workers": ["9:2"], "workers": 2}, "slow_workers"),
    ({"workload.name": "cifar"}, "workload.name"),
    ({"batch_size": "big"}, "batch_size"),
    ({"surprise": 1}, "surprise"),
    ({"codec.options.bogus": 1}, "codec"),
    ({"net": "100mbit:1"}, "net"),  # a bare latency is refused, not read as one second
    ({"net": "100mbit:1ms:2"}, "net"),
    ({"net": "1e999mbit"}, "net"),
    ({"seed": -1}, "seed"),
    ({"lr": float("nan")}, "lr"),
    ({"timeout_s": float("inf")}, "timeout_s"),
    ({"stragglers": "0.2:x"}, "stragglers"),
])
def test_invalid_values_name_the_field(overrides, field):
    with pytest.raises(ConfigError) as info:
        load_config(**overrides)
    assert field in str(info.value)


def test_unknown_strategy_lists_the_choices():
    with pytest.raises(ConfigError) as info:
        load_config(**{"strategy.name": "nope"})
    assert "allreduce" in str(info.value)


def test_compact_forms_parse():
    net = NetConfig.parse("100mbit:1ms:200us")
    assert net.bytes_per_s == pytest.approx(12.5e6)
    assert net.latency_s == pytest.approx(1e-3) and net.jitter_s == pytest.approx(2e-4)
    s = StragglerConfig.parse("0.2:5")
    assert (s.p, s.kind, s.factor) == (0.2, "factor", 5.0)
    e = StragglerConfig.parse("0.1:exp:0.05")
    assert (e.kind, e.mean_s) == ("exp", 0.05)
    cfg = load_config(workers=4, slow_workers="1:3", net="1gbit:0.2ms")
    assert cfg.slow_workers[0].rank == 1 and cfg.slow_workers[0].factor == 3
    assert parse_options(["ratio=0.01", "variant=ps"]) == {"ratio": 0.01, "variant": "ps"}


def test_missing_and_malformed_config_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(path=tmp_path / "none.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("workers: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(path=bad)
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        parse_options(["ratio"])


def test_checkpoints_with_a_strategy_that_cannot_write_them_is_refused():
    with pytest.raises(ConfigError, match="does not write checkpoints"):
        load_config(**{"strategy.name": "coded_ps", "checkpoint_every": 10})
    with pytest.raises(ConfigError, match="allreduce"):
        load_config(**{"strategy.name": "coded_ps", "resume": True})
    for name in ("allreduce", "local", "pipeline", "gossip", "param_server", "bsp_shared"):
        assert load_config(**{"strategy.name": name, "checkpoint_every": 10}).checkpoint_every


def test_a_codec_the_strategy_cannot_use_is_refused_not_ignored():
    """Breaks if coded_ps or local accept a compressing codec: they send exact values, so the
    run would silently send dense bytes while its record named the codec. Gossip takes the
    self-contained codecs (compressed gossip) and refuses the rest."""
    for name in ("coded_ps", "local"):
        with pytest.raises(ConfigError, match=f"strategy '{name}' uses no codec"):
            load_config(**{"strategy.name": name, "codec.name": "topk"})
        assert load_config(**{"strategy.name": name, "codec.name": "dense"}).codec.name == "dense"
    for name in ("allreduce", "param_server", "pipeline", "bsp_shared", "gossip"):
        assert load_config(**{"strategy.name": name, "codec.name": "topk"}).codec.name == "topk"
    with pytest.raises(ConfigError, match="strategy 'gossip' sends each peer's code"):
        load_config(**{"strategy.name": "gossip", "codec.name": "powersgd"})


def test_errors_are_one_line():
    with pytest.raises(ConfigError) as info:
        load_config(workers=0, lr=-1)
    assert "\n" not in str(info.value) and "workers" in str(info.value) and "lr" in str(info.value)


def test_a_plugin_name_override_replaces_the_files_options_and_options_alone_amend_them(tmp_path):
    """`--codec fp16` on a YAML with topk's ratio used to fail ("fp16 option ratio: Extra
    inputs"); `--codec-opt` alone used to fail ("codec.name: Field required")."""
    p = tmp_path / "run.yaml"
    p.write_text("codec: {name: topk, options: {ratio: 0.1}}\n"
                 "strategy: {name: gossip, options: {p: 0.1}}\n"
                 "workload: {name: digits, options: {hidden: 16}}\n")
    assert load_config(path=p, **{"codec.name": "fp16"}).codec.options == {}
    assert load_config(path=p, **{"codec.name": "topk"}).codec.options == {"ratio": 0.1}
    cfg = load_config(path=p, **{"codec.options.ratio": 0.5, "codec.name": "randomk"})
    assert (cfg.codec.name, cfg.codec.options) == ("randomk", {"ratio": 0.5})  # order-free
    assert load_config(path=p, **{"strategy.name": "allreduce"}).strategy.options == {}
    assert load_config(path=p, **{"workload.name": "mnist5k"}).workload.options == {}
    assert load_config(**{"codec.options.momentum": 0.5}).codec.name == "dense"
    assert load_config(**{"strategy.options.overlap": True}).strategy.name == "allreduce"
