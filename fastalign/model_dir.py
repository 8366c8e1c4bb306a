"""A Hugging Face model directory read without running any of its code.

transformers runs Python from a model directory when a file there has an `auto_map` (a
`tokenizer_config.json` mapping `AutoTokenizer` to `tokenization_x.MyTokenizer`, a `config.json`
mapping `AutoConfig` / `AutoModelForCausalLM`): with `trust_remote_code` unset it asks
"run the custom code? [y/N]" on standard input, so a "y" in a pipe or a script runs the
directory's code. fastalign never runs it:

- `refuse_custom_code(directory)` refuses a directory whose tokenizer_config.json or config.json
  has an `auto_map`, naming the file and the entry, before transformers reads anything;
- `load_tokenizer(directory)` is the one way fastalign loads a tokenizer (train, evaluate,
  generate, plan, demo, tiny, the benchmarks): that check, then AutoTokenizer with
  `trust_remote_code=False`, so no prompt can appear whatever standard input holds.

Configs and weights never go through transformers (`LlamaConfig.from_pretrained` parses
config.json as JSON and calls `refuse_custom_code` too; weights are safetensors or `.bin` read with
`weights_only=True`, see `fastalign.hf_weights`).
"""

from __future__ import annotations

import json
from pathlib import Path

from fastalign.errors import ModelError

# The files whose `auto_map` makes transformers import the directory's code: AutoTokenizer reads
# both (config.json when tokenizer_config.json names no tokenizer_class).
CODE_MAP_FILES = ("tokenizer_config.json", "config.json")


def refuse_custom_code(directory) -> None:
    """Raise ModelError if `directory`'s tokenizer_config.json or config.json asks for custom code
    (an `auto_map`); files that do not exist are skipped (the loaders name what is missing)."""
    for name in CODE_MAP_FILES:
        file = Path(directory) / name
        if not file.is_file():
            continue
        try:
            settings = json.loads(file.read_text())
        except (OSError, ValueError) as err:
            raise ModelError(f"{file}: not readable JSON ({err})") from None
        # A dict {"AutoTokenizer": [...], ...}, or the older [slow, fast] list of tokenizer_config.json.
        auto_map = settings.get("auto_map") if isinstance(settings, dict) else None
        if auto_map:
            raise ModelError(
                f"{file}: auto_map {json.dumps(auto_map)} names Python code in the model directory; "
                f"fastalign never runs code from a model directory (trust_remote_code=False): use a "
                f"model whose tokenizer and config are standard transformers classes (if the named "
                f"classes are standard ones, delete the auto_map entry)")


def load_tokenizer(directory):
    """The tokenizer saved with a model (transformers AutoTokenizer, no custom code), or a
    ModelError saying why not."""
    refuse_custom_code(directory)
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(directory), trust_remote_code=False)
    except (OSError, ValueError, TypeError) as err:
        raise ModelError(f"{directory}: cannot load a tokenizer from this directory ({err})") from None
