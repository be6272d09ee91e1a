"""Privacy a federation can state (docs/privacy.md).

dp.py: client-level differential privacy, DP-FedAvg's recipe on any method whose aggregate is a
weighted sum of the clients' updates: each client's change over the round clipped to a norm, in
the space its method aggregates (``Method.privacy_space``), and Gaussian noise added to the
round's sum before the method's post-processing. accountant.py: the (ε, δ) that this spends,
from Google's dp-accounting (the extra ``privacy``). secagg.py: secure aggregation (Flower's
SecAgg+) without the transport: which methods can run under it, what a client uploads, the bound
its masked quantisation enforces and the server's round on the weighted mean (numpy only at import:
the ClientApp uses it).

Nothing here imports dp-accounting at import time: a run without privacy never needs it.
"""
