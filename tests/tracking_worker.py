"""One rank of the two-process tracking test: RANK/WORLD_SIZE/... come from the environment.

Every rank makes the same calls; only rank 0 may reach MLflow. Prints one JSON line.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.config import TrackingConfig  # noqa: E402
from pipeline.runtime import distributed  # noqa: E402
from pipeline.runtime.tracking import Tracker  # noqa: E402


def main(uri: str) -> int:
    env = distributed.init_distributed()
    rank = env.rank
    cfg = TrackingConfig(uri=uri, experiment="two-ranks", system_metrics=False)
    with Tracker(cfg).start(run_name="two-ranks", params={"logged_by": rank}) as run:
        run.log_metrics({f"from_rank_{rank}": 1.0}, step=0)
        run.set_tags({f"tag_from_rank_{rank}": "yes"})
        run.log_text(f"rank {rank}\n", f"rank{rank}.txt")
        with run.child("eval", params={"child_logged_by": rank}) as child:
            child.log_metrics({f"child_from_rank_{rank}": 2.0}, step=0)
    print(json.dumps({"rank": rank, "run_id": run.run_id, "child_id": child.run_id,
                      "active": run.active, "has_client": run._client is not None}), flush=True)
    distributed.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
