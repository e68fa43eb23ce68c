"""`asyncdiff-rt plan` and the reference code's split tables for SVD, AnimateDiff and the
x4 upscaler: configs, example inputs, family recognition, refusals, a light `--help`.

Tracing costs seconds per model, so each model is traced once: through the command
(`planned`), whose traced graphs the table tests reuse.
"""
import json
import subprocess
import sys

import pytest
import torch

from asyncdiff_rt.cli import main
from asyncdiff_rt.commands.plan import load_meta_denoiser
from asyncdiff_rt.example_inputs import example_inputs
from asyncdiff_rt.models.configs import MOTION_ADAPTERS, UNET_CONFIGS, build_unet
from asyncdiff_rt.partition import resolve_partition
from asyncdiff_rt.trace import unet_inputs
from asyncdiff_rt.upstream_splits import SPLITS, recognise_family
from plan_runs import plan_and_keep

NEW = ("svd", "animatediff", "upscaler")
# Small sizes: tracing cost follows the number of ops, not their size.
SMALL = {
    "svd": ["--resolution", "64", "--frames", "2"],
    "animatediff": ["--resolution", "64", "--frames", "2"],
    "animatediff-sdxl": ["--resolution", "64", "--frames", "2"],
    "upscaler": ["--resolution", "32"],
}


def _save(tmp, name, pipeline=False):
    """A model folder (config.json) or a pipeline folder (model_index.json + unet/)."""
    unet = build_unet(name)
    if pipeline:
        unet.save_config(tmp / "unet")
        (tmp / "model_index.json").write_text(json.dumps({"unet": ["diffusers", type(unet).__name__]}))
    else:
        unet.save_config(tmp)
    return str(tmp)


@pytest.fixture(scope="module")
def planned(tmp_path_factory):
    """{key: (printed text, denoiser, UnitGraph)}: the named full-size models and folders
    of the tiny ones (one of each class), each planned once through `asyncdiff-rt plan`."""
    runs = {name: ["--model", name, *args] for name, args in SMALL.items()}
    runs["tiny-svd"] = ["--model", _save(tmp_path_factory.mktemp("svd"), "tiny-svd"), "--resolution", "64",
                        "--frames", "2"]
    runs["tiny-animatediff"] = ["--model", _save(tmp_path_factory.mktemp("ad"), "tiny-animatediff", pipeline=True),
                                "--frames", "2"]
    runs["tiny-upscaler"] = ["--model", _save(tmp_path_factory.mktemp("x4"), "tiny-upscaler")]
    return plan_and_keep({key: [*argv, "-n", "3"] for key, argv in runs.items()})


@pytest.mark.parametrize("size", ["full", "tiny"])
@pytest.mark.parametrize("family, n", [(f, n) for f in NEW for n in SPLITS[f]])
def test_new_tables_resolve_with_the_output_unit_last(planned, family, n, size):
    denoiser, graph = planned[family if size == "full" else f"tiny-{family}"][1:]
    assert recognise_family(denoiser) == family
    part = resolve_partition(graph, n, "upstream", denoiser)
    assert sorted(p for comp in part.components for p in comp) == sorted(graph.paths)
    assert part.owner[graph.output_unit] == n - 1 and graph.output_unit == "conv_out"
    assert part.strategy == f"upstream:{family}"


def test_tables_place_motion_modules_and_upsamplers(planned):
    denoiser, graph = planned["animatediff"][1:]
    owner = resolve_partition(graph, 2, "upstream", denoiser).owner
    # Whole blocks carry their motion modules: up_blocks.1 is component 0's, up_blocks.2 component 1's.
    assert owner["up_blocks.1.motion_modules.2"] == 0 and owner["up_blocks.2.motion_modules.0"] == 1
    assert owner["mid_block"] == 0 and "down_blocks.3.motion_modules.1" in graph.paths
    denoiser, graph = planned["upscaler"][1:]
    owner = resolve_partition(graph, 2, "upstream", denoiser).owner
    # The reference lists up_blocks[0].upsamplers twice; up_blocks.1's is the one it leaves out.
    assert owner["up_blocks.0.upsamplers.0"] == 0 and owner["up_blocks.1.upsamplers.0"] == 1
    denoiser, graph = planned["svd"][1:]
    comps = resolve_partition(graph, 4, "upstream", denoiser).components
    assert comps[0] == ("conv_in", "down_blocks.0.resnets.0", "down_blocks.0.attentions.0", "down_blocks.0.resnets.1",
                        "down_blocks.0.attentions.1", "down_blocks.0.downsamplers.0", "down_blocks.1.resnets.0",
                        "down_blocks.1.attentions.0")


