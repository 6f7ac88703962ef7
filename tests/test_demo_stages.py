"""rlnf.demo.Stages: a stage reruns when what it read changed, even under the same path."""

from __future__ import annotations

from pathlib import Path

from rlnf.demo import Stages, content_key
from rlnf.io import file_sha256


def test_a_downstream_stage_reruns_when_an_upstream_file_changes_under_the_same_path(tmp_path):
    runs: list[str] = []

    def pipeline(text: str) -> dict:
        stages = Stages(tmp_path, fresh=False)

        def write(folder: Path) -> dict:
            runs.append("up")
            (folder / "data.txt").write_text(text)
            return {"path": str(folder / "data.txt"), "lines": 1, "sha256": file_sha256(folder / "data.txt")}

        up = stages.run("up", {"text": text}, write)
        # One stage keyed by the whole result, one by the path and content_key (as pretrain keys the corpus).
        whole = stages.run("whole", {"up": up}, lambda folder: runs.append("whole") or {"read": Path(up["path"]).read_text()})
        by_path = stages.run("by_path", {"path": up["path"], **content_key(up, "up")},
                             lambda folder: runs.append("by_path") or {"read": Path(up["path"]).read_text()})
        return {"whole": whole["read"], "by_path": by_path["read"]}

    assert pipeline("a") == {"whole": "a", "by_path": "a"} and runs == ["up", "whole", "by_path"]
    assert pipeline("a") == {"whole": "a", "by_path": "a"} and runs == ["up", "whole", "by_path"]  # all cached
    # Same path, same line count, new content: without the digest both would stay cached and read "a".
    assert pipeline("b") == {"whole": "b", "by_path": "b"} and runs[3:] == ["up", "whole", "by_path"]
    assert content_key({"path": "x"}, "up") == {}  # a result cached before digests keeps its old key
