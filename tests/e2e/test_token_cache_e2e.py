"""The token cache through the trainer: a two-rank run tokenizes once, and a hostile entry is rebuilt
under a memory limit. The runs are forked ranks (helpers/ranks.py): what they tokenize and train is the point."""

from __future__ import annotations

import numpy as np
import pytest
from helpers.cache_entries import rewrite, setitem
from helpers.ranks import run_ranks
from helpers.train_mains import counting_tokenizations, with_address_space_headroom
from helpers.training import assert_same_metrics, common, metrics, ok, train_in_process

from fastalign.data.token_cache import read_entry

pytestmark = pytest.mark.slow


@pytest.mark.slow
def test_two_rank_run_tokenizes_once_and_the_next_run_not_at_all(tiny, tmp_path):
    """... and a 2-rank run on a poisoned entry: rank 0 alone warns and re-tokenizes, rank 1 reads
    what rank 0 rewrote, and both train on the real tokens."""
    model, data = tiny
    runs = []
    # the same global batches: 2 ranks x 1 micro-batch, then 1 rank x 2 accumulated micro-batches
    for name, nproc in (("two_ranks", 2), ("one_rank", 1), ("poisoned", 2)):
        if name == "poisoned":
            (entry,) = (tmp_path / "cache").glob("*.npz")
            rewrite(entry, scores=setitem(0, np.nan))
        out = tmp_path / name
        flags = common(model, data, out, max_steps=2, per_device_train_batch_size=2,
                       gradient_accumulation_steps=2 // nproc, token_cache_dir=tmp_path / "cache",
                       disable_tqdm=True)
        result = ok(run_ranks(counting_tokenizations, flags, nproc=nproc))
        runs.append((result.stdout.count("TOKENIZE"), result, metrics(out)))
    assert runs[0][0] == 1 and "TOKENIZE rank=0" in runs[0][1].stdout
    assert runs[1][0] == 0 and "(cache hit)" in runs[1][1].stderr
    # the groups read back train exactly as the tokenized ones did
    assert [m["loss"] for m in runs[1][2]] == pytest.approx([m["loss"] for m in runs[0][2]], rel=1e-5)
    tokenizations, result, poisoned = runs[2]
    assert tokenizations == 1 and "TOKENIZE rank=0" in result.stdout
    (warning,) = [line for line in result.stderr.splitlines() if "is not used" in line]  # rank 0's alone
    assert f"token cache entry {entry} is not used: scores hold a NaN" in warning
    assert [m["loss"] for m in poisoned] == pytest.approx([m["loss"] for m in runs[0][2]], rel=1e-5)


# Address space the trainer below may add to what it maps when it starts (its imports, or a forked
# rank's inherited test process): a tiny run needs under 0.5 GiB more; a reader that keeps one list slot
# per id up to the largest id (2**31 - 1) would need over 16 GiB for its slots alone.
ADDRESS_SPACE_HEADROOM = 2 * 2 ** 30
ONE_SLOT_PER_ID_NEEDS = 16 * 2 ** 30


@pytest.mark.slow
def test_trainer_rebuilds_an_entry_with_ids_far_beyond_the_vocabulary_under_a_memory_limit(tiny, tmp_path):
    model, data = tiny
    cache = tmp_path / "cache"
    flags = dict(max_steps=2, per_device_train_batch_size=2, token_cache_dir=cache, disable_tqdm=True)
    ok(train_in_process(common(model, data, tmp_path / "clean", **flags)))
    (entry,) = cache.glob("*.npz")
    # a valid digest: the vocabulary check alone has to refuse it
    rewrite(entry, response_tokens=setitem(0, 2 ** 31 - 1))
    out = tmp_path / "poisoned"
    result = ok(run_ranks(with_address_space_headroom, [ADDRESS_SPACE_HEADROOM, *common(model, data, out, **flags)]))
    limit = int(result.stdout.split("ADDRESS_SPACE_LIMIT ")[1].split()[0])
    assert limit < ONE_SLOT_PER_ID_NEEDS  # the limit would stop a reader with a slot per id
    warnings = [line for line in result.stderr.splitlines() if f"token cache entry {entry} is not used" in line]
    assert len(warnings) == 1 and "token id 2147483647 outside the model's vocabulary [0, 512)" in warnings[0]
    assert "(tokenized)" in result.stderr
    assert_same_metrics(metrics(out), metrics(tmp_path / "clean"))  # trained on the real tokens
    assert read_entry(entry, vocab_size=512)[0].stats["groups"] > 0  # rewritten: verifies again
