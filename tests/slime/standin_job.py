"""Stand-in for a slime entrypoint: prints numbered lines, then succeeds, fails or waits to be stopped."""

import argparse
import os
import sys
import time

ap = argparse.ArgumentParser()
ap.add_argument("--lines", type=int, default=5)
ap.add_argument("--exit-code", type=int, default=0)
ap.add_argument("--hang", action="store_true", help="after the lines, print READY and sleep until killed")
ap.add_argument("--pid-file", default=None)
ap.add_argument("--show-env", action="append", default=[], help="print this environment variable")
ap.add_argument("--import-retool", action="store_true", help="print where the retool package came from")
args = ap.parse_args()

if args.pid_file:
    with open(args.pid_file + ".tmp", "w") as f:
        f.write(str(os.getpid()))
    os.replace(args.pid_file + ".tmp", args.pid_file)
for name in args.show_env:
    print(f"ENV {name}={os.environ.get(name)}", flush=True)
if args.import_retool:
    import retool.backends.slime.checkpoints as mod

    print(f"RETOOL_FROM {mod.__file__}", flush=True)
for i in range(args.lines):
    print(f"line {i}", flush=True)
    time.sleep(0.05)
if args.exit_code:
    print("failing on purpose", file=sys.stderr, flush=True)
    sys.exit(args.exit_code)
if args.hang:
    print("READY", flush=True)
    time.sleep(600)
print("DONE", flush=True)
