"""ComfyUI entry point for comfyui-fatezero."""
