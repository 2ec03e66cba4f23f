"""Comparing runs: the table of a real two-job sweep (launched through the CLI), its summary files
and figures, the summary logged to the parent run, and the `compare` / `show` commands."""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pytest

from intraneuron import commands
from intraneuron.reports.compare import (
    MAX_FIGURES,
    NotFound,
    experiment_table,
    format_value,
    metric_columns,
    param_columns,
    summarise_sweep,
    sweep_figures,
    sweep_table,
    write_summary,
)
from tests.test_runner import launch, runs_of

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """(cwd, client, parent run, children by job number) of one ward-vs-kmeans sweep on layer 0."""
    cwd = tmp_path_factory.mktemp("compare_sweep")
    # K by silhouette (K >= 2): the gap statistic finds no categories in a random tiny model, and
    # this sweep checks the comparison of top-down metrics, which K = 1 leaves NaN
    done = launch(cwd, "--multirun", "clustering=ward,kmeans", "clustering.k_choice=silhouette", "layer=0")
    assert done.returncode == 0, done.stderr[-3000:]
    client, runs = runs_of(cwd)
    (parent,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = sorted((r for r in runs if r is not parent), key=lambda r: int(r.data.tags["hydra.job_num"]))
    return cwd, client, parent, children


def uri_of(cwd) -> str:
    return f"sqlite:///{cwd}/store/mlflow.db"


def test_the_sweep_table_has_a_row_per_child_the_swept_params_and_the_children_s_metrics(sweep):
    _, client, parent, children = sweep
    table = sweep_table(client, parent.info.run_id)
    assert table["run_id"].tolist() == [c.info.run_id for c in children]
    assert table["run_name"].tolist() == [c.info.run_name for c in children]
    assert (table["status"] == "FINISHED").all()
    assert table["clustering.estimator._target_"].tolist() == [
        "sklearn.cluster.AgglomerativeClustering", "sklearn.cluster.KMeans"]  # fmt: skip
    assert "layer" not in table and "model.name" not in table  # the same in both jobs
    headline = children[0].data.tags["intraneuron.headline"].split(",")
    assert metric_columns(table) == [f"L0/{name}" for name in headline]
    for child in children:
        values = table.set_index("run_id").loc[child.info.run_id, metric_columns(table)]
        logged = pd.Series({k: v for k, v in child.data.metrics.items() if k.removeprefix("L0/") in headline},
                           dtype=float)  # not the companions logged beside them (pseudo value, excess, interval)
        assert sorted(values.index) == sorted(logged.index)
        pd.testing.assert_series_equal(values.astype(float), logged[values.index], check_names=False)  # NaN == NaN


def test_the_experiment_table_lists_every_run_with_headline_metrics_newest_first(sweep):
    _, client, parent, children = sweep
    table = experiment_table(client, "e2e")
    assert sorted(table["run_id"]) == sorted(c.info.run_id for c in children)  # not the parent
    starts = [client.get_run(i).info.start_time for i in table["run_id"]]
    assert starts == sorted(starts, reverse=True)
    assert experiment_table(client, parent.info.experiment_id)["run_id"].tolist() == table["run_id"].tolist()
    with pytest.raises(NotFound):
        experiment_table(client, "no-such-experiment")


def test_the_summary_files_hold_the_table_and_figures_of_its_numbers(sweep, tmp_path):
    _, client, parent, children = sweep
    table = sweep_table(client, parent.info.run_id)
    paths = write_summary(table, tmp_path, "ward vs kmeans")
    assert [p.name for p in paths[:2]] == ["summary.csv", "summary.html"]
    text_columns = {c: "str" for c in table.columns if c not in metric_columns(table)}
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "summary.csv", dtype=text_columns), table)

    page = (tmp_path / "summary.html").read_text()
    assert all(c.info.run_name in page for c in children)
    assert "http://" not in page and "https://" not in page  # nothing fetched from the network

    figures, left_out = sweep_figures(table)
    # the clusterer's own options split the jobs exactly like its class: one axis, not four
    assert {f.intraneuron_data["param"] for f in figures.values()} == {"clustering.estimator._target_"}
    assert any("clustering.estimator.linkage" in item for item in left_out)
    assert sorted(p.name for p in paths[2:]) == sorted(figures)
    for path in paths[2:]:
        assert path.read_bytes()[:8] == PNG_MAGIC and path.stat().st_size > 5_000
    for figure in figures.values():
        data = figure.intraneuron_data
        assert data["y"] == table[data["metric"]].tolist()
        assert data["x"] == table[data["param"]].tolist() and not data["numeric"]
        assert data["run_id"] == table["run_id"].tolist()


