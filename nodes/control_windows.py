"""Host adapter: ControlNet and T2I-Adapter hints that follow ComfyUI's context windows.

The bug this fixes (ComfyUI 0.3.64). Under a context handler (``comfy/context_windows.py``
``IndexListContextHandler.execute`` / ``evaluate_context_windows``) each window is evaluated by
``comfy/samplers.py`` ``_calc_cond_batch_outer`` on the window's frames only, and
``IndexListContextHandler.get_resized_cond`` slices every per-frame tensor of a cond to the window,
but hands the cond's ``control`` through unchanged (``prepare_control_objects`` does nothing). The
control then meets a batch of ``len(window)`` frames times the cond/uncond chunks, and
``comfy/controlnet.py`` ``ControlNet.get_control`` fits its hint to that batch with
``broadcast_image_to``, which keeps the hint's *first* images (the first ``len(window)`` for each
chunk; a hint with exactly as many images as the batch is kept whole, so cond and uncond even get
different frames); the result is cached in ``cond_hint`` and reused by every later
window and step. Every window is driven by the first frames of the hint. ``T2IAdapter.get_control``
fits the hint the same way and also caches the adapter's features (``control_input``) from the
first window for the whole run.

The fix: a ``CALC_COND_BATCH`` wrapper (``comfy/patcher_extension.py`` ``WrappersMP``), which
``_calc_cond_batch_outer`` runs inside each window with
``model_options["transformer_options"]["context_window"]`` set to the window, hands the window's
conds to ComfyUI with every ControlBase of each ``control`` chain (walked through
``previous_controlnet``) replaced by a per-window twin whose hint holds the window's frames.

Which hint image a frame gets: exactly the one a one-batch run gives it. In one batch
``broadcast_image_to`` gives frame ``i`` of an ``F``-frame clip hint image ``i`` when the hint has
``n >= F`` images, and tiles a shorter hint (image ``i mod n``); both are image ``i mod n``, so a
window's twin gets images ``[i mod n for i in index_list]`` and the clip's frame count is never
needed. A single image (``n == 1``) is left alone: it broadcasts to every frame as before. A hint
with fewer images than the frames a window names is therefore not refused (the same graph without
windows runs and tiles it), but logged once per run, since it is usually a mistake. The per-frame
masks an inpainting ControlNet concatenates (``extra_concat_orig``, matched to the hint's images by
``comfy/utils.py`` ``repeat_to_batch_size`` in ``get_control``) follow the same rows.

Why twins and not swapping hints on the graph's objects: the ``control`` objects belong to the
CONDITIONING, which other nodes and later runs share. A twin is ``copy.copy`` of the original, not
``ControlBase.copy()``: the latter builds the object anew and drops what ``pre_run`` set for this
run (``ControlBase.pre_run``'s ``timestep_range``, ``ControlNet.pre_run``'s
``model_sampling_current``), and ``ControlLora.copy`` does not even share the control model
(``ControlLora.pre_run`` builds it). A shallow copy keeps all of that and shares the networks; only
the hint, its caches (``cond_hint``, ``T2IAdapter.control_input``) and the chain link are the
twin's own, so nothing of the originals is written. Twins of one window are cached for the run, one
per original object (so cond and uncond that share a control still share one and stay in one
batch, ``comfy/samplers.py`` ``can_concat_cond``), and keep their ``cond_hint`` between steps as
the original does in one batch. A window not used during the last step is dropped when the next
step starts: the ordered schedules reuse all of theirs, the uniform ones move their windows every
step and would otherwise collect one set per step. What stays on the device is then about what a
one-batch run keeps in ``cond_hint`` (every frame's hint per chunk), plus the frames windows
share, plus, under a uniform schedule, the windows of one more step. The cache ends with the sampling run (an
``OUTER_SAMPLE`` wrapper bounds it); ComfyUI's own ``cleanup`` of the originals is untouched.

Only windows over dim 0 are handled (SD-family models, where the frames are the batch, as
``ContextWindowsManual`` sets them with ``dim=0``); for other dims the hint's batch is not the
window's axis and the wrapper does nothing.
"""

from __future__ import annotations

import copy
import logging

import torch

from comfy.controlnet import ControlBase
from comfy.patcher_extension import WrappersMP

WRAPPER_KEY = "fatezero_control_windows"

log = logging.getLogger("comfyui-fatezero")


def window_rows(index_list, images: int) -> list[int] | None:
    """The hint images a window's frames get, as a one-batch run assigns them (image ``i mod n``
    for frame ``i``), or ``None`` when a single image serves every frame."""
    if images <= 1:
        return None
    return [int(i) % images for i in index_list]


def _take(tensor, rows: list[int] | None):
    if rows is None or not isinstance(tensor, torch.Tensor) or tensor.ndim == 0 or tensor.shape[0] <= 1:
        return tensor
    return tensor.index_select(0, torch.tensor(rows, device=tensor.device))


