"""`glmtrt parity` and `glmtrt demo`: the stage-by-stage report passes on fp32 exports and fails on a mismatch."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from glmtrt.export.parity import ParityCase, format_table, run_parity
from glmtrt.reference import save_preset_checkpoint


@pytest.mark.parametrize("preset", ["tiny-glm-ocr", "tiny-glm-4.1v"])
def test_fp32_export_passes_parity(exported, preset):
    report = run_parity(exported(preset), steps=8)
    assert report["passed"], format_table(report)
    assert [c["name"] for c in report["cases"]] == ["sample image", "two images", "text only"]
    for case in report["cases"]:
        assert case["prefill_logits_max_abs"] <= 1e-4 and case["teacher_forced_max_logit_error"] <= 1e-4
        assert case["teacher_forced_top1"] == 1.0 and case["greedy_identical"]
    assert report["cases"][0]["vision_max_abs"] <= 1e-4
    assert report["cases"][2]["vision_max_abs"] is None  # text only: no vision call


def test_parity_fails_against_other_weights(exported, tmp_path):
    """Same config, other seed: the report must see the difference and fail (the check is not vacuous)."""
    other = save_preset_checkpoint("tiny-glm-ocr", tmp_path / "other-seed", seed=1)
    report = run_parity(exported("tiny-glm-ocr"), model=other, steps=4,
                        cases=[ParityCase("text", "Hello there.")])
    assert not report["passed"]
    assert report["cases"][0]["prefill_logits_max_abs"] > 1e-2


def test_parity_cli_writes_json_and_exit_code(exported, tmp_path, sample_image):
    out = tmp_path / "parity.json"
    proc = subprocess.run([sys.executable, "-m", "glmtrt.runtime.cli", "parity", "--engines", str(exported("tiny-glm-ocr")),
                           "--steps", "4", "--image", sample_image, "--prompt", "Read it.", "--json", str(out)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "| given |" in proc.stdout and "PASSED" in proc.stdout
    report = json.loads(out.read_text())
    assert report["passed"] and report["cases"][0]["greedy_tokens"] == 4


def test_demo_exports_runs_and_checks_parity(tmp_path):
    """The default demo exports the trained OCR model, and the exported model reads the bundled sample line."""
    proc = subprocess.run([sys.executable, "-m", "glmtrt.runtime.cli", "demo", "--engines", str(tmp_path / "demo"),
                           "--max-new-tokens", "20", "--steps", "4"], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    for part in ("== export  glm-ocr-lines", "showing the line 'Invoice 2026-11'", "read    : 'Invoice 2026-11'   (correct)",
                 "timings :", "PASSED"):
        assert part in proc.stdout
    again = subprocess.run([sys.executable, "-m", "glmtrt.runtime.cli", "demo", "--engines", str(tmp_path / "demo"),
                            "--max-new-tokens", "20", "--steps", "4"], capture_output=True, text=True, cwd=tmp_path)
    assert again.returncode == 0 and "reusing the finished export" in again.stdout
