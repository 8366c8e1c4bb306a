"""The training benchmarks' presets: one model shape, data and schedule shared by both sides of a
comparison (fastalign and the original step, or a peer)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# The original's batch: per_device_train_batch_size 1 x gradient_accumulation_steps 8 = 8 groups
# (queries) per optimizer step on each rank.
ORIGINAL_GROUPS_PER_STEP = 8


@dataclass(frozen=True)
class TrainPreset:
    """One model shape + data + schedule shared by both sides of a training benchmark.

    `model`: HF LlamaConfig fields. `tokenizer_vocab`: size asked of the byte-level BPE trained on
    the benchmark data (fastalign.tiny.build_tokenizer; no network, so no pretrained tokenizer);
    the model's vocab_size is larger so that the LM head has the target shape: the unused rows
    cost the same FLOPs and memory as used ones.
    `max_tokens_per_batch`: fastalign's micro-batch token budget (several groups per micro-batch);
    the baseline always runs one group per micro-batch, as the original did.
    """

    name: str
    device: str  # "cpu" | "cuda"
    model: dict[str, Any]
    tokenizer_vocab: int
    model_max_length: int = 480
    num_comp: int = 3
    groups_per_step: int = ORIGINAL_GROUPS_PER_STEP
    max_tokens_per_batch: int = 4096
    precision: str = "fp32"  # "fp32" | "bf16" (fp32 master weights, bf16 compute)
    warmup_steps: int = 1
    measure_steps: int = 4
    min_response_chars: int = 0  # > 0: lengthen the data's responses (see inputs.lengthened_records)
    realignment_queries: bool = False  # queries quote an earlier answer and feedback (inputs.realignment_records)
    note: str = ""


def _llama(hidden: int, intermediate: int, layers: int, heads: int, kv_heads: int, vocab: int) -> dict[str, Any]:
    return dict(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                num_attention_heads=heads, num_key_value_heads=kv_heads, vocab_size=vocab,
                max_position_embeddings=2048, rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False,
                bos_token_id=0, eos_token_id=1)  # the ids fastalign.tiny.build_tokenizer gives <s> and </s>


TRAIN_PRESETS: dict[str, TrainPreset] = {p.name: p for p in (
    TrainPreset("cpu-smoke", "cpu", _llama(64, 176, 2, 4, 4, 1024), tokenizer_vocab=512, model_max_length=128,
                groups_per_step=2, max_tokens_per_batch=1024, warmup_steps=1, measure_steps=2,
                note="seconds-long smoke run for tests; numbers mean nothing"),
    TrainPreset("cpu-tiny", "cpu", _llama(256, 688, 4, 4, 4, 32000), tokenizer_vocab=8000, model_max_length=480,
                max_tokens_per_batch=4096, warmup_steps=1, measure_steps=8,
                note="the CPU target: 4 layers, hidden 256, vocab 32000, k=3, bundled data"),
    TrainPreset("cpu-tiny-long", "cpu", _llama(256, 688, 4, 4, 4, 32000), tokenizer_vocab=8000,
                model_max_length=480, max_tokens_per_batch=4096, warmup_steps=1, measure_steps=4,
                min_response_chars=1600,
                note="cpu-tiny on the bundled records with responses lengthened to >= 1600 characters "
                     "(about 400 tokens): the regime of the original's model_max_length 480"),
    TrainPreset("cpu-tiny-realign", "cpu", _llama(256, 688, 4, 4, 4, 32000), tokenizer_vocab=8000,
                model_max_length=480, num_comp=5, max_tokens_per_batch=4096, warmup_steps=1, measure_steps=6,
                realignment_queries=True,
                note="cpu-tiny on realignment-like records (realignment_records: each query quotes an earlier "
                     "answer and a reviewer's feedback, so it is most of each sequence), k <= 5"),
    # GPU presets: the trainer's CUDA default budget (config.step_token_budget: the original's
    # padded micro-batch, per_device_train_batch_size 1 x num_comp x model_max_length).
    TrainPreset("gpu-1b", "cuda", _llama(2048, 5632, 22, 32, 4, 32000), tokenizer_vocab=8000, model_max_length=480,
                max_tokens_per_batch=1 * 3 * 480, precision="bf16", warmup_steps=2, measure_steps=8,
                note="TinyLlama-1.1B shape (22 layers, hidden 2048, GQA 32/4), seq 480, bf16"),
    TrainPreset("gpu-1b-realign", "cuda", _llama(2048, 5632, 22, 32, 4, 32000), tokenizer_vocab=8000,
                model_max_length=480, num_comp=5, max_tokens_per_batch=1 * 5 * 480, precision="bf16", warmup_steps=2,
                measure_steps=4, realignment_queries=True,
                note="gpu-1b on cpu-tiny-realign's records (long queries quoting an earlier answer and feedback), "
                     "k <= 5, seq 480, bf16"),
    TrainPreset("gpu-7b-layers", "cuda", _llama(4096, 11008, 4, 32, 32, 32000), tokenizer_vocab=8000,
                model_max_length=480, max_tokens_per_batch=1 * 3 * 480, precision="bf16", warmup_steps=2,
                measure_steps=8, note="Llama-7B layer and head shapes, 4 of its 32 layers (fits one GPU per side)"),
)}
