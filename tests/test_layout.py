"""The layout's rules, read from the source (docs/architecture.md, "Import rules"):

- imports run one way: stage entries → evaluation → runtime → data → common/config;
- a stage entry never imports another stage (cli dispatches through importlib);
- ``models`` imports nothing from ``pipeline``, DeepSpeed, MLflow or SLURM tooling;
- the pipeline never probes a model with ``hasattr`` nor names a model family.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

from models import REGISTRY

REPO = Path(__file__).resolve().parents[1]
LAYERS = {"common": 0, "config": 0, "data": 1, "runtime": 2, "evaluation": 3}
STAGE = 4


def modules(package: str) -> dict[str, Path]:
    out = {}
    for path in sorted((REPO / package).rglob("*.py")):
        parts = list(path.relative_to(REPO).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def imported(path: Path, name: str) -> set[str]:
    """Every module an ``import`` or ``from ... import`` anywhere in the file names (absolute)."""
    tree = ast.parse(path.read_text(), str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module
            out.add(mod)
            out.update(f"{mod}.{a.name}" for a in node.names)   # `from pipeline import x` may name a module
    return out


def layer(name: str) -> int:
    parts = name.split(".")
    if len(parts) == 1:
        return STAGE                                   # the `pipeline` package itself
    return LAYERS.get(parts[1], STAGE)


PIPELINE = modules("pipeline")
MODELS = modules("models")


@pytest.mark.parametrize("name", sorted(PIPELINE))
def test_pipeline_imports_run_one_way(name):
    mine = layer(name)
    bad = []
    for dep in sorted(imported(PIPELINE[name], name)):
        if dep not in PIPELINE or dep == name or dep == "pipeline":
            continue
        theirs = layer(dep)
        if theirs > mine or (mine == STAGE and theirs == STAGE):
            bad.append(dep)
    assert not bad, f"{name} (layer {mine}) imports {bad}: stages → evaluation → runtime → data → common/config"


@pytest.mark.parametrize("name", sorted(MODELS))
def test_models_stand_alone(name):
    deps = imported(MODELS[name], name)
    bad = sorted(d for d in deps if d.split(".")[0] in ("pipeline", "deepspeed", "mlflow", "webdataset", "slurm"))
    assert not bad, f"{name} imports {bad}; models/ is pure PyTorch"


def test_the_pipeline_asks_the_family_seam():
    families = set(REGISTRY)
    probes, names = [], []
    for name, path in PIPELINE.items():
        tree = ast.parse(path.read_text(), str(path))
        docstrings = {id(n.body[0].value) for n in ast.walk(tree)
                      if isinstance(n, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
                      and n.body and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "hasattr":
                attr = node.args[1].value if len(node.args) > 1 and isinstance(node.args[1], ast.Constant) else None
                if attr != "item":                      # numbers that may be 0-d tensors are fine
                    probes.append(f"{name}:{node.lineno} hasattr(..., {attr!r})")
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
                if node.value in families:
                    names.append(f"{name}:{node.lineno} {node.value!r}")
    assert not probes, f"model capabilities are asked through models.base.LanguageModel: {probes}"
    assert not names, f"pipeline code names a model family: {names}"


def test_only_the_gpt2_family_and_the_pretrained_tokenizer_import_the_hf_extra():
    """``transformers`` / ``tokenizers`` are the optional extra ``xlpipe[hf]``: everything else runs without it."""
    users = {}
    for name, path in {**PIPELINE, **MODELS}.items():
        hf = sorted(d for d in imported(path, name) if d.split(".")[0] in ("transformers", "tokenizers"))
        if hf:
            users[name] = hf
    assert users.keys() <= {"models.gpt2_ltm", "pipeline.data.tokenizers.huggingface"}, users
