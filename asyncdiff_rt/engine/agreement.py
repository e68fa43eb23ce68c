"""What the ranks of the distributed executor compare at the start of every generation:
its settings (steps, warm-up, stride, timesteps, input shapes) and a digest of its
inputs (the initial latent and every other argument of the denoiser call: text
conditioning, added condition kwargs, ControlNet residuals, ...).

Every rank runs its own text encoder and scheduler, and only the host's prediction
travels: ranks that were given different prompts or seeds would each step a different
latent with one shared prediction and return images that match no reference, without
an error. The digest catches that before any forward.

A tensor's digest is a few numbers read in one copy: its size, the sums of BLOCKS
contiguous blocks and SAMPLES evenly strided elements. Ranks on one machine
compute bitwise-equal inputs; ranks on different machines may round the text encoder
differently in the last bits, so digests are compared to a tolerance
(`RELATIVE`, or a few units of the dtype's precision) that rounding stays far below and
a different prompt or seed far exceeds.

Cost, once per generation: one pass over each tensor and one copy of 81 numbers per
tensor to the host, sent with the settings the ranks compared already (no extra message).
On a 2-core CPU: 0.3 ms for SD 1.5 or SDXL inputs, 0.26 s with SDXL's ControlNet
residuals at 1024 (54 M elements). On a GPU the copy is the one host wait it adds, right
after the host read of the scheduler's timesteps that starts every generation, so the
GPU's queue is already drained then.
"""
import torch

from ..arguments import labelled_leaves

BLOCKS = 16
SAMPLES = 64
RELATIVE = 1e-2  # of a sample (its magnitude plus the mean magnitude), of a block sum (its size times that)
ULPS = 4  # half precision rounds coarser: at least this many units of the dtype's precision
LATENT = "the initial latent"
SETTINGS = ("steps", "warm-up", "stride", "timesteps", "input shapes")


class GenerationMismatch(ValueError):
    """The ranks were called with different arguments; every rank raises it."""


def generation_digest(program, timesteps, call):
    """What this rank runs in the generation `program` starts: {name: value}, picklable."""
    shapes = [(shape, dtype) for shape, dtype, _ in call.shapes()]  # devices differ between ranks
    settings = (program.num_steps, program.warmup, program.stride, [float(t) for t in timesteps], shapes)
    return {**dict(zip(SETTINGS, settings)), "arguments": _plain_arguments(call), "inputs": input_digests(call)}


def input_digests(call):
    """{label: (dtype name, [float])}: the digest of the call's latent (LATENT) and of
    every other tensor argument, computed where each lives and read in one copy per device."""
    tensors = [(LATENT, call.latent)] + [(label, leaf) for label, leaf in labelled_leaves(call.others())
                                         if isinstance(leaf, torch.Tensor)]
    by_device = {}
    for label, t in tensors:
        by_device.setdefault(t.device, []).append((label, t))
    out = {}
    for entries in by_device.values():
        values = torch.cat([_digest(t) for _, t in entries]).tolist()  # the one host read per device
        width = len(values) // len(entries)
        for i, (label, t) in enumerate(entries):
            out[label] = (str(t.dtype), values[i * width:(i + 1) * width])
    return out


def differences(theirs, mine):
    """What differs between two generation digests, in words ([] when they agree)."""
    found = [f"{name}: {theirs[name]} vs {mine[name]}" for name in SETTINGS if theirs[name] != mine[name]]
    if found:  # other shapes or steps: the inputs cannot be compared one to one
        return [", ".join(found)[:300]]
    if theirs["arguments"] != mine["arguments"]:
        found.append(f"arguments: {_changed(theirs['arguments'], mine['arguments'])}")
    inputs = [label for label, digest in mine["inputs"].items() if not _close(theirs["inputs"].get(label), digest)]
    if LATENT in inputs:
        found.append(f"{LATENT} (a different seed or generator, latents=, input image or strength)")
    conditioning = [label for label in inputs if label != LATENT]
    if conditioning:
        found.append(f"the conditioning argument(s) {', '.join(conditioning)} (a different prompt, negative prompt, "
                     "conditioning image or other pipeline argument)")
    return found


def _digest(t):
    """[numel, BLOCKS block sums, SAMPLES strided elements] of `t`, float64. The sums
    accumulate in float32 at least (a float64 reduction is many times slower on a CPU,
    and the tolerance is far above float32's rounding)."""
    flat = t.detach().reshape(-1)
    if not flat.is_floating_point():
        flat = flat.to(torch.float64)  # ids and masks: small, and compared exactly
    n = flat.numel()
    whole = n - n % BLOCKS
    sums = flat[:whole].view(BLOCKS, whole // BLOCKS).sum(1, dtype=torch.promote_types(flat.dtype, torch.float32))
    sums[-1] += flat[whole:].sum(dtype=sums.dtype)  # the last n % BLOCKS elements
    picks = torch.arange(SAMPLES, device=flat.device) * max(n - 1, 0) // (SAMPLES - 1)
    samples = flat[picks] if n else sums.new_zeros(SAMPLES)
    return torch.cat([sums.new_full((1,), n).double(), sums.double(), samples.double()])


def _close(theirs, mine):
    """Whether two digests (dtype name, values) agree to rounding: every sample within the
    tolerance of its magnitude plus the tensor's mean magnitude (elements near zero round
    by the tensor's scale), every block sum within the tolerance of the block's size times
    that mean magnitude."""
    if theirs is None or theirs[0] != mine[0] or theirs[1][0] != mine[1][0]:
        return False
    dtype = getattr(torch, mine[0].split(".")[-1])
    tolerance = max(RELATIVE, ULPS * torch.finfo(dtype).eps) if dtype.is_floating_point else 0.0  # ids: exact
    n, (sums_a, picks_a), (sums_b, picks_b) = mine[1][0], _parts(theirs[1]), _parts(mine[1])
    per_block = max(n // BLOCKS, 1)
    scale = max(sum(abs(x) + abs(y) for x, y in zip(picks_a, picks_b)) / (2 * SAMPLES),
                max(abs(x) for x in sums_a + sums_b) / per_block)
    return (all(abs(x - y) <= tolerance * (abs(x) + abs(y) + scale) for x, y in zip(picks_a, picks_b)) and
            all(abs(x - y) <= tolerance * per_block * scale for x, y in zip(sums_a, sums_b)))


def _parts(values):
    return values[1:1 + BLOCKS], values[1 + BLOCKS:]


def _plain_arguments(call):
    """The call's other arguments that are plain values (LoRA scales, flags): compared exactly."""
    return {label: leaf for label, leaf in labelled_leaves(call.others())
            if leaf is None or isinstance(leaf, (bool, int, float, str))}


def _changed(theirs, mine):
    names = sorted(set(theirs) | set(mine))
    return ", ".join(f"{n}: {theirs.get(n)!r} vs {mine.get(n)!r}" for n in names if theirs.get(n) != mine.get(n))[:300]
