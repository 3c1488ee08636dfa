"""DESIGN §2/§6: lower layers never import higher ones; only world.py and reduce*.py touch torch.distributed."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "dpcap"
DISTRIBUTED = ("torch.distributed", "deepspeed")


def imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def modules(sub: str) -> list[Path]:
    return sorted((PACKAGE / sub).rglob("*.py"))


def test_lower_layers_do_not_import_train_eval_or_cli():
    for sub in ("data", "model", "privacy"):
        for path in modules(sub):
            bad = {
                n for n in imports(path) if n.startswith(("dpcap.train", "dpcap.eval", "dpcap.cli", "dpcap.pipeline"))
            }
            assert not bad, f"{path.relative_to(PACKAGE)} imports {bad}"


def test_only_world_and_reduce_touch_distributed():
    allowed = {"world.py", "reduce.py"}
    for path in PACKAGE.rglob("*.py"):
        touches = {n for n in imports(path) if n.startswith(DISTRIBUTED)}
        if touches:
            assert path.parent.name == "train" and (path.name in allowed or path.name.startswith("reduce")), (
                f"{path.relative_to(PACKAGE)} imports {touches}"
            )


def test_privacy_core_does_no_file_io():
    for path in modules("privacy"):
        source = path.read_text()
        for needle in ("open(", "Path(", "write_text", "read_text", "safetensors", "json.dump"):
            assert needle not in source, f"{path.relative_to(PACKAGE)} contains {needle!r}"


def test_no_pickle_loading_anywhere():
    for path in PACKAGE.rglob("*.py"):
        source = path.read_text()
        assert "import pickle" not in source and "pickle.load" not in source, path
        for line in source.splitlines():
            if "torch.load(" in line:
                assert "weights_only=True" in line, f"{path}: {line.strip()}"
