"""AttentionStore and CaptureConfig: byte accounting, placements, lifetime, refusals.

Small synthetic UNet passes (latent 16x16, four resolution levels) are driven through the
controllers as the host drives them (see tests/test_fusion.py). Expected byte counts are computed
here from the shapes alone, not read back from the store.
"""

from __future__ import annotations

import gc
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fatezero_core.controller import CaptureController, EditController, EditSettings, SourcePassComplete
from fatezero_core.errors import FateZeroError, StoreMismatchError, StoreReleasedError
from fatezero_core.keyframes import parse_key_rule
from fatezero_core.layers import AttnCall, LayerInfo
from fatezero_core.store import AttentionStore, CaptureConfig, InversionRecord
from ids import placement_id

REPO = Path(__file__).resolve().parents[1]
LATENT = 16
HEADS = 2
TOKENS = 77
STEPS = 4
FRAMES = 4
LAYERS = [
    LayerInfo("in_0", 16, 16, LATENT, LATENT, HEADS, 8),   # level 0: not stored
    LayerInfo("in_1", 8, 8, LATENT, LATENT, HEADS, 16),
    LayerInfo("mid", 2, 2, LATENT, LATENT, HEADS, 16),
    LayerInfo("out_2", 4, 4, LATENT, LATENT, HEADS, 16),
    LayerInfo("out_1", 8, 8, LATENT, LATENT, HEADS, 16),
    LayerInfo("out_0", 16, 16, LATENT, LATENT, HEADS, 8),  # level 0: not stored
]
STORED = [layer for layer in LAYERS if 1 <= layer.level <= 3]
SIGMAS = tuple(float(s) for s in torch.linspace(0.0, 5.0, STEPS + 1))


def make_config(frames=FRAMES, rule="mid", steps=STEPS, **kw):
    sigmas = SIGMAS if steps == STEPS else tuple(float(s) for s in torch.linspace(0.0, 5.0, steps + 1))
    base = dict(num_frames=frames, latent_size=(LATENT, LATENT), sigmas=sigmas,
                key_rule=parse_key_rule(rule), min_st_channels=8, layer_set="relative",
                model_fingerprint="model-a")
    base.update(kw)
    return CaptureConfig(**base)


def unet_pass(controller, step, frames, chunks=("cond",), call_step=None, fail_after=None):
    """One synthetic UNet evaluation: attn1 then attn2 of every layer.

    ``fail_after``: raise after that many layers, as an interrupted sampler would.
    """
    g = torch.Generator().manual_seed(step)
    b = frames * len(chunks)
    for n, layer in enumerate(LAYERS):
        if fail_after is not None and n == fail_after:
            raise KeyboardInterrupt("interrupted")
        call = AttnCall(layer, step if call_step is None else call_step, chunks)
        q, k, v = (torch.randn(b, layer.tokens, layer.channels, generator=g) for _ in range(3))
        controller.attn1(q, k, v, call)
        q = torch.randn(b, layer.tokens, layer.channels, generator=g)
        k, v = (torch.randn(1, TOKENS, layer.channels, generator=g) for _ in range(2))
        controller.attn2(q, k, v, call)


def latents(frames=FRAMES, steps=STEPS):
    return [torch.randn(frames, 4, LATENT, LATENT) for _ in range(steps + 1)]


def capture(store, frames=FRAMES, steps=STEPS, chunks=("cond",)):
    controller = CaptureController(store)
    for j in range(steps):
        unet_pass(controller, j, frames, chunks)
        store.end_step(j)
    store.set_latents(latents(frames, steps))
    return store.finish()


def kept_frames(rule, frames):
    """Distinct key frames a rule refers to, worked out by hand."""
    return {"mid": 1, "self, mid": frames, "prev, first": max(frames - 1, 1), "last": 1}[rule]


def expected_step_bytes(rule, frames, element_size):
    per_layer = {}
    for layer in STORED:
        n, c = layer.tokens, layer.channels
        self_values = frames * n * c + kept_frames(rule, frames) * n * c
        cross_values = frames * layer.heads * n * TOKENS
        per_layer[layer.name] = (self_values + cross_values) * element_size
    return per_layer


