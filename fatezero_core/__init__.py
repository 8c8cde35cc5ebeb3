"""Host-agnostic FateZero: DDIM inversion with attention capture and attention fusion.

Pure PyTorch; never imports ComfyUI. The ComfyUI nodes in ``nodes/`` adapt host objects to this API.
"""
