"""The trainer's data: a data file read, validated and tokenized as its flags say, cached across
runs (docs/design.md)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from fastalign import distributed as fdist
from fastalign.config import TrainConfig
from fastalign.errors import DataError

# fastalign.data, .model, .packing and .token_cache are imported where used: `python -m fastalign.train
# --help` and a refused flag do not pay for them.


def tokenize_file(path: str, tokenizer, config: TrainConfig):
    """Read, validate and tokenize a data file as the trainer's flags say -> (TokenizedData,
    LoadedRecords). No cache: `load_groups` wraps this in one. Reads rating_scale, skip_invalid,
    model_max_length, no_append_eos and stop_response only: the planner passes its own flags."""
    from fastalign.data import load_records, tokenize_records

    loaded = load_records(path, rating_scale=config.rating_scale, skip_invalid=config.skip_invalid)
    tokenized = tokenize_records(loaded.records, tokenizer, model_max_length=config.model_max_length,
                                 append_eos=not config.no_append_eos, stop_response=config.stop_response)
    return tokenized, loaded


def load_groups(path: str, tokenizer: Callable[[], object], config: TrainConfig, what: str, env: fdist.DistEnv):
    """Records -> tokenized groups, with the statistics that go into the log.

    Tokenized once per run and cached across runs (fastalign.data.token_cache); `tokenizer()` returns
    the tokenizer, loaded only when something has to be tokenized.
    """
    from fastalign.data.packing import packed_tokens
    from fastalign.data.token_cache import cached_groups
    from fastalign.hf_config import LlamaConfig

    def tokenize():
        tokenized, loaded = tokenize_file(path, tokenizer(), config)
        return tokenized, {"valid_records": len(loaded.records), "skipped": loaded.skipped}

    settings = {"model_max_length": config.model_max_length, "append_eos": not config.no_append_eos,
                "stop_response": config.stop_response, "rating_scale": config.rating_scale,
                "skip_invalid": config.skip_invalid}
    cache_dir = Path(config.token_cache_dir) if config.token_cache_dir not in ("", "none") else None
    tokenized, meta, how = cached_groups(tokenize, data_path=path, tokenizer_dir=config.model_name_or_path,
                                         settings=settings, cache_dir=cache_dir, rank=env.rank,
                                         broadcast=fdist.broadcast_object,
                                         vocab_size=LlamaConfig.from_pretrained(config.model_name_or_path).vocab_size)
    skipped = meta["skipped"]
    if not tokenized.groups:
        raise DataError(f"{path}: no usable {what} records (skipped: {skipped or 'none'}, "
                        f"tokenization: {tokenized.stats})")
    skipped_text = ", ".join(f"{n} {reason}" for reason, n in sorted(skipped.items())) or "none"
    stats = ", ".join(f"{k}={v}" for k, v in tokenized.stats.items())
    # Over every response (before candidate sampling): what each layout runs through the layers.
    computed = sum(packed_tokens(len(g.query_ids), [len(r) for r in g.response_ids], config.share_prefix)
                   for g in tokenized.groups)
    sequences = tokenized.stats["tokens"]
    summary = (f"{what} data {path} ({how}): {meta['valid_records']} valid records, skipped {skipped_text}; "
               f"{len(tokenized.groups)} groups; {stats}; share_prefix {config.share_prefix}: "
               f"{computed} computed of {sequences} sequence tokens ({1 - computed / sequences:.1%} saved)")
    return tokenized, summary