def latent_bytes(frames=FRAMES, steps=STEPS):
    return (steps + 1) * frames * 4 * LATENT * LATENT * 4  # float32


# ---------------------------------------------------------------- byte accounting
@pytest.mark.parametrize("rule", ["mid", "prev, first", "self, mid"])
@pytest.mark.parametrize("placement", ["cpu", "gpu", "disk"], ids=placement_id)
def test_exact_byte_accounting(rule, placement, tmp_path):
    store = AttentionStore(make_config(rule=rule), placement=placement, dtype="fp16",
                           disk_dir=str(tmp_path))
    capture(store)
    per_layer = expected_step_bytes(rule, FRAMES, 2)
    step_bytes = sum(per_layer.values())

    assert store.nbytes_by_step() == {j: step_bytes for j in range(STEPS)}
    assert store.nbytes_by_layer() == {name: STEPS * b for name, b in per_layer.items()}
    assert store.latent_nbytes == latent_bytes()
    assert store.nbytes == STEPS * step_bytes + latent_bytes()
    assert sum(store.nbytes_by_step().values()) == sum(store.nbytes_by_layer().values())
    assert store.nbytes - store.latent_nbytes == sum(store.nbytes_by_step().values())

    # what the store really holds has exactly these sizes
    held = 0
    for j in range(STEPS):
        for layer in STORED:
            q, k, probs = (store.get(j, layer.name, f) for f in ("q", "k", "probs"))
            assert q.dtype == k.dtype == probs.dtype == torch.float16
            assert q.shape == (FRAMES, layer.tokens, layer.channels)
            assert k.shape == (kept_frames(rule, FRAMES), layer.tokens, layer.channels)
            assert probs.shape == (FRAMES, layer.heads, layer.tokens, TOKENS)
            held += sum(t.numel() * t.element_size() for t in (q, k, probs))
        for layer in LAYERS:
            if layer not in STORED:
                for f in ("q", "probs"):
                    with pytest.raises(FateZeroError, match="has no"):
                        store.get(j, layer.name, f)
    held += sum(store.latent(i).numel() * store.latent(i).element_size() for i in range(STEPS + 1))
    assert held == store.nbytes
    # DDIM Invert logs this line: the attention it holds (on the GPU for ``gpu``) and the latents.
    mib = f"{STEPS * step_bytes / 2**20:.1f} MiB attention + {latent_bytes() / 2**20:.1f} MiB latents"
    assert repr(store).startswith(f"AttentionStore({placement}, complete, {FRAMES} frames at 128x128 px")
    assert repr(store).endswith(mib + " on the CPU)")
    store.release()


def test_key_frames_kept_per_rule(tmp_path):
    frames = 8
    for rule, kept in (("mid", 1), ("prev, first", 7), ("self, mid", 8)):
        store = capture(AttentionStore(make_config(frames=frames, rule=rule), "cpu"), frames=frames)
        for layer in STORED:
            assert store.get(0, layer.name, "k").shape[0] == kept
        store.release()


def test_fp16_halves_fp32():
    s16 = capture(AttentionStore(make_config(), "cpu", dtype="fp16"))
    s32 = capture(AttentionStore(make_config(), "cpu", dtype="fp32"))
    assert s32.nbytes - s32.latent_nbytes == 2 * (s16.nbytes - s16.latent_nbytes)
    assert {j: 2 * b for j, b in s16.nbytes_by_step().items()} == s32.nbytes_by_step()
    assert {n: 2 * b for n, b in s16.nbytes_by_layer().items()} == s32.nbytes_by_layer()
    assert s16.latent_nbytes == s32.latent_nbytes  # latents stay float32


