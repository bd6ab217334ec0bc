"""Load and validate models.yaml, methods.yaml and the grid config.

Every problem becomes one ConfigError line naming the file, the key and what would be valid.
"""

from __future__ import annotations

import hashlib
import json
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path

import jsonschema
import yaml

from harness.errors import ConfigError, valid_names
from harness.schedules import schedule_function

SCHEMA_DIR = Path(__file__).parent / "schemas"


@lru_cache(maxsize=None)
def schema(name: str) -> dict:
    return yaml.safe_load((SCHEMA_DIR / f"{name}.schema.yaml").read_text())


class _DuplicateKey(yaml.YAMLError):
    def __init__(self, key, first_line: int, second_line: int):
        super().__init__(f"key {key!r} appears twice, at lines {first_line} and {second_line}")


class StrictLoader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):  # libyaml's parser where installed
    """yaml.safe_load's loader, but a key given twice in one mapping is an error instead of the last one
    silently winning (a grid with `nfe:` twice would run the second list only)."""


def _strict_mapping(loader, node, deep=False):
    seen: dict = {}
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":
            continue
        key = loader.construct_object(key_node, deep=True)
        line = key_node.start_mark.line + 1
        if isinstance(key, (str, int, float, bool)) and key in seen:
            raise _DuplicateKey(key, seen[key], line)
        seen[key] = line
    return yaml.constructor.SafeConstructor.construct_mapping(loader, node, deep)


StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _strict_mapping)


def parse_yaml(text: str, source: str | Path) -> object:
    """YAML (StrictLoader), or one line naming `source`, where and what is wrong."""
    try:
        return yaml.load(text, Loader=StrictLoader)
    except _DuplicateKey as err:
        raise ConfigError(f"{source}: {err}") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"{source}: malformed YAML{where}: {problem}") from None


def load_yaml(path: str | Path) -> object:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: file not found")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: unreadable ({type(err).__name__})") from None
    return parse_yaml(text, path)


@contextmanager
def in_file(path: str | Path):
    """A ConfigError about a key of an entry ('key \'x.y\': ...') names the file the entry was read from."""
    try:
        yield
    except ConfigError as err:
        if str(err).startswith("key "):
            raise ConfigError(f"{path}: {err}") from None
        raise


def validate(data: object, schema_name: str, path: str | Path) -> None:
    validator = jsonschema.Draft202012Validator(schema(schema_name))
    # the shallowest error first; at one place a misspelt key ('nfee' was unexpected) before what it left
    # missing ('nfe' is required), since it names what to fix
    errors = sorted(validator.iter_errors(data), key=lambda e: (len(e.absolute_path), list(map(str, e.absolute_path)),
                                                                e.validator != "additionalProperties"))
    if errors:
        err = errors[0]
        key = ".".join(str(p) for p in err.absolute_path) or "(top level)"
        raise ConfigError(f"{path}: key '{key}': {err.message}")


def _check_choice(path, key: str, value: str, valid: list[str]) -> None:
    if value not in valid:
        raise ConfigError(f"{path}: key '{key}': {value!r} unknown{valid_names(value, valid)}")


def load_models(path: str | Path = "models.yaml") -> dict[str, dict]:
    from harness.datasets import DATASETS
    from harness.metrics import METRICS
    from harness.models import MODELS, model_kind

    data = load_yaml(path)
    validate(data, "models", path)
    for model_id, spec in data.items():
        _check_choice(path, f"{model_id}.adapter", spec["adapter"], MODELS.names())
        if ("process" in spec) == (model_kind(spec) == "flow"):  # a denoiser needs its noise process, a flow has none
            raise ConfigError(f"{path}: key '{model_id}.process': " + ("a normalizing flow has no noise process"
                              if "process" in spec else "required (the model's noise process)"))
        if "dataset" in spec:
            _check_choice(path, f"{model_id}.dataset", spec["dataset"], list(DATASETS))
        for i, metric in enumerate(spec["metrics"]):
            _check_choice(path, f"{model_id}.metrics.{i}", metric, METRICS.names())
    if any("train" in spec for spec in data.values()):
        from harness.training import annotate_keys

        with in_file(path):
            annotate_keys(data, path)  # each trained entry's cache key (its teacher's included)
    return data


