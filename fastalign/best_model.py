"""--load_best_model_at_end: which checkpoint is the best, kept out of rotation and exported.

As in HF's Trainer, the candidates are the checkpoints written at an evaluation step (with
--load_best_model_at_end, --save_strategy must equal --evaluation_strategy and, for `steps`,
--save_steps be a multiple of --eval_steps, so every checkpoint has one). The best is the one
whose evaluation has the best --metric_for_best_model (default eval_pairwise_accuracy, larger is
better; a metric ending in "loss" defaults to smaller is better, as HF); ties keep the earlier
one. `checkpoint.rotate_checkpoints` never deletes it, and at the end of training its weights,
not the last step's, are exported to --output_dir. The choice is part of each checkpoint's
trainer_state.json, so a resumed run continues with it.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

from fastalign import checkpoint as ckpt
from fastalign import safe_dcp
from fastalign.distributed import broadcast_object, load_sharded_weights
from fastalign.errors import ConfigError, FastalignError

# fastalign.hf_weights is imported where used: fastalign.config imports this module, and
# `python -m fastalign.train --help` does not pay for the weight reader.

log = logging.getLogger("fastalign.train")

# What the trainer's evaluation reports (fastalign.trainer.Trainer._evaluate); the ranking metrics
# are fastalign.evaluate.RANKING_METRICS with the eval_ prefix.
EVAL_METRICS = ("eval_loss", "eval_nll_best", "eval_penalty", "eval_penalty_active_frac",
                "eval_pairwise_accuracy", "eval_kendall_tau", "eval_top1_accuracy")
DEFAULT_METRIC = "eval_pairwise_accuracy"
STATE_KEY = "best_checkpoint"  # trainer_state.json: {"metric", "greater_is_better", "step", "value"}


def resolve_metric(name: str | None) -> str:
    """--metric_for_best_model as HF reads it: `loss` means `eval_loss`; None: the default."""
    metric = name or DEFAULT_METRIC
    metric = metric if metric.startswith("eval_") else f"eval_{metric}"
    if metric not in EVAL_METRICS:
        raise ConfigError(f"--metric_for_best_model: {name!r} is not a metric the evaluation reports "
                          f"(one of: {', '.join(EVAL_METRICS)}; the eval_ prefix may be left out)")
    return metric


def settle_flags(args) -> None:
    """Resolve --metric_for_best_model and --greater_is_better (HF's defaults) and cross-check
    --load_best_model_at_end against the strategies (ConfigError naming the flag)."""
    args.metric_for_best_model = resolve_metric(args.metric_for_best_model)
    if args.greater_is_better is None:
        args.greater_is_better = not args.metric_for_best_model.endswith("loss")
    if not args.load_best_model_at_end:
        return
    if args.evaluation_strategy == "no":
        raise ConfigError("--load_best_model_at_end: needs --evaluation_strategy steps|epoch (and "
                          "--eval_data_path): the best checkpoint is chosen by its evaluation")
    if args.save_strategy != args.evaluation_strategy:
        raise ConfigError(f"--load_best_model_at_end: --save_strategy ({args.save_strategy}) must equal "
                          f"--evaluation_strategy ({args.evaluation_strategy}), so that every "
                          "checkpoint has an evaluation to compare")


def check_intervals(save_steps: int, eval_steps: int, strategy: str) -> None:
    """--save_steps must be a multiple of --eval_steps (as resolved for the run's total steps)."""
    if strategy == "steps" and save_steps % eval_steps:
        raise ConfigError(f"--load_best_model_at_end: --save_steps ({save_steps} steps) must be a multiple "
                          f"of --eval_steps ({eval_steps} steps), so that every checkpoint has an evaluation")


@dataclass
class BestCheckpoint:
    """The best checkpoint so far by `metric` (None until a checkpoint with an evaluation)."""

    metric: str
    greater_is_better: bool
    step: int | None = None
    value: float | None = None

    def offer(self, step: int, eval_record: dict) -> bool:
        """The checkpoint of `step` is about to be written after `eval_record`: is it the new best?"""
        value = eval_record.get(self.metric)
        if value is None or not math.isfinite(value):  # e.g. no pair with different ratings
            return False
        better = self.value is None or (value > self.value if self.greater_is_better else value < self.value)
        if better:
            self.step, self.value = step, value
        return better

    def path(self, output_dir: Path) -> Path | None:
        return ckpt.checkpoint_dir(output_dir, self.step) if self.step is not None else None

    def state(self) -> dict:
        return {"metric": self.metric, "greater_is_better": self.greater_is_better,
                "step": self.step, "value": self.value}

    def restore(self, saved: dict | None) -> None:
        """Continue with a resumed checkpoint's choice, when it was made by the same rule."""
        if not saved or saved.get("step") is None:
            return
        if (saved.get("metric"), saved.get("greater_is_better")) != (self.metric, self.greater_is_better):
            log.warning("--load_best_model_at_end: the resumed run chose its best checkpoint by %s "
                        "(greater is better: %s); this run compares by %s (greater is better: %s), "
                        "so only checkpoints from here on are candidates", saved.get("metric"),
                        saved.get("greater_is_better"), self.metric, self.greater_is_better)
            return
        self.step, self.value = int(saved["step"]), float(saved["value"])


def load_for_export(best: BestCheckpoint, output_dir: Path, model: nn.Module, prefix: str,
                    final_step: int) -> None:
    """Collective, at the end of training: put the best checkpoint's weights into `model` (each
    rank its own shards), so that the export writes them. A checkpoint that is missing or does not
    verify is an error naming it: nothing is exported then, and the checkpoints stay as they are.
    No checkpoint with an evaluation: the final weights are exported, with a warning."""
    if best.step is None:
        log.warning("--load_best_model_at_end: no checkpoint was written at an evaluation step with a "
                    "defined %s; exporting the weights of the final step %d", best.metric, final_step)
        return
    path = best.path(output_dir)
    if dist.get_rank() == 0:
        log.info("--load_best_model_at_end: exporting %s (%s %.4f, the best of the checkpoints; "
                 "greater is better: %s) instead of step %d", path, best.metric, best.value,
                 best.greater_is_better, final_step)
    if best.step == final_step:
        return  # the weights in memory are the best checkpoint's
    problem, model_only = None, False
    if dist.get_rank() == 0:  # one view of the file system, as checkpoint.resolve_resume
        model_only = ckpt.is_model_only(path)
        if not (model_only or ckpt.is_complete(path)):
            problem = "it is missing or incomplete"
    problem, model_only = broadcast_object((problem, model_only))
    if problem is None and not model_only:
        problem = ckpt.verify_checkpoint(path)
    if problem is not None:
        raise FastalignError(f"--load_best_model_at_end: the best checkpoint {path} ({best.metric} "
                             f"{best.value:.4g}) cannot be loaded: {problem}. Nothing was exported; "
                             f"the checkpoints in {output_dir} are untouched")
    if model_only:  # an HF model directory (--save_only_model): read each rank's rows
        from fastalign.hf_weights import CheckpointReader

        load_sharded_weights(model, CheckpointReader(path), prefix=prefix)
        return
    state = get_model_state_dict(model)
    safe_dcp.load({"model": state}, path)  # the model's shards only: no optimizer state is read
    set_model_state_dict(model, state)
