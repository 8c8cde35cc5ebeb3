"""FateZero Edit List: several edits of one inversion, run in one queue with ComfyUI's lists.

The outputs are ComfyUI lists (``is_output_list``): FateZero Sample and every node after it run once
per edit, with the inversion's latent and store repeated for each (ComfyUI's list mapping in
``execution.py`` ``_map_node_over_list``). The store is only read, so edit k of the list equals
edit k queued alone.
"""

from __future__ import annotations

from comfy_api.latest import io

from ..fatezero_core.edit_spec import EditSpec
from .prompt_encoding import output_prefix
from .sockets import BlendSettings
from .user_errors import FateZeroNodeError, reports_user_errors

MAX_EDITS = 4


def _edit_inputs(k: int) -> list:
    optional = k > 1
    return [
        io.Conditioning.Input(f"target_{k}", optional=optional,
                              tooltip=f"Edit {k}: the target output of a FateZero Edit Settings (ControlNet may be applied)."),
        BlendSettings.Input(f"blend_settings_{k}", optional=optional,
                            tooltip=f"Edit {k}: the blend_settings output of the same FateZero Edit Settings."),
    ]


class FateZeroEditList(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FateZero_EditList",
            display_name="FateZero Edit List",
            category="FateZero/attention",
            description=(
                "Edit one inversion several ways in one queue (the official editing_prompts): "
                f"up to {MAX_EDITS} edits, each a target and its blend settings. FateZero Sample, "
                "VAE Decode and Save Video after this node run once per edit; connect 'name' to "
                "Save Video's filename_prefix to name each file after its target prompt."
            ),
            inputs=[i for k in range(1, MAX_EDITS + 1) for i in _edit_inputs(k)],
            outputs=[
                io.Conditioning.Output(display_name="target", is_output_list=True,
                                       tooltip="Each edit's target: FateZero Sample's positive."),
                BlendSettings.Output(display_name="blend_settings", is_output_list=True,
                                     tooltip="Each edit's blend settings: FateZero Sample's blend_settings."),
                io.String.Output(display_name="name", is_output_list=True,
                                 tooltip="'fatezero/<target prompt as a file name>' per edit, numbered when two targets name alike."),
            ],
        )

    @classmethod
    @reports_user_errors
    def execute(cls, **inputs) -> io.NodeOutput:
        targets, specs = [], []
        for k in range(1, MAX_EDITS + 1):
            target, spec = inputs.get(f"target_{k}"), inputs.get(f"blend_settings_{k}")
            if target is None and spec is None:
                continue
            if target is None or spec is None:
                missing = "target" if target is None else "blend_settings"
                raise FateZeroNodeError(f"Edit {k} has no {missing}_{k}: connect both outputs of its FateZero Edit Settings.")
            if not isinstance(spec, EditSpec):
                raise FateZeroNodeError(f"blend_settings_{k} must come from FateZero Edit Settings.")
            targets.append(target)
            specs.append(spec)
        return io.NodeOutput(targets, specs, edit_names(specs))


def edit_names(specs) -> list[str]:
    """One file name per edit, after its target prompt; repeated names get ``_2``, ``_3``."""
    names, seen = [], {}
    for spec in specs:
        prefix = output_prefix(spec.target_prompt)
        seen[prefix] = seen.get(prefix, 0) + 1
        names.append(prefix + (f"_{seen[prefix]}" if seen[prefix] > 1 else ""))
    return names
