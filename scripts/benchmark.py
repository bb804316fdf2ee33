#!/usr/bin/env python
"""Speed benchmarks, printed as one JSON object.

  python scripts/benchmark.py translator-train   [--preset multi30k-en-fr] [--repeats 3] [--steps 20]
  python scripts/benchmark.py translator-decode  -m checkpoints/m30k [--src test.en] [--repeats 3]
  python scripts/benchmark.py charlm-train       [--preset tinyshakespeare]
  python scripts/benchmark.py charlm-generate    -m checkpoints/shakespeare

Training variants (fp32 / bf16 autocast, loop-free / step loop / input feeding) run side by side
in one process on the same batches, so their ratios hold even on a noisy machine; each number is
the median of --repeats runs.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from seq2seq import checkpoint, inference  # noqa: E402
from seq2seq.config import default_data_dir, load_preset  # noqa: E402
from seq2seq.train import TASKS  # noqa: E402


def median_rate(fn, repeats: int) -> float:
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        units = fn()
        rates.append(units / (time.perf_counter() - start))
    return round(statistics.median(rates), 1)


def train_rates(kind: str, preset: str, variants: dict[str, list[str]], steps: int, repeats: int, data_dir: Path) -> dict:
    results = {}
    base = load_preset(preset, kind, [])
    task = TASKS[kind](base, data_dir)
    batches = task.batches(0)[: steps + 2]
    for name, overrides in variants.items():
        cfg = load_preset(preset, kind, overrides)
        task.cfg = cfg
        torch.manual_seed(0)
        task.model = checkpoint.build(cfg, task.tokenizer).train()
        optimizer = torch.optim.Adam(task.model.parameters(), lr=1e-4)

        def run(batch_list):
            units = 0
            for batch in batch_list:
                loss, count = task.loss(batch)
                optimizer.zero_grad(set_to_none=True)
                (loss / count).backward()
                torch.nn.utils.clip_grad_norm_(task.model.parameters(), 1.0)
                optimizer.step()
                units += count
            return units

        run(batches[:2])  # warm-up
        results[name] = median_rate(lambda: run(batches[2:]), repeats)
    return results


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["translator-train", "translator-decode", "charlm-train", "charlm-generate"])
    p.add_argument("--preset")
    p.add_argument("-m", "--model", type=Path)
    p.add_argument("--src", type=Path, help="sentences to decode (default: Multi30k test_2016_flickr.en)")
    p.add_argument("--data-dir", type=Path, default=default_data_dir())
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=0)
    args = p.parse_args()
    torch.set_num_threads(args.threads or torch.get_num_threads())
    out = {"benchmark": args.what, "threads": torch.get_num_threads(), "torch": torch.__version__}

    if args.what == "translator-train":
        out["preset"] = preset = args.preset or "multi30k-en-fr"
        variants = {"fp32": ["train.bf16=false"], "bf16": ["train.bf16=true"],
                    "bf16_step_loop": ["train.bf16=true", "train.teacher_forcing=0.999999"],
                    "bf16_input_feeding": ["train.bf16=true", "model.input_feeding=true"]}
        out["target_tokens_per_s"] = train_rates("translator", preset, variants, args.steps, args.repeats, args.data_dir)
    elif args.what == "charlm-train":
        out["preset"] = preset = args.preset or "tinyshakespeare"
        variants = {"fp32": ["train.bf16=false"], "bf16": ["train.bf16=true"]}
        out["chars_per_s"] = train_rates("charlm", preset, variants, args.steps, args.repeats, args.data_dir)
    elif args.what == "translator-decode":
        _, model, tokenizer = checkpoint.load(args.model)
        src = args.src or args.data_dir / "multi30k-en-fr" / "test_2016_flickr.en"
        lines = src.read_text(encoding="utf-8").splitlines()
        out.update(model=str(args.model), sentences=len(lines))
        for beam in (1, 5):
            for bf16 in (False, True):
                rate = median_rate(lambda: len(inference.translate(model, tokenizer, lines, beam=beam, bf16=bf16)),
                                   args.repeats)
                out[f"sentences_per_s_beam{beam}{'_bf16' if bf16 else ''}"] = rate
    else:
        _, model, vocab = checkpoint.load(args.model)
        out["model"] = str(args.model)
        for streams in (1, 32):
            out[f"chars_per_s_{streams}_stream{'s' if streams > 1 else ''}"] = median_rate(
                lambda: streams * len(inference.generate(model, vocab, ["ROMEO:"] * streams, 500, temperature=0.8,
                                                         seed=1)[0]), args.repeats)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
