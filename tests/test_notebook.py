"""examples/lecture.ipynb runs top to bottom (nbclient, a local kernel, no network) and
shows what it says it shows: figures, the runs' and the diagnosis' HTML."""

import re
import warnings
from pathlib import Path

import pytest

NOTEBOOK = Path(__file__).resolve().parent.parent / "examples" / "lecture.ipynb"


@pytest.mark.slow
def test_the_lecture_notebook_runs(tmp_path):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    for _ in range(2):  # Restart & Run All, twice: the notebook's runs start afresh
        nb = nbformat.read(NOTEBOOK, as_version=4)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # jupyter_client's own
            client = nbclient.NotebookClient(
                nb,
                timeout=600,
                kernel_name="python3",
                resources={"metadata": {"path": str(tmp_path)}},
            )
            client.execute()  # raises CellExecutionError on any cell's error
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    pngs = [o for o in outputs if "image/png" in o.get("data", {})]
    htmls = [o["data"]["text/html"] for o in outputs if "text/html" in o.get("data", {})]
    assert len(pngs) >= 6  # the four lecture figures, the original's activations, histograms
    assert any("plumb run nb-original" in h for h in htmls)
    doctor = next(h for h in htmls if "plumb doctor" in h)
    assert "overconfident-init" in doctor and "saturated-activations" in doctor
    text = "".join(o.get("text", "") for o in outputs if o.get("output_type") == "stream")
    assert re.search(r"original: initial loss 2\d\.", text) and "kaiming: initial loss 3.3" in text
    assert (tmp_path / "runs" / "notebook" / "nb-deep" / "report.html").is_file()
    # BatchNorm's point, shown: one example in two batches moves in training mode only
    moved = dict(
        re.findall(r"(train|eval) mode: the same example's logits .* by up to ([\d.]+)", text)
    )
    assert float(moved["train"]) > 1e-3 and float(moved["eval"]) == 0.0, moved
    # the figures "after training" are of the last histogram step, 90% through, not step 0
    from plumb.record import load_run
    from plumb.report.figures import hist_step, nonlinear_layers

    rec = load_run(tmp_path / "runs" / "notebook" / "nb-kaiming")
    assert hist_step(rec, "layer", nonlinear_layers(rec)) == 270
    _exported_page_renders(nb, tmp_path)


def _exported_page_renders(nb, tmp_path: Path) -> None:
    """The executed notebook exported to HTML (nbconvert, the self-contained "basic"
    template: no CDN scripts) opens in headless Chromium without a console error, its
    figures decoded and the page not blank."""
    nbconvert = pytest.importorskip("nbconvert")
    import io

    import numpy as np
    from browser import Browser, chromium
    from PIL import Image

    if chromium() is None:
        pytest.skip("chromium not installed")
    body, _ = nbconvert.HTMLExporter(template_name="basic").from_notebook_node(nb)
    page = tmp_path / "lecture.html"
    page.write_text(
        f"<!DOCTYPE html><html><head><meta charset='utf-8'></head><body>{body}</body></html>"
    )
    browser = Browser()
    try:
        session = browser.open(page)
        info = browser.images(session)
        shot = np.asarray(Image.open(io.BytesIO(browser.screenshot(session))).convert("L"))
        problems = browser.problems()
    finally:
        browser.close()
    assert problems == []
    assert len(info) >= 6 and all(c and w > 100 for c, w in info)
    assert 0.001 < (shot < 128).mean() < 0.5 and len(np.unique(shot)) > 10
