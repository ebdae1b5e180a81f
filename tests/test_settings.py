"""strata.settings: typed STRATA_* variables, their doc, and that no code reads one undeclared."""
import pathlib
import re
import subprocess
import sys

import pytest

from strata import settings

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_doc_matches_module():
    assert (ROOT / "docs" / "SETTINGS.md").read_text() == settings.doc_table(), \
        "regenerate: python -m strata.settings > docs/SETTINGS.md"


def test_parse_and_errors(monkeypatch):
    monkeypatch.delenv("STRATA_FORCE_TRITON", raising=False)
    assert settings.FORCE_TRITON.get() is False
    for raw, want in (("1", True), ("on", True), ("TRUE", True), ("0", False), ("no", False), ("", False)):
        monkeypatch.setenv("STRATA_FORCE_TRITON", raw)
        assert settings.FORCE_TRITON.get() is want
    monkeypatch.setenv("STRATA_FORCE_TRITON", "maybe")
    with pytest.raises(settings.SettingError, match="STRATA_FORCE_TRITON"):
        settings.FORCE_TRITON.get()
    monkeypatch.setenv("STRATA_HANG_DUMP_S", "2.5")
    assert settings.HANG_DUMP_S.get() == 2.5
    monkeypatch.setenv("STRATA_HANG_DUMP_S", "soon")
    with pytest.raises(settings.SettingError, match="STRATA_HANG_DUMP_S"):
        settings.HANG_DUMP_S.get()
    monkeypatch.setenv("STRATA_TP_ALLREDUCE", "symm_mem")
    assert settings.TP_ALLREDUCE.get() == "symm_mem"
    monkeypatch.setenv("STRATA_TP_ALLREDUCE", "mpi")
    with pytest.raises(settings.SettingError, match="STRATA_TP_ALLREDUCE"):
        settings.TP_ALLREDUCE.get()


def test_every_variable_in_src_is_declared():
    """A STRATA_* name in src/strata (Python read or generated shell script) is declared, or is one of the
    slurm job script's own shell variables."""
    shell_only = {"STRATA_TP", "STRATA_BASE_PORT", "STRATA_REGION"}  # router/slurm.py's sbatch script
    found = set()
    for path in (ROOT / "src" / "strata").rglob("*.py"):
        found |= set(re.findall(r"\bSTRATA_[A-Z0-9_]+\b", path.read_text()))
    assert found - shell_only <= set(settings.REGISTRY), sorted(found - shell_only - set(settings.REGISTRY))


def test_no_torch():
    code = "import sys, strata.settings; assert 'torch' not in sys.modules, 'settings imported torch'"
    subprocess.run([sys.executable, "-c", code], check=True)
