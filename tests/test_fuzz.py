"""A bounded fuzzing harness: run records, checkpoint states, command lines and image bytes built to
break things (Hypothesis). Whatever they hold, the answer is a result or one line naming the
problem: never a traceback, never a file written or removed outside the output asked for, never
memory beyond a bound.

The fast lane runs a fixed, derandomised set of cases of each kind; the slow lane (`-m slow`) runs
many more (200 of each kind), drawn afresh. `BLOODCELL_FUZZ_EXAMPLES` sets the slow lane's number.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import resource
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from bloodcell import runs
from bloodcell.datasets import bloodmnist
from bloodcell.errors import BloodcellError
from bloodcell.images import decode
from bloodcell.inference import network
from bloodcell.runs import RunRecord
from bloodcell.training import checkpoint
from bloodcell.training.recipe import PRESETS, with_overrides
from bloodcell.workflows.pipeline import train_run
from tests.cli import call_cli

FAST = settings(max_examples=12, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
SLOW = settings(
    max_examples=int(os.environ.get("BLOODCELL_FUZZ_EXAMPLES", "200")),
    deadline=None,
    suppress_health_check=list(HealthCheck),
)
LANES = [pytest.param(FAST, id="fast"), pytest.param(SLOW, id="slow", marks=pytest.mark.slow)]
MAX_RSS_MB = 4096  # the whole test process, after every case

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**40), 2**40)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=8,
)


def _key_paths(value, prefix=()):
    """Every path to a value inside nested dicts and lists."""
    yield prefix
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _key_paths(v, (*prefix, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _key_paths(v, (*prefix, i))


@st.composite
def edited(draw, original: dict):
    """`original` with one to three places replaced by arbitrary JSON, or removed."""
    value = copy.deepcopy(original)
    for _ in range(draw(st.integers(1, 3))):
        paths = [p for p in _key_paths(value) if p]
        if not paths:
            break
        path = draw(st.sampled_from(paths))
        parent = value
        for key in path[:-1]:
            parent = parent[key]
        if isinstance(parent, dict) and draw(st.booleans()) and len(path) > 0:
            parent.pop(path[-1], None)
        else:
            parent[path[-1]] = draw(json_values)
    return value


def _rss_ok() -> None:
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 < MAX_RSS_MB


@pytest.mark.parametrize("lane", LANES)
def test_any_run_record_loads_or_is_one_line(lane, synthetic_run):
    original = json.loads((synthetic_run / runs.MODEL_META).read_text())
    weights = runs.read_weights(synthetic_run)

    @lane
    @given(edited(original))
    def case(values):
        try:
            record = RunRecord.from_json(values)
        except BloodcellError as exc:
            assert "\n" not in str(exc)
            return
        if record.image_size <= 128:  # a record that loads must also build (or refuse) and run
            try:
                model = network.build(record, weights)
            except BloodcellError:
                return
            network.logits(
                model, bloodmnist_batch(record.image_size), record.preprocessing.mean, record.preprocessing.std
            )

    case()
    _rss_ok()


def bloodmnist_batch(size: int):
    import torch

    return torch.zeros(2, 3, size, size, dtype=torch.uint8)


@pytest.fixture(scope="module")
def stopped_run(synthetic_file, tmp_path_factory):
    """A run interrupted after one of two epochs, and the data it trains on."""
    run = tmp_path_factory.mktemp("fuzz") / "run"
    dataset = bloodmnist.load_npz(synthetic_file)
    config = with_overrides(PRESETS["fast"], epochs=2, batch_size=32)
    assert train_run(dataset, run, config, progress=False, stop_after_epochs=1) is None
    return run, dataset, config


@pytest.mark.parametrize("lane", LANES)
def test_any_checkpoint_state_resumes_or_is_one_line(lane, stopped_run):
    run, dataset, config = stopped_run
    original = json.loads((run / runs.CHECKPOINT / checkpoint.STATE).read_text())

    @lane
    @given(edited(original))
    def case(values):
        with tempfile.TemporaryDirectory() as tmp:
            copy_ = Path(tmp) / "run"
            shutil.copytree(run, copy_)
            (copy_ / runs.CHECKPOINT / checkpoint.STATE).write_text(json.dumps(values))
            try:  # load, check and restore everything, train nothing (stop after 0 more epochs)
                train_run(dataset, copy_, config, progress=False, resume=True, stop_after_epochs=0)
            except BloodcellError as exc:
                assert "\n" not in str(exc)

    case()
    _rss_ok()


def _digest(folder: Path) -> str:
    hasher = hashlib.sha256()
    for path in sorted(folder.rglob("*")):
        hasher.update(str(path.relative_to(folder)).encode())
        if path.is_file():
            hasher.update(path.read_bytes())
    return hasher.hexdigest()


HOSTILE_VALUES = st.sampled_from(
    ["", "-", "0", "-1", "nan", "inf", "1e308", "999999999999", "x" * 300, "a\nb", "\x1b[2J", "é", "/proc/x",
     "/dev/full", "{foreign}", "{file}", "{run}", "{image}", "{out}/a.csv", "{out}", "cell:4", "cell:1e9", "0.5"]
)  # fmt: skip
OPTIONS = {
    "predict": ["--csv", "--crop", "--top-k", "--min-confidence", "--batch-size", "--workers", "--shard", "--classes"],
    "evaluate": ["--images", "--split", "--crop", "--min-confidence", "--out", "--classes"],
    "explain": ["--out", "--class", "--crop", "--index", "--split"],
    "info": ["--data-file", "--size"],
    "merge": ["--csv"],
    "train": ["--out", "--lr", "--batch-size", "--image-size", "--crop", "--labs", "--lab-share", "--label-smoothing",
              "--model", "--colour", "--seed"],
}  # fmt: skip
FLAGS = ["--json", "--tta", "--overwrite", "--resume", "--no-bloodmnist", "--pretrained"]


@st.composite
def command_lines(draw):
    command = draw(st.sampled_from(sorted(OPTIONS)))
    argv = [command]
    if command in ("predict", "evaluate", "explain"):
        argv.append("{run}")
    if command in ("predict", "explain"):
        argv.append(draw(st.sampled_from(["{image}", "{images}", "{foreign}", "{file}", "{run}"])))
    if command == "merge":
        argv.append(draw(st.sampled_from(["{file}", "{image}", "{run}/model.json", "{run}/metrics.json"])))
    if command == "train":
        argv += ["--data-file", "{data}", "--epochs", "1", "--out", draw(st.sampled_from(["{out}/run", "{foreign}"]))]
    for option in draw(st.lists(st.sampled_from(OPTIONS[command]), max_size=3, unique=True)):
        argv += [option, draw(HOSTILE_VALUES)]
    argv += draw(st.lists(st.sampled_from(FLAGS), max_size=2, unique=True))
    return argv


@pytest.mark.parametrize("lane", LANES)
def test_any_command_line_gives_results_or_one_line(
    lane, synthetic_run, synthetic_file, cell_images, tmp_path, monkeypatch
):
    foreign = tmp_path / "thesis"
    foreign.mkdir()
    (foreign / "chapter1.tex").write_text("precious")
    (foreign / "figure.png").write_bytes(b"mine")
    a_file = tmp_path / "notes.txt"
    a_file.write_text("x")
    sandbox = tmp_path / "sandbox"
    workdir = tmp_path / "cwd"  # where outputs with default names (./explain, ./study) land
    workdir.mkdir()
    monkeypatch.chdir(workdir)
    before = {foreign: _digest(foreign), a_file: a_file.read_text()}

    @lane
    @given(command_lines())
    def case(argv):
        shutil.rmtree(sandbox, ignore_errors=True)
        (sandbox / "out").mkdir(parents=True)
        for leftover in workdir.iterdir():  # the folder stays: it is this process's working directory
            if leftover.is_dir():
                shutil.rmtree(leftover)
            else:
                leftover.unlink()
        run = sandbox / "run"
        shutil.copytree(synthetic_run, run)
        values = {
            "run": run, "image": cell_images[0], "images": cell_images[0].parent, "foreign": foreign, "file": a_file,
            "out": sandbox / "out", "data": synthetic_file,
        }  # fmt: skip
        args = [a.format(**{k: str(v) for k, v in values.items()}) for a in argv]
        result = call_cli(*args, check=False)
        assert result.returncode in (0, 1, 2, 3, 4), (args, result.returncode)
        assert "Traceback" not in result.stderr, (args, result.stderr[-2000:])
        if result.returncode == 1:
            assert len([line for line in result.stderr.splitlines() if "error:" in line]) == 1, (args, result.stderr)
        assert _digest(foreign) == before[foreign] and a_file.read_text() == before[a_file], args
        written = {p for p in tmp_path.rglob("*") if not any(p.is_relative_to(d) for d in (sandbox, foreign, workdir))}
        assert written <= {a_file}, (args, written)

    old = Path.cwd()
    os.chdir(workdir)
    try:
        case()
    finally:
        os.chdir(old)
    _rss_ok()


def _png(rng) -> bytes:
    import io

    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


@st.composite
def hostile_images(draw):
    """Bytes that look like an image for a while: a real PNG or JPEG truncated, with bytes flipped,
    its declared size changed, or bytes of nothing at all."""
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    content = bytearray(_png(rng))
    kind = draw(st.sampled_from(["truncate", "flip", "huge", "random", "jpeg"]))
    if kind == "truncate":
        content = content[: draw(st.integers(0, len(content)))]
    elif kind == "flip":
        for _ in range(draw(st.integers(1, 20))):
            content[draw(st.integers(0, len(content) - 1))] = draw(st.integers(0, 255))
    elif kind == "huge":  # the IHDR width and height: 65535 x 65535 declared
        content[16:24] = (65535).to_bytes(4, "big") * 2
    elif kind == "random":
        content = bytearray(draw(st.binary(max_size=2000)))
    else:
        content = bytearray(b"\xff\xd8\xff\xe0" + draw(st.binary(max_size=500)))
    return bytes(content)


@pytest.mark.parametrize("lane", LANES)
def test_any_bytes_decode_or_are_one_reason(lane, synthetic_run):
    from bloodcell.inference.classifier import Classifier

    classifier = Classifier.from_run(synthetic_run)

    @lane
    @given(hostile_images())
    def case(content):
        try:
            decode.open_image(content)
        except decode.ImageError as exc:
            assert "\n" not in str(exc)
        (record,) = classifier.predict_uploads([("x.png", content)])
        assert (record["error"] is None) == (record["class"] is not None)

    case()
    _rss_ok()
