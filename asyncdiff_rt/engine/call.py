"""One denoiser call as the pipeline made it, re-playable with another latent or timestep."""
import inspect

import torch
import torch.utils._pytree as pytree

from ..adapters import adapter_for
from ..arguments import labelled_leaves, other_arguments


class _Binder:
    """`inspect.Signature.bind` for one signature, by a table of its parameter names where
    every parameter is positional-or-keyword (the denoisers' forwards): the same
    BoundArguments (the supplied arguments in signature order); anything else, and every
    call the signature refuses, goes through `bind` itself (its errors)."""

    def __init__(self, signature):
        self.signature = signature
        params = list(signature.parameters.values())
        self.names = tuple(p.name for p in params) if all(
            p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD for p in params) else None
        if self.names is not None:
            self.known = frozenset(self.names)
            self.required = frozenset(p.name for p in params if p.default is inspect.Parameter.empty)

    def bind(self, args, kwargs):
        names = self.names
        if names is None or len(args) > len(names):
            return self.signature.bind(*args, **kwargs)
        arguments = dict(zip(names, args))
        if kwargs:
            if not self.known.issuperset(kwargs) or not arguments.keys().isdisjoint(kwargs):
                return self.signature.bind(*args, **kwargs)  # unexpected or repeated: its error
            for name in names[len(args):]:
                if name in kwargs:
                    arguments[name] = kwargs[name]
        if not self.required.issubset(arguments):
            return self.signature.bind(*args, **kwargs)  # a required one missing: its error
        return inspect.BoundArguments(self.signature, arguments)

    def split(self, arguments):
        """(args, kwargs) of bound `arguments`, as `BoundArguments.args` and `.kwargs` make
        them: the leading parameters supplied without a gap positionally, the rest by name."""
        names = self.names
        if names is None:
            bound = inspect.BoundArguments(self.signature, arguments)
            return bound.args, bound.kwargs
        args = []
        for name in names:
            if name not in arguments:
                break
            args.append(arguments[name])
        else:
            return tuple(args), {}
        return tuple(args), {name: arguments[name] for name in names[len(args) + 1:] if name in arguments}


# Leaves of the pytree (torch.utils._pytree) by type, and the containers it flattens the
# plain way (a dict by its values in order, a list or tuple by its items).
_LEAF_TYPES = frozenset((torch.Tensor, torch.nn.Parameter, type(None), bool, int, float, str))
_SPECS = {}  # structure (below) -> its TreeSpec
_LABELS = {}  # structure -> the labels of its leaves (arguments.py)


class _Unknown(Exception):
    pass


def _walk(value, leaves):
    """The structure of `value` (None for a leaf), its leaves appended to `leaves`."""
    kind = type(value)
    if kind in _LEAF_TYPES:
        leaves.append(value)
        return None
    if kind is dict:
        return (dict, tuple(value), tuple([_walk(v, leaves) for v in value.values()]))
    if kind is list or kind is tuple:
        return (kind, tuple([_walk(v, leaves) for v in value]))
    raise _Unknown  # anything else: pytree decides


def flatten_arguments(arguments):
    """(leaves, spec, structure) of `arguments` (a dict by name): `pytree.tree_flatten`'s
    leaves and spec, and a hashable structure equal between two calls exactly where their
    specs are (cheap to hash and compare: it keys graphs and layouts). Dicts, lists and
    tuples of tensors and plain values are walked here and the spec made once per
    structure; anything else goes through pytree (the spec is then the structure)."""
    leaves = []
    try:
        structure = _walk(arguments, leaves)
    except _Unknown:
        leaves, spec = pytree.tree_flatten(arguments)
        return leaves, spec, spec
    spec = _SPECS.get(structure)
    if spec is None:
        if len(_SPECS) >= 256:
            _SPECS.clear()
        spec = _SPECS[structure] = pytree.tree_flatten(arguments)[1]
    return leaves, spec, structure


def tree_leaves(tree):
    """`pytree.tree_leaves(tree)`, walked here where it holds only dicts, lists, tuples,
    tensors and plain values (unit outputs, caches)."""
    leaves = []
    try:
        _walk(tree, leaves)
    except _Unknown:
        return pytree.tree_leaves(tree)
    return leaves


_BINDERS = {}  # function -> the _Binder of its bound methods (their signature does not depend on the instance)


def _binder(denoiser):
    forward = denoiser.forward
    function = getattr(forward, "__func__", None)
    if function is None or getattr(forward, "__self__", None) is not denoiser:
        return _Binder(inspect.signature(forward))  # a forward set on the instance: not cached
    binder = _BINDERS.get(function)
    if binder is None:
        if len(_BINDERS) >= 256:  # classes made on the fly: keep it bounded
            _BINDERS.clear()
        binder = _BINDERS[function] = _Binder(inspect.signature(forward))
    return binder


