"""``python -m raytseg.batch --config job.yaml``: the entrypoint of a KubeRay RayJob.

Inside a RayJob, KubeRay sets ``RAY_ADDRESS``, so the job joins the cluster it runs on::

    apiVersion: ray.io/v1
    kind: RayJob
    spec:
      entrypoint: python -m raytseg.batch --config /etc/raytseg/job.yaml
      shutdownAfterJobFinishes: true

The exit status is the job's: 0, 3 when failures exceed ``max_failures``, 1 when the job
cannot start (see ``raytseg.batch.cli``).
"""

from __future__ import annotations

import sys

from raytseg.cli import main

if __name__ == "__main__":
    sys.exit(main(["batch", *sys.argv[1:]]))
