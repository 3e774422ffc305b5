"""The package's layers: what may import what (README "Architecture"). Walks the imports of every module under
src/dsv2 and fails on one that runs upward, or on a model module that reaches beyond torch and the standard
library: the model knows nothing of checkpoint files, ranks, CPU kernels or servers. And in a fresh interpreter,
importing the model loads nothing of the layers above it. Modules stay under ~400 lines and functions under 80
(the CLI's parser excepted)."""

import ast
import subprocess
import sys
from pathlib import Path

import dsv2

SRC = Path(dsv2.__file__).resolve().parent
BASE = {"dsv2.errors", "dsv2.field_types", "dsv2.files", "dsv2.reproducibility", "dsv2.tokenizer",
        "dsv2.chat_template"}
LAYERS = {  # a layer: the layers it may import (besides itself; every layer may import dsv2.errors)
    "dsv2.errors": set(),
    "dsv2.field_types": set(),
    "dsv2.files": set(),
    "dsv2.reproducibility": set(),
    "dsv2.tokenizer": {"dsv2.files"},
    "dsv2.chat_template": set(),
    "dsv2.config": {"dsv2.field_types"},
    "dsv2.presets": {"dsv2.config"},
    "dsv2.model": {"dsv2.config"},
    "dsv2.quant.formats": set(),  # the quantized layouts: torch only (the kernels read them)
    "dsv2.cpu": {"dsv2.config", "dsv2.model", "dsv2.quant.formats"},
    "dsv2.quant": {"dsv2.config", "dsv2.model", "dsv2.cpu", "dsv2.quant.formats"},
    "dsv2.checkpoint": {"dsv2.config", "dsv2.model", "dsv2.cpu", "dsv2.files", "dsv2.tokenizer", "dsv2.quant",
                        "dsv2.quant.formats"},
    "dsv2.inference": {"dsv2.config", "dsv2.model", "dsv2.cpu", "dsv2.checkpoint", "dsv2.tokenizer", "dsv2.lora"},
    "dsv2.serve": {"dsv2.config", "dsv2.model", "dsv2.cpu", "dsv2.checkpoint", "dsv2.tokenizer", "dsv2.inference",
                   "dsv2.chat_template", "dsv2.lora"},
    "dsv2.distributed": {"dsv2.config", "dsv2.model"},
    "dsv2.training.data": {"dsv2.files", "dsv2.tokenizer", "dsv2.chat_template"},
    "dsv2.lora": {"dsv2.config", "dsv2.model", "dsv2.cpu", "dsv2.quant.formats", "dsv2.files"},
    "dsv2.eval": BASE | {"dsv2.config", "dsv2.model", "dsv2.training.data", "dsv2.inference"},
    "dsv2.training": BASE | {"dsv2.config", "dsv2.presets", "dsv2.model", "dsv2.cpu", "dsv2.checkpoint",
                             "dsv2.distributed", "dsv2.training.data", "dsv2.lora"},
    "dsv2.tools": BASE | {"dsv2.config", "dsv2.presets", "dsv2.model", "dsv2.cpu", "dsv2.checkpoint",
                          "dsv2.training", "dsv2.training.data"},
    "dsv2.experiments": BASE | {"dsv2.config", "dsv2.presets", "dsv2.model", "dsv2.cpu", "dsv2.checkpoint",
                                "dsv2.inference", "dsv2.training", "dsv2.training.data", "dsv2.tools"},
    "dsv2.cli": None,  # the top: anything
    "dsv2": None,  # __init__ and __main__: the public API
}
MODEL_MAY_USE = {"__future__", "math", "dataclasses", "collections", "typing", "functools", "torch"}


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """Absolute names of the modules `path` imports (relative imports resolved)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module
            out.add(mod)
            out.update(f"{mod}.{a.name}" for a in node.names)  # `from . import data`: the submodule
    return out


def layer_of(module: str) -> str | None:
    matches = [k for k in LAYERS if module == k or module.startswith(k + ".")]
    return max(matches, key=len) if matches else None


def test_every_import_runs_down_the_layers():
    wrong = []
    for path in sorted(SRC.rglob("*.py")):
        me = layer_of(module_name(path))
        allowed = LAYERS[me]
        if allowed is None:
            continue
        for target in imports(path):
            if not target.startswith("dsv2"):
                continue
            other = layer_of(target)
            # `import dsv2` too: the whole API
            if other is not None and other not in (me, "dsv2.errors") and other not in allowed:
                wrong.append(f"{module_name(path)} imports {target} ({me} may import {sorted(allowed)})")
    assert not wrong, "\n".join(wrong)


def test_the_model_uses_torch_and_the_standard_library_only():
    wrong = []
    for path in sorted((SRC / "model").rglob("*.py")):
        for target in imports(path):
            top = target.split(".")[0]
            if top == "dsv2":
                continue
            if top not in MODEL_MAY_USE or target.startswith("torch.distributed"):
                wrong.append(f"{module_name(path)} imports {target}")
    assert not wrong, "\n".join(wrong)


def test_every_module_belongs_to_a_layer_and_is_short():
    for path in sorted(SRC.rglob("*.py")):
        assert layer_of(module_name(path)) is not None, path
        assert len(path.read_text().splitlines()) <= 420, f"{path} has grown past ~400 lines: split it"


def test_importing_the_model_loads_no_layer_above_it():
    code = ("import sys, dsv2.model\n"
            "print(sorted(m for m in sys.modules if m.startswith('dsv2.') and not m.startswith(('dsv2.model', "
            "'dsv2.config', 'dsv2.errors', 'dsv2.field_types', 'dsv2.reproducibility'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", out


MAX_FUNCTION_LINES = 80
LONG_ALLOWED = {("dsv2.cli", "build_parser")}  # one add_argument per line: the command line's table of contents


def test_no_function_is_longer_than_a_screen():
    long = []
    for path in sorted(SRC.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES and (module_name(path), node.name) not in LONG_ALLOWED:
                    long.append(f"{module_name(path)}.{node.name}: {lines} lines")
    assert not long, "split these into named steps:\n" + "\n".join(long)
