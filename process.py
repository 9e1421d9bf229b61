"""PF-SAM BUS: lesion segmentation + normal/benign/malignant classification of breast ultrasound images.

A thin command-line adapter: all the work is in ``model/inference.py`` (shared with the Cog
``predict.py``). Without arguments it runs as a Grand Challenge algorithm: reads ``/input``,
writes ``/output``.

\b
  python process.py                                  # Grand Challenge: /input -> /output
  python process.py -i images/ -o out/ --format pace # PACE layout (main.py: the PACE template's entry)
  python process.py -i val/ -o sub/ --format codabench # PACE validation phase: upload sub/submission.zip
  python process.py -i images/ -o demo/ --overlay    # plus one overlay PNG per image
  python process.py -i images/ -o out/ --logits      # plus each mask's lesion logits (.npy), for ensembling

\b
Outputs (details in model/writers.py):
  gc   : images/breast-lesion-segmentation/<name>.mha, results.json, and with exactly one
         input breast-lesion-classification.json and malignancy-likelihood.json
  pace : segmentation/<name>_mask.png, classification/predictions.csv, classification/probabilities.csv
  codabench : segmentation/<name>_mask.png, classification.csv, and submission.zip holding both
  all  : errors.csv (file,reason) when some case failed; overlays/<name>.png with --overlay and
         logits/<name>.npy with --logits (both off by default: challenge graders expect only their own files)
<name> is the input's file stem (case_0000.nii.gz -> case_0000; a DICOM file without an image suffix: its
whole name); inputs whose names collide get distinct names (a.jpg -> a, a.png -> a_png; x/a.png -> a,
y/a.png -> y_a).

\b
Exit status: 0 all images processed; 3 some failed (the others are written);
1 none processed, no input images, an input or output folder that cannot be used, or the model cannot be
loaded; 2 a bad option or value (nothing run);
143 stopped by SIGTERM (docker stop), 130 by Ctrl-C (SIGINT): masks written so far are kept, no summary files
(an earlier run's there are kept, and named in a note once this run has written some outputs).
The model's name and a clean run's summary go to stdout; notes, warnings, errors and the summary of a
run with failures to stderr (Grand Challenge marks a job that wrote to stderr with a warning).
"""
from __future__ import annotations

import signal
import sys
from pathlib import Path

import click

from model import __version__
from model.inference import (FORMATS, TASKS, InferenceError, find_inputs, load_predictor, prepare_output, run,
                             summary_line)
from model.program import run_program, silence
from model.writers import output_folders


def _print_version(ctx: click.Context, param, value: bool) -> None:
    if not value or ctx.resilient_parsing:
        return
    import platform

    import torch  # here, not at the top: --help and the checks before the model loads stay free of its import

    click.echo(f"PF-SAM BUS {__version__} (python {platform.python_version()}, torch {torch.__version__})")
    ctx.exit()


def _say(text: str) -> None:
    """A line on stderr that may not stop what follows: stderr on a full disk or a closed pipe."""
    try:
        click.echo(text, err=True)
    except OSError:
        silence(sys.stderr)


def _stop(signum, frame) -> None:
    _say(f"stopped by {signal.Signals(signum).name}: outputs written so far are kept")
    sys.exit(128 + signum)


@click.command(help=__doc__, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-V", "--version", is_flag=True, expose_value=False, is_eager=True, callback=_print_version,
              help="Show the version (with Python's and torch's) and exit.")
@click.option("-i", "--input", "input_dir", type=click.Path(path_type=Path), default=Path("/input"),
              show_default=True, help="Folder searched recursively for .mha/.mhd, .nii/.nii.gz, .nrrd/.nhdr, .tif/.tiff, .png, "
                                      ".jpg/.jpeg, .bmp images and DICOM (.dcm/.dicom, or any other name with DICOM "
                                      "content).")
@click.option("-o", "--output", "output_dir", type=click.Path(path_type=Path), default=Path("/output"),
              show_default=True, help="Output folder (created if missing).")
@click.option("-t", "--task", type=click.Choice(TASKS), default="all", show_default=True,
              help="all: segmentation and classification; seg: segmentation only; cls: classification only.")
@click.option("-d", "--device", type=click.Choice(["auto", "cpu", "gpu"]), default="auto", show_default=True,
              help="gpu = CUDA; auto = CUDA when available, else CPU.")
@click.option("--format", "fmt", type=click.Choice(FORMATS), default="gc", show_default=True,
              help="gc: Grand Challenge outputs; pace: PACE challenge outputs (the template's layout); "
                   "codabench: PACE's validation-phase upload (submission.zip).")
@click.option("--model-dir", type=click.Path(path_type=Path), default=None,
              help="Ensemble folder [default: the upload at /opt/ml/model (its ensemble.json or config.json at the top or one folder "
                   "down; files without one are an error), else model/weights/default].")
@click.option("--batch-size", type=click.IntRange(min=1), default=4, show_default=True,
              help="Images per encoder batch. On CPU each adds about 0.4 GB of memory: keep it at 8 or below "
                   "in a 4 GB container.")
@click.option("--tta/--no-tta", default=False, show_default=True, help="Horizontal-flip test-time augmentation: the image and its mirror image (mirrored within its own columns), "
              "averaged; twice the encoder time.")
