"""ControlNet / T2I-Adapter hints under ComfyUI's context windows (real ComfyUI host, tiny models, CPU).

Plain core sampling (``comfy.sample.sample``, ComfyUI's KSampler path) of the tiny SD1.5 model with
``ContextWindowsManual``'s handler on the MODEL, with and without
``nodes.control_windows.use_windowed_control``. The control networks' forwards are instrumented to
record the hint they receive; the window each call belongs to is recorded by the handler's own
``evaluate_context_windows`` callback, and the expected hint is the IMAGE batch indexed by that
window's frames here, independently of the code under test. Plain SD has no temporal layer and
per-frame GroupNorm, so every frame is independent and a windowed run with the right hints equals
the one-batch run.
"""

from __future__ import annotations

import importlib
import logging

import pytest
import torch

from test_controlnet_edit import build_tiny_controlnet, hint_frames

pytestmark = pytest.mark.usefixtures("host_inference_mode", "one_thread")

FRAMES = 8
LATENT = 8  # 64 px hints: the hint blocks downsample by 8, the UNet levels are 8/4/2/1
# One step fewer than frames: 0.3.64's IndexListContextHandler.set_step compares the per-frame
# timestep ([F]) with sample_sigmas ([steps + 1]) element-wise, which only broadcasts when the two
# lengths agree (a host limitation of dim-0 windows, not of the code under test).
STEPS = FRAMES - 1
CFG = 2.0  # cond and uncond share the control and run as one batch of two chunks
WINDOW = 4


def windowed(model, schedule="standard_static", overlap=2, fuse="pyramid"):
    """``model`` with core ``ContextWindowsManual``'s handler (a clone; windows of ``WINDOW``)."""
    from comfy_extras.nodes_context_windows import ContextWindowsManualNode

    out = ContextWindowsManualNode.execute(model, context_length=WINDOW, context_overlap=overlap,
                                           context_schedule=schedule, context_stride=1,
                                           closed_loop=False, fuse_method=fuse, dim=0)
    return out.args[0]


@pytest.fixture
def one_thread():
    """One intra-op thread: these batches are tiny, and on a shared CPU torch's threads spin
    (measured: one tiny UNet call 5.9 s with 2 threads beside other jobs, 0.07 s with 1)."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


@pytest.fixture
def control_windows(nodes):
    """``nodes/control_windows.py`` as the pack's nodes import it."""
    return importlib.import_module(f"{nodes.__name__}.control_windows")


def with_wrapper(control_windows, model):
    model = model.clone()
    control_windows.use_windowed_control(model)
    return model


def prompts(clip):
    import nodes as core_nodes

    encode = core_nodes.CLIPTextEncode().encode
    return encode(clip, "a dog on a table")[0], encode(clip, "")[0]


def apply(positive, negative, control, image, strength=1.0):
    import nodes as core_nodes

    return core_nodes.ControlNetApplyAdvanced().apply_controlnet(
        positive, negative, control, image, strength, 0.0, 1.0, vae=None)


def ksample(model, positive, negative, frames=FRAMES, seed=0):
    import comfy.sample

    latent = torch.zeros(frames, 4, LATENT, LATENT)
    noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(seed))
    return comfy.sample.sample(model, noise, STEPS, CFG, "euler", "normal", positive, negative,
                               latent, disable_pbar=True, seed=seed)


def chw(image: torch.Tensor) -> torch.Tensor:
    """An IMAGE batch as the control networks see it at its own size (``ControlNetApplyAdvanced``
    moves channels first; resizing to the same size changes nothing)."""
    return image.movedim(-1, 1)


def expected(image_chw: torch.Tensor, frames, batch: int) -> torch.Tensor:
    rows = image_chw[list(frames)]
    return torch.cat([rows] * (batch // len(frames)))


class Recorder:
    """Records ``(window frames or None, hint)`` for every forward of the given networks."""

    def __init__(self, model, networks: dict):
        import comfy.context_windows as cw
        import comfy.patcher_extension

        self.window = None
        self.calls = {name: [] for name in networks}
        self.handles = []
        handler = model.model_options.get("context_handler")
        if handler is not None:
            def on_window(*args):
                window = next(a for a in args if isinstance(a, cw.IndexListContextWindow))
                self.window = tuple(window.index_list)

            comfy.patcher_extension.add_callback_with_key(
                cw.IndexListCallbacks.EVALUATE_CONTEXT_WINDOWS, "test_recorder", on_window, handler.callbacks)
        for name, (module, pick) in networks.items():
            def hook(_module, args, kwargs, name=name, pick=pick):
                self.calls[name].append((self.window, pick(args, kwargs).detach().clone()))

            self.handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))

    def close(self):
        for handle in self.handles:
            handle.remove()


