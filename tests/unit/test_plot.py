"""fastalign.plot: metrics.jsonl -> PNG, with clear errors for missing or malformed files."""

import json
import struct

import pytest
from helpers.records import metrics_line, write_metrics

from fastalign.cli import run_main
from fastalign.plot import epoch_boundaries, main, read_metrics, series

pytest.importorskip("matplotlib")


def png_size(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_plot_writes_png_from_metrics_with_nulls_and_eval_lines(tmp_path, capsys):
    lines = [metrics_line(step) for step in range(1, 9)]
    lines[2] = metrics_line(3, tokens_per_s=None, penalty=None)
    lines[5] = json.dumps({k: v for k, v in json.loads(metrics_line(6)).items() if k != "lr"})
    lines.append(json.dumps({"step": 8, "epoch": 2.0, "eval_loss": 0.4, "eval_nll_best": 0.3,
                             "eval_penalty": 0.1, "eval_penalty_active_frac": 0.25}))
    run_dir = tmp_path / "run"
    write_metrics(run_dir, lines)

    assert run_main(main, [str(run_dir)]) == 0
    assert capsys.readouterr().out.strip() == f"wrote {run_dir / 'metrics.png'}"
    width, height = png_size(run_dir / "metrics.png")
    assert width > 500 and height > 500

    custom = tmp_path / "plots" / "curves.png"
    assert run_main(main, [str(run_dir), "--output", str(custom)]) == 0
    png_size(custom)
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == ["curves.png"]  # no temp file left


def test_series_skips_nulls_and_keeps_the_last_line_of_a_repeated_step(tmp_path):
    path = write_metrics(tmp_path, [metrics_line(2, loss=5.0), metrics_line(1, loss=None), metrics_line(3),
                                    metrics_line(2, loss=0.7), metrics_line(4, loss=float("nan"))])
    records = read_metrics(path)
    assert series(records, "loss") == ([2, 3], [0.7, 2.0 / 3])
    assert series(records, "mfu") == ([], [])
    assert series(records, "eval_loss") == ([], [])
    assert epoch_boundaries(records) == [4.0]  # epoch = step / 4: epoch 1 ends at step 4


def test_unfinished_last_line_is_ignored(tmp_path):
    path = write_metrics(tmp_path, [metrics_line(1), metrics_line(2), metrics_line(3)[:20]], final_newline=False)
    assert [r["step"] for r in read_metrics(path)] == [1, 2]


@pytest.mark.parametrize("lines, message", [
    ([metrics_line(1), '{"step": 2, "loss": ', metrics_line(3)], "metrics.jsonl: line 2: invalid JSON"),
    ([metrics_line(1), "[1, 2]"], "metrics.jsonl: line 2: expected a JSON object"),
    (['{"loss": 1.0}'], "metrics.jsonl: line 1: 'step' is missing or not a number"),
    ([metrics_line(1), "", metrics_line(2, loss="high")], "metrics.jsonl: line 3: 'loss' is \"high\", expected"),
    ([], "metrics.jsonl: no metrics logged yet (empty file)"),
])
def test_malformed_metrics_fail_with_the_line_named(tmp_path, capsys, lines, message):
    write_metrics(tmp_path, lines)
    assert run_main(main, [str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err
    assert not (tmp_path / "metrics.png").exists()


def test_missing_directory_and_file(tmp_path, capsys):
    assert run_main(main, [str(tmp_path / "nope")]) == 2
    assert capsys.readouterr().err.strip() == f"error: {tmp_path / 'nope'}: no such directory"
    assert run_main(main, [str(tmp_path)]) == 2
    assert f"error: {tmp_path / 'metrics.jsonl'}: no such file" in capsys.readouterr().err
