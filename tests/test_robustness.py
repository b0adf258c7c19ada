"""Nothing lost, nothing silent: run directories, checkpoints (checksums, fallback, a crash at every save
point), preemption, and every configuration / command-line value checked before any work."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from b2diffurl import checkpoint
from b2diffurl import config as C
from b2diffurl.cli import main
from b2diffurl.config.validation import RANGES
from b2diffurl.preemption import EXIT_INTERRUPTED, StopSignal


# ----------------------------------------------------------------------------------------------- config ranges
def _outside(interval: str, is_int: bool):
    """A value just outside ``interval`` (below the lower end, else above the upper end)."""
    lo, hi = (float(p) for p in interval[1:-1].split(","))
    if math.isfinite(lo):
        bad = lo if interval[0] == "(" else lo - (1 if is_int else 0.5)
    else:
        bad = hi if interval[-1] == ")" else hi + 1
    return int(bad) if is_int else bad


@pytest.mark.parametrize("key", sorted(RANGES))
def test_every_range_is_enforced_with_name_and_range(key):
    default = {k: v for k, _f, v, _t in C.iter_fields()}[key]
    is_int = isinstance(default, int) and not isinstance(default, bool)
    bad = _outside(RANGES[key], is_int)
    with pytest.raises(C.ConfigError) as info:
        C.load_config(overrides={key: bad})
    msg = str(info.value)
    assert f"{key} must be in {RANGES[key]}" in msg and "\n" not in msg


@pytest.mark.parametrize(
    "key", ["sample.guidance_scale", "sample.eta", "train.lr", "train.adam_beta1", "b2.pos_threshold"]
)
@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_non_finite_numbers_are_refused(key, value):
    with pytest.raises(C.ConfigError, match=rf"{key} must be a finite number"):
        C.load_config(overrides={key: value})


@pytest.mark.parametrize(
    "over,msg",
    [
        ({"b2.pos_threshold": -1.0, "b2.neg_threshold": 1.0}, "neg_threshold=1.0 is above b2.pos_threshold"),
        ({"model.device": "tpu"}, "device 'tpu' is unknown"),
        ({"model.device": "cuda:x"}, "device 'cuda:x' is unknown"),
        ({"dfusion.item_thresholds": {"circle": float("nan")}}, "item_thresholds.circle must be a finite"),
        ({"reward_options": {"scale": float("inf")}}, "reward_options.scale must be a finite"),
        ({"prompts": "toy:nonsense"}, "toy categories are"),
        ({"eval.prompts": "/no/such.txt"}, "eval.prompts: prompt set '/no/such.txt'"),
    ],
    ids=["thresholds", "device", "device-index", "nested-nan", "reward-option-inf", "category", "file"],
)
def test_other_bad_values(over, msg):
    with pytest.raises(C.ConfigError, match=msg):
        C.load_config(overrides=over)


def test_on_off_options_read_booleans_and_refuse_other_words():
    # YAML reads on/off as booleans, and run configs written before sample.cuda_graphs took auto|on|off hold one
    for given, want in ((True, "on"), (False, "off"), ("auto", "auto"), ("off", "off")):
        assert C.load_config(overrides={"sample.cuda_graphs": given}).sample.cuda_graphs == want
    with pytest.raises(C.ConfigError, match="cuda_graphs"):
        C.load_config(overrides={"sample.cuda_graphs": "sometimes"})


def test_official_and_toy_presets_are_valid():
    for preset in C.PRESETS:
        C.validate(C.load_config(overrides={"preset": preset}))


def test_toy_policy_gradient_runs_default_to_the_sparse_reward_and_a_named_reward_drops_its_options():
    """The toy preset trains B² and DDPO on the sparse brightness reward (threshold 0.09); naming another reward
    leaves the preset's reward options out (the toy reward takes none), and D-Fusion keeps the toy reward."""
    for algo in ("b2", "ddpo"):
        cfg = C.load_config(overrides={"algo": algo})
        assert (cfg.preset, cfg.reward, cfg.reward_options) == ("toy", "brightness", {"threshold": 0.09})
    cfg = C.load_config(overrides={"reward": "toy"})
    assert (cfg.reward, cfg.reward_options) == ("toy", {})
    assert C.load_config(overrides=["reward=jpeg_compressibility"]).reward_options == {}
    assert C.load_config(overrides=["reward_options.threshold=0.2"]).reward_options == {"threshold": 0.2}
    cfg = C.load_config(overrides={"algo": "dfusion"})
    assert (cfg.reward, cfg.reward_options) == ("toy", {})
    assert C.load_config(overrides={"preset": "official"}).reward == "clip"


