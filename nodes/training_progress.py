"""What a training node shows while it runs: ComfyUI's progress bar with the loss curve as its
preview, and a line of text under the node (``comfy.utils.ProgressBar``;
``PromptServer.send_progress_text``, ``server.py``, ComfyUI 0.3.64)."""

from __future__ import annotations

import logging

import comfy.utils

from ..fatezero_core.tav import train as tuning

log = logging.getLogger("comfyui-fatezero")

PREVIEW_EVERY = 10  # steps between loss-curve previews


def show_text(node_id, text: str) -> None:
    """``text`` under the node in the ComfyUI frontend, when a client is connected."""
    try:
        from server import PromptServer
        server = PromptServer.instance
    except (ImportError, AttributeError):
        return
    if node_id is not None and getattr(server, "client_id", None):
        server.send_progress_text(text, node_id)


def progress_reporter(steps: int, node_id, class_losses: list[float] | None = None):
    """ComfyUI progress bar with the running loss (text under the node) and the loss curve as the
    preview every few steps. ``class_losses``: the list the class steps append to (regularization),
    shown beside the clip's."""
    bar = comfy.utils.ProgressBar(steps, node_id=node_id)

    def report(step: int, losses: list[float]) -> None:
        width = max(1, steps // 10)
        window = tuning.running_mean(losses, width)[-1]
        classes = class_losses or None
        class_window = tuning.running_mean(classes, width)[-1] if classes else None
        preview = None
        if step % PREVIEW_EVERY == 0 or step == steps:
            from PIL import Image
            image = tuning.loss_curve_image(losses, class_losses=classes)[0].mul(255).byte().numpy()
            preview = ("PNG", Image.fromarray(image), 512)
        bar.update_absolute(step, steps, preview)
        text = f"step {step}/{steps}  loss {window:.4f}"
        show_text(node_id, text if class_window is None else f"{text}  class {class_window:.4f}")
        if step % PREVIEW_EVERY == 0 or step == steps:
            log.info("Tune-A-Video Train: step %d/%d, loss %.4f (running mean %.4f)%s", step, steps, losses[-1], window,
                     "" if class_window is None else f", class loss {classes[-1]:.4f} (running mean {class_window:.4f})")

    return report


__all__ = ["progress_reporter", "show_text"]
