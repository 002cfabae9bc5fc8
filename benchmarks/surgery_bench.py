"""Surgery speed and memory against a plain copy of the same bytes, measured in the same run.

Writes a random bf16 base/donor pair (hidden 2048 -> 2560, vocab 32000; about 1B and 1.5B parameters at 16
layers), runs `python -m surgery` on it as a subprocess, then a plain copy as a subprocess that reads as many
bytes from the same input files and writes as many bytes as the surgery did. Both end with an fsync. Repeated
at 8 and 16 layers to show that peak memory does not grow with depth, and once with depth growth (the deepest base
grown to --grow-to layers with a donor that deep, as Llama-2-13b's 40 layers grow to llama-30b's 60), which must
cost no more memory than a plain widening.

    .venv/bin/python benchmarks/surgery_bench.py [--layers 8 16] [--grow-to 24] [--mode readers] [--repeat 3]

Peak RSS is the child's ru_maxrss from wait4 (resident anonymous and file-mapped pages at the worst moment).
Bytes read and written are the surgery's own counts from its manifest (logical bytes, page cache or not).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline.checkpoint import ShardedWriter, TensorSpec  # noqa: E402

BASE = {"hidden_size": 2048, "num_attention_heads": 16, "num_key_value_heads": 16, "intermediate_size": 5632}
DONOR = {"hidden_size": 2560, "num_attention_heads": 20, "num_key_value_heads": 20, "intermediate_size": 6912}
VOCAB, HEAD_DIM = 32000, 128
INPUT_SHARD = "1GB"  # multi-shard inputs, as released checkpoints are
TARGETS = {"peak_rss_gb": 1.5, "wall_ratio": 3.0, "rss_growth": 1.10}

COPY_SCRIPT = """
import os, sys
files, to_read, to_write, out = sys.argv[1].split(os.pathsep), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
chunk = 64 * 2**20
for path in files:
    with open(path, 'rb', buffering=0) as f:
        while to_read > 0:
            data = f.read(min(chunk, to_read))
            if not data:
                break
            to_read -= len(data)
buffer = bytes(chunk)
with open(out, 'wb', buffering=0) as f:
    while to_write > 0:
        to_write -= f.write(memoryview(buffer)[: min(chunk, to_write)])
    os.fsync(f.fileno())
"""


def llama_specs(widths: dict[str, int], layers: int) -> list[TensorSpec]:
    hidden, inter = widths["hidden_size"], widths["intermediate_size"]
    q, kv = widths["num_attention_heads"] * HEAD_DIM, widths["num_key_value_heads"] * HEAD_DIM
    specs = [TensorSpec("model.embed_tokens.weight", (VOCAB, hidden), torch.bfloat16)]
    for i in range(layers):
        p = f"model.layers.{i}."
        specs += [
            TensorSpec(p + "input_layernorm.weight", (hidden,), torch.bfloat16),
            TensorSpec(p + "self_attn.q_proj.weight", (q, hidden), torch.bfloat16),
            TensorSpec(p + "self_attn.k_proj.weight", (kv, hidden), torch.bfloat16),
            TensorSpec(p + "self_attn.v_proj.weight", (kv, hidden), torch.bfloat16),
            TensorSpec(p + "self_attn.o_proj.weight", (hidden, q), torch.bfloat16),
            TensorSpec(p + "post_attention_layernorm.weight", (hidden,), torch.bfloat16),
            TensorSpec(p + "mlp.gate_proj.weight", (inter, hidden), torch.bfloat16),
            TensorSpec(p + "mlp.up_proj.weight", (inter, hidden), torch.bfloat16),
            TensorSpec(p + "mlp.down_proj.weight", (hidden, inter), torch.bfloat16),
        ]
    specs += [
        TensorSpec("model.norm.weight", (hidden,), torch.bfloat16),
        TensorSpec("lm_head.weight", (VOCAB, hidden), torch.bfloat16),
    ]
    return specs


def write_random_llama(folder: Path, widths: dict[str, int], layers: int, seed: int) -> int:
    """A random bf16 Llama checkpoint, streamed tensor by tensor; returns its parameter count."""
    from transformers import LlamaConfig

    folder.mkdir(parents=True)
    specs = llama_specs(widths, layers)
    writer = ShardedWriter(folder, specs, INPUT_SHARD)
    generator = torch.Generator().manual_seed(seed)
    for spec in specs:
        if spec.name.endswith("norm.weight"):
            tensor = torch.ones(spec.shape, dtype=torch.bfloat16)
        else:
            tensor = torch.randn(spec.shape, generator=generator, dtype=torch.bfloat16).mul_(0.02)
        writer.write(spec.name, tensor)
    writer.close()
    LlamaConfig(**widths, head_dim=HEAD_DIM, num_hidden_layers=layers, vocab_size=VOCAB, dtype="bfloat16",
                tie_word_embeddings=False).save_pretrained(folder)
    return sum(spec.nbytes // 2 for spec in specs)


@dataclass
class Measured:
    wall_s: float
    peak_rss_gb: float
    block_in_gb: float
    block_out_gb: float
    stdout: str = ""  # what the command printed


# A child forked from this (large) process starts with its RSS, and ru_maxrss would count that; a small
# launcher forks the measured command instead and reports the command's own wall time and rusage.
LAUNCHER = """
import json, os, sys, time
started = time.perf_counter()
pid = os.fork()
if pid == 0:
    os.execv(sys.argv[1], sys.argv[1:])
