"""How a config is read and checked: the YAML loader, value coercion, `StrictConfig` (the base of every config)
and the field checks the configs' validate() methods share. Imports only errors.py.
"""

import collections.abc
import dataclasses
import difflib
import json
import math
import re
from pathlib import Path
from typing import Any

import yaml

from nanochat_flyte.errors import ConfigError


class YamlLoader(yaml.SafeLoader):
    """YAML as YAML 1.2 reads booleans, numbers and dates. YAML 1.1 (PyYAML's) would turn `humaneval: off` into False
    (and the user's `off` into a confusing `must be a str, got False`), leave 1e-3 a string (its floats need a dot and
    a signed exponent), read 010 as octal 8, 1:30 as 90 (base 60) and `run_name: 2024-06-01` as a date. Underscores
    in numbers stay allowed: 65_536."""


YAML_1_1_TAGS = ("tag:yaml.org,2002:bool", "tag:yaml.org,2002:int", "tag:yaml.org,2002:float",
                 "tag:yaml.org,2002:timestamp")
YamlLoader.yaml_implicit_resolvers = {
    first: [(tag, pattern) for tag, pattern in resolvers if tag not in YAML_1_1_TAGS]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
YamlLoader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                                 list("tTfF"))
YamlLoader.add_implicit_resolver("tag:yaml.org,2002:int", re.compile(r"^[-+]?[0-9][0-9_]*$"), list("-+0123456789"))
YamlLoader.add_implicit_resolver(  # PyYAML's float constructor reads these (and .inf, .nan, which validation refuses)
    "tag:yaml.org,2002:float",
    re.compile(r"^(?:[-+]?(?:\.[0-9][0-9_]*|[0-9][0-9_]*(?:\.[0-9_]*)?)(?:[eE][-+]?[0-9]+)?"
               r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"),
    list("-+0123456789."))
YamlLoader.add_constructor("tag:yaml.org,2002:int",  # base 10 always: YAML 1.1's 0-prefixed octal is gone in 1.2
                           lambda loader, node: int(loader.construct_scalar(node).replace("_", ""), 10))


def mapping_without_repeats(loader: YamlLoader, node: yaml.MappingNode) -> dict:
    """A mapping, refused where a key repeats (YAML forbids it; PyYAML would keep the last value without a word)."""
    seen = set()
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":
            continue  # `<<: *defaults`: construct_mapping merges it, and its keys may be overridden here
        key = loader.construct_object(key_node)
        if not isinstance(key, collections.abc.Hashable):
            break  # construct_mapping names that error
        if key in seen:
            raise yaml.constructor.ConstructorError(None, None, f"key {key!r} appears twice", key_node.start_mark)
        seen.add(key)
    return loader.construct_mapping(node)


YamlLoader.add_constructor("tag:yaml.org,2002:map", mapping_without_repeats)


def json_object_without_repeats(pairs: list[tuple[str, Any]]) -> dict:
    """json.loads' object_pairs_hook: a JSON object, refused where a key repeats, as a YAML mapping is (json keeps the
    last value without a word)."""
    keys = [key for key, _ in pairs]
    if repeated := next((key for key in keys if keys.count(key) > 1), None):
        raise ValueError(f"key {repeated!r} appears twice")
    return dict(pairs)


# Fields whose words are YAML 1.1 booleans: a boolean given for one (`"humaneval": false` in JSON, or a preset read by
# a YAML 1.1 reader such as PyYAML's safe_load, where `off` is False) means the word it was read from.
ON_OFF_FIELDS = ("humaneval",)


# Allowed types of a field's value, by its annotation: YAML and JSON write 1 for 1.0, and the console's JSON
# (a protobuf Struct) turns every number into a float, so whole floats are accepted for ints and ints for floats.
def coerce(owner: str, field: dataclasses.Field, value: Any) -> Any:
    kind = field.type if isinstance(field.type, type) else {"int": int, "float": float, "str": str,
                                                              "bool": bool}[field.type]
    if kind is bool:
        if isinstance(value, bool):
            return value
    elif kind is int:
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, int) and not isinstance(value, bool):
            if abs(value) >= 2**63:  # torch's seeds, Flyte's msgpack and every counter here are 64-bit
                raise ConfigError(field.name, f"must be below 2**63 in size, got {value}", owner)
            return value
    elif kind is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):  # NaN passes every `< 0` check and trains to a NaN loss
                raise ConfigError(field.name, f"must be a finite number, got {value}", owner)
            return float(value)
    elif isinstance(value, bool) and field.name in ON_OFF_FIELDS:
        return "on" if value else "off"
    elif value is None:  # `save_to:` with nothing after it: empty text, as the docs' "empty: ..." mean
        return ""
    elif isinstance(value, kind):
        return value
    raise ConfigError(field.name, f"must be {'an' if kind is int else 'a'} {kind.__name__}, got {value!r}", owner)