class MethodTable(dict):
    """methods.yaml's entries by id, and the one-line reason for each entry that cannot be used here (a
    `module:` of solvers that does not import): only a grid or command that asks for such an entry fails,
    so a colleague's plugin in a shared methods.yaml does not stop everyone else."""

    def __init__(self, entries: dict, unusable: dict[str, str], path: str | Path):
        super().__init__(entries)
        self.unusable = unusable
        self.path = path


BASED_FAMILIES = ("stitch", "quantized")  # families that run one of the file's solver entries


def load_methods(path: str | Path = "methods.yaml") -> MethodTable:
    from harness.methods import FAMILIES

    data = load_yaml(path)
    validate(data, "methods", path)
    unusable = {}
    for method_id, spec in data.items():
        _check_choice(path, f"{method_id}.family", spec["family"], FAMILIES.names())
        if "baseline" in spec:
            _check_choice(path, f"{method_id}.baseline", spec["baseline"], list(data))
        if spec["family"] in BASED_FAMILIES:  # a method over a solver entry: that entry goes with it (cell hashes)
            settings = spec.get(spec["family"])
            if not isinstance(settings, dict) or "base" not in settings:
                raise ConfigError(f"{path}: key '{method_id}.{spec['family']}': needs a 'base' solver entry")
            solvers = [m for m, s in data.items() if s.get("family") == "solver"]
            _check_choice(path, f"{method_id}.{spec['family']}.base", settings["base"], solvers)
            spec["base_spec"] = data[settings["base"]]
        if spec["family"] == "solver":
            from harness.methods.family_solver import SOLVERS, import_solver_module

            if "solver" not in spec:
                raise ConfigError(f"{path}: key '{method_id}': family 'solver' needs a 'solver' key")
            if "module" in spec:
                try:
                    import_solver_module(spec["module"])
                except ConfigError as err:
                    unusable[method_id] = f"{path}: key '{method_id}.module': {err}"
                    continue  # its solver name and params cannot be checked without the module
            _check_choice(path, f"{method_id}.solver", spec["solver"], sorted(SOLVERS))
            valid = SOLVERS[spec["solver"]].param_names()
            unknown = sorted(set(spec.get("params", {})) - set(valid)) if valid is not None else []
            if unknown:
                raise ConfigError(f"{path}: key '{method_id}.params.{unknown[0]}': unknown for solver "
                                  f"{spec['solver']!r}{valid_names(unknown[0], valid)}")
        if spec["family"] in ("student", "jacobi", "quantized"):  # their constructors check procedure and params
            from harness.methods import make_sampler

            try:
                make_sampler(spec)
            except ConfigError as err:
                raise ConfigError(f"{path}: method '{method_id}': {err}") from None
        if "schedule" in spec:
            try:
                schedule_function(spec["schedule"])
            except ConfigError as err:
                raise ConfigError(f"{path}: key '{method_id}.schedule': {err}") from None
    return MethodTable(data, unusable, path)


def lookup(table: dict[str, dict], item_id: str, path: str | Path, what: str) -> dict:
    if item_id not in table:
        see = "`stepbench methods`" if what == "method" else str(path)
        raise ConfigError(f"{path}: no {what} {item_id!r}{valid_names(item_id, table, see)}")
    if item_id in getattr(table, "unusable", {}):
        raise ConfigError(table.unusable[item_id])
    return table[item_id]


def config_hash(*parts: object) -> str:
    """Stable short hash of JSON-able config pieces (provenance and cache keys)."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]
