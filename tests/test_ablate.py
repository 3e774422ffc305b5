"""`dsv2 ablate`: the suites' configs (matched as the paper's comparisons are, by `dsv2 info`'s counts), the verdict
statistics, and the mechanics of a suite at a toy size (runs start, stop on Ctrl-C, resume, and the report is written
from the run directories)."""

import json
import math
import signal
import subprocess
import sys
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dsv2.cli import main
from dsv2.experiments.report import seed_spread, verdict
from dsv2.experiments.suites import SUITES, Claim
from dsv2.presets import get_config

TOY = ["--quick", "--steps", "4", "--batch-size", "2", "--seq-len", "32", "--max-bytes", "400000"]
"""A toy budget on the built-in corpus: a few hundred milliseconds per run."""


def info(tmp_path, name, model, capsys):
    """`dsv2 info --json` of a variant's config."""
    path = tmp_path / f"{name}.json"
    get_config("tiny", **model).save(path)
    capsys.readouterr()
    assert main(["info", str(path), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("suite", ["attention", "rope"])
def test_matched_suites_have_the_reference_total_parameters(suite, tmp_path, capsys):
    s = SUITES[suite]
    counts = {v.name: info(tmp_path, v.name, v.model, capsys) for v in s.variants}
    ref = counts[s.matched_to]["parameters"]["total"]
    for name, d in counts.items():  # within half an FFN unit of every dense layer: 3 * 128 * 4 / 2 parameters
        assert abs(d["parameters"]["total"] - ref) <= 3 * 128 * 4 / 2, name
    if suite == "attention":  # what is compared really differs: Table 1's cache sizes, 4 bytes per element pair
        kv = {n: d["kv_cache"]["config"]["bf16_bytes_per_token"] for n, d in counts.items()}
        assert kv == {"mla": 2 * 4 * (64 + 16), "mha": 2 * 4 * 2 * 8 * 32, "gqa4": 2 * 4 * 2 * 4 * 32,
                      "gqa2": 2 * 4 * 2 * 2 * 32, "mqa": 2 * 4 * 2 * 32}
    else:
        assert {d["config"]["attention_type"] for d in counts.values()} == {"mla"}
        assert {get_config("tiny", **v.model).qk_head_dim for v in s.variants} == {96}


def test_moe_suite_matches_activated_parameters_and_expert_width(tmp_path, capsys):
    s = SUITES["moe"]
    counts = {v.name: info(tmp_path, v.name, v.model, capsys) for v in s.variants}
    ref = counts["deepseekmoe"]
    for name, d in counts.items():  # the gates differ (E x d each): within 0.5% of DeepSeekMoE's activated count
        assert abs(d["activated"]["total"] / ref["activated"]["total"] - 1) < 0.005, name
        if name != "dense":
            assert d["parameters"]["routed_experts"] + d["parameters"]["shared_experts"] == \
                ref["parameters"]["routed_experts"] + ref["parameters"]["shared_experts"], name
    assert counts["gshard"]["config"]["n_shared_experts"] == 0 and counts["dense"]["config"]["moe_layers"] == 0


def test_routing_suite_varies_only_m():
    configs = [get_config("tiny", **v.model) for v in SUITES["routing"].variants]
    assert [c.topk_group for c in configs] == [1, 2, 3, 4, 8]
    assert {(c.n_group, c.num_routed, c.num_experts_per_tok) for c in configs} == {(8, 32, 4)}


def test_seed_spread_ignores_variant_and_seed_offsets():
    base = {"a": {0: 1.0, 1: 1.1, 2: 0.95}, "b": {0: 1.2, 1: 1.28, 2: 1.17}}
    shifted = {n: {s: x + 0.5 * s + (3 if n == "b" else 0) for s, x in v.items()} for n, v in base.items()}
    assert seed_spread(base)[0] == pytest.approx(seed_spread(shifted)[0]) and seed_spread(base)[1] == 2
    assert seed_spread({"a": {0: 1.0}, "b": {0: 2.0}}) is None  # one seed: no spread
    constant = {**base, "c": {0: 0.0, 1: 0.0, 2: 0.0}}  # a variant that never varies says nothing about noise
    assert seed_spread(constant) == seed_spread(base)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(-1, 1), min_size=6, max_size=6), st.floats(-2, 2))
def test_verdicts_follow_the_band(noise, effect):
    values = {"a": {s: 3 + effect + 0.01 * noise[s] for s in range(3)}, "b": {s: 3 + 0.01 * noise[3 + s]
                                                                               for s in range(3)}}
    spread = seed_spread(values)
    lower = verdict(Claim("a is lower", "test", "a", "b", "lower"), values, spread)
    same = verdict(Claim("a is no worse", "test", "a", "b", "not_higher"), values, spread)
    if spread is None:  # noise that happens to be constant
        assert lower["verdict"].startswith("no verdict")
        return
    band, d = lower["band"], lower["difference"]
    assert band == pytest.approx(4.303 * spread[0] * math.sqrt(2 / 3))  # t(0.975, 2 dof) x SE of the difference
    assert d == pytest.approx(effect + 0.01 * (sum(noise[:3]) - sum(noise[3:])) / 3)
    word = "reproduced" if d < -band else "contradicted" if d > band else "within the seed-to-seed spread"
    assert lower["verdict"] == word and same["verdict"].startswith(word)


def ablate(*args, **kw):
    return subprocess.run([sys.executable, "-m", "dsv2", "ablate", *args], capture_output=True, text=True, **kw)


