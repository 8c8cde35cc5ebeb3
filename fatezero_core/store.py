"""The compact attention store (paper eq. 4).

The official code stores every softmax map (``q x K*q`` per head for self-attention) at every
inversion step (FateZero ``video_diffusion/prompt_attention/attention_store.py``,
``AttentionStore.forward`` and ``between_steps``): ``2 f H sum_l q_l (77 + K q_l)`` bytes in fp16,
about 0.78 GB per step for 8 frames at 512 px. This store keeps what *recomputing* those maps
needs instead:

- self-attention layers: the source queries ``q`` of every frame (``[F, N, C]``) and the source
  keys ``k`` of the key frames only (``[F_key, N, C]``; one frame for the ``mid`` rule);
- cross-attention layers: the source probabilities (``[F, H, N, 77]``; small);
- the inversion latents ``z_0 .. z_N`` (for the local latent blend and for ``recompute``).

Placements:

- ``gpu``: tensors stay where they were computed;
- ``cpu``: copied to ordinary (pageable) host memory. Not pinned: PyTorch's pinned host allocator
  (``CachingHostAllocator``) rounds every block up to a power of two and keeps freed blocks for
  reuse, so a pinned store would hold up to twice its bytes of unswappable RAM, and keep it after
  the store is freed;
- ``disk``: one safetensors file per step in a private temporary folder, read back one step at a
  time, deleted when the store is released, garbage-collected or the process exits;
- ``recompute``: nothing but the latents; at edit time the source pass runs again on the stored
  inversion latent and its attention is held for the current step only (``scratch``).

A store is usable for editing only after :meth:`AttentionStore.finish`, which also takes the
:class:`InversionRecord`; an interrupted capture is never reused (its disk files go away with the
object).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Sequence
import tempfile
import weakref
from dataclasses import dataclass, field

import torch

from .errors import StoreMismatchError, StoreReleasedError, FateZeroError
from .keyframes import KeyRule, format_key_rule
from .layers import VAE_SCALE

PLACEMENTS = ("gpu", "cpu", "disk", "recompute")
FIELDS = ("q", "k", "probs")
STORE_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


@dataclass(frozen=True)
class CaptureConfig:
    """Everything an edit must agree with to reuse a capture: a store made for other frames, another
    size or another model is refused with what to change (:meth:`check_edit`)."""

    num_frames: int
    latent_size: tuple[int, int]
    sigmas: tuple[float, ...]  # ascending inversion sigmas, N + 1 values starting at the clean end
    key_rule: KeyRule
    min_st_channels: int
    layer_set: str
    model_fingerprint: str = ""
    # "clip": ResNet/output GroupNorms over the clip (official inflated UNet); "frame": per frame.
    # The edit runs the network the inversion ran: FateZero Sample takes it from here.
    group_norm: str = "clip"

    @property
    def num_steps(self) -> int:
        return len(self.sigmas) - 1

    def mismatches(self, *, num_frames, latent_size, model_fingerprint) -> list[str]:
        """Human-readable differences between this capture and an edit request."""
        problems = []
        if num_frames != self.num_frames:
            problems.append(
                f"the latent has {num_frames} frames but the store was captured on "
                f"{self.num_frames}: feed FateZero Sample the inverted latent from the same "
                "DDIM Invert node"
            )
        if tuple(latent_size) != tuple(self.latent_size):
            problems.append(
                f"the latent is {_pixels(latent_size)} px but the store was captured at "
                f"{_pixels(self.latent_size)} px: use the same frame size for inversion and editing"
            )
        if model_fingerprint and self.model_fingerprint and model_fingerprint != self.model_fingerprint:
            problems.append(
                "the store was captured with a different model (or different LoRA/patches): "
                "invert again with the model you edit with"
            )
        return problems

    def check_edit(self, **request) -> None:
        """Raise :class:`StoreMismatchError` listing every mismatch and what to change."""
        problems = self.mismatches(**request)
        if problems:
            raise StoreMismatchError(
                "This attention store does not match the edit: " + "; ".join(problems) + "."
            )

    def describe(self) -> str:
        return (
            f"{self.num_frames} frames at {_pixels(self.latent_size)} px, {self.num_steps} steps, "
            f"key frames [{format_key_rule(self.key_rule)}], layers '{self.layer_set}', GroupNorm "
            f"over the {self.group_norm}"
        )


def _pixels(latent_size) -> str:
    """``WxH`` in pixels of a latent ``(h, w)``, the way frame sizes are written everywhere else."""
    h, w = latent_size
    return f"{w * VAE_SCALE}x{h * VAE_SCALE}"


@dataclass
class InversionRecord:
    """What the inversion hands the edit besides the attention: the source conditioning (an
    opaque host object the ``recompute`` source pass replays), a fingerprint of it (checked against
    the edit's source prompt) and a fingerprint of the inverted latent it output (checked against
    the latent the edit starts from)."""

    source_conditioning: object = None
    source_fingerprint: str = ""
    inverted_latent: dict | None = None


@dataclass
class _StepData:
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())


def _key(layer: str, name: str) -> str:
    return f"{layer}.{name}"


class AttentionStore:
    """Step-indexed source attention, in one of four placements.

    Capture API (inversion): :meth:`put`, :meth:`end_step`, :meth:`set_latents`, :meth:`finish`.
    Read API (edit): :meth:`check_files`, :meth:`get`, :meth:`latent`, :attr:`record`, and for
    ``recompute`` :meth:`begin_regeneration`; :meth:`end_edit` when the edit ends. Accounting:
    :attr:`nbytes`, :meth:`nbytes_by_step`, :meth:`nbytes_by_layer`, :attr:`reading_nbytes`.
    Lifetime: :meth:`release`. ``directory`` is the private folder of a ``disk`` store (None
    otherwise).

    Steps are *inversion* step indices ``j`` (0 = the first, least noisy step).
    """

    def __init__(self, config: CaptureConfig, placement: str = "cpu", dtype: str | torch.dtype = "fp16",
                 disk_dir: str | None = None):
        if placement not in PLACEMENTS:
            raise FateZeroError(f"Unknown store placement '{placement}'; use one of {PLACEMENTS}.")
        self.config = config
        self.placement = placement
        self.dtype = STORE_DTYPES[dtype] if isinstance(dtype, str) else dtype
        self._steps: dict[int, _StepData] = {}
        self._step_bytes: dict[int, int] = {}
        self._layer_bytes: dict[str, int] = {}
        self._counted_keys: set[tuple[int, str]] = set()
        self._empty_rows: dict[tuple[int, str], set[int]] = {}  # rows no window has filled yet
        self._scratch_rows: dict[int, dict[str, dict[int, torch.Tensor]]] = {}  # recompute, by row
        self._files: dict[int, str] = {}
        self._latents: list[torch.Tensor] = []
        self._layers: dict[str, tuple] = {}
        self._scratch: dict[int, _StepData] = {}
        self._cached_step: tuple[int, dict[str, torch.Tensor]] | None = None
        self.complete = False
        self.released = False
        self.record = InversionRecord()  # set by finish()
        self.directory: str | None = None
        self._finalizer = None
        if placement == "disk":
            base = disk_dir or tempfile.gettempdir()
            os.makedirs(base, exist_ok=True)
            self.directory = tempfile.mkdtemp(prefix="fatezero_store_", dir=base)
            # Runs on release, on garbage collection and at interpreter exit.
            self._finalizer = weakref.finalize(self, shutil.rmtree, self.directory, True)

    # ---------------------------------------------------------------- capture
    @property
    def keeps_attention(self) -> bool:
        """False for ``recompute``: inversion records latents only."""
        return self.placement != "recompute"

    def register_layer(self, layer, kind: str, stored: bool) -> None:
        """Record a hooked layer (its grid, heads, kind) in the manifest the edit reads masks from."""
        if (layer.name, kind) not in self._layers:
            self._layers[(layer.name, kind)] = (layer, kind, stored)

    def last_stored_layer(self) -> tuple[str, str] | None:
        """``(layer name, "self"/"cross")`` of the last stored layer in call order, or None."""
        stored = [(info.name, k) for info, k, s in self._layers.values() if s]
        return stored[-1] if stored else None

    def layers(self, kind: str | None = None, stored_only: bool = True) -> list:
        """Hooked layers in call order, optionally filtered by ``"self"``/``"cross"``."""
        return [info for info, k, s in self._layers.values()
                if (kind is None or k == kind) and (s or not stored_only)]

    def put(self, step: int, layer: str, name: str, tensor: torch.Tensor,
            rows: Sequence[int] | None = None, total: int | None = None) -> None:
        """Record one tensor of the source pass of inversion step ``step``.

        With ``rows``, ``tensor`` holds those rows of a tensor of ``total`` rows (the frames of a
        context window, :mod:`.windows`): the step's tensor is filled window by window, and
        :meth:`finish` refuses a capture that left a row empty."""
        self._check_alive()
        if name not in FIELDS:
            raise FateZeroError(f"Unknown store field '{name}'.")
        key = _key(layer, name)
        if self.placement == "recompute":
            if rows is None:
                self._scratch.setdefault(step, _StepData()).tensors[key] = tensor.detach()
            else:
                kept = self._scratch_rows.setdefault(step, {}).setdefault(key, {})
                # Copies: a view would keep the whole window's tensor alive after its rows are dropped.
                kept.update((row, t.clone()) for row, t in zip(rows, tensor.detach()))
            return
        if self.complete:
            raise FateZeroError("This attention store is finished; capture into a new store.")
        data = self._steps.setdefault(step, _StepData())
        if rows is None:
            stored = self._place(tensor.detach().to(self.dtype))
            data.tensors[key] = stored
        else:
            stored = data.tensors.get(key)
            if stored is None:
                device = tensor.device if self.placement == "gpu" else "cpu"
                stored = torch.zeros((total, *tensor.shape[1:]), dtype=self.dtype, device=device)
                data.tensors[key] = stored
                self._empty_rows[(step, key)] = set(range(total))
            stored[torch.as_tensor(list(rows), device=stored.device)] = tensor.detach().to(stored.device, self.dtype)
            self._empty_rows[(step, key)] -= set(rows)
        self._count(step, layer, key, stored)

    def _count(self, step: int, layer: str, key: str, stored: torch.Tensor) -> None:
        if (step, key) in self._counted_keys:
            return
        self._counted_keys.add((step, key))
        nbytes = stored.numel() * stored.element_size()
        self._step_bytes[step] = self._step_bytes.get(step, 0) + nbytes
        self._layer_bytes[layer] = self._layer_bytes.get(layer, 0) + nbytes

    def _place(self, t: torch.Tensor) -> torch.Tensor:
        if self.placement == "gpu":
            return t.clone()
        # A plain blocking copy from any device: exactly the tensor's bytes, returned to the
        # system when freed (see the module docstring for why not pinned memory).
        return t.to("cpu", copy=True)

    def end_step(self, step: int) -> None:
        """Close a captured step; ``disk`` writes it to its own file and frees the memory."""
        self._check_rows_filled(step)
        if self.placement != "disk" or step not in self._steps:
            return
        from safetensors.torch import save_file

        path = os.path.join(self.directory, f"step_{step:04d}.safetensors")
        save_file({k: v.contiguous() for k, v in self._steps.pop(step).tensors.items()}, path)
        self._files[step] = path

    def _check_rows_filled(self, step: int) -> None:
        empty = {key: rows for (j, key), rows in self._empty_rows.items() if j == step and rows}
        if empty:
            key, rows = next(iter(empty.items()))
            raise FateZeroError(
                f"Capture incomplete: no context window computed rows {sorted(rows)[:5]} of {key} at "
                f"step {step}; every frame must be in some window. Check the context-window settings.")

    def set_latents(self, latents) -> None:
        """Keep the inversion latents ``z_0 .. z_N`` (``[F, 4, h, w]`` each) on the CPU."""
        self._check_alive()
        self._latents = [z.detach().float().cpu() for z in latents]

    def finish(self, record: InversionRecord | None = None) -> "AttentionStore":
        """Mark the capture complete with what the inversion hands the edit besides the attention
        (``record``); the store becomes readable. Checks nothing is missing."""
        self._check_alive()
        n = self.config.num_steps
        if len(self._latents) != n + 1:
            raise FateZeroError(
                f"Capture incomplete: {len(self._latents)} latents for {n} steps; invert again."
            )
        for step in {j for j, _ in self._empty_rows}:
            self._check_rows_filled(step)
        if self.keeps_attention:
            captured = set(self._steps) | set(self._files)
            missing = [j for j in range(n) if j not in captured]
            if missing:
                raise FateZeroError(
                    f"Capture incomplete: steps {missing[:5]} recorded no attention; invert again."
                )
        self.record = record if record is not None else InversionRecord()
        self.complete = True
        return self

    # ------------------------------------------------------------------ read
    def _check_alive(self):
        if self.released:
            raise StoreReleasedError(
                "This attention store was released; run FateZero DDIM Invert again."
            )

    def check_readable(self):
        """Raise unless the capture finished and the store was not released: the one check every
        reader makes (FateZero Sample, the edit controller, each read)."""
        self._check_alive()
        if not self.complete:
            raise StoreReleasedError(
                "This attention store is incomplete (its inversion was interrupted or failed); "
                "run FateZero DDIM Invert again."
            )

    def check_files(self):
        """:meth:`check_readable`, and (``disk``) every step's file is still there: an edit
        checks this before its first step, so files deleted behind the store's back stop it
        with the remedy instead of failing midway."""
        self.check_readable()
        missing = [path for path in self.files() if not os.path.isfile(path)]
        if missing:
            raise self._files_gone(f"{len(missing)} of its {len(self._files)} step files are missing")

    def _files_gone(self, what: str) -> StoreReleasedError:
        return StoreReleasedError(
            f"This attention store's files in '{self.directory}' were deleted or damaged ({what}); run "
            "FateZero DDIM Invert again. ComfyUI reuses its cached DDIM Invert output, so first "
            "click 'Free model and node cache' (or change a DDIM Invert setting), then queue again."
        )

    def _step_tensors(self, step: int) -> dict[str, torch.Tensor]:
        if self.placement == "recompute":
            if step not in self._scratch:
                raise FateZeroError(f"No regenerated source attention for step {step}.")
            return self._scratch[step].tensors
        if self.placement != "disk":
            return self._steps[step].tensors
        if self._cached_step is None or self._cached_step[0] != step:
            # One file read per step, not per layer call (the official disk store reloads the
            # whole step at each of its 22 hooked calls).
            from safetensors import SafetensorError, safe_open

            self._cached_step = None  # the previous step goes before the next one is read
            path = self._files[step]
            try:
                with safe_open(path, framework="pt") as f:
                    self._cached_step = (step, {k: f.get_tensor(k) for k in f.keys()})
            except (OSError, SafetensorError) as exc:
                raise self._files_gone(f"step {step}: {exc}") from None
        return self._cached_step[1]

    def get(self, step: int, layer: str, name: str, device=None, dtype=None,
            rows: Sequence[int] | None = None) -> torch.Tensor:
        """The stored tensor, moved to ``device``/``dtype``; with ``rows``, only those rows (the
        frames of a context window), in that order."""
        self.check_readable()
        key = _key(layer, name)
        by_row = self._scratch_rows.get(step, {}).get(key) if self.placement == "recompute" else None
        if by_row:
            t = self._rows_of(by_row, rows, key, step)
        else:
            try:
                t = self._step_tensors(step)[key]
            except KeyError:
                raise FateZeroError(
                    f"The attention store has no '{name}' for layer {layer} at step {step}; it was "
                    "captured with other layers or steps. Invert again with the current settings."
                ) from None
            if rows is not None:
                t = t.index_select(0, torch.as_tensor(list(rows), device=t.device))
        return t.to(device=device or t.device, dtype=dtype or t.dtype, non_blocking=True)

    @staticmethod
    def _rows_of(by_row: dict[int, torch.Tensor], rows, key: str, step: int) -> torch.Tensor:
        rows = sorted(by_row) if rows is None else list(rows)
        missing = [r for r in rows if r not in by_row]
        if missing:
            raise FateZeroError(
                f"No regenerated source attention for rows {missing[:5]} of {key} at step {step}.")
        return torch.stack([by_row[r] for r in rows])

    def latent(self, index: int) -> torch.Tensor:
        """Inversion latent ``z_index`` (0 = clean input, N = the edit's starting noise)."""
        self.check_readable()
        return self._latents[index]

    # ------------------------------------------------------------- recompute
    def begin_regeneration(self, step: int) -> None:
        """``recompute``: drop the previous step's regenerated attention before a source pass."""
        self.check_readable()
        self._scratch = {step: _StepData()}
        self._scratch_rows = {step: {}}

    def retain_regenerated(self, keep: Callable[[str, int], bool]) -> None:
        """``recompute`` in context windows: keep only the regenerated rows ``keep(key, row)``
        asks for (``key`` is ``"<layer>.<field>"``), before the next window's source pass."""
        for by_key in self._scratch_rows.values():
            for key, by_row in by_key.items():
                for row in [r for r in by_row if not keep(key, r)]:
                    del by_row[row]

    @property
    def reading_nbytes(self) -> int:
        """Bytes an edit's reads hold beyond :attr:`nbytes`: the step last read from its file
        (``disk``) or regenerated (``recompute``). Zero after :meth:`end_edit`."""
        cached = self._cached_step[1].values() if self._cached_step is not None else ()
        scratch = sum(s.nbytes() for s in self._scratch.values()) + sum(
            t.numel() * t.element_size() for by_key in self._scratch_rows.values()
            for by_row in by_key.values() for t in by_row.values())
        return sum(t.numel() * t.element_size() for t in cached) + scratch

    def end_edit(self) -> None:
        """The edit reading this store ended (finished, failed or cancelled): drop what its
        reads hold (:attr:`reading_nbytes`), so a ``disk`` or ``recompute`` store keeps RAM at the
        level of plain sampling between edits. The store stays readable; the next edit reads
        again."""
        self._cached_step = None
        self._scratch = {}
        self._scratch_rows = {}

    # ------------------------------------------------------------ accounting
    @property
    def nbytes(self) -> int:
        """Exact bytes the store holds across steps: attention tensors plus latents."""
        return sum(self._step_bytes.values()) + self.latent_nbytes

    @property
    def latent_nbytes(self) -> int:
        return sum(z.numel() * z.element_size() for z in self._latents)

    def nbytes_by_step(self) -> dict[int, int]:
        """Attention bytes per inversion step (latents not included)."""
        return dict(self._step_bytes)

    def nbytes_by_layer(self) -> dict[str, int]:
        """Attention bytes per layer, summed over steps."""
        return dict(self._layer_bytes)

    def files(self) -> list[str]:
        """Paths of the per-step files (``disk`` only), the ones :meth:`check_files` looks for."""
        return [self._files[j] for j in sorted(self._files)]

    # -------------------------------------------------------------- lifetime
    def release(self) -> None:
        """Free all memory and delete disk files now. The store is unusable afterwards."""
        self._steps.clear()
        self._step_bytes.clear()
        self._layer_bytes.clear()
        self._files.clear()
        self._scratch.clear()
        self._scratch_rows.clear()
        self._counted_keys.clear()
        self._empty_rows.clear()
        self._latents = []
        self._cached_step = None
        self.record = InversionRecord()
        if self._finalizer is not None:
            self._finalizer()
        self.complete = False
        self.released = True

    def __repr__(self):
        state = "released" if self.released else ("complete" if self.complete else "capturing")
        attention = self.nbytes - self.latent_nbytes
        return (f"AttentionStore({self.placement}, {state}, {self.config.describe()}, "
                f"{attention / 2**20:.1f} MiB attention + {self.latent_nbytes / 2**20:.1f} MiB "
                "latents on the CPU)")
