"""FateZero DDIM Invert (capture attention): paper eq. 4, ``z_T, c_src, s_src = DDIM-INV(z_0, p_src)``."""

from __future__ import annotations

import logging

import comfy.samplers
import comfy.utils
import latent_preview
from comfy_api.latest import io

from ..fatezero_core.controller import CaptureController
from ..fatezero_core.ddim import SCHEDULE_ENDS
from ..fatezero_core.errors import FateZeroError
from ..fatezero_core.keyframes import SD_KEY_RULE, parse_frame_positions, parse_key_rule, place_rule
from ..fatezero_core.layers import LAYER_SETS
from ..fatezero_core.sampling import official_sigmas, sample_ddim_inversion
from ..fatezero_core.store import PLACEMENTS, STORE_DTYPES, AttentionStore, CaptureConfig, InversionRecord
from .video_runtime import GROUP_NORMS, with_group_norm
from .latents import frames_latent, latent_fingerprint
from .patching import conditioning_fingerprint, model_fingerprint, model_key_rule, patched_clone
from .samplers import FateZeroGuider, zero_noise
from .sockets import AttnStore
from .context_windows import install_window_passes
from .control_windows import use_windowed_control
from .store_folder import store_folder
from .store_memory import check_store_memory
from .user_errors import reports_user_errors

log = logging.getLogger("comfyui-fatezero")

# The official rules first; the anchor rules keep a long shot's look along the shot in context
# windows (every frame attends to frames of its own part of the shot, shared by every window).
KEY_FRAME_CHOICES = ["auto", "mid", "self, mid", "prev, first", "first", "self",
                     "first, mid, last", "anchors/8", "anchors/16", "anchors/32"]
OFFICIAL_MIN_CHANNELS = 640  # official least_sc_channel for SD configs


def resolve_key_rule(choice: str, model):
    """``auto``: the model's own rule (Tune-A-Video: prev + first), else the official SD ``mid``."""
    if choice == "auto":
        rule = model_key_rule(model)
        return parse_key_rule(rule) if rule else SD_KEY_RULE
    return parse_key_rule(choice)


def resolve_min_channels(value: int, model) -> int:
    if value >= 0:
        return value
    return 0 if model_key_rule(model) else OFFICIAL_MIN_CHANNELS


