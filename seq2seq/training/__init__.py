"""Training: `train()` sets a run up (or resumes it) and runs the one loop (`trainer.Trainer`) on
a model kind's task (`tasks`), with the schedule and budget plan of `schedule` and the files of
`run_folder`."""
from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import torch

from seq2seq import checkpoint
from seq2seq.config import Config
from seq2seq.device import resolve as resolve_device
from seq2seq.device import machine_name, training_bf16
from seq2seq.distributed import Cluster
from seq2seq.errors import UserError
from seq2seq.fast import configure_process
from seq2seq.training.run_folder import RunFolder
from seq2seq.training.schedule import learning_rate
from seq2seq.training.tasks import task_class
from seq2seq.training.trainer import Progress, Trainer

log = logging.getLogger("seq2seq")


def train(cfg: Config, data_dir: Path | None, output: Path, time_budget: float | None = None,
          resume: bool = False, device: str = "auto", init_from: Path | None = None, clock=time.monotonic) -> dict:
    """Train into `output`; returns the best evaluation. `time_budget` is in minutes of wall clock:
    the run plans its step count (and so its learning-rate schedule) to end when it is spent.
    On resume, `data_dir` None means the folder the run was started with. `device`: auto (CUDA
    where present), cpu or cuda. `init_from`: a model folder whose weights and tokenizer the run
    starts from (fine-tuning; `cfg.model` must be that folder's)."""
    started = clock()
    configure_process()
    cluster = Cluster.from_env(resolve_device(device))
    if not cluster.main:
        log.setLevel(logging.WARNING)  # one rank speaks for the run
    folder = RunFolder(Path(output), cluster.main)
    folder.check(resume)
    state = _start(cfg, cluster, folder if resume else None)
    if resume:
        ranks = len(state.get("rank_states", [state]))
        if ranks != cluster.world:  # before the data is read and the model built
            raise UserError(f"{folder.path}: the run used {ranks} process(es); resume it with as many "
                            f"(this one has {cluster.world})")
        data_dir = data_dir or Path(json.loads(state["progress"])["data_dir"])
    data_dir = Path(data_dir)
    task = build_task(cfg, data_dir, cluster, folder, resume, init_from)
    folder.check_space(sum(p.numel() for p in task.model.parameters()))
    optimizer = build_optimizer(cfg, task.model)
    progress = Progress(data_dir=str(data_dir.resolve()))
    if resume:
        progress = _resume(state, task, optimizer, cluster, folder, data_dir)
    folder.save_config(cfg)  # on resume too: --set train.* overrides are kept
    trainer = Trainer(cfg, task, optimizer, cluster, folder, progress, time_budget * 60 if time_budget else None,
                      clock, started)
    if resume and "weight_average" in state:
        trainer.average.load_state(state["weight_average"])
    folder.open_log(resume, progress.step)
    if not resume:
        if init_from is not None:  # the log says where the weights came from
            folder.write({"type": "init", "step": 0, "from": str(Path(init_from).resolve())})
        folder.write({"type": "precision", "step": 0, "train": "bf16" if cfg.train.bf16 else "fp32",
                      "device": machine_name(cluster.device)})  # what ran: a preset's bf16 is bf16 where native
        trainer.save_resume_state()
    best = trainer.run()
    if cluster.main and hasattr(task, "save_shortlist"):
        task.save_shortlist(folder.path)  # before the test: it is scored as `seq2seq evaluate` scores it
    if cluster.main and best is not None:
        score_test(task, folder, best)
    return best


def score_test(task, folder: RunFolder, best: dict) -> None:
    """The best model's scores on the task's test split, where it has one: logged, appended to
    metrics.jsonl and added to metrics.json."""
    checkpoint.load_weights(task.model, folder.path / checkpoint.BEST)
    scores = task.test()
    if scores:
        folder.append({"type": "test", "step": best["step"], **scores})
        folder.update_metrics({"test": scores})
        log.info("test (best model, step %d): %s", best["step"], ", ".join(f"{k} {v}" for k, v in scores.items()))


def timing_trainer(cfg: Config, data_dir: Path, device: str = "cpu") -> Trainer:
    """A trainer that keeps nothing on disk, for scripts that time `train_step`."""
    configure_process()
    cluster = Cluster(device=resolve_device(device))
    _start(cfg, cluster, None)
    task = build_task(cfg, Path(data_dir), cluster, RunFolder(None), False, None)
    return Trainer(cfg, task, build_optimizer(cfg, task.model), cluster)


