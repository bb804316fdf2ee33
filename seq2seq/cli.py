"""The `seq2seq` command: train, translate, generate, evaluate."""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import time
from pathlib import Path

from seq2seq.config import Config, anchor_user_paths, apply_overrides, default_data_dir, load_preset, preset_names
from seq2seq.errors import Interrupted, UserError
from seq2seq.fast import configure_process
from seq2seq.limits import LIMITS, check_limits
from seq2seq.commands import add_device_arg, add_precision_arg, load_kind, nonnegative_float, positive_int, released_model
from seq2seq.serve.command import add_serve_parser, cmd_serve

log = logging.getLogger("seq2seq")


def bounded_int(low: int, high: int):
    """An argparse type: an integer from `low` to `high`."""
    def parse(text: str) -> int:
        value = int(text)
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be between {low} and {high:,}, got {value:,}")
        return value
    return parse


def nonnegative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


class Parser(argparse.ArgumentParser):
    """argparse that reports a bad argument in one line (what and which command), exit status 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def parser() -> argparse.ArgumentParser:
    top = Parser(prog="seq2seq", description="Recurrent sequence models: translation, character LMs and sentence classification.")
    sub = top.add_subparsers(dest="command", required=True)
    add_train_parser(sub)
    add_translate_parser(sub)
    add_generate_parser(sub)
    add_evaluate_parser(sub)
    add_classify_parser(sub)
    add_serve_parser(sub)
    p = sub.add_parser("plot", help="draw a training run's curves from its metrics.jsonl (needs matplotlib)")
    p.add_argument("run", type=Path, help="the run's folder (--output of train)")
    p.add_argument("-o", "--output", type=Path, help="PNG to write (default RUN/curves.png)")
    return top


def add_train_parser(sub) -> None:
    p = sub.add_parser("train", help="train a translator, a character language model or a classifier",
                       epilog="A translator's training pairs are tokenized once into a cache under $SEQ2SEQ_CACHE "
                              "(default ~/.cache/seq2seq) that later runs on the same data reuse.")
    p.add_argument("kind", choices=["translator", "charlm", "classifier"])
    p.add_argument("--preset", help=f"a shipped preset ({', '.join(preset_names())}) or a TOML file")
    p.add_argument("--data-dir", type=Path,
                   help="the folder a preset's corpus names are read from (default $SEQ2SEQ_DATA, else ./data); "
                        "paths given with --set are read from the current folder")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override a config value")
    p.add_argument("--time-budget", type=float, metavar="MINUTES",
                   help="plan the run to end, annealed, when this much wall clock is spent")
    p.add_argument("--output", type=Path, help="model folder (default runs/PRESET); an existing model is never "
                                                "overwritten")
    p.add_argument("--resume", action="store_true", help="continue the run saved in --output")
    p.add_argument("--init-from", type=Path, metavar="MODEL",
                   help="start from this model folder's weights and tokenizer (fine-tuning; its model.* settings "
                        "replace the preset's), with a fresh optimizer and schedule; a classifier may start from a "
                        "translator or a pretrained encoder (model.head = lm): its tokenizer, embedding and encoder "
                        "(model.freeze_encoder=true keeps them)")
    add_device_arg(p)
    p.add_argument("--skip-bad-lines", action="store_true",
                   help="translator: skip TSV lines that are not source<TAB>target (counted in the log) instead of stopping")


def add_translate_parser(sub) -> None:
    p = sub.add_parser("translate", help="translate sentences (arguments, -i FILE, or standard input)")
    add_sentence_args(p, "translate", "the released translator, checkpoints/en-fr")
    add_decoding_args(p)
    p.add_argument("--nbest", type=bounded_int(1, LIMITS["nbest"]), default=1,
                   help="hypotheses per input (one line each; at most --beam)")
    p.add_argument("--scores", action="store_true",
                   help="TSV lines: input number, score, translation (score: log-probability, divided by "
                        "length ** length-penalty when --beam > 1)")
    p.add_argument("--attention-png", type=Path, metavar="PNG",
                   help="also draw the attention weights of the first sentence's translation (needs matplotlib)")
    p.add_argument("--alignments", action="store_true",
                   help="add a tab and the best translation's word alignments, source-target pairs `i-j` as "
                        "fast_align and Moses write them, from its attention")
    p.add_argument("--no-split", action="store_true",
                   help="translate each line as one sentence (default: a line of several sentences is split "
                        "into them, translated, and joined back with its own spacing and line breaks)")
    p.add_argument("--constraint", action="append", default=[], metavar="SOURCE=TARGET",
                   help="where a line holds the source term (whole words, any case), its translation holds the "
                        "target term, once, where the model places it best (repeatable; beam 2 or more keeps it "
                        "fluent)")
    p.add_argument("--glossary", type=Path, metavar="TSV",
                   help="source<TAB>target terms, each applied as --constraint is")
    prefix = p.add_mutually_exclusive_group()
    prefix.add_argument("--prefix", metavar="TEXT",
                        help="every translation starts with TEXT, and the search goes on from there (a prefix "
                             "that ends inside a word continues the word; of a split line, its first sentence)")
    prefix.add_argument("--prefix-file", type=Path, metavar="FILE", help="one prefix per input line")


def add_generate_parser(sub) -> None:
    p = sub.add_parser("generate", help="generate text from a prompt with a character model")
    p.add_argument("-m", "--model", type=Path,
                   help="model folder (default: the released character model, checkpoints/shakespeare)")
    p.add_argument("--prompt", default="", help="text to continue (default: none, as after a line break)")
    p.add_argument("--max-chars", type=bounded_int(1, LIMITS["max_chars"]), default=400,
                   help=f"characters to generate (default 400, at most {LIMITS['max_chars']:,})")
    p.add_argument("--temperature", type=nonnegative_float, default=1.0, help="sampling temperature (default 1; 0 = greedy)")
    p.add_argument("--top-k", type=bounded_int(0, LIMITS["top_k"]), default=0,
                   help="sample among the k likeliest characters only (default 0: all)")
    p.add_argument("--top-p", type=float, default=1.0,
                   help="sample among the likeliest characters holding this much probability (default 1: all)")
    p.add_argument("--num-samples", type=bounded_int(1, LIMITS["num_samples"]), default=1,
                   help="independent continuations, separated by --- lines (default 1, streamed as it comes)")
    p.add_argument("--beam", type=bounded_int(0, LIMITS["beam"]), default=0,
                   help="beam search (length-normalised) instead of sampling (default 0: sample)")
    p.add_argument("--length-penalty", type=float, default=1.0, help="beam scores divided by length ** this")
    p.add_argument("--seed", type=int, help="random seed: the same seed repeats a sample (default: a fresh one)")
    add_precision_arg(p)


def add_evaluate_parser(sub) -> None:
    p = sub.add_parser("evaluate", help="BLEU/chrF of a translator; bits/char or continuation BLEU of a character "
                       "model; accuracy and F1 of a classifier")
    p.add_argument("-m", "--model", type=Path, help="model folder (default: the released model of the kind the "
                   "inputs ask for: checkpoints/en-fr for --src/--ref or --tsv, checkpoints/sst2 for a --tsv whose "
                   "header names a label column (or a .jsonl), checkpoints/shakespeare for --text)")
    p.add_argument("--src", type=Path, help="translator: source sentences")
    p.add_argument("--ref", type=Path, help="translator: reference translations")
    p.add_argument("--tsv", type=Path, help="translator: a test set of source<TAB>reference lines; classifier: a "
                   "labelled file with a header (tsv, or csv / jsonl by its suffix), columns as the model was trained")
    p.add_argument("--skip-bad-lines", action="store_true", help="--tsv: skip lines that are not source<TAB>reference")
    p.add_argument("--hyp-output", type=Path, help="translator: also write the translations here")
    add_decoding_args(p, beam_default=None)
    p.add_argument("--text", type=Path, help="character model: held-out text (scored in fp32 unless --precision "
                   "names another)")
    p.add_argument("--continuations", type=bounded_int(0, LIMITS["num_samples"]), default=0,
                   help=f"score N generated continuations (at most {LIMITS['num_samples']:,})")
    p.add_argument("--prompt-chars", type=positive_int, default=100,
                   help="continuations: characters of held-out text each starts from (default 100)")
    p.add_argument("--max-chars", type=bounded_int(1, LIMITS["max_chars"]), default=100,
                   help="continuations: characters generated and scored against the text's own (default 100)")
    p.add_argument("--temperature", type=nonnegative_float, default=0.0,
                   help="continuations: sampling temperature (default 0: greedy)")
    p.add_argument("--seed", type=int, default=1, help="continuations: random seed (default 1)")
    p.add_argument("--json", action="store_true", help="print one JSON object")


def add_sentence_args(p: argparse.ArgumentParser, verb: str, default_model: str) -> None:
    p.add_argument("-m", "--model", type=Path, help=f"model folder (default: {default_model})")
    p.add_argument("text", nargs="*", help=f"sentences to {verb}")
    p.add_argument("-i", "--input", type=Path, help="one sentence per line")
    p.add_argument("-o", "--output", type=Path, help="write here instead of standard output")


def add_classify_parser(sub) -> None:
    p = sub.add_parser("classify", help="label sentences with a classifier (arguments, -i FILE, or standard input)")
    add_sentence_args(p, "classify", "the released classifier, checkpoints/sst2")
    p.add_argument("--batch-size", type=bounded_int(1, LIMITS["batch_size"]), default=320,
                   help=f"sentences classified together (default 320, at most {LIMITS['batch_size']:,})")
    add_precision_arg(p)


def add_decoding_args(p: argparse.ArgumentParser, beam_default: int | None = 5) -> None:
    p.add_argument("--beam", type=bounded_int(1, LIMITS["beam"]), default=beam_default,
                   help=f"beam size, 1 = greedy (default: 5 for translation, greedy for continuations; at most "
                        f"{LIMITS['beam']})")
    p.add_argument("--batch-size", type=bounded_int(1, LIMITS["batch_size"]),
                   help=f"sentences decoded together (default 320, at most 1600 / beam; batch size x beam at most "
                        f"{LIMITS['rows']:,})")
    p.add_argument("--max-len-ratio", type=float, default=2.0,
                   help=f"output at most R x source length + 10 tokens (0 < R <= {LIMITS['max_len_ratio']:g})")
    p.add_argument("--length-penalty", type=float, default=1.0, help="scores divided by length ** this")
    add_precision_arg(p)


def precision(args, kind: str):
    """--precision and --device as the one `Precision` this command decodes in."""
    from seq2seq.device import resolve, resolve_precision

    return resolve_precision(args.precision, resolve(args.device), kind)


def cmd_train(args) -> None:
    from seq2seq.training import train

    if args.resume:
        if not args.output:
            raise UserError("--resume needs --output, the folder of the run to continue")
        if args.preset:
            raise UserError("--resume continues the run in --output with its own config: drop --preset")
        if args.skip_bad_lines:
            raise UserError("--resume reads the data as the run began; --skip-bad-lines is for a new run")
        if any(item.strip().startswith(("model.", "data.")) for item in args.set):
            raise UserError("--resume can change train.* settings only; model and data are fixed by the run")
        cfg = Config.load(args.output / "config.json")
        cfg = Config.from_dict(apply_overrides(cfg.to_dict(), args.set), "--set")
    else:
        if not args.preset:
            raise UserError(f"--preset is required; shipped presets: {', '.join(preset_names())}")
        overrides = args.set + (["data.skip_bad_lines=true"] if args.skip_bad_lines else [])
        if args.skip_bad_lines and args.kind != "translator":
            raise UserError("--skip-bad-lines is for a translator's TSV corpora; a character model reads plain text")
        cfg = load_preset(args.preset, args.kind, overrides)
        anchor_user_paths(cfg, args.set)
    if cfg.kind != args.kind:
        raise UserError(f"{args.output} holds a {cfg.kind} model, not a {args.kind}")
    if args.init_from:
        cfg.model = init_model_settings(args, cfg)
        cfg.validate(f"--init-from {args.init_from}")  # the shape it brings must suit this run's model too
    output = args.output or Path("runs") / cfg.preset
    data_dir = args.data_dir or (None if args.resume else default_data_dir())
    best = train(cfg, data_dir, output, time_budget=args.time_budget, resume=args.resume, device=args.device,
                 init_from=args.init_from)
    if os.environ.get("RANK", "0") == "0":  # under torchrun, one answer for the run
        print(json.dumps({"output": str(output), "best": best}))


def init_model_settings(args, cfg: Config):
    """The model settings of the --init-from folder, which the new run must build to load its
    weights; a classifier from a translator or a pretrained encoder takes the shape of its
    embedding and encoder, and keeps the preset's other settings."""
    from seq2seq.checkpoint import takes_encoder_only

    if args.resume:
        raise UserError("--init-from starts a new run from a model; --resume continues a run: give one of them")
    if not (args.init_from / "config.json").is_file():
        raise UserError(f"--init-from {args.init_from}: not a model folder (no config.json)")
    init = Config.load(args.init_from / "config.json")
    overridden = {item.strip().split("=", 1)[0].removeprefix("model.") for item in args.set
                  if item.strip().startswith("model.")}
    if takes_encoder_only(cfg, init):
        shaped = sorted(overridden & {"cell", "emb_dim", "hidden", "layers", "bidirectional"})
        if shaped:
            raise UserError(f"--init-from {args.init_from} sets the encoder's shape: drop --set model.{shaped[0]}")
        m = init.model
        if init.kind == "translator":
            return dataclasses.replace(cfg.model, cell=m.cell, emb_dim=m.emb_dim, hidden=m.enc_hidden,
                                       layers=m.enc_layers, bidirectional=True)
        return dataclasses.replace(cfg.model, cell=m.cell, emb_dim=m.emb_dim, hidden=m.hidden, layers=m.layers,
                                   bidirectional=m.bidirectional)
    if overridden:
        raise UserError("--init-from builds the model of that folder: drop the --set model.* overrides")
    if init.kind != cfg.kind:
        raise UserError(f"--init-from {args.init_from} holds a {init.kind} model, not a {cfg.kind}")
    return init.model


