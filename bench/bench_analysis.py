"""Cost of the analysis metrics and of the sweep runner, printed as times and ratios (one run, same load).

    OMP_NUM_THREADS=1 python bench/bench_analysis.py [--batch 8] [--heads 12] [--seq 128] [--repeats 3]

1. per layer of a BERT-base-shaped attention map (B, 12, 128, 128): cover length ratio vs pairwise ranking
   loss, the latter by sorting (margin 0, O(S² log S) per head) and pair by pair (margin > 0, O(S³));
2. one Hessian-vector product vs one gradient of a small random BERT (power iteration costs ~this ratio ×
   iterations × batches gradients);
3. the sweep runner's overhead per point: a no-op trainer run through ``run_point`` vs launched bare.
"""

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch  # noqa: E402

from ds_kdqat.analysis.attention_metrics import cover_length_ratio, pairwise_ranking_loss  # noqa: E402
from ds_kdqat.analysis.hessian import hessian_vector_product  # noqa: E402


def best_of(fn, repeats):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def bench_attention(args):
    g = torch.Generator().manual_seed(0)
    shape = (args.batch, args.heads, args.seq, args.seq)
    teacher = torch.softmax(torch.randn(shape, generator=g), -1)
    student = torch.softmax(torch.randn(shape, generator=g), -1)
    mask = torch.ones(args.batch, args.seq, dtype=torch.long)
    mask[:, args.seq * 3 // 4:] = 0
    cover = best_of(lambda: cover_length_ratio(teacher, student, mask, 5), args.repeats)
    ranking = best_of(lambda: pairwise_ranking_loss(teacher, student, mask), args.repeats)
    # a positive margin takes the pair-by-pair path (O(S²) per row): the cost the sorted path avoids
    pairs = best_of(lambda: pairwise_ranking_loss(teacher, student, mask, margin=1e-12), 1)
    print(f"attention metrics per layer, maps {shape}:")
    print(f"  cover_length_ratio               {cover * 1e3:9.1f} ms")
    print(f"  pairwise_ranking_loss (sorted)   {ranking * 1e3:9.1f} ms   ratio ranking/cover = {ranking / cover:.1f}")
    print(f"  pairwise_ranking_loss (pairs)    {pairs * 1e3:9.1f} ms   ratio pairs/sorted = {pairs / ranking:.1f}")


def bench_hessian(args):
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(vocab_size=1000, hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=512, max_position_embeddings=128, num_labels=2,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                        attn_implementation="eager")  # SDPA kernels have no double backward
    torch.manual_seed(0)
    model = BertForSequenceClassification(config).eval()
    ids = torch.randint(5, 1000, (8, 64))
    labels = torch.randint(0, 2, (8,))
    params = list(model.parameters())

    def loss():
        return torch.nn.functional.cross_entropy(model(input_ids=ids).logits, labels)

    vector = [torch.randn_like(p) for p in params]
    grad = best_of(lambda: torch.autograd.grad(loss(), params), args.repeats)
    hvp = best_of(lambda: hessian_vector_product([loss], params, vector), args.repeats)
    print(f"Hessian, random BERT {sum(p.numel() for p in params):,} params, batch 8×64:")
    print(f"  gradient               {grad * 1e3:9.1f} ms")
    print(f"  Hessian-vector product {hvp * 1e3:9.1f} ms   ratio hvp/grad = {hvp / grad:.2f}")


def bench_sweep(args):
    from ds_kdqat.sweep import load_sweep_config
    from ds_kdqat.sweep.grid import grid_points
    from ds_kdqat.sweep.runner import run_point

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        trainer = tmp / "noop.py"
        trainer.write_text("import argparse, json, os\np = argparse.ArgumentParser()\np.add_argument('--ds_config')\n"
                           "p.add_argument('--output_dir')\np.add_argument('--set', action='append')\n"
                           "a = p.parse_args()\nos.makedirs(a.output_dir, exist_ok=True)\n"
                           "open(os.path.join(a.output_dir, 'results.json'), 'w').write('{}')\n")
        (tmp / "base.json").write_text("{}")
        (tmp / "sweep.json").write_text(
            '{"ds_config": "%s", "trainer": "%s", "launcher": "%s", "output_root": "%s", "axes": {"tasks": %s}}'
            % (tmp / "base.json", trainer, sys.executable, tmp / "out",
               str([f"t{i}" for i in range(args.points)]).replace("'", '"')))
        config = load_sweep_config(tmp / "sweep.json")
        points = grid_points(config)
        start = time.perf_counter()
        for point in points:
            run_point(config, point, echo=lambda _: None)
        through_runner = (time.perf_counter() - start) / len(points)
        start = time.perf_counter()
        for i in range(len(points)):
            subprocess.run([sys.executable, str(trainer), "--ds_config", str(tmp / "base.json"), "--output_dir",
                            str(tmp / f"bare{i}")], check=True)
        bare = (time.perf_counter() - start) / len(points)
    print(f"sweep runner, no-op trainer, {len(points)} points:")
    print(f"  bare launch            {bare * 1e3:9.1f} ms/point")
    print(f"  through run_point      {through_runner * 1e3:9.1f} ms/point   overhead = "
          f"{(through_runner - bare) * 1e3:.1f} ms/point (ratio {through_runner / bare:.2f})")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--points", type=int, default=10)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, nproc {os.cpu_count()}")
    bench_attention(args)
    bench_hessian(args)
    bench_sweep(args)


if __name__ == "__main__":
    main()
