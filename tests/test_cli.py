import json

import pytest

from asyncdiff_rt.cli import main
from asyncdiff_rt.models.configs import build_unet


def plan_json(capsys, *args):
    assert main(["plan", *args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_plan_full_size_sd15_upstream(capsys):
    plan = plan_json(capsys, "--model", "sd15", "-n", "2", "--partition", "upstream", "--resolution", "512")
    assert plan["partition"] == "upstream:sd15" and plan["devices"] == 2
    assert abs(sum(c["share"] for c in plan["components"]) + plan["shared_gflops"] / (
        sum(c["gflops"] for c in plan["components"]) + plan["shared_gflops"]) - 1) < 1e-6
    assert plan["components"][0]["modules"][:2] == ["conv_in", "down_blocks"]
    assert 1 < plan["ideal_speedup"] < 2 and plan["imbalance"] >= 1
    # Pruned transfers move less than the reference code's broadcast, on every device.
    assert all(0 < ours < ref for ours, ref in zip(plan["bytes_per_step"], plan["broadcast_bytes_per_step"]))


def test_plan_text_for_a_model_folder(tmp_path, capsys):
    build_unet("tiny-sd21").save_config(tmp_path / "unet")
    assert main(["plan", "--model", str(tmp_path), "-n", "3", "-s", "2", "--partition", "upstream"]) == 0
    text = capsys.readouterr().out
    assert "partition=upstream:sd21" in text and "devices=4" in text
    assert text.count("\n  component ") == 3 and "ideal speedup at K=50" in text


def test_plan_refuses_unknown_models_and_resolutions(tmp_path):
    with pytest.raises(SystemExit, match="neither sd15"):
        main(["plan", "--model", str(tmp_path)])
    with pytest.raises(SystemExit, match="multiple of 64"):
        main(["plan", "--model", "sd15", "--resolution", "500"])
