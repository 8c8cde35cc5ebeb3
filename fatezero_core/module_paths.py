"""Reading a network's modules by path through a resolver, never through a live module tree.

A host may swap containers of a shared network in and out while several models use it: ComfyUI
applies a model clone's object patches into the network they all share and leaves them there after
sampling until another clone loads (``comfy/model_patcher.py``, ``patch_model`` /
``unpatch_model``). The module that a path names then depends on which model asks. Code that
inspects or wraps modules takes a ``resolve(path) -> module`` callable that answers for the model
at hand (``""`` is the root) and looks up every module it visits through it.
"""

from __future__ import annotations

from typing import Callable, Iterator, List, Tuple

from torch import nn

ModuleResolver = Callable[[str], nn.Module]


def child_path(parent: str, name: str) -> str:
    return f"{parent}.{name}" if parent else name


def tree_resolver(root: nn.Module) -> ModuleResolver:
    """The resolver of a plain module tree that nobody patches: ``root.get_submodule``."""
    return root.get_submodule


def resolved_children(resolve: ModuleResolver, path: str) -> List[Tuple[str, nn.Module]]:
    """``(path, module)`` of each child of the module at ``path``, in registration order, each child
    looked up through ``resolve`` (a replaced child is the replacement)."""
    paths = [child_path(path, name) for name, _ in resolve(path).named_children()]
    return [(p, resolve(p)) for p in paths]


def resolved_modules(resolve: ModuleResolver, path: str = "") -> Iterator[Tuple[str, nn.Module]]:
    """``(path, module)`` of the module at ``path`` and of every module below it, depth first in
    registration order (as ``nn.Module.named_modules``), each looked up through ``resolve``."""
    pending = [(path, resolve(path))]
    while pending:
        current, module = pending.pop()
        yield current, module
        pending.extend(reversed(resolved_children(resolve, current)))


__all__ = ["ModuleResolver", "child_path", "resolved_children", "resolved_modules", "tree_resolver"]
