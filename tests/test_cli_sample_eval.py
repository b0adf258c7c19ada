"""CLI smoke tests: sample, eval, info, and the train hook (toy model, 2 DDIM steps)."""

import json

from PIL import Image

from b2diffurl.cli import build_parser, main


def test_sample_writes_grid(tmp_path):
    out = tmp_path / "grid.png"
    assert (
        main(
            [
                "sample",
                "--model",
                "toy",
                "--prompt",
                "a red circle",
                "--n",
                "4",
                "--steps",
                "2",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    img = Image.open(out)
    assert img.size[0] >= 2 * 96 and img.mode == "RGB"


def test_eval_reports_per_category(tmp_path, capsys):
    js, grid = tmp_path / "e.json", tmp_path / "e.png"
    rc = main(
        [
            "eval",
            "--model",
            "toy",
            "--reward",
            "toy",
            "--prompts",
            "toy:heldout:single",
            "--n-per-prompt",
            "2",
            "--steps",
            "2",
            "--out",
            str(grid),
            "--json",
            str(js),
        ]
    )
    assert rc == 0 and grid.is_file()
    rep = json.loads(js.read_text())
    assert set(rep["by_category"]) == {"single", "all"}
    from b2diffurl.toy.prompts import heldout_prompts

    assert rep["by_category"]["single"]["n"] == rep["n_images"] == 2 * len(heldout_prompts("single"))
    assert 0 <= rep["by_category"]["all"]["mean"] <= 1
    assert "single" in capsys.readouterr().out


def test_eval_user_errors_are_one_line_exit_2(tmp_path, capsys):
    rc = main(["eval", "--reward", "nope", "--steps", "2", "--out", str(tmp_path / "x.png")])
    err = capsys.readouterr().err
    assert rc == 2 and "unknown reward 'nope'" in err and len(err.strip().splitlines()) == 1
    rc = main(["eval", "--prompts", "bogus", "--steps", "2"])
    err = capsys.readouterr().err
    assert rc == 2 and "prompt set 'bogus'" in err and "Traceback" not in err


def test_info_and_train_hook(capsys):
    assert main(["info"]) == 0
    assert "b2kernels" in capsys.readouterr().out
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    assert {"train", "sample", "eval", "info"} <= set(sub.choices)
