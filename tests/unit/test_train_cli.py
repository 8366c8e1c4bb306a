"""The command line: the original train_alignment.py flags, fastalign's own, errors, LR schedules."""

import re
import shlex
from dataclasses import fields

import pytest

from fastalign.config import TrainConfig, build_parser, interval, parse_args
from fastalign.optim import lr_lambda_for, warmup_steps_for

# The README's command line of the released model, minus `torchrun ... train_alignment.py`.
ORIGINAL = """
    --model_name_or_path /workspace/hhh-sft --data_path /workspace/sandbox_v1.json --bf16 True
    --output_dir /workspace/output_lm --num_train_epochs 2 --per_device_train_batch_size 1
    --per_device_eval_batch_size 1 --gradient_accumulation_steps 8 --evaluation_strategy "no"
    --save_strategy "steps" --save_steps 200 --save_total_limit 1 --learning_rate 2e-5
    --weight_decay 0. --warmup_ratio 0.03 --lr_scheduler_type "cosine" --logging_steps 1
    --fsdp "full_shard auto_wrap" --fsdp_transformer_layer_cls_to_wrap 'LlamaDecoderLayer'
    --tf32 True --model_max_length 480 --rating_scale 7 --margin 1 --max_flow False --ratio 0.2
    --num_comp 3
"""
REQUIRED = ["--model_name_or_path", "m", "--data_path", "d", "--output_dir", "o"]



def test_every_flag_is_a_typed_field_of_the_config():
    dests = [a.dest for a in build_parser()._actions if a.dest != "help"]
    assert [f.name for f in fields(TrainConfig)] == dests
    config = parse_args(REQUIRED)
    assert isinstance(config, TrainConfig) and list(vars(config)) == dests  # trainer_state's "args"

def test_original_command_line_parses_with_its_meaning():
    args = parse_args(shlex.split(ORIGINAL))
    assert args.bf16 is True and args.tf32 is True and args.max_flow is False
    assert args.num_train_epochs == 2 and args.per_device_train_batch_size == 1
    assert args.gradient_accumulation_steps == 8 and args.evaluation_strategy == "no"
    assert args.save_strategy == "steps" and args.save_steps == 200 and args.save_total_limit == 1
    assert args.learning_rate == 2e-5 and args.weight_decay == 0.0 and args.warmup_ratio == 0.03
    assert args.lr_scheduler_type == "cosine" and args.logging_steps == 1
    assert args.fsdp == "full_shard auto_wrap" and args.model_max_length == 480
    assert (args.rating_scale, args.margin, args.ratio, args.num_comp) == (7, 1, 0.2, 3)


def test_objective_defaults_are_the_original_scripts():
    # train_alignment.py's dataclass defaults: a flag left out means what it meant there.
    args = parse_args(REQUIRED)
    assert (args.rating_scale, args.margin, args.max_flow, args.ratio) == (7, 1.0, False, 0.5)
    assert (args.num_comp, args.model_max_length) == (3, 512)


def test_every_flag_is_documented_in_help():
    text = build_parser().format_help()
    flags = [a.option_strings[0] for a in build_parser()._actions if a.option_strings and a.help]
    originals = [w for w in shlex.split(ORIGINAL) if w.startswith("--")]
    own = ["--seed", "--max_steps", "--max_tokens_per_batch", "--gradient_checkpointing", "--compile",
           "--attn_implementation", "--margin_mode", "--skip_invalid", "--resume_from_checkpoint",
           "--max_grad_norm", "--warmup_steps", "--report_to", "--eval_data_path", "--stop_response",
           "--no_append_eos", "--loss_backend", "--eval_steps", "--overwrite_output_dir", "--optim",
           "--cache_dir"]
    for flag in originals + own:
        assert flag in flags and flag in text, flag


@pytest.mark.parametrize("text,value", [("True", True), ("false", False), ("1", True), ("0", False), ("yes", True)])
def test_boolean_values(text, value):
    assert parse_args(REQUIRED + ["--bf16", text]).bf16 is value


def test_bare_boolean_flag_means_true():
    args = parse_args(REQUIRED + ["--gradient_checkpointing", "--seed", "3"])
    assert args.gradient_checkpointing is True and args.seed == 3


