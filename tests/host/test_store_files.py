"""Where ``disk`` stores live and what an edit leaves in RAM, with the real nodes in-process.

- A ``disk`` store lives in a folder of this process beside ComfyUI's temp folder, which every
  ComfyUI start and stop deletes (``main.py`` ``cleanup_temp``: ``shutil.rmtree`` of the temp
  folder): a second ComfyUI on the same install leaves it alone.
- Files deleted anyway stop FateZero Sample with "run FateZero DDIM Invert again", before the edit
  or midway through it.
- FateZero Sample drops the step it read last (``disk``, ``recompute``) when it ends.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from test_invert_sample import empty, invert, moving_latent, sample, settings

pytestmark = pytest.mark.usefixtures("host_inference_mode")


@pytest.fixture
def temp_dir(comfyui_path, tmp_path, monkeypatch) -> Path:
    """ComfyUI's temp folder for one test, inside the test's own folder."""
    import folder_paths

    temp = tmp_path / "comfy" / "temp"
    temp.mkdir(parents=True)
    monkeypatch.setattr(folder_paths, "temp_directory", str(temp))
    return temp


def comfyui_start_cleanup(temp: Path) -> None:
    """What every ComfyUI start (and stop) does to the temp folder: ``main.py`` ``cleanup_temp``."""
    if temp.exists():
        shutil.rmtree(temp, ignore_errors=True)


def edit_case(nodes, model, clip, placement):
    src, tgt, spec = settings(nodes, clip)
    inverted, store = invert(nodes, model, src, moving_latent(), steps=4, store_placement=placement)
    return dict(model=model, positive=tgt, negative=empty(clip), inverted=inverted, store=store, spec=spec)


def edit(nodes, case):
    return sample(nodes, case["model"], case["positive"], case["negative"], case["inverted"],
                  case["store"], case["spec"], cfg=2.0)[0]["samples"]


# ------------------------------------------------------------------------------- the folder
def test_disk_store_survives_another_comfyui_emptying_the_temp_folder(nodes, tiny_sd15, tiny_clip, temp_dir):
    case = edit_case(nodes, tiny_sd15, tiny_clip, "disk")
    store = case["store"]
    folder = Path(store.directory)
    assert temp_dir not in folder.parents
    assert folder.parent.name == nodes.store_folder.process_folder_name()
    assert folder.parent.parent == temp_dir.parent / "fatezero_stores"
    first = edit(nodes, case)

    comfyui_start_cleanup(temp_dir)  # a second ComfyUI starts on the same install

    assert all(Path(f).is_file() for f in store.files())
    assert torch.equal(edit(nodes, case), first)
    store.release()
    assert not folder.exists() and folder.parent.is_dir()  # the process folder stays until exit


def test_stale_process_folders_are_removed_live_ones_kept(nodes, tmp_path):
    store_folder = nodes.store_folder
    root = tmp_path / "fatezero_stores"
    exited = subprocess.Popen([sys.executable, "-c", "pass"])
    exited.wait()
    running = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        names = {
            "dead": store_folder.process_folder_name(exited.pid),
            "running": store_folder.process_folder_name(running.pid),
            "this": store_folder.process_folder_name(),
            "other machine": f"some-other-host-{exited.pid}",
            "not ours": "notes",
        }
        for name in names.values():
            (root / name / "fatezero_store_x").mkdir(parents=True)
            (root / name / "fatezero_store_x" / "step_0000.safetensors").write_bytes(b"x")
        assert store_folder.remove_stale_folders(str(root)) == [names["dead"]]
    finally:
        running.kill()
        running.wait()
    assert sorted(p.name for p in root.iterdir()) == sorted(v for k, v in names.items() if k != "dead")


def test_the_process_folder_is_removed_at_exit(comfyui_path, tmp_path):
    """A ComfyUI process that exits normally takes its folder (and any store left in it) along."""
    code = f"""
import sys
sys.path.insert(0, {str(Path(__file__).parent)!r})
import conftest  # sets ComfyUI up as the host tier does
import folder_paths
folder_paths.set_temp_directory({str(tmp_path / "temp")!r})
pack = conftest.load_pack()
folder = pack.nodes.store_folder.store_folder()
open(folder + "/left_behind", "w").close()
print(folder)
"""
    env = dict(os.environ, COMFYUI_PATH=comfyui_path)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    folder = Path(out.stdout.strip().splitlines()[-1])
    assert folder.parent == tmp_path / "fatezero_stores"
    assert not folder.exists()


# ---------------------------------------------------------------------------- files gone
def test_deleted_store_files_stop_the_edit_with_the_remedy(nodes, tiny_sd15, tiny_clip, temp_dir):
    case = edit_case(nodes, tiny_sd15, tiny_clip, "disk")
    shutil.rmtree(case["store"].directory)
    with pytest.raises(nodes.user_errors.FateZeroNodeError,
                       match=r"deleted or damaged.*run FateZero DDIM Invert again.*Free model and node cache"):
        edit(nodes, case)


def test_store_files_deleted_midway_stop_the_edit_with_the_remedy(nodes, tiny_sd15, tiny_clip, temp_dir,
                                                                  monkeypatch):
    import comfy.utils

    case = edit_case(nodes, tiny_sd15, tiny_clip, "disk")
    steps = []

    def hook(value, total, preview_image, prompt_id=None, node_id=None):
        steps.append(value)
        if value == 2:
            shutil.rmtree(case["store"].directory)

    monkeypatch.setattr(comfy.utils, "PROGRESS_BAR_HOOK", hook)
    with pytest.raises(nodes.user_errors.FateZeroNodeError, match=r"deleted or damaged.*Invert again"):
        edit(nodes, case)
    assert steps == [1, 2]


# ------------------------------------------------------------------------ what an edit keeps
@pytest.mark.parametrize("placement", ["disk", "recompute"])
def test_sample_keeps_no_step_of_the_store_after_the_edit(nodes, tiny_sd15, tiny_clip, temp_dir, placement):
    case = edit_case(nodes, tiny_sd15, tiny_clip, placement)
    store = case["store"]
    first = edit(nodes, case)
    assert store.reading_nbytes == 0  # the disk step read last, or the regenerated step
    assert store.complete
    assert torch.equal(edit(nodes, case), first)  # and the next edit reads it again
    assert store.reading_nbytes == 0