class _RunCache:
    """Per-window twins of the control objects met during one sampling run."""

    def __init__(self) -> None:
        # window frames -> {id(original): (original, twin)}; the original is kept so its id stays
        # unique while the entry lives.
        self.windows: dict[tuple[int, ...], dict[int, tuple[ControlBase, ControlBase]]] = {}
        self.step: float | None = None
        self.used: set[tuple[int, ...]] = set()
        self.warned: set[int] = set()

    def clear(self) -> None:
        self.windows.clear()
        self.used.clear()

    def _advance(self, timestep) -> None:
        # All frames of a step share its sigma; a new sigma starts a new step.
        step = float(timestep.reshape(-1)[0]) if isinstance(timestep, torch.Tensor) else float(timestep)
        if step == self.step:
            return
        if self.step is not None:
            self.windows = {k: v for k, v in self.windows.items() if k in self.used}
        self.used = set()
        self.step = step

    def conds_for(self, conds, index_list, timestep):
        """``conds`` with each control chain replaced by the window's twins (new lists and dicts;
        the given ones are not modified)."""
        key = tuple(int(i) for i in index_list)
        self._advance(timestep)
        self.used.add(key)
        twins = self.windows.setdefault(key, {})
        out = []
        for cond in conds:
            if cond is None:
                out.append(None)
                continue
            entries = []
            for entry in cond:
                control = entry.get("control")
                if isinstance(control, ControlBase):
                    entry = dict(entry, control=self._twin(control, key, twins))
                entries.append(entry)
            out.append(entries)
        return out

    def _twin(self, control: ControlBase, key: tuple[int, ...], twins: dict) -> ControlBase:
        found = twins.get(id(control))
        if found is not None:
            return found[1]
        twin = copy.copy(control)
        previous = control.previous_controlnet
        if isinstance(previous, ControlBase):
            twin.previous_controlnet = self._twin(previous, key, twins)
        hint = control.cond_hint_original
        images = hint.shape[0] if isinstance(hint, torch.Tensor) and hint.ndim > 0 else 1
        rows = window_rows(key, images)
        if rows is not None and max(key) >= images and id(control) not in self.warned:
            self.warned.add(id(control))
            log.warning("FateZero: a ControlNet hint has %d images but the context windows reach frame %d; "
                        "frames reuse hint images cyclically (frame i gets image i mod %d), as without "
                        "windows. Give one hint image per frame to drive every frame.",
                        images, max(key), images)
        twin.cond_hint_original = _take(hint, rows)
        if rows is not None:
            # The masks were matched to the hint's images (repeat_to_batch_size): image j's mask is
            # mask j mod m, so the window's frames take the masks of the hint images they take.
            twin.extra_concat_orig = [_take(c, window_rows(rows, c.shape[0]) if isinstance(c, torch.Tensor)
                                            and c.ndim > 0 else None)
                                      for c in control.extra_concat_orig]
        # The twin's own caches, computed from its hint on first use (ControlNet.get_control,
        # T2IAdapter.get_control).
        twin.cond_hint = None
        if hasattr(twin, "control_input"):
            twin.control_input = None
        twins[id(control)] = (control, twin)
        return twin


class WindowedControl:
    """The wrappers :func:`use_windowed_control` installs. Shared by every clone of the model
    (``ModelPatcher.clone`` copies the wrapper lists, not the wrappers); each sampling run gets its
    own :class:`_RunCache`, on a stack so a sampling nested in another keeps the outer one's."""

    def __init__(self) -> None:
        self._runs: list[_RunCache] = []

    def __deepcopy__(self, memo) -> "WindowedControl":
        return self

    def outer_sample(self, executor, *args, **kwargs):
        """``OUTER_SAMPLE`` wrapper (``comfy/samplers.py`` ``CFGGuider.outer_sample``, which also
        runs ``pre_run`` and ``cleanup`` of the controls): the run the twins live for."""
        run = _RunCache()
        self._runs.append(run)
        try:
            return executor(*args, **kwargs)
        finally:
            self._runs.remove(run)
            run.clear()

    def calc_cond_batch(self, executor, model, conds, x_in, timestep, model_options):
        """``CALC_COND_BATCH`` wrapper: inside a window over dim 0, the window's twins."""
        index_list = window_frames(model_options, x_in)
        if index_list is None:
            return executor(model, conds, x_in, timestep, model_options)
        # Outside a guider's run (a direct calc_cond_batch call) the twins last one call.
        run = self._runs[-1] if self._runs else _RunCache()
        return executor(model, run.conds_for(conds, index_list, timestep), x_in, timestep, model_options)


def window_frames(model_options: dict, x_in: torch.Tensor) -> list[int] | None:
    """The absolute frames of the context window ``x_in`` holds, or ``None`` outside a window.

    ``IndexListContextHandler.evaluate_context_windows`` sets ``transformer_options
    ["context_window"]`` before each window and never removes it, so the key alone does not mean
    the call is a window's: the model must have a context handler, the window must be over dim 0,
    and ``x_in`` must hold as many frames as the window names (``IndexListContextWindow.get_tensor``
    returns a batch of one unsliced)."""
    window = model_options.get("transformer_options", {}).get("context_window")
    handler = model_options.get("context_handler")
    index_list = getattr(window, "index_list", None)
    if handler is None or index_list is None:
        return None
    if getattr(window, "dim", getattr(handler, "dim", 0)) != 0:
        return None
    if x_in.ndim == 0 or x_in.shape[0] != len(index_list):
        return None
    return list(index_list)


def use_windowed_control(patcher) -> WindowedControl:
    """Make the ControlNet / T2I-Adapter hints of every cond follow the context window on
    ``patcher`` (a clone the caller owns; ComfyUI 0.3.64 ``ModelPatcher.add_wrapper_with_key``).
    Idempotent: returns the wrappers already installed. Without a context handler on the model,
    or with one that does not split this clip, sampling is unchanged."""
    existing = patcher.get_wrappers(WrappersMP.CALC_COND_BATCH, WRAPPER_KEY)
    if existing:
        return existing[0].__self__
    windowed = WindowedControl()
    patcher.add_wrapper_with_key(WrappersMP.OUTER_SAMPLE, WRAPPER_KEY, windowed.outer_sample)
    patcher.add_wrapper_with_key(WrappersMP.CALC_COND_BATCH, WRAPPER_KEY, windowed.calc_cond_batch)
    return windowed
