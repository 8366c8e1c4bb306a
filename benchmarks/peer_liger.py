"""peer_trl's `liger` side (CUDA): the HF model's decoder + Liger-Kernel's fused linear DPO loss.

Liger's LigerFusedLinearDPOLoss computes the LM head and the DPO loss chunk by chunk, never the
full logits. Its reference is given as the reference model's final hidden states and LM head
(`ref_input`, `ref_weight`: the form every liger-kernel release takes): both are computed once,
before the timed steps, from the initial weights, as TRL precomputes its reference log-probs (so
each step is, as on TRL's side, the policy's forward and backward over chosen and rejected; the
reference's LM-head product is recomputed in the loss's chunks, one matmul per chunk).
Pairs, batches (file order), precision (bf16 autocast over fp32 weights on CUDA), learning rate,
clipping and timing are peer_trl's; the optimizer is torch's AdamW (fused on CUDA).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from benchmarks.lib.memory import PeakMemory
from benchmarks.lib.timing import synchronize

LEARNING_RATE = 2e-5
BETA = 0.1  # TRL's DPOConfig default, the same on both DPO sides


def encode_pairs(tokenizer, pairs: list[dict[str, Any]], max_length: int) -> dict[str, torch.Tensor]:
    """One micro-batch of B pairs as Liger takes it: rows [chosen_1..B, rejected_1..B], each
    prompt + completion + EOS cut at max_length, right-padded; labels -100 on the prompt and the
    padding. input_ids, labels, attention_mask: [2B, L]."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    rows = []
    for which in (0, 1):  # chosen rows first, then rejected: Liger splits the batch in halves
        for pair in pairs:
            prompt = tokenizer(pair["query"]).input_ids
            completion = tokenizer(pair["responses"][which], add_special_tokens=False).input_ids
            completion = completion + [tokenizer.eos_token_id]
            rows.append(((prompt + completion)[:max_length], ([-100] * len(prompt) + completion)[:max_length]))
    length = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), length), pad, dtype=torch.long)
    labels = torch.full((len(rows), length), -100, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, (ids, targets) in enumerate(rows):
        input_ids[i, :len(ids)] = torch.tensor(ids)
        labels[i, :len(targets)] = torch.tensor(targets)
        mask[i, :len(ids)] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": mask}


def liger_dpo_loss() -> Callable[..., Any]:
    from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss

    return LigerFusedLinearDPOLoss(beta=BETA, use_ref_model=True)


class LigerDPO:
    """Train the pairs in file order; `train()` returns (wall, process CPU) seconds per step."""

    def __init__(self, spec: dict[str, Any], memory: PeakMemory, loss_fn: Callable[..., Any] | None = None):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.spec, self.memory = spec, memory
        self.device = torch.device(spec["device"])
        tokenizer = AutoTokenizer.from_pretrained(spec["model_dir"], trust_remote_code=False)
        pairs = [json.loads(line) for line in Path(spec["pairs_path"]).read_text().splitlines() if line.strip()]
        size = spec["batch_size"]
        self.batches = [{k: v.to(self.device) for k, v in encode_pairs(tokenizer, pairs[i:i + size],
                                                                        spec["max_length"]).items()}
                        for i in range(0, len(pairs) - size + 1, size)]
        self.model = AutoModelForCausalLM.from_pretrained(spec["model_dir"], dtype=torch.float32,
                                                          trust_remote_code=False).to(self.device)
        self.loss_fn = loss_fn or liger_dpo_loss()
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=LEARNING_RATE, weight_decay=0.0,
                                           fused=self.device.type == "cuda")
        with torch.no_grad(), self._autocast():  # the reference: the initial model, computed once
            self.ref_weight = self.model.lm_head.weight.detach().clone()
            self.ref_hidden = [self._hidden(batch).detach() for batch in self.batches]

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.spec["precision"] == "bf16")

    def _hidden(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Final hidden states [2B, L-1, H] at the positions that predict tokens 1..L-1."""
        out = self.model.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        return out.last_hidden_state[:, :-1]

    def _micro_batch(self, index: int) -> torch.Tensor:
        batch = self.batches[index]
        with self._autocast():
            out = self.loss_fn(self.model.lm_head.weight, self._hidden(batch), batch["labels"][:, 1:],
                               ref_input=self.ref_hidden[index], ref_weight=self.ref_weight)
        return out[0] if isinstance(out, tuple) else out

    def train(self) -> list[tuple[float, float]]:
        accumulation, times = self.spec["grad_accum"], []
        for step in range(self.spec["warmup"] + self.spec["steps"]):
            if step == self.spec["warmup"]:
                self.memory.reset_peak()
            synchronize(self.device)
            started = (time.perf_counter(), time.process_time())
            self.optimizer.zero_grad(set_to_none=True)
            for micro in range(accumulation):
                (self._micro_batch(step * accumulation + micro) / accumulation).backward()
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
            self.optimizer.step()
            synchronize(self.device)
            times.append((time.perf_counter() - started[0], time.process_time() - started[1]))
        return times