def test_recognise_family_by_structure(planned):
    # The planned ones (full size by name, tiny from folders) were recognised in their plans' headers.
    assert {key: recognise_family(planned[key][1]) for key in planned} == {
        key: key.removeprefix("tiny-") for key in planned}
    names = {"tiny-animatediff-sdxl": "animatediff-sdxl", "sd15": "sd15", "sd21": "sd21", "sdxl": "sdxl",
             "tiny-sd15": "sd15", "tiny-sd21": "sd21", "tiny-sdxl": "sdxl"}
    assert {name: recognise_family(build_unet(name)) for name in names} == names
    # The upscaler's layout without its noise-level embedding is no known family.
    config = {k: v for k, v in UNET_CONFIGS["tiny-upscaler"].items() if k != "num_class_embeds"}
    with torch.device("meta"):
        from diffusers import UNet2DConditionModel

        assert recognise_family(UNet2DConditionModel(**config)) is None


def test_motion_configs_match_from_unet2d():
    from diffusers import MotionAdapter, UNet2DConditionModel, UNetMotionModel

    for name, unet, adapter in (("animatediff", "sd15", "v1-5-2"), ("tiny-animatediff-sdxl", "tiny-sdxl", "tiny-sdxl")):
        with torch.device("meta"):
            ref = UNetMotionModel.from_unet2d(UNet2DConditionModel(**UNET_CONFIGS[unet]),
                                              MotionAdapter(**MOTION_ADAPTERS[adapter]), load_weights=False)
        ours = build_unet(name)
        plain = lambda c: {k: list(v) if isinstance(v, tuple) else v for k, v in c.items() if not k.startswith("_")}
        assert plain(ours.config) == plain(ref.config)
        assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}


def test_full_size_configs_have_the_published_sizes():
    params = {name: sum(p.numel() for p in build_unet(name).parameters()) / 1e6
              for name in ("svd", "animatediff", "upscaler")}
    # SVD-xt UNet 1.52 B; SD 1.5 UNet 0.86 B + v1-5-2 motion modules 0.45 B; x4 upscaler UNet 0.47 B.
    assert params["svd"] == pytest.approx(1524.6, abs=1) and params["upscaler"] == pytest.approx(473.4, abs=1)
    assert params["animatediff"] == pytest.approx(1312.7, abs=1)
    assert all(p.device.type == "meta" for p in build_unet("svd").parameters())  # AlphaBlender's too


@pytest.mark.parametrize("name, frames, shape, out", [
    ("tiny-svd", 2, (1, 2, 8, 8, 8), (1, 2, 4, 8, 8)),
    ("tiny-animatediff", 2, (1, 4, 2, 8, 8), (1, 4, 2, 8, 8)),
    ("tiny-upscaler", None, (1, 7, 8, 8), (1, 4, 8, 8)),
])
def test_tiny_models_run_on_the_cpu(name, frames, shape, out):
    unet = build_unet(name, device="cpu", dtype=torch.float32, seed=0).eval()
    latent, timestep, args, kwargs = example_inputs(unet, batch=1, height=8, width=8, frames=frames)()
    assert tuple(latent.shape) == shape
    g = torch.Generator().manual_seed(0)
    kwargs = {k: torch.randn(v.shape, generator=g) if v.is_floating_point() else v for k, v in kwargs.items()}
    with torch.no_grad():
        sample = unet(torch.randn(shape, generator=g), timestep, *args, **kwargs).sample
    assert tuple(sample.shape) == out and torch.isfinite(sample).all()


def test_example_inputs_by_class():
    svd = build_unet("svd")
    latent, _, _, kw = example_inputs(svd, batch=2, height=72, width=128, frames=14)()
    assert latent.shape == (2, 14, 8, 72, 128) and kw["encoder_hidden_states"].shape == (2, 1, 1024)
    assert kw["added_time_ids"].shape == (2, 3)
    latent, _, _, kw = example_inputs(build_unet("animatediff-sdxl"), batch=2, frames=16)()
    assert latent.shape == (2, 4, 16, 128, 128) and kw["encoder_hidden_states"].shape == (32, 77, 2048)
    assert kw["added_cond_kwargs"]["text_embeds"].shape == (2, 1280) and kw["added_cond_kwargs"]["time_ids"].shape == (2, 6)
    latent, _, _, kw = example_inputs(build_unet("upscaler"))()
    assert latent.shape == (2, 7, 128, 128) and kw["class_labels"].shape == (2,)
    assert kw["class_labels"].dtype == torch.long and kw["encoder_hidden_states"].shape == (2, 77, 1024)
    # trace.unet_inputs is unchanged for UNet2DConditionModel.
    latent, _, _, kw = unet_inputs(build_unet("sd15"), batch=2, height=64, width=64)()
    assert latent.shape == (2, 4, 64, 64) and set(kw) == {"encoder_hidden_states"}
    from diffusers import UNet3DConditionModel

    with torch.device("meta"):
        text_to_video = UNet3DConditionModel(sample_size=8, block_out_channels=(32, 32, 64, 64), norm_num_groups=8,
                                             cross_attention_dim=32, attention_head_dim=8, layers_per_block=1)
    latent, _, _, kw = example_inputs(text_to_video, frames=3)()
    assert latent.shape == (2, 4, 3, 8, 8) and kw["encoder_hidden_states"].shape == (2, 77, 32)
    with pytest.raises(TypeError, match="no example inputs for Linear"):
        example_inputs(torch.nn.Linear(2, 2))
    with pytest.raises(TypeError, match="takes no frames"):
        example_inputs(build_unet("tiny-sd15"), frames=4)
    with pytest.raises(ValueError, match="motion_max_seq_length 32"):
        example_inputs(build_unet("tiny-animatediff"), frames=40)


