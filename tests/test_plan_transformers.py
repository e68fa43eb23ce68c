"""`asyncdiff-rt plan` for diffusion transformers at their published sizes: configs,
example inputs at real shapes, the reference code's SD3 split (scaled to any block
count), the printed figures and the refusals.

Each model is traced once, through the command (`planned`): all at a small image size
(tracing costs follow the number of ops, not their size) except FLUX.1-dev, planned at
its real 1024x1024 (the one full-size trace here).
"""
import inspect
import json

import diffusers
import pytest
import torch

from asyncdiff_rt.cli import main
from asyncdiff_rt.example_inputs import example_inputs, wan_latent_frames
from asyncdiff_rt.models.configs import MODEL_ALIASES, TRANSFORMER_CLASSES, TRANSFORMER_CONFIGS, build_unet
from asyncdiff_rt.partition import resolve_partition
from asyncdiff_rt.units import find_units
from asyncdiff_rt.upstream_splits import SPLITS, recognise_family, sd3_split
from plan_runs import plan_and_keep

NAMES = tuple(TRANSFORMER_CONFIGS)
SMALL = {
    "sd3": ["--resolution", "64"],
    "sd35-large": ["--resolution", "64"],
    "flux-dev": [],  # 1024x1024: the one full-size trace
    "pixart-sigma": ["--resolution", "64"],
    "dit-xl": ["--resolution", "64"],
    "wan2.1-1.3b": ["--resolution", "64", "--frames", "5"],
    "wan2.1-14b": ["--resolution", "64", "--frames", "5"],
}
# Parameters (millions) of the diffusers classes at these configs. DiT-XL/2 is 675 M in its
# paper; diffusers' DiT gives every block its own timestep/class embedder (norm1.emb), of which
# the forward uses block 0's: 28 x 2.68 M more.
PARAMS = {"sd3": 2028.3, "sd35-large": 8056.6, "flux-dev": 11901.4, "pixart-sigma": 610.9, "dit-xl": 749.8,
          "wan2.1-1.3b": 1419.0, "wan2.1-14b": 14288.5}


def _tiny_sd3():
    with torch.device("meta"):
        return diffusers.SD3Transformer2DModel(
            sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=4, attention_head_dim=8,
            num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=16, pooled_projection_dim=16,
            pos_embed_max_size=16)


@pytest.fixture(scope="module")
def planned():
    """{name: (printed text, denoiser, UnitGraph)}, each planned once with N=3: FLUX as
    text (the figures test reads it), the others as JSON."""
    return plan_and_keep({name: ["--model", name, *args, "-n", "3", *([] if name == "flux-dev" else ["--json"])]
                          for name, args in SMALL.items()})


@pytest.mark.parametrize("name", NAMES)
def test_configs_are_the_published_ones_on_meta(name):
    cls = getattr(diffusers, TRANSFORMER_CLASSES[name])
    accepted = inspect.signature(cls.__init__).parameters
    config = TRANSFORMER_CONFIGS[name]
    assert set(config) <= set(accepted), set(config) - set(accepted)
    model = build_unet(name)
    assert type(model) is cls and all(p.device.type == "meta" for p in model.parameters())
    plain = lambda v: list(v) if isinstance(v, tuple) else v  # noqa: E731
    assert {k: plain(model.config[k]) for k in config} == {k: plain(v) for k, v in config.items()}
    assert sum(p.numel() for p in model.parameters()) / 1e6 == pytest.approx(PARAMS[name], abs=0.5)
    assert MODEL_ALIASES[name] == name


def test_aliases():
    assert {MODEL_ALIASES[a] for a in ("flux", "flux.1-dev", "FLUX.1-dev".lower())} == {"flux-dev"}
    assert MODEL_ALIASES["sd3-medium"] == "sd3" and MODEL_ALIASES["sd3.5-large"] == "sd35-large"
    assert MODEL_ALIASES["wan-14b"] == "wan2.1-14b" and MODEL_ALIASES["wan-1.3b"] == "wan2.1-1.3b"
    assert MODEL_ALIASES["pixart"] == "pixart-sigma" and MODEL_ALIASES["dit"] == "dit-xl"