class FateZeroDDIMInvert(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="FateZero_DDIMInvert",
            display_name="FateZero DDIM Invert (capture attention)",
            category="FateZero/sampling",
            description=(
                "Deterministic DDIM inversion of all frames with the source prompt (cfg 1, as the "
                "official code), capturing the attention FateZero Sample fuses back in. Outputs the "
                "noisy latent to edit from (no extra noise needed) and the attention store."),
            inputs=[
                io.Model.Input("model", tooltip="The model to invert with; edit with the same one (LoRA included)."),
                io.Conditioning.Input("source", tooltip="Source prompt conditioning: describe the input video. Use the 'source' output of FateZero Source Prompt."),
                io.Latent.Input("latent", tooltip="VAE-encoded frames, one frame per batch element."),
                io.Int.Input("steps", default=50, min=1, max=999, tooltip="DDIM steps (official: 50; 10 for low memory). FateZero Sample reuses them."),
                io.Combo.Input("key_frames", options=KEY_FRAME_CHOICES, default="auto",
                               tooltip="Spatio-temporal self-attention keys, frames of the whole clip (also in context windows, where every window attends to the same key frames). auto: the model's own rule (Tune-A-Video: prev, first) else 'mid' (official SD). 'self, mid' is the paper's eq. 8. For long shots: 'first, mid, last', or 'anchors/N': every frame attends to its two nearest anchors (every N-th frame and the last)."),
                io.Int.Input("st_min_channels", default=-1, min=-1, max=4096,
                             tooltip="Layers narrower than this use per-frame self-attention (official least_sc_channel). -1: auto, 640 for SD and 0 for Tune-A-Video models."),
                io.Combo.Input("store_placement", options=list(PLACEMENTS), default="cpu",
                               tooltip="Where captured attention lives. cpu: host RAM; gpu: fastest, uses VRAM; disk: temp files deleted when freed; recompute: almost no memory, ~50% more UNet work when editing. A placement whose store would not fit in the free memory is refused before inverting."),
                io.Combo.Input("store_dtype", options=list(STORE_DTYPES), default="fp16", tooltip="Precision of the stored attention."),
                io.Combo.Input("layer_set", options=list(LAYER_SETS), default="relative",
                               tooltip="Stored/fused layers. relative: 1/2, 1/4, 1/8 of the latent side (official at 512 px); relative+full: also full resolution; official: query length <= 1024 tokens."),
                io.Combo.Input("schedule_end", options=list(SCHEDULE_ENDS), default="comfy",
                               tooltip="Clean end of the schedule. comfy: sigma 0; official: alphas_cumprod[0] like the official code (results match it more closely)."),
                io.Combo.Input("group_norm", options=list(GROUP_NORMS), default="clip", optional=True,
                               tooltip="ResNet GroupNorm statistics. clip: over all frames of the clip, as the official inflated UNet (and every Tune-A-Video model) computes them; frame: each frame alone, as a plain image UNet. FateZero Sample uses the same."),
                # A socket: it takes Load Video Frames' frame_positions, and older saves keep their widget values.
                io.String.Input("frame_positions", default="", optional=True, force_input=True,
                                tooltip="Where the latent's frames sit in the whole clip, from FateZero Load Video Frames' frame_positions (a segment loaded with the clip's anchor frames): key_frames then names frames of the whole clip ('mid' is the clip's middle frame, not the segment's). Empty: the frames are the whole clip."),
            ],
            outputs=[
                io.Latent.Output(display_name="inverted_latent", tooltip="Noisy latent x_T: feed to FateZero Sample."),
                AttnStore.Output(display_name="attention_store", tooltip="Captured source attention for FateZero Sample."),
            ],
        )

    @classmethod
    @reports_user_errors
    def execute(cls, model, source, latent, steps, key_frames, st_min_channels, store_placement,
                store_dtype, layer_set, schedule_end, group_norm="clip", frame_positions="") -> io.NodeOutput:
        samples = frames_latent(latent)
        frames, _, h, w = samples.shape
        key_rule = resolve_key_rule(key_frames, model)
        placed = parse_frame_positions(frame_positions)
        if placed is not None:
            clip_frames, positions = placed
            if len(positions) != frames:
                raise FateZeroError(
                    f"frame_positions '{frame_positions}' lists {len(positions)} frames but the latent "
                    f"has {frames}: connect the frame_positions of the Load Video Frames node whose "
                    "frames were encoded into this latent.")
            key_rule = place_rule(key_rule, positions, clip_frames)
        network = with_group_norm(model, group_norm)
        sigmas = official_sigmas(model.get_model_object("model_sampling").sigmas, steps, schedule_end).flip(0)
        config = CaptureConfig(
            num_frames=frames, latent_size=(h, w), sigmas=tuple(sigmas.tolist()),
            key_rule=key_rule,
            min_st_channels=resolve_min_channels(st_min_channels, model), layer_set=layer_set,
            model_fingerprint=model_fingerprint(model), group_norm=group_norm)
        # Memory before time: a store that cannot fit is refused here, not after the inversion ran.
        check_store_memory(model, config, store_placement, store_dtype, source)
        store = AttentionStore(config, placement=store_placement, dtype=store_dtype,
                               disk_dir=store_folder() if store_placement == "disk" else None)
        controller = CaptureController(store)
        patched = patched_clone(network, controller, step_offset=-1)
        install_window_passes(patched, controller)
        use_windowed_control(patched)  # a per-frame ControlNet hint on the source follows the window
        latents = []  # z_0 .. z_N, in the model's latent space

        def on_step(j, z):
            store.end_step(j)
            latents.append(z.detach().float().cpu())

        def capture(model_k, x, sigmas_, **kw):
            latents.append(x.detach().float().cpu())
            return sample_ddim_inversion(model_k, x, sigmas_, on_step=on_step, **kw)

        guider = FateZeroGuider(patched)
        guider.set_conds(source, [])
        guider.set_cfg(1.0)
        callback = latent_preview.prepare_callback(patched, steps)
        out = guider.sample(zero_noise(samples), samples, comfy.samplers.KSAMPLER(capture), sigmas,
                            callback=callback, disable_pbar=not comfy.utils.PROGRESS_BAR_ENABLED, seed=0)
        store.set_latents(latents)
        store.finish(InversionRecord(source_conditioning=source,
                                     source_fingerprint=conditioning_fingerprint(source),
                                     inverted_latent=latent_fingerprint(out)))
        log.info("FateZero: %r", store)  # what the store holds until ComfyUI drops it
        return io.NodeOutput({"samples": out}, store)