@click.option("--class-prior", type=click.Choice(["trained", "data"]), default=None,
              help="Class probabilities under the class frequencies the model was trained with (trained: its "
                   "training's class-weighted sampling) or under its training data's own (data: those weights "
                   "divided out; for the default model higher accuracy, lower recall of the oversampled normal and "
                   "malignant classes) [default: the model's "
                   "ensemble.json postprocess.class_prior, else trained].")
@click.option("--overlay/--no-overlay", default=False, show_default=True,
              help="Also write overlays/<name>.png (contour, label, probability).")
@click.option("--logits/--no-logits", default=False, show_default=True,
              help="Also write logits/<name>.npy: the lesion logits at the mask's height x width (float16; their "
                   "sigmoid is the lesion probability, and the mask is where they pass the threshold's logit, 0 at "
                   "the default 0.5), for ensembling with other models (nnU-Net's --save_probabilities).")
@click.option("--precision", type=click.Choice(["auto", "fp32", "bf16"]), default="auto", show_default=True,
              help="auto: bf16 on CUDA (compute capability 8.0+) for SAM ViT encoders, else fp32 (bf16 is faster but moves the default "
                   "LiteMedSAM model's masks beyond tolerance).")
@click.option("--runtime", type=click.Choice(["auto", "torch", "onnx"]), default="auto", show_default=True,
              help="Encoder runtime. auto and torch: PyTorch (on CPU in fp32: BatchNorm folded, every convolution "
                   "and linear layer through oneDNN with the GELU or residual add after it fused in); onnx: "
                   "ONNX Runtime, CPU fp32 only (-d auto then means the CPU; the same outputs; slower than PyTorch where measured, see the README).")
@click.option("--compile/--no-compile", "compile_", default=False, show_default=True,
              help="torch.compile the encoder (faster on CUDA for large folders; the first batch compiles for about 30 s; "
                   "needs a C/C++ compiler and Python's headers, which the container ships unless built with COMPILER=0).")
@click.option("--gpu-fallback/--no-gpu-fallback", default=False, hidden=True,
              help="-d gpu without a CUDA GPU: run on the CPU with a warning (main.py's default, as the PACE "
                   "template's main.py does) instead of an error.")
@click.option("--progress/--no-progress", default=None,
              help="Progress bar on stderr [default: on when stderr is a terminal; off in captured logs, such "
                   "as a container's].")
def main(input_dir: Path, output_dir: Path, task: str, device: str, fmt: str, model_dir: Path | None,
         batch_size: int, tta: bool, class_prior: str | None, overlay: bool, logits: bool, precision: str, runtime: str,
         compile_: bool, gpu_fallback: bool, progress: bool | None) -> None:
    if runtime == "onnx" and compile_:  # options that cannot run together: refused before anything runs
        raise click.UsageError("--compile runs the encoder in PyTorch: not with --runtime onnx")
    if runtime == "onnx" and (precision == "bf16" or device == "gpu"):
        raise click.UsageError("--runtime onnx runs the encoder on the CPU in fp32 only (not with "
                               f"{'--precision bf16' if precision == 'bf16' else '-d gpu'})")
    if device == "gpu" and gpu_fallback:
        import torch

        if not torch.cuda.is_available():  # the organisers' command always says -d gpu; a CPU run beats none
            click.echo("warning: -d gpu, but no CUDA GPU is visible to this process (no --gpus given to docker run, "
                       "or a driver older than the image's CUDA): running on the CPU, as the PACE template does",
                       err=True)
            device = "cpu"
    if logits and task == "cls":  # not an error: the template's two runs may be given the same options
        click.echo("note: --logits writes nothing with -t cls (the lesion logits come with the mask)", err=True)
    # SIGTERM (docker stop, a platform's time limit) ends the run as an exception would: temporary files go,
    # what is written stays. As PID 1 in a container, Python would otherwise ignore it until SIGKILL.
    # The caller's handler comes back afterwards (main also runs in-process: tests, notebooks).
    previous = signal.signal(signal.SIGTERM, _stop)
    try:
        if progress is None:
            progress = sys.stderr.isatty()
        try:
            inputs = find_inputs(input_dir, exclude=output_dir)
            # before the model loads: a folder it cannot write fails now
            prepare_output(output_dir, create=False, folders=output_folders(fmt, task, overlay, logits))
            predictor = load_predictor(model_dir, device=device, batch_size=batch_size, tta=tta, precision=precision,
                                       compile_backend="inductor" if compile_ else None, runtime=runtime,
                                       class_prior=class_prior)
            result = run(predictor, input_dir, output_dir, task=task, fmt=fmt, overlay=overlay, inputs=inputs,
                         progress=progress, logits=logits)
        except InferenceError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(1)
        except KeyboardInterrupt:  # Ctrl-C: as SIGTERM, not click's "Aborted!" and exit 1 (none processed)
            _say("stopped by SIGINT: outputs written so far are kept")
            sys.exit(128 + signal.SIGINT)
        # a clean run's summary on stdout: Grand Challenge marks a job that wrote to stderr with a warning
        try:
            click.echo(summary_line(result), err=result.exit_code != 0)
        except OSError:  # a full disk or a closed pipe: the outputs are written, and the exit status says how it went
            silence(sys.stderr if result.exit_code else sys.stdout)
        sys.exit(result.exit_code)
    finally:
        signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    run_program(main)
