"""Config loading: defaults, YAML floats, overrides, exact error messages, round trip."""
import math
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from cnntrain import config as cfg
from cnntrain.config import Config, ConfigError, ConvSpec, dump_yaml, load_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.fixture
def write(tmp_path, monkeypatch):
    """Write YAML text to a file in a temporary working directory; return its relative path."""
    monkeypatch.chdir(tmp_path)

    def _write(text, name="bad.yaml"):
        Path(name).write_text(text)
        return name

    return _write


def test_defaults_are_the_lenet_seed_network():
    c = Config()
    assert (c.name, c.seed) == ("lenet", 0)
    assert c.data.model_dump() == {"dataset": "mnist", "dir": None, "validation": 0.1, "shuffle": True,
                                   "train_limit": None, "test_limit": None, "fallback": True, "mirrors": []}
    assert (c.model.input, c.model.dtype) == ((1, 28, 28), "float32")
    assert [layer.name for layer in c.model.layers] == ["conv1", "pool2", "conv3", "pool4", "ff5", "ff6", "output"]
    conv1, conv3 = c.model.layers[0], c.model.layers[2]
    assert (conv1.filters, conv1.kernel, conv1.padding, conv1.activation) == (6, 5, 2, "relu")
    assert (conv3.filters, conv3.padding, conv3.connections) == (16, 0, "full")
    assert [layer.units for layer in c.model.layers[4:]] == [120, 84, 10]
    assert c.model.layers[-1].activation == "none"
    assert c.optimizer.model_dump() == {"type": "sgd", "lr": 0.05, "momentum": 0.0, "weight_decay": 0.0,
                                        "schedule": "constant", "step_size": 10, "gamma": 0.1, "min_lr": 0.0}
    assert c.training.model_dump() == {"epochs": 10, "batch_size": 64, "eval_batch_size": 1000,
                                       "threads": None, "patience": None}


def test_empty_mapping_gives_defaults_named_after_the_file(write):
    assert load_config(write("{}\n", "quick.yaml")) == Config(name="quick")
    # A section with every line commented out means "all defaults", not an error.
    assert load_config(write("optimizer:\n#  lr: 0.1\n", "quick.yaml")) == Config(name="quick")


def test_shipped_configs():
    # the shipped config is the defaults, except that it trains on every image (README)
    assert load_config(CONFIGS / "lenet.yaml") == Config(data={"validation": 0})
    lenet5 = load_config(CONFIGS / "lenet5.yaml")
    assert lenet5.name == "lenet5"
    assert lenet5.model.layers[2].connections == "lenet5"
    layers = list(Config().model.layers)
    layers[2] = ConvSpec(name="conv3", type="conv", filters=16, kernel=5, activation="relu", connections="lenet5")
    assert lenet5 == Config(name="lenet5", data={"validation": 0}, model={"layers": layers})


@pytest.mark.parametrize("text, expected", [
    ("1e-3", 0.001), ("1E5", 100000.0), ("-2.5e-4", -2.5e-4), ("+1e3", 1000.0), ("2.e2", 200.0),
    (".5", 0.5), ("1.0e-3", 0.001), ("0.05", 0.05), (".inf", math.inf), ("-.inf", -math.inf),
    ("10", 10), ("-3", -3), ("0", 0), ("1e", "1e"), ("e3", "e3"), ("1e3x", "1e3x"), ("1.5.e3", "1.5.e3"),
])
def test_yaml_floats_follow_yaml_1_2(text, expected):
    value = cfg._parse_yaml(f"v: {text}", "t")["v"]
    assert value == expected and type(value) is type(expected)


def test_yaml_float_resolver_keeps_nan_and_leaves_pyyaml_alone():
    assert math.isnan(cfg._parse_yaml("v: .nan", "t")["v"])
    assert yaml.safe_load("v: 1e-3")["v"] == "1e-3"  # the global SafeLoader is unchanged


def test_int_is_accepted_where_a_float_is_expected(write):
    c = load_config(write("optimizer: {lr: 1}\ndata: {validation: 500}\n"))
    assert c.optimizer.lr == 1.0 and type(c.optimizer.lr) is float
    assert c.data.validation == 500 and type(c.data.validation) is int