def test_summarise_sweep_logs_the_summary_to_the_parent_run(sweep, tmp_path):
    _, client, parent, _ = sweep
    paths = summarise_sweep(client, parent.info.run_id, tmp_path / "summary")
    logged = {a.path for a in client.list_artifacts(parent.info.run_id, "sweep_summary")}
    assert {f"sweep_summary/{p.name}" for p in paths} == logged
    assert "sweep_summary/summary.html" in logged and "sweep_summary/summary.csv" in logged


def hand_made_table(n_params: int = 1) -> pd.DataFrame:
    return pd.DataFrame({
        "run_name": ["tau=0.5 <script>alert(1)</script>", "tau=0.7", "tau=0.9", "tau=bad"],
        "run_id": ["a" * 32, "b" * 32, "c" * 32, "d" * 32],
        "status": ["FINISHED", "FINISHED", "FINISHED", "FAILED"],
        "core_tokens.tau": ["0.5", "0.7", "0.9", "0.9"],
        **{f"p{i}": [str(i), "x", str(i), "y"] for i in range(n_params - 1)},
        "L0/differentiated_frac": [0.123456, 0.5, 0.25, np.nan],
        "L1/differentiated_frac": [1e-5, 2.0, 1234567.0, np.nan],
    })  # fmt: skip


def test_the_html_escapes_cell_text_and_gives_numbers_to_three_significant_digits(tmp_path):
    write_summary(hand_made_table(), tmp_path, "tau <sweep>")
    page = (tmp_path / "summary.html").read_text()
    assert "<script>" not in page
    assert "tau=0.5 &lt;script&gt;alert(1)&lt;/script&gt;" in page and "tau &lt;sweep&gt;" in page
    assert ">0.123<" in page and ">1.23e+06<" in page and "0.123456" not in page


def test_numeric_params_get_a_numeric_axis_and_failed_runs_no_point(tmp_path):
    table = hand_made_table()
    figures, _ = sweep_figures(table)
    data = figures["L0_differentiated_frac_vs_core_tokens.tau.png"].intraneuron_data
    assert data["numeric"] and data["x"] == [0.5, 0.7, 0.9] and data["y"] == [0.123456, 0.5, 0.25]
    assert data["run_id"] == ["a" * 32, "b" * 32, "c" * 32]  # the FAILED run has no value


def test_figures_are_capped_and_the_page_says_which_were_left_out(tmp_path):
    n = MAX_FIGURES + 6
    table = hand_made_table().iloc[:, :4].assign(**{f"L0/m{i}": [i, i + 1.0, i + 2.0, i] for i in range(n)})
    figures, left_out = sweep_figures(table)
    assert len(figures) == MAX_FIGURES
    assert left_out == [f"L0/m{i} vs core_tokens.tau (over {MAX_FIGURES} figures)" for i in range(MAX_FIGURES, n)]
    write_summary(table, tmp_path, "many")
    page = (tmp_path / "summary.html").read_text()
    assert f"L0/m{n - 1} vs core_tokens.tau (over {MAX_FIGURES} figures)" in page
    assert len(list(tmp_path.glob("*.png"))) == MAX_FIGURES


