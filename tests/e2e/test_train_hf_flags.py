"""HF Trainer flags through the trainer's command line: each value reaches the optimizer, the
logger or the checkpoint; refusals name the flag; log lines never glue onto the progress bar; the
tokens/s window leaves evaluation and checkpoint time out.

The bar needs a terminal: that run is `python -m fastalign.train` on a pseudo-terminal. The others
run the same `main` in a process forked from this one or in this process (helpers/training.py).
"""

from __future__ import annotations

import glob
import json
import re
from pathlib import Path

import pytest
import torch
from helpers.background import Pending
from helpers.train_probes import FAKE_PEAK_FLOPS, run_probed_train
from helpers.training import common, metrics, ok, run_train_on_terminal, train_in_process, train_ranks
from helpers.wandb_offline import wandb_records

from fastalign.reporting import installed

pytestmark = pytest.mark.slow


def bar_free(stderr: str) -> None:
    """Every log line and error starts its own terminal line: split where the terminal would
    (newline, and carriage return, which tqdm redraws after), each piece holding a log line or
    an error must start with it."""
    for piece in re.split(r"[\r\n]", stderr):
        for marker in ("[fastalign ", "error:"):
            if marker in piece:
                assert piece.lstrip().startswith(marker), repr(piece)


# ------------------------------------------------------------------------------ runs started first


@pytest.fixture(scope="module", autouse=True)
def started(tiny, tmp_path_factory):
    """Runs started before the module's others, each in a process forked from this one and
    collected by its tests, so that they go on beside the rest: the trainer's main with probes
    (helpers/train_probes.py), most of whose time is the probes' sleeps, and `python -m
    fastalign.train` on a terminal, most of whose time is its interpreter's imports."""
    model, data = tiny
    probed = tmp_path_factory.mktemp("probed") / "out"
    flags = common(model, data, probed, max_steps=5, save_strategy="steps", save_steps=2,
                   evaluation_strategy="steps", eval_steps=3, eval_data_path=data,
                   per_device_train_batch_size=4, per_device_eval_batch_size=8,
                   adam_beta1=0.8, adam_beta2=0.95, adam_epsilon=1e-6, ddp_timeout=77)
    flags += ["--local-rank=0"]  # torch.distributed.launch's spelling
    diverging = common(model, data, tmp_path_factory.mktemp("terminal") / "out", max_steps=6,
                       per_device_train_batch_size=4, max_grad_norm=0, learning_rate=1e30, logging_steps=1)
    runs = {"probed": Pending(run_probed_train, flags), "terminal": Pending(run_train_on_terminal, diverging)}
    yield probed, runs
    for pending in runs.values():
        pending.close()


# ------------------------------------------------------------------------------ logger, checkpoint


@pytest.fixture(scope="module")
def model_only_run(tiny, tmp_path_factory):
    """One run carrying most flags at once (keeps the suite fast)."""
    model, data = tiny
    out = tmp_path_factory.mktemp("hf") / "out"
    report = [name for name in ("tensorboard", "wandb") if installed(name)]
    flags = common(model, data, out, max_steps=4, logging_steps=3, save_strategy="steps", save_steps=2,
                   save_total_limit=1, per_device_train_batch_size=4, model_max_length=300,
                   run_name="my-run", logging_dir=out / "tb", dataloader_num_workers=2, eval_data_path=data)
    flags += ["--logging_first_step", "--save_only_model", "True", "--disable_tqdm", "True",
              "--report_to", *(report or ["none"])]  # space-separated, as HF takes it too
    # WANDB_MODE: what no network resolves to; never try the network in tests. A forked process
    # (helpers/forked.py): wandb wraps the process's stdio and starts a service, never in the test's.
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("WANDB_MODE", "offline")
        result = ok(train_ranks(flags, nproc=1))
    return out, result, report


def test_logging_first_step_and_start_up_warnings(model_only_run):
    out, result, _ = model_only_run
    assert [m["step"] for m in metrics(out)] == [1, 3, 4]
    err = result.stderr
    assert "--eval_data_path" in err and "is unused" in err
    assert "--model_max_length 300 is above the model's max_position_embeddings (256)" in err
    assert "--dataloader_num_workers 2: ignored" in err
    assert "train:" not in err and "step/s" not in err  # --disable_tqdm: no bar at all
    bar_free(err)


