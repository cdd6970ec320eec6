"""The run configuration: YAML schema, defaults -> file -> KEY=VALUE overrides, validation.

Every key has a default (the LeNet seed network), so a file states only what differs.
Validation runs once, on the merged result, and any problem becomes a one-line
`ConfigError` that names the source, the dotted key, the bad value and what was expected.
Only this module knows about YAML and pydantic; the engine gets plain values.
"""
from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Sequence, Union

import yaml
from pydantic import (BaseModel, ConfigDict, Field, Strict, ValidationError, ValidationInfo, field_validator,
                      model_validator)
from pydantic_core import PydanticCustomError


class ConfigError(Exception):
    """A config problem, as one line fit to print to the user."""


# ---- YAML -------------------------------------------------------------------------

class _Loader(yaml.SafeLoader):
    """SafeLoader that reads YAML 1.2 floats like `1e-3` and rejects duplicate keys."""

    def construct_mapping(self, node, deep=False):
        # PyYAML keeps the last of two equal keys; a silently ignored `lr:` is worse than an error.
        seen = set()
        for key_node, _ in node.value:
            if isinstance(key_node, yaml.ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge":
                key = (key_node.tag, key_node.value)
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key {key_node.value!r}", key_node.start_mark)
                seen.add(key)
        return super().construct_mapping(node, deep)


class _Dumper(yaml.SafeDumper):
    """SafeDumper that quotes any string our loader would read back as a float."""


# YAML 1.1 wants a dot and a signed exponent (`1.0e-3`), so PyYAML reads `1e-3` as a string.
# Appended after the int resolver, so `10` stays an int; `.inf`/`.nan` keep their 1.1 resolver.
_FLOAT_12 = re.compile(r"^[-+]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)[eE][-+]?[0-9]+$")
for _cls in (_Loader, _Dumper):
    _cls.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT_12, list("-+0123456789."))


def _parse_yaml(text: str, where: str, value: bool = False) -> Any:
    """Parse YAML text; a syntax error becomes one line naming where it happened."""
    try:
        return yaml.load(text, Loader=_Loader)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark
        if value or mark is None:
            raise ConfigError(f"{where}: invalid YAML value: {e.problem}") from None
        raise ConfigError(f"{where}:{mark.line + 1}:{mark.column + 1}: invalid YAML: {e.problem}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{where}: invalid YAML: {str(e).splitlines()[0]}") from None


# Strict: no '10' -> 10, no true -> 1, no 10.5 -> 10; a strict float still takes an int.
Float = Annotated[float, Strict(), Field(allow_inf_nan=False)]
Bool = Annotated[bool, Strict()]
Str = Annotated[str, Strict()]
PosInt = Annotated[int, Strict(), Field(ge=1)]
NonNegInt = Annotated[int, Strict(), Field(ge=0)]
Activation = Literal["relu", "none"]

_RUN_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")
_LAYER_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def _show(value: Any) -> str:
    """A value as the user would recognise it from YAML, kept short."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    text = repr(list(value) if isinstance(value, tuple) else value)
    return text if len(text) <= 60 else text[:57] + "..."


_NOTHING = object()


def _bad(reason: str, value: Any = _NOTHING, at: tuple = ()) -> PydanticCustomError:
    """A finished message for `_explain`; `at` extends the error's location (e.g. a layer)."""
    text = reason if value is _NOTHING else f"{reason}, got {_show(value)}"
    # The text goes in ctx, not the template, so braces in a shown value are not re-formatted.
    return PydanticCustomError("config", "{text}", {"text": text, "at": at})


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DataSpec(_Section):
    """Which images to train and test on, and how to split and order them."""

    dataset: Literal["mnist", "fashion-mnist", "mnist-sample"] = "mnist"
    dir: Optional[Str] = None
    validation: Union[int, float] = 0.1
    shuffle: Bool = True
    train_limit: Optional[PosInt] = None
    test_limit: Optional[PosInt] = None
    fallback: Bool = True
    # Base URLs tried before a dataset's own mirrors when it has to be downloaded.
    mirrors: list[Str] = []

    @field_validator("mirrors")
    @classmethod
    def _http_urls(cls, v: list[str]) -> list[str]:
        for i, url in enumerate(v):
            if not re.match(r"^https?://[^/\s]+(/\S*)?$", url):
                raise _bad("expected an http:// or https:// URL", url, at=(i,))
        return v

    @field_validator("validation", mode="before")
    @classmethod
    def _fraction_or_count(cls, v: Any) -> Union[int, float]:
        if type(v) is int and v >= 0:
            return v
        if type(v) is float and 0 <= v < 1:
            return v
        raise _bad("expected a fraction in [0, 1) or a count of images >= 0", v)


