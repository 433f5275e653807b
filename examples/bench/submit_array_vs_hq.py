#!/usr/bin/env python3
"""Arrays of 2,000 trivial jobs: `workpool submit --array` against HyperQueue's
`hq submit --array`, side by side in one run, with `xargs -P2` as the baseline.

It takes HyperQueue's pool, the baseline and the helpers from the side-by-side harness
(hq_vs_workpool.py, found through HARNESS) so that both pools are set up the same way:
two workers of one slot each, mutual TLS for workpool, stdout and stderr discarded on
both sides. workpool's manager runs with --serve and trusts a submitter certificate;
the time is from starting `workpool submit --array 1-2000 -- true` to its exit (it
exits when every job has ended), as HyperQueue's is from `hq submit --array` to the end
of `hq job wait`. Everything started here is stopped by its PID.

  export BENCH_DIR=/tmp/hqb
  target/release/examples/workpool generate-tls-certificates --number-of-workers 2 \\
      --number-of-submitters 1 --hostname 127.0.0.1 --output-dir $BENCH_DIR/certs
  HQ_BIN=.../hq WORKPOOL_BIN=$PWD/target/release/examples/workpool \\
      HARNESS=path/to/hq_vs_workpool.py REPS=3 python3 examples/bench/submit_array_vs_hq.py
"""
import importlib.util, os, statistics, subprocess as sp, sys, time

spec = importlib.util.spec_from_file_location(
    "harness", os.environ.get("HARNESS", "hq_vs_workpool.py"))
h = importlib.util.module_from_spec(spec)
spec.loader.exec_module(h)

N = 2000


class WPServe:
    """A `manager --serve` and two workers of one slot."""

    def __init__(self, tag):
        self.dir = h.fresh_dir(tag)
        self.port = h.next_port()
        C = h.C
        self.m = sp.Popen([h.W, "manager", "--serve", "--no-journal", "--port", str(self.port),
                           "--security-pool-certificate", f"{C}/host-cert.pem",
                           "--security-pool-key", f"{C}/host-key.pem",
                           "--security-worker-certificates", f"{C}/worker-0-cert.pem", f"{C}/worker-1-cert.pem",
                           "--security-submitter-certificates", f"{C}/submitter-1-cert.pem"],
                          stdin=sp.DEVNULL, stdout=sp.DEVNULL,
                          stderr=open(self.dir + "/manager.err", "w"), cwd=self.dir)
        self.workers = [sp.Popen([h.W, "worker", "--port", str(self.port),
                                  "--security-pool-certificate", f"{C}/host-cert.pem",
                                  "--security-worker-certificate", f"{C}/worker-{i}-cert.pem",
                                  "--security-worker-key", f"{C}/worker-{i}-key.pem",
                                  "--name", f"w{i}", "--slots", "1"], cwd=self.dir,
                                 stdout=sp.DEVNULL, stderr=open(f"{self.dir}/w{i}.err", "w"))
                        for i in range(2)]
        for _ in range(400):
            r = sp.run(self.client("workers", "--json"), capture_output=True, text=True)
            if r.returncode == 0 and r.stdout.count('"worker"') == 2:
                break
            time.sleep(0.05)
        else:
            raise RuntimeError("workpool workers did not join")
        time.sleep(0.5)
        self.idle_rss = h.status_kb(self.m.pid, "VmRSS")

    def client(self, command, *rest):
        C = h.C
        return [h.W, command, "--port", str(self.port),
                "--security-pool-certificate", f"{C}/host-cert.pem",
                "--security-submitter-certificate", f"{C}/submitter-1-cert.pem",
                "--security-submitter-key", f"{C}/submitter-1-key.pem", *rest]

    def stop(self):
        for p in self.workers + [self.m]:
            h.stop_pid(p)


def wp_array(rep):
    pool = WPServe(f"wp-arr-{rep}")
    t0 = time.perf_counter()
    r = sp.run(pool.client("submit", "--array", f"1-{N}", "--", "true"),
               stdout=sp.DEVNULL, stderr=sp.PIPE, text=True)
    t = time.perf_counter() - t0
    assert r.returncode == 0, r.stderr
    assert f"{N} job(s): {N} exited; 0 did not succeed" in r.stderr, r.stderr
    h.rec(f"c WP submit --array {N} jobs/s", round(N / t, 1))
    h.rec(f"f WP manager peak RSS KiB after array", h.status_kb(pool.m.pid, "VmHWM"))
    pool.stop()


def main():
    os.makedirs(h.ROOT, exist_ok=True)
    for rep in range(1, h.REPS + 1):
        print(f"== rep {rep}", flush=True)
        steps = [h.baseline, lambda: h.hq_array(rep, "none"), lambda: wp_array(rep)]
        if rep % 2 == 0:
            steps.reverse()
        for s in steps:
            s()
    print("== medians (all runs)")
    for k in sorted(h.results):
        v = h.results[k]
        print(f"{k}: median {statistics.median(v)}  runs {v}")


if __name__ == "__main__":
    main()
