"""Tune-A-Video for a frame-major host.

The networks are Tune-A-Video's ``UNet3DConditionModel`` (``tuneavideo/models/unet.py``,
github.com/showlab/Tune-A-Video) and FateZero's ``UNetPseudo3DConditionModel``
(``video_diffusion/models/unet_3d_condition.py``, github.com/ChenyangQiQi/FateZero at 9b6cb7b): an
SD1.x UNet with temporal attention after each transformer block and, in FateZero's, a temporal
conv after each kernel-3 conv. Import from the module that defines a name:

- ``checkpoint``: safe loading, layout detection, SD1.x validation, the temporal owners;
- ``modules``: the temporal layers on a frame-major batch;
- ``inflate``: the containers that put them into an ldm-style (ComfyUI) UNet;
- ``train``: one-shot tuning on one clip.
"""
