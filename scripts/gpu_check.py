"""A GPU check, one JSON object: run it where a GPU is at hand.

    python scripts/gpu_check.py                       # --device cuda, about 5 minutes
    python scripts/gpu_check.py --device cpu --quick  # the same code paths on a CPU, in seconds

1. Training throughput of the real training step (bf16) for both models at 3k- and 100k-token
   batches (the character model: batch_size x bptt characters).
2. One checkpoint on the CPU and on the device gives the same translations (fp32, beam 5).
3. A short time-budgeted Multi30k run on the device: its epochs and dev BLEU.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from seq2seq import checkpoint, inference  # noqa: E402
from seq2seq.config import load_preset  # noqa: E402
from seq2seq.training import timing_trainer, train  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def train_rate(kind: str, preset: str, overrides: list[str], data_dir: Path, device: str, steps: int) -> dict:
    cfg = load_preset(preset, kind, ["train.bf16=true", *overrides])
    trainer = timing_trainer(cfg, data_dir, device)
    trainer.model.train()
    batches = trainer.task.batches(1)
    batches = (batches * (1 + (steps + 3) // max(len(batches), 1)))[: steps + 3]
    for batch in batches[:3]:  # warm-up: cuDNN plans, allocator
        trainer.train_step(batch)
    sync(device)
    start = time.perf_counter()
    units = sum(trainer.train_step(batch)[1] for batch in batches[3:])
    sync(device)
    seconds = time.perf_counter() - start
    return {"overrides": overrides, "steps": steps, "tokens_per_s": round(units / seconds, 1)}


def same_translations(device: str) -> dict:
    lines = (ROOT / "data" / "sample" / "everyday.en").read_text(encoding="utf-8").splitlines()
    results = {}
    for where in ("cpu", device):
        _, model, tokenizer = checkpoint.load(ROOT / "checkpoints" / "en-fr", device=where)
        results[where] = [h[0][0] for h in inference.translate(model, tokenizer, lines, beam=5, precision="fp32")]
    same = sum(a == b for a, b in zip(results["cpu"], results[device]))
    return {"sentences": len(lines), "identical": same}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--data-dir", type=Path, default=Path(os.environ.get("SEQ2SEQ_DATA", ROOT.parent / "shared" / "data")))
    p.add_argument("--quick", action="store_true",
                   help="few steps, 6k-token batches, a 0.3-minute run: checks the code paths")
    args = p.parse_args()
    steps, minutes, large = (3, 0.3, 6000) if args.quick else (30, 2.0, 100_000)
    out = {"device": args.device, "torch": torch.__version__,
           "gpu": torch.cuda.get_device_name() if args.device.startswith("cuda") else None}
    out["translator_train"] = [train_rate("translator", "multi30k-en-fr", [f"train.batch_tokens={n}"], args.data_dir,
                                          args.device, steps) for n in (3000, large)]
    out["charlm_train"] = [train_rate("charlm", "tinyshakespeare", [f"train.batch_size={n // 128}"], args.data_dir,
                                      args.device, steps) for n in (3072, large)]
    out["cpu_vs_device_translations"] = same_translations(args.device)
    cfg = load_preset("multi30k-en-fr", "translator", [])
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        best = train(cfg, args.data_dir, Path(tmp) / "m30k", time_budget=minutes, device=args.device)
        out["multi30k_run"] = {"minutes": minutes, "seconds": round(time.perf_counter() - start, 1), "best": best}
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
