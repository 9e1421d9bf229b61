"""Cog predictor for PF-SAM BUS (https://cog.run): ``cog predict -i image=@case.png``.

A thin adapter like ``process.py``: the model is loaded once in ``setup()`` and each ``predict()``
goes through ``model.inference.predict_file``, the same code the batch runs use. Without cog
installed (the challenge container, plain Python) minimal stand-ins for ``BasePredictor``,
``BaseModel``, ``Input`` and ``Path`` keep the class importable and callable. Cog saves each upload
under a name of its own (``…file.bin``); ``predict_file`` reads such a file by its content.
test/test_cog.py serves this class with Cog's own server (the cog and coglet wheels) and tests the
stand-ins without them.
"""
from __future__ import annotations

import shutil
import tempfile
from typing import Optional

try:  # pragma: no cover - exercised only where cog is installed
    from cog import BaseModel, BasePredictor, Input, Path
except ImportError:
    from pathlib import Path

    class BasePredictor:  # noqa: D101 - stand-in
        def setup(self) -> None:
            pass

    class BaseModel:  # noqa: D101 - stand-in: keyword construction of the annotated fields
        def __init__(self, **values):
            for name in getattr(type(self), "__annotations__", {}):
                setattr(self, name, values.get(name))

        def dict(self) -> dict:
            return {name: getattr(self, name) for name in getattr(type(self), "__annotations__", {})}

    def Input(default=None, description: str = "", **_):  # noqa: N802 - cog's name
        return default

from model.inference import load_predictor, predict_file


def _default_for(value):
    """An argument as given, or the default of cog's ``Input(...)`` placeholder where it was left out."""
    if type(value).__name__ == "FieldInfo" and type(value).__module__.startswith("cog"):
        return getattr(value, "default", None)
    return value


class Output(BaseModel):
    """The PRECISE/PACE test phase's Cog example returns ``segmentation_mask`` and ``classification``;
    the labels are spelled as in its classification.csv."""
    segmentation_mask: Path  # 0/255 PNG of the input's size (.mha/.nii/.nii.gz/.nrrd with its geometry for those inputs)
    classification: str  # Normal | Benign | Malignant
    overlay: Optional[Path]  # the image with the lesion contour, label and probability
    probability_normal: float
    probability_benign: float
    probability_malignant: float


class Predictor(BasePredictor):
    def setup(self, model_dir: Optional[str] = None) -> None:
        """Load the ensemble once: ``/opt/ml/model`` if it holds one, else model/weights/default."""
        self.predictor = load_predictor(model_dir, device="auto", batch_size=1)
        self.model_class_prior = self.predictor.class_prior  # ensemble.json's postprocess.class_prior
        self.served: Optional[Path] = None  # the last prediction's output folder

    def predict(
        self,
        image: Path = Input(description="Breast ultrasound image (.png, .jpg, .tif, .mha, .nii/.nii.gz, .nrrd or DICOM)"),
        overlay: bool = Input(description="Also return an overlay image", default=True),
        tta: bool = Input(description="Horizontal-flip test-time augmentation (the image and its mirror image, averaged; "
                                         "twice the encoder time)", default=False),
        class_prior: str = Input(description="Class probabilities under the class frequencies the model was trained "
                                              "with (trained), or under its training data's own (data: the training's "
                                              "class weights divided out); model: as the model's ensemble.json says",
                                 choices=["model", "trained", "data"], default="model"),
    ) -> Output:
        # called from Python where cog is installed, an argument left out arrives as cog's Input(...)
        # placeholder, not its default: bool() of it is True (TTA turned on unasked) and it is no choice
        image, overlay, tta, class_prior = (_default_for(v) for v in (image, overlay, tta, class_prior))
        if image is None:
            raise TypeError("predict() needs image: the path of a breast ultrasound image")
        self.predictor.tta = bool(tta)
        self.predictor.class_prior = self.model_class_prior if class_prior == "model" else class_prior
        # Cog never deletes the files a prediction returns (replicate/cog#1434): the previous prediction's
        # folder, served by now (one prediction at a time), goes, so that a long-running server keeps one
        if getattr(self, "served", None) is not None:
            shutil.rmtree(self.served, ignore_errors=True)
            self.served = None
        out_dir = Path(tempfile.mkdtemp(prefix="pfsam-"))
        try:
            case = predict_file(self.predictor, Path(str(image)), out_dir, overlay=bool(overlay))
        except BaseException:  # a refused input leaves no folder behind on a long-running server
            shutil.rmtree(out_dir, ignore_errors=True)
            raise
        self.served = out_dir
        pred = case.prediction
        return Output(segmentation_mask=Path(str(case.outputs[0])),
                      classification=pred.label.capitalize(),
                      overlay=Path(str(case.outputs[1])) if overlay else None,
                      probability_normal=float(pred.probabilities["normal"]),
                      probability_benign=float(pred.probabilities["benign"]),
                      probability_malignant=float(pred.probabilities["malignant"]))
