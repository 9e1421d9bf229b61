"""Compare a Grand Challenge output folder with ``test/expected_output.json`` (or record it there).

Needs only numpy and SimpleITK (no torch). What is compared, per run (``all``: every fixture
together; ``single``: one fixture alone, which adds the single-case JSON files):

* the set of files written (relative paths);
* per input (``results.json``): no error messages; each mask's size, spacing, origin, direction
  and pixel type, equal to the INPUT image's geometry too; values in {0, 1}; the mask itself
  exactly (sha256 of its pixels; the lesion pixel count is printed on a mismatch); the label
  exactly; the probabilities within ``--tol`` (default 1e-3) and summing to 1;
* ``breast-lesion-classification.json`` / ``malignancy-likelihood.json`` when present;
* the model the expected output was made with (fingerprint of its files), so that a stale
  expected_output.json is reported as such rather than as a wrong prediction.

    python test/compare_output.py compare --run all --output OUT --input test/input --model-dir M
    python test/compare_output.py record  --run all --output OUT --input test/input --model-dir M --model-kind default
    python test/compare_output.py pace --output PACE_OUT --gc OUT   # main.py's PACE layout against the GC run

Prints PASS or FAIL (with every difference); exit 0 on PASS, 1 on FAIL, 2 on a usage error.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk

HERE = Path(__file__).resolve().parent
DEFAULT_EXPECTED = HERE / "expected_output.json"
CLASSES = ("normal", "benign", "malignant")


def model_fingerprint(model_dir: Path) -> str:
    """sha256 over (relative path, sha256 of content) of every file in the model folder."""
    digest = hashlib.sha256()
    files = sorted(p for p in model_dir.rglob("*") if p.is_file() and "__pycache__" not in p.parts)
    if not files:
        raise SystemExit(f"compare_output: no files in model folder {model_dir}")
    for p in files:
        digest.update(p.relative_to(model_dir).as_posix().encode() + b"\0")
        digest.update(hashlib.sha256(p.read_bytes()).hexdigest().encode() + b"\n")
    return digest.hexdigest()


def _geometry(img: sitk.Image) -> dict:
    return {"size": list(img.GetSize()), "spacing": [round(s, 9) for s in img.GetSpacing()],
            "origin": [round(o, 9) for o in img.GetOrigin()],
            "direction": [round(d, 9) for d in img.GetDirection()]}


def _input_geometry(input_dir: Path, name: str) -> dict | None:
    found = [p for p in input_dir.rglob(name) if p.is_file()]
    if len(found) != 1:
        return None
    img = sitk.ReadImage(str(found[0]))
    geom = _geometry(img)
    if img.GetNumberOfComponentsPerPixel() > 1 or found[0].suffix.lower() != ".mha":
        geom = {"size": geom["size"][:2], "spacing": [1.0, 1.0], "origin": [0.0, 0.0], "direction": [1.0, 0.0, 0.0, 1.0]}
    return geom


def _mask_summary(path: Path) -> dict:
    img = sitk.ReadImage(str(path))
    arr = np.ascontiguousarray(sitk.GetArrayFromImage(img))
    return {**_geometry(img), "pixel_type": img.GetPixelIDTypeAsString(),
            "values": sorted(int(v) for v in np.unique(arr)), "lesion_pixels": int((arr > 0).sum()),
            "sha256": hashlib.sha256(str(arr.shape).encode() + arr.tobytes()).hexdigest()}


def summarize(out: Path) -> dict:
    """What the comparison looks at, from a Grand Challenge output folder."""
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    results_path = out / "results.json"
    if not results_path.is_file():
        raise FileNotFoundError(f"{results_path} missing (files written: {files})")
    cases = {}
    for entry in json.loads(results_path.read_text()):
        name = entry["inputs"][0]["image"]["name"]
        case: dict = {"error_messages": entry.get("error_messages", [])}
        for o in entry.get("outputs", []):
            if o["type"] == "mask":
                case["mask"] = {"filename": o["filename"], **_mask_summary(out / o["filename"])}
            elif o["type"] == "classification":
                case["label"] = o["label"]
                case["probabilities"] = {k: float(o["probabilities"][k]) for k in CLASSES}
        cases[name] = case
    summary = {"files": files, "cases": cases}
    single = out / "breast-lesion-classification.json"
    if single.is_file():
        summary["classification"] = json.loads(single.read_text())
    likelihood = out / "malignancy-likelihood.json"
    if likelihood.is_file():
        summary["malignancy_likelihood"] = json.loads(likelihood.read_text())
    return summary


def check_invariants(summary: dict, input_dir: Path | None) -> list[str]:
    """Properties every correct output has, whatever the model."""
    problems = []
    for name, case in summary["cases"].items():
        if case["error_messages"]:
            problems.append(f"{name}: error messages {case['error_messages']}")
        mask = case.get("mask")
        if mask:
            if not set(mask["values"]) <= {0, 1}:
                problems.append(f"{name}: mask values {mask['values']} not in {{0, 1}}")
            if mask["pixel_type"] != "8-bit unsigned integer":
                problems.append(f"{name}: mask pixel type {mask['pixel_type']}, expected uint8")
            geom = _input_geometry(input_dir, name) if input_dir else None
            if geom is not None:
                for key in ("size", "spacing", "origin", "direction"):
                    if not np.allclose(mask[key], geom[key], atol=1e-6):
                        problems.append(f"{name}: mask {key} {mask[key]} != input {key} {geom[key]}")
        probs = case.get("probabilities")
        if probs:
            if not math.isclose(sum(probs.values()), 1.0, abs_tol=1e-4):
                problems.append(f"{name}: probabilities sum to {sum(probs.values())}")
            if case["label"] != max(probs, key=probs.get):
                problems.append(f"{name}: label {case['label']} is not the most probable class {probs}")
    return problems


def compare(expected: dict, actual: dict, tol: float) -> list[str]:
    problems = []
    if expected["files"] != actual["files"]:
        missing = sorted(set(expected["files"]) - set(actual["files"]))
        extra = sorted(set(actual["files"]) - set(expected["files"]))
        problems.append(f"files differ: missing {missing}, unexpected {extra}")
    if set(expected["cases"]) != set(actual["cases"]):
        problems.append(f"cases differ: expected {sorted(expected['cases'])}, got {sorted(actual['cases'])}")
    for name in sorted(set(expected["cases"]) & set(actual["cases"])):
        e, a = expected["cases"][name], actual["cases"][name]
        if e.get("error_messages") != a.get("error_messages"):
            problems.append(f"{name}: error messages {a.get('error_messages')} != expected {e.get('error_messages')}")
        if ("mask" in e) != ("mask" in a):
            problems.append(f"{name}: mask {'missing' if 'mask' in e else 'unexpected'}")
        elif "mask" in e:
            em, am = e["mask"], a["mask"]
            for key in ("filename", "size", "spacing", "origin", "direction", "pixel_type", "values"):
                if em[key] != am[key] and not (key in ("spacing", "origin", "direction")
                                               and np.allclose(em[key], am[key], atol=1e-6)):
                    problems.append(f"{name}: mask {key} {am[key]} != expected {em[key]}")
            if em["sha256"] != am["sha256"]:
                problems.append(f"{name}: mask pixels differ from the expected mask "
                                f"({am['lesion_pixels']} lesion pixels, expected {em['lesion_pixels']})")
        if e.get("label") != a.get("label"):
            problems.append(f"{name}: label {a.get('label')} != expected {e.get('label')}")
        if ("probabilities" in e) != ("probabilities" in a):
            problems.append(f"{name}: probabilities {'missing' if 'probabilities' in e else 'unexpected'}")
        elif "probabilities" in e:
            for k in CLASSES:
                if abs(e["probabilities"][k] - a["probabilities"][k]) > tol:
                    problems.append(f"{name}: P({k}) = {a['probabilities'][k]:.6f}, expected "
                                    f"{e['probabilities'][k]:.6f} (tolerance {tol})")
    for key in ("classification", "malignancy_likelihood"):
        if (key in expected) != (key in actual):
            problems.append(f"{key}: {'missing' if key in expected else 'unexpected'}")
    if "classification" in expected and "classification" in actual:
        ec, ac = expected["classification"], actual["classification"]
        if ec["label"] != ac.get("label"):
            problems.append(f"breast-lesion-classification.json: label {ac.get('label')} != expected {ec['label']}")
        for k in CLASSES:
            if abs(ec["probabilities"][k] - float(ac.get("probabilities", {}).get(k, math.inf))) > tol:
                problems.append(f"breast-lesion-classification.json: P({k}) differs beyond {tol}")
    if "malignancy_likelihood" in expected and "malignancy_likelihood" in actual:
        if not isinstance(actual["malignancy_likelihood"], (int, float)):
            problems.append(f"malignancy-likelihood.json is not a bare number: {actual['malignancy_likelihood']!r}")
        elif abs(expected["malignancy_likelihood"] - actual["malignancy_likelihood"]) > tol:
            problems.append(f"malignancy-likelihood.json: {actual['malignancy_likelihood']} != expected "
                            f"{expected['malignancy_likelihood']}")
    return problems


def compare_pace(pace: Path, gc: Path, tol: float) -> list[str]:
    """A PACE-layout output (``python main.py`` in the image) against the Grand Challenge output of the
    same inputs: every mask equal (0/255 against 0/1), every label equal, probabilities within tol."""
    import csv

    problems = []
    entries = json.loads((gc / "results.json").read_text())
    labels = {r["image_id"]: r["label"] for r in csv.DictReader(open(pace / "classification" / "predictions.csv"))}
    probs = {r["image_id"]: r for r in csv.DictReader(open(pace / "classification" / "probabilities.csv"))}
    names = []
    for e in entries:
        mask_out = next(o for o in e["outputs"] if o["type"] == "mask")
        cls_out = next(o for o in e["outputs"] if o["type"] == "classification")
        name = Path(mask_out["filename"]).stem
        names.append(name)
        gc_mask = np.squeeze(sitk.GetArrayFromImage(sitk.ReadImage(str(gc / mask_out["filename"]))))
        png = pace / "segmentation" / f"{name}_mask.png"
        if not png.is_file():
            problems.append(f"{name}: no {png.relative_to(pace)}")
            continue
        pace_mask = sitk.GetArrayFromImage(sitk.ReadImage(str(png)))
        if pace_mask.shape != gc_mask.shape or not np.array_equal(pace_mask, gc_mask.astype(np.uint8) * 255):
            problems.append(f"{name}: the PACE mask differs from the Grand Challenge mask")
        if labels.get(name, "").lower() != cls_out["label"]:
            problems.append(f"{name}: PACE label {labels.get(name)!r} != Grand Challenge label {cls_out['label']!r}")
        if name not in probs:
            problems.append(f"{name}: no row in probabilities.csv")
            continue
        for k in CLASSES:
            if abs(float(probs[name][k]) - cls_out["probabilities"][k]) > tol:
                problems.append(f"{name}: P({k}) {probs[name][k]} != {cls_out['probabilities'][k]}")
    if sorted(labels) != sorted(names):
        problems.append(f"predictions.csv ids {sorted(labels)} != cases {sorted(names)}")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=("compare", "record", "pace"),
                        help="pace: compare a PACE-layout --output with the Grand Challenge output --gc of the same inputs")
    parser.add_argument("--output", type=Path, required=True, help="the output folder to check")
    parser.add_argument("--gc", type=Path, default=None, help="pace: the Grand Challenge output folder")
    parser.add_argument("--input", type=Path, default=None, help="the input folder (geometry checks)")
    parser.add_argument("--expected", type=Path, default=DEFAULT_EXPECTED)
    parser.add_argument("--run", default="all", help="which run of the expected file (all | single); pace: the run's "
                                                      "name in the verdict (default pace)")
    parser.add_argument("--model-dir", type=Path, default=None, help="the model the output was made with (compare, record)")
    parser.add_argument("--model-kind", default=None, help="record: default | test-random")
    parser.add_argument("--tol", type=float, default=1e-3)
    args = parser.parse_args(argv)
    if args.mode == "pace":
        if args.gc is None:
            parser.error("pace needs --gc")
        try:
            problems = compare_pace(args.output, args.gc, args.tol)
        except (FileNotFoundError, KeyError, StopIteration, json.JSONDecodeError, RuntimeError) as exc:
            problems = [f"cannot read the outputs: {exc!r}"]
        label = "pace" if args.run == "all" else args.run  # the run that wrote the PACE layout
        print(f"{'FAIL' if problems else 'PASS'} [{label}]: {args.output} against {args.gc}"
              + "".join(f"\n  {p}" for p in problems))
        return 1 if problems else 0
    if args.model_dir is None:
        parser.error(f"{args.mode} needs --model-dir")

    fingerprint = model_fingerprint(args.model_dir)
    try:
        actual = summarize(args.output)
    except (FileNotFoundError, KeyError, json.JSONDecodeError, RuntimeError) as exc:
        print(f"FAIL [{args.run}]: cannot read the output folder {args.output}: {exc}")
        return 1
    problems = check_invariants(actual, args.input)

    if args.mode == "record":
        if problems:
            print(f"FAIL [{args.run}]: not recording an output that is itself wrong:\n  " + "\n  ".join(problems))
            return 1
        data = json.loads(args.expected.read_text()) if args.expected.is_file() else {}
        model = {"kind": args.model_kind or "unknown", "fingerprint": fingerprint}
        if data.get("model") != model:
            data = {}  # another model: every run must be recorded again
        data["model"] = model
        data["generated_by"] = "test/make_expected.sh"
        data.setdefault("runs", {})[args.run] = actual
        args.expected.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
        print(f"recorded run '{args.run}' ({len(actual['cases'])} cases) into {args.expected}")
        return 0

    if not args.expected.is_file():
        print(f"FAIL [{args.run}]: {args.expected} does not exist; make it with test/make_expected.sh")
        return 1
    data = json.loads(args.expected.read_text())
    model = data.get("model", {})
    if model.get("fingerprint") != fingerprint:
        print(f"FAIL [{args.run}]: {args.expected.name} was made with another model "
              f"({model.get('kind')}, fingerprint {str(model.get('fingerprint'))[:12]}) than the one tested "
              f"({args.model_dir}, fingerprint {fingerprint[:12]}); regenerate it with test/make_expected.sh")
        return 1
    if args.run not in data.get("runs", {}):
        print(f"FAIL [{args.run}]: {args.expected.name} has no run '{args.run}'; regenerate it with test/make_expected.sh")
        return 1
    problems += compare(data["runs"][args.run], actual, args.tol)
    if problems:
        print(f"FAIL [{args.run}]: {len(problems)} difference(s) from {args.expected.name}:\n  " + "\n  ".join(problems))
        return 1
    print(f"PASS [{args.run}]: {len(actual['cases'])} case(s) match {args.expected.name} "
          f"(masks exact, probabilities within {args.tol}; model {model.get('kind')})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
