#!/usr/bin/env python
"""Speed benchmarks, printed as one JSON object.

  python scripts/benchmark.py all --json [--quick]          # everything below, one object
  python scripts/benchmark.py translator-train  [--preset multi30k-en-fr]
  python scripts/benchmark.py charlm-train      [--preset tinyshakespeare]
  python scripts/benchmark.py translator-decode [-m checkpoints/en-fr] [--src test.en --ref test.fr]
  python scripts/benchmark.py charlm-generate   [-m checkpoints/shakespeare]
  python scripts/benchmark.py classify          [--classifier checkpoints/sst2] [--tsv dev.tsv]
  python scripts/benchmark.py reference          # ../shared/bench/plain_reference.py, same process
  python scripts/benchmark.py all --device cuda  # on a GPU (config records device, GPU and processes)

Training runs the real training step (`Trainer.train_step`) on real batches of epoch 2, after a
warm-up; decoding translates the whole test set in each inference mode; each rate is the median
of --repeats runs. `gflops` comes from the analytic FLOP counts below (useful work: real tokens,
no padding; a backward pass counts twice its forward), and `mfu` divides it by the measured matrix
product peak of the same precision (`gemm_peak_gflops`). Speed ratios only hold between runs on
one machine, one right after the other: `all` runs the plain reference in the same process.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from seq2seq import checkpoint, device, fast, inference  # noqa: E402
from seq2seq.config import load_preset  # noqa: E402
from seq2seq.device import resolve as resolve_device  # noqa: E402
from seq2seq.metrics import bleu_chrf  # noqa: E402
from seq2seq.device import Precision, int8_available  # noqa: E402
from seq2seq.fast.kernels import Int8Linear, PackedLinear  # noqa: E402
from seq2seq.training import timing_trainer  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


# -- analytic FLOP counts (multiply-adds count 2) ----------------------------------------------
def rnn_flops(cell: str, input_size: int, hidden: int) -> int:
    """One step of one cell: gate matrices on input and hidden state."""
    gates = {"lstm": 4, "gru": 3, "rnn": 1}[cell]
    return 2 * gates * hidden * (input_size + hidden)


def translator_forward_flops(m, vocab: int, src_tokens: int, tgt_tokens: int, src_len: float) -> float:
    """Forward pass of the translator over real tokens; `src_len` the mean source length (attention)."""
    enc = 0
    for layer in range(m.enc_layers):
        enc += 2 * rnn_flops(m.cell, m.emb_dim if layer == 0 else 2 * m.enc_hidden, m.enc_hidden)
    memory = 2 * m.enc_hidden
    key = 2 * memory * m.dec_hidden if m.attention == "general" else 0
    dec_in = m.emb_dim * (2 if m.input_feeding else 1)
    dec = sum(rnn_flops(m.cell, dec_in if layer == 0 else m.dec_hidden, m.dec_hidden) for layer in range(m.dec_layers))
    attend = 2 * src_len * m.dec_hidden + 2 * src_len * memory
    per_target = dec + attend + 2 * (memory + m.dec_hidden) * m.emb_dim + 2 * m.emb_dim * vocab
    return src_tokens * (enc + key) + tgt_tokens * per_target


def charlm_forward_flops(m, vocab: int, chars: int) -> float:
    per_char = sum(rnn_flops(m.cell, m.emb_dim if layer == 0 else m.hidden, m.hidden) for layer in range(m.layers))
    out_in = m.emb_dim if m.tie_embeddings and m.hidden != m.emb_dim else m.hidden
    if out_in != m.hidden:
        per_char += 2 * m.hidden * out_in
    return chars * (per_char + 2 * out_in * vocab)


# -- measuring -----------------------------------------------------------------------------------
DEVICE = torch.device("cpu")  # --device: where every measurement runs


def synchronize() -> None:
    if DEVICE.type == "cuda":  # GPU work is queued: time it when it is done
        torch.cuda.synchronize()


def median_rate(fn, repeats: int) -> tuple[float, float]:
    """(median units per second, units of one run)."""
    rates, units = [], 0
    for _ in range(repeats):
        synchronize()
        start = time.perf_counter()
        units = fn()
        synchronize()
        rates.append(units / (time.perf_counter() - start))
    return statistics.median(rates), units


def gemm_peak(quick: bool) -> dict:
    """GFLOP/s of the best of a few square products, fp32 and bf16, and on a CPU with oneDNN's
    quantized engine int8 (dynamic: `Int8Linear`, the product `--precision int8` decoding makes).
    On a CPU fp32 and bf16 take the better of `a @ b` and oneDNN's packed product (`PackedLinear`,
    the one decoding makes): on an AMD Zen 5 `a @ b` in fp32 read 209 GFLOP/s, below what the
    training step's own LSTM and linear layers reached, which put fp32 MFUs above 1."""
    size = 1024 if quick else 2048
    products: dict[str, list] = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        a, b = (torch.randn(size, size, dtype=dtype, device=DEVICE) for _ in range(2))
        products[name] = [lambda a=a, b=b: a @ b]
        if DEVICE.type == "cpu" and torch.backends.mkldnn.is_available():
            products[name].append(lambda a=a, b=PackedLinear(b, None, dtype): b(a))
    if DEVICE.type == "cpu" and int8_available():
        a, b = torch.randn(size, size), torch.randn(size, size)
        products["int8"] = [lambda a=a, b=Int8Linear(b, None): b(a)]
    peak = {}
    for name, candidates in products.items():
        best = 0.0
        for product in candidates:
            product()
            for _ in range(5):
                synchronize()
                start = time.perf_counter()
                for _ in range(4):
                    product()
                synchronize()
                best = max(best, 4 * 2 * size**3 / (time.perf_counter() - start) / 1e9)
        peak[name] = round(best, 1)
    return peak


