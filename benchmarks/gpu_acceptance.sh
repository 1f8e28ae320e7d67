#!/usr/bin/env bash
# GPU acceptance runs, one stage per device call (each stays under 10 minutes on an H100/H200).
#   bash benchmarks/gpu_acceptance.sh STAGE [OUTDIR]
# Stages: att05 (attention sweep 0.5B + MHA), att15 (attention sweep 1.5B + MHA), pos (positional sweep 1.5B),
#         moe (MoE 0.5Bx8 + dense 0.5B + ragged_dot micro-benchmark), hf (HF fixture + Qwen2.5-0.5B parity),
#         shard2 (2 GPUs: dp / fsdp vs one GPU at 0.5B and 1.5B),
#         scale4 (4 GPUs: 1-GPU baselines, dp2 / fsdp2 and dp2 x fsdp2 at 0.5B and 1.5B),
#         slurm4 (4 GPUs: GQA 0.5B / 1.5B with fsdp4 and MoE 1.5Bx8 with expert parallelism over 4, each through
#                 the sbatch script `python -m launch.slurm` writes, run by benchmarks/local_slurm/srun),
#         kernels2 (2 GPUs, each stream a sequence of one-GPU measurements with its baseline in the same process:
#                 GPU0 flash attention vs cuDNN, grouped matmul vs ragged_dot and dense, MoE step vs a dense model
#                 of equal active parameters; GPU1 NSA kernels vs full cuDNN, our 0.5B step vs the transformers
#                 peer). Writes $OUT/k_gpu*.txt.
#         perf (1 GPU: ours vs the peer at 0.5B / 1.5B with remat dots_attention (default) and dots, MoE 0.5Bx8 vs dense:
#               default remat and dots_kernels, each with the device-time profile),
#         t5 (1 GPU: the flash kernel's T5 bias: GPU test, kernel vs xla, 1.5B training through pallas vs xla),
#         grid (1 GPU: flash attention vs cuDNN at 2K and 8K, all head dims and layouts),
#         ep4 (4 GPUs: expert-parallel GPU test, MoE 1.5Bx8 over expert=4 through the sbatch script),
#         perf05 (1 GPU: the 0.5B step with the Mosaic kernels (auto) and with cuDNN, each profiled, and the peer;
#                 ~9 minutes on a cold compile cache),
#         xent (1 GPU: the loss kernel's GPU test, its tiles against XLA's loss pass on one 0.5B chunk, then the
#               unrolled 0.5B step with train.loss_impl=pallas against xla, interleaved and profiled; ~6 minutes),
#         mosaic (1 GPU: the Mosaic GPU flash kernels' GPU test, then vs cuDNN and the Triton kernel at 8K, and the
#                 backward's fused_dq / overlap / dq_k / dkv_q / heavy_first switches at d 128 / 64 against
#                 cuDNN, interleaved; ~7 minutes),
#         mesh2 (2 GPUs: the Mosaic attention kernels and the loss kernel per device on a mesh against one device,
#                tests/test_gpu_mesh.py; then the 0.5B step on data=2, micro-batch 8 (4 a GPU), with `auto` (cuDNN
#                and XLA's loss on a mesh), the Mosaic kernels and the loss kernel, interleaved in one process;
#                never run yet).
# Results (tables, summaries) are copied to OUTDIR (default $OUT, else results/).
set -uo pipefail
stage=$1; out=${2:-${OUT:-results}}
export PYTHONUNBUFFERED=1 EFFICIENTLLM_CACHE=${EFFICIENTLLM_CACHE:-/tmp/elc}
R=results/efficientllm_benchmark
common=(--steps=20 --timeout_s=240 --config.train.eval_batches=2 --config.checkpoint.every=0)
mha() {  # MHA is not in the EfficientLLM sweep; run it beside it
  python -m launch --config=configs/attention/mha.py:$1 --workdir=$R/attention_results/mha_$1 --overwrite \
    --config.train.steps=20 --config.train.log_every=10 --config.train.eval_batches=2 --config.checkpoint.every=0 2>&1 \
    | grep -E "^(model|done|error)"
}
nvidia-smi --query-gpu=name,memory.total,driver_version,power.limit --format=csv,noheader
case $stage in
  att05) timeout 150 python -m pytest -q -m gpu tests/test_attention.py tests/test_monitor.py 2>&1 | tail -3
         python -m launch.bench attention --scale=paper "${common[@]}" --only=mqa_0.5B,gqa_0.5B,mla_0.5B,nsa_0.5B --noplots
         mha 0.5B ;;
  att15) python -m launch.bench attention --scale=paper "${common[@]}" --only=mqa_1.5B,gqa_1.5B,mla_1.5B --noplots
         mha 1.5B
         # NSA's pure-JAX reference runs ~12 s/step at 0.5B/8K on an H100: 6 steps (3 measured after warm-up).
         python -m launch.bench attention --scale=paper --steps=6 --timeout_s=200 --config.train.eval_batches=1 \
           --config.checkpoint.every=0 --only=nsa_0.5B,nsa_1.5B --force --noplots ;;
  pos)   python -m launch.bench positional --scale=paper "${common[@]}" --noplots ;;
  moe)   python benchmarks/moe_ragged_dot.py 2>&1 | tail -12
         python -m launch.bench moe --scale=paper "${common[@]}" --only=moe_0.5Bx8 --noplots
         python -m launch --config=configs/base.py:0.5B --workdir=$R/moe_results/dense_0.5B --overwrite \
           --config.train.steps=20 --config.train.log_every=10 --config.train.eval_batches=2 --config.checkpoint.every=0 \
           2>&1 | grep -E "^(done|error)" ;;
  shard2) python benchmarks/scaling.py --sizes=0.5B,1.5B --steps=20 --out=$out/scaling.json ;;
  scale4) python benchmarks/scaling.py --sizes=0.5B,1.5B --meshes=data2,fsdp2,data2xfsdp2 --steps=20 --concurrent \
            --out=$out/scaling4.json ;;
  slurm4) S=results/efficientllm_benchmark/slurm
          python -m launch.slurm attention --scale=paper --partition=local --gpus=4 --only=gqa_0.5B,gqa_1.5B \
            --steps=20 --script=$S/fsdp4.sbatch --config.checkpoint.every=0 --config.train.eval_batches=1 --config.data.eval_fraction=0.06 \
            --config.mesh.shape.data=1 --config.mesh.shape.fsdp=4 > /dev/null
          python -m launch.slurm moe --scale=paper --partition=local --gpus=4 --only=moe_1.5Bx8 --steps=10 \
            --script=$S/ep4.sbatch --config.checkpoint.every=0 --config.train.eval_batches=1 --config.data.eval_fraction=0.06 \
            --config.mesh.shape.data=1 --config.mesh.shape.expert=4 > /dev/null
          for job in fsdp4:0 fsdp4:1 ep4:0; do
            PATH=$PWD/benchmarks/local_slurm:$PATH SLURM_ARRAY_TASK_ID=${job#*:} timeout 200 bash $S/${job%:*}.sbatch \
              2>&1 | grep -E "^(model|done|error|Traceback)|Error" | head -5
          done
          python -m launch.bench tables --noplots ;;
  kernels2)  # two GPUs, two streams each run one after the other (fits ~6 minutes)
    ( export CUDA_VISIBLE_DEVICES=0
      timeout 75 python -m pytest -q -m gpu tests/test_flash_kernel.py 2>&1 | tail -4
      timeout 75 python benchmarks/attention.py --seq=8192 --dims=128 --layouts=12/2 --impls=pallas,cudnn \
        --modes=fwd,fwdbwd --configs=64x64x4x2,64x128x8x2 --json=$out/k_attn.json 2>&1
      timeout 50 python -m pytest -q -m gpu tests/test_gmm_kernel.py 2>&1 | tail -4
      timeout 50 python benchmarks/grouped_matmul.py --shapes=0.5Bx8 --skip_ragged_bwd 2>&1
      timeout 90 python benchmarks/throughput.py --config=configs/base.py:0.5B --steps=5 --peer=0 \
        --override="model.ffn_dim=9728" --override="config=configs/moe/moe.py:0.5Bx8;moe.impl=pallas" 2>&1
    ) > $out/k_gpu0.txt &
    ( export CUDA_VISIBLE_DEVICES=1
      timeout 75 python -m pytest -q -m gpu tests/test_nsa_kernel.py 2>&1 | tail -4
      timeout 100 python -m benchmarks.attention_nsa --seqs 8192 65536 --reference-max 8192 --breakdown 2>&1
      timeout 150 python benchmarks/throughput.py --config=configs/base.py:0.5B --steps=5 --override="" 2>&1
    ) > $out/k_gpu1.txt &
    wait; tail -n 30 $out/k_gpu*.txt ;;
  perf) T=benchmarks/throughput.py
    python $T --config=configs/base.py:0.5B --steps=8 --timeout_s=110 --profile=2 --json=$out/perf05.json \
      --override="" --override="model.remat=dots" 2>&1 | grep -v "^{"
    python $T --config=configs/base.py:1.5B --steps=6 --timeout_s=130 --profile=2 --json=$out/perf15.json \
      --override="" --override="model.remat=dots" 2>&1 | grep -v "^{"
    python $T --config=configs/base.py:0.5B --set=model.ffn_dim=9728 --peer=0 --steps=6 --timeout_s=110 --profile=2 \
      --json=$out/perf_moe.json --override="" --override="config=configs/moe/moe.py:0.5Bx8" \
      --override="config=configs/moe/moe.py:0.5Bx8;model.remat=dots_kernels" 2>&1 | grep -v "^{" ;;
  t5) timeout 150 python -m pytest -q -m gpu tests/test_flash_kernel.py 2>&1 | tail -3
      timeout 120 python benchmarks/attention.py --seq=2048,8192 --dims=128 --layouts=12/2 --impls=pallas,xla --bias=t5
      for impl in pallas xla; do
        timeout 200 python -m launch --config=configs/positional/relative.py:1.5B --workdir=$R/t5_$impl --overwrite \
          --config.attention.impl=$impl --config.train.steps=20 --config.train.eval_batches=1 \
          --config.checkpoint.every=0 2>&1 | grep -E "^(done|error)"
      done ;;
  grid) timeout 400 python benchmarks/attention.py --seq=2048,8192 --impls=pallas,cudnn --json=$out/attn_grid.json \
          2>&1 | tail -40 ;;
  ep4) timeout 200 python -m pytest -q -m gpu tests/test_expert_parallel.py 2>&1 | tail -3
       S=results/efficientllm_benchmark/slurm
       python -m launch.slurm moe --scale=paper --partition=local --gpus=4 --only=moe_1.5Bx8 --steps=10 \
         --script=$S/ep4.sbatch --config.checkpoint.every=0 --config.train.eval_batches=1 --config.data.eval_fraction=0.06 \
         --config.mesh.shape.data=1 --config.mesh.shape.expert=4 > /dev/null
       PATH=$PWD/benchmarks/local_slurm:$PATH SLURM_ARRAY_TASK_ID=0 timeout 240 bash $S/ep4.sbatch 2>&1 \
         | grep -E "^(model|done|error|Traceback)|Error" | head -5
       python -m launch.bench tables --noplots ;;
  mesh2) timeout 240 python -m pytest -q -m gpu tests/test_gpu_mesh.py 2>&1 | tail -4
         timeout 330 python benchmarks/step_ab.py --config=configs/base.py:0.5B --set=train.micro_batch=8 \
           --set=train.logits_dtype=bfloat16 --set=train.loss_chunk=8192 --variant="" \
           --variant="attention.impl=mosaic" --variant="train.loss_impl=pallas" --rounds=3 --steps=4 2>&1 | tail -12 ;;
  mosaic) timeout 150 python -m pytest -q -m gpu tests/test_flash_mosaic.py 2>&1 | tail -3
          timeout 200 python benchmarks/attention.py --seq=8192 --dims=128,64 --layouts=12/2,14/2 \
            --impls=mosaic,pallas --json=$out/attn_mosaic.json 2>&1 | grep "^|"
          timeout 300 python - <<'PY'
