"""scripts/gpu-bench.sh cannot run without a GPU; check that it parses, that what it calls exists
and accepts its arguments, and that its report is written even when nothing could run."""
from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

from s3diff_serve.cli.main import build_parser

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu-bench.sh"


def test_script_is_valid_bash():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)
    assert os.access(SCRIPT, os.X_OK)


def test_the_bench_arguments_parse_and_the_test_file_exists():
    text = SCRIPT.read_text()
    command = re.search(r"s3diff_serve\.cli\.main (bench .*?)\n\s*--out", text.replace("\\\n", "\n"), re.DOTALL)
    argv = shlex.split(command.group(1).replace('"$1"', "1")) + ["--out", "x.json"]
    args = build_parser().parse_args(argv)
    assert (args.preset, args.size, args.device, args.compile) == ("sd-turbo", 128, "cuda", "on")
    assert args.dtypes == "fp32,fp16,bf16" and args.compiled_dtypes == "fp16,bf16"
    assert re.findall(r"^bench (\d+)$", text, re.MULTILINE) == ["1", "4", "8"]
    parity = re.search(r"S3DIFF_TEST_DEVICE=cuda .* (tests/\S+\.py)", text.replace("\\\n", " "))
    test_file = ROOT / parity.group(1)
    assert test_file.is_file() and "S3DIFF_TEST_DEVICE" in test_file.read_text()


def test_report_without_a_gpu_is_still_written(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "CUDA_VISIBLE_DEVICES": ""}
    completed = subprocess.run(["bash", str(SCRIPT), str(tmp_path)], env=env, capture_output=True, text=True)
    assert completed.returncode == 2 and "no CUDA device" in completed.stderr
    report = json.loads((tmp_path / "gpu-bench.json").read_text())
    assert report["steps"] == {} and report["bench_by_batch"] == {} and report["parity"] == {"ran": False}


def test_report_gathers_steps_bench_and_parity(tmp_path):
    (tmp_path / "bench-b4.json").write_text(json.dumps({"batch": 4}))
    (tmp_path / "bench-b4.status").write_text('{"rc": 0, "seconds": 80}')
    (tmp_path / "bench-b8.status").write_text('{"rc": 124, "seconds": 420}')
    (tmp_path / "bench-b8.log").write_text("compiling...\n" * 10)
    (tmp_path / "parity.xml").write_text(
        '<testsuites><testsuite><testcase name="a" time="1.5"/><testcase name="b" time="2">'
        '<failure message="x"/></testcase><testcase name="c" time="0"><skipped/></testcase></testsuite></testsuites>')
    out = tmp_path / "report.json"
    subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_bench_report.py"), str(tmp_path), str(out)], check=True)
    report = json.loads(out.read_text())
    assert report["bench_by_batch"] == {"4": {"batch": 4}}
    assert report["steps"]["bench-b4"] == {"rc": 0, "seconds": 80}
    assert report["steps"]["bench-b8"]["rc"] == 124 and "compiling" in report["steps"]["bench-b8"]["log_tail"]
    assert (report["parity"]["passed"], report["parity"]["failed"], report["parity"]["skipped"]) == (1, 1, 1)