_, status, usage = os.wait4(pid, 0)
print(json.dumps({"wall": time.perf_counter() - started, "code": os.waitstatus_to_exitcode(status),
                  "maxrss_kb": usage.ru_maxrss, "inblock": usage.ru_inblock, "oublock": usage.ru_oublock}))
"""


def measure(command: list[str]) -> Measured:
    """Run a command to completion: its wall time, peak RSS and block I/O (from wait4, through the launcher)."""
    os.sync()  # nothing left over from the previous step is written back during this one
    result = subprocess.run([sys.executable, "-c", LAUNCHER, *command], cwd=REPO, capture_output=True, text=True)
    if result.returncode != 0 or not result.stdout.strip():
        raise SystemExit(f"{command[:4]} failed:\n{result.stderr[-2000:]}")
    usage = json.loads(result.stdout.strip().splitlines()[-1])
    if usage["code"] != 0:
        raise SystemExit(f"{command[:4]} failed ({usage['code']}):\n{result.stderr[-2000:]}")
    return Measured(usage["wall"], usage["maxrss_kb"] * 1024 / 1e9, usage["inblock"] * 512 / 1e9,
                    usage["oublock"] * 512 / 1e9, "\n".join(result.stdout.strip().splitlines()[:-1]))


def bench_depth(workdir: Path, layers: int, mode: str, repeat: int, grow_to: int | None = None) -> dict:
    """Surgery of a `layers`-deep pair (grown to `grow_to` layers with a donor that deep) against a plain copy."""
    depth = grow_to or layers
    label = f"{layers} -> {depth}" if grow_to else str(layers)
    base, donor, out, copy = (workdir / f"{name}-{label.replace(' -> ', '-')}"
                              for name in ("base", "donor", "out", "copy.bin"))
    print(f"\n== {label} layers: writing a random bf16 base and donor under {workdir}", flush=True)
    base_params = write_random_llama(base, BASE, layers, seed=0)
    donor_params = write_random_llama(donor, DONOR, depth, seed=1)
    print(f"   base {base_params / 1e9:.2f}B params, donor {donor_params / 1e9:.2f}B params", flush=True)

    inputs = sorted(base.glob("*.safetensors")) + sorted(donor.glob("*.safetensors"))
    surgeries, copies = [], []
    for _ in range(repeat):
        # Alternating runs on the same warm inputs; the fastest of each is the least disturbed by other load.
        surgeries.append(measure([sys.executable, "-m", "surgery", "--base", str(base), "--donor", str(donor),
                                  "--out", str(out), "--mode", mode, "--dtype", "bfloat16",
                                  "--num-hidden-layers", str(depth)]))
        io = json.loads((out / "manifest.json").read_text())["io"]
        shutil.rmtree(out)
        copies.append(measure([sys.executable, "-c", COPY_SCRIPT, os.pathsep.join(map(str, inputs)),
                               str(io["bytes_read"]), str(io["bytes_written"]), str(copy)]))
        copy.unlink()
        print(f"   surgery {surgeries[-1].wall_s:.1f} s, copy {copies[-1].wall_s:.1f} s", flush=True)
    shutil.rmtree(base)
    shutil.rmtree(donor)
    return {"layers": label, "grown": grow_to is not None, "base_params": base_params, "donor_params": donor_params,
            "io": io,
            "surgery": best(surgeries), "copy": best(copies),
            "median_ratio": statistics.median(s.wall_s / c.wall_s for s, c in zip(surgeries, copies, strict=True))}


def best(runs: list[Measured]) -> Measured:
    """Fastest wall time, worst peak RSS: noise only ever adds time, while memory must hold in every run."""
    return Measured(min(r.wall_s for r in runs), max(r.peak_rss_gb for r in runs), min(r.block_in_gb for r in runs),
                    min(r.block_out_gb for r in runs))


def print_checks(checks: list[tuple[str, bool]]) -> bool:
    """One PASS or MISS line per (text, met) target; True when every target is met."""
    for text, ok in checks:
        print(f"{'PASS' if ok else 'MISS'}  {text}")
    return all(ok for _, ok in checks)


def report(results: list[dict], mode: str) -> bool:
    print(f"\nsurgery ({mode}, bf16) vs a plain copy of the same bytes; fastest run of each, ratio = surgery / copy;"
          " median ratio over the paired runs")
    print(f"{'layers':>8} {'params':>11} {'read GB':>8} {'written GB':>10} {'surgery s':>10} {'copy s':>8} "
          f"{'ratio':>6} {'median':>6} {'surgery RSS GB':>14} {'copy RSS GB':>11}")
    for r in results:
        s, c = r["surgery"], r["copy"]
        print(f"{r['layers']:>8} {r['base_params'] / 1e9:>4.2f}/{r['donor_params'] / 1e9:>4.2f}B "
              f"{r['io']['bytes_read'] / 1e9:>8.2f} {r['io']['bytes_written'] / 1e9:>10.2f} {s.wall_s:>10.1f} "
              f"{c.wall_s:>8.1f} {s.wall_s / c.wall_s:>6.2f} {r['median_ratio']:>6.2f} {s.peak_rss_gb:>14.2f} "
              f"{c.peak_rss_gb:>11.2f}")
    plain = [r for r in results if not r["grown"]]
    grown = [r for r in results if r["grown"]]
    largest = plain[-1]
    peak = max(r["surgery"].peak_rss_gb for r in results)
    ratio = largest["surgery"].wall_s / largest["copy"].wall_s
    growth = largest["surgery"].peak_rss_gb / plain[0]["surgery"].peak_rss_gb
    checks = [
        (f"peak RSS {peak:.2f} GB <= {TARGETS['peak_rss_gb']} GB", peak <= TARGETS["peak_rss_gb"]),
        (f"peak RSS {plain[0]['layers']} -> {largest['layers']} layers x{growth:.3f} "
         f"(no growth: <= x{TARGETS['rss_growth']})", growth <= TARGETS["rss_growth"]),
        # The target is stated for the 1B/1.5B pair; smaller runs carry the same ~2-3 s of interpreter and torch
        # start-up over fewer bytes, so their ratio is printed above but not judged.
        (f"wall time at {largest['layers']} layers x{ratio:.2f} the copy (<= x{TARGETS['wall_ratio']})",
         ratio <= TARGETS["wall_ratio"]),
    ]
    for r in grown:
        grown_growth = r["surgery"].peak_rss_gb / largest["surgery"].peak_rss_gb
        grown_ratio = r["surgery"].wall_s / r["copy"].wall_s
        checks += [
            (f"peak RSS grown {r['layers']} layers x{grown_growth:.3f} the plain {largest['layers']} layers' "
             f"(<= x{TARGETS['rss_growth']})", grown_growth <= TARGETS["rss_growth"]),
            (f"wall time grown {r['layers']} layers x{grown_ratio:.2f} the copy (<= x{TARGETS['wall_ratio']})",
             grown_ratio <= TARGETS["wall_ratio"]),
        ]
    return print_checks(checks)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, nargs="+", default=[8, 16])
    parser.add_argument("--grow-to", type=int, default=24, help="also grow the deepest base to this many layers "
                        "(0: no depth-grown run)")
    parser.add_argument("--mode", default="readers")
    parser.add_argument("--repeat", type=int, default=3, help="alternating surgery/copy runs per depth")
    parser.add_argument("--workdir", default=tempfile.gettempdir(), help="where the temporary checkpoints go")
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="surgery-bench-", dir=args.workdir))
    try:
        results = [bench_depth(workdir, layers, args.mode, args.repeat) for layers in args.layers]
        if args.grow_to:
            results.append(bench_depth(workdir, max(args.layers), args.mode, args.repeat, grow_to=args.grow_to))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0 if report(results, args.mode) else 1


if __name__ == "__main__":
    sys.exit(main())
