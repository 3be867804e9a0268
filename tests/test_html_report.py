"""`lenscache report`: the page opened in a real browser (Debian's chromium, headless, driven by
Playwright) renders every figure with no console or page error and no network request; its figures
hold the numbers `evaluate`, `prediction_depth`, `trajectory_from_store` and the basis give; hostile
text stays text; bad input is refused with nothing written; the report appears whole or not at all.

Chromium comes from `tools/install-test-deps` (apt-get); Playwright's own browser download is never used.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from playwright.sync_api import sync_playwright
from plotly.offline import get_plotlyjs

import lenscache.analysis.html_report as html_report
from lenscache.analysis.depth import prediction_depth
from lenscache.analysis.evaluate import evaluate
from lenscache.analysis.trajectory import trajectory_from_store
from lenscache.cache.build import BuildConfig, build_store
from lenscache.cache.model import ModelSpec
from lenscache.cache.text import DataSpec
from lenscache.fit.affine import fit_affine
from lenscache.fit.cbe import fit_cbe
from lenscache.fit.lens import Lens
from lenscache.fit.stream import StreamSpec
from lenscache.reader import open_store
from lenscache.tools.cli import cli, main
from lenscache.tools.report_cli import report

REPO = Path(__file__).resolve().parents[1]
SEQ, N_SEQ = 16, 12
HOSTILE = "A <img src=x onerror=\"document.title='pwned'\"> & </script><script>window.pwned=1</script> \"q\" 's' $x$"
LENS_NAME = "<b>x</b>&'q\""  # a lens name is the user's text too
SEQS = [0, 1, 11]
FIGURES = ["fig-metrics", "fig-depth", *(f"fig-trajectory-{i}" for i in range(len(SEQS))), "fig-cbe"]


@pytest.fixture(scope="module", autouse=True)
def registered():
    """The command in the main CLI (as tools/cli.py registers it), so errors come out as `main` prints them."""
    added = "report" not in cli.commands
    if added:
        cli.add_command(report)
    yield
    if added:
        del cli.commands["report"]


def run_main(argv: list[str], capsys) -> tuple[int, str]:
    try:
        main(argv)
        code = 0
    except SystemExit as exc:
        code = exc.code
    out = capsys.readouterr()
    return code, out.out + out.err


@pytest.fixture(scope="module")
def world(tmp_path_factory, llama_dir) -> dict:
    """A store whose first sequence holds hostile text, one of boundaries 0 and 3 only, an affine lens,
    a lens and a basis of 'another model', a lens of boundaries 1, 2, a basis, and the report of them."""
    from tiny_models import TRAIN_TEXT

    root = tmp_path_factory.mktemp("html_report")
    corpus = root / "corpus.txt"
    corpus.write_text("\n\n".join([HOSTILE, *TRAIN_TEXT * 6]), encoding="utf-8")
    common = dict(model=ModelSpec(str(llama_dir)), data=DataSpec(str(corpus)), seq_len=SEQ, max_tokens=SEQ * N_SEQ,
                  seqs_per_chunk=4, progress=False)  # fmt: skip
    build_store(BuildConfig(out=str(root / "s.zarr"), **common))
    build_store(BuildConfig(out=str(root / "ends.zarr"), layers=[0, 3], **common))
    store = open_store(root / "s.zarr")
    lens = fit_affine(store, progress=False)
    lens.save(root / "affine")
    other = Lens.identity(store, [0, 1, 2], kind="affine")
    other.config.model = {**other.config.model, "weights_hash": "blake2b:" + "0" * 64, "id": "another-model"}
    other.save(root / "other")
    Lens.identity(store, [1, 2], kind="affine").save(root / "middle")
    basis = fit_cbe(store, lens, [1, 2], k=2, spec=StreamSpec(batch_tokens=64), steps=5, progress=False,
                    out=root / "basis")  # fmt: skip
    cfg = json.loads((root / "basis" / "basis.json").read_text())
    shutil.copytree(root / "basis", root / "basis-other")
    cfg["model"] = {**cfg["model"], "weights_hash": "blake2b:" + "0" * 64}
    (root / "basis-other" / "basis.json").write_text(json.dumps(cfg))
    shutil.copytree(root / "basis", root / "basis-torn")
    with open(root / "basis-torn" / "basis.safetensors", "r+b") as fh:
        fh.seek(-8, os.SEEK_END)
        fh.write(b"\x00" * 8)
    argv = ["report", str(root / "s.zarr"), "--lens", f"affine={root / 'affine'}", "--lens",
            f"{LENS_NAME}={root / 'affine'}", "--basis", str(root / "basis"), "--seqs", ",".join(map(str, SEQS)),
            "--out", str(root / "report"), "--no-progress"]  # fmt: skip
    return {"root": root, "store": store, "lens": lens, "basis": basis, "argv": argv}


@pytest.fixture(scope="module")
def made(world) -> Path:
    main_out = world["root"] / "report"
    code = 0
    try:
        main(world["argv"])
    except SystemExit as exc:
        code = exc.code
    assert code == 0
    return main_out


@pytest.fixture(scope="module")
def browser():
    chromium = shutil.which("chromium")
    assert chromium, "Debian's chromium is missing: run `bash tools/install-test-deps` (it apt-installs it)"
    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=chromium, args=["--no-sandbox", "--disable-gpu"])
        yield b
        b.close()


@pytest.fixture(scope="module")
def page(browser, made):
    """The report opened from disk, with every console message, page error and request recorded."""
    pg = browser.new_page(viewport={"width": 1400, "height": 900})
    seen = {"console": [], "errors": [], "requests": []}
    pg.on("console", lambda m: seen["console"].append((m.type, m.text)))
    pg.on("pageerror", lambda e: seen["errors"].append(str(e)))
    pg.on("request", lambda r: seen["requests"].append(r.url))
    pg.goto((made / "index.html").as_uri(), wait_until="load")
    pg.wait_for_function(
        f"document.querySelectorAll('.js-plotly-plot .main-svg').length >= {len(FIGURES)}", timeout=60_000
    )
    yield pg, seen
    pg.close()


def figure(pg, div_id: str) -> dict:
    """A figure's data and layout as plotly holds them in the page (after rendering)."""
    return pg.evaluate(f"(() => {{ const d = document.getElementById('{div_id}'); "
                       "return {data: d.data, layout: d.layout}; })()")  # fmt: skip