@pytest.mark.parametrize("key", [*SMALL, "tiny-svd", "tiny-animatediff", "tiny-upscaler"])
def test_plan_prints_units_balance_speedup_and_bytes(planned, key):
    text, denoiser, graph = planned[key]
    kind = type(denoiser).__name__
    family = key.removeprefix("tiny-")
    assert f"({kind}, family {family})" in text
    assert text.count("\n  component ") == 3 and "units:" in text and "imbalance" in text
    assert "ideal speedup at K=50" in text and text.count("MiB/step") == 3
    if family != "upscaler":
        assert "2 frames at " in text
    assert "latent 8x8" in text


def test_folders_pick_the_class_from_config_or_model_index(tmp_path):
    folder = tmp_path / "pipe"
    _save(folder, "tiny-svd", pipeline=True)
    config = json.loads((folder / "unet" / "config.json").read_text())
    del config["_class_name"]  # the class then comes from model_index.json's unet entry
    (folder / "unet" / "config.json").write_text(json.dumps(config))
    denoiser, factor = load_meta_denoiser(str(folder), torch.float16)
    assert type(denoiser).__name__ == "UNetSpatioTemporalConditionModel" and factor is None
    assert all(p.device.type == "meta" for p in denoiser.parameters())
    denoiser, _ = load_meta_denoiser(_save(tmp_path / "x4", "tiny-upscaler"), torch.float16)
    assert recognise_family(denoiser) == "upscaler"


def _write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return str(path.parent)


@pytest.mark.parametrize("case, message", [
    ("unknown-name", "is neither sd15, sd21, sdxl, svd"),
    ("empty-folder", "is neither sd15"),
    ("vae-folder", "describes AutoencoderKL, not a denoiser plan knows"),
    ("transformer-pipeline", "names no 'unet'"),
    ("broken-json", "cannot read"),
    ("bad-config", "does not build a UNet2DConditionModel"),
    ("frames-for-image", "--frames applies to video denoisers"),
    ("resolution", "--height 100 must be a multiple of 64"),
    ("n0", "cannot plan upscaler: n_components=0"),
])
def test_bad_input_is_refused_in_one_line_with_status_2(tmp_path, capsys, case, message):
    argv = {
        "unknown-name": ["--model", "sd99"],
        "empty-folder": ["--model", str(tmp_path)],
        "vae-folder": ["--model", _write(tmp_path / "vae" / "config.json", '{"_class_name": "AutoencoderKL"}')],
        "transformer-pipeline": ["--model", _write(tmp_path / "p" / "model_index.json",
                                                   '{"transformer": ["diffusers", "PixArtTransformer2DModel"]}')],
        "broken-json": ["--model", _write(tmp_path / "b" / "config.json", "{not json")],
        "bad-config": ["--model", _write(tmp_path / "c" / "config.json", json.dumps(
            {"_class_name": "UNet2DConditionModel", "block_out_channels": [32, 64], "down_block_types": ["DownBlock2D"]}))],
        "frames-for-image": ["--model", "upscaler", "--frames", "4"],
        "resolution": ["--model", "svd", "--height", "100"],
        "n0": ["--model", "upscaler", "-n", "0"],
    }[case]
    with pytest.raises(SystemExit, match=message) as refused:
        main(["plan", *argv])
    assert refused.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("asyncdiff-rt plan: ") and err.count("\n") == 1 and "Traceback" not in err


def test_help_imports_no_torch():
    script = ("import sys, asyncdiff_rt.cli as c\n"
              "try:\n    c.main(['--help'])\nexcept SystemExit as e:\n    assert e.code == 0\n"
              "print('torch' in sys.modules, 'diffusers' in sys.modules)\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.splitlines()[-1] == "False False"
    assert "plan" in done.stdout and "bench" in done.stdout
