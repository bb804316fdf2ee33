"""A training run's folder: config.json, the metrics log, the best and latest weights, and the
state a resume continues from. Only the main process writes; every write is atomic."""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from seq2seq import checkpoint
from seq2seq.errors import UserError
from seq2seq.files import check_free_space, check_output_folder, write_text_atomic


class RunFolder:
    def __init__(self, path: Path | None, main: bool = True):
        """`path` None: a run that keeps nothing (timing a step)."""
        self.path, self.main = None if path is None else Path(path), main and path is not None
        self.log_file = None

    def check(self, resume: bool) -> None:
        """Refuse a folder that cannot take this run, before anything is written."""
        if resume and not (self.path / checkpoint.STATE).is_file():
            raise UserError(f"{self.path}: nothing to resume ({checkpoint.STATE} not found)")
        if self.main and not resume and (self.path / "config.json").exists():
            raise UserError(f"{self.path} already holds a model: pass --resume to continue it, or choose another --output")
        if self.main:
            check_output_folder(self.path)

    def check_space(self, n_params: int) -> None:
        """Room for the best and latest weights, Adam's two moments, and a temporary copy of the
        largest while it is written; a resumed run replaces its own files, so those count as room."""
        present = sum((self.path / name).stat().st_size for name in (checkpoint.BEST, checkpoint.LAST, checkpoint.STATE)
                      if (self.path / name).is_file())
        if self.main:
            check_free_space(self.path, n_params * 4 * 6 + 2**20 - present)

    def load_state(self) -> dict:
        return checkpoint.load_state(self.path / checkpoint.STATE)

    def save_config(self, cfg) -> None:
        if self.main:
            cfg.save(self.path / "config.json")

    def open_log(self, resume: bool, step: int) -> None:
        """metrics.jsonl, cut back to the saved state's `step` on resume."""
        if not self.main:
            return
        if resume:
            self._truncate_log(step)
        self.log_file = open(self.path / "metrics.jsonl", "a", encoding="utf-8")

    def _truncate_log(self, step: int) -> None:
        """Drop the records a killed run wrote after its last saved state: the resumed run writes
        them again, so the log reads as one uninterrupted run."""
        path = self.path / "metrics.jsonl"
        if not path.is_file():
            return
        kept = []
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                if json.loads(line).get("step", 0) <= step:
                    kept.append(line)
            except json.JSONDecodeError:  # the half line of a killed write
                pass
        write_text_atomic(path, "".join(line + "\n" for line in kept))

    def write(self, record: dict) -> None:
        if self.log_file is not None:
            self.log_file.write(json.dumps(record) + "\n")
            self.log_file.flush()

    def append(self, record: dict) -> None:
        """A record after the run's log is closed (the test scores)."""
        if self.main:
            with open(self.path / "metrics.jsonl", "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")

    def close(self) -> None:
        if self.log_file is not None:
            self.log_file.close()
            self.log_file = None

    def save_best(self, model: torch.nn.Module, metrics: dict) -> None:
        if self.main:
            checkpoint.save_weights(model, self.path / checkpoint.BEST)
            checkpoint.save_json(metrics, self.path / "metrics.json")

    def update_metrics(self, extra: dict) -> None:
        """Add `extra` to metrics.json (the test scores, once the run is over)."""
        if self.main:
            path = self.path / "metrics.json"
            metrics = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
            checkpoint.save_json({**metrics, **extra}, path)

    def save_state(self, model: torch.nn.Module, optimizer, progress: dict, ranks: list[dict], many: bool,
                   average: dict | None = None) -> None:
        """The latest weights and the resume state: the optimizer, the progress (JSON), each
        rank's random state and the weight average. The log is synced first: it is what a resume keeps."""
        if not self.main:
            return
        checkpoint.save_weights(model, self.path / checkpoint.LAST)
        if self.log_file is not None:
            os.fsync(self.log_file.fileno())
        state = {"optimizer": optimizer.state_dict(), "progress": json.dumps(progress), **ranks[0]}
        if many:
            state["rank_states"] = ranks
        if average is not None:
            state["weight_average"] = average
        checkpoint.save_state(state, self.path / checkpoint.STATE)