def cldm_hint(args, kwargs):
    return kwargs["hint"]  # comfy/controlnet.py ControlNet.get_control passes every input by name


def adapter_hint(args, kwargs):
    return args[0]  # T2IAdapter.get_control: self.t2i_model(self.cond_hint...)


def two_controlnets(clip):
    """CONDITIONING with two chained ControlNets, each with its own per-frame hint."""
    first, second = build_tiny_controlnet(seed=7), build_tiny_controlnet(seed=8)
    images = {"first": hint_frames(FRAMES, LATENT * 8, seed=11),
              "second": hint_frames(FRAMES, LATENT * 8, seed=12)}
    pos, neg = prompts(clip)
    pos, neg = apply(pos, neg, first, images["first"])
    pos, neg = apply(pos, neg, second, images["second"])
    networks = {"first": (first.control_model, cldm_hint), "second": (second.control_model, cldm_hint)}
    return pos, neg, images, networks


def sample_recorded(model, pos, neg, networks):
    recorder = Recorder(model, networks)
    try:
        out = ksample(model, pos, neg)
    finally:
        recorder.close()
    return out, recorder.calls


@pytest.mark.parametrize("schedule", ["standard_static", "standard_uniform"])
def test_every_window_gets_the_hint_of_its_frames(control_windows, tiny_sd15, tiny_clip, schedule):
    pos, neg, images, networks = two_controlnets(tiny_clip)
    model = with_wrapper(control_windows, windowed(tiny_sd15, schedule, overlap=2))
    _, calls = sample_recorded(model, pos, neg, networks)

    for name, records in calls.items():
        windows = {w for w, _ in records}
        assert None not in windows
        if schedule == "standard_static":
            assert len(records) == STEPS * len(windows)  # one call per window and step
        assert set().union(*windows) == set(range(FRAMES))  # the windows cover the clip
        assert any(w[0] > 0 for w in windows)  # and not only its first frames
        for window, hint in records:
            assert torch.equal(hint, expected(chw(images[name]), window, hint.shape[0])), (name, window)
            assert hint.shape[0] == 2 * len(window)  # cond and uncond in one batch
    if schedule == "standard_uniform":
        # The uniform schedule moves its windows between steps.
        assert len({w for w, _ in calls["first"]}) > len(range(0, FRAMES - WINDOW + 1, WINDOW - 2))


def test_without_the_wrapper_every_window_gets_the_first_frames(tiny_sd15, tiny_clip):
    """The host behaviour the wrapper fixes (ComfyUI 0.3.64 ``ControlNet.get_control``): the first
    window cuts the hint to its batch and caches it, and every window of every step reuses it.
    Here the 8 hint images already match the window's batch (4 frames x cond and uncond), so
    nothing is cut: the first chunk gets frames 0-3 and the second frames 4-7, in every window."""
    pos, neg, images, networks = two_controlnets(tiny_clip)
    _, calls = sample_recorded(windowed(tiny_sd15, "standard_static", overlap=2), pos, neg, networks)

    for name, records in calls.items():
        assert len({w for w, _ in records}) > 1
        for window, hint in records:
            assert hint.shape[0] == 2 * WINDOW == FRAMES
            assert torch.equal(hint, chw(images[name]))
            if window != tuple(range(WINDOW)):
                assert not torch.equal(hint, expected(chw(images[name]), window, hint.shape[0]))


def test_a_single_hint_image_is_unchanged(control_windows, tiny_sd15, tiny_clip):
    control = build_tiny_controlnet()
    image = hint_frames(1, LATENT * 8, seed=11)
    pos, neg = apply(*prompts(tiny_clip), control, image)
    networks = {"cn": (control.control_model, cldm_hint)}
    plain_windows = windowed(tiny_sd15, "standard_static", overlap=2)

    without, _ = sample_recorded(plain_windows, pos, neg, networks)
    out, calls = sample_recorded(with_wrapper(control_windows, plain_windows), pos, neg, networks)
    assert torch.equal(out, without)
    assert calls["cn"]
    for _, hint in calls["cn"]:
        assert torch.equal(hint, chw(image))  # one image, broadcast by the network itself


def control_chain(conditioning):
    control = conditioning[0][1]["control"]
    chain = []
    while control is not None:
        chain.append(control)
        control = control.previous_controlnet
    return chain


