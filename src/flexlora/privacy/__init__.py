"""Privacy a federation can state (docs/privacy.md).

dp.py: client-level differential privacy, DP-FedAvg's recipe on any method whose aggregate is a
weighted sum of the clients' updates: each client's change over the round clipped to a norm, in
the space its method aggregates (``Method.privacy_space``), and Gaussian noise added to the
round's sum before the method's post-processing. accountant.py: the (ε, δ) that this spends,
from Google's dp-accounting (the extra ``privacy``).

Nothing here imports dp-accounting at import time: a run without privacy never needs it.
"""