def read_inputs(args) -> list[str]:
    from seq2seq.data import decode_line, read_lines

    if args.text and args.input:
        raise UserError("give sentences as arguments or with -i, not both")
    if args.text:
        return list(args.text)
    if args.input:
        return read_lines(args.input)
    return [decode_line(raw, "<stdin>", number) for number, raw in enumerate(sys.stdin.buffer, 1)]


def write_output(lines: list[str], path: Path | None) -> None:
    text = "".join(line + "\n" for line in lines)
    if path is None:
        sys.stdout.write(text)
        sys.stdout.flush()
        return
    from seq2seq.files import write_text_atomic
    write_text_atomic(path, text)


def check_outputs(*paths: Path | None) -> None:
    """Outputs that could not be written fail now, not after the work."""
    from seq2seq.files import check_writable

    for path in paths:
        if path is not None:
            check_writable(path)


def read_glossary(args) -> dict[str, str] | None:
    """--glossary's lines and the --constraint terms, {source: target}; a malformed entry is an
    error naming it."""
    from seq2seq.data import iter_lines

    entries = []
    if args.glossary is not None:
        for number, line in enumerate(iter_lines(args.glossary), 1):
            if not line.strip() or line.startswith("#"):
                continue
            source, tab, target = line.partition("\t")
            entries.append((source, target if tab else "", f"{args.glossary}:{number}"))
    for given in args.constraint:
        source, sign, target = given.partition("=")
        entries.append((source, target if sign else "", f"--constraint {given!r}"))
    glossary = {}
    for source, target, where in entries:
        if not source.strip() or not target.strip() or "\t" in target:
            raise UserError(f"{where}: expected a source term and a target term (SOURCE=TARGET, or "
                            "source<TAB>target in a glossary)")
        glossary[source.strip()] = target.strip()
    return glossary or None