def rate_record(rate: float, unit: str, precision: str, flops_per_unit: float, peak: dict | None) -> dict:
    gflops = rate * flops_per_unit / 1e9
    record = {unit: round(rate, 1), "precision": precision, "gflops": round(gflops, 1)}
    if peak:
        record["mfu"] = round(gflops / peak[precision], 3)
    return record


def train_bench(kind: str, preset: str, data_dir: Path, steps: int, repeats: int, peak: dict | None) -> dict:
    """The real training step on `steps` real batches of epoch 2, bf16 and fp32."""
    out = {"preset": preset}
    for precision in ("bf16", "fp32"):
        cfg = load_preset(preset, kind, [f"train.bf16={'true' if precision == 'bf16' else 'false'}"])
        trainer = timing_trainer(cfg, data_dir, str(DEVICE.type))
        trainer.model.train()
        batches = trainer.task.batches(1)[: steps + 3]

        def run(batch_list):
            return sum(trainer.train_step(batch)[1] for batch in batch_list)

        run(batches[:3])  # warm-up: caches, allocator, oneDNN kernels
        rate, units = median_rate(lambda: run(batches[3:]), repeats)
        m, vocab = cfg.model, len(trainer.task.tokenizer)
        if kind == "translator":
            src_len = trainer.task.train.src_len
            src = sum(int(src_len[rows].sum()) + len(rows) for _, rows in batches[3:])
            flops = 3 * translator_forward_flops(m, vocab, src, units, src / sum(len(rows) for _, rows in batches[3:]))
            unit = "target_tokens_per_s"
        else:
            flops = 3 * charlm_forward_flops(m, vocab, units)
            unit = "chars_per_s"
        out[precision] = rate_record(rate, unit, precision, flops / units, peak)
    out["sizes"] = {k: v for k, v in vars(cfg.model).items()}
    return out


def precisions() -> list[str]:
    """The decoding modes to measure: int8 only on a CPU with oneDNN's quantized engine."""
    return ["bf16", "fp32"] + (["int8"] if DEVICE.type == "cpu" and int8_available() else [])


def decoding_args(precision: str) -> dict:
    """int8: the linear layers in int8, the rest in bf16 (as `--precision int8` on a bf16 CPU)."""
    return {"precision": Precision(bf16=precision != "fp32", int8=precision == "int8")}


