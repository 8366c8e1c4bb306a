"""What both sides of a training benchmark read: record files derived from a Sandbox file (long
responses, realignment-shaped queries) and one randomly initialised checkpoint.

fastalign, torch and transformers are imported inside the functions that use them, for start-up time.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def lengthened_records(src: Path, dst: Path, min_chars: int) -> Path:
    """A copy of a Sandbox file whose responses are at least `min_chars` long: each response is
    followed by the responses of the next records, in file order, until it is long enough
    (deterministic; queries and ratings unchanged). For measuring long-sequence behaviour with
    the bundled data's words."""
    from fastalign.data import load_records

    records = load_records(str(src)).records
    pool = [r for record in records for r in record.responses]
    with open(dst, "w") as out:
        position = 0
        for record in records:
            responses = []
            for response in record.responses:
                while len(response) < min_chars:
                    response += "\n\n" + pool[position % len(pool)]
                    position += 1
                responses.append(response)
            out.write(json.dumps({"query": record.query, "responses": responses, "scores": record.scores}) + "\n")
    return Path(dst)


def realignment_records(src: Path, dst: Path) -> Path:
    """A copy of a Sandbox file shaped like realignment data, whose queries carry an earlier answer
    and feedback on it: record i's query becomes its instruction, then its first response as the
    earlier answer, then feedback quoting its best-rated response; the responses are record i's and
    the next record's, up to 5 (deterministic; ratings carried with their responses)."""
    from fastalign.data import load_records

    records = load_records(str(src)).records
    with open(dst, "w") as out:
        for i, record in enumerate(records):
            neighbour = records[(i + 1) % len(records)]
            instruction = record.query.removesuffix("### Response:").rstrip()
            best = max(range(len(record.responses)), key=lambda j: record.scores[j])
            query = (f"{instruction}\n\n### Earlier answer:\n{record.responses[0]}\n\n### Feedback:\n"
                     f"A reviewer rated it {record.scores[0]:g} of 7 and wrote: a better answer would say "
                     f"\"{record.responses[best]}\" Revise the earlier answer accordingly.\n\n### Response:")
            responses = (record.responses + neighbour.responses)[:5]
            scores = (record.scores + neighbour.scores)[:5]
            out.write(json.dumps({"query": query, "responses": responses, "scores": scores}) + "\n")
    return Path(dst)


def build_llama_checkpoint(out_dir: Path, model_fields: dict[str, Any], *, seed: int = 0,
                           save_dtype: str = "float32", init_device: str = "cpu") -> Path:
    """A randomly initialised HF LlamaForCausalLM saved as safetensors in `out_dir` (the one set of
    weights both sides of a benchmark load)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(**model_fields)
    with torch.device(init_device):
        model = LlamaForCausalLM(config)
    model.to(getattr(torch, save_dtype)).save_pretrained(out_dir)
    return Path(out_dir)
