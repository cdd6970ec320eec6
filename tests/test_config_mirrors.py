"""data.mirrors: a list of http(s) base URLs, checked like every other key."""

import pytest

from cnntrain.config import Config, ConfigError, dump_yaml, load_config


@pytest.fixture
def config(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("data: {dataset: mnist}\n")
    return path


def test_default_is_no_mirrors():
    assert Config().data.mirrors == [] and Config().to_dict()["data"]["mirrors"] == []


def test_mirrors_from_the_file_and_overrides(config, tmp_path):
    config.write_text("data:\n  mirrors: [https://example.org/mnist/, 'http://127.0.0.1:8000/{name}/']\n")
    assert load_config(config).data.mirrors == ["https://example.org/mnist/", "http://127.0.0.1:8000/{name}/"]
    assert load_config(config, ["data.mirrors=[]"]).data.mirrors == []
    # The resolved config round-trips.
    again = tmp_path / "again.yaml"
    again.write_text(dump_yaml(load_config(config)))
    assert load_config(again).data.mirrors == load_config(config).data.mirrors


@pytest.mark.parametrize("value, message", [
    ("[ftp://example.org/]", "data.mirrors[0]: expected an http:// or https:// URL, got 'ftp://example.org/'"),
    ("[https://ok.org/, example.org/mnist]",
     "data.mirrors[1]: expected an http:// or https:// URL, got 'example.org/mnist'"),
    ("['http:// space.org/']", "data.mirrors[0]: expected an http:// or https:// URL, got 'http:// space.org/'"),
    ("[http://]", "data.mirrors[0]: expected an http:// or https:// URL, got 'http://'"),
    ("https://example.org/", "data.mirrors: expected a list, got 'https://example.org/'"),
    ("[1]", "data.mirrors[0]: expected a string, got 1"),
])
def test_bad_mirrors(config, value, message):
    with pytest.raises(ConfigError) as info:
        load_config(config, [f"data.mirrors={value}"])
    # The override is quoted with whichever quote it does not contain.
    assert str(info.value) in (f"override 'data.mirrors={value}': {message}",
                               f'override "data.mirrors={value}": {message}')