def _start(cfg: Config, cluster: Cluster, resume_from: RunFolder | None) -> dict | None:
    """Threads, the seed, a check of the schedule's name, bf16 where it runs natively (else fp32,
    said in one line), and the resume state to continue from."""
    cfg.train.bf16 = training_bf16(cfg.train.bf16, cluster.device)
    torch.set_num_threads(cfg.train.threads or max(1, (os.cpu_count() or 1) // cluster.world))
    torch.manual_seed(cfg.train.seed)
    learning_rate(cfg.train, 0, None, 1.0)  # a bad schedule name fails now, before anything is written
    return resume_from.load_state() if resume_from is not None else None


def build_task(cfg: Config, data_dir: Path, cluster: Cluster, folder: RunFolder, resume: bool,
               init_from: Path | None):
    """The task with its data, tokenizer and model on the device: the tokenizer is the run's own
    on resume, `init_from`'s when fine-tuning, else built from the data (by rank 0 only, the
    others wait and read it from the run folder)."""
    kind_tokenizer = checkpoint.kind_classes(cfg.kind)[1]
    tokenizer = None
    if resume:
        tokenizer = kind_tokenizer.load(folder.path)
    elif init_from is not None and cluster.main:
        tokenizer = kind_tokenizer.load(init_from)
    if not cluster.main:  # rank 0 first: it builds the token cache and the tokenizer, which the others read
        cluster.barrier()
        tokenizer = tokenizer or kind_tokenizer.load(folder.path)
    task = task_class(cfg)(cfg, data_dir, tokenizer)
    if cluster.main:
        if not resume and folder.path is not None:
            task.tokenizer.save(folder.path)
        cluster.barrier()
    task.to(cluster.device)
    task.shard(cluster.rank, cluster.world)
    if init_from is not None and not resume:  # before the optimizer and the first saved state
        init = Config.load(init_from / "config.json")
        if checkpoint.takes_encoder_only(cfg, init):
            checkpoint.load_encoder(task.model, init_from / checkpoint.BEST)
            source = "translator" if init.kind == "translator" else \
                "pretrained encoder" if init.model.head == "lm" else "classifier"
            log.info("tokenizer, embedding and encoder from the %s %s%s", source, init_from,
                     " (frozen)" if cfg.model.freeze_encoder else "")
        else:
            checkpoint.load_weights(task.model, init_from / checkpoint.BEST)
            log.info("weights and tokenizer from %s", init_from)
    task.forward = cluster.wrap(task.model)
    if cluster.active:  # each rank its own dropout masks (the weights came from one seed)
        torch.manual_seed(cfg.train.seed + 1000 * cluster.rank)
    log.info("model: %s, %.2fM parameters", cfg.kind, sum(p.numel() for p in task.model.parameters()) / 1e6)
    return task


def build_optimizer(cfg: Config, model: torch.nn.Module) -> torch.optim.Optimizer:
    """AdamW: weight decay shrinks the weights apart from the gradient's moments (Adam's L2 term,
    normalised by them, can stop a character model from learning at all). Fused: one kernel for
    all parameters instead of a dozen operations per tensor."""
    return torch.optim.AdamW(model.parameters(), lr=cfg.train.lr, betas=(0.9, 0.98),
                             weight_decay=cfg.train.weight_decay, fused=True)


def _resume(state: dict, task, optimizer, cluster: Cluster, folder: RunFolder, data_dir: Path) -> Progress:
    """The latest weights, the optimizer, the progress and this rank's random state of a saved run."""
    checkpoint.load_weights(task.model, folder.path / checkpoint.LAST)
    try:
        optimizer.load_state_dict(state["optimizer"])
    except ValueError as e:
        raise UserError(f"{folder.path / checkpoint.STATE}: does not match the model ({e})") from None
    progress = Progress.from_json(dict(json.loads(state["progress"]), data_dir=str(data_dir.resolve())))
    mine = state.get("rank_states", [state])[cluster.rank]  # the count was checked in `train`
    torch.set_rng_state(mine["torch_rng"])
    if cluster.device.type == "cuda" and "cuda_rng" in mine:
        torch.cuda.set_rng_state(mine["cuda_rng"], cluster.device)
    task.load_extra_state(mine.get("task", {}))
    log.info("resuming %s at epoch %d, step %d", folder.path, progress.epoch + 1, progress.step)
    return progress
