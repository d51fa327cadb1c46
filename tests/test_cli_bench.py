"""`s3diff bench` on the tiny preset: the JSON it writes is self-consistent. Eager rows only, to stay
quick (compiling the tiny model takes minutes on a small CPU; tests/model/test_compile.py covers
the compiled path, which the bench's compiled rows time through the same `warmup`/`enhance`)."""
import json
from pathlib import Path

import pytest

from s3diff_serve.cli.main import main as cli_main


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    argv = ["bench", "--preset", "tiny", "--size", "16", "--batch", "2", "--repeats", "1", "--dtypes", "fp32",
            "--compile", "off", "--out", str(out)]
    assert cli_main(argv) == 0
    return json.loads(out.read_text())


def test_rows_and_stages(result):
    assert result["output_side"] == 64 and result["batch"] == 2 and result["dtypes"] == ["fp32"]
    rows = result["rows"]
    assert set(rows) == {"reference-fp32-eager", "fp32-eager"}
    reference = rows["reference-fp32-eager"]["stages_median_s"]
    assert set(reference) == {"text_encoder", "estimate", "encode", "unet", "decode", "color_fix", "total"}
    ours = rows["fp32-eager"]["stages_median_s"]
    assert {"estimate", "encode", "unet", "decode", "color_fix", "total"} <= set(ours)
    for stages in (reference, ours):
        assert stages["total"] >= sum(v for k, v in stages.items() if k != "total") - 1e-3
    assert rows["fp32-eager"]["speedup_vs_reference"] == round(reference["total"] / ours["total"], 3)


def test_machine_memory_and_alternatives(result):
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():  # each reported flag says what the kernel says of this CPU
        lines = [line for line in cpuinfo.read_text().splitlines() if line.startswith("flags")]
        present = set(lines[0].split(":", 1)[1].split()) if lines else set()
        assert result["cpu"]["flags"] and all(value == (flag in present) for flag, value in result["cpu"]["flags"].items())
    assert isinstance(result["cpu"]["native_bf16"], bool) and result["cpu"]["model"]
    block = result["blocks"]["fp32"]
    # the kernel updates high-water marks lazily: compare with a little slack
    assert result["max_rss_mib"] >= 0.99 * block["rss_after_build_mib"] > 0
    assert block["peak_rss_mib"] >= 0.99 * block["rss_after_build_mib"]
    assert block["peak_rss_mib"] >= 0.99 * block["rss_after_warmup_mib"] > 0
    assert "warm_restart" not in block  # no compiled row, no warm-cache process
    alt = block["alternatives_median_s"]
    assert result["unet_fused_speedup"] == round(alt["unet_separate"] / alt["unet_fused"], 3)
    assert result["encode_fold_speedup"] == round(alt["encode_unfolded"] / alt["encode_folded"], 3)
    assert alt["decode_bare"] > 0
    assert result["default"]["compiled"] is False  # --compile off