import math, statistics, time
import jax, jax.numpy as jnp
from efficientllm_jax.kernels.flash import mosaic
from efficientllm_jax.models.attention import ops
# the backward's switches and cuDNN, timed in three interleaved rounds (the machines drift by up to 10 % in a call)
# (heavy_first, longest-first CTA launch, is the default since session 9; heavy_first=False is the sawtooth)
variants = (dict(), dict(heavy_first=False), dict(overlap=False), dict(dq_k=128), dict(fused_dq=True),
            dict(fused_dq=True, overlap=False), dict(fused_dq=True, dkv_q=128, overlap=False),
            dict(fused_dq=True, dkv_q=128, overlap=False, heavy_first=False))
for b, h, kvh, d in ((2, 12, 2, 128), (4, 14, 2, 64)):
  ks = jax.random.split(jax.random.key(0), 4)
  q, do = (jax.random.normal(ks[i], (b, 8192, h, d), jnp.bfloat16) for i in (0, 3))
  k, v = (jax.random.normal(ks[i], (b, 8192, kvh, d), jnp.bfloat16) for i in (1, 2))
  fns = {"cudnn": lambda *a, d=d: ops.cudnn_attention(*a, scale=1 / math.sqrt(d))}
  for kw in variants:
    blocks = mosaic.MosaicBlocks(**kw)
    if mosaic._smem_misfit(d, 2, blocks) is None:
      p = mosaic.MosaicParams(1 / math.sqrt(d), True, blocks)
      fns[str(kw)] = lambda *a, p=p: mosaic.mosaic_attention(*a, p)
  fns = {key: jax.jit(lambda q, k, v, f=f: jax.vjp(f, q, k, v)[1](do)) for key, f in fns.items()}
  for f in fns.values():
    jax.block_until_ready(f(q, k, v))
  best = {}
  for _ in range(3):
    for key, f in fns.items():
      ts = []
      for _ in range(5):
        t = time.perf_counter(); jax.block_until_ready(f(q, k, v)); ts.append(time.perf_counter() - t)
      best[key] = min(best.get(key, 1e9), statistics.median(ts))
  for key, t in best.items():
    print(f"B {b} heads {h}/{kvh} d {d} {key}: fwd+bwd {t * 1e3:.3f} ms ({best['cudnn'] / t:.2f}x cuDNN)")
