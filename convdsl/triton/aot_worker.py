"""Compiles kernels ahead of time in a process whose Triton is in compiled
mode (see convdsl/triton/__init__.py). Reads a JSON request on stdin, writes
the results as JSON on stdout."""
import base64
import json
import sys

PROGRESS = "convdsl-aot-done"  # a stderr line per compiled kernel


def main() -> None:
    request = json.load(sys.stdin)
    from .aot import compile_kernel

    results = []
    for job in request["jobs"]:
        compiled = compile_kernel(job["source"], job["name"], job["signature"],
                                  job["constexprs"], request["capability"], job.get("options"),
                                  job.get("attrs"))
        results.append({"ptx": compiled.asm["ptx"],
                        "cubin": base64.b64encode(compiled.asm["cubin"]).decode(),
                        "shared": int(compiled.metadata.shared)})
        print(PROGRESS, job["name"], file=sys.stderr, flush=True)  # the parent's progress bar
    json.dump(results, sys.stdout)


if __name__ == "__main__":
    main()
