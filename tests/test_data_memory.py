"""Peak memory per task stays flat as the input grows: every task of the data job, 1x vs 4x input."""
from __future__ import annotations

import json
import pickle
import subprocess
import sys

import pytest

from puyu.data_pipeline import config as C
from puyu.data_pipeline import corpora, job

CHILD = """
import json, pickle, sys
from pathlib import Path
from puyu.launcher.stage import TaskContext
stage = pickle.load(open(sys.argv[1], "rb"))[int(sys.argv[2])]
run_dir, rank = Path(sys.argv[3]), int(sys.argv[4])
ctx = TaskContext(run_dir, run_dir / stage.name, rank, stage.shards)
ctx.mark_done(stage.fn(ctx))
# VmHWM: this program's own peak; ru_maxrss would include the forking parent's peak
print("RSS_KB", next(line.split()[1] for line in open("/proc/self/status") if line.startswith("VmHWM")))
"""


def _peak_rss_per_stage(tmp_path, copies: int) -> dict[str, int]:
    texts = [a["extract"] for a in json.loads(corpora.wiki_summaries_file().read_text()).values()]
    src = tmp_path / f"in{copies}" / "wiki.jsonl"
    src.parent.mkdir()
    with open(src, "w") as fh:
        for copy in range(copies):  # each copy varies its wording a little: near, not exact, duplicates
            for i, text in enumerate(texts):
                fh.write(json.dumps({"id": f"{copy}-{i}", "text": f"{text} (copy {copy})"}) + "\n")
    cfg = C.DataJobConfig(inputs=[C.InputSpec(kind="jsonl", path=str(src))], shards=2)
    cfg.filters.c4.enabled = False
    cfg.tokenizer.vocab_size = 4000
    stages = job.build_data_stages(cfg)
    stage_file = tmp_path / f"stages{copies}.pkl"
    stage_file.write_bytes(pickle.dumps(stages))
    peaks = {}
    for index, stage in enumerate(stages):
        for rank in range(stage.shards):
            out = subprocess.run([sys.executable, "-c", CHILD, str(stage_file), str(index),
                                  str(tmp_path / f"run{copies}"), str(rank)],
                                 check=True, capture_output=True, text=True).stdout
            rss = int(out.split("RSS_KB")[-1])
            peaks[stage.name] = max(peaks.get(stage.name, 0), rss)
    return peaks


@pytest.mark.slow
def test_peak_rss_is_flat_from_1x_to_4x_input(tmp_path):
    try:
        corpora.wiki_summaries_file()
    except corpora.CorpusMissing as err:
        pytest.skip(str(err))
    one, four = _peak_rss_per_stage(tmp_path, 1), _peak_rss_per_stage(tmp_path, 4)
    print("\nstage                peak RSS MB 1x -> 4x input (wiki summaries, 4.9 MB per copy, 2 shards)")
    for name in one:
        print(f"{name:20s} {one[name] / 1024:8.1f} -> {four[name] / 1024:8.1f}")
    for name in one:
        assert four[name] < 1.3 * one[name] + 20 * 1024, (name, one[name], four[name])
