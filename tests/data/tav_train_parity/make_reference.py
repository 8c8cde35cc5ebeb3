"""Make ``reference.safetensors``: the official FateZero trainer's result on the inputs of ``inputs.py``.

Run by hand (never in CI), in an environment of its own with what the official code requires
(github.com/ChenyangQiQi/FateZero ``requirements.txt``): torch 2.13.0 (CPU), diffusers 0.11.1,
transformers 4.25.1, accelerate 0.15.0, plus what its imports need (huggingface_hub < 0.26,
einops, omegaconf, numpy, pillow, opencv-python-headless) and safetensors to write the file::

    python3 -m venv /tmp/official-venv
    /tmp/official-venv/bin/pip install torch==2.13.0
    /tmp/official-venv/bin/pip install diffusers==0.11.1 transformers==4.25.1 accelerate==0.15.0 \\
        "huggingface_hub<0.26" einops omegaconf numpy pillow opencv-python-headless safetensors
    /tmp/official-venv/bin/python tests/data/tav_train_parity/make_reference.py --fatezero PATH

``PATH`` is a clone (or bare mirror) of the FateZero repository; its ``video_diffusion`` package at
``--commit`` (default 9b6cb7b) is exported to a temporary folder and imported from there, nothing of
it is kept. What runs is the official code itself:

- ``UNetPseudo3DConditionModel`` (``video_diffusion/models/unet_3d_condition.py``) built from the
  SD1.5 UNet config at ``inputs.MODEL_CHANNELS`` wide with ``model_config = {lora: LORA_RANK}``, its
  every tensor (temporal layers included) set from ``inputs.initial_tensor``;
- the trainable set, optimizer, scheduler and accelerator as ``train_tune_a_video.py`` ``train``
  makes them (AdamW, not 8-bit; fp32; ``lr_scheduler`` constant; ``max_grad_norm`` 1.0;
  ``train_temporal_conv`` True) and ``DDPMTrainer.step`` / ``step2d``
  (``video_diffusion/trainer/ddpm_trainer.py``) for each iteration;
- ``ImageSequenceDataset`` (``video_diffusion/data/dataset.py``) on tiny image files written here,
  to read which class images each dataset item gives.

Three things are fed in instead of drawn or computed: the VAE returns the given latents (so
``latent_dist.sample()`` is the input itself, times the trainer's 0.18215 as in the pack), the
text encoder returns the given prompt embedding for the prompt ids it is handed (so the class step
gets the class prompt only if it asks for ``class_prompt_ids``), and ``torch.randn_like`` /
``torch.randint`` inside the trainer module hand out the draws of ``inputs.draws`` (shapes
checked). torchvision, imported by ``common/image_util.py`` for logging only, is a placeholder.

The file holds, for each run (``with_class``: class images and prompt; ``without_class``), every
trained tensor as ``(trained - initial) / lr`` in fp16 (a few MB instead of tens; the script checks
that decoding loses less than 5% of the test's tolerance, 1e-4 of the tensor's mean |value|), the
losses of both steps, each dataset item's class images, and the inputs' fingerprint.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import types
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import inputs as I  # noqa: E402

TOLERANCE = 1e-4  # of the tensor's mean |value|, as the test checks
UNET_CONFIG = dict(  # the SD1.5 UNet config (unet/config.json) with the inflated block names
    sample_size=64, in_channels=4, out_channels=4, center_input_sample=False, flip_sin_to_cos=True,
    freq_shift=0, layers_per_block=2, downsample_padding=1, mid_block_scale_factor=1, act_fn="silu",
    norm_num_groups=32, norm_eps=1e-5, cross_attention_dim=I.CONTEXT_DIM, attention_head_dim=8,
    down_block_types=["CrossAttnDownBlockPseudo3D"] * 3 + ["DownBlockPseudo3D"],
    up_block_types=["UpBlockPseudo3D"] + ["CrossAttnUpBlockPseudo3D"] * 3,
    block_out_channels=[I.MODEL_CHANNELS * m for m in (1, 2, 4, 4)],
)


def export_official(repo: Path, commit: str, into: Path) -> None:
    archive = subprocess.run(["git", "-C", str(repo), "archive", commit, "video_diffusion"],
                             check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)


def placeholder_torchvision() -> None:
    tv = types.ModuleType("torchvision")
    tv.transforms = types.ModuleType("torchvision.transforms")
    sys.modules["torchvision"], sys.modules["torchvision.transforms"] = tv, tv.transforms


class GivenLatents(torch.nn.Module):
    """A VAE whose ``encode(x).latent_dist.sample()`` is ``x`` (``config``: the pipeline reads the SD
    VAE's block count)."""

    config = types.SimpleNamespace(block_out_channels=[128, 256, 512, 512])

    def encode(self, x):
        return types.SimpleNamespace(latent_dist=types.SimpleNamespace(sample=lambda: x))


class GivenEmbeddings(torch.nn.Module):
    """A text encoder returning the embedding of prompt id 0 (source) or 1 (class)."""

    def __init__(self):
        super().__init__()
        self.table = {0: I.prompt_embedding("source"), 1: I.prompt_embedding("class")}

    def forward(self, ids):
        return (torch.cat([self.table[int(i)] for i in ids[:, 0]]),)


class Draws:
    """Stands in for ``torch`` inside the trainer module: ``randn_like`` and ``randint`` hand out
    the queued draws (shapes checked), everything else is torch's."""

    def __init__(self):
        self.noise, self.timesteps = [], []

    def __getattr__(self, name):
        return getattr(torch, name)

    def randn_like(self, x):
        noise = self.noise.pop(0)
        assert noise.shape == x.shape, (noise.shape, x.shape)
        return noise.to(x.dtype)

    def randint(self, low, high, size, device=None):
        t = self.timesteps.pop(0)
        assert (low, high, tuple(size)) == (0, I.NUM_TRAIN_TIMESTEPS, tuple(t.shape)), (low, high, size, t.shape)
        return t.clone()


def official_class_table(ImageSequenceDataset, folder: Path):
    """Which class images each dataset item gives: tiny image files whose grey level is their index
    (a clip of ``FRAMES`` frames and ``CLASS_IMAGES`` class images), read back from ``__getitem__``."""
    from PIL import Image
    clip, classes = folder / "clip", folder / "class"
    clip.mkdir()
    classes.mkdir()
    for i in range(I.FRAMES):
        Image.new("RGB", (8, 8), (0, 0, 0)).save(clip / f"{i:05d}.png")
    for i in range(I.CLASS_IMAGES):
        Image.new("RGB", (8, 8), (40 * i, 40 * i, 40 * i)).save(classes / f"{i:05d}.png")
    dataset = ImageSequenceDataset(path=str(clip), prompt_ids=torch.zeros(1, 1, dtype=torch.long), prompt="",
                                   n_sample_frame=I.FRAMES, image_size=8, class_data_root=str(classes),
                                   class_prompt_ids=torch.ones(1, 1, dtype=torch.long))
    assert len(dataset) == I.CLASS_IMAGES
    table = []
    for item in range(len(dataset)):
        images = dataset[item]["class_images"]  # [c, f, h, w] in [-1, 1]
        grey = ((images[0, :, 0, 0] + 1) / 2 * 255).round().long()
        table.append([int(g) // 40 for g in grey])
    return table


def build_unet(UNet):
    config = dict(UNET_CONFIG, lora=I.LORA_RANK)  # from_2d_model: config.update(model_config)
    unet = UNet(**config)
    shapes = {k: v.shape for k, v in unet.state_dict().items()}
    initial = I.initial_state_dict(shapes)
    unet.load_state_dict(initial, strict=True)
    return unet, initial


def run(mods, with_class: bool, class_table):
    UNet, DDPMTrainer, trainer_module = mods["UNet"], mods["DDPMTrainer"], mods["trainer_module"]
    from accelerate import Accelerator
    from diffusers import DDPMScheduler
    from diffusers.optimization import get_scheduler

    unet, initial = build_unet(UNet)
    # train_tune_a_video.py: freeze, then train modules ending in attn_temporal / .to_q / conv_temporal
    unet.requires_grad_(False)
    for name, module in unet.named_modules():
        if name.endswith(("attn_temporal", ".to_q", "conv_temporal")):
            for p in module.parameters():
                p.requires_grad = True
    trained = [k for k, p in unet.named_parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(unet.parameters(), lr=I.LEARNING_RATE, betas=(0.9, 0.999),
                                  weight_decay=1e-2, eps=1e-8)
    lr_scheduler = get_scheduler("constant", optimizer=optimizer, num_warmup_steps=0,
                                 num_training_steps=I.ITERATIONS)
    accelerator = Accelerator(gradient_accumulation_steps=1, mixed_precision="no", cpu=True)
    unet, optimizer, lr_scheduler = accelerator.prepare(unet, optimizer, lr_scheduler)
    # SD1.5's scheduler_config.json, the keys DDPMScheduler takes (from_pretrained drops the DDIM-only ones)
    scheduler = DDPMScheduler(num_train_timesteps=I.NUM_TRAIN_TIMESTEPS, beta_start=0.00085, beta_end=0.012,
                              beta_schedule="scaled_linear", clip_sample=False, prediction_type="epsilon")
    trainer = DDPMTrainer(vae=GivenLatents(), text_encoder=GivenEmbeddings(), tokenizer=None, unet=unet,
                          scheduler=scheduler, weight_dtype=torch.float32, accelerator=accelerator,
                          optimizer=optimizer, max_grad_norm=1.0, lr_scheduler=lr_scheduler,
                          prior_preservation=None)
    class_losses = []
    step2d = trainer.step2d
    trainer.step2d = lambda images, ids: class_losses.append(float(step2d(images, ids).detach()))
    draws = Draws()
    trainer_module.torch = draws
    clip = I.clip_latents()
    classes = I.class_latents()
    losses, starts = [], []
    try:
        for d in I.draws():
            batch = {"images": clip.permute(1, 0, 2, 3)[None], "prompt_ids": torch.zeros(1, 1, dtype=torch.long)}
            if with_class:
                indices = class_table[d["class_item"]]
                starts.append(indices[0])
                batch["class_images"] = classes[indices].permute(1, 0, 2, 3)[None]  # collate: [b, c, f, h, w]
                batch["class_prompt_ids"] = torch.ones(1, 1, dtype=torch.long)
                draws.noise.append(d["class_noise"])
                draws.timesteps.append(d["class_timesteps"])
            draws.noise.append(d["clip_noise"].permute(1, 0, 2, 3)[None])  # [1, c, f, h, w]
            draws.timesteps.append(torch.tensor([d["clip_timestep"]]))
            losses.append(float(trainer.step(batch).detach()))
            assert not draws.noise and not draws.timesteps
    finally:
        trainer_module.torch = torch
    state = accelerator.unwrap_model(unet).state_dict()
    untouched = [k for k in state if k not in trained and not torch.equal(state[k], initial[k])]
    assert not untouched, untouched[:5]
    out = {}
    worst = 0.0
    for key in trained:
        delta = (state[key] - initial[key]) / I.LEARNING_RATE
        stored = delta.half()
        error = float((stored.float() - delta).abs().max()) * I.LEARNING_RATE
        worst = max(worst, error / (TOLERANCE * float(state[key].abs().mean())))
        out[key] = stored
    assert worst < 0.05, f"fp16 storage loses {worst:.3f} of the tolerance"
    return out, dict(losses=losses, class_losses=class_losses, class_starts=starts, trained=trained,
                     storage_error_of_tolerance=worst, initial_fingerprint=I.inputs_fingerprint(initial))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fatezero", required=True, type=Path, help="clone or bare mirror of the FateZero repository")
    parser.add_argument("--commit", default="9b6cb7b")
    parser.add_argument("--out", type=Path, default=HERE / "reference.safetensors")
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    from safetensors.torch import save_file

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        export_official(args.fatezero, args.commit, tmp)
        placeholder_torchvision()
        sys.path.insert(0, str(tmp))
        import video_diffusion.trainer.ddpm_trainer as trainer_module
        from video_diffusion.data.dataset import ImageSequenceDataset
        from video_diffusion.models.unet_3d_condition import UNetPseudo3DConditionModel
        mods = dict(UNet=UNetPseudo3DConditionModel, DDPMTrainer=trainer_module.DDPMTrainer,
                    trainer_module=trainer_module)
        (tmp / "data").mkdir()
        table = official_class_table(ImageSequenceDataset, tmp / "data")
        tensors, meta = {}, {}
        for name, with_class in (("without_class", False), ("with_class", True)):
            out, info = run(mods, with_class, table)
            tensors.update({f"{name}/{k}": v for k, v in out.items()})
            meta[name] = info
            print(f"{name}: losses {info['losses']}, class losses {info['class_losses']}, "
                  f"{len(out)} trained tensors, fp16 storage error {info['storage_error_of_tolerance']:.4f} of the tolerance")
    assert meta["with_class"]["initial_fingerprint"] == meta["without_class"]["initial_fingerprint"]
    import diffusers
    import transformers
    import accelerate
    metadata = dict(
        commit=args.commit, torch=torch.__version__, diffusers=diffusers.__version__,
        transformers=transformers.__version__, accelerate=accelerate.__version__,
        inputs_fingerprint=meta["with_class"]["initial_fingerprint"], class_table=table,
        runs={k: {kk: vv for kk, vv in v.items() if kk != "initial_fingerprint"} for k, v in meta.items()},
        settings=dict(model_channels=I.MODEL_CHANNELS, frames=I.FRAMES, latent=I.LATENT,
                      class_images=I.CLASS_IMAGES, lora_rank=I.LORA_RANK, learning_rate=I.LEARNING_RATE,
                      iterations=I.ITERATIONS, seed=I.SEED, stored="(trained - initial) / learning_rate, fp16"),
    )
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(args.out), metadata={"reference": json.dumps(metadata)})
    print(f"wrote {args.out} ({args.out.stat().st_size / 1e6:.2f} MB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
