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


def test_every_variable_in_src_is_declared_and_used():
    """A STRATA_* name in src/strata (Python read or generated shell script) is declared, or is one of the
    slurm job script's own shell variables; and every declared one is still read outside settings.py."""
    shell_only = {"STRATA_TP", "STRATA_BASE_PORT", "STRATA_REGION"}  # router/slurm.py's sbatch script
    text = "\n".join(p.read_text() for p in (ROOT / "src" / "strata").rglob("*.py") if p.name != "settings.py")
    found = set(re.findall(r"\bSTRATA_[A-Z0-9_]+\b", text))
    declared = set(settings.REGISTRY)
    assert found - shell_only <= declared, sorted(found - shell_only - declared)
    attrs = {v.name: k for k, v in vars(settings).items() if isinstance(v, settings.Setting)}
    unused = [n for n in declared if n not in found and f"settings.{attrs[n]}" not in text]
    assert not unused, f"declared but never read: {unused}"


def test_no_torch():
    code = "import sys, strata.settings; assert 'torch' not in sys.modules, 'settings imported torch'"
    subprocess.run([sys.executable, "-c", code], check=True)
