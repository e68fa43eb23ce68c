"""Comparison with a per-dtype tolerance that shows the worst elements when it fails."""
import torch

# bf16: two units in the last place, because the Triton interpreter rounds fp32 -> bf16 toward zero.
TOLERANCE = {
    torch.float32: dict(atol=1e-5, rtol=1e-5),
    torch.float16: dict(atol=2e-3, rtol=2e-3),
    torch.bfloat16: dict(atol=1e-2, rtol=1.6e-2),
}


def assert_close(actual, expected, atol=None, rtol=None, what="", worst=5):
    tol = TOLERANCE.get(expected.dtype, TOLERANCE[torch.float32])
    atol = tol["atol"] if atol is None else atol
    rtol = tol["rtol"] if rtol is None else rtol
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    err = (a - e).abs()
    excess = (err - (atol + rtol * e.abs())).flatten()
    if not torch.isfinite(a).all() or bool((excess > 0).any()):
        order = excess.nan_to_num(float("inf")).argsort(descending=True)[:worst]
        rows = []
        for i in order.tolist():
            idx = tuple(torch.unravel_index(torch.tensor(i), a.shape))
            rows.append(f"  at {tuple(int(j) for j in idx)}: got {a.flatten()[i]:.7g}, "
                        f"expected {e.flatten()[i]:.7g}, |diff| {err.flatten()[i]:.3g}")
        bad = int((excess > 0).sum())
        raise AssertionError(f"{what}: {bad} of {a.numel()} elements outside atol={atol}, rtol={rtol}; "
                             f"worst:\n" + "\n".join(rows))
