"""bench.timing: compile and warm-up calls stay out of the median, and each sample covers `iters` calls."""

import time

from efficientllm_jax.bench import timing


def test_median_excludes_the_first_calls_and_divides_by_iters():
  calls = []

  def fn(x):
    calls.append(x)
    time.sleep(0.2 if len(calls) <= 3 else 0.01)  # compile + 2 warm-up calls are slow, the rest take 10 ms
    return x

  s = timing.median_seconds(fn, (1,), warmup=2, repeats=3, iters=2)
  assert len(calls) == 1 + 2 + 3 * 2
  assert 0.009 < s < 0.05
