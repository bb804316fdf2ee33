"""The code's own house rules, checked: short functions and classes, plain PyTorch in models/,
and no measurements in comments (numbers live in docs/ with the command that gives them)."""
import ast
import re

from conftest import ROOT

PACKAGE = ROOT / "seq2seq"
SOURCES = sorted(PACKAGE.rglob("*.py"))


def test_no_function_over_60_lines_and_no_class_over_250():
    long = []
    for path in SOURCES:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            size = node.end_lineno - node.lineno + 1 if hasattr(node, "end_lineno") else 0
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and size > 60:
                long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name}() has {size} lines")
            if isinstance(node, ast.ClassDef) and size > 250:
                long.append(f"{path.relative_to(ROOT)}:{node.lineno} class {node.name} has {size} lines")
    assert not long, "\n".join(long)


def test_models_use_no_private_torch_api_and_never_import_the_kernels():
    private = re.compile(r"torch\._VF|_flat_weights|torch\.ops\.|quantize_per|qint8|seq2seq\.fast|from seq2seq import fast")
    found = [f"{path.relative_to(ROOT)}:{number}: {line.strip()}"
             for path in sorted((PACKAGE / "models").glob("*.py"))
             for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1) if private.search(line)]
    assert not found, "\n".join(found)


def test_no_timings_in_code_comments():
    timing = re.compile(r"\b\d+(\.\d+)? ?(ms|us|µs)\b")
    found = [f"{path.relative_to(ROOT)}:{number}: {line.strip()}" for path in SOURCES
             for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1) if timing.search(line)]
    assert not found, "\n".join(found)


def test_importing_the_package_changes_no_setting():
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "ONEDNN_PRIMITIVE_CACHE_CAPACITY"}
    code = "import os, seq2seq, seq2seq.inference, seq2seq.training; print(os.environ.get('ONEDNN_PRIMITIVE_CACHE_CAPACITY'))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True).stdout
    assert out.strip() == "None"


def test_docs_layout_names_every_module_and_script():
    layout = (ROOT / "docs" / "layout.md").read_text(encoding="utf-8")
    lines = layout.splitlines()

    def named(path) -> bool:
        """Its path is in the layout, or its name on a line that starts with its folder."""
        relative = str(path.relative_to(ROOT))
        folder = str(path.parent.relative_to(ROOT)) + "/"
        return relative in layout or any(line.startswith(folder) and path.name in line for line in lines)

    files = [p for p in SOURCES if p.name != "__init__.py"] + sorted((ROOT / "scripts").glob("*.py"))
    missing = [str(p.relative_to(ROOT)) for p in files if not named(p)]
    assert not missing, missing