def test_overrides_are_yaml_typed_and_address_layers_by_name_or_index(write):
    path = write("data: {dir: /somewhere}\noptimizer: {lr: 0.1}\n")
    c = load_config(path, ["optimizer.lr=1e-3", "data.dir=null", "model.input=[1,32,32]",
                           "data.dataset=fashion-mnist", "model.layers.ff5.units=200",
                           "model.layers.1.size=3", "training.epochs=2", "training.epochs=3"])
    assert c.optimizer.lr == 0.001
    assert c.data.dir is None
    assert c.model.input == (1, 32, 32)
    assert c.data.dataset == "fashion-mnist"
    assert c.model.layers[4].units == 200
    assert c.model.layers[1].size == 3
    assert c.training.epochs == 3  # the last override wins


def test_overrides_reach_sections_and_layers_the_file_leaves_out(write):
    c = load_config(write("name: x\n"), ["optimizer.momentum=0.9", "model.layers.conv3.connections=lenet5"])
    assert (c.optimizer.momentum, c.optimizer.lr) == (0.9, 0.05)
    assert c.model.layers[2].connections == "lenet5"
    assert c.model.layers[0] == Config().model.layers[0]


def test_override_can_replace_a_whole_value(write):
    c = load_config(write("{}"), ["model.layers=[{name: fc, type: dense, units: 10}]", "optimizer={lr: 0.5}"])
    assert [layer.name for layer in c.model.layers] == ["fc"]
    assert c.optimizer.lr == 0.5 and c.optimizer.momentum == 0.0


def test_explicit_connection_table(write):
    c = load_config(write("model:\n  layers:\n"
                          "    - {name: c, type: conv, filters: 2, kernel: 3, connections: [[0], [0, 1]]}\n"
                          "    - {name: out, type: dense, units: 10}\n"))
    assert c.model.layers[0].connections == ((0,), (0, 1))


LAYERS = "model:\n  layers:\n" + "".join(f"    - {layer}\n" for layer in [
    "{name: c1, type: conv, filters: 2, kernel: 3, activation: relu}",
    "{name: p2, type: maxpool, size: 2}",
    "{name: out, type: dense, units: 10}",
])


def layers(*replace):
    """LAYERS with (old, new) text substitutions."""
    text = LAYERS
    for old, new in replace:
        assert old in text
        text = text.replace(old, new)
    return text