# ---- the page in the browser ----------------------------------------------------------------------------
def test_every_figure_renders_with_no_console_error_and_no_network(page, made):
    pg, seen = page
    assert seen["errors"] == []
    assert [m for m in seen["console"] if m[0] in ("error", "warning")] == []
    rendered = pg.evaluate(
        "[...document.querySelectorAll('.js-plotly-plot')].map(d => [d.id, d.querySelectorAll('.main-svg').length])"
    )
    assert [r[0] for r in rendered] == FIGURES
    assert all(n >= 1 for _, n in rendered), rendered
    # the marks themselves, drawn by plotly.js: heatmap images, bars, lines
    for i in range(len(SEQS)):
        assert pg.locator(f"#fig-trajectory-{i} .heatmaplayer image").count() == 3  # a panel per lens
        assert pg.locator(f"#fig-trajectory-{i} .heatmaplayer text").count() > 0  # the top-1 labels
    assert pg.locator("#fig-metrics .scatterlayer .trace").count() >= 3 * 4
    assert pg.locator("#fig-depth .barlayer .point").count() == 3 * 4  # 3 lenses × boundaries 0..3
    assert pg.locator("#fig-cbe .barlayer .point").count() == 2 * 2  # 2 layers × k = 2
    assert all(url.startswith("file://") for url in seen["requests"]), seen["requests"]
    assert seen["requests"] == [(made / "index.html").as_uri()]
    text = (made / "index.html").read_text()
    assert text.count(get_plotlyjs()) == 1  # the library inlined once, in the page itself
    ours = text.replace(get_plotlyjs(), "").lower()  # the page without the library's own source
    assert "<script src" not in ours and "<link" not in ours and "http" not in ours


def test_a_screenshot_is_not_blank(page, tmp_path):
    import matplotlib.image

    pg, _ = page
    png = pg.screenshot(full_page=True)
    pixels = matplotlib.image.imread(io.BytesIO(png), format="png")[..., :3]
    assert pixels.shape[0] > 2000  # the whole page: every section
    non_white = (pixels < 0.95).any(-1).mean()
    assert non_white > 0.05 and pixels.std() > 0.05, (non_white, pixels.std())
    # the trajectory heatmap alone is coloured, not blank
    shot = pg.locator("#fig-trajectory-0").screenshot()
    cells = matplotlib.image.imread(io.BytesIO(shot), format="png")[..., :3]
    colour = cells.max(-1) - cells.min(-1)  # saturated pixels: the colour scale, not grey text
    assert (colour > 0.3).mean() > 0.05