class DenoiserCall:
    def __init__(self, denoiser, args, kwargs):
        self._denoiser = denoiser
        self.binder = _binder(denoiser)
        self._bound = self.binder.bind(args, kwargs)
        self._others = self._flat = self._labelled = self._shapes = None  # made when first asked
        self.adapter = adapter_for(denoiser)
        self._latent_name, self._timestep_name = self.adapter.latent, self.adapter.timestep
        if self._latent_name not in self._bound.arguments or self._timestep_name not in self._bound.arguments:
            raise TypeError(f"{type(denoiser).__name__} was called without its {self._latent_name!r} or "
                            f"{self._timestep_name!r} argument")

    @property
    def signature(self):
        return self._bound.signature

    @property
    def arguments(self):
        """The bound arguments by name (read-only by convention: `run` copies them)."""
        return self._bound.arguments

    @property
    def latent_name(self):
        return self._latent_name

    @property
    def timestep_name(self):
        return self._timestep_name

    @property
    def latent(self):
        return self._bound.arguments[self._latent_name]

    @property
    def timestep(self):
        return self._bound.arguments[self._timestep_name]

    def shapes(self):
        """Shape, dtype and device of every tensor argument but the timestep: what a
        generation's caches are sized for, so it must not change within one."""
        if self._shapes is None:
            timestep = self.timestep
            self._shapes = tuple((tuple(t.shape), t.dtype, str(t.device))
                                 for t in flatten_arguments(self.arguments)[0]
                                 if isinstance(t, torch.Tensor) and t is not timestep)
        return self._shapes

    def example(self):
        """A `make_inputs` for the trace (trace.py) with this call's shapes, dtypes,
        devices and other arguments: the plan is made from what the pipeline really passes."""
        def make():
            fake = {k: pytree.tree_map(_empty_like, v) for k, v in self._bound.arguments.items()}
            latent, timestep = fake.pop(self._latent_name), fake.pop(self._timestep_name)
            return latent, timestep, (), _by_name(self._bound.signature, fake)

        return make

    def scheduler_value(self):
        """The call's timestep as the scheduler's value (a host read: once per generation)."""
        return float(_scalar(self.timestep)) * self.adapter.timestep_divisor

    def others(self):
        """The arguments but the latent and the timestep, by name (one dict per call,
        read-only by convention)."""
        if self._others is None:
            self._others = other_arguments(self._bound.arguments, self._latent_name, self._timestep_name)
        return self._others

    def flat_others(self):
        """`flatten_arguments(self.others())`: (leaves, spec, structure)."""
        if self._flat is None:
            self._flat = flatten_arguments(self.others())
        return self._flat

    def labelled_others(self):
        """`labelled_leaves(self.others())` (arguments.py); the labels depend only on the
        structure, made once per structure."""
        if self._labelled is None:
            leaves, spec, structure = self.flat_others()
            labels = _LABELS.get(structure) if structure is not spec else None
            if labels is None:
                labels = [label for label, _ in labelled_leaves(self.others())]
                if structure is not spec:
                    if len(_LABELS) >= 256:
                        _LABELS.clear()
                    _LABELS[structure] = labels
            self._labelled = list(zip(labels, leaves))
        return self._labelled

    def run(self, latent, tau, skipped=frozenset()):
        """Call the denoiser with this call's other arguments, `latent` and timestep `tau`
        (a value from the scheduler's timesteps, given the type and shape of the original);
        the tensor arguments labelled in `skipped` (arguments.py) read as zeros, as on a
        device they are not sent to."""
        arguments = dict(self._bound.arguments)
        if skipped:
            leaves, spec, _ = self.flat_others()
            leaves = [torch.zeros_like(leaf) if label in skipped else leaf
                      for (label, _), leaf in zip(self.labelled_others(), leaves)]
            arguments.update(pytree.tree_unflatten(leaves, spec))
        arguments[self._latent_name] = latent
        arguments[self._timestep_name] = _like(self.timestep, tau, self.adapter.timestep_divisor)
        args, kwargs = self.binder.split(arguments)
        return self._denoiser(*args, **kwargs)

    def argument_labels(self):
        """Labels of the tensor arguments but latent and timestep (arguments.py)."""
        return {label for label, leaf in self.labelled_others() if isinstance(leaf, torch.Tensor)}

    def argument_bytes(self, skipped=frozenset()):
        """Bytes of the tensor arguments a device receives (all but `skipped`)."""
        return sum(leaf.nbytes for label, leaf in self.labelled_others()
                   if isinstance(leaf, torch.Tensor) and label not in skipped)


def as_model_timestep(value, original, divisor=1.0):
    """Scheduler timestep(s) `value` as the model receives them: the type, dtype and device
    of `original`, divided by `divisor` in that dtype (as the pipelines compute it)."""
    if isinstance(original, torch.Tensor):
        value = torch.as_tensor(value).to(device=original.device, dtype=original.dtype)
        return value / divisor if divisor != 1.0 else value
    value = value.item() if isinstance(value, torch.Tensor) else value
    return type(original)(value / divisor if divisor != 1.0 else value)


def timestep_table(timesteps, call, device):
    """A generation's timesteps as the model receives them from `call`'s pipeline (its
    type, dtype and divisor), on `device`, indexed by the program's tau."""
    divisor = call.adapter.timestep_divisor
    if isinstance(call.timestep, torch.Tensor):
        return as_model_timestep(torch.as_tensor(timesteps), call.timestep, divisor).to(device)
    return [as_model_timestep(v, call.timestep, divisor) for v in timesteps]


def _like(original, value, divisor=1.0):
    value = as_model_timestep(value, original, divisor)
    return value.expand(original.shape) if isinstance(original, torch.Tensor) else value


def _scalar(t):
    return t.flatten()[0].item() if isinstance(t, torch.Tensor) else t


def _by_name(signature, arguments):
    """Bound arguments as keywords (a **kwargs parameter's dict spread out)."""
    out = {}
    for name, value in arguments.items():
        if signature.parameters[name].kind is inspect.Parameter.VAR_KEYWORD:
            out.update(value)
        else:
            out[name] = value
    return out


def _empty_like(value):
    """Inside the trace's fake mode: a fake tensor like `value` (no data is read)."""
    if isinstance(value, torch.Tensor):
        return torch.empty(value.shape, dtype=value.dtype, device=value.device)
    return value
