"""The GPU device check, without a GPU: its CPU dry run end to end, the result schema, the summary, partial
results when a suite is stopped, and the README table generated from bench/results.

GPU time is scarce, so ``bench/device_check.sh`` must work the first time it meets a GPU; this dry run (tiny
shapes, Triton interpreted) keeps the script, the runner and the JSON/summary formats from rotting in between.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import textwrap

import pytest
from bench_modules import ROOT, checkout_on_path

with checkout_on_path():  # bench/ is in the checkout, not in the installed wheel
    from bench.common import SUITES, target
    from bench.device_check import DEVICE_PLAN, DRY_PLAN
    from bench.results_table import BEGIN, END, render_readme, table, targets_of

TOOL_NAME = re.compile(r"^[A-Za-z0-9._-]+$")  # what the device tool brings back from $OUT


def _env(**extra):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TRITON_INTERPRET": "1", "PYTHON": sys.executable, **extra}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    return env


def _check_target(t):
    assert {"name", "measured", "goal", "op", "unit", "met", "note"} <= t.keys(), t
    assert t["op"] in (">=", "<=")
    if t["measured"] is None:
        assert t["met"] is None
    else:
        assert t["met"] == (t["measured"] >= t["goal"] if t["op"] == ">=" else t["measured"] <= t["goal"])


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("device_check_out")
    r = subprocess.run(
        ["bash", str(ROOT / "bench" / "device_check.sh"), "--dry-run"],
        cwd=ROOT,
        env=_env(OUT=str(out)),
        capture_output=True,
        text=True,
        timeout=900,
    )
    return r, out


def test_dry_run_writes_one_result_per_suite_a_summary_and_a_log(dry_run):
    r, out = dry_run
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    files = sorted(p.name for p in out.iterdir())
    assert len(files) <= 8, files  # the device tool returns at most 8 files from $OUT
    assert all(TOOL_NAME.match(f) for f in files), files
    assert not [f for f in files if f.endswith(".tmp")], files
    for step in DRY_PLAN:
        assert [f for f in files if f.startswith(step.suite + "-") and f.endswith(".json")], (
            step.suite,
            files,
        )
    assert [f for f in files if f.startswith("summary-") and f.endswith(".md")], files
    assert [f for f in files if f.startswith("device-check-") and f.endswith(".log")], files


def test_dry_run_results_follow_the_schema(dry_run):
    _, out = dry_run
    for path in out.glob("*.json"):
        data = json.loads(path.read_text())
        assert data["schema_version"] == 1 and data["complete"] is True, path.name
        assert {"device", "torch", "triton", "commit", "date"} <= data["env"].keys()
        assert isinstance(data["args"], dict) and data["wall_s"] > 0
        assert data["rows"] and all(isinstance(row, dict) for row in data["rows"]), path.name
        assert data["targets"], f"{path.name}: no measured-vs-goal targets"
        for t in data["targets"]:
            _check_target(t)


def test_dry_run_summary_lists_every_suite_and_target(dry_run):
    _, out = dry_run
    text = next(out.glob("summary-*.md")).read_text()
    assert "## Targets" in text and "## Suites" in text
    for step in DRY_PLAN:
        assert re.search(rf"^\| {step.suite} \| ok \|", text, re.M), step.suite
    for path in out.glob("*.json"):
        for t in json.loads(path.read_text())["targets"]:
            assert t["name"] in text


def test_a_stopped_suite_keeps_the_rows_it_finished(tmp_path):
    """SIGTERM in the middle of a suite (the device check's time limit): the finished rows are written,
    marked incomplete, and the runner exits 124."""
    (tmp_path / "halfway_suite.py").write_text(
        textwrap.dedent(
            """
            import os, signal, time

            def run(args):
                args.result_rows.append({"row": 1})
                args.result_rows.append({"row": 2})
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(30)
                args.result_rows.append({"row": 3})
                return args.result_rows
            """
        )
    )
    script = (
        "import sys; import bench.common as c; c.SUITES['halfway'] = 'halfway_suite'; "
        "from bench.__main__ import main; sys.exit(main(sys.argv[1:]))"
    )
    r = subprocess.run(
        [sys.executable, "-c", script, "halfway", "--out", str(tmp_path / "out"), "--no-plot"],
        cwd=ROOT,
        env=_env(PYTHONPATH=os.pathsep.join([str(ROOT), str(tmp_path)])),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 124, r.stderr[-2000:]
    data = json.loads(next((tmp_path / "out").glob("halfway-*.json")).read_text())
    assert data["complete"] is False and data["stopped_by"] == "SIGTERM"
    assert data["rows"] == [{"row": 1}, {"row": 2}]


def test_suite_past_its_limit_is_stopped(tmp_path):
    from bench.device_check import Step, run_suite

    log = open(tmp_path / "log", "w")  # noqa: SIM115
    try:
        entry = run_suite(Step("arena", ["--prompts", "2", "--rows", "8"], 1), tmp_path, 1.0, log)
    finally:
        log.close()
    assert entry["status"].startswith(("stopped", "killed")), entry


def test_targets_compare_in_the_stated_direction():
    assert target("a", 0.9, 0.85)["met"] is True
    assert target("b", 6.0, 5.0, "<=", "us")["met"] is False
    assert target("c", None, 1.0)["met"] is None
    with pytest.raises(ValueError):
        target("d", 1.0, 1.0, ">")


def test_results_table_puts_gpu_runs_first_and_derives_targets(tmp_path):
    def write(name, suite, device, rows, **extra):
        env = {"device": device, "date": "2026-12-01T00:00:00+00:00"}
        (tmp_path / name).write_text(json.dumps({"suite": suite, "env": env, "rows": rows, **extra}))

    write(
        "stage-cpu.json",
        "stage",
        "cpu-x86_64-1threads",
        [
            {"model": "tiny", "impl": "ours", "images_per_s": 2.0},
            {"model": "tiny", "impl": "official", "images_per_s": 1.0},
        ],
    )
    gpu_targets = [target("fwd N=1280 bf16: fraction of copy bandwidth", 0.9, 0.85)]
    write(
        "ddim-h100.json",
        "ddim_logprob",
        "NVIDIA H100 80GB HBM3",
        [{"x": 1}],
        targets=gpu_targets,
        complete=False,
    )
    text = table(tmp_path)
    lines = [ln for ln in text.splitlines() if ln.startswith("| ") and "---" not in ln][1:]
    assert "H100" in lines[0] and "pass" in lines[0] and "(partial run)" in lines[0]
    assert "stage tiny: ours vs official-style" in lines[1] and "**miss**" in lines[1]  # 2× < 3×
    assert "No GPU run" not in text
    assert targets_of({"suite": "dfusion", "rows": [{"impl": "engine", "unet": "sd21", "speedup": 2.5}]})[0][
        "met"
    ]


def test_readme_block_is_replaced_and_nothing_else():
    text = f"intro\n{BEGIN}\nold table\n{END}\nrest\n"
    assert render_readme(text, "new") == f"intro\n{BEGIN}\nnew\n{END}\nrest\n"


def test_readme_measured_table_is_up_to_date():
    r = subprocess.run(
        [sys.executable, "-m", "bench.results_table", "--check"],
        cwd=ROOT,
        env=_env(),
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stdout + r.stderr


def test_readme_learning_table_is_up_to_date():
    from bench.learning import BEGIN, END, table

    text = (ROOT / "README.md").read_text()
    assert render_readme(text, table(), BEGIN, END) == text, "run: python -m bench.learning table --write"


def test_a_focused_call_gives_its_suites_the_time_left():
    """Full check: each suite at most its planned budget. ``--suites``: all that is left but the later suites'
    minimum start times (a second call must not stop D-Fusion at 100 s with 300 s to spare)."""
    from bench.device_check import DEVICE_PLAN, Step, suite_limit

    plan = [Step("a", [], 100, min_s=40), Step("b", [], 150, min_s=60), Step("c", [], 50, min_s=20)]
    assert suite_limit(plan, 0, 500, focused=False) == 100
    assert suite_limit(plan, 0, 30, focused=False) == 30
    assert suite_limit(plan, 0, 500, focused=True) == 500 - 60 - 20
    assert suite_limit(plan, 1, 300, focused=True) == 300 - 20
    assert suite_limit(plan, 2, 90, focused=True) == 90
    assert suite_limit(plan, 0, 70, focused=True) == 40  # never below its own minimum while it fits
    assert {s.suite for s in DEVICE_PLAN} >= {"stage", "dfusion"}


def test_every_learning_arm_can_be_chosen_alone_with_arms():
    """``--arms`` takes a comma list, so an arm name with a comma could never be run on its own."""
    from bench.learning import SUITES as LEARNING_SUITES
    from bench.learning import main

    for suite, arms in LEARNING_SUITES.items():
        for arm in arms:
            assert "," not in arm, f"{suite}: arm {arm!r} has a comma, which --arms splits on"
    with pytest.raises(SystemExit) as e:  # an unknown arm is refused before any run starts
        main(["sparse_brightness", "--arms", "b2,no such arm"])
    assert e.value.code == 2


def test_every_planned_suite_accepts_its_device_arguments():
    """The device plan names options of suites that others may change: parse them here, not first on a GPU."""
    import argparse
    import importlib

    with checkout_on_path():
        for step in DEVICE_PLAN + DRY_PLAN:
            module = importlib.import_module(SUITES[step.suite])
            parser = argparse.ArgumentParser(prog=step.suite, exit_on_error=False)
            module.add_args(parser)
            parser.parse_args(step.args)


def test_learning_summary_gives_the_paired_gain_at_every_evaluation():
    """bench.learning.summarise_run against numpy: paired mean and standard error of after − before per image,
    for the final evaluation and each intermediate one (``eval.every``)."""
    import numpy as np

    from bench.learning import summarise_run

    rng = np.random.default_rng(0)
    before = rng.random(16)
    mids = [before + rng.normal(0.02 * k, 0.1, 16) for k in (1, 2, 3)]
    metrics = [{"kind": "eval", "stage": 0, "rewards": before.tolist(), "reward_mean": float(before.mean())}]
    for k, r in enumerate(mids, 1):
        metrics.append({"kind": "stage", "stage": 4 * k - 1, "reward_mean": 0.5})
        metrics.append(
            {"kind": "eval", "stage": 4 * k, "rewards": r.tolist(), "reward_mean": float(r.mean())}
        )
    out = summarise_run(metrics)
    assert [c[0] for c in out["gain_curve"]] == [4, 8, 12] and out["stages"] == 3
    for (_, gain, se), r in zip(out["gain_curve"], mids):
        d = r - before
        assert gain == pytest.approx(d.mean()) and se == pytest.approx(d.std(ddof=1) / np.sqrt(16))
    assert (
        out["gain"] == pytest.approx((mids[-1] - before).mean())
        and out["gain_se"] == out["gain_curve"][-1][2]
    )


def test_word_sanity_rewards_follow_the_named_word():
    """bench.sanity_rewards: ± the mean pixel value, the sign set by the relation (or first colour) word."""
    import torch

    from bench.sanity_rewards import colour_brightness, relation_brightness

    prompts = [
        "a red circle to the left of a blue square",
        "a red circle to the right of a blue square",
        "a blue circle above a red square",
        "a yellow square below a green circle",
        "two green triangles",
    ]
    images = torch.stack([torch.full((3, 4, 4), v) for v in (0.1, 0.2, 0.3, 0.4, 0.5)])
    assert torch.allclose(relation_brightness(images, prompts), torch.tensor([0.1, -0.2, 0.3, -0.4, 0.0]))
    assert torch.allclose(colour_brightness(images, prompts), torch.tensor([0.1, 0.2, -0.3, -0.4, 0.5]))


def test_learning_pools_the_gain_and_the_gold_change_over_seeds():
    """Hand values: per-seed gains 0.1 and 0.3 (s.e. over seeds = std 0.1414 / √2 = 0.1); pooled per-image
    gains 0.1, 0.1, 0.2, 0.4 (mean 0.2, unbiased std √0.02, s.e. √0.02 / 2); gold changes −0.02 and 0."""
    from bench.learning import pool_arm

    def run(seed, gain, per_image, gold, per_image_gold):
        return {
            **{"seed": seed, "gain": gain, "gain_se": 0.01, "per_image_gain": per_image},
            **{"heldout_before": 0.3, "heldout_after": 0.3 + gain, "wall_s": 10.0},
            **{
                "gold_gain": gold,
                "gold_gain_se": 0.02,
                "per_image_gold_gain": per_image_gold,
                "gold_before": 0.6,
            },
        }

    s = pool_arm([run(1, 0.1, [0.1, 0.1], -0.02, [0.0, -0.04]), run(2, 0.3, [0.2, 0.4], 0.0, [0.0, 0.0])])
    assert s["gain_mean"] == pytest.approx(0.2) and s["gain_se_over_seeds"] == pytest.approx(0.1)
    assert s["pooled_gain"] == pytest.approx(0.2) and s["pooled_gain_se"] == pytest.approx(0.02**0.5 / 2)
    assert s["seeds_above_3se"] == 2 and s["after_mean"] == pytest.approx(0.5)
    assert s["gold_mean"] == pytest.approx(-0.01) and s["gold_se_over_seeds"] == pytest.approx(0.01)
    assert s["gold_pooled"] == pytest.approx(-0.01) and s["gold_per_seed"] == [
        (1, -0.02, 0.02),
        (2, 0.0, 0.02),
    ]
    gold_pooled_se = (sum((x + 0.01) ** 2 for x in (0.0, -0.04, 0.0, 0.0)) / 3) ** 0.5 / 2
    assert s["gold_pooled_se"] == pytest.approx(gold_pooled_se)
    no_gold = {
        k: v
        for k, v in run(1, 0.1, [0.1, 0.2], 0.0, [0.0, 0.0]).items()
        if not k.startswith(("gold", "per_image_gold"))
    }
    assert not any(k.startswith("gold") for k in pool_arm([no_gold]))  # runs without a gold reward


def test_learning_summary_leaves_out_images_without_a_score():
    """metrics.jsonl stores a NaN score as null: that image drops out of the paired numbers instead of
    crashing the suite after every run has finished."""
    from bench.learning import pool_arm, summarise_run

    evals = [
        {
            "kind": "eval",
            "stage": 0,
            "reward_mean": 0.5,
            "rewards": [0.0, 1.0, 0.5],
            "gold_mean": 0.4,
            "gold_rewards": [0.2, None, 0.6],
        },
        {
            "kind": "eval",
            "stage": 2,
            "reward_mean": 0.75,
            "rewards": [0.5, 1.0, 0.75],
            "gold_mean": None,
            "gold_rewards": [0.3, 0.1, None],
        },
    ]
    run = {"seed": 7, "wall_s": 1.0, **summarise_run(evals)}
    assert run["gain"] == pytest.approx(0.25) and run["gold_gain"] == pytest.approx(
        0.1
    )  # only image 0 has both
    assert math.isnan(run["per_image_gold_gain"][1]) and math.isnan(run["gold_after"])
    s = pool_arm([run])
    assert s["gold_pooled"] == pytest.approx(0.1) and s["gold_before_mean"] == pytest.approx(0.4)


def test_learning_results_name_the_model_and_device_the_runs_used(tmp_path):
    """bench.learning reads the model and device from the arguments it passes to every run: the embedded toy's
    version by default, ``sd_shaped-<size>`` for a bench/sd_shaped.py folder, the folder's name otherwise."""
    import json

    from bench.learning import model_label, run_device, toy_version, train_option

    extra = ["--set", "eval.every=4", "--model", "/a", "--set", "model.device=cpu", "--model", "/b"]
    assert train_option(extra, flag="--model", key="model.path") == "/b"  # the last one wins, as in the CLI
    assert train_option(extra, key="model.device") == "cpu" and train_option([], key="model.device") is None
    assert model_label([]) == toy_version() and toy_version().startswith("v")
    folder = tmp_path / "sd"
    folder.mkdir()
    index = {"b2diffurl_toy": {"size": "small", "command": "python -m bench.sd_shaped --size small --seed 0"}}
    (folder / "model_index.json").write_text(json.dumps(index))
    assert model_label(["--model", str(folder)]) == "sd_shaped-small"
    assert model_label(["--set", f"model.path={tmp_path}"]) == tmp_path.name  # not a toy checkpoint
    assert run_device(["--set", "model.device=cpu"]).startswith("cpu-") and run_device([]).startswith("cpu-")