class _Layer(_Section):
    name: Str

    @field_validator("name")
    @classmethod
    def _checkpoint_key(cls, v: str) -> str:
        if not _LAYER_NAME.match(v):
            raise _bad("expected letters, digits and '_', not starting with a digit", v)
        return v


class ConvSpec(_Layer):
    """A 2-D convolution, stride 1."""

    type: Literal["conv"]
    filters: PosInt
    kernel: PosInt
    padding: NonNegInt = 0
    activation: Activation = "none"
    # 'full', 'lenet5' (LeCun 1998, table 1) or, per filter, the input maps it reads.
    connections: Union[Literal["full", "lenet5"], tuple[tuple[int, ...], ...]] = "full"

    @field_validator("connections", mode="before")
    @classmethod
    def _connection_table(cls, v: Any, info: ValidationInfo) -> Any:
        if v in ("full", "lenet5"):
            return v
        if not isinstance(v, (list, tuple)):
            raise _bad("expected full, lenet5 or a list of input-map lists, one per filter", v)
        filters = info.data.get("filters")  # absent when filters itself was invalid
        if filters is not None and len(v) != filters:
            raise _bad(f"expected {filters} lists of input maps, one per filter, got {len(v)}")
        for j, maps in enumerate(v):
            # Whether the indices fit the input's channel count is checked when the network is built.
            if not (isinstance(maps, (list, tuple)) and maps and len(set(maps)) == len(maps)
                    and all(type(m) is int and m >= 0 for m in maps)):
                raise _bad("expected a non-empty list of distinct input-map indices >= 0", maps, at=(j,))
        return tuple(tuple(maps) for maps in v)


class MaxPoolSpec(_Layer):
    """Max pooling over size x size windows, stride = size."""

    type: Literal["maxpool"]
    size: PosInt


class DenseSpec(_Layer):
    """A fully connected layer; flattens its input first when needed."""

    type: Literal["dense"]
    units: PosInt
    activation: Activation = "none"


LayerSpec = Annotated[Union[ConvSpec, MaxPoolSpec, DenseSpec], Field(discriminator="type")]
LAYER_TYPES = {"conv": ConvSpec, "maxpool": MaxPoolSpec, "dense": DenseSpec}

LENET_LAYERS = (
    ConvSpec(name="conv1", type="conv", filters=6, kernel=5, padding=2, activation="relu"),
    MaxPoolSpec(name="pool2", type="maxpool", size=2),
    ConvSpec(name="conv3", type="conv", filters=16, kernel=5, activation="relu", connections="full"),
    MaxPoolSpec(name="pool4", type="maxpool", size=2),
    DenseSpec(name="ff5", type="dense", units=120, activation="relu"),
    DenseSpec(name="ff6", type="dense", units=84, activation="relu"),
    DenseSpec(name="output", type="dense", units=10),
)


class ModelSpec(_Section):
    """The network: input shape, parameter dtype, and the layers in order."""

    input: tuple[PosInt, ...] = (1, 28, 28)
    dtype: Literal["float32", "float64"] = "float32"
    layers: tuple[LayerSpec, ...] = LENET_LAYERS

    @field_validator("input")
    @classmethod
    def _chw(cls, v: tuple) -> tuple:
        if len(v) != 3:
            raise _bad("expected [channels, height, width]", v)
        return v

    @field_validator("layers")
    @classmethod
    def _names_and_output(cls, v: tuple) -> tuple:
        if not v:
            raise _bad("expected at least one layer, got none")
        first = {}
        for i, layer in enumerate(v):
            if layer.name in first:
                raise _bad(f"duplicate layer name {layer.name!r} (layer {first[layer.name]} has it too)",
                           at=(i, "name"))
            first[layer.name] = i
        # The last layer's outputs are the logits that softmax + cross-entropy read.
        last = len(v) - 1
        if v[last].type != "dense":
            raise _bad("the last layer is the output and must be dense", v[last].type, at=(last, "type"))
        if v[last].activation != "none":
            raise _bad("the output layer feeds softmax and must have activation none",
                       v[last].activation, at=(last, "activation"))
        return v