def test_only_the_cond_chunk_is_captured():
    one = capture(AttentionStore(make_config(), "cpu"), chunks=("cond",))
    two = capture(AttentionStore(make_config(), "cpu"), chunks=("uncond", "cond"))
    assert one.nbytes == two.nbytes
    assert one.nbytes_by_step() == two.nbytes_by_step()


def test_finish_takes_the_inversion_record():
    """What the inversion hands the edit besides the attention is given to ``finish`` with the
    capture, never set on the store afterwards; a released store forgets it."""
    store = AttentionStore(make_config(), "cpu")
    assert store.record == InversionRecord()  # nothing before the capture finishes
    record = InversionRecord(source_conditioning="cond", source_fingerprint="abc",
                             inverted_latent={"shape": (FRAMES, 4, LATENT, LATENT), "sum": 1.0, "abs_sum": 2.0})
    controller = CaptureController(store)
    for j in range(STEPS):
        unet_pass(controller, j, FRAMES)
        store.end_step(j)
    store.set_latents(latents())
    assert store.finish(record) is store
    assert store.complete and store.record == record
    store.release()
    assert store.record == InversionRecord()


def test_release_frees_accounting():
    store = capture(AttentionStore(make_config(), "cpu"))
    assert store.nbytes > 0
    store.release()
    assert store.nbytes == 0
    assert store.nbytes_by_step() == {} and store.nbytes_by_layer() == {}


# ------------------------------------------------------------------------- disk
def test_disk_one_file_per_step_in_private_folder(tmp_path):
    store = capture(AttentionStore(make_config(), "disk", disk_dir=str(tmp_path)))
    folder = Path(store.directory)
    assert folder.parent == tmp_path and folder.is_dir()
    files = [Path(f) for f in store.files()]
    assert len(files) == STEPS and len(set(files)) == STEPS
    assert sorted(folder.iterdir()) == sorted(files)

    from safetensors import safe_open

    for j, path in enumerate(files):
        with safe_open(str(path), framework="pt") as f:
            on_disk = sum(f.get_tensor(k).numel() * 2 for k in f.keys())
        assert on_disk == store.nbytes_by_step()[j]

    # the data read back is the data captured (same as a cpu store fed the same passes)
    ref = capture(AttentionStore(make_config(), "cpu"))
    for j in range(STEPS):
        for layer in STORED:
            for f in ("q", "k", "probs"):
                assert torch.equal(store.get(j, layer.name, f), ref.get(j, layer.name, f))

    store.release()
    assert not folder.exists()
    assert tmp_path.exists()  # only the private folder goes


def test_disk_deleted_when_garbage_collected(tmp_path):
    store = capture(AttentionStore(make_config(), "disk", disk_dir=str(tmp_path)))
    folder = Path(store.directory)
    assert len(list(folder.iterdir())) == STEPS
    del store
    gc.collect()
    assert not folder.exists()


