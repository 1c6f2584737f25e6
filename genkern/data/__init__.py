"""Embedded datasets: nothing is downloaded.

- digits(): the 8x8 handwritten digits that scikit-learn ships (17 grey levels).
- ring_of_gaussians(): the 2-D mixture used to see GAN mode collapse; count_modes().
- arma_process(): ARMA/ARIMA series with known parameters.
- text(): a character corpus from this Python's standard-library sources.
"""

from genkern.data.arma import arma_process
from genkern.data.base import Dataset
from genkern.data.digits import digits
from genkern.data.text import TextCorpus, text
from genkern.data.toy import count_modes, mode_centres, ring_of_gaussians

__all__ = [
    "Dataset",
    "arma_process",
    "TextCorpus",
    "count_modes",
    "digits",
    "mode_centres",
    "ring_of_gaussians",
    "text",
]
