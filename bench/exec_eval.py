"""Sandboxed evaluation throughput, measured side by side in one run.

N small HumanEval-like samples (correct, wrong, crashing and `return None` completions of
ten tasks) go through `ratiocinator.execeval.engine` with its default workers and with
one worker, and through the plainest possible harness: a sequential loop of
`subprocess.run([python, "-c", program + test + "check(entry)"], timeout=...)`, with no
sandbox, no limits and no labels. Prints the machine, the three rates in samples/second
(median of rounds whose order rotates, with the spread over rounds), the ratio of default
`evaluate()` over the loop, and checks that both agree on which samples pass. Each
`evaluate()` call includes starting its zygotes (one per worker).

Usage: python bench/exec_eval.py [--samples 200] [--rounds 3] [--workers N]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from ratiocinator.execeval.engine import evaluate
from ratiocinator.execeval.samples import Limits, Sample

# (entry point, prompt, correct body, wrong body, crashing body, tests)
TASKS = [
    ("add", "def add(a: int, b: int) -> int:\n    \"\"\"Return a + b.\"\"\"\n",
     "    return a + b\n", "    return a - b\n", "    return a + b / 0\n",
     "def check(candidate):\n    assert candidate(1, 2) == 3\n    assert candidate(-4, 4) == 0\n"),
    ("is_palindrome", "def is_palindrome(text: str) -> bool:\n    \"\"\"Is text the same backwards?\"\"\"\n",
     "    return text == text[::-1]\n", "    return text == text[1:]\n", "    return text[len(text)] == text\n",
     ("def check(candidate):\n    assert candidate('') is True\n    assert candidate('aba') is True\n"
      "    assert candidate('ab') is False\n")),
    ("fib", "def fib(n: int) -> int:\n    \"\"\"The n-th Fibonacci number.\"\"\"\n",
     "    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n    return a\n",
     "    return n\n", "    return fib(n - 1) + fib(n - 2)\n",
     "def check(candidate):\n    assert candidate(0) == 0\n    assert candidate(10) == 55\n"),
    ("max_element", "def max_element(values: list) -> int:\n    \"\"\"The largest element.\"\"\"\n",
     "    return max(values)\n", "    return values[0]\n", "    return sorted(values)[len(values)]\n",
     "def check(candidate):\n    assert candidate([1, 2, 3]) == 3\n    assert candidate([5, 3, -5, 2]) == 5\n"),
    ("count_vowels", "def count_vowels(s: str) -> int:\n    \"\"\"How many vowels s has.\"\"\"\n",
     "    return sum(c in 'aeiouAEIOU' for c in s)\n", "    return len(s)\n", "    return int(s)\n",
     "def check(candidate):\n    assert candidate('abcde') == 2\n    assert candidate('ACEDY') == 2\n"),
    ("reverse_words", "def reverse_words(s: str) -> str:\n    \"\"\"The words of s in reverse order.\"\"\"\n",
     "    return ' '.join(reversed(s.split()))\n", "    return s[::-1]\n", "    return ' '.join(s.split()[::0])\n",
     "def check(candidate):\n    assert candidate('a b c') == 'c b a'\n    assert candidate('hi') == 'hi'\n"),
    ("factorial", "def factorial(n: int) -> int:\n    \"\"\"n!\"\"\"\n",
     "    out = 1\n    for k in range(2, n + 1):\n        out *= k\n    return out\n",
     "    return n * (n - 1)\n", "    return factorial(n + 1) // (n + 1)\n",
     "def check(candidate):\n    assert candidate(0) == 1\n    assert candidate(5) == 120\n"),
    ("gcd", "def gcd(a: int, b: int) -> int:\n    \"\"\"Greatest common divisor.\"\"\"\n",
     "    while b:\n        a, b = b, a % b\n    return a\n", "    return min(a, b)\n", "    return a % 0\n",
     "def check(candidate):\n    assert candidate(12, 18) == 6\n    assert candidate(7, 5) == 1\n"),
    ("is_prime", "def is_prime(n: int) -> bool:\n    \"\"\"Is n prime?\"\"\"\n",
     "    return n > 1 and all(n % d for d in range(2, int(n ** 0.5) + 1))\n",
     "    return n % 2 == 1\n", "    return n.is_prime()\n",
     ("def check(candidate):\n    assert candidate(2) is True\n    assert candidate(9) is False\n"
      "    assert candidate(97) is True\n")),
    ("flatten", "def flatten(nested: list) -> list:\n    \"\"\"One level of nesting removed.\"\"\"\n",
     "    return [x for inner in nested for x in inner]\n", "    return nested\n", "    return sum(nested)\n",
     "def check(candidate):\n    assert candidate([[1], [2, 3]]) == [1, 2, 3]\n    assert candidate([]) == []\n"),
]
# Of every 10 samples: 6 correct, 2 wrong, 1 crashing, 1 `return None`.
KINDS = ["correct"] * 6 + ["wrong"] * 2 + ["crash", "none"]


def build_samples(n: int) -> list[Sample]:
    samples = []
    for i in range(n):
        entry, prompt, correct, wrong, crash, test = TASKS[i % len(TASKS)]
        kind = KINDS[(i // len(TASKS)) % len(KINDS)]
        body = {"correct": correct, "wrong": wrong, "crash": crash, "none": "    return None\n"}[kind]
        samples.append(Sample(id=f"{entry}-{i}-{kind}", program=prompt + body, test=test, entry_point=entry))
    return samples


def sequential_subprocess(samples: list[Sample], timeout_s: float) -> tuple[float, list[bool]]:
    """The naive harness: one unconfined `python -c` per sample, one after another."""
    passed = []
    started = time.perf_counter()
    for sample in samples:
        source = f"{sample.program}\n{sample.test}\ncheck({sample.entry_point})\n"
        try:
            done = subprocess.run([sys.executable, "-c", source], capture_output=True, timeout=timeout_s,
                                  check=False)
            passed.append(done.returncode == 0)
        except subprocess.TimeoutExpired:
            passed.append(False)
    return time.perf_counter() - started, passed


def sandboxed(samples: list[Sample], limits: Limits, workers: int | None) -> tuple[float, list[bool], Counter]:
    started = time.perf_counter()
    results = evaluate(samples, limits=limits, workers=workers)
    elapsed = time.perf_counter() - started
    return elapsed, [r.label == "success" for r in results], Counter(r.label for r in results)


def machine() -> str:
    """CPU model and count, memory, kernel, Python, who we run as, the temp dir's filesystem."""
    def read(path: str) -> list[str]:
        try:
            return Path(path).read_text(encoding="utf-8").splitlines()
        except OSError:
            return []

    model = next((line.split(":", 1)[1].strip() for line in read("/proc/cpuinfo") if line.startswith("model name")),
                 "unknown CPU")
    mem_kb = next((int(line.split()[1]) for line in read("/proc/meminfo") if line.startswith("MemTotal")), 0)
    # Where the sandbox dirs go, and how: with `discard`, removing a dir that held files waits on the disk.
    tmp = tempfile.gettempdir()
    mounts = [m for m in (line.split() for line in read("/proc/mounts")) if len(m) > 3
              and (tmp == m[1] or tmp.startswith(m[1].rstrip("/") + "/"))]
    fs = "?"
    if mounts:
        best = max(mounts, key=lambda m: len(m[1]))
        flags = [o for o in best[3].split(",") if o in ("discard", "sync", "dirsync")]
        fs = f"{best[2]} ({','.join(flags) or 'async'})"
    identity = "root: one unprivileged sandbox uid per worker" if os.geteuid() == 0 else "non-root"
    return (f"{model}, {os.cpu_count()} CPUs, {mem_kb / 1024 / 1024:.1f} GiB, {platform.machine()}, "
            f"Linux {platform.release()}, Python {platform.python_version()}, {identity}, temp dir {tmp} on {fs}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workers", type=int, default=None, help="default: os.cpu_count()")
    parser.add_argument("--timeout", type=float, default=10.0)
    args = parser.parse_args()

    samples = build_samples(args.samples)
    limits = Limits(timeout_s=args.timeout)
    workers = args.workers or os.cpu_count() or 1
    print(f"machine: {machine()}")
    print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"samples: {len(samples)} HumanEval-like, {dict(Counter(s.id.rsplit('-', 1)[1] for s in samples))}")

    times: dict[str, list[float]] = {"naive": [], "one": [], "all": []}
    for round_number in range(args.rounds):
        # Rotate which goes first, so none always gets the warm caches.
        order = ["naive", "one", "all"]
        order = order[round_number % 3:] + order[:round_number % 3]
        for who in order:
            if who == "naive":
                elapsed, their_pass = sequential_subprocess(samples, args.timeout)
            else:
                elapsed, our_pass, labels = sandboxed(samples, limits, 1 if who == "one" else workers)
            times[who].append(elapsed)
    n = len(samples)
    naive, one, many = (statistics.median(times[k]) for k in ("naive", "one", "all"))
    agree = sum(a == b for a, b in zip(our_pass, their_pass, strict=True))
    print(f"load average after:  {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"labels: {dict(sorted(labels.items()))}; pass/fail agreement with the naive loop: {agree}/{n}")

    def spread(key: str) -> str:
        rates = sorted(n / t for t in times[key])
        return f"(rounds {rates[0]:.1f}..{rates[-1]:.1f})"

    print(f"median of {args.rounds} rotated rounds:")
    print(f"  sequential subprocess.run, no sandbox: {naive:7.3f} s  {n / naive:7.1f} samples/s  {spread('naive')}"
          f"  {naive / n * 1000:.1f} ms per sample")
    print(f"  evaluate(), 1 worker:                  {one:7.3f} s  {n / one:7.1f} samples/s  {spread('one')}"
          f"  {one / n * 1000:.1f} ms per sample ({(one - naive) / n * 1000:+.1f} ms vs the loop)")
    print(f"  evaluate(), {workers} workers (default):     {many:7.3f} s  {n / many:7.1f} samples/s  {spread('all')}")
    print(f"  ratio, default evaluate() over the sequential loop: {naive / many:.2f}x"
          f"  (1 worker over the loop: {naive / one:.2f}x)")


if __name__ == "__main__":
    main()
