"""`s3diff bench` on the tiny preset: the JSON it writes is self-consistent."""
import json

from s3diff_serve.cli.main import main as cli_main


def test_bench_writes_consistent_json(tmp_path):
    out = tmp_path / "bench.json"
    assert cli_main(["bench", "--preset", "tiny", "--size", "16", "--repeats", "1", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["output_side"] == 64 and result["dtype"] == "fp32"
    stages = result["stages_median_s"]
    assert set(stages) == {"estimate", "encode", "unet", "decode", "color_fix", "total"}
    assert stages["total"] >= sum(v for k, v in stages.items() if k != "total") - 1e-3
    alt = result["alternatives_median_s"]
    assert result["unet_fused_speedup"] == round(alt["unet_separate"] / alt["unet_fused"], 3)
    assert result["speedup_vs_reference_like"] == round(result["reference_like_total_median_s"] / stages["total"], 3)
