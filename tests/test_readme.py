"""The README's and the model cards' examples run as written from the repository root: each fenced
`seq2seq translate|generate|evaluate|plot|classify` command that uses a released model, and each ```python
snippet. Files the commands write (-o, --output, --hyp-output, --attention-png) go to tmp_path."""
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", ROOT / "checkpoints" / "README.md", *sorted(ROOT.glob("checkpoints/*/README.md"))]
RELEASED = {"checkpoints/en-fr", "checkpoints/shakespeare", "checkpoints/sst2"}
COMMANDS = {"translate", "generate", "evaluate", "plot", "classify"}
OUTPUTS = {"-o", "--output", "--hyp-output", "--attention-png"}
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.M | re.S)


def fences(language: str):
    """(doc:line, text) of each fenced block in `language` ("" = untagged)."""
    for doc in DOCS:
        text = doc.read_text(encoding="utf-8")
        for match in FENCE.finditer(text):
            if match.group(1) == language:
                yield f"{doc.relative_to(ROOT)}:{text.count(chr(10), 0, match.start()) + 2}", match.group(2)


def released_commands():
    """(where, argv) of the fenced commands that run a released model; `$ ` prompts and
    backslash continuations allowed."""
    for where, block in fences(""):
        for number, line in enumerate(block.replace("\\\n", " ").splitlines()):
            words = line.strip().removeprefix("$ ").split()
            if words[:1] != ["seq2seq"] or len(words) < 2 or words[1] not in COMMANDS:
                continue
            argv = shlex.split(" ".join(words))
            model = argv[2] if argv[1] == "plot" else next(
                (b for a, b in zip(argv, argv[1:]) if a in ("-m", "--model")), "checkpoints/en-fr")
            if model.rstrip("/") in RELEASED:
                yield pytest.param(argv, id=f"{where}+{number} {argv[1]}")


@pytest.mark.parametrize("argv", list(released_commands()))
def test_documented_command_runs(argv, tmp_path):
    if any("SEQ2SEQ_DATA" in arg for arg in argv):
        data = os.environ.get("SEQ2SEQ_DATA")
        if not data or not Path(data).is_dir():
            pytest.skip("needs the corpora: set SEQ2SEQ_DATA to the folder holding multi30k-en-fr/ etc.")
        argv = [arg.replace("${SEQ2SEQ_DATA}", data).replace("$SEQ2SEQ_DATA", data) for arg in argv]
    if argv[1] == "plot" or "--attention-png" in argv:
        pytest.importorskip("matplotlib")
    argv = [tmp_path / Path(arg).name if before in OUTPUTS else arg for before, arg in zip([""] + argv, argv)]
    if argv[1] == "plot" and not OUTPUTS & set(map(str, argv)):
        argv += ["--output", tmp_path / "curves.png"]  # not RUN/curves.png inside the repository
    env = {k: v for k, v in os.environ.items() if k != "SEQ2SEQ_MODELS"}
    result = subprocess.run([sys.executable, "-m", "seq2seq", *map(str, argv[1:])], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() or any(p.stat().st_size for p in tmp_path.iterdir()), "no output"


@pytest.mark.parametrize("where, code", list(fences("python")))
def test_documented_python_snippet_runs(where, code):
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"{where}: {result.stderr}"
    assert result.stdout.strip(), f"{where}: printed nothing"
