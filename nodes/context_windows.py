"""Host side of FateZero in ComfyUI's context windows: the key pass before the windows of every
model evaluation, and the window each attention call belongs to.

ComfyUI 0.3.64 runs a MODEL that carries a context handler (the ``Context Windows (Manual)`` node,
``comfy_extras/nodes_context_windows.py``) a window of frames at a time: ``comfy/samplers.py``
``calc_cond_batch`` hands each model evaluation to ``IndexListContextHandler.execute``
(``comfy/context_windows.py``), which runs every window through ``calc_cond_batch`` on its frames
with ``transformer_options["context_window"]`` naming them, and fuses the results. Its callbacks
let a pack act around that: ``EXECUTE_START`` once before the windows, ``EVALUATE_CONTEXT_WINDOWS``
before each. :func:`install_window_passes` registers both on the handler of a clone the caller
owns (``ModelPatcher.clone`` deep-copies ``model_options``, handler included, so the MODEL the node
received keeps its handler untouched):

- at the start, the plan of the evaluation's windows (``fatezero_core.windows.plan_windows``) and
  the *key pass*: the clip's shared key frames through the UNet alone, so every window attends to
  their keys and values (``recompute``: the source pass of those frames first);
- before each window, the window's index for the shared keys (``recompute``: the window's own
  source pass, so the regenerated attention held is one window's, not the clip's).
"""

from __future__ import annotations

import logging

import comfy.context_windows
import comfy.model_patcher
import comfy.patcher_extension
import comfy.samplers

from ..fatezero_core.controller import SourcePassComplete
from ..fatezero_core.errors import FateZeroError
from ..fatezero_core.keyframes import format_key_rule
from ..fatezero_core.windows import plan_windows

log = logging.getLogger("comfyui-fatezero")

CALLBACK_KEY = "fatezero_windows"
KEY_PASS_KEY = "fatezero_key_pass"  # transformer_options flag of the key pass


def context_handler(model):
    """The model's context handler when FateZero can run in it (frame windows of ComfyUI's own
    ``IndexListContextHandler`` over dim 0), else None; any other handler is refused."""
    handler = model.model_options.get("context_handler")
    if handler is None:
        return None
    if not isinstance(handler, comfy.context_windows.IndexListContextHandler) or handler.dim != 0:
        raise FateZeroError(
            "FateZero runs in context windows over the frames of the batch: use Context Windows "
            "(Manual) with dim 0 on the MODEL (not the WAN variant or another pack's handler), or "
            "remove the context-window node.")
    return handler


class FrameWindowsHandler(comfy.context_windows.IndexListContextHandler):
    """ComfyUI's own frame-window handler, reading the step from one sigma.

    ``IndexListContextHandler.set_step`` (``comfy/context_windows.py``, 0.3.64) compares the
    schedule with the whole timestep tensor, which for frames along dim 0 holds one sigma per frame
    of the batch and fails to broadcast unless the batch has one element. Every frame of a
    FateZero step shares its sigma, so the first one finds the step. The pack installs this on its
    own clone's copy of the handler (:func:`own_handler`); the MODEL the node received keeps its
    handler."""

    def set_step(self, timestep, model_options):
        super().set_step(timestep.reshape(-1)[:1], model_options)


def own_handler(patcher):
    """``patcher``'s handler (a clone the caller owns) as a :class:`FrameWindowsHandler` with the
    same settings and callbacks; None without windows."""
    handler = context_handler(patcher)
    if handler is None:
        return None
    if type(handler) is FrameWindowsHandler:
        return handler
    own = FrameWindowsHandler.__new__(FrameWindowsHandler)
    own.__dict__.update(handler.__dict__)
    own.callbacks = comfy.patcher_extension.copy_nested_dicts(handler.callbacks)
    patcher.model_options["context_handler"] = own
    return own


