"""Labels of a denoiser call's other arguments (all but the latent and the timestep), one
per tensor leaf, by name and position: "<arg>['encoder_hidden_states']",
"<arg>['down_block_additional_residuals'][3]". The trace labels the leaves it follows
through the forward, so the dataflow knows which argument each unit reads, and every
executor finds the same leaf by the same label in any call of the same structure."""
import torch.utils._pytree as pytree

ARG = "<arg>"


def other_arguments(arguments, latent_name, timestep_name):
    """The arguments by name, latent and timestep left out (in signature order)."""
    return {k: v for k, v in arguments.items() if k not in (latent_name, timestep_name)}


def labelled_leaves(others):
    """[(label, leaf)] in the order `pytree.tree_flatten(others)` gives the leaves."""
    flat, _ = pytree.tree_flatten_with_path(others)
    return [(ARG + pytree.keystr(path), leaf) for path, leaf in flat]
