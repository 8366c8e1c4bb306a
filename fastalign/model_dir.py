"""A Hugging Face model directory read without running any of its code.

Details: docs/design.md section 7.22.
"""

from __future__ import annotations

import json
from pathlib import Path

from fastalign.errors import ModelError

# transformers is imported where used: importing this module stays cheap for `--help` and refused flags.

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