def read_prefixes(args, count: int) -> list[str] | None:
    from seq2seq.data import read_lines

    if args.prefix is not None:
        return [args.prefix] * count
    if args.prefix_file is None:
        return None
    prefixes = read_lines(args.prefix_file)
    if len(prefixes) != count:
        raise UserError(f"{args.prefix_file}: {len(prefixes)} prefixes for {count} input lines (one a line)")
    return prefixes


def cmd_translate(args) -> None:
    from seq2seq.inference import translations, word_alignments

    if args.nbest > args.beam:
        raise UserError(f"--nbest {args.nbest} needs --beam of at least {args.nbest}")
    check_limits(beam=args.beam, nbest=args.nbest, batch_size=args.batch_size, max_len_ratio=args.max_len_ratio)
    check_outputs(args.output, args.attention_png)
    if args.attention_png:
        from seq2seq.plots import require_matplotlib
        require_matplotlib()  # before any work: a missing extra is a hint, not a late traceback
    cfg, model, tokenizer = load_kind(args.model, "translator", args.device)
    lines = read_inputs(args)
    if args.attention_png and (not lines or not lines[0].strip()):
        raise UserError("--attention-png draws the first sentence's attention, and there is none")
    prefixes = read_prefixes(args, len(lines))
    glossary = read_glossary(args)
    results = translations(model, tokenizer, lines, beam=args.beam, nbest=args.nbest, batch_size=args.batch_size,
                           max_len_ratio=args.max_len_ratio, length_penalty=args.length_penalty,
                           progress=len(lines) > 1000, precision=precision(args, "translator"),
                           attention=args.alignments, split=None if args.no_split else cfg.data.src_lang,
                           prefixes=prefixes, glossary=glossary)
    out = []
    for number, found in enumerate(results):
        for rank, (text, score) in enumerate(found.nbest):
            line = f"{number}\t{score:.4f}\t{text}" if args.scores else text
            if args.alignments and rank == 0:
                pairs = word_alignments(found.attention) if found.attention is not None else []
                line += "\t" + " ".join(f"{i}-{j}" for i, j in pairs)
            out.append(line)
    write_output(out, args.output)
    if args.attention_png:
        draw_attention(model, tokenizer, lines, args)


