"""Quality metrics on known inputs, the judge, and the eval harness end to end."""
import argparse
import json
import math

import pytest
import torch

from asyncdiff_rt import evaluation as ev
from asyncdiff_rt.models import shapes


def test_psnr_and_max_diff_on_known_inputs():
    a = torch.zeros(2, 3, 4, 4)
    assert torch.isinf(ev.psnr(a, a)).all()
    assert ev.psnr(a, a + 0.1).sub(20.0).abs().max() < 1e-6  # mse 0.01 -> 20 dB
    assert ev.max_abs_diff(a, a + 0.25) == pytest.approx(0.25)


def test_frechet_distance_of_a_set_with_itself_is_zero():
    g = torch.Generator().manual_seed(0)
    f = torch.randn(300, 16, generator=g)
    assert ev.frechet_distance(f, f) == pytest.approx(0.0, abs=1e-6)
    # a pure shift by s in every dimension costs d * s^2
    assert ev.frechet_distance(f, f + 0.5) == pytest.approx(16 * 0.25, rel=1e-6)
    assert ev.feature_distance(f, f).abs().max() < 1e-12


def test_parse_and_expand_configs():
    assert ev.parse_configs("1,2x1,3x2") == [(1, 1), (2, 1), (3, 2)]
    with pytest.raises(ValueError, match="NxS"):
        ev.parse_configs("2y1")
    with pytest.raises(ValueError, match="stride"):
        ev.parse_configs("2x3")
    runs = ev.expand_runs(ev.parse_configs("1,2x1,3x1,4x1,2x2,3x2"), [1, 3], ["auto", "upstream"],
                          ["component", "previous"])
    assert runs[0] == ev.RunConfig() and len(runs) == 1 + 3 * 2 * 2 + 2 * 2 * 2 * 2


def test_judge_reads_real_images():
    from asyncdiff_rt.models.judge import load_judge
    judge = load_judge()
    specs = ev.eval_specs(96, "all")
    imgs = (torch.from_numpy(shapes.render_specs(specs, seed=12345)) + 1) / 2
    feats, pred = ev.judge_images(judge, imgs)
    assert ev.adherence(pred, torch.tensor([s.labels() for s in specs])) >= 0.98
    half = len(feats) // 2
    assert ev.frechet_distance(feats, feats) == pytest.approx(0.0, abs=1e-6)
    assert ev.feature_distance(feats[:half], feats[:half]).max() < 1e-12


def test_eval_runs_end_to_end(tmp_path):
    pytest.importorskip("asyncdiff_rt.integrations.diffusers")
    result = ev.run_eval(configs="1,2x1,2x2", warmups=(1,), samples=2, steps=4, partitions=("auto",),
                         stride_reuse=("component", "previous"), out_dir=str(tmp_path), batch=2,
                         progress=False)
    names = [r["config"] for r in result["rows"]]
    assert names == ["sequential", "2x1 W=1 auto", "2x2 W=1 auto component", "2x2 W=1 auto previous"]
    seq = result["rows"][0]
    assert math.isinf(seq["psnr_db"]) and seq["max_abs_diff"] == 0 and seq["critical_path_steps"] == 4
    assert result["rows"][3]["critical_path_steps"] < 4
    saved = json.loads((tmp_path / "eval.json").read_text())
    assert len(saved["rows"]) == 4 and (tmp_path / "eval_grid.png").stat().st_size > 0
    assert "sequential" in ev.format_table(result)


def test_eval_command_parses_the_issue_arguments():
    from asyncdiff_rt.commands import eval as cmd
    parser = argparse.ArgumentParser()
    cmd.register(parser.add_subparsers())
    args = parser.parse_args(["eval", "--configs", "1,2x1,3x1,4x1,2x2,3x2", "--warmup", "1,3", "--samples", "256",
                              "--steps", "50", "--partition", "auto,upstream", "--stride-reuse",
                              "component,previous"])
    assert args.func is cmd.run and args.samples == 256 and args.stride_reuse == "component,previous"
