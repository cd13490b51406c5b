"""Fetch NIQE's standard pristine model (the MATLAB release's parameters, as BasicSR 1.4.2 ships them on PyPI).

    python scripts/fetch_niqe_release.py [OUT.npz]     # default .cache/niqe/niqe_pris_params.npz

Downloads BasicSR's source archive from PyPI (172 KB), checks its SHA-256, and writes the one file it needs
(`basicsr/metrics/niqe_pris_params.npz`: mu_pris_param, cov_pris_param) after checking that file's SHA-256 too.
`facereward evaluate --niqe-model OUT.npz` then loads it from the local path. Nothing else is kept.
"""

from __future__ import annotations

import hashlib
import io
import sys
import tarfile
import urllib.request
from pathlib import Path

ARCHIVE_URL = (
    "https://files.pythonhosted.org/packages/86/41/00a6b000f222f0fa4c6d9e1d6dcc9811a374cabb8abb9d408b77de39648c/"
    "basicsr-1.4.2.tar.gz"
)
ARCHIVE_SHA256 = "b89b595a87ef964cda9913b4d99380ddb6554c965577c0c10cb7b78e31301e87"
MEMBER = "basicsr-1.4.2/basicsr/metrics/niqe_pris_params.npz"
MEMBER_SHA256 = "2a7c182a68c9e7f1b2e2e5ec723279d6f65d912b6fcaf37eb2bf03d7367c4296"
DEFAULT_OUT = Path(__file__).resolve().parent.parent / ".cache" / "niqe" / "niqe_pris_params.npz"


def fetch(out: Path) -> Path:
    """Write the release's pristine parameters to `out` (atomically); a file already there with the right hash stays."""
    if out.is_file() and hashlib.sha256(out.read_bytes()).hexdigest() == MEMBER_SHA256:
        return out
    with urllib.request.urlopen(ARCHIVE_URL, timeout=60) as response:
        archive = response.read()
    if hashlib.sha256(archive).hexdigest() != ARCHIVE_SHA256:
        raise SystemExit(f"{ARCHIVE_URL}: SHA-256 mismatch; not using it")
    with tarfile.open(fileobj=io.BytesIO(archive), mode="r:gz") as tar:
        member = tar.extractfile(MEMBER)
        if member is None:
            raise SystemExit(f"{ARCHIVE_URL}: {MEMBER} is missing")
        data = member.read()
    if hashlib.sha256(data).hexdigest() != MEMBER_SHA256:
        raise SystemExit(f"{MEMBER}: SHA-256 mismatch; not using it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".part")
    tmp.write_bytes(data)
    tmp.replace(out)
    return out


if __name__ == "__main__":
    if len(sys.argv) > 2 or any(a.startswith("-") for a in sys.argv[1:]):
        raise SystemExit(__doc__)
    print(fetch(Path(sys.argv[1]) if len(sys.argv) == 2 else DEFAULT_OUT))