def draw_attention(model, tokenizer, lines: list[str], args) -> None:
    from seq2seq.inference import attention_map
    from seq2seq.plots import attention

    weights, source, target = attention_map(model, tokenizer, lines[0], beam=args.beam, max_len_ratio=args.max_len_ratio,
                                            length_penalty=args.length_penalty,
                                            precision=precision(args, "translator"))
    attention(weights.numpy(), source, target, args.attention_png)
    print(f"seq2seq: attention of {lines[0][:40]!r} drawn in {args.attention_png}", file=sys.stderr)


def cmd_classify(args) -> None:
    from seq2seq.inference import classify

    check_outputs(args.output)
    lines = read_inputs(args)
    cfg, model, tokenizer = load_kind(args.model, "classifier", args.device)
    results = classify(model, tokenizer, lines, cfg.data.normalize, cfg.data.max_tokens, args.batch_size,
                       progress=len(lines) > 10_000, precision=precision(args, "classifier"))
    write_output(["" if r is None else f"{r[0]}\t{r[1]:.4f}" for r in results], args.output)


def cmd_plot(args) -> None:
    from seq2seq.plots import training_curves

    out = args.output or args.run / "curves.png"
    training_curves(args.run, out)
    print(out)


def cmd_generate(args) -> None:
    from seq2seq.inference import generate

    if not 0 < args.top_p <= 1:
        raise UserError(f"--top-p must be in (0, 1], got {args.top_p}")
    if args.beam and args.num_samples > 1:
        raise UserError("--beam gives one best continuation: drop --num-samples, or sample without --beam")
    check_limits(max_chars=args.max_chars, num_samples=args.num_samples)
    _, model, vocab = load_kind(args.model, "charlm", args.device)
    if args.prompt and all(c not in vocab.index for c in args.prompt):
        raise UserError(f"--prompt {args.prompt[:40]!r}: the model has seen none of its characters; "
                        "give a prompt in the training text's alphabet, or none")
    if args.seed is not None:
        import torch
        torch.manual_seed(args.seed)
    stream = args.num_samples == 1 and args.beam == 0
    if stream:
        sys.stdout.write(args.prompt)
        sys.stdout.flush()

    def on_text(piece: str) -> None:
        sys.stdout.write(piece)
        sys.stdout.flush()

    texts = generate(model, vocab, [args.prompt] * args.num_samples, args.max_chars,
                     temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, beam=args.beam,
                     length_penalty=args.length_penalty, seed=args.seed, on_text=on_text if stream else None,
                     precision=precision(args, "charlm"))
    if stream:
        sys.stdout.write("\n")
        return
    write_output([("\n---\n" if i else "") + args.prompt + text for i, text in enumerate(texts)], None)


