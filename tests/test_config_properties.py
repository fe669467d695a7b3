"""Property tests: whatever a user types, the config parser answers with a valid
config or a BadInput that names a key, never another exception."""

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from core import config as cfg
from core.errors import BadInput

scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True),
                    st.text(max_size=30))
values = st.one_of(scalars, st.lists(scalars, max_size=3),
                   st.dictionaries(st.text(max_size=5), scalars, max_size=2))
keys = st.one_of(st.sampled_from(sorted(cfg.FIELDS)), st.text(max_size=20))


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(st.dictionaries(keys, values, max_size=6))
def test_from_mapping_never_crashes(raw):
    try:
        config = cfg.from_mapping(raw)
    except BadInput as err:
        assert str(err)
        return
    assert cfg.validate(config) == []
    for name in raw:
        assert name in cfg.FIELDS


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(sorted(cfg.FIELDS)), st.text(max_size=40))
def test_cli_strings_never_crash(key, text):
    try:
        config = cfg.load(None, [f"{key}={text}"])
    except BadInput as err:
        assert key in str(err) or "KEY=VALUE" in str(err) or "resume" in str(err)
        return
    assert isinstance(config, cfg.TrainConfig)


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=200))
def test_yaml_text_never_crashes(tmp_path_factory, text):
    path = tmp_path_factory.mktemp("y") / "c.yaml"
    path.write_text(text, encoding="utf-8")
    try:
        cfg.load(path)
    except BadInput as err:
        assert str(err)
