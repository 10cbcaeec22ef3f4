"""Ray job entrypoint: `flamingo-annotate run` against the cluster the job runs in.

    ray job submit --working-dir . -- python jobs/annotate.py TASK... --input s3://... --output s3://...

Takes the options of `flamingo-annotate run` (see `python jobs/annotate.py --help`); `--address auto` joins the
job's cluster. `flamingo-annotate submit` builds this command for you.
"""

import sys

from flamingo_annotate.cli import main

if __name__ == "__main__":
    main(["run", "--address", "auto", *sys.argv[1:]], prog_name="jobs/annotate.py")
