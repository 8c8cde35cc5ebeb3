"""ComfyUI entry point for comfyui-fatezero.

ComfyUI imports this file by path and calls ``comfy_entrypoint()`` (V3 node API). Nothing else
lives here: ``fatezero_core`` stays importable without ComfyUI.
"""

from .nodes import comfy_entrypoint

WEB_DIRECTORY = "./web"

__all__ = ["comfy_entrypoint", "WEB_DIRECTORY"]