def test_example_inputs_at_real_shapes():
    """Default sizes are the pipelines': SD3/FLUX/PixArt 1024, DiT 256, Wan 81x480x832; the
    denoisers are on meta, so building the inputs allocates nothing."""
    latent, t, args, kw = example_inputs(build_unet("sd3"))()
    assert latent.shape == (2, 16, 128, 128) and t.shape == (2,) and args == ()
    assert kw["encoder_hidden_states"].shape == (2, 333, 4096) and kw["pooled_projections"].shape == (2, 2048)
    latent, t, _, kw = example_inputs(build_unet("flux-dev"))()
    assert latent.shape == (1, 4096, 64) and t.shape == (1,) and t.dtype == latent.dtype  # t / 1000, as FLUX gets it
    assert kw["encoder_hidden_states"].shape == (1, 512, 4096) and kw["pooled_projections"].shape == (1, 768)
    assert kw["img_ids"].shape == (4096, 3) and kw["txt_ids"].shape == (512, 3) and kw["guidance"].shape == (1,)
    latent, t, _, kw = example_inputs(build_unet("pixart-sigma"))()
    assert latent.shape == (2, 4, 128, 128) and kw["encoder_hidden_states"].shape == (2, 300, 4096)
    assert kw["encoder_attention_mask"].shape == (2, 300)
    assert kw["added_cond_kwargs"] == {"resolution": None, "aspect_ratio": None}
    latent, t, _, kw = example_inputs(build_unet("dit-xl"))()
    assert latent.shape == (2, 4, 32, 32) and kw["class_labels"].shape == (2,)
    assert kw["class_labels"].dtype == torch.long
    latent, t, _, kw = example_inputs(build_unet("wan2.1-14b"))()
    assert latent.shape == (1, 16, 21, 60, 104) and t.shape == (1,)
    assert kw["encoder_hidden_states"].shape == (1, 512, 4096)
    latent, *_ = example_inputs(build_unet("wan2.1-1.3b"), height=8, width=8, frames=80)()
    assert latent.shape == (1, 16, 21, 8, 8)  # 80 frames: WanPipeline makes 81
    assert [wan_latent_frames(f) for f in (1, 5, 80, 81)] == [(1, 1), (5, 2), (81, 21), (81, 21)]
    with pytest.raises(TypeError, match="takes no frames"):
        example_inputs(build_unet("dit-xl"), frames=4)


@pytest.mark.parametrize("name", [n for n in NAMES if n != "flux-dev"])
def test_every_transformer_plans_at_a_small_size(planned, name):
    text, denoiser, graph = planned[name]
    s = json.loads(text)
    assert s["class"] == TRANSFORMER_CLASSES[name] and s["n_components"] == 3 and s["latent"] == [8, 8]
    wan = name.startswith("wan")
    assert s["batch"] == (1 if wan else 2)
    assert (s["frames"], s["latent_frames"]) == ((5, 2) if wan else (None, None))
    assert s["tokens"] == (2 * 4 * 4 if wan else 16)
    assert len(s["components"]) == 3 and 1 <= s["imbalance"] < 1.5 and 2 < s["ideal_speedup"] < 3
    assert len(s["bytes_per_step"]) == 3 and min(s["bytes_per_step"]) > 0
    assert len(s["weight_bytes_per_device"]) == 3 and max(s["weight_bytes_per_device"]) < s["weight_bytes_whole"]
    assert graph.output_unit == ("proj_out_2" if name == "dit-xl" else "proj_out")
    assert s["family"] == ("sd3" if name.startswith("sd3") else None)


def test_flux_prints_its_figures_at_1024(planned):
    text, denoiser, graph = planned["flux-dev"]
    head, *lines = text.splitlines()
    assert head == ("model flux-dev (FluxTransformer2DModel, family not recognised), fp16, batch 1, "
                    "1024x1024 px (latent 128x128, 4096 tokens)")
    assert "partition=auto" in lines[0] and text.count("\n  component ") == 3
    assert "imbalance" in text and "ideal speedup at K=50" in text and text.count("MiB/step") == 3
    assert "weights per device:" in text and "whole denoiser 22.17 GiB" in text
    assert len(graph.units) == 1 + 19 + 38 + 2  # x_embedder, blocks, norm_out, proj_out