def test_save_only_model_writes_loadable_model_checkpoints_that_cannot_resume(model_only_run, tiny):
    from transformers import AutoModelForCausalLM

    out, _, _ = model_only_run
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-4"]  # limit 1: 2 rotated
    checkpoint = out / "checkpoint-4"
    assert not (checkpoint / ".metadata").exists()  # no optimizer / DCP shards
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    assert state["save_only_model"] is True and state["step"] == 4
    final = AutoModelForCausalLM.from_pretrained(out)
    at_4 = AutoModelForCausalLM.from_pretrained(checkpoint)  # the last step's weights = the final model's
    for (name, a), (_, b) in zip(final.state_dict().items(), at_4.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)

    model, data = tiny
    again = train_in_process(common(model, data, out, max_steps=6) + ["--resume_from_checkpoint", str(checkpoint)])
    assert again.returncode == 2 and "Traceback" not in again.stderr
    assert "--save_only_model" in again.stderr and "cannot resume" in again.stderr
    # `auto` (a job script's relaunch) must not start fresh over the run: that would replace its
    # metrics and, step by step, its checkpoints.
    before = {p: p.read_bytes() for p in [out / "metrics.jsonl", *(f for f in checkpoint.iterdir() if f.is_file())]}
    relaunched = train_in_process(common(model, data, out, max_steps=6, resume_from_checkpoint="auto"))
    assert relaunched.returncode == 2 and "Traceback" not in relaunched.stderr
    assert "only --save_only_model checkpoints (checkpoint-4)" in relaunched.stderr
    assert f"--model_name_or_path {checkpoint}" in relaunched.stderr
    assert {p: p.read_bytes() for p in before} == before


@pytest.mark.skipif(not installed("tensorboard"), reason="tensorboard not installed")
def test_tensorboard_scalars_in_logging_dir_equal_metrics(model_only_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, _, _ = model_only_run
    events = EventAccumulator(str(out / "tb"), size_guidance={"tensors": 0, "scalars": 0})
    events.Reload()
    logged = metrics(out)
    loss = events.Scalars("train/loss")
    assert [e.step for e in loss] == [m["step"] for m in logged]
    assert [e.value for e in loss] == pytest.approx([m["loss"] for m in logged], rel=1e-6)
    args_text = events.Tensors("args/text_summary")[0].tensor_proto.string_val[0].decode()
    assert '"run_name": "my-run"' in args_text


@pytest.mark.skipif(not installed("wandb"), reason="wandb not installed")
def test_wandb_offline_run_holds_run_name_config_and_metrics(model_only_run):
    out, _, _ = model_only_run
    runs = glob.glob(str(out / "wandb" / "offline-run-*" / "*.wandb"))
    assert len(runs) == 1
    records = list(wandb_records(Path(runs[0])))
    run = next(r.run for r in records if r.WhichOneof("record_type") == "run")
    assert run.display_name == "my-run"
    config = {item.key: json.loads(item.value_json) for item in run.config.update}
    assert config["logging_first_step"] is True and config["run_name"] == "my-run"
    history = [r.history for r in records if r.WhichOneof("record_type") == "history"]
    assert [h.step.num for h in history] == [1, 3, 4]
    history = [{item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in h.item}
               for h in history]  # "train/loss" may be stored as the nested key ("train", "loss")
    assert [h["train/loss"] for h in history] == pytest.approx([m["loss"] for m in metrics(out)])


def test_report_to_names_integrations_as_hf(tmp_path):
    from fastalign.errors import ConfigError
    from fastalign.reporting import parse_report_to

    both = [n for n in ("tensorboard", "wandb") if installed(n)]
    assert parse_report_to(["none"]) == []
    assert parse_report_to(["all"]) == both
    if len(both) == 2:
        assert parse_report_to(["tensorboard", "wandb"]) == parse_report_to(["wandb,tensorboard"]) == both
    for bad, needle in ((["none,wandb"], "'none'"), (["comet"], "'comet'")):
        with pytest.raises(ConfigError, match=needle):
            parse_report_to(bad)


@pytest.mark.skipif(not installed("wandb"), reason="wandb not installed")
def test_wandb_goes_offline_without_a_login_or_a_network(tmp_path, monkeypatch):
    # The choice made when WANDB_MODE is not set: online only with a login and a reachable server.
    import socket

    import wandb

    from fastalign import reporting

    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc: no login
    monkeypatch.setattr(socket, "create_connection", lambda *a, **k: pytest.fail("no login: no network try"))
    assert reporting.wandb_can_go_online() is False
    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)

    def unreachable(*args, **kwargs):
        raise OSError("Network is unreachable")

    monkeypatch.setattr(socket, "create_connection", unreachable)
    assert reporting.wandb_can_go_online() is False
    modes = []
    monkeypatch.setattr(wandb, "init", lambda **kwargs: modes.append(kwargs["mode"]))
    reporting.WandbReporter(tmp_path, "r", {})
    assert modes == ["offline"]

    class Answered:
        def close(self):
            pass

    monkeypatch.setattr(socket, "create_connection", lambda *a, **k: Answered())
    assert reporting.wandb_can_go_online() is True
    reporting.WandbReporter(tmp_path, "r", {})
    assert modes == ["offline", "online"]


# ------------------------------------------------------------------------------ optimizer, process group, window

