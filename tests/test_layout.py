"""The package's shape, checked from its source: no import cycle (none dodged through a function-local
import), no private name imported across packages, modules of a readable size; every training option
reachable from the command line under its own name, and each in exactly one part of the config."""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import pytest

import glrnet
from glrnet.cli import build_parser
from glrnet.train import (DataConfig, EstimatorConfig, EvalConfig, ModelConfig, OptimConfig, TrainConfig,
                          parse_perturb)

ROOT = Path(glrnet.__file__).resolve().parent
MAX_LINES = 480     # "about 400": the longest modules are validation tables and data checksums


def _modules() -> dict[str, Path]:
    out = {}
    for path in ROOT.rglob("*.py"):
        parts = ("glrnet",) + path.relative_to(ROOT).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _target(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[:len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _imports(modules: dict[str, Path]):
    """(module, imported module, imported name, inside a function?) for every relative import."""
    for name, path in modules.items():
        tree = ast.parse(path.read_text())
        inner = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
                 for n in ast.walk(f)}
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level:
                target = _target(name, path.name == "__init__.py", node)
                for alias in node.names:
                    full = f"{target}.{alias.name}"
                    yield name, full if full in modules else target, alias.name, id(node) in inner


def test_no_import_cycle_and_no_function_local_import_of_the_library():
    modules = _modules()
    edges = {m: set() for m in modules}
    local = []
    for src, dst, _, inside in _imports(modules):
        if inside:
            local.append(f"{src} imports {dst} inside a function")
        elif dst != src:
            edges[src].add(dst)
    assert not local, local
    state, cycles = {}, []

    def visit(m, stack):
        state[m] = "open"
        stack.append(m)
        for n in edges[m]:
            if state.get(n) == "open":
                cycles.append(" → ".join(stack[stack.index(n):] + [n]))
            elif n not in state:
                visit(n, stack)
        stack.pop()
        state[m] = "done"

    for m in modules:
        if m not in state:
            visit(m, [])
    assert not cycles, cycles


def test_no_private_name_crosses_a_package_and_modules_stay_readable():
    modules = _modules()
    crossing = [f"{src} imports {name} from {dst}" for src, dst, name, _ in _imports(modules)
                if name.startswith("_") and not name.startswith("__")
                and dst.split(".")[:2] != src.split(".")[:2]]
    assert not crossing, crossing
    long = {m: n for m, p in modules.items() if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, long


def test_every_training_option_has_its_flag_and_one_part():
    parser = build_parser()
    train = next(a for a in parser._actions if a.dest == "command").choices["train"]
    dests = {a.dest for a in train._actions}
    assert set(TrainConfig.option_names()) <= dests, set(TrainConfig.option_names()) - dests
    parts = [DataConfig, ModelConfig, EstimatorConfig, OptimConfig, EvalConfig]
    names = [f.name for p in parts for f in dataclasses.fields(p)]
    assert len(names) == len(set(names)) and set(names) | {"seed", "device"} == set(TrainConfig.option_names())
    groups = {g.title: {a.dest for a in g._group_actions} for g in train._action_groups}
    for title, part in [("data", DataConfig), ("model", ModelConfig), ("perturbation and estimator", EstimatorConfig),
                        ("optimisation", OptimConfig), ("evaluation", EvalConfig)]:
        assert {f.name for f in dataclasses.fields(part)} <= groups[title], (title, groups[title])


def test_a_config_routes_options_to_their_parts_and_saves_flat():
    cfg = TrainConfig(lr=0.01, arch="lenet", perturb="conv=flipout", dataset="mnist", seed=3)
    assert (cfg.optim.lr, cfg.model.arch, cfg.data.dataset, cfg.estimator.perturb) == (0.01, "lenet", "mnist",
                                                                                        "conv=flipout:0.05")
    cfg.lr = 0.02
    assert cfg.optim.lr == 0.02 and dataclasses.replace(cfg, lr=0.5).lr == 0.5 and cfg.lr == 0.02
    flat = cfg.to_dict()
    assert flat["lr"] == 0.02 and flat["seed"] == 3 and set(flat) == set(TrainConfig.option_names())
    assert TrainConfig.from_dict(flat) == cfg
    with pytest.raises(ValueError, match="unknown training option 'learning_rate'"):
        TrainConfig(learning_rate=0.1)
    with pytest.raises(AttributeError):
        TrainConfig().learning_rate


@pytest.mark.parametrize("older,today", [
    (dict(weight_noise="conv"), dict(perturb="conv=weight:0.05")),
    (dict(weight_noise="all", weight_noise_std=0.02, flipout=True), dict(perturb="all=flipout:0.02")),
    (dict(weight_noise="first=channel"), dict(perturb="first=channel:0.05")),
    (dict(method="es", weight_noise_std=0.02), dict(method="es", sigma=0.02)),
    (dict(weight_noise="none", weight_noise_std=0.05, flipout=False, channelwise=False), {}),
    (dict(antithetic=True), dict(sampler="antithetic")),
])
def test_older_spellings_read_as_todays(older, today):
    assert TrainConfig.from_saved(older).to_dict() == TrainConfig.from_saved(today).to_dict()


def test_perturb_reads_one_spelling_per_setting():
    assert parse_perturb("activity") == ("none", "activity", 0.0)
    assert parse_perturb("conv=weight:0.02") == ("conv", "weight", 0.02)
    for bad in ("conv", "conv=activity", "every=weight", "conv=weight:x", "conv:weight"):
        with pytest.raises(ValueError, match="--perturb"):
            parse_perturb(bad)
