import os

# Before torch is imported anywhere (see strata/__init__.py): spin-waiting OpenMP threads make small ops
# an order of magnitude slower on these 2-vCPU machines. Subprocesses started by tests inherit it.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