@pytest.fixture(scope="module")
def probed_run(started):
    out, runs = started
    result, probes = runs["probed"].result()
    return out, result, probes


def test_adam_flags_reach_the_optimizer(probed_run, tmp_path):
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    out, _, _ = probed_run
    flat = tmp_path / "ckpt.pt"
    dcp_to_torch_save(out / "checkpoint-4", flat)
    groups = torch.load(flat, weights_only=True)["optimizer"]["param_groups"]
    for group in groups.values() if isinstance(groups, dict) else groups:
        assert tuple(group["betas"]) == (0.8, 0.95) and group["eps"] == 1e-6


def test_ddp_timeout_and_local_rank_reach_the_process_group(probed_run):
    _, _, probes = probed_run
    assert probes == {"timeout_s": 77.0, "LOCAL_RANK": "0"}


def test_tokens_per_s_leaves_out_evaluation_and_checkpoint_time(probed_run):
    out, _, _ = probed_run
    lines = metrics(out)
    rates = {m["step"]: m["tokens_per_s"] for m in lines if "tokens_per_s" in m}
    assert sorted(rates) == [1, 2, 3, 4, 5] and [m["step"] for m in lines if "eval_loss" in m] == [3]
    # A tiny step takes ~10-50 ms; the windows of steps 3, 4 and 5 (after the save at 2, the eval
    # at 3, the save at 4) each held a SLOW_S (1.5 s) pause; steps 1 and 2 none. Counted in, the pauses
    # would put those rates ~20-100x below the clean ones (measured: ~600 vs >= 10000 tokens/s).
    clean = min(rates[1], rates[2])
    for step in (3, 4, 5):
        assert rates[step] > clean / 8, rates


def test_mfu_counts_the_flops_of_computed_tokens_only(probed_run, tiny):
    # With the shared prefix the layers run fewer positions (computed_tokens) than the unshared
    # layout counts (sequence_tokens, what tokens_per_s reports); MFU must count the former.
    from fastalign.hf_config import LlamaConfig

    out, _, _ = probed_run
    config = LlamaConfig.from_pretrained(tiny[0])
    per_token, longest = config.flops_per_token(0), config.flops_per_token(128)  # model_max_length 128
    lines = [m for m in metrics(out) if "tokens_per_s" in m]
    assert lines
    for m in lines:
        elapsed = m["sequence_tokens"] / m["tokens_per_s"]
        flops = m["mfu"] * FAKE_PEAK_FLOPS * elapsed  # what the trainer counted for the window
        assert per_token * m["computed_tokens"] <= flops * 1.01, m
        assert flops <= longest * m["computed_tokens"] * 1.01, m
        assert flops < per_token * m["sequence_tokens"], m  # sequence tokens would count more


def test_log_lines_start_their_own_line_beside_the_bar(probed_run):
    _, result, _ = probed_run
    err = result.stderr
    # stderr captured (not a terminal): no bar, the log lines only
    assert "train:" not in err and "saved " in err and "step=3/5 epoch=" in err
    bar_free(err)


def test_an_error_starts_its_own_line_after_the_bar(started):
    status, terminal = started[1]["terminal"].result()  # 6 steps at learning rate 1e30, on a terminal
    assert status == 2 and "NaN" in terminal
    assert "train:" in terminal and "step=1/6 epoch=" in terminal  # the bar and a log line above it
    bar_free(terminal)


# ------------------------------------------------------------------------------ refusals


@pytest.mark.parametrize("flags,needles", [
    (["--fp16", "True"], ["--fp16", "--bf16 True"]),
    (["--push_to_hub", "True"], ["--push_to_hub", "huggingface-cli upload"]),
    (["--adam_beta2", "1"], ["--adam_beta2: must be < 1"]),
])
def test_hf_flags_fastalign_does_not_do_are_refused(tmp_path, flags, needles, capsys):
    # the command's own entry (python -m fastalign.train = run_main(main)), in-process: the flags
    # are refused before any process group, tokenizer or model exists
    from fastalign.cli import run_main
    from fastalign.train import main

    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exited:
        run_main(main, ["--model_name_or_path", "m", "--data_path", "d", "--output_dir", str(out), *flags])
    err = capsys.readouterr().err
    assert exited.value.code == 2 and "Traceback" not in err
    for needle in needles:
        assert needle in err
    if "--push_to_hub" in flags:
        assert str(out) in err  # names the directory to upload


def test_triton_loss_backend_where_it_cannot_run_is_refused_at_start(tiny, tmp_path, monkeypatch):
    model, data = tiny
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # read when the backend is chosen, not only at import
    result = train_in_process(common(model, data, tmp_path / "out", loss_backend="triton"))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "error: --loss_backend triton" in result.stderr
    assert "train:" not in result.stderr and not (tmp_path / "out" / "metrics.jsonl").exists()
