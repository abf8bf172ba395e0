"""Loading a user's CellTypist model file without letting it run code.

CellTypist saves a model as a plain Python pickle and loads it with `pickle.load`
(`celltypist.models.Model.load`), and unpickling can call any importable function: a
downloaded or shared `.pkl` could run commands on the user's machine the moment it is
opened. So the file is never handed to CellTypist's loader. It is unpickled here by an
unpickler that resolves only the handful of classes a CellTypist model is made of (numpy
arrays and scalars, scikit-learn's LogisticRegression / SGDClassifier and StandardScaler,
and the loss object an SGD model carries); any other name in the file stops loading before
it is resolved. The result is then checked to have a model's shape before use.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

from cellpuzzle_cli.errors import UserError, existing_path

_ALLOWED = frozenset({
    ("numpy", "ndarray"), ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("sklearn.linear_model._logistic", "LogisticRegression"),
    ("sklearn.linear_model._stochastic_gradient", "SGDClassifier"),
    ("sklearn.preprocessing._data", "StandardScaler"),
    ("_loss", "CyHalfBinomialLoss"), ("sklearn._loss._loss", "CyHalfBinomialLoss"),
})


class _Refused(pickle.UnpicklingError):
    def __init__(self, module: str, name: str):
        super().__init__(f"{module}.{name}")
        self.what = f"{module}.{name}"


class _ModelUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _ALLOWED:
            raise _Refused(module, name)
        return super().find_class(module, name)


def load_celltypist_model(path: Path | str) -> Any:
    """A `celltypist.models.Model` from a `.pkl` CellTypist wrote, loaded safely."""
    path = existing_path(path, "CellTypist model file")
    if path.is_dir():
        raise UserError(f"The CellTypist model '{path}' is a folder. Give the .pkl file that "
                        "celltypist.train(...).write() saved.")
    try:
        with open(path, "rb") as fh:
            obj = _ModelUnpickler(fh).load()
    except _Refused as exc:
        raise UserError(f"'{path}' refers to '{exc.what}', which a CellTypist model never "
                        "contains; loading it could run code, so it was refused. Use a model "
                        "file written by celltypist (celltypist.train(...).write(path)) from a "
                        "source you trust, or train on a reference with --reference "
                        "instead.") from exc
    except Exception as exc:  # a damaged or foreign pickle raises many types
        raise UserError(f"'{path}' is not a CellTypist model file ({type(exc).__name__}: "
                        f"{exc}). Give the .pkl that celltypist.train(...).write() saved, or "
                        "leave the model out to train CellTypist on the reference.") from exc
    return _as_model(obj, path)


def _as_model(obj: Any, path: Path) -> Any:
    from cellpuzzle_cli.annotate.celltypist_backend import quiet_celltypist

    problem = None
    if not isinstance(obj, dict) or not {"Model", "Scaler_"} <= set(obj):
        problem = "it holds no 'Model' and 'Scaler_' entries"
    else:
        clf, scaler = obj["Model"], obj["Scaler_"]
        n = len(getattr(clf, "features", []))
        if not hasattr(clf, "classes_") or not hasattr(clf, "coef_") or n == 0:
            problem = "its classifier has no fitted classes, coefficients or gene names"
        elif clf.coef_.shape[1] != n or len(getattr(scaler, "scale_", [])) != n:
            problem = "its classifier, scaler and gene list disagree in size"
    if problem:
        raise UserError(f"'{path}' is not a CellTypist model file: {problem}. Give the .pkl "
                        "that celltypist.train(...).write() saved.")
    celltypist = quiet_celltypist()
    description = obj.get("description") if isinstance(obj.get("description"), dict) else {}
    for key in ("date", "details", "source", "version", "url"):
        description.setdefault(key, "")
    return celltypist.models.Model(obj["Model"], obj["Scaler_"], description)