def decode_bench(model_dir: Path, src: Path, ref: Path | None, repeats: int, peak: dict | None, quick: bool) -> dict:
    cfg, model, tokenizer = checkpoint.load(model_dir, device=DEVICE.type)
    lines = src.read_text(encoding="utf-8").splitlines()
    refs = ref.read_text(encoding="utf-8").splitlines() if ref and ref.is_file() else None
    if quick:
        lines, refs = lines[:300], refs[:300] if refs else None
    default = device.resolve_precision("auto", DEVICE, "translator")
    out = {"model": str(model_dir), "sentences": len(lines), "default_bf16": default.bf16, "default_int8": default.int8}
    src_tokens = sum(len(ids) + 1 for ids in tokenizer.encode(lines))
    for beam in (1, 5):
        for precision in precisions():
            hyps = []

            def run():
                hyps[:] = inference.translate(model, tokenizer, lines, beam=beam, **decoding_args(precision))
                return len(lines)

            rate, _ = median_rate(run, repeats)
            out_tokens = sum(len(ids) + 1 for ids in tokenizer.encode([h[0][0] for h in hyps]))
            # rows decoded: beam search runs K rows a sentence
            flops = translator_forward_flops(cfg.model, len(tokenizer), src_tokens, beam * out_tokens, src_tokens / len(lines))
            record = rate_record(rate, "sentences_per_s", precision, flops / len(lines), peak)
            if refs:
                record["bleu"] = bleu_chrf([h[0][0] for h in hyps], refs)["bleu"]
            out[f"beam{beam}_{precision}"] = record
    return out


def generate_bench(model_dir: Path, repeats: int, peak: dict | None, quick: bool) -> dict:
    cfg, model, vocab = checkpoint.load(model_dir, device=DEVICE.type)
    chars = 200 if quick else 500
    out = {"model": str(model_dir), "chars": chars}
    for streams in (1, 32):
        for precision in precisions():
            def run():
                texts = inference.generate(model, vocab, ["ROMEO:"] * streams, chars, temperature=0.8, seed=1,
                                           **decoding_args(precision))
                return sum(map(len, texts))

            rate, _ = median_rate(run, repeats)
            out[f"{streams}_stream{'s' if streams > 1 else ''}_{precision}"] = rate_record(
                rate, "chars_per_s", precision, charlm_forward_flops(cfg.model, len(vocab), 1), peak)
    return out


def classify_bench(model_dir: Path, tsv: Path, repeats: int) -> dict:
    """Sentences a second of `inference.classify` on a labelled file's text, and the first call
    of a fresh load: loading the model folder and classifying one sentence."""
    from seq2seq.data import iter_labelled

    started = time.perf_counter()
    cfg, model, tokenizer = checkpoint.load(model_dir, device=DEVICE.type)
    inference.classify(model, tokenizer, ["This movie was absolutely fantastic!"], cfg.data.normalize)
    first = time.perf_counter() - started
    lines = [text for _, text, _ in iter_labelled(tsv, "tsv", cfg.data.label_column, cfg.data.text_column)]
    rate, _ = median_rate(lambda: len(inference.classify(model, tokenizer, lines, cfg.data.normalize,
                                                          cfg.data.max_tokens)), repeats)
    return {"model": str(model_dir), "sentences": len(lines), "sentences_per_s": round(rate, 1),
            "load_and_one_sentence_s": round(first, 3)}