def test_the_figures_hold_what_the_analyses_compute(page, world):
    pg, _ = page
    store, lens, basis = world["store"], world["lens"], world["basis"]
    lenses = {"logit": None, "affine": lens, LENS_NAME: lens}
    ev = evaluate(store, {"affine": lens}, layers=[0, 1, 2], split="held_out", progress=False)
    metrics = figure(pg, "fig-metrics")["data"]
    kl = {t["name"]: t["y"] for t in metrics[: len(lenses)]}
    for name in ("logit", "affine"):
        np.testing.assert_allclose(kl[name], [ev.lenses[name][b]["kl"] for b in ev.layers], rtol=1e-9)
    assert kl[LENS_NAME.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")] == kl["affine"]

    depth = prediction_depth(store, lenses, world["root"] / "d.parquet", layers=[0, 1, 2], split="held_out",
                             progress=False)  # fmt: skip
    bars = [t for t in figure(pg, "fig-depth")["data"] if t["type"] == "bar"]
    assert [t["name"] for t in bars][:2] == ["logit", "affine"]
    for t, (name, s) in zip(bars, depth.lenses.items(), strict=True):
        assert t["y"] == [s["fraction"][str(b)] for b in depth.layers], name

    for i, seq in enumerate(SEQS):
        traj = trajectory_from_store(store, seq, lenses, range(0, SEQ), [0, 1, 2])
        data = figure(pg, f"fig-trajectory-{i}")["data"]
        for trace, name in zip(data, lenses, strict=True):
            np.testing.assert_allclose(
                np.array(trace["z"], dtype=float), traj.stats[name]["entropy"], atol=1e-5
            )
            assert trace["text"][1][2] == html_report.token_label(traj.top1_texts[name][1][2])

    cbe = figure(pg, "fig-cbe")["data"]
    for i, trace in enumerate(cbe):
        np.testing.assert_allclose(trace["y"], basis.energies[i].numpy())
        np.testing.assert_allclose(trace["error_y"]["array"], basis.stderr[i].numpy())


def test_hovering_a_cell_shows_its_layer_position_token_and_probability(page, world):
    pg, _ = page
    store, lens = world["store"], world["lens"]
    traj = trajectory_from_store(
        store, 0, {"logit": None, "affine": lens, LENS_NAME: lens}, range(0, SEQ), [0, 1, 2]
    )
    area = pg.locator("#fig-trajectory-0 .nsewdrag").first  # the first panel's plot area: the logit lens
    area.scroll_into_view_if_needed()
    box = area.bounding_box()
    n_l, r, c = len(traj.layers), 2, 5  # layer boundary 2, position 5
    pg.mouse.move(box["x"] + box["width"] * (c + 0.5) / SEQ, box["y"] + box["height"] * (1 - (r + 0.5) / n_l))
    hover = pg.locator("#fig-trajectory-0 .hoverlayer .hovertext")
    hover.wait_for(timeout=10_000)
    shown = hover.text_content()
    assert f"layer 2, position {c}" in shown
    assert f"top-1 {traj.top1_texts['logit'][r][c]!r}" in shown
    assert f"p {traj.stats['logit']['p_top1'][r, c]:.3f}" in shown
    assert f"input {traj.token_texts[c]!r}" in shown and "logit lens" in shown


def test_the_menu_recolours_the_heatmaps_by_another_statistic(page):
    pg, _ = page
    pg.locator("#fig-trajectory-1 .updatemenu-header-group").click()
    pg.locator("#fig-trajectory-1 .updatemenu-item-text", has_text="KL(final").click()
    pg.wait_for_function("document.getElementById('fig-trajectory-1').layout.coloraxis.colorbar.title.text"
                         ".startsWith('KL')")  # fmt: skip
    assert "KL" in pg.locator("#fig-trajectory-1 .colorbar .cbtitle").text_content()


def test_hostile_text_is_shown_as_text_and_never_runs(page, made):
    pg, seen = page
    assert pg.title() == "lenscache report: s.zarr"
    assert pg.evaluate("window.pwned") is None
    assert pg.locator("img").count() == 0 and pg.locator("body b").count() == 0
    shown = pg.locator(".seq-text").first.text_content()
    assert shown.startswith("<s>A <img src=x oner")  # the first 16 tokens, as written
    legend = pg.locator("#fig-metrics .legendtext").all_text_contents()
    assert LENS_NAME in legend  # plotly shows the name as written, not as markup
    assert LENS_NAME in pg.locator("table").nth(1).text_content()  # the lenses table
    raw = (made / "index.html").read_text()
    assert "<img src=x" not in raw and "<b>x</b>" not in raw and "window.pwned=1</script>" not in raw


def test_report_json_holds_the_provenance_and_the_numbers(made, world):
    data = json.loads((made / "report.json").read_text())
    meta = world["store"].meta
    assert data["provenance"]["model"]["weights_hash"] == meta.model["weights_hash"]
    assert data["provenance"]["data"]["fingerprint"] == meta.data["fingerprint"]
    assert list(data["lenses"]) == ["logit", "affine", LENS_NAME]
    assert [t["seq"] for t in data["trajectories"]] == SEQS
    assert data["basis"]["report_lens"] == "affine" and data["basis"]["layers"] == [1, 2]
    page = (made / "index.html").read_text()
    assert meta.model["weights_hash"] in page and meta.data["fingerprint"] in page


# ---- bad input, and writing whole or not at all ---------------------------------------------------------
BAD = [
    (["--seqs", "99"], "sequence 99"),
    (["--seqs", "0,-1"], "sequence -1"),
    (["--seqs", "a"], "--seqs"),
    (["--lens", "other={root}/other"], "weights"),
    (["--store", "{root}/ends.zarr", "--lens", "middle={root}/middle"], "none of which"),
    (["--layers", "1,7"], "[7]"),
    (["--positions", "10:99"], "outside"),
    (["--basis", "{root}/nothing"], "not a basis directory"),
    (["--basis", "{root}/basis-torn"], "SHA-256"),
    (["--basis", "{root}/basis-other"], "weights"),
    (["--max-tokens", "0"], "--max-tokens"),
]


@pytest.mark.parametrize("args,words", BAD)
def test_bad_input_is_refused_with_nothing_written(world, tmp_path, capsys, args, words):
    root = world["root"]
    args = [a.format(root=root) for a in args]
    store = str(root / "s.zarr")
    if "--store" in args:
        i = args.index("--store")
        store = args[i + 1]
        del args[i : i + 2]
    out = tmp_path / "out"
    code, shown = run_main(["report", store, *args, "--out", str(out), "--no-progress"], capsys)
    assert code != 0
    assert words in shown, shown
    assert "Traceback" not in shown
    assert list(tmp_path.iterdir()) == []


def test_an_existing_out_is_kept_unless_overwrite_and_only_a_report_is_replaced(world, tmp_path, capsys):
    root = world["root"]
    base = ["report", str(root / "s.zarr"), "--seqs", "0", "--no-progress", "--max-tokens", "16"]
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "keep.txt").write_text("mine")
    code, shown = run_main([*base, "--out", str(mine)], capsys)
    assert code != 0 and "--overwrite" in shown
    code, shown = run_main([*base, "--out", str(mine), "--overwrite"], capsys)
    assert code != 0 and "holds no lenscache report" in shown
    assert [p.name for p in mine.iterdir()] == ["keep.txt"]

    out = tmp_path / "report"
    assert run_main([*base, "--out", str(out)], capsys)[0] == 0
    (out / "index.html").write_text("old")
    code, shown = run_main([*base, "--out", str(out)], capsys)
    assert code != 0 and "already exists" in shown and (out / "index.html").read_text() == "old"
    assert run_main([*base, "--out", str(out), "--overwrite"], capsys)[0] == 0
    assert (out / "index.html").read_text().startswith("<!DOCTYPE html>")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine", "report"]  # no hidden work directories


