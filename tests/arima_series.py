"""The real series statsmodels bundles, as 1-D float arrays (nothing is downloaded).

Shared by tests/test_arima_real.py and bench/arima_vs_statsmodels.py.
"""

from __future__ import annotations

import numpy as np

SERIES = ["sunspots", "nile", "elnino", "co2", "realgdp", "infl", "unemp"]


def load_series(name: str) -> np.ndarray:
    import statsmodels.api as sm

    ds = sm.datasets
    if name == "elnino":  # (year, month) table -> one monthly series
        return ds.elnino.load_pandas().data.drop(columns="YEAR").to_numpy(float).ravel()
    if name == "co2":  # weekly with gaps -> monthly means, gaps carried forward
        return ds.co2.load_pandas().data["co2"].resample("MS").mean().ffill().to_numpy(float)
    column = {"sunspots": "SUNACTIVITY", "nile": "volume"}.get(name)
    if column:
        return getattr(ds, name).load_pandas().data[column].to_numpy(float)
    return ds.macrodata.load_pandas().data[name].to_numpy(float)  # realgdp, infl, unemp