# ----------------------------------------------------------------------------------------------- CLI user errors
def _one_line_exit_2(capsys, argv, needle):
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2, err
    assert needle in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


@pytest.mark.parametrize(
    "argv,needle",
    [
        (["sample", "--prompt", "x", "--n", "0"], "--n must be in [1, inf), got 0"),
        (["sample", "--prompt", "x", "--steps", "0"], "--steps must be in [1, inf)"),
        (["sample", "--prompt", "x", "--eta", "1.5"], "--eta must be in (0, 1], got 1.5"),
        (["sample", "--prompt", "x", "--cfg", "nan"], "--cfg must be a finite number"),
        (["sample", "--prompt", "x", "--cfg", "0.5"], "--cfg must be in [1, inf)"),
        (["sample", "--prompt", "x", "--device", "gpu"], "device 'gpu' is unknown"),
        (["sample", "--prompt", "x", "--model", "/no/model"], "--model '/no/model' is neither"),
        (["sample", "--prompt", "x", "--out", "/dev/null/grid.png"], "is not a writable directory"),
        (["eval", "--max-prompts", "0"], "--max-prompts must be in [1, inf)"),
        (["eval", "--n-per-prompt", "0"], "--n-per-prompt must be in [1, inf)"),
        (["eval", "--reward", "nope"], "unknown reward 'nope'"),
        (["eval", "--prompts", "toy:bogus"], "toy categories are"),
    ],
)
def test_sample_eval_options_checked_before_loading(capsys, tmp_path, monkeypatch, argv, needle):
    monkeypatch.chdir(tmp_path)
    _one_line_exit_2(capsys, argv, needle)
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_train_refuses_a_non_empty_run_directory(capsys, tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"kind": "stage"}\n')
    _one_line_exit_2(capsys, ["train", "--out", str(tmp_path)], f"--resume {str(tmp_path)!r}")
    assert (tmp_path / "metrics.jsonl").read_text() == '{"kind": "stage"}\n'