def call_window(extra: dict, frames_per_chunk: int) -> tuple[tuple[int, ...] | None, bool]:
    """``(clip frames of each chunk, key pass?)`` of an attention call from its
    ``transformer_options``; ``(None, False)`` outside windows."""
    window = extra.get("context_window")
    if window is None or len(window.index_list) != frames_per_chunk:
        return None, False
    return tuple(int(f) for f in window.index_list), bool(extra.get(KEY_PASS_KEY))


def run_frames(model, conds, x, timestep, model_options, frames, key_pass: bool, flags=None):
    """The conds on ``frames`` of the full batch ``x`` as the handler runs a window
    (``IndexListContextHandler.evaluate_context_windows``: conds resized with
    ``get_resized_cond``, ``transformer_options["context_window"]`` naming the frames, then the
    ``calc_cond_batch`` it was handed, ``comfy/samplers.py`` ``_calc_cond_batch_outer``, which runs
    the CALC_COND_BATCH wrappers, e.g. the ControlNet hints' ``control_windows``), flagged so
    attention calls know the pass."""
    handler = model_options["context_handler"]
    window = comfy.context_windows.IndexListContextWindow(list(frames), dim=0)
    options = comfy.model_patcher.create_model_options_clone(model_options)
    transformer_options = options.setdefault("transformer_options", {})
    transformer_options.update({"context_window": window, KEY_PASS_KEY: key_pass, **(flags or {})})
    sub_conds = [handler.get_resized_cond(cond, x, window) for cond in conds]
    return comfy.samplers._calc_cond_batch_outer(model, sub_conds, window.get_tensor(x),
                                                 window.get_tensor(timestep, dim=0), options)


def install_window_passes(patcher, controller, source_pass=None) -> bool:
    """Run ``controller`` (a capture or edit controller whose attention ``patcher`` already routes)
    in the context windows of ``patcher``'s handler, if it has one. ``source_pass(model,
    model_options, timestep, frames, key_pass)`` runs the ``recompute`` source pass of those
    frames. Returns whether the model runs in windows."""
    handler = own_handler(patcher)
    if handler is None:
        return False
    shared = controller.shared_keys
    warned = []

    def start(handler, model, x_in, conds, timestep, model_options):
        windows = handler.get_context_windows(model, x_in, model_options)
        plan = plan_windows([w.index_list for w in windows], controller.config.key_rule, x_in.shape[0])
        if plan.stand_ins and not warned:
            warned.append(True)
            window, key, stand_in = plan.stand_ins[0]
            log.warning(
                "FateZero: with key frames [%s] these context windows (schedule %s) reach key "
                "frames no earlier window computed (window %d needs frame %d; frame %d stands in), "
                "%d times in this step: the result differs from editing the clip in one batch. "
                "standard_static and batched run windows in frame order.",
                format_key_rule(plan.rule), handler.context_schedule.name, window, key, stand_in,
                len(plan.stand_ins))
        shared.begin(plan)
        if not plan.shared:
            return
        shared.enter_key_pass()
        if source_pass is not None:
            source_pass(model, model_options, timestep, plan.shared, True)
        run_frames(model, conds, x_in, timestep, model_options, plan.shared, True)

    def enter(handler, model, x_in, conds, timestep, model_options, window_idx, window, *_):
        shared.enter_window(window_idx)
        if source_pass is not None:
            controller.retain_for_window()
            source_pass(model, model_options, timestep, tuple(window.index_list), False)

    def cleanup(handler, model, x_in, conds, timestep, model_options):
        shared.end()

    callbacks = comfy.context_windows.IndexListCallbacks
    for kind, function in ((callbacks.EXECUTE_START, start), (callbacks.EVALUATE_CONTEXT_WINDOWS, enter),
                           (callbacks.EXECUTE_CLEANUP, cleanup)):
        comfy.patcher_extension.add_callback_with_key(kind, CALLBACK_KEY, function, handler.callbacks)
    return True


def source_pass_ends_early(function):
    """Run a source pass that may end with :class:`SourcePassComplete` (every stored layer of the
    step captured): the end is expected, its output is never used."""
    try:
        function()
    except SourcePassComplete:
        pass