class OptimizerSpec(_Section):
    """SGD with optional momentum and L2 weight decay, and a per-epoch learning-rate schedule."""

    type: Literal["sgd"] = "sgd"
    lr: Annotated[Float, Field(gt=0)] = 0.05
    momentum: Annotated[Float, Field(ge=0)] = 0.0
    weight_decay: Annotated[Float, Field(ge=0)] = 0.0
    # constant: lr; step: lr * gamma^((epoch-1) // step_size);
    # cosine: from lr down to min_lr over training.epochs (half a cosine wave).
    schedule: Literal["constant", "step", "cosine"] = "constant"
    step_size: PosInt = 10
    gamma: Annotated[Float, Field(gt=0)] = 0.1
    min_lr: Annotated[Float, Field(ge=0)] = 0.0


class TrainingSpec(_Section):
    """How long to train and how many images per step."""

    epochs: PosInt = 10
    batch_size: PosInt = 64
    eval_batch_size: PosInt = 1000
    # Cores for one batch's chunks: this process plus threads - 1 helper processes; null =
    # one per available core, at most 4. Results do not depend on it (engine/model.py).
    threads: Optional[PosInt] = None
    # Stop when validation accuracy has not improved for this many epochs; null = never.
    patience: Optional[PosInt] = None


class Config(_Section):
    """A whole, validated run configuration."""

    name: Str = "lenet"
    seed: NonNegInt = 0
    data: DataSpec = DataSpec()
    model: ModelSpec = ModelSpec()
    optimizer: OptimizerSpec = OptimizerSpec()
    training: TrainingSpec = TrainingSpec()

    @field_validator("name")
    @classmethod
    def _folder_name(cls, v: str) -> str:
        if not _RUN_NAME.match(v) or v in (".", ".."):
            raise _bad("expected letters, digits, '-', '_' or '.' (it names the run folder)", v)
        return v

    @model_validator(mode="after")
    def _patience_needs_validation(self) -> "Config":
        if self.training.patience is not None and self.data.validation == 0:
            raise _bad("early stopping watches validation accuracy: set data.validation > 0",
                       at=("training", "patience"))
        return self

    def to_dict(self) -> dict:
        """Plain dict of every resolved value (lists, not tuples), ready for JSON or YAML."""
        return self.model_dump(mode="json")

    @classmethod
    def from_dict(cls, d: Any, source: str = "<checkpoint>") -> "Config":
        """Validate a dict (e.g. a checkpoint's stored config); problems raise ConfigError."""
        return _validate(_top_level(d, source), source, [])


# Markers for the schema while walking an override key: the layer list, and a layer of unknown type.
_LAYERS, _ANY_LAYER = "the layer list", "any layer"

_KIND = {type(None): "an empty file", list: "a list", str: "a string", int: "a number",
         float: "a number", bool: "a boolean"}


