"""Privacy a federation can state. secagg.py: secure aggregation (Flower's SecAgg+), what a
client uploads, the bound its masked quantisation enforces and the server's round on the sum.
Nothing is imported here, so that importing one module does not import the others."""
