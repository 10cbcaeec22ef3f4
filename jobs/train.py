"""Ray job entrypoint: train Flamingo's bridges (resampler, gated cross-attention, added token rows) with
both backbones frozen, as configured in a YAML file (see `jobs/train_configs/tiny.yaml`).

    ray job submit --working-dir . -- python jobs/train.py jobs/train_configs/tiny.yaml
    python jobs/train.py CONFIG --local        # the same loop in this process, without Ray

Takes the options of `flamingo-annotate train`. Running the same config again resumes from the run's
latest checkpoint.
"""

import sys

from flamingo_annotate.cli import main

if __name__ == "__main__":
    main(["train", *sys.argv[1:]], prog_name="jobs/train.py")
