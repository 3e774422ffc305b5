"""plot.py: the run figures from a synthetic metrics.jsonl (eval lines, a skipped step, a resumed duplicate, a
truncated last line), partial and degenerate files, and the error cases."""

import json
import math
import random
import re
import warnings

import pytest

from dsv2.tools.plot import MAX_HEATMAP_STEPS, plot_run, read_metrics

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
FIGURES = ["loss.png", "balance.png", "expert_load.png", "lr_throughput.png"]


def record(step: int, n_layers: int = 2, n_exp: int = 8) -> dict:
    rng = random.Random(step)
    loads = []
    for _ in range(n_layers):
        w = [math.exp(rng.gauss(0, 1)) for _ in range(n_exp)]
        loads.append([x / sum(w) for x in w])
    return dict(step=step, loss=5 * math.exp(-step / 20) + 2 + rng.gauss(0, 0.05), aux_loss=0.01, lr=1e-3 * step / 60,
                grad_norm=1.0 + rng.random(), tokens_per_s=1e4, expert_balance=1.2, device_balance=1.1,
                comm_balance=1.05, dropped_fraction=0.01, expert_load_max_mean=[max(x) * n_exp for x in loads],
                expert_load=loads, moe_layers=[1, 2][:n_layers])


def write(path, lines) -> None:
    path.write_text("".join(line if isinstance(line, str) else json.dumps(line) + "\n" for line in lines))


def assert_png(path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC, path
    assert len(data) > 10_000, (path, len(data))  # axes, text and curves, not a blank canvas


@pytest.fixture
def run_dir(tmp_path):
    lines = []
    for s in range(1, 61):
        r = record(s)
        if s % 20 == 0:
            r["val_loss"] = r["loss"] + 0.1
        if s == 30:
            r = {"step": 30, "skipped": True, "loss": None}
        lines.append(r)
    lines.insert(45, record(40))  # a resumed run logging step 40 again: the later record wins
    lines.append(json.dumps(record(61))[:57])  # a crash mid-write: no newline, cut inside the record
    write(tmp_path / "metrics.jsonl", lines)
    return tmp_path


def test_plot_run_writes_every_figure_as_a_valid_png(run_dir):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the truncated last line is expected: no warning for it
        paths = plot_run(run_dir)
    assert [p.name for p in paths] == FIGURES
    for p in paths:
        assert p.parent == run_dir / "plots"
        assert_png(p)
    assert not list((run_dir / "plots").glob("*.tmp"))
    assert plot_run(str(run_dir)) == paths  # again, over existing files, from a str path


def test_reader_keeps_order_skips_and_drops_the_truncated_line(run_dir):
    m = read_metrics(run_dir / "metrics.jsonl")
    assert [r["step"] for r in m.records] == list(range(1, 61))
    assert m.records[29] == {"step": 30, "skipped": True, "loss": None}
    steps, _ = m.series("loss")
    assert 30 not in steps and len(steps) == 59  # the skipped step is not a training-loss point
    vsteps, _ = m.series("val_loss")
    assert vsteps.tolist() == [20, 60]  # step 40 was re-logged without val_loss, and the later record won
    assert m.load_steps == [s for s in range(1, 61) if s != 30]
    assert len(m.loads[0]) == 2 and len(m.loads[0][0]) == 8
    assert "expert_load" not in m.records[0]  # loads live only in the decimated list


def test_expert_loads_are_decimated_for_long_runs(tmp_path):
    n = 4 * MAX_HEATMAP_STEPS + 7
    write(tmp_path / "metrics.jsonl", ({"step": s, "loss": 1.0, "expert_load": [[0.5, 0.5]]} for s in range(1, n + 1)))
    m = read_metrics(tmp_path / "metrics.jsonl")
    assert len(m.records) == n
    assert MAX_HEATMAP_STEPS // 2 <= len(m.loads) <= 2 * MAX_HEATMAP_STEPS
    gaps = {b - a for a, b in zip(m.load_steps, m.load_steps[1:], strict=False)}
    assert len(gaps) == 1  # evenly spaced


def test_missing_keys_and_bad_values_are_tolerated(tmp_path):
    lines = [{"step": 1, "loss": 3.0}, {"step": 2, "loss": float("nan")}, {"step": 3, "loss": None, "lr": 1e-3},
             {"step": 4, "loss": 2.5, "val_loss": 2.6, "expert_load_max_mean": [1.5, None]},
             {"step": 5, "expert_load": [[0.25, 0.75], [1.0]]}, "\n", {"step": 6, "loss": 2.0}]
    write(tmp_path / "metrics.jsonl", lines)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        paths = plot_run(tmp_path)
    assert [p.name for p in paths] == FIGURES
    for p in paths:
        assert p.read_bytes()[:8] == PNG_MAGIC


def test_only_the_figures_with_data_are_written(tmp_path):
    write(tmp_path / "metrics.jsonl", [{"step": s, "loss": 4.0 / s} for s in range(1, 20)])
    assert [p.name for p in plot_run(tmp_path)] == ["loss.png"]


def test_a_corrupt_line_inside_the_file_is_skipped_with_a_warning(tmp_path):
    write(tmp_path / "metrics.jsonl", [{"step": 1, "loss": 3.0}, '{"step": 2, "lo\n', {"step": 3, "loss": 2.0},
                                       '["not", "a", "record"]\n'])
    with pytest.warns(UserWarning) as caught:
        m = read_metrics(tmp_path / "metrics.jsonl")
    messages = [str(w.message) for w in caught]
    assert any("metrics.jsonl:2: not valid JSON" in s for s in messages)
    assert any("metrics.jsonl:4: not a metrics record" in s for s in messages)
    assert [r["step"] for r in m.records] == [1, 3]


def test_missing_metrics_file_is_a_value_error_naming_the_path(tmp_path):
    with pytest.raises(ValueError, match=re.escape(f"no metrics file at {tmp_path / 'metrics.jsonl'}")):
        plot_run(tmp_path)
    with pytest.raises(ValueError, match="no metrics file"):
        plot_run(tmp_path / "does-not-exist")


@pytest.mark.parametrize("content", ["", "\n\n", '{"step": 1, "lo'], ids=["empty", "blank", "only-truncated"])
def test_empty_metrics_file_is_a_value_error_naming_the_path(tmp_path, content):
    (tmp_path / "metrics.jsonl").write_text(content)
    with pytest.raises(ValueError, match=re.escape(f"metrics file {tmp_path / 'metrics.jsonl'} holds no records")):
        plot_run(tmp_path)
    assert not (tmp_path / "plots").exists()


def test_expert_parallel_traffic_gets_a_panel(tmp_path):
    plain, ep = tmp_path / "plain", tmp_path / "ep"
    for d, extra in ((plain, {}), (ep, {"comm_bytes": 123456.0})):
        d.mkdir()
        write(d / "metrics.jsonl", [{**record(s), **extra} for s in range(1, 21)])
        plot_run(d)
    # the traffic panel adds a fourth row: a taller figure than the plain run's
    from PIL import Image

    plain_h = Image.open(plain / "plots" / "lr_throughput.png").size[1]
    ep_h = Image.open(ep / "plots" / "lr_throughput.png").size[1]
    assert ep_h > plain_h