def cmd_evaluate(args) -> None:
    from seq2seq import checkpoint

    if args.text and (args.src or args.ref or args.tsv):
        raise UserError("--text scores a character model, --src/--ref or --tsv a translator: give one kind")
    check_outputs(args.hyp_output)
    kind = "charlm" if args.text else "classifier" if args.tsv and labelled_file(args.tsv) else "translator"
    cfg, model, tokenizer = checkpoint.load(args.model or released_model(kind), device=args.device)
    started = time.perf_counter()
    if cfg.kind == "translator":
        result = evaluate_translator(args, model, tokenizer)
    elif cfg.kind == "classifier":
        result = evaluate_classifier(args, cfg, model, tokenizer)
    else:
        result = evaluate_charlm(args, model, tokenizer)
    result["seconds"] = round(time.perf_counter() - started, 2)
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key}: {value}")


def labelled_file(path: Path) -> bool:
    """A classifier's test file: JSON lines, or a header line naming a `label` column (a parallel
    corpus has no header)."""
    if path.suffix == ".jsonl":
        return True
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            header = f.readline().rstrip("\r\n")
    except OSError:
        return False  # the reader that follows says what is wrong with it
    return "label" in [field.strip().lower() for field in header.split("," if path.suffix == ".csv" else "\t")]


