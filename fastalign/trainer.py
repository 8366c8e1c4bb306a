"""The Trainer: set-up (data, model, optimizer, resume) and the loop of optimizer steps, with its
logging, evaluation and checkpointing (docs/design.md)."""

from __future__ import annotations

import functools
import logging
import math
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor

from fastalign import best_model, resume_inputs
from fastalign import checkpoint as ckpt
from fastalign import distributed as fdist
from fastalign.alignment_model import (
    PREFIX,
    build_model,
    check_loss_backend,
    group_sums,
    loss_backend_name,
    loss_plan_for,
    run_batch,
    uses_fsdp,
)
from fastalign.config import TrainConfig, interval, step_token_budget
from fastalign.console import format_metrics_line
from fastalign.data.loading import load_groups
from fastalign.errors import FastalignError
from fastalign.metrics import METRICS_FILE, MetricsLog, PendingLog, Window, peak_flops, peak_memory_gb
from fastalign.optim import build_optimizer, lr_lambda_for, warmup_steps_for
from fastalign.preemption import StopOnSignal, Stopped
from fastalign.profiling import PAUSED, StepProfiler, region
from fastalign.run_inputs import RunInputs, refuse_destroying_inputs

if TYPE_CHECKING:
    from fastalign.data import GroupBatcher
    from fastalign.model import Llama

# fastalign.data, .evaluate, .model and tqdm are imported where used: `python -m fastalign.train --help`
# and a refused flag do not pay for them.

log = logging.getLogger("fastalign.train")