def test_conditioning_is_left_as_it_was_and_runs_repeat(control_windows, tiny_sd15, tiny_clip):
    pos, neg, images, networks = two_controlnets(tiny_clip)
    chain = control_chain(pos)
    assert len(chain) == 2 and control_chain(neg) == chain
    before = [(c.cond_hint_original, c.cond_hint_original.clone(), c.previous_controlnet, c.strength,
               c.timestep_percent_range) for c in chain]
    one_batch = ksample(tiny_sd15, pos, neg)

    model = with_wrapper(control_windows, windowed(tiny_sd15, "standard_static", overlap=2))
    first, second = ksample(model, pos, neg), ksample(model, pos, neg)
    assert torch.equal(first, second)

    assert control_chain(pos) == chain and control_chain(neg) == chain
    for control, (hint, values, previous, strength, percent) in zip(chain, before):
        assert control.cond_hint_original is hint and torch.equal(hint, values)
        assert control.previous_controlnet is previous
        assert (control.strength, control.timestep_percent_range) == (strength, percent)
        assert control.cond_hint is None  # ComfyUI's cleanup after the run; no window's hint left
    # The same CONDITIONING sampled in one batch afterwards gives what it gave before.
    assert torch.equal(ksample(tiny_sd15, pos, neg), one_batch)


def max_abs(a, b) -> float:
    return float((a - b).abs().max())


def relative_error(out, reference) -> float:
    """The largest difference relative to the reference's range. KSampler returns latents in the
    VAE's units (``process_latent_out`` divides by 0.18215), from sigma 14.6: about 400 here, where
    float32 differences of one batch against windows of another batch size are ~3e-4 with or
    without a ControlNet (measured); relative to the range that is ~1e-6."""
    return max_abs(out, reference) / float(reference.abs().max())


@pytest.mark.parametrize("schedule", ["batched", "standard_static"])
def test_windowed_edit_equals_one_batch_with_a_per_frame_hint(control_windows, tiny_sd15, tiny_clip, schedule):
    pos, neg, _, _ = two_controlnets(tiny_clip)
    one_batch = ksample(tiny_sd15, pos, neg)
    plain_windows = windowed(tiny_sd15, schedule, overlap=0)
    out = ksample(with_wrapper(control_windows, plain_windows), pos, neg)
    err = relative_error(out, one_batch)
    wrong = relative_error(ksample(plain_windows, pos, neg), one_batch)
    print(f"{schedule}: windowed vs one batch, relative max difference {err:.3g}; "
          f"without the wrapper {wrong:.3g}")
    assert err <= 1e-5, err
    # Sensitivity: without the wrapper the windows after the first are driven by frames 0-3.
    assert wrong > 100 * max(err, 1e-7), wrong


def test_a_hint_shorter_than_the_clip_tiles_as_in_one_batch(control_windows, tiny_sd15, tiny_clip, caplog):
    """Five hint images for twelve frames: one batch gives frame i image i mod 5 (ComfyUI's
    ``broadcast_image_to``); the windows give each frame the same image, with a warning."""
    control = build_tiny_controlnet()
    image = hint_frames(5, LATENT * 8, seed=11)
    pos, neg = apply(*prompts(tiny_clip), control, image)
    one_batch = ksample(tiny_sd15, pos, neg)
    model = with_wrapper(control_windows, windowed(tiny_sd15, "batched", overlap=0))
    recorder = Recorder(model, {"cn": (control.control_model, cldm_hint)})
    try:
        with caplog.at_level(logging.WARNING, logger="comfyui-fatezero"):
            out = ksample(model, pos, neg)
    finally:
        recorder.close()
    assert relative_error(out, one_batch) <= 1e-5
    tiled = chw(image)[[i % 5 for i in range(FRAMES)]]
    for window, hint in recorder.calls["cn"]:
        assert torch.equal(hint, expected(tiled, window, hint.shape[0]))
    warnings = [r for r in caplog.records if "hint has 5 images" in r.getMessage()]
    assert len(warnings) == 1  # once per control and run


def build_tiny_t2i_adapter(seed: int = 9):
    """A ``comfy.controlnet.T2IAdapter`` over an SD1.x-layout full adapter with the tiny UNet's
    channels (32/64/128/128), as ``comfy/controlnet.py`` ``load_t2i_adapter`` builds one."""
    import comfy.controlnet
    import comfy.t2i_adapter.adapter
    import tiny_models

    adapter = comfy.t2i_adapter.adapter.Adapter(cin=3 * 64, channels=[32, 64, 128, 128], nums_rb=2,
                                                ksize=1, sk=True, use_conv=False, xl=False)
    tiny_models.init_parameters_(adapter, seed)
    adapter.eval()
    return comfy.controlnet.T2IAdapter(adapter, adapter.input_channels, 8, "nearest-exact",
                                       device=torch.device("cpu"))


