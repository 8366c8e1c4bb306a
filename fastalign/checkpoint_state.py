"""A checkpoint's small state files, read and checked field by field before anything uses them.

Details: docs/design.md section 7.3.
"""

from __future__ import annotations

import json
import math
import random
import stat
from pathlib import Path
from typing import Any

import torch

from fastalign.errors import ConfigError

STATE_FILE = "trainer_state.json"
SCHEDULER_FILE = "scheduler.json"
RNG_DIR = "rng"
MAX_STEP = 2**63 - 1  # steps become int64 (tensors, TensorBoard's global_step)
MT_WORDS = 624  # Mersenne Twister state words (random and numpy.random)

# LambdaLR.state_dict()'s keys -> a check of the value; base_lrs and last_epoch are required.
# `verbose` is written by older torch versions.
_SCHEDULER_KEYS = ("base_lrs", "last_epoch", "_step_count", "_is_initial", "_get_lr_called_within_step",
                   "_last_lr", "lr_lambdas", "verbose")


def read_json(path: Path, what: str) -> Any:
    """JSON of a regular file (a symlink is refused, naming it); ConfigError when unreadable."""
    try:
        mode = path.lstat().st_mode
    except OSError as err:
        raise ConfigError(f"{path}: cannot read the {what} ({err.strerror or err})") from None
    if stat.S_ISLNK(mode):
        raise ConfigError(f"{path}: is a symbolic link; checkpoint files must be regular files inside "
                          "the checkpoint directory")
    if not stat.S_ISREG(mode):
        raise ConfigError(f"{path}: is not a regular file; the {what} must be one")
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise ConfigError(f"{path}: not a readable {what} (JSON): {err}") from None


class _Fields:
    """Checks of one file's fields; each failure is a ConfigError naming the file and the field."""

    def __init__(self, path: Path, value: Any, what: str):
        self.path = path
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: the {what} must be a JSON object, got {_short(value)}")
        self.value = value

    def fail(self, field: str, reason: str):
        raise ConfigError(f"{self.path}: field '{field}' {reason}")

    def integer(self, field: str, value: Any, low: int, high: int = MAX_STEP) -> int:
        if type(value) is not int:  # bool is an int subclass; 4.0 and "4" are not steps either
            self.fail(field, f"must be an integer, got {_short(value)}")
        if not low <= value <= high:
            self.fail(field, f"must be in [{low}, {high}], got {value}")
        return value

    def number(self, field: str, value: Any, low: float = 0.0) -> float:
        if type(value) not in (int, float) or not math.isfinite(value) or value < low:
            self.fail(field, f"must be a finite number >= {low}, got {_short(value)}")
        return value

    def boolean(self, field: str, value: Any) -> None:
        if type(value) is not bool:
            self.fail(field, f"must be true or false, got {_short(value)}")

    def sequence(self, field: str, value: Any, length: int | None = None, *, low: int | None = None,
                 high: int | None = None) -> list:
        """A list (of `length` items); with low/high each item an integer in [low, high]."""
        if not isinstance(value, list) or (length is not None and len(value) != length):
            self.fail(field, f"must be a list{f' of {length} items' if length is not None else ''}, "
                             f"got {_short(value)}")
        if low is not None and not all(type(v) is int and low <= v <= high for v in value):
            self.fail(field, f"must hold integers in [{low}, {high}]")
        return value

    def object(self, field: str, value: Any) -> None:
        if not isinstance(value, dict):
            self.fail(field, f"must be a JSON object, got {_short(value)}")


