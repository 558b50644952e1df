"""Imports run one way (docs/architecture.md): checked on the source, every import statement
(at module level or inside a function), so that the layering stays true as code is added."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "burrow"

# package (a folder or a module under src/burrow) -> burrow packages it must not import
FORBIDDEN = {
    "model": {"data", "train", "parallel", "infer", "eval", "interop", "scaling", "retrieval",
              "commands", "run_commands", "cli", "run"},
    "data": {"model", "train", "parallel", "infer", "eval", "interop", "scaling"},
    "config": {"model", "data", "train", "parallel", "infer", "eval", "interop", "scaling"},
    "presets": {"model", "data", "train", "parallel", "infer", "eval", "interop", "scaling"},
    "blocks": {"model", "data", "train", "parallel", "infer", "eval", "interop", "scaling"},
    "flops": {"model", "data", "train", "parallel", "infer", "eval", "interop", "scaling"},
    # what the command line and every layer use to speak to users: the lowest layer
    **dict.fromkeys(("units", "paths", "flags"), frozenset(
        {"model", "data", "train", "parallel", "infer", "eval", "interop", "scaling", "commands",
         "run_commands", "cli", "run"})),
    # Forward-Forward stands apart: it reads the data cache's location, nothing of the LM stack
    "ff": {"model", "train", "parallel", "infer", "eval", "interop", "scaling", "retrieval",
           "commands", "run_commands", "cli", "run"},
    # AdaTape's parity comparison builds models and its own task data, nothing of the LM's
    "adatape": {"data", "train", "parallel", "infer", "eval", "interop", "scaling", "retrieval",
                "commands", "run_commands", "cli", "run"},
    "infer": {"data", "train", "parallel", "eval", "interop", "scaling"},
    # the chunk database reads text and tokens (data/) and serves the model from outside
    "retrieval": {"model", "train", "parallel", "infer", "eval", "interop", "scaling",
                  "commands", "run_commands", "cli", "run"},
}
# Modules that must not import torch.distributed (nor check for its tensors)
NO_DISTRIBUTED = ("model", "config", "presets", "blocks", "flops", "data")


def imports(path: Path) -> list[tuple[str, list[str]]]:
    """(module, names) of every import in a file; relative imports resolved."""
    tree = ast.parse(path.read_text())
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:
                package = path.relative_to(SRC.parent).with_suffix("").parts[:-node.level]
                module = ".".join([*package, module]) if module else ".".join(package)
            found.append((module, [alias.name for alias in node.names]))
    return found


def part_of(path: Path) -> str:
    return path.relative_to(SRC).with_suffix("").parts[0]


def burrow_targets(module: str, names: list[str]) -> set[str]:
    """The burrow packages an import reaches: `from burrow import x` reaches x."""
    if module == "burrow":
        return set(names)
    if module.startswith("burrow."):
        return {module.split(".")[1]}
    return set()


def test_packages_import_only_downwards():
    broken = []
    for path in sorted(SRC.rglob("*.py")):
        forbidden = FORBIDDEN.get(part_of(path), set())
        for module, names in imports(path):
            for target in burrow_targets(module, names) & forbidden:
                broken.append(f"{path.relative_to(SRC)} imports burrow.{target}")
    assert not broken, "\n".join(broken)


def test_no_module_imports_another_packages_private_names():
    broken = []
    for path in sorted(SRC.rglob("*.py")):
        for module, names in imports(path):
            if not module.startswith("burrow"):
                continue
            for name in names:
                if name.startswith("_") and not name.startswith("__"):
                    broken.append(f"{path.relative_to(SRC)}: from {module} import {name}")
    assert not broken, "\n".join(broken)


def test_model_and_config_know_nothing_of_torch_distributed():
    broken = []
    for path in sorted(SRC.rglob("*.py")):
        if part_of(path) not in NO_DISTRIBUTED:
            continue
        text = path.read_text()
        for module, _ in imports(path):
            if module.startswith("torch.distributed"):
                broken.append(f"{path.relative_to(SRC)} imports {module}")
        if "DTensor" in text:
            broken.append(f"{path.relative_to(SRC)} checks for DTensors")
    assert not broken, "\n".join(broken)


@pytest.mark.parametrize("statement", [
    "import burrow",
    "import burrow.presets, burrow.config, burrow.flops, burrow.blocks",
    "from burrow.cli import build_parser; build_parser()",
    "import burrow.scaling, burrow.scaling.plan, burrow.scaling.commands, burrow.commands",
    "import burrow.parallel.planner, burrow.parallel.planner.commands",
])
def test_light_imports_load_neither_the_trainer_nor_torch_distributed(statement):
    """What `burrow presets` and `burrow --help` need is arithmetic: no trainer, no torch."""
    code = (f"{statement}\nimport sys\n"
            "heavy = [m for m in ('torch', 'torch.distributed', 'burrow.train.trainer',"
            " 'burrow.model') if m in sys.modules]\nprint(','.join(heavy))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True).stdout.strip()
    assert loaded == ""


DATA = Path(__file__).resolve().parent / "data"


@pytest.mark.parametrize("argv, heavy", [
    (["--help"], ("torch", "burrow.train", "numpy", "matplotlib")),
    (["presets"], ("torch", "burrow.train", "numpy", "matplotlib")),
    (["plan", "--flops", "1e21"], ("torch", "burrow.train", "numpy", "matplotlib")),
    (["plan", "--flops", "1e21", "--law", "kaplan", "--json"], ("torch", "burrow.train")),
    (["fit", str(DATA / "chinchilla" / "svg_extracted_data.csv"), "--bootstrap", "0",
      "--out", "{tmp}"], ("torch", "burrow.train")),
    (["plan-parallel", "--preset", "nano", "--gpus", "8"], ("torch", "burrow.train",
                                                            "matplotlib")),
    (["plan", "--gpu-hours", "100", "--cluster", "8xh100"], ("torch", "burrow.train",
                                                             "matplotlib")),
])
def test_arithmetic_verbs_start_without_torch(argv, heavy, tmp_path):
    """`burrow --help`, `presets`, `plan`, `fit` and `plan-parallel` start at once: each verb
    imports what it needs when it runs, and these need no torch (nor numpy and matplotlib, but
    to fit and to plan parallelism)."""
    code = ("import sys\nfrom burrow.cli import main\ntry:\n    status = main(sys.argv[1:])\n"
            "except SystemExit as stop:\n    status = stop.code\n"
            f"loaded = [m for m in {heavy!r} if m in sys.modules]\n"
            "print(status, ','.join(loaded), file=sys.stderr)")
    argv = [arg.replace("{tmp}", str(tmp_path)) for arg in argv]
    result = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True,
                            check=True, timeout=120)
    assert result.stderr.strip().splitlines()[-1] == "0", result.stderr
