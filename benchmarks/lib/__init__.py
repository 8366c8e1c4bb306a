"""What the benchmark scripts share, one concern per module:

    paths     the repository root and benchmarks/results/
    machine   what ran a benchmark (CPU, GPU, versions, commit), device names, peak FLOP/s and MFU
    timing    synchronised wall-clock timing and summaries of repeated measurements
    memory    peak memory of a training loop (CUDA allocator, CPU resident set size)
    results   result file names, their common header, atomic JSON writing
    tables    the fixed-width tables the scripts print
    workers   child processes that serve commands, so each side of a comparison has its own
    presets   the training benchmarks' model shapes, data and schedules
    inputs    the records and weights both sides of a training benchmark read

Scripts are run as `python benchmarks/<name>.py` (or with `PYTHONPATH=.` on a GPU machine); each
starts with the two lines below so that `benchmarks.lib` and `fastalign` import from the tree:

    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
    from benchmarks.lib.results import ...

Benchmarks import from here and from fastalign, never from tests/ (docs/design.md sections 4 and 5).
"""