class Trainer:
    """One run: `setup()` (data, model, optimizer, resume), then `train()` (the loop, then the export)."""

    config: TrainConfig
    env: fdist.DistEnv
    output_dir: Path
    plan: fdist.FsdpPlan  # --fsdp parsed
    stop: StopOnSignal  # SIGTERM/SIGINT: finish the step, checkpoint, stop
    metrics: MetricsLog | None  # None until setup() opens it
    run_inputs: RunInputs  # the model and data paths, which no checkpoint rotation may delete
    # data
    batcher: GroupBatcher
    eval_batcher: GroupBatcher | None  # None without --evaluation_strategy
    eval_categories: dict[int, str | None]  # record index -> category (rank 0 only; empty elsewhere)
    input_digests: dict | None  # data and tokenizer digests recorded in checkpoints (resume_inputs)
    total_steps: int
    logging_steps: int
    save_steps: int
    eval_steps: int
    best: best_model.BestCheckpoint | None  # --load_best_model_at_end: the best checkpoint so far
    # model
    model: nn.Module  # AlignmentModel, FSDP2-wrapped when `uses_fsdp`
    llama: Llama  # the model's decoder (its config, lm_head)
    flops_per_token: float  # FLOPs of a sequence of length s: s * (flops_per_token + s * flops_per_token_x_len)
    flops_per_token_x_len: float
    peak_flops: float | None  # the GPU's dense bf16 FLOP/s for MFU; None on CPU or an unknown GPU
    # optimizer
    optimizer: torch.optim.AdamW
    lr_lambda: Callable[[int], float]  # the multiplier of the peak LR at a 0-based step
    scheduler: torch.optim.lr_scheduler.LambdaLR
    # the loop
    position: tuple[int, int, int]  # (global step, epoch, step in epoch) of the next step
    nonfinite: torch.Tensor  # bool [] on the device: a non-finite grad norm since the start
    profiler: StepProfiler

    def __init__(self, config: TrainConfig, env: fdist.DistEnv):
        self.config = config
        self.env = env
        self.output_dir = Path(config.output_dir)
        self.plan = fdist.parse_fsdp(config.fsdp)
        self.stop = StopOnSignal()  # main() installs it around train()
        self.metrics = None

    # -- setup ---------------------------------------------------------------------------------

    def setup(self) -> None:
        config, env = self.config, self.env
        torch.manual_seed(config.seed)
        if env.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = config.tf32
            torch.backends.cudnn.allow_tf32 = config.tf32
        check_loss_backend(config.loss_backend, env.device)
        self.run_inputs = RunInputs.from_config(config)
        refuse_destroying_inputs(self.output_dir, self.run_inputs, overwrite=config.overwrite_output_dir,
                                 save_total_limit=config.save_total_limit if config.save_strategy != "no" else None,
                                 save_only_model=config.save_only_model, run_files=(METRICS_FILE,))
        ckpt.prepare_output_dir(self.output_dir, fresh_start=config.resume_from_checkpoint is None,
                                overwrite=config.overwrite_output_dir, run_files=(METRICS_FILE,))
        if config.eval_data_path and config.evaluation_strategy == "no":
            log.warning("--eval_data_path %s is unused: evaluation runs only with "
                        "--evaluation_strategy steps|epoch", config.eval_data_path)
        if config.dataloader_num_workers:
            log.info("--dataloader_num_workers %d: ignored; batches are packed in this process from "
                     "token ids tokenized at start-up (no DataLoader workers needed)",
                     config.dataloader_num_workers)
        if config.save_only_model and config.save_strategy != "no":
            log.info("--save_only_model: checkpoints hold the model only (HF format) and cannot be "
                     "resumed with --resume_from_checkpoint")
        self._setup_data()
        self._setup_model()
        self._setup_optimizer()
        resume = self._setup_resume()
        self.metrics = MetricsLog(self.output_dir, env.is_main, config,
                                  self.position[0] if resume is not None else None)

    def _setup_data(self) -> None:
        """Tokenized train (and eval) groups, their batchers, the step counts and intervals."""
        from fastalign.data import GroupBatcher
        from fastalign.evaluate import record_categories
        from fastalign.model_dir import load_tokenizer

        config, env = self.config, self.env
        tokenizer = functools.cache(lambda: load_tokenizer(config.model_name_or_path))  # not needed on a cache hit
        train_data, summary = load_groups(config.data_path, tokenizer, config, "train", env)
        log.info("%s", summary)
        self.batcher = GroupBatcher(
            train_data, num_comp=config.num_comp, seed=config.seed, batch_size=config.per_device_train_batch_size,
            step_token_budget=step_token_budget(config.max_tokens_per_batch, env.device,
                                                batch_size=config.per_device_train_batch_size,
                                                num_comp=config.num_comp, model_max_length=config.model_max_length),
            gradient_accumulation_steps=config.gradient_accumulation_steps,
            world_size=env.world_size, rank=env.rank, shuffle=True, share_prefix=config.share_prefix,
            seed_compat=config.margin_mode == "seed")  # the original collator's order and int() scores
        self.input_digests = resume_inputs.recorded_inputs(config, self.batcher.step_token_budget, rank=env.rank,
                                                           broadcast=fdist.broadcast_object)
        self.eval_batcher = None
        self.eval_categories = {}
        if config.evaluation_strategy != "no":
            eval_data, summary = load_groups(config.eval_data_path, tokenizer, config, "eval", env)
            log.info("%s", summary)
            self.eval_batcher = GroupBatcher(
                eval_data, num_comp=config.num_comp, seed=config.seed,
                batch_size=config.per_device_eval_batch_size, gradient_accumulation_steps=1,
                world_size=env.world_size, rank=env.rank, shuffle=False, share_prefix=config.share_prefix,
                seed_compat=config.margin_mode == "seed")
            self.eval_categories = (record_categories(config.eval_data_path, rating_scale=config.rating_scale,
                                                      skip_invalid=config.skip_invalid) if env.is_main else {})

        self.total_steps = self._total_steps()
        self.logging_steps = interval(config.logging_steps, self.total_steps)
        self.save_steps = interval(config.save_steps, self.total_steps)
        self.eval_steps = interval(config.eval_steps, self.total_steps) or self.logging_steps
        self.best = None  # --load_best_model_at_end: the best checkpoint so far
        if config.load_best_model_at_end:
            best_model.check_intervals(self.save_steps, self.eval_steps, config.save_strategy)
            self.best = best_model.BestCheckpoint(config.metric_for_best_model, config.greater_is_better)

    def _setup_model(self) -> None:
        """The sharded model with its weights loaded, and what MFU counts."""
        config, env = self.config, self.env
        self.model, self.llama, attn_backend = build_model(config, env, self.plan)
        llama_config = self.llama.config
        # FLOPs of a sequence of length s: s * flops_per_token(s), linear in s, so a micro-batch
        # needs only sum(s) and sum(s^2). Counted on the unsharded model.
        self.flops_per_token = llama_config.flops_per_token(0)
        self.flops_per_token_x_len = llama_config.flops_per_token(1) - llama_config.flops_per_token(0)
        self.peak_flops = peak_flops(env.device)
        log.info(
            "world size %d (%s on %s), fsdp %s%s, %s parameters, dtype: fp32 master weights, %s "
            "compute, fp32 gradient reduction, attention: %s, loss backend: %s, activation "
            "checkpointing %s, compile %s",
            env.world_size, env.backend, env.device.type,
            self.plan.strategy if uses_fsdp(config.bf16, env, self.plan) else "off (one fp32 process: plain module)",
            " + cpu offload" if self.plan.offload else "", f"{llama_config.num_parameters():,}",
            "bf16" if config.bf16 else "fp32", attn_backend,
            loss_backend_name(config.loss_backend, env.device),
            "on" if config.gradient_checkpointing else "off", "on" if config.compile else "off")
        if config.use_peft:
            from fastalign.lora import trainable_summary

            log.info("LoRA: %s on rank %d; frozen base in %s", trainable_summary(self.model), env.rank,
                     "bf16" if config.bf16 else "fp32")

    def _setup_optimizer(self) -> None:
        """AdamW and the LR schedule over the run's total steps."""
        config, env = self.config, self.env
        self.optimizer = build_optimizer(self.model, config)
        warmup = warmup_steps_for(config, self.total_steps)
        self.lr_lambda = lr_lambda_for(config.lr_scheduler_type, warmup, self.total_steps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self.lr_lambda)
        budget = self.batcher.step_token_budget
        log.info("%d optimizer steps (%d in epoch 0; %d groups x %d processes per step, %s), "
                 "warmup %d, %s schedule, logging every %d, %s", self.total_steps,
                 self.batcher.steps_per_epoch(0),
                 config.per_device_train_batch_size * config.gradient_accumulation_steps, env.world_size,
                 f"packed into micro-batches of <= {budget} tokens" if budget
                 else f"{config.gradient_accumulation_steps} micro-batches of "
                      f"{config.per_device_train_batch_size} groups",
                 warmup, config.lr_scheduler_type, self.logging_steps,
                 f"checkpoint every {self.save_steps} steps" if config.save_strategy == "steps"
                 else f"checkpoint {'each epoch' if config.save_strategy == 'epoch' else 'never'}")

    def _setup_resume(self) -> Path | None:
        """Load the checkpoint --resume_from_checkpoint names, if any; returns its path."""
        config = self.config
        self.position = (0, 0, 0)
        # Collective: every rank gets rank 0's pick (the newest checkpoint that verifies) or error.
        resume = ckpt.resolve_resume(config.resume_from_checkpoint, self.output_dir)
        if resume is not None:
            self._check_resumable(resume, ckpt.read_trainer_state(resume))
            state = ckpt.load_checkpoint(resume, self.model, self.optimizer, self.scheduler)
            ckpt.start_branch(self.output_dir, state["step"], resume, self.run_inputs)  # later ones: abandoned
            self.position = (state["step"], state["epoch"], state["step_in_epoch"])
            if state["step_in_epoch"] > self.batcher.steps_per_epoch(state["epoch"]):
                self.position = (state["step"], state["epoch"] + 1, 0)  # changed data, shorter epoch
            if self.best is not None:
                self.best.restore(state.get(best_model.STATE_KEY))
            planned = state.get("total_steps", state.get("batch_layout", {}).get("total_steps"))
            if planned is not None and planned != self.total_steps:
                log.warning("resuming a run planned for %s steps as a run of %d steps: the LR "
                            "schedule from step %d on is computed for the new total",
                            planned, self.total_steps, state["step"])
            # The LR is a closed form of the step: recompute it for this run's total and this run's
            # --learning_rate / --weight_decay (the loaded param groups carry the checkpoint's, so
            # resuming with a lower learning rate after a divergence takes effect).
            decay_group, _ = self.optimizer.param_groups
            decay_group["weight_decay"] = config.weight_decay
            for group in self.optimizer.param_groups:
                group["initial_lr"] = config.learning_rate
            self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self.lr_lambda,
                                                               last_epoch=state["step"] - 1)
            log.info("resumed from %s at step %d (epoch %d, step %d of the epoch)", resume, *self.position)
        elif config.resume_from_checkpoint is not None:
            log.info("--resume_from_checkpoint %s: no checkpoint in %s, starting fresh",
                     config.resume_from_checkpoint, self.output_dir)
        return resume

    def _total_steps(self) -> int:
        """--max_steps, or HF's ceil(num_train_epochs x steps per epoch)."""
        if self.config.max_steps > 0:
            return self.config.max_steps
        epochs = self.config.num_train_epochs
        whole = int(epochs)
        total = sum(self.batcher.steps_per_epoch(e) for e in range(whole))
        total += math.ceil((epochs - whole) * self.batcher.steps_per_epoch(whole)) if epochs > whole else 0
        return max(1, total)

    def _batch_layout(self) -> dict:
        """What fixes the sequence of batches: a resumed run must match it exactly."""
        a = self.config
        return {"world_size": self.env.world_size, "gradient_accumulation_steps": a.gradient_accumulation_steps,
                "per_device_train_batch_size": a.per_device_train_batch_size,
                # not --max_tokens_per_batch / --share_prefix: they change how a step is computed,
                # not which groups it holds
                "num_comp": a.num_comp, "seed": a.seed,
                "steps_in_epoch_0": self.batcher.steps_per_epoch(0)}

    def _check_resumable(self, resume: Path, state: dict) -> None:
        """Refuse to continue on other batches than the checkpoint's (fastalign.resume_inputs)."""
        from fastalign.lora import check_resume_mode

        check_resume_mode(state.get("args", {}), self.config.use_peft, resume)
        for warning in resume_inputs.check(state, resume, layout=self._batch_layout(), inputs=self.input_digests,
                                           allow_data_change=self.config.allow_data_change):
            if self.env.is_main:
                log.warning("%s", warning)

    # -- the loop --------------------------------------------------------------------------------

    def should_log(self, step: int) -> bool:
        """A metrics line after optimizer step `step` (1-based): every --logging_steps, the last step,
        and the first with --logging_first_step."""
        return (step % self.logging_steps == 0 or step == self.total_steps
                or (self.config.logging_first_step and step == 1))

    def should_evaluate(self, step: int, *, epoch_done: bool) -> bool:
        """Evaluate after step `step`: every --eval_steps or at each epoch's end (--evaluation_strategy)."""
        strategy = self.config.evaluation_strategy
        return self.eval_batcher is not None and (
            (strategy == "steps" and step % self.eval_steps == 0) or (strategy == "epoch" and epoch_done))

    def should_save(self, step: int, *, epoch_done: bool) -> bool:
        """Checkpoint after step `step`: every --save_steps or at each epoch's end (--save_strategy)."""
        strategy = self.config.save_strategy
        return (strategy == "steps" and step % self.save_steps == 0) or (strategy == "epoch" and epoch_done)

    def train(self) -> None:
        from tqdm import tqdm

        step = self.position[0]
        # disable=None: no bar when stderr is not a terminal (a log file gets the log lines only)
        bar = tqdm(total=self.total_steps, initial=step, desc="train", unit="step", dynamic_ncols=True,
                   disable=True if not self.env.is_main or self.config.disable_tqdm else None)
        try:
            with StepProfiler(self.config.profile_steps, self.output_dir, self.env.rank) as self.profiler:
                step = self._loop(bar)
        finally:  # also on an error: the message that follows must not land on the bar's line
            bar.close()
        self._check_finite(self.nonfinite, step)
        if self.best is not None:
            best_model.load_for_export(self.best, self.output_dir, self.model, PREFIX, step)
        log.info("training done at step %d; writing the model to %s", step, self.output_dir)
        if self.config.use_peft:
            from fastalign import lora, peft_io

            peft_io.export_adapter(self.model, lora.LoraSettings.from_config(self.config), self.output_dir,
                                   self.config.model_name_or_path, prefix=PREFIX)
        else:
            ckpt.export_hf(self.model, self.llama.config, self.output_dir, self.config.model_name_or_path,
                           prefix=PREFIX)
        self.metrics.close()

    def _loop(self, bar) -> int:
        """The optimizer steps from self.position to the total; returns the last step's number."""
        env = self.env
        step, epoch, first = self.position
        window = Window.new(env.device)
        self.nonfinite = torch.zeros((), dtype=torch.bool, device=env.device)
        pending: PendingLog | None = None  # CUDA: a logging step's numbers, read one step later
        while step < self.total_steps:
            steps_in_epoch = self.batcher.steps_per_epoch(epoch)
            for opt_step in self.profiler.data(self.batcher.iter_steps(epoch, first)):
                if step >= self.total_steps:
                    break
                grad_norm = self._train_step(opt_step, window)
                self.nonfinite |= ~torch.isfinite(grad_norm)
                step += 1
                bar.update(1)
                done_in_epoch = opt_step.step_in_epoch + 1
                epoch_done = done_in_epoch == steps_in_epoch
                epoch_float = epoch + done_in_epoch / steps_in_epoch
                if self.should_log(step):
                    current = self._start_log(step, epoch_float, window, grad_norm, self.nonfinite)
                    window = Window.new(env.device)
                    if pending is not None:
                        self._finish_log(pending, bar)
                        pending = None
                    if current.ready is None:  # gloo on CPU: the numbers are on the host already
                        self._finish_log(current, bar)
                    else:
                        pending = current
                evaluate = self.should_evaluate(step, epoch_done=epoch_done)
                save = self.should_save(step, epoch_done=epoch_done)
                if pending is not None and (evaluate or save):  # they sync anyway; keep lines in order
                    self._finish_log(pending, bar)
                    pending = None
                paused = time.perf_counter()  # evaluation and saving are not training time
                next_position = (epoch + 1, 0) if epoch_done else (epoch, done_in_epoch)
                with region(PAUSED):
                    eval_record = self._evaluate(step, epoch_float) if evaluate else None
                    if save:
                        if self.best is not None and eval_record is not None:
                            self.best.offer(step, eval_record)
                        self._save(step, next_position, self.nonfinite)
                self.profiler.step()  # writing a finished profile is not training time either
                window.paused += time.perf_counter() - paused
                if signum := self.stop.requested():  # SIGTERM/SIGINT on any rank
                    if pending is not None:
                        self._finish_log(pending, bar)
                    self._stop_on_signal(signum, step, next_position, self.nonfinite, saved=save)
            epoch, first = epoch + 1, 0
        if pending is not None:
            self._finish_log(pending, bar)
        return step

    def _train_step(self, opt_step, window: Window) -> torch.Tensor:
        """Forward+backward every micro-batch, clip, update. Returns the (device) grad norm.

        Each micro-batch's loss (the mean over its groups) is scaled by its share of the global
        batch's groups, so the gradient is that of the mean over all groups of the step on all
        ranks. FSDP averages gradients over ranks; the world-size factor undoes that average.
        """
        env = self.env
        scale = env.world_size / opt_step.global_groups
        # All of the step's (small) index tensors are queued for the device up front, with the
        # loss's plan of each, made on the host: no micro-batch waits for the device before its
        # forward is queued.
        vocab = self.llama.config.vocab_size
        with region("data"):
            on_device = [b.to(env.device, non_blocking=True) for b in opt_step.micro_batches]
            plans = [loss_plan_for(b, vocab).to(env.device, non_blocking=True)
                     for b in opt_step.micro_batches]
        last = len(on_device) - 1  # the same on every rank: fillers keep the counts equal
        for index, (host_batch, batch, plan) in enumerate(zip(opt_step.micro_batches, on_device,
                                                               plans)):
            fdist.set_gradient_all_reduce(self.model, self.plan, enabled=index == last)
            if batch.num_groups:  # real tokens only: a filler batch's work is thrown away
                window.tokens += host_batch.sequence_tokens
                window.computed_tokens += host_batch.computed_tokens
                window.tokens_x_len += host_batch.attention_work
            try:
                with region("forward"):
                    out = run_batch(self.model, batch, plan)
                with region("backward"):
                    (out["loss"] * (batch.num_groups * scale)).backward()
            except torch.OutOfMemoryError as err:
                raise FastalignError(
                    f"out of memory on rank {env.rank} in a micro-batch of {batch.num_tokens} tokens: "
                    "lower --max_tokens_per_batch or --per_device_train_batch_size, or use "
                    "--gradient_checkpointing True or more processes. "
                    f"The last complete checkpoint in {self.output_dir} is intact.") from err
            if batch.num_groups:  # filler micro-batches (num_groups 0) only keep collectives matched
                window.device_sums += group_sums(out, batch.num_groups)
                window.groups += batch.num_groups
        with region("optimizer"):
            params = [p for p in self.model.parameters() if p.grad is not None]
            grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params])
            if isinstance(grad_norm, DTensor):
                grad_norm = grad_norm.full_tensor()
            if self.config.max_grad_norm > 0:
                torch.nn.utils.clip_grads_with_norm_(params, self.config.max_grad_norm, grad_norm)
            window.lr = self.scheduler.get_last_lr()[0]
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
        return grad_norm.to(env.device, non_blocking=True)  # CPU-offloaded grads: norm on the host

    def _start_log(self, step: int, epoch: float, window: Window, grad_norm: torch.Tensor,
                   nonfinite: torch.Tensor) -> PendingLog:
        """Reduce the window's statistics over ranks in one collective and start their copy to the
        host. On CUDA nothing here waits for the device: `_finish_log` reads the numbers after the
        next step has been queued, so logging (even every step) leaves no bubble on the GPU."""
        env = self.env
        memory = [0.0] * env.world_size  # each rank fills its own slot: the sum gathers them
        memory[env.rank] = peak_memory_gb(env.device)
        host = torch.tensor([window.groups, window.tokens, window.computed_tokens, window.tokens_x_len, *memory],
                            dtype=torch.float64, device=env.device)
        sums = torch.cat([window.device_sums, grad_norm.double().view(1) / env.world_size,
                          nonfinite.double().view(1), host])
        dist.all_reduce(sums)  # NCCL: queued on the stream, the host goes on
        ready = None
        if env.device.type == "cuda":
            sums = sums.to("cpu", non_blocking=True)  # into pinned memory
            ready = torch.cuda.Event()
            ready.record()
        return PendingLog(step=step, epoch=epoch, lr=window.lr,
                          elapsed=window.training_seconds(), values=sums, ready=ready)

    def _finish_log(self, pending: PendingLog, bar) -> None:
        """Write the metrics line of a logging step; NaN/inf stops the run."""
        if pending.ready is not None:
            pending.ready.synchronize()
        values = pending.values.tolist()
        loss, nll_best, penalty, active, grad_norm, bad, groups, tokens, computed, tokens_x_len = values[:10]
        if bad or not math.isfinite(loss):
            self._fail_nonfinite(pending.step)
        tokens_per_s = tokens / pending.elapsed if pending.elapsed > 0 else 0.0
        mfu = None
        if self.peak_flops and computed:  # the FLOPs actually run: computed tokens, not sequence tokens
            flops = self.flops_per_token * computed + self.flops_per_token_x_len * tokens_x_len
            mfu = flops / pending.elapsed / (self.peak_flops * self.env.world_size)
        record = {
            "step": pending.step,
            "epoch": round(pending.epoch, 4),
            "loss": loss / groups,
            "nll_best": nll_best / groups,
            "penalty": penalty / groups,
            "penalty_active_frac": active / groups,
            "lr": pending.lr,
            "grad_norm": grad_norm,
            "tokens_per_s": round(tokens_per_s, 1),
            "sequence_tokens": int(tokens),
            "computed_tokens": int(computed),
            "mfu": mfu,
            "peak_mem_gb": round(max(values[10:]), 3),
        }
        self.metrics.write(record)
        log.info("%s", format_metrics_line(record, self.total_steps))
        bar.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{tokens_per_s:.0f}")

    def _check_finite(self, nonfinite: torch.Tensor, step: int) -> None:
        """Before a checkpoint or the export: stop if a logged loss / grad norm was non-finite or
        if the weights are (an update can overflow after a finite gradient), on any rank."""
        weights_bad = fdist.local_shards_nonfinite(self.model).to(self.env.device)
        flag = (nonfinite | weights_bad).double().view(1)
        dist.all_reduce(flag)
        if flag.item():
            self._fail_nonfinite(step)

    def _fail_nonfinite(self, step: int) -> None:
        last = ckpt.latest_checkpoint(self.output_dir)
        raise FastalignError(
            f"the loss, gradient norm or weights became NaN/inf by step {step}; stopped without saving. "
            + (f"The last good checkpoint is {last}." if last else "No checkpoint was written.")
            + " Try a lower --learning_rate or check the data and model weights.")

    @torch.no_grad()
    def _evaluate(self, step: int, epoch: float) -> dict:
        """eval_loss & co. and the ranking metrics of fastalign.evaluate, from one forward per
        micro-batch; written to the metrics and returned (the same on every rank)."""
        from fastalign.evaluate import ranking_record, score_batch

        env = self.env
        sums = torch.zeros(4, dtype=torch.float64, device=env.device)
        groups = 0
        scored = []  # (host batch, device nll [S]): read once, after the last forward is queued
        for opt_step in self.eval_batcher.iter_steps(0):
            for batch in opt_step.micro_batches:
                out = run_batch(self.model, batch.to(env.device))  # fillers too: collectives match
                if batch.num_groups:
                    sums += group_sums(out, batch.num_groups)
                    groups += batch.num_groups
                    scored.append((batch, out["nll"]))
        if isinstance(self.model, FSDPModule):
            self.model.reshard()  # the root stays gathered after a forward without backward
        sums = torch.cat([sums, torch.tensor([float(groups)], dtype=torch.float64, device=env.device)])
        dist.all_reduce(sums)
        loss, nll_best, penalty, active, groups = sums.tolist()
        results = [r for batch, nll in scored for r in score_batch(batch, nll)]
        gathered: list = [None] * env.world_size
        dist.all_gather_object(gathered, results)
        results = sorted((r for part in gathered for r in part), key=lambda r: r.index)
        for result in results:  # rank 0 knows the categories (per-category keys: its lines only)
            result.category = self.eval_categories.get(result.index)
        record = {"step": step, "epoch": round(epoch, 4),
                  "eval_loss": loss / groups, "eval_nll_best": nll_best / groups,
                  "eval_penalty": penalty / groups, "eval_penalty_active_frac": active / groups,
                  **ranking_record(results)}
        self.metrics.write(record)
        log.info("%s", format_metrics_line(record, self.total_steps))
        return record

    def _save(self, step: int, next_position: tuple[int, int], nonfinite: torch.Tensor) -> None:
        self._check_finite(nonfinite, step)  # never checkpoint non-finite weights
        state = {"step": step, "epoch": next_position[0], "step_in_epoch": next_position[1],
                 "total_steps": self.total_steps, "batch_layout": self._batch_layout(),
                 resume_inputs.INPUTS_KEY: self.input_digests, "args": vars(self.config)}
        best = None
        if self.best is not None:
            state[best_model.STATE_KEY] = self.best.state()
            best = self.best.path(self.output_dir)
        if self.config.save_only_model:
            path = ckpt.save_model_only_checkpoint(
                self.output_dir, step, self.model, self.llama.config, self.config.model_name_or_path,
                state, prefix=PREFIX, save_total_limit=self.config.save_total_limit, best=best)
            log.info("saved %s (model only)", path)
            return
        path = ckpt.save_checkpoint(self.output_dir, step, self.model, self.optimizer, self.scheduler,
                                    state, save_total_limit=self.config.save_total_limit, best=best)
        log.info("saved %s", path)

    def _stop_on_signal(self, signum: int, step: int, next_position: tuple[int, int],
                        nonfinite: torch.Tensor, saved: bool) -> None:
        """After the step a signal arrived in: checkpoint it (unless --save_strategy no) and stop."""
        if self.config.save_strategy != "no" and not saved:
            self._save(step, next_position, nonfinite)
        model_only = ckpt.list_model_only_checkpoints(self.output_dir) if self.config.save_only_model else []
        last = ckpt.latest_checkpoint(self.output_dir)
        if model_only:
            where = (f"the last checkpoint is {model_only[-1]}, model only (--save_only_model): it cannot be "
                     f"resumed; load it with from_pretrained, or start a new run from it with "
                     f"--model_name_or_path {model_only[-1]}")
        elif last:
            where = (f"the last checkpoint is {last}; continue with --resume_from_checkpoint auto "
                     f"(same --output_dir) or --resume_from_checkpoint {last}")
        else:
            where = "no checkpoint was written (--save_strategy no): a new run starts from step 0"
        raise Stopped(f"{signal.Signals(signum).name} received: stopped after step {step} of "
                      f"{self.total_steps}; {where}", signum)