def _top_level(data: Any, source: str) -> dict:
    """A shallow copy of the top-level mapping; a section left empty (`optimizer:`) means defaults."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a YAML mapping at the top level, "
                          f"got {_KIND.get(type(data), type(data).__name__)}")
    return {k: v for k, v in data.items() if not (v is None and k in ("data", "model", "optimizer", "training"))}


def _schema_keys(schema: Any) -> list[str]:
    """The valid keys of a section class, or of any layer type for `_ANY_LAYER`."""
    classes = LAYER_TYPES.values() if schema == _ANY_LAYER else [schema]
    return list(dict.fromkeys(key for c in classes for key in c.model_fields))


def _unknown(key: Any, valid: list[str]) -> str:
    close = difflib.get_close_matches(str(key), valid, n=1)
    if close:
        return f"unknown key; did you mean {close[0]!r}?"
    return f"unknown key; expected one of {', '.join(valid)}"


def _section_of(cls: type, key: str) -> Optional[type]:
    annotation = cls.model_fields[key].annotation
    return annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None


def _container(loc: tuple) -> type:
    """The schema class that holds the last key of a pydantic error location."""
    cls = Config
    for part in loc[:-1]:
        if isinstance(part, str):
            cls = LAYER_TYPES.get(part) or _section_of(cls, part) or cls
    return cls


def _is_layer(loc: tuple, k: int) -> bool:
    return loc[:2] == ("model", "layers") and k == 2 and isinstance(loc[2], int)


def _layer_labels(data: dict) -> dict[int, str]:
    """Layer index -> name, for layers whose name is valid and unique; others go by index."""
    model = data.get("model")
    layers = model.get("layers") if isinstance(model, dict) else None
    if not isinstance(layers, list):
        return {}
    names = [layer.get("name") if isinstance(layer, dict) else None for layer in layers]
    return {i: n for i, n in enumerate(names)
            if isinstance(n, str) and _LAYER_NAME.match(n) and names.count(n) == 1}


def _dotted(loc: tuple, labels: dict[int, str]) -> str:
    text = ""
    for k, part in enumerate(loc):
        if isinstance(part, int):
            text += f".{labels[part]}" if _is_layer(loc, k) and part in labels else f"[{part}]"
        else:
            text += f".{part}" if text else str(part)
    return text


def _explain(err: dict) -> str:
    """What was expected and what was found, for one pydantic error."""
    kind, ctx, value = err["type"], err.get("ctx", {}), err.get("input")
    if kind == "config":
        return err["msg"]
    if kind == "missing":
        return "required key is missing"
    if kind == "union_tag_not_found":
        return f"required key is missing; expected one of {', '.join(LAYER_TYPES)}"
    if kind == "union_tag_invalid":
        return f"expected one of {', '.join(LAYER_TYPES)}, got {_show(value.get('type'))}"

    def num(x: Any) -> str:
        return f"{x:g}" if isinstance(x, float) else str(x)

    expected = {
        "int_type": "expected an integer",
        "float_type": "expected a number",
        "finite_number": "expected a finite number",
        "bool_type": "expected true or false",
        "string_type": "expected a string",
        "tuple_type": "expected a list",
        "list_type": "expected a list",
        "model_type": "expected a mapping",
        "model_attributes_type": "expected a mapping",
        "dict_type": "expected a mapping",
        "greater_than": f"must be greater than {num(ctx.get('gt'))}",
        "greater_than_equal": f"must be at least {num(ctx.get('ge'))}",
        "less_than": f"must be less than {num(ctx.get('lt'))}",
        "less_than_equal": f"must be at most {num(ctx.get('le'))}",
    }.get(kind)
    if kind == "literal_error":
        expected = "expected one of " + ", ".join(re.findall(r"'([^']*)'", ctx.get("expected", "")))
    if expected is None:  # a type we did not anticipate: pydantic's own words, still one line
        expected = err["msg"][:1].lower() + err["msg"][1:]
    return f"{expected}, got {_show(value)}"


def _message(err: dict, data: dict, source: str, origins: list[tuple[tuple, str]]) -> str:
    loc = tuple(err["loc"])
    if len(loc) > 3 and _is_layer(loc, 2) and loc[3] in LAYER_TYPES:
        loc = loc[:3] + loc[4:]  # the discriminated union adds the tag to the location
    if err["type"].startswith("union_tag"):
        loc += ("type",)
    loc += tuple(err.get("ctx", {}).get("at", ()))
    labels = _layer_labels(data)
    if err["type"] in ("extra_forbidden", "invalid_key"):  # invalid_key: a key that is not text, like `1:`
        where = _dotted(loc[:-1], labels)
        text = f"{where}.{loc[-1]}" if where else str(loc[-1])
        text += ": " + _unknown(loc[-1], _schema_keys(_container(tuple(err["loc"]))))
    else:
        text = f"{_dotted(loc, labels)}: {_explain(err)}"
    # Blame the last override that set this key or a section above it; otherwise the file.
    for path, where in origins:
        if loc[:len(path)] == path:
            source = where
    return f"{source}: {text}"


def _validate(data: dict, source: str, origins: list[tuple[tuple, str]]) -> Config:
    try:
        return Config.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_message(e.errors()[0], data, source, origins)) from None


def _layer_index(layers: list, part: str, where: str, dotted: str) -> int:
    if part.isdigit():
        if int(part) < len(layers):
            return int(part)
        raise ConfigError(f"{where}: {dotted}: no such layer; there are {len(layers)} layers, "
                          f"0 to {len(layers) - 1}")
    names = [layer.get("name") if isinstance(layer, dict) else None for layer in layers]
    if names.count(part) == 1:
        return names.index(part)
    if names.count(part) > 1:
        raise ConfigError(f"{where}: {dotted}: {names.count(part)} layers have this name; use an index")
    valid = [n for n in names if isinstance(n, str)]
    close = difflib.get_close_matches(part, valid, n=1)
    hint = f"did you mean {close[0]!r}?" if close else f"layers are {', '.join(valid)}"
    raise ConfigError(f"{where}: {dotted}: no such layer; {hint}")


def _apply_override(data: dict, text: str, source: str) -> tuple:
    """Set one KEY=VALUE in `data`; return the key's path (layers by index) for blaming errors."""
    where = f"override {text!r}"
    key, eq, raw = text.partition("=")
    key = key.strip()
    if not eq or not key:
        raise ConfigError(f"{where}: expected KEY=VALUE, e.g. optimizer.lr=0.01")
    value = _parse_yaml(raw, where, value=True)
    parts = key.split(".")
    node, schema, path = data, Config, []
    for i, part in enumerate(parts):
        dotted, last = ".".join(parts[:i + 1]), i == len(parts) - 1
        if schema is _LAYERS:
            part = _layer_index(node, part, where, dotted)
        elif part not in _schema_keys(schema):
            raise ConfigError(f"{where}: {dotted}: {_unknown(part, _schema_keys(schema))}")
        path.append(part)
        if last:
            node[part] = value
            # A layer's type decides which of its keys are valid, so a new type owns the whole layer.
            return tuple(path[:-1] if schema in (_ANY_LAYER, *LAYER_TYPES.values()) and part == "type" else path)

        if schema is _LAYERS:
            kind = node[part].get("type") if isinstance(node[part], dict) else None
            child, empty = LAYER_TYPES.get(str(kind), _ANY_LAYER), {}
        elif schema is ModelSpec and part == "layers":
            # Layers are addressed by name, so a file without them starts from the defaults.
            child, empty = _LAYERS, [layer.model_dump(mode="json") for layer in LENET_LAYERS]
        elif isinstance(schema, type) and _section_of(schema, part):
            child, empty = _section_of(schema, part), {}
        else:
            raise ConfigError(f"{where}: {'.'.join(parts[:i + 2])}: unknown key; {dotted!r} has no sub-keys")
        # Sections the file leaves out (or leaves empty) are created; the schema fills the rest.
        current = node[part] if schema is _LAYERS else node.get(part)
        if current is None:
            node[part] = current = empty
        if not isinstance(current, type(empty)):
            kind = "list" if child is _LAYERS else "mapping"
            raise ConfigError(f"{source}: {dotted}: expected a {kind}, got {_show(current)}")
        node, schema = current, child
    raise AssertionError("unreachable")


