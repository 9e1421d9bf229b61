"""The PACE 2025 container template's entry point: ``python main.py -i /input -o /output -t seg|cls -d gpu``.

``process.py`` with the PACE output layout as its default (``--format pace``): the template runs
``main.py`` with these four options, and the image's entry point runs such a command as given
(``docker run IMAGE python main.py -i /input -o /output -t seg -d gpu``). Every ``process.py``
option works here too; ``python main.py --help`` lists them. ``-d gpu`` where torch sees no CUDA
GPU runs on the CPU with a warning, as the template's ``main.py`` does (``process.py`` refuses it).
"""
import process
from model.program import run_program

INTRO = """PF-SAM BUS through the PACE 2025 container template's entry point: process.py with the PACE
layout (--format pace) as the default format. Without arguments it reads /input and writes
segmentation/ and classification/ to /output. As in the template, -d gpu runs on the CPU (with a
warning) where no CUDA GPU is visible; process.py refuses that.
"""

if __name__ == "__main__":
    _, marker, examples = process.__doc__.partition("\n\b\n")  # process.py's examples, outputs, exit codes
    process.main.help = INTRO + marker + examples
    run_program(process.main, default_map={"fmt": "pace", "gpu_fallback": True}, prog_name="main.py")