class StrictConfig:
    """What the workflow configs share: every way into them rejects an unknown field by name, before anything runs.

    The ways in: our loaders (`from_file`, `from_mapping`, the config CLI); `--config` on `pyflyte run` and `flyte
    run` (`from_cli_value`, which workflows/support.py and workflows/flyte2/cli.py install in each CLI); and Flyte's
    type engine (the msgpack literal of a launch and the console's JSON on a relaunch), which decodes with
    mashumaro, which calls `__pre_deserialize__` first.
    """

    @classmethod
    def check_fields(cls, values: dict[str, Any]) -> None:
        known = [f.name for f in dataclasses.fields(cls)]
        for name in values:
            if not isinstance(name, str):  # YAML reads `12: 3` with a number as its key
                raise ConfigError(str(name), "unknown field; field names are text", cls.__name__)
        for name in sorted(set(values) - set(known)):
            close = difflib.get_close_matches(name, known, n=1)
            hint = f"did you mean {close[0]}?" if close else f"{cls.__name__} has {', '.join(known)}"
            if other := cls.other_kind(values):  # (a chat stage's preset given for pretraining: no typo to suggest)
                hint = f"the fields given are {other.__name__}'s, not {cls.__name__}'s"
            raise ConfigError(name, f"unknown field; {hint}", cls.__name__)

    @classmethod
    def other_kind(cls, values: dict[str, Any]) -> type | None:
        """The other kind of config (RunConfig, ChatConfig, RLConfig: the leaves of StrictConfig) that has every
        field `values` sets, if one has."""
        kinds, leaves = list(StrictConfig.__subclasses__()), []
        while kinds:
            kind = kinds.pop()
            kinds += kind.__subclasses__()
            leaves += [] if kind.__subclasses__() else [kind]
        return next((kind for kind in leaves if kind is not cls
                     and set(values) <= {field.name for field in dataclasses.fields(kind)}), None)

    @classmethod
    def from_mapping(cls, values: dict[str, Any]):
        """A config from plain values; fields left out keep their defaults. Not named from_dict: pyflyte run
        patches dataclasses_json's lenient from_dict onto input dataclasses that have none."""
        if not isinstance(values, dict):
            raise ConfigError("*", f"a config is a mapping of field: value, got {type(values).__name__}", cls.__name__)
        cls.check_fields(values)
        fields = {f.name: f for f in dataclasses.fields(cls)}
        return cls(**{name: coerce(cls.__name__, fields[name], value) for name, value in values.items()})

    @classmethod
    def __pre_deserialize__(cls, values: dict[str, Any]) -> dict[str, Any]:
        cls.check_fields(values)
        fields = {f.name: f for f in dataclasses.fields(cls)}
        return {name: coerce(cls.__name__, fields[name], value) for name, value in values.items()}

    @classmethod
    def from_cli_value(cls, value: str | dict, default: dict | None = None):
        """The config a `--config` value on either Flyte front's command line gives: inline JSON (text that starts
        with `{` or `[` and is no file), else a preset file (YAML or JSON), or values already read (a dict from the
        Python API); the fields it sets over `default` (the workflow's own default input), checked. Flyte's own
        readers would drop an unknown field and read YAML 1.1."""
        if isinstance(value, dict):
            values = value
        elif not value.strip():
            raise ConfigError("*", "empty: give a preset file (YAML or JSON) or inline JSON", cls.__name__)
        elif value.lstrip().startswith(("{", "[")) and not is_file(value):
            try:
                values = json.loads(value, object_pairs_hook=json_object_without_repeats)
            except ValueError as error:  # (JSONDecodeError is one)
                raise ConfigError("*", f"not valid JSON: {error}", cls.__name__) from None
        else:
            values = cls.read_preset(value)
        if isinstance(values, dict):
            cls.check_fields(values)  # before the default's fields join them: a preset of another kind is named so
            values = {**(default or {}), **values}
        return cls.from_mapping(values).validate()

    @classmethod
    def from_file(cls, path: str | Path):
        """Load a preset (YAML or JSON). Fields it leaves out keep their defaults."""
        return cls.from_mapping(cls.read_preset(path))

    @classmethod
    def read_preset(cls, path: str | Path) -> Any:
        """The values a preset file (YAML or JSON) sets, as written: not yet checked against the fields."""
        path = Path(path)
        if not is_file(path):
            outside_checkout = path.parts[:1] == ("configs",) and not Path("configs").is_dir()
            where = " (the presets are the repository's configs/: run from its root)" if outside_checkout else ""
            raise ConfigError("*", f"no preset file {str(path)!r}{where}", cls.__name__)
        try:
            text = path.read_text()
            values = (json.loads(text, object_pairs_hook=json_object_without_repeats) if path.suffix == ".json"
                      else yaml.load(text, YamlLoader))
        except (ValueError, yaml.YAMLError) as error:  # (UnicodeDecodeError and JSONDecodeError are ValueErrors)
            problem = " ".join(str(error).split())  # YAML's messages span lines
            raise ConfigError("*", f"{str(path)!r} is not a {'JSON' if path.suffix == '.json' else 'YAML'} "
                                   f"document: {problem}", cls.__name__) from None
        if values is None:  # an empty file, or a bare `null`: most likely not the preset meant
            raise ConfigError("*", f"{str(path)!r} is empty: write the fields it sets ({{}} keeps every default)",
                              cls.__name__)
        return values

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def validate(self, world_size: int = 1):
        raise NotImplementedError


