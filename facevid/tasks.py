"""What each task feeds the UNet, and which sampling requests it accepts.

- t2v: noisy latents + text.
- i2v: noisy latents + text + the first frame: `first_frame_condition` concatenates its (scaled) VAE latent at
  frame 0, zeros at the other frames, and a mask channel that is 1 at frame 0, as extra UNet input channels
  (condition_channels = latent channels + 1). The mask says which frames are given, so the same layout also
  serves other given frames (a last frame, a clip to continue) without changing the model. Sampling
  additionally keeps frame 0 on the given latent at every step (FaceVidPipeline), so the first generated
  frame is the image after a VAE round trip.
- uncond: noisy latents + the empty prompt's embedding for every sample; no prompt is accepted.
"""

from __future__ import annotations

import torch

TASKS = ("t2v", "i2v", "uncond")
TASK_NAMES = {"t2v": "text-to-video", "i2v": "image-to-video", "uncond": "unconditional"}


class TaskMismatchError(ValueError):
    """A sampling request does not fit the task the model was trained for."""


def condition_channels(task: str, latent_channels: int) -> int:
    return latent_channels + 1 if task == "i2v" else 0


def first_frame_condition(first_latent: torch.Tensor, num_frames: int) -> torch.Tensor:
    """(B, C, 1, h, w) scaled first-frame latent -> (B, C + 1, F, h, w) condition: the latent at frame 0 and
    zeros elsewhere, plus a channel that is 1 where a frame is given."""
    batch, channels, _, height, width = first_latent.shape
    condition = first_latent.new_zeros(batch, channels + 1, num_frames, height, width)
    condition[:, :channels, :1] = first_latent
    condition[:, channels, 0] = 1.0
    return condition


def check_request(task: str, has_prompt: bool, has_image: bool, source: str = "this model") -> None:
    """Refuse a request the task cannot serve, saying what to give instead."""
    name = f"{source} is {'an' if task in ('i2v', 'uncond') else 'a'} {TASK_NAMES[task]} ({task}) model"
    if task == "t2v" and has_image:
        raise TaskMismatchError(f"{name}: it takes no conditioning image (--image); give prompts only, or use a "
                                "run trained with task=i2v")
    if task == "t2v" and not has_prompt:
        raise TaskMismatchError(f"{name}: give at least one prompt (--prompt or --prompts-file)")
    if task == "i2v" and not has_image:
        raise TaskMismatchError(f"{name}: give the first frame with --image face.png "
                                "(or a frame of a video: --image clip.mp4 --image-frame K)")
    if task == "uncond" and (has_prompt or has_image):
        given = " and ".join(x for x, y in (("a prompt", has_prompt), ("an image", has_image)) if y)
        raise TaskMismatchError(f"{name}: it takes no prompt and no image, but got {given}; sample it with "
                                "--num-videos N only")
