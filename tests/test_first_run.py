"""A new user's first run (issue 20, item 5): `make demo` ends with a plain conclusion, its printed
`gdc` commands run as printed, it writes nothing that git tracks, and the Makefile's demo path
installs only what the demo needs."""
import os
import re
import shlex
import shutil
import subprocess

import numpy as np
import pytest

from examples import demo

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """The demo at its smallest configuration (--quick), run in a fresh folder with its default
    output paths: (folder, printed text, returned dict)."""
    folder = tmp_path_factory.mktemp("first_run")
    cwd = os.getcwd()
    os.chdir(folder)
    try:
        import contextlib
        import io

        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            result = demo.main(["--quick"])
    finally:
        os.chdir(cwd)
    return folder, buf.getvalue(), result


def _auroc_table(text):
    """{(score, what): AUROC} from the printed detection table."""
    lines = text[text.index("detection of the canaries"):].splitlines()[2:]
    rows = {}
    for line in lines:
        m = re.match(r"(\w+)\s+(.+?)\s+([01]\.\d{3})\s+\d+%$", line)
        if not m:
            break
        rows[(m.group(1), m.group(2))] = float(m.group(3))
    return rows


def test_conclusion_names_the_best_score_of_its_table(quick_run):
    _, text, result = quick_run
    table = _auroc_table(text)
    assert {by for by, _ in table} == {"memorization", "loss", "gain", "last", "excess", "random"}
    concl = text[text.index("Conclusion:"):]
    assert result["conclusion"] in text
    m = re.search(r'the score that best found the memorized samples \(the canaries\) is "(\w+)"'
                  r'(?: with the (\w+) reference)? \(AUROC ([01]\.\d{3})', concl)
    assert m, concl
    best, ref, auroc = m.group(1), m.group(2), float(m.group(3))
    named = [v for (by, what), v in table.items() if by == best and (ref is None or what.startswith(ref))]
    assert named and auroc in named
    assert auroc == max(v for (by, _), v in table.items() if by != "random")
    # the default score is named with its own AUROC (unless it is the best)
    default = demo.DEFAULT_SCORE
    d_auroc = next(v for (by, _), v in table.items() if by == default)
    assert f'"{default}"' in concl
    if best != default:
        assert f"reaches AUROC {d_auroc:.3f}" in concl
    # what the interventions did, against plain training, with the numbers of the table above it
    assert "Interventions vs plain training" in concl
    assert f"{result['after']['val_ppl']:.3f} vs {result['plain']['val_ppl']:.3f}" in concl
    assert f"{result['after']['canary_nll']:.3f} vs {result['plain']['canary_nll']:.3f}" in concl


def test_printed_hints_run_as_printed(quick_run):
    folder, text, result = quick_run
    hints = result["hints"]
    assert len(hints) == 3
    for h in hints:
        assert f"  {h}\n" in text
        assert not h.startswith("gdc ")  # `gdc` alone is only on PATH inside an activated venv
        # run from the folder the demo ran in, as printed (relative paths and all)
        r = subprocess.run(shlex.split(h), cwd=folder, capture_output=True, text=True)
        assert r.returncode == 0, (h, r.stderr)
        assert "Traceback" not in r.stderr
    select = next(h for h in hints if " select " in h)
    r = subprocess.run(shlex.split(select), cwd=folder, capture_output=True, text=True)
    assert "removed 6 ids" in r.stderr and len(r.stdout.split()) == 6  # 5% of 120
    png = shlex.split(next(h for h in hints if " plot " in h))[-1]
    assert (folder / png).stat().st_size > 10_000


def test_hint_falls_back_to_python_dash_m(monkeypatch, tmp_path):
    """Without a `gdc` script beside the interpreter the hint is `python -m gdc_ext.cli`, which runs."""
    monkeypatch.setattr(demo, "_gdc_script", lambda: None)
    monkeypatch.chdir(tmp_path)  # printed relative to the folder the demo runs in
    cmd = demo._command("--help")
    assert cmd.endswith("-m gdc_ext.cli --help")
    r = subprocess.run(shlex.split(cmd), cwd=tmp_path, capture_output=True, text=True)
    assert r.returncode == 0 and "report" in r.stdout, r.stderr


def test_demo_writes_nothing_tracked_by_git(quick_run):
    """Every file the demo wrote with its default paths is ignored by the repository's .gitignore
    (the tracked docs/data_map.png is not rewritten by default)."""
    if shutil.which("git") is None or not os.path.isdir(os.path.join(REPO, ".git")) and \
            not os.path.isfile(os.path.join(REPO, ".git")):
        pytest.skip("not a git checkout")
    folder, _, _ = quick_run
    written = sorted(os.path.relpath(os.path.join(d, f), folder) for d, _, fs in os.walk(folder) for f in fs)
    assert any(w.endswith("data_map.png") for w in written) and any(w.endswith(".safetensors") for w in written)
    assert not any(w.startswith("docs") for w in written)
    r = subprocess.run(["git", "-C", REPO, "check-ignore", "--no-index", "--verbose", "--non-matching", *written],
                       capture_output=True, text=True)
    not_ignored = [line.split("\t")[-1] for line in r.stdout.splitlines() if line.startswith("::")]
    assert r.stdout and not not_ignored, r.stdout + r.stderr


def test_make_demo_installs_no_extras():
    """The demo's target builds the package alone; the extras are the test target's, each set with
    its own stamp (so `make demo` then `make test` in one clone still installs them)."""
    make = shutil.which("make")
    if make is None:
        pytest.skip("no make")
    env = {**os.environ, "VENV": "/nonexistent-venv"}  # every stamp missing: the full plan is printed
    demo_plan = subprocess.run([make, "-n", "-C", REPO, "demo"], capture_output=True, text=True, env=env)
    assert demo_plan.returncode == 0, demo_plan.stderr
    assert "-e ." in demo_plan.stdout and "[test" not in demo_plan.stdout and "hf" not in demo_plan.stdout
    assert "CMAKE_BUILD_PARALLEL_LEVEL=" in demo_plan.stdout and "pip install -v" in demo_plan.stdout
    test_plan = subprocess.run([make, "-n", "-C", REPO, "install"], capture_output=True, text=True, env=env)
    assert test_plan.returncode == 0, test_plan.stderr
    assert '"test,hf"' in test_plan.stdout and "/nonexistent-venv/.extras-test-hf" in test_plan.stdout


def test_crossfit_reference_joins_the_table(tmp_path, capsys):
    """--crossfit: every sample gets a finite loss from the model that did not train on it, and the
    calibrated scores on it join the AUROC table (and the conclusion's choice)."""
    r = demo.main(["--quick", "--crossfit", "--out", "", "--state", str(tmp_path / "s.safetensors")])
    text = capsys.readouterr().out
    table = _auroc_table(text)
    assert ("excess", "cross-fit reference - last loss") in table
    assert ("relative_excess", "cross-fit reference / last loss - 1") in table
    assert {row["reference"] for row in r["detection"]} == {None, "unigram", "zlib", "cross-fit"}
    ref = np.load(tmp_path / "crossfit_reference.npy")
    assert ref.shape == (120,) and np.isfinite(ref).all() and (ref > 0).all()