def evaluate_translator(args, model, tokenizer) -> dict:
    from seq2seq.commands import read_test_pairs
    from seq2seq.inference import translate
    from seq2seq.metrics import bleu_chrf

    pairs = read_test_pairs(args.tsv, args.src, args.ref, args.skip_bad_lines)
    sources = {s.strip() for s, _ in pairs}
    if len(pairs) >= 10 and len(sources) <= 5:
        raise UserError(f"{args.tsv or args.src}: the source side holds only {', '.join(sorted(sources)[:5])}: "
                        "labels, not sentences? A classifier's file needs a header line naming its "
                        "label column")
    started = time.perf_counter()
    beam, choice = args.beam or 5, precision(args, "translator")
    hyps = translate(model, tokenizer, [s for s, _ in pairs], beam=beam, batch_size=args.batch_size,
                     max_len_ratio=args.max_len_ratio, length_penalty=args.length_penalty, progress=True,
                     precision=choice)
    seconds = time.perf_counter() - started
    texts = [h[0][0] for h in hyps]
    if args.hyp_output:
        write_output(texts, args.hyp_output)
    result = bleu_chrf(texts, [r for _, r in pairs])
    result.update(beam=beam, precision=choice.name,
                  sentences_per_s=round(len(texts) / max(seconds, 1e-9), 1))
    return result


def evaluate_classifier(args, cfg, model, tokenizer) -> dict:
    from seq2seq.data import iter_labelled
    from seq2seq.inference import classify
    from seq2seq.metrics import classification_scores

    if not args.tsv:
        raise UserError("evaluating a classifier needs --tsv, a labelled file")
    fmt = {".csv": "csv", ".jsonl": "jsonl"}.get(args.tsv.suffix, "tsv")
    examples = list(iter_labelled(args.tsv, fmt, cfg.data.label_column, cfg.data.text_column))
    if not examples:
        raise UserError(f"{args.tsv}: no labelled examples to evaluate")
    index = {label: i for i, label in enumerate(tokenizer.labels)}
    index.update({tokenizer.shown(i): i for i in range(len(tokenizer.labels))})  # "positive" as well as "1"
    for label, _, number in examples:
        if label not in index:
            raise UserError(f"{args.tsv}:{number}: label {label!r} is not one the model knows "
                            f"({', '.join(dict.fromkeys([*tokenizer.labels, *map(tokenizer.shown, range(len(tokenizer.labels)))]))})")
    started = time.perf_counter()
    choice = precision(args, "classifier")
    results = classify(model, tokenizer, [text for _, text, _ in examples], cfg.data.normalize, cfg.data.max_tokens,
                       progress=True, precision=choice)
    seconds = time.perf_counter() - started
    shown = {tokenizer.shown(i): i for i in range(len(tokenizer.labels))}
    predicted = [shown[r[0]] if r else 0 for r in results]
    result = classification_scores([index[label] for label, _, _ in examples], predicted,
                                   [tokenizer.shown(i) for i in range(len(tokenizer.labels))])
    result.update(precision=choice.name, sentences_per_s=round(len(examples) / max(seconds, 1e-9), 1))
    result["by_length"] = accuracy_by_length(tokenizer, cfg.data.normalize, examples, predicted, index)
    return result


