"""A tiny, randomly initialised Llama (or Mistral, Qwen2, Qwen3) in Hugging Face layout, built offline in seconds.

Details: docs/design.md section 7.30.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path

from fastalign.cli import run_main
from fastalign.model_dir import load_tokenizer

# torch, tokenizers and transformers are imported where used: `python -m fastalign.tiny --help` does not pay
# for them.

BOS, EOS, UNK = "<s>", "</s>", "<unk>"
FAMILIES = ("llama", "mistral", "qwen2", "qwen3")  # transformers model_type values
# Qwen's chat template (ChatML), for the tokenizers of the families that have no BOS.
CHATML_TEMPLATE = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] "
                   "+ '<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
                   "{% endif %}")


def build_tokenizer(texts: Iterable[str], vocab_size: int, out_dir: str | os.PathLike, *,
                    model_max_length: int | None = None, bos: bool = True, eos: bool = True,
                    chat_template: str | None = None) -> Path:
    """Train a byte-level BPE on `texts` and save tokenizer.json + tokenizer_config.json in `out_dir`.

    `bos` / `eos`: whether the tokenizer has <s> (then prepended like Llama's tokenizer does) and
    </s>; tests turn them off to cover tokenizers without them. The vocabulary may come out smaller
    than `vocab_size` when the texts have fewer merges to offer; read the real size with
    len(load_tokenizer(out_dir)) (fastalign.model_dir).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = Tokenizer(models.BPE(unk_token=UNK))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[BOS] * bos + [EOS] * eos + [UNK],  # ids 0, 1, 2 with both
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes: nothing is ever <unk>
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    if bos:
        # Like Llama's tokenizer: BOS in front when special tokens are requested, no EOS.
        bos_id = tokenizer.token_to_id(BOS)
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{BOS}:0 $A:0", pair=f"{BOS}:0 $A:0 {BOS}:1 $B:1", special_tokens=[(BOS, bos_id)]
        )
    tokenizer.save(str(out / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **({"bos_token": BOS} if bos else {}),
        **({"eos_token": EOS} if eos else {}),
        "unk_token": UNK,
        "add_bos_token": bos,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,  # exact round trips
    }
    if model_max_length is not None:
        config["model_max_length"] = model_max_length
    if chat_template is not None:
        config["chat_template"] = chat_template
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out


def build_tiny_llama(
    out_dir: str | os.PathLike,
    texts: Iterable[str],
    *,
    vocab_size: int = 2048,
    hidden_size: int = 128,
    num_layers: int = 4,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 344,
    max_position_embeddings: int = 512,
    seed: int = 0,
    family: str = "llama",
    tie_word_embeddings: bool = False,
) -> Path:
    """Write a tokenizer trained on `texts` and a random model of `family` (fp32 safetensors) to `out_dir`.

    Mistral gets sliding_window = max_position_embeddings (no sequence the model can hold exceeds it).

    Files are built in a temporary directory beside `out_dir` and moved in at the end, config.json
    last, so a directory with a config.json is always complete. Existing files of the same name in
    `out_dir` are replaced; the global torch RNG is left as it was.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    if family not in FAMILIES:
        raise ValueError(f"family must be one of {', '.join(FAMILIES)}, got {family!r}")
    qwen = family.startswith("qwen")

    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        build_tokenizer(texts, vocab_size, staging, model_max_length=max_position_embeddings, bos=not qwen,
                        chat_template=CHATML_TEMPLATE if qwen else None)
        tokenizer = load_tokenizer(staging)
        family_keys = {"mistral": dict(sliding_window=max_position_embeddings),
                       "qwen3": dict(head_dim=hidden_size // num_heads)}.get(family, {})
        config = AutoConfig.for_model(
            family,
            vocab_size=len(tokenizer),
            hidden_size=hidden_size,
            intermediate_size=intermediate_size,
            num_hidden_layers=num_layers,
            num_attention_heads=num_heads,
            num_key_value_heads=num_kv_heads,
            max_position_embeddings=max_position_embeddings,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=None,
            tie_word_embeddings=tie_word_embeddings,
            **family_keys,
        )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = AutoModelForCausalLM.from_config(config)
        bars_were_on = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()  # a one-shard "Writing model shards" bar is noise here
        try:
            model.save_pretrained(staging)
        finally:
            if bars_were_on:
                hf_logging.enable_progress_bar()
        out.mkdir(exist_ok=True)
        file_mode = 0o666 & ~_current_umask()  # transformers writes the weights 0600 (via mkstemp)
        names = sorted(p.name for p in staging.iterdir())
        for name in sorted(names, key=lambda name: name == "config.json"):
            os.chmod(staging / name, file_mode)
            os.replace(staging / name, out / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out


def _current_umask() -> int:
    mask = os.umask(0)  # the only way to read it is to set it
    os.umask(mask)
    return mask


def sandbox_texts(path: str | os.PathLike) -> list[str]:
    """The queries and responses of a Sandbox file: the tokenizer's training texts."""
    from fastalign.data import load_records

    texts = []
    for record in load_records(path).records:
        texts.append(record.query)
        texts.extend(record.responses)
    return texts


def main(argv: Sequence[str] | None = None) -> int:
    from fastalign.data import sample_data_path

    parser = argparse.ArgumentParser(prog="python -m fastalign.tiny", description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--family", choices=FAMILIES, default="llama",
                        help="model_type of the model (its transformers class builds it). Default llama.")
    parser.add_argument("--data", type=Path, default=None, help="Sandbox file (default: the bundled sample)")
    parser.add_argument("--vocab_size", type=int, default=2048)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    data = args.data or sample_data_path()
    out = build_tiny_llama(args.out_dir, sandbox_texts(data), vocab_size=args.vocab_size, seed=args.seed,
                           family=args.family)
    print(f"wrote a tiny {args.family} model (tokenizer trained on {data}) to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