def test_t2i_adapter_follows_the_window(control_windows, tiny_sd15, tiny_clip):
    """``T2IAdapter.get_control`` cuts the hint like ControlNet and also keeps the adapter's
    features for the whole run: without the wrapper the adapter runs once, on frames 0-3."""
    adapter = build_tiny_t2i_adapter()
    image = hint_frames(FRAMES, LATENT * 8, seed=13)
    pos, neg = apply(*prompts(tiny_clip), adapter, image)
    networks = {"t2i": (adapter.t2i_model, adapter_hint)}
    one_batch = ksample(tiny_sd15, pos, neg)
    plain_windows = windowed(tiny_sd15, "batched", overlap=0)

    wrong, calls = sample_recorded(plain_windows, pos, neg, networks)
    assert [w for w, _ in calls["t2i"]] == [tuple(range(WINDOW))]

    out, calls = sample_recorded(with_wrapper(control_windows, plain_windows), pos, neg, networks)
    windows = [w for w, _ in calls["t2i"]]
    # Once per window for the run: the twins keep their features between steps.
    assert windows == [tuple(range(s, s + WINDOW)) for s in range(0, FRAMES, WINDOW)]
    for window, hint in calls["t2i"]:
        assert torch.equal(hint, expected(chw(image), window, hint.shape[0]))
    err = relative_error(out, one_batch)
    assert err <= 1e-5, err
    assert relative_error(wrong, one_batch) > 100 * max(err, 1e-7)


def test_inpainting_masks_follow_the_hint_rows(control_windows, tiny_sd15, tiny_clip):
    """A ControlNet that concatenates a mask to its hint (``concat_mask``, as
    ``ControlNetInpaintingAliMamaApply`` sets one up): each frame's mask travels with its hint."""
    import comfy.cldm.cldm
    import comfy.controlnet
    import comfy.ops
    import tiny_models

    config = tiny_models.sd15_unet_config()
    config.pop("out_channels")
    network = comfy.cldm.cldm.ControlNet(hint_channels=4, dtype=torch.float32, device=torch.device("cpu"),
                                         operations=comfy.ops.disable_weight_init, **config)
    tiny_models.init_parameters_(network, 7)
    network.eval()
    control = comfy.controlnet.ControlNet(network, load_device=torch.device("cpu"), manual_cast_dtype=None,
                                          concat_mask=True)
    image = hint_frames(FRAMES, LATENT * 8, seed=11)
    g = torch.Generator().manual_seed(14)
    masks = (torch.rand(FRAMES, 1, LATENT * 8, LATENT * 8, generator=g) > 0.5).float()
    pos, neg = prompts(tiny_clip)
    applied = control.copy().set_cond_hint(chw(image), 1.0, (0.0, 1.0), extra_concat=[masks])
    pos = [[t, dict(d, control=applied)] for t, d in pos]
    neg = [[t, dict(d, control=applied)] for t, d in neg]

    one_batch = ksample(tiny_sd15, pos, neg)
    model = with_wrapper(control_windows, windowed(tiny_sd15, "standard_static", overlap=2))
    recorder = Recorder(model, {"cn": (network, cldm_hint)})
    try:
        ksample(model, pos, neg)
    finally:
        recorder.close()
    full = torch.cat([chw(image), masks], dim=1)
    assert recorder.calls["cn"]
    for window, hint in recorder.calls["cn"]:
        assert torch.equal(hint, expected(full, window, hint.shape[0])), window
    batched = ksample(with_wrapper(control_windows, windowed(tiny_sd15, "batched", overlap=0)), pos, neg)
    assert relative_error(batched, one_batch) <= 1e-5


def test_twins_live_for_the_windows_of_the_last_step(control_windows):
    """The run cache: a window's twin is reused while the window recurs, and windows the last step
    did not use are dropped when the next step starts (the uniform schedules move theirs)."""
    cache = control_windows._RunCache()
    control = build_tiny_controlnet()
    control.set_cond_hint(chw(hint_frames(FRAMES, LATENT * 8)))
    conds = [[{"control": control, "uuid": 0}]]

    def twin(window, sigma):
        return cache.conds_for(conds, window, torch.tensor([sigma]))[0][0]["control"]

    a, b, c = (0, 1, 2, 3), (4, 5, 6, 7), (2, 3, 4, 5)
    first = twin(a, 3.0)
    twin(b, 3.0)
    assert twin(a, 2.0) is first  # the same window in the next step: the same twin
    twin(c, 2.0)
    assert set(cache.windows) == {a, b, c}
    twin(c, 1.0)
    assert set(cache.windows) == {a, c}  # b was not used in the step that just ended
    assert conds[0][0]["control"] is control and first is not control
    assert first.cond_hint_original.shape[0] == 4 and control.cond_hint_original.shape[0] == FRAMES