def read_yaml_file(path: Path, what: str) -> Any:
    """A YAML file's content (with YAML 1.2 floats); a missing, unreadable or malformed
    file is one ConfigError line naming `what` it is (a config file, a sweep spec)."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"no such {what}: {path}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read {what} {path}: {e}") from None
    return _parse_yaml(text, str(path))


def load_config(path: Union[str, Path], overrides: Sequence[str] = ()) -> Config:
    """Read a YAML config, apply KEY=VALUE overrides, validate; problems raise ConfigError."""
    path = Path(path)
    source = str(path)
    data = _top_level(read_yaml_file(path, "config file"), source)
    data.setdefault("name", path.stem)
    origins = [(_apply_override(data, override, source), f"override {override!r}") for override in overrides]
    return _validate(data, source, origins)


class _Flow(list):
    pass


class _FlowMap(dict):
    pass


_Dumper.add_representer(_Flow, lambda d, v: d.represent_sequence("tag:yaml.org,2002:seq", v, flow_style=True))
_Dumper.add_representer(_FlowMap, lambda d, v: d.represent_mapping("tag:yaml.org,2002:map", v, flow_style=True))


def dump_yaml(config: Config) -> str:
    """The config as YAML that loads back to an equal Config; one line per layer."""
    d = config.to_dict()
    d["model"]["input"] = _Flow(d["model"]["input"])
    d["model"]["layers"] = [_FlowMap(layer) for layer in d["model"]["layers"]]
    return yaml.dump(d, Dumper=_Dumper, sort_keys=False, default_flow_style=False, width=1000)