def reference_bench(repeats: int) -> dict:
    path = ROOT.parent / "shared" / "bench" / "plain_reference.py"
    if not path.is_file():
        return {"skipped": f"{path} not found"}
    spec = importlib.util.spec_from_file_location("plain_reference", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return {"path": str(path),
            "translator_target_tokens_per_s": round(statistics.median(module.translator() for _ in range(repeats)), 1),
            "charlm_chars_per_s": round(statistics.median(module.charlm() for _ in range(repeats)), 1)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["all", "translator-train", "charlm-train", "translator-decode", "charlm-generate",
                                    "classify", "reference"])
    p.add_argument("--json", action="store_true", help="one JSON object (the default output, kept for scripts)")
    p.add_argument("--quick", action="store_true", help="fewer steps and sentences: under 2 minutes")
    p.add_argument("--preset", help="training benchmarks: the preset (default multi30k-en-fr / tinyshakespeare)")
    p.add_argument("-m", "--model", type=Path, help="decoding: model folder (default checkpoints/en-fr)")
    p.add_argument("--lm", type=Path, help="generation: model folder (default checkpoints/shakespeare)")
    p.add_argument("--classifier", type=Path, help="classify: model folder (default checkpoints/sst2)")
    p.add_argument("--tsv", type=Path, help="classify: labelled sentences (default: SST-2 dev)")
    p.add_argument("--src", type=Path, help="sentences to decode (default: Multi30k test_2016_flickr.en)")
    p.add_argument("--ref", type=Path, help="their references, for BLEU (default: the matching .fr)")
    p.add_argument("--data-dir", type=Path, default=Path(os.environ.get("SEQ2SEQ_DATA", ROOT.parent / "shared" / "data")))
    p.add_argument("--steps", type=int, help="training steps a repeat (default 20, quick 6)")
    p.add_argument("--repeats", type=int, help="runs a measurement (median; default 3, quick 1)")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="cpu",
                   help="where to measure (the plain reference always runs on the CPU)")
    args = p.parse_args()
    global DEVICE
    DEVICE = resolve_device(args.device)
    fast.configure_process()
    torch.set_num_threads(args.threads or torch.get_num_threads())
    steps = args.steps or (6 if args.quick else 20)
    repeats = args.repeats or (1 if args.quick else 3)
    out = {"benchmark": args.what, "config": {**device.describe(), "device": str(DEVICE),
                                              "gpu": torch.cuda.get_device_name() if DEVICE.type == "cuda" else None,
                                              "processes": int(os.environ.get("WORLD_SIZE", "1"))}}
    everything = args.what == "all"
    peak = gemm_peak(args.quick)
    out["gemm_peak_gflops"] = peak
    if everything or args.what == "reference":
        out["plain_reference"] = reference_bench(repeats)
    if everything or args.what == "translator-train":
        out["translator_train"] = train_bench("translator", args.preset or "multi30k-en-fr", args.data_dir, steps,
                                              repeats, peak)
    if everything or args.what == "charlm-train":
        out["charlm_train"] = train_bench("charlm", args.preset if args.what == "charlm-train" and args.preset
                                          else "tinyshakespeare", args.data_dir, max(2, steps // 3), repeats, peak)
    if everything or args.what == "translator-decode":
        model = args.model or ROOT / "checkpoints" / "en-fr"
        src = args.src or args.data_dir / "multi30k-en-fr" / "test_2016_flickr.en"
        ref = args.ref or (src.with_suffix(".fr") if src.suffix == ".en" else None)
        if (model / "config.json").is_file() and src.is_file():
            out["translator_decode"] = decode_bench(model, src, ref, repeats, peak, args.quick)
        else:
            out["translator_decode"] = {"skipped": f"no model at {model} or no {src}"}
    if everything or args.what == "charlm-generate":
        lm = args.lm or (args.model if args.what == "charlm-generate" and args.model else ROOT / "checkpoints" / "shakespeare")
        out["charlm_generate"] = (generate_bench(lm, repeats, peak, args.quick) if (lm / "config.json").is_file()
                                  else {"skipped": f"no model at {lm}"})
    if everything or args.what == "classify":
        model, tsv = args.classifier or ROOT / "checkpoints" / "sst2", args.tsv or args.data_dir / "sst2" / "dev.tsv"
        out["classify"] = (classify_bench(model, tsv, repeats) if (model / "config.json").is_file() and tsv.is_file()
                           else {"skipped": f"no model at {model} or no {tsv}"})
    ref = out.get("plain_reference", {})
    if "translator_train" in out and "translator_target_tokens_per_s" in ref:
        out["translator_train"]["vs_plain_reference"] = round(
            out["translator_train"]["bf16"]["target_tokens_per_s"] / ref["translator_target_tokens_per_s"], 3)
    if "charlm_train" in out and "charlm_chars_per_s" in ref:
        out["charlm_train"]["vs_plain_reference"] = round(
            out["charlm_train"]["bf16"]["chars_per_s"] / ref["charlm_chars_per_s"], 3)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
