"""Inputs that used to give a wrong number without a word: each must now be read right, or end in a clear
error or a counted, logged skip.
"""

from __future__ import annotations

import os
import stat

import numpy as np
import pytest

from conceptdistill.utils.io import save_array, save_mask_png, write_json


# ===================================================================== 7. written files follow the umask
@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_written_files_follow_the_umask(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        save_mask_png(tmp_path / "m.png", np.eye(4, dtype=bool))
        write_json(tmp_path / "d.json", {"a": 1})
        save_array(tmp_path / "a.npy", np.zeros(3))
    finally:
        os.umask(old)
    for name in ("m.png", "d.json", "a.npy"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == mode, name
