"""Host tests: this pack inside a real ComfyUI (``COMFYUI_PATH``), on the CPU.

Run with ComfyUI's own Python, for example::

    COMFYUI_PATH=/path/to/ComfyUI /path/to/comfyui-venv/bin/python -m pytest tests/host -q

Without ``COMFYUI_PATH`` every test in this folder is skipped with the reason; a ``COMFYUI_PATH``
that the running Python cannot import stops the run with the reason (never silent skips).

Set-up done here before anything imports ``comfy`` (as ComfyUI's ``main.py`` does before its imports): ComfyUI's folder
goes first on ``sys.path`` (its ``nodes``/``server``/``utils`` modules must win over same-named
folders elsewhere), its command line is parsed as ``--cpu``, and the pack is imported the way
ComfyUI imports a custom node: by file path, as a package, so the relative imports in ``nodes/``
work. The pack's module name is ``comfyui_fatezero``; its core is then
``comfyui_fatezero.fatezero_core``, a different module object from a top-level
``fatezero_core``: compare classes through the ``comfy_nodes`` fixture.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import shutil
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
PACK_MODULE = "comfyui_fatezero"
SKIP_REASON = "set COMFYUI_PATH to a ComfyUI checkout and run with its python"


def _comfyui_path() -> str | None:
    path = os.environ.get("COMFYUI_PATH")
    if path and os.path.isfile(os.path.join(path, "main.py")):
        return os.path.abspath(path)
    return None


def _setup_host(path: str) -> None:
    """Make ComfyUI importable and parse its arguments as ``--cpu`` before ``comfy`` loads."""
    if path in sys.path:
        sys.path.remove(path)
    sys.path.insert(0, path)
    saved = sys.argv
    sys.argv = [saved[0] if saved else "pytest", "--cpu"]
    try:
        import comfy.options

        comfy.options.enable_args_parsing()
        import comfy.cli_args  # noqa: F401  (parses sys.argv now)
        import comfy.model_management  # noqa: F401  (picks the CPU from --cpu)
        import folder_paths  # noqa: F401
        from comfy_api.latest import io  # noqa: F401
    finally:
        sys.argv = saved


COMFYUI_PATH = _comfyui_path()
HOST_SKIP: str | None = SKIP_REASON if COMFYUI_PATH is None else None
if COMFYUI_PATH is not None:
    try:
        _setup_host(COMFYUI_PATH)
    except Exception as exc:  # a host asked for but unusable fails the run, never skips it
        raise pytest.UsageError(
            f"COMFYUI_PATH={COMFYUI_PATH} could not be imported with {sys.executable}: "
            f"{type(exc).__name__}: {exc}. Run the host tier with that ComfyUI's own Python."
        ) from exc


def pytest_collection_modifyitems(config, items):
    if HOST_SKIP is None:
        return
    marker = pytest.mark.skip(reason=HOST_SKIP)
    for item in items:
        if HERE in Path(str(item.fspath)).resolve().parents:
            item.add_marker(marker)


def load_pack():
    """Import the repo as ComfyUI does (by path, as a package) under ``comfyui_fatezero``."""
    if PACK_MODULE in sys.modules:
        return sys.modules[PACK_MODULE]
    spec = importlib.util.spec_from_file_location(
        PACK_MODULE, REPO / "__init__.py", submodule_search_locations=[str(REPO)]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[PACK_MODULE] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[PACK_MODULE]
        raise
    return module


# ------------------------------------------------------------------------------------------------
# Fixtures
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def comfyui_path() -> str:
    """The ComfyUI checkout (``COMFYUI_PATH``), already set up for ``--cpu``."""
    if HOST_SKIP is not None:
        pytest.skip(HOST_SKIP)
    return COMFYUI_PATH


@pytest.fixture(scope="session")
def comfy_nodes(comfyui_path):
    """The pack's top-level module, imported as ComfyUI imports it.

    ``comfy_nodes.nodes`` is the node package (``.video``, ``.blend_settings``, ...);
    ``comfy_nodes.fatezero_core`` the core as the nodes see it.
    """
    pack = load_pack()
    importlib.import_module(f"{PACK_MODULE}.fatezero_core")
    return pack


@pytest.fixture(scope="session")
def nodes(comfy_nodes):
    """The pack's node package as ComfyUI loads it (``nodes.invert``, ``nodes.sample``, ...,
    ``nodes.user_errors``): importing the pack imports every node module."""
    return comfy_nodes.nodes


@pytest.fixture
def tiny_sd15(comfyui_path):
    """A fresh ``ModelPatcher`` (CPU) over a seeded SD1.5-topology UNet with model_channels 32."""
    import tiny_models

    return tiny_models.build_tiny_sd15()


@pytest.fixture(scope="session")
def _tiny_clip_base(comfyui_path):
    import tiny_models

    return tiny_models.build_tiny_clip()


@pytest.fixture
def tiny_clip(_tiny_clip_base):
    """A ``comfy.sd.CLIP`` clone: real SD1 tokenizer, 2-layer 768-wide CLIP-L, seeded weights.

    Clones share the weights (as in ComfyUI) but not patches, so tests may patch freely.
    """
    return _tiny_clip_base.clone()


@pytest.fixture
def tiny_vae(comfyui_path):
    """A ``comfy.sd.VAE`` over a seeded TAESD-layout autoencoder (8x scaling, 4 channels)."""
    import tiny_models

    return tiny_models.build_tiny_vae()


@pytest.fixture(scope="session")
def tiny_checkpoint(comfyui_path, tmp_path_factory) -> Path:
    """Path of a tiny SD1.5 checkpoint (``.ckpt``, LDM keys) that CheckpointLoaderSimple loads."""
    import tiny_models

    path = tmp_path_factory.mktemp("checkpoints") / "fatezero_tiny_sd15.ckpt"
    tiny_models.write_tiny_sd15_checkpoint(path)
    return path


@pytest.fixture
def comfy_input_dir(comfyui_path, tmp_path, monkeypatch) -> Path:
    """An empty folder set as ComfyUI's input directory for the test (restored afterwards)."""
    import folder_paths

    folder = tmp_path / "input"
    folder.mkdir()
    monkeypatch.setattr(folder_paths, "input_directory", str(folder))
    return folder


