import pytest
import torch

# The test models are tiny: one intra-op thread is several times faster than two
# (no thread hand-offs per op) and keeps results independent of the core count.
torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_graphs():
    """Units of the tiny SD 1.5, SD 2.1 and SDXL layouts: {family: (unet on meta, UnitGraph)}."""
    from asyncdiff_rt.models.configs import build_unet
    from asyncdiff_rt.trace import unet_inputs
    from asyncdiff_rt.units import find_units

    out = {}
    for family in ("sd15", "sd21", "sdxl"):
        unet = build_unet(f"tiny-{family}")
        out[family] = (unet, find_units(unet, unet_inputs(unet)))
    return out
