"""The README's and the model cards' examples run as written from the repository root: each fenced
`seq2seq translate|generate|evaluate|plot|classify` command that uses a released model, each
`seq2seq train` command of a tiny preset, and each ```python snippet. Files the commands write (-o,
--output, --hyp-output, --attention-png) go to tmp_path. Every preset and config key the docs name
exists, and every documented default is the default."""
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", ROOT / "docs" / "training.md", ROOT / "checkpoints" / "README.md",
        *sorted(ROOT.glob("checkpoints/*/README.md"))]
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


def training_commands():
    """(where, argv) of the fenced `seq2seq train` commands that need no corpus: the tiny presets,
    which read the sample data shipped in data/."""
    for where, block in fences(""):
        for number, line in enumerate(block.replace("\\\n", " ").splitlines()):
            if not line.strip().removeprefix("$ ").startswith("seq2seq train "):
                continue
            argv = shlex.split(line.strip().removeprefix("$ "))
            if "--preset" in argv and argv[argv.index("--preset") + 1].startswith("tiny-"):
                yield pytest.param(argv, id=f"{where}+{number} train")


@pytest.mark.parametrize("argv", list(training_commands()))
def test_documented_training_command_runs(argv, tmp_path):
    argv = [tmp_path / Path(arg).name if before == "--output" else arg for before, arg in zip([""] + argv, argv)]
    env = {k: v for k, v in os.environ.items() if k != "SEQ2SEQ_DATA"}  # the sample data, as documented
    result = subprocess.run([sys.executable, "-m", "seq2seq", *map(str, argv[1:])], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    output = Path(argv[argv.index("--output") + 1])
    assert (output / "model.safetensors").is_file() and (output / "metrics.json").is_file()


DOCUMENTS = [ROOT / "README.md", ROOT / "data" / "README.md", *sorted((ROOT / "docs").glob("*.md")),
             *sorted(ROOT.glob("checkpoints/*/README.md"))]


def test_every_preset_named_in_the_docs_exists():
    presets = {p.stem for p in (ROOT / "seq2seq" / "presets").glob("*.toml")}
    named = {(doc.name, name) for doc in DOCUMENTS
             for name in re.findall(r"--preset[ =]([\w-]+)\b(?!\.)", doc.read_text(encoding="utf-8"))}
    assert named and not {(doc, name) for doc, name in named if name not in presets}


def test_every_config_key_named_in_the_docs_is_a_real_key():
    from dataclasses import fields

    from seq2seq import config

    sections = {"data": [config.TranslatorData, config.CharLMData, config.ClassifierData],
                "model": [config.TranslatorModel, config.CharLMModel, config.ClassifierModel],
                "train": [config.TrainConfig]}
    keys = {f"{section}.{f.name}" for section, classes in sections.items() for cls in classes for f in fields(cls)}
    files = {"safetensors", "tsv", "jsonl", "json", "txt", "model", "toml", "en", "fr", "de", "png"}  # file names
    named = {(doc.name, key) for doc in DOCUMENTS
             for key in re.findall(r"(?<![/\w.-])((?:data|model|train)\.[a-z_]+)(?==|`| =)", doc.read_text(encoding="utf-8"))
             if key.split(".")[1] not in files}
    unknown = sorted((doc, key) for doc, key in named if key not in keys)
    assert named and not unknown, unknown


def test_every_documented_default_is_the_default():
    """Every `--flag` (VALUE) in the README and docs/serve.md is that flag's default on the command line."""
    from seq2seq.cli import parser

    defaults = {}
    for action in parser()._subparsers._group_actions[0].choices.values():
        for option in action._actions:
            for name in option.option_strings:
                if option.default is not None and not isinstance(option.default, bool):
                    defaults.setdefault(name, []).append(option.default)
    wrong, checked = [], 0
    for doc in (ROOT / "README.md", ROOT / "docs" / "serve.md"):
        for flag, value in re.findall(r"`(--[a-z-]+)` \(([\d,.]+)\)", doc.read_text(encoding="utf-8")):
            number = float(value.replace(",", ""))
            checked += flag in defaults
            if flag in defaults and not any(isinstance(d, (int, float)) and d == number for d in defaults[flag]):
                wrong.append((doc.name, flag, value, defaults[flag]))
    assert checked >= 8 and not wrong, (checked, wrong)
