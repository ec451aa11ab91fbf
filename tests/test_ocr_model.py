"""The shipped small GLM-OCR checkpoint (reference/models/glm-ocr-lines) really reads, its export reads exactly
like it, the plans keep its accuracy, and the synthetic data and trainer are deterministic and runnable."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from glmtrt.reference.config import builtin_model_dir
from glmtrt.reference.ocr_data import HELDOUT_SEED, MAX_CHARS, MIN_CHARS, TRAIN_STREAM, heldout_lines, line_rng, make_line

MODEL = "glm-ocr-lines"
LINES = 30  # the CI slice of the 200 held-out lines
CER_BOUND = 0.05


def _same_line(a, b) -> bool:
    return a[1] == b[1] and a[0].size == b[0].size and np.array_equal(np.asarray(a[0]), np.asarray(b[0]))


def test_make_line_is_deterministic_per_seed():
    for index in range(5):
        first = make_line(np.random.default_rng(index))
        again = make_line(np.random.default_rng(index))
        assert _same_line(first, again)
        assert first[0].mode == "RGB" and MIN_CHARS <= len(first[1]) <= MAX_CHARS
    assert not _same_line(make_line(np.random.default_rng(0)), make_line(np.random.default_rng(1)))


def test_heldout_lines_are_a_fixed_prefix_stable_set_apart_from_training():
    short, long = heldout_lines(5), heldout_lines(8)
    assert all(_same_line(a, b) for a, b in zip(short, long))
    train = make_line(line_rng(TRAIN_STREAM, HELDOUT_SEED, 0))
    assert not _same_line(train, short[0])


def test_score_counts_edits_per_character():
    from glmtrt.reference.eval_ocr import levenshtein, score

    assert levenshtein("kitten", "sitting") == 3 and levenshtein("", "abc") == 3 and levenshtein("abc", "abc") == 0
    result = score(["abc", "xyz", ""], ["abc", "xbz", "hi"])
    assert result["edits"] == 3 and result["chars"] == 8 and result["cer"] == 3 / 8
    assert result["exact_match"] == pytest.approx(1 / 3) and [e["index"] for e in result["errors"]] == [1, 2]


@pytest.fixture(scope="module")
def reference_result():
    from glmtrt.reference.eval_ocr import evaluate_reference

    folder = builtin_model_dir(MODEL)
    assert folder is not None, "the trained checkpoint reference/models/glm-ocr-lines is missing"
    return evaluate_reference(MODEL, n=LINES)


def test_shipped_checkpoint_is_a_complete_hf_folder():
    folder = builtin_model_dir(MODEL)
    for name in ("config.json", "model.safetensors", "tokenizer.json", "preprocessor_config.json",
                 "generation_config.json"):
        assert (folder / name).is_file(), f"{name} missing from {folder}"
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "glm_ocr" and config["architectures"] == ["GlmOcrForConditionalGeneration"]


def test_shipped_checkpoint_reads_heldout_lines(reference_result):
    print(f"reference CER {reference_result['cer']:.4f}, exact {reference_result['exact_match']:.3f} on {LINES} lines")
    assert reference_result["lines"] == LINES
    assert reference_result["cer"] <= CER_BOUND, reference_result["errors"][:5]


def test_fp32_export_reads_exactly_like_the_reference(exported, reference_result):
    from glmtrt.reference.eval_ocr import evaluate_engines

    engines = evaluate_engines(exported(MODEL), n=LINES, threads=1)
    assert engines["edits"] == reference_result["edits"]
    assert engines["errors"] == reference_result["errors"]  # same misreadings, line by line


def test_eval_ocr_cli(exported):
    folder = str(exported(MODEL))
    proc = subprocess.run([sys.executable, "-m", "glmtrt.runtime.cli", "eval-ocr", "--model", MODEL, "--engines", folder,
                           "--n", "4", "--json"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(proc.stdout)
    assert set(rows) == {f"reference {MODEL}", f"engines {folder}"}
    assert rows[f"engines {folder}"]["lines_differing_from_reference"] == 0
    assert all(r["lines"] == 4 and 0.0 <= r["cer"] <= 1.0 for r in rows.values())
    proc = subprocess.run([sys.executable, "-m", "glmtrt.runtime.cli", "eval-ocr"], capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "--model" in proc.stderr


def test_trainer_writes_a_loadable_checkpoint(tmp_path):
    """Two steps of the real trainer (tiny batch): the folder is an HF checkpoint the reference loads."""
    from glmtrt.reference import load_reference
    from glmtrt.reference.train_ocr import train

    out = train(tmp_path / "ckpt", minutes=5, steps=2, batch_size=2, eval_every=0, data_workers=0, threads=1,
                log_every=1, save_every=0)
    info = json.loads((out / "training_info.json").read_text())
    assert info["steps"] == 2 and info["stopped_by"] == "step budget"
    model = load_reference(out)
    assert model.config.model_type == "glm_ocr" and sum(p.numel() for p in model.parameters()) == info["parameters"]


# Issue 5's gates on the trained model: teacher-forced top-1 against the fp32 reference over 30 held-out lines (up to
# each line's EOS: >= 256 steps in all) and the character error rate on all 200 held-out lines within 0.5 points of
# the fp32 reference's (on a 30-line slice one misread character is already 0.35 points).
# precision -> (teacher-forced top-1 >=, CER gap to fp32 in points <=). fp16 / int8: issue 5's gates; cpu-int8: issue 6's
# gate for the best CPU plan. cpu-int4 has no gate: its bounds are the measured values (97.5 %, +1.10 points) with margin.
PLAN_GATES = {"fp16": (0.99, 0.5), "int8": (0.97, 0.5), "cpu-int8": (0.98, 0.5), "cpu-int4": (0.96, 1.6)}


@pytest.mark.parametrize("precision", list(PLAN_GATES))
def test_plans_of_the_trained_model_keep_its_accuracy(exported, tmp_path_factory, precision):
    from glmtrt.export.accuracy import MIN_STEPS, run_accuracy
    from glmtrt.export.plans import derive_plan

    folder = derive_plan(exported(MODEL), tmp_path_factory.mktemp("ocr-plans") / precision, precision).folder
    report = run_accuracy(folder, threads=1, ocr_lines=200)  # the CER gate on the whole held-out set
    s, ocr = report["summary"], report["ocr"]
    print(precision, json.dumps({k: s[k] for k in ("vision_cosine_min", "teacher_forced_steps", "teacher_forced_top1",
                                                    "teacher_forced_mean_kl")}), json.dumps(ocr))
    assert s["teacher_forced_steps"] >= MIN_STEPS and len(report["cases"]) == LINES
    top1, cer_gap = PLAN_GATES[precision]
    assert s["teacher_forced_top1"] >= top1
    assert ocr["lines"] == 200 and ocr["cer_delta_points"] <= cer_gap
