"""Property-based: any config, however hostile, is either valid or a ConfigError with a message."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tandem.config import RunConfig
from tandem.errors import ConfigError
from tandem.resolve import load_config

FIELDS = list(RunConfig.model_fields) + ["workload.name", "workload.partition",
                                          "workload.redundancy", "codec.options.ratio",
                                          "strategy.options.mode", "unknown_field"]
scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6),
                    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=20))
values = st.one_of(scalars, st.lists(scalars, max_size=3),
                   st.dictionaries(st.text(max_size=8), scalars, max_size=3))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(st.sampled_from(FIELDS), values, max_size=5))
def test_any_config_is_valid_or_a_config_error(overrides):
    try:
        cfg = load_config(**overrides)
    except ConfigError as err:
        assert str(err).strip(), "a ConfigError must say what is wrong"
        return
    assert isinstance(cfg, RunConfig)


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=30))
def test_any_compact_string_is_valid_or_a_config_error(text):
    for field in ("net", "stragglers", "slow_workers", "inject_nan"):
        try:
            load_config(**{field: text})
        except ConfigError as err:
            assert field in str(err) or "invalid" in str(err)