@pytest.fixture(scope="session", autouse=True)
def comfy_temp_dir(tmp_path_factory):
    """ComfyUI's temp folder for in-process runs, so preview PNGs never land in the checkout."""
    if HOST_SKIP is not None:
        yield None
        return
    import folder_paths

    saved = folder_paths.get_temp_directory()
    folder = tmp_path_factory.mktemp("comfy_temp")
    folder_paths.set_temp_directory(str(folder))
    try:
        yield folder
    finally:
        folder_paths.set_temp_directory(saved)


@pytest.fixture
def user_error_types(comfy_nodes, nodes):
    """The pack's user-error classes, as the nodes see them."""
    return (comfy_nodes.fatezero_core.errors.FateZeroError, nodes.user_errors.FateZeroNodeError)


@pytest.fixture(scope="session")
def comfy_server(comfyui_path, tiny_checkpoint, tmp_path_factory):
    """A headless ``main.py --cpu`` server with this pack and the tiny checkpoint installed.

    Yields a ``host_server.ComfyServer``: ``.url`` is the base URL; ``.input_dir`` /
    ``.output_dir`` are the server's folders; ``.checkpoint`` the checkpoint's name for
    ``CheckpointLoaderSimple``. Stopped at the end of the session.
    """
    import host_server

    base = host_server.prepare_base_directory(tmp_path_factory.mktemp("comfyui_base"), REPO)
    target = base / "models" / "checkpoints" / tiny_checkpoint.name
    shutil.copyfile(tiny_checkpoint, target)
    server = host_server.ComfyServer(comfyui_path, base)
    server.checkpoint = target.name
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def comfy_server_url(comfy_server) -> str:
    """Base URL of the headless server (``http://127.0.0.1:<port>``)."""
    return comfy_server.url


@pytest.fixture(scope="session")
def browser(comfy_server, tmp_path_factory):
    """Headless Chromium on the server's page, with the app and this pack's extension loaded
    (a ``browser.DevTools`` page). Skipped with the reason when Chromium or websocket-client is
    missing."""
    import browser as chromium

    if chromium.CHROMIUM is None:
        pytest.skip("Chromium not found: install Debian's chromium package (apt-get install "
                    "chromium) to run the frontend tests")
    pytest.importorskip("websocket", reason="the websocket-client package is needed to drive Chromium")
    # A first visit opens the template browser over the canvas; mark it as seen (a user setting
    # in the test server's temporary user folder).
    status, _ = comfy_server.post_json("/settings/Comfy.TutorialCompleted", True)
    assert status == 200, status
    with chromium.open_comfyui_page(comfy_server.url, tmp_path_factory.mktemp("chromium_profile")) as page:
        yield page


@pytest.fixture
def host_inference_mode(comfyui_path):
    """Run the test under ``torch.inference_mode()``, as ComfyUI's executor runs every node."""
    import torch

    with torch.inference_mode():
        yield
