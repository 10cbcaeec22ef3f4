"""Ray job entrypoint: `flamingo-annotate run` against the cluster the job runs in.

    ray job submit --working-dir . -- python jobs/annotate.py TASK... --input s3://... --output s3://...

Takes the options of `flamingo-annotate run` (see `python jobs/annotate.py --help`); `--address auto` joins the
job's cluster. Task files are read in the job's working directory, so with `ray job submit` they must lie inside
it. `flamingo-annotate submit` builds the working directory and this command for you, and takes task files from
anywhere: it puts them, with the demonstration media they name by relative path, under `_tasks/`
(flamingo_annotate/cluster.py).
"""

import sys

from flamingo_annotate.cli import main

if __name__ == "__main__":
    main(["run", "--address", "auto", *sys.argv[1:]], prog_name="jobs/annotate.py")