PY
          ;;
  perf05)  # the 0.5B step's device-time breakdown with the Mosaic kernels (auto on Hopper) and with cuDNN, peer
    B="model.scan_layers=False;train.logits_dtype=bfloat16;train.loss_chunk=8192"
    timeout 560 python benchmarks/throughput.py --config=configs/base.py:0.5B --steps=8 --timeout_s=240 --profile=2 \
      --profile_top=16 --json=$out/perf05m.json --override="$B" --override="$B;attention.impl=cudnn" 2>&1 \
      | grep -v "^{" ;;
  xent)  # the loss kernel (train.loss_impl=pallas): GPU test, then the unrolled 0.5B step A/B against XLA, profiled
    timeout 120 python -m pytest -q -m gpu tests/test_xent_kernel.py 2>&1 | tail -3
    timeout 150 python benchmarks/xent.py --configs="2048,4 2048,4,2 2048,8 4096,4 4096,8 1024,4" 2>&1 | grep -v "^[WIE]0"
    timeout 420 python benchmarks/step_ab.py --config=configs/base.py:0.5B --set=model.scan_layers=False \
      --set=train.logits_dtype=bfloat16 --set=train.loss_chunk=8192 --variant="train.loss_impl=xla" --variant="train.loss_impl=pallas" \
      --rounds=3 --steps=5 --profile=2 --profile_top=10 --json=$out/xent_ab.json 2>&1 | grep -v "^[WIE]0" ;;
  *) echo "unknown stage $stage"; exit 2 ;;
esac
# At most a few files come back from a device call: one archive of summaries, tables, configs and metrics rows.
mkdir -p "$out" && tar czf "$out/$stage.tgz" --exclude='*tfevents*' --exclude='previous-*' --exclude='checkpoints' \
  --exclude='*.log' results/efficientllm_benchmark 2>/dev/null
ls -la "$out"