def test_disk_deleted_at_interpreter_exit(tmp_path):
    code = f"""
import sys, torch
sys.path.insert(0, {str(REPO)!r})
from fatezero_core.keyframes import parse_key_rule
from fatezero_core.store import AttentionStore, CaptureConfig, InversionRecord
cfg = CaptureConfig(num_frames=2, latent_size=(8, 8), sigmas=(0.0, 1.0, 2.0),
                    key_rule=parse_key_rule('mid'), min_st_channels=8, layer_set='relative')
store = AttentionStore(cfg, 'disk', disk_dir={str(tmp_path)!r})
store.put(0, 'in_1', 'q', torch.randn(2, 16, 8))
store.end_step(0)
keep = [store]   # still referenced when the interpreter exits
print(store.directory)
print(len(store.files()))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    folder, count = out.stdout.split()
    assert Path(folder).parent == tmp_path and count == "1"
    assert not Path(folder).exists()


# ------------------------------------------------------------ interrupted capture
def interrupted_capture(store, stop_at=2):
    controller = CaptureController(store)
    with pytest.raises(KeyboardInterrupt):
        for j in range(STEPS):
            unet_pass(controller, j, FRAMES, fail_after=3 if j == stop_at else None)
            store.end_step(j)
        store.set_latents(latents())
        store.finish()
    return store


def test_interrupted_capture_is_unreadable(tmp_path):
    store = interrupted_capture(AttentionStore(make_config(), "disk", disk_dir=str(tmp_path)))
    assert not store.complete
    with pytest.raises(StoreReleasedError, match=re.compile("invert again", re.I)):
        store.get(0, "in_1", "q")
    with pytest.raises(StoreReleasedError, match=re.compile("invert again", re.I)):
        store.latent(0)
    with pytest.raises(StoreReleasedError):
        EditController(store, settings())
    # no latents were kept: finish refuses
    with pytest.raises(FateZeroError, match="incomplete"):
        store.finish()
    # even with latents, the steps that never ran are reported
    store.set_latents(latents())
    with pytest.raises(FateZeroError, match=r"steps \[3\] recorded no attention") as err:
        store.finish()
    assert "invert again" in str(err.value)
    assert not store.complete


def test_interrupted_disk_store_files_go_with_it(tmp_path):
    store = interrupted_capture(AttentionStore(make_config(), "disk", disk_dir=str(tmp_path)))
    old = Path(store.directory)
    assert len(store.files()) == 2  # steps 0 and 1 were written
    assert old.is_dir()
    del store
    gc.collect()
    assert not old.exists()

    fresh = capture(AttentionStore(make_config(), "disk", disk_dir=str(tmp_path)))
    assert Path(fresh.directory) != old
    assert not old.exists()
    assert all(Path(f).parent == Path(fresh.directory) for f in fresh.files())
    assert len(fresh.files()) == STEPS
    fresh.release()


def test_new_capture_never_shares_a_folder(tmp_path):
    a = interrupted_capture(AttentionStore(make_config(), "disk", disk_dir=str(tmp_path)))
    b = AttentionStore(make_config(), "disk", disk_dir=str(tmp_path))
    assert a.directory != b.directory
    capture(b)
    assert len(a.files()) == 2 and len(b.files()) == STEPS
    a_dir = a.directory
    a.release()
    assert not Path(a_dir).exists()
    assert all(Path(f).exists() for f in b.files())  # releasing one never touches the other
    b.release()


# ---------------------------------------------------------------- released store
@pytest.mark.parametrize("placement", ["cpu", "disk", "recompute"])
def test_released_store_refuses_reads_and_writes(placement, tmp_path):
    store = capture(AttentionStore(make_config(), placement, disk_dir=str(tmp_path)))
    store.release()
    assert store.released and not store.complete
    for call in (lambda: store.get(0, "in_1", "q"),
                 lambda: store.put(0, "in_1", "q", torch.zeros(FRAMES, 64, 16)),
                 lambda: store.latent(0),
                 lambda: store.check_files(),
                 lambda: store.finish(),
                 lambda: store.set_latents(latents())):
        with pytest.raises(StoreReleasedError, match="released"):
            call()
    with pytest.raises(StoreReleasedError):
        EditController(store, settings())


# ------------------------------------------------------------- CaptureConfig
def request(**kw):
    base = dict(num_frames=FRAMES, latent_size=(LATENT, LATENT), model_fingerprint="model-a")
    base.update(kw)
    return base


def test_check_edit_passes_on_equal_settings():
    cfg = make_config()
    cfg.check_edit(**request())
    cfg.check_edit(**request(latent_size=[LATENT, LATENT]))
    assert cfg.mismatches(**request()) == []


@pytest.mark.parametrize("change, words", [
    (dict(num_frames=FRAMES + 1), ["5 frames", "captured on 4", "same DDIM Invert"]),
    (dict(latent_size=(LATENT, 2 * LATENT)), ["256x128 px", "captured at 128x128 px", "same frame size"]),
    (dict(model_fingerprint="model-b"), ["different model", "invert again"]),
])
def test_check_edit_names_each_mismatch(change, words):
    with pytest.raises(StoreMismatchError) as err:
        make_config().check_edit(**request(**change))
    message = str(err.value)
    assert message.startswith("This attention store does not match the edit")
    for word in words:
        assert word in message, message
    assert len(make_config().mismatches(**request(**change))) == 1


def test_check_edit_lists_all_mismatches_at_once():
    cfg = make_config()
    req = request(num_frames=2, latent_size=(8, 8), model_fingerprint="model-b")
    problems = cfg.mismatches(**req)
    assert len(problems) == 3
    with pytest.raises(StoreMismatchError) as err:
        cfg.check_edit(**req)
    for part in ("frames", "px", "different model"):
        assert part in str(err.value)


def test_config_describes_itself():
    cfg = make_config(rule="prev, first")
    assert cfg.num_steps == STEPS
    assert cfg.describe() == ("4 frames at 128x128 px, 4 steps, key frames [prev, first], layers "
                              "'relative', GroupNorm over the clip")
    assert make_config(group_norm="frame").describe().endswith("GroupNorm over the frame")


# ------------------------------------------------------------- EditController
def settings(steps=STEPS):
    ids = tuple(range(TOKENS))
    return EditSettings(mode="replace", mapper=torch.eye(TOKENS), cross_alphas=torch.ones(steps + 1, TOKENS),
                        self_window=(0, steps), source_token_ids=ids, target_token_ids=ids)


# ------------------------------------------------------------------ recompute
def test_recompute_holds_latents_and_one_step_of_scratch():
    store = capture(AttentionStore(make_config(), "recompute", dtype="fp16"))
    assert store.nbytes == store.latent_nbytes == latent_bytes()
    assert store.nbytes_by_step() == {} and store.nbytes_by_layer() == {}
    assert store.reading_nbytes == 0
    assert len(store.layers("cross")) == len(STORED)  # the manifest is still recorded

    editor = EditController(store, settings())
    # scratch keeps the source pass's own dtype (float32 here)
    one_step = sum(expected_step_bytes("mid", FRAMES, 4).values())
    for i in range(STEPS):
        j = editor.inversion_step(i)
        store.begin_regeneration(j)
        assert store.reading_nbytes == 0
        if j + 1 < STEPS:
            with pytest.raises(FateZeroError, match="No regenerated source attention"):
                store.get(j + 1, "in_1", "q")  # the previous step is gone
        unet_pass(editor, j, FRAMES, ("source",), call_step=i)
        assert store.reading_nbytes == one_step
        assert store.get(j, "in_1", "q").shape == (FRAMES, 64, 16)
        assert store.get(j, "mid", "probs").shape == (FRAMES, HEADS, 4, TOKENS)
        assert store.nbytes == latent_bytes()  # the scratch is not counted as stored


def test_recompute_scratch_equals_captured_store():
    """Regenerating the source pass gives the tensors a cpu store captured during inversion."""
    ref = capture(AttentionStore(make_config(), "cpu", dtype="fp32"))
    store = capture(AttentionStore(make_config(), "recompute", dtype="fp32"))
    editor = EditController(store, settings())
    j = 1
    store.begin_regeneration(j)
    unet_pass(editor, j, FRAMES, ("source",), call_step=editor.num_steps - 1 - j)
    for layer in STORED:
        for f in ("q", "k", "probs"):
            assert torch.equal(store.get(j, layer.name, f), ref.get(j, layer.name, f))


class CallLog:
    """Wraps a controller and records the layers it was called for."""

    def __init__(self, controller):
        self.controller, self.seen = controller, []

    def attn1(self, q, k, v, call):
        self.seen.append((call.layer.name, "self"))
        return self.controller.attn1(q, k, v, call)

    def attn2(self, q, k, v, call):
        self.seen.append((call.layer.name, "cross"))
        return self.controller.attn2(q, k, v, call)


def test_recompute_source_pass_ends_after_the_last_stored_layer():
    """Built with ``end_source_pass_after_last_stored_layer``, the controller ends a source-only
    pass with ``SourcePassComplete`` right after the last stored layer (out_1's cross-attention),
    the layers after it never run, and the step's regenerated tensors are the ones a cpu store
    captured; edit passes are never cut short."""
    ref = capture(AttentionStore(make_config(), "cpu", dtype="fp32"))
    store = capture(AttentionStore(make_config(), "recompute", dtype="fp32"))
    assert store.last_stored_layer() == ("out_1", "cross")
    editor = EditController(store, settings(), end_source_pass_after_last_stored_layer=True)
    log = CallLog(editor)
    j = 1
    i = editor.num_steps - 1 - j
    store.begin_regeneration(j)
    with pytest.raises(SourcePassComplete):
        unet_pass(log, j, FRAMES, ("source",), call_step=i)
    assert log.seen[-1] == ("out_1", "cross") and ("out_0", "self") not in log.seen
    for layer in STORED:
        for f in ("q", "k", "probs"):
            assert torch.equal(store.get(j, layer.name, f), ref.get(j, layer.name, f))
    log.seen.clear()
    unet_pass(log, j, FRAMES, ("uncond", "cond"), call_step=i)  # the edit pass runs whole
    assert log.seen[-1] == ("out_0", "cross")


def test_source_pass_runs_whole_unless_the_host_asks():
    store = capture(AttentionStore(make_config(), "recompute", dtype="fp32"))
    editor = EditController(store, settings())
    store.begin_regeneration(0)
    unet_pass(editor, 0, FRAMES, ("source",), call_step=editor.num_steps - 1)  # no exception


# ------------------------------------------------------------- cpu placement memory
def devices():
    """The CPU, and this machine's accelerator when it has one (CUDA, MPS, XPU, ...)."""
    found = ["cpu"]
    if torch.accelerator.is_available():
        found.append(torch.accelerator.current_accelerator().type)
    return found


def pinned_blocks_made(device: str) -> int:
    """Bytes PyTorch's pinned host allocator has ever allocated (CUDA keeps the count)."""
    if device != "cuda":
        return 0
    return torch.cuda.host_memory_stats().get("allocated_bytes.allocated", 0)


@pytest.mark.parametrize("device", devices())
def test_cpu_placement_holds_plain_host_copies(device):
    """A ``cpu`` store holds ordinary (pageable) host copies from whatever device captured them.

    Pinned memory would come from PyTorch's caching host allocator, which rounds each block up
    to a power of two and keeps freed blocks: up to twice the accounted bytes of unswappable RAM,
    held after the store is freed. So: no tensor pinned, no pinned block allocated, each held
    tensor exactly its accounted bytes and independent of the captured one."""
    made_before = pinned_blocks_made(device)
    store = AttentionStore(make_config(frames=2), "cpu", dtype="fp16")
    g = torch.Generator().manual_seed(0)
    captured = [torch.randn(2, 64, 16, generator=g).to(device) for _ in range(STEPS)]
    expected = [q.half().cpu() for q in captured]
    for j, q in enumerate(captured):
        store.put(j, "in_1", "q", q)
        store.end_step(j)
        q.zero_()  # the store must hold a copy, not a view of the capture
    store.set_latents([torch.zeros(2, 4, LATENT, LATENT, device=device)] * (STEPS + 1))
    store.finish()
    for j in range(STEPS):
        held = store.get(j, "in_1", "q")
        assert held.device.type == "cpu" and not held.is_pinned()
        assert torch.equal(held, expected[j])
        assert held.untyped_storage().nbytes() == held.numel() * 2 == store.nbytes_by_step()[j]
        back = store.get(j, "in_1", "q", device=device)
        assert back.device.type == device and torch.equal(back.cpu(), expected[j])
    assert pinned_blocks_made(device) == made_before
    store.release()


def test_store_code_has_one_host_copy_path_for_every_device():
    """The host copy above is the same code on every device: the store has no device-specific
    branch (CPU-only CI cannot run the accelerator case, so this keeps one from coming back)."""
    import io
    import tokenize

    source = (REPO / "fatezero_core" / "store.py").read_text()
    names = {tok.string for tok in tokenize.generate_tokens(io.StringIO(source).readline)
             if tok.type == tokenize.NAME}
    assert not names & {"cuda", "pin_memory", "synchronize"}, names & {"cuda", "pin_memory", "synchronize"}


# ------------------------------------------------------------ what an edit's reads keep
def test_end_edit_drops_the_disk_step_read_last(tmp_path):
    store = capture(AttentionStore(make_config(), "disk", disk_dir=str(tmp_path)))
    step_bytes = sum(expected_step_bytes("mid", FRAMES, 2).values())
    reference = capture(AttentionStore(make_config(), "cpu"))
    assert store.reading_nbytes == 0
    for j in range(STEPS):
        for layer in STORED:
            assert torch.equal(store.get(j, layer.name, "q"), reference.get(j, layer.name, "q"))
        assert store.reading_nbytes == step_bytes  # one step at a time, never two
    store.end_edit()
    assert store.reading_nbytes == 0
    # the store stays readable: the next edit reads the files again
    assert torch.equal(store.get(1, "mid", "probs"), reference.get(1, "mid", "probs"))
    assert store.reading_nbytes == step_bytes
    store.end_edit()
    assert store.reading_nbytes == 0 and len(store.files()) == STEPS


def test_end_edit_drops_the_regenerated_recompute_step():
    store = capture(AttentionStore(make_config(), "recompute", dtype="fp16"))
    editor = EditController(store, settings())
    store.begin_regeneration(0)
    unet_pass(editor, 0, FRAMES, ("source",), call_step=editor.num_steps - 1)
    one_step = sum(expected_step_bytes("mid", FRAMES, 4).values())
    assert store.reading_nbytes == one_step
    store.end_edit()
    assert store.reading_nbytes == 0
    assert store.complete and store.nbytes == latent_bytes()


# ------------------------------------------------------------ disk files gone
def gone_message():
    return re.compile(r"files in '.+' were deleted or damaged.*run FateZero DDIM Invert again.*"
                      r"Free model and node cache", re.S)


@pytest.mark.parametrize("damage", ["folder", "one file"])
def test_a_disk_store_whose_files_are_gone_stops_the_edit_before_it_starts(damage, tmp_path):
    store = capture(AttentionStore(make_config(), "disk", disk_dir=str(tmp_path)))
    if damage == "folder":
        shutil.rmtree(store.directory)
    else:
        Path(store.files()[2]).unlink()
    with pytest.raises(StoreReleasedError, match=gone_message()):
        EditController(store, settings())


def test_a_damaged_disk_file_says_invert_again_when_read(tmp_path):
    store = capture(AttentionStore(make_config(), "disk", disk_dir=str(tmp_path)))
    with open(store.files()[STEPS - 1], "r+b") as f:
        f.truncate(16)
    editor = EditController(store, settings())  # present: found damaged when read
    with pytest.raises(StoreReleasedError, match=gone_message()):
        unet_pass(editor, 0, FRAMES, ("uncond", "cond"), call_step=0)


def test_disk_files_deleted_midway_through_an_edit_say_invert_again(tmp_path):
    store = capture(AttentionStore(make_config(), "disk", disk_dir=str(tmp_path)))
    editor = EditController(store, settings())
    unet_pass(editor, 0, FRAMES, ("uncond", "cond"), call_step=0)  # edit step 0 reads step 3
    for path in store.files():
        Path(path).unlink()  # e.g. another ComfyUI empties the folder
    with pytest.raises(StoreReleasedError, match=gone_message()):
        unet_pass(editor, 1, FRAMES, ("uncond", "cond"), call_step=1)


def test_unknown_placement_and_field():
    with pytest.raises(FateZeroError, match="Unknown store placement"):
        AttentionStore(make_config(), "ram")
    store = AttentionStore(make_config(), "cpu")
    with pytest.raises(FateZeroError, match="Unknown store field"):
        store.put(0, "in_1", "v", torch.zeros(1))
