"""Modules read by path through a resolver (``fatezero_core.module_paths``), and the functions that
inspect or wrap UNet modules reading through one: clip-level GroupNorm paths and temporal-layer
patches. The UNet is the ldm-layout stand-in of ``test_tav_inflate``.

The live tree here holds a replacement another model left behind (as ComfyUI leaves a clone's
object patches applied after sampling); the resolver is the view of the model being built, which
has its own replacements and none of the other model's.
"""

from torch import nn

from fatezero_core.frames import VideoNormSequential, FrameContext, video_norm_paths
from fatezero_core.module_paths import resolved_children, resolved_modules, tree_resolver
from fatezero_core.tav.inflate import conv_patch
from test_tav_inflate import MiniUNet, set_attr

RESNET_NORMS = ["input_blocks.1.0.in_layers", "input_blocks.1.0.out_layers",
                "output_blocks.0.0.in_layers", "output_blocks.0.0.out_layers"]


def view(root: nn.Module, own: dict):
    """A model's resolver: its own replacements at ``own``'s paths, ``root``'s modules elsewhere,
    every level of a path looked up that way."""

    def resolve(path: str) -> nn.Module:
        if path in own:
            return own[path]
        if not path:
            return root
        parent, _, name = path.rpartition(".")
        return getattr(resolve(parent), name)

    return resolve


def left_behind(unet: nn.Module, path: str) -> nn.Module:
    """Install another model's clip-norm replacement (plus an extra layer) at ``path``; returns
    the original container."""
    original = unet.get_submodule(path)
    set_attr(unet, path, VideoNormSequential(*original, nn.Identity(), frames=FrameContext()))
    return original


def test_a_plain_tree_resolves_as_named_modules():
    unet = MiniUNet()
    walked = list(resolved_modules(tree_resolver(unet)))
    assert [p for p, _ in walked] == [p for p, _ in unet.named_modules()]
    assert all(a is b for (_, a), (_, b) in zip(walked, unet.named_modules()))
    assert [p for p, _ in resolved_children(tree_resolver(unet), "input_blocks.1")] == [
        "input_blocks.1.0", "input_blocks.1.1"]


def test_the_walk_sees_the_models_own_replacements_and_not_those_left_behind():
    unet = MiniUNet()
    original = left_behind(unet, "input_blocks.1.0.in_layers")
    own_out = nn.Sequential(*unet.out, nn.Identity())
    resolve = view(unet, {"input_blocks.1.0.in_layers": original, "out": own_out})
    walked = dict(resolved_modules(resolve))
    assert walked["input_blocks.1.0.in_layers"] is original
    assert "input_blocks.1.0.in_layers.3" not in walked  # the other model's extra layer
    assert walked["out"] is own_out and isinstance(walked["out.3"], nn.Identity)
    assert walked["input_blocks.1.0.in_layers.0"] is original[0]


def test_video_norm_paths_are_read_through_the_resolver():
    unet = MiniUNet()
    assert video_norm_paths(tree_resolver(unet)) == RESNET_NORMS + ["out"]
    original = left_behind(unet, "input_blocks.1.0.in_layers")
    no_norm_out = nn.Sequential(nn.SiLU(), *unet.out[1:])  # this model's 'out' has no GroupNorm first
    resolve = view(unet, {"input_blocks.1.0.in_layers": original, "out": no_norm_out})
    assert video_norm_paths(resolve) == RESNET_NORMS


def test_a_temporal_conv_patch_wraps_the_models_own_container():
    """The patch holds the modules of the container the resolver names, in that container's type,
    plus the new layer: never the replacement another model left in the live tree."""
    unet = MiniUNet()
    original = left_behind(unet, "input_blocks.1.0.in_layers")
    extra = nn.Identity()
    path, patch = conv_patch(view(unet, {"input_blocks.1.0.in_layers": original}),
                             "input_blocks.1.0.in_layers.2", extra)
    assert path == "input_blocks.1.0.in_layers"
    assert type(patch) is nn.Sequential and list(patch) == [*original, extra]
