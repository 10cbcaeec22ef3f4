"""Ray job entrypoint for the throughput benchmark, to size a cluster from one of its GPU nodes:

    ray job submit --working-dir . -- python jobs/bench.py --device cuda --dtype bfloat16 \\
        --model random-openflamingo-3b --batch-size 64 --json bench.json

Takes the options of `flamingo-annotate bench` (see `python jobs/bench.py --help`).
"""

import sys

from flamingo_annotate.cli import main

if __name__ == "__main__":
    main(["bench", *sys.argv[1:]], prog_name="jobs/bench.py")