def test_train_bad_value_writes_nothing(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _one_line_exit_2(capsys, ["train", "--set", "train.adv_clip=-1"], "train.adv_clip must be in (0, inf)")
    _one_line_exit_2(capsys, ["train", "--set", "sample.guidance_scale=nan"], "must be a finite number")
    assert list(tmp_path.iterdir()) == []


def test_resume_refuses_a_changed_config_but_allows_safe_keys():
    saved = C.load_config(overrides={"stages": 3})
    assert C.resume_differences(saved, C.load_config(overrides={"stages": 9, "grid_every": 1})) == []
    diff = C.resume_differences(saved, C.load_config(overrides={"stages": 3, "train.lr": 1e-3}))
    assert diff == [f"train.lr: {saved.train.lr} -> 0.001"] and saved.train.lr != 1e-3


# ----------------------------------------------------------------------------------------------- checkpoints
def _state(v: float) -> dict:
    return {"next_stage": 0, "weights": torch.full((64,), v)}


def _save_two(root: Path) -> None:
    checkpoint.save(root, 1, _state(1.0))
    checkpoint.save(root, 2, _state(2.0))


def test_checksum_detects_a_flipped_byte_and_resume_falls_back(tmp_path, caplog):
    root = tmp_path / "checkpoints"
    _save_two(root)
    blob = bytearray((root / "stage_00002" / "state.pt").read_bytes())
    blob[len(blob) // 2] ^= 0x40
    (root / "stage_00002" / "state.pt").write_bytes(bytes(blob))
    with pytest.raises(checkpoint.CheckpointError, match="checksum mismatch in state.pt"):
        checkpoint.load(root / "stage_00002")
    with caplog.at_level("WARNING"):
        found = checkpoint.find(tmp_path)
    assert found.name == "stage_00001" and "stage_00002: checksum mismatch" in caplog.text
    assert torch.equal(checkpoint.load(found)["weights"], torch.full((64,), 1.0))


@pytest.mark.parametrize(
    "latest", [None, "", "stage_00009\n", "garbage\x00\n"], ids=["missing", "empty", "gone", "junk"]
)
def test_bad_latest_falls_back_to_newest_intact(tmp_path, latest):
    root = tmp_path / "checkpoints"
    _save_two(root)
    if latest is None:
        (root / "LATEST").unlink()
    else:
        (root / "LATEST").write_text(latest)
    assert checkpoint.find(tmp_path).name == "stage_00002"


def test_truncated_and_unlisted_files_are_not_intact(tmp_path):
    root = tmp_path / "checkpoints"
    _save_two(root)
    state = root / "stage_00002" / "state.pt"
    state.write_bytes(state.read_bytes()[:100])
    assert "checksum mismatch" in checkpoint.verify(root / "stage_00002")
    (root / "stage_00001" / "extra.bin").write_bytes(b"x")
    assert "files differ" in checkpoint.verify(root / "stage_00001")
    with pytest.raises(checkpoint.CheckpointError, match="no intact checkpoint"):
        checkpoint.find(tmp_path)


_SAVE_POINTS = [
    ("torch", "save"),
    ("b2diffurl.checkpoint", "_write_sums"),
    ("b2diffurl.checkpoint", "_fsync_tree"),
    ("b2diffurl.checkpoint", "fsync_dir"),
    ("os", "replace"),
    ("shutil", "rmtree"),
]


def _count_points(root: Path) -> int:
    """How many save points a re-save of stage 2 passes (each call of the functions above)."""
    import importlib

    calls = []
    originals = {}
    for mod, name in _SAVE_POINTS:
        m = importlib.import_module(mod)
        originals[(m, name)] = fn = getattr(m, name)
        setattr(m, name, lambda *a, _fn=fn, _n=name, **k: (calls.append(_n), _fn(*a, **k))[1])
    try:
        checkpoint.save(root, 2, _state(3.0))
    finally:
        for (m, name), fn in originals.items():
            setattr(m, name, fn)
    return len(calls)


def test_a_crash_at_every_save_point_keeps_an_intact_checkpoint(tmp_path):
    """Re-save stage 2 in a forked child killed (os._exit, no cleanup) at save point k, for every k; the
    parent must then find an intact stage 2 (old or new content), and no temporary files remain."""
    import importlib
    import shutil

    probe = tmp_path / "probe" / "checkpoints"
    _save_two(probe)
    n_points = _count_points(probe)
    assert n_points >= 8
    for k in range(n_points):
        run = tmp_path / f"run{k}"
        _save_two(run / "checkpoints")
        pid = os.fork()
        if pid == 0:  # child: crash at the k-th save point
            count = [0]
            for mod, name in _SAVE_POINTS:
                m = importlib.import_module(mod)
                fn = getattr(m, name)

                def crashing(*a, _fn=fn, _count=count, _k=k, **kw):
                    if _count[0] == _k:
                        os._exit(9)
                    _count[0] += 1
                    return _fn(*a, **kw)

                setattr(m, name, crashing)
            checkpoint.save(run / "checkpoints", 2, _state(3.0))
            os._exit(0)
        _, status = os.waitpid(pid, 0)
        assert os.WEXITSTATUS(status) == 9, f"save point {k} was not reached"
        found = checkpoint.find(run)
        assert found.name == "stage_00002", k
        assert float(checkpoint.load(found)["weights"][0]) in (2.0, 3.0), k
        leftovers = [p.name for p in (run / "checkpoints").iterdir() if p.name.startswith(".")]
        assert leftovers == [], (k, leftovers)
        shutil.rmtree(run)


def test_failed_write_removes_its_temp_files(tmp_path, monkeypatch):
    root = tmp_path / "checkpoints"
    _save_two(root)

    def disk_full(obj, path, *a, **k):
        Path(path).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(OSError, match="disk full"):
        checkpoint.save(root, 3, _state(3.0))
    with pytest.raises(OSError, match="disk full"):
        checkpoint.atomic_write(root / "x.pt", lambda p: torch.save({}, p))
    monkeypatch.undo()
    assert sorted(p.name for p in root.iterdir()) == ["LATEST", "stage_00001", "stage_00002"]


def test_default_out_is_a_fresh_dir_with_a_latest_link(tmp_path):
    first = checkpoint.new_run_dir(tmp_path)
    first.mkdir()
    checkpoint.point_latest(first)
    second = checkpoint.new_run_dir(tmp_path)
    assert second != first and not second.exists()
    second.mkdir()
    checkpoint.point_latest(second)
    assert (tmp_path / "latest").resolve() == second.resolve()


def test_metrics_log_never_writes_nan(tmp_path, caplog):
    from b2diffurl.report import MetricsLog

    metrics = MetricsLog(tmp_path / "metrics.jsonl")
    with caplog.at_level("WARNING"):
        metrics.append({"kind": "eval", "reward_mean": float("nan"), "rewards": [0.5, float("inf")], "n": 2})
    line = (tmp_path / "metrics.jsonl").read_text()

    def refuse(constant):
        raise AssertionError(f"{constant} in metrics.jsonl")

    assert json.loads(line, parse_constant=refuse) == {
        "kind": "eval",
        "reward_mean": None,
        "rewards": [0.5, None],
        "n": 2,
    }
    assert "reward_mean, rewards" in caplog.text


# ----------------------------------------------------------------------------------------------- preemption
def test_second_sigint_interrupts_at_once():
    before = signal.getsignal(signal.SIGINT)  # default_int_handler, or SIG_IGN in a background job
    with StopSignal(timeout_s=60) as stop:
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.requested
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is before  # the handler in place before is restored


def test_watchdog_bounds_the_stop_of_a_blocked_run():
    """A process that never reaches a stopping point (e.g. a reward that blocks) exits with the interrupted
    code stop_timeout_s after SIGTERM."""
    code = (
        "import os, signal, time\n"
        "from b2diffurl.preemption import StopSignal\n"
        "with StopSignal(timeout_s=0.5):\n"
        "    os.kill(os.getpid(), signal.SIGTERM)\n"
        "    time.sleep(60)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], timeout=30, capture_output=True, text=True)
    assert proc.returncode == EXIT_INTERRUPTED, proc.stderr
    assert "stop_timeout_s" in proc.stderr


def test_interrupted_exit_code_is_documented():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert f"| {EXIT_INTERRUPTED} |" in readme and "| 2 |" in readme


def test_a_reward_named_on_resume_replaces_the_saved_reward_options(tmp_path):
    """A default toy run saves the sparse reward's threshold; resuming it with --set reward=toy must not hand
    that threshold to the toy reward, while resuming without naming a reward keeps it."""
    import yaml

    from b2diffurl.cli import build_parser, config_from_args

    (tmp_path / "config.yaml").write_text(yaml.safe_dump(C.to_dict(C.load_config())))

    def resumed(*extra):
        return config_from_args(build_parser().parse_args(["train", "--resume", str(tmp_path), *extra]))[0]

    assert (resumed().reward, resumed().reward_options) == ("brightness", {"threshold": 0.09})
    assert (resumed("--set", "reward=toy").reward, resumed("--set", "reward=toy").reward_options) == (
        "toy",
        {},
    )
    cfg = resumed("--set", "reward=brightness", "--set", "reward_options.threshold=0.2")
    assert (cfg.reward, cfg.reward_options) == ("brightness", {"threshold": 0.2})


def test_config_layers_share_one_reward_options_rule(tmp_path):
    """Preset, saved run and the user's YAML plus --set are layers of load_config: a reward the user names
    leaves the preset's and the saved run's reward options out, while the user's own YAML options stay, also
    when the flags name the same reward again (as the CLI always allowed)."""
    import yaml

    from b2diffurl.cli import build_parser, config_from_args

    saved = C.to_dict(C.load_config(overrides={"reward_options.threshold": 0.2}))
    assert C.load_config(saved=saved).reward_options == {"threshold": 0.2}
    assert C.load_config(saved=saved, overrides={"reward": "toy"}).reward_options == {}
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text(yaml.safe_dump({"reward": "brightness", "reward_options": {"threshold": 0.3}}))
    assert C.load_config(str(cfg_file), saved=saved).reward_options == {"threshold": 0.3}
    for extra in (["--set", "reward=brightness"], ["--reward", "brightness"], []):
        args = build_parser().parse_args(["train", "--config", str(cfg_file), *extra])
        assert config_from_args(args)[0].reward_options == {"threshold": 0.3}, extra
    # a YAML that names no reward leaves the saved reward and its options in place
    cfg_file.write_text(yaml.safe_dump({"train": {"lr": 5e-5}}))
    cfg = C.load_config(str(cfg_file), saved=saved)
    assert (cfg.reward, cfg.reward_options, cfg.train.lr) == ("brightness", {"threshold": 0.2}, 5e-5)
    # on --resume the run's own directory wins over an `out` in the YAML
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.yaml").write_text(yaml.safe_dump(saved))
    cfg_file.write_text(yaml.safe_dump({"out": str(tmp_path / "elsewhere")}))
    args = build_parser().parse_args(["train", "--resume", str(tmp_path / "run"), "--config", str(cfg_file)])
    assert config_from_args(args)[0].out == str(tmp_path / "run")