def accuracy_by_length(tokenizer, normalize: str, examples, predicted: list[int], index: dict) -> list[dict]:
    """Accuracy in each quartile of input length (subword tokens), shortest first."""
    from seq2seq.data import normalize_text

    lengths = [len(ids) for ids in tokenizer.encode([normalize_text(text, normalize) for _, text, _ in examples])]
    order = sorted(range(len(examples)), key=lengths.__getitem__)
    quarters = []
    for q in range(4):
        rows = order[q * len(order) // 4 : (q + 1) * len(order) // 4]
        if rows:
            right = sum(predicted[i] == index[examples[i][0]] for i in rows)
            quarters.append({"tokens": [lengths[rows[0]], lengths[rows[-1]]], "examples": len(rows),
                             "accuracy": round(right / len(rows), 4)})
    return quarters


def evaluate_charlm(args, model, vocab) -> dict:
    import torch

    from seq2seq.data import read_text
    from seq2seq.inference import continuation_passages, generate, score_text
    from seq2seq.metrics import bleu_chrf

    if not args.text:
        raise UserError("evaluating a character model needs --text")
    text = read_text(args.text)
    if len(text) < 2:
        raise UserError(f"{args.text}: no text to score")
    if not args.continuations:  # auto scores in fp32: the reference number
        ids = torch.tensor(vocab.encode(text, warn=True), dtype=torch.long)
        choice = None if args.precision == "auto" else precision(args, "charlm")
        scores = score_text(model, ids, precision=choice)
        return {**{k: round(v, 4) if isinstance(v, float) else v for k, v in scores.items()},
                "precision": "fp32" if choice is None else choice.name}
    try:
        passages = continuation_passages(text, args.continuations, args.prompt_chars, args.max_chars)
    except ValueError as e:
        raise UserError(f"{args.text}: {e}") from None
    hyps = generate(model, vocab, [prompt for prompt, _ in passages], args.max_chars, temperature=args.temperature,
                    beam=args.beam if args.beam and args.beam > 1 else 0, seed=args.seed,
                    precision=precision(args, "charlm"))
    flat = lambda s: " ".join(s.split())  # noqa: E731  sacreBLEU scores lines: fold line breaks
    result = bleu_chrf([flat(h) for h in hyps], [flat(ref) for _, ref in passages])
    result.update(continuations=len(passages), prompt_chars=args.prompt_chars, max_chars=args.max_chars)
    return result


COMMANDS = {"train": cmd_train, "translate": cmd_translate, "generate": cmd_generate, "evaluate": cmd_evaluate,
            "classify": cmd_classify, "plot": cmd_plot, "serve": cmd_serve}


def main(argv: list[str] | None = None) -> int:
    code = run(argv)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # Under torchrun, leave without the interpreter's teardown: there gloo's threads can
        # abort a process whose run has finished and saved ("terminate called without an active
        # exception", SIGABRT), seen in about one run in five on CI. Every file is closed by now.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def run(argv: list[str] | None = None) -> int:
    configure_process()  # before PyTorch's first oneDNN call reads its settings
    args = parser().parse_args(argv)
    logging.basicConfig(level=os.environ.get("SEQ2SEQ_LOG", "INFO"), format="%(asctime)s %(message)s",
                        datefmt="%H:%M:%S", stream=sys.stderr)
    try:
        COMMANDS[args.command](args)
        sys.stdout.flush()  # here, so that a closed pipe is caught below and not at exit
    except BrokenPipeError:  # the reader has gone (`| head`): nothing more to say to it
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except UserError as e:
        print(f"seq2seq: error: {e}", file=sys.stderr)
        return 2
    except Interrupted as e:
        print(f"seq2seq: {e}", file=sys.stderr)
        return e.exit_code
    except OSError as e:  # unreadable input, unwritable output: the user's to fix, not a crash
        where = f"{e.filename}: " if e.filename else ""
        print(f"seq2seq: error: {where}{e.strerror or e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("seq2seq: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