def test_compare_prints_every_child_and_writes_the_summary(sweep, tmp_path, capsys):
    cwd, _, parent, children = sweep
    out = tmp_path / "out"
    assert commands.main(["compare", parent.info.run_id, "--tracking-uri", uri_of(cwd), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert all(c.info.run_name in printed for c in children)
    assert (out / "summary.csv").is_file() and (out / "summary.html").is_file()
    assert list(out.glob("*.png"))


def test_compare_of_an_experiment_uses_the_environment_s_relative_store(sweep, tmp_path, monkeypatch, capsys):
    cwd, _, _, children = sweep
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///store/mlflow.db")
    monkeypatch.chdir(tmp_path)  # the relative store is looked up here: there is none
    assert commands.main(["compare", "e2e"]) == 1
    assert "no MLflow store at" in capsys.readouterr().err
    monkeypatch.chdir(cwd)
    assert commands.main(["compare", "e2e", "--out", str(tmp_path / "e2e")]) == 0
    printed = capsys.readouterr().out
    assert all(c.info.run_name in printed for c in children)


def test_show_prints_a_run_and_a_neuron_s_row_and_writes_its_card(sweep, capsys, tmp_path, monkeypatch):
    cwd, _, _, children = sweep
    monkeypatch.chdir(tmp_path)
    child = children[0]
    assert commands.main(["show", child.info.run_id, "--tracking-uri", uri_of(cwd)]) == 0
    printed = capsys.readouterr().out
    assert child.info.run_name in printed and "status: FINISHED" in printed
    assert "model.name: tiny-gpt2" in printed and "layer 0:" in printed
    value = child.data.metrics["L0/interleaving_median"]
    assert f"  interleaving_median: {value:.3g}" in printed

    argv = ["show", child.info.run_id, "--neuron", "3", "--layer", "0", "--tracking-uri", uri_of(cwd)]
    assert commands.main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "neuron: 3" in lines and "layer: 0" in lines
    card = tmp_path / f"card-{child.info.run_id[:8]}-L0-N3.html"
    assert f"card: {card.name}" in lines
    assert 'data-neuron="3"' in card.read_text()
    card.unlink()
    assert commands.main(argv[:4] + argv[6:]) == 0  # every layer of the run: only layer 0 here
    assert capsys.readouterr().out.splitlines() == lines and card.is_file()
    assert commands.main([*argv, "--out", str(tmp_path / "mine.html")]) == 0
    assert 'data-layer="0" data-neuron="3"' in (tmp_path / "mine.html").read_text()


@pytest.mark.parametrize("argv", [
    ["compare", "0123456789abcdef0123456789abcdef"],
    ["compare", "no-such-experiment"],
    ["show", "0123456789abcdef0123456789abcdef"],
    ["show", "<child>", "--neuron", "999"],
    ["show", "<child>", "--neuron", "3", "--layer", "2"],
    ["compare", "<child>"],  # a run, but not a sweep's parent
])  # fmt: skip
def test_unknowns_exit_1_with_one_line(sweep, argv, capsys):
    cwd, _, _, children = sweep
    argv = [children[0].info.run_id if a == "<child>" else a for a in argv]
    assert commands.main([*argv, "--tracking-uri", uri_of(cwd)]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert len(captured.err.strip().splitlines()) == 1 and captured.err.startswith(f"intraneuron {argv[0]}: ")


@pytest.fixture(scope="module")
def one_run(tmp_path_factory) -> tuple[str, str]:
    """(tracking URI, run id) of a store holding one finished run."""
    from intraneuron.tracking.run import tracked_run
    from intraneuron.tracking.store import TrackingConfig

    store = tmp_path_factory.mktemp("one_run") / "mlflow.db"
    tcfg = TrackingConfig(tracking_uri=f"sqlite:///{store}", experiment="one", system_metrics=False)
    with tracked_run(tcfg, run_name="one") as run:
        return tcfg.tracking_uri, run.run_id


def _one_error_line(capsys) -> str:
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert len(lines) == 1, captured.err[-2000:]
    return lines[0]


@pytest.mark.parametrize("run_id", ["", "../../../etc/passwd", "0123456789abcdef'0123456789abcdef", "a run"])
def test_a_malformed_run_id_is_one_line_naming_it(one_run, run_id, capsys):
    uri, _ = one_run
    assert commands.main(["show", run_id, "--tracking-uri", uri]) == 1
    line = _one_error_line(capsys)
    assert line.startswith(f"intraneuron show: run_id={run_id!r} is not allowed: expected an MLflow run id")


@pytest.mark.parametrize("argv", [
    ["show", "<run>", "--neuron", "3", "--out", "afile.txt/cards"],  # a folder under a file
    ["show", "<run>", "--neuron", "3", "--layer", "0", "--out", "afile.txt/card.html"],
    ["show", "<run>", "--neuron", "3", "--out", "/proc/cards"],  # not even root writes there
    ["compare", "<run>", "--out", "afile.txt/summary"],
])  # fmt: skip
def test_an_out_folder_that_cannot_be_written_is_one_line_naming_it(one_run, argv, tmp_path, monkeypatch, capsys):
    uri, run_id = one_run
    monkeypatch.chdir(tmp_path)
    (tmp_path / "afile.txt").write_text("not a folder")
    argv = [run_id if a == "<run>" else a for a in argv]
    assert commands.main([*argv, "--tracking-uri", uri]) == 1
    line = _one_error_line(capsys)
    out = argv[argv.index("--out") + 1]
    assert line.startswith(f"intraneuron {argv[0]}: --out={out!r} is not allowed: expected a folder that can be "
                           "created and written")  # fmt: skip
    assert "afile.txt is not a folder" in line or "cannot write in /proc" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile.txt"]  # nothing written


def test_compare_into_a_pipe_prints_one_row_per_run_under_the_full_labels(sweep, tmp_path, capsys):
    cwd, client, parent, children = sweep
    argv = ["compare", parent.info.run_id, "--tracking-uri", uri_of(cwd), "--out", str(tmp_path / "out")]
    assert commands.main(argv) == 0  # capsys: stdout is no terminal
    lines = capsys.readouterr().out.splitlines()
    (header,) = [line for line in lines if line.split()[:2] == ["run", "run_id"]]
    labels = children[0].data.tags["intraneuron.headline"].split(",")
    swept = param_columns(sweep_table(client, parent.info.run_id))
    assert len(swept) >= 2
    # every column head is a whole label or key: nothing cut, abbreviated or folded
    assert header.split() == ["run", "run_id", "status", *swept, "layer", *labels]
    assert "…" not in "\n".join(lines)

    def span(name: str) -> tuple[int, int]:
        found = re.search(rf"(?:^| ){re.escape(name)}(?= |$)", header)
        return found.end() - len(name), found.end()

    for child in children:
        (row,) = [line for line in lines if child.info.run_id in line]  # one row each
        row = row.ljust(len(header))  # a row ending in blank (NaN) cells has its trailing spaces cut
        left = {"run": child.info.run_name, "run_id": child.info.run_id, "status": "FINISHED",
                **{key: child.data.params.get(key) or "" for key in swept}}  # fmt: skip
        for name, text in left.items():  # under its head, left-aligned
            assert row[span(name)[0] :].startswith(text), name
        assert row[: span("layer")[1]].endswith(" 0")
        for label in labels:  # each value under its label, right-aligned, none dropped
            assert row[: span(label)[1]].endswith(" " + format_value(child.data.metrics[f"L0/{label}"])), label


def test_a_narrow_terminal_gets_the_runs_then_their_metrics_in_tables_that_fit():
    from intraneuron.analyses.two_fold.analysis import TwoFoldAnalysis
    from intraneuron.reports.terminal import compare_text

    labels = list(TwoFoldAnalysis.headline)
    runs = ["tau=0.5", "tau=0.7", "tau=bad"]
    table = pd.DataFrame({"run_name": runs, "run_id": ["a" * 32, "b" * 32, "c" * 32],
                          "status": ["FINISHED", "FINISHED", "FAILED"], "core_tokens.tau": ["0.5", "0.7", "0.9"]})  # fmt: skip
    for layer in (0, 1):
        for j, label in enumerate(labels):  # integers, whole at 3 significant digits
            table[f"L{layer}/{label}"] = [100 * run + 20 * layer + j if run < 2 else np.nan for run in range(3)]
    text = compare_text(table, width=100)
    lines = text.splitlines()
    assert max(map(len, lines)) <= 100 and "…" not in text
    assert [sum(run_id in line for line in lines) for run_id in table["run_id"]] == [1, 1, 1]
    _, *metric_tables = text.split("\n\n")
    assert 2 <= len(metric_tables) <= 4  # 13 labels, a few abreast
    cells: dict[tuple[str, str], list[str]] = {}
    for block in metric_tables:
        rows = [line.split() for line in block.splitlines() if line.split()[:1] and line.split()[0] in runs]
        assert [row[:2] for row in rows] == [["tau=0.5", "0"], ["tau=0.5", "1"], ["tau=0.7", "0"], ["tau=0.7", "1"],
                                             ["tau=bad"]]  # fmt: skip
        for run, *rest in rows[:4]:
            cells.setdefault((run, rest[0]), []).extend(rest[1:])
    for run in range(2):  # every value whole, in its run's and layer's row, in the labels' order
        for layer in (0, 1):
            expected = [format_value(float(100 * run + 20 * layer + j)) for j in range(len(labels))]
            assert cells[(runs[run], str(layer))] == expected
    for label in labels:  # each label heads a column, broken at its underscores only
        assert all(any(piece in line for line in lines) for piece in label.replace("_", "_\n").split("\n")), label


def test_a_metric_equal_in_every_run_gets_no_figure_and_is_named():
    table = pd.DataFrame({
        "run_name": ["a", "b", "c"], "run_id": ["1", "2", "3"], "status": ["FINISHED"] * 3,
        "clustering": ["ward", "kmeans", "ward"], "L0/neurons_analysed": [48.0, 48.0, 48.0],
        "L0/differentiated_frac": [0.1, 0.2, 0.3],
    })  # fmt: skip
    figures, left_out = sweep_figures(table)
    assert [f.intraneuron_data["metric"] for f in figures.values()] == ["L0/differentiated_frac"]
    assert any(line.startswith("L0/neurons_analysed (the same in every run") for line in left_out)