def is_file(path: str | Path) -> bool:
    """Whether a file is there; False for text that cannot be a path at all (inline JSON longer than a file name
    may be: the system refuses to look it up)."""
    try:
        return Path(path).is_file()
    except OSError:
        return False


def at_least(config, field: str, minimum: int) -> None:
    value = getattr(config, field)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(field, f"must be an integer, got {value!r}", type(config).__name__)
    if value < minimum:
        raise ConfigError(field, f"must be >= {minimum}, got {value}", type(config).__name__)


def one_of(config, field: str, allowed: tuple[str, ...]) -> None:
    value = getattr(config, field)
    if value not in allowed:
        raise ConfigError(field, f"unknown value {value!r}; choose one of {', '.join(allowed)}", type(config).__name__)


def fraction(config, field: str) -> None:
    if not 0.0 <= getattr(config, field) <= 1.0:
        raise ConfigError(field, f"must be in [0, 1], got {getattr(config, field)}", type(config).__name__)


def schedule_fits(config) -> None:
    """The warmup and the warmdown of a learning-rate schedule fit in the run together."""
    if config.warmup_ratio + config.warmdown_ratio > 1.0:
        raise ConfigError("warmdown_ratio", f"warmup_ratio + warmdown_ratio must be <= 1, got {config.warmup_ratio} "
                                            f"+ {config.warmdown_ratio}", type(config).__name__)


def no_surrounding_space(config, field: str) -> None:
    """A location typed or pasted with a space at either end would name another folder than the one meant."""
    check_no_surrounding_space(getattr(config, field), field, type(config).__name__)


def check_no_surrounding_space(location: str, field: str, owner: str) -> None:
    if location != location.strip():
        raise ConfigError(field, f"{location!r} starts or ends with white space", owner)


def non_negative(config, field: str) -> None:
    if getattr(config, field) < 0:
        raise ConfigError(field, f"must be >= 0, got {getattr(config, field)}", type(config).__name__)


def parse_override(assignment: str, kind: type) -> tuple[str, Any]:
    """'field=value' for a field of config class `kind`: a text field takes the text as written (`run_name=2024-06-01`,
    `save_to=runs/a #b`, `eval_bundle_url=` for empty); any other the value as YAML reads it (4 -> int, true -> bool,
    1e-3 -> float), or the text where YAML cannot read it, which the field's check then names."""
    field, sep, value = assignment.partition("=")
    field = field.strip()
    if not sep or not field:
        raise ConfigError(field or "*", f"override {assignment!r} is not of the form field=value", kind.__name__)
    if {f.name: f.type for f in dataclasses.fields(kind)}.get(field) in (str, "str"):
        return field, value
    try:
        return field, yaml.load(value, YamlLoader)
    except yaml.YAMLError:
        return field, value


def parse_overrides(assignments: list[str], kind: type) -> dict[str, Any]:
    """'field=value' arguments, each field once: a second value would silently replace the first (a preset file's
    repeated key is refused as well)."""
    overrides = {}
    for assignment in assignments:
        field, value = parse_override(assignment, kind)
        if field in overrides:
            raise ConfigError(field, "given twice on the command line; give it once", kind.__name__)
        overrides[field] = value
    return overrides


def cli_config_class(python_type, value) -> type[StrictConfig] | None:
    """The StrictConfig class that reads a `--config` value on either Flyte front's command line (a preset path,
    inline JSON or values already read), or None where the input is not ours: the front's own reading applies."""
    if isinstance(value, str | dict) and isinstance(python_type, type) and issubclass(python_type, StrictConfig):
        return python_type
    return None