@pytest.mark.parametrize("text, overrides, message", [
    ("optimizer: {lr: -0.1}", [], "bad.yaml: optimizer.lr: must be greater than 0, got -0.1"),
    ("optimizer: {lr: 0}", [], "bad.yaml: optimizer.lr: must be greater than 0, got 0"),
    ("optimizer: {lr: .inf}", [], "bad.yaml: optimizer.lr: expected a finite number, got inf"),
    ("optimizer: {lr: '0.1'}", [], "bad.yaml: optimizer.lr: expected a number, got '0.1'"),
    ("optimizer: {lr: true}", [], "bad.yaml: optimizer.lr: expected a number, got true"),
    ("optimizer: {momentum: -0.5}", [], "bad.yaml: optimizer.momentum: must be at least 0, got -0.5"),
    ("optimizer: {type: adam}", [], "bad.yaml: optimizer.type: expected one of sgd, got 'adam'"),
    ("optimizer: {lrr: 0.1}", [], "bad.yaml: optimizer.lrr: unknown key; did you mean 'lr'?"),
    ("optimizer: {zzz: 1}", [],
     "bad.yaml: optimizer.zzz: unknown key; expected one of type, lr, momentum, weight_decay, schedule, "
     "step_size, gamma, min_lr"),
    ("optimizer: {schedule: cosin}", [],
     "bad.yaml: optimizer.schedule: expected one of constant, step, cosine, got 'cosin'"),
    ("optimizer: {gamma: 0}", [], "bad.yaml: optimizer.gamma: must be greater than 0, got 0"),
    ("optimizer: {step_size: 0}", [], "bad.yaml: optimizer.step_size: must be at least 1, got 0"),
    ("training: {patience: 0}", [], "bad.yaml: training.patience: must be at least 1, got 0"),
    ("data: {validation: 0}", ["training.patience=3"],
     "override 'training.patience=3': training.patience: early stopping watches validation accuracy: "
     "set data.validation > 0"),
    ("traning: {epochs: 1}", [], "bad.yaml: traning: unknown key; did you mean 'training'?"),
    ("training: {epochs: ten}", [], "bad.yaml: training.epochs: expected an integer, got 'ten'"),
    ("training: {epochs: '10'}", [], "bad.yaml: training.epochs: expected an integer, got '10'"),
    ("training: {epochs: true}", [], "bad.yaml: training.epochs: expected an integer, got true"),
    ("training: {epochs: 10.5}", [], "bad.yaml: training.epochs: expected an integer, got 10.5"),
    ("training: {epochs: 10.0}", [], "bad.yaml: training.epochs: expected an integer, got 10.0"),
    ("training: {epochs: 0}", [], "bad.yaml: training.epochs: must be at least 1, got 0"),
    ("training: {batch_size: 0}", [], "bad.yaml: training.batch_size: must be at least 1, got 0"),
    ("training: 5", [], "bad.yaml: training: expected a mapping, got 5"),
    ("seed: -1", [], "bad.yaml: seed: must be at least 0, got -1"),
    ("name: runs/x", [],
     "bad.yaml: name: expected letters, digits, '-', '_' or '.' (it names the run folder), got 'runs/x'"),
    ("name: '..'", [],
     "bad.yaml: name: expected letters, digits, '-', '_' or '.' (it names the run folder), got '..'"),
    ("data: {dataset: emnist}", [],
     "bad.yaml: data.dataset: expected one of mnist, fashion-mnist, mnist-sample, got 'emnist'"),
    ("data: {shuffle: 'true'}", [], "bad.yaml: data.shuffle: expected true or false, got 'true'"),
    ("data: {validation: 1.0}", [],
     "bad.yaml: data.validation: expected a fraction in [0, 1) or a count of images >= 0, got 1.0"),
    ("data: {validation: -5}", [],
     "bad.yaml: data.validation: expected a fraction in [0, 1) or a count of images >= 0, got -5"),
    ("data: {train_limit: 0}", [], "bad.yaml: data.train_limit: must be at least 1, got 0"),
    ("data: {dir: 5}", [], "bad.yaml: data.dir: expected a string, got 5"),
    ("model: {dtype: float16}", [], "bad.yaml: model.dtype: expected one of float32, float64, got 'float16'"),
    ("model: {input: [1, 28]}", [], "bad.yaml: model.input: expected [channels, height, width], got [1, 28]"),
    ("model: {input: [1, 0, 28]}", [], "bad.yaml: model.input[1]: must be at least 1, got 0"),
    ("model: {layers: []}", [], "bad.yaml: model.layers: expected at least one layer, got none"),
    (layers(("maxpool", "pool")), [],
     "bad.yaml: model.layers.p2.type: expected one of conv, maxpool, dense, got 'pool'"),
    (layers(("type: maxpool, ", "")), [],
     "bad.yaml: model.layers.p2.type: required key is missing; expected one of conv, maxpool, dense"),
    (layers(("kernel", "kernal")), [], "bad.yaml: model.layers.c1.kernel: required key is missing"),
    (layers(("kernel: 3", "kernel: 3, kernal: 3")), [],
     "bad.yaml: model.layers.c1.kernal: unknown key; did you mean 'kernel'?"),
    (layers(("filters: 2", "filters: 2.5")), [], "bad.yaml: model.layers.c1.filters: expected an integer, got 2.5"),
    (layers(("name: p2", "name: c1")), [],
     "bad.yaml: model.layers[1].name: duplicate layer name 'c1' (layer 0 has it too)"),
    (layers(("name: c1", "name: 1c")), [],
     "bad.yaml: model.layers[0].name: expected letters, digits and '_', not starting with a digit, got '1c'"),
    (layers(("units: 10}", "units: 10, activation: relu}")), [],
     "bad.yaml: model.layers.out.activation: the output layer feeds softmax and must have activation none, "
     "got 'relu'"),
    (layers(("    - {name: out, type: dense, units: 10}\n", "")), [],
     "bad.yaml: model.layers.p2.type: the last layer is the output and must be dense, got 'maxpool'"),
    (layers(("relu}", "relu, connections: [[0]]}")), [],
     "bad.yaml: model.layers.c1.connections: expected 2 lists of input maps, one per filter, got 1"),
    (layers(("relu}", "relu, connections: [[0], [1, 1]]}")), [],
     "bad.yaml: model.layers.c1.connections[1]: expected a non-empty list of distinct input-map indices >= 0, "
     "got [1, 1]"),
    (layers(("relu}", "relu, connections: sparse}")), [],
     "bad.yaml: model.layers.c1.connections: expected full, lenet5 or a list of input-map lists, one per filter, "
     "got 'sparse'"),
    ("", [], "bad.yaml: expected a YAML mapping at the top level, got an empty file"),
    ("# nothing here\n", [], "bad.yaml: expected a YAML mapping at the top level, got an empty file"),
    ("- name: x\n", [], "bad.yaml: expected a YAML mapping at the top level, got a list"),
    ("1: 2", [], "bad.yaml: 1: unknown key; expected one of name, seed, data, model, optimizer, training"),
    ("optimizer:\n  lr: 0.1\n   momentum: 0.9\n", [],
     "bad.yaml:3:12: invalid YAML: mapping values are not allowed here"),
    ("seed: 1\nseed: 2\n", [], "bad.yaml:2:1: invalid YAML: duplicate key 'seed'"),
    ("{}", ["optimizer.lr"], "override 'optimizer.lr': expected KEY=VALUE, e.g. optimizer.lr=0.01"),
    ("{}", ["optimizer.lrr=0.1"], "override 'optimizer.lrr=0.1': optimizer.lrr: unknown key; did you mean 'lr'?"),
    ("{}", ["optimizer.lr=abc"], "override 'optimizer.lr=abc': optimizer.lr: expected a number, got 'abc'"),
    ("{}", ["optimizer.lr.x=1"], "override 'optimizer.lr.x=1': optimizer.lr.x: unknown key; "
                                 "'optimizer.lr' has no sub-keys"),
    ("{}", ["model.input=[1,2"], "override 'model.input=[1,2': invalid YAML value: "
                                 "expected ',' or ']', but got '<stream end>'"),
    ("{}", ["model.layers.ff7.units=3"], "override 'model.layers.ff7.units=3': model.layers.ff7: no such layer; "
                                         "did you mean 'ff6'?"),
    ("{}", ["model.layers.9.units=3"], "override 'model.layers.9.units=3': model.layers.9: no such layer; "
                                       "there are 7 layers, 0 to 6"),
    ("{}", ["model.layers.ff5.unit=3"], "override 'model.layers.ff5.unit=3': model.layers.ff5.unit: unknown key; "
                                        "did you mean 'units'?"),
    ("{}", ["model.layers.ff5.units=0"], "override 'model.layers.ff5.units=0': model.layers.ff5.units: "
                                         "must be at least 1, got 0"),
    ("{}", ["model.layers.output.activation=relu"],
     "override 'model.layers.output.activation=relu': model.layers.output.activation: the output layer feeds "
     "softmax and must have activation none, got 'relu'"),
    ("{}", ["model.layers.output.type=conv"],
     "override 'model.layers.output.type=conv': model.layers.output.filters: required key is missing"),
    # An error the file made is blamed on the file even when overrides are given.
    ("optimizer: {lr: -1}", ["training.epochs=2"], "bad.yaml: optimizer.lr: must be greater than 0, got -1"),
    ("optimizer: 5", ["optimizer.lr=1"], "bad.yaml: optimizer: expected a mapping, got 5"),
])
def test_bad_config_messages(write, text, overrides, message):
    with pytest.raises(ConfigError) as e:
        load_config(write(text), overrides)
    assert str(e.value) == message


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config(tmp_path / "nope.yaml")
    assert str(e.value) == f"no such config file: {tmp_path / 'nope.yaml'}"