@pytest.mark.parametrize("n", (2, 3, 4))
def test_sd3_upstream_table_full_size_and_tiny(planned, n):
    chunks = {2: [(0, 12), (12, 24)], 3: [(0, 8), (8, 16), (16, 24)], 4: [(0, 6), (6, 12), (12, 18), (18, 24)]}[n]
    assert SPLITS["sd3"][n] == sd3_split(24, n)
    for key in ("sd3", "sd35-large"):
        _, denoiser, graph = planned[key]
        family = recognise_family(denoiser)
        assert family == "sd3" and family.blocks == len(denoiser.transformer_blocks)
        part = resolve_partition(graph, n, "upstream", denoiser)
        assert part.strategy == "upstream:sd3" and part.owner[graph.output_unit] == n - 1
        assert part.owner["pos_embed"] == 0 and part.components[-1][-2:] == ("norm_out", "proj_out")
        sizes = [sum(p.startswith("transformer_blocks.") for p in c) for c in part.components]
        assert max(sizes) - min(sizes) <= 1 and sum(sizes) == family.blocks
        if key == "sd3":  # the reference code's table, block for block
            assert [[p for p in c if p.startswith("transformer_blocks.")] for c in part.components] == [
                [f"transformer_blocks.{b}" for b in range(*chunk)] for chunk in chunks]
    tiny = _tiny_sd3()
    graph = find_units(tiny, example_inputs(tiny, height=8, width=8))
    assert recognise_family(tiny).blocks == 4
    part = resolve_partition(graph, n, "upstream", tiny)
    assert part.owner[graph.output_unit] == n - 1 and part.owner["pos_embed"] == 0
    assert sorted(p for c in part.components for p in c) == sorted(graph.paths)


def test_other_transformers_have_no_published_split(planned):
    for name in ("flux-dev", "pixart-sigma", "dit-xl", "wan2.1-14b"):
        _, denoiser, graph = planned[name]
        assert recognise_family(denoiser) is None
    with pytest.raises(ValueError, match="no published split.*sd3 \\(N=2/3/4\\)"):
        resolve_partition(graph, 2, "upstream", denoiser)
    with pytest.raises(ValueError, match="no table for a sd3 denoiser with n_components=5"):
        resolve_partition(planned["sd3"][2], 5, "upstream", planned["sd3"][1])


@pytest.mark.parametrize("argv, message", [
    (["--model", "flux-pro"], "is neither sd15, sd21, sdxl, .*, flux-dev, pixart-sigma, dit-xl, wan2.1-1.3b"),
    (["--model", "flux", "--height", "1000"], "--height 1000 must be a multiple of 16"),
    (["--model", "pixart", "--frames", "4"], "--frames applies to video denoisers"),
    (["--model", "sd3", "--resolution", "4096"], "cannot plan sd3: .*pos_embed_max_size"),
])
def test_bad_input_is_refused_in_one_line_with_status_2(capsys, argv, message):
    with pytest.raises(SystemExit, match=message) as refused:
        main(["plan", *argv])
    assert refused.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("asyncdiff-rt plan: ") and err.count("\n") == 1 and "Traceback" not in err


def test_transformer_pipeline_folder_plans_with_its_family_table(tmp_path, capsys):
    """A pipeline folder whose model_index.json names a transformer: transformer/config.json
    picks the class; a tiny SD3 gets the SD3 table scaled to its 4 blocks."""
    _tiny_sd3().save_config(tmp_path / "transformer")
    (tmp_path / "model_index.json").write_text(json.dumps({"transformer": ["diffusers", "SD3Transformer2DModel"]}))
    assert main(["plan", "--model", str(tmp_path), "-n", "2", "--partition", "upstream"]) == 0
    text = capsys.readouterr().out
    assert "(SD3Transformer2DModel, family sd3)" in text and "partition=upstream:sd3" in text
    assert "component 0:" in text and "pos_embed, transformer_blocks.0, transformer_blocks.1\n" in text
    assert "transformer_blocks.2, transformer_blocks.3, norm_out, proj_out" in text


@pytest.mark.parametrize("n", [2, 3, 4])
def test_auto_keeps_a_block_stack_contiguous(planned, n):
    """A transformer's activations are alike at every cut: when a non-contiguous split is
    no better than within the tie (0.5% of the largest load), auto keeps the contiguous one."""
    for name in ("flux-dev", "wan2.1-14b", "sd3"):
        _, _, graph = planned[name]
        parts = resolve_partition(graph, n, "auto")
        order = [parts.owner[p] for p in graph.paths]
        assert order == sorted(order), (name, n)
