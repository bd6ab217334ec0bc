"""Fuzzing the config loaders: whatever a models.yaml, methods.yaml or grid file holds, loading it either works
or fails with one StepbenchError line, never a traceback.

Random YAML documents, random structures dumped as YAML, and mutations of the shipped files (a key dropped,
a value replaced by anything, text cut short, a line doubled). A bounded number of examples runs by default;
`-m slow` runs many more.
"""

from __future__ import annotations

import copy

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import REPO
from harness.config import load_methods, load_models
from harness.errors import StepbenchError
from harness.grid import expand_grid, load_grid

SHIPPED = {"models": yaml.safe_load((REPO / "models.yaml").read_text()),
           "methods": yaml.safe_load((REPO / "methods.yaml").read_text()),
           "grid": yaml.safe_load((REPO / "profiles" / "default" / "grid.yaml").read_text())}
TEXTS = {"models": (REPO / "models.yaml").read_text(), "methods": (REPO / "methods.yaml").read_text(),
         "grid": (REPO / "profiles" / "default" / "grid.yaml").read_text()}

scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=True),
                    st.text(max_size=12), st.sampled_from(["euler", "gmm2d", "digits", "edm_rho", "fid", "vp_discrete"]))
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                        st.dictionaries(st.text(max_size=8), inner, max_size=4)),
                      max_leaves=12)


def load(kind: str, path) -> None:
    """The loader of a file kind, and for a grid what the workflow does next with it (expanding the cells)."""
    if kind == "models":
        load_models(path)
    elif kind == "methods":
        load_methods(path)
    else:
        grid = load_grid(path)
        grid["models_file"], grid["methods_file"] = str(REPO / "models.yaml"), str(REPO / "methods.yaml")
        expand_grid(grid)


def assert_loads_or_fails_in_one_line(kind: str, text: str, tmp_path) -> None:
    path = tmp_path / f"{kind}.yaml"
    path.write_text(text, encoding="utf-8")
    try:
        load(kind, path)
    except StepbenchError as err:
        message = str(err)
        assert message and "\n" not in message, repr(message)
    # anything else propagates: a traceback is the failure this test looks for


def mutate(tree, data) -> object:
    """One random edit of a nested structure: drop a key, replace a value, or add a key."""
    tree = copy.deepcopy(tree)
    node = tree
    for _ in range(data.draw(st.integers(0, 3))):
        if isinstance(node, dict) and node:
            key = data.draw(st.sampled_from(sorted(node, key=str)))
            if isinstance(node[key], (dict, list)) and node[key]:
                node = node[key]
        elif isinstance(node, list) and node:
            item = node[data.draw(st.integers(0, len(node) - 1))]
            if isinstance(item, (dict, list)) and item:
                node = item
    action = data.draw(st.sampled_from(["drop", "replace", "add"]))
    if isinstance(node, dict) and node:
        key = data.draw(st.sampled_from(sorted(node, key=str)))
        if action == "drop":
            del node[key]
        elif action == "replace":
            node[key] = data.draw(values)
        else:
            node[data.draw(st.text(max_size=8))] = data.draw(values)
    elif isinstance(node, list) and node:
        node[data.draw(st.integers(0, len(node) - 1))] = data.draw(values)
    return tree


KINDS = st.sampled_from(["models", "methods", "grid"])
FUZZ = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                        HealthCheck.too_slow])
FUZZ_MORE = settings(FUZZ, max_examples=1500)


def _random_text(kind, text, tmp_path):
    assert_loads_or_fails_in_one_line(kind, text, tmp_path)


def _random_structure(kind, tree, tmp_path):
    assert_loads_or_fails_in_one_line(kind, yaml.safe_dump(tree, allow_unicode=True), tmp_path)


def _mutated_file(kind, data, tmp_path):
    assert_loads_or_fails_in_one_line(kind, yaml.safe_dump(mutate(SHIPPED[kind], data)), tmp_path)


def _damaged_text(kind, data, tmp_path):
    text = TEXTS[kind]
    lines = text.splitlines(keepends=True)
    edit = data.draw(st.sampled_from(["cut", "double", "insert"]))
    if edit == "cut":
        text = text[: data.draw(st.integers(0, len(text)))]
    elif edit == "double":
        i = data.draw(st.integers(0, len(lines) - 1))
        text = "".join(lines[: i + 1] + lines[i:])
    else:
        i = data.draw(st.integers(0, len(text)))
        text = text[:i] + data.draw(st.text(max_size=6)) + text[i:]
    assert_loads_or_fails_in_one_line(kind, text, tmp_path)


@FUZZ
@given(kind=KINDS, text=st.text(max_size=200))
def test_random_text(kind, text, tmp_path):
    _random_text(kind, text, tmp_path)


@FUZZ
@given(kind=KINDS, tree=values)
def test_random_structure(kind, tree, tmp_path):
    _random_structure(kind, tree, tmp_path)


@FUZZ
@given(kind=KINDS, data=st.data())
def test_mutated_shipped_file(kind, data, tmp_path):
    _mutated_file(kind, data, tmp_path)


@FUZZ
@given(kind=KINDS, data=st.data())
def test_damaged_shipped_text(kind, data, tmp_path):
    _damaged_text(kind, data, tmp_path)


@pytest.mark.slow
@FUZZ_MORE
@given(kind=KINDS, data=st.data())
def test_many_mutations_and_damages(kind, data, tmp_path):
    if data.draw(st.booleans()):
        _mutated_file(kind, data, tmp_path)
    else:
        _damaged_text(kind, data, tmp_path)


@pytest.mark.parametrize("path", sorted(p.relative_to(REPO) for p in (REPO / "profiles").rglob("*.yaml")
                                        if p.name != "config.yaml"), ids=str)
def test_every_shipped_grid_file_expands(path):
    """Each grid file under profiles/ names models and methods of the shipped files (an unknown one is an error),
    and each (model, method) pair it asks for, in its main product or a block, is among its cells (their
    checkpoints are another machine's: nothing is loaded)."""
    grid = load_grid(REPO / path)
    grid["models_file"], grid["methods_file"] = str(REPO / "models.yaml"), str(REPO / "methods.yaml")
    pairs = {(c.model, c.method) for c in expand_grid(grid)}
    for part in [grid, *grid.get("blocks", [])]:
        models, methods = part.get("models", grid["models"]), part.get("methods", grid["methods"])
        assert {(m, k) for m in models for k in methods} <= pairs