def test_from_dict_validates_and_names_its_source():
    assert Config.from_dict(Config().to_dict()) == Config()
    with pytest.raises(ConfigError) as e:
        Config.from_dict({"optimizer": {"lr": 0}})
    assert str(e.value) == "<checkpoint>: optimizer.lr: must be greater than 0, got 0"
    with pytest.raises(ConfigError) as e:
        Config.from_dict([1], source="run.npz")
    assert str(e.value) == "run.npz: expected a YAML mapping at the top level, got a list"


def test_config_is_frozen():
    with pytest.raises(ValidationError):
        Config().seed = 1


def test_dump_loads_back_equal(write):
    original = load_config(write(
        "name: '1e3'\nseed: 7\n"  # a name our loader would read as a float unless the dump quotes it
        "data: {dataset: mnist-sample, dir: /data/x, validation: 600, train_limit: 1000}\n"
        "model:\n  input: [3, 32, 30]\n  dtype: float64\n  layers:\n"
        "    - {name: c1, type: conv, filters: 3, kernel: 3, padding: 1, connections: [[0, 2], [1], [0, 1, 2]]}\n"
        "    - {name: p2, type: maxpool, size: 3}\n"
        "    - {name: out, type: dense, units: 5}\n"
        "optimizer: {lr: 1e-7, momentum: 0.9, weight_decay: 5e-4}\n", "x.yaml"))
    assert original.name == "1e3" and original.optimizer.lr == 1e-7
    for c in (original, Config()):
        text = dump_yaml(c)
        assert load_config(write(text, "dumped.yaml")) == c
        assert yaml.safe_load(text) == c.to_dict()  # plain YAML, readable by any loader
    assert "  - {name: conv1, type: conv, filters: 6, kernel: 5, padding: 2, activation: relu, connections: full}\n" \
        in dump_yaml(Config())