def test_upcycle_suite_stops_on_ctrl_c_resumes_and_reports_from_the_run_dirs(tmp_path):
    out = tmp_path / "ab"
    args = ["upcycle", *TOY, "--steps", "60", "--seeds", "2", "--out", str(out)]
    proc = subprocess.Popen([sys.executable, "-m", "dsv2", "ablate", *args], stderr=subprocess.PIPE,
                            stdout=subprocess.DEVNULL, text=True)
    second = out / "upcycle" / "random_moe" / "seed0"  # the second run (base variants first)
    deadline = time.monotonic() + 300
    while not ((second / "metrics.jsonl").exists() and len((second / "metrics.jsonl").read_text().splitlines()) >= 5):
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)  # inside the training loop: the step ends, a checkpoint is written
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert "stopped at step" in err and "the same command resumes" in err and "Traceback" not in err
    stopped_at = [int(p.name.split("_")[1]) for p in (second / "checkpoints").iterdir()]
    assert stopped_at and max(stopped_at) < 60
    done = ablate(*args, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"resumed from {second / 'checkpoints'}" in done.stderr
    runs = {(v, s): out / "upcycle" / v / f"seed{s}" for v in ("dense_base", "upcycled", "random_moe",
                                                                 "dense_continued") for s in (0, 1)}
    for path in runs.values():
        steps = [json.loads(line)["step"] for line in (path / "metrics.jsonl").read_text().splitlines()]
        assert steps == list(range(1, 61)), path  # every step once: the resumed run went on from its checkpoint
        assert (path / "checkpoints" / "step_0000060").is_dir()
    assert (out / "upcycle" / "init" / "upcycled-seed1" / "config.json").exists()
    # the yaml beside each run is the run: its settings are the ones the run stored
    from dsv2.training.config import LAUNCH, load_train_config

    for (v, s), path in runs.items():
        stored = json.loads((path / "train_config.json").read_text())
        mine = load_train_config(out / "upcycle" / "configs" / f"{v}-seed{s}.yaml").to_dict()
        assert {k: x for k, x in json.loads(json.dumps(mine)).items() if k not in LAUNCH} == \
            {k: x for k, x in stored.items() if k not in LAUNCH}

    # the report's numbers are the run directories': change one final loss, rerun, and the report follows
    report = json.loads((out / "upcycle" / "report.json").read_text())
    first = {(r["variant"], r["seed"]): r["val_loss"] for r in report["runs"]}
    last = json.loads((runs[("upcycled", 1)] / "metrics.jsonl").read_text().splitlines()[-1])
    assert first[("upcycled", 1)] == last["val_loss"]
    lines = (runs[("upcycled", 1)] / "metrics.jsonl").read_text().splitlines()
    lines[-1] = json.dumps({**last, "val_loss": 1.2345})
    (runs[("upcycled", 1)] / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    again = ablate(*args, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "1.2345" in (out / "upcycle" / "report.md").read_text()
    claims = json.loads((out / "upcycle" / "report.json").read_text())["claims"]
    assert claims[0]["a"] == "upcycled" and claims[0]["difference"] == pytest.approx(
        ((first[("upcycled", 0)] - first[("random_moe", 0)]) + (1.2345 - first[("random_moe", 1)])) / 2)
    assert (out / "upcycle" / "upcycle.png").stat().st_size > 0

    other = ablate("upcycle", *TOY, "--steps", "5", "--out", str(out))  # another budget in the same folder
    assert other.returncode == 2 and other.stderr.count("\n") == 1 and "made with steps 60 (here: 5)" in other.stderr


def test_attention_routing_and_balance_measure_into_the_run_dirs(tmp_path):
    out = tmp_path / "ab"
    for suite in ("attention", "routing", "balance"):
        r = ablate(suite, *TOY, "--seeds", "1", "--out", str(out), timeout=600)
        assert r.returncode == 0, r.stderr[-3000:]
        assert "no verdict: one seed" in r.stdout
    for v in ("mla", "mha", "mqa"):
        m = json.loads((out / "attention" / v / "seed0" / "ablate.json").read_text())
        assert m["decode_ms"] > 0 and m["wall_s"] > 0
    for v in SUITES["routing"].variants:
        m = json.loads((out / "routing" / v.name / "seed0" / "ablate.json").read_text())
        M = v.model["topk_group"]
        assert 1 <= m["devices_per_token"] <= M and 0 <= m["off_device_copies"] <= m["devices_per_token"]
    assert "off-device copies/token" in (out / "routing" / "report.md").read_text()
    runs = {r["variant"]: r for r in json.loads((out / "balance" / "report.json").read_text())["runs"]}
    for name, r in runs.items():  # 8 device groups: a device's share is between 1/8 (balanced) and 1 (all of it)
        assert 1 <= r["device_load"] <= 8 and r["expert_load"] >= 1
        assert (r["dropped"] == 0) == (name in ("no_dropping", "neither")), name


def test_the_command_offers_every_suite():
    from dsv2.cli import build_parser

    ablate_parser = build_parser()._subparsers._group_actions[0].choices["ablate"]
    suite_arg = next(a for a in ablate_parser._actions if a.dest == "suite")
    assert list(suite_arg.choices) == [*SUITES, "all"]


@pytest.mark.parametrize("args, message", [
    (["nosuch"], "invalid choice"),
    (["moe", "--seeds", "0"], "--seeds must be >= 1"),
    (["moe", "--steps", "0"], "--steps must be >= 1"),
])
def test_bad_arguments_are_one_line_errors(args, message, tmp_path):
    r = ablate(*args, "--out", str(tmp_path / "x"))
    assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr
