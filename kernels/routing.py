"""`apply(denoiser)` / `remove(denoiser)`: run a diffusers denoiser's GroupNorms through the kernels.

Routed, by structure (class names, so any checkpoint of these families works):
  * `ResnetBlock2D`, `TemporalResnetBlock`: norm1 -> SiLU and norm2 -> SiLU fused
    (norm2 alone when a scale-shift time embedding sits between it and the SiLU);
  * the entry `norm` of the transformer blocks (GroupNorm only, no activation follows);
  * any `conv_norm_out` -> `conv_act` pair (the UNet's output head).

Nothing is replaced or re-registered: each routed module gets an instance-level
`forward`, so weights, `state_dict`, hooks and module paths stay as they were, and
`remove` deletes those attributes again. A fused norm already applied the SiLU, so
it tags its output and the block's activation passes tagged tensors through; the
same activation still runs on anything else (the time embedding of a ResnetBlock2D).

Calls the kernels cannot take (autograd on, a dtype or device they do not
support) go to the module's own forward, so `apply` never changes results beyond
rounding; `apply` itself changes nothing where Triton cannot run.

`apply(denoiser, units=paths)` (what the runtime does) fuses a norm with its SiLU only
where both lie in the same unit: a unit's output can be a cached copy, which carries no
tag, so a fused norm that is a unit itself (the UNet's `conv_norm_out`) would have its
SiLU applied twice by the activation after it. Such norms run as GroupNorm alone.
"""
from __future__ import annotations

import types
import weakref

import torch
from torch import nn

from ._runtime import logger, unavailable_reason

_RESNETS = ("ResnetBlock2D", "TemporalResnetBlock")
_TRANSFORMERS = ("Transformer2DModel", "TransformerTemporalModel", "TransformerSpatioTemporalModel",
                 "AnimateDiffTransformer3D")
_TAG = "_asyncdiff_silu_applied"
_routings: "weakref.WeakKeyDictionary[nn.Module, KernelRouting]" = weakref.WeakKeyDictionary()
_logged: set[str] = set()


def _fallback_reason(norm: nn.GroupNorm, x: torch.Tensor) -> str | None:
    from .group_norm import SUPPORTED_DTYPES, _is_dense

    if torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in norm.parameters())):
        return "autograd is on (the kernels are forward-only; run under torch.no_grad() or inference_mode())"
    if x.dtype not in SUPPORTED_DTYPES:
        return f"dtype {x.dtype}"
    if not _is_dense(x):
        return "a non-dense input view"
    return unavailable_reason(x.device)


def _norm_forward(self: nn.GroupNorm, x: torch.Tensor, silu: bool) -> torch.Tensor:
    from .group_norm import group_norm

    why = _fallback_reason(self, x)
    if why is not None:
        if why not in _logged:
            _logged.add(why)
            logger.info("fused GroupNorm falls back to torch: %s", why)
        return type(self).forward(self, x)  # untagged: the activation after it still runs
    y = group_norm(x, self.num_groups, self.weight, self.bias, self.eps, silu=silu)
    if silu:
        setattr(y, _TAG, True)
    return y


def _norm_only(self, x):
    return _norm_forward(self, x, silu=False)


def _norm_silu(self, x):
    return _norm_forward(self, x, silu=True)


def _act_passthrough(self, x):
    if getattr(x, _TAG, False):
        delattr(x, _TAG)  # the SiLU is spent: a second call on the same tensor applies it again
        return x
    return type(self).forward(self, x)


class KernelRouting:
    """What `apply` returns: which modules go through the kernels; `.remove()` undoes it."""

    def __init__(self, denoiser: nn.Module, reason: str | None = None):
        self._denoiser = weakref.ref(denoiser)
        self.reason = reason  # why nothing was routed, if so
        self.routed: list[str] = []  # "path (what)", for logs and tests
        self._saved: list[tuple[nn.Module, object]] = []  # (module, its previous instance forward or None)

    def _route(self, module: nn.Module, forward, label: str) -> None:
        self._saved.append((module, module.__dict__.get("forward")))
        module.forward = types.MethodType(forward, module)
        self.routed.append(label)

    def remove(self) -> None:
        for module, previous in reversed(self._saved):
            if previous is None:
                module.__dict__.pop("forward", None)
            else:
                module.__dict__["forward"] = previous
        self._saved.clear()
        self.routed.clear()
        denoiser = self._denoiser()
        if denoiser is not None and _routings.get(denoiser) is self:
            del _routings[denoiser]

    def __repr__(self) -> str:
        if self.reason:
            return f"KernelRouting(inactive: {self.reason})"
        return f"KernelRouting({len(self.routed)} modules)"


def _is_silu(m) -> bool:
    return type(m) is nn.SiLU


def _unit_of(path: str, units: tuple[str, ...]) -> str | None:
    """The innermost unit containing module `path` (None: it is in no unit)."""
    inside = [u for u in units if path == u or path.startswith(f"{u}.")]
    return max(inside, key=len) if inside else None


def apply(denoiser: nn.Module, units=None) -> KernelRouting:
    """Route `denoiser`'s GroupNorm(+SiLU) pairs through the fused kernels; idempotent.
    `units`: module paths whose outputs may be cached copies (the runtime's units); a
    norm is fused with its SiLU only where both lie in the same one."""
    if denoiser in _routings:
        return _routings[denoiser]
    why = unavailable_reason()
    if why is not None:
        logger.warning("asyncdiff_rt.kernels.apply: %s; %s left unchanged", why, type(denoiser).__name__)
        return KernelRouting(denoiser, reason=why)
    routing = KernelRouting(denoiser)
    passthrough: set[int] = set()

    def at(path, attr):
        return f"{path}.{attr}" if path else attr

    units = tuple(units or ())

    def fuse(owner, path, norm_attr, act_attr):
        if units and _unit_of(at(path, norm_attr), units) != _unit_of(at(path, act_attr), units):
            routing._route(getattr(owner, norm_attr), _norm_only, f"{at(path, norm_attr)} (GroupNorm)")
            return
        routing._route(getattr(owner, norm_attr), _norm_silu, f"{at(path, norm_attr)} (GroupNorm+SiLU)")
        act = getattr(owner, act_attr)
        if id(act) not in passthrough:
            passthrough.add(id(act))
            routing._route(act, _act_passthrough, f"{at(path, act_attr)} (SiLU, passes fused outputs through)")

    for path, m in denoiser.named_modules():
        cls = type(m).__name__
        if cls in _RESNETS and isinstance(m.norm1, nn.GroupNorm) and _is_silu(m.nonlinearity):
            fuse(m, path, "norm1", "nonlinearity")
            if getattr(m, "time_embedding_norm", "default") == "default":
                fuse(m, path, "norm2", "nonlinearity")
            else:  # scale-shift between norm2 and the SiLU
                routing._route(m.norm2, _norm_only, f"{at(path, 'norm2')} (GroupNorm)")
        elif cls in _TRANSFORMERS and isinstance(getattr(m, "norm", None), nn.GroupNorm):
            routing._route(m.norm, _norm_only, f"{at(path, 'norm')} (GroupNorm)")
        if isinstance(getattr(m, "conv_norm_out", None), nn.GroupNorm) and _is_silu(getattr(m, "conv_act", None)):
            fuse(m, path, "conv_norm_out", "conv_act")
    _routings[denoiser] = routing
    logger.info("asyncdiff_rt.kernels.apply: %d GroupNorm sites routed in %s",
                sum("GroupNorm" in r for r in routing.routed), type(denoiser).__name__)
    return routing


def routed_module(denoiser: nn.Module) -> str | None:
    """The path of a module of `denoiser` that `apply` routed (None: none is)."""
    return next((path for path, m in denoiser.named_modules() if m in _routings), None)


def remove(denoiser: nn.Module) -> None:
    """Undo `apply(denoiser)`; does nothing if it was not applied."""
    routing = _routings.get(denoiser)
    if routing is not None:
        routing.remove()
