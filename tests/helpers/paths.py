"""Where the tests find the checkout and the shared real text (../shared/data beside it)."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SHARED_DATA = ROOT.parent / "shared" / "data"
