from __future__ import annotations

import shutil

from helpers import make_trio

from fgsn_daemon.service.daemon import folder_fingerprint


def test_same_shapes_different_weights_are_different_lineages(tmp_path):
    trio = make_trio(tmp_path, "llama", layers=2)
    prints = {k: folder_fingerprint(p) for k, p in trio.items()}
    assert len(set(prints.values())) == 3
    shutil.copytree(trio["aligned"], tmp_path / "copy")
    assert folder_fingerprint(tmp_path / "copy") == prints["aligned"]  # a copy is the same model