def _short(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def check_trainer_state(state: Any, path: Path, expected_step: int) -> dict[str, Any]:
    """`state` (read from `path`, the trainer_state.json of checkpoint-<expected_step>) if valid."""
    fields = _Fields(path, state, "trainer state")
    for required in ("step", "epoch", "step_in_epoch"):
        if required not in state:
            fields.fail(required, "is missing")
    step = fields.integer("step", state["step"], 0)
    if step != expected_step:
        fields.fail("step", f"is {step}, but the directory is {path.parent.name}: a checkpoint resumes "
                            "at the step it is named after")
    fields.integer("epoch", state["epoch"], 0, step)  # every epoch takes at least one step
    fields.integer("step_in_epoch", state["step_in_epoch"], 0, step)
    if "total_steps" in state:
        fields.integer("total_steps", state["total_steps"], 1)
    if "batch_layout" in state:
        fields.object("batch_layout", state["batch_layout"])
        for name, value in state["batch_layout"].items():
            fields.integer(f"batch_layout.{name}", value, -MAX_STEP - 1)
    for name in ("inputs", "args"):
        if name in state:
            fields.object(name, state[name])
    if state.get("best_checkpoint") is not None:  # --load_best_model_at_end's choice (best_model.py)
        best = state["best_checkpoint"]
        fields.object("best_checkpoint", best)
        if not isinstance(best.get("metric"), str):
            fields.fail("best_checkpoint.metric", f"must be a metric name, got {_short(best.get('metric'))}")
        fields.boolean("best_checkpoint.greater_is_better", best.get("greater_is_better"))
        if best.get("step") is not None:
            fields.integer("best_checkpoint.step", best["step"], 0, step)
            if type(best.get("value")) not in (int, float) or not math.isfinite(best["value"]):
                fields.fail("best_checkpoint.value", f"must be a finite number, got {_short(best.get('value'))}")
    return state


def check_scheduler_state(state: Any, path: Path, step: int) -> dict[str, Any]:
    """LambdaLR state of a checkpoint at `step`: only its own keys, each of its type."""
    fields = _Fields(path, state, "LR scheduler state")
    for name in state:
        if name not in _SCHEDULER_KEYS:
            fields.fail(name, "is not a field of the LR scheduler's state")
    for required in ("base_lrs", "last_epoch"):
        if required not in state:
            fields.fail(required, "is missing")
    if fields.integer("last_epoch", state["last_epoch"], 0) != step:
        fields.fail("last_epoch", f"is {state['last_epoch']}, but the checkpoint is at step {step}")
    for name in ("base_lrs", "_last_lr"):
        if name in state:
            for index, lr in enumerate(fields.sequence(name, state[name])):
                fields.number(f"{name}[{index}]", lr)
    if "_step_count" in state:
        fields.integer("_step_count", state["_step_count"], 0)
    for name in ("_is_initial", "_get_lr_called_within_step", "verbose"):
        if name in state:
            fields.boolean(name, state[name])
    if "lr_lambdas" in state:
        for index, value in enumerate(fields.sequence("lr_lambdas", state["lr_lambdas"])):
            if value is not None:
                fields.object(f"lr_lambdas[{index}]", value)
    return state


def check_rng_state(state: Any, path: Path) -> dict[str, Any]:
    """One rank's RNG states, in exactly the shapes torch, random and numpy take back."""
    fields = _Fields(path, state, "RNG state")
    for name in state:
        if name not in ("torch", "cuda", "python", "numpy"):
            fields.fail(name, "is not an RNG this trainer saves")
    for name in ("torch", "python", "numpy"):
        if name not in state:
            fields.fail(name, "is missing")
    fields.sequence("torch", state["torch"], torch.get_rng_state().numel(), low=0, high=255)
    if "cuda" in state:
        length = torch.cuda.get_rng_state().numel() if torch.cuda.is_available() else None
        fields.sequence("cuda", state["cuda"], length, low=0, high=255)
    version, words, gauss = fields.sequence("python", state["python"], 3)
    fields.integer("python[0]", version, random.getstate()[0], random.getstate()[0])
    fields.sequence("python[1]", words, MT_WORDS + 1, low=0, high=2**32 - 1)
    fields.integer("python[1][-1]", words[-1], 0, MT_WORDS)  # the position in the state
    if gauss is not None:
        fields.number("python[2]", gauss, -math.inf)
    kind, keys, position, has_gauss, cached = fields.sequence("numpy", state["numpy"], 5)
    if kind != "MT19937":
        fields.fail("numpy[0]", f"must be 'MT19937', got {_short(kind)}")
    fields.sequence("numpy[1]", keys, MT_WORDS, low=0, high=2**32 - 1)
    fields.integer("numpy[2]", position, 0, MT_WORDS)
    fields.integer("numpy[3]", has_gauss, 0, 1)
    fields.number("numpy[4]", cached, -math.inf)
    return state


def step_of_dir(path: Path) -> int:
    """N of checkpoint-N (the caller has matched the name)."""
    return int(path.name.rsplit("-", 1)[1])


def read_trainer_state(path: Path) -> dict[str, Any]:
    return check_trainer_state(read_json(path / STATE_FILE, "trainer state"), path / STATE_FILE, step_of_dir(path))


def read_scheduler_state(path: Path, step: int) -> dict[str, Any]:
    return check_scheduler_state(read_json(path / SCHEDULER_FILE, "LR scheduler state"), path / SCHEDULER_FILE, step)


def read_rng_state(file: Path) -> dict[str, Any]:
    return check_rng_state(read_json(file, "RNG state"), file)


def problem(path: Path) -> str | None:
    """Why checkpoint `path`'s state files cannot be used (the first bad field), or None."""
    try:
        step = read_trainer_state(path)["step"]
        read_scheduler_state(path, step)
        for file in sorted((path / RNG_DIR).glob("rank*.json")):
            read_rng_state(file)
    except ConfigError as err:
        return str(err)
    return None