@pytest.mark.parametrize("argv,needle", [
    (["--bogus_flag", "1"], "--bogus_flag"),
    (["--bf16", "maybe"], "--bf16"),
    (["--save_steps", "0"], "--save_steps"),
    (["--learning_rate", "fast"], "--learning_rate"),
    (["--lr_scheduler_type", "polynomial"], "--lr_scheduler_type"),
    (["--fsdp", "full_shard autowrap"], "--fsdp"),
    (["--fsdp", "full_shard shard_grad_op"], "--fsdp"),
    (["--warmup_ratio", "1.5"], "--warmup_ratio"),
    (["--max_steps", "0"], "--max_steps"),
    (["--evaluation_strategy", "steps"], "--eval_data_path"),
    (["--fsdp_transformer_layer_cls_to_wrap", "GPT2Block"], "--fsdp_transformer_layer_cls_to_wrap"),
    (["--per_device_train_batch_size", "-1"], "--per_device_train_batch_size"),
    (["--bf1", "True"], "--bf1"),  # no abbreviations: a typo is not silently another flag
])
def test_bad_flags_exit_2_naming_the_flag(argv, needle, capsys):
    with pytest.raises(SystemExit) as exc:
        parse_args(REQUIRED + argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err


def test_missing_required_flag_is_named(capsys):
    with pytest.raises(SystemExit):
        parse_args(["--data_path", "d", "--output_dir", "o"])
    assert "--model_name_or_path" in capsys.readouterr().err


def test_intervals_accept_fractions_of_total_steps():
    assert interval(200, 1000) == 200
    assert interval(0.1, 95) == 10
    assert interval(None, 10) == 0


@pytest.mark.parametrize("kind", ["linear", "cosine", "constant", "constant_with_warmup"])
def test_lr_schedules_match_transformers(kind):
    import torch
    from transformers import get_scheduler

    total, warmup = 37, 4
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=1.0)
    reference = get_scheduler(kind, optimizer, num_warmup_steps=warmup, num_training_steps=total)
    ours = lr_lambda_for(kind, warmup, total)
    for step in range(total):
        assert ours(step) == pytest.approx(reference.get_last_lr()[0], abs=1e-12), step
        optimizer.step()
        reference.step()


def test_warmup_steps_override_ratio():
    args = parse_args(REQUIRED + ["--warmup_ratio", "0.03"])
    assert warmup_steps_for(args, 1000) == 30  # HF: ceil(ratio * total)
    args = parse_args(REQUIRED + ["--warmup_ratio", "0.03", "--warmup_steps", "5"])
    assert warmup_steps_for(args, 1000) == 5


def test_tf32_defaults_off_as_hf():
    assert parse_args(REQUIRED).tf32 is False
    assert parse_args(REQUIRED + ["--tf32", "True"]).tf32 is True


def test_original_scripts_optim_and_cache_dir_are_accepted():
    args = parse_args(REQUIRED + ["--optim", "adamw_torch_fused", "--cache_dir", "/tmp/hf-cache"])
    assert args.optim == "adamw_torch_fused" and args.cache_dir == "/tmp/hf-cache"
    assert parse_args(REQUIRED).optim == "adamw_torch"
    assert parse_args(REQUIRED + ["--overwrite_output_dir"]).overwrite_output_dir is True
    assert parse_args(REQUIRED).overwrite_output_dir is False


def test_other_optimizers_are_refused_naming_the_supported_ones(capsys):
    with pytest.raises(SystemExit) as exc:
        parse_args(REQUIRED + ["--optim", "adafactor"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "--optim" in err and "adafactor" in err and "adamw_torch, adamw_torch_fused" in err


def test_overwrite_and_resume_together_are_refused(capsys):
    with pytest.raises(SystemExit):
        parse_args(REQUIRED + ["--overwrite_output_dir", "True", "--resume_from_checkpoint", "auto"])
    err = capsys.readouterr().err
    assert "--overwrite_output_dir" in err and "--resume_from_checkpoint" in err


def test_training_guide_flag_tables_list_every_accepted_flag():
    from pathlib import Path

    guide = (Path(__file__).resolve().parents[2] / "docs" / "training.md").read_text()
    flags = guide.split("\n## Flags\n", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in flags.splitlines() if line.startswith("| `--")]
    listed = set(re.findall(r"`(--[a-z0-9_-]+)", "\n".join(rows)))
    accepted = {option for action in build_parser()._actions for option in action.option_strings
                if option.startswith("--") and option != "--help"}
    assert accepted - listed == set()
    assert listed - accepted == set()  # no row for a flag that does not exist


def test_the_trainer_logs_evaluates_and_saves_at_the_steps_the_flags_name():
    from fastalign.trainer import Trainer

    config = parse_args([*REQUIRED, "--logging_steps", "3", "--logging_first_step", "True", "--eval_steps", "2",
                         "--evaluation_strategy", "steps", "--eval_data_path", "e", "--save_strategy", "epoch"])
    trainer = Trainer(config, env=None)  # the decisions read the intervals setup() computes, not the process group
    trainer.total_steps, trainer.logging_steps, trainer.eval_steps, trainer.save_steps = 10, 3, 2, 500
    trainer.eval_batcher = object()
    assert [s for s in range(1, 11) if trainer.should_log(s)] == [1, 3, 6, 9, 10]
    assert [s for s in range(1, 11) if trainer.should_evaluate(s, epoch_done=False)] == [2, 4, 6, 8, 10]
    assert not trainer.should_save(500, epoch_done=False) and trainer.should_save(7, epoch_done=True)
    trainer.eval_batcher = None  # no eval data: never
    assert not any(trainer.should_evaluate(s, epoch_done=True) for s in range(1, 11))
