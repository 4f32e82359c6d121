"""`dreamlip demo` end to end at a small setting, on the base install (no extras, see base_install.py):
results.json and a report with a table and images."""

import base64
import io
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import run_cli

BASE_INSTALL = Path(__file__).with_name("base_install.py")


@pytest.mark.slow
def test_demo_end_to_end(tmp_path):
    out = tmp_path / "demo"
    done = subprocess.run(
        [sys.executable, str(BASE_INSTALL), "-m", "dreamlip.cli", "demo", "--out", str(out), "--n-train", "160",
         "--n-test", "24", "--steps", "6", "--batch-size", "32", "--k", "3", "--heatmap-images", "2"],
        capture_output=True, text=True,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    for stage in ("1/4", "2/4", "3/4", "4/4"):
        assert f"== {stage}" in done.stdout  # progress is visible throughout
    assert f"dreamlip serve --checkpoint {out / 'runs' / 'dreamlip' / 'model.pt'} --compare {out / 'runs' / 'clip' / 'model.pt'}" in done.stdout

    results = json.loads((out / "results.json").read_text())
    assert set(results["models"]) == {"clip", "dreamlip"}
    # The reported numbers are the saved models': `dreamlip eval` on each model.pt gives them again.
    for name, metrics in results["models"].items():
        evaluated = tmp_path / f"{name}.json"
        assert run_cli("eval", "--checkpoint", out / "runs" / name / "model.pt", "--data", out / "data",
                       "--tasks", "retrieval,zeroshot", "--workers", "0", "--quiet", "--out", evaluated) == 0
        again = json.loads(evaluated.read_text())["metrics"]
        for key in ("retrieval/image_to_text_R@1", "retrieval/text_to_image_R@1", "zeroshot/top1"):
            assert metrics[key] == pytest.approx(again[key]), (name, key)
    assert results["training"]["clip"]["steps"] == results["training"]["dreamlip"]["steps"] == 6

    page = (out / "report.html").read_text()
    table = re.search(r'<table id="results">(.*?)</table>', page, re.S).group(1)
    assert table.count("<tr>") > 5 and "retrieval/image_to_text_R@1" in table
    for image_id in ("loss-curves", "grouping-heatmaps"):
        encoded = re.search(rf'id="{image_id}"[^>]*src="data:image/png;base64,([^"]+)"', page).group(1)
        picture = Image.open(io.BytesIO(base64.b64decode(encoded)))
        assert picture.width > 200 and picture.height > 100
        assert len(np.unique(np.asarray(picture.convert("L")))) > 10, f"{image_id} is blank"
