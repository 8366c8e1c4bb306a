"""What a run reads survives what it deletes: no cleanup, overwrite, rotation, lineage move or
export in --output_dir may remove or move the model (and its tokenizer) or a data file.

Why: a model directory may well lie inside the output directory (a --save_only_model checkpoint
of the same run, which docs/training.md suggests starting from), and `--overwrite_output_dir True`
would delete it, then fail with an unrelated tokenizer message. Every destructive step is checked
before it starts: anything it would delete or move that holds (or is) an input is refused with a
ConfigError naming both paths, and nothing is deleted. Paths are compared resolved (symlinks,
`..`, relative to the working directory).

The trainer reads the tokenizer from --model_name_or_path (and the export copies it from there),
so protecting the model directory protects the tokenizer.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch.distributed as dist

from fastalign import checkpoint as ckpt
from fastalign.distributed import broadcast_object
from fastalign.errors import ConfigError

if TYPE_CHECKING:
    from fastalign.config import TrainConfig


@dataclass(frozen=True)
class RunInput:
    """One path the run reads: the flag that names it, as given and resolved."""

    flag: str
    given: str
    resolved: Path

    def lies_in(self, target: Path) -> bool:
        """Whether deleting or moving `target` would take this input with it."""
        target = target.resolve()
        return self.resolved == target or target in self.resolved.parents


class RunInputs:
    """The model directory and data files of a run."""

    def __init__(self, inputs: Iterable[RunInput]):
        self.inputs = tuple(inputs)

    @classmethod
    def from_config(cls, config: TrainConfig) -> RunInputs:
        named = [("--model_name_or_path", config.model_name_or_path), ("--data_path", config.data_path),
                 ("--eval_data_path", config.eval_data_path)]
        return cls(RunInput(flag, str(given), Path(given).resolve()) for flag, given in named if given)

    def refusal(self, targets: Iterable[Path], action: str) -> str | None:
        """The error message when `action` ("--overwrite_output_dir True would delete") applied
        to one of `targets` would take an input with it; None when none would."""
        for target in targets:
            for item in self.inputs:
                if item.lies_in(target):
                    resolved = "" if str(item.resolved) == item.given else f" ({item.resolved})"
                    return (f"{action} {target}, which holds {item.flag} {item.given}{resolved}. Nothing "
                            "was deleted or moved. Copy that input out of the directory first (and point "
                            f"{item.flag} at the copy), or choose another --output_dir")
        return None


def refuse_destroying_inputs(output_dir: str | os.PathLike, inputs: RunInputs, *, overwrite: bool,
                             save_total_limit: int | None, save_only_model: bool,
                             run_files: tuple[str, ...]) -> None:
    """Collective, at start, before anything in `output_dir` is deleted: every rank raises the
    same ConfigError when the start-up cleanup, --overwrite_output_dir, checkpoint rotation, the
    run's own files or the final export would delete or replace an input.

    Rotation may delete every checkpoint already there (it keeps the newest `save_total_limit`,
    and the run's own come later), so a limit with an input inside one is refused now rather than
    at the save that would delete it. The lineage move on resume is checked by
    `checkpoint.start_branch`, once the resumed step is known.
    """
    problem = None
    root = Path(output_dir)
    if dist.get_rank() == 0 and root.is_dir():
        checks = [(ckpt.partial_saves(root), "cleaning up what an interrupted save left would delete or move"),
                  ([root / name for name in run_files], "this run rewrites")]
        if overwrite:
            checks.append((ckpt.overwritten(root, run_files), "--overwrite_output_dir True would delete"))
        if save_total_limit:
            kept = ckpt.list_model_only_checkpoints(root) if save_only_model else ckpt.list_checkpoints(root)
            checks.append((kept, f"checkpoint rotation (--save_total_limit {save_total_limit}) would delete"))
        checks.append((export_targets(root), "the final model export would replace"))
        problem = next((p for targets, action in checks if (p := inputs.refusal(targets, action))), None)
    problem = broadcast_object(problem)
    if problem is not None:
        raise ConfigError(problem)


def export_targets(root: Path) -> list[Path]:
    """Files of `root` that the final export (Llama.save_pretrained into a non-empty directory)
    replaces or deletes: config, tokenizer and generation config, and every weight file."""
    from fastalign.hf_io import TOKENIZER_FILES
    from fastalign.hf_weights import WEIGHT_FILE_GLOBS

    names = ("config.json", "generation_config.json") + TOKENIZER_FILES
    return [root / name for name in names] + sorted(p for g in WEIGHT_FILE_GLOBS for p in root.glob(g))