def test_a_run_that_fails_while_writing_leaves_the_old_report(world, tmp_path, capsys, monkeypatch):
    root = world["root"]
    base = ["report", str(root / "s.zarr"), "--seqs", "0", "--no-progress", "--max-tokens", "16"]
    out = tmp_path / "report"
    assert run_main([*base, "--out", str(out)], capsys)[0] == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def broken(content, stat="entropy"):
        raise OSError("No space left on device")

    monkeypatch.setattr(html_report, "render_html", broken)  # fails after report.json is written
    code, shown = run_main([*base[:2], "--seqs", "1", *base[4:], "--out", str(out), "--overwrite"], capsys)
    assert code != 0 and "No space left" in shown
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["report"]


def test_the_positions_window_the_trajectories(world, tmp_path, capsys):
    root = world["root"]
    out = tmp_path / "r"
    code, shown = run_main(["report", str(root / "s.zarr"), "--seqs", "2", "--positions", "4:9", "--max-tokens", "16",
                            "--out", str(out), "--no-progress"], capsys)  # fmt: skip
    assert code == 0, shown
    data = json.loads((out / "report.json").read_text())
    assert data["trajectories"] == [{**data["trajectories"][0], "seq": 2, "positions": [4, 9]}]
    assert "sequence 2, positions 4–8" in (out / "index.html").read_text()


# ---- what a new machine needs ---------------------------------------------------------------------------
def test_ci_installs_chromium_through_the_readmes_install_script():
    script = REPO / "tools" / "install-test-deps"
    assert os.access(script, os.X_OK)
    text = script.read_text()
    assert "command -v chromium" in text and "apt-get install -y" in text and "chromium" in text
    assert "playwright install" not in text.replace("`playwright install`", "")  # never downloads a browser
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    ci = (REPO / ".ci" / "run").read_text()
    assert "bash tools/install-test-deps" in ci and ci.rstrip().endswith("python -m pytest -q")


def test_the_page_is_plain_utf8_with_the_library_inlined_once(made):
    raw = (made / "index.html").read_bytes()
    raw.decode("utf-8")
    assert raw.count(b"Plotly.newPlot(") == len(FIGURES)
    assert len(raw) < 8 * 2**20  # plotly.js is ~4.6 MB; the data adds little here
