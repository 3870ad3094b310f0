"""The benches' own machinery (bench/ is scripts, not the package)."""
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))

from compare import run_command  # noqa: E402

# A stand-in for launch/finetune.py: counts its runs and writes all_results.json into the output dir.
SCRIPT = ("import json, os, sys; out = sys.argv[sys.argv.index('--output_dir') + 1]; "
          "n = os.path.join(out, 'runs'); k = int(open(n).read()) + 1 if os.path.exists(n) else 1; "
          "open(n, 'w').write(str(k)); json.dump({'runs': k}, open(os.path.join(out, 'all_results.json'), 'w'))")


def test_reuse_matches_a_finished_run_by_its_config_content_not_its_path(tmp_path):
    out = tmp_path / "run"

    def run(config: dict, where: str) -> dict:
        (tmp_path / where).mkdir(exist_ok=True)
        path = tmp_path / where / "c.json"
        path.write_text(json.dumps(config))
        cmd = [sys.executable, "-c", SCRIPT, "--deepspeed_config", str(path), "--output_dir", str(out)]
        return run_command("t", cmd, str(out), reuse=True)

    assert run({"lr": 1}, "tmp1")["runs"] == 1
    assert run({"lr": 1}, "tmp2")["runs"] == 1  # same config written elsewhere: the finished run, read back
    assert run({"lr": 2}, "tmp2")["runs"] == 2  # another config: run again
