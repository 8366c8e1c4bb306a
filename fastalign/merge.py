"""python -m fastalign.merge ADAPTER_DIR OUT_DIR: a PEFT LoRA adapter merged into its base model,
written as an HF model directory that transformers loads (docs/lora.md)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from fastalign.cli import run_main


def main(argv: Sequence[str] | None = None) -> int:
    import torch

    from fastalign import peft_io
    from fastalign.errors import ConfigError

    parser = argparse.ArgumentParser(prog="python -m fastalign.merge", description=__doc__.split("\n\n")[0])
    parser.add_argument("adapter_dir", help="A PEFT LoRA adapter (adapter_config.json names the base model).")
    parser.add_argument("out_dir", help="Where the merged HF model goes (config, safetensors, tokenizer).")
    args = parser.parse_args(argv)
    if not peft_io.is_adapter_dir(args.adapter_dir):
        raise ConfigError(f"{args.adapter_dir}: no {peft_io.ADAPTER_CONFIG} (not a PEFT adapter directory)")
    llama = peft_io.load_adapted(args.adapter_dir, dtype=torch.float32)
    from fastalign.model import Llama

    with torch.device("meta"):
        writer = Llama(llama.config)  # the plain model's parameter names: no adapters
    # Merged in fp32, written in the dtype the base was saved in (a bf16 base stays its size).
    saved_dtype = getattr(torch, llama.config.torch_dtype or "float32", None)
    dtype = saved_dtype if saved_dtype in (torch.float32, torch.bfloat16, torch.float16) else torch.float32
    state = {name: tensor.to(dtype) for name, tensor in peft_io.merged_state(llama).items()}
    writer.save_pretrained(args.out_dir, state_dict=state, tokenizer_dir=llama.source_dir)
    print(f"merged {args.adapter_dir} into {llama.source_dir}: wrote {args.out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
