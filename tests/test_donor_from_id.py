"""`build-context --donor-from-id REGEX`: donors that live only in the cell ids (MGH36_A01)."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
from fixtures import assert_user_error

from cellpuzzle_cli.manifest import Manifest

IDS = [f"MGH{donor}_{well}{i:02d}" for donor in (36, 53, 104) for well in "AB" for i in range(4)]


@pytest.fixture
def h5ad(tmp_path):
    """24 cells of 3 donors whose donor is only in the id (no donor column)."""
    import anndata
    import pandas as pd

    rng = np.random.default_rng(0)
    counts = rng.poisson(2.0, (len(IDS), 10)).astype(np.float32) + 1
    obs = pd.DataFrame({"cell_type": pd.Categorical(["T cell", "B cell", "NK cell"] * 8)},
                       index=IDS)
    var = pd.DataFrame(index=[f"G{i}" for i in range(10)])
    path = tmp_path / "tumour.h5ad"
    anndata.AnnData(counts, obs=obs, var=var).write_h5ad(path)
    return path


def _donors(folder) -> dict[str, str]:
    table = pq.read_table(folder / "tumour.parquet").to_pylist()
    return {row["cell_id"]: row["donor_id"] for row in table}


@pytest.mark.parametrize("how", [["--donor-from-id", "^([A-Z]+\\d+)_"],
                                 ["donor_from_id=^([A-Z]+\\d+)_"]])
def test_the_first_group_of_the_match_is_the_donor(cli, h5ad, tmp_path, how):
    out = tmp_path / "cells"
    result = cli("build-context", h5ad, "-o", out, "--top-genes", "3", "--workers", "1", *how)
    assert result.code == 0, result.output
    donors = _donors(out)
    assert donors == {cell: cell.split("_")[0] for cell in IDS}
    assert set(donors.values()) == {"MGH36", "MGH53", "MGH104"}
    assert "No 'donor_id' column" not in result.output      # no one-group fallback
    entry = Manifest(cli.manifest).entries()[-1]
    assert entry.params["donor_from_id"] == "^([A-Z]+\\d+)_"
    assert "donor_from_id: ^([A-Z]+\\d+)_" in (out / "build-context.yaml").read_text()


def test_a_cell_id_that_does_not_match_is_named_and_nothing_is_written(cli, h5ad, tmp_path):
    out = tmp_path / "cells"
    result = cli("build-context", h5ad, "-o", out, "--donor-from-id", "^(MGH[0-9]{2})_")
    assert_user_error(result, "cell id 'MGH104_A00' does not match --donor-from-id",
                      "^(MGH[0-9]{2})_", "8 of 24 ids do not")
    assert not out.exists()
    assert not Manifest(cli.manifest).entries()


@pytest.mark.parametrize("args, fragments", [
    (["--donor-from-id", "^MGH\\d+"], ["has no group", "in parentheses"]),
    (["--donor-from-id", "^(MGH"], ["not a valid regular expression"]),
    (["--donor-from-id", "^(MGH\\d+)", "--donor-col", "patient"],
     ["--donor-col 'patient' and --donor-from-id", "give one"]),
])
def test_a_regex_that_cannot_name_donors_is_refused(cli, h5ad, tmp_path, args, fragments):
    result = cli("build-context", h5ad, "-o", tmp_path / "cells", *args)
    assert_user_error(result, *fragments)
    assert not (tmp_path / "cells").exists()
