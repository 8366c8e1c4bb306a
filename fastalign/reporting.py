"""`--report_to` integrations: TensorBoard and Weights & Biases, beside metrics.jsonl.

Each reporter receives the same records metrics.jsonl gets (a dict with "step" and numbers); rank 0
only. Both are optional installs (`pip install 'fastalign[tensorboard]'` / `'fastalign[wandb]'`):
naming one that is not installed is an error at start-up; `all` means the installed ones.

wandb runs online only when it can: WANDB_MODE unset, a login (WANDB_API_KEY or a ~/.netrc entry
for api.wandb.ai) and api.wandb.ai reachable. Otherwise it runs offline (no prompt, no hang),
writing under output_dir/wandb for a later `wandb sync`.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import netrc
import os
import socket
from pathlib import Path

from fastalign.errors import ConfigError

log = logging.getLogger("fastalign.train")

INTEGRATIONS = ("tensorboard", "wandb")
REPORT_TO_VALUES = ("none", "all") + INTEGRATIONS
WANDB_HOST = "api.wandb.ai"


def installed(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def parse_report_to(values: list[str]) -> list[str]:
    """HF's --report_to: values space- or comma-separated -> the integrations to use.

    `none` alone means none; `all` means every installed integration; a named integration that
    is not installed is a ConfigError saying which extra installs it.
    """
    words = [w.strip().lower() for value in values for w in value.split(",") if w.strip()]
    unknown = [w for w in words if w not in REPORT_TO_VALUES]
    if unknown:
        raise ConfigError(f"--report_to: unknown value {unknown[0]!r} (expected some of: "
                          f"{', '.join(REPORT_TO_VALUES)})")
    if "none" in words and len(set(words)) > 1:
        raise ConfigError("--report_to: 'none' cannot be combined with other values")
    if "all" in words:
        return [name for name in INTEGRATIONS if installed(name)]
    chosen = [name for name in INTEGRATIONS if name in words]
    for name in chosen:
        if not installed(name):
            raise ConfigError(f"--report_to {name}: {name} is not installed; "
                              f"pip install 'fastalign[{name}]' (or leave {name} out of --report_to)")
    return chosen


class TensorBoardReporter:
    """Scalars under train/<key> and eval/<key>; the run's flags as text ("args")."""

    def __init__(self, logging_dir: Path, run_name: str, config: dict):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(logging_dir))
        self.writer.add_text("args", json.dumps({"run_name": run_name, **config}, indent=1, default=str))
        log.info("TensorBoard logs in %s (tensorboard --logdir %s)", logging_dir, logging_dir)

    def write(self, record: dict) -> None:
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                tag = f"eval/{key[5:]}" if key.startswith("eval_") else f"train/{key}"
                self.writer.add_scalar(tag, value, record["step"])
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def wandb_can_go_online(timeout_s: float = 2.0) -> bool:
    """A login is configured and the wandb server answers on its port."""
    if not os.environ.get("WANDB_API_KEY"):
        try:
            if netrc.netrc().authenticators(WANDB_HOST) is None:
                return False
        except (OSError, netrc.NetrcParseError):
            return False
    try:
        socket.create_connection((WANDB_HOST, 443), timeout=timeout_s).close()
    except OSError:
        return False
    return True


class WandbReporter:
    """One wandb run named --run_name, config = the run's flags; train/<key>, eval/<key>."""

    def __init__(self, output_dir: Path, run_name: str, config: dict):
        import wandb

        mode = os.environ.get("WANDB_MODE") or ("online" if wandb_can_go_online() else "offline")
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "fastalign"), name=run_name,
                              config=config, dir=str(output_dir), mode=mode)
        if mode == "offline":
            log.info("wandb: offline (no login or no network); the run is in %s/wandb: upload it "
                     "later with `wandb sync %s/wandb/offline-run-*`", output_dir, output_dir)

    def write(self, record: dict) -> None:
        values = {(f"eval/{k[5:]}" if k.startswith("eval_") else f"train/{k}"): v
                  for k, v in record.items() if k != "step" and v is not None}
        self.run.log(values, step=record["step"])

    def close(self) -> None:
        self.run.finish()


def open_reporters(names: list[str], *, output_dir: Path, logging_dir: Path, run_name: str,
                   config: dict) -> list:
    reporters = []
    if "tensorboard" in names:
        reporters.append(TensorBoardReporter(logging_dir, run_name, config))
    if "wandb" in names:
        reporters.append(WandbReporter(output_dir, run_name, config))
    return reporters
