import os

# Before torch is imported anywhere (see strata/__init__.py): spin-waiting OpenMP threads make small ops
# an order of magnitude slower on these 2-vCPU machines. Subprocesses started by tests inherit it.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

# Servers started by tests keep Batch API state under $XDG_STATE_HOME/strata (serve/args.py): keep it out of
# the home directory.
if "XDG_STATE_HOME" not in os.environ:
    import tempfile
    os.environ["XDG_STATE_HOME"] = tempfile.mkdtemp(prefix="strata-test-state-")
